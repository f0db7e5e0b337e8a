"""Data-parallel meta-training over several processes with ``torch.distributed``.

Launch with ``torchrun --nproc_per_node=N`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``). Every process draws the *same* meta-batch
from the shared task generator (so all task generators stay in step and a checkpoint does not
depend on the number of processes), adapts its share of the tasks (``tasks[rank::world]``),
and the per-share *sums* of the meta-gradients are all-reduced and divided by the meta-batch
size: N processes compute the same average as one process with the whole meta-batch (up to
the order of the floating-point summation).

Backend: gloo on CPU, NCCL on CUDA. Every collective has a timeout, so a process that hangs or
dies ends the job with :class:`DistributedError` instead of waiting forever.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor

from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective failed: another process died, hung past the timeout, or could not connect."""


@dataclass
class DistContext:
    """Where this process stands in a group of processes (a single process by default).

    Attributes:
        rank: index of this process, 0 .. world_size - 1.
        world_size: number of processes.
        local_rank: index of this process on its machine (picks its GPU).
        local_world_size: processes on this machine (shares its CPU cores).
        backend: "gloo" or "nccl"; None for a single process.
        timeout_s: seconds a collective may wait for the other processes.
        broken: a collective has failed (the group is not torn down at :meth:`close`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    broken: bool = False

    @property
    def enabled(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes checkpoints, logs and results."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This process's share of ``items``: every ``world_size``-th one from ``rank``."""
        return items[self.rank :: self.world_size]

    def _collective(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses with long texts
            self.broken = True
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed ({first}); another process "
                f"probably died or hung for more than distributed.timeout_s={self.timeout_s:g} s; "
                "see that process's log, fix it and resume with resume=auto"
            ) from exc

    def all_reduce_mean(self, tensors: Mapping[str, Tensor], weight: float = 1.0) -> dict[str, Tensor]:
        """Weighted mean of named tensors over all processes: ``sum_r w_r t_r / sum_r w_r``.

        One collective over a float64 buffer of all tensors in sorted key order, so the
        result is the same on every process and does not depend on the dict's order.

        Args:
            tensors: name -> tensor of any shape; every process passes the same names and
                shapes.
            weight: this process's weight ``w_r`` (e.g. how many tasks its tensors average).

        Returns:
            name -> weighted mean, same shape, dtype and device as the input.
        """
        if not self.enabled:
            return dict(tensors)
        names = sorted(tensors)
        device = tensors[names[0]].device if names else torch.device("cpu")
        parts = [tensors[n].detach().reshape(-1).to(device, torch.float64) * weight for n in names]
        flat = torch.cat(parts + [torch.tensor([float(weight)], dtype=torch.float64, device=device)])
        self._collective("all_reduce", torch_dist.all_reduce, flat, op=torch_dist.ReduceOp.SUM)
        total = flat[-1]
        if total <= 0:
            raise ValueError("all_reduce_mean: the weights of all processes sum to zero")
        out, offset = {}, 0
        for n in names:
            t = tensors[n]
            out[n] = (flat[offset : offset + t.numel()] / total).view(t.shape).to(t.dtype)
            offset += t.numel()
        return out

    def broadcast_(self, tensors: Iterable[Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values (same order on every process)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in tensors:
                self._collective("broadcast", torch_dist.broadcast, t.data, src=0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (any picklable object) on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        self._collective("broadcast_object", torch_dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every process gets here (or the timeout passes)."""
        if self.enabled:
            self._collective("barrier", torch_dist.barrier)

    def close(self) -> None:
        """Leave the process group.

        After a failed collective the group is left as it is: tearing down a group whose peer
        died or hung can itself block or abort the process, and the process is about to exit
        with the collective's error anyway.
        """
        if self.enabled and not self.broken and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def exit_after_failed_collective(code: int) -> None:
    """End this process now with exit status ``code``, after a failed collective.

    The broken group is still alive in the C++ runtime; tearing it down at interpreter exit
    can abort the process (SIGABRT, status -6) instead of exiting with ``code``. Streams and
    logging handlers are flushed first, then the process exits without that teardown.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def init_distributed(
    backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, device: torch.device | str = "cpu"
) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this returns a single-process context
    and touches nothing.

    Args:
        backend: "auto" (NCCL for a CUDA ``device``, else gloo), "gloo" or "nccl".
        timeout_s: seconds that joining and every collective may wait for the others.
        device: the device this process computes on.

    Returns:
        A :class:`DistContext`.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s={timeout_s} must be positive")
    if world <= 1:
        return DistContext(timeout_s=timeout_s)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside [0, WORLD_SIZE={world}); launch with torchrun")
    if backend == "auto":
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"distributed.backend={backend!r} is unknown; use auto, gloo or nccl")
    if backend == "nccl" and torch.device(device).type != "cuda":
        raise ConfigError("distributed.backend=nccl needs device=cuda; use gloo on CPU")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(
                f"WORLD_SIZE={world} but {name} is not set; launch with torchrun "
                "(it sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
            )
    ctx = DistContext(rank, world, local_rank, local_world, backend, float(timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # NCCL's object collectives use the current device
    ctx._collective(
        "joining the process group",
        torch_dist.init_process_group,
        backend=backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    log.info("process %d of %d joined (%s backend)", rank, world, backend)
    return ctx


__all__ = ["DEFAULT_TIMEOUT_S", "DistContext", "DistributedError", "exit_after_failed_collective",
           "init_distributed"]
