"""MAML (Finn, Abbeel & Levine 2017): first-order and second-order meta-gradients.

Second-order MAML differentiates the query loss of the adapted model through every inner
step back to the meta-weights and meta-alphas. First-order MAML drops the second-order
terms: the meta-gradient is the query-loss gradient taken at the adapted weights and alphas
of the live task model.

The query objective is the query cross-entropy, plus the alpha-entropy regulariser
``inner.entropy_penalty(adapted alphas, read-out temperature)`` when
``inner.entropy_on("query")`` and the alphas are meta-learned (the logged query loss is the
cross-entropy alone).

Meta-SGD (``inner.meta_sgd``, :class:`~metanas.inner.LearnedRates` passed as ``rates``):

- second order: the exact gradient of the query objective with respect to the rates,
  through every inner step (the rates are leaves of the graph like the meta-weights);
- first order: the support gradients ``g_k`` of the inner updates are held constant, as
  FOMAML holds them for the weights (``d theta_K / d theta_0 = I``). Then
  ``theta_K = theta_0 - r * sum_k g_k`` and the rate gradient is
  ``d L_q(theta_K) / d r = -grad L_q(theta_K) * sum_k g_k`` (elementwise; the sum over all
  inner updates, :attr:`~metanas.inner.Adapted.gradient_sums`). It keeps the direct
  dependence of every update on its rate and drops every path through later support
  gradients; it is not the exact gradient (which needs second order).
"""

from __future__ import annotations

from dataclasses import replace

from ..inner import LearnedRates, adapt, alpha_displacement, query_loss
from .base import TaskTerms, TaskwiseAlgorithm, first_support_loss


class _MAMLBase(TaskwiseAlgorithm):
    second_order: bool = True

    def task_terms(self, net, weights, alphas, task, inner, adapt_alphas, grads, rates=None) -> TaskTerms:
        """Query-objective gradient of one task (through the inner loop if second order)."""
        names_a = list(alphas) if adapt_alphas else []
        entropy = inner.entropy_on("query") and bool(names_a)

        def adapted_from(w, a, r=None):
            return adapt(
                net, w, a, task.support_x, task.support_y, inner,
                create_graph=self.second_order, adapt_alphas=adapt_alphas, grads=grads, rates=r,
            )

        def query(adapted):
            loss, acc = query_loss(net, adapted, task.query_x, task.query_y)
            stats = (loss.detach(), acc.detach(), first_support_loss(adapted, loss),
                     alpha_displacement(adapted.alphas, alphas))
            if entropy:
                return loss + inner.entropy_penalty(adapted.alphas, adapted.temperature), stats
            return loss, stats

        if rates is not None and self.second_order:  # the rates are leaves too
            g_w, g_a, g_r, stats = grads.loss_grads_rates(
                lambda w, a, r: query(adapted_from(w, a, r)), dict(weights), dict(alphas), names_a, rates
            )
            return TaskTerms(g_w, g_a, *stats, rate_weights=g_r.weights, rate_alphas=g_r.alphas)
        if self.second_order:  # differentiate back to the meta-parameters
            g_w, g_a, stats = grads.loss_grads(
                lambda w, a: query(adapted_from(w, a)), dict(weights), dict(alphas), names_a
            )
            return TaskTerms(g_w, g_a, *stats)
        # at the adapted tensors themselves (fresh leaves with AUTOGRAD)
        adapted = adapted_from(weights, alphas, rates)
        g_w, g_a, stats = grads.loss_grads(
            lambda w, a: query(replace(adapted, weights=w, alphas=a)),
            adapted.weights, adapted.alphas, names_a,
        )
        if rates is None:
            return TaskTerms(g_w, g_a, *stats)
        sums: LearnedRates = adapted.gradient_sums
        return TaskTerms(g_w, g_a, *stats,
                         rate_weights={n: -g_w[n] * sums.weights[n] for n in g_w},
                         rate_alphas={n: -g_a[n] * sums.alphas[n] for n in g_a})


class MAML(_MAMLBase):
    """Second-order MAML on weights and alphas (backpropagates through the inner loop)."""

    second_order = True


class FOMAML(_MAMLBase):
    """First-order MAML on weights and alphas."""

    second_order = False
