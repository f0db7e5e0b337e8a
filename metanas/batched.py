"""The tasks of a meta-batch computed together with ``torch.func.vmap``.

The per-task work of an outer loop (adapt on the support set, then a query loss or a Reptile
displacement) is written as a pure function of tensors, built on :func:`torch.func.grad`
instead of :func:`torch.autograd.grad`, so that it can be mapped over a leading task
dimension. On an accelerator this turns the many small kernels of a few-shot supernet into a
few large ones (a batched convolution is a grouped convolution); on a CPU it is usually not
worth its memory (see ``docs/speed.md``), and the default engine there is the thread pool.

Exactness: the search space's normalisation is batch norm with ``affine=False`` and no running
statistics (:func:`metanas.search_space.ops.norm`), under which ``vmap`` gives the same
second-order meta-gradients as a per-task loop (an affine batch norm would not).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from metanas.tasks import Task

from .functional import Params, accuracy, forward
from .inner import InnerLoopConfig, _adam, _sgd

TaskTensors = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(support_x, support_y, query_x, query_y)`` of one task."""


def stack_tasks(tasks: Sequence[Task]) -> TaskTensors | None:
    """Stack the tasks' tensors along a new leading dim ``(T, ...)``.

    Returns:
        ``(support_x (T, N*K, C, H, W), support_y (T, N*K), query_x (T, Q, C, H, W),
        query_y (T, Q))``, or None when the tasks' shapes differ (they cannot be batched).
    """
    fields = ("support_x", "support_y", "query_x", "query_y")
    out = []
    for name in fields:
        ts = [getattr(t, name) for t in tasks]
        if any(t.shape != ts[0].shape for t in ts):
            return None
        out.append(torch.stack(ts))
    return tuple(out)  # type: ignore[return-value]


def support_loss_fn(
    net: nn.Module, x: Tensor, y: Tensor, temperature: float
) -> Callable[[Params, Params], tuple[Tensor, Tensor]]:
    """``(weights, alphas) -> (loss, loss.detach())`` on ``x`` (B, C, H, W), ``y`` (B,)."""

    def loss(w: Params, a: Params) -> tuple[Tensor, Tensor]:
        value = F.cross_entropy(forward(net, w, a, x, temperature), y)
        return value, value.detach()

    return loss


def adapt_pure(
    net: nn.Module,
    weights: Params,
    alphas: Params,
    support_x: Tensor,
    support_y: Tensor,
    cfg: InnerLoopConfig,
    adapt_alphas: bool = True,
) -> tuple[Params, Params, Tensor]:
    """:func:`metanas.inner.adapt` written with :func:`torch.func.grad` (composable with vmap).

    The same SGD / Adam updates and temperature schedule as :func:`~metanas.inner.adapt`.
    The result is differentiable with respect to ``weights`` and ``alphas`` under an
    enclosing :func:`torch.func.grad` (second-order MAML); called outside one, the steps keep
    no graph when the inputs are detached.

    Args:
        net: the supernet (only its forward is used).
        weights, alphas: the starting point, name -> tensor.
        support_x: ``(N*K, C, H, W)``.
        support_y: ``(N*K,)``.
        cfg: inner-loop settings.
        adapt_alphas: update the alphas too.

    Returns:
        Adapted weights, adapted alphas, and the support loss before the first step
        (0-dim, NaN without steps).
    """
    w, a = dict(weights), dict(alphas)
    names_w, names_a = list(w), list(a) if adapt_alphas else []
    lrs = [cfg.lr_weights] * len(names_w) + [cfg.lr_alphas] * len(names_a)
    state: dict = {}
    first = torch.full((), float("nan"), dtype=support_x.dtype, device=support_x.device)
    for step in range(cfg.steps):
        loss = support_loss_fn(net, support_x, support_y, cfg.temperature(step))
        if adapt_alphas:
            (g_w, g_a), value = grad(loss, argnums=(0, 1), has_aux=True)(w, a)
        else:
            g_w, value = grad(loss, argnums=0, has_aux=True)(w, a)
            g_a = {}
        if step == 0:
            first = value
        current = [w[n] for n in names_w] + [a[n] for n in names_a]
        grads = [g_w[n] for n in names_w] + [g_a[n] for n in names_a]
        if cfg.optimizer == "sgd":
            new = _sgd(current, grads, lrs)
        else:
            new = _adam(current, grads, lrs, state, step, cfg.betas, cfg.eps)
        w.update(zip(names_w, new[: len(names_w)]))
        a.update(zip(names_a, new[len(names_w):]))
    return w, a, first


def query_stats(
    net: nn.Module, weights: Params, alphas: Params, x: Tensor, y: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy (0-dim) of a model on a query set ``x`` (Q, C, H, W)."""
    logits = forward(net, weights, alphas, x, temperature)
    return F.cross_entropy(logits, y), accuracy(logits, y)


TaskFn = Callable[[Params, Params, Tensor, Tensor, Tensor, Tensor], tuple]


def map_tasks(
    fn: TaskFn,
    weights: Mapping[str, Tensor],
    alphas: Mapping[str, Tensor],
    stacked: TaskTensors,
    chunk_size: int | None = None,
) -> tuple:
    """``vmap(fn)`` over the task dim of ``stacked``, meta-parameters shared by all tasks.

    Args:
        fn: ``fn(weights, alphas, support_x, support_y, query_x, query_y)`` of one task,
            returning a tuple of tensors / dicts of tensors.
        weights, alphas: the meta-parameters (not batched).
        stacked: the tasks' tensors from :func:`stack_tasks`.
        chunk_size: tasks per vectorised call (None: all at once); smaller saves memory.

    Returns:
        ``fn``'s outputs with a leading task dim ``T``.
    """
    return vmap(fn, in_dims=(None, None, 0, 0, 0, 0), chunk_size=chunk_size)(
        dict(weights), dict(alphas), *stacked
    )


__all__ = ["TaskTensors", "adapt_pure", "map_tasks", "query_stats", "stack_tasks"]
