"""The alpha refinement after the inner steps (``inner.alpha_refine_steps``), against loops
written here: ``torch.optim.Adam`` on the alphas alone over images shifted by hand, the
weights held; finite differences of its meta-objective; both gradient backends; the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_task
from metanas.algorithms import FOMAML, MAML
from metanas.errors import ConfigError
from metanas.functional import forward
from metanas.inner import InnerLoopConfig, adapt, query_loss, shift_images

PLAIN = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.3, temperature_end=0.5)
REFINE = replace(PLAIN, alpha_refine_steps=3, alpha_refine_lr=0.05, alpha_refine_shift=1)


def hand_shift(x, shifts):
    """Image i moved by shifts[i] = (dy, dx), circularly, by index arithmetic."""
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    rows, cols = torch.arange(h), torch.arange(w)
    for i, (dy, dx) in enumerate(shifts):
        out[i] = x[i][..., (rows - int(dy)) % h, :][..., (cols - int(dx)) % w]
    return out


def test_shift_images_moves_every_image_by_its_own_offset():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float64).view(2, 1, 4, 5)
    shifts = np.array([[1, -2], [0, 1]])
    got = shift_images(x, shifts)
    torch.testing.assert_close(got, hand_shift(x, shifts), rtol=0, atol=0)
    assert got[0, 0, 1, 0] == x[0, 0, 0, 2]  # row 0 moved down one, column 2 moved left two


def test_refine_shifts_are_seeded_and_cover_the_range():
    cfg = replace(REFINE, alpha_refine_shift=2)
    drawn = np.concatenate([cfg.refine_shifts(r, 5) for r in range(40)])
    assert drawn.shape == (200, 2) and drawn.min() == -2 and drawn.max() == 2
    np.testing.assert_array_equal(cfg.refine_shifts(3, 5), cfg.refine_shifts(3, 5))
    assert not np.array_equal(cfg.refine_shifts(3, 5), cfg.refine_shifts(4, 5))
    assert not np.array_equal(cfg.refine_shifts(3, 5), replace(cfg, shuffle_seed=1).refine_shifts(3, 5))


@pytest.mark.parametrize("shift", [0, 1])
def test_refinement_is_adam_on_the_alphas_alone_over_shifted_support_images(tiny, shift):
    net, weights, alphas, _ = tiny
    task = make_task(10)
    cfg = replace(REFINE, alpha_refine_shift=shift)
    got = adapt(net, weights, alphas, task.support_x, task.support_y, cfg)
    base = adapt(net, weights, alphas, task.support_x, task.support_y, PLAIN)
    # the reference: torch.optim.Adam on copies of the alphas, the adapted weights fixed
    w = {k: v.detach() for k, v in base.weights.items()}
    a = {k: v.detach().clone().requires_grad_(True) for k, v in base.alphas.items()}
    opt = torch.optim.Adam(list(a.values()), lr=0.05, betas=cfg.betas, eps=cfg.eps)
    n = len(task.support_y)
    for r in range(3):
        offsets = np.random.default_rng([0, 1, r]).integers(-shift, shift + 1, (n, 2))
        x = hand_shift(task.support_x, offsets)
        opt.zero_grad()
        F.cross_entropy(forward(net, w, a, x, 0.5), task.support_y).backward()
        opt.step()
    for k in weights:
        assert torch.equal(got.weights[k].detach(), base.weights[k].detach()), k
    moved = 0.0
    for k in alphas:
        torch.testing.assert_close(got.alphas[k].detach(), a[k].detach(), rtol=1e-10, atol=1e-12, msg=k)
        moved = max(moved, float((got.alphas[k] - base.alphas[k]).detach().abs().max()))
    assert moved > 1e-3  # the refinement did move the alphas
    assert got.temperature == base.temperature == 0.5 and len(got.support_losses) == 2


def test_frozen_alphas_skip_the_refinement(tiny):
    net, weights, alphas, _ = tiny
    task = make_task(11)
    got = adapt(net, weights, alphas, task.support_x, task.support_y, REFINE, adapt_alphas=False)
    base = adapt(net, weights, alphas, task.support_x, task.support_y, PLAIN, adapt_alphas=False)
    for k in weights:
        assert torch.equal(got.weights[k], base.weights[k]), k
    for k in alphas:
        assert torch.equal(got.alphas[k].detach(), alphas[k].detach()), k


def _smooth(net):
    """SiLU for ReLU: a finite-difference probe must not cross a kink."""
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.SiLU())


@pytest.mark.parametrize("part", ["weights", "alphas"])
def test_maml_meta_gradient_through_the_refinement_matches_finite_differences(tiny, tasks, part):
    net, weights, alphas, _ = tiny
    _smooth(net)
    # Adam's first steps are ~lr * sign(g) with a small eps: a large eps keeps them smooth
    cfg = replace(REFINE, eps=0.05)
    grads = MAML().meta_gradients(net, weights, alphas, tasks, cfg)
    g = torch.Generator().manual_seed(5)
    target = weights if part == "weights" else alphas
    direction = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in target.items()}
    analytic = float(sum((getattr(grads, part)[k] * d).sum() for k, d in direction.items()))
    eps = 1e-6

    def objective(sign):
        moved = {k: (v + sign * eps * direction[k]).detach().requires_grad_(True) for k, v in target.items()}
        w, a = (moved, alphas) if part == "weights" else (weights, moved)
        total = 0.0
        for task in tasks:
            adapted = adapt(net, w, a, task.support_x, task.support_y, cfg, create_graph=True)
            total = total + float(query_loss(net, adapted, task.query_x, task.query_y)[0])
        return total / len(tasks)

    numeric = (objective(1) - objective(-1)) / (2 * eps)
    assert abs(analytic) > 1e-4
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric))
    # and the refinement is part of it: without it the meta-gradient differs
    plain = MAML().meta_gradients(net, weights, alphas, tasks, replace(cfg, alpha_refine_steps=0))
    assert abs(float(sum((getattr(plain, part)[k] * d).sum() for k, d in direction.items())) - analytic) > 1e-6


@pytest.mark.parametrize("algorithm", [MAML, FOMAML])
def test_loop_and_vmap_agree_with_the_refinement(tiny, tasks, algorithm):
    net, weights, alphas, _ = tiny
    loop = algorithm(batching="loop").meta_gradients(net, weights, alphas, tasks, REFINE)
    vmapped = algorithm(batching="vmap").meta_gradients(net, weights, alphas, tasks, REFINE)
    for a, b in [(loop.weights, vmapped.weights), (loop.alphas, vmapped.alphas)]:
        assert set(a) == set(b) and a
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-8, atol=1e-11, msg=k)


@pytest.mark.parametrize("kwargs,needle", [
    ({"alpha_refine_steps": -1}, "inner.alpha_refine_steps=-1 is not an integer >= 0"),
    ({"alpha_refine_steps": 1.5}, "inner.alpha_refine_steps=1.5 is not an integer >= 0"),
    ({"alpha_refine_shift": -2}, "inner.alpha_refine_shift=-2 is not an integer >= 0"),
    ({"alpha_refine_lr": -0.1}, "inner.alpha_refine_lr=-0.1 must be a finite number >= 0"),
    ({"alpha_refine_lr": float("nan")}, "inner.alpha_refine_lr=nan must be a finite number >= 0"),
])
def test_bad_refinement_settings_are_refused(kwargs, needle):
    with pytest.raises(ConfigError, match="^" + needle.replace(".", r"\.").replace("+", r"\+")):
        InnerLoopConfig(**kwargs)


@pytest.mark.slow
def test_smoke_run_and_adapt_with_the_refinement(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "metanas.cli", "experiment=smoke", "trainer.meta_steps=2", "trainer.val_every=2",
         "trainer.n_val_tasks=2", "trainer.n_test_tasks=4", "inner.alpha_refine_steps=2",
         "inner.alpha_refine_shift=1", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["inner"]["alpha_refine_steps"] == 2
    ckpt = next((run_dir / "checkpoints").glob("*.ckpt"))
    for extra, code in ((["inner.alpha_refine_steps=3", "inner.alpha_refine_lr=0.2"], 0),
                        (["inner.alpha_refine_shift=-1"], 2)):
        out = tmp_path / f"adapt{code}"
        proc = subprocess.run([sys.executable, "-m", "metanas.adapt_cli", f"checkpoint={ckpt}", "task=omniglot",
                               "n_tasks=2", "finetune_steps=0", f"out={out}", *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == code, proc.stderr[-3000:]
        assert (out / "metrics.json").exists() == (code == 0)
    assert "inner.alpha_refine_shift=-1 is not an integer >= 0" in proc.stderr


def test_second_order_memory_estimate_counts_the_refinement_steps_as_updates(tiny):
    """Whole-support refinement steps keep a graph each under second-order MAML, as inner updates do."""
    from metanas.memory import estimate_task_bytes
    net, weights, alphas, _ = tiny
    task = make_task(10)

    def est(cfg, second_order=True):
        return estimate_task_bytes(net, weights, alphas, task, cfg, second_order=second_order)

    per_update = est(replace(PLAIN, steps=3)) - est(PLAIN)
    assert per_update > 0
    assert est(replace(PLAIN, alpha_refine_steps=2)) - est(PLAIN) == 2 * per_update
    assert est(replace(PLAIN, alpha_refine_steps=2), False) == est(PLAIN, False)  # first order: one graph at a time
