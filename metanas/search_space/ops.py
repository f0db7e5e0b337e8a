"""Candidate operations of a DARTS cell edge and the registry that names them.

Definitions follow DARTS (Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019):
ReLU-Conv-BN order, separable convolutions applied twice, dilated convolutions with dilation 2,
pools of size 3 and a factorized reduction for strided skip connections. The 7-op few-shot set is
the one of MetaNAS (Elsken et al., CVPR 2020).

Every normalisation is :func:`norm`, a ``BatchNorm2d(affine=False, track_running_stats=False)``:
it holds no parameters and no buffers, uses batch statistics in train and eval mode alike, and
keeps ``torch.func.vmap`` + second-order meta-gradients exact.

All ops map ``(B, C, H, W)`` to ``(B, C, H', W')`` with ``H' = H`` for stride 1 and
``H' = ceil(H / 2)`` for stride 2 (same for ``W``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metanas.errors import ConfigError

__all__ = [
    "OPS",
    "OP_PRESETS",
    "FactorizedReduce",
    "ReLUConvBN",
    "build_op",
    "is_plain",
    "norm",
    "resolve_ops",
]


def norm(C: int) -> nn.Module:
    """Parameter- and buffer-free batch norm over ``C`` channels (the DARTS search convention)."""
    return nn.BatchNorm2d(C, affine=False, track_running_stats=False)


class Zero(nn.Module):
    """The ``none`` op: zeros of the (possibly strided) input shape, ``(B, C, H', W')``."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x[:, :, :: self.stride, :: self.stride])


