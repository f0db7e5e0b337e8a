"""Discrete architectures (genotypes): data type, JSON round-trip, derivation from alphas, distance.

A genotype is parsed with the ``json`` module only (never ``eval``), and validated structurally.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metanas.errors import ConfigError
from metanas.search_space.network import (
    OpMask,
    SearchSpaceConfig,
    alpha_shapes,
    check_alphas,
    keep_tensor,
)
from metanas.search_space.normalizer import (
    node_offsets,
    normalize_alphas,
    normalize_edge_alphas,
)

__all__ = ["Genotype", "derive_genotype", "genotype_distance"]

Node = tuple[tuple[str, int], ...]
_KEYS = ("normal", "normal_concat", "reduce", "reduce_concat")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nodes(field: str, value: Any) -> tuple[Node, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"genotype.{field} must be a list of nodes, got {type(value).__name__}")
    nodes = []
    for i, node in enumerate(value):
        if not isinstance(node, (list, tuple)):
            raise ConfigError(
                f"genotype.{field}[{i}] must be a list of [op_name, input_index] pairs, "
                f"got {node!r}"
            )
        pairs = []
        for pair in node:
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not isinstance(pair[0], str)
                or not _is_int(pair[1])
                or pair[1] < 0
            ):
                raise ConfigError(
                    f"genotype.{field}[{i}] holds {pair!r}; each entry must be "
                    "[op_name, input_index] with a string and a non-negative integer"
                )
            pairs.append((pair[0], pair[1]))
        nodes.append(tuple(pairs))
    return tuple(nodes)


def _concat(field: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= 0 for v in value):
        raise ConfigError(
            f"genotype.{field} must be a list of non-negative node indices, got {value!r}"
        )
    return tuple(value)


@dataclass(frozen=True)
class Genotype:
    """A discrete cell architecture for normal and reduction cells.

    Attributes:
        normal: for each intermediate node, its chosen ``(op_name, input_index)`` pairs; inputs
            0 and 1 are the cell inputs, ``2 + m`` is intermediate node ``m``.
        normal_concat: state indices concatenated into the cell output.
        reduce, reduce_concat: the same for reduction cells (empty without reduction cells;
            ``normal`` is empty for a network of reduction cells alone).

    Lists are accepted and normalised to tuples; malformed structure raises ConfigError.
    """

    normal: tuple[Node, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Node, ...] = ()
    reduce_concat: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in ("normal", "reduce"):
            object.__setattr__(self, f, _nodes(f, getattr(self, f)))
            c = f"{f}_concat"
            object.__setattr__(self, c, _concat(c, getattr(self, c)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: ``{"normal": [[[op, idx], ...], ...], "normal_concat": [...], ...}``."""
        return {
            "normal": [[list(p) for p in node] for node in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[list(p) for p in node] for node in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Genotype:
        """Validate and build from a dict of :meth:`to_dict`'s form (``reduce*`` optional)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a genotype must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_KEYS))
        missing = [k for k in ("normal", "normal_concat") if k not in d]
        if unknown or missing:
            raise ConfigError(
                f"malformed genotype: unknown keys {unknown}, missing keys {missing}; "
                f"the keys are {list(_KEYS)} (reduce/reduce_concat optional)"
            )
        return cls(**dict(d))

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> Genotype:
        """Parse a JSON string (json module only, never eval); ConfigError when malformed."""
        try:
            d = json.loads(s)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(
                f"genotype is not valid JSON ({exc}); expected e.g. "
                '{"normal": [[["sep_conv_3x3", 0], ["skip_connect", 1]]], "normal_concat": [2]}'
            ) from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Genotype:
        """Read a genotype JSON file written by :meth:`save`."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read genotype file {str(path)!r} ({exc}); check the path"
            ) from None
        return cls.from_json(text)


def _derive_cell(
    w: Tensor, beta: Tensor | None, ops: tuple[str, ...], n_nodes: int, k: int,
    kept: Tensor | None = None,
) -> tuple[Node, ...]:
    """Genotype nodes from op weights ``w`` ``(n_edges, n_ops)`` and edge weights ``beta``;
    ``kept`` ``(n_edges, n_ops)``: the ops of a shrunk supernet (None: all)."""
    keep = torch.tensor([o != "none" for o in ops])
    if kept is not None:
        keep = keep & kept
    masked = torch.where(keep, w, torch.full_like(w, -1.0))  # weights are >= 0, so -1 never wins
    best_w, _ = masked.max(dim=-1)
    strength = best_w if beta is None else best_w * beta
    strength, masked = strength.tolist(), masked.tolist()
    nodes = []
    for i, off in enumerate(node_offsets(n_nodes)):
        n_in = 2 + i
        # sort by descending strength, ties -> lowest input index; keep top-k in input order
        chosen = sorted(sorted(range(n_in), key=lambda j: (-strength[off + j], j))[: min(k, n_in)])
        node = []
        for j in chosen:
            row = masked[off + j]
            o = max(range(len(row)), key=lambda q: (row[q], -q))  # argmax, lowest index on ties
            node.append((ops[o], j))
        nodes.append(tuple(node))
    return tuple(nodes)


def derive_genotype(
    alphas: Mapping[str, Tensor],
    cfg: SearchSpaceConfig,
    k: int = 2,
    temperature: float = 1.0,
    op_mask: OpMask | None = None,
) -> Genotype:
    """Discretise alphas with the DARTS rule.

    Op weights are ``normalize_alphas(alpha, temperature, cfg.prune_threshold)``. For each node,
    an incoming edge's strength is its largest op weight excluding ``none`` (times the node's
    softmaxed pairwise edge weight when ``cfg.pairwise_input_alphas``); the ``k`` strongest edges
    are kept (``k`` capped at the node's ``2 + i`` inputs) and listed in ascending input order,
    each with its strongest non-``none`` op. Ties go to the lowest index. ``concat`` is all
    intermediate nodes, ``(2, ..., 1 + n_nodes)``. A cell kind the network does not have
    (no normal cell, or no reduction cell) is left empty. With ``op_mask`` (a shrunk
    supernet's :attr:`~metanas.search_space.SearchNetwork.op_mask`) only kept ops exist: the
    softmax runs over them and a removed op is never chosen.

    Args:
        alphas: the dict of :func:`alpha_shapes` (any float dtype/device).
        cfg: the search-space config.
        k: edges kept per node (>= 1).
        temperature: softmax temperature.
        op_mask: the kept ops (None: all).
    """
    if not _is_int(k) or k < 1:
        raise ConfigError(f"k (edges kept per node) must be a positive integer, got {k!r}")
    check_alphas(cfg, alphas)
    concat = tuple(range(2, 2 + cfg.n_nodes))
    cells: dict[str, tuple[Node, ...]] = {}
    with torch.no_grad():
        for kind in ("normal", "reduce"):
            if kind not in alpha_shapes(cfg):
                continue
            a = alphas[kind].detach().cpu().double()
            kept = keep_tensor(op_mask, kind, a)
            w = normalize_alphas(a, temperature, cfg.prune_threshold, kept)
            beta = (
                normalize_edge_alphas(alphas[f"{kind}_edges"].detach().cpu().double(), cfg.n_nodes)
                if cfg.pairwise_input_alphas
                else None
            )
            cells[kind] = _derive_cell(w, beta, cfg.ops, cfg.n_nodes, k, kept)
    # only the cell kinds the network has: a supernet of reduction cells alone has normal
    # alphas (the alpha layout is fixed) that no cell reads
    kinds = {kind: kind in cell_kinds(cfg) for kind in ("normal", "reduce")}
    return Genotype(
        normal=cells["normal"] if kinds["normal"] else (),
        normal_concat=concat if kinds["normal"] else (),
        reduce=cells.get("reduce", ()) if kinds["reduce"] else (),
        reduce_concat=concat if kinds["reduce"] and "reduce" in cells else (),
    )


def cell_kinds(cfg: SearchSpaceConfig) -> tuple[str, ...]:
    """The cell kinds the network has: ``"normal"`` and/or ``"reduce"``."""
    reductions = cfg.resolved_reduction_cells()
    return tuple(k for k, present in (("normal", len(reductions) < cfg.n_cells),
                                      ("reduce", bool(reductions))) if present)


def op_weights(
    alphas: Mapping[str, Tensor], cfg: SearchSpaceConfig, temperature: float = 1.0,
    op_mask: OpMask | None = None,
) -> dict[str, Tensor]:
    """Kind -> op weights ``(n_edges, n_ops)`` (normalised, pruned) of the cell kinds present;
    with ``op_mask`` over the kept ops only (removed ops: 0)."""
    out = {}
    with torch.no_grad():
        for kind in cell_kinds(cfg):
            a = alphas[kind].detach().cpu().double()
            out[kind] = normalize_alphas(a, temperature, cfg.prune_threshold,
                                         keep_tensor(op_mask, kind, a))
    return out


def architecture_stats(
    alphas: Mapping[str, Tensor], cfg: SearchSpaceConfig, temperature: float = 1.0,
    op_mask: OpMask | None = None, weights: Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """How decided the architecture is, per cell kind present (``<kind>`` below).

    ``weights``: the op weights :func:`op_weights` gives for these arguments, when the caller
    has them already (they are not computed again).

    Returns:
        ``entropy_<kind>``: mean over edges of the op weights' entropy relative to the
        uniform distribution's, ``log(n_ops)`` (1: uniform, 0: one op); ``max_weight_<kind>``:
        the largest op weight of any edge (``1 / n_ops`` when uniform). With ``op_mask``
        the weights are those over the kept ops (the entropy still relative to ``log(n_ops)``).
    """
    out = {}
    for kind, w in (op_weights(alphas, cfg, temperature, op_mask) if weights is None else weights).items():
        entropy = -(w * torch.log(w.clamp_min(1e-300))).sum(dim=-1)
        out[f"entropy_{kind}"] = float(entropy.mean() / math.log(cfg.n_ops))
        out[f"max_weight_{kind}"] = float(w.max())
    return out


def genotype_distance(a: Genotype, b: Genotype) -> float:
    """Fraction of differing node entries between two genotypes, in ``[0, 1]``.

    Definition: for every cell kind (normal, reduce) and node position ``i`` (up to the longer
    of the two node lists; a missing node counts as empty), the entries are the multisets of
    ``(op_name, input_index)`` pairs of ``a`` and ``b``. The node contributes
    ``n_i = max(|a_i|, |b_i|)`` slots, of which ``n_i - |a_i ∩ b_i|`` (multiset intersection)
    differ. The distance is ``sum(differing) / sum(n_i)``; 0 when there are no slots. Entry
    order within a node and the ``concat`` fields are ignored.
    """
    total = differ = 0
    for kind in ("normal", "reduce"):
        na, nb = getattr(a, kind), getattr(b, kind)
        for i in range(max(len(na), len(nb))):
            ca = Counter(na[i]) if i < len(na) else Counter()
            cb = Counter(nb[i]) if i < len(nb) else Counter()
            n = max(sum(ca.values()), sum(cb.values()))
            total += n
            differ += n - sum((ca & cb).values())
    return differ / total if total else 0.0
