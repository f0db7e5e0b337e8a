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

With ``--configs`` it measures MetaNAS's real configurations instead (MetaNAS's supernet rule,
its inner protocol of 5 epochs of 20-image mini-batches with Adam at lr 0.005 and temperature
1.0 -> 0.05, on both sides): Omniglot 5-way 15-shot, Omniglot 20-way 5-shot and a
miniImageNet-shaped 5-way 5-shot (84x84 RGB, synthetic images), Reptile and FOMAML against the
reference structure, and second-order MAML (metanas only). Every measurement (one meta-step)
runs in a fresh process, so its peak resident set is its own; the two sides alternate.

    python benchmarks/meta_step.py --configs all            # the full table
    python benchmarks/meta_step.py --configs all --quick    # tiny sizes: checks the script

Outputs ``benchmarks/results/meta_step_configs_<device>.{csv,md,png}`` (``_quick`` in quick mode).
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

# MetaNAS's supernet rule (conf/search_space/metanas.yaml): 4 cells, reductions at 1 and 3 without
# channel doubling, 3 nodes, 28 channels, its 7 few-shot ops
METANAS_NET = {"channels": 28, "n_cells": 4, "n_nodes": 3, "stem_multiplier": 3, "reduction_cells": (1, 3),
               "reduction_channel_scale": 1, "ops": "metanas"}
