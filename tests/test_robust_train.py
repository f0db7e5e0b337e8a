"""Fail loudly and lose nothing: divergence, foreign meta-optimisers, damaged or unsafe
checkpoints, leftovers of killed writes, and SIGKILLs at random points of a run."""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from conftest import make_task, tiny_space
from metanas import rundir
from metanas.algorithms import FOMAML, Reptile
from metanas.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from metanas.cli import build_trainer
from metanas.distributed import DistContext
from metanas.errors import CheckpointError, ConfigError
from metanas.inner import InnerLoopConfig
from metanas.search_space import SearchNetwork, init_alphas
from metanas.trainer import MetaTrainer, TrainerConfig

LR_SETTINGS = ("inner.lr_weights", "inner.lr_alphas", "optim.weights.lr", "optim.alphas.lr")
RESULTS = (rundir.METRICS, rundir.GENOTYPE, rundir.TASK_GENOTYPES)
# the smoke experiment, smaller still: a step takes a fraction of a second on one core
TINY = ("experiment=smoke", "task.n_way=3", "task.q_query=2", "task.image_size=14",
        "search_space.channels=4", "inner.steps=1", "trainer.n_val_tasks=2", "trainer.n_test_tasks=2",
        "trainer.compare_frozen_alphas=false", "trainer.task_workers=1", "logger.curves=false")


class RandomTasks:
    n_way, k_shot, q_query, input_shape = 3, 2, 2, (1, 8, 8)

    def sample(self, split, rng):
        return make_task(int(rng.integers(1 << 30)), dtype=torch.float32)


def make_trainer(run_dir, optimizer="sgd", meta_lr=0.5, inner=None, **cfg):
    space = tiny_space()
    torch.manual_seed(0)
    net = SearchNetwork(space)
    alphas = init_alphas(space, generator=torch.Generator().manual_seed(0))
    opt = functools.partial(torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam, lr=meta_lr)
    settings = dict(meta_steps=4, meta_batch_size=2, val_every=1, n_val_tasks=2, ckpt_every=1,
                    n_test_tasks=2, progress=False)
    settings.update(cfg)
    return MetaTrainer(
        net=net, alphas=alphas, sampler=RandomTasks(),
        algorithm=Reptile() if optimizer == "sgd" else FOMAML(),
        inner=inner or InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.2),
        weights_optimizer=opt, alphas_optimizer=opt, search_space=space,
        cfg=TrainerConfig(**settings), run_dir=run_dir,
    )


