"""Hydra entry points.

``metanas-train`` composes ``conf/train.yaml`` (installed as ``metanas.conf``), builds every
part with :func:`hydra.utils.instantiate`, meta-trains, meta-tests and writes into the Hydra
run directory:

- ``metrics.json``: meta-test ``accuracy``, ``ci95``, ``n_tasks``, the best meta-validation
  result, wall time, architecture diversity, and the resolved config that produced them;
- ``genotype.json``: the meta-architecture (genotype of the meta-alphas);
- ``task_genotypes.json``: each meta-test task's accuracy and own genotype;
- ``checkpoints/last.ckpt`` and ``checkpoints/best.ckpt``; ``train_log.csv``.

:func:`train` holds the logic and takes a plain ``DictConfig``; the decorated
:func:`train_entry` only adds Hydra's command line and turns bad input into a one-line error
and exit status 2. The function returns the best meta-validation accuracy (the test
accuracy if validation is disabled), the value Hydra sweepers optimise.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metanas.tasks import check_sampler

from .checkpoint import atomic_write_text
from .errors import ConfigError, MetaNASError
from .search_space import SearchNetwork, derive_genotype, init_alphas
from .trainer import MetaTrainer, TrainerConfig, resolve_device

log = logging.getLogger(__name__)


def _build(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """instantiate() with the library's own errors unwrapped from Hydra's wrapper."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, MetaNASError):
            raise cause from None
        raise ConfigError(f"could not build {what}: {exc}") from exc


def _run_dir() -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def _resume_path(resume: str | None, run_dir: Path) -> Path | None:
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        path = run_dir / "checkpoints" / "last.ckpt"
        return path if path.is_file() else None
    return Path(resume)


def build_trainer(cfg: DictConfig, run_dir: Path) -> MetaTrainer:
    """Instantiate sampler, supernet, alphas, algorithm and optimisers from a config."""
    seed = int(cfg.seed)
    device = resolve_device(cfg.device)
    sampler = check_sampler(_build(cfg.task, "the task sampler (task=...)"))
    make_space = _build(cfg.search_space, "the search space (search_space=...)")
    space = make_space(in_channels=sampler.input_shape[0], n_classes=sampler.n_way)
    # Weight and alpha initialisation is seeded without touching torch's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SearchNetwork(space)
    alphas = init_alphas(space, generator=torch.Generator().manual_seed(seed))
    try:
        trainer_cfg = TrainerConfig(
            **OmegaConf.to_container(cfg.trainer, resolve=True),
            meta_lr_schedule=cfg.optim.get("schedule", "constant"),
        )
    except TypeError as exc:  # an unknown key in a user's trainer preset
        raise ConfigError(f"bad trainer settings: {exc}; see metanas.trainer.TrainerConfig") from exc
    return MetaTrainer(
        net=net,
        alphas=alphas,
        sampler=sampler,
        algorithm=_build(cfg.algorithm, "the outer loop (algorithm=...)"),
        inner=_build(cfg.inner, "the inner loop (inner=...)"),
        weights_optimizer=_build(cfg.optim.weights, "the weights' meta-optimiser (optim=...)"),
        alphas_optimizer=_build(cfg.optim.alphas, "the alphas' meta-optimiser (optim=...)"),
        search_space=space,
        cfg=trainer_cfg,
        run_dir=run_dir,
        seed=seed,
        device=device,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> float:
    """Meta-train and meta-test as configured; write results into ``run_dir``.

    Args:
        cfg: a composed ``train`` config.
        run_dir: output folder (default: Hydra's run directory, else the working directory).

    Returns:
        The best meta-validation accuracy, or the meta-test accuracy without validation.
    """
    run_dir = Path(run_dir) if run_dir is not None else _run_dir()
    started = time.perf_counter()
    trainer = build_trainer(cfg, run_dir)
    try:
        return _train(trainer, cfg, run_dir, started)
    finally:
        trainer.close()


def _train(trainer: MetaTrainer, cfg: DictConfig, run_dir: Path, started: float) -> float:
    if trainer.pool.workers > 1 and trainer.device.type == "cpu":
        # one thread per task instead of several per kernel (see metanas.parallel)
        torch.set_num_threads(max(1, torch.get_num_threads() // trainer.pool.workers))
    resume = _resume_path(cfg.get("resume"), run_dir)
    if resume is not None:
        trainer.resume(resume)
    log.info(
        "meta-training %s on %s for %d meta-steps (run dir %s)",
        trainer.algorithm, trainer.device, trainer.cfg.meta_steps, run_dir,
    )
    best = trainer.fit()
    result = trainer.test()
    _, alphas = trainer.best_parameters()
    genotype = derive_genotype(alphas, trainer.search_space)
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
        "architecture_diversity": result.diversity,
        "config": trainer.config,
    }
    atomic_write_text(run_dir / "genotype.json", genotype.to_json() + "\n")
    atomic_write_text(
        run_dir / "task_genotypes.json",
        json.dumps(
            [
                {"task": i, "accuracy": acc, "genotype": g.to_dict()}
                for i, (acc, g) in enumerate(zip(result.accuracies, result.genotypes))
            ],
            indent=1,
        ),
    )
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    log.info("meta-test accuracy: %s", result.summary())
    log.info("meta-architecture: %s", genotype.to_json())
    objective = best.get("val_accuracy", result.accuracy)
    return float(objective)


@hydra.main(version_base="1.3", config_path="pkg://metanas.conf", config_name="train")
def train_entry(cfg: DictConfig) -> float:
    """``metanas-train``: Hydra command line around :func:`train`."""
    try:
        return train(cfg)
    except MetaNASError as exc:
        log.error("%s", exc)
        print(f"metanas-train: error: {exc}", file=sys.stderr)
        sys.exit(2)


__all__ = ["train", "build_trainer", "train_entry"]


if __name__ == "__main__":
    train_entry()
