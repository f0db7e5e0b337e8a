"""The network a run meta-trains: the supernet, the conv-4 baseline, or a fixed genotype's network.

The ``model`` config group (``conf/model/*.yaml``) picks one. Its target resolves the settings
against the configured search space into a *model spec*, a JSON-able dict that, together with
that search space, is everything needed to rebuild the network (:func:`build_model`):

* ``{"kind": "supernet"}``: :class:`~metanas.search_space.SearchNetwork` with alphas
  (:func:`supernet`, the default);
* ``{"kind": "conv4", "channels": C, "n_blocks": n}``: :class:`~metanas.baselines.Conv4`
  with the search space's ``in_channels`` and ``n_classes`` (:func:`conv4`);
* ``{"kind": "genotype", "genotype": {...}}``: :class:`~metanas.search_space.DiscreteNetwork`
  of that genotype in the search space's layout (channels, cells, reductions,
  ``reduction_channel_scale``, nodes), meta-trained from scratch (:func:`genotype`; the
  usual NAS protocol of retraining the found cell).

Only the supernet has alphas. Checkpoints store the spec under ``model`` (the genotype itself,
so a checkpoint does not depend on the genotype file); a checkpoint without it holds a
supernet (:func:`checkpoint_model`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .baselines import Conv4, Conv4Config
from .errors import CheckpointError, ConfigError
from .search_space import DiscreteNetwork, Genotype, SearchNetwork, SearchSpaceConfig

__all__ = [
    "KINDS",
    "SUPERNET",
    "build_model",
    "checkpoint_model",
    "conv4",
    "conv4_channels",
    "count_weights",
    "describe",
    "describe_model",
    "genotype",
    "has_alphas",
    "supernet",
]

log = logging.getLogger(__name__)

SUPERNET: dict[str, Any] = {"kind": "supernet"}
KINDS = ("supernet", "conv4", "genotype")


def count_weights(build: Any) -> int:
    """Weight count of the module ``build()`` returns, built on the meta device (no memory,
    no random numbers drawn)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def supernet(space: SearchSpaceConfig | None = None) -> dict[str, Any]:
    """Spec of the supernet of the configured search space (``model=supernet``); the
    search space itself is recorded beside the spec."""
    return dict(SUPERNET)


def conv4_channels(space: SearchSpaceConfig, target: int, n_blocks: int = 4) -> tuple[int, int]:
    """The conv-4 channel count whose weight count is closest to ``target``.

    The weight count grows strictly with the channels, so the closest is found by bisection;
    of two equally close counts the smaller network is chosen.

    Returns:
        ``(channels, weight count)``.
    """
    def weights(c: int) -> int:
        return count_weights(lambda: Conv4(Conv4Config(space.in_channels, space.n_classes, c, n_blocks)))

    low, high = 1, 2
    while weights(high) < target:  # the smallest power of two at or above the target
        low, high = high, 2 * high
    while high - low > 1:  # weights(low) < target <= weights(high), unless low == 1
        mid = (low + high) // 2
        low, high = (mid, high) if weights(mid) < target else (low, mid)
    best = min((low, high), key=lambda c: (abs(weights(c) - target), c))
    return best, weights(best)


def conv4(
    space: SearchSpaceConfig, channels: int = 64, n_blocks: int = 4,
    match_parameters: int | str | None = None,
) -> dict[str, Any]:
    """Spec of the conv-4 baseline (``model=conv4``).

    Args:
        space: the configured search space (its ``in_channels`` and ``n_classes``; with
            ``match_parameters="supernet"`` also its supernet).
        channels: filters of every conv layer (replaced when ``match_parameters`` is set).
        n_blocks: conv blocks.
        match_parameters: None keeps ``channels``; a positive integer picks the channel count
            whose weight count is closest to it; ``"supernet"`` picks the one closest to the
            weight count of the supernet of ``space`` (:func:`conv4_channels`).

    Raises:
        ConfigError: a bad ``match_parameters``, ``channels`` or ``n_blocks``.
    """
    target = match_parameters
    if target == "supernet":
        target = count_weights(lambda: SearchNetwork(space))
    elif target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 1):
        raise ConfigError(
            f"model.match_parameters={match_parameters!r} is not allowed; use null (keep "
            "model.channels), a weight count >= 1, or supernet (the configured supernet's count)"
        )
    Conv4Config(space.in_channels, space.n_classes, channels, n_blocks)  # checks the sizes
    if target is not None:
        channels, count = conv4_channels(space, target, n_blocks)
        of = f"the supernet's {target}" if match_parameters == "supernet" else f"{target}"
        log.info("model=conv4, model.match_parameters=%s: %d channels, %d weights (closest to %s weights)",
                 match_parameters, channels, count, of)
    return {"kind": "conv4", "channels": channels, "n_blocks": n_blocks}


