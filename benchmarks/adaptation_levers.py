"""Which lever makes per-task architecture adaptation pay: the architecture adaptation gain per recipe.

The architecture adaptation gain is the paired per-task accuracy difference between adapting
a new task's weights *and* alphas and adapting its weights alone with the alphas frozen at the
meta-alphas. For every lever (``metanas-train`` overrides added to ``--recipe``; default:
``inner=sgd optim.alphas.lr=0.05``, fixed inner rates, Adam alpha steps and the alphas' meta
learning rate of then: ``metanas-train``'s defaults when the committed results were measured,
before the ``meta_sgd`` lever and an alpha meta learning rate of 0.2 became the default), one run
meta-trains on Omniglot for ``--budget`` minutes of wall time (``trainer.time_budget_min``),
and its meta-model is meta-tested on ``--tasks`` Omniglot
test tasks and as many drawn-shapes tasks (never seen in meta-training), each task adapted both
ways. The tasks are drawn exactly as in ``architecture_value.py`` (same task seed), so a lever's
run is tested on the tasks of that script's ``learned`` run of the same seed and shot.

Levers (``LEVERS``): ``default`` (the recipe alone), ``maml`` (second-order MAML: the only
outer loop whose meta-gradient rewards meta-alphas for what their adaptation does),
``meta_sgd`` (Meta-SGD rates learned for every weight and alpha, SGD inner steps on both,
the alphas' starting at 1.0), ``maml_meta_sgd`` (the two together, as Li et al. meta-learn
the rates: second order),
``five_shot`` (5-way 5-shot tasks in training and test: more support signal for the alpha
steps), ``inner_anneal`` (temperature 1.0 -> 0.2 over the inner steps: each task's adapted
alphas read out near-discrete), ``alpha_lr_high`` (Adam inner alpha steps at 0.3 instead of
0.05) and ``entropy_support`` (an entropy penalty on every inner step: each task sharpens its
own alphas).

Writes ``adaptation_levers.csv`` (one row per lever and dataset; rows of levers not run in
this call are kept) and ``adaptation_levers.md`` into ``--out``::

    python benchmarks/adaptation_levers.py --budget 10 --seed 2 --tasks 100 [--levers maml meta_sgd]

Run it on an otherwise idle machine: the budget is wall time. Each run's directory is kept
under ``--workdir``; ``--reuse`` meta-tests finished runs found there instead of retraining.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shlex
from pathlib import Path

import numpy as np

from architecture_value import RESULTS, _train, points, meta_test_samplers, write_csv
from metanas.adaptation import load_meta_model
from metanas.engines import TaskPool, default_workers, share_cores
from metanas.evaluate import FROZEN, evaluate, mean_ci95
from metanas.io import atomic_write_text

log = logging.getLogger("adaptation_levers")
LEVERS = {  # lever -> metanas-train overrides on top of the recipe
    "default": [],
    "maml": ["algorithm=maml"],
    # SGD alpha steps at 1.0 move the alphas about as far as Adam's at 0.05 do; the rates' meta
    # learning rate of 5e-3 (1e-3 by default) lets them change within a 10-minute run
    "meta_sgd": ["inner.meta_sgd=true", "inner.optimizer_alphas=sgd", "inner.lr_alphas=1.0",
                 "optim.rates.lr=0.005"],
    # both at once: the second-order meta-gradient of Meta-SGD's own paper (Li et al. 2017)
    "maml_meta_sgd": ["algorithm=maml", "inner.meta_sgd=true", "inner.optimizer_alphas=sgd",
                      "inner.lr_alphas=1.0", "optim.rates.lr=0.005"],
    "five_shot": ["task.k_shot=5"],
    "inner_anneal": ["inner.temperature_end=0.2", "inner.temperature_schedule=linear"],
    "alpha_lr_high": ["inner.lr_alphas=0.3"],
    "entropy_support": ["inner.entropy_weight=0.01", "inner.entropy_objective=support"],
}
FIELDS = ["lever", "dataset", "k_shot", "accuracy", "ci95", "gain", "gain_ci95", "diff_vs_default",
          "diff_ci95", "n_tasks", "meta_steps", "train_time_s", "entropy_normal", "entropy_reduce",
          "max_weight_normal", "max_weight_reduce", "test_displacement", "overrides", "recipe", "seed",
          "budget_min"]


def _k_shot(overrides: list[str]) -> int:
    shots = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("task.k_shot=")]
    return shots[-1] if shots else 1


def _last_log_row(run: Path) -> dict[str, float]:
    with (run / "train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", None)}


def run_lever(name: str, args, accuracies: dict) -> list[dict]:
    """Meta-train (or reuse) one lever's run and meta-test it with and without alpha adaptation."""
    overrides = [*shlex.split(args.recipe), *LEVERS[name]]
    k_shot = _k_shot(overrides)
    run = Path(args.workdir) / f"budget{args.budget:g}_seed{args.seed}" / name
    if args.reuse and (run / "metrics.json").is_file():
        metrics = json.loads((run / "metrics.json").read_text())
        log.info("%s: reusing %s (%d meta-steps)", name, run, metrics["meta_steps"])
    else:
        common = [f"task.k_shot={k_shot}", f"seed={args.seed}", "trainer.meta_steps=100000", "trainer.val_every=0",
                  "trainer.n_test_tasks=1", "trainer.compare_frozen_alphas=false", "trainer.ckpt_every=0",
                  "trainer.progress=false", "logger.curves=false", f"trainer.time_budget_min={args.budget:g}"]
        metrics = _train(f"{name} ({args.budget:g} min, seed {args.seed})", [*common, *overrides], run)
    stats = _last_log_row(run)
    model = load_meta_model(run / "checkpoints" / "last.ckpt")
    pool = TaskPool(model.net, default_workers("cpu"))
    rows = []
    for dataset, sampler in meta_test_samplers(Path(args.workdir), k_shot).items():
        res = evaluate(model.net, model.weights, model.alphas, sampler, "test", args.tasks, model.inner,
                       model.space, np.random.default_rng([args.seed, 7]), pool=pool, compare_frozen=True,
                       rates=model.rates)
        gain, gain_ci = res.architecture_gain()
        accuracies[name, dataset] = (k_shot, res.accuracies)
        base = accuracies.get(("default", dataset))
        diff, dci = (mean_ci95([a - b for a, b in zip(res.accuracies, base[1])])
                     if base is not None and base[0] == k_shot and name != "default" else (math.nan, math.nan))
        log.info("%s on %s: %s; gain %+.2f +- %.2f", name, dataset, res.summary(), 100 * gain, 100 * gain_ci)
        rows.append({"lever": name, "dataset": dataset, "k_shot": k_shot, "accuracy": res.accuracy,
                     "ci95": res.ci95, "gain": gain, "gain_ci95": gain_ci, "diff_vs_default": diff,
                     "diff_ci95": dci, "n_tasks": res.n_tasks, "meta_steps": metrics["meta_steps"],
                     "train_time_s": round(metrics["train_time_s"], 1),
                     **{k: stats.get(k, math.nan) for k in ("entropy_normal", "entropy_reduce",
                                                            "max_weight_normal", "max_weight_reduce")},
                     "test_displacement": res.diversity.get("mean_alpha_displacement", math.nan),
                     "overrides": " ".join(LEVERS[name]), "recipe": args.recipe, "seed": args.seed,
                     "budget_min": args.budget})
    pool.close()
    return rows


