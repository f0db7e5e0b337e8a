"""The task-sampler contract: :class:`Task`, the :class:`TaskSampler` protocol and helpers.

A *task* (episode) is an N-way K-shot Q-query classification problem: ``n_way`` classes drawn
from one split of a dataset, ``k_shot`` labelled support examples and ``q_query`` query
examples per class. Labels are a random relabelling ``0..n_way-1`` of the chosen classes, drawn
afresh for every task, so a model cannot memorise which label belongs to which class
(Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016; Finn et al., MAML,
ICML 2017).

Anything with the attributes ``n_way``, ``k_shot``, ``q_query``, ``input_shape`` and a method
``sample(split, rng) -> Task`` is a sampler; :func:`check_sampler` validates one once, at
construction time of whatever consumes it. :func:`sample_task` is the generic, vectorised
N-way K-shot Q-query composition over an array of per-class examples that built-in samplers
use and custom samplers may reuse.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Literal, Protocol, get_args, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from metanas.errors import ConfigError

__all__ = [
    "SPLITS",
    "Split",
    "Task",
    "TaskSampler",
    "check_sampler",
    "check_split",
    "draw_episode",
    "sample_task",
    "sample_task_ragged",
]

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = get_args(Split)


def check_split(split: object) -> Split:
    """Return ``split`` unchanged if it names a split, else raise :class:`ConfigError`.

    Args:
        split: the value to check.

    Returns:
        ``split``, typed as :data:`Split`.

    Raises:
        ConfigError: if ``split`` is not one of :data:`SPLITS`.
    """
    if not isinstance(split, str) or split not in SPLITS:
        raise ConfigError(
            f"split={split!r} is not a task split; use one of {', '.join(map(repr, SPLITS))}"
        )
    return split  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One few-shot classification episode.

    Examples are ordered class-major: rows ``i*k_shot .. (i+1)*k_shot-1`` of the support set
    (and ``i*q_query ..`` of the query set) belong to label ``i``, whose global class id is
    ``classes[i]``. The label-to-class assignment is random per task.

    Attributes:
        support_x: float32 tensor of shape ``(n_way * k_shot, C, H, W)``.
        support_y: int64 tensor of shape ``(n_way * k_shot,)``, values in ``0..n_way-1``.
        query_x: float32 tensor of shape ``(n_way * q_query, C, H, W)``.
        query_y: int64 tensor of shape ``(n_way * q_query,)``, values in ``0..n_way-1``.
        classes: the global class id of each label (``classes[label]``), for logging.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.classes)
        ns, nq = self.support_x.shape[0], self.query_x.shape[0]
        if (
            n < 1
            or self.support_y.shape != (ns,)
            or self.query_y.shape != (nq,)
            or ns % n
            or nq % n
            or self.support_x.shape[1:] != self.query_x.shape[1:]
        ):
            raise ConfigError(
                "inconsistent Task: support_x "
                f"{tuple(self.support_x.shape)}, support_y {tuple(self.support_y.shape)}, "
                f"query_x {tuple(self.query_x.shape)}, query_y {tuple(self.query_y.shape)}, "
                f"{n} classes; build it with x of shape (n_way*k, C, H, W), y of shape "
                "(n_way*k,) and one entry of `classes` per label (see metanas.tasks.sample_task)"
            )

    @property
    def n_way(self) -> int:
        """Number of classes (labels) in the task."""
        return len(self.classes)

    @property
    def k_shot(self) -> int:
        """Support examples per class."""
        return self.support_x.shape[0] // self.n_way

    @property
    def q_query(self) -> int:
        """Query examples per class."""
        return self.query_x.shape[0] // self.n_way

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Task:
        """Return a copy with every tensor moved to ``device``.

        Args:
            device: target device, e.g. ``"cpu"`` or ``torch.device("cuda", 0)``.
            non_blocking: passed to :meth:`torch.Tensor.to`.

        Returns:
            A new :class:`Task`; ``self`` is unchanged.
        """
        return Task(
            support_x=self.support_x.to(device, non_blocking=non_blocking),
            support_y=self.support_y.to(device, non_blocking=non_blocking),
            query_x=self.query_x.to(device, non_blocking=non_blocking),
            query_y=self.query_y.to(device, non_blocking=non_blocking),
            classes=self.classes,
        )


@runtime_checkable
class TaskSampler(Protocol):
    """A distribution of few-shot tasks with train / val / test splits of disjoint classes.

    Attributes:
        n_way: classes per task.
        k_shot: support examples per class.
        q_query: query examples per class.
        input_shape: ``(C, H, W)`` of one example.

    ``sample`` must take all its randomness from ``rng`` (no global RNG), so that a generator
    seeded the same way reproduces the same sequence of tasks.
    """

    n_way: int
    k_shot: int
    q_query: int
    input_shape: tuple[int, int, int]

    def sample(self, split: Split, rng: np.random.Generator) -> Task:
        """Draw one task from ``split`` using only ``rng``."""
        ...


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_sampler(obj: object) -> TaskSampler:
    """Check once that ``obj`` follows the :class:`TaskSampler` protocol.

    Args:
        obj: the candidate sampler.

    Returns:
        ``obj`` itself.

    Raises:
        ConfigError: listing every missing or mistyped member and how to fix it.
    """
    problems: list[str] = []
    for name, lowest in (("n_way", 2), ("k_shot", 1), ("q_query", 1)):
        if not hasattr(obj, name):
            problems.append(f"missing attribute `{name}`; set self.{name} to an int >= {lowest}")
            continue
        value = getattr(obj, name)
        if not _is_int(value) or value < lowest:
            problems.append(
                f"`{name}` is {value!r} ({type(value).__name__}); it must be an int >= {lowest}"
            )
    if not hasattr(obj, "input_shape"):
        problems.append("missing attribute `input_shape`; set self.input_shape = (C, H, W)")
    else:
        shape = obj.input_shape  # type: ignore[attr-defined]
        if not (
            isinstance(shape, tuple)
            and len(shape) == 3
            and all(_is_int(s) and s >= 1 for s in shape)
        ):
            problems.append(
                f"`input_shape` is {shape!r}; it must be a tuple (C, H, W) of 3 positive ints"
            )
    sample = getattr(obj, "sample", None)
    if sample is None or not callable(sample):
        problems.append(
            "missing method `sample`; implement sample(split, rng) -> Task taking a split name "
            "and a numpy.random.Generator"
        )
    else:
        try:
            inspect.signature(sample).bind("train", np.random.default_rng(0))
        except TypeError:
            problems.append(
                f"`sample{inspect.signature(sample)}` cannot be called as sample(split, rng); "
                "implement sample(split, rng) -> Task"
            )
        except ValueError:  # no signature available (some builtins): accept it
            pass
    if problems:
        raise ConfigError(
            f"{type(obj).__name__} is not a TaskSampler: " + "; ".join(problems)
        )
    return obj  # type: ignore[return-value]


def draw_episode(
    n_classes: int,
    n_examples: int,
    n_way: int,
    n_per_class: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose the classes and examples of one episode, without replacement.

    Args:
        n_classes: size of the class pool.
        n_examples: examples available per class.
        n_way: classes to draw (distinct, in random order: position = label).
        n_per_class: examples to draw per class (distinct within a class).
        rng: the only source of randomness.

    Returns:
        ``(class_pos, example_idx)``: int64 arrays of shape ``(n_way,)`` (positions in the
        pool) and ``(n_way, n_per_class)`` (example indices per chosen class).

    Raises:
        ConfigError: if the pool has fewer than ``n_way`` classes or fewer than
            ``n_per_class`` examples per class.
    """
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(
            f"rng is a {type(rng).__name__}; pass a numpy.random.Generator, e.g. "
            "numpy.random.default_rng(seed)"
        )
    if n_way > n_classes:
        raise ConfigError(
            f"n_way={n_way} but the class pool has only {n_classes} classes; lower n_way"
        )
    if n_per_class > n_examples:
        raise ConfigError(
            f"k_shot + q_query = {n_per_class} but each class has only {n_examples} examples; "
            "lower k_shot or q_query"
        )
    class_pos = rng.choice(n_classes, size=n_way, replace=False)
    example_idx = np.argsort(rng.random((n_way, n_examples)), axis=1)[:, :n_per_class]
    return class_pos, example_idx


