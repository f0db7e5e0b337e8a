"""The FLOP counter against hand counts, and the matmul peak measurement."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metanas.flops import conv2d_flops, count_flops, matmul_peak_gflops


def test_counter_matches_a_hand_count_of_a_convolution():
    x = torch.randn(3, 4, 9, 9)
    w = torch.randn(6, 4, 3, 3)
    flops = count_flops(lambda: F.conv2d(x, w, padding=1))
    assert flops == conv2d_flops(3, 4, 6, (9, 9), (3, 3)) == 2 * 3 * 6 * 81 * 4 * 9


def test_counter_matches_a_hand_count_of_a_strided_depthwise_convolution_and_its_backward():
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    w = torch.randn(8, 1, 5, 5, requires_grad=True)
    forward = conv2d_flops(2, 8, 8, (5, 5), (5, 5), groups=8)
    assert count_flops(lambda: F.conv2d(x, w, stride=2, padding=2, groups=8)) == forward
    # backward: the input gradient and the weight gradient each cost one forward
    total = count_flops(lambda: F.conv2d(x, w, stride=2, padding=2, groups=8).sum().backward())
    assert total == 3 * forward


def test_counter_counts_matmuls():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    assert count_flops(lambda: a @ b) == 2 * 5 * 7 * 3


def test_matmul_peak_is_a_positive_rate():
    assert matmul_peak_gflops("cpu", n=128, repeats=2) > 0


def test_counter_works_inside_autograd_grad_and_counts_only_requested_gradients():
    x = torch.randn(2, 3, 6, 6)  # no input gradient requested
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    forward = conv2d_flops(2, 3, 4, (6, 6), (3, 3))
    total = count_flops(lambda: torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), [w]))
    assert total == 2 * forward
