"""Meta-gradients of weights and alphas against independent references.

- second-order MAML vs `higher` (its own differentiable optimisers) and vs central finite
  differences of the meta-objective, in float64;
- first-order MAML vs a hand-written SGD loop, taking the alpha gradient at the live adapted
  parameters (not at a stale copy of the meta-model);
- Reptile through the trainer's meta-step: the meta-parameters move by exactly
  eps * (mean adapted - meta), i.e. the update is not skipped after zero_grad().
"""

from __future__ import annotations

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metanas.algorithms import FOMAML, MAML, Reptile
from metanas.functional import forward
from metanas.inner import InnerLoopConfig, adapt, query_loss
from metanas.engines import TaskPool
from conftest import make_task

SGD = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.5, optimizer="sgd")
# A large epsilon keeps Adam's step a smooth function of the gradient at the scale of the
# finite-difference probe (with eps=1e-8 the first step is ~lr*sign(g), which a probe can flip).
ADAM = InnerLoopConfig(steps=2, lr_weights=0.01, lr_alphas=0.05, optimizer="adam", eps=0.05)


class _Bundled(nn.Module):
    """Weights and alphas as one module, so `higher` can treat them as ordinary parameters
    (its forward takes the alphas' softmax temperature too)."""

    def __init__(self, net, weights, alphas):
        super().__init__()
        self.net = net
        self.alphas = nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in alphas.items()})
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(weights[name])

    def forward(self, x, temperature=1.0):
        return self.net(x, dict(self.alphas), temperature)


def _higher_meta_gradients(net, weights, alphas, tasks, cfg):
    model = _Bundled(net, weights, alphas)
    groups = [
        {"params": list(model.net.parameters()), "lr": cfg.lr_weights},
        {"params": list(model.alphas.parameters()), "lr": cfg.lr_alphas},
    ]
    opt = (torch.optim.SGD(groups) if cfg.optimizer == "sgd"
           else torch.optim.Adam(groups, betas=cfg.betas, eps=cfg.eps))
    total_w = {n: torch.zeros_like(p) for n, p in model.net.named_parameters()}
    total_a = {n: torch.zeros_like(p) for n, p in model.alphas.items()}
    for task in tasks:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(cfg.steps):
                diffopt.step(F.cross_entropy(fmodel(task.support_x), task.support_y))
            loss = F.cross_entropy(fmodel(task.query_x), task.query_y) / len(tasks)
            names_w, names_a = list(total_w), list(total_a)
            grads = torch.autograd.grad(
                loss, [dict(model.net.named_parameters())[n] for n in names_w]
                + [model.alphas[n] for n in names_a], allow_unused=True,
            )
        for n, g in zip(names_w + names_a, grads):
            target = total_w if n in total_w else total_a
            if g is not None:
                target[n] += g
    return total_w, total_a


def _close(ours, ref, rtol, atol):
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=rtol, atol=atol, msg=name)


def test_maml_matches_higher(tiny, tasks):
    net, weights, alphas, _ = tiny
    ours = MAML().meta_gradients(net, weights, alphas, tasks, SGD)
    ref_w, ref_a = _higher_meta_gradients(net, weights, alphas, tasks, SGD)
    assert any(g.abs().sum() > 0 for g in ref_a.values())
    _close(ours.alphas, ref_a, 1e-9, 1e-12)
    _close(ours.weights, ref_w, 1e-9, 1e-12)


def _meta_objective(net, weights, alphas, tasks, cfg):
    """Mean query loss after a hand-written inner SGD loop (no library inner-loop code)."""
    total = 0.0
    for task in tasks:
        w, a = dict(weights), dict(alphas)
        for _ in range(cfg.steps):
            loss = F.cross_entropy(forward(net, w, a, task.support_x), task.support_y)
            gw = torch.autograd.grad(loss, list(w.values()) + list(a.values()), create_graph=True)
            new = [t - (cfg.lr_weights if i < len(w) else cfg.lr_alphas) * g
                   for i, (t, g) in enumerate(zip(list(w.values()) + list(a.values()), gw))]
            w = dict(zip(w, new[: len(w)]))
            a = dict(zip(a, new[len(w):]))
        total = total + F.cross_entropy(forward(net, w, a, task.query_x), task.query_y)
    return total / len(tasks)


def _library_objective(net, weights, alphas, tasks, cfg):
    """Mean query loss after the library's own (differentiable) inner loop."""
    total = 0.0
    for task in tasks:
        adapted = adapt(net, weights, alphas, task.support_x, task.support_y, cfg, create_graph=True)
        total = total + query_loss(net, adapted, task.query_x, task.query_y)[0]
    return total / len(tasks)


