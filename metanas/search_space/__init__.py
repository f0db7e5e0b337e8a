"""DARTS-style search space: ops, alpha normalisers, supernet, genotypes, discrete network."""

from metanas.search_space.discrete import DiscreteNetwork
from metanas.search_space.genotype import Genotype, derive_genotype, genotype_distance
from metanas.search_space.network import (
    SearchNetwork,
    SearchSpaceConfig,
    alpha_shapes,
    check_alphas,
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
    "Genotype",
    "SearchNetwork",
    "SearchSpaceConfig",
    "alpha_shapes",
    "anneal_temperature",
    "build_op",
    "check_alphas",
    "derive_genotype",
    "genotype_distance",
    "init_alphas",
    "node_offsets",
    "norm",
    "normalize_alphas",
    "normalize_edge_alphas",
    "resolve_ops",
]
