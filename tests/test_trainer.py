"""The meta-training loop: Reptile's update, resume after a kill, checkpoint validation."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from conftest import make_task, tiny_space
from metanas.algorithms import FOMAML, Reptile
from metanas.checkpoint import load_checkpoint, save_checkpoint
from metanas.errors import CheckpointError, ConfigError
from metanas.inner import InnerLoopConfig, adapt
from metanas.search_space import SearchNetwork, init_alphas
from metanas.trainer import MetaTrainer, TrainerConfig


class RandomTasks:
    """A minimal custom sampler: synthetic tasks drawn from the rng it is given."""

    n_way, k_shot, q_query, input_shape = 3, 2, 2, (1, 8, 8)

    def sample(self, split, rng):
        return make_task(int(rng.integers(1 << 30)), dtype=torch.float32)


INNER = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.2)


def make_trainer(tmp_path, algorithm=None, meta_lr=0.5, seed=0, logger=None, **cfg):
    space = tiny_space()
    torch.manual_seed(0)
    net = SearchNetwork(space)
    alphas = init_alphas(space, generator=torch.Generator().manual_seed(0))
    opt = (functools.partial(torch.optim.SGD, lr=meta_lr) if algorithm is None
           else functools.partial(torch.optim.Adam, lr=1e-3))
    defaults = dict(meta_steps=6, meta_batch_size=2, val_every=3, n_val_tasks=2,
                    ckpt_every=3, n_test_tasks=2, progress=False)
    defaults.update(cfg)
    return MetaTrainer(
        net=net, alphas=alphas, sampler=RandomTasks(), algorithm=algorithm or Reptile(),
        inner=INNER, weights_optimizer=opt, alphas_optimizer=opt, search_space=space,
        cfg=TrainerConfig(**defaults), run_dir=tmp_path, seed=seed, logger=logger,
    )


def test_reptile_step_moves_meta_parameters_by_the_expected_amount(tmp_path):
    eps = 0.5
    trainer = make_trainer(tmp_path, meta_lr=eps)
    w0 = {k: v.detach().clone() for k, v in trainer.weights.items()}
    a0 = {k: v.detach().clone() for k, v in trainer.alphas.items()}
    # the same two tasks the trainer will draw, adapted by hand
    rng = np.random.default_rng(0)
    tasks = [trainer.sampler.sample("train", rng) for _ in range(2)]
    adapted = [adapt(trainer.net, w0, a0, t.support_x, t.support_y, INNER) for t in tasks]
    # a stale .grad must not matter: zero_grad() sets grads to None on torch >= 2
    for p in trainer.weights.values():
        p.grad = torch.full_like(p, 123.0)
    trainer.meta_step()
    for name, p in trainer.weights.items():
        target = w0[name] + eps * (sum(a.weights[name] for a in adapted) / 2 - w0[name])
        torch.testing.assert_close(p.detach(), target.detach(), rtol=1e-5, atol=1e-6)
    moved = sum((trainer.alphas[k] - a0[k]).abs().sum() for k in a0)
    assert moved > 0
    for name, p in trainer.alphas.items():
        target = a0[name] + eps * (sum(a.alphas[name] for a in adapted) / 2 - a0[name])
        torch.testing.assert_close(p.detach(), target.detach(), rtol=1e-5, atol=1e-7)


def test_alpha_warmup_freezes_alphas(tmp_path):
    trainer = make_trainer(tmp_path, alpha_warmup_steps=2)
    a0 = {k: v.detach().clone() for k, v in trainer.alphas.items()}
    trainer.meta_step()
    trainer.meta_step()
    assert all(torch.equal(trainer.alphas[k], a0[k]) for k in a0)
    trainer.meta_step()
    assert any(not torch.equal(trainer.alphas[k], a0[k]) for k in a0)


class Killed(Exception):
    pass


class DyingTasks(RandomTasks):
    """Raises (like a killed process) on the n-th training task it is asked for."""

    def __init__(self, die_at: int):
        self.calls, self.die_at = 0, die_at

    def sample(self, split, rng):
        if split == "train":
            self.calls += 1
            if self.calls == self.die_at:
                raise Killed
        return super().sample(split, rng)


@pytest.mark.parametrize("algorithm", [Reptile(), FOMAML()], ids=["reptile", "fomaml"])
def test_resume_after_kill_reproduces_uninterrupted_run(tmp_path, algorithm):
    straight = make_trainer(tmp_path / "a", algorithm=algorithm)
    straight.fit()

    killed = make_trainer(tmp_path / "b", algorithm=algorithm)
    killed.sampler = DyingTasks(die_at=2 * 4 + 1)  # dies inside meta-step 5; last ckpt at 3
    with pytest.raises(Killed):
        killed.fit()
    assert killed.step == 4

    resumed = make_trainer(tmp_path / "b", algorithm=algorithm)
    resumed.resume(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert resumed.step == 3
    resumed.fit()
    for name, p in straight.weights.items():
        assert torch.equal(p, resumed.weights[name]), name
    for name, p in straight.alphas.items():
        assert torch.equal(p, resumed.alphas[name]), name
    assert [r["query_loss"] for r in straight.history] == [r["query_loss"] for r in resumed.history]
    assert straight.best == resumed.best


def test_checkpoint_round_trip_and_errors(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.meta_step()
    path = trainer.save("last.ckpt")
    state = load_checkpoint(path, trainer.search_space.to_dict())
    assert state["step"] == 1 and set(state["alphas"]) == set(trainer.alphas)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    other = tiny_space(channels=6).to_dict()
    with pytest.raises(CheckpointError, match="different search space.*channels"):
        load_checkpoint(path, other)

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a metanas checkpoint"):
        load_checkpoint(foreign)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.ckpt"
    save_checkpoint(path, {"step": 1, "search_space": {}, "weights": {}, "alphas": {}})
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("metanas.checkpoint.os.replace", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2, "search_space": {}, "weights": {}, "alphas": {}})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_resume_warns_about_changed_settings(tmp_path, caplog):
    first = make_trainer(tmp_path, meta_steps=2)
    first.config = {"seed": 0, "trainer": {"meta_steps": 2, "meta_batch_size": 2}, "resume": None}
    first.fit()
    second = make_trainer(tmp_path, meta_steps=4)
    second.config = {"seed": 0, "trainer": {"meta_steps": 4, "meta_batch_size": 2}, "resume": "auto"}
    with caplog.at_level("WARNING", logger="metanas.trainer"):
        second.resume(tmp_path / "checkpoints" / "last.ckpt")
    assert "trainer.meta_steps: 2 -> 4" in caplog.text
    assert "resume" not in caplog.text.split("differ from the checkpoint:")[1]


def test_checkpoint_from_before_reduction_channel_scale_still_loads(tmp_path):
    """Checkpoints written before the setting existed imply DARTS's doubling (scale 2)."""
    from metanas.search_space import SearchSpaceConfig

    space = SearchSpaceConfig(n_classes=3, channels=4, n_cells=2, n_nodes=2).to_dict()
    old = {k: v for k, v in space.items() if k != "reduction_channel_scale"}
    save_checkpoint(tmp_path / "old.ckpt", {"step": 1, "search_space": old, "weights": {}, "alphas": {}})
    load_checkpoint(tmp_path / "old.ckpt", space)
    with pytest.raises(CheckpointError, match="reduction_channel_scale"):
        load_checkpoint(tmp_path / "old.ckpt", {**space, "reduction_channel_scale": 1})


