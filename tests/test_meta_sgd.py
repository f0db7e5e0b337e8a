"""Meta-SGD's learned inner rates and the alpha-entropy regulariser, against references
written here: a plain SGD loop with per-element rates, central finite differences in
float64, the closed-form entropy and its gradient."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_task, tiny_space
from metanas.adaptation import adapt_support, load_meta_model
from metanas.algorithms import FOMAML, MAML, Reptile
from metanas.baselines import Conv4, Conv4Config
from metanas.checkpoint import load_checkpoint, save_checkpoint
from metanas.errors import ConfigError
from metanas.evaluate import evaluate
from metanas.functional import forward
from metanas.inner import AUTOGRAD, FUNC, InnerLoopConfig, LearnedRates, adapt, alpha_entropy
from metanas.search_space import SearchNetwork, init_alphas
from metanas.trainer import TEST_SEED, MetaTrainer, TrainerConfig

CFG = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.3, meta_sgd=True)


def random_rates(weights, alphas, cfg=CFG, seed=0):
    """Rates that differ per element: ``lr * (0.5 .. 1.5)``."""
    g = torch.Generator().manual_seed(seed)

    def spread(v, lr):
        return lr * (0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype))

    return LearnedRates({k: spread(v, cfg.lr_weights) for k, v in weights.items()},
                        {k: spread(v, cfg.lr_alphas) for k, v in alphas.items()})


def reference_adapt(net, w, a, task, rates, steps, entropy=None):
    """Plain SGD with per-element rates, graph-free: ``p <- p - r * grad``. Also returns the
    sums of the applied support gradients. ``entropy``: (weight, T) added to the support loss."""
    w = {k: v.detach().clone().requires_grad_(True) for k, v in w.items()}
    a = {k: v.detach().clone().requires_grad_(True) for k, v in a.items()}
    sums = {k: torch.zeros_like(v) for k, v in {**w, **{"a:" + n: t for n, t in a.items()}}.items()}
    for _ in range(steps):
        with torch.enable_grad():
            loss = F.cross_entropy(forward(net, w, a, task.support_x), task.support_y)
            if entropy is not None:
                loss = loss + entropy[0] * hand_entropy(a, entropy[1])
            names = list(w) + ["a:" + n for n in a]
            tensors = list(w.values()) + list(a.values())
            gs = torch.autograd.grad(loss, tensors, allow_unused=True)
        gs = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, gs)]
        for name, g in zip(names, gs):
            sums[name] += g
            if name.startswith("a:"):
                n = name[2:]
                a[n] = (a[n] - rates.alphas[n] * g).detach().requires_grad_(True)
            else:
                w[name] = (w[name] - rates.weights[name] * g).detach().requires_grad_(True)
    return w, a, sums


def query_objective(net, w, a, task):
    return F.cross_entropy(forward(net, w, a, task.query_x), task.query_y)


def hand_entropy(alphas, temperature):
    """Mean over the edges of the 2-D alpha tensors of -sum p log p, p = softmax(a / T)."""
    rows = []
    for v in alphas.values():
        if v.dim() == 2:
            e = torch.exp(v / temperature - (v / temperature).max(-1, keepdim=True).values)
            p = e / e.sum(-1, keepdim=True)
            rows.append(-(p * torch.log(p)).sum(-1))
    return torch.cat(rows).mean()


def hand_entropy_grad(alphas, temperature):
    """dH/da: for each edge, -(1/T) p_j (log p_j + H_e) / E (zeros for 1-D tensors)."""
    n_edges = sum(v.shape[0] for v in alphas.values() if v.dim() == 2)
    out = {}
    for k, v in alphas.items():
        if v.dim() != 2:
            out[k] = torch.zeros_like(v)
            continue
        p = torch.softmax(v.detach() / temperature, -1)
        h = -(p * p.log()).sum(-1, keepdim=True)
        out[k] = -(p * (p.log() + h)) / temperature / n_edges
    return out


def smooth(net):
    """ReLU -> SiLU: a +-1e-6 probe can cross a ReLU kink and jump the objective, so the
    finite-difference tests run on a smooth network and test the meta-gradient only."""
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ReLU):
                setattr(module, name, torch.nn.SiLU())
    return net


def _dot(grads, direction):
    return sum((grads[k] * direction[k]).sum() for k in direction)


# ------------------------------------------------------------------ the inner loop itself
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grads", [AUTOGRAD, FUNC], ids=["autograd", "func"])
def test_rates_equal_to_the_scalar_rates_reproduce_plain_sgd_exactly(tiny, grads, dtype):
    net, weights, alphas, _ = tiny
    net = net.to(dtype)
    weights = {k: v.detach().to(dtype) for k, v in weights.items()}
    alphas = {k: v.detach().to(dtype) for k, v in alphas.items()}
    task = make_task(3, dtype)
    plain = replace(CFG, meta_sgd=False)
    ours = adapt(net, weights, alphas, task.support_x, task.support_y, CFG, grads=grads,
                 rates=LearnedRates.like(weights, alphas, CFG))
    theirs = adapt(net, weights, alphas, task.support_x, task.support_y, plain, grads=grads)
    for k in weights:
        assert torch.equal(ours.weights[k], theirs.weights[k]), k
    for k in alphas:
        assert torch.equal(ours.alphas[k], theirs.alphas[k]), k


def test_per_element_rates_match_the_reference_loop_on_both_backends(tiny):
    net, weights, alphas, _ = tiny
    task = make_task(4)
    rates = random_rates(weights, alphas)
    ref_w, ref_a, ref_sums = reference_adapt(net, weights, alphas, task, rates, CFG.steps)
    for grads in (AUTOGRAD, FUNC):
        got = adapt(net, weights, alphas, task.support_x, task.support_y, CFG, grads=grads, rates=rates)
        for k in weights:
            torch.testing.assert_close(got.weights[k], ref_w[k], rtol=1e-10, atol=1e-12, msg=k)
            torch.testing.assert_close(got.gradient_sums.weights[k], ref_sums[k], rtol=1e-10, atol=1e-12)
        for k in alphas:
            torch.testing.assert_close(got.alphas[k], ref_a[k], rtol=1e-10, atol=1e-12, msg=k)
            torch.testing.assert_close(got.gradient_sums.alphas[k], ref_sums["a:" + k], rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------- meta-gradients
def _rate_direction(rates, seed=5):
    g = torch.Generator().manual_seed(seed)
    return LearnedRates(*({k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in part.items()}
                          for part in rates))


def _shift(rates, direction, eps):
    return LearnedRates(*({k: v + eps * d[k] for k, v in part.items()} for part, d in zip(rates, direction)))


def test_maml_rate_gradient_matches_finite_differences_of_the_reference_loop(tiny, tasks):
    """Second order: the exact derivative of the mean query loss after two inner steps with
    respect to every learned rate (weights' and alphas'), by directional central differences."""
    net, weights, alphas, _ = tiny
    net = smooth(net)
    rates = LearnedRates(*({k: v.requires_grad_(True) for k, v in part.items()}
                           for part in random_rates(weights, alphas)))
    got = MAML(batching="loop").meta_gradients(net, weights, alphas, tasks, CFG, rates=rates)

    def meta_objective(r):
        total = 0.0
        for task in tasks:
            w, a, _ = reference_adapt(net, weights, alphas, task, r, CFG.steps)
            with torch.no_grad():
                total += float(query_objective(net, w, a, task)) / len(tasks)
        return total

    eps = 1e-6
    plain = LearnedRates(*({k: v.detach() for k, v in part.items()} for part in rates))
    for seed in (5, 6):
        d = _rate_direction(plain, seed)
        fd = (meta_objective(_shift(plain, d, eps)) - meta_objective(_shift(plain, d, -eps))) / (2 * eps)
        analytic = float(_dot(got.rates.weights, d.weights) + _dot(got.rates.alphas, d.alphas))
        assert abs(fd) > 1e-4  # the probe sees a real dependence
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-8)
    # and the weights' meta-gradient with per-element rates, along one direction
    g = torch.Generator().manual_seed(7)
    d_w = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in weights.items()}

    def weights_objective(step):
        shifted = {k: v.detach() + step * d_w[k] for k, v in weights.items()}
        total = 0.0
        for task in tasks:
            w, a, _ = reference_adapt(net, shifted, alphas, task, plain, CFG.steps)
            with torch.no_grad():
                total += float(query_objective(net, w, a, task)) / len(tasks)
        return total

    fd = (weights_objective(eps) - weights_objective(-eps)) / (2 * eps)
    assert float(_dot(got.weights, d_w)) == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_fomaml_rate_gradient_holds_the_support_gradients_constant(tiny, tasks):
    """First order: d/dr of L_q(theta_0 - r * G) with G, the sum of the support gradients
    of the inner updates, held fixed: -grad L_q(theta_K) * G (a loop and finite
    differences of exactly that objective)."""
    net, weights, alphas, _ = tiny
    net = smooth(net)
    rates = random_rates(weights, alphas)
    got = FOMAML(batching="loop").meta_gradients(net, weights, alphas, tasks, CFG, rates=rates)
    expected_w = {k: torch.zeros_like(v) for k, v in weights.items()}
    expected_a = {k: torch.zeros_like(v) for k, v in alphas.items()}
    frozen = []
    for task in tasks:
        w, a, sums = reference_adapt(net, weights, alphas, task, rates, CFG.steps)
        with torch.enable_grad():
            loss = query_objective(net, w, a, task)
            gs = torch.autograd.grad(loss, list(w.values()) + list(a.values()), allow_unused=True)
        for (k, t), g in zip(list(w.items()) + [("a:" + n, t) for n, t in a.items()], gs):
            g = torch.zeros_like(t) if g is None else g
            target = expected_a if k.startswith("a:") else expected_w
            target[k.removeprefix("a:")] += -g * sums[k] / len(tasks)
        frozen.append(sums)
    for k in weights:
        torch.testing.assert_close(got.rates.weights[k], expected_w[k], rtol=1e-9, atol=1e-12, msg=k)
    for k in alphas:
        torch.testing.assert_close(got.rates.alphas[k], expected_a[k], rtol=1e-9, atol=1e-12, msg=k)

    def frozen_objective(r):  # the adapted parameters as linear functions of the rates
        total = 0.0
        for task, sums in zip(tasks, frozen):
            w = {k: v.detach() - r.weights[k] * sums[k] for k, v in weights.items()}
            a = {k: v.detach() - r.alphas[k] * sums["a:" + k] for k, v in alphas.items()}
            with torch.no_grad():
                total += float(query_objective(net, w, a, task)) / len(tasks)
        return total

    eps, d = 1e-6, _rate_direction(rates)
    fd = (frozen_objective(_shift(rates, d, eps)) - frozen_objective(_shift(rates, d, -eps))) / (2 * eps)
    assert float(_dot(got.rates.weights, d.weights) + _dot(got.rates.alphas, d.alphas)) == pytest.approx(
        fd, rel=1e-5, abs=1e-8)


def test_with_one_inner_step_the_first_order_rate_gradient_is_exact(tiny, tasks):
    net, weights, alphas, _ = tiny
    one = replace(CFG, steps=1)
    rates = LearnedRates(*({k: v.requires_grad_(True) for k, v in part.items()}
                           for part in random_rates(weights, alphas, one)))
    exact = MAML(batching="loop").meta_gradients(net, weights, alphas, tasks, one, rates=rates)
    first = FOMAML(batching="loop").meta_gradients(net, weights, alphas, tasks, one, rates=rates)
    for part_exact, part_first in zip(exact.rates, first.rates):
        for k in part_exact:
            torch.testing.assert_close(part_first[k], part_exact[k], rtol=1e-8, atol=1e-12, msg=k)


@pytest.mark.parametrize("algorithm", [MAML, FOMAML])
def test_engines_and_backends_agree_on_the_rate_gradients(tiny, tasks, algorithm):
    """loop (autograd) and vmap (torch.func) give the same meta-gradients with learned rates."""
    net, weights, alphas, _ = tiny
    rates = LearnedRates(*({k: v.requires_grad_(True) for k, v in part.items()}
                           for part in random_rates(weights, alphas)))
    cfg = replace(CFG, entropy_weight=0.1, entropy_objective="both")
    loop = algorithm(batching="loop").meta_gradients(net, weights, alphas, tasks, cfg, rates=rates)
    vmapped = algorithm(batching="vmap").meta_gradients(net, weights, alphas, tasks, cfg, rates=rates)
    for a, b in [(loop.weights, vmapped.weights), (loop.alphas, vmapped.alphas),
                 (loop.rates.weights, vmapped.rates.weights), (loop.rates.alphas, vmapped.rates.alphas)]:
        assert set(a) == set(b) and a
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-8, atol=1e-11, msg=k)


def test_frozen_alphas_give_no_alpha_rate_gradient(tiny, tasks):
    net, weights, alphas, _ = tiny
    rates = random_rates(weights, alphas)
    got = FOMAML(batching="loop").meta_gradients(net, weights, alphas, tasks, CFG, rates=rates,
                                                 adapt_alphas=False)
    assert got.alphas is None and got.rates.alphas == {} and set(got.rates.weights) == set(weights)


# ------------------------------------------------------------------ entropy regulariser
def test_alpha_entropy_matches_the_formula_and_its_gradient(tiny):
    _, _, alphas, _ = tiny
    alphas = {k: v.detach().requires_grad_(True) for k, v in alphas.items()}
    for temperature in (1.0, 0.3):
        h = alpha_entropy(alphas, temperature)
        assert float(h.detach()) == pytest.approx(float(hand_entropy({k: v.detach() for k, v in alphas.items()}, temperature)), rel=1e-12)
        grads = torch.autograd.grad(h, list(alphas.values()), allow_unused=True)  # 1-D ones unused
        grads = [torch.zeros_like(v) if g is None else g for v, g in zip(alphas.values(), grads)]
        hand = hand_entropy_grad(alphas, temperature)
        for (k, v), g in zip(alphas.items(), grads):
            torch.testing.assert_close(g, hand[k], rtol=1e-10, atol=1e-13, msg=k)
        # and against central differences along a random direction
        g_dir = torch.Generator().manual_seed(2)
        d = {k: torch.randn(v.shape, generator=g_dir, dtype=v.dtype) for k, v in alphas.items()}
        eps = 1e-6
        with torch.no_grad():
            fd = (float(alpha_entropy({k: v + eps * d[k] for k, v in alphas.items()}, temperature))
                  - float(alpha_entropy({k: v - eps * d[k] for k, v in alphas.items()}, temperature))) / (2 * eps)
        assert float(_dot(dict(zip(alphas, grads)), d)) == pytest.approx(fd, rel=1e-6, abs=1e-10)
    uniform = {"normal": torch.zeros(5, 4, dtype=torch.float64)}
    assert float(alpha_entropy(uniform)) == pytest.approx(np.log(4))


def test_entropy_in_the_support_objective_shapes_every_inner_step(tiny):
    net, weights, alphas, _ = tiny
    task = make_task(8)
    cfg = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.3, entropy_weight=0.5,
                          entropy_objective="support", entropy_temperature=0.5)
    got = adapt(net, weights, alphas, task.support_x, task.support_y, cfg)
    rates = LearnedRates.like(weights, alphas, cfg)
    ref_w, ref_a, _ = reference_adapt(net, weights, alphas, task, rates, 2, entropy=(0.5, 0.5))
    plain = adapt(net, weights, alphas, task.support_x, task.support_y, replace(cfg, entropy_weight=0.0))
    for k in alphas:
        torch.testing.assert_close(got.alphas[k], ref_a[k], rtol=1e-10, atol=1e-12, msg=k)
    assert any(not torch.allclose(got.alphas[k], plain.alphas[k]) for k in alphas)
    for k in weights:
        torch.testing.assert_close(got.weights[k], ref_w[k], rtol=1e-10, atol=1e-12, msg=k)
    # the logged support losses are the cross-entropy alone
    with torch.no_grad():
        first = float(F.cross_entropy(forward(net, weights, alphas, task.support_x), task.support_y))
    assert float(got.support_losses[0]) == pytest.approx(first, rel=1e-12)


@pytest.mark.parametrize("weight", [0.2, -0.2])
def test_entropy_in_the_query_objective_adds_its_gradient_at_the_adapted_alphas(tiny, tasks, weight):
    """FOMAML: the alphas' meta-gradient gains weight * dH/da at the adapted alphas (read-out
    temperature: entropy_temperature null); the weights' one is unchanged."""
    net, weights, alphas, _ = tiny
    cfg = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.3, temperature_start=1.0,
                          temperature_end=0.5, temperature_schedule="linear")
    with_entropy = replace(cfg, entropy_weight=weight, entropy_objective="query")
    plain = FOMAML(batching="loop").meta_gradients(net, weights, alphas, tasks, cfg)
    reg = FOMAML(batching="loop").meta_gradients(net, weights, alphas, tasks, with_entropy)
    expected = {k: v.clone() for k, v in plain.alphas.items()}
    for task in tasks:
        adapted = adapt(net, weights, alphas, task.support_x, task.support_y, cfg)
        for k, g in hand_entropy_grad(adapted.alphas, 0.5).items():
            expected[k] += weight * g / len(tasks)
    for k in alphas:
        torch.testing.assert_close(reg.alphas[k], expected[k], rtol=1e-9, atol=1e-12, msg=k)
    for k in weights:
        assert torch.equal(reg.weights[k], plain.weights[k]), k
    assert reg.query_loss == plain.query_loss  # logged: the cross-entropy alone


