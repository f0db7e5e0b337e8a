"""What the command-line entry points share about Hydra: building objects, the output folder.

The library below the CLIs never imports Hydra; these helpers are for ``metanas-train`` and
``metanas-adapt`` (and user scripts that compose the same configs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from .errors import ConfigError, MetaNASError


def build(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """``instantiate(node)`` with the library's own errors unwrapped from Hydra's wrapper.

    Args:
        node: a config node with a ``_target_``.
        what: what the node builds, for the error message (e.g. ``"the outer loop (algorithm=...)"``).
        **kwargs: passed to the target.

    Raises:
        MetaNASError: the target's own error, unchanged.
        ConfigError: any other failure to build, naming ``what``.
    """
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, MetaNASError):
            raise cause from None
        raise ConfigError(f"could not build {what}: {exc}") from exc


def output_dir(default: str | Path | None = None) -> Path:
    """Hydra's output folder of this job, else ``default`` (else the working directory)."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(default) if default is not None else Path.cwd()


def in_multirun() -> bool:
    """True inside a Hydra sweep (``-m``)."""
    if not HydraConfig.initialized():
        return False
    return str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


__all__ = ["build", "in_multirun", "output_dir"]
