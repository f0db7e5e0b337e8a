"""The task learner: a few differentiable optimisation steps on a task's support set.

:func:`adapt` is pure. It takes the meta-weights and meta-alphas as dictionaries, runs
``steps`` updates of a registered inner optimiser (:mod:`metanas.inner_optim`: SGD, Adam, or
your own) on the support loss, and returns new dictionaries; the meta-model is never touched. With ``create_graph=True`` the returned tensors are functions of
the inputs (second-order MAML differentiates through them); with ``create_graph=False`` every
step is cut from the graph and the results are fresh leaves that require grad (first-order
MAML differentiates the query loss with respect to them).

Weights and alphas have separate learning rates, and the alphas can be left untouched
(``adapt_alphas=False``, used during the alpha warm-up of meta-training). The softmax
temperature of the alphas is annealed over the inner steps (MetaNAS, Elsken et al. 2020,
Sec. 3.3): step ``s`` of ``steps`` uses ``temperature(s)``, and the adapted model is read out
at ``temperature(steps)``, the schedule's end point.

There is one inner loop. The only thing that varies is how a gradient is taken: with
:data:`AUTOGRAD` (``torch.autograd.grad``; the default, and the CPU engines' path) or with
:data:`FUNC` (``torch.func.grad``, which composes with ``vmap`` and nested ``grad``). The
outer algorithms use the same two objects for their own gradients, so each algorithm's
per-task contribution is written once for every engine (:mod:`metanas.algorithms`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad

from metanas.tasks.core import check_int

from .errors import ConfigError
from .functional import Params, accuracy, detached, forward
from .inner_optim import INNER_OPTIMIZERS, InnerOptimizer
from .search_space import anneal_temperature


@dataclass(frozen=True)
class InnerLoopConfig:
    """Hyper-parameters of task adaptation.

    Attributes:
        steps: number of gradient steps on the support set.
        lr_weights: inner learning rate of the network weights.
        lr_alphas: inner learning rate of the architecture parameters.
        optimizer: name of a registered inner optimiser (:mod:`metanas.inner_optim`):
            "sgd", "adam" or one of your own.
        optimizer_alphas: the alphas' own inner optimiser (e.g. "adam" for scale-free alpha
            steps beside "sgd" for the weights); None uses ``optimizer`` for both.
        betas: Adam's moment decay rates.
        eps: Adam's epsilon, added to ``sqrt(v_hat)`` as in ``torch.optim.Adam``.
        temperature_start: alpha softmax temperature at the first inner step.
        temperature_end: temperature at the read-out after the last step.
        temperature_schedule: "linear", "exponential" or "constant".
        batch_size: support images per inner update; None (or at least the support size)
            takes the whole support set in every update (``steps`` updates). Smaller: each
            of the ``steps`` epochs is one pass over the support set in shuffled mini-batches
            of ``batch_size`` (the last one smaller), as MetaNAS's task optimiser does; the
            temperature follows the epoch. Batch-norm statistics are then those of each
            mini-batch. The shuffle order of epoch ``e`` is
            ``numpy.random.default_rng(shuffle_seed * 1000003 + e).permutation(n_support)``
            (numpy, so that it is drawn the same inside ``vmap``; task labels are a
            random relabelling, so batches still mix classes differently in every task): runs
            reproduce and every engine agrees.
        shuffle_seed: seed of the mini-batch order.
    """

    steps: int = 5
    lr_weights: float = 0.1
    lr_alphas: float = 0.1
    optimizer: str = "sgd"
    optimizer_alphas: str | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    temperature_start: float = 1.0
    temperature_end: float = 1.0
    temperature_schedule: str = "linear"
    batch_size: int | None = None
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        check_int("inner.steps", self.steps, 0, fix="set inner.steps to a whole number of steps >= 0")
        check_int("inner.shuffle_seed", self.shuffle_seed, 0, fix="set inner.shuffle_seed to an integer >= 0")
        if self.lr_weights < 0 or self.lr_alphas < 0:
            raise ConfigError(
                f"inner learning rates must be >= 0, got lr_weights={self.lr_weights}, "
                f"lr_alphas={self.lr_alphas}"
            )
        for key in ("optimizer", "optimizer_alphas"):
            name = getattr(self, key)
            if name not in INNER_OPTIMIZERS and (key == "optimizer" or name is not None):
                raise ConfigError(
                    f"inner.{key}={name!r} is unknown; use one of "
                    f"{', '.join(map(repr, INNER_OPTIMIZERS))} or register your own with "
                    "metanas.inner_optim.register_inner_optimizer"
                )
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"inner.betas={self.betas} must be two numbers in [0, 1)")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ConfigError(
                f"inner.batch_size={self.batch_size!r} must be a positive integer, or null for "
                "the whole support set"
            )
        # validates the temperatures and the schedule name
        self.temperature(0)

    def batches(self, n_support: int) -> list[list[Tensor | None]]:
        """Per epoch, the index tensors of its mini-batches (``[None]``: the whole set)."""
        if self.batch_size is None or self.batch_size >= n_support:
            return [[None] for _ in range(self.steps)]
        out = []
        for epoch in range(self.steps):
            perm = np.random.default_rng(self.shuffle_seed * 1_000_003 + epoch).permutation(n_support)
            out.append(list(torch.from_numpy(perm).split(self.batch_size)))
        return out

    def inner_optimizer(self, group: str = "weights") -> InnerOptimizer:
        """The registered optimiser of ``group`` ("weights" or "alphas"), built with these
        settings."""
        name = self.optimizer_alphas if group == "alphas" and self.optimizer_alphas else self.optimizer
        return INNER_OPTIMIZERS[name](self)

    def temperature(self, step: int) -> float:
        """Softmax temperature at inner step ``step`` (``steps`` is the read-out)."""
        return anneal_temperature(step, self.steps + 1, self.temperature_start,
                                  self.temperature_end, self.temperature_schedule)


@dataclass(frozen=True)
class Adapted:
    """The result of adapting to one task.

    Attributes:
        weights: adapted network weights, name -> tensor.
        alphas: adapted architecture parameters, name -> tensor.
        temperature: the temperature at which the adapted model is read out.
        support_losses: detached support loss before each inner update, 0-dim tensors
            (one per step; with mini-batches, one per mini-batch: that batch's loss).
    """

    weights: Params
    alphas: Params
    temperature: float
    support_losses: tuple[Tensor, ...] = field(default=())


class AutogradGrads:
    """Gradients with :func:`torch.autograd.grad`: the CPU fast paths (pruned-op skipping,
    channels-last pools) apply, and ``create_graph`` keeps the graph for second order."""

    def start(self, weights: Mapping[str, Tensor], alphas: Mapping[str, Tensor],
              create_graph: bool, adapt_alphas: bool) -> tuple[Params, Params]:
        """The tensors the inner loop starts from: the inputs themselves for second order,
        else fresh leaves (the meta-model is never part of a first-order graph)."""
        if create_graph:
            return dict(weights), dict(alphas)
        return detached(weights, requires_grad=True), detached(alphas, requires_grad=adapt_alphas)

    def loss_grads(self, loss_fn, w: Params, a: Params, names_a: list[str],
                   create_graph: bool = False) -> tuple[Params, Params, Any]:
        """``loss_fn(w, a) -> (loss, aux)``; returns ``(d loss/d w, d loss/d a[names_a], aux)``.

        Tensors the loss does not depend on get zero gradients.
        """
        loss, aux = loss_fn(w, a)
        targets = list(w.values()) + [a[n] for n in names_a]
        grads = torch.autograd.grad(loss, targets, create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]
        return dict(zip(w, grads)), dict(zip(names_a, grads[len(w):])), aux

    def step_context(self, create_graph: bool):
        """Autograd records the optimiser update only when the graph is kept."""
        return torch.set_grad_enabled(create_graph)

    def after_step(self, new: list[Tensor], create_graph: bool) -> list[Tensor]:
        """Without a graph every step's results are cut off as fresh leaves."""
        return new if create_graph else [t.detach().requires_grad_(True) for t in new]


class FuncGrads:
    """Gradients with :func:`torch.func.grad`: composes with ``vmap`` and with an enclosing
    ``torch.func.grad`` (which then differentiates through the inner loop)."""

    def start(self, weights, alphas, create_graph, adapt_alphas):
        return dict(weights), dict(alphas)

    def loss_grads(self, loss_fn, w, a, names_a, create_graph=False):
        if names_a:  # the inner loop adapts all alphas or none
            (g_w, g_a), aux = grad(loss_fn, argnums=(0, 1), has_aux=True)(w, a)
            return g_w, g_a, aux
        g_w, aux = grad(loss_fn, argnums=0, has_aux=True)(w, a)
        return g_w, {}, aux

    def step_context(self, create_graph):
        return contextlib.nullcontext()

    def after_step(self, new, create_graph):
        return new


AUTOGRAD = AutogradGrads()
FUNC = FuncGrads()
Grads = AutogradGrads | FuncGrads
"""How the inner loop (and an outer loop) takes gradients: :data:`AUTOGRAD` or :data:`FUNC`."""


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
    grads: Grads = AUTOGRAD,
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
        create_graph: keep the graph of every step (second-order MAML with :data:`AUTOGRAD`;
            with :data:`FUNC` an enclosing ``torch.func.grad`` decides).
        adapt_alphas: update the alphas too; if False they are returned as given.
        buffers: module buffers, if any.
        grads: :data:`AUTOGRAD` (default) or :data:`FUNC` (composable with ``vmap``); the
            only thing that differs between the two is how each step's gradient is taken.

    Returns:
        The adapted weights and alphas. With :data:`AUTOGRAD` and no ``create_graph`` they
        are new leaves that require grad; the meta-weights are never modified.
    """
    w, a = grads.start(weights, alphas, create_graph, adapt_alphas)
    names_w, names_a = list(w), (list(a) if adapt_alphas else [])
    # (optimiser, tensors, names, learning rate, state) of the weights and of the alphas
    groups = [[cfg.inner_optimizer("weights"), w, names_w, cfg.lr_weights, None],
              [cfg.inner_optimizer("alphas"), a, names_a, cfg.lr_alphas, None]]
    losses = []
    update = 0  # counts optimiser updates (Adam's bias correction), epochs count temperatures
    for epoch, batches in enumerate(cfg.batches(support_x.shape[0])):
        for index in batches:
            x, y = (support_x, support_y) if index is None else (support_x[index], support_y[index])

            def support_loss(w_: Params, a_: Params, x=x, y=y, temperature=cfg.temperature(epoch)):
                loss = F.cross_entropy(forward(net, w_, a_, x, temperature, buffers), y)
                return loss, loss.detach()

            g_w, g_a, loss = grads.loss_grads(support_loss, w, a, names_a, create_graph)
            losses.append(loss)
            for group, g in zip(groups, (g_w, g_a)):
                opt, params, names, lr, state = group
                if not names:
                    continue
                current = [params[n] for n in names]
                state = opt.init(current) if state is None else state
                with grads.step_context(create_graph):
                    new, group[4] = opt.update(current, [g[n] for n in names], [lr] * len(names), state, update)
                params.update(zip(names, grads.after_step(new, create_graph)))
            update += 1
    return Adapted(w, a, cfg.temperature(cfg.steps), tuple(losses))


def alpha_displacement(adapted: Mapping[str, Tensor], alphas: Mapping[str, Tensor]) -> Tensor:
    """How far adaptation moved the architecture: the L2 norm, over all alpha tensors
    together, of ``adapted - alphas`` (0-dim, no graph; 0 without alphas)."""
    with torch.no_grad():
        total = sum((((adapted[k] - v) ** 2).sum() for k, v in alphas.items()), torch.zeros(()))
        return total.sqrt()


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


__all__ = ["AUTOGRAD", "FUNC", "Adapted", "InnerLoopConfig", "adapt", "alpha_displacement", "predict", "query_loss"]
