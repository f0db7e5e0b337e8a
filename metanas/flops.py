"""Counting floating-point operations and measuring the machine's matmul peak.

FLOPs are counted with the formulas of :mod:`torch.utils.flop_counter`, which count the
multiply-adds (as 2 FLOPs) of matrix multiplications and convolutions, forward and backward,
as they are dispatched; element-wise ops, pooling and normalisation are not counted (they are
a small share of a DARTS supernet's arithmetic). The mode sees the operations of the calling
thread only, so count a single-threaded run of the work.

PyTorch's formula for the convolution backward ignores ``groups`` and counts a depthwise
convolution's weight gradient ``groups`` times too high (10x the forward instead of 2x for
``groups=8`` in ``tests/test_flops.py``); :func:`count_flops` replaces it with the exact count:
each requested gradient (input, weight) costs the multiply-adds of one forward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import conv_backward_flop, flop_registry, shape_wrapper


def _conv_backward_flop(
    grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
    output_padding, groups, output_mask, out_shape=None, **kwargs,
) -> int:
    """FLOPs of ``aten.convolution_backward`` with grouped convolutions counted exactly."""
    if transposed:
        return conv_backward_flop(
            grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
            output_padding, groups, output_mask, out_shape, **kwargs,
        )
    # w: (C_out, C_in / groups, *kernel); grad_out: (B, C_out, *out_spatial)
    forward = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


class _Counter(TorchDispatchMode):
    """Sums the registered FLOP formulas of the dispatched ops (no module tracking, so it
    works inside ``torch.autograd.grad`` and ``torch.func`` transforms)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.formulas = {**flop_registry, torch.ops.aten.convolution_backward: shape_wrapper(_conv_backward_flop)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and convolutions that ``fn()`` runs (forward and backward)."""
    counter = _Counter()
    with counter:
        fn()
    return counter.total


def conv2d_flops(
    batch: int, c_in: int, c_out: int, out_hw: tuple[int, int], kernel: tuple[int, int], groups: int = 1
) -> int:
    """FLOPs of a convolution's forward pass by hand: ``2 * B * C_out * H' * W' * C_in/g * kh * kw``."""
    return 2 * batch * c_out * out_hw[0] * out_hw[1] * (c_in // groups) * kernel[0] * kernel[1]


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued kernels (a no-op on CPU) so that wall time covers them."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(
    device: torch.device | str = "cpu",
    n: int = 2048,
    repeats: int = 10,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Measured matmul throughput in GFLOP/s: the best of ``repeats`` ``(n, n) @ (n, n)`` products.

    A large matmul is the fastest thing the machine does with PyTorch, so this is the practical
    ceiling of the supernet's FLOP rate (with the current intra-op thread setting).
    """
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=dtype).to(device)
    b = torch.randn(n, n, generator=g, dtype=dtype).to(device)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


__all__ = ["conv2d_flops", "count_flops", "matmul_peak_gflops", "synchronize"]
