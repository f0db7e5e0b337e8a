"""metanas-report on hand-made sweep folders: every state of a run, the table, CSV and figure."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import pytest

from metanas.report import find_runs, genotype_summary, main, summarize, swept_keys

GENOTYPE = {"normal": [[["conv_3x3", 0], ["skip_connect", 1]], [["conv_3x3", 0], ["max_pool_3x3", 2]]],
            "normal_concat": [2, 3],
            "reduce": [[["avg_pool_3x3", 0], ["avg_pool_3x3", 1]], [["sep_conv_3x3", 0], ["skip_connect", 2]]],
            "reduce_concat": [2, 3]}


def _job(root, name, overrides, *, status=None, metrics=None, log="", steps=0):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if status is not None:
        (d / "status.json").write_text(json.dumps(status))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "genotype.json").write_text(json.dumps(GENOTYPE))
    if log:
        (d / "cli.log").write_text(log)
    if steps:
        (d / "train_log.csv").write_text("step,query_loss\n" + "".join(f"{i},1.0\n" for i in range(steps)))
    return d


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def sweep(tmp_path):
    host = socket.gethostname()
    base = ["experiment=smoke"]
    ok = {"accuracy": 0.8, "ci95": 0.02, "val_accuracy": 0.82, "val_ci95": 0.03, "meta_steps": 10,
          "wall_time_s": 12.5, "config": {"trainer": {"meta_steps": 10}}}
    _job(tmp_path, "0", base + ["inner.lr_weights=0.1"], status={"status": "ok"}, metrics=ok, steps=10)
    _job(tmp_path, "1", base + ["inner.lr_weights=0.5"], status={"status": "ok"},
         metrics={**ok, "accuracy": 0.9, "ci95": 0.01}, steps=10)
    _job(tmp_path, "2", base + ["inner.lr_weights=-1"],
         status={"status": "failed", "error": "ConfigError: inner learning rates must be >= 0"})
    _job(tmp_path, "3", base + ["inner.lr_weights=0.3"],
         status={"status": "running", "host": host, "pid": _dead_pid()},
         log="[2026-01-01][metanas.trainer][INFO] - meta-step 3/10\n", steps=3)
    _job(tmp_path, "4", base + ["inner.lr_weights=0.2"],
         status={"status": "running", "host": host, "pid": os.getpid()}, steps=4)
    _job(tmp_path, "5", base + ["inner.lr_weights=0.05"],
         log="Traceback (most recent call last):\n  File x\nRuntimeError: out of memory\n")
    _job(tmp_path, "6", base + ["inner.lr_weights=0.01"])
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    return tmp_path


def test_every_state_of_a_run_is_listed(sweep):
    runs = find_runs(sweep)
    assert [r.job for r in runs] == [str(i) for i in range(7)]
    assert [r.status for r in runs] == ["ok", "ok", "failed", "crashed", "running", "crashed", "unfinished"]
    assert "inner learning rates must be >= 0" in runs[2].error
    assert "killed" in runs[3].error and runs[3].steps_done == 3
    assert runs[5].error == "RuntimeError: out of memory"
    assert swept_keys(runs) == ["inner.lr_weights"]


def test_summary_files_and_table(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    runs, text = summarize(sweep, out)
    assert len(runs) == 7
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("| job"))
    assert "inner.lr_weights" in header and "test acc % (95% CI)" in header
    row1 = next(ln for ln in lines if ln.startswith("| 1 |"))
    assert "| ok | 0.5 | 90.00 ± 1.00 | 82.00 ± 3.00 | 10 | 12.5 s |" in row1
    assert "conv_3x3 x2, max_pool_3x3, skip_connect" in row1
    assert "avg_pool_3x3 x2, sep_conv_3x3, skip_connect" in row1
    assert "| 3 | crashed | 0.3 |" in text and "| 3/" not in text
    assert "7 runs: 2 crashed, 1 failed, 2 ok, 1 running, 1 unfinished" in text
    assert "best meta-test accuracy: job 1 (inner.lr_weights=0.5): 90.00 ± 1.00 %" in text
    with (out / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table][:3] == ["ok", "ok", "failed"]
    assert float(table[1]["accuracy"]) == 0.9 and table[1]["inner.lr_weights"] == "0.5"
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "summary.md").read_text() == text
    assert not (sweep / "summary.md").exists()


def test_genotype_summary_counts_ops_per_cell():
    assert genotype_summary(GENOTYPE) == {
        "normal": "conv_3x3 x2, max_pool_3x3, skip_connect",
        "reduce": "avg_pool_3x3 x2, sep_conv_3x3, skip_connect",
    }
    assert genotype_summary(None) == {"normal": "", "reduce": ""}


def test_cli_prints_the_table_and_rejects_an_empty_directory(sweep, tmp_path_factory, capsys):
    assert main([str(sweep)]) == 0
    assert "| job | status | inner.lr_weights |" in capsys.readouterr().out
    assert (sweep / "summary.csv").is_file()
    empty = tmp_path_factory.mktemp("empty")
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metanas-report: error: no run found in") and "multirun" in err
    assert not (empty / "summary.md").exists()
