"""Few-shot adaptation of a meta-trained checkpoint to a user's own data (no Hydra here).

Pipeline for one task of a supernet checkpoint: load the meta-model (:func:`load_meta_model`), check the data fits it
(:func:`check_fits`), adapt weights and alphas on the labelled support set with the
checkpoint's inner loop (:func:`adapt_support`), derive the task's genotype from the adapted
alphas, and build the task's :class:`~metanas.search_space.DiscreteNetwork` inheriting the
adapted supernet weights. That discrete network is the model a user takes away (see
:mod:`metanas.export`); its predictions are what ``predictions.csv`` reports. The adapted
supernet (the soft mixture of all ops) is evaluated alongside, so the cost of discretising is
visible.

A checkpoint of a network without alphas (``model=conv4`` or ``model=genotype``,
:mod:`metanas.models`) adapts its weights alone; its task network is that network with the
adapted weights (the genotype network's genotype is its fixed one, conv-4 has none), and
there is no supernet to compare with.

Both networks normalise with batch statistics: query images are classified in one batch
(the transductive protocol of MAML and MetaNAS). The exported model
(:class:`metanas.export.StandaloneClassifier` given the support images) freezes the discrete
network's BatchNorm statistics at those of the support set instead, so that it classifies
every image on its own.

Confidence intervals: over query images of one task, the Wilson score interval of a binomial
proportion (:func:`wilson_ci95`; better than the normal approximation near 0 or 1 and for few
images); over sampled tasks, the normal approximation over per-task accuracies
(:func:`metanas.evaluate.mean_ci95`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metanas.tasks import Split, TaskSampler
from metanas.tasks.core import check_int

from .checkpoint import load_checkpoint
from .errors import CheckpointError, ConfigError
from .evaluate import evaluate, mean_ci95
from .inner import Adapted, InnerLoopConfig, LearnedRates, adapt, predict
from .engines import TaskPool, default_workers
from .memory import GB, MEMORY_SEED, budget_bytes, estimate_task_bytes, tasks_that_fit
from .models import SUPERNET, build_model, checkpoint_model
from .search_space import (
    DiscreteNetwork,
    Genotype,
    SearchSpaceConfig,
    derive_genotype,
)

__all__ = [
    "AdaptedTask",
    "MetaModel",
    "adapt_support",
    "check_fits",
    "discretise",
    "evaluate_tasks",
    "load_meta_model",
    "wilson_ci95",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class MetaModel:
    """A meta-trained network ready for adaptation.

    Attributes:
        net: the supernet, or a network without alphas (its own parameters are not used;
            weights are passed explicitly).
        weights: meta-weights, name -> tensor.
        alphas: meta-alphas, name -> tensor (empty without alphas).
        space: the search space it was built with.
        inner: the inner loop to adapt with (the checkpoint's, unless overridden).
        image_size: the image side length it was meta-trained on, if the checkpoint records it.
        path: the checkpoint file.
        rates: Meta-SGD's learned inner rates, when it was meta-trained with
            ``inner.meta_sgd`` (then every adaptation uses them); else None.
        model: the model spec the checkpoint records (:mod:`metanas.models`).
    """

    net: nn.Module
    weights: dict[str, Tensor]
    alphas: dict[str, Tensor]
    space: SearchSpaceConfig
    inner: InnerLoopConfig
    image_size: int | None
    path: Path
    rates: LearnedRates | None = None
    model: dict[str, Any] = field(default_factory=lambda: dict(SUPERNET))

    @property
    def genotype(self) -> Genotype | None:
        """The meta-architecture: genotype of the meta-alphas at the inner loop's read-out
        temperature (the temperature every task's genotype is derived at); the fixed
        genotype of a genotype network; None for conv-4."""
        if self.alphas:
            return derive_genotype(self.alphas, self.space, temperature=self.inner.temperature(self.inner.steps),
                                   op_mask=self.net.op_mask)
        fixed = self.model.get("genotype")
        return None if fixed is None else Genotype.from_dict(fixed)


def _inner_from_config(config: Mapping[str, Any]) -> InnerLoopConfig:
    node = dict(config.get("inner") or {})
    known = {f.name for f in fields(InnerLoopConfig)}
    kwargs = {k: v for k, v in node.items() if k in known}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    cfg = InnerLoopConfig(**kwargs)
    test_steps = (config.get("trainer") or {}).get("test_inner_steps")
    return cfg if test_steps is None else replace(cfg, steps=int(test_steps))


def load_meta_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    inner_overrides: Mapping[str, Any] | None = None,
) -> MetaModel:
    """Load a checkpoint written by ``metanas-train`` for adaptation (any model).

    Args:
        path: the ``.ckpt`` file.
        device: where to put the tensors.
        inner_overrides: inner-loop settings to change (e.g. ``{"steps": 10}``); None values
            are ignored.

    Raises:
        CheckpointError: missing, corrupt or inconsistent checkpoint.
        ConfigError: a bad override.
    """
    state = load_checkpoint(path, None, device)
    try:
        space = SearchSpaceConfig.from_dict(state["search_space"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} holds a search space this metanas cannot build ({exc}); use "
            "a checkpoint written by metanas-train"
        ) from exc
    spec = checkpoint_model(state, path)
    try:
        net = build_model(spec, space).to(device)
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} holds a model this metanas cannot build ({exc}); the file is "
            "damaged or was edited: use another checkpoint"
        ) from None
    expected = dict(net.named_parameters())
    weights = {k: v.to(device) for k, v in state["weights"].items()}
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(
            f"checkpoint {path}: its weights do not match its own model and search space; the file is "
            "damaged or was edited: use another checkpoint"
        )
    if state.get("op_mask") is not None:  # a shrunk supernet (older checkpoints keep every op)
        try:
            net.set_op_mask(state["op_mask"])
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {path}: its op mask is damaged ({exc}); use another checkpoint") from None
    config = state.get("config") or {}
    inner = _inner_from_config(config)
    overrides = {k: v for k, v in (inner_overrides or {}).items() if v is not None}
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in fields(InnerLoopConfig)})
        if unknown:
            raise ConfigError(f"unknown inner-loop setting(s) {unknown}; see metanas.inner.InnerLoopConfig")
        if (inner.meta_sgd or state.get("rates")) and {"lr_weights", "lr_alphas"} & set(overrides):
            key = "lr_weights" if "lr_weights" in overrides else "lr_alphas"
            raise ConfigError(
                f"inner.{key}={overrides[key]} has no effect: checkpoint {path} adapts with its learned "
                f"per-element inner rates (inner.meta_sgd=true); leave inner.{key}=null"
            )
        inner = replace(inner, **overrides)
    rates = None
    if state.get("rates") and "meta_sgd" not in overrides:  # the rates say how it was trained
        inner = replace(inner, meta_sgd=True)
    if inner.meta_sgd:
        saved = state.get("rates")
        alphas = state["alphas"]
        if (not isinstance(saved, dict) or set(saved.get("weights") or {}) != set(weights)
                or set(saved.get("alphas") or {}) != set(alphas)):
            raise CheckpointError(
                f"checkpoint {path} holds no matching learned inner rates, which inner.meta_sgd=true "
                "needs; it is damaged or was edited: use another checkpoint (or inner.meta_sgd=false)"
            )
        rates = LearnedRates({k: v.to(device) for k, v in saved["weights"].items()},
                             {k: v.to(device) for k, v in saved["alphas"].items()})
    image_size = (config.get("task") or {}).get("image_size")
    return MetaModel(
        net=net,
        weights=weights,
        alphas={k: v.to(device) for k, v in state["alphas"].items()},
        space=space,
        inner=inner,
        image_size=int(image_size) if image_size else None,
        path=Path(path),
        rates=rates,
        model=spec,
    )


def check_fits(
    model: MetaModel, input_shape: tuple[int, ...], n_way: int, what: str,
    fixes: Mapping[str, str] | None = None,
) -> None:
    """Raise :class:`CheckpointError` unless images of ``input_shape`` and ``n_way`` fit.

    The supernet pools globally, so any image size would run, but a meta-model adapts well
    only at the size it was meta-trained on: a different size is refused too.

    Args:
        model: the meta-model.
        input_shape: ``(C, H, W)`` of the data.
        n_way: its number of classes.
        what: how the message names the data (e.g. ``"support folder x"``).
        fixes: what the caller's user changes for a mismatch of ``"channels"``, ``"n_way"``
            or ``"image_size"`` (phrases naming the caller's own settings); by default the
            messages name no setting.
    """
    fixes = dict(fixes or {})
    c, h, w = input_shape
    name = model.path
    want_c, want_n, size = model.space.in_channels, model.space.n_classes, model.image_size
    if c != want_c:
        fix = fixes.get("channels", f"give {want_c}-channel images")
        raise CheckpointError(
            f"checkpoint {name} takes {want_c}-channel images but {what} gives {c}-channel "
            f"ones; {fix}, or use a checkpoint meta-trained on {c}-channel images"
        )
    if n_way != want_n:
        fix = fixes.get("n_way", f"give {want_n} classes")
        other = f", or use a checkpoint meta-trained for {n_way}-way tasks" if n_way >= 2 else ""
        raise CheckpointError(
            f"checkpoint {name} was meta-trained for {want_n}-way tasks but {what} has "
            f"{n_way} class{'es' if n_way != 1 else ''}; {fix}{other}"
        )
    if size is not None and (h, w) != (size, size):
        fix = fixes.get("image_size", f"give {size}x{size} images")
        raise CheckpointError(
            f"checkpoint {name} was meta-trained on {size}x{size} images but {what} gives "
            f"{h}x{w}; {fix}"
        )


@dataclass(frozen=True, eq=False)
class AdaptedTask:
    """One task's adapted model.

    Attributes:
        adapted: adapted weights and alphas.
        genotype: the task's architecture (argmax of the adapted alphas; a genotype
            network's own; None for conv-4).
        discrete: the task's network: the discrete network inheriting the adapted supernet
            weights, or for a network without alphas that network with the adapted weights.
    """

    adapted: Adapted
    genotype: Genotype | None
    discrete: nn.Module

    def supernet_logits(self, model: MetaModel, x: Tensor) -> Tensor:
        """Logits ``(B, n_way)`` of the adapted supernet on ``x`` (one batch)."""
        with torch.no_grad():
            return predict(model.net, self.adapted, x)

    def discrete_logits(self, x: Tensor) -> Tensor:
        """Logits ``(B, n_way)`` of the discrete network on ``x`` (one batch)."""
        with torch.no_grad():
            return self.discrete(x)


def adapt_support(
    model: MetaModel, support_x: Tensor, support_y: Tensor, finetune_steps: int = 0
) -> AdaptedTask:
    """Adapt to a labelled support set and build the task's discrete network.

    Args:
        model: the meta-model.
        support_x: ``(N*K, C, H, W)`` (any number of images per class).
        support_y: ``(N*K,)`` labels in ``0..n_way-1``.
        finetune_steps: optional SGD steps (learning rate ``inner.lr_weights``, also with
            Meta-SGD: the learned rates belong to the supernet's weights) on the
            discrete network's weights over the support set after discretisation; 0 keeps the
            inherited weights exactly.

    Returns:
        The :class:`AdaptedTask`.
    """
    check_int("finetune_steps", finetune_steps, 0, fix="set finetune_steps to a whole number >= 0")
    adapted = adapt(model.net, model.weights, model.alphas, support_x, support_y, model.inner, rates=model.rates)
    genotype = (derive_genotype(adapted.alphas, model.space, temperature=adapted.temperature,
                                op_mask=model.net.op_mask)
                if adapted.alphas else model.genotype)
    return discretise(model, adapted, genotype, support_x, support_y, finetune_steps)


def _with_weights(model: MetaModel, weights: Mapping[str, Tensor]) -> nn.Module:
    """A fresh network of ``model``'s spec holding copies of ``weights``."""
    net = build_model(model.model, model.space)
    ref = next(iter(weights.values()), None)
    if ref is not None:
        net = net.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(weights[name].detach())
    return net


def discretise(
    model: MetaModel, adapted: Adapted, genotype: Genotype | None, support_x: Tensor, support_y: Tensor,
    finetune_steps: int = 0,
) -> AdaptedTask:
    """The task's discrete network for ``genotype``, inheriting the adapted supernet weights
    (for a network without alphas: that network with the adapted weights), optionally
    fine-tuned for ``finetune_steps`` SGD steps on the support set."""
    check_int("finetune_steps", finetune_steps, 0, fix="set finetune_steps to a whole number >= 0")
    if model.alphas:
        discrete = DiscreteNetwork.from_supernet(genotype, model.space, adapted.weights)
    else:
        discrete = _with_weights(model, adapted.weights)
    if finetune_steps:
        opt = torch.optim.SGD(discrete.parameters(), lr=model.inner.lr_weights)
        for _ in range(finetune_steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(discrete(support_x), support_y).backward()
            opt.step()
    for p in discrete.parameters():
        p.requires_grad_(False)
    return AdaptedTask(adapted, genotype, discrete.eval())


def wilson_ci95(correct: int, n: int) -> tuple[float, float, float]:
    """Accuracy ``correct / n`` and its 95% Wilson score interval ``(low, high)``.

    Wilson (1927): ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``, z = 1.96.
    """
    if n < 1:
        raise ValueError("wilson_ci95 needs at least one trial")
    z = 1.959963984540054
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


def _memory_bound(model: MetaModel, sampler: TaskSampler, split: Split, device: torch.device | str,
                  budget_gb: float | None, workers: int) -> int | None:
    """Tasks that ``budget_gb`` holds in flight (None: no budget could be found)."""
    budget = budget_bytes(budget_gb, device)
    if budget is None:
        return None
    task = sampler.sample(split, np.random.default_rng(MEMORY_SEED)).to(device)
    per_task = estimate_task_bytes(model.net, model.weights, model.alphas, task, model.inner)
    fit = tasks_that_fit(budget, per_task, budget_gb, key="memory_budget_gb",
                         fixes="use fewer support images per class (k_shot=...) or a larger memory_budget_gb")
    log.info("memory: about %.3f GiB per task in flight (estimated), budget %.2f GiB: %d task(s) in flight "
             "on %d thread(s)", per_task / GB, budget / GB, min(fit, workers), workers)
    return fit


def evaluate_tasks(
    model: MetaModel,
    sampler: TaskSampler,
    split: Split,
    n_tasks: int,
    rng: np.random.Generator,
    finetune_steps: int = 0,
    device: torch.device | str = "cpu",
    workers: int = 0,
    memory_budget_gb: float | None = None,
) -> dict[str, Any]:
    """Adapt to ``n_tasks`` sampled tasks; accuracies of the supernet and discrete networks.

    The meta-test of :func:`metanas.evaluate.evaluate` (transductive), with the discrete task
    network's accuracy as its per-task extra. Tasks are adapted concurrently on ``workers``
    threads (0: one per CPU core on CPU, see :mod:`metanas.engines`), at most as many at once
    as ``memory_budget_gb`` holds (None: a share of the available memory; the rule of
    :mod:`metanas.memory`, one task of ``split`` drawn from a generator of its own measured);
    the results depend on neither.

    Returns:
        ``{"supernet": {"accuracy", "ci95"}, "discrete": {...}, "n_tasks", "genotypes":
        [one per task], "accuracies": {"supernet": [...], "discrete": [...]}, "diversity":
        {...}}`` (fractions; 95% normal-approximation intervals over tasks; diversity as
        :func:`metanas.evaluate.diversity`). Without alphas ``"discrete"`` is the task
        network, there is no supernet (None), no genotypes and no diversity (empty).
    """
    if n_tasks < 1:
        raise ConfigError(f"n_tasks={n_tasks} must be at least 1")
    if finetune_steps < 0:
        raise ConfigError(f"finetune_steps={finetune_steps} must be 0 or more")

    def discrete_accuracy(net: torch.nn.Module, task: Any, adapted: Adapted, genotype: Genotype):
        local = replace(model, net=net)
        with torch.enable_grad():
            result = discretise(local, adapted, genotype, task.support_x, task.support_y, finetune_steps)
        hits = result.discrete_logits(task.query_x).argmax(-1) == task.query_y
        return {"discrete_accuracy": float(hits.float().mean())}

    with TaskPool(model.net, workers or default_workers(device)) as pool:
        pool.memory_bound = _memory_bound(model, sampler, split, device, memory_budget_gb, pool.workers)
        supernet = evaluate(
            model.net, model.weights, model.alphas, sampler, split, n_tasks, model.inner,
            model.space, rng, device=device, pool=pool, extra=discrete_accuracy, rates=model.rates,
        )
    accs = {"supernet": list(supernet.accuracies) if model.alphas else None,
            "discrete": list(supernet.extras["discrete_accuracy"])}
    out: dict[str, Any] = {"n_tasks": n_tasks, "genotypes": list(supernet.genotypes), "accuracies": accs,
                           "diversity": supernet.diversity}
    for name, values in accs.items():
        out[name] = None if values is None else dict(zip(("accuracy", "ci95"), mean_ci95(values)))
    return out
