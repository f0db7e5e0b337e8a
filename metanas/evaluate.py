"""Meta-test: adapt to many tasks and report accuracy with a 95% confidence interval.

For every task the meta-weights and meta-alphas are adapted on the support set
(:func:`metanas.inner.adapt`), the adapted model classifies the query set, and the task's own
architecture is derived from its adapted alphas. Results are the mean query accuracy over the
tasks with the normal-approximation 95% interval ``1.96 * std / sqrt(n)``, the per-task
genotypes, and how much those task architectures differ from the meta-architecture.

Batch statistics: the supernet normalises with batch statistics (DARTS convention, no running
averages). ``transductive=True`` classifies the whole query set in one batch, so its
statistics are shared across query images (the MAML/MetaNAS protocol). ``transductive=False``
classifies each query image in a batch made of the support set plus that one image, so no
query image influences another's prediction (the non-transductive protocol of Nichol et al.
2018, Sec. 6).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from metanas.tasks import Split, Task, TaskSampler

from .functional import accuracy
from .inner import Adapted, InnerLoopConfig, LearnedRates, adapt, alpha_displacement, predict
from .engines import TaskPool
from .search_space import (
    Genotype,
    OpMask,
    SearchSpaceConfig,
    derive_genotype,
    genotype_distance,
)

log = logging.getLogger(__name__)

PROGRESS_LINES = 10
"""Without a progress bar, :func:`evaluate` logs its progress this many times (every 10%)."""


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval.

    Returns ``(mean, 1.96 * sample_std / sqrt(n))``; the half-width is 0 for fewer than two
    values.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    if arr.size < 2:
        return float(arr.mean()), 0.0
    return float(arr.mean()), float(1.96 * arr.std(ddof=1) / math.sqrt(arr.size))


@dataclass(frozen=True)
class EvalResult:
    """Meta-test (or meta-validation) results.

    Attributes:
        accuracy: mean query accuracy over tasks, a fraction in [0, 1].
        ci95: half-width of its 95% confidence interval (same unit).
        n_tasks: number of tasks.
        accuracies: per-task query accuracies.
        genotypes: per-task genotypes derived from the adapted alphas (empty for a
            network without alphas, e.g. :class:`metanas.baselines.Conv4`).
        diversity: summary of how the task architectures differ (see :func:`diversity`).
        extras: name -> per-task values of the ``extra`` hook of :func:`evaluate`, in task
            order (empty without a hook).
    """

    accuracy: float
    ci95: float
    n_tasks: int
    accuracies: tuple[float, ...] = field(repr=False)
    genotypes: tuple[Genotype, ...] = field(repr=False)
    diversity: dict[str, float] = field(default_factory=dict)
    extras: dict[str, tuple[float, ...]] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        """``'97.31 +- 0.41 % (600 tasks)'``."""
        return f"{100 * self.accuracy:.2f} +- {100 * self.ci95:.2f} % ({self.n_tasks} tasks)"

    def architecture_gain(self) -> tuple[float, float] | None:
        """The architecture adaptation gain: mean and 95% CI half-width of the paired
        per-task difference ``accuracy - frozen_alpha_accuracy`` (same tasks, same weights'
        adaptation; only the alphas' adaptation differs), or None without that comparison."""
        frozen = self.extras.get(FROZEN)
        if frozen is None:
            return None
        return mean_ci95([a - f for a, f in zip(self.accuracies, frozen)])


FROZEN = "frozen_alpha_accuracy"
"""Key in :attr:`EvalResult.extras`: each task's accuracy with the alphas frozen at the meta-alphas."""


def diversity(genotypes: Sequence[Genotype], reference: Genotype | None) -> dict[str, float]:
    """How much the task architectures differ: the one definition used by every meta-test.

    Compare genotypes derived at the same temperature (:func:`evaluate` derives the
    reference and every task's genotype at the inner loop's read-out temperature).

    Returns:
        ``unique_genotypes`` (number of distinct task genotypes), ``most_common_share``
        (fraction of tasks with the most frequent genotype) and, with a reference (the
        meta-architecture), ``mean_distance_to_meta`` and ``changed_share`` (fraction of tasks
        whose genotype differs from it), distances by
        :func:`metanas.search_space.genotype_distance`.
    """
    counts = Counter(g.to_json() for g in genotypes)
    out = {
        "unique_genotypes": float(len(counts)),
        "most_common_share": max(counts.values()) / len(genotypes),
    }
    if reference is not None:
        dists = [genotype_distance(g, reference) for g in genotypes]
        out["mean_distance_to_meta"] = float(np.mean(dists))
        out["changed_share"] = float(np.mean([d > 0 for d in dists]))
    return out


def predict_query(
    net: nn.Module, adapted: Adapted, task: Task, transductive: bool = True
) -> Tensor:
    """Query logits (N*Q, N) of an adapted model; see the module docstring for the modes."""
    if transductive:
        return predict(net, adapted, task.query_x)

    support = task.support_x

    def one(q: Tensor) -> Tensor:
        return predict(net, adapted, torch.cat([support, q.unsqueeze(0)]))[-1]

    return torch.func.vmap(one)(task.query_x)


Extra = Callable[[nn.Module, Task, Adapted, "Genotype | None"], Mapping[str, float]]
"""Per-task hook of :func:`evaluate`: ``(net, task, adapted, genotype) -> {name: value}``."""


def evaluate(
    net: nn.Module,
    weights: Mapping[str, Tensor],
    alphas: Mapping[str, Tensor],
    sampler: TaskSampler,
    split: Split,
    n_tasks: int,
    inner: InnerLoopConfig,
    search_space: SearchSpaceConfig,
    rng: np.random.Generator,
    *,
    transductive: bool = True,
    device: torch.device | str = "cpu",
    progress: bool = False,
    pool: TaskPool | None = None,
    extra: Extra | None = None,
    compare_frozen: bool = False,
    rates: LearnedRates | None = None,
) -> EvalResult:
    """Adapt to ``n_tasks`` tasks of ``split`` and measure query accuracy.

    The one meta-test pipeline: ``metanas-train``'s validation and test, ``metanas-adapt``'s
    sampled tasks and the benchmarks all call it.

    Args:
        net: the supernet.
        weights: meta-weights, name -> tensor.
        alphas: meta-alphas, name -> tensor.
        sampler: the task distribution.
        split: "val" or "test" (or "train").
        n_tasks: number of tasks (600 is the usual meta-test size).
        inner: inner-loop settings used for adaptation.
        search_space: the supernet's configuration (for the genotypes).
        rng: random generator of the task sequence (tasks are drawn in order, so the
            result does not depend on the number of threads).
        transductive: query batch statistics shared across the query set or not.
        device: where to run.
        progress: show a progress bar; without one, a line is logged (``logging.info``)
            every 10% of the tasks: tasks done, elapsed time, running mean accuracy.
        pool: adapts several tasks concurrently; it must have been built on ``net``.
        extra: per-task hook called with the (replica) network, the task, its adapted model
            and its genotype; its values are collected in :attr:`EvalResult.extras`.
        compare_frozen: also adapt every task with the alphas frozen at the meta-alphas
            (weights adapted as usual) and record its accuracy under ``extras[FROZEN]``, for
            the paired :meth:`EvalResult.architecture_gain`. Ignored without alphas.
        rates: Meta-SGD's learned inner rates (exactly when ``inner.meta_sgd``).

    Architecture statistics: ``diversity`` (:func:`diversity`) holds, besides the task
    genotypes' own statistics, ``mean_alpha_displacement`` (mean L2 norm over tasks of the
    adapted minus the meta-alphas, all alpha tensors together) and the same statistics
    prefixed ``noise_`` for a baseline: the meta-alphas moved by isotropic Gaussian noise of
    each task's displacement size (seeded, so reproducible). Adaptation that does not beat
    that baseline changes genotypes no more than noise would.

    Returns:
        An :class:`EvalResult`.
    """
    if n_tasks < 1:
        raise ValueError(f"n_tasks={n_tasks}: evaluate at least one task")
    pool = pool or TaskPool(net, 1)
    weights = {k: v.detach() for k, v in weights.items()}
    alphas = {k: v.detach() for k, v in alphas.items()}
    if rates is not None:
        rates = LearnedRates(*({k: v.detach() for k, v in part.items()} for part in rates))
    read_out = inner.temperature(inner.steps)
    op_mask = getattr(net, "op_mask", None)  # a shrunk supernet: genotypes of its kept ops
    reference = derive_genotype(alphas, search_space, temperature=read_out, op_mask=op_mask) if alphas else None

    compare_frozen = compare_frozen and bool(alphas)

    def score(replica: nn.Module, task: Task, adapted: Adapted) -> float:
        with torch.no_grad():
            return float(accuracy(predict_query(replica, adapted, task, transductive), task.query_y))

    def one(replica: nn.Module, task: Task) -> tuple[float, Genotype | None, Mapping[str, float]]:
        adapted = adapt(replica, weights, alphas, task.support_x, task.support_y, inner, rates=rates)
        genotype = (
            derive_genotype(adapted.alphas, search_space, temperature=adapted.temperature, op_mask=op_mask)
            if adapted.alphas else None  # a fixed-architecture network has no genotype
        )
        extras = dict(extra(replica, task, adapted, genotype)) if extra else {}
        if genotype is not None:
            extras[DISPLACEMENT] = float(alpha_displacement(adapted.alphas, alphas))
        if compare_frozen:
            frozen = adapt(replica, weights, alphas, task.support_x, task.support_y, inner,
                           adapt_alphas=False, rates=rates)
            extras[FROZEN] = score(replica, task, frozen)
        return score(replica, task, adapted), genotype, extras

    results: list[tuple[float, Genotype | None, Mapping[str, float]]] = []
    chunk = 2 * pool.workers
    started = time.perf_counter()
    every = math.ceil(n_tasks / PROGRESS_LINES)  # without a bar: a log line every 10% of the tasks
    next_line = every
    with tqdm(total=n_tasks, desc=f"meta-{split}", disable=not progress, leave=False) as bar:
        while len(results) < n_tasks:
            count = min(chunk, n_tasks - len(results))
            tasks = [sampler.sample(split, rng).to(device) for _ in range(count)]
            results += pool.map(one, tasks)
            bar.update(count)
            if not progress and len(results) >= next_line:
                done = len(results)
                log.info("meta-%s: %d/%d tasks (%d%%) in %.1f s, running accuracy %.2f %%", split, done,
                         n_tasks, 100 * done // n_tasks, time.perf_counter() - started,
                         100 * float(np.mean([r[0] for r in results])))
                next_line = (done // every + 1) * every
    accs = [acc for acc, _, _ in results]
    genotypes = [g for _, g, _ in results if g is not None]
    extras = {name: tuple(r[2][name] for r in results) for name in results[0][2]}
    mean, ci = mean_ci95(accs)
    div: dict[str, float] = {}
    if genotypes:
        sizes = extras.pop(DISPLACEMENT)
        noise = _noise_genotypes(alphas, sizes, search_space, read_out, op_mask)
        div = {**diversity(genotypes, reference), "mean_alpha_displacement": float(np.mean(sizes)),
               **{f"noise_{k}": v for k, v in diversity(noise, reference).items()}}
    return EvalResult(mean, ci, n_tasks, tuple(accs), tuple(genotypes), div, extras)


DISPLACEMENT = "alpha_displacement"


def _noise_genotypes(
    alphas: Mapping[str, Tensor], sizes: Sequence[float], space: SearchSpaceConfig, temperature: float,
    op_mask: OpMask | None = None,
) -> list[Genotype]:
    """Genotypes of the meta-alphas moved by isotropic noise of each given L2 size (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for size in sizes:
        noise = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in alphas.items()}
        norm = float(torch.sqrt(sum((n**2).sum() for n in noise.values())))
        moved = {k: alphas[k].cpu().double() + (size / max(norm, 1e-30)) * noise[k] for k in alphas}
        out.append(derive_genotype(moved, space, temperature=temperature, op_mask=op_mask))
    return out


__all__ = ["FROZEN", "EvalResult", "Extra", "diversity", "evaluate", "mean_ci95", "predict_query"]
