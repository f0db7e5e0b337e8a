"""metanas: meta-learning of neural architectures and weights for few-shot learning.

A DARTS supernet's weights and architecture parameters (alphas) are meta-trained over a
distribution of few-shot tasks with Reptile, first-order MAML or second-order MAML; on a new
task a few inner steps adapt both, giving the task its own architecture (a genotype).

The names here are the tour of the README; everything else lives in its module:
``metanas.tasks`` (samplers, adapters), ``metanas.search_space`` (ops, normalisers, discrete
networks), ``metanas.inner`` and ``metanas.inner_optim`` (the inner loop and its optimisers),
``metanas.algorithms``, ``metanas.engines`` (loop, threads, vmap), ``metanas.evaluate``,
``metanas.adaptation`` and ``metanas.export`` (new data, deployable models),
``metanas.checkpoint``, ``metanas.distributed``, ``metanas.baselines``, ``metanas.models``
(the ``model`` group: supernet, conv-4, a genotype's network), ``metanas.errors``.
"""

from metanas.tasks import ImageFolderTasks, OmniglotTasks, Task, TaskSampler, check_sampler

from .algorithms import FOMAML, MAML, Reptile
from .errors import MetaNASError
from .evaluate import evaluate
from .inner import InnerLoopConfig, LearnedRates, adapt, predict
from .search_space import Genotype, SearchNetwork, SearchSpaceConfig, derive_genotype, init_alphas
from .trainer import MetaTrainer, TrainerConfig

__version__ = "0.1.0"

__all__ = [
    "FOMAML",
    "MAML",
    "Genotype",
    "ImageFolderTasks",
    "InnerLoopConfig",
    "LearnedRates",
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
    "init_alphas",
    "predict",
]
