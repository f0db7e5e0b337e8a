"""Adapters from other task sources to the :class:`~metanas.tasks.TaskSampler` protocol.

* :class:`TasksetAdapter`: any learn2learn-style *taskset*, an object whose ``sample()``
  returns ``(data, labels)`` for one task (e.g. ``learn2learn.data.TaskDataset``, or the
  ``train``/``validation``/``test`` members of ``learn2learn.vision.benchmarks.get_tasksets``).
  Examples are regrouped class-major by label into support and query sets.
  Reproducibility: the taskset draws its tasks with its own random state (learn2learn uses
  Python's ``random`` module), so the ``rng`` metanas passes is not used, and seeding metanas
  alone does not reproduce the task sequence; seed the taskset's source (``random.seed``)
  too. Within a task, the first ``k_shot`` examples of each label (in the taskset's order)
  form the support set.
* :class:`DatasetTasks`: any ``torch.utils.data.Dataset`` (or sequence) of ``(x, y)`` pairs.
  Classes are indexed once (through ``dataset.targets`` when present, else by reading every
  label), split into meta-train / val / test by a seed or explicit lists, and episodes are
  drawn from metanas's ``rng``; only the ``n_way * (k_shot + q_query)`` examples of a task are
  read from the dataset, so large datasets stay on disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metanas.errors import ConfigError, DataError

from .base import SPLITS, Split, Task, check_split
from .core import UNIT_PIXELS, PoolSampler, RaggedPool, check_counts, check_split_sizes, make_task, split_classes

__all__ = ["DatasetTasks", "TasksetAdapter"]


def _to_tensor(x: Any) -> Tensor:
    """An example (tensor, array or PIL image) as float32 ``(C, H, W)``."""
    if isinstance(x, Tensor):
        t = x.detach().cpu()
    else:
        arr = np.asarray(x)
        if arr.dtype == np.uint8:
            arr = UNIT_PIXELS(arr)
            if arr.ndim == 3:  # PIL / HWC
                arr = arr.transpose(2, 0, 1)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() == 2:
        t = t.unsqueeze(0)
    return t.float()


class TasksetAdapter:
    """A learn2learn-style taskset as a :class:`TaskSampler` (see the module docstring).

    Args:
        train: taskset of the meta-train split (``.sample() -> (data, labels)``).
        n_way, k_shot, q_query: the shape every sampled task must have.
        val, test: tasksets of the other splits (optional; sampling a split without one
            raises :class:`ConfigError`).
        input_shape: ``(C, H, W)``; None: taken from one task of ``train`` drawn now.

    Raises:
        ConfigError: a taskset has no callable ``sample``.

    ``reproducible`` is False: :func:`~metanas.tasks.check_sampler` does not draw from it (a
    draw would move the tasksets' own random state); every task is checked as it is regrouped.
    """

    reproducible = False

    def __init__(
        self, train: Any, n_way: int, k_shot: int, q_query: int, val: Any = None, test: Any = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        self.n_way, self.k_shot, self.q_query = check_counts(n_way, k_shot, q_query)
        self.tasksets = {"train": train, "val": val, "test": test}
        for split, ts in self.tasksets.items():
            if ts is not None and not callable(getattr(ts, "sample", None)):
                raise ConfigError(
                    f"the {split} taskset ({type(ts).__name__}) has no sample() method; pass an "
                    "object whose sample() returns (data, labels), e.g. a learn2learn TaskDataset"
                )
        if input_shape is None:
            input_shape = tuple(self._regroup(*train.sample(), split="train").support_x.shape[1:])
        self.input_shape = tuple(int(s) for s in input_shape)

    def _regroup(self, data: Any, labels: Any, split: str) -> Task:
        x = _to_tensor(data) if not isinstance(data, Tensor) else data.detach().cpu().float()
        y = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)).long().reshape(-1)
        if x.dim() == 3:  # (N, H, W) -> (N, 1, H, W)
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"the {split} taskset returned data {tuple(x.shape)} and labels {tuple(y.shape)}; "
                "expected data (n_way * (k_shot + q_query), C, H, W) and one label per example"
            )
        classes, counts = torch.unique(y, return_counts=True)
        need = self.k_shot + self.q_query
        if len(classes) != self.n_way or bool((counts != need).any()):
            raise DataError(
                f"the {split} taskset returned {len(classes)} labels with "
                f"{counts.tolist()} examples each; this sampler needs n_way={self.n_way} labels "
                f"with k_shot + q_query = {need} examples each: configure the taskset with "
                "NWays(n_way) and KShots(k_shot + q_query)"
            )
        order = torch.cat([torch.nonzero(y == c).flatten() for c in classes])  # class-major, stable
        xs = x[order].reshape(self.n_way, need, *x.shape[1:]).numpy()
        return make_task(xs[:, : self.k_shot], xs[:, self.k_shot :], classes.numpy())

    def sample(self, split: Split, rng: np.random.Generator) -> Task:
        """One task of ``split`` from its taskset (``rng`` is not used; see the module docstring)."""
        split = check_split(split)
        ts = self.tasksets[split]
        if ts is None:
            raise ConfigError(f"no taskset was given for the {split} split; pass {split}=<taskset>")
        task = self._regroup(*ts.sample(), split=split)
        if tuple(task.support_x.shape[1:]) != self.input_shape:
            raise DataError(
                f"the {split} taskset returned examples of shape {tuple(task.support_x.shape[1:])}, "
                f"not input_shape {self.input_shape}; make every split produce the same shape"
            )
        return task


class _LazyItems:
    """``obj[rows]`` with a 2-D int array reads those examples from a dataset."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        flat = [_to_tensor(self.dataset[int(i)][0]).numpy() for i in rows.reshape(-1)]
        return np.stack(flat).reshape(*rows.shape, *flat[0].shape)


def _labels_of(dataset: Any) -> np.ndarray:
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        arr = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets).reshape(-1)
        if len(arr) == len(dataset):
            return arr
    labels = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(
                f"dataset[{i}] is a {type(item).__name__}; DatasetTasks needs (x, y) pairs"
            )
        y = item[1]
        labels.append(int(y.item() if isinstance(y, Tensor) else y))
    return np.asarray(labels)


