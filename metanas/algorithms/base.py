"""The outer-loop protocol: from a meta-batch of tasks to meta-gradients.

An algorithm never steps an optimiser. It returns, for the meta-weights and the meta-alphas,
a tensor per name that the trainer hands to two ordinary ``torch.optim`` meta-optimisers as
``.grad``. For MAML this is the true meta-gradient; for Reptile it is the Reptile direction
``theta - mean(theta'_i)`` (Nichol et al. 2018), so that plain SGD with learning rate ``eps``
performs ``theta <- theta + eps * (mean(theta'_i) - theta)`` and any optimiser can be used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..functional import Params
from ..inner import Adapted, InnerLoopConfig
from metanas.tasks import Task


@dataclass(frozen=True)
class MetaGradients:
    """Meta-gradients of one meta-batch and its training statistics.

    Attributes:
        weights: name -> gradient-like tensor, same keys and shapes as the meta-weights.
        alphas: name -> gradient-like tensor for the meta-alphas, or None when the alphas
            were frozen (alpha warm-up).
        query_loss: mean query cross-entropy of the adapted models.
        query_accuracy: mean query accuracy of the adapted models.
        support_loss: mean support loss before adaptation (the first inner step).
    """

    weights: Params
    alphas: Params | None
    query_loss: float
    query_accuracy: float
    support_loss: float


@runtime_checkable
class MetaAlgorithm(Protocol):
    """Computes meta-gradients for a meta-batch of tasks. Must not modify its inputs."""

    def meta_gradients(
        self,
        net: nn.Module,
        weights: Mapping[str, Tensor],
        alphas: Mapping[str, Tensor],
        tasks: Sequence[Task],
        inner: InnerLoopConfig,
        *,
        adapt_alphas: bool = True,
    ) -> MetaGradients: ...


class _Mean:
    """Running mean of dictionaries of tensors and of scalar statistics."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.sums: dict[str, Params] = {}
        self.stats: dict[str, float] = {}

    def add(self, key: str, tensors: Mapping[str, Tensor]) -> None:
        acc = self.sums.setdefault(key, {})
        for name, t in tensors.items():
            t = t.detach()
            acc[name] = t / self.n if name not in acc else acc[name] + t / self.n

    def add_stat(self, key: str, value: Tensor) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + float(value) / self.n

    def result(self, alphas: bool) -> MetaGradients:
        """The averaged meta-gradients; ``alphas`` False means the alphas were frozen."""
        return MetaGradients(
            weights=self.sums["weights"],
            alphas=self.sums["alphas"] if alphas else None,
            query_loss=self.stats["query_loss"],
            query_accuracy=self.stats["query_accuracy"],
            support_loss=self.stats["support_loss"],
        )


def grads_of(loss: Tensor, *groups: Mapping[str, Tensor]) -> tuple[Params, ...]:
    """``d loss / d tensors`` for each group of named tensors, in the order given.

    Tensors that ``loss`` does not depend on get zero gradients.
    """
    keys = [(i, name) for i, group in enumerate(groups) for name in group]
    flat = [groups[i][name] for i, name in keys]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    out: tuple[Params, ...] = tuple({} for _ in groups)
    for (i, name), t, g in zip(keys, flat, grads):
        out[i][name] = torch.zeros_like(t) if g is None else g
    return out


def first_support_loss(adapted: Adapted) -> Tensor:
    """The support loss before adaptation, or NaN when no inner step was taken."""
    if adapted.support_losses:
        return adapted.support_losses[0]
    return torch.tensor(float("nan"))
