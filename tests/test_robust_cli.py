"""Command lines that check their input, talk during long work, and export deployable models.

Counts and switches of both CLIs are checked (type and range, one line naming the key), JSON
results never hold NaN, error hints name only settings the command has, Hydra's own
configuration errors end like every other bad input (one line, exit status 2), long
evaluations log their progress, and exported models classify every image on its own.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_task
from hydra import compose, initialize_config_module
from test_adapt_cli import RESULTS, SAMPLERS, ckpt, folders  # noqa: F401 - fixtures
from test_trainer import RandomTasks

from metanas import rundir
from metanas.adapt_cli import adapt_command
from metanas.adaptation import adapt_support, load_meta_model
from metanas.cli import build_trainer
from metanas.engines import TaskPool
from metanas.errors import CheckpointError, ConfigError, DataError
from metanas.evaluate import evaluate
from metanas.export import BatchStatNorm, StandaloneClassifier, load_torchscript
from metanas.inner import InnerLoopConfig
from metanas.search_space import DiscreteNetwork, derive_genotype
from metanas.tasks import load_image_folder
from metanas.trainer import TrainerConfig

SIZE = 16
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
BIN = Path(sys.executable).parent
# what a failed metanas-train run may leave: its status and Hydra's own files
TRAIN_BOOKKEEPING = {rundir.STATUS, ".hydra", "cli.log"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapt_cfg(**overrides):
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        return compose("adapt", overrides=[f"{k}={v}" for k, v in overrides.items()])


def _train_cfg(*overrides):
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _written(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} if out.exists() else set()


def _run(args, cwd, prog=None):
    """A CLI in a subprocess: ``prog`` a console script in this venv, else ``python -m``."""
    cmd = [str(BIN / prog)] if prog else [sys.executable, "-m"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)


def _one_error_line(proc, prog: str) -> str:
    """The single line of stderr, which must be ``<prog>: error: ...``; returns the message."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0][len(f"{prog}: error: "):]


# ------------------------------------------------------------------ 5: JSON files
def test_json_files_are_valid_json_without_nan(tmp_path):
    content = {"accuracy": float("nan"), "ci95": [1.0, float("inf")], "nested": {"low": -math.inf},
               "fine": 0.5, "n": 3, "rows": ({"a": float("nan")},)}

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    for name in (rundir.METRICS, rundir.STATUS, rundir.MODEL_INFO, rundir.TASK_GENOTYPES):
        text = rundir.encode(name, content).decode()
        assert json.loads(text, parse_constant=refuse) == {
            "accuracy": None, "ci95": [1.0, None], "nested": {"low": None}, "fine": 0.5, "n": 3,
            "rows": [{"a": None}]}
    rundir.write(tmp_path, {rundir.METRICS: content})
    assert rundir.read(tmp_path, rundir.METRICS)["accuracy"] is None