@pytest.mark.parametrize(
    "part,cfg,objective",
    [("weights", SGD, _meta_objective), ("alphas", SGD, _meta_objective),
     ("weights", ADAM, _library_objective), ("alphas", ADAM, _library_objective)],
    ids=["sgd-weights", "sgd-alphas", "adam-weights", "adam-alphas"],
)
def test_maml_matches_finite_differences(tiny, tasks, part, cfg, objective):
    net, weights, alphas, _ = tiny
    # A +-1e-6 probe can cross a ReLU kink (an input 1e-7 from zero) and jump the objective;
    # SiLU keeps the meta-objective smooth, so the comparison tests the meta-gradient only.
    # (The ReLU network itself is checked against `higher` above.)
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.SiLU())
    grads = MAML().meta_gradients(net, weights, alphas, tasks, cfg)
    g = torch.Generator().manual_seed(5)
    target = weights if part == "weights" else alphas
    direction = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in target.items()}
    analytic = sum((getattr(grads, part)[k] * d).sum() for k, d in direction.items())
    eps = 1e-6

    def shifted(sign):
        moved = {k: (v + sign * eps * direction[k]).detach().requires_grad_(True) for k, v in target.items()}
        w, a = (moved, alphas) if part == "weights" else (weights, moved)
        return objective(net, w, a, tasks, cfg).item()
    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    assert abs(analytic.item()) > 1e-4
    assert abs(numeric - analytic.item()) <= 1e-6 * max(1.0, abs(numeric))


def test_fomaml_gradient_is_taken_at_the_live_adapted_parameters(tiny, tasks):
    net, weights, alphas, _ = tiny
    ours = FOMAML().meta_gradients(net, weights, alphas, tasks, SGD)
    ref_w = {k: torch.zeros_like(v) for k, v in weights.items()}
    ref_a = {k: torch.zeros_like(v) for k, v in alphas.items()}
    stale_a = {k: torch.zeros_like(v) for k, v in alphas.items()}
    for task in tasks:
        w = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
        a = {k: v.detach().clone().requires_grad_(True) for k, v in alphas.items()}
        for _ in range(SGD.steps):
            loss = F.cross_entropy(forward(net, w, a, task.support_x), task.support_y)
            gs = torch.autograd.grad(loss, list(w.values()) + list(a.values()))
            with torch.no_grad():
                for t, gr, lr in zip(list(w.values()) + list(a.values()), gs,
                                     [SGD.lr_weights] * len(w) + [SGD.lr_alphas] * len(a)):
                    t -= lr * gr
        q = F.cross_entropy(forward(net, w, a, task.query_x), task.query_y)
        gs = torch.autograd.grad(q, list(w.values()) + list(a.values()))
        for k, gr in zip(list(w) + list(a), gs):
            (ref_w if k in ref_w else ref_a)[k] += gr / len(tasks)
        q_stale = F.cross_entropy(forward(net, weights, alphas, task.query_x), task.query_y)
        for k, gr in zip(alphas, torch.autograd.grad(q_stale, list(alphas.values()))):
            stale_a[k] += gr / len(tasks)
    _close(ours.weights, ref_w, 1e-9, 1e-12)
    _close(ours.alphas, ref_a, 1e-9, 1e-12)
    # the stale-copy bug would give these instead; they must be clearly different
    assert any((ours.alphas[k] - stale_a[k]).abs().max() > 1e-4 for k in alphas)


def test_meta_gradients_do_not_modify_inputs(tiny, tasks):
    net, weights, alphas, _ = tiny
    before = {k: v.detach().clone() for k, v in {**weights, **alphas}.items()}
    net_before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for algo in (Reptile(), FOMAML(), MAML()):
        algo.meta_gradients(net, weights, alphas, tasks, SGD)
    for k, v in {**weights, **alphas}.items():
        assert torch.equal(v, before[k])
    for k, v in net.state_dict().items():
        assert torch.equal(v, net_before[k])


def test_frozen_alphas_give_no_alpha_gradient(tiny, tasks):
    net, weights, alphas, _ = tiny
    for algo in (Reptile(), FOMAML(), MAML()):
        grads = algo.meta_gradients(net, weights, alphas, tasks, SGD, adapt_alphas=False)
        assert grads.alphas is None
        assert set(grads.weights) == set(weights)


@pytest.mark.parametrize("algo", [Reptile(), FOMAML(), MAML()], ids=repr)
def test_threaded_meta_gradients_equal_the_plain_loop(tiny, tasks, algo):
    net, weights, alphas, _ = tiny
    batch = tasks + [make_task(12)]
    plain = algo.meta_gradients(net, weights, alphas, batch, SGD)
    with TaskPool(net, 2) as pool:
        threaded = algo.meta_gradients(net, weights, alphas, batch, SGD, pool=pool)
    for name in weights:
        assert torch.equal(plain.weights[name], threaded.weights[name]), name
    for name in alphas:
        assert torch.equal(plain.alphas[name], threaded.alphas[name]), name
    assert plain.query_loss == threaded.query_loss
