"""The shared core of the task loaders: class pools and the small steps of an episode.

A loader (Omniglot, an image folder, miniImageNet, a dataset of ``(x, y)`` pairs) decodes its
data and says which classes each split has; the rest is here, for a new loader to reuse too:

* :func:`check_counts`: the one check of ``n_way`` / ``k_shot`` / ``q_query``;
  :func:`check_split_sizes`: each split's class count against ``n_way``.
* :func:`permuted_split` and :func:`split_classes`: class splits from a seeded permutation.
* :class:`DensePool` / :class:`RaggedPool`: one split's classes and where their examples are.
* :func:`compose`: one episode: draw ``n_way`` classes (their order is the labelling) and
  ``k_shot + q_query`` examples of each, apply the class transforms ``f(batch, classes)``
  (e.g. :class:`Rotations`), map the pixels with a :class:`PixelNorm`, cut support / query.
* :class:`PoolSampler`: a :class:`~metanas.tasks.TaskSampler` over one pool per split, the
  base of the loaders.
* :func:`load_cached`: a validated ``.npz`` cache, rebuilt when damaged, written atomically;
  writing one removes the older caches of the same data and settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import operator
import re
import shlex
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from metanas.errors import ConfigError, DataError
from metanas.io import atomic_write_bytes

from .base import SPLITS, Split, Task, check_split

__all__ = [
    "UNIT_PIXELS", "ClassTransform", "DensePool", "Layout", "PixelNorm", "PoolSampler", "RaggedPool",
    "Rotations", "check_counts", "check_int", "check_split_sizes", "compose", "draw_episode", "load_cached",
    "make_task", "permuted_split", "pixel_normalisation", "read_npz", "sample_task", "sample_task_ragged",
    "split_classes",
]

log = logging.getLogger(__name__)

#: ``f(batch, classes) -> batch`` on the drawn examples ``(n_way, k_shot + q_query, *item)`` (a
#: fresh array, may change in place) and their class ids ``(n_way,)``; keeps the first two axes.
ClassTransform = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------ checks, splits
def check_int(name: str, value: object, lowest: int | None = None, fix: str | None = None) -> int:
    """``value`` as an int (any integer type, not a bool), at least ``lowest`` if given.

    Raises:
        ConfigError: naming the value and ``fix`` (default: set ``task.<name>``).
    """
    bound = "" if lowest is None else f" >= {lowest}"
    if not isinstance(value, (bool, np.bool_)):
        try:
            number = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            number = None
        if number is not None and (lowest is None or number >= lowest):
            return number
    fix = fix or f"set task.{name} (or the {name} argument) to an integer{bound}"
    raise ConfigError(f"{name}={value!r} is not an integer{bound}; {fix}")


def check_counts(n_way: object, k_shot: object, q_query: object) -> tuple[int, int, int]:
    """The one check of an episode's shape: ``(n_way >= 2, k_shot >= 1, q_query >= 1)`` as ints.

    Raises:
        ConfigError: for the first one that is not an integer in range.
    """
    return check_int("n_way", n_way, 2), check_int("k_shot", k_shot, 1), check_int("q_query", q_query, 1)


def check_split_sizes(
    sizes: Mapping[str, int], n_way: int, where: str = "", fix: str = "lower n_way or change the class split"
) -> None:
    """The class count of every split against ``n_way``, when a sampler is built.

    A split with classes needs at least ``n_way`` of them; a split without any is allowed (a
    dataset only adapted to, e.g. ``split_fractions=[0, 0, 1]``): drawing from it fails, and
    :func:`~metanas.tasks.check_sampler` tries the splits a consumer will use.

    Args:
        sizes: ``{split: n_classes}``.
        n_way: classes per task.
        where: names the data at the start of the message, e.g. ``"image folder x: "``.
        fix: what to change, the end of the message.

    Raises:
        DataError: no split has ``n_way`` classes, or one has some but fewer.
    """
    total = sum(sizes.values())
    if all(size < n_way for size in sizes.values()):
        raise DataError(
            f"{where}{total} classes, split {dict(sizes)}: no split has n_way={n_way} classes; {fix}"
        )
    for split, size in sizes.items():
        if 0 < size < n_way:
            raise DataError(
                f"{where}split {split!r} has {size} of the {total} classes, fewer than n_way={n_way} "
                f"(a split needs none or at least {n_way}); {fix}"
            )


def permuted_split(ids: np.ndarray, sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Cut ``numpy.random.default_rng(seed).permutation(ids)`` (``ids`` int ``(n,)``) into blocks.

    Returns:
        ``{split: sorted int array}``, the blocks of ``sizes`` ``{split: n_classes}`` in order.
    """
    perm = np.random.default_rng(seed).permutation(np.asarray(ids))
    cuts = np.cumsum([0, *sizes.values()])
    return {s: np.sort(perm[a:b]) for s, a, b in zip(sizes, cuts[:-1], cuts[1:])}


