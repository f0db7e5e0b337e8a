"""MAML (Finn, Abbeel & Levine 2017): first-order and second-order meta-gradients.

Second-order MAML differentiates the query loss of the adapted model through every inner
step back to the meta-weights and meta-alphas (``create_graph=True``). First-order MAML
drops the second-order terms: the meta-gradient is the query-loss gradient taken at the
adapted weights and alphas of the live task model.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from metanas.tasks import Task

from ..inner import InnerLoopConfig, adapt, query_loss
from .base import MetaGradients, TaskwiseAlgorithm, first_support_loss, grads_of


class _MAMLBase(TaskwiseAlgorithm):
    second_order: bool = True

    def task_gradients(
        self,
        net: nn.Module,
        weights: Mapping[str, Tensor],
        alphas: Mapping[str, Tensor],
        task: Task,
        inner: InnerLoopConfig,
        adapt_alphas: bool,
    ) -> MetaGradients:
        """Query-loss gradient of one task (through the inner loop if second order)."""
        adapted = adapt(
            net, weights, alphas, task.support_x, task.support_y, inner,
            create_graph=self.second_order, adapt_alphas=adapt_alphas,
        )
        loss, acc = query_loss(net, adapted, task.query_x, task.query_y)
        # second order: differentiate back to the meta-parameters; first order: at the
        # adapted tensors themselves (fresh leaves returned by adapt).
        source_w = weights if self.second_order else adapted.weights
        source_a = alphas if self.second_order else adapted.alphas
        grads_w, grads_a = grads_of(loss, source_w, source_a if adapt_alphas else {})
        return MetaGradients(
            grads_w,
            grads_a if adapt_alphas else None,
            float(loss.detach()),
            float(acc),
            first_support_loss(adapted),
        )


class MAML(_MAMLBase):
    """Second-order MAML on weights and alphas (backpropagates through the inner loop)."""

    second_order = True


class FOMAML(_MAMLBase):
    """First-order MAML on weights and alphas."""

    second_order = False
