"""MAML (Finn, Abbeel & Levine 2017): first-order and second-order meta-gradients.

Second-order MAML differentiates the query loss of the adapted model through every inner
step back to the meta-weights and meta-alphas. First-order MAML drops the second-order
terms: the meta-gradient is the query-loss gradient taken at the adapted weights and alphas
of the live task model.
"""

from __future__ import annotations

from dataclasses import replace

from ..inner import adapt, alpha_displacement, query_loss
from .base import TaskTerms, TaskwiseAlgorithm, first_support_loss


class _MAMLBase(TaskwiseAlgorithm):
    second_order: bool = True

    def task_terms(self, net, weights, alphas, task, inner, adapt_alphas, grads) -> TaskTerms:
        """Query-loss gradient of one task (through the inner loop if second order)."""
        names_a = list(alphas) if adapt_alphas else []

        def adapted_from(w, a):
            return adapt(
                net, w, a, task.support_x, task.support_y, inner,
                create_graph=self.second_order, adapt_alphas=adapt_alphas, grads=grads,
            )

        def query(adapted):
            loss, acc = query_loss(net, adapted, task.query_x, task.query_y)
            return loss, (loss.detach(), acc.detach(), first_support_loss(adapted, loss),
                          alpha_displacement(adapted.alphas, alphas))

        if self.second_order:  # differentiate back to the meta-parameters
            g_w, g_a, stats = grads.loss_grads(
                lambda w, a: query(adapted_from(w, a)), dict(weights), dict(alphas), names_a
            )
        else:  # at the adapted tensors themselves (fresh leaves with AUTOGRAD)
            adapted = adapted_from(weights, alphas)
            g_w, g_a, stats = grads.loss_grads(
                lambda w, a: query(replace(adapted, weights=w, alphas=a)),
                adapted.weights, adapted.alphas, names_a,
            )
        return TaskTerms(g_w, g_a, *stats)


class MAML(_MAMLBase):
    """Second-order MAML on weights and alphas (backpropagates through the inner loop)."""

    second_order = True


class FOMAML(_MAMLBase):
    """First-order MAML on weights and alphas."""

    second_order = False
