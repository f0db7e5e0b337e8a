"""Reptile (Nichol, Achiam & Schulman 2018), the outer loop MetaNAS uses.

For each task the weights and alphas are adapted on the support set without keeping a graph;
the meta-gradient handed to the meta-optimisers is the mean displacement
``theta - theta'_i`` (and ``alpha - alpha'_i``). The query set is only used for the logged
accuracy.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..inner import adapt, alpha_displacement, query_loss
from .base import TaskTerms, TaskwiseAlgorithm, first_support_loss


class Reptile(TaskwiseAlgorithm):
    """Reptile meta-gradients for weights and alphas (first-order, no query gradients)."""

    def check_inner(self, inner) -> None:
        """Reptile takes no query gradient: it has no gradient for Meta-SGD's learned rates
        (its direction ``theta - theta'`` says nothing about them) and no query objective
        for the entropy regulariser."""
        if inner.meta_sgd:
            raise ConfigError(
                "inner.meta_sgd=true needs a meta-gradient of the inner learning rates, which Reptile "
                "does not have; use algorithm=maml or algorithm=fomaml, or set inner.meta_sgd=false"
            )
        if inner.entropy_on("query"):
            raise ConfigError(
                f"inner.entropy_objective={inner.entropy_objective!r} adds the entropy to the query "
                "objective, which Reptile does not use; set inner.entropy_objective=support, or use "
                "algorithm=maml or algorithm=fomaml"
            )

    def task_terms(self, net, weights, alphas, task, inner, adapt_alphas, grads) -> TaskTerms:
        """``(theta - theta', alpha - alpha')`` of one task."""
        adapted = adapt(
            net, weights, alphas, task.support_x, task.support_y, inner,
            adapt_alphas=adapt_alphas, grads=grads,
        )
        with torch.no_grad():
            loss, acc = query_loss(net, adapted, task.query_x, task.query_y)
            return TaskTerms(
                {n: weights[n] - adapted.weights[n] for n in weights},
                {n: alphas[n] - adapted.alphas[n] for n in alphas} if adapt_alphas else {},
                loss, acc, first_support_loss(adapted, loss), alpha_displacement(adapted.alphas, alphas),
            )
