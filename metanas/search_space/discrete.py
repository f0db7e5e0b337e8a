"""Discrete network built from a :class:`Genotype`, optionally inheriting supernet weights.

Same macro structure as :class:`SearchNetwork` (stem, preprocessing, reduction positions, head
and op factories); each intermediate node sums only its genotype's chosen ops.

Parameter names and their supernet counterparts (used by :meth:`DiscreteNetwork.from_supernet`):

* ``stem.*``, ``cells.{k}.preproc{0,1}.*``, ``classifier.*``: identical names.
* ``cells.{k}.edges.{j}.*``: the ``j``-th chosen ``(op, input)`` pair of cell ``k``'s genotype,
  counting node by node in genotype order, maps to ``cells.{k}.edges.{e}.ops.{o}.*`` where
  ``e = node_offsets(n_nodes)[node] + input`` and ``o = cfg.ops.index(op)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from metanas.errors import ConfigError
from metanas.search_space.genotype import Genotype, Node
from metanas.search_space.network import (
    CellBase,
    CellSpec,
    SearchSpaceConfig,
    cell_layout,
    check_input,
    make_stem,
)
from metanas.search_space.normalizer import node_offsets
from metanas.search_space.ops import build_op

__all__ = ["DiscreteNetwork"]


def _check_cell(
    kind: str, nodes: tuple[Node, ...], concat: tuple[int, ...], cfg: SearchSpaceConfig
) -> None:
    if len(nodes) != cfg.n_nodes:
        raise ConfigError(
            f"genotype.{kind} has {len(nodes)} nodes but search_space.n_nodes={cfg.n_nodes}; "
            "use a genotype derived from the same search space"
        )
    for i, node in enumerate(nodes):
        if not node:
            raise ConfigError(f"genotype.{kind}[{i}] chooses no op; each node needs at least one")
        for op, j in node:
            if op not in cfg.ops:
                raise ConfigError(
                    f"genotype.{kind}[{i}] uses op {op!r}, which is not in search_space.ops "
                    f"{list(cfg.ops)}; add it to the ops or fix the genotype"
                )
            if j >= 2 + i:
                raise ConfigError(
                    f"genotype.{kind}[{i}] takes input {j}, but node {i} can only read states "
                    f"0..{1 + i} (cell inputs and earlier nodes)"
                )
    valid = range(2, 2 + cfg.n_nodes)
    if not concat or len(set(concat)) != len(concat) or any(c not in valid for c in concat):
        raise ConfigError(
            f"genotype.{kind}_concat={list(concat)} must list distinct intermediate nodes in "
            f"[2, {1 + cfg.n_nodes}]"
        )


class DiscreteCell(CellBase):
    """A cell computing only the genotype's chosen ops, held in ``edges.{j}``.

    Attributes:
        inputs: per node, the input state index of each chosen op.
        concat: state indices concatenated into the output.
        supernet_edges: per chosen op ``j``, the supernet ``(edge index, op index)``.
    """

    def __init__(
        self, spec: CellSpec, nodes: tuple[Node, ...], concat: tuple[int, ...], ops: tuple[str, ...]
    ) -> None:
        super().__init__(spec)
        self.inputs = tuple(tuple(j for _, j in node) for node in nodes)
        self.concat = concat
        offsets = node_offsets(len(nodes))
        self.supernet_edges = tuple(
            (offsets[i] + j, ops.index(op)) for i, node in enumerate(nodes) for op, j in node
        )
        self.edges = nn.ModuleList(
            build_op(op, spec.C, self.edge_stride(j)) for node in nodes for op, j in node
        )

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        """``s0``, ``s1``: cell inputs -> ``(B, len(concat) * C, H', W')``."""
        states = [self.preproc0(s0), self.preproc1(s1)]
        e = 0
        for node_inputs in self.inputs:
            out = None
            for j in node_inputs:
                t = self.edges[e](states[j])
                e += 1
                out = t if out is None else out + t
            states.append(out)
        return torch.cat([states[c] for c in self.concat], dim=1)


class DiscreteNetwork(nn.Module):
    """Network of a fixed genotype (no alphas, no buffers); ``forward(x, alphas, temperature)``
    with empty alphas, like :class:`metanas.baselines.Conv4`.

    Attributes:
        genotype, cfg: what it was built from.
    """

    def __init__(self, genotype: Genotype, cfg: SearchSpaceConfig) -> None:
        super().__init__()
        has_reduce = bool(cfg.resolved_reduction_cells())
        if len(cfg.resolved_reduction_cells()) < cfg.n_cells:  # a normal cell is read
            _check_cell("normal", genotype.normal, genotype.normal_concat, cfg)
        if has_reduce:
            _check_cell("reduce", genotype.reduce, genotype.reduce_concat, cfg)
        elif genotype.reduce or genotype.reduce_concat:
            raise ConfigError(
                "the genotype has a reduction cell but the search space has none; "
                "clear genotype.reduce or set search_space.reduction_cells"
            )
        self.genotype, self.cfg = genotype, cfg
        specs, C_out = cell_layout(
            cfg, {"normal": len(genotype.normal_concat), "reduce": len(genotype.reduce_concat)}
        )
        self.stem = make_stem(cfg)
        self.cells = nn.ModuleList(
            DiscreteCell(s, genotype.reduce, genotype.reduce_concat, cfg.ops)
            if s.reduction
            else DiscreteCell(s, genotype.normal, genotype.normal_concat, cfg.ops)
            for s in specs
        )
        self.classifier = nn.Linear(C_out, cfg.n_classes)

    def forward(
        self, x: Tensor, alphas: Mapping[str, Tensor] | None = None, temperature: float = 1.0
    ) -> Tensor:
        """``x``: ``(B, in_channels, H, W)`` -> logits ``(B, n_classes)``.

        ``alphas`` and ``temperature`` give it the supernet's signature, so that the inner loop
        and the meta-algorithms can meta-train it (``model=genotype``); ``alphas`` must be empty.

        Raises:
            ConfigError: wrong input channels, or non-empty ``alphas``.
        """
        if alphas:
            raise ConfigError("a DiscreteNetwork has no architecture parameters; pass an empty alpha dict")
        check_input(self.cfg, x)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(s1.mean(dim=(2, 3)))

    def supernet_param_name(self, name: str) -> str:
        """Name of the :class:`SearchNetwork` parameter that parameter ``name`` inherits from."""
        parts = name.split(".")
        if len(parts) > 4 and parts[0] == "cells" and parts[2] == "edges":
            k, j = int(parts[1]), int(parts[3])
            e, o = self.cells[k].supernet_edges[j]
            return ".".join(["cells", str(k), "edges", str(e), "ops", str(o), *parts[4:]])
        return name

    @classmethod
    def from_supernet(
        cls, genotype: Genotype, cfg: SearchSpaceConfig, supernet_params: Mapping[str, Tensor]
    ) -> DiscreteNetwork:
        """Build the network and copy every parameter from a supernet parameter dict.

        Args:
            genotype: the architecture.
            cfg: the supernet's config.
            supernet_params: ``{name: tensor}`` as from ``SearchNetwork.named_parameters()``
                (e.g. task-adapted weights); see the module docstring for the name mapping.

        Raises:
            ConfigError: a needed supernet parameter is missing or has another shape.

        The network is moved to the device and dtype of the first supernet tensor.
        """
        net = cls(genotype, cfg)
        ref = next(iter(supernet_params.values()), None)
        if ref is not None:  # follow the supernet's device and dtype
            net = net.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name, p in net.named_parameters():
                src = net.supernet_param_name(name)
                if src not in supernet_params:
                    raise ConfigError(
                        f"supernet parameter {src!r} (for {name!r}) is missing; pass the "
                        "parameters of a SearchNetwork built with the same config"
                    )
                t = supernet_params[src]
                if tuple(t.shape) != tuple(p.shape):
                    raise ConfigError(
                        f"supernet parameter {src!r} has shape {tuple(t.shape)}, but {name!r} "
                        f"needs {tuple(p.shape)}; the genotype's concat or the config differ "
                        "from the supernet's"
                    )
                p.copy_(t.detach())
        return net
