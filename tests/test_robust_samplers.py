"""Samplers that fail early and reproduce: split sizes checked when a sampler is built,
tasks tried by check_sampler and checked by the trainer, stale image caches removed."""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_task, tiny_space
from PIL import Image

from metanas.algorithms import Reptile
from metanas.checkpoint import save_checkpoint
from metanas.errors import ConfigError, DataError, MetaNASError
from metanas.inner import InnerLoopConfig
from metanas.search_space import SearchNetwork, init_alphas
from metanas.tasks import (
    DatasetTasks,
    ImageFolderTasks,
    MiniImageNetTasks,
    OmniglotTasks,
    Task,
    TasksetAdapter,
    check_sampler,
    check_task,
    load_image_folder,
)
from metanas.tasks.core import check_split_sizes, load_cached
from metanas.tasks.synthetic import make_shapes_folder
from metanas.trainer import MetaTrainer, TrainerConfig

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


def _mini_pickles(root: Path, classes: dict[str, int], per_class: int = 2, size: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(classes.items()):
        images = np.random.default_rng(k).integers(0, 256, (n * per_class, size, size, 3), dtype=np.uint8)
        class_dict = {f"n{split}{c}": list(range(c * per_class, (c + 1) * per_class)) for c in range(n)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as fh:
            pickle.dump({"image_data": images, "class_dict": class_dict}, fh)
    return root


def test_miniimagenet_pickle_splits_checked_by_check_sampler(tmp_path):
    root = _mini_pickles(tmp_path, {"train": 4, "val": 2, "test": 3})
    tasks = MiniImageNetTasks(root, n_way=3, k_shot=1, q_query=1, image_size=6)  # pickles: decoded on use
    with pytest.raises(DataError, match=r"MiniImageNetTasks.sample\('val', rng\): miniImageNet val split has "
                                        r"2 classes, fewer than n_way=3; lower n_way"):
        check_sampler(tasks)
    assert check_sampler(tasks, splits=("train", "test")) is tasks


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


# ================================================================ 3: check_sampler draws tasks
def _block(n_way, k, shape, rng, dtype=torch.float32):
    y = torch.arange(n_way).repeat_interleave(k)
    x = torch.from_numpy(rng.normal(size=(n_way * k, *shape))).to(dtype) + y.view(-1, 1, 1, 1)
    return x, y


class Good:
    """A well-behaved custom sampler; the subclasses below break one rule each."""

    n_way, k_shot, q_query, input_shape = 3, 2, 2, (1, 6, 6)

    def sample(self, split, rng):
        (sx, sy), (qx, qy) = _block(3, 2, (1, 6, 6), rng), _block(3, 2, (1, 6, 6), rng)
        return Task(sx, sy, qx, qy, (0, 1, 2))


class ReturnsTuple(Good):
    def sample(self, split, rng):
        t = super().sample(split, rng)
        return t.support_x, t.support_y, t.query_x, t.query_y


class LabelsOutOfRange(Good):
    def sample(self, split, rng):
        t = super().sample(split, rng)
        return Task(t.support_x, t.support_y + 1, t.query_x, t.query_y, t.classes)


class FewerWays(Good):
    n_way = 5  # declares 5-way, returns 3-way


class OtherSize(Good):
    input_shape = (1, 5, 5)  # declares 5x5, returns 6x6


class GlobalRandom(Good):
    def sample(self, split, rng):
        return super().sample(split, np.random.default_rng(np.random.randint(1 << 30)))


class OwnGenerator(Good):
    def __init__(self):
        self.rng = np.random.default_rng(0)

    def sample(self, split, rng):
        return super().sample(split, self.rng)


class Float64(Good):
    def sample(self, split, rng):
        t = super().sample(split, rng)
        return Task(t.support_x.double(), t.support_y, t.query_x.double(), t.query_y, t.classes)


class Int32Labels(Good):
    def sample(self, split, rng):
        t = super().sample(split, rng)
        return Task(t.support_x, t.support_y.int(), t.query_x, t.query_y, t.classes)


class NotClassMajor(Good):
    def sample(self, split, rng):
        t = super().sample(split, rng)
        perm = torch.tensor([2, 0, 1, 3, 4, 5])
        return Task(t.support_x[perm], t.support_y[perm], t.query_x, t.query_y, t.classes)


class NumpyArrays(Good):
    def sample(self, split, rng):
        t = super().sample(split, rng)
        return Task(t.support_x.numpy(), t.support_y, t.query_x, t.query_y, t.classes)


class Crashes(Good):
    def sample(self, split, rng):
        return [][0]


class NoValSplit(Good):
    def sample(self, split, rng):
        if split == "val":
            raise DataError("no val split here; give one")
        return super().sample(split, rng)


@pytest.mark.parametrize(("sampler", "match"), [
    (ReturnsTuple(), r"ReturnsTuple.sample\('train', rng\) returned a tuple, not a metanas.tasks.Task; return Task\("),
    (LabelsOutOfRange(), r"LabelsOutOfRange.sample\('train', rng\) returned support_y with labels 1..3, outside "
                         r"0..2; label the n_way=3 classes"),
    (FewerWays(), r"FewerWays.sample\('train', rng\) returned a 3-way task .* declares n_way=5, k_shot=2, "
                  r"q_query=2, .*; return tasks of the declared shape"),
    (OtherSize(), r"OtherSize.* support_x \(6, 1, 6, 6\) .* input_shape=\(1, 5, 5\), i.e. \(6, 1, 5, 5\)"),
    (GlobalRandom(), r"GlobalRandom.sample\('train', rng\) returned different tasks for two generators seeded "
                     r"alike; take all randomness from the rng argument"),
    (OwnGenerator(), r"OwnGenerator.sample\('train', rng\) returned different tasks"),
    (Float64(), r"Float64.* dtypes float64/float64/int64/int64; examples must be float32 and labels int64"),
    (Int32Labels(), r"Int32Labels.* dtypes float32/float32/int32/int64"),
    (NotClassMajor(), r"NotClassMajor.* support_y starting \[1, 0, 0, 1, 2\], not class-major; order each set "
                      r"by label"),
    (NumpyArrays(), r"NumpyArrays.* whose support_x is ndarray; make them torch tensors"),
    (Crashes(), r"Crashes.sample\('train', rng\) raised IndexError: list index out of range "
                r"\(at test_robust_samplers.py:\d+\); fix the sampler"),
    (NoValSplit(), r"^NoValSplit.sample\('val', rng\): no val split here; give one$"),
], ids=lambda v: type(v).__name__ if not isinstance(v, str) else "")
def test_check_sampler_draws_and_names_the_problem(sampler, match):
    with pytest.raises(MetaNASError) as info:
        check_sampler(sampler)
    assert "\n" not in str(info.value)
    assert info.match(match)


def test_check_sampler_accepts_and_draws_only_the_splits_asked_for():
    assert check_sampler(Good()) is not None
    assert check_sampler(NoValSplit(), splits=("train", "test")) is not None
    assert check_sampler(Crashes(), splits=()) is not None  # members only
    assert check_sampler(Float64(), float_dtype=torch.float64) is not None
    with pytest.raises(ConfigError, match="split='tset' is not a task split"):
        check_sampler(Good(), splits=("tset",))

    class Counting(Good):
        def __init__(self):
            self.calls = []

        def sample(self, split, rng):
            self.calls.append(split)
            return super().sample(split, rng)

    s = Counting()
    check_sampler(s, splits=("test",))
    assert s.calls == ["test", "test"]  # cheap: one task, drawn twice


def test_taskset_adapter_is_not_drawn_from():
    class Taskset:
        def __init__(self):
            self.calls = 0

        def sample(self):
            self.calls += 1
            return torch.zeros(4, 1, 3, 3), torch.tensor([0, 0, 1, 1])

    train = Taskset()
    adapter = TasksetAdapter(train, n_way=2, k_shot=1, q_query=1, input_shape=(1, 3, 3))
    check_sampler(adapter)  # no val / test taskset: drawing would fail
    assert train.calls == 0


def test_check_task_is_the_cheap_check():
    good = Good()
    task = good.sample("train", np.random.default_rng(0))
    assert check_task(task, good, "train") is task
    with pytest.raises(ConfigError, match=r"LabelsOutOfRange.sample\('val', rng\) returned support_y with labels"):
        check_task(LabelsOutOfRange().sample("val", np.random.default_rng(0)), LabelsOutOfRange(), "val")
    # order and reproducibility are check_sampler's: not checked per task
    not_major = NotClassMajor()
    check_task(not_major.sample("train", np.random.default_rng(0)), not_major, "train")


# ---------------------------------------------------------------- the trainer
INNER = InnerLoopConfig(steps=1, lr_weights=0.1, lr_alphas=0.1)


def _trainer(tmp_path, sampler, **cfg):
    space = tiny_space()
    torch.manual_seed(0)
    opt = functools.partial(torch.optim.SGD, lr=0.5)
    settings = dict(meta_steps=1, meta_batch_size=2, val_every=1, n_val_tasks=1, ckpt_every=0,
                    n_test_tasks=1, task_workers=1, progress=False)
    settings.update(cfg)
    return MetaTrainer(
        net=SearchNetwork(space), alphas=init_alphas(space, generator=torch.Generator().manual_seed(0)),
        sampler=sampler, algorithm=Reptile(), inner=INNER, weights_optimizer=opt, alphas_optimizer=opt,
        search_space=space, cfg=TrainerConfig(**settings), run_dir=tmp_path, seed=3,
    )


class Conftest3Way:
    """The conftest's 3-way 2-shot 8x8 tasks (the tiny supernet's size), seeded by the rng."""

    n_way, k_shot, q_query, input_shape = 3, 2, 2, (1, 8, 8)

    def __init__(self):
        self.calls = []

    def sample(self, split, rng):
        self.calls.append(split)
        return make_task(int(rng.integers(1 << 30)), dtype=torch.float32)


def test_trainer_tries_the_splits_it_uses_and_leaves_its_rng_alone(tmp_path):
    sampler = Conftest3Way()
    trainer = _trainer(tmp_path, sampler)
    assert sampler.calls == ["train"] * 2 + ["val"] * 2 + ["test"] * 2
    fresh = np.random.default_rng(3)
    assert trainer.rng.bit_generator.state == fresh.bit_generator.state
    sampler.calls.clear()
    _trainer(tmp_path, sampler, val_every=0)
    assert sampler.calls == ["train"] * 2 + ["test"] * 2  # no validation: val is not needed
    with pytest.raises(DataError, match=r"^NoValSplit.sample\('val', rng\): no val split here"):
        _trainer(tmp_path, NoValSplit())
    with pytest.raises(ConfigError, match=r"FewerWays.sample\('train', rng\) returned a 3-way task"):
        _trainer(tmp_path, FewerWays())


def test_trainer_wants_tasks_of_the_networks_dtype(tmp_path):
    space = tiny_space()
    opt = functools.partial(torch.optim.SGD, lr=0.5)

    def build(net, sampler):
        return MetaTrainer(
            net=net, alphas=init_alphas(space), sampler=sampler, algorithm=Reptile(), inner=INNER,
            weights_optimizer=opt, alphas_optimizer=opt, search_space=space, run_dir=tmp_path,
            cfg=TrainerConfig(meta_steps=1, meta_batch_size=1, task_workers=1, progress=False),
        )

    class Float64Tasks(Conftest3Way):
        def sample(self, split, rng):
            return make_task(int(rng.integers(1 << 30)), dtype=torch.float64)

    build(SearchNetwork(space).double(), Float64Tasks())
    with pytest.raises(ConfigError, match="dtypes float32/float32/int64/int64; examples must be float64"):
        build(SearchNetwork(space).double(), Conftest3Way())
    with pytest.raises(ConfigError, match="dtypes float64/float64/int64/int64; examples must be float32"):
        build(SearchNetwork(space), Float64Tasks())


def test_build_trainer_tries_val_only_when_it_validates(tmp_path):
    from hydra import compose, initialize_config_module

    from metanas.cli import build_trainer

    folder = _tiny_folder(tmp_path / "f", 4, n_images=2)
    args = ["experiment=smoke", "task=image_folder", f"task.root={folder}", "task.n_way=2", "task.q_query=1",
            "task.image_size=8", f"task.cache_dir={tmp_path / 'c'}", "task.split_fractions=[0.5,0,0.5]",
            "device=cpu"]
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        without_val = compose("train", overrides=[*args, "trainer.val_every=0"])
        with_val = compose("train", overrides=args)
    build_trainer(without_val, tmp_path / "a").close()
    with pytest.raises(DataError, match=r"ImageFolderTasks.sample\('val', rng\): image folder .* split 'val' has 0"):
        build_trainer(with_val, tmp_path / "b")


class GoesBad(Conftest3Way):
    """Well-formed when tried, then a task with a label out of range."""

    def sample(self, split, rng):
        task = super().sample(split, rng)
        if len(self.calls) > 6:
            return Task(task.support_x, task.support_y, task.query_x, task.query_y * 3, task.classes)
        return task


def test_trainer_checks_every_task_it_draws(tmp_path):
    trainer = _trainer(tmp_path, GoesBad())
    with pytest.raises(ConfigError, match=r"GoesBad.sample\('train', rng\) returned query_y with labels 0..6, "
                                          r"outside 0..2"):
        trainer.meta_step()
    assert trainer.step == 0


class _Stop(Exception):
    pass


def test_trainer_draws_the_same_tasks_as_before(tmp_path, monkeypatch):
    """The per-task check draws nothing: a meta-step takes exactly meta_batch_size tasks from
    the trainer's rng, the same ones as the sampler alone gives."""
    sampler = Conftest3Way()
    trainer = _trainer(tmp_path, sampler, meta_batch_size=3)
    seen = []

    def stop(net, weights, alphas, tasks, *args, **kwargs):
        seen.extend(tasks)
        raise _Stop

    monkeypatch.setattr(trainer.algorithm, "meta_gradients", stop)
    with pytest.raises(_Stop):
        trainer.meta_step()
    rng = np.random.default_rng(3)
    expected = [sampler.sample("train", rng) for _ in range(3)]
    assert trainer.rng.bit_generator.state == rng.bit_generator.state
    assert all(torch.equal(a.support_x, b.support_x) and a.classes == b.classes for a, b in zip(seen, expected))


# ---------------------------------------------------------------- through the CLIs
BAD_SAMPLERS = textwrap.dedent('''
    import numpy as np, torch
    from metanas.tasks import Task

    class Good:
        def __init__(self, n_way=3, k_shot=1, q_query=2, size=16, declared_size=None):
            self.n_way, self.k_shot, self.q_query, self.size = n_way, k_shot, q_query, size
            self.input_shape = (1, declared_size or size, declared_size or size)

        def block(self, k, rng, n=3):
            y = torch.arange(n).repeat_interleave(k)
            x = torch.from_numpy(rng.normal(size=(n * k, 1, self.size, self.size))).float() + y.view(-1, 1, 1, 1)
            return x, y

        def sample(self, split, rng):
            (sx, sy), (qx, qy) = self.block(self.k_shot, rng), self.block(self.q_query, rng)
            return Task(sx, sy, qx, qy, (0, 1, 2))

    class Tuple(Good):
        def sample(self, split, rng):
            t = super().sample(split, rng)
            return t.support_x, t.support_y, t.query_x, t.query_y

    class OutOfRange(Good):
        def sample(self, split, rng):
            t = super().sample(split, rng)
            return Task(t.support_x, t.support_y, t.query_x, t.query_y + 3, t.classes)

    class GlobalRandom(Good):
        def sample(self, split, rng):
            return super().sample(split, np.random.default_rng(np.random.randint(1 << 30)))
''')


@pytest.fixture
def bad_samplers(tmp_path):
    """The environment that puts BAD_SAMPLERS on the path, as a user's module would be."""
    (tmp_path / "bad_samplers.py").write_text(BAD_SAMPLERS)
    return {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.mark.parametrize(("target", "extra", "match"), [
    ("Tuple", [], "Tuple.sample('train', rng) returned a tuple, not a metanas.tasks.Task"),
    ("GlobalRandom", [], "GlobalRandom.sample('train', rng) returned different tasks"),
], ids=["tuple", "global_random"])
def test_train_cli_refuses_a_bad_sampler_before_training(tmp_path, bad_samplers, target, extra, match):
    conf = tmp_path / "my_conf" / "task"
    conf.mkdir(parents=True)
    (conf / "bad.yaml").write_text(f"_target_: bad_samplers.{target}\n")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "metanas.cli", "experiment=smoke", "task=bad", *extra,
         f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=bad_samplers, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert line.startswith("metanas-train: error: ") and match in line, line
    assert "Traceback" not in proc.stderr
    assert {p.name for p in run.iterdir()} <= FAILED_RUN_FILES
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


@pytest.fixture
def ckpt(tmp_path):
    """A 3-way, 1-channel checkpoint for 16x16 images (as tests/test_adapt_cli.py's)."""
    space = tiny_space(n_classes=3)
    torch.manual_seed(0)
    net = SearchNetwork(space)
    path = tmp_path / "best.ckpt"
    save_checkpoint(path, {
        "step": 1, "search_space": space.to_dict(),
        "weights": {k: v.detach() for k, v in net.named_parameters()},
        "alphas": init_alphas(space, generator=torch.Generator().manual_seed(1)),
        "config": {"task": {"image_size": 16},
                   "inner": {"_target_": "metanas.inner.InnerLoopConfig", "steps": 1, "lr_weights": 0.1,
                             "lr_alphas": 0.1}},
    })
    return path


def test_adapt_cli_refuses_a_bad_sampler(tmp_path, bad_samplers, ckpt):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "metanas.adapt_cli", f"checkpoint={ckpt}", "+task._target_=bad_samplers.OutOfRange",
         "split=val", "n_tasks=1", f"out={out}"],
        cwd=tmp_path, env=bad_samplers, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert line.startswith("metanas-adapt: error: OutOfRange.sample('val', rng) returned query_y with labels "
                           "3..5, outside 0..2"), line
    assert "Traceback" not in proc.stderr
    assert {p.name for p in out.iterdir()} <= {"adapt_cli.log"}  # Hydra's log only


def test_adapt_data_folder_is_tried_on_its_test_split_only(tmp_path, ckpt):
    from hydra import compose, initialize_config_module

    from metanas.adapt_cli import adapt_command

    folder = tmp_path / "three"
    make_shapes_folder(folder, n_classes=3, n_images=3, seed=1, sizes=(16,), mixed_formats=False)
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        cfg = compose("adapt", overrides=[f"checkpoint={ckpt}", f"data={folder}", "n_tasks=1", "q_query=2",
                                          "finetune_steps=0", "export=false"])
    metrics = adapt_command(cfg, tmp_path / "out")  # train and val are empty: not tried
    assert metrics["n_tasks"] == 1


# ================================================================ 10: stale caches
def _caches(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("images-*.npz"))


def test_writing_a_cache_removes_the_older_ones_of_the_same_folder(tmp_path, caplog):
    root, other = _tiny_folder(tmp_path / "d", 2), _tiny_folder(tmp_path / "other", 2)
    shared = tmp_path / "cache"
    names = []
    for folder, size in ((other, 8), (root, 8), (root, 6)):  # another dataset; other settings
        load_image_folder(folder, size, 1, cache_dir=shared)
        (new,) = set(_caches(shared)) - set(names)
        names.append(new)
    of_other, stale, other_size = names
    f = next((root / "circle_filled").iterdir())
    Image.new("L", (8, 8), 255).save(f)
    os.utime(f, ns=(1, 1))
    with caplog.at_level(logging.INFO, logger="metanas.tasks.core"):
        changed = load_image_folder(root, 8, 1, cache_dir=shared)
    after = _caches(shared)
    assert len(after) == 3 and stale not in after and {of_other, other_size} <= set(after)
    assert any(f"removed the stale cache {shared / stale}" in r.getMessage() for r in caplog.records)
    again = load_image_folder(root, 8, 1, cache_dir=shared)  # the new cache is used as it is
    assert np.array_equal(again.images, changed.images) and _caches(shared) == after


def test_caches_of_an_older_version_are_listed_not_removed(tmp_path, caplog):
    folder = tmp_path / "cache"
    folder.mkdir()
    legacy = folder / "images-0123456789abcdef0123.npz"  # <prefix>-<hash>.npz: dataset unknown
    legacy.write_bytes(b"x" * 1000)
    layout = {"a": (np.dtype(np.int64), (3,))}
    with caplog.at_level(logging.INFO, logger="metanas.tasks.core"):
        load_cached(folder, "images", ["k", 1], layout, lambda: {"a": np.arange(3)}, scope=["s"])
    assert legacy.is_file()
    assert any(f"no longer used; remove them with: rm {legacy}" in r.getMessage() for r in caplog.records)
    # without a scope nothing is removed or listed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="metanas.tasks.core"):
        load_cached(folder, "images", ["k", 2], layout, lambda: {"a": np.arange(3)})
    assert not caplog.records and len(list(folder.glob("*.npz"))) == 3


def test_miniimagenet_csv_cache_keeps_one_per_split(tmp_path):
    root = _mini_csv(tmp_path / "m", {"train": 2, "val": 2, "test": 2}, per_class=2)
    (root / "images").mkdir()
    for split in ("train", "val", "test"):
        for c in range(2):
            for i in range(2):
                Image.new("RGB", (5, 5), (c * 100, i * 50, 0)).save(root / "images" / f"{split}{c}_{i}.jpg")
    tasks = MiniImageNetTasks(root, n_way=2, k_shot=1, q_query=1, image_size=4)
    check_sampler(tasks)
    cache = root / ".metanas_cache"
    first = sorted(p.name for p in cache.glob("*.npz"))
    assert [n.split("-")[0] for n in first] == ["test", "train", "val"]
    img = root / "images" / "val0_0.jpg"
    Image.new("RGB", (5, 5), (255, 255, 255)).save(img)
    os.utime(img, ns=(1, 1))
    MiniImageNetTasks(root, n_way=2, k_shot=1, q_query=1, image_size=4).sample("val", np.random.default_rng(0))
    now = sorted(p.name for p in cache.glob("*.npz"))
    assert len(now) == 3 and [n for n in first if n.startswith("train") or n.startswith("test")] == \
        [n for n in now if n.startswith("train") or n.startswith("test")]
    assert [n for n in now if n.startswith("val")] != [n for n in first if n.startswith("val")]