def test_maml_entropy_meta_gradient_matches_finite_differences(tiny, tasks):
    net, weights, alphas, _ = tiny
    net = smooth(net)
    cfg = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.3, entropy_weight=0.3, entropy_objective="both")
    got = MAML(batching="loop").meta_gradients(net, weights, alphas, tasks, cfg)
    rates = LearnedRates.like(weights, alphas, cfg)
    g = torch.Generator().manual_seed(3)
    d = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in alphas.items()}

    def objective(step):
        shifted = {k: v.detach() + step * d[k] for k, v in alphas.items()}
        total = 0.0
        for task in tasks:
            w, a, _ = reference_adapt(net, weights, shifted, task, rates, 2, entropy=(0.3, 1.0))
            with torch.no_grad():
                total += float(query_objective(net, w, a, task) + 0.3 * hand_entropy(a, 1.0)) / len(tasks)
        return total

    eps = 1e-6
    fd = (objective(eps) - objective(-eps)) / (2 * eps)
    assert float(_dot(got.alphas, d)) == pytest.approx(fd, rel=1e-5, abs=1e-8)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kwargs,needle", [
    (dict(meta_sgd=True, optimizer="adam"), "inner.optimizer='adam'"),
    (dict(meta_sgd=True, optimizer_alphas="adam"), "inner.optimizer_alphas='adam'"),
    (dict(meta_sgd="yes"), "inner.meta_sgd='yes'"),
    (dict(entropy_objective="outer"), "inner.entropy_objective='outer'"),
    (dict(entropy_weight="lots"), "inner.entropy_weight='lots'"),
    (dict(entropy_weight=float("nan")), "inner.entropy_weight=nan"),
    (dict(entropy_temperature=0.0), "inner.entropy_temperature=0.0"),
])
def test_bad_settings_are_refused_in_one_line(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        InnerLoopConfig(**kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_reptile_refuses_meta_sgd_and_a_query_entropy(tiny, tasks):
    net, weights, alphas, _ = tiny
    with pytest.raises(ConfigError, match="inner.meta_sgd=true.*algorithm=maml"):
        Reptile().meta_gradients(net, weights, alphas, tasks, CFG, rates=random_rates(weights, alphas))
    with pytest.raises(ConfigError, match="entropy_objective='both'.*entropy_objective=support"):
        Reptile().check_inner(InnerLoopConfig(entropy_weight=0.1, entropy_objective="both"))
    Reptile().check_inner(InnerLoopConfig(entropy_weight=0.1, entropy_objective="support"))  # fine
    with pytest.raises(ValueError, match="rates"):
        adapt(net, weights, alphas, tasks[0].support_x, tasks[0].support_y, CFG)  # no rates given


# ------------------------------------------------------------------ trainer, checkpoints, adaptation
class RandomTasks:
    n_way, k_shot, q_query, input_shape = 3, 2, 2, (1, 8, 8)

    def sample(self, split, rng):
        return make_task(int(rng.integers(1 << 30)), dtype=torch.float32)


TRAIN_INNER = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.2, meta_sgd=True)


def make_trainer(tmp_path, inner=TRAIN_INNER, algorithm=None, rates_lr=1e-2, net=None, alphas=None, **cfg):
    space = tiny_space()
    torch.manual_seed(0)
    net = net if net is not None else SearchNetwork(space)
    alphas = alphas if alphas is not None else init_alphas(space, generator=torch.Generator().manual_seed(0))
    defaults = dict(meta_steps=4, meta_batch_size=2, val_every=2, n_val_tasks=2, ckpt_every=2,
                    n_test_tasks=2, progress=False, task_workers=1)
    defaults.update(cfg)
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    return MetaTrainer(
        net=net, alphas=alphas, sampler=RandomTasks(), algorithm=algorithm or FOMAML(batching="loop"),
        inner=inner, weights_optimizer=adam, alphas_optimizer=adam,
        rates_optimizer=None if rates_lr is None else functools.partial(torch.optim.Adam, lr=rates_lr),
        search_space=space, cfg=TrainerConfig(**defaults), run_dir=tmp_path,
        config={"inner": dataclasses.asdict(inner)},  # as metanas-train records it
    )


def _rates_of(trainer):
    return {f"{kind}/{k}": v.detach().clone() for kind, part in zip(LearnedRates._fields, trainer.rates)
            for k, v in part.items()}


def test_trainer_learns_rates_and_resume_continues_exactly(tmp_path):
    straight = make_trainer(tmp_path / "a")
    start = _rates_of(straight)
    straight.fit()
    moved = _rates_of(straight)
    assert all(torch.all(start[k] == (0.1 if k.startswith("weights/") else 0.2)) for k in start)
    assert any(not torch.equal(start[k], moved[k]) for k in start)
    assert "inner_rate_weights_mean" in straight.history[-1] and "lr_rates" in straight.history[-1]

    first = make_trainer(tmp_path / "b", meta_steps=2)
    first.fit()
    resumed = make_trainer(tmp_path / "b")
    resumed.resume(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert resumed.step == 2
    resumed.fit()
    for k, v in _rates_of(resumed).items():
        assert torch.equal(v, moved[k]), k
    for k, p in straight.weights.items():
        assert torch.equal(p, resumed.weights[k]), k
    for k, p in straight.alphas.items():
        assert torch.equal(p, resumed.alphas[k]), k
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert state["optimizer_classes"]["rates"] == "torch.optim.adam.Adam"
    for k, v in moved.items():
        kind, name = k.split("/", 1)
        assert torch.equal(state["rates"][kind][name], v)


def test_old_checkpoints_load_without_rates_and_either_way_round(tmp_path, caplog):
    plain_inner = replace(TRAIN_INNER, meta_sgd=False)
    old = make_trainer(tmp_path / "old", inner=plain_inner, rates_lr=None)
    old.meta_step()
    path = old.save()
    state = load_checkpoint(path)
    assert "rates" not in state and "rates" not in state["optimizer_classes"]
    new = make_trainer(tmp_path / "new")
    with caplog.at_level(logging.WARNING):
        new.resume(path)
    assert "no learned inner rates" in caplog.text
    assert new.step == 1 and all(torch.all(v == (0.1 if k.startswith("weights/") else 0.2))
                                 for k, v in _rates_of(new).items())
    new.meta_step()
    path = new.save()
    caplog.clear()
    again = make_trainer(tmp_path / "again", inner=plain_inner, rates_lr=None)
    with caplog.at_level(logging.WARNING):
        again.resume(path)
    assert "does not use" in caplog.text and again.rates is None and again.step == 2


def test_meta_validation_test_and_adaptation_use_the_learned_rates(tmp_path):
    """Rates of 0 mean no adaptation at all: every evaluation must then equal one with no
    inner steps, and metanas-adapt's adapted weights must be the meta-weights."""
    trainer = make_trainer(tmp_path, val_every=0, compare_frozen_alphas=False)
    with torch.no_grad():
        for part in trainer.rates:
            for p in part.values():
                p.zero_()
    no_steps = replace(TRAIN_INNER, meta_sgd=False, steps=0)
    for split, n, seed, result in [("val", 2, 1, trainer.validate()), ("test", 2, TEST_SEED, trainer.test())]:
        ref = evaluate(trainer.net, trainer.weights, trainer.alphas, trainer.sampler, split, n, no_steps,
                       trainer.search_space, np.random.default_rng([trainer.seed, seed]))
        assert result.accuracies == ref.accuracies
    path = trainer.save()
    model = load_meta_model(path)
    assert model.inner.meta_sgd and model.rates is not None
    task = make_task(1, torch.float32)
    adapted = adapt_support(model, task.support_x, task.support_y).adapted
    for k, v in model.weights.items():
        assert torch.equal(adapted.weights[k], v), k
    with pytest.raises(ConfigError, match="inner.lr_weights=0.5 has no effect"):
        load_meta_model(path, inner_overrides={"lr_weights": 0.5})
    # a damaged checkpoint that lost its rates is refused
    state = load_checkpoint(path)
    del state["rates"]
    save_checkpoint(tmp_path / "damaged.ckpt", state)
    with pytest.raises(Exception, match="no matching learned inner rates"):
        load_meta_model(tmp_path / "damaged.ckpt")


def test_trainer_refuses_bad_combinations(tmp_path):
    with pytest.raises(ConfigError, match="Reptile"):
        make_trainer(tmp_path / "a", algorithm=Reptile())
    with pytest.raises(ConfigError, match="optim.rates"):
        make_trainer(tmp_path / "b", rates_lr=None)
    conv = Conv4(Conv4Config(in_channels=1, n_classes=3, channels=4))
    with pytest.raises(ConfigError, match="inner.entropy_weight=0.1 .*Conv4 has none"):
        make_trainer(tmp_path / "c", inner=InnerLoopConfig(entropy_weight=0.1), rates_lr=None, net=conv, alphas={})
    with pytest.raises(ConfigError, match="inner.alpha_refine_steps=3 refines the alphas, but Conv4 has none"):
        make_trainer(tmp_path / "e", inner=InnerLoopConfig(alpha_refine_steps=3), rates_lr=None, net=conv, alphas={})
    make_trainer(tmp_path / "d", net=conv, alphas={}).meta_step()  # Meta-SGD on weights alone is fine


# ------------------------------------------------------------------ command line
def _cli(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "metanas.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


SHORT = ["experiment=smoke", "trainer.meta_steps=4", "trainer.val_every=2", "trainer.n_val_tasks=2",
         "trainer.ckpt_every=2", "trainer.n_test_tasks=4"]


@pytest.mark.parametrize("overrides,needle", [
    (["algorithm=reptile", "inner.optimizer_alphas=sgd"], "inner.meta_sgd=true needs a meta-gradient"),
    (["inner=adam"], "inner.optimizer='adam'"),
    # inner=sgd adapts the alphas with Adam: the message names the fix
    (["inner=sgd"], "inner.optimizer_alphas='adam'; set inner.optimizer_alphas=sgd or inner.meta_sgd=false"),
    # Reptile brings inner=sgd; asking for Meta-SGD's preset with it is refused, not ignored
    (["algorithm=reptile", "inner=meta_sgd"], "inner.meta_sgd=true needs a meta-gradient"),
])
def test_cli_refuses_meta_sgd_combinations_with_exit_2(tmp_path, overrides, needle):
    run_dir = tmp_path / "run"
    proc = _cli(*SHORT, "inner.meta_sgd=true", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"metanas-train: error: " in proc.stderr and needle in proc.stderr
    assert "Traceback" not in proc.stderr and not (run_dir / "metrics.json").exists()


@pytest.mark.slow
def test_smoke_runs_with_meta_sgd_and_with_the_entropy_regulariser(tmp_path):
    run_dir = tmp_path / "meta_sgd"
    proc = _cli(*SHORT, "inner.meta_sgd=true", "inner.optimizer_alphas=sgd", "algorithm=maml",
                f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["inner"]["meta_sgd"] is True and 0.0 <= metrics["accuracy"] <= 1.0
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert any(not torch.all(v == 0.1) for v in state["rates"]["weights"].values())
    assert "inner_rate_weights_mean" in (run_dir / "train_log.csv").read_text().splitlines()[0]
    # metanas-adapt adapts with the learned rates and refuses a scalar rate that would be ignored
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    for extra, code in (([], 0), (["inner.lr_weights=0.5"], 2)):
        out = tmp_path / f"adapt{code}"
        proc = subprocess.run([sys.executable, "-m", "metanas.adapt_cli", f"checkpoint={ckpt}", "task=omniglot",
                               "n_tasks=2", "finetune_steps=0", f"out={out}", *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == code, proc.stderr[-3000:]
        assert (out / "metrics.json").exists() == (code == 0)
    assert "inner.lr_weights=0.5 has no effect" in proc.stderr

    run_dir = tmp_path / "entropy"
    proc = _cli(*SHORT, "inner.entropy_weight=0.05", "inner.entropy_objective=both",
                f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["inner"]["entropy_weight"] == 0.05
