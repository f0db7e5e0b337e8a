"""Run logs: metrics as CSV, optionally TensorBoard, and learning curves as a PNG.

Into the run directory (names and CSV format: :mod:`metanas.rundir`) go ``train_log.csv``
(per meta-step: losses, accuracies, learning rates, time; the meta-validation accuracy and its
95% CI where measured), ``learning_curves.png`` (query accuracy and loss per meta-step,
meta-validation accuracy with its 95% confidence band) and, with ``tensorboard=True`` (extra
``tensorboard``), the same scalars in ``tensorboard/``. CSV and PNG are rewritten atomically
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
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_acc, ax_loss = fig.subplots(1, 2)
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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
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
        """Rewrite ``train_log.csv`` (and ``learning_curves.png``) from the whole history."""
        if not self.enabled or not rows:
            return
        rundir.write(self.run_dir, {rundir.TRAIN_LOG: rows})
        if self.curves:
            try:
                rundir.write(self.run_dir, {rundir.LEARNING_CURVES: plot_learning_curves(rows)})
            except (ImportError, RuntimeError, ValueError) as exc:  # plotting never ends a run
                log.warning("could not draw %s: %s", rundir.LEARNING_CURVES, exc)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard's writer."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


__all__ = ["RunLogger", "plot_learning_curves"]
