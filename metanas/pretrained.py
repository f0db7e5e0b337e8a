"""The meta-trained model that ships inside the package, and how to make one.

``metanas-adapt`` adapts :data:`OMNIGLOT` when no ``checkpoint=`` is given, so that a first
``metanas-adapt support=<folder> query=<folder>`` works without training anything: a supernet
meta-trained on Omniglot's background alphabets for 5-way 1-shot tasks of 28x28 images
(``metanas/pretrained/README.md`` holds the command that made it and its meta-test figures;
``omniglot_5w1s.json`` its ``metrics.json``).

A shipped checkpoint is *slim*: the state that adaptation reads (weights, alphas, model and
search space, op mask, learned inner rates, the resolved configuration, the best validation
result and the step) without what only a resumed run needs (meta-optimiser states, random
generator states, the training history). ``metanas-train resume=<slim file>`` is refused with
a message that says so. Make one from a finished run with::

    python -m metanas.pretrained <run dir> metanas/pretrained/omniglot_5w1s
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from . import rundir
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import CheckpointError

DIR = Path(__file__).resolve().parent / "pretrained"
OMNIGLOT = DIR / "omniglot_5w1s.ckpt"
"""The bundled Omniglot 5-way 1-shot supernet (``metanas-adapt``'s default checkpoint)."""

SLIM_KEYS = ("step", "search_space", "model", "weights", "alphas", "op_mask", "shrink_counts", "rates",
             "config", "best", "train_time")
"""What a slim checkpoint keeps (the keys a state has of these)."""


def default_checkpoint() -> Path:
    """The bundled checkpoint.

    Raises:
        CheckpointError: it is not there (an installation without the package data).
    """
    if not OMNIGLOT.is_file():
        raise CheckpointError(
            f"the bundled checkpoint {OMNIGLOT} is missing (this installation lacks metanas's package "
            "data); reinstall metanas, or pass checkpoint=<run dir>/checkpoints/best.ckpt"
        )
    return OMNIGLOT


def slim_state(state: dict[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint state that adaptation reads (:data:`SLIM_KEYS`), marked slim."""
    return {**{k: state[k] for k in SLIM_KEYS if k in state}, "slim": True}


def make_slim(run_dir: str | os.PathLike, dest: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<dest>.ckpt`` (the run's best checkpoint, slim) and ``<dest>.json`` (its
    ``metrics.json``); returns both paths.

    Raises:
        CheckpointError: the run has no best checkpoint, or it does not load.
        FileNotFoundError: the run has no ``metrics.json`` (it did not finish).
    """
    run_dir, dest = Path(run_dir), Path(dest)
    state = load_checkpoint(rundir.checkpoint_path(run_dir, rundir.BEST_CKPT))
    metrics = run_dir / rundir.METRICS
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist: the run did not finish; ship a finished run")
    ckpt, info = dest.with_suffix(".ckpt"), dest.with_suffix(".json")
    save_checkpoint(ckpt, slim_state(state))
    shutil.copyfile(metrics, info)
    return ckpt, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a slim checkpoint (for metanas-adapt) of a "
                                     "finished metanas-train run, with its metrics.json beside it.")
    parser.add_argument("run_dir", help="the run directory (with checkpoints/best.ckpt and metrics.json)")
    parser.add_argument("dest", help="destination without suffix: writes DEST.ckpt and DEST.json")
    args = parser.parse_args(argv)
    try:
        ckpt, info = make_slim(args.run_dir, args.dest)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = ckpt.stat().st_size / 2**20
    accuracy = json.loads(info.read_text()).get("accuracy")
    print(f"wrote {ckpt} ({size:.2f} MiB) and {info} (meta-test accuracy {accuracy})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