class ReLUConvBN(nn.Module):
    """ReLU, one ``kernel x kernel`` convolution, norm. Parameters: ``op.1.weight``."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(C_in, C_out, kernel, stride=stride, padding=padding, bias=False),
            norm(C_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class FactorizedReduce(nn.Module):
    """Halve the spatial size with two offset strided 1x1 convolutions (``C_out`` must be even).

    The second branch sees the input shifted by one pixel; the input is zero-padded by one
    row/column first so that both branches give ``ceil(H / 2)`` for odd sizes too.
    Parameters: ``conv1.weight``, ``conv2.weight``.
    """

    def __init__(self, C_in: int, C_out: int) -> None:
        super().__init__()
        if C_out % 2:
            raise ConfigError(
                f"FactorizedReduce needs an even number of output channels, got {C_out}; "
                "use an even channel count"
            )
        self.conv1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = norm(C_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1))


def is_plain(t: Tensor) -> bool:
    """True unless ``t`` is wrapped by a ``torch.func`` transform (vmap, grad, ...).

    Shortcuts that read tensor values in Python or change memory layouts are only taken on
    plain tensors; under a transform the generic path runs.
    """
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


class PoolBN(nn.Module):
    """3x3 max or average pool (``count_include_pad=False``) followed by norm.

    On CPU the pool runs in channels-last layout: PyTorch's CPU pooling kernels are several
    times faster there than in NCHW (``benchmarks/README.md``), and the two layout copies cost
    less than the difference. The values are identical. Set ``channels_last_on_cpu = False``
    on an instance for the plain NCHW pool.
    """

    channels_last_on_cpu: bool = True

    def __init__(self, kind: str, C: int, stride: int) -> None:
        super().__init__()
        pool = (
            nn.MaxPool2d(3, stride=stride, padding=1)
            if kind == "max"
            else nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        )
        self.op = nn.Sequential(pool, norm(C))

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last_on_cpu and x.device.type == "cpu" and x.dim() == 4 and is_plain(x):
            pooled = self.op[0](x.contiguous(memory_format=torch.channels_last))
            return self.op[1](pooled.contiguous())
        return self.op(x)


class Conv1xKKx1(nn.Module):
    """ReLU, ``1 x k`` conv (carries the stride), ``k x 1`` conv, norm.

    Parameters: ``op.1.weight``, ``op.2.weight``.
    """

    def __init__(self, C: int, k: int, stride: int) -> None:
        super().__init__()
        p = k // 2
        self.op = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(C, C, (1, k), stride=stride, padding=(0, p), bias=False),
            nn.Conv2d(C, C, (k, 1), stride=1, padding=(p, 0), bias=False),
            norm(C),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """ReLU, depthwise (dilated) ``k x k`` conv, pointwise 1x1 conv, norm.

    Parameters: ``op.1.weight``, ``op.2.weight``.
    """

    def __init__(self, C_in: int, C_out: int, k: int, stride: int, padding: int, dilation: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(
                C_in, C_in, k, stride=stride, padding=padding, dilation=dilation,
                groups=C_in, bias=False,
            ),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            norm(C_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """DARTS separable conv: two :class:`DilConv` (dilation 1), the first carries the stride.

    Parameters: ``op.0.op.1``, ``op.0.op.2``, ``op.1.op.1``, ``op.1.op.2`` (``.weight``).
    """

    def __init__(self, C: int, k: int, stride: int) -> None:
        super().__init__()
        p = k // 2
        self.op = nn.Sequential(DilConv(C, C, k, stride, p, 1), DilConv(C, C, k, 1, p, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


def _skip(C: int, stride: int) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(C, C)


OPS: Mapping[str, Callable[[int, int], nn.Module]] = MappingProxyType(
    {
        "none": lambda C, stride: Zero(stride),
        "max_pool_3x3": lambda C, stride: PoolBN("max", C, stride),
        "avg_pool_3x3": lambda C, stride: PoolBN("avg", C, stride),
        "skip_connect": _skip,
        "conv_3x3": lambda C, stride: ReLUConvBN(C, C, 3, stride, 1),
        "conv_1x5_5x1": lambda C, stride: Conv1xKKx1(C, 5, stride),
        "sep_conv_3x3": lambda C, stride: SepConv(C, 3, stride),
        "sep_conv_5x5": lambda C, stride: SepConv(C, 5, stride),
        "dil_conv_3x3": lambda C, stride: DilConv(C, C, 3, stride, 2, 2),
        # MetaNAS's "conv_3x3" (boschresearch/metanas models/ops.py): one depthwise-separable
        # 3x3 (DilConv with dilation 1), not a dense 3x3 convolution
        "dw_conv_3x3": lambda C, stride: DilConv(C, C, 3, stride, 1, 1),
        "dil_conv_5x5": lambda C, stride: DilConv(C, C, 5, stride, 4, 2),
    }
)
"""Read-only registry: op name -> factory ``(C, stride) -> nn.Module`` (C in = C out)."""

OP_PRESETS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "fewshot": (
            "max_pool_3x3", "avg_pool_3x3", "skip_connect", "conv_1x5_5x1",
            "conv_3x3", "sep_conv_3x3", "dil_conv_3x3",
        ),
        "metanas": (
            "max_pool_3x3", "avg_pool_3x3", "skip_connect", "conv_1x5_5x1",
            "dw_conv_3x3", "sep_conv_3x3", "dil_conv_3x3",
        ),
        "darts": (
            "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
            "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
        ),
    }
)
"""Named op sets: ``fewshot`` (MetaNAS's 7 few-shot ops, its ``conv_3x3`` as a dense 3x3
convolution), ``metanas`` (the same 7 with MetaNAS's own depthwise-separable ``conv_3x3``,
here ``dw_conv_3x3``: the authors' network size) and ``darts`` (DARTS, 8 ops incl. ``none``)."""


def build_op(name: str, C: int, stride: int) -> nn.Module:
    """Build the op ``name`` for ``C`` channels and ``stride`` (1 or 2).

    Raises:
        ConfigError: unknown op name (the message lists the known ones) or bad C / stride.
    """
    if name not in OPS:
        raise ConfigError(
            f"unknown op {name!r}; choose among {', '.join(sorted(OPS))}"
        )
    if stride not in (1, 2):
        raise ConfigError(f"op stride must be 1 or 2, got {stride}")
    if C < 1:
        raise ConfigError(f"op channel count must be positive, got {C}")
    return OPS[name](C, stride)


def resolve_ops(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Turn a preset name or a sequence of op names into a validated tuple of op names.

    Raises:
        ConfigError: unknown preset or op, empty or duplicated list, or only ``none``.
    """
    if isinstance(spec, str):
        if spec not in OP_PRESETS:
            raise ConfigError(
                f"unknown op preset {spec!r}; use one of {', '.join(sorted(OP_PRESETS))} "
                "or a list of op names"
            )
        return OP_PRESETS[spec]
    try:
        ops = tuple(spec)
    except TypeError:
        raise ConfigError(
            f"ops must be a preset name or a list of op names, got {type(spec).__name__}"
        ) from None
    if not ops:
        raise ConfigError("the op list is empty; give at least one op name or a preset name")
    bad = [o for o in ops if not isinstance(o, str) or o not in OPS]
    if bad:
        raise ConfigError(
            f"unknown op(s) {', '.join(map(repr, bad))}; choose among {', '.join(sorted(OPS))}"
        )
    dup = sorted({o for o in ops if ops.count(o) > 1})
    if dup:
        raise ConfigError(
            f"op(s) {', '.join(map(repr, dup))} listed more than once; list each op once"
        )
    if all(o == "none" for o in ops):
        raise ConfigError("the op list needs at least one op other than 'none'")
    return ops
