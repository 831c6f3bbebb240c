"""What users see when they get something wrong, and the CLI surface."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from cycleml.data.images import ImageFolderDataModule
from cycleml.errors import ConfigError, DataError
from cycleml.models.backbones import TorchvisionBackbone
from cycleml.training.train import train

ROOT = Path(__file__).resolve().parents[1]


def cycleml(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "CYCLEML_ROOT": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "cycleml", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_lists_commands(tmp_path):
    result = cycleml("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("train", "eval", "compare", "export", "predict", "serve"):
        assert f"  {command} " in result.stdout


def test_unknown_command_is_named(tmp_path):
    result = cycleml("trian", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown command 'trian'" in result.stderr


def test_unknown_group_option_lists_available(tmp_path):
    result = cycleml("train", "model=resnet19", cwd=tmp_path)
    assert result.returncode != 0
    assert "resnet19" in result.stderr
    assert "cnn" in result.stderr and "resnet18" in result.stderr


def test_cfg_job_prints_composed_config(tmp_path):
    result = cycleml("train", "model.optimizer.lr=0.01", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lr: 0.01" in result.stdout
    assert "SmallCNN" in result.stdout


def test_missing_data_folder_exits_with_message(tmp_path):
    result = cycleml(
        "train",
        "data=image_folder",
        f"data.path={tmp_path}/no_such_dir",
        "logger=csv",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert f"image folder '{tmp_path}/no_such_dir' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    # the failed run leaves no folder holding only its config and train.log
    runs = tmp_path / "logs" / "train" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


@pytest.mark.slow
def test_multirun_two_trials(tmp_path):
    result = cycleml(
        "train",
        "-m",
        "model.optimizer.lr=0.001,0.01",
        "debug=fdr",
        "trainer.max_epochs=1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = sorted((tmp_path / "logs" / "debug" / "multiruns").glob("*/*/summary.json"))
    assert len(summaries) == 2
    lrs = sorted(
        __import__("json").loads(p.read_text())["config"]["model"]["optimizer"]["lr"]
        for p in summaries
    )
    assert lrs == [0.001, 0.01]


def test_empty_class_folder_is_named(tmp_path, demo_images):
    import shutil

    root = tmp_path / "images"
    shutil.copytree(demo_images, root)
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        ImageFolderDataModule(path=str(root)).setup()


def test_unreadable_images_are_listed_not_fatal(tmp_path, demo_images, caplog):
    import shutil

    root = tmp_path / "images"
    shutil.copytree(demo_images, root)
    bad = root / "circle" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    truncated = root / "square" / "cut.png"
    truncated.write_bytes((demo_images / "square" / "0000.png").read_bytes()[:60])
    dm = ImageFolderDataModule(path=str(root), image_size=16)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert {p for p, _ in dm.unreadable} == {str(bad), str(truncated)}
    assert str(bad) in caplog.text and str(truncated) in caplog.text
    assert len(dm.labels) == 4 * 24


def test_grey_and_rgb_images_load_at_the_requested_size(demo_images):
    dm = ImageFolderDataModule(path=str(demo_images), image_size=[20, 24], channels=1)
    dm.setup()
    assert dm.images.shape == (96, 20, 24, 1)
    assert dm.class_names == ["circle", "cross", "square", "triangle"]


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TorchvisionBackbone("resnet18", weights_path=str(tmp_path / "r18.pth"))


def test_weights_of_another_architecture_do_not_fit(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit") as err:
        TorchvisionBackbone("resnet18", weights_path=str(path))
    assert "unexpected keys" in str(err.value)


def test_pretrained_weights_load_with_new_head_and_grey_input(tmp_path):
    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    net = TorchvisionBackbone("resnet18", in_channels=1, num_classes=4, weights_path=str(path))
    assert torch.equal(net.model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert torch.allclose(net.model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_safetensors_weights(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    source = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "r18.safetensors"
    safetensors.save_file(source.state_dict(), str(path))
    net = TorchvisionBackbone("resnet18", num_classes=10, weights_path=str(path))
    assert torch.equal(net.model.fc.weight, source.fc.weight)


def test_weights_path_from_config_reaches_the_network(make_cfg, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    from cycleml.hydra_app import user_error

    cfg = make_cfg("train", "model=resnet18", f"model.net.weights_path={tmp_path}/missing.pth")
    with pytest.raises(Exception, match="missing.pth") as raised:
        train(cfg)
    assert isinstance(user_error(raised.value), ConfigError)


def test_unknown_torchvision_model_lists_choices():
    with pytest.raises(ConfigError, match="resnet18"):
        TorchvisionBackbone("resnet_nope")