def split_classes(
    class_names: Sequence[str], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
    classes: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, np.ndarray]:
    """Indices (into ``class_names``) of each split's classes, int64 ``{split: (n,)}``.

    Args:
        class_names: all class names.
        fractions: shares of (train, val, test); the classes of a seeded permutation are
            assigned in that order (train and val rounded, test takes the rest).
        seed: seed of the permutation.
        classes: explicit ``{split: [class names]}`` instead of fractions; splits not named
            get no classes.

    Raises:
        ConfigError: bad fractions, unknown split or class names, a class in two splits.
    """
    index = {name: i for i, name in enumerate(class_names)}
    if classes is not None:
        out, seen = {}, {}
        for split, names in classes.items():
            check_split(split)
            unknown = [n for n in names if n not in index]
            if unknown:
                raise ConfigError(
                    f"classes.{split} names {unknown[:5]}, which are not class folders "
                    f"(there are {len(class_names)}: {list(class_names)[:5]}...); fix the names"
                )
            for n in names:
                if n in seen and seen[n] != split:
                    raise ConfigError(f"class {n!r} is in both {seen[n]} and {split}; splits must be disjoint")
                seen[n] = split
            out[split] = np.array([index[n] for n in names], dtype=np.int64)
        return {s: out.get(s, np.zeros(0, dtype=np.int64)) for s in SPLITS}
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 for f in fr) or not np.isclose(sum(fr), 1.0):
        raise ConfigError(
            f"split_fractions={list(fractions)} must be three non-negative shares of "
            "(train, val, test) summing to 1, e.g. [0.6, 0.2, 0.2] or [0, 0, 1]"
        )
    n = len(class_names)
    n_train = round(fr[0] * n)
    n_val = min(round(fr[1] * n), n - n_train)
    return permuted_split(np.arange(n), {"train": n_train, "val": n_val, "test": n - n_train - n_val}, seed)


