"""Alpha normalisers: tempered softmax with soft pruning, edge softmax, temperature schedules.

All functions on tensors are mask-based (no Python branching on tensor values), so they work
under ``torch.func.vmap`` and are differentiable through the entries they keep.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metanas.errors import ConfigError

__all__ = ["anneal_temperature", "node_offsets", "normalize_alphas", "normalize_edge_alphas"]

_MODES = ("linear", "exponential", "constant")


def normalize_alphas(
    alpha: Tensor,
    temperature: float | Tensor = 1.0,
    prune_threshold: float = 0.0,
    keep: Tensor | None = None,
) -> Tensor:
    """Tempered softmax over the last dim, then soft pruning of small weights.

    With ``keep`` (a bool mask broadcastable against ``alpha``, e.g. the kept ops of a shrunk
    supernet) the softmax runs over the kept entries only: the others are exactly 0, get an
    exactly zero gradient, and the kept weights renormalise among themselves (pruning then
    acts on those renormalised weights). Every row needs at least one kept entry.

    ``w = softmax(alpha / temperature)``; entries with ``w < min(prune_threshold, max(w))`` are
    set to exactly 0 and the row is renormalised to sum to 1. The row maximum is therefore always
    kept. With ``prune_threshold == 0`` the result is the plain softmax. Computed as a softmax
    over the kept logits (same value), so pruned entries get exactly zero gradient.

    Args:
        alpha: logits, shape ``(..., n_ops)``.
        temperature: softmax temperature (> 0); a Python number or a tensor broadcastable
            against ``alpha``.
        prune_threshold: weight below which an op is pruned, in ``[0, 1)``.
        keep: ``(..., n_ops)`` bool mask of the entries that exist (None: all).

    Returns:
        Weights of shape ``(..., n_ops)``, rows summing to 1.

    Raises:
        ConfigError: ``temperature <= 0`` (Python number) or threshold outside ``[0, 1)``.
    """
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ConfigError(f"softmax temperature must be > 0, got {temperature}")
    if not 0.0 <= prune_threshold < 1.0:
        raise ConfigError(f"prune_threshold must be in [0, 1), got {prune_threshold}")
    z = alpha / temperature
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    w = torch.softmax(z, dim=-1)
    if prune_threshold == 0.0:
        return w
    w = w.detach()
    keep = w >= w.amax(dim=-1, keepdim=True).clamp(max=prune_threshold)
    # softmax over the kept logits == kept weights renormalised; a pruned entry gets an exactly
    # zero gradient (renormalising the full softmax would leave ~1e-17 round-off gradients,
    # which Adam's normalised step blows up to a full step)
    return torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1)


def node_offsets(n_nodes: int) -> list[int]:
    """Index of the first incoming edge of each intermediate node (node i has ``2 + i`` edges)."""
    offsets, off = [], 0
    for i in range(n_nodes):
        offsets.append(off)
        off += 2 + i
    return offsets


def normalize_edge_alphas(beta: Tensor, n_nodes: int) -> Tensor:
    """Softmax of pairwise edge logits over each node's incoming edges (PC-DARTS, Xu et al. 2020).

    Args:
        beta: edge logits, shape ``(..., n_edges)`` with edges ordered node by node.
        n_nodes: number of intermediate nodes.

    Returns:
        Edge weights, shape ``(..., n_edges)``; each node's segment sums to 1.
    """
    segments = [
        torch.softmax(beta[..., off : off + 2 + i], dim=-1)
        for i, off in enumerate(node_offsets(n_nodes))
    ]
    return torch.cat(segments, dim=-1)


def anneal_temperature(
    step: int, total_steps: int, start: float, end: float, mode: str = "linear"
) -> float:
    """Softmax temperature at inner step ``step`` of ``total_steps``.

    Step 0 gives ``start`` and step ``total_steps - 1`` gives ``end`` (with one step: ``start``).
    ``linear`` interpolates linearly, ``exponential`` geometrically
    (``start * (end / start) ** f``), ``constant`` always returns ``start``.

    Raises:
        ConfigError: unknown mode, non-positive temperature, or step outside
            ``[0, total_steps)``.
    """
    if mode not in _MODES:
        raise ConfigError(f"unknown temperature schedule {mode!r}; use one of {', '.join(_MODES)}")
    if not (start > 0 and end > 0):
        raise ConfigError(f"temperatures must be > 0, got start={start}, end={end}")
    if total_steps < 1 or not 0 <= step < total_steps:
        raise ConfigError(
            f"step {step} is outside [0, {total_steps}); pass 0 <= step < total_steps"
        )
    if mode == "constant":
        return float(start)
    f = step / max(total_steps - 1, 1)
    if f == 1.0:
        return float(end)
    if mode == "linear":
        return float(start + (end - start) * f)
    return float(math.exp(math.log(start) + (math.log(end) - math.log(start)) * f))
