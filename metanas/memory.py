"""Memory budget: how many tasks may be in flight at once.

Every task in flight holds its own autograd graph, so memory grows with the number of task
threads (``threads`` engine) and with the chunk size of the ``vmap`` engine.
``trainer.memory_budget_gb`` bounds both: ``in flight = min(workers, floor(budget / per_task))``
for threads, and vmap chunks of at most ``floor(budget / per_task)`` tasks. The bound only
changes how many tasks run at the same time, never what is computed: the meta-gradients are
the same for any bound (``tests/test_memory_budget.py``).

**Default budget** (``memory_budget_gb: null``): :data:`SAFETY_FRACTION` of the memory
available when the bound is computed, shared equally by the processes on the machine: on CPU
``MemAvailable`` of ``/proc/meminfo`` (without it, no bound), on CUDA the free memory of
:func:`torch.cuda.mem_get_info`; on other devices there is no default bound.

**Per-task estimate** (:func:`estimate_task_bytes`). Measured, not guessed: one inner update
of the first task of the run (of the trainer's first meta-batch) is computed (the support mini-batch the inner loop uses, the
gradient taken as the algorithm takes it) under :func:`torch.autograd.graph.saved_tensors_hooks`,
which sees every tensor autograd keeps for the backward pass; their distinct storages are
summed (``F`` for the forward pass, ``G`` for the graph that a second-order backward itself
records). With ``P`` the bytes of the weights and alphas and ``U`` the inner updates of a task:

- first order (Reptile, FOMAML, evaluation): ``2 F + 8 P``: one update's graph at a time
  (steps are cut from the graph), plus as much again for the activation gradients of its
  backward pass, plus the adapted copies, their gradients, the inner optimiser's moments and
  the task's meta-gradient term;
- second order (MAML): ``U (F + G + 3 P) + 2 F + 8 P``: every update's graph and its
  backward's graph stay alive until the meta-gradient is taken, with each step's weights
  and optimiser moments. The alpha refinement's ``R`` steps (``inner.alpha_refine_steps``) on
  the whole support set count as ``R * support / batch`` more updates.

With ``trainer.recompute_cells`` (``trainer.recompute_edges``) the forward pass keeps only what
the cells' (edges') checkpoints keep, plus the activations of the largest cell (edge), which
are rebuilt one at a time in the backward pass. The query pass is measured too and the larger
of support and query is used.
How wrong it can be: it counts tensors, not the allocator's caching and fragmentation or the
kernels' scratch space (CPU convolutions unfold their input), nor the Python objects; the
peak resident set can exceed it by a factor of about 1.5 to 3 (the safety fraction of the
default budget absorbs part of that). It is an estimate for one task of the run's shapes;
tasks of other shapes (a sampler with varying ways) are not re-measured.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .functional import forward
from .inner import InnerLoopConfig

log = logging.getLogger(__name__)

SAFETY_FRACTION = 0.75
"""Share of the available memory that the default budget takes."""

GB = 1024**3
"""Bytes per unit of ``trainer.memory_budget_gb`` (GiB)."""

MEMORY_SEED = 3
"""Seed (offset) of the generator that draws the task whose memory is estimated, apart from
the task streams of training and evaluation (which it leaves unchanged)."""


def check_budget(value: Any, key: str = "trainer.memory_budget_gb") -> float | None:
    """``key`` (``trainer.memory_budget_gb``, metanas-adapt's ``memory_budget_gb``) validated:
    a positive, finite number of GiB or None.

    Raises:
        ConfigError: anything else (a bool, a string, zero, a negative or infinite number).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{key}={value!r} is not a positive number of GiB; set it to e.g. 8 "
            "or to null (a share of the machine's available memory)"
        )
    return float(value)


def available_bytes(device: torch.device | str) -> int | None:
    """Memory available now on ``device``: ``MemAvailable`` on CPU, free memory on CUDA,
    None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def default_budget_bytes(device: torch.device | str, processes: int = 1) -> int | None:
    """The budget of ``memory_budget_gb: null``: :data:`SAFETY_FRACTION` of the available
    memory, divided among ``processes`` on the machine; None when it cannot be read."""
    free = available_bytes(device)
    if free is None:
        return None
    return int(SAFETY_FRACTION * free / max(1, processes))


def budget_bytes(budget_gb: float | None, device: torch.device | str, processes: int = 1) -> int | None:
    """The budget in bytes: ``budget_gb`` GiB, or for None :func:`default_budget_bytes` (None
    when that cannot be read)."""
    return int(budget_gb * GB) if budget_gb is not None else default_budget_bytes(device, processes)


class _SavedBytes:
    """Sums the distinct storages autograd saves for backward while active."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()
        self.total = 0

    def pack(self, t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in self.seen and storage.data_ptr() != 0:
                self.seen.add(key)
                self.total += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. functorch wrapper)
            self.total += t.numel() * t.element_size()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _forward_bytes(net: nn.Module, weights, alphas, x: Tensor, y: Tensor, temperature: float,
                   second_order: bool) -> tuple[int, int, int, int]:
    """``(F, G, largest cell, largest edge)``: bytes saved by a forward pass and its loss, by a
    second-order backward (0 unless ``second_order``), and by the largest cell and the
    largest edge (mixed op) of the forward pass."""
    counter = _SavedBytes()
    cells: list[int] = []
    edges: list[int] = []
    handles = []

    def track(module: nn.Module, sizes: list[int]) -> None:
        start: list[int] = []
        handles.append(module.register_forward_pre_hook(lambda m, a, start=start: start.append(counter.total)))
        handles.append(module.register_forward_hook(
            lambda m, a, o, start=start: sizes.append(counter.total - start.pop())))

    for cell in getattr(net, "cells", []):
        track(cell, cells)
        for edge in getattr(cell, "edges", []):
            track(edge, edges)
    try:
        with counter.hooks():
            loss = F.cross_entropy(forward(net, weights, alphas, x, temperature), y)
        forward_bytes = counter.total
        backward_bytes = 0
        if second_order:
            targets = [t for t in (*weights.values(), *alphas.values()) if t.requires_grad]
            with counter.hooks():
                torch.autograd.grad(loss, targets, create_graph=True, allow_unused=True)
            backward_bytes = counter.total - forward_bytes
    finally:
        for h in handles:
            h.remove()
    return forward_bytes, backward_bytes, max(cells, default=0), max(edges, default=0)


