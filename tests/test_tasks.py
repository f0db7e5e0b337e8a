"""Tests of the task-sampler layer (metanas.tasks): Task, TaskSampler, sample_task, Omniglot, the core."""

from __future__ import annotations

import dataclasses
import zipfile
from importlib import resources

import numpy as np
import pytest
import torch

from metanas.errors import ConfigError, DataError
from metanas.tasks import (
    SPLITS,
    DatasetTasks,
    ImageFolderTasks,
    MiniImageNetTasks,
    OmniglotTasks,
    Task,
    TaskSampler,
    TasksetAdapter,
    check_sampler,
    sample_task,
)
from metanas.tasks.core import (
    UNIT_PIXELS,
    DensePool,
    PixelNorm,
    Rotations,
    check_counts,
    compose,
    draw_episode,
    pixel_normalisation,
)
from metanas.tasks.omniglot import resize_packed

NPZ = resources.files("metanas.tasks") / "data" / "omniglot" / "omniglot.npz"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw():
    """Metadata and the 28x28 images straight from the shipped npz (stored convention)."""
    with np.load(str(NPZ)) as z:
        return {k: z[k] for k in ("images_28", "char_split", "char_alphabet", "alphabet_split")}


@pytest.fixture(scope="module")
def standard():
    return OmniglotTasks()


@pytest.fixture(scope="module")
def vinyals():
    return OmniglotTasks(split="vinyals")


@pytest.fixture(scope="module")
def tampered(tmp_path_factory):
    """A copy of the npz with one pixel changed in both image arrays (np.savez, uncompressed)."""
    with np.load(str(NPZ)) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["images_28"][3, 4, 10, 10] ^= 0xFF
    arrays["images_packed"][3, 4, 100] ^= 0x01
    path = tmp_path_factory.mktemp("npz") / "tampered.npz"
    np.savez(path, **arrays)
    return path


def _encoded_images(n_rows: int = 12, n_examples: int = 9) -> np.ndarray:
    """float images (n_rows, n_examples, 2, 3); pixels [0, 0] / [0, 1] encode (row, example)."""
    x = np.zeros((n_rows, n_examples, 2, 3), dtype=np.float32)
    x[..., 0, 0] = np.arange(n_rows)[:, None]
    x[..., 0, 1] = np.arange(n_examples)[None, :]
    return x


# ----------------------------------------------------------------------------- Task


def test_task_shapes_dtypes_and_labels(standard):
    task = standard.sample("train", np.random.default_rng(0))
    assert task.support_x.shape == (5, 1, 28, 28)
    assert task.query_x.shape == (75, 1, 28, 28)
    assert task.support_x.dtype == task.query_x.dtype == torch.float32
    assert task.support_y.dtype == task.query_y.dtype == torch.int64
    assert task.support_y.tolist() == [0, 1, 2, 3, 4]
    assert task.query_y.tolist() == [i for i in range(5) for _ in range(15)]
    assert (task.n_way, task.k_shot, task.q_query) == (5, 1, 15)
    assert len(set(task.classes)) == 5
    assert standard.input_shape == (1, 28, 28) == tuple(task.support_x.shape[1:])


