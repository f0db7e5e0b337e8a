"""``metanas-report``: one table and one figure for a whole sweep.

Usage::

    metanas-report multirun/2026-11-29/04-04-35            # a sweep of metanas-train -m
    metanas-report <sweep dir> --out reports/sweep1         # write the files elsewhere

Every run below the directory (every folder with ``.hydra/overrides.yaml``) becomes a row:
its job name, status, the overrides that differ between runs (the swept values), meta-test
accuracy and meta-validation accuracy with their 95% confidence intervals, meta-steps done,
wall time, and the meta-architecture as counts of each operation in the normal and the
reduction cell. Runs that failed, crashed or have not finished are listed with their state and
error message, never dropped.

Status of a run:

- ``ok``: finished, ``metrics.json`` written;
- ``failed``: ended with an error (``status.json`` holds the message; in a sweep metanas-train
  records it and goes on with the next job);
- ``crashed``: the process is gone without finishing (killed, out of memory, or an error
  before metanas-train could record it: the message is taken from the job's log);
- ``running``: ``status.json`` says running and the process is alive (or on another host);
- ``unfinished``: no result and no trace of an error (e.g. a job not started yet).

Written into the directory (or ``--out``): ``summary.md``, ``summary.csv`` and ``summary.png``
(accuracy with 95% CI error bars against each swept value; one panel per swept key). The
markdown table is also printed. Exit status 2 with a one-line message when no run is found.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import socket
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import rundir

PROG = "metanas-report"


@dataclass
class RunRecord:
    """One run of a sweep as found on disk.

    Attributes:
        job: the run's folder relative to the sweep directory (Hydra's job number).
        path: the run's folder.
        overrides: its command-line overrides, key -> value (as written by Hydra).
        status: ok, failed, crashed, running or unfinished (see the module docstring).
        error: the error message of a failed or crashed run.
        metrics: the content of ``metrics.json`` (empty without it).
        genotype: the content of ``genotype.json`` (None without it).
        steps_done: meta-steps recorded in ``train_log.csv``.
    """

    job: str
    path: Path
    overrides: dict[str, str]
    status: str
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    genotype: dict[str, Any] | None = None
    steps_done: int = 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_error(run_dir: Path) -> str:
    """The last error line of the run's Hydra log (``<job name>.log``), or ''."""
    for log_file in sorted(run_dir.glob(rundir.JOB_LOGS)):
        lines = (rundir.read(run_dir, log_file.name) or b"").decode(errors="replace").splitlines()
        errors = [ln for ln in lines if "[ERROR]" in ln]
        if errors:
            return errors[-1].split("] - ", 1)[-1].strip()
        if any(ln.startswith("Traceback") for ln in lines):
            tail = [ln for ln in lines if ln.strip()]
            return tail[-1].strip() if tail else "Traceback in the log"
    return ""


def read_run(path: Path, root: Path) -> RunRecord:
    """Everything :func:`summarize` needs about one run folder."""
    job = str(path.relative_to(root)) if path != root else path.name
    overrides = rundir.read(path, rundir.HYDRA_OVERRIDES) or []  # ["key=value", ...]
    record = RunRecord(job, path, dict(str(o).partition("=")[::2] for o in overrides), "unfinished")
    record.metrics = rundir.read(path, rundir.METRICS) or {}
    record.genotype = rundir.read(path, rundir.GENOTYPE)
    record.steps_done = len(rundir.read(path, rundir.TRAIN_LOG) or [])
    status = rundir.read(path, rundir.STATUS) or {}
    state = status.get("status")
    if state == "ok" and record.metrics:
        record.status = "ok"
    elif state in ("failed", "interrupted"):
        record.status = state
        record.error = str(status.get("error", ""))
    elif state == "running":
        here = status.get("host") == socket.gethostname()
        if here and not _pid_alive(int(status.get("pid", -1))):
            record.status = "crashed"
            record.error = _log_error(path) or "the process ended without finishing (killed?)"
        else:
            record.status = "running"
    elif record.metrics:
        record.status = "ok"  # a run written before status.json existed
    else:
        error = _log_error(path)
        if error:
            record.status, record.error = "crashed", error
    return record


def find_runs(root: str | Path) -> list[RunRecord]:
    """All runs below ``root`` (folders holding ``.hydra/overrides.yaml``), in job order."""
    root = Path(root)

    def order(p: Path) -> tuple:
        parts = p.relative_to(root).parts if p != root else ()
        return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in parts)

    return [read_run(p, root) for p in sorted(rundir.run_dirs(root), key=order)]


