"""The inner-optimiser registry: a new optimiser is one entry, and every path uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_task
from metanas.algorithms import FOMAML, MAML, Reptile
from metanas.errors import ConfigError
from metanas.functional import forward
from metanas.inner import InnerLoopConfig, adapt
from metanas.inner_optim import INNER_OPTIMIZERS, InnerOptimizer, register_inner_optimizer


@pytest.fixture
def momentum_sgd():
    """Heavy-ball SGD (momentum 0.5) registered for the test, removed after it."""

    def factory(cfg):
        def init(params):
            return [torch.zeros_like(p) for p in params]

        def update(params, grads, lrs, state, step):
            velocity = [0.5 * v + g for v, g in zip(state, grads)]
            return [p - lr * v for p, v, lr in zip(params, velocity, lrs)], velocity

        return InnerOptimizer(init, update)

    register_inner_optimizer("test_momentum")(factory)
    yield "test_momentum"
    del INNER_OPTIMIZERS["test_momentum"]


def test_a_registered_optimiser_runs_the_inner_loop(tiny, momentum_sgd):
    """adapt() with a registered optimiser equals the same update written out by hand."""
    net, weights, alphas, _ = tiny
    task = make_task(5)
    cfg = InnerLoopConfig(steps=3, lr_weights=0.05, lr_alphas=0.2, optimizer=momentum_sgd)
    ours = adapt(net, weights, alphas, task.support_x, task.support_y, cfg)

    w = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    a = {k: v.detach().clone().requires_grad_(True) for k, v in alphas.items()}
    vel = {k: torch.zeros_like(v) for k, v in {**w, **a}.items()}
    for _ in range(3):
        loss = F.cross_entropy(forward(net, w, a, task.support_x, 1.0), task.support_y)
        names = list(w) + list(a)
        grads = torch.autograd.grad(loss, [w[n] if n in w else a[n] for n in names], allow_unused=True)
        with torch.no_grad():
            for n, g in zip(names, grads):
                g = torch.zeros_like(vel[n]) if g is None else g
                vel[n] = 0.5 * vel[n] + g
                lr = 0.05 if n in w else 0.2
                new = (w[n] if n in w else a[n]) - lr * vel[n]
                (w if n in w else a)[n] = new.requires_grad_(True)
    for k in w:
        torch.testing.assert_close(ours.weights[k], w[k], rtol=1e-10, atol=1e-12)
    for k in a:
        torch.testing.assert_close(ours.alphas[k], a[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algo_cls", [Reptile, FOMAML, MAML])
def test_a_registered_optimiser_is_used_by_every_engine(tiny, momentum_sgd, algo_cls):
    """The loop (autograd) and vmap (torch.func) engines both pick the registered update."""
    net, weights, alphas, _ = tiny
    tasks = [make_task(s) for s in (1, 2)]
    cfg = InnerLoopConfig(steps=2, lr_weights=0.05, lr_alphas=0.2, optimizer=momentum_sgd)
    loop = algo_cls(batching="loop").meta_gradients(net, weights, alphas, tasks, cfg)
    vmapped = algo_cls(batching="vmap").meta_gradients(net, weights, alphas, tasks, cfg)
    sgd = algo_cls(batching="loop").meta_gradients(
        net, weights, alphas, tasks, InnerLoopConfig(steps=2, lr_weights=0.05, lr_alphas=0.2))
    for k in loop.weights:
        torch.testing.assert_close(vmapped.weights[k], loop.weights[k], rtol=1e-8, atol=1e-10)
    assert any(not torch.allclose(loop.alphas[k], sgd.alphas[k]) for k in loop.alphas)


def test_unknown_optimiser_names_the_registry():
    with pytest.raises(ConfigError, match="register_inner_optimizer"):
        InnerLoopConfig(optimizer="nesterov_typo")
    with pytest.raises(ValueError, match="registered already"):
        register_inner_optimizer("sgd")(lambda cfg: None)


def test_alphas_can_have_their_own_optimiser(tiny):
    """optimizer=sgd, optimizer_alphas=adam: SGD on the weights, torch.optim.Adam on the alphas."""
    net, weights, alphas, _ = tiny
    task = make_task(9)
    cfg = InnerLoopConfig(steps=3, lr_weights=0.05, lr_alphas=0.01, optimizer="sgd",
                          optimizer_alphas="adam")
    ours = adapt(net, weights, alphas, task.support_x, task.support_y, cfg)
    w = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    a = {k: v.detach().clone().requires_grad_(True) for k, v in alphas.items()}
    sgd = torch.optim.SGD(list(w.values()), lr=0.05)
    adam = torch.optim.Adam(list(a.values()), lr=0.01)
    for _ in range(3):
        sgd.zero_grad(), adam.zero_grad()
        F.cross_entropy(forward(net, w, a, task.support_x, 1.0), task.support_y).backward()
        sgd.step(), adam.step()
    for k in w:
        torch.testing.assert_close(ours.weights[k], w[k], rtol=1e-9, atol=1e-12)
    for k in a:
        torch.testing.assert_close(ours.alphas[k], a[k], rtol=1e-9, atol=1e-12)
    with pytest.raises(ConfigError, match="optimizer_alphas"):
        InnerLoopConfig(optimizer_alphas="adamw_typo")


@pytest.mark.parametrize("algo_cls", [Reptile, FOMAML, MAML])
def test_alpha_displacement_is_the_norm_of_the_alpha_move(tiny, algo_cls):
    """With one task Reptile's alpha direction is meta - adapted: its norm is the displacement,
    and every algorithm reports the same size (same inner loop); 0 with frozen alphas."""
    net, weights, alphas, _ = tiny
    task = [make_task(4)]
    cfg = InnerLoopConfig(steps=2, lr_weights=0.05, lr_alphas=0.3)
    reptile = Reptile(batching="loop").meta_gradients(net, weights, alphas, task, cfg)
    by_hand = float(torch.sqrt(sum((g**2).sum() for g in reptile.alphas.values())))
    ours = algo_cls(batching="vmap").meta_gradients(net, weights, alphas, task, cfg)
    assert ours.alpha_displacement == pytest.approx(by_hand, rel=1e-9) and by_hand > 0
    frozen = algo_cls(batching="loop").meta_gradients(net, weights, alphas, task, cfg, adapt_alphas=False)
    assert frozen.alpha_displacement == 0.0
