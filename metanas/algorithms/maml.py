"""MAML (Finn, Abbeel & Levine 2017): first-order and second-order meta-gradients.

Second-order MAML differentiates the query loss of the adapted model through every inner
step back to the meta-weights and meta-alphas (``create_graph=True``). First-order MAML
drops the second-order terms: the meta-gradient is the query-loss gradient taken at the
adapted weights and alphas of the live task model.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import grad

from metanas.tasks import Task

from ..batched import TaskFn, adapt_pure, query_stats
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


    def task_fn(self, net: nn.Module, inner: InnerLoopConfig, adapt_alphas: bool) -> TaskFn:
        """:meth:`task_gradients` as a pure function of one task's tensors (for ``vmap``)."""
        temperature = inner.temperature(inner.steps)
        argnums = (0, 1) if adapt_alphas else 0
        second_order = self.second_order

        def split(g):
            return g if adapt_alphas else (g, {})

        def fn(w, a, support_x, support_y, query_x, query_y):
            def query(w_task, a_task):
                loss, acc = query_stats(net, w_task, a_task, query_x, query_y, temperature)
                return loss, (loss.detach(), acc)

            if second_order:
                def meta_loss(w0, a0):
                    w_task, a_task, first = adapt_pure(
                        net, w0, a0, support_x, support_y, inner, adapt_alphas
                    )
                    loss, aux = query(w_task, a_task)
                    return loss, (*aux, first)

                g, (loss, acc, first) = grad(meta_loss, argnums=argnums, has_aux=True)(w, a)
            else:
                w_task, a_task, first = adapt_pure(net, w, a, support_x, support_y, inner, adapt_alphas)
                g, (loss, acc) = grad(query, argnums=argnums, has_aux=True)(w_task, a_task)
            grads_w, grads_a = split(g)
            return grads_w, grads_a, loss, acc, first

        return fn


class MAML(_MAMLBase):
    """Second-order MAML on weights and alphas (backpropagates through the inner loop)."""

    second_order = True


class FOMAML(_MAMLBase):
    """First-order MAML on weights and alphas."""

    second_order = False