def test_task_to_frozen_and_consistency():
    x = torch.zeros(4, 1, 2, 2)
    y = torch.tensor([0, 0, 1, 1])
    task = Task(x, y, x, y, classes=(7, 9))
    moved = task.to("cpu")
    assert moved is not task and torch.equal(moved.query_x, x) and moved.classes == (7, 9)
    assert (moved.k_shot, moved.q_query) == (2, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.classes = (1, 2)  # type: ignore[misc]
    with pytest.raises(ConfigError, match="inconsistent Task"):
        Task(x, y[:3], x, y, classes=(7, 9))


def test_labels_match_the_classes_images(standard, raw):
    """Label i's support and query images are drawings of character classes[i] (ink = 1)."""
    rng = np.random.default_rng(1)
    ink = (255 - raw["images_28"]).astype(np.float32) / 255
    for _ in range(3):
        task = standard.sample("test", rng)
        for x, y in ((task.support_x, task.support_y), (task.query_x, task.query_y)):
            for img, label in zip(x[:, 0].numpy(), y.tolist()):
                drawings = ink[task.classes[label]]
                assert np.abs(drawings - img).reshape(20, -1).max(axis=1).min() < 1e-6


def test_rotated_classes_are_rotated_drawings(vinyals, raw):
    rng = np.random.default_rng(2)
    ink = (255 - raw["images_28"]).astype(np.float32) / 255
    seen_turns = set()
    for _ in range(4):
        task = vinyals.sample("train", rng)
        for img, label in zip(task.support_x[:, 0].numpy(), task.support_y.tolist()):
            char, turns = divmod(task.classes[label], 1623)[::-1]
            seen_turns.add(turns)
            drawings = np.rot90(ink[char], turns, axes=(-2, -1))
            assert np.abs(drawings - img).reshape(20, -1).max(axis=1).min() < 1e-6
    assert len(seen_turns) > 1


def test_support_and_query_disjoint_and_classes_distinct():
    images = _encoded_images()
    rng = np.random.default_rng(3)
    for _ in range(50):
        task = sample_task(images, np.arange(12), 4, 3, 5, rng)
        assert len(set(task.classes)) == 4
        for label in range(4):
            s = task.support_x[task.support_y == label, 0, 0]
            q = task.query_x[task.query_y == label, 0, 0]
            # pixel [0, 0] is the row: every example of label i comes from class classes[i]
            assert set(s[:, 0].tolist()) == set(q[:, 0].tolist()) == {task.classes[label]}
            examples = s[:, 1].tolist() + q[:, 1].tolist()
            assert len(set(examples)) == 8  # K + Q distinct drawings, none in both sets


def test_draw_episode_without_replacement():
    rng = np.random.default_rng(4)
    for _ in range(100):
        pos, idx = draw_episode(7, 20, 7, 20, rng)
        assert sorted(pos.tolist()) == list(range(7))
        assert all(sorted(row.tolist()) == list(range(20)) for row in idx)


def test_labels_are_a_random_relabelling():
    """With a pool of exactly n_way classes, every task has the same classes in a new order."""
    rng = np.random.default_rng(5)
    orders = {sample_task(_encoded_images(), np.arange(3, 8), 5, 1, 1, rng).classes
              for _ in range(40)}
    assert all(sorted(o) == [3, 4, 5, 6, 7] for o in orders)
    assert len(orders) > 10


def test_sample_task_rows_transform_and_channels():
    images = np.stack([_encoded_images()] * 3, axis=2)  # (12, 9, 3, 2, 3): C = 3
    ids = np.array([100, 101, 102])
    rows = np.array([2, 5, 2])
    seen = []

    def transform(batch, classes):
        seen.append(classes.copy())
        return batch + 1000

    task = sample_task(images, ids, 3, 2, 1, np.random.default_rng(6), transform, rows)
    assert task.support_x.shape == (6, 3, 2, 3) and task.query_x.shape == (3, 3, 2, 3)
    assert list(task.classes) == seen[0].tolist() and sorted(task.classes) == [100, 101, 102]
    row_of = dict(zip(ids.tolist(), rows.tolist()))
    for img, label in zip(task.support_x, task.support_y.tolist()):
        assert img[0, 0, 0].item() == 1000 + row_of[task.classes[label]]  # float: not scaled


def test_sample_task_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="n_way=13"):
        sample_task(_encoded_images(), np.arange(12), 13, 1, 1, rng)
    with pytest.raises(ConfigError, match="= 10 but each class has only 9"):
        sample_task(_encoded_images(), np.arange(12), 2, 5, 5, rng)
    with pytest.raises(ConfigError, match="numpy.random.Generator"):
        sample_task(_encoded_images(), np.arange(12), 2, 1, 1, 0)
    with pytest.raises(ConfigError, match="shape"):
        sample_task(np.zeros((3, 4, 5)), np.arange(3), 2, 1, 1, rng)


