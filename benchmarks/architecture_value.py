"""What the learned architecture is worth: an ablation at equal meta-training wall time.

For every wall-time budget and seed, ``metanas-train`` meta-trains on Omniglot (5-way
``--k-shot``-shot, Lake's background/evaluation split) under ``trainer.time_budget_min``:

* ``learned``: the recipe (``--recipe``: overrides of ``metanas-train``; default: its
  defaults), weights and alphas meta-learned; meta-tested with the alphas adapted on every
  task, and again on the very same tasks with the alphas frozen at the meta-alphas
  (``frozen``, weights still adapted);
* ``uniform``: the same supernet and recipe with the alphas never learned (inner and meta
  learning rates of the alphas 0, and the alpha warm-up lasting the whole run, so that under
  Meta-SGD their learned inner rates also rest at 0 and no alpha gradient is computed; they
  stay at their ``1e-3 * randn`` initialisation, so every op weight is uniform to within about
  0.1 %): weight sharing alone;
* ``conv4``: conv-4 with as many weights as the supernet (``model=conv4
  model.match_parameters=supernet``), meta-trained the same way;
* ``genotype``: the discrete network of the ``learned`` run's meta-genotype, meta-trained
  from scratch the same way (``model=genotype``: "retrain the found cell"), for a budget of
  its own (the search is not charged to it);
* ``search_retrain``: the whole NAS pipeline within the one budget: the recipe's supernet
  meta-trained for ``--search-fraction`` of it, then its meta-genotype meta-trained from
  scratch for the rest (meta-steps and wall time are the two stages' sums).

Every model of a (budget, seed) is then meta-tested on the same ``--tasks`` Omniglot test
tasks and the same cross-domain tasks (drawn shapes, :func:`metanas.tasks.synthetic.
make_shapes_folder`, never seen in meta-training), with the recipe's inner loop. Comparisons
are paired on those tasks: the mean per-task difference ``learned - other`` and its 95 % CI.

Writes ``architecture_value.csv`` (one row per budget, seed, model and dataset; rows of
earlier runs with other budgets or seeds are kept, so budgets can be run one at a time),
``architecture_value.md`` and ``architecture_value.png`` (accuracy against meta-training wall
time) into ``--out``::

    python benchmarks/architecture_value.py --budgets 5 10 --seeds 0 [--tasks 600] \\
        [--recipe "inner.lr_alphas=0.5 optim.alphas.lr=0.01"]

Run it on an otherwise idle machine: the budgets are wall time. Each run's directory is kept
under ``--workdir`` (metrics, checkpoints, logs).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metanas.adaptation import load_meta_model
from metanas.engines import TaskPool, default_workers, share_cores
from metanas.evaluate import FROZEN, evaluate, mean_ci95
from metanas.flops import count_flops
from metanas.functional import forward
from metanas.io import atomic_write_text
from metanas.tasks import OmniglotTasks
from metanas.tasks.image_folder import ImageFolderTasks
from metanas.tasks.synthetic import make_shapes_folder

log = logging.getLogger("architecture_value")
RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("learned", "frozen", "uniform", "conv4", "genotype", "search_retrain")
TRAINED = {  # model -> extra metanas-train overrides (on top of the recipe); "frozen" is learned's
    "learned": [],
    "uniform": ["inner.lr_alphas=0", "optim.alphas.lr=0"],
    "conv4": ["model=conv4", "model.match_parameters=supernet"],
    "genotype": ["model=genotype"],  # + model.path=<learned run>/genotype.json
    "search_retrain": ["model=genotype"],  # + model.path=<its own search run>/genotype.json
}
FIELDS = ["budget_min", "seed", "model", "dataset", "accuracy", "ci95", "n_tasks", "meta_steps",
          "train_time_s", "parameters", "mflops_per_image", "diff_vs_learned", "diff_ci95",
          "recipe"]


def _train(name: str, overrides: list[str], run_dir: Path) -> dict:
    """One ``metanas-train`` run in its own process; its metrics.json."""
    cmd = [sys.executable, "-m", "metanas.cli", *overrides, f"hydra.run.dir={run_dir}"]
    log.info("%s: %s", name, shlex.join(cmd[2:]))
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: metanas-train failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log.info("%s: %d meta-steps in %.0f s of training (%.0f s in all)", name, metrics["meta_steps"],
             metrics["train_time_s"], time.perf_counter() - started)
    return metrics


def _two_stages(search: dict, retrain: dict) -> dict:
    """The retrained network's metrics with the search's meta-steps and time added."""
    return {**retrain, "meta_steps": search["meta_steps"] + retrain["meta_steps"],
            "train_time_s": search["train_time_s"] + retrain["train_time_s"]}


def _mflops(model, input_shape: tuple[int, ...]) -> float:
    """Forward MFLOPs per image of a meta-trained model (supernet: every op of every edge)."""
    x = torch.zeros(2, *input_shape)
    with torch.no_grad():
        total = count_flops(lambda: forward(model.net, model.weights, model.alphas, x))
    return total / 2 / 1e6


def _paired(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float]:
    return mean_ci95([x - y for x, y in zip(a, b)])


def points(x: float | str, ci: float | str) -> str:
    """A paired difference in percentage points with its CI (``-`` when there is none)."""
    x, ci = float(x), float(ci)
    return "-" if math.isnan(x) else f"{100 * x:+.2f} +- {100 * ci:.2f}"


def load_supernet(checkpoint: str | None, what: str):
    """The meta-model of ``checkpoint`` (None: the bundled one) and its path as results record
    it: relative to the working directory where it lies under it, so no machine's paths are
    committed. Exits with a message when the network has no alphas (nothing to ``what``)."""
    from metanas.pretrained import default_checkpoint

    path = Path(checkpoint) if checkpoint else default_checkpoint()
    model = load_meta_model(path)
    if not model.alphas:
        raise SystemExit(f"{path} has no alphas (a conv-4 or genotype network): nothing to {what}")
    try:
        shown = str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(path)
    return model, shown


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Write ``rows`` as a CSV file atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def meta_test_samplers(workdir: Path, k_shot: int) -> dict:
    """The meta-test task distributions: Omniglot's test split and the drawn shapes (made once
    under ``workdir``), 5-way ``k_shot``-shot with 15 queries per class."""
    shapes_root = workdir / "shapes"
    if not shapes_root.is_dir():
        make_shapes_folder(shapes_root, n_classes=20, n_images=20, seed=0)
    return {
        "omniglot": OmniglotTasks(n_way=5, k_shot=k_shot, q_query=15),
        "shapes": ImageFolderTasks(shapes_root, n_way=5, k_shot=k_shot, q_query=15,
                                   image_size=28, channels=1, split_fractions=[0, 0, 1]),
    }


def run_budget(budget: float, seed: int, args, samplers: dict, rows: list[dict]) -> None:
    recipe = shlex.split(args.recipe)
    common = [*recipe, f"seed={seed}", f"trainer.meta_steps={args.max_steps}", "trainer.val_every=0",
              "trainer.n_test_tasks=1", "trainer.compare_frozen_alphas=false", "trainer.ckpt_every=0",
              "trainer.progress=false", "logger.curves=false", f"task.k_shot={args.k_shot}"]
    base = Path(args.workdir) / f"budget{budget:g}_seed{seed}"
    metrics: dict[str, dict] = {}
    for name, extra in TRAINED.items():
        if name not in args.models:
            continue
        if name == "genotype":
            extra = [*extra, f"model.path={base / 'learned' / 'genotype.json'}"]
        if name == "uniform":  # Meta-SGD would meta-learn the alphas' inner rates away from 0
            extra = [*extra, f"trainer.alpha_warmup_steps={args.max_steps}"]
        done = base / name / "metrics.json"
        if args.reuse and done.is_file():  # a finished run of an earlier call: meta-test it again
            metrics[name] = json.loads(done.read_text())
            if name == "search_retrain":
                metrics[name] = _two_stages(json.loads((base / "search" / "metrics.json").read_text()),
                                            metrics[name])
            log.info("%s: reusing %s (%d meta-steps)", name, base / name, metrics[name]["meta_steps"])
            continue
        what = f"{name} ({budget:g} min, seed {seed})"
        if name == "search_retrain":  # stage 1: the supernet for a fraction of the budget
            split = args.search_fraction * budget
            search = _train(f"{what}, search", [*common, f"trainer.time_budget_min={split:g}"], base / "search")
            retrain = _train(f"{what}, retrain", [*common, f"trainer.time_budget_min={budget - split:g}", *extra,
                                                  f"model.path={base / 'search' / 'genotype.json'}"], base / name)
            metrics[name] = _two_stages(search, retrain)
            continue
        metrics[name] = _train(what, [*common, f"trainer.time_budget_min={budget}", *extra], base / name)

    results: dict[tuple[str, str], tuple] = {}
    for name in metrics:
        model = load_meta_model(base / name / "checkpoints" / "last.ckpt")
        pool = TaskPool(model.net, default_workers("cpu"))
        for dataset, sampler in samplers.items():
            res = evaluate(model.net, model.weights, model.alphas, sampler, "test", args.tasks,
                           model.inner, model.space, np.random.default_rng([seed, 7]), pool=pool,
                           compare_frozen=name == "learned", rates=model.rates)
            log.info("%s on %s: %s", name, dataset, res.summary())
            results[name, dataset] = res.accuracies
            if name == "learned":
                results["frozen", dataset] = res.extras[FROZEN]
        pool.close()
        metrics[name]["mflops_per_image"] = _mflops(model, tuple(samplers["omniglot"].input_shape))
    metrics["frozen"] = metrics.get("learned", {})

    for (name, dataset), accs in results.items():
        mean, ci = mean_ci95(accs)
        diff, dci = (_paired(results["learned", dataset], accs)
                     if name != "learned" and ("learned", dataset) in results else (math.nan, math.nan))
        m = metrics[name]
        rows.append({"budget_min": budget, "seed": seed, "model": name, "dataset": dataset,
                     "accuracy": mean, "ci95": ci, "n_tasks": len(accs), "meta_steps": m["meta_steps"],
                     "train_time_s": round(m["train_time_s"], 1), "parameters": m["parameters"],
                     "mflops_per_image": round(m["mflops_per_image"], 2), "diff_vs_learned": diff,
                     "diff_ci95": dci, "recipe": args.recipe})


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("budget_min", "accuracy", "ci95", "train_time_s", "mflops_per_image",
                  "diff_vs_learned", "diff_ci95"):
            r[k] = float(r[k])
        for k in ("seed", "n_tasks", "meta_steps", "parameters"):
            r[k] = int(float(r[k]))
    return rows


def _write(rows: list[dict], out: Path, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["dataset"], r["budget_min"], r["seed"], MODELS.index(r["model"])))
    write_csv(out / "architecture_value.csv", rows, FIELDS)

    lines = [f"# What the learned architecture is worth (Omniglot 5-way {settings['k_shot']}-shot)", "",
             f"Recipe: `metanas-train {settings['recipe'] or '(defaults)'}`; every model meta-trained "
             "for the same wall-time budget on this machine (`trainer.time_budget_min`), then "
             f"meta-tested on the same {settings['tasks']} tasks per dataset. `diff` is the paired "
             "per-task difference `learned - model` with its 95 % CI (positive: the learned, "
             "adapted architecture is better). Machine: " + settings["machine"] + ".", ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        lines += [f"## {dataset}", "",
                  "| budget (min) | seed | model | accuracy (%) | diff vs learned (points) | meta-steps "
                  "| parameters | MFLOPs/image |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            if r["dataset"] == dataset:
                lines.append(f"| {r['budget_min']:g} | {r['seed']} | {r['model']} | "
                             f"{100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f} | "
                             f"{points(r['diff_vs_learned'], r['diff_ci95'])} | {r['meta_steps']} | "
                             f"{r['parameters']:,} | {r['mflops_per_image']:.2f} |")
        lines.append("")
    atomic_write_text(out / "architecture_value.md", "\n".join(lines))
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for i, name in enumerate(MODELS):
            pts = sorted({r["budget_min"] for r in rows if r["dataset"] == dataset and r["model"] == name})
            if not pts:
                continue
            mean = [np.mean([r["accuracy"] for r in rows if r["dataset"] == dataset
                             and r["model"] == name and r["budget_min"] == b]) for b in pts]
            ax.plot(pts, [100 * m for m in mean], "o-", color=f"C{i}", label=name)
        ax.set(xlabel="meta-training wall time (min)", ylabel="meta-test accuracy (%)", title=dataset)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "architecture_value.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[5.0, 10.0],
                        help="meta-training wall-time budgets in minutes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tasks", type=int, default=600, help="meta-test tasks per dataset")
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--recipe", default="", help="metanas-train overrides of the recipe")
    parser.add_argument("--models", nargs="+", default=list(TRAINED), choices=list(TRAINED))
    parser.add_argument("--search-fraction", type=float, default=0.3,
                        help="share of the budget that search_retrain spends on the supernet")
    parser.add_argument("--max-steps", type=int, default=100000,
                        help="trainer.meta_steps (the budget normally ends training first)")
    parser.add_argument("--workdir", default="outputs/architecture_value")
    parser.add_argument("--reuse", action="store_true",
                        help="meta-test the finished runs already in --workdir instead of retraining them")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--machine", default=f"{os.cpu_count()} CPU cores, idle")
    args = parser.parse_args()
    if "genotype" in args.models and "learned" not in args.models:
        parser.error("--models genotype needs learned (it retrains the learned run's genotype)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    share_cores(default_workers("cpu"), "cpu")  # one intra-op thread per task thread

    samplers = meta_test_samplers(Path(args.workdir), args.k_shot)
    out = Path(args.out)
    keep = [r for r in _read_rows(out / "architecture_value.csv")
            if (r["budget_min"], r["seed"]) not in {(b, s) for b in args.budgets for s in args.seeds}]
    rows: list[dict] = []
    for budget in args.budgets:
        for seed in args.seeds:
            run_budget(budget, seed, args, samplers, rows)
            _write(keep + rows, out, {"recipe": args.recipe, "tasks": args.tasks, "k_shot": args.k_shot,
                                      "machine": args.machine})


if __name__ == "__main__":
    main()
