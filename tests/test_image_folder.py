"""Image-folder tasks: loading any image mode, caching, class splits, bad input, sampling."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from metanas.tasks import (
    ImageFolderTasks,
    check_sampler,
    image_folder,
    load_image_folder,
    sample_task_ragged,
)
from metanas.tasks.image_folder import load_image, pixel_normalisation, split_classes
from metanas.tasks.synthetic import make_shapes_folder, shape_class_names
from PIL import Image

from metanas.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_folder(root, n_classes=8, n_images=6, seed=3)
    return root


def test_shapes_generator_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert make_shapes_folder(a, n_classes=3, n_images=2, seed=1) == shape_class_names(3)
    make_shapes_folder(b, n_classes=3, n_images=2, seed=1)
    for f in sorted(a.rglob("*.*")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()


def test_loads_mixed_sizes_and_modes(shapes, tmp_path):
    data = load_image_folder(shapes, image_size=20, channels=1, cache_dir=tmp_path)
    assert data.images.shape == (48, 1, 20, 20) and data.images.dtype == np.uint8
    assert data.class_names == tuple(sorted(shape_class_names(8)))
    assert np.bincount(data.labels).tolist() == [6] * 8
    rgb = load_image_folder(shapes, image_size=12, channels=3, cache_dir=tmp_path)
    assert rgb.images.shape == (48, 3, 12, 12)
    # grey images converted to RGB have three equal channels
    assert np.array_equal(rgb.images[:, 0], rgb.images[:, 1])


def test_every_pillow_mode_is_converted(tmp_path):
    """16-bit, palette with transparency, LA, RGBA, CMYK, float and 1-bit images all load."""
    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray((ramp * 255).astype(np.uint8)).convert("P").save(tmp_path / "p.png", transparency=0)
    Image.fromarray((ramp * 255).astype(np.uint8)).convert("LA").save(tmp_path / "la.png")
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f.tiff")
    Image.new("1", (8, 8), 1).save(tmp_path / "bw.png")
    for name in ("i16.png", "p.png", "la.png", "rgba.png", "cmyk.jpg", "f.tiff", "bw.png"):
        for channels in (1, 3):
            arr = load_image(tmp_path / name, 8, channels)
            assert arr.shape == (channels, 8, 8) and arr.dtype == np.uint8, name
    # 16-bit: rescaled to 8 bits, not clipped
    assert load_image(tmp_path / "i16.png", 8, 1)[0, -1, -1] == 255
    assert load_image(tmp_path / "i16.png", 8, 1)[0, 4, 4] == round(ramp[4, 4] * 255)
    # fully transparent white: composited onto black
    assert load_image(tmp_path / "rgba.png", 8, 1).max() == 0


def test_cache_is_used_and_invalidated(shapes, tmp_path, monkeypatch):
    root = tmp_path / "copy"
    make_shapes_folder(root, n_classes=2, n_images=3, seed=0, mixed_formats=False)
    first = load_image_folder(root, 16, 1)
    assert list((root / ".metanas_cache").glob("images-*.npz"))
    calls = []
    real = image_folder.load_images
    monkeypatch.setattr(image_folder, "load_images", lambda *a: calls.append(1) or real(*a))
    again = load_image_folder(root, 16, 1)
    assert calls == [] and np.array_equal(first.images, again.images)
    # a changed file (new contents and time) invalidates the cache
    f = root / again.files[0]
    Image.new("L", (16, 16), 255).save(f)
    os.utime(f, ns=(1, 1))
    changed = load_image_folder(root, 16, 1)
    assert calls == [1] and changed.images[0].min() == 255
    # a damaged cache file is ignored and rebuilt
    for c in (root / ".metanas_cache").glob("*.npz"):
        c.write_bytes(b"garbage")
    assert np.array_equal(load_image_folder(root, 16, 1).images, changed.images)


_LABELS = np.repeat(np.arange(2), 3)


@pytest.mark.parametrize("damage", [
    lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    lambda f: np.savez(f, images=np.zeros((6, 1, 16, 15), np.uint8), labels=_LABELS),
    lambda f: np.savez(f, images=np.zeros((5, 1, 16, 16), np.uint8), labels=_LABELS),
    lambda f: np.savez(f, images=np.zeros((6, 1, 16, 16), np.float32), labels=_LABELS),
    lambda f: np.savez(f, pixels=np.zeros((6, 1, 16, 16), np.uint8), labels=_LABELS),
], ids=["truncated", "shape", "rows", "dtype", "key"])
def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    root = tmp_path / "copy"
    make_shapes_folder(root, n_classes=2, n_images=3, seed=0, mixed_formats=False)
    first = load_image_folder(root, 16, 1)
    (cache,) = (root / ".metanas_cache").glob("images-*.npz")
    damage(cache)
    calls = []
    real = image_folder.load_images
    monkeypatch.setattr(image_folder, "load_images", lambda *a: calls.append(1) or real(*a))
    again = load_image_folder(root, 16, 1)
    assert calls == [1] and again.images.dtype == np.uint8 and np.array_equal(again.images, first.images)
    with np.load(cache) as z:  # rewritten whole, and used from then on
        assert np.array_equal(z["images"], first.images) and np.array_equal(z["labels"], _LABELS)
    load_image_folder(root, 16, 1)
    assert calls == [1]


def test_split_by_seed_and_by_names():
    names = [f"c{i}" for i in range(10)]
    s = split_classes(names, (0.6, 0.2, 0.2), seed=1)
    assert [len(s[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(10))
    assert all(np.array_equal(s[k], split_classes(names, (0.6, 0.2, 0.2), seed=1)[k]) for k in s)
    assert not all(np.array_equal(s[k], split_classes(names, (0.6, 0.2, 0.2), seed=2)[k]) for k in s)
    e = split_classes(names, classes={"train": ["c1", "c2"], "test": ["c9"]})
    assert e["train"].tolist() == [1, 2] and e["val"].tolist() == [] and e["test"].tolist() == [9]
    with pytest.raises(ConfigError, match="not class folders"):
        split_classes(names, classes={"train": ["nope"]})
    with pytest.raises(ConfigError, match="both"):
        split_classes(names, classes={"train": ["c1"], "test": ["c1"]})
    with pytest.raises(ConfigError, match="summing to 1"):
        split_classes(names, (0.5, 0.2, 0.2))


def test_sampler_protocol_reproducibility_and_normalisation(shapes, tmp_path):
    tasks = ImageFolderTasks(shapes, n_way=3, k_shot=2, q_query=3, image_size=16,
                             split_fractions=(0.5, 0, 0.5), cache_dir=tmp_path)
    check_sampler(tasks, splits=("train", "test"))  # val is empty
    assert tasks.input_shape == (1, 16, 16)
    a = tasks.sample("train", np.random.default_rng(5))
    b = tasks.sample("train", np.random.default_rng(5))
    assert torch.equal(a.support_x, b.support_x) and a.classes == b.classes
    assert set(a.classes) <= set(tasks.splits["train"].tolist())
    assert a.support_x.shape == (6, 1, 16, 16) and a.query_x.shape == (9, 1, 16, 16)
    assert 0.0 <= float(a.support_x.min()) and float(a.support_x.max()) <= 1.0
    with pytest.raises(DataError, match="split 'val' has 0 classes"):
        tasks.sample("val", np.random.default_rng(0))
    norm = ImageFolderTasks(shapes, n_way=3, k_shot=2, q_query=3, image_size=16, invert=True,
                            mean=[0.2], std=[0.5], split_fractions=(0.5, 0, 0.5), cache_dir=tmp_path)
    c = norm.sample("train", np.random.default_rng(5))
    assert c.classes == a.classes
    torch.testing.assert_close(c.support_x, ((1 - a.support_x) - 0.2) / 0.5)
    scale, shift, std = pixel_normalisation(1, True, [0.2], [0.5])
    assert scale.tolist() == [-1.0] and np.allclose(shift, [-0.8]) and std.tolist() == [0.5]


def test_sample_task_ragged_structure():
    images = np.arange(30, dtype=np.float32).reshape(30, 1, 1, 1)
    rows = [np.arange(0, 4), np.arange(4, 14), np.arange(14, 30)]  # 4, 10, 16 examples
    task = sample_task_ragged(images, rows, np.array([0, 1, 2]), 3, 1, 3, np.random.default_rng(0))
    for label, c in enumerate(task.classes):
        values = torch.cat([task.support_x[task.support_y == label], task.query_x[task.query_y == label]])
        got = values.flatten().long().tolist()
        assert len(set(got)) == 4 and set(got) <= set(rows[c].tolist())


# --------------------------------------------------------------------------- bad input
def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderTasks(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        ImageFolderTasks(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderTasks(empty)
    Image.new("L", (4, 4)).save(empty / "loose.png")
    with pytest.raises(DataError, match="1 loose images"):
        ImageFolderTasks(empty)
    (empty / "a").mkdir()
    with pytest.raises(DataError, match=r"\['a'\] hold no image"):
        ImageFolderTasks(empty)
    with pytest.raises(DataError, match="task.root"):
        ImageFolderTasks(None)


def test_too_few_images_names_the_classes(tmp_path):
    make_shapes_folder(tmp_path, n_classes=3, n_images=4, seed=0)
    with pytest.raises(DataError, match=r"k_shot \+ q_query = 5: 'circle_filled' \(4\)"):
        ImageFolderTasks(tmp_path, n_way=2, k_shot=1, q_query=4)
    with pytest.raises(DataError, match="no split has n_way=5"):
        ImageFolderTasks(tmp_path, n_way=5, k_shot=1, q_query=3)


def test_truncated_and_fake_images_are_named(tmp_path):
    make_shapes_folder(tmp_path, n_classes=2, n_images=3, seed=0, mixed_formats=False)
    bad = tmp_path / "circle_filled" / "000.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    with pytest.raises(DataError, match=r"000\.png cannot be read .*replace or delete"):
        load_image_folder(tmp_path, 8, 1, cache=False)
    bad.write_text("not an image at all")
    with pytest.raises(DataError, match=r"000\.png cannot be read"):
        load_image_folder(tmp_path, 8, 1, cache=False)


def test_bad_settings(shapes):
    with pytest.raises(ConfigError, match="channels"):
        ImageFolderTasks(shapes, channels=2)
    with pytest.raises(ConfigError, match="image_size"):
        ImageFolderTasks(shapes, image_size=0)
    with pytest.raises(ConfigError, match="one per channel"):
        ImageFolderTasks(shapes, n_way=2, k_shot=1, q_query=1, mean=[0.1, 0.2])


def test_config_group_builds_the_sampler(shapes, tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        cfg = compose("train", overrides=["task=image_folder", f"task.root={shapes}", "task.q_query=4",
                                          f"task.cache_dir={tmp_path}", "task.split_fractions=[0.5,0,0.5]", "task.n_way=4"])
    tasks = check_sampler(instantiate(cfg.task, _convert_="all"), splits=("train", "test"))
    assert isinstance(tasks, ImageFolderTasks) and tasks.input_shape == (1, 28, 28)
    assert tasks.sample("test", np.random.default_rng(0)).query_x.shape == (16, 1, 28, 28)
