"""Adapters: learn2learn-style tasksets and (x, y) datasets as TaskSamplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metanas.tasks import DatasetTasks, TasksetAdapter, check_sampler

from metanas.errors import ConfigError, DataError


class FakeTaskset:
    """learn2learn-like: sample() -> (data, labels), examples shuffled, labels arbitrary ints.

    Example values encode (label, index): x = 100 * label + index, so regrouping is checkable.
    """

    def __init__(self, n_way=3, per_class=4, seed=0, size=5, labels=(7, 2, 9)):
        self.n_way, self.per_class, self.size, self.labels = n_way, per_class, size, labels
        self.rng = np.random.default_rng(seed)

    def sample(self):
        ys = np.repeat(np.array(self.labels[: self.n_way]), self.per_class)
        idx = np.tile(np.arange(self.per_class), self.n_way)
        perm = self.rng.permutation(len(ys))
        ys, idx = ys[perm], idx[perm]
        x = torch.tensor(100.0 * ys + idx).view(-1, 1, 1, 1).expand(-1, 1, self.size, self.size)
        return x.clone(), torch.tensor(ys)


def test_taskset_adapter_regroups_class_major():
    adapter = TasksetAdapter(FakeTaskset(), n_way=3, k_shot=1, q_query=3, test=FakeTaskset(seed=1))
    check_sampler(adapter)
    assert adapter.input_shape == (1, 5, 5)
    task = adapter.sample("train", np.random.default_rng(0))
    assert task.classes == (2, 7, 9)  # sorted original labels; label i <-> classes[i]
    assert task.support_y.tolist() == [0, 1, 2] and task.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for x, y in [*zip(task.support_x, task.support_y), *zip(task.query_x, task.query_y)]:
        assert int(x[0, 0, 0]) // 100 == task.classes[int(y)]
    # all four examples of each class used once
    values = torch.cat([task.support_x, task.query_x])[:, 0, 0, 0].long().tolist()
    assert sorted(values) == sorted(100 * c + i for c in (2, 7, 9) for i in range(4))
    assert adapter.sample("test", np.random.default_rng(0)).n_way == 3


def test_taskset_adapter_errors():
    adapter = TasksetAdapter(FakeTaskset(), n_way=3, k_shot=1, q_query=3)
    with pytest.raises(ConfigError, match="no taskset was given for the val split"):
        adapter.sample("val", np.random.default_rng(0))
    with pytest.raises(DataError, match="KShots"):
        TasksetAdapter(FakeTaskset(), n_way=3, k_shot=2, q_query=3)
    with pytest.raises(DataError, match="n_way=2"):
        TasksetAdapter(FakeTaskset(), n_way=2, k_shot=1, q_query=3)
    with pytest.raises(ConfigError, match="no sample"):
        TasksetAdapter(object(), n_way=3, k_shot=1, q_query=3, input_shape=(1, 5, 5))
    wrong = TasksetAdapter(FakeTaskset(), n_way=3, k_shot=1, q_query=3, test=FakeTaskset(size=6))
    with pytest.raises(DataError, match="not input_shape"):
        wrong.sample("test", np.random.default_rng(0))


class PairDataset(torch.utils.data.Dataset):
    """(x, y) pairs; x encodes its own index. With ``targets`` or without (slow path)."""

    def __init__(self, labels, with_targets=True):
        self._labels = list(labels)
        if with_targets:
            self.targets = torch.tensor(self._labels)

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        return torch.full((4, 4), float(i)), self._labels[i]


def test_dataset_tasks_fast_and_slow_label_paths_agree():
    labels = [c for c in range(10, 25) for _ in range(5)]  # 15 classes: 9/3/3, each split 3-way
    fast = DatasetTasks(PairDataset(labels), n_way=3, k_shot=2, q_query=2, split_fractions=(0.6, 0.2, 0.2))
    slow = DatasetTasks(PairDataset(labels, with_targets=False), n_way=3, k_shot=2, q_query=2,
                        split_fractions=(0.6, 0.2, 0.2))
    check_sampler(fast)
    assert fast.input_shape == (1, 4, 4)
    a = fast.sample("train", np.random.default_rng(3))
    b = slow.sample("train", np.random.default_rng(3))
    assert torch.equal(a.support_x, b.support_x) and a.classes == b.classes
    # examples belong to their label's class, none repeated
    for x, y in [*zip(a.support_x, a.support_y), *zip(a.query_x, a.query_y)]:
        assert labels[int(x[0, 0, 0])] == a.classes[int(y)]
    ids = torch.cat([a.support_x, a.query_x])[:, 0, 0, 0].tolist()
    assert len(set(ids)) == len(ids)
    assert set(a.classes) <= {10 + c for c in fast.splits["train"].tolist()}


def test_dataset_tasks_explicit_classes_and_errors():
    labels = [c for c in range(4) for _ in range(3)] + [9]
    with pytest.raises(DataError, match=r"\(9, 1\)"):
        DatasetTasks(PairDataset(labels), n_way=2, k_shot=1, q_query=2)
    ok = DatasetTasks(PairDataset(labels[:-1]), n_way=2, k_shot=1, q_query=2,
                      classes={"train": [0, 1], "test": [2, 3]})
    assert set(ok.sample("test", np.random.default_rng(0)).classes) == {2, 3}
    with pytest.raises(DataError, match="split 'val' has 0 classes"):
        ok.sample("val", np.random.default_rng(0))
    with pytest.raises(DataError, match="empty"):
        DatasetTasks(PairDataset([]))
