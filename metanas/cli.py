"""Hydra entry points.

``metanas-train`` composes ``conf/train.yaml`` (installed as ``metanas.conf``), builds every
part with :func:`hydra.utils.instantiate`, meta-trains, meta-tests and writes into the Hydra
run directory (through :mod:`metanas.rundir`) ``metrics.json`` (meta-test ``accuracy``, ``ci95``,
``n_tasks``, the best meta-validation result, wall time, architecture diversity, the weight
count ``parameters``, the ``model`` spec, the resolved config), ``genotype.json`` (the
meta-architecture), ``task_genotypes.json`` (each meta-test task's accuracy and genotype),
the checkpoints and logs of :mod:`metanas.trainer`, and
``status.json`` (``running``, then ``ok`` or ``failed`` with the error; read by ``metanas-report``).
A network without alphas (``model=conv4`` or ``model=genotype``, :mod:`metanas.models`) writes
no genotype files, and its architecture statistics in ``metrics.json`` are null.

:func:`train` holds the logic and takes a plain ``DictConfig``; the Hydra app
:func:`train_app` only adds Hydra's command line and turns bad input into a one-line error
and exit status 2, and the console script :func:`train_entry` does the same for Hydra's own
configuration errors (an unknown key or option) before Hydra starts. The function returns
the best meta-validation accuracy (the test accuracy if validation is disabled), the value
Hydra sweepers optimise.

In a sweep (``metanas-train -m``) a job that fails is recorded as ``failed`` in its
``status.json`` and returns NaN, so the other jobs of the sweep still run (an Optuna sweeper
counts the trial as failed); a single run still exits with a non-zero status.

Launched by ``torchrun --nproc_per_node=N metanas-train ...`` (see :mod:`metanas.distributed`)
the processes split each meta-batch; rank 0 alone writes files and meta-tests.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from metanas.tasks import check_sampler
from metanas.tasks.core import check_int

from . import rundir
from .io import resolve_device
from .distributed import (DEFAULT_TIMEOUT_S, DistContext, DistributedError, exit_after_failed_collective,
                          init_distributed)
from .errors import ConfigError, MetaNASError
from .hydra_utils import build, in_multirun, output_dir, run_console
from .logger import RunLogger
from .engines import share_cores
from .evaluate import FROZEN, mean_ci95
from .models import build_model, describe, describe_model, has_alphas, supernet
from .search_space import derive_genotype, init_alphas
from .trainer import MetaTrainer, TrainerConfig

log = logging.getLogger(__name__)


def _resume_path(resume: str | None, run_dir: Path) -> Path | None:
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        path = rundir.checkpoint_path(run_dir, rundir.LAST_CKPT)
        return path if path.is_file() else None
    return Path(resume)


def build_trainer(cfg: DictConfig, run_dir: Path, dist: DistContext | None = None) -> MetaTrainer:
    """Instantiate sampler, network (``model=...``: the supernet and its alphas, or a network
    without alphas), algorithm and optimisers from a config."""
    dist = dist or DistContext()
    seed = check_int("seed", cfg.seed, 0, fix="set seed to an integer >= 0")
    device = resolve_device(cfg.device)
    if dist.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)  # one GPU per process
    # members only: MetaTrainer draws from the splits it will use
    sampler = check_sampler(build(cfg.task, "the task sampler (task=...)"), splits=())
    make_space = build(cfg.search_space, "the search space (search_space=...)")
    space = make_space(in_channels=sampler.input_shape[0], n_classes=sampler.n_way)
    model = cfg.get("model")  # absent in configs written before the model group: the supernet
    spec = build(model, "the model (model=...)")(space=space) if model is not None else supernet()
    # Weight and alpha initialisation is seeded without touching torch's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(spec, space)
    alphas = init_alphas(space, generator=torch.Generator().manual_seed(seed)) if has_alphas(spec) else {}
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_kwargs.get("progress") is None and in_multirun():
        trainer_kwargs["progress"] = False  # sweeps log to files; no bars from parallel jobs
    try:
        trainer_cfg = TrainerConfig(
            **trainer_kwargs,
            meta_lr_schedule=cfg.optim.get("schedule", "constant"),
        )
    except TypeError as exc:  # an unknown key in a user's trainer preset
        raise ConfigError(f"bad trainer settings: {exc}; see metanas.trainer.TrainerConfig") from exc
    logger_cfg = cfg.get("logger") or {}
    logger = RunLogger(run_dir, tensorboard=bool(logger_cfg.get("tensorboard", False)),
                       curves=bool(logger_cfg.get("curves", True)), enabled=dist.is_main)
    inner = build(cfg.inner, "the inner loop (inner=...)")
    rates_optimizer = None
    if inner.meta_sgd:
        if cfg.optim.get("rates") is None:
            raise ConfigError("inner.meta_sgd=true needs a meta-optimiser for the learned inner rates; "
                              "add optim.rates (optim=adam and optim=sgd have one) or set inner.meta_sgd=false")
        rates_optimizer = build(cfg.optim.rates, "the learned inner rates' meta-optimiser (optim.rates)")
    return MetaTrainer(
        net=net,
        alphas=alphas,
        sampler=sampler,
        algorithm=build(cfg.algorithm, "the outer loop (algorithm=...)"),
        inner=inner,
        rates_optimizer=rates_optimizer,
        weights_optimizer=build(cfg.optim.weights, "the weights' meta-optimiser (optim=...)"),
        alphas_optimizer=build(cfg.optim.alphas, "the alphas' meta-optimiser (optim=...)"),
        search_space=space,
        cfg=trainer_cfg,
        run_dir=run_dir,
        seed=seed,
        device=device,
        config=OmegaConf.to_container(cfg, resolve=True),
        dist=dist,
        logger=logger,
    )


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> float:
    """Meta-train and meta-test as configured; write results into ``run_dir``.

    Args:
        cfg: a composed ``train`` config.
        run_dir: output folder (default: Hydra's run directory, else the working directory).

    Returns:
        The best meta-validation accuracy, or the meta-test accuracy without validation.
    """
    run_dir = Path(run_dir) if run_dir is not None else output_dir()
    started = time.perf_counter()
    dist_cfg = cfg.get("distributed") or {}
    dist = init_distributed(
        backend=str(dist_cfg.get("backend", "auto")),
        timeout_s=float(dist_cfg.get("timeout_s", DEFAULT_TIMEOUT_S)),
        device=resolve_device(cfg.device),
    )
    try:
        # every process works in rank 0's run dir (its checkpoint is the one to resume)
        run_dir = Path(dist.broadcast_object(str(run_dir)))
        if dist.is_main:
            rundir.write_status(run_dir, "running")
        try:
            trainer = build_trainer(cfg, run_dir, dist)
            try:
                objective = _train(trainer, cfg, run_dir, started)
            finally:
                trainer.close()
        except BaseException as exc:
            if dist.is_main:
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                rundir.write_status(run_dir, status, error=f"{type(exc).__name__}: {exc}")
            raise
        if dist.is_main:
            rundir.write_status(run_dir, "ok", objective=objective)
        return objective
    finally:
        dist.close()


def _train(trainer: MetaTrainer, cfg: DictConfig, run_dir: Path, started: float) -> float:
    share_cores(trainer.pool.workers, trainer.device)
    resume = _resume_path(cfg.get("resume"), run_dir)
    if resume is not None:
        trainer.resume(resume)
    log.info(
        "meta-training %s with %s on %s for %d meta-steps, %d weights and %d alphas (run dir %s, "
        "process %d of %d)", describe_model(describe(trainer.net)), trainer.algorithm, trainer.device,
        trainer.cfg.meta_steps, trainer.n_parameters, sum(a.numel() for a in trainer.alphas.values()),
        run_dir, trainer.dist.rank + 1, trainer.dist.world_size,
    )
    best = trainer.fit()
    if not trainer.dist.is_main:
        return math.nan  # rank 0 meta-tests and writes the results
    result = trainer.test()
    _, alphas, op_mask, _ = trainer.best_state()
    # the meta-architecture at the temperature the adapted models are read out at (none
    # for a network without alphas: no genotype files, null architecture statistics)
    genotype = derive_genotype(alphas, trainer.search_space,
                               temperature=trainer.eval_inner.temperature(trainer.eval_inner.steps),
                               op_mask=op_mask) if alphas else None
    gain = result.architecture_gain()
    metrics = {
        "accuracy": result.accuracy,
        "ci95": result.ci95,
        "n_tasks": result.n_tasks,
        "split": "test",
        "transductive": trainer.cfg.transductive,
        "val_accuracy": best.get("val_accuracy"),
        "val_ci95": best.get("val_ci95"),
        "best_step": best.get("step"),
        "meta_steps": trainer.step,
        "train_time_s": trainer.train_time,
        "wall_time_s": time.perf_counter() - started,
        "architecture_diversity": result.diversity or None,
        "architecture_gain": None if gain is None else {
            "accuracy": gain[0], "ci95": gain[1], "frozen_alpha_accuracy": mean_ci95(result.extras[FROZEN])[0],
            "note": "paired over the same test tasks: adapted alphas minus alphas frozen at the meta-alphas"},
        "parameters": trainer.n_parameters,
        "model": describe(trainer.net),
        "config": trainer.config,
    }
    files: dict = {rundir.METRICS: metrics}
    if genotype is not None:
        files[rundir.GENOTYPE] = genotype.to_dict()
        files[rundir.TASK_GENOTYPES] = [{"task": i, "accuracy": acc, "genotype": g.to_dict()}
                                        for i, (acc, g) in enumerate(zip(result.accuracies, result.genotypes))]
    rundir.write(run_dir, files)
    log.info("meta-test accuracy: %s", result.summary())
    if gain is not None:
        log.info("architecture adaptation gain (adapted minus frozen alphas, same tasks): "
                 "%+.2f +- %.2f points", 100 * gain[0], 100 * gain[1])
    if genotype is not None:
        log.info("meta-architecture: %s", genotype.to_json())
    objective = best.get("val_accuracy", result.accuracy)
    return float(objective)


@hydra.main(version_base="1.3", config_path="pkg://metanas.conf", config_name="train")
def train_app(cfg: DictConfig) -> float:
    """The Hydra app of ``metanas-train`` around :func:`train`.

    A single run turns bad input into ``metanas-train: error: ...`` and exit status 2 (1 for
    a failed process group). In a sweep a failing job is logged, marked ``failed`` in its
    ``status.json`` and returns NaN, and the sweep goes on.
    """
    try:
        return train(cfg)
    except (MetaNASError, DistributedError) as exc:
        log.error("%s", exc)
        if in_multirun():
            return math.nan
        print(f"metanas-train: error: {exc}", file=sys.stderr)
        if isinstance(exc, DistributedError):  # a broken group's teardown could abort instead
            exit_after_failed_collective(1)
        sys.exit(2)
    except Exception:
        if not in_multirun():
            raise
        log.exception("this job of the sweep failed")
        return math.nan


def train_entry() -> None:
    """Console script ``metanas-train`` (also ``python -m metanas.cli`` and ``torchrun -m
    metanas.cli``): :func:`train_app`, Hydra's configuration errors as one-line errors with
    exit status 2 (:func:`metanas.hydra_utils.run_console`)."""
    run_console(train_app, "metanas-train", "train")


__all__ = ["build_trainer", "train", "train_app", "train_entry"]


if __name__ == "__main__":
    train_entry()
