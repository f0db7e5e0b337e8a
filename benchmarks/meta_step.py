"""Meta-step and meta-test benchmark: the reference structure against every engine of metanas.

One meta-step of Reptile, first-order MAML and second-order MAML, and one meta-test
adaptation of a meta-batch of tasks, on two supernet sizes (``small``: the default CPU preset;
``metanas``: 4 cells, 3 nodes, 7 few-shot ops, 28 channels), with and without soft pruning,
for several meta-batch sizes. Variants:

- ``reference``: the MetaNAS reference structure (``benchmarks/reference.py``): a deep copy of
  the meta-model per task trained with ``torch.optim``; every op computed. For second-order
  MAML, which deep copies cannot express, the baseline is ``loop``.
- ``loop``: metanas's pure functional adaptation, one task after the other, every op computed.
  ``reference``, ``loop`` and ``vmap`` use ``--intra-op-threads`` torch threads (default 1).
- ``before``: the previous default: tasks on a thread pool (one thread per core), every op
  computed, NCHW pools.
- ``vmap``: the tasks of the meta-batch vectorised with ``torch.func.vmap``.
- ``default``: what ``batching: auto`` runs on this device, with the supernet's fast paths
  (pruned ops skipped, channels-last pools on CPU): threads on CPU, vmap on CUDA.

Every variant runs in its own forked process (so its peak memory is its own) and the
repetitions are interleaved across variants (background load hits all of them alike).
Reported: median wall time, tasks per second, peak memory, FLOPs of one meta-step (matmuls
and convolutions, forward and backward, :mod:`metanas.flops`), achieved GFLOP/s and its share
of the machine's measured matmul peak. Peak memory on CPU is the growth of the process's
peak resident set (``VmHWM``) over its resident set after setup; on CUDA it is
``torch.cuda.max_memory_allocated`` over the allocation after setup.

    python benchmarks/meta_step.py                    # the full table (~20 min on 2 busy cores)
    python benchmarks/meta_step.py --quick            # small preset only, a minute
    python benchmarks/meta_step.py --device cuda --presets metanas --meta-batch 4 16 32

Outputs ``benchmarks/results/meta_step_<device>.{csv,md,png}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import multiprocessing as mp
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PRESETS = {
    "small": {"channels": 8, "n_cells": 3, "n_nodes": 2, "stem_multiplier": 2, "reduction_cells": (0, 1)},
    "metanas": {"channels": 28, "n_cells": 4, "n_nodes": 3, "stem_multiplier": 3, "reduction_cells": None},
}
ALGOS = ("reptile", "fomaml", "maml", "metatest")
VARIANTS = ("reference", "loop", "before", "vmap", "default")
PRUNE_THRESHOLD = 0.1  # with N(0, 1) alphas about half of the 7 ops of an edge are pruned


@dataclasses.dataclass(frozen=True)
class Cell:
    preset: str
    pruning: bool
    meta_batch: int
    algo: str


@dataclasses.dataclass(frozen=True)
class Spec:
    cell: Cell
    variant: str
    device: str
    steps: int
    n_way: int
    k_shot: int
    q_query: int
    count_flops: bool
    intra_op_threads: int


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _variants(algo: str) -> list[str]:
    if algo == "maml":
        return [v for v in VARIANTS if v != "reference"]
    if algo == "metatest":
        return [v for v in VARIANTS if v != "vmap"]
    return list(VARIANTS)


def _baselines(algo: str) -> tuple[str, ...]:
    """The baseline of a cell is the faster of these (median)."""
    return ("loop",) if algo == "maml" else ("reference",)


# ------------------------------------------------------------------ child process side
def _make_step(spec: Spec):
    """Build everything for one variant; returns ``(step, flops_fn)``."""
    from metanas.tasks import Task
    from reference import Bundled, plain_ops, reference_adapt, reference_meta_step

    from metanas.algorithms import FOMAML, MAML, Reptile
    from metanas.evaluate import predict_query  # noqa: F401  (import cost outside the timing)
    from metanas.inner import InnerLoopConfig, adapt, predict
    from metanas.engines import TaskPool, default_workers
    from metanas.search_space import SearchNetwork, SearchSpaceConfig, init_alphas

    cell, device = spec.cell, torch.device(spec.device)
    space = SearchSpaceConfig(
        in_channels=1, n_classes=spec.n_way, ops="fewshot",
        prune_threshold=PRUNE_THRESHOLD if cell.pruning else 0.0, **PRESETS[cell.preset],
    )
    torch.manual_seed(0)
    net = SearchNetwork(space).to(device)
    g = torch.Generator().manual_seed(1)
    scale = 1.0 if cell.pruning else 1e-3
    alphas = {k: (v * (scale / 1e-3)).to(device) for k, v in init_alphas(space, generator=g).items()}

    def task(i: int) -> Task:
        tg = torch.Generator().manual_seed(100 + i)

        def block(k):
            y = torch.arange(spec.n_way).repeat_interleave(k)
            x = torch.randn(spec.n_way * k, 1, 28, 28, generator=tg) + 0.5 * y.view(-1, 1, 1, 1)
            return x.to(device), y.to(device)

        (sx, sy), (qx, qy) = block(spec.k_shot), block(spec.q_query)
        return Task(sx, sy, qx, qy, tuple(range(spec.n_way)))

    tasks = [task(i) for i in range(cell.meta_batch)]
    inner = InnerLoopConfig(steps=spec.steps, lr_weights=0.1, lr_alphas=0.1)
    weights = dict(net.named_parameters())
    meta_alphas = {k: v.clone().requires_grad_(True) for k, v in alphas.items()}

    variant = spec.variant
    if variant in ("reference", "loop", "before"):
        plain_ops(net)
    if variant in ("reference", "loop", "vmap"):
        torch.set_num_threads(spec.intra_op_threads)
        pool = TaskPool(net, 1)
    else:  # before / default: threads like metanas-train sets them
        workers = default_workers(device)
        pool = TaskPool(net, workers)
        torch.set_num_threads(max(1, _cores() // workers))
    batching = {"loop": "loop", "before": "threads", "vmap": "vmap", "default": "auto"}.get(variant)

    if cell.algo == "metatest":
        if variant == "reference":
            model = Bundled(net, alphas)

            def step():
                return [reference_adapt(model, t, inner) for t in tasks]
        else:
            w0 = {k: v.detach() for k, v in weights.items()}
            a0 = {k: v.detach() for k, v in alphas.items()}

            def one(replica, t):
                adapted = adapt(replica, w0, a0, t.support_x, t.support_y, inner)
                with torch.no_grad():
                    return predict(replica, adapted, t.query_x).argmax(-1)

            p = pool

            def step():
                return p.map(one, tasks)
        flop_step = step if variant != "default" else (lambda: [one(net, t) for t in tasks])
        return step, flop_step, pool

    if variant == "reference":
        model = Bundled(net, alphas)

        def step():
            return reference_meta_step(model, tasks, inner, cell.algo)
        return step, step, pool

    algo_cls = {"reptile": Reptile, "fomaml": FOMAML, "maml": MAML}[cell.algo]
    algo = algo_cls(batching=batching)
    loop_algo = algo_cls(batching="loop")

    def step():
        return algo.meta_gradients(net, weights, meta_alphas, tasks, inner, pool=pool)

    def flop_step():
        if variant == "vmap":  # vmap computes every op: count the same work on the plain loop
            skip = net.skip_pruned_ops
            net.skip_pruned_ops = False
            try:
                return loop_algo.meta_gradients(net, weights, meta_alphas, tasks, inner)
            finally:
                net.skip_pruned_ops = skip
        return loop_algo.meta_gradients(net, weights, meta_alphas, tasks, inner)

    return step, flop_step, pool


def _child(conn, spec: Spec) -> None:
    from metanas.flops import count_flops, synchronize

    try:
        step, flop_step, pool = _make_step(spec)
        device = torch.device(spec.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = _status_kb("VmRSS") * 1024
        step()  # warm-up (allocations, thread start-up, vmap tracing)
        conn.send("ready")
        while True:
            cmd = conn.recv()
            if cmd == "run":
                synchronize(device)
                start = time.perf_counter()
                step()
                synchronize(device)
                conn.send(time.perf_counter() - start)
            else:
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) - base
                else:
                    peak = _status_kb("VmHWM") * 1024 - base
                flops = None
                if spec.count_flops:
                    n = torch.get_num_threads()
                    torch.set_num_threads(1)
                    flops = count_flops(flop_step)
                    torch.set_num_threads(n)
                pool.close()
                conn.send({"peak_bytes": peak, "flops": flops})
                return
    except Exception as exc:  # noqa: BLE001  report the failure instead of hanging the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})


def _peak_child(conn, device: str) -> None:
    from metanas.flops import matmul_peak_gflops

    torch.set_num_threads(_cores())
    n = 4096 if device.startswith("cuda") else 2048
    conn.send(matmul_peak_gflops(device, n=n, repeats=10))


# ------------------------------------------------------------------ parent side
def _fork(ctx, target, *args):
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    return proc, parent


def run_cell(ctx, cell: Cell, args, device: str) -> list[dict]:
    variants = [v for v in _variants(cell.algo) if v in args.variants]
    counted = {"loop", "default"}
    children = {}
    for v in variants:
        spec = Spec(cell, v, device, args.steps_of[cell.preset], args.n_way, args.k_shot, args.q_query,
                    v in counted, args.intra_op_threads)
        children[v] = _fork(ctx, _child, spec)
    failed = {}
    for v, (_, conn) in children.items():
        msg = conn.recv()
        if msg != "ready":
            failed[v] = msg["error"]
    times = {v: [] for v in variants if v not in failed}
    for _ in range(args.reps):
        for v, record in times.items():
            conn = children[v][1]
            conn.send("run")
            record.append(conn.recv())
    info = {}
    for v in times:
        conn = children[v][1]
        conn.send("stop")
        info[v] = conn.recv()
    for proc, _ in children.values():
        proc.join(timeout=60)
    rows = []
    for v in variants:
        if v in failed:
            print(f"  {v}: FAILED {failed[v]}", file=sys.stderr)
            continue
        flops = info[v]["flops"]
        if flops is None:  # the same arithmetic as the plain loop
            flops = info.get("loop", {}).get("flops")
        med = statistics.median(times[v])
        rows.append({
            "preset": cell.preset, "pruning": cell.pruning, "meta_batch": cell.meta_batch,
            "algo": cell.algo, "variant": v, "median_s": med, "tasks_per_s": cell.meta_batch / med,
            "peak_mem_mb": info[v]["peak_bytes"] / 2**20, "gflop": (flops or 0) / 1e9,
            "times": ";".join(f"{t:.4f}" for t in times[v]),
        })
    ref = {r["variant"]: r["median_s"] for r in rows}
    base = min((v for v in _baselines(cell.algo) if v in ref), key=ref.get, default=None)
    for r in rows:
        r["speedup_vs_baseline"] = ref[base] / r["median_s"] if base else float("nan")
        r["speedup_vs_before"] = ref.get("before", float("nan")) / r["median_s"]
        r["baseline"] = base
    return rows


def write_outputs(rows: list[dict], peak: float, out: Path, header: str) -> None:
    for r in rows:
        r["gflops"] = r["gflop"] / r["median_s"]
        r["pct_of_peak"] = 100 * r["gflops"] / peak
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["preset", "pruning", "meta_batch", "algo", "variant", "baseline", "median_s",
              "tasks_per_s", "peak_mem_mb", "gflop", "gflops", "pct_of_peak",
              "speedup_vs_baseline", "speedup_vs_before", "times"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4g}" if isinstance(r[k], float) else r[k]) for k in fields})
    lines = [header, "", f"Measured matmul peak: {peak:.1f} GFLOP/s.", "",
             ("| preset | pruning | meta-batch | algorithm | variant | median s | tasks/s | "
              "peak MiB | GFLOP | GFLOP/s | % peak | x baseline | x before |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {'on' if r['pruning'] else 'off'} | {r['meta_batch']} | {r['algo']} | "
            f"{r['variant']} | {r['median_s']:.3f} | {r['tasks_per_s']:.2f} | {r['peak_mem_mb']:.0f} | "
            f"{r['gflop']:.2f} | {r['gflops']:.1f} | {r['pct_of_peak']:.1f} | "
            f"{r['speedup_vs_baseline']:.2f} | {r['speedup_vs_before']:.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cells = sorted({(r["preset"], r["pruning"], r["meta_batch"], r["algo"]) for r in rows},
                   key=lambda c: (c[0], c[1], c[2], ALGOS.index(c[3])))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(cells)), 4.5))
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        xs, ys = [], []
        for j, c in enumerate(cells):
            for r in rows:
                if (r["preset"], r["pruning"], r["meta_batch"], r["algo"]) == c and r["variant"] == v:
                    xs.append(j + (i - len(VARIANTS) / 2 + 0.5) * width)
                    ys.append(r["speedup_vs_baseline"])
        ax.bar(xs, ys, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{p}\n{'pruned' if pr else 'dense'} T={t}\n{a}" for p, pr, t, a in cells],
                       fontsize=7)
    ax.set_ylabel("speed-up over the baseline (higher is better)")
    ax.set_title("\n".join(textwrap.wrap(header, 110)), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--presets", nargs="+", default=["small", "metanas"], choices=sorted(PRESETS))
    parser.add_argument("--meta-batch", nargs="+", type=int, default=None,
                        help="meta-batch sizes (default: 2 4 on small, 2 on metanas)")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--pruning", nargs="+", default=None, choices=["off", "on"],
                        help="soft pruning scenarios (default: off on small, off and on on metanas)")
    parser.add_argument("--steps", type=int, default=None,
                        help="inner steps (default: 3 on small, 1 on metanas)")
    parser.add_argument("--intra-op-threads", type=int, default=1,
                        help="torch threads of the reference, loop and vmap variants (default 1: on a "
                        "shared machine several OpenMP threads per kernel are many times slower)")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--q-query", type=int, default=2, help="query images per class")
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--quick", action="store_true", help="small preset, T=2, 2 reps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.presets, args.meta_batch, args.reps, args.pruning = ["small"], [2], 2, ["off"]
    args.steps_of = {p: args.steps or (3 if p == "small" else 1) for p in PRESETS}
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # fork before the parent runs any torch kernel (OpenMP thread pools do not survive fork);
    # CUDA cannot be initialised in a forked child of a CUDA parent, and the parent never uses it
    ctx = mp.get_context("fork" if device == "cpu" else "spawn")
    out = args.out or Path(__file__).resolve().parent / "results" / f"meta_step_{torch.device(device).type}"

    proc, conn = _fork(ctx, _peak_child, device)
    peak = conn.recv()
    proc.join()
    print(f"matmul peak on {device} with {_cores()} threads: {peak:.1f} GFLOP/s", flush=True)
    started = time.perf_counter()
    rows = []
    for preset in args.presets:
        batches = args.meta_batch or ([2, 4] if preset == "small" else [2])
        prunings = args.pruning or (["off"] if preset == "small" else ["off", "on"])
        for pruning in prunings:
            for mb in batches:
                for algo in args.algos:
                    cell = Cell(preset, pruning == "on", mb, algo)
                    t0 = time.perf_counter()
                    new = run_cell(ctx, cell, args, device)
                    rows += new
                    summary = ", ".join(f"{r['variant']} {r['median_s']:.3f}s" for r in new)
                    print(f"{preset} pruning={pruning} T={mb} {algo}: {summary} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    header = (f"Meta-step benchmark on {device} ({_cores()} cores), {args.n_way}-way {args.k_shot}-shot, "
              f"{args.q_query} query/class, inner SGD steps {args.steps_of}, {args.reps} interleaved reps, "
              f"{args.intra_op_threads} intra-op thread(s) for reference/loop/vmap, "
              f"torch {torch.__version__}")
    write_outputs(rows, peak, out, header)
    print(f"wrote {out}.csv/.md/.png in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
