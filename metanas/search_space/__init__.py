"""DARTS-style search space: ops, alpha normalisers, supernet, genotypes, discrete network."""

from metanas.search_space.discrete import DiscreteNetwork
from metanas.search_space.genotype import (
    Genotype,
    architecture_stats,
    cell_kinds,
    derive_genotype,
    genotype_distance,
    op_weights,
)
from metanas.search_space.network import (
    OpMask,
    SearchNetwork,
    SearchSpaceConfig,
    alpha_shapes,
    check_alphas,
    check_op_mask,
    full_op_mask,
    init_alphas,
)
from metanas.search_space.normalizer import (
    anneal_temperature,
    node_offsets,
    normalize_alphas,
    normalize_edge_alphas,
)
from metanas.search_space.ops import OP_PRESETS, OPS, build_op, norm, resolve_ops

__all__ = [
    "OPS",
    "OP_PRESETS",
    "DiscreteNetwork",
    "OpMask",
    "Genotype",
    "SearchNetwork",
    "SearchSpaceConfig",
    "alpha_shapes",
    "architecture_stats",
    "anneal_temperature",
    "build_op",
    "cell_kinds",
    "check_alphas",
    "check_op_mask",
    "full_op_mask",
    "derive_genotype",
    "genotype_distance",
    "init_alphas",
    "node_offsets",
    "norm",
    "normalize_alphas",
    "normalize_edge_alphas",
    "op_weights",
    "resolve_ops",
]
