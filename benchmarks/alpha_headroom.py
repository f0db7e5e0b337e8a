"""How much could a task's own architecture be worth? The headroom of per-task alpha adaptation.

The architecture adaptation gain (adapted minus frozen alphas, paired) has stayed near zero
on Omniglot. Two explanations differ in what they predict:

* the support set is too small to find a better architecture for the task (1-shot: five
  images), although a better one exists; or
* no task-specific architecture serves a task measurably better than the meta-architecture,
  whatever the data, so the gain has nothing to find.

This script separates them on a meta-trained model (default: the bundled one). Every test
task's query set is split per class into a *fit* half and a *held-out* half; every variant is
scored on the held-out half only (transductive over it), on the same tasks:

``frozen``
    weights adapted on the support set, alphas frozen at the meta-alphas: the reference.
``adapted``
    weights and alphas adapted on the support set, as every meta-test does.
``alphas_x<s>``
    the same with the alphas' inner learning rates multiplied by ``s`` at test time (Meta-SGD's
    learned rates, or the scalar ``inner.lr_alphas``): is the adaptation merely too timid?
``oracle_alphas_lr<r>``
    ``frozen``, then ``--refine-steps`` Adam steps at learning rate ``r`` (``--refine-lr``) on the
    *alphas only*, minimising the cross-entropy on support plus fit half (1-shot, 3 fit queries
    per class: 5 + 15 labelled images). An upper bound of what choosing the task's architecture can do
    with more labelled data than the task offers: if it gains little, per-task architectures
    have little to give here.
``oracle_weights_lr<r>``
    the same number of steps on the *weights only*, alphas frozen, at Adam learning rate ``r``
    (``--refine-lr-weights``; the weights need smaller steps than the alphas): what the extra
    data is worth through the weights, the scale against which ``oracle_alphas_lr<r>`` is read.
``support_alphas``
    ``frozen``, then as many alpha-only Adam steps (at the first ``--refine-lr``) on the plain
    support cross-entropy: the control of the next two, which differ from it in their
    objective alone. Uses no query label.
``augmented_alphas``
    ``frozen``, then as many alpha-only steps (at the first ``--refine-lr``) on the support set
    with every image shifted by up to 2 pixels afresh at each step: after the weights fit the support, its cross-entropy
    leaves the alphas little gradient; shifted copies act as held-out data, as DARTS takes its
    alpha gradient on data the weights were not fitted to. Uses no query label.
``augmented_weights_lr<r>``
    the same shifted-support steps on the *weights only*, alphas frozen, at the weights' rates
    (``--refine-lr-weights``): the same extra test-time work spent on the weights instead, the
    control a claim for ``augmented_alphas`` needs. Uses no query label.
``transductive_alphas``
    ``frozen``, then as many alpha-only steps on the support cross-entropy plus the mean entropy
    of the held-out queries' predictions (transductive entropy minimisation, as in Dhillon et
    al. 2020's transductive fine-tuning). Uses no query label.

Every difference is paired over the same tasks with a 95 % CI; accuracy and cross-entropy on
the held-out half are both reported (a gain too small to flip predictions still shows in the
loss). Writes ``alpha_headroom.md`` and ``alpha_headroom.csv`` to ``--out``::

    python benchmarks/alpha_headroom.py --tasks 60 [--checkpoint path/to/last.ckpt]

No wall-time budget is involved: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from architecture_value import RESULTS, load_supernet, meta_test_samplers, write_csv
from metanas.engines import TaskPool, default_workers
from metanas.evaluate import evaluate, mean_ci95
from metanas.functional import forward
from metanas.inner import Adapted, LearnedRates, adapt, shift_images
from metanas.io import atomic_write_text

log = logging.getLogger("alpha_headroom")
VARIANTS = ("adapted", "alphas_x", "oracle_alphas", "oracle_weights", "support_alphas", "augmented_alphas",
            "transductive_alphas", "augmented_weights")
FIELDS = ["dataset", "variant", "reference", "accuracy", "ci95", "loss", "diff", "diff_ci95", "loss_diff",
          "loss_diff_ci95", "n_tasks", "k_shot", "checkpoint"]


def split_query(task, fit_per_class: int):
    """Query indices of the fit half and the held-out half: the first ``fit_per_class``
    queries of every class, and the rest (the query set is ordered by label)."""
    n, q = task.n_way, task.q_query
    rows = torch.arange(n * q).view(n, q)
    return rows[:, :fit_per_class].reshape(-1), rows[:, fit_per_class:].reshape(-1)


def scaled_rates(rates: LearnedRates | None, scale: float) -> LearnedRates | None:
    if rates is None:
        return None
    return LearnedRates(rates.weights, {k: v * scale for k, v in rates.alphas.items()})


def refine(net, adapted: Adapted, objective, group: str, steps: int, lr: float) -> Adapted:
    """``steps`` Adam steps on ``group`` ("alphas" or "weights") of an adapted model,
    minimising ``objective(w, a, step)``; the other group stays as it is."""
    w = {k: v.detach().clone().requires_grad_(group == "weights") for k, v in adapted.weights.items()}
    a = {k: v.detach().clone().requires_grad_(group == "alphas") for k, v in adapted.alphas.items()}
    opt = torch.optim.Adam(list((w if group == "weights" else a).values()), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        objective(w, a, step).backward()
        opt.step()
    return Adapted({k: v.detach() for k, v in w.items()}, {k: v.detach() for k, v in a.items()},
                   adapted.temperature)


def shifted(x: torch.Tensor, seed: int, max_shift: int = 2) -> torch.Tensor:
    """Every image moved by its own random whole-pixel shift of at most ``max_shift`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2), generator=gen)
    return shift_images(x, shifts.numpy())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="meta-model checkpoint (default: the bundled model)")
    p.add_argument("--tasks", type=int, default=60, help="test tasks per dataset (about 20 s each here)")
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--fit-per-class", type=int, default=3, help="queries per class used for the oracles")
    p.add_argument("--scales", type=float, nargs="*", default=[3.0])
    p.add_argument("--refine-steps", type=int, default=10, help="Adam steps of the oracles and refinements")
    p.add_argument("--refine-lr", type=float, nargs="+", default=[0.1, 0.03, 0.3],
                   help="Adam learning rates of the alphas-only oracle, one variant each; the label-free "
                        "alpha refinements use the first")
    p.add_argument("--refine-lr-weights", type=float, nargs="+", default=[0.01, 0.001],
                   help="Adam learning rates of the weights-only oracle, one variant each")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="the variants to run besides frozen (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", nargs="*", default=["omniglot", "shapes"])
    p.add_argument("--workdir", default="outputs/architecture_value", help="where the shapes folder lives")
    p.add_argument("--out", default=str(RESULTS / "alpha_headroom"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    model, shown = load_supernet(args.checkpoint, "adapt")
    rates = model.rates
    pool = TaskPool(model.net, default_workers("cpu"))

    def variants(replica, task, adapted, genotype):
        fit, held = split_query(task, args.fit_per_class)
        xh, yh = task.query_x[held], task.query_y[held]
        x_fit = torch.cat([task.support_x, task.query_x[fit]])
        y_fit = torch.cat([task.support_y, task.query_y[fit]])
        frozen = adapt(replica, model.weights, model.alphas, task.support_x, task.support_y, model.inner,
                       adapt_alphas=False, rates=rates)
        models = {"frozen": frozen}
        if "adapted" in args.variants:
            models["adapted"] = adapted
        for s in args.scales if "alphas_x" in args.variants else []:
            inner = model.inner if rates is not None else replace(model.inner, lr_alphas=model.inner.lr_alphas * s)
            models[f"alphas_x{s:g}"] = adapt(replica, model.weights, model.alphas, task.support_x,
                                             task.support_y, inner, rates=scaled_rates(rates, s))
        t = frozen.temperature

        def ce(x, y):
            return lambda w, a, step: F.cross_entropy(forward(replica, w, a, x, t), y)

        def augmented(w, a, step):  # the support set, shifted afresh at every step
            return F.cross_entropy(forward(replica, w, a, shifted(task.support_x, step), t), task.support_y)

        def transductive(w, a, step):  # support cross-entropy + entropy of the held-out predictions
            logits = forward(replica, w, a, torch.cat([task.support_x, xh]), t)
            p = torch.log_softmax(logits[len(task.support_y):], -1)
            return F.cross_entropy(logits[: len(task.support_y)], task.support_y) - (p.exp() * p).sum(-1).mean()

        steps, lr = args.refine_steps, args.refine_lr[0]
        # (name, objective, group, learning rate) of every refinement asked for
        jobs = [(f"oracle_alphas_lr{r:g}", ce(x_fit, y_fit), "alphas", r) for r in args.refine_lr
                if "oracle_alphas" in args.variants]
        jobs += [(f"oracle_weights_lr{r:g}", ce(x_fit, y_fit), "weights", r) for r in args.refine_lr_weights
                 if "oracle_weights" in args.variants]
        jobs += [(name, fn, "alphas", lr) for name, fn in (("support_alphas", ce(task.support_x, task.support_y)),
                                                            ("augmented_alphas", augmented),
                                                            ("transductive_alphas", transductive))
                 if name in args.variants]
        jobs += [(f"augmented_weights_lr{r:g}", augmented, "weights", r) for r in args.refine_lr_weights
                 if "augmented_weights" in args.variants]
        with torch.enable_grad():
            for name, objective, group, rate in jobs:
                models[name] = refine(replica, frozen, objective, group, steps, rate)
        out = {}
        with torch.no_grad():
            for name, m in models.items():
                logits = forward(replica, m.weights, m.alphas, xh, m.temperature)
                out[f"{name}/acc"] = float((logits.argmax(-1) == yh).float().mean())
                out[f"{name}/loss"] = float(F.cross_entropy(logits, yh))
        return out

    rows = []
    for dataset, sampler in meta_test_samplers(Path(args.workdir), args.k_shot).items():
        if dataset not in args.datasets:
            continue
        res = evaluate(model.net, model.weights, model.alphas, sampler, "test", args.tasks, model.inner,
                       model.space, np.random.default_rng([args.seed, 7]), pool=pool, extra=variants,
                       rates=rates)
        names = [k[:-4] for k in res.extras if k.endswith("/acc")]
        for name in names:
            acc, ci = mean_ci95(res.extras[f"{name}/acc"])
            loss, _ = mean_ci95(res.extras[f"{name}/loss"])
            refs = [f"oracle_weights_lr{wlr:g}" for wlr in args.refine_lr_weights
                    if name.startswith("oracle_alphas") and "oracle_weights" in args.variants]
            d, dci = mean_ci95([x - y for x, y in zip(res.extras[f"{name}/acc"], res.extras["frozen/acc"])])
            ld, ldci = mean_ci95([x - y for x, y in zip(res.extras[f"{name}/loss"], res.extras["frozen/loss"])])
            log.info("%s %-15s held-out accuracy %.2f +- %.2f %%, vs frozen %+.2f +- %.2f points, "
                     "loss %.4f (%+.4f +- %.4f)", dataset, name, 100 * acc, 100 * ci, 100 * d, 100 * dci,
                     loss, ld, ldci)
            rows.append({"dataset": dataset, "variant": name, "reference": "frozen", "accuracy": acc, "ci95": ci,
                         "loss": loss, "diff": d, "diff_ci95": dci, "loss_diff": ld, "loss_diff_ci95": ldci,
                         "n_tasks": res.n_tasks, "k_shot": args.k_shot, "checkpoint": shown})
            for ref in refs:
                d, dci = mean_ci95([x - y for x, y in zip(res.extras[f"{name}/acc"], res.extras[f"{ref}/acc"])])
                ld, ldci = mean_ci95([x - y for x, y in zip(res.extras[f"{name}/loss"], res.extras[f"{ref}/loss"])])
                rows.append({"dataset": dataset, "variant": name, "reference": ref, "accuracy": acc, "ci95": ci,
                             "loss": loss, "diff": d, "diff_ci95": dci, "loss_diff": ld, "loss_diff_ci95": ldci,
                             "n_tasks": res.n_tasks, "k_shot": args.k_shot, "checkpoint": shown})
    pool.close()
    _write(rows, Path(args.out), args, shown)
    return 0


def _write(rows: list[dict], out: Path, args, shown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "alpha_headroom.csv", rows, FIELDS)
    lines = ["# Headroom of per-task architecture adaptation", "",
             f"Model: `{Path(shown).name}` ({args.k_shot}-shot tasks, {args.tasks} test tasks per dataset, task seed "
             f"{args.seed}). Each task's query set is split per class: {args.fit_per_class} queries per class "
             "to fit the oracles, the rest held out; every figure is on the held-out queries. `diff`: the "
             "variant minus the reference, paired over the same tasks, 95 % CI. Oracles: "
             f"{args.refine_steps} Adam steps on support plus fit queries, after the frozen-alpha adaptation, "
             "on the alphas only or the weights only (Adam learning rate in the variant's name); the three "
             f"label-free alpha refinements take as many steps at {args.refine_lr[0]:g} on the alphas, "
             "on the support cross-entropy (`support_alphas`, their control), on shifted support images or "
             "on support cross-entropy plus the held-out predictions' entropy. See the script's docstring.",
             ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        lines += [f"## {dataset}", "",
                  "| variant | against | held-out accuracy (%) | diff (points) | held-out loss | loss diff |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            if r["dataset"] == dataset:
                lines.append(f"| {r['variant']} | {r['reference']} | {100 * r['accuracy']:.2f} +- "
                             f"{100 * r['ci95']:.2f} | {100 * r['diff']:+.2f} +- {100 * r['diff_ci95']:.2f} | "
                             f"{r['loss']:.4f} | {r['loss_diff']:+.4f} +- {r['loss_diff_ci95']:.4f} |")
        lines.append("")
    atomic_write_text(out / "alpha_headroom.md", "\n".join(lines))
    log.info("wrote %s", out / "alpha_headroom.md")


if __name__ == "__main__":
    raise SystemExit(main())
