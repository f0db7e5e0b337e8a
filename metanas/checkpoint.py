"""Atomic, hashed checkpoints of the complete meta-training state.

A checkpoint holds everything needed to continue a run as if it had never stopped: the
meta-weights and meta-alphas, the model spec (``model``, :mod:`metanas.models`; a file
without it holds a supernet), both meta-optimiser states (and their class names), with
Meta-SGD the learned inner rates (``rates``: ``{"weights": ..., "alphas": ...}``) and their
meta-optimiser's state (``opt_rates``; files without them still load), the
meta-step, the task sampler's random generator state, torch's RNG state, the best validation
result so far, the training history and the resolved configuration. It is written to a
temporary file in the target folder, flushed to disk, and moved into place with
:func:`os.replace`, so a run killed while saving leaves the previous checkpoint intact.

Layout (format version 2): the state is serialised with :func:`torch.save` into a payload,
and the file is a :func:`torch.save` of ``{"format", "version", "sha256", "payload"}``: the
payload as a 1-D ``uint8`` tensor and its SHA-256 (hex) beside it. Loading verifies the hash before the payload is unpickled,
so a file whose bytes changed on disk or in transfer (even inside a tensor's data, which the
zip container does not check) is refused. Version 1 files (the state itself, no hash) still
load.

Files are read with ``torch.load(weights_only=True)``: loading a checkpoint never executes
code from it. Every refusal is a one-line :class:`~metanas.errors.CheckpointError`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickletools
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from . import rundir
from .errors import CheckpointError
from .io import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "metanas-checkpoint"
VERSION = 2
"""Format version written: 2 (hashed payload); :func:`load_checkpoint` reads 1 and 2."""
_READABLE = (1, 2)
_REQUIRED = ("format", "version", "step", "search_space", "weights", "alphas")
_SPACE_DEFAULTS = {"reduction_channel_scale": 2}
"""Search-space settings newer than checkpoint format 1, with the value older files imply."""
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_SCAN_LIMIT = 1 << 24
"""Bytes of a refused pickle scanned for the code it would import (:func:`_imported_code`)."""


def _serialise(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a training state atomically, with the SHA-256 of its serialised payload.

    Args:
        path: destination file; its folder is created if needed.
        state: at least ``step``, ``search_space`` (a dict), ``weights`` and ``alphas``
            (name -> tensor); typically also optimiser states, RNG states and the config.
            A state returned by :func:`load_checkpoint` can be saved again.
    """
    body = {k: v for k, v in state.items() if k not in ("format", "version")}
    payload = _serialise({"format": FORMAT, "version": VERSION, **body})
    envelope = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    atomic_write_bytes(path, _serialise(envelope))
    log.debug("checkpoint written: %s (step %s)", path, state.get("step"))


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """A one-line, shortened description of ``exc`` (never torch's advice on unsafe loading)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # the reason, without the advice around it
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = re.split(r"(?<=[a-z0-9)])\. ", lines[0])[0] if lines else ""  # its first sentence
    if not text or "weights_only" in text:
        text = type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _imported_code(data: bytes) -> str | None:
    """The first callable a pickle would import (``module.name``), without unpickling it.

    Returns None when the bytes are no pickle or import nothing before they stop parsing.
    """
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ("GLOBAL", "INST"):
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL":
                return ".".join(strings[-2:]) if len(strings) >= 2 else "an unknown callable"
            if op.name in ("REDUCE", "OBJ", "NEWOBJ", "NEWOBJ_EX"):
                return "an object constructor"
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - damaged or no pickle: whatever was found so far
        pass
    return None


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    """The one-line refusal of a file that ``torch.load`` could not read.

    Never repeats torch's advice to load the file unsafely.
    """
    with open(path, "rb") as f:
        head = f.read(_SCAN_LIMIT)
    other = f"use another checkpoint (e.g. {rundir.BEST_CKPT} instead of {rundir.LAST_CKPT}) or start a new run"
    code = re.search(r"GLOBAL ([\w.]+)", str(exc))
    name = code.group(1) if code else None
    if name is None and head[:1] == bytes([_PICKLE_PROTO]):
        name = _imported_code(head)
    if name is not None:
        return CheckpointError(
            f"checkpoint {path} is refused: it is a pickle that would import and run code "
            f"({name}), which metanas-train never writes; do not load it, {other}"
        )
    if not head:
        return CheckpointError(f"checkpoint {path} is empty (0 bytes, a cut-off copy?); {other}")
    if head.startswith(_ZIP_MAGIC):
        return CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({_first_line(exc)}); {other}"
        )
    return CheckpointError(
        f"checkpoint {path} is corrupt or not a checkpoint at all (not a torch archive); pass a "
        f".ckpt file written by metanas-train (e.g. {rundir.checkpoint_path('<run dir>', rundir.LAST_CKPT)})"
    )


def _torch_load(source: Path | io.BytesIO, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)`` without torch's warnings (e.g. about a pickle protocol)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(source, map_location=map_location, weights_only=True)


def _unwrap(path: Path, envelope: dict[str, Any], map_location: str | torch.device) -> Any:
    """The state inside a version-2 file, after checking the payload's SHA-256."""
    payload, expected = envelope.get("payload"), envelope.get("sha256")
    if not (isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and payload.dim() == 1
            and isinstance(expected, str)):
        raise CheckpointError(
            f"checkpoint {path} lacks its payload or its sha256; it is incomplete or damaged: "
            f"use another checkpoint (e.g. {rundir.BEST_CKPT} instead of {rundir.LAST_CKPT}) or start a new run"
        )
    payload = payload.cpu().numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its content does not match the sha256 it was written "
            f"with (bytes changed on disk or in transfer); use another checkpoint (e.g. "
            f"{rundir.BEST_CKPT} instead of {rundir.LAST_CKPT}) or start a new run"
        )
    try:
        return _torch_load(io.BytesIO(payload), map_location)
    except Exception as exc:  # written damaged (its hash matches): refuse as well
        raise CheckpointError(
            f"checkpoint {path} holds an unreadable payload ({_first_line(exc)}); use another "
            f"checkpoint (e.g. {rundir.BEST_CKPT} instead of {rundir.LAST_CKPT}) or start a new run"
        ) from None


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
        CheckpointError: (one line) the file is missing, empty, truncated, corrupt (its
            content hash does not match), a pickle that would run code, not a metanas
            checkpoint, of an unsupported version, or of a different search space.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass the path of a .ckpt file written by "
            f"metanas-train (e.g. {rundir.checkpoint_path('<run dir>', rundir.LAST_CKPT)})"
        )
    try:
        state = _torch_load(path, map_location)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise _unreadable(path, exc) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a metanas checkpoint; pass a file written by metanas-train"
        )
    version = state.get("version")
    if version not in _READABLE:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, this metanas reads versions "
            f"{', '.join(map(str, _READABLE))}; use the metanas release that wrote it"
        )
    if version == 1:
        log.debug("checkpoint %s has format version 1: no content hash to verify", path)
    else:
        state = _unwrap(path, state, map_location)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(
                f"checkpoint {path} holds no metanas state; it is damaged: pass a file written by metanas-train"
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