def sample_task(
    images: np.ndarray,
    class_ids: np.ndarray,
    n_way: int,
    k_shot: int,
    q_query: int,
    rng: np.random.Generator,
    transform: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    rows: np.ndarray | None = None,
) -> Task:
    """Compose one N-way K-shot Q-query task from an array of per-class examples.

    ``n_way`` distinct classes are drawn from ``class_ids`` in random order (the order is the
    labelling), then ``k_shot + q_query`` distinct examples of each; the first ``k_shot`` go to
    the support set and the rest to the query set. Indexing is vectorised and the tensors are
    built in numpy: about 0.1 ms for a 5-way 1-shot 15-query task of 28x28 images on one CPU
    core, tensor creation included.

    Args:
        images: per-class examples, shape ``(n_rows, n_examples, H, W)`` or
            ``(n_rows, n_examples, C, H, W)``; uint8 is scaled to [0, 1] by ``1/255``, any other
            dtype is cast to float32 unchanged.
        class_ids: int array ``(n_pool,)``, the classes to draw from (e.g. one split's). Unless
            ``rows`` is given, each id is also its row in ``images``.
        n_way: classes per task.
        k_shot: support examples per class.
        q_query: query examples per class.
        rng: the only source of randomness.
        transform: optional ``f(batch, classes) -> batch`` applied before the float
            conversion to the drawn examples, ``batch`` of shape
            ``(n_way, k_shot + q_query, *item_shape)`` and ``classes`` the chosen ids
            ``(n_way,)``; it must keep the leading two axes (e.g. per-class rotation).
        rows: optional int array ``(n_pool,)``: ``class_ids[i]`` draws its examples from
            ``images[rows[i]]`` (several classes may share a row, e.g. rotated copies).

    Returns:
        The :class:`Task`, with ``classes[label]`` the global id of each label.

    Raises:
        ConfigError: if the pool or the examples per class are too few, or an item is neither
            ``(H, W)`` nor ``(C, H, W)``.
    """
    if images.ndim not in (4, 5):
        raise ConfigError(
            f"images has shape {images.shape}; pass per-class examples of shape "
            "(n_classes, n_examples, H, W) or (n_classes, n_examples, C, H, W)"
        )
    n_per_class = k_shot + q_query
    class_pos, example_idx = draw_episode(
        len(class_ids), images.shape[1], n_way, n_per_class, rng
    )
    chosen = np.asarray(class_ids)[class_pos]
    row = chosen if rows is None else np.asarray(rows)[class_pos]
    batch = images[row[:, None], example_idx]  # (n_way, k+q, *item)
    if transform is not None:
        batch = transform(batch, chosen)
    if batch.ndim == 4:
        batch = batch[:, :, None]  # (n_way, k+q, 1, H, W)
    # Small numpy ops cost ~1 us each against ~10 us for torch ops on tiny tensors, so build
    # everything in numpy and wrap it with torch.from_numpy (zero-copy) at the end.
    if batch.dtype == np.uint8:
        support = np.divide(batch[:, :k_shot], np.float32(255), dtype=np.float32)
        query = np.divide(batch[:, k_shot:], np.float32(255), dtype=np.float32)
    else:
        support = np.array(batch[:, :k_shot], dtype=np.float32)
        query = np.array(batch[:, k_shot:], dtype=np.float32)
    return _make_task(support, query, chosen, n_way, k_shot, q_query)


