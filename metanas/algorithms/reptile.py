"""Reptile (Nichol, Achiam & Schulman 2018), the outer loop MetaNAS uses.

For each task the weights and alphas are adapted on the support set without keeping a graph;
the meta-gradient handed to the meta-optimisers is the mean displacement
``theta - theta'_i`` (and ``alpha - alpha'_i``). The query set is only used for the logged
accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from metanas.tasks import Task

from ..batched import TaskFn, adapt_pure, query_stats
from ..inner import InnerLoopConfig, adapt, query_loss
from .base import MetaGradients, TaskwiseAlgorithm, first_support_loss


class Reptile(TaskwiseAlgorithm):
    """Reptile meta-gradients for weights and alphas (first-order, no query gradients)."""

    def task_gradients(
        self,
        net: nn.Module,
        weights: Mapping[str, Tensor],
        alphas: Mapping[str, Tensor],
        task: Task,
        inner: InnerLoopConfig,
        adapt_alphas: bool,
    ) -> MetaGradients:
        """``(theta - theta', alpha - alpha')`` of one task."""
        adapted = adapt(
            net, weights, alphas, task.support_x, task.support_y, inner,
            adapt_alphas=adapt_alphas,
        )
        with torch.no_grad():
            loss, acc = query_loss(net, adapted, task.query_x, task.query_y)
            grads_w = {n: weights[n] - adapted.weights[n] for n in weights}
            grads_a = (
                {n: alphas[n] - adapted.alphas[n] for n in alphas} if adapt_alphas else None
            )
        return MetaGradients(grads_w, grads_a, float(loss), float(acc), first_support_loss(adapted))

    def task_fn(self, net: nn.Module, inner: InnerLoopConfig, adapt_alphas: bool) -> TaskFn:
        """:meth:`task_gradients` as a pure function of one task's tensors (for ``vmap``)."""
        temperature = inner.temperature(inner.steps)

        def fn(w, a, support_x, support_y, query_x, query_y):
            w_task, a_task, first = adapt_pure(net, w, a, support_x, support_y, inner, adapt_alphas)
            loss, acc = query_stats(net, w_task, a_task, query_x, query_y, temperature)
            grads_w = {n: w[n] - w_task[n] for n in w}
            grads_a = {n: a[n] - a_task[n] for n in a} if adapt_alphas else {}
            return grads_w, grads_a, loss, acc, first

        return fn
