"""Shared fixtures: a tiny float64 supernet and random few-shot tasks."""

from __future__ import annotations

import pytest
import torch

from metanas.search_space import SearchNetwork, SearchSpaceConfig, init_alphas
from metanas.tasks import Task

N_WAY, K_SHOT, Q_QUERY, SIZE = 3, 2, 2, 8


def make_task(seed: int, dtype: torch.dtype = torch.float64) -> Task:
    """A random N-way K-shot task whose classes differ in mean intensity (learnable)."""
    g = torch.Generator().manual_seed(seed)
    def block(k: int):
        y = torch.arange(N_WAY).repeat_interleave(k)
        x = torch.randn(N_WAY * k, 1, SIZE, SIZE, generator=g, dtype=dtype) + y.view(-1, 1, 1, 1).to(dtype)
        return x, y
    sx, sy = block(K_SHOT)
    qx, qy = block(Q_QUERY)
    return Task(sx, sy, qx, qy, tuple(range(N_WAY)))


def tiny_space(**overrides) -> SearchSpaceConfig:
    kwargs = dict(
        in_channels=1, n_classes=N_WAY, channels=4, n_cells=2, n_nodes=2, stem_multiplier=1,
        reduction_cells=(1,), ops=("conv_3x3", "skip_connect", "avg_pool_3x3", "sep_conv_3x3"),
    )
    kwargs.update(overrides)
    return SearchSpaceConfig(**kwargs)


@pytest.fixture
def tiny():
    """(net, weights, alphas, space) of a tiny float64 supernet with non-trivial alphas."""
    space = tiny_space(pairwise_input_alphas=True)
    torch.manual_seed(0)
    net = SearchNetwork(space).double()
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    alphas = {
        k: (v.double() * 300).requires_grad_(True)  # scale 1e-3 -> ~0.3: a non-uniform mixture
        for k, v in init_alphas(space, generator=torch.Generator().manual_seed(1)).items()
    }
    return net, weights, alphas, space


@pytest.fixture
def tasks():
    return [make_task(10), make_task(11)]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: tiny kernels on a 2-core machine only
    oversubscribe with more (up to 10x slower); the previous count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
