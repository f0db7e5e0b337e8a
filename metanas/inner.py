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

Three options, all off by default:

- Meta-SGD (Li et al. 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning"):
  ``meta_sgd=True`` replaces the scalar inner learning rates of the SGD update by
  :class:`LearnedRates`, one rate per element of every weight and alpha tensor, passed to
  :func:`adapt` explicitly and meta-learned by the outer loop
  (``theta <- theta - r * grad``, elementwise).
- An entropy regulariser on the alphas (:func:`alpha_entropy`): ``entropy_weight * H`` with
  ``H`` the mean over edges of the entropy of ``softmax(alphas / T)``, added to the support
  objective of every inner step, to the query objective of the outer loop, or both.
- An alpha refinement after the inner steps (``alpha_refine_steps``): alpha-only Adam steps on
  the support set, each image shifted by a few pixels afresh at every step
  (``alpha_refine_shift``), the weights held at their adapted values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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


ENTROPY_OBJECTIVES = ("query", "support", "both")
"""Where the alpha-entropy regulariser may be added (``InnerLoopConfig.entropy_objective``)."""


def alpha_entropy(alphas: Mapping[str, Tensor], temperature: float = 1.0) -> Tensor:
    """Mean over edges of the entropy of each edge's op weights ``softmax(alphas / T)``.

    ``H = 1/E * sum_e -sum_o p_eo log p_eo`` with ``p_e = softmax(alpha_e / T)`` over the ops
    of edge ``e``, the ``E`` edges of all op-alpha tensors (shape ``(n_edges, n_ops)``)
    together. The plain softmax: not the pruned op weights of a ``prune_threshold``. 1-D alpha
    tensors (``pairwise_input_alphas``' edge weights) are not included. ``0 <= H <= log(n_ops)``;
    a 0-dim tensor, differentiable in the alphas.

    Raises:
        ValueError: there is no op-alpha tensor.
    """
    per_edge = []
    for a in alphas.values():
        if a.dim() == 2:
            z = a / temperature
            per_edge.append(-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1))
    if not per_edge:
        raise ValueError("alpha_entropy needs at least one (n_edges, n_ops) alpha tensor")
    return torch.cat(per_edge).mean()


