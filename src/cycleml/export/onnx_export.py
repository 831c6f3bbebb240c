"""Trace a module to ONNX with a dynamic batch axis, then check the graph."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from torch import nn

from cycleml.errors import BundleError

log = logging.getLogger(__name__)

OUTPUT_NAME = "probabilities"
MIN_OPSET = 17


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    opset: int = 18,
    extra_outputs: tuple[str, ...] = (),
) -> None:
    """Write ``module`` to ``path`` with one input ``input_name`` and the output
    ``probabilities`` (then ``extra_outputs``, in the module's order), all with a
    dynamic batch axis.

    Uses the ``torch.export``-based exporter (``dynamo=True``): the TorchScript one
    is deprecated in PyTorch and gives no cleaner graph for these networks.
    """
    if opset < MIN_OPSET:
        raise BundleError(f"export.opset={opset}: bundles need opset {MIN_OPSET} or newer")
    module = module.eval()
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")  # the exporter warns about its own internals
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[input_name],
            output_names=[OUTPUT_NAME, *(_TEMP_PREFIX + name for name in extra_outputs)],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise BundleError("torch.onnx.export returned no program")
    program.save(str(path))
    if extra_outputs:
        _name_outputs(path, extra_outputs)
    check_graph(path)


_TEMP_PREFIX = "cycleml_output_"


def _name_outputs(path: Path, names: tuple[str, ...]) -> None:
    """Give the extra outputs their names. The exporter names intermediate values after
    their ops (an ``nn.Embedding`` makes a value ``embedding``), so the outputs are
    exported under temporary names and renamed here, moving any intermediate value
    that holds a wanted name out of the way first."""
    model = onnx.load(str(path))
    graph = model.graph
    renames = {name: f"{name}_value" for name in names}
    renames.update({_TEMP_PREFIX + name: name for name in names})
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in [*graph.value_info, *graph.output]:
        value.name = renames.get(value.name, value.name)
    for initializer in graph.initializer:
        initializer.name = renames.get(initializer.name, initializer.name)
    onnx.save(model, str(path))


@contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The exporter's optimizer logs every pass at INFO; keep warnings and errors only."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_graph(path: Path) -> None:
    """``onnx.checker`` full check (types and shapes included)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise BundleError(f"exported graph '{path}' fails onnx.checker: {err}") from err
    log.info("onnx.checker: %s passes the full check", path.name)
