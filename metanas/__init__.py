"""metanas: meta-learning of neural architectures and weights for few-shot learning.

A DARTS supernet's weights and architecture parameters (alphas) are meta-trained over a
distribution of few-shot tasks with Reptile, first-order MAML or second-order MAML; on a new
task a few inner steps adapt both, giving the task its own architecture (a genotype).

The public API is re-exported here; see the README for a tour.
"""

from metanas.tasks import (
    DatasetTasks,
    ImageFolderTasks,
    MiniImageNetTasks,
    OmniglotTasks,
    Task,
    TaskSampler,
    TasksetAdapter,
    check_sampler,
)

from .algorithms import FOMAML, MAML, MetaAlgorithm, MetaGradients, Reptile
from .baselines import Conv4, Conv4Config
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistContext, DistributedError, init_distributed
from .errors import CheckpointError, ConfigError, DataError, MetaNASError
from .evaluate import EvalResult, evaluate, mean_ci95
from .flops import count_flops
from .functional import forward
from .inner import Adapted, InnerLoopConfig, adapt, predict
from .logger import RunLogger
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
    "FOMAML",
    "MAML",
    "Adapted",
    "CheckpointError",
    "ConfigError",
    "Conv4",
    "Conv4Config",
    "DataError",
    "DatasetTasks",
    "DiscreteNetwork",
    "DistContext",
    "DistributedError",
    "EvalResult",
    "Genotype",
    "ImageFolderTasks",
    "InnerLoopConfig",
    "MetaAlgorithm",
    "MetaGradients",
    "MetaNASError",
    "MetaTrainer",
    "MiniImageNetTasks",
    "OmniglotTasks",
    "Reptile",
    "RunLogger",
    "SearchNetwork",
    "SearchSpaceConfig",
    "Task",
    "TaskSampler",
    "TasksetAdapter",
    "TrainerConfig",
    "adapt",
    "check_sampler",
    "count_flops",
    "derive_genotype",
    "evaluate",
    "forward",
    "init_alphas",
    "init_distributed",
    "load_checkpoint",
    "mean_ci95",
    "predict",
    "save_checkpoint",
]
