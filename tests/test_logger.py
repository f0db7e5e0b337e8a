"""Run logs: CSV, learning-curve PNG, TensorBoard (optional extra) through the trainer."""

from __future__ import annotations

import csv
import sys

import pytest
from test_trainer import make_trainer

from metanas.errors import ConfigError
from metanas.logger import RunLogger, plot_learning_curves


def test_trainer_writes_csv_curves_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path, tensorboard=True)
    trainer = make_trainer(tmp_path, logger=logger)
    try:
        trainer.fit()
    finally:
        trainer.close()
    with (tmp_path / "train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["val_accuracy"] != "" for r in rows] == [False, False, True, False, False, True]
    assert (tmp_path / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("query_accuracy")] == [1, 2, 3, 4, 5, 6]
    val = events.Scalars("val_accuracy")
    assert [e.step for e in val] == [3, 6]
    assert val[-1].value == pytest.approx(float(rows[-1]["val_accuracy"]))


def test_missing_tensorboard_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'metanas\[tensorboard\]'"):
        RunLogger(tmp_path, tensorboard=True)
    RunLogger(tmp_path, tensorboard=False)  # fine without it


def test_disabled_logger_writes_nothing(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=True, enabled=False)
    logger.log_step({"step": 1.0, "query_accuracy": 0.5})
    logger.write([{"step": 1.0, "query_accuracy": 0.5, "query_loss": 1.0}])
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_learning_curves_png_with_and_without_validation():
    rows = [{"step": float(i), "query_accuracy": 0.2 + 0.01 * i, "query_loss": 1.5 - 0.01 * i}
            for i in range(1, 11)]
    assert plot_learning_curves(rows)[:4] == b"\x89PNG"
    rows[4].update(val_accuracy=0.4, val_ci95=0.05)
    rows[9].update(val_accuracy=0.5, val_ci95=0.04)
    assert plot_learning_curves(rows)[:4] == b"\x89PNG"
