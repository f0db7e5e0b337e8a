"""Meta-training loop: sample -> adapt -> meta-step -> log -> validate -> checkpoint.

The trainer receives ready-made objects (supernet, alphas, task sampler, outer-loop algorithm,
inner-loop settings, meta-optimiser factories) and knows nothing about Hydra. All randomness
of the task sequence comes from one ``numpy.random.Generator`` whose state is checkpointed, so
a run resumed from its last checkpoint continues exactly as if it had never stopped.

Into ``run_dir`` (file names: :mod:`metanas.rundir`) go ``checkpoints/last.ckpt`` (the full
state, every ``ckpt_every`` meta-steps and at the end), ``checkpoints/best.ckpt`` (the state
with the best meta-validation accuracy so far) and the logs of :mod:`metanas.logger`.
Temporary files that killed writes left there are removed when a trainer is created.

A meta-step whose losses or meta-gradients are not finite, or whose update makes a
meta-parameter non-finite, stops the run with a :class:`~metanas.errors.ConfigError` naming the step and the learning
rates; no checkpoint is written from a non-finite state, so both keep the last finite one.

With several processes (:mod:`metanas.distributed`) every process draws the same meta-batch
from the same generator and adapts its share of it; the meta-gradients are averaged over all
processes, so the update equals that of one process with the whole meta-batch. Rank 0 alone
validates, writes checkpoints and logs; the state is the same for any number of processes, so
a run can be resumed with a different one.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from metanas.tasks import TaskSampler, check_sampler, check_task
from metanas.tasks.core import check_int

from . import rundir
from .algorithms import MetaAlgorithm
from .algorithms.base import MetaGradients
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistContext
from .errors import CheckpointError, ConfigError
from .evaluate import EvalResult, evaluate
from .functional import weights_of
from .inner import InnerLoopConfig, LearnedRates
from .io import remove_stale_temporaries
from .logger import RunLogger
from .models import checkpoint_model, describe, describe_model
from .engines import TaskPool, default_workers
from .memory import GB, MEMORY_SEED, budget_bytes, check_budget, estimate_task_bytes, tasks_that_fit
from .search_space import OpMask, SearchSpaceConfig, architecture_stats, check_op_mask, full_op_mask, op_weights
from .shrink import ShrinkConfig, kept_count, removed_weight_names, shrink_check, zero_counts

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

# Offsets of the seeds of the validation and test task sequences, so that they are fixed
# for a run and independent of the training sequence; and of the task on which the memory of
# one task in flight is estimated when an evaluation comes before any meta-step (drawn from a
# generator of its own, so that it changes nothing else).
VAL_SEED, TEST_SEED = 1, 2


@dataclass(frozen=True)
class TrainerConfig:
    """Settings of the meta-training loop.

    Attributes:
        meta_steps: number of outer-loop updates.
        meta_batch_size: tasks per outer-loop update.
        alpha_warmup_steps: first meta-steps during which the alphas are neither adapted nor
            meta-updated (weights warm up first, as in DARTS and MetaNAS).
        meta_lr_schedule: "constant", or "linear" decay of every meta learning rate (weights,
            alphas, and Meta-SGD's learned rates) to zero at ``meta_steps`` (the Reptile schedule).
        val_every: meta-validate every this many steps (0: never); the best state is kept.
        n_val_tasks: tasks per meta-validation.
        ckpt_every: write ``last.ckpt`` every this many steps (and always at the end).
        log_every: log a line every this many steps.
        n_test_tasks: tasks of the final meta-test.
        test_inner_steps: inner steps at meta-validation/test time (None: as in training).
        transductive: batch statistics over the query set at evaluation (see evaluate.py).
        compare_frozen_alphas: the meta-test also adapts every test task with the alphas
            frozen at the meta-alphas, for the paired architecture adaptation gain
            (:meth:`metanas.evaluate.EvalResult.architecture_gain`); doubles its cost.
        task_workers: threads that adapt the tasks of a meta-batch (and of an evaluation)
            concurrently; 0 picks one per CPU core on CPU (shared among the processes on the
            machine) and 1 on an accelerator. Results do not depend on it.
        progress: show progress bars; None shows them when stderr is a terminal (the CLI
            turns them off in sweeps). Only rank 0 shows them.
        recompute_cells: recompute each cell's activations in the backward pass instead of
            storing them (:attr:`metanas.search_space.SearchNetwork.recompute_cells`): less
            memory per task in flight, the same meta-gradients, about one more forward pass.
        recompute_edges: the same per edge (mixed op) instead of per cell
            (:attr:`metanas.search_space.SearchNetwork.recompute_edges`): keeps far less (about
            a third of the stored activations' peak at whole-support steps in MetaNAS's Omniglot
            configuration, ``benchmarks/task_memory.py``) for the same extra forward pass;
            at most one of the two may be set.
        time_budget_min: stop meta-training after the first meta-step at which the training
            time (meta-steps and meta-validations, carried over a resume) reaches this many
            minutes, or at ``meta_steps``, whichever comes first (None: no budget). For
            comparisons at equal wall time; the number of steps it allows depends on the
            machine, so a run with a budget reproduces only on the same machine and load.
            A ``linear`` meta learning-rate schedule still decays towards ``meta_steps``.
        shrink: progressive shrinking of the supernet (:class:`metanas.shrink.ShrinkConfig`;
            a mapping of its settings is accepted); off by default.
        memory_budget_gb: GiB that the tasks in flight may take together (None: a share of
            the memory available on the device, :func:`metanas.memory.default_budget_bytes`).
            Before the first task, one task's peak memory is estimated
            (:func:`metanas.memory.estimate_task_bytes`); the task threads then keep at most
            ``min(task_workers, floor(budget / estimate))`` tasks in flight and the vmap
            engine maps chunks of at most ``floor(budget / estimate)`` tasks. Results do not
            depend on it; a budget that cannot hold one task is a ConfigError.
    """

    meta_steps: int = 1000
    meta_batch_size: int = 5
    alpha_warmup_steps: int = 0
    meta_lr_schedule: str = "constant"
    val_every: int = 100
    n_val_tasks: int = 100
    ckpt_every: int = 50
    log_every: int = 10
    n_test_tasks: int = 600
    test_inner_steps: int | None = None
    transductive: bool = True
    compare_frozen_alphas: bool = True
    task_workers: int = 0
    progress: bool | None = None
    recompute_cells: bool = False
    recompute_edges: bool = False
    time_budget_min: float | None = None
    shrink: ShrinkConfig = ShrinkConfig()
    memory_budget_gb: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shrink", ShrinkConfig.from_value(self.shrink))
        # every count is an integer (a bool or 2.5 is not) in range; the message names the key
        counts = {"meta_batch_size": 1, "n_val_tasks": 1, "n_test_tasks": 1, "log_every": 1,
                  "meta_steps": 0, "alpha_warmup_steps": 0, "val_every": 0, "ckpt_every": 0,
                  "task_workers": 0, "test_inner_steps": 0}
        for name, lowest in counts.items():
            value = getattr(self, name)
            if name == "test_inner_steps" and value is None:
                continue
            check_int(f"trainer.{name}", value, lowest,
                      fix=f"set trainer.{name} to a whole number >= {lowest}"
                      + (" (or null: as many as in training)" if name == "test_inner_steps" else ""))
        budget = self.time_budget_min
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not math.isfinite(budget) or budget <= 0):
            raise ConfigError(f"trainer.time_budget_min={budget!r} is not a positive number of "
                              "minutes; set it to e.g. 10, or to null for no budget")
        check_budget(self.memory_budget_gb)
        if self.meta_lr_schedule not in ("constant", "linear"):
            raise ConfigError(
                f"trainer.meta_lr_schedule={self.meta_lr_schedule!r} is unknown; "
                "use 'constant' or 'linear'"
            )


def _config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (``resume`` ignored)."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if name == "resume":
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _config_differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


_IMPLEMENTATION_FLAGS = frozenset(
    {"params", "foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"}
)
"""Param-group keys that torch optimisers share or added over releases: not the algorithm's."""


def _class_name(obj: object | None) -> str | None:
    """``module.qualname`` of ``obj``'s class (None for None)."""
    return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"


def _all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every value of every tensor is finite, with a single synchronisation."""
    flags = [t.detach().isfinite().all() for t in tensors]
    return not flags or bool(torch.stack(flags).all())


def _apply(
    optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter], grads: Mapping[str, Tensor],
    frozen: frozenset[str] | set[str] = frozenset(),
) -> None:
    """One optimiser step with ``grads`` as the gradients of ``params``.

    Gradients are assigned, never gated on an existing ``.grad``: ``zero_grad`` sets them to
    None on torch >= 2, and a gate would silently skip the update. The parameters named in
    ``frozen`` (the weights of removed ops) get no gradient, so the optimiser leaves them
    and their state alone.
    """
    optimizer.zero_grad(set_to_none=True)
    for name, p in params.items():
        if name not in frozen:
            p.grad = grads[name].to(p.dtype)
    optimizer.step()


class MetaTrainer:
    """Meta-trains a supernet's weights and alphas; see the module docstring.

    Args:
        net: the supernet, or a network without alphas (:mod:`metanas.models`; checkpoints
            record its model spec); its parameters are the meta-weights and are updated in place by
            the weights' meta-optimiser.
        alphas: initial meta-alphas, name -> tensor (copied into parameters); empty for a
            fixed-architecture network (e.g. :class:`metanas.baselines.Conv4`): then there is
            no alpha meta-optimiser and evaluations derive no genotypes.
        sampler: task distribution with "train", "val" (unless ``cfg.val_every`` is 0) and
            "test" splits; tried on each of them here (:func:`~metanas.tasks.check_sampler`),
            and every training task it draws is checked (:func:`~metanas.tasks.check_task`).
        algorithm: the outer loop (Reptile, FOMAML, MAML).
        inner: inner-loop settings.
        weights_optimizer: factory ``params -> torch.optim.Optimizer`` for the weights.
        alphas_optimizer: factory for the alphas' meta-optimiser.
        rates_optimizer: factory for the meta-optimiser of Meta-SGD's learned inner rates
            (one optimiser over the rates of the weights and of the alphas); required with
            ``inner.meta_sgd``, unused without. The rates (:attr:`rates`) start at
            ``inner.lr_weights`` / ``inner.lr_alphas``, are checkpointed and are used by the
            meta-validation and meta-test.
        search_space: the supernet's configuration.
        cfg: loop settings.
        run_dir: where checkpoints and logs go.
        seed: seed of the task sequences.
        device: where to run.
        config: the resolved configuration, stored in checkpoints and metrics.
        dist: the process group (default: a single process).
        logger: where metrics go (default: CSV and learning curves in ``run_dir``, on rank 0).
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        alphas: Mapping[str, Tensor],
        sampler: TaskSampler,
        algorithm: MetaAlgorithm,
        inner: InnerLoopConfig,
        weights_optimizer: OptimizerFactory,
        alphas_optimizer: OptimizerFactory,
        search_space: SearchSpaceConfig,
        cfg: TrainerConfig,
        run_dir: str | Path,
        seed: int = 0,
        device: torch.device | str = "cpu",
        config: dict[str, Any] | None = None,
        dist: DistContext | None = None,
        logger: RunLogger | None = None,
        rates_optimizer: OptimizerFactory | None = None,
    ) -> None:
        # what its tasks must be: examples of the network's dtype; tried now on every split it will use
        first = next(net.parameters(), None)
        self._task_dtype = torch.float32 if first is None else first.dtype
        used = ("train", *(("val",) if cfg.val_every else ()), "test")
        self.sampler = check_sampler(sampler, splits=used, float_dtype=self._task_dtype)
        self.dist = dist or DistContext()
        if self.dist.world_size > cfg.meta_batch_size:
            raise ConfigError(
                f"{self.dist.world_size} processes but trainer.meta_batch_size={cfg.meta_batch_size}: "
                "every process needs at least one task; use at most meta_batch_size processes"
            )
        self.device = torch.device(device)
        self.net = net.to(self.device)
        if cfg.recompute_cells and cfg.recompute_edges:
            raise ConfigError("trainer.recompute_cells=true and trainer.recompute_edges=true: set one "
                              "(recompute_edges keeps less memory for the same extra forward pass)")
        for key in ("recompute_cells", "recompute_edges"):
            if getattr(cfg, key):
                if not hasattr(self.net, key):
                    raise ConfigError(f"trainer.{key}=true needs a supernet; "
                                      f"{type(net).__name__} has no {key.split('_')[1]} to recompute")
                setattr(self.net, key, True)  # before the task threads copy the network
        # processes on one machine share its cores: one task thread per core overall
        workers = cfg.task_workers or max(1, default_workers(self.device) // self.dist.local_world_size)
        self.pool = TaskPool(self.net, workers)
        self._memory_bounded = False
        self.alphas = {
            k: nn.Parameter(v.detach().clone().to(self.device)) for k, v in alphas.items()
        }
        check_inner = getattr(algorithm, "check_inner", None)
        if check_inner is not None:
            check_inner(inner)
        if inner.entropy_weight != 0 and not self.alphas:
            raise ConfigError(
                f"inner.entropy_weight={inner.entropy_weight} regularises the alphas, but "
                f"{type(net).__name__} has none; set inner.entropy_weight=0"
            )
        if inner.alpha_refine_steps and not self.alphas:
            raise ConfigError(
                f"inner.alpha_refine_steps={inner.alpha_refine_steps} refines the alphas, but "
                f"{type(net).__name__} has none; set inner.alpha_refine_steps=0"
            )
        self.algorithm = algorithm
        self.inner = inner
        self.eval_inner = (
            inner if cfg.test_inner_steps is None else replace(inner, steps=cfg.test_inner_steps)
        )
        self.search_space = search_space
        self.cfg = cfg
        if cfg.shrink.enabled:
            if not self.alphas or not hasattr(self.net, "set_op_mask"):
                raise ConfigError(f"trainer.shrink.every={cfg.shrink.every} needs a supernet with alphas; "
                                  f"{type(net).__name__} has no ops to remove: set trainer.shrink.every=0")
            cfg.shrink.check_space(search_space)
        self.op_mask: OpMask | None = full_op_mask(search_space) if self.alphas else None
        self.shrink_counts = zero_counts(self.op_mask) if self.op_mask is not None else None
        self._frozen_weights: set[str] = set()
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.config = config or {}
        self.opt_weights = weights_optimizer(self.net.parameters())
        # A fixed-architecture network (e.g. metanas.baselines.Conv4) has no alphas, hence no
        # alpha optimiser; everything else runs unchanged.
        self.opt_alphas = alphas_optimizer(self.alphas.values()) if self.alphas else None
        # Meta-SGD: learned per-element inner rates with their own meta-optimiser
        self.rates: LearnedRates | None = None
        self.opt_rates: torch.optim.Optimizer | None = None
        if inner.meta_sgd:
            if rates_optimizer is None:
                raise ConfigError(
                    "inner.meta_sgd=true needs a meta-optimiser for the learned inner rates; set "
                    "optim.rates (optim=adam and optim=sgd have one) or inner.meta_sgd=false"
                )
            initial = LearnedRates.like(self.weights, self.alphas, inner)
            self.rates = LearnedRates(*({k: nn.Parameter(v) for k, v in part.items()} for part in initial))
            self.opt_rates = rates_optimizer(list(self._rate_parameters().values()))
        self._start_lr_schedules(0)
        self.rng = np.random.default_rng(seed)
        self.step = 0
        self.train_time = 0.0
        self.best: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.logger = logger or RunLogger(self.run_dir, enabled=self.dist.is_main)
        self.remove_stale_temporaries()
        self._sync_parameters()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of killed writes in the run dir and its checkpoint
        folder (rank 0 only: the folders' single writer); each removal is logged.

        Returns:
            The removed files.
        """
        if not self.dist.is_main:
            return []
        checkpoints = rundir.checkpoint_path(self.run_dir).parent
        removed = [p for folder in (self.run_dir, checkpoints) if folder.is_dir()
                   for p in remove_stale_temporaries(folder)]
        if removed:
            log.info("removed %d temporary file(s) left by interrupted writes: %s",
                     len(removed), ", ".join(str(p) for p in removed))
        return removed

    def close(self) -> None:
        """Stop the task threads and close the logger."""
        self.pool.close()
        self.logger.close()

    def _sync_parameters(self) -> None:
        """Give every process rank 0's meta-weights and meta-alphas (no-op for one process)."""
        self.dist.broadcast_([*self.weights.values(), *self.alphas.values(),
                              *self._rate_parameters().values()])

    def _rate_parameters(self) -> dict[str, nn.Parameter]:
        """The learned rates as one dict, ``weights/<name>`` and ``alphas/<name>`` ({} without)."""
        if self.rates is None:
            return {}
        return {f"{kind}/{k}": v for kind, part in zip(LearnedRates._fields, self.rates) for k, v in part.items()}

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_weights, self.opt_alphas, self.opt_rates) if o is not None]

    # ----------------------------------------------------------------- state
    def _start_lr_schedules(self, step: int) -> None:
        """``LambdaLR`` schedules of both meta learning rates (``cfg.meta_lr_schedule``) at ``step``."""
        n = self.cfg.meta_steps if self.cfg.meta_lr_schedule == "linear" else 0
        factor = (lambda k: max(0.0, 1.0 - k / n)) if n > 0 else (lambda k: 1.0)
        self.lr_schedules = [LambdaLR(o, factor, last_epoch=step - 1) for o in self._optimizers()]

    def _next_learning_rates(self) -> None:
        """Both schedules one meta-step on (quietly: the alphas' optimiser rests in warm-up)."""
        with warnings.catch_warnings(action="ignore", category=UserWarning):
            for schedule in self.lr_schedules:
                schedule.step()

    @property
    def weights(self) -> dict[str, nn.Parameter]:
        """The live meta-weights by name."""
        return weights_of(self.net)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: see :mod:`metanas.checkpoint`."""
        return {
            "step": self.step,
            "search_space": self.search_space.to_dict(),
            "model": describe(self.net),
            "weights": {k: v.detach().cpu() for k, v in self.weights.items()},
            "alphas": {k: v.detach().cpu() for k, v in self.alphas.items()},
            "opt_weights": self.opt_weights.state_dict(),
            "opt_alphas": self.opt_alphas.state_dict() if self.opt_alphas is not None else None,
            "optimizer_classes": {"weights": _class_name(self.opt_weights),
                                  "alphas": _class_name(self.opt_alphas),
                                  **({"rates": _class_name(self.opt_rates)} if self.rates is not None else {})},
            **({} if self.rates is None else {
                "rates": {kind: {k: v.detach().cpu() for k, v in part.items()}
                          for kind, part in zip(LearnedRates._fields, self.rates)},
                "opt_rates": self.opt_rates.state_dict(),
            }),
            "rng_tasks": self.rng.bit_generator.state,
            "rng_torch": torch.get_rng_state(),
            "train_time": self.train_time,
            "best": dict(self.best),
            "history": list(self.history),
            "config": self.config,
            **({"op_mask": _lists(self.op_mask), "shrink_counts": _lists(self.shrink_counts)}
               if self.op_mask is not None else {}),
        }

    def set_op_mask(self, mask: Mapping[str, Any] | None) -> None:
        """Keep only the ops of ``mask`` (None: all) on the network and every task replica."""
        if self.op_mask is None:
            return  # a fixed-architecture network
        full = full_op_mask(self.search_space)
        self.op_mask = full if mask is None else check_op_mask(self.search_space, mask)
        for net in self.pool.networks():
            net.set_op_mask(self.op_mask)
        self._frozen_weights = removed_weight_names(self.op_mask, self.net)

    def _check_meta_optimizers(self, state: Mapping[str, Any], source: str) -> None:
        """Refuse a state whose meta-optimisers are not of this trainer's classes.

        States that record no class names (written before they were) are compared by the
        keys of their param groups: another optimiser has other hyper-parameters.

        Raises:
            CheckpointError: the optimiser classes (or their settings) differ.
        """
        ours = {"weights": self.opt_weights, "alphas": self.opt_alphas}
        saved = {"weights": state.get("opt_weights"), "alphas": state.get("opt_alphas")}
        classes = state.get("optimizer_classes")
        fix = ("resume with the meta-optimisers it was trained with (optim=adam or optim=sgd, "
               "or optim.weights._target_=... and optim.alphas._target_=...) or start a new run without resume")
        if isinstance(classes, Mapping):
            differ = [k for k, o in ours.items()
                      if o is not None and classes.get(k) is not None and classes[k] != _class_name(o)]
            if self.opt_rates is not None and classes.get("rates") not in (None, _class_name(self.opt_rates)):
                raise CheckpointError(
                    f"{source} holds a learned-rates meta-optimiser state of {classes['rates']}, this run "
                    f"asks for {_class_name(self.opt_rates)}; resume with the optim.rates it was trained "
                    "with or start a new run without resume"
                )
            if differ:
                raise CheckpointError(
                    f"{source} holds meta-optimiser states of {classes.get('weights')} (weights) and "
                    f"{classes.get('alphas')} (alphas), this run asks for {_class_name(self.opt_weights)} "
                    f"(weights) and {_class_name(self.opt_alphas)} (alphas); {fix}"
                )
            return
        for kind, opt in ours.items():
            groups = saved[kind].get("param_groups") if isinstance(saved[kind], Mapping) else None
            if opt is None or not groups:
                continue
            theirs = set(groups[0]) - _IMPLEMENTATION_FLAGS - {"initial_lr"}
            wanted = set(opt.param_groups[0]) - _IMPLEMENTATION_FLAGS - {"initial_lr"}
            if theirs != wanted:
                raise CheckpointError(
                    f"{source} (which records no optimiser class) holds a {kind} meta-optimiser "
                    f"state with settings {sorted(theirs)}, not those of the {_class_name(opt)} this "
                    f"run asks for ({sorted(wanted)}): it was trained with another meta-optimiser; {fix}"
                )

    def load_state_dict(self, state: Mapping[str, Any], source: str = "the state") -> None:
        """Restore a state written by :meth:`state_dict` (the search space must match).

        Args:
            state: the state.
            source: what it came from, for error messages (e.g. ``checkpoint <path>``).

        Raises:
            CheckpointError: it holds the states of other meta-optimiser classes.
        """
        self._check_meta_optimizers(state, source)
        with torch.no_grad():
            for name, p in self.weights.items():
                p.copy_(state["weights"][name])
            for name, p in self.alphas.items():
                p.copy_(state["alphas"][name])
        self.opt_weights.load_state_dict(state["opt_weights"])
        if self.opt_alphas is not None:
            self.opt_alphas.load_state_dict(state["opt_alphas"])
        self._load_rates(state, source)
        self.rng.bit_generator.state = state["rng_tasks"]
        torch.set_rng_state(state["rng_torch"].cpu())
        self.step = int(state["step"])
        self.train_time = float(state["train_time"])
        self.best = dict(state["best"])
        self.history = list(state["history"])
        # states written without shrinking keep every op
        if self.op_mask is not None:
            self.set_op_mask(state.get("op_mask"))
            counts = state.get("shrink_counts")
            self.shrink_counts = (zero_counts(self.op_mask) if counts is None
                                  else {k: tuple(tuple(int(c) for c in r) for r in rows)
                                        for k, rows in counts.items()})
        self._start_lr_schedules(self.step)  # from the step: no checkpoint holds a schedule state

    def _load_rates(self, state: Mapping[str, Any], source: str) -> None:
        """Meta-SGD's learned rates and their optimiser from ``state``; a state without them
        (written without ``inner.meta_sgd``, or before it existed) leaves them at their start."""
        saved = state.get("rates")
        if self.rates is None:
            if saved:
                log.warning("%s holds learned inner rates (inner.meta_sgd=true); this run does not use "
                            "them (inner.meta_sgd=false): it adapts with inner.lr_weights and inner.lr_alphas",
                            source)
            return
        if not saved:
            log.warning("%s holds no learned inner rates: they start at inner.lr_weights=%g and "
                        "inner.lr_alphas=%g", source, self.inner.lr_weights, self.inner.lr_alphas)
            return
        with torch.no_grad():
            for kind, part in zip(LearnedRates._fields, self.rates):
                for name, p in part.items():
                    if name not in saved.get(kind, {}) or saved[kind][name].shape != p.shape:
                        raise CheckpointError(f"{source}: its learned inner rates do not match its "
                                              "weights and alphas; it is damaged: use another checkpoint")
                    p.copy_(saved[kind][name])
        if state.get("opt_rates") is not None:
            self.opt_rates.load_state_dict(state["opt_rates"])

    def resume(self, path: str | Path) -> None:
        """Load a checkpoint written by this trainer (same search space and model) and
        continue from it; a checkpoint of another model is refused.

        Settings that differ from the checkpoint's config (other than ``resume``) are logged
        as a warning: the run then continues, but not as the original run would have.
        """
        state = load_checkpoint(path, self.search_space.to_dict(), self.device)
        if state.get("slim"):
            raise CheckpointError(
                f"checkpoint {path} is a slim checkpoint for adaptation (no meta-optimiser or random "
                "generator states), it cannot resume a run; use it with metanas-adapt, or resume from "
                "the run's own checkpoints/last.ckpt"
            )
        held, wanted = checkpoint_model(state, path), describe(self.net)
        if held != wanted:
            raise CheckpointError(
                f"checkpoint {path} holds {describe_model(held)}, this run asks for "
                f"{describe_model(wanted)}; resume with the model it was trained with "
                f"(model={held['kind']} and its settings) or start a new run without resume"
            )
        self.load_state_dict(state, source=f"checkpoint {path}")
        self._sync_parameters()
        changed = _config_differences(state.get("config") or {}, self.config)
        if changed:
            log.warning("resuming with settings that differ from the checkpoint: %s", ", ".join(changed))
        log.info("resumed from %s at meta-step %d", path, self.step)

    def save(self, name: str = rundir.LAST_CKPT) -> Path:
        """Write the full state atomically to ``run_dir/checkpoints/<name>`` (rank 0 only).

        Raises:
            ConfigError: a meta-parameter is not finite (the file is left as it was).
        """
        path = rundir.checkpoint_path(self.run_dir, name)
        if self.dist.is_main:
            if not _all_finite([*self.weights.values(), *self.alphas.values(),
                                *self._rate_parameters().values()]):
                raise self._diverged(f"the meta-parameters are not finite; {name} is not overwritten")
            save_checkpoint(path, self.state_dict())
        return path

    def _diverged(self, what: str, step: int | None = None) -> ConfigError:
        """The one-line error of a run that diverged at ``step`` (default: the current one)."""
        meta_lrs = [o.param_groups[0].get("initial_lr", o.param_groups[0]["lr"]) if o is not None
                    else None for o in (self.opt_weights, self.opt_alphas, self.opt_rates)]
        lrs = (f"inner.lr_weights={self.inner.lr_weights:g}, inner.lr_alphas={self.inner.lr_alphas:g}, "
               f"optim.weights.lr={meta_lrs[0]:g}"
               + (f", optim.alphas.lr={meta_lrs[1]:g}" if meta_lrs[1] is not None else "")
               + (f", optim.rates.lr={meta_lrs[2]:g}" if meta_lrs[2] is not None else ""))
        return ConfigError(
            f"meta-training diverged at meta-step {self.step if step is None else step}: {what}; "
            f"a learning rate is likely too high: lower one of {lrs}, then resume=auto (the checkpoints hold the "
            "last finite state) or start a new run"
        )

    def _write_log(self) -> None:
        self.logger.write(self.history)

    # ------------------------------------------------------------------ loop
    def _progress(self) -> bool:
        if not self.dist.is_main:
            return False
        if self.cfg.progress is None:
            return sys.stderr.isatty()
        return self.cfg.progress

    def bound_memory(self, task: Any | None = None, split: str = "train") -> int | None:
        """Bound the tasks in flight by ``cfg.memory_budget_gb`` (once; later calls return
        the bound found).

        ``task`` (the first task of the run's first meta-batch) is measured with
        :func:`metanas.memory.estimate_task_bytes`; the pool then holds
        ``floor(budget / estimate)`` as its ``memory_bound``. The chosen bound is logged.
        Without a task (an evaluation before any meta-step) one task of ``split`` is drawn
        from a generator of its own (seed offset :data:`MEMORY_SEED`), so that the training
        and evaluation task sequences are unchanged.

        Returns:
            The number of tasks that fit (None: no budget could be found on this device).

        Raises:
            ConfigError: not even one task fits in the budget.
        """
        if self._memory_bounded:
            return self.pool.memory_bound
        budget_gb = self.cfg.memory_budget_gb
        budget = budget_bytes(budget_gb, self.device, self.dist.local_world_size)
        if budget is None:
            log.info("memory: no memory budget on %s (trainer.memory_budget_gb=null and the free "
                     "memory cannot be read): up to %d tasks in flight", self.device, self.pool.workers)
            self._memory_bounded = True
            return None
        if task is None:
            rng = np.random.default_rng([self.seed, MEMORY_SEED])
            task = check_task(self.sampler.sample(split, rng), self.sampler, split, self._task_dtype)
        per_task = estimate_task_bytes(
            self.net, self.weights, self.alphas, task.to(self.device), self.inner,
            second_order=bool(getattr(self.algorithm, "second_order", False)),
        )
        fit = tasks_that_fit(budget, per_task, budget_gb)
        self.pool.memory_bound = fit
        self._memory_bounded = True
        log.info(
            "memory: about %.3f GiB per task in flight (estimated), budget %.2f GiB (%s): "
            "%d task(s) in flight on %d thread(s), vmap chunks of at most %d tasks",
            per_task / GB, budget / GB,
            "trainer.memory_budget_gb" if budget_gb is not None else "a share of the available memory",
            self.pool.in_flight, self.pool.workers, fit,
        )
        return fit

    def meta_step(self) -> dict[str, float]:
        """One outer-loop update on a fresh meta-batch; returns its statistics."""
        # every process draws the whole meta-batch (keeps the generators in step) and keeps its share
        tasks = [check_task(self.sampler.sample("train", self.rng), self.sampler, "train", self._task_dtype)
                 for _ in range(self.cfg.meta_batch_size)]
        tasks = [t.to(self.device) for t in self.dist.shard(tasks)]
        self.bound_memory(tasks[0])
        adapt_alphas = bool(self.alphas) and self.step >= self.cfg.alpha_warmup_steps
        grads = self.algorithm.meta_gradients(
            self.net, self.weights, self.alphas, tasks, self.inner,
            adapt_alphas=adapt_alphas, pool=self.pool,
            **({} if self.rates is None else {"rates": self.rates}),
        )
        if self.dist.enabled:
            grads = self._average_over_processes(grads, len(tasks))
        losses = {"query loss of the adapted models": grads.query_loss}
        if self.inner.steps > 0:  # without inner steps there is no support loss (NaN)
            losses["support loss of the meta-parameters"] = grads.support_loss
        for what, value in losses.items():
            if not math.isfinite(value):  # the meta-parameters are not updated from it
                raise self._diverged(f"the {what} is {value}", self.step + 1)
        rate_grads = {} if grads.rates is None else {
            f"{kind}/{k}": g for kind, part in zip(LearnedRates._fields, grads.rates) for k, g in part.items()}
        parts = {"meta-weights": grads.weights, "meta-alphas": grads.alphas or {}, "learned inner rates": rate_grads}
        if not _all_finite([g for part in parts.values() for g in part.values()]):
            bad = [kind for kind, part in parts.items() if not _all_finite(part.values())]
            raise self._diverged(f"the meta-gradient of the {' and '.join(bad)} is not finite "
                                 "(with finite losses)", self.step + 1)
        _apply(self.opt_weights, self.weights, grads.weights, self._frozen_weights)
        updated = list(self.weights.values())
        if grads.alphas is not None and self.opt_alphas is not None:
            _apply(self.opt_alphas, self.alphas, grads.alphas)
            updated += self.alphas.values()
        if self.opt_rates is not None:  # the alphas' rates rest (no gradient) while the alphas do
            rate_params = self._rate_parameters()
            _apply(self.opt_rates, {k: rate_params[k] for k in rate_grads}, rate_grads)
            updated += rate_params.values()
        if not _all_finite(updated):
            bad = [kind for kind, ps in (("meta-weights", self.weights), ("meta-alphas", self.alphas),
                                         ("learned inner rates", self._rate_parameters()))
                   if ps and not _all_finite(ps.values())]
            raise self._diverged(f"the meta-update made the {' and '.join(bad)} non-finite", self.step + 1)
        row = {
            "step": float(self.step + 1),
            "support_loss": grads.support_loss,
            "query_loss": grads.query_loss,
            "query_accuracy": grads.query_accuracy,
            "lr_weights": self.opt_weights.param_groups[0]["lr"],
            "lr_alphas": self.opt_alphas.param_groups[0]["lr"] if self.opt_alphas else 0.0,
        }
        if self.cfg.shrink.due(self.step + 1):
            self._shrink(self.step + 1)
        if self.rates is not None:  # the meta learning rate of the rates and their mean values
            row["lr_rates"] = self.opt_rates.param_groups[0]["lr"]
            for kind, part in zip(LearnedRates._fields, self.rates):
                if part:
                    row[f"inner_rate_{kind}_mean"] = float(torch.cat([p.detach().flatten() for p in part.values()]).mean())
        if self.alphas:
            row.update(self.architecture_row(grads.alpha_displacement))
        if self.cfg.shrink.enabled:
            row["ops_kept"] = float(kept_count(self.op_mask, self.search_space))
        self._next_learning_rates()
        self.step += 1
        return row

    def _shrink(self, step: int) -> None:
        """One check of the shrinking rule (:mod:`metanas.shrink`) after meta-step ``step``."""
        mask, self.shrink_counts, removed = shrink_check(
            self.alphas, self.op_mask, self.shrink_counts, self.search_space, self.cfg.shrink)
        if removed:
            self.set_op_mask(mask)
            log.info("meta-step %d: shrinking removed %d op(s): %s; %d ops kept", step, len(removed),
                     ", ".join(f"{r.kind} edge {r.edge} {r.op} (weight {r.weight:.3g})" for r in removed),
                     kept_count(self.op_mask, self.search_space))

    def architecture_row(self, displacement: float) -> dict[str, float]:
        """Architecture statistics of the meta-alphas after a meta-step, for the log.

        At the inner loop's read-out temperature: per cell kind the mean op-weight entropy
        relative to uniform and the largest op weight
        (:func:`~metanas.search_space.architecture_stats`), the mean alpha displacement of
        the step's task adaptations, and every edge's op weights as
        ``op/<kind>/<edge>/<op>`` (the alpha-evolution plot of :mod:`metanas.logger`).
        """
        temperature = self.eval_inner.temperature(self.eval_inner.steps)
        mask = self.net_op_mask
        weights = op_weights(self.alphas, self.search_space, temperature, mask)
        row = {**architecture_stats(self.alphas, self.search_space, temperature, mask, weights),
               "alpha_displacement": displacement}
        for kind, w in weights.items():
            for e, edge in enumerate(w.tolist()):
                row.update({f"op/{kind}/{e}/{op}": v for op, v in zip(self.search_space.ops, edge)})
        return row

    @property
    def net_op_mask(self) -> OpMask | None:
        """The network's op mask: None while every op is kept."""
        return getattr(self.net, "op_mask", None)

    @property
    def n_parameters(self) -> int:
        """Number of weights of the network (alphas not counted)."""
        return sum(p.numel() for p in self.net.parameters())

    def _average_over_processes(self, grads: MetaGradients, n_local: int) -> MetaGradients:
        """Average of the processes' meta-gradients, each weighted by its number of tasks."""
        stats = ("query_loss", "query_accuracy", "support_loss", "alpha_displacement")
        named = {f"w/{k}": v for k, v in grads.weights.items()}
        if grads.alphas is not None:
            named.update({f"a/{k}": v for k, v in grads.alphas.items()})
        named.update({f"s/{k}": torch.tensor(getattr(grads, k), dtype=torch.float64) for k in stats})
        if grads.rates is not None:
            named.update({f"rw/{k}": v for k, v in grads.rates.weights.items()})
            named.update({f"ra/{k}": v for k, v in grads.rates.alphas.items()})
        mean = self.dist.all_reduce_mean(named, weight=float(n_local))
        return MetaGradients(
            weights={k: mean[f"w/{k}"] for k in grads.weights},
            alphas=None if grads.alphas is None else {k: mean[f"a/{k}"] for k in grads.alphas},
            rates=None if grads.rates is None else LearnedRates(
                {k: mean[f"rw/{k}"] for k in grads.rates.weights}, {k: mean[f"ra/{k}"] for k in grads.rates.alphas}),
            **{k: float(mean[f"s/{k}"]) for k in stats},
        )

    def validate(self, n_tasks: int | None = None) -> EvalResult:
        """Meta-validate the current meta-parameters on a fixed sequence of val tasks."""
        return self._evaluate("val", n_tasks or self.cfg.n_val_tasks, VAL_SEED, self.weights, self.alphas,
                              rates=self.rates)

    def _evaluate(self, split, n_tasks, seed_offset, weights, alphas, compare_frozen=False,
                  rates=None) -> EvalResult:
        self.bound_memory(split=split)
        return evaluate(
            self.net, weights, alphas, self.sampler, split, n_tasks, self.eval_inner,
            self.search_space, np.random.default_rng([self.seed, seed_offset]),
            transductive=self.cfg.transductive, device=self.device, progress=self._progress(),
            pool=self.pool, compare_frozen=compare_frozen, rates=rates,
        )

    def fit(self) -> dict[str, float]:
        """Run meta-training from the current step to ``meta_steps``.

        Returns:
            The best meta-validation result (``val_accuracy``, ``val_ci95``, ``step``), or
            an empty dict when validation is disabled.
        """
        cfg = self.cfg
        bar = tqdm(
            total=cfg.meta_steps, initial=self.step, desc="meta-train", unit="step",
            disable=not self._progress(), dynamic_ncols=True,
        )
        recent: list[float] = []
        started = time.perf_counter() - self.train_time
        validated = saved = False
        try:
            while self.step < cfg.meta_steps and not self._out_of_time():
                row = self.meta_step()
                self.train_time = time.perf_counter() - started
                row["time_s"] = self.train_time
                recent = (recent + [row["query_accuracy"]])[-cfg.log_every :]
                last = self.step == cfg.meta_steps or self._out_of_time()
                # rank 0 validates; the others wait for it in the next collective
                validated = bool(cfg.val_every and self.dist.is_main
                                 and (self.step % cfg.val_every == 0 or last))
                if validated:
                    self._validate_and_keep_best(row)
                    self.train_time = time.perf_counter() - started
                self.history.append(row)
                self.logger.log_step(row)
                bar.update(1)
                bar.set_postfix(acc=f"{np.mean(recent):.3f}", best_val=self.best.get("val_accuracy"))
                if self.step % cfg.log_every == 0:
                    log.info(
                        "meta-step %d/%d  query acc %.3f  query loss %.3f  (%.2f s/step)",
                        self.step, cfg.meta_steps, np.mean(recent), row["query_loss"],
                        self.train_time / max(self.step, 1),
                    )
                saved = bool((cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last)
                if saved:
                    self.save(rundir.LAST_CKPT)
                    self._write_log()
            if self.step < cfg.meta_steps:
                log.info("time budget trainer.time_budget_min=%g reached after meta-step %d of %d "
                         "(%.1f min of training)", cfg.time_budget_min, self.step, cfg.meta_steps,
                         self.train_time / 60)
                # a resumed run can start past its budget: its last state is still validated
                if cfg.val_every and self.dist.is_main and not validated and self.history:
                    self._validate_and_keep_best(self.history[-1])
                if not saved:
                    self.save(rundir.LAST_CKPT)
        finally:
            bar.close()
        self._write_log()
        return dict(self.best)

    def _out_of_time(self) -> bool:
        """Whether ``time_budget_min`` is spent (rank 0's clock decides for every process)."""
        if self.cfg.time_budget_min is None:
            return False
        spent = self.train_time >= 60 * self.cfg.time_budget_min
        return bool(self.dist.broadcast_object(spent)) if self.dist.enabled else spent

    def _validate_and_keep_best(self, row: dict[str, float]) -> None:
        result = self.validate()
        row["val_accuracy"], row["val_ci95"] = result.accuracy, result.ci95
        log.info("meta-validation at step %d: %s", self.step, result.summary())
        if result.accuracy > self.best.get("val_accuracy", -1.0):
            self.best = {"val_accuracy": result.accuracy, "val_ci95": result.ci95, "step": float(self.step)}
            self.save(rundir.BEST_CKPT)

    def best_parameters(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Meta-weights and meta-alphas of the best validated state (the current ones if none)."""
        weights, alphas, _, _ = self.best_state()
        return weights, alphas

    def best_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor], OpMask | None, LearnedRates | None]:
        """Meta-weights, meta-alphas, op mask (None: every op kept, or no alphas) and (with
        Meta-SGD) learned inner rates of the best validated state (the current ones if none)."""
        path = rundir.checkpoint_path(self.run_dir, rundir.BEST_CKPT)
        if not self.best or not path.is_file():
            return dict(self.weights), dict(self.alphas), self.net_op_mask, self.rates
        state = load_checkpoint(path, self.search_space.to_dict(), self.device)
        mask = state.get("op_mask") if self.op_mask is not None else None
        if mask is not None:
            mask = check_op_mask(self.search_space, mask)
            mask = None if mask == full_op_mask(self.search_space) else mask
        rates = None
        if self.rates is not None:
            saved = state.get("rates") or {}
            rates = LearnedRates(*(dict(saved.get(kind) or {}) or dict(part)
                                   for kind, part in zip(LearnedRates._fields, self.rates)))
        return dict(state["weights"]), dict(state["alphas"]), mask, rates

    def test(self, n_tasks: int | None = None) -> EvalResult:
        """Meta-test the best validated meta-parameters on the test split (with the
        frozen-alpha comparison on the same tasks when ``compare_frozen_alphas``), adapting
        within the supernet those parameters were meta-trained with (their op mask) and with
        their learned inner rates (Meta-SGD)."""
        weights, alphas, mask, rates = self.best_state()
        current = self.op_mask
        if self.op_mask is not None:
            self.set_op_mask(mask)
        try:
            return self._evaluate("test", n_tasks or self.cfg.n_test_tasks, TEST_SEED, weights, alphas,
                                  self.cfg.compare_frozen_alphas, rates=rates)
        finally:
            if current is not None:
                self.set_op_mask(current)


def _lists(mask: Mapping[str, Any]) -> dict[str, list[list[Any]]]:
    """A mask (or counts) as plain nested lists, for the checkpoint."""
    return {k: [list(r) for r in rows] for k, rows in mask.items()}


__all__ = ["MetaTrainer", "TrainerConfig"]
