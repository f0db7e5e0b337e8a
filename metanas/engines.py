"""Engines: how the independent tasks of a meta-batch or an evaluation are computed.

``algorithm.batching`` names one of :data:`BATCHING`:

- ``loop``: one task after the other, in the calling thread;
- ``threads``: one task per thread of a :class:`TaskPool`, each thread with its own network
  replica (the CPU default);
- ``vmap``: the tasks' tensors stacked and the per-task function mapped with
  ``torch.func.vmap`` (:func:`vmap_tasks`), in chunks of ``vmap_chunk_size`` tasks (the
  accelerator default); tasks of different shapes fall back to threads;
- ``auto``: threads on a CPU, vmap elsewhere (:func:`resolve_batching`).

Every engine calls the same per-task function and gives the same results up to rounding
(``tests/test_fast_paths.py``).

Memory. A :class:`TaskPool`'s ``memory_bound`` (set by the trainer from
``trainer.memory_budget_gb``, :mod:`metanas.memory`) bounds the tasks in flight: at most
``min(workers, memory_bound)`` threads compute at once, and vmap chunks hold at most
``memory_bound`` tasks. It changes when tasks run, never what they compute.

Threads. On a CPU the supernet's kernels are small and their dispatch overhead dominates, so one
thread per task beats several threads per kernel: adapting tasks on two threads ran
1.66x faster than one after the other on a 2-core machine
(``python benchmarks/task_threads.py``).
PyTorch releases the GIL inside its kernels and runs backward passes in C++, so Python
threads do overlap.

:func:`torch.func.functional_call` swaps a module's tensors while it runs, so two threads must
never share a module: each worker owns a replica of the network. A replica is only a container
for the forward function (weights and alphas are always passed explicitly), is built once,
and is never updated, except for the op mask of a shrinking supernet, which the trainer sets
on every replica between meta-steps (:meth:`TaskPool.networks`). Results come back in input order, so any reduction over them sums in the
same order as a plain loop and gives bit-identical results.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn
from torch.func import vmap

from .errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

BATCHING = ("auto", "loop", "threads", "vmap")
"""The engines (see the module docstring)."""


def resolve_batching(batching: str, device: torch.device | str) -> str:
    """The engine ``batching`` means on ``device``: ``auto`` -> threads on CPU, vmap elsewhere."""
    if batching not in BATCHING:
        raise ConfigError(
            f"algorithm.batching={batching!r} is unknown; use one of {', '.join(BATCHING)}"
        )
    if batching != "auto":
        return batching
    return "threads" if torch.device(device).type == "cpu" else "vmap"


def default_workers(device: torch.device | str) -> int:
    """Threads to use for tasks: one per CPU core on CPU, one on an accelerator."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def share_cores(workers: int, device: torch.device | str) -> None:
    """Give each of ``workers`` task threads an equal share of torch's intra-op threads.

    One thread per task beats several threads per kernel for the supernet's small kernels;
    call this once in a command-line process before adapting tasks on a :class:`TaskPool`.
    It changes torch's process-wide thread count, so a library caller decides for itself.
    """
    if workers > 1 and torch.device(device).type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


class TaskPool:
    """Maps a function over tasks on ``workers`` threads, each with its own network replica.

    Args:
        net: the network whose ``forward`` the tasks use.
        workers: number of threads; 1 runs everything in the calling thread on ``net`` itself.
        memory_bound: at most this many tasks in memory at once (None: no bound), from
            ``trainer.memory_budget_gb`` (:mod:`metanas.memory`): the threads keep at most
            ``min(workers, memory_bound)`` tasks in flight, and the ``vmap`` engine of
            :meth:`metanas.algorithms.TaskwiseAlgorithm.meta_gradients` maps chunks of at most
            ``memory_bound`` tasks. Results do not depend on it.

    Use as a context manager, or call :meth:`close` when done.
    """

    def __init__(self, net: nn.Module, workers: int = 1, memory_bound: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers}: use at least one worker")
        self.net = net
        self.workers = workers
        self.memory_bound = memory_bound
        self._executor: ThreadPoolExecutor | None = None
        self._replicas: queue.SimpleQueue[nn.Module] = queue.SimpleQueue()
        self._networks: list[nn.Module] = [net]
        if workers > 1:
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="metanas-task")
            for _ in range(workers):
                replica = copy.deepcopy(net)
                self._networks.append(replica)
                self._replicas.put(replica)

    def networks(self) -> list[nn.Module]:
        """The network and its replicas, e.g. to give them all a new op mask between calls of
        :meth:`map` (never while one runs)."""
        return list(self._networks)

    @property
    def in_flight(self) -> int:
        """Tasks computed at the same time: ``min(workers, memory_bound)``."""
        bound = self.memory_bound
        return self.workers if bound is None else max(1, min(self.workers, bound))

    def map(self, fn: Callable[[nn.Module, T], R], items: Sequence[T]) -> list[R]:
        """``[fn(replica, item) for item in items]``, computed concurrently (at most
        :attr:`in_flight` at a time), in input order."""
        if self._executor is None or len(items) < 2 or self.in_flight == 1:
            return [fn(self.net, item) for item in items]
        slots = threading.BoundedSemaphore(self.in_flight)

        def run(item: T) -> R:
            with slots:
                replica = self._replicas.get()
                try:
                    return fn(replica, item)
                finally:
                    self._replicas.put(replica)

        return list(self._executor.map(run, items))

    def close(self) -> None:
        """Stop the worker threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> TaskPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TaskTensors(NamedTuple):
    """The tensors of one task (or, stacked, of several: a leading task dim ``T``)."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


def stack_tasks(tasks: Sequence[Any]) -> TaskTensors | None:
    """Stack the tasks' tensors along a new leading dim ``(T, ...)``.

    Returns:
        ``TaskTensors`` of shapes ``(T, N*K, C, H, W)``, ``(T, N*K)``, ``(T, Q, C, H, W)``,
        ``(T, Q)``, or None when the tasks' shapes differ (they cannot be batched).
    """
    out = []
    for name in TaskTensors._fields:
        ts = [getattr(t, name) for t in tasks]
        if any(t.shape != ts[0].shape for t in ts):
            return None
        out.append(torch.stack(ts))
    return TaskTensors(*out)


def vmap_tasks(
    fn: Callable[[dict[str, Tensor], dict[str, Tensor], TaskTensors], R],
    weights: Mapping[str, Tensor],
    alphas: Mapping[str, Tensor],
    stacked: TaskTensors,
    chunk_size: int | None = None,
) -> R:
    """``vmap(fn)`` over the task dim of ``stacked``, meta-parameters shared by all tasks.

    Args:
        fn: ``fn(weights, alphas, task)`` of one task, returning a pytree of tensors.
        weights, alphas: the meta-parameters (not batched).
        stacked: the tasks' tensors from :func:`stack_tasks`.
        chunk_size: tasks per vectorised call (None: all at once); smaller saves memory.

    Returns:
        ``fn``'s output with a leading task dim ``T`` on every tensor.
    """
    return vmap(fn, in_dims=(None, None, 0), chunk_size=chunk_size)(
        dict(weights), dict(alphas), stacked
    )


__all__ = [
    "BATCHING",
    "TaskPool",
    "TaskTensors",
    "default_workers",
    "resolve_batching",
    "share_cores",
    "stack_tasks",
    "vmap_tasks",
]
