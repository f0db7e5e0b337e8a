"""metanas: meta-learning of neural architectures and weights for few-shot learning.

A DARTS supernet's weights and architecture parameters (alphas) are meta-trained over a
distribution of few-shot tasks with Reptile, first-order MAML or second-order MAML; on a new
task a few inner steps adapt both, giving the task its own architecture (a genotype).

The public API is re-exported here; see the README for a tour.
"""

from metanas.tasks import OmniglotTasks, Task, TaskSampler, check_sampler

from .algorithms import FOMAML, MAML, MetaAlgorithm, MetaGradients, Reptile
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import CheckpointError, ConfigError, DataError, MetaNASError
from .evaluate import EvalResult, evaluate, mean_ci95
from .functional import forward
from .inner import Adapted, InnerLoopConfig, adapt, predict
from .search_space import (
    DiscreteNetwork,
    Genotype,
    SearchNetwork,
    SearchSpaceConfig,
    derive_genotype,
    init_alphas,
)
from .trainer import MetaTrainer, TrainerConfig

__version__ = "0.1.0"

__all__ = [
    "Adapted",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiscreteNetwork",
    "EvalResult",
    "FOMAML",
    "Genotype",
    "InnerLoopConfig",
    "MAML",
    "MetaAlgorithm",
    "MetaGradients",
    "MetaNASError",
    "MetaTrainer",
    "OmniglotTasks",
    "Reptile",
    "SearchNetwork",
    "SearchSpaceConfig",
    "Task",
    "TaskSampler",
    "TrainerConfig",
    "adapt",
    "check_sampler",
    "derive_genotype",
    "evaluate",
    "forward",
    "init_alphas",
    "load_checkpoint",
    "mean_ci95",
    "predict",
    "save_checkpoint",
]
