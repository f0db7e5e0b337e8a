"""Standalone export of an adapted discrete network: TorchScript, ONNX, size and cost.

The exported module is :class:`StandaloneClassifier`: the task's :class:`DiscreteNetwork`
preceded by the input normalisation its dataset used (per-channel ``(x * scale - shift) /
std`` as constants), so it takes images with pixel values in [0, 1], shape
``(B, C, H, W)``, and returns logits ``(B, n_way)``. Its BatchNorms (parameter-free, batch
statistics in the supernet) are exported in one of two ways:

* given the task's support images, with **frozen support statistics**
  (:func:`freeze_batch_norms`, :class:`FrozenStatNorm`): every BatchNorm's mean and variance
  are computed once, in one forward pass over the support images after the input
  normalisation, and stored as buffers (``running_mean``, ``running_var``). Each image is
  then classified on its own: predictions do not depend on the batch. On the support set the
  result equals the batch-statistics network's.
* without them, with **batch statistics** (:class:`BatchStatNorm`, the DARTS/MetaNAS
  convention): each batch is normalised with its own statistics, so query images must be
  classified together in one batch and a prediction depends on the rest of the batch.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import flops
from .io import atomic_write_bytes
from .errors import ConfigError

__all__ = [
    "BATCH",
    "EXPORT_NORMS",
    "SUPPORT",
    "BatchStatNorm",
    "FrozenStatNorm",
    "StandaloneClassifier",
    "count_parameters",
    "export_onnx",
    "export_torchscript",
    "flops_per_image",
    "freeze_batch_norms",
    "load_torchscript",
    "onnx_bytes",
    "replace_batch_norms",
    "torchscript_bytes",
]

log = logging.getLogger(__name__)

SUPPORT, BATCH = "support", "batch"
EXPORT_NORMS = (SUPPORT, BATCH)
"""How an exported model's BatchNorms normalise: frozen support statistics or batch statistics."""


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


class FrozenStatNorm(nn.Module):
    """BatchNorm without affine parameters with fixed statistics, in plain ops.

    ``(x - running_mean) / sqrt(running_var + eps)`` per channel, in train and eval mode
    alike, so each image of a batch is normalised independently of the others.

    Args:
        running_mean, running_var: ``(C,)`` per-channel mean and (biased) variance.
        eps: added to the variance.
    """

    def __init__(self, running_mean: Tensor, running_var: Tensor, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", running_mean.detach().reshape(1, -1, 1, 1).clone())
        self.register_buffer("running_var", running_var.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C, H, W)`` -> the same shape, normalised per channel."""
        return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)


def _swap_children(net: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> None:
    """Replace, in place, every submodule ``m`` (dotted name ``name``) for which
    ``make(name, m)`` returns a module."""
    for parent_name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            new = make(f"{parent_name}.{child_name}" if parent_name else child_name, child)
            if new is not None:
                setattr(module, child_name, new)


def replace_batch_norms(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` with every parameter-free batch-statistics BatchNorm replaced.

    Raises:
        ConfigError: a BatchNorm with affine parameters or running statistics (not what
            metanas networks use).
    """
    net = copy.deepcopy(net)

    def make(name: str, child: nn.Module) -> nn.Module | None:
        if not isinstance(child, nn.modules.batchnorm._BatchNorm):
            return None
        if child.affine or child.track_running_stats:
            raise ConfigError(
                f"{name} is a BatchNorm with affine parameters or running "
                "statistics; export supports the parameter-free batch-statistics kind"
            )
        return BatchStatNorm(child.eps)

    _swap_children(net, make)
    return net


def freeze_batch_norms(net: nn.Module, x: Tensor) -> nn.Module:
    """A copy of ``net`` whose BatchNorms use the statistics they see on ``x``, frozen.

    ``net``'s parameter-free batch-statistics BatchNorms (or :class:`BatchStatNorm`) become
    :class:`FrozenStatNorm` holding the batch mean and variance of their input in one
    forward pass of ``net`` on ``x`` (so on ``x`` the copy computes what ``net`` does, and on
    any other input each image is normalised on its own).

    Args:
        net: the network (not changed).
        x: the images the statistics come from, ``(N, C, H, W)`` as ``net`` takes them.

    Raises:
        ConfigError: a BatchNorm with affine parameters or running statistics, or one that
            runs more than once in a forward pass (it would need one set of statistics per use).
    """
    net = replace_batch_norms(net)
    stats: dict[str, tuple[Tensor, Tensor]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if name in stats:
                raise ConfigError(f"{name} runs twice in one forward pass; it cannot hold one set of statistics")
            (h,) = inputs
            mean = h.mean(dim=(0, 2, 3))
            stats[name] = (mean, (h - mean.reshape(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3)))
        return hook

    norms = {name: m for name, m in net.named_modules() if isinstance(m, BatchStatNorm)}
    handles = [m.register_forward_pre_hook(record(name)) for name, m in norms.items()]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for handle in handles:
            handle.remove()

    def make(name: str, child: nn.Module) -> nn.Module | None:
        if not isinstance(child, BatchStatNorm):
            return None
        if name not in stats:  # never runs, so its statistics never matter: the identity
            return FrozenStatNorm(torch.zeros(1), torch.ones(1), 0.0)
        return FrozenStatNorm(*stats[name], child.eps)

    _swap_children(net, make)
    return net


class StandaloneClassifier(nn.Module):
    """Input normalisation + a network, for export.

    The network is deep-copied with its BatchNorms written out in plain ops (exportable with
    a dynamic batch size): with ``support`` images, as :class:`FrozenStatNorm` holding the
    support set's statistics (:func:`freeze_batch_norms`; each image is classified on its
    own); without, as :class:`BatchStatNorm` (batch statistics, the network's own outputs).

    Args:
        net: the classifier (e.g. a :class:`~metanas.search_space.DiscreteNetwork`).
        channels: input channels C.
        scale, shift, std: per-channel ``(C,)`` constants: ``x' = (x * scale - shift) / std``
            on pixel values ``x`` in [0, 1]. Defaults: identity.
        support: the task's support images ``(N, C, H, W)``, pixel values in [0, 1] (as the
            model takes them; normalised here before the statistics are taken), on ``net``'s
            device; None keeps batch statistics.

    Attributes:
        norm: :data:`SUPPORT` (frozen support statistics) or :data:`BATCH`.
    """

    def __init__(
        self,
        net: nn.Module,
        channels: int,
        scale: Sequence[float] | None = None,
        shift: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        support: Tensor | None = None,
    ) -> None:
        super().__init__()

        def const(values: Sequence[float] | None, default: float) -> Tensor:
            t = torch.full((channels,), default) if values is None else torch.as_tensor(values, dtype=torch.float32)
            if t.shape != (channels,):
                raise ConfigError(f"normalisation constants {list(values)} need {channels} values")
            return t.reshape(1, channels, 1, 1)

        self.register_buffer("scale", const(scale, 1.0))
        self.register_buffer("shift", const(shift, 0.0))
        self.register_buffer("std", const(std, 1.0))
        if support is None:
            self.norm = BATCH
            self.net = replace_batch_norms(net)
        else:
            if support.ndim != 4 or support.shape[0] < 1 or support.shape[1] != channels:
                raise ConfigError(
                    f"support images of shape {tuple(support.shape)}: need (N >= 1, {channels}, H, W)"
                )
            self.norm = SUPPORT
            on = support.device
            normalised = (support * self.scale.to(on) - self.shift.to(on)) / self.std.to(on)
            self.net = freeze_batch_norms(net, normalised)

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
