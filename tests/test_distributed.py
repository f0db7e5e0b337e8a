"""Several processes (gloo on CPU) give the same meta-training as one; resume across world sizes;
a dying process ends the job with a clear error instead of hanging."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metanas.distributed import DistContext, init_distributed
from metanas.errors import ConfigError

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _worker(tmp, name, steps, *, procs=1, resume=None, env=None):
    out = tmp / f"{name}.pt"
    args = [str(WORKER), str(out), str(tmp / name.split("_")[0]), str(steps)]
    args += [str(resume)] if resume else []
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={procs}", *args]
    proc = subprocess.run(cmd, check=False, cwd=tmp, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def _assert_same(a, b, atol=1e-12):
    for group in ("weights", "alphas"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            torch.testing.assert_close(a[group][k], b[group][k], rtol=0, atol=atol)


def test_single_process_context_is_a_no_op():
    ctx = DistContext()
    assert ctx.is_main and not ctx.enabled
    t = {"a": torch.ones(2, 3)}
    assert ctx.all_reduce_mean(t, weight=5.0)["a"] is t["a"]
    assert ctx.shard([1, 2, 3]) == [1, 2, 3]
    assert DistContext(rank=1, world_size=2).shard([0, 1, 2, 3, 4]) == [1, 3]
    assert ctx.broadcast_object("x") == "x"


def test_init_without_torchrun_variables_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR.*torchrun"):
        init_distributed()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ConfigError, match="nccl needs device=cuda"):
        init_distributed(backend="nccl")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not init_distributed().enabled


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_and_resume_with_any_world_size(tmp_path):
    # meta-batch of 3 tasks: rank 0 adapts two, rank 1 one (shares weighted by task count);
    # Adam meta-optimisers, an alpha warm-up step, rank-0 validation every 2 steps, float64.
    one = _worker(tmp_path, "one", 4)
    two = _worker(tmp_path, "two", 4, procs=2)
    _assert_same(one, two)
    assert [r["query_loss"] for r in one["history"]] == pytest.approx(
        [r["query_loss"] for r in two["history"]], abs=1e-12)
    assert [r.get("val_accuracy") for r in one["history"]] == [r.get("val_accuracy") for r in two["history"]]
    # only rank 0 writes: one train log with one row per step
    assert (tmp_path / "two" / "train_log.csv").read_text().count("\n") == 5
    # two processes for 2 steps, resumed by one process to step 4 == one process throughout
    _worker(tmp_path, "half", 2, procs=2)
    resumed = _worker(tmp_path, "half_resumed", 4, resume=tmp_path / "half" / "checkpoints" / "last.ckpt")
    _assert_same(one, resumed)
    # and one process for 2 steps, resumed by two
    _worker(tmp_path, "first", 2)
    resumed = _worker(tmp_path, "first_resumed", 4, procs=2,
                      resume=tmp_path / "first" / "checkpoints" / "last.ckpt")
    _assert_same(one, resumed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("failure,extra", [("dies", {}), ("hangs", {"HANG": "300", "TIMEOUT_S": "5"})])
def test_a_dying_or_hanging_process_ends_the_job_with_a_clear_error(failure, extra, tmp_path):
    # launched by hand (as a scheduler would), so no torchrun agent cleans up after the bad rank
    port = str(_free_port())
    procs = []
    for rank in (1, 0):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DIE_RANK": "1", "DIE_STEP": "1",
               "TIMEOUT_S": "60", **extra}
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path / "out.pt"), str(tmp_path / "run"), "4"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _, err0 = procs[1].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    if failure == "dies":
        assert procs[0].returncode == 3
    assert procs[1].returncode == 1, (procs[1].returncode, err0[-2000:])
    assert "rank 0/2: all_reduce failed" in err0 and "another process probably died or hung" in err0
    assert ("Timed out" in err0) == (failure == "hangs")
    assert "Traceback" not in err0
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.slow
def test_cli_under_torchrun_writes_once_and_reports(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "metanas.cli", "experiment=smoke",
         "trainer.meta_steps=2", "trainer.val_every=2", "trainer.n_test_tasks=4", "device=cpu",
         f"hydra.run.dir={run_dir}"],
        check=False, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_tasks"] == 4 and metrics["meta_steps"] == 2
    assert json.loads((run_dir / "status.json").read_text())["status"] == "ok"
    assert (run_dir / "train_log.csv").read_text().count("\n") == 3
    assert (run_dir / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_ends_a_failed_collective_with_exit_1_and_its_message(tmp_path):
    # the failure is planted in train(); the exit goes through metanas-train's own error path
    code = ("import sys, metanas.cli as cli\n"
            "from metanas.distributed import DistributedError\n"
            "def broken(cfg):\n"
            "    raise DistributedError('rank 0/2: all_reduce failed (planted)')\n"
            "cli.train = broken\n"
            f"sys.argv = ['metanas-train', 'experiment=smoke', 'hydra.run.dir={tmp_path / 'run'}']\n"
            "cli.train_entry()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "metanas-train: error: rank 0/2: all_reduce failed (planted)" in proc.stderr
    assert "Traceback" not in proc.stderr