def swept_keys(runs: Sequence[RunRecord]) -> list[str]:
    """Override keys whose values differ between runs (or that not every run has)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def genotype_summary(genotype: dict[str, Any] | None) -> dict[str, str]:
    """``{"normal": "conv_3x3 x2, skip_connect", "reduce": ...}``: op counts per cell type."""
    out = {}
    for cell in ("normal", "reduce"):
        edges = (genotype or {}).get(cell)
        if not edges:
            out[cell] = ""
            continue
        counts = Counter(edge[0] for node in edges for edge in node)
        out[cell] = ", ".join(f"{op} x{n}" if n > 1 else op
                              for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def _pct(value: Any, ci: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = f"{100 * float(value):.2f}"
    return text + (f" ± {100 * float(ci):.2f}" if ci is not None else "")


def _wall(seconds: Any) -> str:
    if seconds is None:
        return ""
    seconds = float(seconds)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _planned_steps(run: RunRecord) -> Any:
    config = run.metrics.get("config") or {}
    return (config.get("trainer") or {}).get("meta_steps")


def rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One flat dict per run (the CSV rows): swept values, results, status, error."""
    keys = swept_keys(runs)
    out = []
    for r in runs:
        m = r.metrics
        g = genotype_summary(r.genotype)
        row: dict[str, Any] = {"job": r.job, "status": r.status}
        row.update({k: r.overrides.get(k, "") for k in keys})
        row.update({
            "accuracy": m.get("accuracy"), "ci95": m.get("ci95"),
            "val_accuracy": m.get("val_accuracy"), "val_ci95": m.get("val_ci95"),
            "n_tasks": m.get("n_tasks"),
            "meta_steps": m.get("meta_steps", r.steps_done),
            "wall_time_s": m.get("wall_time_s"), "train_time_s": m.get("train_time_s"),
            "genotype_normal": g["normal"], "genotype_reduce": g["reduce"],
            "overrides": " ".join(f"{k}={v}" for k, v in r.overrides.items()),
            "error": r.error, "dir": str(r.path),
        })
        out.append(row)
    return out


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(runs: Sequence[RunRecord], title: str = "") -> str:
    """The sweep as a markdown table, with the best run and the count of each status."""
    keys = swept_keys(runs)
    header = ["job", "status", *keys, "test acc % (95% CI)", "val acc % (95% CI)", "meta-steps",
              "wall time", "normal cell", "reduction cell", "error"]
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        m, g = r.metrics, genotype_summary(r.genotype)
        steps = m.get("meta_steps", r.steps_done)
        planned = _planned_steps(r)
        cells = [r.job, r.status, *(r.overrides.get(k, "") for k in keys),
                 _pct(m.get("accuracy"), m.get("ci95")), _pct(m.get("val_accuracy"), m.get("val_ci95")),
                 f"{steps}" + (f"/{planned}" if planned and planned != steps else ""),
                 _wall(m.get("wall_time_s")), g["normal"], g["reduce"], r.error]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    counts = Counter(r.status for r in runs)
    lines += ["", f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    ok = [r for r in runs if r.status == "ok" and r.metrics.get("accuracy") is not None]
    if ok:
        best = max(ok, key=lambda r: r.metrics["accuracy"])
        swept = " ".join(f"{k}={best.overrides.get(k, '')}" for k in keys) or "no swept key"
        acc = _pct(best.metrics["accuracy"], best.metrics.get("ci95"))
        lines.append(f"best meta-test accuracy: job {best.job} ({swept}): {acc} %")
    if not keys:
        lines.append("(the runs differ in no override)")
    return "\n".join(lines) + "\n"


def _as_number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot(runs: Sequence[RunRecord]) -> bytes:
    """PNG: meta-test (and meta-validation) accuracy with 95% CI against each swept value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = swept_keys(runs) or ["job"]
    fig = Figure(figsize=(4.5 * len(keys), 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    ok = [r for r in runs if r.status == "ok" and r.metrics.get("accuracy") is not None]
    for ax, key in zip(axes, keys):
        values = [r.job if key == "job" else r.overrides.get(key, "") for r in ok]
        numbers = [_as_number(v) for v in values]
        numeric = bool(values) and all(n is not None for n in numbers) and key != "job"
        if numeric:
            xs = numbers
            if min(xs) > 0 and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
        else:
            labels = list(dict.fromkeys(values))
            xs = [labels.index(v) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        for metric, ci, color, label, shift in (("accuracy", "ci95", "C0", "meta-test", 0.0),
                                                ("val_accuracy", "val_ci95", "C1", "meta-val", 0.08)):
            pts = [(x, r.metrics.get(metric), r.metrics.get(ci) or 0.0) for x, r in zip(xs, ok)
                   if r.metrics.get(metric) is not None]
            if pts:
                dx = 0.0 if numeric else shift
                ax.errorbar([p[0] + dx for p in pts], [100 * p[1] for p in pts],
                            yerr=[100 * p[2] for p in pts], fmt="o", capsize=3, color=color, label=label)
        bad = sum(r.status != "ok" for r in runs)
        ax.set(xlabel=key, ylabel="accuracy (%)", title=key + (f"  ({bad} not ok)" if bad else ""))
        ax.grid(alpha=0.3)
        if ok:
            ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def summarize(sweep_dir: str | Path, out_dir: str | Path | None = None) -> tuple[list[RunRecord], str]:
    """Find the runs of a sweep and write ``summary.md``, ``summary.csv`` and ``summary.png``.

    Args:
        sweep_dir: a multirun directory (or any folder holding Hydra run folders).
        out_dir: where the three files go (default: ``sweep_dir``).

    Returns:
        The runs and the markdown text.

    Raises:
        FileNotFoundError: no run below ``sweep_dir``.
    """
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir) if sweep_dir.is_dir() else []
    if not runs:
        raise FileNotFoundError(
            f"no run found in {sweep_dir} (no folder with {rundir.HYDRA_OVERRIDES}); give the directory "
            "of a metanas-train -m sweep, e.g. multirun/<date>/<time>"
        )
    out = Path(out_dir) if out_dir is not None else sweep_dir
    text = markdown(runs, title=f"Sweep {sweep_dir}")
    rundir.write(out, {"summary.md": text, "summary.csv": rows(runs), "summary.png": plot(runs)})
    return runs, text


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``metanas-report <multirun dir> [--out DIR]``."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="the directory of a metanas-train -m sweep")
    parser.add_argument("--out", default=None, help="write summary.{md,csv,png} here (default: sweep_dir)")
    args = parser.parse_args(argv)
    try:
        _, text = summarize(args.sweep_dir, args.out)
    except (FileNotFoundError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


__all__ = ["RunRecord", "find_runs", "genotype_summary", "main", "markdown", "rows", "summarize",
           "swept_keys"]


if __name__ == "__main__":
    sys.exit(main())
