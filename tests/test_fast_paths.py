"""The fast paths give the meta-gradients of the plain per-task loop (float64).

- ``batching="vmap"`` (tasks vectorised with torch.func) == ``batching="loop"`` for Reptile,
  FOMAML and second-order MAML, with SGD and Adam inner loops, adapted and frozen alphas;
- skipping soft-pruned ops == computing them and multiplying by zero (outputs, gradients and
  the meta-gradients of all three outer loops);
- channels-last pooling on CPU == the NCHW pool;
- the engine names resolve per device and bad settings raise ConfigError.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_task, tiny_space

from metanas.algorithms import FOMAML, MAML, Reptile
from metanas.engines import resolve_batching
from metanas.engines import stack_tasks
from metanas.errors import ConfigError
from metanas.inner import InnerLoopConfig
from metanas.engines import TaskPool
from metanas.search_space import SearchNetwork, init_alphas, normalize_alphas
from metanas.search_space.ops import PoolBN

SGD = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.5, optimizer="sgd")
ADAM = InnerLoopConfig(steps=2, lr_weights=0.01, lr_alphas=0.05, optimizer="adam",
                       temperature_start=2.0, temperature_end=0.5)
ALGOS = [Reptile, FOMAML, MAML]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _setup(prune_threshold: float = 0.0, alpha_scale: float = 300.0):
    space = tiny_space(pairwise_input_alphas=True, prune_threshold=prune_threshold)
    torch.manual_seed(0)
    net = SearchNetwork(space).double()
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    alphas = {
        k: (v.double() * alpha_scale).requires_grad_(True)
        for k, v in init_alphas(space, generator=torch.Generator().manual_seed(1)).items()
    }
    return net, weights, alphas


def _assert_same(a, b, rtol=1e-10, atol=1e-12):
    assert (a.alphas is None) == (b.alphas is None)
    for group_a, group_b in ((a.weights, b.weights), (a.alphas or {}, b.alphas or {})):
        assert set(group_a) == set(group_b)
        for name in group_a:
            torch.testing.assert_close(group_a[name], group_b[name], rtol=rtol, atol=atol, msg=name)
    for stat in ("query_loss", "query_accuracy", "support_loss"):
        assert getattr(a, stat) == pytest.approx(getattr(b, stat), rel=1e-10), stat


@pytest.mark.parametrize("algo_cls", ALGOS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("inner", [SGD, ADAM], ids=["sgd", "adam"])
@pytest.mark.parametrize("adapt_alphas", [True, False])
def test_vmap_equals_the_plain_loop(algo_cls, inner, adapt_alphas):
    net, weights, alphas = _setup()
    tasks = [make_task(10), make_task(11), make_task(12)]
    plain = algo_cls(batching="loop").meta_gradients(
        net, weights, alphas, tasks, inner, adapt_alphas=adapt_alphas)
    batched = algo_cls(batching="vmap").meta_gradients(
        net, weights, alphas, tasks, inner, adapt_alphas=adapt_alphas)
    _assert_same(batched, plain)
    # the meta-gradient is not trivially zero
    assert max(float(g.abs().max()) for g in plain.weights.values()) > 1e-6


@pytest.mark.parametrize("algo_cls", ALGOS, ids=lambda c: c.__name__)
def test_vmap_in_chunks_equals_the_plain_loop(algo_cls):
    net, weights, alphas = _setup()
    tasks = [make_task(10), make_task(11), make_task(12)]
    plain = algo_cls(batching="loop").meta_gradients(net, weights, alphas, tasks, SGD)
    chunked = algo_cls(batching="vmap", vmap_chunk_size=2).meta_gradients(
        net, weights, alphas, tasks, SGD)
    _assert_same(chunked, plain)


def test_vmap_falls_back_when_task_shapes_differ():
    net, weights, alphas = _setup()
    odd = make_task(13)
    odd = type(odd)(odd.support_x, odd.support_y, torch.cat([odd.query_x] * 2),
                    torch.cat([odd.query_y] * 2), odd.classes)
    tasks = [make_task(10), odd]
    assert stack_tasks(tasks) is None
    plain = Reptile(batching="loop").meta_gradients(net, weights, alphas, tasks, SGD)
    fallback = Reptile(batching="vmap").meta_gradients(net, weights, alphas, tasks, SGD)
    _assert_same(fallback, plain, rtol=0, atol=0)


def _pruned_setup():
    # alphas of scale ~1 with threshold 0.2: about half of the ops of each edge are pruned
    net, weights, alphas = _setup(prune_threshold=0.2, alpha_scale=1000.0)
    w = normalize_alphas(alphas["normal"], 1.0, 0.2)
    pruned = int((w == 0).sum())
    assert 0 < pruned < w.numel() - w.shape[0]  # some, not all but the argmax, are pruned
    return net, weights, alphas


def test_skipping_pruned_ops_equals_multiplying_them_by_zero():
    net, _, alphas = _pruned_setup()
    x = make_task(3).support_x
    y = make_task(3).support_y

    def run(skip):
        net.skip_pruned_ops = skip
        try:
            logits = net(x, alphas)
            loss = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, list(net.parameters()) + list(alphas.values()),
                                        allow_unused=True)
        finally:
            net.skip_pruned_ops = True
        return logits, [torch.zeros(1) if g is None else g for g in grads]

    calls = []
    hook = net.cells[0].edges[0].ops[0].register_forward_hook(lambda *a: calls.append(1))
    logits_skip, grads_skip = run(True)
    skipped_calls = len(calls)
    logits_full, grads_full = run(False)
    hook.remove()
    assert torch.equal(logits_skip, logits_full)
    params = list(net.parameters()) + list(alphas.values())
    for p, g_skip, g_full in zip(params, grads_skip, grads_full):
        g_skip = g_skip if g_skip.shape == p.shape else torch.zeros_like(p)
        torch.testing.assert_close(g_skip, g_full, rtol=1e-13, atol=1e-15)
    # the first op of edge 0 is pruned in this setup, so it really was skipped
    w = normalize_alphas(alphas["normal"], 1.0, 0.3)
    assert (skipped_calls == 0) == bool(w[0, 0] == 0)
    assert len(calls) - skipped_calls == 1


@pytest.mark.parametrize("algo_cls", ALGOS, ids=lambda c: c.__name__)
def test_pruned_skipping_keeps_the_meta_gradients(algo_cls):
    net, weights, alphas = _pruned_setup()
    tasks = [make_task(10), make_task(11)]
    skipped = algo_cls(batching="loop").meta_gradients(net, weights, alphas, tasks, SGD)
    net.skip_pruned_ops = False
    try:
        full = algo_cls(batching="loop").meta_gradients(net, weights, alphas, tasks, SGD)
    finally:
        net.skip_pruned_ops = True
    _assert_same(skipped, full, rtol=1e-12, atol=1e-14)
    # vmap cannot read the mask, computes every op, and agrees too
    batched = algo_cls(batching="vmap").meta_gradients(net, weights, alphas, tasks, SGD)
    _assert_same(batched, full)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last_pool_equals_the_nchw_pool(kind, stride):
    pool = PoolBN(kind, 3, stride).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    fast = pool(x)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
    pool.channels_last_on_cpu = False
    plain = pool(x)
    (g_plain,) = torch.autograd.grad(plain.square().sum(), x)
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, plain, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-12, atol=1e-13)


def test_threads_engine_uses_the_pool_and_loop_ignores_it():
    net, weights, alphas = _setup()
    tasks = [make_task(10), make_task(11)]
    plain = FOMAML(batching="loop").meta_gradients(net, weights, alphas, tasks, SGD)
    with TaskPool(net, 2) as pool:
        threaded = FOMAML(batching="threads").meta_gradients(
            net, weights, alphas, tasks, SGD, pool=pool)
        looped = FOMAML(batching="loop").meta_gradients(net, weights, alphas, tasks, SGD, pool=pool)
    _assert_same(threaded, plain, rtol=0, atol=0)
    _assert_same(looped, plain, rtol=0, atol=0)


def test_batching_resolution_and_validation():
    assert resolve_batching("auto", "cpu") == "threads"
    assert resolve_batching("auto", torch.device("cuda", 0)) == "vmap"
    assert resolve_batching("loop", "cuda") == "loop"
    with pytest.raises(ConfigError, match="batching"):
        Reptile(batching="fast")
    with pytest.raises(ConfigError, match="vmap_chunk_size"):
        MAML(vmap_chunk_size=0)
    assert repr(MAML(batching="vmap")) == "MAML(batching='vmap')"
    assert repr(Reptile()) == "Reptile()"


def test_share_cores_splits_torch_threads_among_task_threads_on_cpu_only():
    from metanas.engines import share_cores

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        share_cores(2, "cpu")
        assert torch.get_num_threads() == 2
        share_cores(1, "cpu")
        share_cores(2, "cuda")  # an accelerator's threads are left alone
        assert torch.get_num_threads() == 2
        share_cores(8, "cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("where", ["cells", "edges"])
@pytest.mark.parametrize("algo_cls", [Reptile, FOMAML, MAML])
def test_recomputed_activations_give_the_same_meta_gradients(algo_cls, where):
    """Activation recomputation (checkpointing per cell or per edge) changes memory, not the
    numbers."""
    net, weights, alphas = _setup()
    tasks = [make_task(s) for s in (5, 6)]
    stored = algo_cls(batching="loop").meta_gradients(net, weights, alphas, tasks, SGD)
    setattr(net, f"recompute_{where}", True)
    calls = []
    module = net.cells[0] if where == "cells" else net.cells[0].edges[0]
    module.forward = lambda *args, _f=type(module).forward, **kw: (calls.append(1), _f(module, *args, **kw))[1]
    try:
        recomputed = algo_cls(batching="loop").meta_gradients(net, weights, alphas, tasks, SGD)
    finally:
        del module.forward
        setattr(net, f"recompute_{where}", False)
    _assert_same(recomputed, stored, rtol=1e-12, atol=1e-14)
    # the module really ran again in the backward passes: more forwards than inner steps
    forwards = len(tasks) * (SGD.steps + 1)
    assert len(calls) > forwards
