"""The outer-loop protocol: from a meta-batch of tasks to meta-gradients.

An algorithm never steps an optimiser. It returns, for the meta-weights and the meta-alphas,
a tensor per name that the trainer hands to two ordinary ``torch.optim`` meta-optimisers as
``.grad``. For MAML this is the true meta-gradient; for Reptile it is the Reptile direction
``theta - mean(theta'_i)`` (Nichol et al. 2018), so that plain SGD with learning rate ``eps``
performs ``theta <- theta + eps * (mean(theta'_i) - theta)`` and any optimiser can be used.

The built-in algorithms are :class:`TaskwiseAlgorithm` subclasses. Each defines the
contribution of one task once, in :meth:`TaskwiseAlgorithm.task_terms`, written against a
gradient backend (:data:`~metanas.inner.AUTOGRAD` or :data:`~metanas.inner.FUNC`); the base
class runs it on the engine that ``batching`` names (:mod:`metanas.engines`: a loop, threads,
or ``vmap`` with the functional backend) and averages the contributions. A new outer
algorithm is one ``task_terms`` method in one file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..engines import TaskPool, TaskTensors, resolve_batching, stack_tasks, vmap_tasks
from ..errors import ConfigError
from ..functional import Params
from ..inner import AUTOGRAD, FUNC, Adapted, Grads, InnerLoopConfig, LearnedRates


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
        alpha_displacement: mean over tasks of the L2 norm (all alpha tensors together) of
            the adapted minus the meta-alphas: how far task adaptation moves the
            architecture (0 when the alphas are frozen).
        rates: with Meta-SGD, the meta-gradients of the learned inner rates (``alphas``
            ``{}`` when the alphas were frozen); else None.
    """

    weights: Params
    alphas: Params | None
    query_loss: float
    query_accuracy: float
    support_loss: float
    alpha_displacement: float = 0.0
    rates: LearnedRates | None = None


class TaskTerms(NamedTuple):
    """One task's contribution, all tensors (so that ``vmap`` can map it).

    Attributes:
        weights: name -> the task's term of the weights' meta-gradient.
        alphas: name -> the task's term of the alphas' meta-gradient (``{}`` when frozen).
        query_loss, query_accuracy: 0-dim statistics of the adapted model on the query set.
        support_loss: 0-dim support loss before adaptation (NaN without inner steps).
        alpha_displacement: 0-dim L2 norm of the adapted minus the meta-alphas
            (:func:`metanas.inner.alpha_displacement`).
        rate_weights, rate_alphas: with Meta-SGD, the task's terms of the meta-gradients of
            the learned rates of the weights and of the alphas (``{}`` otherwise).
    """

    weights: Params
    alphas: Params
    query_loss: Tensor
    query_accuracy: Tensor
    support_loss: Tensor
    alpha_displacement: Tensor
    rate_weights: Params = {}  # noqa: RUF012 - never mutated
    rate_alphas: Params = {}  # noqa: RUF012


@runtime_checkable
class MetaAlgorithm(Protocol):
    """Computes meta-gradients for a meta-batch of tasks. Must not modify its inputs."""

    def meta_gradients(
        self,
        net: nn.Module,
        weights: Mapping[str, Tensor],
        alphas: Mapping[str, Tensor],
        tasks: Sequence[Any],
        inner: InnerLoopConfig,
        *,
        adapt_alphas: bool = True,
        pool: TaskPool | None = None,
        rates: LearnedRates | None = None,
    ) -> MetaGradients: ...


def _mean(dicts: Sequence[Params]) -> Params:
    """Element-wise mean of dicts of tensors, summed in the order given."""
    n = len(dicts)
    out = {name: t.detach() / n for name, t in dicts[0].items()}
    for d in dicts[1:]:
        for name, t in d.items():
            out[name] = out[name] + t.detach() / n
    return out


def _chunk_size(chunk: int | None, pool: TaskPool | None, n_tasks: int) -> int | None:
    """The vmap chunk: ``vmap_chunk_size`` bounded by the pool's memory bound (None: all tasks)."""
    bound = None if pool is None else pool.memory_bound
    if bound is None:
        return chunk
    return max(1, min(chunk or n_tasks, bound))


def first_support_loss(adapted: Adapted, like: Tensor) -> Tensor:
    """The support loss before adaptation (0-dim), or NaN (like ``like``) without inner steps."""
    if adapted.support_losses:
        return adapted.support_losses[0]
    return torch.full((), math.nan, dtype=like.dtype, device=like.device)


