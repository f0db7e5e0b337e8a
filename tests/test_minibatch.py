"""Inner-loop mini-batches: exact at full size, and every algorithm and engine against a loop
written here (SGD over shuffled mini-batches of the support set, float64)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_task
from metanas.algorithms import FOMAML, MAML, Reptile
from metanas.engines import TaskPool
from metanas.errors import ConfigError
from metanas.functional import forward
from metanas.inner import InnerLoopConfig

SGD = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.5, temperature_start=1.0,
                      temperature_end=0.5, temperature_schedule="linear")


def _order(n: int, epoch: int, seed: int = 0) -> list[torch.Tensor]:
    perm = np.random.default_rng(seed * 1000003 + epoch).permutation(n)
    return list(torch.from_numpy(perm).split(4))


def _reference(net, weights, alphas, task, second_order):
    """SGD over mini-batches of 4, temperature by epoch (1.0, then 0.75; read-out 0.5)."""
    w0 = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    a0 = {k: v.detach().clone().requires_grad_(True) for k, v in alphas.items()}
    w, a = dict(w0), dict(a0)
    n = task.support_x.shape[0]
    for epoch, temperature in enumerate((1.0, 0.75)):
        for idx in _order(n, epoch):
            loss = F.cross_entropy(forward(net, w, a, task.support_x[idx], temperature), task.support_y[idx])
            names = list(w) + list(a)
            tensors = [w[k] for k in w] + [a[k] for k in a]
            grads = torch.autograd.grad(loss, tensors, create_graph=second_order, allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
            new = {k: t - (0.1 if k in w else 0.5) * g for k, t, g in zip(names, tensors, grads)}
            if not second_order:
                new = {k: v.detach().requires_grad_(True) for k, v in new.items()}
            w = {k: new[k] for k in w}
            a = {k: new[k] for k in a}
    q = F.cross_entropy(forward(net, w, a, task.query_x, 0.5), task.query_y)
    return w0, a0, w, a, q


@pytest.fixture
def tasks():
    # 3-way tasks with 4 support images per class: 12 images, mini-batches of 4
    out = []
    for s in (1, 2):
        t = make_task(s)
        more = make_task(s + 10)
        out.append(replace(t, support_x=torch.cat([t.support_x, more.support_x]),
                           support_y=torch.cat([t.support_y, more.support_y])))
    return out


@pytest.mark.parametrize("algo_cls", [Reptile, FOMAML, MAML])
def test_full_size_batches_are_exactly_todays_inner_loop(tiny, algo_cls):
    net, weights, alphas, _ = tiny
    batch = [make_task(s) for s in (3, 4)]
    plain = algo_cls(batching="loop").meta_gradients(net, weights, alphas, batch, SGD)
    for size in (6, 100):  # the support set has 6 images
        same = algo_cls(batching="loop").meta_gradients(
            net, weights, alphas, batch, replace(SGD, batch_size=size))
        for k in plain.weights:
            assert torch.equal(same.weights[k], plain.weights[k])
        for k in plain.alphas:
            assert torch.equal(same.alphas[k], plain.alphas[k])


@pytest.mark.parametrize("engine", ["loop", "threads", "vmap"])
@pytest.mark.parametrize("algo_cls", [Reptile, FOMAML, MAML])
def test_minibatch_meta_gradients_match_an_independent_loop(tiny, tasks, algo_cls, engine):
    net, weights, alphas, _ = tiny
    inner = replace(SGD, batch_size=4)
    with TaskPool(net, 2) as pool:
        ours = algo_cls(batching=engine).meta_gradients(
            net, weights, alphas, tasks, inner, pool=pool if engine == "threads" else None)
    ref_w = {k: torch.zeros_like(v) for k, v in weights.items()}
    ref_a = {k: torch.zeros_like(v) for k, v in alphas.items()}
    for task in tasks:
        second = algo_cls is MAML
        w0, a0, w, a, q = _reference(net, weights, alphas, task, second)
        if algo_cls is Reptile:
            gw = {k: (w0[k] - w[k]).detach() for k in w}
            ga = {k: (a0[k] - a[k]).detach() for k in a}
        else:
            src_w, src_a = (w0, a0) if second else (w, a)
            g = torch.autograd.grad(q, list(src_w.values()) + list(src_a.values()), allow_unused=True)
            g = [torch.zeros_like(t) if x is None else x for t, x in zip([*src_w.values(), *src_a.values()], g)]
            gw = dict(zip(src_w, g[: len(src_w)]))
            ga = dict(zip(src_a, g[len(src_w):]))
        for k in ref_w:
            ref_w[k] += gw[k] / len(tasks)
        for k in ref_a:
            ref_a[k] += ga[k] / len(tasks)
    for k in ref_w:
        torch.testing.assert_close(ours.weights[k], ref_w[k], rtol=1e-8, atol=1e-10)
    for k in ref_a:
        torch.testing.assert_close(ours.alphas[k], ref_a[k], rtol=1e-8, atol=1e-10)


def test_batch_size_must_be_positive():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="inner.batch_size"):
            InnerLoopConfig(batch_size=bad)


@pytest.mark.parametrize("group", ["sgd", "adam"])
def test_every_inner_setting_is_in_the_inner_config_group(group):
    """``inner.batch_size=...`` must be a plain override of metanas-train (no ``+``)."""
    from dataclasses import fields

    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"inner={group}", "inner.batch_size=3", "inner.shuffle_seed=4"])
    assert set(cfg.inner) - {"_target_"} == {f.name for f in fields(InnerLoopConfig)}
    inner = instantiate(cfg.inner)
    assert (inner.batch_size, inner.shuffle_seed) == (3, 4)