def genotype(space: SearchSpaceConfig, path: str | None = None) -> dict[str, Any]:
    """Spec of the network of the genotype in the file ``path`` (``model=genotype``).

    Raises:
        ConfigError: no path, or the file is missing, malformed, or does not fit ``space``
            (nodes, an op not in its ops); the message names ``model.path``.
    """
    if path in (None, ""):
        raise ConfigError(
            "model=genotype needs a genotype file; pass model.path=<run dir>/genotype.json "
            "(the genotype.json of a finished metanas-train run)"
        )
    where = f"model.path={str(path)!r}"
    try:
        found = Genotype.load(Path(path).expanduser())
        spec = {"kind": "genotype", "genotype": found.to_dict()}
        count_weights(lambda: build_model(spec, space))  # fits the search space?
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return spec


def _check_spec(spec: Any, where: str) -> str:
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    if kind not in KINDS:
        raise ConfigError(
            f"{where} holds an unknown model {spec!r}; the kinds are {list(KINDS)}"
        )
    return kind


def build_model(spec: Mapping[str, Any], space: SearchSpaceConfig) -> nn.Module:
    """The network of a model spec for the search space ``space`` (fresh weights).

    Raises:
        ConfigError: an unknown kind, or settings that do not fit ``space``.
    """
    kind = _check_spec(spec, "the model spec")
    if kind == "supernet":
        return SearchNetwork(space)
    if kind == "conv4":
        return Conv4(Conv4Config(space.in_channels, space.n_classes, spec["channels"], spec["n_blocks"]))
    return DiscreteNetwork(Genotype.from_dict(spec["genotype"]), space)


def describe(net: nn.Module) -> dict[str, Any]:
    """The model spec of a built network (what its checkpoints record)."""
    if isinstance(net, Conv4):
        return {"kind": "conv4", "channels": net.cfg.channels, "n_blocks": net.cfg.n_blocks}
    if isinstance(net, DiscreteNetwork):
        return {"kind": "genotype", "genotype": net.genotype.to_dict()}
    return dict(SUPERNET)


def has_alphas(spec: Mapping[str, Any]) -> bool:
    """Whether the model has architecture parameters (only the supernet has)."""
    return spec.get("kind") == "supernet"


def checkpoint_model(state: Mapping[str, Any], path: str | Path = "the checkpoint") -> dict[str, Any]:
    """The model spec a checkpoint state records (a supernet for checkpoints without one).

    Raises:
        CheckpointError: it records an unknown model.
    """
    spec = state.get("model")
    if spec is None:
        return dict(SUPERNET)
    try:
        _check_spec(spec, f"checkpoint {path}")
    except ConfigError as exc:
        raise CheckpointError(f"{exc}; it was written by another metanas: use that release") from None
    return dict(spec)


def describe_model(spec: Mapping[str, Any]) -> str:
    """One-line description, e.g. ``conv4 (channels=48, n_blocks=4)``."""
    kind = spec.get("kind")
    if kind == "conv4":
        return f"conv4 (channels={spec['channels']}, n_blocks={spec['n_blocks']})"
    if kind == "genotype":
        return f"the network of genotype {Genotype.from_dict(spec['genotype']).to_json()}"
    return "the supernet"