class DatasetTasks(PoolSampler):
    """N-way K-shot tasks over a dataset of ``(x, y)`` pairs (see the module docstring).

    Args:
        dataset: a ``torch.utils.data.Dataset`` (or sequence) of ``(x, y)``; ``x`` a tensor,
            array or PIL image of one shape, ``y`` an int class label.
        n_way, k_shot, q_query: the episodes' shape.
        split_fractions, split_seed: class split by a seeded permutation of the sorted labels.
        classes: explicit ``{split: [labels]}`` instead.

    ``Task.classes`` are the labels ``y``.

    Raises:
        DataError: an empty dataset, non-pair items, classes with fewer than
            ``k_shot + q_query`` examples, or a split with some but fewer than ``n_way`` classes.
    """

    def __init__(
        self, dataset: Any, n_way: int = 5, k_shot: int = 1, q_query: int = 15,
        split_fractions: Sequence[float] = (0.6, 0.2, 0.2), split_seed: int = 0,
        classes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.n_way, self.k_shot, self.q_query = check_counts(n_way, k_shot, q_query)
        if len(dataset) == 0:
            raise DataError("the dataset is empty; DatasetTasks needs (x, y) pairs of several classes")
        self.dataset = dataset
        labels = _labels_of(dataset)
        self.labels, inverse = np.unique(labels, return_inverse=True)  # sorted label values
        rows = [np.flatnonzero(inverse == i) for i in range(len(self.labels))]
        names = [str(v) for v in self.labels.tolist()]
        explicit = None if classes is None else {s: [str(v) for v in vs] for s, vs in classes.items()}
        self.splits = split_classes(names, split_fractions, split_seed, explicit)
        need = self.k_shot + self.q_query
        small = [(v, len(r)) for v, r in zip(self.labels.tolist(), rows) if len(r) < need]
        if small:
            raise DataError(
                f"{len(small)} class(es) have fewer than k_shot + q_query = {need} examples "
                f"(label, count): {small[:8]}; lower k_shot / q_query or drop those classes"
            )
        self.input_shape = tuple(int(s) for s in _to_tensor(dataset[int(rows[0][0])][0]).shape)
        if len(self.input_shape) != 3:
            raise DataError(f"examples have shape {self.input_shape}; expected (C, H, W) or (H, W)")
        fix = (
            f"lower n_way or name at least {self.n_way} labels in each split of `classes`" if classes is not None
            else f"lower n_way or change split_fractions (now {[float(f) for f in split_fractions]})"
        )
        check_split_sizes(
            {s: len(v) for s, v in self.splits.items()}, self.n_way, f"dataset {type(dataset).__name__}: ", fix
        )
        items, ids = _LazyItems(dataset), self.labels.astype(np.int64)  # Task.classes: the labels
        self.pools = {s: RaggedPool(items, ids[i], [rows[c] for c in i]) for s, i in self.splits.items()}

    def __repr__(self) -> str:
        sizes = {s: len(self.splits[s]) for s in SPLITS}
        return f"DatasetTasks({type(self.dataset).__name__}, {len(self.labels)} classes {sizes})"
