"""The run directory: the name, format, writer and reader of every file metanas puts there.

``metanas-train`` and ``metanas-adapt`` write run directories and ``metanas-report`` reads
them, all through this module: :func:`write` encodes each file in the format its name selects
(:func:`encode`) and writes it atomically; :func:`read` decodes it, or gives None for a file
that is missing or unreadable (a run that has not finished, or crashed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .io import atomic_write_bytes

METRICS = "metrics.json"  # results (of the meta-test or the adaptation) and the config
STATUS = "status.json"  # running, then ok, failed or interrupted: see write_status
GENOTYPE = "genotype.json"  # an architecture: Genotype.to_dict()
TASK_GENOTYPES = "task_genotypes.json"  # every evaluated task's accuracy and genotype
TRAIN_LOG = "train_log.csv"  # one row per meta-step
LEARNING_CURVES = "learning_curves.png"  # metanas.logger.plot_learning_curves
ALPHA_EVOLUTION = "alpha_evolution.png"  # metanas.logger.plot_alpha_evolution
TENSORBOARD = "tensorboard"  # folder of TensorBoard events (logger.tensorboard=true)
CHECKPOINTS, LAST_CKPT, BEST_CKPT = "checkpoints", "last.ckpt", "best.ckpt"  # see checkpoint_path
PREDICTIONS = "predictions.csv"  # metanas-adapt: class and probabilities per query image
TORCHSCRIPT, ONNX, MODEL_INFO = "model.pt", "model.onnx", "model_info.json"  # metanas-adapt's export
CELLS = "cells.png"  # picture of the cells of GENOTYPE
HYDRA_OVERRIDES, JOB_LOGS = ".hydra/overrides.yaml", "*.log"  # written by Hydra

# (indent, ending) of the JSON files not written as indent=2 plus a newline
_JSON_STYLE = {STATUS: (1, "\n"), GENOTYPE: (None, "\n"), TASK_GENOTYPES: (1, ""), MODEL_INFO: (2, "")}
_DECODERS = {".json": json.loads, ".yaml": yaml.safe_load,
             ".csv": lambda text: list(csv.DictReader(io.StringIO(text)))}


def checkpoint_path(run_dir: str | Path, name: str = LAST_CKPT) -> Path:
    """``run_dir/checkpoints/<name>``."""
    return Path(run_dir) / CHECKPOINTS / name


def _finite(content: Any) -> Any:
    """``content`` with every NaN or infinite float (nested in dicts, lists, tuples) as None."""
    if isinstance(content, float):
        return content if math.isfinite(content) else None
    if isinstance(content, Mapping):
        return {k: _finite(v) for k, v in content.items()}
    if isinstance(content, (list, tuple)):
        return [_finite(v) for v in content]
    return content


def encode(name: str, content: Any) -> bytes:
    """The bytes of the file ``name`` holding ``content``: bytes as they are, text as UTF-8,
    rows (dicts; their keys in first-seen order make the header) as CSV for a ``.csv`` name,
    anything else as JSON for a ``.json`` name (indented as that file has always been).

    JSON files are always valid JSON: a NaN or infinite float is written as ``null`` (JSON has
    no such numbers; ``json.dumps`` would write a bare ``NaN``).

    Raises:
        TypeError: content that the name gives no format for.
    """
    if isinstance(content, (bytes, str)):
        return content.encode("utf-8") if isinstance(content, str) else content
    if name.endswith(".csv"):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in content for k in row)))
        writer.writeheader()
        writer.writerows(content)
        return buf.getvalue().encode("utf-8")
    if name.endswith(".json"):
        indent, end = _JSON_STYLE.get(name, (2, "\n"))
        return (json.dumps(_finite(content), indent=indent, allow_nan=False) + end).encode("utf-8")
    raise TypeError(f"no format for {name}: give its content as bytes or text")


def write(run_dir: str | Path, files: Mapping[str, Any]) -> None:
    """Write ``files`` (name -> content: :func:`encode`) into ``run_dir``, atomically, in order;
    all are encoded first, so content that cannot be encoded writes nothing."""
    data = {name: encode(name, content) for name, content in files.items()}
    for name, blob in data.items():
        atomic_write_bytes(Path(run_dir) / name, blob)


def write_status(run_dir: str | Path, status: str, **extra: Any) -> None:
    """:data:`STATUS`: ``status`` with host, process id, time and ``extra`` (error, objective)."""
    write(run_dir, {STATUS: {"status": status, "host": socket.gethostname(), "pid": os.getpid(),
                             "time": time.time(), **extra}})


def read(run_dir: str | Path, name: str) -> Any:
    """The content of ``run_dir/name``, None when it is missing or unreadable: JSON and YAML
    parsed, a CSV file's rows (dicts of strings), or any other file's bytes."""
    path = Path(run_dir) / name
    decode = _DECODERS.get(path.suffix)
    try:
        return decode(path.read_text()) if decode else path.read_bytes()
    except (OSError, ValueError, yaml.YAMLError, csv.Error):
        return None


def run_dirs(root: str | Path) -> set[Path]:
    """The run directories at or below ``root``: folders with :data:`HYDRA_OVERRIDES` (``.submitit`` aside)."""
    return {p.parents[1] for p in Path(root).rglob(HYDRA_OVERRIDES) if ".submitit" not in p.parts}


__all__ = ["BEST_CKPT", "CELLS", "CHECKPOINTS", "GENOTYPE", "HYDRA_OVERRIDES", "JOB_LOGS", "LAST_CKPT",
           "LEARNING_CURVES", "METRICS", "MODEL_INFO", "ONNX", "PREDICTIONS", "STATUS", "TASK_GENOTYPES",
           "TENSORBOARD", "TORCHSCRIPT", "TRAIN_LOG", "checkpoint_path", "encode", "read", "run_dirs",
           "write", "write_status"]
