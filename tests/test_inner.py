"""The task learner: it learns, it is pure, and its optimisers match torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_task, tiny_space
from metanas.errors import ConfigError
from metanas.functional import forward
from metanas.inner import InnerLoopConfig, adapt
from metanas.search_space import SearchNetwork, init_alphas


def support_loss(net, weights, alphas, task, temperature=1.0):
    return F.cross_entropy(forward(net, weights, alphas, task.support_x, temperature), task.support_y).item()


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.01)])
def test_adaptation_lowers_the_support_loss(tiny, optimizer, lr):
    net, weights, alphas, _ = tiny
    task = make_task(3)
    cfg = InnerLoopConfig(steps=5, lr_weights=lr, lr_alphas=lr, optimizer=optimizer)
    adapted = adapt(net, weights, alphas, task.support_x, task.support_y, cfg)
    before = support_loss(net, weights, alphas, task)
    after = support_loss(net, adapted.weights, adapted.alphas, task)
    assert after < 0.8 * before
    assert adapted.support_losses[0].item() == pytest.approx(before)
    assert len(adapted.support_losses) == 5


def test_adapt_is_pure(tiny):
    net, weights, alphas, _ = tiny
    snapshot = {k: v.detach().clone() for k, v in {**weights, **alphas}.items()}
    module_snapshot = {k: v.detach().clone() for k, v in net.state_dict().items()}
    task = make_task(4)
    adapted = adapt(net, weights, alphas, task.support_x, task.support_y, InnerLoopConfig(steps=3))
    assert any(not torch.equal(adapted.weights[k], weights[k]) for k in weights)
    assert all(torch.equal(v, snapshot[k]) for k, v in {**weights, **alphas}.items())
    assert all(torch.equal(v, module_snapshot[k]) for k, v in net.state_dict().items())


def test_first_order_adam_follows_torch_adam(tiny):
    net, weights, alphas, _ = tiny
    task = make_task(5)
    cfg = InnerLoopConfig(steps=4, lr_weights=0.01, lr_alphas=0.03, optimizer="adam")
    ours = adapt(net, weights, alphas, task.support_x, task.support_y, cfg)
    w = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    a = {k: v.detach().clone().requires_grad_(True) for k, v in alphas.items()}
    opt = torch.optim.Adam([{"params": list(w.values()), "lr": 0.01},
                            {"params": list(a.values()), "lr": 0.03}])
    for _ in range(cfg.steps):
        opt.zero_grad()
        F.cross_entropy(forward(net, w, a, task.support_x), task.support_y).backward()
        opt.step()
    for k in w:
        torch.testing.assert_close(ours.weights[k], w[k], rtol=1e-10, atol=1e-12)
    for k in a:
        torch.testing.assert_close(ours.alphas[k], a[k], rtol=1e-10, atol=1e-12)


def test_frozen_alphas_are_returned_unchanged(tiny):
    net, weights, alphas, _ = tiny
    task = make_task(6)
    adapted = adapt(net, weights, alphas, task.support_x, task.support_y,
                    InnerLoopConfig(steps=2), adapt_alphas=False)
    assert all(torch.equal(adapted.alphas[k], alphas[k]) for k in alphas)


def test_temperature_is_annealed_over_the_inner_steps():
    cfg = InnerLoopConfig(steps=4, temperature_start=1.0, temperature_end=0.2,
                          temperature_schedule="linear")
    temps = [cfg.temperature(s) for s in range(cfg.steps + 1)]
    assert temps[0] == pytest.approx(1.0) and temps[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(temps, temps[1:]))


def test_second_order_adam_has_no_nan_for_zero_gradients():
    """Soft pruning zeroes some alpha gradients exactly; sqrt'(0) must not poison the graph."""
    space = tiny_space(prune_threshold=0.1)
    net = SearchNetwork(space).double()
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    alphas = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in init_alphas(space).items()}
    for v in alphas.values():
        v[..., 0] = -5.0  # op 0 falls below the threshold on every edge: its gradient is 0
        v.requires_grad_(True)
    task = make_task(7)
    cfg = InnerLoopConfig(steps=2, optimizer="adam", lr_weights=0.01, lr_alphas=0.01)
    adapted = adapt(net, weights, alphas, task.support_x, task.support_y, cfg, create_graph=True)
    assert (adapted.alphas["normal"][..., 0] == alphas["normal"][..., 0]).all()
    loss = F.cross_entropy(forward(net, adapted.weights, adapted.alphas, task.query_x), task.query_y)
    grads = torch.autograd.grad(loss, list(weights.values()) + list(alphas.values()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_bad_inner_config_is_rejected():
    with pytest.raises(ConfigError, match="optimizer"):
        InnerLoopConfig(optimizer="rmsprop")
    with pytest.raises(ConfigError, match="steps"):
        InnerLoopConfig(steps=-1)