def run_cli(*args, cwd):
    # one intra-op thread: with several, tiny kernels on a loaded 2-core machine run ~20x slower
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "metanas.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def one_error_line(proc) -> str:
    """The CLI's error: exit 2, a single ``metanas-train: error:`` line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("metanas-train: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _compose(overrides):
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def assert_no_results(run_dir: Path) -> None:
    assert not [name for name in RESULTS if (run_dir / name).exists()]


def ckpt(run_dir: Path, name: str = rundir.LAST_CKPT) -> Path:
    return rundir.checkpoint_path(run_dir, name)


# ------------------------------------------------------------------ 1. divergence
def test_divergent_inner_lr_stops_at_the_first_step_and_writes_no_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, inner=InnerLoopConfig(steps=2, lr_weights=1e30, lr_alphas=0.2))
    with pytest.raises(ConfigError) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message
    assert "meta-step 1:" in message and "query loss" in message and "nan" in message
    assert "inner.lr_weights=1e+30" in message
    assert all(name in message for name in LR_SETTINGS), message
    assert trainer.step == 0 and not trainer.history
    assert not ckpt(tmp_path).parent.exists()


def test_divergence_after_checkpoints_leaves_them_finite_and_untouched(tmp_path):
    trainer = make_trainer(tmp_path, meta_steps=2)
    trainer.fit()  # two good steps, both checkpointed and validated (best.ckpt)
    before = {name: ckpt(tmp_path, name).read_bytes() for name in (rundir.LAST_CKPT, rundir.BEST_CKPT)}
    trainer.cfg = replace(trainer.cfg, meta_steps=5)
    trainer.inner = replace(trainer.inner, lr_weights=1e30)
    with pytest.raises(ConfigError, match="diverged at meta-step 3: the query loss"):
        trainer.fit()
    for name, data in before.items():
        assert ckpt(tmp_path, name).read_bytes() == data, name
        state = load_checkpoint(ckpt(tmp_path, name))
        assert state["step"] == (2 if name == rundir.LAST_CKPT else trainer.best["step"])
        assert all(t.isfinite().all() for t in [*state["weights"].values(), *state["alphas"].values()])


def test_a_meta_update_to_non_finite_parameters_stops_the_run(tmp_path):
    trainer = make_trainer(tmp_path, meta_lr=math.inf)  # finite losses, an infinite update
    with pytest.raises(ConfigError) as info:
        trainer.fit()
    message = str(info.value)
    assert "meta-step 1: the meta-update made the meta-weights" in message and "\n" not in message
    assert "optim.weights.lr=inf" in message and all(n in message for n in LR_SETTINGS)
    assert not ckpt(tmp_path).exists()


class PoisonedGradients:
    """Reptile, but one meta-gradient value of the weights is NaN (the losses stay finite)."""

    def meta_gradients(self, *args, **kwargs):
        grads = Reptile().meta_gradients(*args, **kwargs)
        name = next(iter(grads.weights))
        grads.weights[name] = grads.weights[name].clone().index_fill_(0, torch.tensor([0]), math.nan)
        return grads


def test_a_non_finite_meta_gradient_stops_the_run_before_the_update(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.algorithm = PoisonedGradients()
    before = {k: v.detach().clone() for k, v in {**trainer.weights, **trainer.alphas}.items()}
    with pytest.raises(ConfigError, match="meta-step 1: the meta-gradient of the meta-weights is not finite"):
        trainer.fit()
    assert all(torch.equal(v, before[k]) for k, v in {**trainer.weights, **trainer.alphas}.items())
    assert not ckpt(tmp_path).exists()


def test_save_refuses_non_finite_parameters_and_keeps_the_file(tmp_path):
    trainer = make_trainer(tmp_path)
    path = trainer.save()
    before = path.read_bytes()
    with torch.no_grad():
        next(iter(trainer.alphas.values()))[0, 0] = float("inf")
    with pytest.raises(ConfigError, match="not finite; last.ckpt is not overwritten"):
        trainer.save()
    assert path.read_bytes() == before


def test_cli_divergence_fails_with_one_line_exit_2_and_status_failed(tmp_path):
    run_dir = tmp_path / "run"
    leftover = ckpt(run_dir).parent / f".{rundir.LAST_CKPT}.k1ll3d.tmp"  # of an earlier killed run
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a checkpoint")
    proc = run_cli(*TINY, "inner.lr_weights=1e30", "trainer.meta_steps=3", f"hydra.run.dir={run_dir}",
                   cwd=tmp_path)
    line = one_error_line(proc)
    assert "diverged at meta-step 1" in line and all(n in line for n in LR_SETTINGS), line
    status = json.loads((run_dir / rundir.STATUS).read_text())
    assert status["status"] == "failed" and "diverged at meta-step 1" in status["error"]
    assert_no_results(run_dir)
    assert not leftover.exists() and not list(ckpt(run_dir).parent.iterdir())  # 10: removed, none written
    log_text = "".join(p.read_text() for p in run_dir.glob(rundir.JOB_LOGS))
    assert f"removed 1 temporary file(s) left by interrupted writes: {leftover}" in log_text


# ------------------------------------------------------ 4. another meta-optimiser
def test_resume_with_another_meta_optimiser_names_both_classes(tmp_path):
    adam = make_trainer(tmp_path, optimizer="adam", meta_lr=1e-3)
    adam.meta_step()
    path = adam.save()
    sgd = make_trainer(tmp_path / "other", optimizer="sgd")
    with pytest.raises(CheckpointError) as info:
        sgd.resume(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "torch.optim.adam.Adam (weights) and torch.optim.adam.Adam (alphas)" in message
    assert "this run asks for torch.optim.sgd.SGD (weights) and torch.optim.sgd.SGD (alphas)" in message
    assert sgd.step == 0  # nothing restored
    again = make_trainer(tmp_path / "same", optimizer="adam", meta_lr=1e-3)
    again.resume(path)  # the same classes resume
    assert again.step == 1


@pytest.mark.parametrize("first,second", [("adam", "sgd"), ("sgd", "adam")])
def test_old_checkpoint_without_class_names_is_compared_by_its_settings(tmp_path, first, second):
    trainer = make_trainer(tmp_path, optimizer=first, meta_lr=1e-3)
    trainer.meta_step()
    state = trainer.state_dict()
    del state["optimizer_classes"]  # as written before the names were recorded
    path = tmp_path / "old.ckpt"
    save_checkpoint(path, state)
    other = make_trainer(tmp_path / "b", optimizer=second, meta_lr=1e-3)
    with pytest.raises(CheckpointError, match="records no optimiser class.*another meta-optimiser") as info:
        other.resume(path)
    assert "\n" not in str(info.value)
    same = make_trainer(tmp_path / "c", optimizer=first, meta_lr=1e-3)
    same.resume(path)
    same.meta_step()  # and it steps: no KeyError from a foreign param group
    assert same.step == 2


def test_cli_resume_of_an_adam_checkpoint_with_reptile_is_refused(tmp_path):
    trainer = build_trainer(_compose([*TINY, "device=cpu"]), tmp_path / "first")  # FOMAML: Adam
    try:
        path = trainer.save()
    finally:
        trainer.close()
    run_dir = tmp_path / "second"
    proc = run_cli(*TINY, "algorithm=reptile", f"resume={path}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    line = one_error_line(proc)
    assert "torch.optim.adam.Adam (weights)" in line and "asks for torch.optim.sgd.SGD (weights)" in line
    assert "KeyError" not in proc.stderr
    assert json.loads((run_dir / rundir.STATUS).read_text())["status"] == "failed"
    assert_no_results(run_dir)


# -------------------------------------------- 6 and 8. damaged and unsafe checkpoints
def _saved(tmp_path) -> tuple[Path, dict]:
    trainer = make_trainer(tmp_path)
    trainer.meta_step()
    return trainer.save(), trainer.state_dict()


def flip_inside_a_tensor(path: Path, tensor: torch.Tensor) -> None:
    """Change one byte in the middle of ``tensor``'s data as stored in ``path``."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "the tensor's bytes are not in the file once"
    data[at + len(raw) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_byte_flipped_inside_a_tensor_is_refused(tmp_path):
    path, state = _saved(tmp_path)
    name = max(state["weights"], key=lambda k: state["weights"][k].numel())
    flip_inside_a_tensor(path, state["weights"][name])
    # without the hash it would load: the damage sits in one weight's data, nothing else
    envelope = torch.load(path, weights_only=True)
    silent = torch.load(io.BytesIO(envelope["payload"].numpy().tobytes()), weights_only=True)
    assert [k for k in state["weights"] if not torch.equal(silent["weights"][k], state["weights"][k])] == [name]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "does not match the sha256" in message and "best.ckpt" in message


def test_format_version_1_checkpoints_still_load(tmp_path, caplog):
    _, state = _saved(tmp_path)
    state.pop("optimizer_classes", None)  # not recorded before format 2
    path = tmp_path / "v1.ckpt"
    torch.save({"format": FORMAT, "version": 1, **state}, path)  # as metanas wrote them before
    with caplog.at_level(logging.DEBUG, logger="metanas.checkpoint"):
        loaded = load_checkpoint(path, tiny_space().to_dict())
    assert "format version 1: no content hash to verify" in caplog.text
    assert all(torch.equal(loaded["weights"][k], v) for k, v in state["weights"].items())
    resumed = make_trainer(tmp_path / "b")
    resumed.resume(path)
    assert resumed.step == 1
    with pytest.raises(CheckpointError, match="version 7"):
        torch.save({"format": FORMAT, "version": 7, **state}, path)
        load_checkpoint(path)


class RunsCode:
    """Unpickling this runs a shell command: a checkpoint must never be loaded like that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _unreadable_files(tmp_path: Path, good: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """kind -> (file, a word its message must contain)."""
    files = {}

    def put(kind, data, expected):
        files[kind] = (tmp_path / f"{kind}.ckpt", expected)
        files[kind][0].write_bytes(data)

    put("random_bytes", random.Random(3).randbytes(4096), "not a checkpoint")
    put("text", b"not a checkpoint", "not a checkpoint")
    put("empty", b"", "empty")
    put("truncated", good.read_bytes()[: good.stat().st_size // 2], "truncated")
    put("pickle_protocol_2", pickle.dumps(RunsCode(marker), protocol=2), "would import and run code")
    put("pickle_protocol_5", pickle.dumps(RunsCode(marker), protocol=5), "would import and run code")
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": 2, "step": RunsCode(marker)}, buffer)
    put("torch_archive_with_code", buffer.getvalue(), "would import and run code")
    files["missing"] = (tmp_path / "missing.ckpt", "does not exist")
    return files


def test_unreadable_checkpoints_get_one_line_messages_that_never_advise_unsafe_loading(tmp_path):
    good, _ = _saved(tmp_path / "good")
    marker = tmp_path / "code_ran"
    for kind, (path, expected) in _unreadable_files(tmp_path, good, marker).items():
        with pytest.raises(CheckpointError) as info, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_checkpoint(path)
        assert not caught, (kind, [str(w.message) for w in caught])  # torch's warnings: not shown
        message = str(info.value)
        assert "\n" not in message and len(message) < 400, (kind, message)
        assert expected in message and str(path) in message, (kind, message)
        assert "weights_only" not in message and "trust" not in message, (kind, message)
        # no chained torch error (with its advice) either
        assert info.value.__cause__ is None, kind
        assert info.value.__context__ is None or info.value.__suppress_context__, kind
    assert not marker.exists()
    # the code a pickle would run is named
    with pytest.raises(CheckpointError, match=r"\((posix|os|nt)\.system\)"):
        load_checkpoint(tmp_path / "pickle_protocol_5.ckpt")


@pytest.mark.parametrize("kind", ["flipped", "pickle_protocol_5"])
def test_cli_refuses_a_damaged_or_unsafe_checkpoint_in_one_line(tmp_path, kind):
    cfg = _compose([*TINY, "device=cpu"])
    trainer = build_trainer(cfg, tmp_path / "first")
    try:
        path = trainer.save()
        weight = next(iter(trainer.weights.values())).detach().cpu()
    finally:
        trainer.close()
    marker = tmp_path / "code_ran"
    if kind == "flipped":
        flip_inside_a_tensor(path, weight)
    else:
        path.write_bytes(pickle.dumps(RunsCode(marker), protocol=5))
    run_dir = tmp_path / "second"
    proc = run_cli(*TINY, f"resume={path}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    line = one_error_line(proc)
    assert ("sha256" if kind == "flipped" else "would import and run code") in line, line
    assert "weights_only" not in proc.stderr and not marker.exists()
    assert json.loads((run_dir / rundir.STATUS).read_text())["status"] == "failed"
    assert_no_results(run_dir)


# ----------------------------------------------------- 10. leftovers of killed writes
def test_stale_temporaries_are_removed_when_a_trainer_starts(tmp_path, caplog):
    stale = [ckpt(tmp_path).parent / ".last.ckpt.a1b2.tmp", tmp_path / ".train_log.csv.c3d4.tmp"]
    kept = [ckpt(tmp_path, rundir.BEST_CKPT), tmp_path / "notes.tmp"]
    follower = make_trainer(tmp_path)
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    follower.dist = DistContext(rank=1, world_size=2)  # a process other than rank 0 removes nothing
    assert follower.remove_stale_temporaries() == [] and all(p.exists() for p in stale)
    with caplog.at_level(logging.INFO, logger="metanas.trainer"):
        make_trainer(tmp_path)
    assert not [p for p in stale if p.exists()] and all(p.exists() for p in kept)
    assert "removed 2 temporary file(s) left by interrupted writes" in caplog.text
    assert all(str(p) in caplog.text for p in stale)


# ------------------------------------------------------------- fault injection
def _comparable(state: dict) -> dict:
    """What must be bit-identical between a killed-and-resumed and an uninterrupted run.

    Not ``rng_torch``: torch seeds its global generator at random in every process and the
    meta-training draws nothing from it, so it differs between any two processes.
    """
    return {
        "step": state["step"], "weights": state["weights"], "alphas": state["alphas"],
        "opt": (state["opt_weights"], state["opt_alphas"]), "rng_tasks": state["rng_tasks"],
        "best": state["best"], "history": [{k: v for k, v in row.items() if k != "time_s"}
                                           for row in state["history"]],
    }


def _assert_identical(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN == NaN here


def _temporaries(run_dir: Path) -> list[Path]:
    return [p for folder in (run_dir, ckpt(run_dir).parent) if folder.is_dir()
            for p in folder.glob(".*.tmp")]


def _writes(path: Path) -> tuple[int, int] | None:
    """An id of the file now at ``path`` (a new inode per atomic write), None when absent."""
    try:
        stat = os.stat(path)
        return stat.st_ino, stat.st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_auto_equals_an_uninterrupted_run(tmp_path):
    args = [*TINY, "trainer.meta_steps=12", "trainer.ckpt_every=1", "trainer.val_every=4",
            "trainer.log_every=4", "resume=auto"]
    straight = tmp_path / "straight"
    proc = run_cli(*args, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_dir, rng = tmp_path / "killed", random.Random(20261201)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    kills, during_write = [], 0
    for attempt in range(6):
        # odd attempts: SIGKILL at a random moment after a random number of checkpoint writes;
        # even ones: SIGKILL the moment a checkpoint's temporary file appears (mid-write)
        mid_write, wait_writes = attempt % 2 == 0, rng.randint(1, 3)
        delay = rng.uniform(0.0, 0.6)
        child = subprocess.Popen([sys.executable, "-m", "metanas.cli", *args, f"hydra.run.dir={run_dir}"],
                                 cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen, last, deadline = 0, _writes(ckpt(run_dir)), time.monotonic() + 300
        while child.poll() is None and time.monotonic() < deadline:
            now = _writes(ckpt(run_dir))
            if now != last:
                seen, last = seen + 1, now
            if seen >= wait_writes:
                if not mid_write:
                    time.sleep(delay)
                    break
                if [p for p in ckpt(run_dir).parent.glob(".*.tmp")]:
                    break
            time.sleep(0.0005 if seen >= wait_writes else 0.01)
        if child.poll() is not None:  # finished before the kill
            assert child.returncode == 0, child.stderr.read().decode()[-3000:]
            child.stderr.close()
            break
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        child.stderr.close()
        left = _temporaries(run_dir)
        during_write += any(p.name.endswith(".tmp") and ".ckpt." in p.name for p in left)
        for name in (rundir.LAST_CKPT, rundir.BEST_CKPT):  # every checkpoint left behind loads
            if ckpt(run_dir, name).exists():
                kills.append((attempt, name, load_checkpoint(ckpt(run_dir, name))["step"]))
    print(f"checkpoints after each kill (attempt, file, step): {kills}; kills inside a write: {during_write}")
    assert kills, "no kill landed"
    assert during_write >= 1, f"no kill landed inside a checkpoint write ({kills})"

    final = run_cli(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not _temporaries(run_dir)  # the leftovers of the killed writes are gone
    for name in (rundir.LAST_CKPT, rundir.BEST_CKPT):
        _assert_identical(_comparable(load_checkpoint(ckpt(straight, name))),
                          _comparable(load_checkpoint(ckpt(run_dir, name))), name)
    a, b = (json.loads((d / rundir.METRICS).read_text()) for d in (straight, run_dir))
    assert (a["accuracy"], a["val_accuracy"], a["best_step"]) == (b["accuracy"], b["val_accuracy"], b["best_step"])
