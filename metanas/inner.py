"""The task learner: a few differentiable optimisation steps on a task's support set.

:func:`adapt` is pure. It takes the meta-weights and meta-alphas as dictionaries, runs
``steps`` updates of SGD or Adam on the support loss, and returns new dictionaries; the
meta-model is never touched. With ``create_graph=True`` the returned tensors are functions of
the inputs (second-order MAML differentiates through them); with ``create_graph=False`` every
step is cut from the graph and the results are fresh leaves that require grad (first-order
MAML differentiates the query loss with respect to them).

Weights and alphas have separate learning rates, and the alphas can be left untouched
(``adapt_alphas=False``, used during the alpha warm-up of meta-training). The softmax
temperature of the alphas is annealed over the inner steps (MetaNAS, Elsken et al. 2020,
Sec. 3.3): step ``s`` of ``steps`` uses ``temperature(s)``, and the adapted model is read out
at ``temperature(steps)``, the schedule's end point.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .functional import Params, accuracy, detached, forward
from .search_space import anneal_temperature


@dataclass(frozen=True)
class InnerLoopConfig:
    """Hyper-parameters of task adaptation.

    Attributes:
        steps: number of gradient steps on the support set.
        lr_weights: inner learning rate of the network weights.
        lr_alphas: inner learning rate of the architecture parameters.
        optimizer: "sgd" or "adam" (both differentiable).
        betas: Adam's moment decay rates.
        eps: Adam's epsilon, added to ``sqrt(v_hat)`` as in ``torch.optim.Adam``.
        temperature_start: alpha softmax temperature at the first inner step.
        temperature_end: temperature at the read-out after the last step.
        temperature_schedule: "linear", "exponential" or "constant".
    """

    steps: int = 5
    lr_weights: float = 0.1
    lr_alphas: float = 0.1
    optimizer: Literal["sgd", "adam"] = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    temperature_start: float = 1.0
    temperature_end: float = 1.0
    temperature_schedule: str = "linear"

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"inner.steps={self.steps} is negative; use 0 or more steps")
        if self.lr_weights < 0 or self.lr_alphas < 0:
            raise ConfigError(
                f"inner learning rates must be >= 0, got lr_weights={self.lr_weights}, "
                f"lr_alphas={self.lr_alphas}"
            )
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(
                f"inner.optimizer={self.optimizer!r} is unknown; use 'sgd' or 'adam'"
            )
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"inner.betas={self.betas} must be two numbers in [0, 1)")
        # validates the temperatures and the schedule name
        self.temperature(0)

    def temperature(self, step: int) -> float:
        """Softmax temperature at inner step ``step`` (``steps`` is the read-out)."""
        return anneal_temperature(
            step,
            self.steps + 1,
            self.temperature_start,
            self.temperature_end,
            self.temperature_schedule,
        )


@dataclass(frozen=True)
class Adapted:
    """The result of adapting to one task.

    Attributes:
        weights: adapted network weights, name -> tensor.
        alphas: adapted architecture parameters, name -> tensor.
        temperature: the temperature at which the adapted model is read out.
        support_losses: detached support loss before each inner step, ``steps`` 0-dim tensors.
    """

    weights: Params
    alphas: Params
    temperature: float
    support_losses: tuple[Tensor, ...] = field(default=())


def _sgd(tensors: list[Tensor], grads: list[Tensor], lrs: list[float]) -> list[Tensor]:
    return [p - lr * g for p, g, lr in zip(tensors, grads, lrs)]


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) derivative where ``v == 0``.

    A gradient entry that is exactly zero (an op removed by soft pruning) gives ``v == 0``,
    where d sqrt(v) / dv is infinite and second-order MAML would get ``inf * 0 = NaN``.
    """
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), 0.0)


