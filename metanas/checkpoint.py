"""Atomic checkpoints of the complete meta-training state.

A checkpoint holds everything needed to continue a run as if it had never stopped: the
meta-weights and meta-alphas, both meta-optimiser states, the meta-step, the task sampler's
random generator state, torch's RNG state, the best validation result so far, the training
history and the resolved configuration. It is written to a temporary file in the target
folder, flushed to disk, and moved into place with :func:`os.replace`, so a run killed while
saving leaves the previous checkpoint intact.

Files are read with ``torch.load(weights_only=True)``: loading a checkpoint never executes
code from it.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import rundir
from .errors import CheckpointError
from .io import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "metanas-checkpoint"
VERSION = 1
_REQUIRED = ("format", "version", "step", "search_space", "weights", "alphas")
_SPACE_DEFAULTS = {"reduction_channel_scale": 2}
"""Search-space settings newer than checkpoint format 1, with the value older files imply."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a training state atomically.

    Args:
        path: destination file; its folder is created if needed.
        state: at least ``step``, ``search_space`` (a dict), ``weights`` and ``alphas``
            (name -> tensor); typically also optimiser states, RNG states and the config.
    """
    payload = {"format": FORMAT, "version": VERSION, **state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    log.debug("checkpoint written: %s (step %s)", path, state.get("step"))


def load_checkpoint(
    path: str | os.PathLike,
    search_space: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load and validate a checkpoint.

    Args:
        path: checkpoint file.
        search_space: if given, the configured search space (``SearchSpaceConfig.to_dict()``);
            a checkpoint of a different search space is refused.
        map_location: device to load tensors onto.

    Returns:
        The saved state dictionary.

    Raises:
        CheckpointError: the file is missing, corrupt, not a metanas checkpoint, of an
            unsupported version, or of a different search space.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass the path of a .ckpt file written by "
            f"metanas-train (e.g. {rundir.checkpoint_path('<run dir>', rundir.LAST_CKPT)})"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); "
            f"use another checkpoint (e.g. {rundir.BEST_CKPT} instead of {rundir.LAST_CKPT}) or start a new run"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a metanas checkpoint; pass a file written by metanas-train"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('version')}, this metanas "
            f"reads version {VERSION}; use the metanas release that wrote it"
        )
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is incomplete or damaged")
    # settings added after a checkpoint was written take their defaults
    saved = {**_SPACE_DEFAULTS, **state["search_space"]}
    if search_space is not None and saved != {**_SPACE_DEFAULTS, **search_space}:
        diff = sorted(
            k for k in set(search_space) | set(saved) if search_space.get(k) != saved.get(k)
        )
        details = ", ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs config {search_space.get(k)!r}" for k in diff
        )
        raise CheckpointError(
            f"checkpoint {path} was trained with a different search space ({details}); "
            "select the search space (and task) it was trained with, e.g. "
            "search_space=<its preset>, or start a new run without resume"
        )
    return state


__all__ = [
    "FORMAT",
    "VERSION",
    "load_checkpoint",
    "save_checkpoint",
]
