"""The Hydra app: every config composes and instantiates; smoke run end to end; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from metanas.cli import build_trainer
from metanas.errors import DataError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides):
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in _options(g)]
)
def test_every_config_composes_and_instantiates(override, tmp_path):
    extra = []
    if override == "model=genotype":  # needs a genotype file: one of the default search space
        cell = [[["conv_3x3", 0], ["skip_connect", 1]], [["sep_conv_3x3", 2], ["max_pool_3x3", 0]]]
        (tmp_path / "genotype.json").write_text(json.dumps(
            {"normal": cell, "normal_concat": [2, 3], "reduce": cell, "reduce_concat": [2, 3]}))
        extra = [f"model.path={tmp_path / 'genotype.json'}"]
    cfg = _compose([override, "device=cpu", *extra])
    try:
        trainer = build_trainer(cfg, tmp_path)
    except DataError as exc:  # a data set that is not on this machine (e.g. miniImageNet)
        pytest.skip(f"{override} composes; its data is not here: {exc}")
    assert trainer.cfg.meta_steps >= 1
    assert trainer.sampler.n_way == trainer.search_space.n_classes


def test_algorithms_bring_their_meta_optimiser():
    assert _compose(["algorithm=reptile"]).optim.weights._target_ == "torch.optim.SGD"
    assert _compose(["algorithm=maml"]).optim.weights._target_ == "torch.optim.Adam"
    assert _compose(["algorithm=maml", "optim=sgd"]).optim.weights._target_ == "torch.optim.SGD"


def test_default_inner_loop_is_meta_sgd_and_reptile_brings_fixed_rates():
    default = _compose([]).inner
    assert (default.meta_sgd, default.optimizer, default.optimizer_alphas, default.lr_alphas) == (True, "sgd", "sgd", 1.0)
    assert _compose([]).optim.rates.lr == 5e-3
    reptile = _compose(["algorithm=reptile"]).inner
    assert reptile.meta_sgd is False and reptile.optimizer_alphas == "adam"
    assert _compose(["algorithm=reptile", "inner=adam"]).inner.optimizer == "adam"
    assert _compose(["inner=sgd"]).inner.meta_sgd is False


def run_cli(*args, cwd):
    # one intra-op thread: several OpenMP threads per kernel are many times slower on a shared machine
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "metanas.cli", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=600,
    )


def test_smoke_experiment_end_to_end_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("experiment=smoke", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"accuracy", "ci95", "n_tasks", "config"} <= set(metrics)
    assert metrics["n_tasks"] == 20 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["config"]["trainer"]["meta_steps"] == 10
    genotype = json.loads((run_dir / "genotype.json").read_text())
    assert "normal" in genotype
    assert len(json.loads((run_dir / "task_genotypes.json").read_text())) == 20
    for name in ("last.ckpt", "best.ckpt"):
        assert (run_dir / "checkpoints" / name).is_file()
    assert (run_dir / "train_log.csv").read_text().count("\n") == 11

    # resume=auto on a finished run: nothing is retrained, the same model is re-tested
    again = run_cli("experiment=smoke", f"hydra.run.dir={run_dir}", "resume=auto", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]


@pytest.mark.parametrize(
    "override,expected",
    [
        ("task.n_way=2000", "n_way"),
        ("task.k_shot=15", "k_shot"),
        ("search_space.ops=[conv_3x3,conv_9x9]", "conv_9x9"),
        ("resume=does/not/exist.ckpt", "does not exist"),
    ],
)
def test_bad_input_exits_non_zero_with_a_clear_message(override, expected, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("experiment=smoke", override, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "metanas-train: error:" in proc.stderr and expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.json").exists()


def test_corrupt_data_file_and_checkpoint_are_reported(tmp_path):
    data = Path(__file__).resolve().parents[1] / "tasks" / "data" / "omniglot" / "omniglot.npz"
    broken = tmp_path / "omniglot.npz"
    broken.write_bytes(data.read_bytes()[:100_000])
    proc = run_cli("experiment=smoke", f"task.path={broken}", f"hydra.run.dir={tmp_path / 'a'}",
                   cwd=tmp_path)
    assert proc.returncode == 2 and str(broken) in proc.stderr
    assert "Traceback" not in proc.stderr
    bad_ckpt = tmp_path / "last.ckpt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    proc = run_cli("experiment=smoke", f"resume={bad_ckpt}", f"hydra.run.dir={tmp_path / 'b'}",
                   cwd=tmp_path)
    assert proc.returncode == 2 and "corrupt" in proc.stderr
    assert not (tmp_path / "b" / "metrics.json").exists()


def test_checkpoint_of_another_search_space_is_refused(tmp_path):
    first = tmp_path / "first"
    assert run_cli("experiment=smoke", "trainer.meta_steps=2", "trainer.n_test_tasks=2",
                   f"hydra.run.dir={first}", cwd=tmp_path).returncode == 0
    proc = run_cli("experiment=smoke", "search_space.channels=12",
                   f"resume={first}/checkpoints/last.ckpt", f"hydra.run.dir={tmp_path / 'second'}",
                   cwd=tmp_path)
    assert proc.returncode == 2
    assert "different search space" in proc.stderr and "channels" in proc.stderr


def test_custom_sampler_plugs_in_through_the_search_path(tmp_path):
    (tmp_path / "my_tasks.py").write_text(
        "import torch\n"
        "from metanas.tasks import Task\n"
        "class Stripes:\n"
        "    n_way, k_shot, q_query, input_shape = 3, 1, 2, (1, 12, 12)\n"
        "    def __init__(self, noise):\n"
        "        self.noise = noise\n"
        "    def sample(self, split, rng):\n"
        "        def block(k):\n"
        "            y = torch.arange(3).repeat_interleave(k)\n"
        "            x = torch.from_numpy(rng.normal(0, self.noise, (3 * k, 1, 12, 12))).float()\n"
        "            x[torch.arange(3 * k), 0, :, y * 4] += 1.0\n"
        "            return x, y\n"
        "        (sx, sy), (qx, qy) = block(1), block(2)\n"
        "        return Task(sx, sy, qx, qy, (0, 1, 2))\n"
    )
    (tmp_path / "my_conf" / "task").mkdir(parents=True)
    (tmp_path / "my_conf" / "task" / "stripes.yaml").write_text("_target_: my_tasks.Stripes\nnoise: 0.1\n")
    env_path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", "metanas.cli", "experiment=smoke", "task=stripes",
         f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": env_path, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["task"]["_target_"] == "my_tasks.Stripes"
    assert metrics["n_tasks"] == 20
