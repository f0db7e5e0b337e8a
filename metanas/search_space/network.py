"""DARTS supernet: configuration, alpha shapes, mixed op, search cell and search network.

The network holds only weights; the architecture parameters (``alphas``) are passed into
:meth:`SearchNetwork.forward` as a dict of tensors (as in pt.darts), so that task learners can
adapt weights and alphas functionally with ``torch.func.functional_call`` / ``vmap``.

Macro structure (DARTS, Liu et al. 2019): stem (conv3x3 + norm) -> ``n_cells`` cells -> global
average pool -> linear classifier. Cell ``k`` is a reduction cell (channels times ``reduction_channel_scale``, stride 2 on
the edges leaving its two inputs) if ``k`` is in ``cfg.resolved_reduction_cells()``. Each cell
preprocesses its two inputs (ReLU-conv1x1-norm, or :class:`FactorizedReduce` for ``s0`` after a
reduction cell), computes ``n_nodes`` intermediate nodes, node ``i`` summing one edge from each of
the ``2 + i`` earlier states, and outputs the channel concat of its intermediate nodes.

Edges are numbered node by node: node ``i``'s edge from state ``j`` (0, 1 = cell inputs,
``2 + m`` = node ``m``) has index ``node_offsets(n_nodes)[i] + j``. Parameter names are
``stem.0.weight``, ``cells.{k}.preproc{0,1}.*``, ``cells.{k}.edges.{e}.ops.{o}.*`` (``o`` = index
in ``cfg.ops``) and ``classifier.{weight,bias}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from torch import Tensor, nn

from metanas.errors import ConfigError
from metanas.search_space.normalizer import (
    node_offsets,
    normalize_alphas,
    normalize_edge_alphas,
)
from metanas.search_space.ops import (
    OP_PRESETS,
    FactorizedReduce,
    ReLUConvBN,
    build_op,
    is_plain,
    norm,
    resolve_ops,
)

__all__ = [
    "CellSpec",
    "SearchNetwork",
    "SearchSpaceConfig",
    "alpha_shapes",
    "cell_layout",
    "check_alphas",
    "check_op_mask",
    "full_op_mask",
    "init_alphas",
    "keep_tensor",
]

OpMask = dict[str, tuple[tuple[bool, ...], ...]]
"""Kept ops of a shrunk supernet: cell kind (``normal``/``reduce``) -> ``mask[e][o]``, True
when op ``o`` (index in ``cfg.ops``) of edge ``e`` is kept."""


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"search_space.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class SearchSpaceConfig:
    """Hyper-parameters of the supernet.

    Attributes:
        in_channels: image channels of the input.
        n_classes: logits produced (``n_way`` for few-shot tasks).
        channels: initial cell channel count ``C`` (multiplied by ``reduction_channel_scale``
            at each reduction cell).
        n_cells: number of cells.
        n_nodes: intermediate nodes per cell (the cell output concatenates all of them).
        stem_multiplier: the stem outputs ``stem_multiplier * channels`` channels.
        reduction_cells: indices of reduction cells; ``None`` -> DARTS rule
            ``{n_cells // 3, 2 * n_cells // 3}``; ``()`` -> no reduction cell.
        ops: candidate op names, or a preset name (normalised to the tuple of names).
        pairwise_input_alphas: add per-edge logits softmaxed over each node's inputs (PC-DARTS).
        prune_threshold: soft-pruning threshold of :func:`normalize_alphas`, in
            ``[0, 1 / n_ops)``: at or above ``1 / n_ops`` near-uniform alphas keep only the
            argmax op of every edge and the alphas' gradient is exactly zero, so such a
            threshold is refused.
        reduction_channel_scale: channel factor of a reduction cell: 2 as in DARTS (Liu et
            al. 2019), 1 as in MetaNAS (``feature_scale_rate=1`` in the authors' code), which
            keeps the channel count constant.
    """

    in_channels: int = 1
    n_classes: int = 5
    channels: int = 16
    n_cells: int = 3
    n_nodes: int = 3
    stem_multiplier: int = 3
    reduction_cells: tuple[int, ...] | None = None
    ops: tuple[str, ...] = OP_PRESETS["fewshot"]
    pairwise_input_alphas: bool = False
    prune_threshold: float = 0.0
    reduction_channel_scale: int = 2

    def __post_init__(self) -> None:
        sizes = ("in_channels", "n_classes", "channels", "n_cells", "n_nodes", "stem_multiplier",
                 "reduction_channel_scale")
        for name in sizes:
            _positive_int(name, getattr(self, name))
        object.__setattr__(self, "ops", resolve_ops(self.ops))
        if self.reduction_cells is not None:
            try:
                red = tuple(self.reduction_cells)
            except TypeError:
                raise ConfigError(
                    f"search_space.reduction_cells must be a list of cell indices or null, "
                    f"got {self.reduction_cells!r}"
                ) from None
            bad = [r for r in red if isinstance(r, bool) or not isinstance(r, int)
                   or not 0 <= r < self.n_cells]
            if bad or len(set(red)) != len(red):
                raise ConfigError(
                    f"search_space.reduction_cells={list(red)} must hold distinct indices in "
                    f"[0, {self.n_cells}) (n_cells={self.n_cells}); fix the indices or use null "
                    "for the DARTS default"
                )
            object.__setattr__(self, "reduction_cells", tuple(sorted(red)))
        if not isinstance(self.pairwise_input_alphas, bool):
            raise ConfigError(
                f"search_space.pairwise_input_alphas must be true or false, "
                f"got {self.pairwise_input_alphas!r}"
            )
        thr = self.prune_threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr < 1.0:
            raise ConfigError(
                f"search_space.prune_threshold must be in [0, 1), got {self.prune_threshold!r}"
            )
        if thr >= 1.0 / self.n_ops:
            raise ConfigError(
                f"search_space.prune_threshold={thr} is at or above 1/n_ops = 1/{self.n_ops} = "
                f"{1.0 / self.n_ops:.4f}: on near-uniform alphas it keeps only the argmax op of "
                "every edge and the alphas get no gradient; use a threshold below "
                f"{1.0 / self.n_ops:.4f} (MetaNAS uses 0.01)"
            )
        object.__setattr__(self, "prune_threshold", float(self.prune_threshold))

    @property
    def n_edges(self) -> int:
        """Edges per cell: ``sum_i (2 + i)`` over the intermediate nodes."""
        return sum(2 + i for i in range(self.n_nodes))

    @property
    def n_ops(self) -> int:
        """Number of candidate ops per edge."""
        return len(self.ops)

    def resolved_reduction_cells(self) -> tuple[int, ...]:
        """Sorted indices of the reduction cells (DARTS rule when ``reduction_cells`` is None)."""
        if self.reduction_cells is None:
            return tuple(sorted({self.n_cells // 3, 2 * self.n_cells // 3}))
        return self.reduction_cells

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists instead of tuples)."""
        d = dataclasses.asdict(self)
        d["ops"] = list(self.ops)
        d["reduction_cells"] = None if self.reduction_cells is None else list(self.reduction_cells)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchSpaceConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown search-space key(s) {unknown}; valid keys are {sorted(known)}"
            )
        return cls(**dict(d))


def alpha_shapes(cfg: SearchSpaceConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the alpha tensors :class:`SearchNetwork` expects.

    ``normal``/``reduce``: ``(n_edges, n_ops)``; with ``pairwise_input_alphas`` also
    ``normal_edges``/``reduce_edges``: ``(n_edges,)``. The ``reduce*`` keys exist only when the
    network has a reduction cell.
    """
    kinds = ["normal"] + (["reduce"] if cfg.resolved_reduction_cells() else [])
    shapes = {k: (cfg.n_edges, cfg.n_ops) for k in kinds}
    if cfg.pairwise_input_alphas:
        shapes.update({f"{k}_edges": (cfg.n_edges,) for k in kinds})
    return shapes


def init_alphas(
    cfg: SearchSpaceConfig, generator: torch.Generator | None = None, scale: float = 1e-3
) -> dict[str, Tensor]:
    """``scale * randn`` alphas of :func:`alpha_shapes` (plain float32 tensors, no grad)."""
    return {
        k: torch.randn(shape, generator=generator) * scale for k, shape in alpha_shapes(cfg).items()
    }


def check_alphas(cfg: SearchSpaceConfig, alphas: Mapping[str, Tensor]) -> None:
    """Raise :class:`ConfigError` unless ``alphas`` has exactly the keys/shapes of the config."""
    expected = alpha_shapes(cfg)
    extra = sorted(set(alphas) - set(expected))
    if extra:
        raise ConfigError(
            f"unexpected alpha key(s) {extra}; this search space expects {sorted(expected)} "
            "(build alphas with init_alphas(cfg))"
        )
    for key, shape in expected.items():
        if key not in alphas:
            raise ConfigError(
                f"alphas is missing key {key!r} (expected shape {shape}); "
                "build alphas with init_alphas(cfg)"
            )
        a = alphas[key]
        got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        if got != shape:
            raise ConfigError(
                f"alphas[{key!r}] has shape {got}, expected {shape}; "
                "the alphas do not match the search-space config"
            )


def full_op_mask(cfg: SearchSpaceConfig) -> OpMask:
    """The mask that keeps every op of every edge (for the op-weight kinds of the alphas)."""
    return {k: tuple((True,) * cfg.n_ops for _ in range(cfg.n_edges))
            for k, shape in alpha_shapes(cfg).items() if len(shape) == 2}


def check_op_mask(cfg: SearchSpaceConfig, mask: Mapping[str, Any]) -> OpMask:
    """Validate a mask of kept ops (lists or tuples of bools) and return it as tuples.

    Raises:
        ConfigError: other kinds than the alphas' op-weight kinds, a wrong shape, a value that
            is not a bool, or an edge without any kept op.
    """
    expected = full_op_mask(cfg)
    if not isinstance(mask, Mapping) or set(mask) != set(expected):
        got = sorted(mask) if isinstance(mask, Mapping) else type(mask).__name__
        raise ConfigError(f"op mask has kinds {got}, this search space expects {sorted(expected)}")
    out: OpMask = {}
    for kind in expected:
        rows = mask[kind]
        ok = (isinstance(rows, (list, tuple)) and len(rows) == cfg.n_edges
              and all(isinstance(r, (list, tuple)) and len(r) == cfg.n_ops
                      and all(isinstance(v, bool) for v in r) for r in rows))
        if not ok:
            raise ConfigError(
                f"op mask {kind!r} must be {cfg.n_edges} edges x {cfg.n_ops} ops of true/false; "
                "it does not match the search space"
            )
        empty = [e for e, r in enumerate(rows) if not any(r)]
        if empty:
            raise ConfigError(f"op mask {kind!r} keeps no op on edge(s) {empty}; keep at least one op per edge")
        out[kind] = tuple(tuple(r) for r in rows)
    return out


def keep_tensor(mask: OpMask | None, kind: str, like: Tensor) -> Tensor | None:
    """``mask[kind]`` as a bool tensor ``(n_edges, n_ops)`` on ``like``'s device (None: no mask)."""
    if mask is None:
        return None
    return torch.tensor(mask[kind], dtype=torch.bool, device=like.device)


class CellSpec(NamedTuple):
    """Channel layout of one cell: inputs ``C_pp`` (s0), ``C_p`` (s1), node channels ``C``."""

    reduction: bool
    reduction_prev: bool
    C_pp: int
    C_p: int
    C: int


def cell_layout(
    cfg: SearchSpaceConfig, multipliers: Mapping[str, int] | None = None
) -> tuple[list[CellSpec], int]:
    """Per-cell channel layout and the classifier's input width.

    Args:
        cfg: the search-space config.
        multipliers: nodes concatenated at the output of ``normal``/``reduce`` cells
            (default ``n_nodes`` for both).
    """
    mult = {"normal": cfg.n_nodes, "reduce": cfg.n_nodes, **(multipliers or {})}
    reductions = set(cfg.resolved_reduction_cells())
    C_stem = cfg.stem_multiplier * cfg.channels
    C_pp, C_p, C = C_stem, C_stem, cfg.channels
    specs, prev = [], False
    for k in range(cfg.n_cells):
        red = k in reductions
        C = cfg.reduction_channel_scale * C if red else C
        specs.append(CellSpec(red, prev, C_pp, C_p, C))
        C_pp, C_p, prev = C_p, mult["reduce" if red else "normal"] * C, red
    return specs, C_p


def make_stem(cfg: SearchSpaceConfig) -> nn.Sequential:
    """conv3x3 (``in_channels -> stem_multiplier * channels``) + norm."""
    C_stem = cfg.stem_multiplier * cfg.channels
    return nn.Sequential(nn.Conv2d(cfg.in_channels, C_stem, 3, padding=1, bias=False), norm(C_stem))


def check_input(cfg: SearchSpaceConfig, x: Tensor) -> None:
    """Raise :class:`ConfigError` unless ``x`` is ``(B, in_channels, H, W)``."""
    if x.dim() != 4 or x.shape[1] != cfg.in_channels:
        raise ConfigError(
            f"input has shape {tuple(x.shape)}, expected (B, {cfg.in_channels}, H, W); "
            "set search_space.in_channels to the images' channel count"
        )


class CellBase(nn.Module):
    """Input preprocessing shared by search and discrete cells: ``preproc0``, ``preproc1``."""

    def __init__(self, spec: CellSpec) -> None:
        super().__init__()
        self.reduction = spec.reduction
        self.preproc0 = (
            FactorizedReduce(spec.C_pp, spec.C)
            if spec.reduction_prev
            else ReLUConvBN(spec.C_pp, spec.C, 1, 1, 0)
        )
        self.preproc1 = ReLUConvBN(spec.C_p, spec.C, 1, 1, 0)

    def edge_stride(self, input_idx: int) -> int:
        """Stride of an edge leaving state ``input_idx`` (2 from the inputs of a reduction cell)."""
        return 2 if self.reduction and input_idx < 2 else 1


class MixedOp(nn.Module):
    """Weighted sum of all candidate ops on one edge; ops in ``ops.{o}``."""

    def __init__(self, C: int, stride: int, ops: Sequence[str]) -> None:
        super().__init__()
        self.ops = nn.ModuleList(build_op(name, C, stride) for name in ops)

    def forward(self, x: Tensor, w: Tensor, active: Sequence[bool] | None = None) -> Tensor:
        """Weighted sum of the ops' outputs.

        Args:
            x: ``(B, C, H, W)``.
            w: op weights, ``(n_ops,)``.
            active: which ops to compute (None: all). An op left out must have a weight of
                exactly 0 (soft pruning); the sum then equals the full one, and the op's
                weights get exactly zero gradient either way.

        Returns:
            ``(B, C, H', W')``.
        """
        out = None
        for o, op in enumerate(self.ops):
            if active is not None and not active[o]:
                continue
            term = w[o] * op(x)
            out = term if out is None else out + term
        if out is None:
            raise ValueError("MixedOp.forward: no active op; keep at least one op per edge")
        return out


class SearchCell(CellBase):
    """DARTS search cell: a :class:`MixedOp` on every edge, edges in ``edges.{e}``."""

    def __init__(self, spec: CellSpec, n_nodes: int, ops: Sequence[str]) -> None:
        super().__init__(spec)
        self.n_nodes = n_nodes
        self.edges = nn.ModuleList(
            MixedOp(spec.C, self.edge_stride(j), ops) for i in range(n_nodes) for j in range(2 + i)
        )

    def forward(
        self,
        s0: Tensor,
        s1: Tensor,
        w: Tensor,
        beta: Tensor | None,
        active: Sequence[Sequence[bool]] | None = None,
        recompute_edges: bool = False,
    ) -> Tensor:
        """Args: cell inputs ``s0``, ``s1``; op weights ``w`` ``(n_edges, n_ops)``; normalised
        edge weights ``beta`` ``(n_edges,)`` or None; ``active[e][o]``: compute op ``o`` of
        edge ``e`` (None: every op; see :meth:`MixedOp.forward`); ``recompute_edges``: keep
        only each edge's input and output, recompute its ops in the backward pass.
        Returns ``(B, n_nodes * C, H', W')``."""
        states = [self.preproc0(s0), self.preproc1(s1)]
        for off in node_offsets(self.n_nodes):
            node = None
            for j, h in enumerate(states):
                e = off + j
                args = (h, w[e], None if active is None else active[e])
                term = _recomputed(self.edges[e], args) if recompute_edges else self.edges[e](*args)
                term = term if beta is None else beta[e] * term
                node = term if node is None else node + term
            states.append(node)
        return torch.cat(states[2:], dim=1)


def _recomputed(module: nn.Module, args: tuple) -> Tensor:
    """``module(*args)`` (a cell or an edge) with its activations recomputed in the backward
    pass.

    The module's tensors are handed to the checkpoint as explicit inputs: under
    :func:`torch.func.functional_call` (the adapted weights) they are swapped back out of the
    module before the backward pass, so the recomputation must not read them from the module.
    """
    names, tensors = zip(*module.named_parameters())

    def run(*flat: Tensor) -> Tensor:
        return functional_call(module, dict(zip(names, flat[len(args):])), flat[: len(args)])

    return checkpoint(run, *args, *tensors, use_reentrant=False)


class SearchNetwork(nn.Module):
    """The supernet. Holds weights only (no buffers, no alphas).

    With soft pruning (``cfg.prune_threshold > 0``) the ops whose normalised weight is exactly
    zero are not computed at all: the mask of kept ops is read once per forward (one
    ``.tolist()``) from the normalised alphas. The result and every gradient equal those of
    computing the op and multiplying it by zero (the skipped ops' weights stay in the graph
    with an exactly zero gradient). Under a ``torch.func`` transform (``vmap``)
    the mask cannot be read in Python and every op is computed.

    A shrunk supernet (:attr:`op_mask`, set with :meth:`set_op_mask`) never computes its
    removed ops, under ``torch.func`` transforms too (the mask is plain Python state): the
    op weights are a softmax over the kept ops only, and the removed ops' weights take no
    part in the graph (their gradients are absent, i.e. zero).

    Attributes:
        cfg: the :class:`SearchSpaceConfig` it was built from.
        stem, cells, classifier: submodules (see the module docstring for parameter names).
        op_mask: the kept ops (:data:`OpMask`), or None when every op is kept.
        skip_pruned_ops: skip pruned ops (default True); False computes every op.
        recompute_cells: keep only each cell's inputs during the forward pass and recompute
            its activations in the backward pass (:func:`torch.utils.checkpoint.checkpoint`,
            non-reentrant): less activation memory for about one more forward pass, the same
            gradients (second order included). Applies outside ``torch.func`` transforms and
            when autograd records (default False).
        recompute_edges: the same per edge (mixed op): only each edge's input and output are
            kept, and one edge's ops are rebuilt at a time in the backward pass. It keeps far
            less than ``recompute_cells`` (a cell's activations are mostly its ops'
            intermediates) for the same extra forward pass, and takes precedence over it.
    """

    skip_pruned_ops: bool = True
    recompute_cells: bool = False
    recompute_edges: bool = False

    def __init__(self, cfg: SearchSpaceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        specs, C_out = cell_layout(cfg)
        self.stem = make_stem(cfg)
        self.cells = nn.ModuleList(SearchCell(s, cfg.n_nodes, cfg.ops) for s in specs)
        self.classifier = nn.Linear(C_out, cfg.n_classes)
        self.op_mask: OpMask | None = None

    def set_op_mask(self, mask: Mapping[str, Any] | None) -> None:
        """Keep only the ops of ``mask`` (see :data:`OpMask`); None or a full mask keeps all.

        Raises:
            ConfigError: a mask that does not fit the search space (:func:`check_op_mask`).
        """
        if mask is None:
            self.op_mask = None
            return
        mask = check_op_mask(self.cfg, mask)
        self.op_mask = None if mask == full_op_mask(self.cfg) else mask

    def forward(
        self, x: Tensor, alphas: Mapping[str, Tensor], temperature: float | Tensor = 1.0
    ) -> Tensor:
        """Logits of the supernet.

        Args:
            x: images, ``(B, in_channels, H, W)``.
            alphas: architecture logits with the keys and shapes of :func:`alpha_shapes`.
            temperature: softmax temperature of the op weights.

        Returns:
            Logits, ``(B, n_classes)``.

        Raises:
            ConfigError: wrong input channels, missing/extra alpha key or wrong alpha shape.
        """
        cfg = self.cfg
        check_input(cfg, x)
        check_alphas(cfg, alphas)
        kinds = ["normal", "reduce"] if "reduce" in alphas else ["normal"]
        mask = self.op_mask
        weights = {k: normalize_alphas(alphas[k], temperature, cfg.prune_threshold,
                                       keep_tensor(mask, k, alphas[k])) for k in kinds}
        betas: dict[str, Tensor | None] = {
            k: normalize_edge_alphas(alphas[f"{k}_edges"], cfg.n_nodes)
            if cfg.pairwise_input_alphas
            else None
            for k in kinds
        }
        active = {k: self._active_ops(w, None if mask is None else mask[k]) for k, w in weights.items()}
        s0 = s1 = self.stem(x)
        recording = torch.is_grad_enabled() and is_plain(x)
        edges = self.recompute_edges and recording
        recompute = self.recompute_cells and recording and not edges
        for cell in self.cells:
            kind = "reduce" if cell.reduction else "normal"
            args = (s0, s1, weights[kind], betas[kind], active[kind])
            out = _recomputed(cell, args) if recompute else cell(*args, recompute_edges=edges)
            s0, s1 = s1, out
        logits = self.classifier(s1.mean(dim=(2, 3)))
        skipped = self._skipped_weights(active, mask)
        if skipped:
            # keep the skipped ops' weights in the graph with an exactly zero gradient, as if
            # their outputs had been multiplied by zero (callers may differentiate w.r.t. them)
            logits = logits + 0.0 * torch.stack([p.sum() for p in skipped]).sum()
        return logits

    def _skipped_weights(
        self, active: Mapping[str, Sequence[Sequence[bool]] | None], op_mask: OpMask | None
    ) -> list[Tensor]:
        """The parameters of the kept ops (``op_mask``) that ``active`` leaves out (pruned)."""
        out = []
        for cell in self.cells:
            kind = "reduce" if cell.reduction else "normal"
            mask = active[kind]
            if mask is None:
                continue
            for e, edge in enumerate(cell.edges):
                for o, op in enumerate(edge.ops):
                    if not mask[e][o] and (op_mask is None or op_mask[kind][e][o]):
                        out.extend(op.parameters())
        return out

    def _active_ops(
        self, w: Tensor, kept: Sequence[Sequence[bool]] | None = None
    ) -> Sequence[Sequence[bool]] | None:
        """Which ops to compute: the kept ops (``kept``, the op mask of this kind; None: all)
        that soft pruning leaves a non-zero weight, ``w != 0`` for normalised op weights
        ``w`` ``(n_edges, n_ops)``, when pruned ops can be skipped. None: compute every op."""
        if not (self.skip_pruned_ops and self.cfg.prune_threshold > 0 and is_plain(w)):
            return kept
        nonzero = (w != 0).tolist()
        if kept is None:
            return nonzero
        return [[a and b for a, b in zip(r, k)] for r, k in zip(nonzero, kept)]

    def edge_index(self, node: int, input_idx: int) -> int:
        """Index of the edge into intermediate node ``node`` from state ``input_idx``."""
        return node_offsets(self.cfg.n_nodes)[node] + input_idx
