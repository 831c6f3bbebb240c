"""Whether the GPUs a trainer config asks for exist, answered before torch is imported.

The GPUs are counted through NVML (the NVIDIA driver's management library), as
``torch.cuda.device_count()`` does with ``PYTORCH_NVML_BASED_CUDA_CHECK=1``: NVML
creates no CUDA context, so processes forked later (data loader workers, DDP) can still
initialise CUDA themselves. ``CUDA_VISIBLE_DEVICES`` is applied the way CUDA applies it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cycleml.errors import ConfigError

_NVML_LIBRARY = "libnvidia-ml.so.1"


def _nvml_device_count() -> int | None:
    """GPUs the driver reports; 0 without a driver, None when that cannot be told."""
    try:
        nvml = ctypes.CDLL(_NVML_LIBRARY)
    except OSError:
        # no driver library: no GPU, unless GPU device nodes say otherwise (a container
        # or WSL without NVML); then Lightning is left to judge
        devices = [*Path("/dev").glob("nvidia[0-9]*"), Path("/dev/dxg")]
        return None if any(p.exists() for p in devices) else 0
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        return int(count.value)
    finally:
        nvml.nvmlShutdown()


def visible_cuda_devices() -> int | None:
    """How many CUDA GPUs this process can use: 0 without an NVIDIA driver or with all
    hidden by ``CUDA_VISIBLE_DEVICES``; None when the driver cannot be asked."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return 0
    found = _nvml_device_count()
    if visible is None or found is None:
        return found
    usable = 0
    # CUDA takes entries up to the first invalid one; UUIDs (GPU-…, MIG-…) are taken as valid
    for entry in visible.split(","):
        entry = entry.strip()
        if entry.lstrip("-").isdigit():
            if not 0 <= int(entry) < found:
                break
        elif not entry.startswith(("GPU-", "MIG-")):
            break
        usable += 1
    return min(usable, found)


def _gpus_asked(devices: Any) -> int | None:
    """GPUs that ``trainer.devices`` asks for; None for "all of them" (-1, "auto")."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return None if devices < 0 else devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text.lstrip("-").isdigit():
        return _gpus_asked(int(text))
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    return None


def check_gpus(trainer: Any) -> None:
    """A :class:`ConfigError` when ``trainer`` asks for CUDA GPUs this machine does not show."""
    if trainer is None:
        return
    accelerator = str(trainer.get("accelerator", "cpu"))
    if accelerator not in ("gpu", "cuda"):
        return
    if accelerator == "gpu" and sys.platform == "darwin":
        return  # Lightning maps "gpu" to Apple's MPS there
    devices = trainer.get("devices", "auto")
    if OmegaConf.is_config(devices):
        devices = OmegaConf.to_container(devices, resolve=True)
    asked = _gpus_asked(devices)
    if asked == 0:
        return
    found = visible_cuda_devices()
    if found is None:
        return  # the driver cannot be asked here: Lightning will tell
    if found == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} needs a CUDA GPU, and this machine shows none "
            "(no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them); train on the CPU with "
            "trainer=cpu"
        )
    if asked is not None and asked > found:
        raise ConfigError(
            f"trainer.devices={devices} asks for {asked} GPUs, and this machine shows {found}"
        )