PRESETS = {
    "small": {"channels": 8, "n_cells": 3, "n_nodes": 2, "stem_multiplier": 2, "reduction_cells": (0, 1),
              "ops": "fewshot"},
    "metanas": METANAS_NET,
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
        in_channels=1, n_classes=spec.n_way,
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


# ------------------------------------------------------------------ MetaNAS's configurations
@dataclasses.dataclass(frozen=True)
class Config:
    """One of MetaNAS's task configurations (synthetic images of its shapes)."""

    n_way: int
    k_shot: int
    q_query: int
    in_channels: int
    size: int
    what: str


CONFIGS = {
    "omniglot_5w15s": Config(5, 15, 1, 1, 28, "MetaNAS's Omniglot meta-training: 5-way, 15 training shots"),
    "omniglot_20w5s": Config(20, 5, 1, 1, 28, "MetaNAS's Omniglot script: 20-way 5-shot"),
    "miniimagenet_5w5s": Config(5, 5, 1, 3, 84, "miniImageNet-shaped 5-way 5-shot, 84x84 RGB"),
}
CONFIG_ALGOS = ("reptile", "fomaml", "maml")
SIDES = ("reference", "metanas")
# --quick: the same code paths at tiny sizes (seconds): a 2-cell supernet under the same rule
QUICK_NET = {"channels": 4, "n_cells": 2, "n_nodes": 2, "stem_multiplier": 1, "reduction_cells": (1,),
             "reduction_channel_scale": 1, "ops": "metanas"}


@dataclasses.dataclass(frozen=True)
class Measurement:
    config: str
    algo: str
    side: str
    protocol: str
    meta_batch: int
    device: str
    quick: bool
    threads: int
    recompute: str = "none"
    epochs: int = 5


def _shape(m: Measurement) -> Config:
    c = CONFIGS[m.config]
    if m.quick:
        return dataclasses.replace(c, n_way=min(c.n_way, 3), k_shot=min(c.k_shot, 4), size=max(7, c.size // 4))
    return c


def _inner(protocol: str, quick: bool, epochs: int = 5):
    """The reference's protocol: ``epochs`` (MetaNAS: 5) epochs of 20-image mini-batches
    (``minibatch``), or as many whole-support steps (``full``); Adam at lr 0.005, temperature
    1.0 -> 0.05."""
    from metanas.inner import InnerLoopConfig

    batch = None if protocol == "full" else (4 if quick else 20)
    return InnerLoopConfig(steps=2 if quick else epochs, lr_weights=0.005, lr_alphas=0.005, optimizer="adam",
                           temperature_start=1.0, temperature_end=0.05, batch_size=batch)


def _config_setup(m: Measurement):
    """Network, alphas and the meta-batch of one measurement (seeded)."""
    from metanas.search_space import SearchNetwork, SearchSpaceConfig, init_alphas
    from metanas.tasks import Task

    c, device = _shape(m), torch.device(m.device)
    space = SearchSpaceConfig(in_channels=c.in_channels, n_classes=c.n_way, pairwise_input_alphas=True,
                              prune_threshold=0.01, **(QUICK_NET if m.quick else METANAS_NET))
    torch.manual_seed(0)
    net = SearchNetwork(space).to(device)
    alphas = {k: v.to(device) for k, v in init_alphas(space, generator=torch.Generator().manual_seed(0)).items()}
    tasks = []
    for i in range(m.meta_batch):
        g = torch.Generator().manual_seed(100 + i)

        def block(k):
            y = torch.arange(c.n_way).repeat_interleave(k)
            x = torch.rand(c.n_way * k, c.in_channels, c.size, c.size, generator=g)
            return x.to(device), y.to(device)

        (sx, sy), (qx, qy) = block(c.k_shot), block(c.q_query)
        tasks.append(Task(sx, sy, qx, qy, tuple(range(c.n_way))))
    return net, alphas, tasks


def _measure(conn, m: Measurement) -> None:
    """One measurement in a process of its own: one meta-step of ``m.meta_batch`` tasks."""
    from reference import Bundled, plain_ops, reference_meta_step

    from metanas.algorithms import FOMAML, MAML, Reptile
    from metanas.engines import TaskPool, default_workers
    from metanas.flops import synchronize
    from metanas.memory import GB, SAFETY_FRACTION, available_bytes, estimate_task_bytes

    try:
        device, c = torch.device(m.device), _shape(m)
        net, alphas, tasks = _config_setup(m)
        inner = _inner(m.protocol, m.quick, m.epochs)
        weights = dict(net.named_parameters())
        meta_alphas = {k: v.clone().requires_grad_(True) for k, v in alphas.items()}
        if m.side == "reference":
            torch.set_num_threads(m.threads)
            model = Bundled(plain_ops(net), alphas)

            def step():
                return reference_meta_step(model, tasks, inner, m.algo)
            pool = None
        else:  # metanas as metanas-train runs it: batching auto, a thread per core (or vmap on CUDA)
            workers = min(default_workers(device), m.meta_batch)
            torch.set_num_threads(m.threads)
            if m.recompute != "none":  # trainer.recompute_cells / trainer.recompute_edges
                setattr(net, f"recompute_{m.recompute}", True)
            pool = TaskPool(net, workers)
            algo = {"reptile": Reptile, "fomaml": FOMAML, "maml": MAML}[m.algo]()

            def step():
                return algo.meta_gradients(net, weights, meta_alphas, tasks, inner, pool=pool)
            if m.algo == "maml":  # do not push a shared machine into swap: estimate first
                need = estimate_task_bytes(net, weights, alphas, tasks[0], inner, second_order=True)
                free = available_bytes(device)
                if free is not None and need * min(workers, m.meta_batch) > SAFETY_FRACTION * free:
                    conn.send({"skipped": f"not run: estimated {need / GB:.1f} GiB per task, more than "
                               f"{SAFETY_FRACTION:g} of the {free / GB:.1f} GiB available"})
                    return
        # warm-up on a one-image-per-class task, one step: lazy initialisation (optimiser and
        # dispatcher set-up, thread start) is not timed; it needs far less memory than the step
        t0 = tasks[0]
        one = [type(t0)(t0.support_x[::c.k_shot], t0.support_y[::c.k_shot], t0.query_x, t0.query_y,
                        t0.classes)]
        warm = dataclasses.replace(inner, steps=1, batch_size=None)
        # CPU: the resident set before the warm-up is the base, and the high-water mark is
        # reset after it, so memory the warm-up left cached and the step reuses still counts
        cpu_base = _status_kb("VmRSS") * 1024
        if m.side == "reference":
            reference_meta_step(model, one, warm, m.algo)
        else:
            algo.meta_gradients(net, weights, meta_alphas, one, warm, pool=pool)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = cpu_base
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            peak = _status_kb("VmHWM") * 1024 - base
        estimate = None
        if m.side == "metanas":  # after the peak is read: the estimate's own pass must not count
            estimate = estimate_task_bytes(net, weights, alphas, tasks[0], inner, second_order=m.algo == "maml")
            pool.close()
        conn.send({"seconds": seconds, "peak_bytes": peak, "estimate_bytes": estimate})
    except Exception as exc:  # noqa: BLE001  report the failure instead of hanging the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})


def _flops_child(conn, m: Measurement) -> None:
    """FLOPs of one task per algorithm (matmuls and convolutions are linear in the batch, so
    one image's forward and forward+backward are counted and scaled by the images processed)."""
    import torch.nn.functional as F

    from metanas.flops import count_flops
    from metanas.functional import forward

    try:
        torch.set_num_threads(1)
        net, alphas, tasks = _config_setup(dataclasses.replace(m, meta_batch=1))
        inner = _inner(m.protocol, m.quick, m.epochs)
        task = tasks[0]
        w = dict(net.named_parameters())
        a = {k: v.requires_grad_(True) for k, v in alphas.items()}
        x, y = task.support_x[:1], task.support_y[:1]

        def fwd():
            with torch.no_grad():
                forward(net, w, a, x)

        def fwd_bwd():
            loss = F.cross_entropy(forward(net, w, a, x), y)
            torch.autograd.grad(loss, [*w.values(), *a.values()])

        f1, fb1 = count_flops(fwd), count_flops(fwd_bwd)
        n_support, n_query = task.support_x.shape[0], task.query_x.shape[0]
        adapt = inner.steps * n_support * fb1  # every epoch (or step) sees each support image once
        conn.send({"reptile": adapt + n_query * f1, "fomaml": adapt + n_query * fb1})
    except Exception as exc:  # noqa: BLE001
        conn.send({"error": f"{type(exc).__name__}: {exc}"})


def _run_one(ctx, target, m: Measurement) -> dict:
    proc, conn = _fork(ctx, target, m)
    try:
        return conn.recv()
    except EOFError:  # killed (e.g. out of memory)
        return {"error": f"the measurement process died (exit code {proc.exitcode})"}
    finally:
        proc.join(timeout=60)


def run_configs(args, device: str, ctx, peak: float) -> None:
    """MetaNAS's configurations: the reference structure against metanas, one process per
    measurement, the sides alternated; writes ``results/meta_step_configs_<device>[_quick]``."""
    started = time.perf_counter()
    names = list(CONFIGS) if "all" in args.configs else args.configs
    maml_on = set(CONFIGS) if "all" in args.maml_configs else set(args.maml_configs)
    algos = [a for a in args.config_algos]
    reps = args.reps or 1
    threads = args.intra_op_threads
    rows = []
    for name in names:
        base = Measurement(name, "reptile", "metanas", args.protocol, args.meta_batch_configs, device,
                           args.quick, threads, args.recompute, args.epochs)
        flops = _run_one(ctx, _flops_child, base)
        if "error" in flops:
            print(f"  {name}: FLOP count FAILED {flops['error']}", file=sys.stderr)
        for algo in algos:
            if algo == "maml" and name not in maml_on:
                continue
            sides = SIDES if algo != "maml" else ("metanas",)  # deep copies cannot do second order
            results = {side: [] for side in sides}
            for r in range(reps):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    m = dataclasses.replace(base, algo=algo, side=side)
                    out = _run_one(ctx, _measure, m)
                    results[side].append(out)
                    what = (f"{out['seconds'] / m.meta_batch:.2f} s/task, "
                            f"{out['peak_bytes'] / 2**20:.0f} MiB" if "seconds" in out
                            else out.get("skipped") or f"FAILED {out.get('error')}")
                    print(f"{name} {algo} {side} rep {r + 1}/{reps}: {what}", flush=True)
            for side, outs in results.items():
                good = [o for o in outs if "seconds" in o]
                note = "" if good else "; ".join(o.get("skipped") or o.get("error", "") for o in outs)
                per_task = statistics.median(o["seconds"] for o in good) / base.meta_batch if good else float("nan")
                gflop = flops.get(algo, float("nan")) / 1e9 if "error" not in flops else float("nan")
                estimates = [o["estimate_bytes"] for o in good if o.get("estimate_bytes")]
                rows.append({
                    "config": name, "algo": algo, "side": side, "protocol": args.protocol,
                    "meta_batch": base.meta_batch, "reps": len(good), "s_per_task": per_task,
                    "peak_mib": max((o["peak_bytes"] for o in good), default=float("nan")) / 2**20,
                    "estimate_mib": estimates[0] / 2**20 if estimates else float("nan"),
                    "gflop_per_task": gflop, "gflops": gflop / per_task if good else float("nan"),
                    "pct_of_peak": 100 * gflop / per_task / peak if good else float("nan"),
                    "times": ";".join(f"{o['seconds']:.3f}" for o in good), "note": note,
                })
            by_side = {r["side"]: r for r in rows[-len(sides):]}
            for r in rows[-len(sides):]:
                ref = by_side.get("reference")
                r["speedup_vs_reference"] = ref["s_per_task"] / r["s_per_task"] if ref else float("nan")
                r["memory_vs_reference"] = r["peak_mib"] / ref["peak_mib"] if ref else float("nan")
    suffix = "_quick" if args.quick else ""
    out = args.out or Path(__file__).resolve().parent / "results" / f"meta_step_configs_{torch.device(device).type}{suffix}"
    net = QUICK_NET if args.quick else METANAS_NET
    inner = _inner(args.protocol, args.quick, args.epochs)
    header = (f"MetaNAS's configurations on {device} ({_cores()} cores, {threads} torch thread(s) per side), "
              f"{'QUICK MODE (tiny sizes, not a measurement), ' if args.quick else ''}"
              f"supernet {net}, pairwise input alphas, prune threshold 0.01; inner loop: Adam lr 0.005, "
              f"temperature 1.0 -> 0.05, {inner.steps} "
              + (f"epochs of {inner.batch_size}-image mini-batches" if inner.batch_size else "whole-support steps")
              + ("" if args.recompute == "none" else
                 f"; metanas side with activations recomputed per {args.recompute[:-1]} "
                 f"(trainer.recompute_{args.recompute})")
              + f"; meta-batch {args.meta_batch_configs}, {reps} rep(s) per side, one process per measurement, "
              f"sides alternated; torch {torch.__version__}")
    write_config_outputs(rows, peak, out, header)
    print(f"wrote {out}.csv/.md/.png in {time.perf_counter() - started:.0f} s")


CONFIG_FIELDS = ["config", "algo", "side", "protocol", "meta_batch", "reps", "s_per_task", "peak_mib",
                 "estimate_mib", "gflop_per_task", "gflops", "pct_of_peak", "speedup_vs_reference",
                 "memory_vs_reference", "times", "note"]


def write_config_outputs(rows: list[dict], peak: float, out: Path, header: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CONFIG_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4g}" if isinstance(r[k], float) else r[k]) for k in CONFIG_FIELDS})

    def num(v, fmt):
        return "n/a" if v != v else format(v, fmt)  # NaN: not measured

    lines = [header, "", f"Measured matmul peak: {peak:.1f} GFLOP/s.", "",
             "| configuration | algorithm | side | s/task | peak MiB | estimate MiB | GFLOP/task | GFLOP/s "
             "| % peak | x reference (speed) | memory / reference | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['algo']} | {r['side']} | {num(r['s_per_task'], '.2f')} | "
            f"{num(r['peak_mib'], '.0f')} | {num(r['estimate_mib'], '.0f')} | {num(r['gflop_per_task'], '.2f')} | "
            f"{num(r['gflops'], '.2f')} | {num(r['pct_of_peak'], '.1f')} | {num(r['speedup_vs_reference'], '.2f')} | "
            f"{num(r['memory_vs_reference'], '.2f')} | {r['note']} |")
    lines += ["", "Peak MiB: growth of the measurement process's peak resident set (VmHWM, reset after the warm-up) over its "
              "resident set before the warm-up. Estimate MiB: metanas.memory.estimate_task_bytes for one task "
              "(what trainer.memory_budget_gb divides the budget by). Second-order MAML has no "
              "reference (deep copies cannot differentiate through their optimiser steps)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = list(dict.fromkeys((r["config"], r["algo"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(keys)), 4.5))
    for ax, field, label in ((axes[0], "s_per_task", "seconds per task (lower is better)"),
                             (axes[1], "peak_mib", "peak memory, MiB (lower is better)")):
        for i, side in enumerate(SIDES):
            xs, ys = [], []
            for j, key in enumerate(keys):
                for r in rows:
                    if (r["config"], r["algo"]) == key and r["side"] == side and r[field] == r[field]:
                        xs.append(j + (i - 0.5) * 0.4)
                        ys.append(r[field])
            ax.bar(xs, ys, 0.4, label=side)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{c}\n{a}" for c, a in keys], fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(header, 140)), fontsize=7)
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
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per variant (default 2), or per side and algorithm with "
                        "--configs (default 1)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--quick", action="store_true",
                        help="small preset, T=2, 2 reps; with --configs: tiny sizes (seconds), outputs "
                        "named *_quick (not a measurement)")
    parser.add_argument("--configs", nargs="+", default=None, choices=[*CONFIGS, "all"],
                        help="measure MetaNAS's configurations instead (reference vs metanas, one "
                        "process per measurement): " + "; ".join(f"{k}: {c.what}" for k, c in CONFIGS.items()))
    parser.add_argument("--config-algos", nargs="+", default=list(CONFIG_ALGOS), choices=CONFIG_ALGOS,
                        help="algorithms with --configs")
    parser.add_argument("--maml-configs", nargs="+", default=["omniglot_5w15s"], choices=[*CONFIGS, "all"],
                        help="configurations on which second-order MAML is measured (metanas only)")
    parser.add_argument("--protocol", default="minibatch", choices=["minibatch", "full"],
                        help="with --configs: 5 epochs of 20-image mini-batches (the reference's) or 5 "
                        "whole-support steps")
    parser.add_argument("--meta-batch-configs", type=int, default=1, help="tasks per meta-step with --configs")
    parser.add_argument("--epochs", type=int, default=5,
                        help="with --configs: inner epochs (or whole-support steps with --protocol full); "
                        "MetaNAS's is 5")
    parser.add_argument("--recompute", default="none", choices=["none", "cells", "edges"],
                        help="with --configs: metanas recomputes activations per cell or per edge in "
                        "the backward pass (trainer.recompute_cells / trainer.recompute_edges)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.configs:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        ctx = mp.get_context("fork" if device == "cpu" else "spawn")
        proc, conn = _fork(ctx, _peak_child, device)
        peak = conn.recv()
        proc.join()
        print(f"matmul peak on {device} with {_cores()} threads: {peak:.1f} GFLOP/s", flush=True)
        run_configs(args, device, ctx, peak)
        return
    args.reps = args.reps or 2
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
