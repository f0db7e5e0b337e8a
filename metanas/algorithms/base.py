"""The outer-loop protocol: from a meta-batch of tasks to meta-gradients.

An algorithm never steps an optimiser. It returns, for the meta-weights and the meta-alphas,
a tensor per name that the trainer hands to two ordinary ``torch.optim`` meta-optimisers as
``.grad``. For MAML this is the true meta-gradient; for Reptile it is the Reptile direction
``theta - mean(theta'_i)`` (Nichol et al. 2018), so that plain SGD with learning rate ``eps``
performs ``theta <- theta + eps * (mean(theta'_i) - theta)`` and any optimiser can be used.

The built-in algorithms are :class:`TaskwiseAlgorithm` subclasses: they define the
contribution of one task (:meth:`TaskwiseAlgorithm.task_gradients`) and the base class
averages the contributions of a meta-batch. How the tasks of a meta-batch are computed is the
algorithm's ``batching`` setting: one after the other (``loop``), on the threads of a
:class:`~metanas.parallel.TaskPool` (``threads``), or vectorised over the task dim with
``torch.func.vmap`` (``vmap``, :mod:`metanas.batched`); ``auto`` picks threads on a CPU and
vmap on an accelerator (measurements in ``docs/speed.md``). All engines give the same
meta-gradients up to floating-point rounding (``tests/test_fast_paths.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from metanas.tasks import Task

from ..batched import TaskFn, map_tasks, stack_tasks
from ..errors import ConfigError
from ..functional import Params
from ..inner import Adapted, InnerLoopConfig
from ..parallel import TaskPool

BATCHING = ("auto", "loop", "threads", "vmap")
"""Engines for the tasks of a meta-batch (see the module docstring)."""


@dataclass(frozen=True)
class MetaGradients:
    """Meta-gradients of one task or meta-batch and its training statistics.

    Attributes:
        weights: name -> gradient-like tensor, same keys and shapes as the meta-weights.
        alphas: name -> gradient-like tensor for the meta-alphas, or None when the alphas
            were frozen (alpha warm-up).
        query_loss: mean query cross-entropy of the adapted models.
        query_accuracy: mean query accuracy of the adapted models.
        support_loss: mean support loss before adaptation (the first inner step).
    """

    weights: Params
    alphas: Params | None
    query_loss: float
    query_accuracy: float
    support_loss: float


@runtime_checkable
class MetaAlgorithm(Protocol):
    """Computes meta-gradients for a meta-batch of tasks. Must not modify its inputs."""

    def meta_gradients(
        self,
        net: nn.Module,
        weights: Mapping[str, Tensor],
        alphas: Mapping[str, Tensor],
        tasks: Sequence[Task],
        inner: InnerLoopConfig,
        *,
        adapt_alphas: bool = True,
        pool: TaskPool | None = None,
    ) -> MetaGradients: ...


def _mean(dicts: Sequence[Params]) -> Params:
    """Element-wise mean of dicts of tensors, summed in the order given."""
    n = len(dicts)
    out = {name: t.detach() / n for name, t in dicts[0].items()}
    for d in dicts[1:]:
        for name, t in d.items():
            out[name] = out[name] + t.detach() / n
    return out


def resolve_batching(batching: str, device: torch.device | str) -> str:
    """The engine ``batching`` means on ``device``: ``auto`` -> threads on CPU, vmap elsewhere."""
    if batching not in BATCHING:
        raise ConfigError(
            f"algorithm.batching={batching!r} is unknown; use one of {', '.join(BATCHING)}"
        )
    if batching != "auto":
        return batching
    return "threads" if torch.device(device).type == "cpu" else "vmap"


class TaskwiseAlgorithm:
    """An outer loop whose meta-gradient is the mean of independent per-task terms.

    Args:
        batching: ``auto`` | ``loop`` | ``threads`` | ``vmap``: how the tasks of a meta-batch
            are computed (see the module docstring). ``threads`` uses the ``pool`` passed to
            :meth:`meta_gradients` (a plain loop without one); ``vmap`` falls back to the
            threads/loop engine when the tasks' shapes differ.
        vmap_chunk_size: tasks per vectorised call with ``vmap`` (None: the whole meta-batch;
            smaller needs less memory).
    """

    def __init__(self, batching: str = "auto", vmap_chunk_size: int | None = None) -> None:
        resolve_batching(batching, "cpu")  # validates the name
        if vmap_chunk_size is not None and (
            isinstance(vmap_chunk_size, bool) or not isinstance(vmap_chunk_size, int)
            or vmap_chunk_size < 1
        ):
            raise ConfigError(
                f"algorithm.vmap_chunk_size={vmap_chunk_size!r} must be a positive integer or null"
            )
        self.batching = batching
        self.vmap_chunk_size = vmap_chunk_size

    def task_fn(self, net: nn.Module, inner: InnerLoopConfig, adapt_alphas: bool) -> TaskFn:
        """The contribution of one task as a pure function for ``vmap``.

        The function maps ``(weights, alphas, support_x, support_y, query_x, query_y)`` to
        ``(grads_w, grads_a, query_loss, query_accuracy, support_loss)`` (dicts of tensors
        and 0-dim tensors; ``grads_a`` is ``{}`` when the alphas are frozen).
        """
        raise NotImplementedError(f"{type(self).__name__} has no vectorised form; use batching=threads")

    def task_gradients(
        self,
        net: nn.Module,
        weights: Mapping[str, Tensor],
        alphas: Mapping[str, Tensor],
        task: Task,
        inner: InnerLoopConfig,
        adapt_alphas: bool,
    ) -> MetaGradients:
        """The contribution of one task (statistics of that task alone)."""
        raise NotImplementedError

    def meta_gradients(
        self,
        net: nn.Module,
        weights: Mapping[str, Tensor],
        alphas: Mapping[str, Tensor],
        tasks: Sequence[Task],
        inner: InnerLoopConfig,
        *,
        adapt_alphas: bool = True,
        pool: TaskPool | None = None,
    ) -> MetaGradients:
        """Mean of :meth:`task_gradients` over ``tasks``.

        Args:
            net: the supernet.
            weights: meta-weights, name -> tensor (leaves that require grad for MAML).
            alphas: meta-alphas, name -> tensor.
            tasks: the meta-batch.
            inner: inner-loop settings.
            adapt_alphas: adapt and meta-learn the alphas (False during the alpha warm-up;
                the result's ``alphas`` is then None).
            pool: computes the tasks concurrently; it must have been built on ``net``.
        """
        if not tasks:
            raise ValueError("meta_gradients needs at least one task")
        if pool is not None and pool.net is not net:
            raise ValueError("the TaskPool was built on another network")
        device = next(iter(weights.values())).device
        engine = resolve_batching(getattr(self, "batching", "auto"), device)
        if engine == "vmap":
            stacked = stack_tasks(tasks)
            if stacked is not None:
                return self._vmap_meta_gradients(net, weights, alphas, stacked, inner, adapt_alphas)
            engine = "threads"
        if engine == "loop":
            pool = None

        def one(replica: nn.Module, task: Task) -> MetaGradients:
            return self.task_gradients(replica, weights, alphas, task, inner, adapt_alphas)

        parts = pool.map(one, tasks) if pool is not None else [one(net, t) for t in tasks]
        n = len(parts)
        return MetaGradients(
            weights=_mean([p.weights for p in parts]),
            alphas=_mean([p.alphas for p in parts]) if adapt_alphas else None,
            query_loss=sum(p.query_loss for p in parts) / n,
            query_accuracy=sum(p.query_accuracy for p in parts) / n,
            support_loss=sum(p.support_loss for p in parts) / n,
        )

    def _vmap_meta_gradients(self, net, weights, alphas, stacked, inner, adapt_alphas) -> MetaGradients:
        fn = self.task_fn(net, inner, adapt_alphas)
        w = {k: v.detach() for k, v in weights.items()}
        a = {k: v.detach() for k, v in alphas.items()}
        g_w, g_a, q_loss, q_acc, s_loss = map_tasks(
            fn, w, a, stacked, getattr(self, "vmap_chunk_size", None)
        )
        return MetaGradients(
            weights={k: v.mean(dim=0) for k, v in g_w.items()},
            alphas={k: v.mean(dim=0) for k, v in g_a.items()} if adapt_alphas else None,
            query_loss=float(q_loss.mean()),
            query_accuracy=float(q_acc.mean()),
            support_loss=float(s_loss.mean()),
        )

    def __repr__(self) -> str:
        batching = getattr(self, "batching", "auto")
        return f"{type(self).__name__}()" if batching == "auto" else f"{type(self).__name__}(batching={batching!r})"


def grads_of(loss: Tensor, *groups: Mapping[str, Tensor]) -> tuple[Params, ...]:
    """``d loss / d tensors`` for each group of named tensors, in the order given.

    Tensors that ``loss`` does not depend on get zero gradients.
    """
    keys = [(i, name) for i, group in enumerate(groups) for name in group]
    flat = [groups[i][name] for i, name in keys]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    out: tuple[Params, ...] = tuple({} for _ in groups)
    for (i, name), t, g in zip(keys, flat, grads):
        out[i][name] = torch.zeros_like(t) if g is None else g
    return out


def first_support_loss(adapted: Adapted) -> float:
    """The support loss before adaptation, or NaN when no inner step was taken."""
    if adapted.support_losses:
        return float(adapted.support_losses[0])
    return float("nan")