def _make_task(
    support: np.ndarray, query: np.ndarray, chosen: np.ndarray, n_way: int, k_shot: int, q_query: int
) -> Task:
    """Wrap float32 arrays ``(n_way, k_shot, *item)`` / ``(n_way, q_query, *item)`` in a Task."""
    item = support.shape[2:]
    labels = np.arange(n_way, dtype=np.int64)
    return Task(
        support_x=torch.from_numpy(support.reshape(n_way * k_shot, *item)),
        support_y=torch.from_numpy(labels.repeat(k_shot)),
        query_x=torch.from_numpy(query.reshape(n_way * q_query, *item)),
        query_y=torch.from_numpy(labels.repeat(q_query)),
        classes=tuple(chosen.tolist()),
    )


def sample_task_ragged(
    images: np.ndarray,
    class_rows: dict[int, np.ndarray] | list[np.ndarray],
    class_ids: np.ndarray,
    n_way: int,
    k_shot: int,
    q_query: int,
    rng: np.random.Generator,
    scale: float | None = None,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> Task:
    """Compose one N-way K-shot Q-query task when classes have different numbers of examples.

    ``n_way`` distinct classes are drawn from ``class_ids`` in random order (the labelling),
    then ``k_shot + q_query`` distinct examples of each; the first ``k_shot`` go to the support
    set. The random draws are: one ``rng.choice`` of the classes, then one ``rng.permutation``
    per chosen class, in label order.

    Args:
        images: all examples, ``(n_examples, C, H, W)`` (any dtype).
        class_rows: ``class_rows[c]`` is the int array of rows of ``images`` of class ``c``.
        class_ids: int array ``(n_pool,)``, the classes to draw from.
        n_way, k_shot, q_query: the episode's shape.
        rng: the only source of randomness.
        scale: multiply the examples by this (e.g. ``1/255`` for uint8); None: keep values.
        mean, std: optional per-channel ``(C,)`` normalisation applied after ``scale``.

    Returns:
        The :class:`Task`; ``classes[label]`` is the class id.

    Raises:
        ConfigError: fewer than ``n_way`` classes in the pool, or a chosen class with fewer
            than ``k_shot + q_query`` examples.
    """
    class_ids = np.asarray(class_ids)
    if n_way > len(class_ids):
        raise ConfigError(
            f"n_way={n_way} but the class pool has only {len(class_ids)} classes; lower n_way "
            "or give this split more classes"
        )
    n_per_class = k_shot + q_query
    chosen = class_ids[rng.choice(len(class_ids), size=n_way, replace=False)]
    rows = []
    for c in chosen.tolist():
        pool = np.asarray(class_rows[c])
        if len(pool) < n_per_class:
            raise ConfigError(
                f"class {c} has {len(pool)} examples but k_shot + q_query = {n_per_class}; "
                "lower k_shot or q_query"
            )
        rows.append(pool[rng.permutation(len(pool))[:n_per_class]])
    batch = np.asarray(images[np.stack(rows)], dtype=np.float32)  # (n_way, k+q, C, H, W)
    if scale is not None:
        batch *= np.float32(scale)
    if mean is not None:
        batch -= np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    if std is not None:
        batch /= np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return _make_task(
        np.ascontiguousarray(batch[:, :k_shot]), np.ascontiguousarray(batch[:, k_shot:]),
        chosen, n_way, k_shot, q_query,
    )
