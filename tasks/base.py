"""The task-sampler contract: :class:`Task`, the :class:`TaskSampler` protocol and helpers.

A *task* (episode) is an N-way K-shot Q-query classification problem: ``n_way`` classes drawn
from one split of a dataset, ``k_shot`` labelled support examples and ``q_query`` query
examples per class. Labels are a random relabelling ``0..n_way-1`` of the chosen classes, drawn
afresh for every task, so a model cannot memorise which label belongs to which class
(Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016; Finn et al., MAML,
ICML 2017).

Anything with the attributes ``n_way``, ``k_shot``, ``q_query``, ``input_shape`` and a method
``sample(split, rng) -> Task`` is a sampler; :func:`check_sampler` validates one once, at
construction time of whatever consumes it. The composition of episodes that built-in samplers
use and custom samplers may reuse is in :mod:`metanas.tasks.core`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Literal, Protocol, get_args, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from metanas.errors import ConfigError

__all__ = ["SPLITS", "Split", "Task", "TaskSampler", "check_sampler", "check_split"]

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
