"""Hydra sweeps end to end: a multirun with a failing value and its summary, the Optuna preset,
the joblib and SLURM launchers, the paper presets, and Hydra's errors for unknown options."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

TINY = ["experiment=smoke", "device=cpu", "trainer.meta_steps=2", "trainer.val_every=2",
        "trainer.n_val_tasks=2", "trainer.n_test_tasks=4", "trainer.ckpt_every=2"]


def metanas(*args, cwd, prog="metanas.cli"):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", prog, *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _compose(overrides, hydra=False):
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra)


@pytest.mark.slow
def test_sweep_with_an_invalid_value_runs_the_others_and_is_summarised(tmp_path):
    sweep = tmp_path / "sweep"
    proc = metanas("-m", *TINY, "seed=0,1", "inner.steps=1,-1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    status = {j: json.loads((sweep / j / "status.json").read_text()) for j in jobs}
    assert [status[j]["status"] for j in jobs] == ["ok", "failed", "ok", "failed"]
    assert "inner.steps=-1 is not an integer >= 0" in status["1"]["error"]
    for j in ("0", "2"):
        metrics = json.loads((sweep / j / "metrics.json").read_text())
        assert metrics["n_tasks"] == 4 and (sweep / j / "learning_curves.png").is_file()
    assert not (sweep / "1" / "metrics.json").exists()
    # the two good runs differ (seed 0 and 1)
    accs = [json.loads((sweep / j / "metrics.json").read_text())["val_accuracy"] for j in ("0", "2")]
    ckpts = [(sweep / j / "checkpoints" / "last.ckpt").read_bytes() for j in ("0", "2")]
    assert ckpts[0] != ckpts[1] and all(0 <= a <= 1 for a in accs)

    report = metanas(str(sweep), cwd=tmp_path, prog="metanas.report")
    assert report.returncode == 0, report.stderr
    out = report.stdout
    assert "| job | status | seed | inner.steps |" in out
    assert "| 1 | failed | 0 | -1 |" in out and "inner.steps=-1 is not an integer >= 0" in out
    assert "4 runs: 2 failed, 2 ok" in out
    with (sweep / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["seed"], r["inner.steps"], r["status"]) for r in table] == [
        ("0", "1", "ok"), ("0", "-1", "failed"), ("1", "1", "ok"), ("1", "-1", "failed")]
    assert float(table[0]["accuracy"]) == json.loads((sweep / "0" / "metrics.json").read_text())["accuracy"]
    assert table[0]["genotype_reduce"]  # the smoke network has reduction cells only: no normal cell is reported
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("override,expected", [
    ("trainer.no_such_key=1", "trainer.no_such_key is not a setting of metanas-train"),
    ("experiment=no_such_preset", "experiment=no_such_preset is not an option of experiment; use one of"),
    ("algorithm=no_such_algorithm", "algorithm=no_such_algorithm is not an option of algorithm; use one of"),
])
def test_unknown_option_or_key_gets_one_line_and_status_2(override, expected, tmp_path):
    proc = metanas("-m", "experiment=smoke", override, f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"metanas-train: error: {expected}"), proc.stderr
    assert not (tmp_path / "s").exists()


def test_optuna_preset_composes_to_a_maximising_search():
    cfg = _compose(["hparams_search=omniglot_optuna"], hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and sweeper.n_trials >= 2
    assert set(sweeper.params) >= {"inner.lr_weights", "optim.weights.lr", "search_space.channels"}
    # the alphas' inner rate is searched around the default inner loop's own (Meta-SGD, 1.0)
    lo, hi = (float(v) for v in str(sweeper.params["inner.lr_alphas"]).split("interval(")[1].rstrip("))").split(","))
    assert lo < cfg.inner.lr_alphas < hi


@pytest.mark.slow
def test_optuna_runs_two_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    proc = metanas("hparams_search=omniglot_optuna", *TINY, "hydra.sweeper.n_trials=2",
                   "search_space.channels=choice(4,6)", f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in results and "best_value" in results
    vals = [json.loads((sweep / j / "metrics.json").read_text())["val_accuracy"] for j in ("0", "1")]
    best_value = float(results.split("best_value:")[1].split()[0])
    assert best_value == pytest.approx(max(vals))


def test_joblib_launcher_composes():
    # a 2-job sweep with it takes 30-40 s on 2 busy cores (process start-up), so only composed here
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = _compose(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


def test_slurm_launcher_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.tasks_per_node == 1


def test_paper_presets_have_the_published_settings():
    og1 = _compose(["experiment=metanas_omniglot_1shot"])
    assert (og1.task.n_way, og1.task.k_shot, og1.task.q_query) == (20, 1, 1)
    assert og1.algorithm._target_ == "metanas.algorithms.Reptile"
    assert og1.optim.weights._target_ == "torch.optim.SGD" and og1.optim.schedule == "constant"
    assert (og1.optim.weights.lr, og1.optim.alphas.lr) == (1.0, 0.6)
    assert (og1.trainer.meta_steps, og1.trainer.alpha_warmup_steps, og1.trainer.meta_batch_size) == (
        30000, 15000, 10)
    assert (og1.inner.optimizer, og1.inner.steps, og1.inner.lr_weights, og1.inner.temperature_end) == (
        "adam", 5, 0.005, 0.05)
    s = og1.search_space
    assert (s.channels, s.n_cells, s.n_nodes, list(s.reduction_cells), s.prune_threshold) == (
        28, 4, 3, [1, 3], 0.01)
    assert s.pairwise_input_alphas is True
    assert _compose(["experiment=metanas_omniglot_5shot"]).task.k_shot == 5


def test_miniimagenet_presets_have_the_published_settings():
    try:
        _compose(["task=miniimagenet"])
    except ConfigCompositionException as exc:  # the task's own config must compose first
        pytest.skip(f"conf/task/miniimagenet.yaml does not compose: {type(exc).__name__}")
    for shots in (1, 5):
        mi = _compose([f"experiment=metanas_miniimagenet_{shots}shot"])
        assert mi.task._target_ == "metanas.tasks.MiniImageNetTasks"
        assert (mi.task.n_way, mi.task.k_shot) == (5, shots)
        assert (mi.inner.lr_weights, mi.inner.temperature_end) == (0.001, 0.1)
        assert mi.search_space.channels == 28 and mi.optim.alphas.lr == 0.6


@pytest.mark.parametrize("mode,progress,expected", [
    ("MULTIRUN", None, False), ("MULTIRUN", True, True), ("RUN", False, False),
])
def test_progress_bars_are_off_in_a_sweep_unless_forced(mode, progress, expected, tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from metanas.cli import build_trainer

    overrides = ["experiment=smoke", "device=cpu", f"hydra.mode={mode}",
                 f"trainer.progress={'null' if progress is None else str(progress).lower()}"]
    cfg = _compose(overrides, hydra=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        trainer = build_trainer(cfg, tmp_path)
        trainer.close()
    finally:
        HydraConfig.instance().cfg = None
    assert trainer.cfg.progress is expected


def _metanas_layout_weights(C: int, n_cells: int, n_nodes: int, reductions, n_way: int, stem: int = 3) -> int:
    """Weights of MetaNAS's supernet counted by hand: the channel count C stays the same in
    every cell (feature_scale_rate=1), the 7 few-shot ops with MetaNAS's depthwise-separable
    conv_3x3, norms without parameters; 1-channel input."""
    dw = 9 * C + C * C  # depthwise 3x3 + pointwise 1x1
    per_op = {"max_pool_3x3": 0, "avg_pool_3x3": 0, "conv_1x5_5x1": 10 * C * C,
              "dw_conv_3x3": dw, "sep_conv_3x3": 2 * dw, "dil_conv_3x3": dw}
    total = 1 * stem * C * 9  # stem conv
    c_pp = c_p = stem * C
    for k in range(n_cells):
        red = k in reductions
        total += c_pp * C + c_p * C  # 1x1 preprocessing (a FactorizedReduce after a reduction has as many)
        for i in range(n_nodes):
            for j in range(2 + i):
                stride = 2 if red and j < 2 else 1
                total += sum(per_op.values()) + (C * C if stride == 2 else 0)  # skip: FactorizedReduce
        c_pp, c_p = c_p, n_nodes * C
    return total + n_nodes * C * n_way + n_way  # classifier


def test_metanas_preset_has_metanas_network_size():
    """search_space=metanas keeps the channels at reductions (MetaNAS's feature_scale_rate=1)."""
    from hydra.utils import instantiate

    from metanas.search_space import SearchNetwork

    cfg = _compose(["experiment=metanas_omniglot_5shot"])
    space = instantiate(cfg.search_space)(in_channels=1, n_classes=cfg.task.n_way)
    assert space.reduction_channel_scale == 1 and space.reduction_cells == (1, 3)
    n = sum(p.numel() for p in SearchNetwork(space).parameters())
    assert n == _metanas_layout_weights(28, 4, 3, (1, 3), 20)
    assert 0.45e6 < n < 0.47e6