# ----------------------------------------------------------------------------- randomness


def _same(a: Task, b: Task) -> bool:
    return a.classes == b.classes and all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in ("support_x", "support_y", "query_x", "query_y")
    )


@pytest.mark.parametrize("name", ["standard", "vinyals"])
def test_same_seed_same_tasks_different_seed_different(name, request):
    sampler = request.getfixturevalue(name)
    first = [sampler.sample(s, np.random.default_rng(42)) for s in SPLITS]
    np.random.seed(1)  # the global RNGs must play no part
    torch.manual_seed(1)
    rng = np.random.default_rng(42)
    seq_a = [sampler.sample("train", rng) for _ in range(5)]
    np.random.seed(2)
    torch.manual_seed(2)
    rng = np.random.default_rng(42)
    seq_b = [sampler.sample("train", rng) for _ in range(5)]
    assert all(_same(a, b) for a, b in zip(seq_a, seq_b))
    assert _same(first[0], seq_a[0])
    rng = np.random.default_rng(43)
    seq_c = [sampler.sample("train", rng) for _ in range(5)]
    assert not any(a.classes == c.classes for a, c in zip(seq_a, seq_c))
    assert len({t.classes for t in seq_a}) == 5  # consecutive tasks differ too


# ----------------------------------------------------------------------------- splits


def _sets(sampler):
    return {s: set(sampler.class_ids(s).tolist()) for s in SPLITS}


def test_standard_split(standard, raw):
    sets = _sets(standard)
    assert {s: standard.n_classes(s) for s in SPLITS} == {"train": 864, "val": 100, "test": 659}
    assert {s: len(v) for s, v in sets.items()} == {"train": 864, "val": 100, "test": 659}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"]
                or sets["val"] & sets["test"])
    evaluation = set(np.flatnonzero(raw["char_split"] == 1).tolist())
    assert sets["test"] == evaluation
    assert sets["train"] | sets["val"] == set(np.flatnonzero(raw["char_split"] == 0).tolist())
    test_alphabets = set(raw["char_alphabet"][sorted(sets["test"])].tolist())
    assert test_alphabets == set(np.flatnonzero(raw["alphabet_split"] == 1).tolist())
    assert len(test_alphabets) == 20
    assert standard.rotations == (0,)
    for split in SPLITS:  # sampled classes stay in their split
        task = standard.sample(split, np.random.default_rng(0))
        assert set(task.classes) <= sets[split]


def test_standard_split_seed_and_n_val():
    a = OmniglotTasks(n_val_classes=50, split_seed=1)
    b = OmniglotTasks(n_val_classes=50, split_seed=2)
    assert [a.n_classes(s) for s in SPLITS] == [914, 50, 659]
    assert _sets(a)["val"] != _sets(b)["val"]
    assert _sets(a)["val"] == _sets(OmniglotTasks(n_val_classes=50, split_seed=1))["val"]


def test_vinyals_split(vinyals):
    sets = _sets(vinyals)
    assert vinyals.rotations == (0, 90, 180, 270)
    assert [vinyals.n_classes(s) for s in SPLITS] == [4400, 400, 1692]
    chars = {s: {c % 1623 for c in v} for s, v in sets.items()}
    assert [len(chars[s]) for s in SPLITS] == [1100, 100, 423]
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"]
                or chars["val"] & chars["test"])
    for s in SPLITS:  # every character comes with all four rotations
        assert sets[s] == {c + 1623 * t for c in chars[s] for t in range(4)}
    # the test characters mix both alphabet sets (random protocol, not Lake's)
    assert min(chars["test"]) < 964 <= max(chars["test"])
    plain = OmniglotTasks(split="vinyals", rotations=[0])
    assert [plain.n_classes(s) for s in SPLITS] == [1100, 100, 423]
    assert {c % 1623 for c in _sets(plain)["test"]} == chars["test"]


def test_class_name(standard):
    assert standard.class_name(0) == "Alphabet_of_the_Magi/character01"
    assert standard.class_name(1623 * 3) == "Alphabet_of_the_Magi/character01@270"


