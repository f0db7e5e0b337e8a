"""Run logs: metrics as CSV, optionally TensorBoard, and learning curves as a PNG.

Into the run directory (names and CSV format: :mod:`metanas.rundir`) go ``train_log.csv``
(per meta-step: losses, accuracies, learning rates, time; the meta-validation accuracy and its
95% CI where measured; with alphas, the architecture statistics of
:meth:`metanas.trainer.MetaTrainer.architecture_row`), ``learning_curves.png`` (query accuracy
and loss per meta-step, meta-validation accuracy with its 95% confidence band, and a panel of
the meta-alphas' entropy, largest op weight and task-adaptation displacement),
``alpha_evolution.png`` (each edge's op weights over meta-steps, as DARTS and MetaNAS draw
them) and, with ``tensorboard=True`` (extra ``tensorboard``), the same scalars in
``tensorboard/``. CSV and PNG are rewritten atomically
from the whole history (at checkpoints and at the end), so they match the last checkpoint.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import rundir
from .errors import ConfigError

log = logging.getLogger(__name__)


def plot_learning_curves(rows: Sequence[Mapping[str, float]]) -> bytes:
    """PNG of query accuracy and loss per meta-step and validation accuracy with its 95% CI.

    Args:
        rows: per-step dicts with ``step``, ``query_accuracy``, ``query_loss`` and, on some
            steps, ``val_accuracy`` and ``val_ci95``.

    Returns:
        The PNG file's bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    kinds = [k for k in ("normal", "reduce") if any(f"entropy_{k}" in r for r in rows)]
    fig = Figure(figsize=(15 if kinds else 10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if kinds else 2)
    ax_acc, ax_loss = axes[0], axes[1]
    ax_acc.plot(steps, [100 * r.get("query_accuracy", math.nan) for r in rows],
                lw=0.8, alpha=0.7, label="query (meta-train)")
    val = [r for r in rows if r.get("val_accuracy") is not None and not math.isnan(r["val_accuracy"])]
    if val:
        vs = [r["step"] for r in val]
        acc = [100 * r["val_accuracy"] for r in val]
        ci = [100 * r.get("val_ci95", 0.0) for r in val]
        ax_acc.plot(vs, acc, "o-", color="C1", label="meta-validation")
        ax_acc.fill_between(vs, [a - c for a, c in zip(acc, ci)], [a + c for a, c in zip(acc, ci)],
                            color="C1", alpha=0.25, label="95% CI")
    ax_acc.set(xlabel="meta-step", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend(loc="lower right")
    ax_loss.plot(steps, [r.get("query_loss", math.nan) for r in rows], lw=0.8, label="query loss")
    if any("support_loss" in r for r in rows):
        ax_loss.plot(steps, [r.get("support_loss", math.nan) for r in rows], lw=0.8,
                     label="support loss (before adaptation)")
    ax_loss.set(xlabel="meta-step", ylabel="cross-entropy", title="loss")
    ax_loss.legend(loc="upper right")
    if kinds:
        ax = axes[2]
        for i, kind in enumerate(kinds):
            ax.plot(steps, [r.get(f"entropy_{kind}", math.nan) for r in rows], color=f"C{i}",
                    label=f"{kind}: op-weight entropy / uniform")
            ax.plot(steps, [r.get(f"max_weight_{kind}", math.nan) for r in rows], "--",
                    color=f"C{i}", label=f"{kind}: largest op weight")
        ax.plot(steps, [r.get("alpha_displacement", math.nan) for r in rows], ":", color="k",
                label="task adaptation: alpha displacement")
        ax.set(xlabel="meta-step", title="architecture (meta-alphas)")
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def plot_alpha_evolution(rows: Sequence[Mapping[str, float]]) -> bytes | None:
    """PNG of every edge's op weights over meta-steps (one panel per edge, one line per op),
    from the ``op/<kind>/<edge>/<op>`` entries of the rows; None when there are none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("op/")))
    if not keys:
        return None
    edges = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in keys))
    cols = min(len(edges), 5)
    n_rows = math.ceil(len(edges) / cols)
    fig = Figure(figsize=(3 * cols, 2.4 * n_rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, cols, squeeze=False, sharey=True)
    steps = [r["step"] for r in rows]
    for ax, edge in zip(axes.flat, edges):
        for key in (k for k in keys if k.rsplit("/", 1)[0] == edge):
            ax.plot(steps, [r.get(key, math.nan) for r in rows], lw=1, label=key.rsplit("/", 1)[1])
        _, kind, e = edge.split("/")
        ax.set_title(f"{kind} edge {e}", fontsize=8)
    for ax in list(axes.flat)[len(edges):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6, loc="best")
    fig.suptitle("op weights of the meta-alphas (read-out temperature) over meta-steps")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


class RunLogger:
    """Writes a run's metrics to CSV, a learning-curve PNG and, optionally, TensorBoard.

    Args:
        run_dir: the run directory.
        tensorboard: also write TensorBoard event files into ``run_dir/tensorboard``.
        curves: write ``learning_curves.png``.
        enabled: False makes every method a no-op (processes other than rank 0).
        start_step: first step that will be logged (TensorBoard drops later events of an
            interrupted run from this step on, so a resumed run does not duplicate them).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = False,
        curves: bool = True,
        enabled: bool = True,
        start_step: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.curves = curves
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(
                    "logger.tensorboard=true needs TensorBoard: pip install 'metanas[tensorboard]' "
                    "(or set logger.tensorboard=false)"
                ) from exc
            self._tb = SummaryWriter(str(self.run_dir / rundir.TENSORBOARD), purge_step=start_step + 1)

    def log_step(self, row: Mapping[str, float]) -> None:
        """Send one meta-step's scalars to TensorBoard (CSV and PNG are written by :meth:`write`)."""
        if self._tb is None:
            return
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and value is not None and not math.isnan(value):
                self._tb.add_scalar(key, value, step)

    def write(self, rows: Sequence[Mapping[str, float]]) -> None:
        """Rewrite ``train_log.csv`` (and ``learning_curves.png``, ``alpha_evolution.png``)
        from the whole history."""
        if not self.enabled or not rows:
            return
        rundir.write(self.run_dir, {rundir.TRAIN_LOG: rows})
        if self.curves:
            try:
                rundir.write(self.run_dir, {rundir.LEARNING_CURVES: plot_learning_curves(rows)})
                evolution = plot_alpha_evolution(rows)
                if evolution is not None:
                    rundir.write(self.run_dir, {rundir.ALPHA_EVOLUTION: evolution})
            except (ImportError, RuntimeError, ValueError) as exc:  # plotting never ends a run
                log.warning("could not draw the learning curves: %s", exc)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard's writer."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


__all__ = ["RunLogger", "plot_learning_curves"]
