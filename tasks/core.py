"""The shared core of the task loaders: class pools and the small steps of an episode.

A loader decodes its data and says which classes each split has; the composition of an episode
is here, for every loader (and a new one) to reuse:

* :class:`DensePool` / :class:`RaggedPool`: one split's classes and where their examples are.
* :func:`compose`: one episode: draw ``n_way`` classes (their order is the labelling) and
  ``k_shot + q_query`` examples of each, apply the class transforms ``f(batch, classes)``,
  map the pixels with a :class:`PixelNorm`, cut support / query.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metanas.errors import ConfigError

from .base import Task

__all__ = [
    "UNIT_PIXELS", "ClassTransform", "DensePool", "PixelNorm", "RaggedPool", "compose", "draw_episode",
    "make_task", "sample_task", "sample_task_ragged",
]

#: ``f(batch, classes) -> batch`` on the drawn examples ``(n_way, k_shot + q_query, *item)`` (a
#: fresh array, may change in place) and their class ids ``(n_way,)``; keeps the first two axes.
ClassTransform = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------ pixels
@dataclass(frozen=True, eq=False)
class PixelNorm:
    """The pixel normaliser: stored values -> float32 ``(x / divisor * scale - shift) / std``.

    Steps left None are skipped; ``divisor`` divides uint8 input only (other dtypes are on their
    final scale); ``scale`` is a scalar or per channel ``(C,)``, ``shift`` and ``std`` per
    channel. uint8 pixels reach [0, 1] in two roundings, each kept where it was so that tasks
    stay bit-identical (they differ in the last bit for half of the 256 values): ``x / 255``
    (:data:`UNIT_PIXELS`: Omniglot, :func:`sample_task`, adapters) and ``x * float32(1/255)``
    (image folders and miniImageNet, through :func:`sample_task_ragged`).
    """

    divisor: float | None = None
    scale: float | np.ndarray | None = None
    shift: np.ndarray | None = None
    std: np.ndarray | None = None

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
        classes, then one ``rng.permutation`` of each chosen class's examples, in label order.

        Raises:
            ConfigError: see :func:`draw_episode`.
        """
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
        transform: optional :data:`ClassTransform` (e.g. per-class rotation).
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