# ----------------------------------------------------------------------------- pixels


def test_ink_convention(standard, vinyals):
    for sampler in (standard, vinyals):
        task = sampler.sample("train", np.random.default_rng(7))
        x = torch.cat([task.support_x, task.query_x])
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert x.max() == 1.0
        assert 0.005 < x.mean().item() < 0.25  # ink is sparse: paper must be 0


def test_resize_packed_matches_pillow_and_images_28(raw):
    from PIL import Image

    with np.load(str(NPZ)) as z:
        packed = z["images_packed"][:3]
    assert np.array_equal(resize_packed(packed, 28), raw["images_28"][:3])
    got = resize_packed(packed[:1, :4], 32, chunk=3)
    bits = np.unpackbits(packed[0, :4], axis=-1, count=105 * 105).reshape(4, 105, 105) * 255
    for j in range(4):
        want = Image.fromarray(bits[j]).resize((32, 32), Image.Resampling.LANCZOS)
        assert np.array_equal(got[0, j], np.asarray(want))


def test_image_size_32():
    sampler = OmniglotTasks(image_size=32)
    assert sampler.input_shape == (1, 32, 32)
    task = sampler.sample("val", np.random.default_rng(8))
    assert task.support_x.shape == (5, 1, 32, 32) and task.query_x.shape == (75, 1, 32, 32)
    assert task.support_x.min() >= 0 and task.support_x.max() <= 1
    assert 0.005 < task.query_x.mean().item() < 0.25


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_way": 1}, "n_way=1"),
        ({"n_way": 101}, "n_way=101 but the 'val' split has only 100"),
        ({"n_way": 500, "n_val_classes": 600}, "n_way=500 but the 'train' split has only 364"),
        ({"n_way": 2.5}, "n_way=2.5"),
        ({"k_shot": 0}, "k_shot=0"),
        ({"q_query": 0}, "q_query=0"),
        ({"k_shot": 10, "q_query": 11}, "= 21"),
        ({"split": "lake"}, "'lake'"),
        ({"image_size": 7}, "image_size=7"),
        ({"image_size": 106}, "image_size=106"),
        ({"rotations": (0, 45)}, "rotation 45"),
        ({"rotations": (90, 90)}, "rotation 90 is listed twice"),
        ({"rotations": []}, "rotations=[]"),
        ({"rotations": "0"}, "rotations='0'"),
        ({"n_val_classes": 0}, "n_val_classes=0"),
        ({"n_val_classes": 964}, "n_val_classes=964"),
        ({"n_val_classes": 1200, "split": "vinyals"}, "n_val_classes=1200"),
        ({"k_shot": True}, "k_shot=True"),
    ],
)
def test_bad_config_raises(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        OmniglotTasks(**kwargs)
    assert needle in str(info.value)
    assert "task." in str(info.value) or "use" in str(info.value)  # names the fix


def test_bad_split_and_rng(standard):
    with pytest.raises(ConfigError, match="'valid'"):
        standard.sample("valid", np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'dev'"):
        standard.n_classes("dev")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="default_rng"):
        standard.sample("train", 0)  # type: ignore[arg-type]


def test_missing_file_raises_data_error(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="nope.npz") as info:
        OmniglotTasks(path=path)
    assert "task.path" in str(info.value)


@pytest.mark.parametrize("n_bytes", [4096, 6_000_000])
def test_truncated_file_raises_data_error(tmp_path, n_bytes):
    path = tmp_path / "cut.npz"
    path.write_bytes(NPZ.read_bytes()[:n_bytes])
    with pytest.raises(DataError, match="cut.npz") as info:
        OmniglotTasks(path=path)
    assert "task.path" in str(info.value)


def test_wrong_digest_raises_data_error(tampered):
    with pytest.raises(DataError, match="sha256 of 'images_28'") as info:
        OmniglotTasks(path=tampered)
    assert "tampered.npz" in str(info.value)
    with pytest.raises(DataError, match="sha256 of 'images_packed'"):  # raised before resizing
        OmniglotTasks(path=tampered, image_size=20)
    sampler = OmniglotTasks(path=tampered, verify=False)  # opting out accepts the copy
    assert sampler.sample("train", np.random.default_rng(0)).query_x.shape == (75, 1, 28, 28)


def test_wrong_layout_raises_data_error(tmp_path):
    small = {"images_28": np.zeros((3, 20, 28, 28), np.uint8)}
    np.savez(tmp_path / "missing.npz", **small)
    with pytest.raises(DataError, match="lacks the arrays"):
        OmniglotTasks(path=tmp_path / "missing.npz")
    with np.load(str(NPZ)) as z:
        arrays = {k: z[k] for k in z.files if k != "images_packed"}
    arrays["images_packed"] = np.zeros((1623, 20, 1379), np.int16)
    np.savez(tmp_path / "dtype.npz", **arrays)
    with pytest.raises(DataError, match="'images_packed' is int16"):
        OmniglotTasks(path=tmp_path / "dtype.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DataError, match="text.npz"):
        OmniglotTasks(path=tmp_path / "text.npz")


def test_packaged_file_is_a_zip():
    assert zipfile.is_zipfile(str(NPZ))


# ----------------------------------------------------------------------------- check_sampler


class _Minimal:
    n_way = 2
    k_shot = 1
    q_query = 2
    input_shape = (1, 2, 3)

    def sample(self, split, rng):
        return sample_task(_encoded_images(), np.arange(12), 2, 1, 2, rng)


def test_check_sampler_accepts(standard):
    assert check_sampler(standard) is standard
    minimal = _Minimal()
    assert check_sampler(minimal) is minimal
    assert isinstance(minimal, TaskSampler) and isinstance(standard, TaskSampler)
    assert minimal.sample("train", np.random.default_rng(0)).support_x.shape == (2, 1, 2, 3)


def test_check_sampler_rejects():
    class NoSample:
        n_way, k_shot, q_query, input_shape = 5, 1, 15, (1, 28, 28)

    with pytest.raises(ConfigError, match=r"NoSample.*implement sample\(split, rng\) -> Task"):
        check_sampler(NoSample())

    class WrongTypes(_Minimal):
        n_way = "5"
        k_shot = True
        input_shape = [1, 28, 28]

    with pytest.raises(ConfigError) as info:
        check_sampler(WrongTypes())
    msg = str(info.value)
    assert "`n_way` is '5'" in msg and "`k_shot` is True" in msg and "`input_shape`" in msg
    assert "q_query" not in msg  # only the real problems are listed

    class WrongSignature(_Minimal):
        def sample(self):  # type: ignore[override]
            return None

    with pytest.raises(ConfigError, match=r"sample\(split, rng\)"):
        check_sampler(WrongSignature())

    class Missing:
        def sample(self, split, rng):
            return None

    with pytest.raises(ConfigError, match="missing attribute `n_way`") as info:
        check_sampler(Missing())
    assert "missing attribute `input_shape`" in str(info.value)


# ----------------------------------------------------------------------------- the shared core


@pytest.mark.parametrize("value", [1, 0, -3, 2.0, 2.5, True, "5", None])
def test_check_counts_refuses_and_names_the_fix(value):
    with pytest.raises(ConfigError) as info:
        check_counts(value, 1, 1)
    assert str(info.value) == (
        f"n_way={value!r} is not an integer >= 2; set task.n_way (or the n_way argument) to an integer >= 2"
    )


def test_check_counts_accepts_any_integer_type():
    counts = check_counts(np.int64(5), 1, np.int32(15))
    assert counts == (5, 1, 15) and all(type(c) is int for c in counts)
    with pytest.raises(ConfigError, match="q_query=0 is not an integer >= 1"):
        check_counts(5, 1, 0)
    with pytest.raises(ConfigError, match="k_shot=True is not an integer"):  # a bool is not a count
        check_counts(5, True, 1)


@pytest.mark.parametrize("make", [
    lambda **kw: OmniglotTasks(**kw),
    lambda **kw: ImageFolderTasks("/nonexistent/folder", **kw),
    lambda **kw: MiniImageNetTasks("/nonexistent/folder", **kw),
    lambda **kw: DatasetTasks([], **kw),
    lambda **kw: TasksetAdapter(object(), **kw),
], ids=["omniglot", "image_folder", "miniimagenet", "dataset", "taskset"])
def test_every_loader_uses_the_one_count_check(make):
    """The same check, before any data is read: the same message from every loader."""
    with pytest.raises(ConfigError) as info:
        make(n_way=5, k_shot=0, q_query=3)
    assert str(info.value) == (
        "k_shot=0 is not an integer >= 1; set task.k_shot (or the k_shot argument) to an integer >= 1"
    )


def test_rotations_expand_the_pool_and_turn_each_class():
    rot = Rotations.parse([0, 90, 270], period=10)
    ids, rows = rot.expand(np.array([1, 4]), np.array([0, 1]))
    assert ids.tolist() == [1, 4, 11, 14, 31, 34] and rows.tolist() == [0, 1, 0, 1, 0, 1]
    img = np.array([[1, 2], [3, 4]])
    batch = np.stack([np.stack([img, img + 4])] * 3)  # (3 classes, 2 examples, 2, 2)
    out = rot(batch.copy(), np.array([4, 11, 34]))  # 0, 90, 270 degrees counter-clockwise
    assert out[0].tolist() == batch[0].tolist()
    assert out[1, 0].tolist() == [[2, 4], [1, 3]] and out[1, 1].tolist() == [[6, 8], [5, 7]]
    assert out[2, 0].tolist() == [[3, 1], [4, 2]]


def test_rotations_as_a_class_transform_of_compose():
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 5), dtype=np.uint8)
    rot = Rotations.parse([180, 90], period=3)
    pool = DensePool(images, *rot.expand(np.arange(3), np.arange(3)))
    task = compose(pool, 4, 1, 2, np.random.default_rng(1), (rot,), UNIT_PIXELS)
    assert set(task.classes) <= {6, 7, 8, 3, 4, 5}  # base + 3 * (angle // 90)
    for x, y in zip(task.query_x[:, 0].numpy(), task.query_y.tolist()):
        base, turns = task.classes[y] % 3, task.classes[y] // 3
        drawings = np.rot90(images[base], turns, axes=(-2, -1)) / np.float32(255)
        assert any(np.array_equal(x, d) for d in drawings)


