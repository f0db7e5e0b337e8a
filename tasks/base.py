"""The task-sampler contract: :class:`Task`, the :class:`TaskSampler` protocol and helpers.

A *task* (episode) is an N-way K-shot Q-query classification problem: ``n_way`` classes drawn
from one split of a dataset, ``k_shot`` labelled support examples and ``q_query`` query
examples per class. Labels are a random relabelling ``0..n_way-1`` of the chosen classes, drawn
afresh for every task, so a model cannot memorise which label belongs to which class
(Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016; Finn et al., MAML,
ICML 2017).

Anything with the attributes ``n_way``, ``k_shot``, ``q_query``, ``input_shape`` and a method
``sample(split, rng) -> Task`` is a sampler; :func:`check_sampler` validates one once, at
construction time of whatever consumes it (its members, and a task drawn twice alike from
each split used), and :func:`check_task` is the cheap check of each task drawn later. The
composition of episodes that built-in samplers use and custom samplers may reuse is in
:mod:`metanas.tasks.core`.
"""

from __future__ import annotations

import dataclasses
import inspect
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Protocol, get_args, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from metanas.errors import ConfigError, MetaNASError

__all__ = ["SPLITS", "Split", "Task", "TaskSampler", "check_sampler", "check_split", "check_task"]

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = get_args(Split)


def check_split(split: object) -> Split:
    """``split``, typed as :data:`Split`; :class:`ConfigError` if it is not one of :data:`SPLITS`."""
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
    seeded the same way reproduces the same sequence of tasks. A sampler that cannot (one
    that wraps a source with its own random state) sets ``reproducible = False``;
    :func:`check_sampler` then does not draw from it.
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


def _name(obj: object) -> str:
    return type(obj).__name__


def check_task(
    task: object, sampler: TaskSampler, split: str, float_dtype: torch.dtype = torch.float32
) -> Task:
    """The cheap check of one drawn task: its type, shapes, dtypes and label range.

    No data is copied and nothing is drawn; the trainer runs it on every task it draws.

    Args:
        task: what ``sampler.sample(split, rng)`` returned.
        sampler: the sampler (its declared ``n_way``, ``k_shot``, ``q_query``, ``input_shape``).
        split: the split it was drawn from (for the message).
        float_dtype: the dtype the examples must have (that of the model; float32 by default).

    Returns:
        ``task``, typed as a :class:`Task`.

    Raises:
        ConfigError: one line naming the sampler, what is wrong and the fix.
    """
    where = f"{_name(sampler)}.sample({split!r}, rng)"
    if not isinstance(task, Task):
        raise ConfigError(
            f"{where} returned a {type(task).__name__}, not a metanas.tasks.Task; return "
            "Task(support_x, support_y, query_x, query_y, classes) (see metanas.tasks.sample_task)"
        )
    fields = ("support_x", "support_y", "query_x", "query_y")
    plain = [f for f in fields if not isinstance(getattr(task, f), Tensor)]
    if plain:
        raise ConfigError(
            f"{where} returned a Task whose {', '.join(plain)} {'is' if len(plain) == 1 else 'are'} "
            f"{type(getattr(task, plain[0])).__name__}; make them torch tensors (torch.from_numpy)"
        )
    n, k, q = sampler.n_way, sampler.k_shot, sampler.q_query
    shape = tuple(sampler.input_shape)
    if (task.n_way, tuple(task.support_x.shape), tuple(task.query_x.shape)) != (n, (n * k, *shape), (n * q, *shape)):
        raise ConfigError(
            f"{where} returned a {task.n_way}-way task with support_x {tuple(task.support_x.shape)} and "
            f"query_x {tuple(task.query_x.shape)}, but the sampler declares n_way={n}, k_shot={k}, "
            f"q_query={q}, input_shape={shape}, i.e. ({n * k}, {', '.join(map(str, shape))}) and "
            f"({n * q}, {', '.join(map(str, shape))}); return tasks of the declared shape or declare "
            "the shape it returns"
        )
    dtypes = (task.support_x.dtype, task.query_x.dtype, task.support_y.dtype, task.query_y.dtype)
    if dtypes != (float_dtype, float_dtype, torch.int64, torch.int64):
        raise ConfigError(
            f"{where} returned support_x/query_x/support_y/query_y of dtypes "
            f"{'/'.join(str(d).removeprefix('torch.') for d in dtypes)}; examples must be "
            f"{str(float_dtype).removeprefix('torch.')} and labels int64 (x.float(), y.long())"
        )
    for name in ("support_y", "query_y"):
        y = getattr(task, name)
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= n:
            raise ConfigError(
                f"{where} returned {name} with labels {low}..{high}, outside 0..{n - 1}; label the "
                f"n_way={n} classes of a task 0..{n - 1} (label i is classes[i])"
            )
    return task