def _write(rows: list[dict], out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["dataset"], list(LEVERS).index(r["lever"])))
    write_csv(out / "adaptation_levers.csv", rows, FIELDS)

    lines = ["# Levers for per-task architecture adaptation", "",
             f"Recipe: `metanas-train {args.recipe or '(defaults)'}` plus each lever's overrides; "
             f"{args.budget:g} minutes of meta-training on Omniglot (seed {args.seed}), then "
             f"{args.tasks} test tasks per dataset, each adapted with the alphas adapted and with them "
             "frozen at the meta-alphas. `gain`: adapted minus frozen, paired, 95 % CI (the architecture "
             "adaptation gain). `vs default`: the lever's accuracy minus the default's on the same tasks "
             "(same shot only). Entropy and largest op weight: the meta-alphas at the end of training, "
             "per cell kind (entropy relative to uniform). Displacement: mean L2 norm of the test tasks' "
             "alpha change. Machine: " + args.machine + ".", ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        lines += [f"## {dataset}", "",
                  "| lever | overrides | shot | accuracy (%) | gain (points) | vs default (points) | meta-steps "
                  "| entropy normal / reduce | max weight normal / reduce | displacement |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            if r["dataset"] == dataset:
                lines.append(
                    f"| {r['lever']} | `{r['overrides'] or '-'}` | {r['k_shot']} | "
                    f"{100 * float(r['accuracy']):.2f} +- {100 * float(r['ci95']):.2f} | "
                    f"{points(r['gain'], r['gain_ci95'])} | {points(r['diff_vs_default'], r['diff_ci95'])} | "
                    f"{r['meta_steps']} | {float(r['entropy_normal']):.2f} / {float(r['entropy_reduce']):.2f} | "
                    f"{float(r['max_weight_normal']):.2f} / {float(r['max_weight_reduce']):.2f} | "
                    f"{float(r['test_displacement']):.2f} |")
        lines.append("")
    atomic_write_text(out / "adaptation_levers.md", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--budget", type=float, default=10.0, help="meta-training minutes per lever")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=100, help="meta-test tasks per dataset")
    parser.add_argument("--recipe", default="inner=sgd optim.alphas.lr=0.05",
                        help="metanas-train overrides shared by every lever (default: the recipe the "
                             "committed results were measured with, inner=sgd optim.alphas.lr=0.05)")
    parser.add_argument("--workdir", default="outputs/adaptation_levers")
    parser.add_argument("--reuse", action="store_true",
                        help="meta-test the finished runs already in --workdir instead of retraining them")
    parser.add_argument("--out", default=str(RESULTS / "adaptation_levers"))
    parser.add_argument("--machine", default=f"{os.cpu_count()} CPU cores, idle")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    share_cores(default_workers("cpu"), "cpu")

    out = Path(args.out)
    kept: list[dict] = []
    if (out / "adaptation_levers.csv").is_file():
        with (out / "adaptation_levers.csv").open() as f:
            kept = [r for r in csv.DictReader(f) if r["lever"] not in args.levers]
    levers = ["default", *[n for n in args.levers if n != "default"]] if "default" in args.levers else args.levers
    accuracies: dict = {}
    rows: list[dict] = []
    for name in levers:
        rows += run_lever(name, args, accuracies)
        _write(kept + rows, out, args)


if __name__ == "__main__":
    main()