class LearnedRates(NamedTuple):
    """Meta-SGD's learned inner learning rates: one per element of every weight and alpha.

    Attributes:
        weights: name -> rates, same names and shapes as the weights.
        alphas: name -> rates, same names and shapes as the alphas.
    """

    weights: Params
    alphas: Params

    @staticmethod
    def like(weights: Mapping[str, Tensor], alphas: Mapping[str, Tensor], cfg: "InnerLoopConfig") -> "LearnedRates":
        """Rates equal to the scalar rates ``cfg.lr_weights`` / ``cfg.lr_alphas`` (the
        initialisation; with them :func:`adapt` takes the steps of plain SGD exactly)."""
        return LearnedRates(
            {k: torch.full_like(v.detach(), cfg.lr_weights) for k, v in weights.items()},
            {k: torch.full_like(v.detach(), cfg.lr_alphas) for k, v in alphas.items()},
        )


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
        meta_sgd: Meta-SGD: every weight and alpha element has its own learned inner learning
            rate (:class:`LearnedRates`, initialised at ``lr_weights`` / ``lr_alphas``) that
            the outer loop meta-learns; the SGD update is ``p - r * g`` elementwise. Needs the
            "sgd" inner optimiser for weights and alphas (another optimiser's rates are not
            defined) and an outer loop with a rate gradient (MAML, FOMAML; Reptile refuses).
        entropy_weight: weight ``lambda`` of the alpha-entropy regulariser
            ``lambda * alpha_entropy(alphas, T)`` (:func:`alpha_entropy`); 0 turns it off. A
            negative weight is allowed: it rewards entropy, pushing the op weights toward
            uniform (bounded: the entropy is at most ``log(n_ops)``).
        entropy_objective: where the regulariser is added: "query" (the outer objective of
            MAML/FOMAML, at the adapted alphas), "support" (every inner step's objective, so it
            shapes the alphas' adaptation) or "both". Reptile has no query objective.
        entropy_temperature: ``T``; None uses the temperature the network runs at there
            (the step's for the support objective, the read-out one for the query objective).
        alpha_refine_steps: alpha-only steps after the ``steps`` updates (0: none): the
            weights stay at their adapted values and the alphas take this many Adam steps
            (``betas``, ``eps``; fresh moments) on the support cross-entropy at the read-out
            temperature. Runs only where the alphas are adapted, so the frozen-alpha
            comparison of a meta-test leaves it out.
        alpha_refine_lr: Adam learning rate of those steps.
        alpha_refine_shift: at each refinement step every support image is moved by its own
            whole-pixel shift of at most this many pixels in each direction (circularly,
            ``torch.roll``); 0 keeps the images as they are. Once the weights fit the
            support, its cross-entropy leaves the alphas little to learn from; shifted copies
            act as images the weights were not fitted to. The shifts of step ``r`` are
            ``numpy.random.default_rng([shuffle_seed, 1, r]).integers(-s, s + 1, (n_support, 2))``
            (rows: dy, dx), the same in every engine. ``benchmarks/alpha_refine.py``
            measures it on a checkpoint (``benchmarks/alpha_headroom.py``: why it may help).
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
    meta_sgd: bool = False
    entropy_weight: float = 0.0
    entropy_objective: str = "query"
    entropy_temperature: float | None = None
    alpha_refine_steps: int = 0
    alpha_refine_lr: float = 0.1
    alpha_refine_shift: int = 0

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
        self._check_options()
        check_int("inner.alpha_refine_steps", self.alpha_refine_steps, 0,
                  fix="set inner.alpha_refine_steps to a whole number of steps >= 0 (0: no refinement)")
        check_int("inner.alpha_refine_shift", self.alpha_refine_shift, 0,
                  fix="set inner.alpha_refine_shift to a whole number of pixels >= 0 (0: no shift)")
        lr = self.alpha_refine_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr < 0:
            raise ConfigError(f"inner.alpha_refine_lr={lr!r} must be a finite number >= 0; set it to e.g. 0.1")

    def _check_options(self) -> None:
        """Meta-SGD and the entropy regulariser: types, values and combinations."""
        if not isinstance(self.meta_sgd, bool):
            raise ConfigError(f"inner.meta_sgd={self.meta_sgd!r} is not a boolean; set inner.meta_sgd=true or false")
        if self.meta_sgd:
            names = {"optimizer": self.optimizer_name("weights"), "optimizer_alphas": self.optimizer_name("alphas")}
            for key, name in names.items():
                if name != "sgd":
                    raise ConfigError(
                        f"inner.meta_sgd=true learns the rates of the SGD update, but inner.{key}={name!r}; "
                        f"set inner.{key}=sgd or inner.meta_sgd=false"
                    )
        w = self.entropy_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w):
            raise ConfigError(f"inner.entropy_weight={w!r} is not a finite number; set it to e.g. 0.01 (0: off)")
        if self.entropy_objective not in ENTROPY_OBJECTIVES:
            raise ConfigError(
                f"inner.entropy_objective={self.entropy_objective!r} is unknown; use one of "
                f"{', '.join(ENTROPY_OBJECTIVES)}"
            )
        t = self.entropy_temperature
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            raise ConfigError(
                f"inner.entropy_temperature={t!r} must be a number > 0, or null for the network's temperature"
            )

    def entropy_on(self, objective: str) -> bool:
        """Whether the entropy regulariser is added to ``objective`` ("support" or "query")."""
        return self.entropy_weight != 0 and self.entropy_objective in (objective, "both")

    def entropy_penalty(self, alphas: Mapping[str, Tensor], temperature: float) -> Tensor:
        """``entropy_weight * alpha_entropy(alphas, T)`` with ``T = entropy_temperature``, or
        ``temperature`` (the network's there) when that is None."""
        t = temperature if self.entropy_temperature is None else self.entropy_temperature
        return self.entropy_weight * alpha_entropy(alphas, t)

    def batches(self, n_support: int) -> list[list[Tensor | None]]:
        """Per epoch, the index tensors of its mini-batches (``[None]``: the whole set)."""
        if self.batch_size is None or self.batch_size >= n_support:
            return [[None] for _ in range(self.steps)]
        out = []
        for epoch in range(self.steps):
            perm = np.random.default_rng(self.shuffle_seed * 1_000_003 + epoch).permutation(n_support)
            out.append(list(torch.from_numpy(perm).split(self.batch_size)))
        return out

    def optimizer_name(self, group: str = "weights") -> str:
        """The inner optimiser's name for ``group`` ("weights" or "alphas"): the alphas use
        ``optimizer_alphas`` where it is set, else the weights' ``optimizer``."""
        return self.optimizer_alphas if group == "alphas" and self.optimizer_alphas else self.optimizer

    def inner_optimizer(self, group: str = "weights") -> InnerOptimizer:
        """The registered optimiser of ``group`` ("weights" or "alphas"), built with these
        settings."""
        return INNER_OPTIMIZERS[self.optimizer_name(group)](self)

    def refine_shifts(self, step: int, n_support: int) -> np.ndarray:
        """The ``(n_support, 2)`` whole-pixel shifts (dy, dx) of refinement step ``step``."""
        s = self.alpha_refine_shift
        return np.random.default_rng([self.shuffle_seed, 1, step]).integers(-s, s + 1, (n_support, 2))

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
            (one per step; with mini-batches, one per mini-batch: that batch's loss). The
            cross-entropy only, without an entropy regulariser.
        gradient_sums: with learned rates and no graph (first order), name -> the sum over
            all updates of the support gradients applied to that tensor, as
            ``LearnedRates(weights, alphas)`` (``theta' = theta - r * sum``); else None.
    """

    weights: Params
    alphas: Params
    temperature: float
    support_losses: tuple[Tensor, ...] = field(default=())
    gradient_sums: LearnedRates | None = None


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
                   create_graph: bool = False, weights: bool = True) -> tuple[Params, Params, Any]:
        """``loss_fn(w, a) -> (loss, aux)``; returns ``(d loss/d w, d loss/d a[names_a], aux)``.

        Tensors the loss does not depend on get zero gradients. ``weights=False`` takes the
        alphas' gradient alone (the first dictionary is then empty).
        """
        loss, aux = loss_fn(w, a)
        names_w = list(w) if weights else []
        targets = [w[n] for n in names_w] + [a[n] for n in names_a]
        grads = torch.autograd.grad(loss, targets, create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]
        return dict(zip(names_w, grads)), dict(zip(names_a, grads[len(names_w):])), aux

    def loss_grads_rates(self, loss_fn, w: Params, a: Params, names_a: list[str],
                         rates: LearnedRates) -> tuple[Params, Params, LearnedRates, Any]:
        """``loss_fn(w, a, rates) -> (loss, aux)``; the gradients with respect to ``w``,
        ``a[names_a]``, ``rates.weights`` and ``rates.alphas[names_a]`` (zeros where unused)."""
        loss, aux = loss_fn(w, a, rates)
        groups = [w, {n: a[n] for n in names_a}, rates.weights, {n: rates.alphas[n] for n in names_a}]
        targets = [t for g in groups for t in g.values()]
        flat = torch.autograd.grad(loss, targets, allow_unused=True)
        flat = iter(torch.zeros_like(t) if g is None else g for t, g in zip(targets, flat))
        g_w, g_a, r_w, r_a = ({n: next(flat) for n in g} for g in groups)
        return g_w, g_a, LearnedRates(r_w, r_a), aux

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

    def loss_grads(self, loss_fn, w, a, names_a, create_graph=False, weights=True):
        if not weights:
            g_a, aux = grad(loss_fn, argnums=1, has_aux=True)(w, a)
            return {}, g_a, aux
        if names_a:  # the inner loop adapts all alphas or none
            (g_w, g_a), aux = grad(loss_fn, argnums=(0, 1), has_aux=True)(w, a)
            return g_w, g_a, aux
        g_w, aux = grad(loss_fn, argnums=0, has_aux=True)(w, a)
        return g_w, {}, aux

    def loss_grads_rates(self, loss_fn, w, a, names_a, rates):
        (g_w, g_a, g_r), aux = grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(w, a, rates)
        if not names_a:
            g_a, g_r = {}, LearnedRates(g_r.weights, {})
        return g_w, g_a, LearnedRates(dict(g_r.weights), dict(g_r.alphas)), aux

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
    rates: LearnedRates | None = None,
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
        rates: Meta-SGD's learned rates (required with ``cfg.meta_sgd``, refused without):
            the SGD update of every tensor is ``p - rates[name] * g`` elementwise. For
            second-order MAML they are leaves of the meta-gradient like the weights.

    The support objective of each step is the cross-entropy, plus
    ``cfg.entropy_penalty(a, temperature(step))`` when ``cfg.entropy_on("support")`` and the
    alphas are adapted. Then, when the alphas are adapted, ``cfg.alpha_refine_steps``
    alpha-only Adam steps on the (shifted) support set (:class:`InnerLoopConfig`).

    Returns:
        The adapted weights and alphas. With :data:`AUTOGRAD` and no ``create_graph`` they
        are new leaves that require grad; the meta-weights are never modified.
    """
    if cfg.meta_sgd != (rates is not None):
        raise ValueError("adapt: pass rates (LearnedRates) exactly when cfg.meta_sgd is set")
    w, a = grads.start(weights, alphas, create_graph, adapt_alphas)
    names_w, names_a = list(w), (list(a) if adapt_alphas else [])
    # (optimiser, tensors, names, learning rates by name, state) of the weights and of the alphas
    if rates is None:
        lrs = [dict.fromkeys(names_w, cfg.lr_weights), dict.fromkeys(names_a, cfg.lr_alphas)]
    else:
        lrs = [rates.weights, rates.alphas]
    groups = [[cfg.inner_optimizer("weights"), w, names_w, lrs[0], None],
              [cfg.inner_optimizer("alphas"), a, names_a, lrs[1], None]]
    # first order with learned rates: the sums of the applied gradients (FOMAML's rate gradient)
    sums = LearnedRates({}, {}) if rates is not None and not create_graph else None
    entropy = cfg.entropy_on("support") and bool(names_a)
    losses = []
    update = 0  # counts optimiser updates (Adam's bias correction), epochs count temperatures
    for epoch, batches in enumerate(cfg.batches(support_x.shape[0])):
        for index in batches:
            x, y = (support_x, support_y) if index is None else (support_x[index], support_y[index])

            def support_loss(w_: Params, a_: Params, x=x, y=y, temperature=cfg.temperature(epoch)):
                loss = F.cross_entropy(forward(net, w_, a_, x, temperature, buffers), y)
                if entropy:
                    return loss + cfg.entropy_penalty(a_, temperature), loss.detach()
                return loss, loss.detach()

            g_w, g_a, loss = grads.loss_grads(support_loss, w, a, names_a, create_graph)
            losses.append(loss)
            for i, (group, g) in enumerate(zip(groups, (g_w, g_a))):
                opt, params, names, lr, state = group
                if not names:
                    continue
                current = [params[n] for n in names]
                state = opt.init(current) if state is None else state
                with grads.step_context(create_graph):
                    new, group[4] = opt.update(current, [g[n] for n in names], [lr[n] for n in names], state, update)
                params.update(zip(names, grads.after_step(new, create_graph)))
                if sums is not None:
                    total = sums[i]
                    for n in names:
                        step = g[n].detach()
                        total[n] = step if n not in total else total[n] + step
            update += 1
    if names_a and cfg.alpha_refine_steps:
        a = _refine_alphas(net, w, a, names_a, support_x, support_y, cfg, buffers, grads, create_graph)
    if sums is not None:  # tensors never updated (no steps) have summed nothing
        sums = LearnedRates({n: sums.weights.get(n, torch.zeros_like(w[n])).detach() for n in names_w},
                            {n: sums.alphas.get(n, torch.zeros_like(a[n])).detach() for n in names_a})
    return Adapted(w, a, cfg.temperature(cfg.steps), tuple(losses), sums)


def shift_images(x: Tensor, shifts: np.ndarray) -> Tensor:
    """Image ``i`` of ``x`` (N, C, H, W) rolled by ``shifts[i] = (dy, dx)`` whole pixels."""
    return torch.stack([torch.roll(x[i], (int(dy), int(dx)), dims=(-2, -1)) for i, (dy, dx) in enumerate(shifts)])


def _refine_alphas(net: nn.Module, w: Params, a: Params, names_a: list[str], support_x: Tensor,
                   support_y: Tensor, cfg: InnerLoopConfig, buffers, grads: Grads, create_graph: bool) -> Params:
    """``cfg.alpha_refine_steps`` Adam steps on the alphas alone, the weights ``w`` held."""
    opt = INNER_OPTIMIZERS["adam"](cfg)
    temperature = cfg.temperature(cfg.steps)
    a = dict(a)
    lrs = [cfg.alpha_refine_lr] * len(names_a)
    state = None
    for step in range(cfg.alpha_refine_steps):
        x = support_x if not cfg.alpha_refine_shift else shift_images(support_x, cfg.refine_shifts(step, len(support_y)))

        def loss_fn(w_: Params, a_: Params, x=x):
            loss = F.cross_entropy(forward(net, w_, a_, x, temperature, buffers), support_y)
            return loss, loss.detach()

        _, g_a, _ = grads.loss_grads(loss_fn, w, a, names_a, create_graph, weights=False)
        current = [a[n] for n in names_a]
        state = opt.init(current) if state is None else state
        with grads.step_context(create_graph):
            new, state = opt.update(current, [g_a[n] for n in names_a], lrs, state, step)
        a.update(zip(names_a, grads.after_step(new, create_graph)))
    return a


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


__all__ = ["AUTOGRAD", "ENTROPY_OBJECTIVES", "FUNC", "Adapted", "InnerLoopConfig", "LearnedRates", "adapt",
           "alpha_displacement", "alpha_entropy", "predict", "query_loss"]