def estimate_task_bytes(
    net: nn.Module,
    weights: Mapping[str, Tensor],
    alphas: Mapping[str, Tensor],
    task: Any,
    inner: InnerLoopConfig,
    second_order: bool = False,
) -> int:
    """Estimated peak bytes of one task in flight (see the module docstring for the rule).

    Args:
        net: the network (its ``recompute_cells`` and ``recompute_edges`` settings are taken
            into account).
        weights, alphas: the meta-parameters, name -> tensor (not modified).
        task: a task with ``support_x`` ``(N*K, C, H, W)``, ``support_y``, ``query_x``, ``query_y``.
        inner: the inner loop (its mini-batch size and number of updates).
        second_order: the algorithm keeps every inner update's graph (second-order MAML).
    """
    n_support = task.support_x.shape[0]
    batch = n_support if inner.batch_size is None else min(inner.batch_size, n_support)
    updates = sum(len(b) for b in inner.batches(n_support))
    w = {k: v.detach().requires_grad_(True) for k, v in weights.items()}
    a = {k: v.detach().requires_grad_(True) for k, v in alphas.items()}
    flags = {k: bool(getattr(net, k, False)) for k in ("recompute_cells", "recompute_edges")}
    measured = []
    for x, y, order in ((task.support_x[:batch], task.support_y[:batch], second_order),
                        (task.query_x, task.query_y, False)):
        rebuilt = 0
        if any(flags.values()):  # a forward that stores everything gives the largest cell/edge
            for k in flags:
                setattr(net, k, False)
            try:
                _, _, cell, edge = _forward_bytes(net, w, a, x, y, inner.temperature(0), False)
            finally:
                for k, v in flags.items():
                    setattr(net, k, v)
            rebuilt = edge if flags["recompute_edges"] else cell
        f, g, _, _ = _forward_bytes(net, w, a, x, y, inner.temperature(0), order)
        measured.append((f + rebuilt, g))
    (f_support, g_support), (f_query, _) = measured
    params = sum(t.numel() * t.element_size() for t in (*weights.values(), *alphas.values()))
    f_max = max(f_support, f_query)
    if second_order:
        # the alpha refinement's steps (inner.alpha_refine_steps) each take the whole support set
        refine = inner.alpha_refine_steps * n_support / batch
        return int((updates + refine) * (f_support + g_support + 3 * params)) + 2 * f_max + 8 * params
    return 2 * f_max + 8 * params


TRAIN_FIXES = ("use inner mini-batches (inner.batch_size=20), recompute activations "
               "(trainer.recompute_edges=true), or a larger trainer.memory_budget_gb")
"""The fixes :func:`tasks_that_fit` names for ``metanas-train``."""


def tasks_that_fit(budget_bytes: int, per_task_bytes: int, budget_gb: float | None,
                   key: str = "trainer.memory_budget_gb", fixes: str = TRAIN_FIXES) -> int:
    """``floor(budget / per_task)``, at least 1.

    Raises:
        ConfigError: not even one task fits; names ``key``, the estimate and ``fixes``.
    """
    fit = budget_bytes // max(1, per_task_bytes)
    if fit < 1:
        where = (f"{key}={budget_gb:g}" if budget_gb is not None else
                 f"{key}=null ({budget_bytes / GB:.3g} GiB: "
                 f"{SAFETY_FRACTION:g} of the available memory)")
        raise ConfigError(
            f"{where} cannot hold one task in flight, estimated at {per_task_bytes / GB:.3g} GiB; {fixes}"
        )
    return int(fit)


__all__ = ["GB", "MEMORY_SEED", "SAFETY_FRACTION", "TRAIN_FIXES", "available_bytes", "budget_bytes",
           "check_budget", "default_budget_bytes", "estimate_task_bytes", "tasks_that_fit"]
