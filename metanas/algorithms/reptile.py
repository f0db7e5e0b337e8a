"""Reptile (Nichol, Achiam & Schulman 2018), the outer loop MetaNAS uses.

For each task the weights and alphas are adapted on the support set without keeping a graph;
the meta-gradient handed to the meta-optimisers is the mean displacement
``theta - theta'_i`` (and ``alpha - alpha'_i``). The query set is only used for the logged
accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from metanas.tasks import Task

from ..inner import InnerLoopConfig, adapt, query_loss
from .base import MetaGradients, _Mean, first_support_loss


class Reptile:
    """Reptile meta-gradients for weights and alphas (first-order, no query gradients)."""

    def meta_gradients(
        self,
        net: nn.Module,
        weights: Mapping[str, Tensor],
        alphas: Mapping[str, Tensor],
        tasks: Sequence[Task],
        inner: InnerLoopConfig,
        *,
        adapt_alphas: bool = True,
    ) -> MetaGradients:
        """See :class:`~metanas.algorithms.base.MetaAlgorithm`."""
        mean = _Mean(len(tasks))
        for task in tasks:
            adapted = adapt(
                net, weights, alphas, task.support_x, task.support_y, inner,
                adapt_alphas=adapt_alphas,
            )
            with torch.no_grad():
                loss, acc = query_loss(net, adapted, task.query_x, task.query_y)
                mean.add("weights", {n: weights[n] - adapted.weights[n] for n in weights})
                if adapt_alphas:
                    mean.add("alphas", {n: alphas[n] - adapted.alphas[n] for n in alphas})
            mean.add_stat("query_loss", loss)
            mean.add_stat("query_accuracy", acc)
            mean.add_stat("support_loss", first_support_loss(adapted))
        return mean.result(adapt_alphas)

    def __repr__(self) -> str:
        return "Reptile()"
