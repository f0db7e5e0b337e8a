"""The run directory: every file's format, writers and readers round trip, and metanas-report
reads what metanas-train writes, through the same definitions."""

from __future__ import annotations

import json
import os
import socket

import pytest
from hydra import compose, initialize_config_module
from test_trainer import make_trainer

from metanas import rundir
from metanas.cli import train
from metanas.report import find_runs, markdown
from metanas.search_space import Genotype

GENOTYPE = {"normal": [[["conv_3x3", 0], ["skip_connect", 1]]], "normal_concat": [2],
            "reduce": [[["avg_pool_3x3", 0], ["max_pool_3x3", 1]]], "reduce_concat": [2]}


@pytest.mark.parametrize("name,content,legacy", [
    (rundir.METRICS, {"accuracy": 0.5, "config": {"seed": 0}}, lambda c: json.dumps(c, indent=2) + "\n"),
    (rundir.STATUS, {"status": "ok", "pid": 1}, lambda c: json.dumps(c, indent=1) + "\n"),
    (rundir.GENOTYPE, GENOTYPE, lambda c: Genotype.from_dict(c).to_json() + "\n"),
    (rundir.TASK_GENOTYPES, [{"task": 0, "accuracy": 0.5, "genotype": GENOTYPE}],
     lambda c: json.dumps(c, indent=1)),
    (rundir.MODEL_INFO, {"parameters": 3, "class_names": ["a"]}, lambda c: json.dumps(c, indent=2)),
])
def test_json_files_keep_their_format_and_read_back(tmp_path, name, content, legacy):
    assert rundir.encode(name, content) == legacy(content).encode()
    rundir.write(tmp_path, {name: content})
    assert (tmp_path / name).read_text() == legacy(content)
    assert rundir.read(tmp_path, name) == content


def test_csv_rows_round_trip_with_the_union_of_their_columns(tmp_path):
    rows = [{"step": 1.0, "query_loss": 1.5}, {"step": 2.0, "query_loss": 1.25, "val_accuracy": 0.5}]
    rundir.write(tmp_path, {rundir.TRAIN_LOG: rows})
    assert (tmp_path / rundir.TRAIN_LOG).read_text().splitlines()[0] == "step,query_loss,val_accuracy"
    assert rundir.read(tmp_path, rundir.TRAIN_LOG) == [
        {"step": "1.0", "query_loss": "1.5", "val_accuracy": ""},
        {"step": "2.0", "query_loss": "1.25", "val_accuracy": "0.5"},
    ]


def test_bytes_text_and_files_that_are_missing_or_unreadable(tmp_path):
    rundir.write(tmp_path, {rundir.CELLS: b"\x89PNG...", "notes.md": "ä\n"})
    assert rundir.read(tmp_path, rundir.CELLS) == b"\x89PNG..."
    assert (tmp_path / "notes.md").read_bytes() == "ä\n".encode()
    assert rundir.read(tmp_path, rundir.METRICS) is None
    (tmp_path / rundir.METRICS).write_text('{"accuracy": 0.')  # cut short
    (tmp_path / "overrides.yaml").write_text("- [unclosed\n")
    assert rundir.read(tmp_path, rundir.METRICS) is None
    assert rundir.read(tmp_path, "overrides.yaml") is None


def test_write_encodes_every_file_before_writing_any(tmp_path):
    with pytest.raises(TypeError):
        rundir.write(tmp_path, {rundir.GENOTYPE: GENOTYPE, rundir.METRICS: {"bad": object()}})
    with pytest.raises(TypeError, match="no format"):
        rundir.write(tmp_path, {rundir.CELLS: {"not": "bytes"}})
    assert list(tmp_path.iterdir()) == []


def test_status_records_state_host_process_and_extra(tmp_path):
    rundir.write_status(tmp_path, "failed", error="ConfigError: bad")
    status = rundir.read(tmp_path, rundir.STATUS)
    assert (status["status"], status["error"]) == ("failed", "ConfigError: bad")
    assert (status["host"], status["pid"]) == (socket.gethostname(), os.getpid())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_run_dirs_are_the_folders_with_hydra_overrides(tmp_path):
    for job in ("0", "1/a", ".submitit/7"):
        rundir.write(tmp_path / job, {rundir.HYDRA_OVERRIDES: "- seed=0\n"})
    (tmp_path / "2").mkdir()
    assert rundir.run_dirs(tmp_path) == {tmp_path / "0", tmp_path / "1" / "a"}
    assert rundir.read(tmp_path / "0", rundir.HYDRA_OVERRIDES) == ["seed=0"]


def test_trainer_and_logger_write_where_rundir_reads(tmp_path):
    trainer = make_trainer(tmp_path)
    try:
        trainer.fit()
    finally:
        trainer.close()
    for name in (rundir.LAST_CKPT, rundir.BEST_CKPT):
        assert rundir.checkpoint_path(tmp_path, name).is_file()
    logged = rundir.read(tmp_path, rundir.TRAIN_LOG)
    assert [float(r["query_loss"]) for r in logged] == [r["query_loss"] for r in trainer.history]
    assert rundir.read(tmp_path, rundir.LEARNING_CURVES)[:4] == b"\x89PNG"


def test_report_reads_what_metanas_train_writes(tmp_path):
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=smoke", "device=cpu", "trainer.meta_steps=2", "trainer.val_every=2",
            "trainer.n_val_tasks=2", "trainer.n_test_tasks=3", "trainer.ckpt_every=2",
            "trainer.task_workers=1", "logger.curves=false"])
    run = tmp_path / "0"
    objective = train(cfg, run)
    rundir.write(run, {rundir.HYDRA_OVERRIDES: "- seed=0\n- trainer.meta_steps=2\n"})
    [record] = find_runs(tmp_path)
    metrics = rundir.read(run, rundir.METRICS)
    assert record.status == "ok" and record.error == ""
    assert record.metrics == metrics and metrics["val_accuracy"] == objective
    assert metrics["n_tasks"] == 3 and len(rundir.read(run, rundir.TASK_GENOTYPES)) == 3
    assert record.genotype == rundir.read(run, rundir.GENOTYPE) and "normal" in record.genotype
    assert record.steps_done == 2 and record.overrides == {"seed": "0", "trainer.meta_steps": "2"}
    assert f"| 0 | ok | {100 * metrics['accuracy']:.2f} ± " in markdown([record])