def _check_order(task: Task, sampler: TaskSampler, split: str) -> None:
    """Labels class-major, as :class:`Task` documents: label ``i`` in block ``i`` of each set."""
    for name, per_class in (("support_y", sampler.k_shot), ("query_y", sampler.q_query)):
        y = getattr(task, name)
        expected = torch.arange(sampler.n_way, device=y.device).repeat_interleave(per_class)
        if not torch.equal(y, expected):
            head = 2 * per_class + 1
            raise ConfigError(
                f"{_name(sampler)}.sample({split!r}, rng) returned {name} starting "
                f"{y[:head].tolist()}, not class-major; order each set by label, {per_class} "
                f"example(s) of label 0, then of label 1, ... ({expected[:head].tolist()} ...), "
                "as metanas.tasks.Task documents"
            )


def _same(a: Task, b: Task) -> bool:
    """Equal classes and tensors (NaN equal to NaN)."""
    return a.classes == b.classes and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True)
        if x.is_floating_point() else torch.equal(x, y)
        for x, y in ((getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y"))
    )


def _draw(obj: TaskSampler, split: str, seed: int) -> object:
    """``obj.sample(split, default_rng(seed))``; a failure as one line naming the sampler."""
    where = f"{_name(obj)}.sample({split!r}, rng)"
    try:
        return obj.sample(split, np.random.default_rng(seed))
    except MetaNASError as exc:
        try:
            named = type(exc)(f"{where}: {exc}")
        except TypeError:  # an error class that takes other arguments: as it is
            raise exc from None
        raise named from exc
    except Exception as exc:  # a bug or bad data in a custom sampler: say where, keep the cause
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise ConfigError(
            f"{where} raised {type(exc).__name__}: {exc} (at {Path(frame.filename).name}:"
            f"{frame.lineno}); fix the sampler so that sample(split, rng) returns a metanas.tasks.Task"
        ) from exc


def check_sampler(
    obj: object, splits: Iterable[str] = SPLITS, float_dtype: torch.dtype = torch.float32, seed: int = 0
) -> TaskSampler:
    """Check once that ``obj`` follows the :class:`TaskSampler` protocol, and try it.

    First its members (``n_way``, ``k_shot``, ``q_query``, ``input_shape``, ``sample``). Then,
    from each of ``splits``, it draws one task twice with generators seeded alike
    (``default_rng(seed)``, independent of any training generator): each must pass
    :func:`check_task` (a :class:`Task` of the declared shape, ``float_dtype`` examples, int64
    labels in ``0..n_way-1``) with labels class-major, and the two must be equal (a sampler
    that draws from global random state, or its own, fails here). A sampler with
    ``reproducible = False`` (:class:`~metanas.tasks.TasksetAdapter`: its taskset has its own
    random state) is not drawn from, so as not to move that state.

    Args:
        obj: the candidate sampler.
        splits: the splits to draw from, those that will be used (e.g. ``("test",)`` for a
            test-only dataset); ``()`` checks the members only.
        float_dtype: the dtype examples must have (that of the model).
        seed: seed of the check's generators.

    Returns:
        ``obj`` itself.

    Raises:
        ConfigError: listing every missing or mistyped member and how to fix it, or one line
            naming the sampler, what its task got wrong and the fix; an unknown split name.
        DataError: a split the sampler cannot draw from (e.g. too few classes), with the
            sampler's name.
    """
    splits = tuple(check_split(s) for s in splits)
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
    sampler: TaskSampler = obj  # type: ignore[assignment]
    if not getattr(obj, "reproducible", True):
        return sampler
    for split in splits:
        first = check_task(_draw(sampler, split, seed), sampler, split, float_dtype)
        _check_order(first, sampler, split)
        second = check_task(_draw(sampler, split, seed), sampler, split, float_dtype)
        if not _same(first, second):
            raise ConfigError(
                f"{_name(sampler)}.sample({split!r}, rng) returned different tasks for two generators "
                "seeded alike; take all randomness from the rng argument (no np.random.*, "
                "random.*, torch.rand* or a generator of its own), so that seeds reproduce"
            )
    return sampler
