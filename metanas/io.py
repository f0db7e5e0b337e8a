"""Files and devices: atomic writes and the ``device`` setting.

Every file metanas writes goes through :func:`atomic_write_bytes`: a temporary file in the
target folder, flushed to disk and moved into place with :func:`os.replace`, so a process
killed while writing leaves the previous version intact and never a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import ConfigError


TMP_SUFFIX = ".tmp"
"""Suffix of the temporary files of :func:`atomic_write_bytes` (named ``.<name>.<random>.tmp``)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename).

    The file gets the permissions any other tool would give it (``0o666`` less the umask),
    not the private ``0o600`` of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writes left in ``folder`` (not recursive).

    Call it where a single writer owns the folder (a run directory at start-up): a
    temporary file of a write in progress by another process would be removed too.

    Returns:
        The removed files.
    """
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device={device!r} is not a torch device; use auto, cpu or cuda") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available; use device=auto or cpu")
    return resolved


__all__ = ["atomic_write_bytes", "atomic_write_text", "remove_stale_temporaries", "resolve_device"]