def test_linear_meta_lr_schedule_gives_the_formula_at_every_step(tmp_path, recwarn):
    trainer = make_trainer(tmp_path, meta_lr_schedule="linear", alpha_warmup_steps=2)
    trainer.fit()
    expected = [0.5 * max(0.0, 1.0 - k / 6) for k in range(6)]
    assert [r["lr_weights"] for r in trainer.history] == expected
    assert [r["lr_alphas"] for r in trainer.history] == expected
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]  # alphas rest in warm-up


def test_resume_derives_the_learning_rates_from_the_step(tmp_path):
    straight = make_trainer(tmp_path / "a", meta_lr_schedule="linear")
    straight.fit()
    killed = make_trainer(tmp_path / "b", meta_lr_schedule="linear")
    killed.sampler = DyingTasks(die_at=2 * 4 + 1)
    with pytest.raises(Killed):
        killed.fit()
    # a checkpoint whose optimiser states hold other learning rates (e.g. of an older metanas)
    path = tmp_path / "b" / "checkpoints" / "last.ckpt"
    state = load_checkpoint(path)
    for key in ("opt_weights", "opt_alphas"):
        for group in state[key]["param_groups"]:
            group["lr"] = 123.0
    save_checkpoint(path, state)

    resumed = make_trainer(tmp_path / "b", meta_lr_schedule="linear")
    resumed.resume(path)
    resumed.fit()
    assert [r["lr_weights"] for r in resumed.history] == [r["lr_weights"] for r in straight.history]
    for name, p in straight.weights.items():
        assert torch.equal(p, resumed.weights[name]), name
    for name, p in straight.alphas.items():
        assert torch.equal(p, resumed.alphas[name]), name


class FakeClock:
    """``time.perf_counter`` that advances ``tick`` seconds whenever it is read."""

    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


def test_time_budget_stops_training_checkpoints_and_validates_the_last_step(tmp_path, monkeypatch):
    import metanas.trainer as trainer_module

    # every clock read advances 10 s; a meta-step without validation reads it twice
    monkeypatch.setattr(trainer_module.time, "perf_counter", FakeClock(10.0))
    trainer = make_trainer(tmp_path, meta_steps=50, val_every=0, ckpt_every=0,
                           time_budget_min=0.5)
    trainer.fit()
    steps = trainer.step
    assert 1 <= steps < 50 and trainer.train_time >= 30.0
    assert trainer.train_time - 60 * 0.5 < 20.0 + 1e-9  # stopped at the first step past the budget
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert state["step"] == steps
    # with validation: the last step is validated even when it is not a multiple of val_every
    trainer = make_trainer(tmp_path / "val", meta_steps=50, val_every=1000, ckpt_every=0,
                           time_budget_min=0.5)
    trainer.fit()
    assert trainer.best["step"] == trainer.step < 50


def test_no_time_budget_runs_every_meta_step(tmp_path, monkeypatch):
    import metanas.trainer as trainer_module

    monkeypatch.setattr(trainer_module.time, "perf_counter", FakeClock(1e6))
    trainer = make_trainer(tmp_path, meta_steps=4, val_every=0, ckpt_every=0)
    trainer.fit()
    assert trainer.step == 4


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "ten", True])
def test_time_budget_must_be_a_positive_number(bad):
    with pytest.raises(ConfigError, match="trainer.time_budget_min"):
        TrainerConfig(time_budget_min=bad)
