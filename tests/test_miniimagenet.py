"""miniImageNet in both community formats (small local files), its download and safety checks."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from metanas.tasks import MiniImageNetTasks, check_sampler, miniimagenet
from metanas.tasks.miniimagenet import (
    download,
    download_miniimagenet,
    main,
    safe_load_pickle,
)
from PIL import Image

from metanas.errors import DataError

SIZE = 10
CLASSES = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _write_pickles(root, names=("train", "val", "test")) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, name in zip(("train", "val", "test"), names):
        labels = CLASSES[split]
        images = _images(4 * len(labels), hash(split) % 1000)
        class_dict = {lab: list(range(4 * i, 4 * i + 4)) for i, lab in enumerate(labels)}
        with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as fh:
            pickle.dump({"image_data": images, "class_dict": class_dict}, fh)
        arrays[split] = images
    return arrays


def _write_csv(root) -> None:
    (root / "images").mkdir(parents=True)
    for split, labels in CLASSES.items():
        rows = ["filename,label"]
        for c, lab in enumerate(labels):
            for i in range(4):
                name = f"{lab}{i:08d}.jpg"
                Image.fromarray(_images(1, c * 10 + i)[0]).resize((17, 13)).save(root / "images" / name)
                rows.append(f"{name},{lab}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


def test_pickle_format(tmp_path):
    arrays = _write_pickles(tmp_path)
    tasks = MiniImageNetTasks(tmp_path, n_way=2, k_shot=1, q_query=3, image_size=SIZE)
    check_sampler(tasks)
    assert tasks.format == "pickle" and tasks.input_shape == (3, SIZE, SIZE)
    task = tasks.sample("train", np.random.default_rng(0))
    assert task.support_x.shape == (2, 3, SIZE, SIZE) and task.query_x.shape == (6, 3, SIZE, SIZE)
    # every example is an image of its class, scaled to [0, 1], channels first
    expected = torch.from_numpy(arrays["train"].transpose(0, 3, 1, 2).astype(np.float32) / 255)
    for x, y in zip(task.support_x, task.support_y):
        c = task.classes[int(y)]
        assert any(torch.allclose(x, expected[r]) for r in range(4 * c, 4 * c + 4))
    assert tasks.class_names("test") == CLASSES["test"]
    small = MiniImageNetTasks(tmp_path, n_way=2, k_shot=1, q_query=1, image_size=6, channels=1)
    assert small.sample("val", np.random.default_rng(0)).support_x.shape == (2, 1, 6, 6)


def test_csv_format_and_cache(tmp_path):
    _write_csv(tmp_path)
    tasks = MiniImageNetTasks(tmp_path, n_way=2, k_shot=2, q_query=2, image_size=SIZE)
    assert tasks.format == "csv"
    a = tasks.sample("val", np.random.default_rng(1))
    assert a.support_x.shape == (4, 3, SIZE, SIZE)
    assert list((tmp_path / ".metanas_cache").glob("val-*.npz"))
    again = MiniImageNetTasks(tmp_path, n_way=2, k_shot=2, q_query=2, image_size=SIZE)
    assert torch.equal(again.sample("val", np.random.default_rng(1)).support_x, a.support_x)


@pytest.mark.parametrize("damage", [
    lambda f: f.write_bytes(f.read_bytes()[:200]),
    lambda f: np.savez(f, images=np.zeros((8, 3, SIZE, SIZE - 1), np.uint8)),
    lambda f: np.savez(f, images=np.zeros((8, 3, SIZE, SIZE), np.int16)),
], ids=["truncated", "shape", "dtype"])
def test_damaged_csv_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    _write_csv(tmp_path)
    a = MiniImageNetTasks(tmp_path, n_way=2, k_shot=2, q_query=2, image_size=SIZE).sample("val", np.random.default_rng(1))
    (cache,) = (tmp_path / ".metanas_cache").glob("val-*.npz")
    damage(cache)
    calls = []
    real = miniimagenet.load_images
    monkeypatch.setattr(miniimagenet, "load_images", lambda *a: calls.append(1) or real(*a))
    tasks = MiniImageNetTasks(tmp_path, n_way=2, k_shot=2, q_query=2, image_size=SIZE)
    b = tasks.sample("val", np.random.default_rng(1))
    assert calls == [1] and torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    with np.load(cache) as z:  # rewritten whole
        assert z["images"].shape == (8, 3, SIZE, SIZE) and z["images"].dtype == np.uint8


def test_absent_or_incomplete_data_says_how_to_download(tmp_path):
    with pytest.raises(DataError, match=r"python -m metanas\.tasks\.miniimagenet --root"):
        MiniImageNetTasks(tmp_path / "missing")
    with pytest.raises(DataError, match="no mini-imagenet-cache-train.pkl, no train.csv"):
        MiniImageNetTasks(tmp_path)
    _write_pickles(tmp_path)
    os.remove(tmp_path / "mini-imagenet-cache-test.pkl")
    with pytest.raises(DataError, match="lacks its test split"):
        MiniImageNetTasks(tmp_path)


def test_csv_problems_are_named(tmp_path):
    _write_csv(tmp_path)
    os.remove(next((tmp_path / "images").glob("n06*.jpg")))
    tasks = MiniImageNetTasks(tmp_path, n_way=2, k_shot=1, q_query=1, image_size=SIZE)
    with pytest.raises(DataError, match="missing from"):
        tasks.sample("test", np.random.default_rng(0))
    (tmp_path / "val.csv").write_text("file,class\nx.jpg,n04\n")
    with pytest.raises(DataError, match="header 'filename,label'"):
        tasks.sample("val", np.random.default_rng(0))
    with pytest.raises(DataError, match="fewer than k_shot"):
        MiniImageNetTasks(tmp_path, n_way=2, k_shot=2, q_query=3, image_size=SIZE).sample(
            "train", np.random.default_rng(0))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": _Evil(), "class_dict": {}}))
    with pytest.raises(DataError, match="refusing to load"):
        safe_load_pickle(path)
    path.write_bytes(pickle.dumps({"image_data": _images(2, 0)})[:40])
    with pytest.raises(DataError, match="download it again"):
        safe_load_pickle(path)


def test_download_from_file_url(tmp_path):
    src = tmp_path / "src"
    _write_pickles(src, names=("train", "validation", "test"))
    urls = {s: (src / f"mini-imagenet-cache-{n}.pkl").as_uri()
            for s, n in (("train", "train"), ("val", "validation"), ("test", "test"))}
    digest = hashlib.sha256((src / "mini-imagenet-cache-train.pkl").read_bytes()).hexdigest()
    dest = tmp_path / "data"
    with pytest.raises(DataError, match="sha256"):
        download(urls["train"], dest / "x.pkl", sha256="0" * 64)
    assert not dest.exists() or not list(dest.iterdir())  # nothing partial left behind
    with pytest.raises(DataError, match="cannot download"):
        download((tmp_path / "absent.pkl").as_uri(), dest / "x.pkl")
    paths = download_miniimagenet(dest, urls, sha256={"train": digest})
    assert sorted(p.name for p in paths.values()) == [
        "mini-imagenet-cache-test.pkl", "mini-imagenet-cache-train.pkl", "mini-imagenet-cache-val.pkl"]
    tasks = MiniImageNetTasks(dest, n_way=2, k_shot=1, q_query=1, image_size=SIZE)
    assert tasks.sample("val", np.random.default_rng(0)).n_way == 2
    # the command line (what users run) skips files that are present
    assert main(["--root", str(dest)]) == 0


def test_config_group_composes(tmp_path, monkeypatch):
    _write_pickles(tmp_path / "miniimagenet")
    monkeypatch.setenv("METANAS_DATA", str(tmp_path))
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        cfg = compose("train", overrides=["task=miniimagenet", f"task.image_size={SIZE}", "task.q_query=3"])
    tasks = instantiate(cfg.task, _convert_="all")
    assert isinstance(tasks, MiniImageNetTasks) and tasks.root == tmp_path / "miniimagenet"
    monkeypatch.setenv("METANAS_DATA", str(tmp_path / "nowhere"))
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        cfg = compose("train", overrides=["task=miniimagenet"])
    with pytest.raises(Exception, match="download"):
        instantiate(cfg.task, _convert_="all")
