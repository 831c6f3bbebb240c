"""Image backbones from torchvision and timm, with pretrained weights from a local file.

Nothing is downloaded: ``weights_path`` names a ``.pth``/``.pt`` state dict (optionally
under a ``state_dict`` or ``model`` key) or a ``.safetensors`` file. A classifier head
whose shape differs (another number of classes) is left freshly initialised; any
other mismatch is an error that lists the offending keys.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from cycleml.errors import ConfigError

log = logging.getLogger(__name__)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.pth``/``.pt``/``.bin`` or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"pretrained weights file '{path}' does not exist (model.net.weights_path)"
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ConfigError(
                f"reading '{path}' needs the safetensors package: pip install safetensors"
            ) from err
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"could not read weights file '{path}': {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file '{path}' holds a {type(state).__name__}, not a state dict")
    return state


def load_pretrained(
    net: nn.Module,
    path: str | Path,
    head_prefixes: tuple[str, ...],
    state: dict[str, Tensor] | None = None,
) -> None:
    """Load ``path`` (or its already-read ``state``) into ``net``.

    The classifier head may differ in shape; nothing else may.
    """
    state = load_state_dict_file(path) if state is None else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not k.startswith(head_prefixes))
    mismatched = sorted(
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape and not k.startswith(head_prefixes)
    )
    if unexpected or missing or mismatched:
        lines = [f"weights file '{path}' does not fit the model {type(net).__name__}:"]
        for title, keys in (
            ("unexpected", unexpected),
            ("missing", missing),
            ("shape", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:8]) + (f" … ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"  {title} keys: {shown}")
        raise ConfigError("\n".join(lines))
    head_skipped = [
        k for k, v in state.items() if k.startswith(head_prefixes) and v.shape != own[k].shape
    ]
    loadable = {k: v for k, v in state.items() if k not in head_skipped}
    net.load_state_dict(loadable, strict=False)
    log.info(
        "loaded pretrained weights from %s (%d tensors%s)",
        path,
        len(loadable),
        f"; classifier head re-initialised: {head_skipped}" if head_skipped else "",
    )


def _adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """RGB filters → grey by summing over colour (keeps activations' scale)."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)


class TorchvisionBackbone(nn.Module):
    """A torchvision classification model by name (resnet18, resnet50, mobilenet_v3_small…)."""

    def __init__(
        self,
        name: str = "resnet18",
        in_channels: int = 3,
        num_classes: int = 10,
        weights_path: str | None = None,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        import torchvision

        try:
            self.model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except ValueError as err:
            available = ", ".join(sorted(torchvision.models.list_models(torchvision.models)))
            raise ConfigError(
                f"unknown torchvision model '{name}' (model.net.name); available: {available}"
            ) from err
        if weights_path:
            load_pretrained(self.model, weights_path, head_prefixes=("fc.", "classifier.", "head."))
        if small_input and hasattr(self.model, "conv1"):
            # 3x3 stride-1 stem without max-pool: keeps resolution on 32 px inputs
            self.model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.model.maxpool = nn.Identity()
        if in_channels != 3:
            self._set_in_channels(in_channels)

    def _set_in_channels(self, in_channels: int) -> None:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels,
                    module.out_channels,
                    module.kernel_size,
                    module.stride,
                    module.padding,
                    bias=module.bias is not None,
                )
                with torch.no_grad():
                    new.weight.copy_(_adapt_first_conv(module.weight, in_channels))
                    if module.bias is not None:
                        new.bias.copy_(module.bias)
                parent_name, _, attr = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, attr, new)
                return

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class TimmBackbone(nn.Module):
    """Any timm model by name; needs ``pip install timm``. Weights from a local file only."""

    def __init__(
        self,
        name: str = "resnet18",
        in_channels: int = 3,
        num_classes: int = 10,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as err:
            raise ConfigError(
                "model=timm needs the timm package: pip install timm (or use model=resnet18)"
            ) from err
        if not timm.is_model(name):
            raise ConfigError(
                f"unknown timm model '{name}' (model.net.name); see timm.list_models()"
            )
        self.model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels
        )
        if weights_path:
            head = self.model.default_cfg.get("classifier", "fc")
            heads = (head,) if isinstance(head, str) else tuple(head)
            state = load_state_dict_file(weights_path)
            first = self.model.default_cfg.get("first_conv")
            if isinstance(first, str) and f"{first}.weight" in state:
                state[f"{first}.weight"] = _adapt_first_conv(state[f"{first}.weight"], in_channels)
            load_pretrained(self.model, weights_path, tuple(f"{h}." for h in heads), state=state)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
