"""Samplers that fail early: split sizes checked when a sampler is built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metanas.errors import ConfigError, DataError
from metanas.tasks import DatasetTasks, ImageFolderTasks, MiniImageNetTasks, OmniglotTasks
from metanas.tasks.core import check_split_sizes
from metanas.tasks.synthetic import make_shapes_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
#: what a failed metanas-train run may leave in its run directory (Hydra's, and status.json)
FAILED_RUN_FILES = {".hydra", "cli.log", "status.json"}


def _tiny_folder(root: Path, n_classes: int, n_images: int = 2) -> Path:
    make_shapes_folder(root, n_classes=n_classes, n_images=n_images, seed=0, sizes=(8,), mixed_formats=False)
    return root


def _one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("metanas-")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


# ================================================================ 2: split sizes at construction
@pytest.fixture(scope="module")
def ten(tmp_path_factory):
    """A 10-class image folder of 2 images per class (default fractions: 6 / 2 / 2 classes)."""
    return _tiny_folder(tmp_path_factory.mktemp("ten"), 10)


def test_split_sizes_rule():
    check_split_sizes({"train": 5, "val": 0, "test": 5}, 5)  # an empty split is allowed
    with pytest.raises(DataError, match=r"^x: split 'val' has 2 of the 12 classes, fewer than n_way=5 .*; do this$"):
        check_split_sizes({"train": 5, "val": 2, "test": 5}, 5, "x: ", "do this")
    with pytest.raises(DataError, match="no split has n_way=5 classes"):
        check_split_sizes({"train": 4, "val": 0, "test": 0}, 5)


def test_image_folder_split_too_small_fails_when_built(ten, tmp_path):
    with pytest.raises(DataError) as info:
        ImageFolderTasks(ten, n_way=5, k_shot=1, q_query=1, image_size=8, cache_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "split 'val' has 2 of the 10 classes, fewer than n_way=5" in msg
    assert "lower n_way" in msg and "split_fractions (now [0.6, 0.2, 0.2]" in msg
    # by names: the fix names `classes`
    names = sorted(p.name for p in ten.iterdir() if p.is_dir() and not p.name.startswith("."))
    with pytest.raises(DataError, match=r"split 'test' has 1 of the 4 classes.*each split of `classes`"):
        ImageFolderTasks(ten, n_way=3, k_shot=1, q_query=1, image_size=8, cache_dir=tmp_path,
                         classes={"train": names[:3], "test": names[3:4]})
    # enough classes in every split, or none in a split: built
    ImageFolderTasks(ten, n_way=2, k_shot=1, q_query=1, image_size=8, cache_dir=tmp_path)
    ImageFolderTasks(ten, n_way=5, k_shot=1, q_query=1, image_size=8, cache_dir=tmp_path,
                     split_fractions=[0, 0, 1])


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n_classes: int, per_class: int = 3):
        self.targets = torch.arange(n_classes).repeat_interleave(per_class)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((4, 4), float(i)), int(self.targets[i])


def test_dataset_tasks_split_too_small_fails_when_built():
    with pytest.raises(DataError, match=r"dataset _Pairs: split 'val' has 2 of the 10 classes, fewer than "
                                        r"n_way=3 .*change split_fractions"):
        DatasetTasks(_Pairs(10), n_way=3, k_shot=1, q_query=1)
    DatasetTasks(_Pairs(10), n_way=2, k_shot=1, q_query=1)


def _mini_csv(root: Path, classes: dict[str, int], per_class: int = 2) -> Path:
    """The CSV files only (construction reads no image)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in classes.items():
        rows = ["filename,label"] + [f"{split}{c}_{i}.jpg,n{split}{c}" for c in range(n) for i in range(per_class)]
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_miniimagenet_csv_splits_checked_when_built(tmp_path):
    root = _mini_csv(tmp_path / "m", {"train": 4, "val": 2, "test": 3})
    with pytest.raises(DataError, match=r"miniImageNet in .*: split 'val' has 2 of the 9 classes, fewer than n_way=3"):
        MiniImageNetTasks(root, n_way=3, k_shot=1, q_query=1)
    with pytest.raises(DataError, match=r"train split: class\(es\) \[\('ntrain0', 2\)"):
        MiniImageNetTasks(root, n_way=2, k_shot=1, q_query=2)
    MiniImageNetTasks(root, n_way=2, k_shot=1, q_query=1)


def test_omniglot_splits_checked_when_built():
    with pytest.raises(ConfigError, match=r"n_way=5 but the 'val' split has only 3 classes; lower task.n_way "
                                          r"or raise task.n_val_classes"):
        OmniglotTasks(n_way=5, n_val_classes=3)


def test_train_cli_refuses_a_folder_too_small_before_training(ten, tmp_path):
    """The issue's case: validation off, so on main the meta-test failed after training."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "metanas.cli", "experiment=smoke", "task=image_folder", f"task.root={ten}",
         "task.q_query=1", "task.image_size=8", f"task.cache_dir={tmp_path / 'cache'}",
         "trainer.val_every=0", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert line.startswith("metanas-train: error: image folder") and "split 'val' has 2 of the 10 classes" in line
    assert "Traceback" not in proc.stderr
    assert {p.name for p in run.iterdir()} <= FAILED_RUN_FILES