@pytest.mark.parametrize(("angles", "needle"), [
    ((0, 45), "rotation 45 is not supported"), ((90, 90), "rotation 90 is listed twice"),
    ([], "rotations=[] is empty"), ("0", "rotations='0' is not a list"), ((0, 1.5), "rotation=1.5"),
])
def test_rotations_refuse_bad_angles(angles, needle):
    with pytest.raises(ConfigError, match="task.rotations") as info:
        Rotations.parse(angles, period=10)
    assert needle in str(info.value)


def test_pixel_norm_keeps_each_loaders_rounding():
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    assert np.array_equal(UNIT_PIXELS(x), np.divide(x, np.float32(255), dtype=np.float32))
    assert np.array_equal(UNIT_PIXELS(x.astype(np.float64)), x.astype(np.float32))  # only uint8 is divided
    scale, shift, std = pixel_normalisation(1, True, [0.2], [0.5])
    folder = PixelNorm.from_settings(1, invert=True, mean=[0.2], std=[0.5])
    want = (x.astype(np.float32) * np.float32(scale[0] / 255.0) - shift[0]) / std[0]
    assert np.array_equal(folder(x), want) and folder(x).dtype == np.float32
    # the two roundings differ in the last bit for some values: each loader keeps its own
    assert not np.array_equal(UNIT_PIXELS(x), PixelNorm.from_settings(1)(x))
    assert np.abs(UNIT_PIXELS(x) - PixelNorm.from_settings(1)(x)).max() < 1e-7
