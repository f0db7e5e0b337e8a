"""Standalone export of an adapted discrete network: TorchScript, ONNX, size and cost.

The exported module is :class:`StandaloneClassifier`: the task's :class:`DiscreteNetwork`
preceded by the input normalisation its dataset used (per-channel ``(x * scale - shift) /
std`` as constants), so it takes images with pixel values in [0, 1], shape
``(B, C, H, W)``, and returns logits ``(B, n_way)``. Like the supernet it normalises with the
statistics of the batch it is given (BatchNorm without running averages): classify query
images together in one batch, as metanas does, not one at a time.

* TorchScript (``torch.jit.trace``): loads with ``torch.jit.load`` alone, no metanas needed;
  the class names and input description travel inside the file (``metadata.json`` extra file).
* ONNX (``torch.onnx.export``, dynamic batch size): runs with onnxruntime.
* Parameter count and FLOPs per image (``torch.utils.flop_counter``: a multiply-add counts as
  2 FLOPs; convolutions and matrix products only).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import flops
from .io import atomic_write_bytes
from .errors import ConfigError

__all__ = [
    "BatchStatNorm",
    "StandaloneClassifier",
    "count_parameters",
    "export_onnx",
    "export_torchscript",
    "flops_per_image",
    "load_torchscript",
    "onnx_bytes",
    "replace_batch_norms",
    "torchscript_bytes",
]

log = logging.getLogger(__name__)


class BatchStatNorm(nn.Module):
    """BatchNorm without affine parameters or running averages, written out in plain ops.

    Computes exactly what ``nn.BatchNorm2d(C, affine=False, track_running_stats=False)``
    computes (biased variance over batch and space); exporters handle it with a dynamic
    batch size, which ONNX's BatchNormalization in training mode does not.
    """

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C, H, W)`` -> the same shape, normalised per channel."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps)


def replace_batch_norms(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` with every parameter-free batch-statistics BatchNorm replaced.

    Raises:
        ConfigError: a BatchNorm with affine parameters or running statistics (not what
            metanas networks use).
    """
    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                if child.affine or child.track_running_stats:
                    raise ConfigError(
                        f"{name}.{child_name} is a BatchNorm with affine parameters or running "
                        "statistics; export supports the parameter-free batch-statistics kind"
                    )
                setattr(module, child_name, BatchStatNorm(child.eps))
    return net


class StandaloneClassifier(nn.Module):
    """Input normalisation + a network, for export.

    The network is deep-copied with its BatchNorms written out as :class:`BatchStatNorm`
    (same outputs; exportable with a dynamic batch size).

    Args:
        net: the classifier (e.g. a :class:`~metanas.search_space.DiscreteNetwork`).
        channels: input channels C.
        scale, shift, std: per-channel ``(C,)`` constants: ``x' = (x * scale - shift) / std``
            on pixel values ``x`` in [0, 1]. Defaults: identity.
    """

    def __init__(
        self,
        net: nn.Module,
        channels: int,
        scale: Sequence[float] | None = None,
        shift: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.net = replace_batch_norms(net)

        def const(values: Sequence[float] | None, default: float) -> Tensor:
            t = torch.full((channels,), default) if values is None else torch.as_tensor(values, dtype=torch.float32)
            if t.shape != (channels,):
                raise ConfigError(f"normalisation constants {list(values)} need {channels} values")
            return t.reshape(1, channels, 1, 1)

        self.register_buffer("scale", const(scale, 1.0))
        self.register_buffer("shift", const(shift, 0.0))
        self.register_buffer("std", const(std, 1.0))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C, H, W)`` in [0, 1] -> logits ``(B, n_way)``."""
        return self.net((x * self.scale - self.shift) / self.std)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as normalisation constants excluded)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module, example: Tensor) -> float:
    """FLOPs per image of a forward pass on ``example`` ``(B, C, H, W)`` (total / B)."""
    with torch.no_grad():
        total = flops.count_flops(lambda: model(example))
    return total / example.shape[0]


def torchscript_bytes(model: nn.Module, example: Tensor, metadata: dict[str, Any]) -> bytes:
    """Trace ``model`` on ``example``; the serialised module with ``metadata.json`` inside."""
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 deprecates TorchScript
        traced = torch.jit.trace(model, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"metadata.json": json.dumps(metadata)})
    return buffer.getvalue()


def export_torchscript(
    model: nn.Module, example: Tensor, path: str | os.PathLike, metadata: dict[str, Any]
) -> None:
    """:func:`torchscript_bytes` written atomically to ``path``."""
    atomic_write_bytes(path, torchscript_bytes(model, example, metadata))


def load_torchscript(path: str | os.PathLike) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an exported model and its metadata (plain torch, as a user without metanas would)."""
    extra = {"metadata.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra["metadata.json"] or "{}")


def onnx_bytes(model: nn.Module, example: Tensor) -> bytes:
    """``model`` as ONNX (opset 18, dynamic batch axis; input ``images``, output ``logits``)."""
    model = model.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model, (example,), str(path), input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=18, dynamo=False,
        )
        return path.read_bytes()


def export_onnx(model: nn.Module, example: Tensor, path: str | os.PathLike) -> None:
    """:func:`onnx_bytes` written atomically to ``path``."""
    atomic_write_bytes(path, onnx_bytes(model, example))