# ------------------------------------------------------------------------------ pixels
def pixel_normalisation(
    channels: int, invert: bool = False, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel ``(scale, shift, std)``, float32 ``(C,)`` each, of the pixel normalisation.

    A pixel ``x`` in [0, 1] becomes ``(x * scale - shift) / std``: ``x`` (or ``1 - x`` with
    ``invert``) minus ``mean``, divided by ``std`` (defaults 0 and 1).

    Raises:
        ConfigError: ``mean`` or ``std`` without one value per channel, or ``std <= 0``.
    """
    m = np.zeros(channels, np.float32) if mean is None else np.asarray(list(mean), np.float32)
    sd = np.ones(channels, np.float32) if std is None else np.asarray(list(std), np.float32)
    if m.shape != (channels,) or sd.shape != (channels,):
        raise ConfigError(f"mean and std need {channels} value(s), one per channel; set task.mean / task.std")
    if np.any(sd <= 0):
        raise ConfigError(f"std={sd.tolist()} must be positive; fix task.std")
    if invert:  # 1 - x - mean = x * (-1) - (mean - 1)
        return np.full(channels, -1.0, np.float32), m - 1.0, sd
    return np.ones(channels, np.float32), m, sd


@dataclass(frozen=True, eq=False)
class PixelNorm:
    """The pixel normaliser: stored values -> float32 ``(x / divisor * scale - shift) / std``.

    Steps left None are skipped; ``divisor`` divides uint8 input only (other dtypes are on their
    final scale); ``scale`` is a scalar or per channel ``(C,)``, ``shift`` and ``std`` per
    channel. uint8 pixels reach [0, 1] in two roundings, each kept where it was so that tasks
    stay bit-identical (they differ in the last bit for half of the 256 values): ``x / 255``
    (:data:`UNIT_PIXELS`: Omniglot, :func:`sample_task`, adapters) and ``x * float32(1/255)``
    (:meth:`from_settings`: image folders, miniImageNet).
    """

    divisor: float | None = None
    scale: float | np.ndarray | None = None
    shift: np.ndarray | None = None
    std: np.ndarray | None = None

    @classmethod
    def from_settings(cls, channels: int, invert: bool = False, mean=None, std=None) -> PixelNorm:
        """uint8 ``x`` -> ``x / 255`` (``1 - x / 255`` with ``invert``) minus ``mean``, over ``std``
        (validated by :func:`pixel_normalisation`)."""
        scale, shift, sd = pixel_normalisation(channels, invert, mean, std)
        return cls(scale=scale.astype(np.float64) / 255.0, shift=shift, std=sd)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Examples ``(..., C, H, W)`` of any dtype -> a new float32 array of the same shape."""
        out = np.array(x, dtype=np.float32)
        if self.divisor is not None and x.dtype == np.uint8:
            out /= np.float32(self.divisor)
        for op, value in ((np.multiply, self.scale), (np.subtract, self.shift), (np.divide, self.std)):
            if value is not None:
                op(out, np.asarray(value, np.float32).reshape(-1, 1, 1), out=out)
        return out


#: uint8 -> ``x / 255``; any other dtype cast to float32 unchanged.
UNIT_PIXELS = PixelNorm(divisor=255)


# ------------------------------------------------------------------------------ class pools
def _check_pool(n_classes: int, n_way: int, rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng is a {type(rng).__name__}; pass a numpy.random.Generator, e.g. default_rng(seed)")
    if n_way > n_classes:
        raise ConfigError(f"n_way={n_way} but the class pool has only {n_classes} classes; lower n_way")


def draw_episode(
    n_classes: int, n_examples: int, n_way: int, n_per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Choose the classes and examples of one episode without replacement (:class:`DensePool`):
    one ``rng.choice`` of the classes, then an argsort of ``rng.random((n_way, n_examples))``.

    Returns:
        ``(class_pos, example_idx)``: int64 ``(n_way,)`` (positions in the pool, in label
        order) and ``(n_way, n_per_class)`` (distinct examples of each chosen class).

    Raises:
        ConfigError: ``rng`` is not a Generator, or too few classes or examples per class.
    """
    _check_pool(n_classes, n_way, rng)
    if n_per_class > n_examples:
        raise ConfigError(
            f"k_shot + q_query = {n_per_class} but each class has only {n_examples} examples; lower k_shot or q_query"
        )
    class_pos = rng.choice(n_classes, size=n_way, replace=False)
    return class_pos, np.argsort(rng.random((n_way, n_examples)), axis=1)[:, :n_per_class]


@dataclass(frozen=True, eq=False)
class DensePool:
    """Classes with the same number of examples, in one array.

    Attributes:
        examples: ``(n_rows, n_examples, *item)``, item ``(H, W)`` or ``(C, H, W)``.
        ids: int ``(n_classes,)``, each class's global id (``Task.classes``).
        rows: int ``(n_classes,)``, each class's row of ``examples`` (rows may repeat).
    """

    examples: np.ndarray
    ids: np.ndarray
    rows: np.ndarray

    def draw(self, n_way: int, n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (n_way,), examples (n_way, n_per_class, *item))``, drawn by :func:`draw_episode`."""
        pos, idx = draw_episode(len(self.ids), self.examples.shape[1], n_way, n_per_class, rng)
        return self.ids[pos], self.examples[self.rows[pos][:, None], idx]


@dataclass(frozen=True, eq=False)
class RaggedPool:
    """Classes with any number of examples, in one flat array.

    Attributes:
        examples: ``(n, *item)``, an array or anything indexable with a 2-D int array.
        ids: int ``(n_classes,)``, each class's global id (``Task.classes``).
        rows: ``rows[i]``, the int array of rows of ``examples`` of class ``ids[i]``.
    """

    examples: Any
    ids: np.ndarray
    rows: Sequence[np.ndarray]

    def draw(self, n_way: int, n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
        """``(ids (n_way,), examples (n_way, n_per_class, *item))``: one ``rng.choice`` of the
        classes, then one ``rng.permutation`` of each chosen class's examples, in label order;
        ConfigError as :func:`draw_episode`."""
        _check_pool(len(self.ids), n_way, rng)
        pos = rng.choice(len(self.ids), size=n_way, replace=False)
        picked = []
        for p in pos.tolist():
            rows = np.asarray(self.rows[p])
            if len(rows) < n_per_class:
                raise ConfigError(
                    f"class {self.ids[p]} has {len(rows)} examples but k_shot + q_query = "
                    f"{n_per_class}; lower k_shot or q_query"
                )
            picked.append(rows[rng.permutation(len(rows))[:n_per_class]])
        return self.ids[pos], self.examples[np.stack(picked)]


@dataclass(frozen=True)
class Rotations:
    """Rotations as classes (Santoro et al. 2016; Vinyals et al. 2016), a class transform.

    Every (class, angle) pair is its own class, id ``base + period * (angle // 90)`` (``period``
    above every base id; Omniglot: 1623): :meth:`expand` makes a pool's classes those pairs and
    the object, a :data:`ClassTransform`, turns each drawn class's examples by its angle
    (``angles``: distinct, from :attr:`ALL`, counter-clockwise in the last two axes).
    """

    angles: tuple[int, ...]
    period: int
    ALL: ClassVar[tuple[int, ...]] = (0, 90, 180, 270)

    @classmethod
    def parse(cls, angles: Iterable[int], period: int) -> Rotations:
        """Validate a list of angles (``task.rotations``); ConfigError if it is not one."""
        fix = (
            f"set task.rotations to a list of angles from {cls.ALL} (degrees counter-clockwise), "
            "or null for the protocol's default"
        )
        if isinstance(angles, (str, bytes)) or not isinstance(angles, Iterable):
            raise ConfigError(f"rotations={angles!r} is not a list of angles; {fix}")
        given, parsed = list(angles), []
        for r in given:
            angle = check_int("rotation", r, fix=fix)
            if angle not in cls.ALL:
                raise ConfigError(f"rotation {r!r} is not supported; {fix}")
            if angle in parsed:
                raise ConfigError(
                    f"rotation {angle} is listed twice in rotations={given}; list each angle once in task.rotations"
                )
            parsed.append(angle)
        if not parsed:
            raise ConfigError("rotations=[] is empty; use task.rotations=[0] for no rotation, or null for the default")
        return cls(tuple(parsed), period)

    def expand(self, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, rows)`` of the rotated classes of ``ids`` stored at ``rows`` (int ``(n,)``):
        int ``(n * len(angles),)`` each, angle-major."""
        turns = np.array([a // 90 for a in self.angles], dtype=np.int64)
        return (ids[None, :] + self.period * turns[:, None]).reshape(-1), np.tile(rows, len(turns))

    def __call__(self, batch: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Rotate in place each class's examples, ``batch`` ``(n_way, n, ..., H, W)``."""
        for i, turns in enumerate((classes // self.period).tolist()):
            if turns:
                batch[i] = np.rot90(batch[i], turns, axes=(-2, -1))
        return batch


# ------------------------------------------------------------------------------ episodes
def make_task(support: np.ndarray, query: np.ndarray, classes: np.ndarray) -> Task:
    """A :class:`Task` of float32 ``support`` ``(n_way, k_shot, *item)`` and ``query``
    ``(n_way, q_query, *item)``; label ``i`` is class ``classes[i]``."""
    (n_way, k_shot, *item), q_query = support.shape, query.shape[1]
    labels = np.arange(n_way, dtype=np.int64)
    return Task(
        support_x=torch.from_numpy(np.ascontiguousarray(support).reshape(n_way * k_shot, *item)),
        support_y=torch.from_numpy(labels.repeat(k_shot)),
        query_x=torch.from_numpy(np.ascontiguousarray(query).reshape(n_way * q_query, *item)),
        query_y=torch.from_numpy(labels.repeat(q_query)),
        classes=tuple(np.asarray(classes).tolist()),
    )


def compose(
    pool: DensePool | RaggedPool, n_way: int, k_shot: int, q_query: int, rng: np.random.Generator,
    transforms: Sequence[ClassTransform] = (), pixels: Callable[[np.ndarray], np.ndarray] = PixelNorm(),
) -> Task:
    """Compose one N-way K-shot Q-query episode from ``pool``.

    The pool draws the classes (in label order) and ``k_shot + q_query`` examples of each (the
    first ``k_shot`` are the support set); the class ``transforms`` run in order, items ``(H, W)``
    get a channel axis, and ``pixels`` maps them to float32.

    Returns:
        The :class:`Task`: ``support_x`` ``(n_way * k_shot, C, H, W)``, ``query_x``
        ``(n_way * q_query, C, H, W)``, ``classes[label]`` the global id of each label.
    """
    ids, batch = pool.draw(n_way, k_shot + q_query, rng)
    for transform in transforms:
        batch = transform(batch, ids)
    if batch.ndim == 4:
        batch = batch[:, :, None]  # (n_way, k+q, 1, H, W)
    return make_task(pixels(batch[:, :k_shot]), pixels(batch[:, k_shot:]), ids)


def sample_task(
    images: np.ndarray, class_ids: np.ndarray, n_way: int, k_shot: int, q_query: int,
    rng: np.random.Generator, transform: ClassTransform | None = None, rows: np.ndarray | None = None,
) -> Task:
    """Compose one N-way K-shot Q-query task from an array of per-class examples: :func:`compose`
    over a :class:`DensePool` with :data:`UNIT_PIXELS` (about 0.1 ms for 5-way 1-shot 15-query
    28x28 on one CPU core, tensors included).

    Args:
        images: per-class examples ``(n_rows, n_examples, H, W)`` or ``(n_rows, n_examples, C, H,
            W)``; uint8 is scaled to [0, 1] by ``1/255``, other dtypes are cast to float32.
        class_ids: int ``(n_pool,)``, the classes to draw from, each its row of ``images``
            unless ``rows`` (int ``(n_pool,)``) gives the row of ``class_ids[i]``.
        n_way, k_shot, q_query, rng: the episode's shape and only source of randomness.
        transform: optional :data:`ClassTransform` (e.g. :class:`Rotations`).
        rows: see ``class_ids``.

    Raises:
        ConfigError: too few classes or examples per class, or items neither ``(H, W)`` nor
            ``(C, H, W)``.
    """
    if images.ndim not in (4, 5):
        raise ConfigError(
            f"images has shape {images.shape}; pass per-class examples of shape "
            "(n_classes, n_examples, H, W) or (n_classes, n_examples, C, H, W)"
        )
    ids = np.asarray(class_ids)
    pool = DensePool(images, ids, ids if rows is None else np.asarray(rows))
    return compose(pool, n_way, k_shot, q_query, rng, () if transform is None else (transform,), UNIT_PIXELS)


def sample_task_ragged(
    images: np.ndarray, class_rows: dict[int, np.ndarray] | list[np.ndarray], class_ids: np.ndarray,
    n_way: int, k_shot: int, q_query: int, rng: np.random.Generator,
    scale: float | None = None, mean: np.ndarray | None = None, std: np.ndarray | None = None,
) -> Task:
    """Compose one task when classes have different numbers of examples: :func:`compose` over
    a :class:`RaggedPool` with ``PixelNorm(scale=scale, shift=mean, std=std)``.

    Args:
        images: all examples, ``(n_examples, C, H, W)`` (any dtype).
        class_rows: ``class_rows[c]``, the int array of rows of ``images`` of class ``c``.
        class_ids: int ``(n_pool,)``, the classes to draw from.
        n_way, k_shot, q_query, rng: the episode's shape and only source of randomness.
        scale, mean, std: optional multiplier (e.g. ``1/255``), then per-channel ``(C,)`` shift
            and divisor.

    Raises:
        ConfigError: see :meth:`RaggedPool.draw`.
    """
    ids = np.asarray(class_ids)
    pool = RaggedPool(images, ids, [class_rows[c] for c in ids.tolist()])
    return compose(pool, n_way, k_shot, q_query, rng, pixels=PixelNorm(scale=scale, shift=mean, std=std))


class PoolSampler:
    """The base of the loaders: a :class:`~metanas.tasks.TaskSampler` with one pool per split.

    A loader sets ``n_way``, ``k_shot``, ``q_query`` (:func:`check_counts`), ``input_shape`` and
    ``pools`` ``{split: pool}`` (or overrides :meth:`pool`), and may set the class ``transforms``,
    the ``pixels`` normaliser and ``where`` (names the data in messages, e.g. ``"folder x: "``).
    """

    n_way: int
    k_shot: int
    q_query: int
    input_shape: tuple[int, ...]
    pools: dict[str, DensePool | RaggedPool]
    transforms: Sequence[ClassTransform] = ()
    pixels: Callable[[np.ndarray], np.ndarray] = PixelNorm()
    where = ""

    def pool(self, split: Split) -> DensePool | RaggedPool:
        """The class pool of ``split`` (a valid split name)."""
        return self.pools[split]

    def sample(self, split: Split, rng: np.random.Generator) -> Task:
        """Draw one task (see :func:`compose`) from ``split`` using only ``rng``.

        Raises:
            ConfigError: an unknown split, or an rng that is not a numpy Generator.
            DataError: the split has fewer than ``n_way`` classes.
        """
        pool = self.pool(check_split(split))
        if len(pool.ids) < self.n_way:
            raise DataError(
                f"{self.where}split {split!r} has {len(pool.ids)} classes, fewer than "
                f"n_way={self.n_way}; change split_fractions / classes or lower n_way"
            )
        return compose(pool, self.n_way, self.k_shot, self.q_query, rng, self.transforms, self.pixels)


# ------------------------------------------------------------------------------ npz files
#: ``{key: (dtype, or a dtype kind letter such as "U"; shape)}``: the arrays an npz must hold.
Layout = Mapping[str, tuple[np.dtype | str, tuple[int, ...]]]


def _layout_problem(zf: zipfile.ZipFile, expected: Layout) -> str | None:
    names = set(zf.namelist())
    missing = [k for k in expected if f"{k}.npy" not in names]
    if missing:
        return f"lacks the arrays {missing}"
    for key, (want, want_shape) in expected.items():
        with zf.open(f"{key}.npy") as fh:
            fmt = np.lib.format
            v1 = fmt.read_magic(fh) == (1, 0)
            shape, _, dtype = (fmt.read_array_header_1_0 if v1 else fmt.read_array_header_2_0)(fh)
        dtype_ok = dtype.kind == want if isinstance(want, str) else dtype == want
        if tuple(shape) != tuple(want_shape) or not dtype_ok:
            return f"array {key!r} is {dtype} {tuple(shape)}, expected {want} {tuple(want_shape)}"
    return None


def read_npz(
    path: Path, expected: Layout, keys: Iterable[str] | None = None, fix: str = ""
) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (default: those of ``expected``) of a validated ``.npz``.

    Every ``expected`` key, dtype and shape is checked from the npy headers first (without
    decompressing); arrays are read whole (zip CRCs checked), never unpickled.

    Raises:
        DataError: naming ``path``, what is wrong (unreadable, truncated, corrupt, an array
            missing or of another dtype or shape) and ``fix``.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            problem = _layout_problem(zf, expected)
            if problem is None:
                arrays = {}
                for key in expected if keys is None else keys:
                    with zf.open(f"{key}.npy") as fh:
                        arrays[key] = np.lib.format.read_array(fh, allow_pickle=False)
                return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        problem = f"cannot be read ({type(exc).__name__}: {exc}): it is truncated or corrupt"
    raise DataError(f"{path}: {problem}" + (f"; {fix}" if fix else ""))


def _remove_stale(path: Path, prefix: str, scope_digest: str) -> None:
    """Delete the other caches of ``path``'s scope (same prefix and scope, another key); list
    the caches named before scopes existed (``<prefix>-<hash>.npz``, dataset unknown)."""
    ours = re.compile(rf"{re.escape(prefix)}-{scope_digest}-[0-9a-f]{{20}}\.npz")
    unscoped = re.compile(rf"{re.escape(prefix)}-[0-9a-f]{{20}}\.npz")
    legacy = []
    for other in sorted(path.parent.iterdir()):
        if other == path or not other.is_file():
            continue
        if ours.fullmatch(other.name):
            try:
                size = other.stat().st_size
                other.unlink()
            except OSError as exc:
                log.info("cannot remove the stale cache %s (%s)", other, exc)
                continue
            log.info("removed the stale cache %s (%.1f MB): an older version of the data or files", other, size / 1e6)
        elif unscoped.fullmatch(other.name):
            legacy.append(other)
    if legacy:
        size = sum(f.stat().st_size for f in legacy if f.is_file())
        log.info(
            "%d cache file(s) of an older metanas version in %s (%.1f MB) are no longer used; remove "
            "them with: %s", len(legacy), path.parent, size / 1e6, shlex.join(["rm", *map(str, legacy)]),
        )


def load_cached(
    folder: str | Path | None, prefix: str, key: object, expected: Layout,
    build: Callable[[], dict[str, np.ndarray]], scope: object = None,
) -> dict[str, np.ndarray]:
    """The arrays cached in ``folder/<prefix>-<hash of key>.npz``, or ``build()``'s, then cached
    there atomically (``key``: JSON-able, all the arrays depend on; ``folder`` None: no cache).

    A cache file is used only if :func:`read_npz` accepts it with the ``expected`` layout; a
    damaged one (truncated, corrupt, another shape or dtype) is logged and rebuilt, one that
    cannot be written is logged and skipped.

    ``scope`` (JSON-able) names the dataset and settings a cache is of (e.g. the folder and the
    image size; ``key`` adds what changes with the data, e.g. file times). With it the file is
    ``<prefix>-<hash of scope>-<hash of key>.npz``, and writing it removes (logged at info level)
    the caches of the same scope under another key: older versions of the data that no key
    can match again. Caches of other scopes (other settings, another dataset in a shared
    folder) are kept.
    """
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
    scope_digest = None if scope is None else hashlib.sha256(json.dumps(scope).encode()).hexdigest()[:8]
    name = f"{prefix}-{digest}.npz" if scope_digest is None else f"{prefix}-{scope_digest}-{digest}.npz"
    path = None if folder is None else Path(folder).expanduser() / name
    if path is not None and path.is_file():
        try:
            return read_npz(path, expected)
        except DataError as exc:
            log.warning("rebuilding the damaged cache %s", exc)
    arrays = build()
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as exc:  # a read-only place: work without a cache
            log.warning("cannot write the cache %s (%s); set cache_dir or cache=false", path, exc)
        else:
            if scope_digest is not None:
                _remove_stale(path, prefix, scope_digest)
    return arrays