def _adam(
    tensors: list[Tensor],
    grads: list[Tensor],
    lrs: list[float],
    state: dict,
    step: int,
    betas: tuple[float, float],
    eps: float,
) -> list[Tensor]:
    b1, b2 = betas
    if not state:
        state["m"] = [torch.zeros_like(g) for g in grads]
        state["v"] = [torch.zeros_like(g) for g in grads]
    t = step + 1
    c1, c2 = 1.0 - b1**t, 1.0 - b2**t
    out, ms, vs = [], [], []
    for p, g, lr, m, v in zip(tensors, grads, lrs, state["m"], state["v"]):
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * g * g
        out.append(p - lr * (m / c1) / (_safe_sqrt(v / c2) + eps))
        ms.append(m)
        vs.append(v)
    state["m"], state["v"] = ms, vs
    return out


def adapt(
    net: nn.Module,
    weights: Mapping[str, Tensor],
    alphas: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    cfg: InnerLoopConfig,
    *,
    create_graph: bool = False,
    adapt_alphas: bool = True,
    buffers: Mapping[str, Tensor] | None = None,
) -> Adapted:
    """Adapt weights (and alphas) to one task's support set.

    Args:
        net: the supernet; only its ``forward`` is used, its parameters are not read.
        weights: meta-weights, name -> tensor. With ``create_graph=True`` they must require
            grad (they are the leaves of the meta-gradient).
        alphas: meta-alphas, name -> tensor.
        support_x: support inputs, shape (N*K, C, H, W).
        support_y: support labels, shape (N*K,), values in 0..N-1.
        cfg: inner-loop hyper-parameters.
        create_graph: keep the graph of every step (second-order MAML).
        adapt_alphas: update the alphas too; if False they are returned as given.
        buffers: module buffers, if any.

    Returns:
        The adapted weights and alphas. Without ``create_graph`` they are new leaves that
        require grad; the meta-weights are never modified.
    """
    names_w = list(weights)
    names_a = list(alphas)
    if create_graph:
        w, a = dict(weights), dict(alphas)
    else:
        w = detached(weights, requires_grad=True)
        a = detached(alphas, requires_grad=adapt_alphas)
    targets = names_w + (names_a if adapt_alphas else [])
    lrs = [cfg.lr_weights] * len(names_w) + [cfg.lr_alphas] * (len(targets) - len(names_w))
    state: dict = {}
    losses = []
    for step in range(cfg.steps):
        logits = forward(net, w, a, support_x, cfg.temperature(step), buffers)
        loss = F.cross_entropy(logits, support_y)
        losses.append(loss.detach())
        current = [w[n] for n in names_w] + [a[n] for n in targets[len(names_w):]]
        grads = torch.autograd.grad(
            loss, current, create_graph=create_graph, allow_unused=True
        )
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(current, grads)]
        with torch.set_grad_enabled(create_graph):
            if cfg.optimizer == "sgd":
                new = _sgd(current, grads, lrs)
            else:
                new = _adam(current, grads, lrs, state, step, cfg.betas, cfg.eps)
        if not create_graph:
            new = [t.detach().requires_grad_(True) for t in new]
        w.update(zip(names_w, new[: len(names_w)]))
        a.update(zip(targets[len(names_w) :], new[len(names_w) :]))
    return Adapted(w, a, cfg.temperature(cfg.steps), tuple(losses))


def predict(
    net: nn.Module,
    adapted: Adapted,
    x: Tensor,
    buffers: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Logits of the adapted model on ``x`` (B, C, H, W) -> (B, n_way), batch statistics of x."""
    return forward(net, adapted.weights, adapted.alphas, x, adapted.temperature, buffers)


def query_loss(
    net: nn.Module,
    adapted: Adapted,
    query_x: Tensor,
    query_y: Tensor,
    buffers: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy (both 0-dim) of the adapted model on a query set."""
    logits = predict(net, adapted, query_x, buffers)
    return F.cross_entropy(logits, query_y), accuracy(logits, query_y)


__all__ = ["Adapted", "InnerLoopConfig", "adapt", "predict", "query_loss"]
