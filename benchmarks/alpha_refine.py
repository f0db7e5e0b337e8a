"""The architecture adaptation gain of the alpha refinement (``inner.alpha_refine_steps``).

Meta-tests a meta-trained model (default: the bundled one) on the same Omniglot and drawn-shapes
test tasks as ``architecture_value.py``, exactly as ``metanas-train``'s meta-test does
(``metanas.evaluate.evaluate`` with the frozen-alpha comparison, the whole query set), with the
inner loop of the checkpoint plus ``--refine-steps`` alpha-only Adam steps at ``--refine-lr``
on support images shifted by up to ``--shift`` pixels. On the same tasks it also adapts them
with the checkpoint's own inner loop (no refinement). Reported, paired over the tasks with
95 % CIs:

* ``refined``: its accuracy and its architecture adaptation gain (minus alphas frozen at the
  meta-alphas, weights adapted as usual: the figure a meta-test reports);
* ``plain``: the same for the checkpoint's inner loop;
* ``refined`` minus ``plain``.

Writes ``alpha_refine.md`` and ``alpha_refine.csv`` to ``--out``::

    python benchmarks/alpha_refine.py --tasks 200 [--checkpoint path/to/best.ckpt]

The refinement changes nothing in meta-training here: the model is the one the checkpoint
holds. No wall-time budget is involved.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from architecture_value import RESULTS, load_supernet, meta_test_samplers, write_csv
from metanas.engines import TaskPool, default_workers
from metanas.evaluate import FROZEN, evaluate, mean_ci95, predict_query
from metanas.functional import accuracy
from metanas.inner import adapt
from metanas.io import atomic_write_text

log = logging.getLogger("alpha_refine")
FIELDS = ["dataset", "comparison", "mean", "ci95", "n_tasks", "refine_steps", "refine_lr", "shift", "checkpoint"]
PLAIN = "plain_accuracy"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="meta-model checkpoint (default: the bundled model)")
    p.add_argument("--tasks", type=int, default=200, help="test tasks per dataset")
    p.add_argument("--refine-steps", type=int, default=10)
    p.add_argument("--refine-lr", type=float, default=0.1)
    p.add_argument("--shift", type=int, default=2)
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", nargs="*", default=["omniglot", "shapes"])
    p.add_argument("--workdir", default="outputs/architecture_value", help="where the shapes folder lives")
    p.add_argument("--out", default=str(RESULTS / "alpha_refine"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    model, shown = load_supernet(args.checkpoint, "refine")
    refined = replace(model.inner, alpha_refine_steps=args.refine_steps, alpha_refine_lr=args.refine_lr,
                      alpha_refine_shift=args.shift)
    pool = TaskPool(model.net, default_workers("cpu"))

    def plain(replica, task, adapted, genotype):  # the checkpoint's own inner loop, same task
        other = adapt(replica, model.weights, model.alphas, task.support_x, task.support_y, model.inner,
                      rates=model.rates)
        with torch.no_grad():
            return {PLAIN: float(accuracy(predict_query(replica, other, task), task.query_y))}

    rows = []
    for dataset, sampler in meta_test_samplers(Path(args.workdir), args.k_shot).items():
        if dataset not in args.datasets:
            continue
        res = evaluate(model.net, model.weights, model.alphas, sampler, "test", args.tasks, refined, model.space,
                       np.random.default_rng([args.seed, 7]), pool=pool, extra=plain, compare_frozen=True,
                       rates=model.rates)
        acc, frozen, base = res.accuracies, res.extras[FROZEN], res.extras[PLAIN]
        figures = {
            "refined accuracy": mean_ci95(acc),
            "refined minus frozen alphas (architecture adaptation gain)": res.architecture_gain(),
            "plain accuracy": mean_ci95(base),
            "plain minus frozen alphas": mean_ci95([b - f for b, f in zip(base, frozen)]),
            "refined minus plain": mean_ci95([a - b for a, b in zip(acc, base)]),
            "frozen-alpha accuracy": mean_ci95(frozen),
        }
        for comparison, (mean, ci) in figures.items():
            log.info("%s %s: %.2f +- %.2f %s", dataset, comparison, 100 * mean, 100 * ci,
                     "points" if "minus" in comparison else "%")
            rows.append({"dataset": dataset, "comparison": comparison, "mean": mean, "ci95": ci,
                         "n_tasks": res.n_tasks, "refine_steps": args.refine_steps, "refine_lr": args.refine_lr,
                         "shift": args.shift, "checkpoint": shown})
    pool.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "alpha_refine.csv", rows, FIELDS)
    lines = ["# Architecture adaptation gain of the alpha refinement", "",
             f"Model: `{shown}`, meta-tested as `metanas-train` does ({args.k_shot}-shot 5-way, 15 queries per "
             f"class, {args.tasks} test tasks per dataset, task seed {args.seed}). `refined`: its inner loop plus "
             f"`inner.alpha_refine_steps={args.refine_steps} inner.alpha_refine_lr={args.refine_lr:g} "
             f"inner.alpha_refine_shift={args.shift}`; `plain`: its inner loop as it is; `frozen alphas`: weights "
             "adapted as usual, alphas kept at the meta-alphas (no refinement). Percentages and percentage "
             "points, paired over the same tasks, 95 % CI.", "",
             "| dataset | figure | value |", "| --- | --- | --- |"]
    lines += [f"| {r['dataset']} | {r['comparison']} | {100 * r['mean']:+.2f} +- {100 * r['ci95']:.2f} |"
              if "minus" in r["comparison"] else
              f"| {r['dataset']} | {r['comparison']} | {100 * r['mean']:.2f} +- {100 * r['ci95']:.2f} % |"
              for r in rows]
    atomic_write_text(out / "alpha_refine.md", "\n".join(lines) + "\n")
    log.info("wrote %s", out / "alpha_refine.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
