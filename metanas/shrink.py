"""Progressive shrinking of the supernet during meta-training.

Every ``every`` meta-steps from meta-step ``start`` on, the meta-alphas are checked edge by
edge. On an edge, the meta-weight of a kept op is its softmax weight over the edge's kept ops
at temperature 1 (no soft pruning): ``w_o = exp(a_o) / sum_{kept q} exp(a_q)``. A kept op is
*dominated* at a check when ``w_o < ratio * max_{kept q} w_q``, i.e. when its logit trails the
edge's best one by more than ``-ln(ratio)``. Each op counts its consecutive dominated checks
(a check where it is not dominated resets the count to 0). An op whose count reaches
``patience`` is removed for good, subject to two limits: an edge keeps at least ``min_ops``
ops, and it always keeps its strongest op other than ``none`` (the genotype of an edge names
such an op). When more ops qualify than an edge may lose, the ones with the smallest weight
go first (ties: the lowest op index); the others stay candidates and keep their count.

The edge's largest op is never dominated (``ratio < 1``), so an edge never loses its last op.
The state (the mask of kept ops and the counts) is plain Python data, checkpointed by the
trainer, so a resumed run shrinks exactly as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metanas.tasks.core import check_int

from .errors import ConfigError
from .search_space import OpMask, SearchSpaceConfig, cell_kinds

__all__ = ["Removal", "ShrinkConfig", "kept_count", "removed_weight_names", "shrink_check", "zero_counts"]


@dataclass(frozen=True)
class ShrinkConfig:
    """Settings of progressive shrinking (``trainer.shrink``); off by default.

    Attributes:
        every: check every this many meta-steps (0: never shrink).
        start: first meta-step (counted after its update) at which a check may happen.
        ratio: an op is dominated when its meta-weight is below ``ratio`` times its edge's
            largest one, in ``(0, 1)``.
        patience: consecutive dominated checks after which an op is removed (>= 1).
        min_ops: ops every edge keeps at least (>= 1, below the number of candidate ops).
    """

    every: int = 0
    start: int = 0
    ratio: float = 0.1
    patience: int = 3
    min_ops: int = 1

    def __post_init__(self) -> None:
        for name, lowest in (("every", 0), ("start", 0), ("patience", 1), ("min_ops", 1)):
            check_int(f"trainer.shrink.{name}", getattr(self, name), lowest,
                      fix=f"set trainer.shrink.{name} to a whole number >= {lowest}")
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r < 1.0:
            raise ConfigError(
                f"trainer.shrink.ratio={r!r} is outside (0, 1); set it to a fraction of the edge's "
                "largest op weight, e.g. 0.1"
            )
        object.__setattr__(self, "ratio", float(r))

    @property
    def enabled(self) -> bool:
        """Whether shrinking happens at all."""
        return self.every > 0

    def due(self, step: int) -> bool:
        """Whether meta-step ``step`` (counted after its update) is a check."""
        return self.enabled and step >= self.start and step % self.every == 0

    def check_space(self, space: SearchSpaceConfig) -> None:
        """Raise :class:`ConfigError` unless ``min_ops`` leaves something to remove."""
        if self.enabled and self.min_ops >= space.n_ops:
            raise ConfigError(
                f"trainer.shrink.min_ops={self.min_ops} is not below the {space.n_ops} candidate ops "
                f"per edge, so no op could ever be removed; set it to 1..{space.n_ops - 1} or turn "
                "shrinking off (trainer.shrink.every=0)"
            )

    @classmethod
    def from_value(cls, value: Any) -> ShrinkConfig:
        """A ShrinkConfig from itself or a mapping of its settings (unknown keys refused)."""
        if isinstance(value, ShrinkConfig):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"trainer.shrink must be a mapping of settings, got {value!r}")
        known = ("every", "start", "ratio", "patience", "min_ops")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ConfigError(f"unknown trainer.shrink key(s) {unknown}; valid keys are {list(known)}")
        return cls(**dict(value))


class Removal(NamedTuple):
    """One removed op: cell kind, edge index, op name and its meta-weight at removal."""

    kind: str
    edge: int
    op: str
    weight: float


def shrink_check(
    alphas: Mapping[str, Tensor],
    mask: OpMask,
    counts: Mapping[str, tuple[tuple[int, ...], ...]],
    space: SearchSpaceConfig,
    cfg: ShrinkConfig,
) -> tuple[OpMask, dict[str, tuple[tuple[int, ...], ...]], list[Removal]]:
    """One check of the dominance rule (module docstring) on the meta-alphas.

    Args:
        alphas: meta-alphas, kind -> ``(n_edges, n_ops)`` (plus any edge alphas, unused).
        mask: the kept ops before the check (every op-weight kind of the alphas).
        counts: per kind, edge and op the consecutive dominated checks so far.
        space: the search space.
        cfg: the shrinking settings.

    Returns:
        The new mask, the new counts and the ops removed (in kind, edge, removal order).
    """
    new_mask = {k: [list(r) for r in rows] for k, rows in mask.items()}
    new_counts = {k: [list(r) for r in rows] for k, rows in counts.items()}
    removed: list[Removal] = []
    ops = space.ops
    for kind in cell_kinds(space):
        a = alphas[kind].detach().cpu().double()
        for e in range(space.n_edges):
            kept = [o for o in range(space.n_ops) if new_mask[kind][e][o]]
            logits = torch.stack([a[e, o] for o in kept])
            w = dict(zip(kept, torch.softmax(logits, dim=0).tolist()))
            best = max(w.values())
            row = new_counts[kind][e]
            for o in kept:
                row[o] = row[o] + 1 if w[o] < cfg.ratio * best else 0
            real = [o for o in kept if ops[o] != "none"]
            protected = max(real, key=lambda o: (w[o], -o)) if real else None
            candidates = sorted((o for o in kept if row[o] >= cfg.patience and o != protected),
                                key=lambda o: (w[o], o))
            room = len(kept) - cfg.min_ops
            for o in candidates[: max(room, 0)]:
                new_mask[kind][e][o] = False
                removed.append(Removal(kind, e, ops[o], w[o]))
    frozen_mask = {k: tuple(tuple(r) for r in rows) for k, rows in new_mask.items()}
    frozen_counts = {k: tuple(tuple(r) for r in rows) for k, rows in new_counts.items()}
    return frozen_mask, frozen_counts, removed


def zero_counts(mask: OpMask) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Counts of 0 for every op of ``mask``'s shape."""
    return {k: tuple(tuple(0 for _ in r) for r in rows) for k, rows in mask.items()}


def kept_count(mask: OpMask, space: SearchSpaceConfig) -> int:
    """Kept ops over all edges of the cell kinds the network has."""
    return sum(sum(r) for k in cell_kinds(space) for r in mask[k])


def removed_weight_names(mask: OpMask, net: torch.nn.Module) -> set[str]:
    """Names of the network's weights that belong to removed ops (``cells.{k}.edges.{e}.ops.{o}.*``)."""
    out = set()
    cells = getattr(net, "cells", ())
    for c, cell in enumerate(cells):
        kind = "reduce" if cell.reduction else "normal"
        for e, edge in enumerate(cell.edges):
            for o, op in enumerate(edge.ops):
                if not mask[kind][e][o]:
                    out.update(f"cells.{c}.edges.{e}.ops.{o}.{n}" for n, _ in op.named_parameters())
    return out

