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


def test_architecture_statistics_in_the_log_and_the_alpha_evolution_plot(tmp_path):
    """Entropy relative to uniform, largest op weight and op weights per edge, as written by
    the trainer, checked by hand on the meta-alphas after the run."""
    import math

    from metanas.search_space import normalize_alphas

    trainer = make_trainer(tmp_path, meta_steps=3)
    trainer.fit()
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    last = rows[-1]
    space = trainer.search_space
    w = normalize_alphas(trainer.alphas["reduce"].detach().double(), 1.0, space.prune_threshold)
    entropy = float((-(w * w.log()).sum(-1)).mean()) / math.log(space.n_ops)
    assert float(last["entropy_reduce"]) == pytest.approx(entropy, rel=1e-9)
    assert float(last["max_weight_reduce"]) == pytest.approx(float(w.max()), rel=1e-9)
    assert float(last[f"op/reduce/1/{space.ops[2]}"]) == pytest.approx(float(w[1, 2]), rel=1e-9)
    assert float(last["alpha_displacement"]) > 0
    assert (tmp_path / "alpha_evolution.png").read_bytes()[:4] == b"\x89PNG"