class TaskwiseAlgorithm:
    """An outer loop whose meta-gradient is the mean of independent per-task terms.

    Args:
        batching: ``auto`` | ``loop`` | ``threads`` | ``vmap``: how the tasks of a meta-batch
            are computed (:mod:`metanas.engines`). ``threads`` uses the ``pool`` passed to
            :meth:`meta_gradients` (a plain loop without one); ``vmap`` falls back to the
            threads/loop engine when the tasks' shapes differ.
        vmap_chunk_size: tasks per vectorised call with ``vmap`` (None: the whole meta-batch;
            smaller needs less memory); a pool's ``memory_bound`` lowers it further.
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

    def check_inner(self, inner: InnerLoopConfig) -> None:
        """Raise :class:`~metanas.errors.ConfigError` for inner-loop options this outer
        loop cannot meta-learn (every option is fine here; Reptile refuses some)."""

    def task_terms(
        self,
        net: nn.Module,
        weights: Mapping[str, Tensor],
        alphas: Mapping[str, Tensor],
        task: TaskTensors,
        inner: InnerLoopConfig,
        adapt_alphas: bool,
        grads: Grads,
        rates: LearnedRates | None = None,
    ) -> TaskTerms:
        """The contribution of one task.

        Args:
            net: the network (a thread's replica on the threads engine).
            weights, alphas: the meta-parameters (detached under ``vmap``).
            task: anything with ``support_x``, ``support_y``, ``query_x``, ``query_y``.
            inner: inner-loop settings.
            adapt_alphas: adapt and meta-learn the alphas.
            grads: the gradient backend to use for every gradient (pass it to
                :func:`~metanas.inner.adapt` and use its ``loss_grads``).
            rates: Meta-SGD's learned rates (``inner.meta_sgd``; detached under ``vmap``);
                the terms then include their meta-gradients (``rate_weights``,
                ``rate_alphas``). Only passed when given, so subclasses without Meta-SGD
                need not accept it.
        """
        raise NotImplementedError

    def meta_gradients(
        self,
        net: nn.Module,
        weights: Mapping[str, Tensor],
        alphas: Mapping[str, Tensor],
        tasks: Sequence[Any],
        inner: InnerLoopConfig,
        *,
        adapt_alphas: bool = True,
        pool: TaskPool | None = None,
        rates: LearnedRates | None = None,
    ) -> MetaGradients:
        """Mean of :meth:`task_terms` over ``tasks``.

        Args:
            net: the supernet.
            weights: meta-weights, name -> tensor (leaves that require grad for MAML).
            alphas: meta-alphas, name -> tensor.
            tasks: the meta-batch.
            inner: inner-loop settings.
            adapt_alphas: adapt and meta-learn the alphas (False during the alpha warm-up;
                the result's ``alphas`` is then None).
            pool: computes the tasks concurrently; it must have been built on ``net``. Its
                ``memory_bound`` (if any) also bounds the ``vmap`` chunk size.
            rates: Meta-SGD's learned inner rates (exactly when ``inner.meta_sgd``; leaves
                that require grad for second-order MAML); the result's ``rates`` holds their
                meta-gradients.
        """
        if not tasks:
            raise ValueError("meta_gradients needs at least one task")
        self.check_inner(inner)
        if inner.meta_sgd != (rates is not None):
            raise ValueError("meta_gradients: pass rates (LearnedRates) exactly when inner.meta_sgd is set")
        extra = {} if rates is None else {"rates": rates}
        if pool is not None and pool.net is not net:
            raise ValueError("the TaskPool was built on another network")
        device = next(iter(weights.values())).device
        engine = resolve_batching(getattr(self, "batching", "auto"), device)
        if engine == "vmap" and (stacked := stack_tasks(tasks)) is not None:
            if rates is not None:  # shared by all tasks, like the meta-parameters
                extra = {"rates": LearnedRates(*({k: v.detach() for k, v in part.items()} for part in rates))}
            terms = vmap_tasks(
                lambda w, a, task: self.task_terms(net, w, a, task, inner, adapt_alphas, FUNC, **extra),
                {k: v.detach() for k, v in weights.items()},
                {k: v.detach() for k, v in alphas.items()},
                stacked,
                _chunk_size(getattr(self, "vmap_chunk_size", None), pool, len(tasks)),
            )
            return MetaGradients(
                weights={k: v.mean(dim=0) for k, v in terms.weights.items()},
                alphas={k: v.mean(dim=0) for k, v in terms.alphas.items()} if adapt_alphas else None,
                query_loss=float(terms.query_loss.mean()),
                query_accuracy=float(terms.query_accuracy.mean()),
                support_loss=float(terms.support_loss.mean()),
                alpha_displacement=float(terms.alpha_displacement.mean()),
                rates=None if rates is None else LearnedRates(
                    {k: v.mean(dim=0) for k, v in terms.rate_weights.items()},
                    {k: v.mean(dim=0) for k, v in terms.rate_alphas.items()},
                ),
            )

        def one(replica: nn.Module, task: Any) -> TaskTerms:
            return self.task_terms(replica, weights, alphas, task, inner, adapt_alphas, AUTOGRAD, **extra)

        if engine == "loop" or pool is None:
            parts = [one(net, t) for t in tasks]
        else:
            parts = pool.map(one, tasks)
        n = len(parts)
        return MetaGradients(
            weights=_mean([p.weights for p in parts]),
            alphas=_mean([p.alphas for p in parts]) if adapt_alphas else None,
            rates=None if rates is None else LearnedRates(
                _mean([p.rate_weights for p in parts]),
                _mean([p.rate_alphas for p in parts]) if adapt_alphas else {},
            ),
            **{
                stat: sum(float(getattr(p, stat)) for p in parts) / n
                for stat in ("query_loss", "query_accuracy", "support_loss", "alpha_displacement")
            },
        )

    def __repr__(self) -> str:
        batching = getattr(self, "batching", "auto")
        return f"{type(self).__name__}()" if batching == "auto" else f"{type(self).__name__}(batching={batching!r})"
