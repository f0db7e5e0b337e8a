"""Built-in task distributions (``metanas.tasks``) and the :class:`TaskSampler` contract.

Public API:

* :class:`Task`: one few-shot episode (support / query tensors, labels, global class ids).
* :class:`TaskSampler`: the protocol every sampler follows (``n_way``, ``k_shot``,
  ``q_query``, ``input_shape``, ``sample(split, rng) -> Task``); :func:`check_sampler`
  validates an object against it (members, and tasks drawn from the splits used), and
  :func:`check_task` is the cheap check of one drawn task.
* :data:`Split` / :data:`SPLITS`: ``"train"``, ``"val"``, ``"test"``.
* :func:`sample_task` / :func:`sample_task_ragged`: generic N-way K-shot Q-query composition
  over an array of per-class examples, for custom samplers.
* :mod:`metanas.tasks.core`: the shared core every built-in loader reuses, for writing a new
  one: the count check, class splits, class pools and episode composition, class transforms
  (rotations as classes), the pixel normaliser and the validated ``.npz`` cache.
* :class:`OmniglotTasks`: Omniglot from the embedded, offline ``omniglot.npz``.
* :class:`ImageFolderTasks`: any folder of class sub-folders of images.
* :class:`MiniImageNetTasks`: miniImageNet (split CSVs + images, or pickled arrays).
* :class:`TasksetAdapter`, :class:`DatasetTasks`: learn2learn-style tasksets and
  ``torch.utils.data.Dataset`` s of ``(x, y)`` pairs.
"""

from .adapters import DatasetTasks, TasksetAdapter
from .base import SPLITS, Split, Task, TaskSampler, check_sampler, check_task
from .core import sample_task, sample_task_ragged
from .image_folder import ImageFolderTasks, load_image_folder
from .miniimagenet import MiniImageNetTasks
from .omniglot import OmniglotTasks

__all__ = [
    "SPLITS",
    "DatasetTasks",
    "ImageFolderTasks",
    "MiniImageNetTasks",
    "OmniglotTasks",
    "Split",
    "Task",
    "TaskSampler",
    "TasksetAdapter",
    "check_sampler",
    "check_task",
    "load_image_folder",
    "sample_task",
    "sample_task_ragged",
]
