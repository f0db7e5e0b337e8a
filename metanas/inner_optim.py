"""Differentiable inner-loop optimisers: pure ``(init, update)`` pairs in a registry.

``init(params)`` returns an optimiser's state and ``update(params, grads, lrs, state, step)``
returns new parameters and state, all plain tensors, so updates can be differentiated through
(second-order MAML) and mapped with ``torch.func.vmap`` (the shape of optax's
``GradientTransformation`` and of ``higher``'s differentiable optimisers). A new inner
optimiser is one :func:`register_inner_optimizer` entry: a factory taking the
:class:`~metanas.inner.InnerLoopConfig` and returning an :class:`InnerOptimizer`; then
``inner.optimizer=<name>`` uses it (``tests/test_inner_optim.py`` registers heavy-ball SGD).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

State = Any  # any pytree of tensors (tuples, lists, dicts)


@dataclass(frozen=True)
class InnerOptimizer:
    """A pure optimiser.

    Attributes:
        init: ``params -> state`` for the list of tensors to be optimised.
        update: ``(params, grads, lrs, state, step) -> (new_params, new_state)``: lists of
            tensors aligned with ``params``, one learning rate per tensor, ``step`` counting
            from 0.
    """

    init: Callable[[Sequence[Tensor]], State]
    update: Callable[
        [Sequence[Tensor], Sequence[Tensor], Sequence[float], State, int], tuple[list[Tensor], State]
    ]


OptimizerFactory = Callable[[Any], InnerOptimizer]  # InnerLoopConfig -> InnerOptimizer
INNER_OPTIMIZERS: dict[str, OptimizerFactory] = {}  # name -> factory of every registered one


def register_inner_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator that registers ``factory`` under ``name`` (a name may be registered once)."""

    def deco(factory: OptimizerFactory) -> OptimizerFactory:
        if name in INNER_OPTIMIZERS:
            raise ValueError(f"an inner optimiser named {name!r} is registered already")
        INNER_OPTIMIZERS[name] = factory
        return factory

    return deco


@register_inner_optimizer("sgd")
def sgd(cfg: Any) -> InnerOptimizer:
    """Plain gradient descent ``p - lr * g`` (no state)."""

    def update(params, grads, lrs, state, step):
        return [p - lr * g for p, g, lr in zip(params, grads, lrs)], state

    return InnerOptimizer(init=lambda params: (), update=update)


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) derivative where ``v == 0``.

    A gradient entry that is exactly zero (an op removed by soft pruning) gives ``v == 0``,
    where d sqrt(v) / dv is infinite and second-order MAML would get ``inf * 0 = NaN``.
    """
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), 0.0)


@register_inner_optimizer("adam")
def adam(cfg: Any) -> InnerOptimizer:
    """Adam as ``torch.optim.Adam`` (bias-corrected moments, ``eps`` added to ``sqrt(v_hat)``).

    Uses ``cfg.betas`` and ``cfg.eps``; the state is the pair of moment lists ``(m, v)``.
    """
    b1, b2 = cfg.betas
    eps = cfg.eps

    def init(params):
        return [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]

    def update(params, grads, lrs, state, step):
        t = step + 1
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        out, ms, vs = [], [], []
        for p, g, lr, m, v in zip(params, grads, lrs, *state):
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * g * g
            out.append(p - lr * (m / c1) / (_safe_sqrt(v / c2) + eps))
            ms.append(m)
            vs.append(v)
        return out, (ms, vs)

    return InnerOptimizer(init=init, update=update)


__all__ = ["INNER_OPTIMIZERS", "InnerOptimizer", "register_inner_optimizer"]
