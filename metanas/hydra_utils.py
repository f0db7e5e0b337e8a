"""What the command-line entry points share about Hydra: building objects, the output folder,
and Hydra's own configuration errors as the CLIs' one-line errors.

The library below the CLIs never imports Hydra; these helpers are for ``metanas-train`` and
``metanas-adapt`` (and user scripts that compose the same configs).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, InstantiationException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from .errors import ConfigError, MetaNASError

log = logging.getLogger(__name__)

CONFIG_MODULE = "metanas.conf"
"""The package of the CLIs' configs (``@hydra.main(config_path="pkg://metanas.conf")``)."""


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


def _hydra_args(argv: Sequence[str]) -> Any:
    """``argv`` parsed as ``@hydra.main`` parses it (its own argument parser)."""
    from hydra._internal.utils import get_args_parser  # what hydra.main itself uses

    return get_args_parser().parse_args(list(argv))


def hydra_error_message(exc: CompactHydraException, prog: str) -> str:
    """One line for a configuration error of Hydra's (its own messages span several lines)."""
    text = str(exc)
    cause = exc.__cause__
    if (isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and text.startswith("Could not override '")
            and "not in struct" in str(cause)):
        key = text[len("Could not override '"):].split("'", 1)[0]
        return f"{key} is not a setting of {prog}: check its spelling ({prog} --cfg job lists every setting)"
    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        return f"{group}={option} is not an option of {group}; use one of {', '.join(exc.options)}"
    lines = []
    for line in text.splitlines():
        if line.strip() == "Config search path:":
            break
        if line.strip() and set(line.strip()) != {"^"}:
            lines.append(line.strip())
    message = "; ".join(lines) or type(exc).__name__
    if text.startswith("Could not delete from config."):
        message += f" Check its spelling ({prog} --cfg job lists every setting)"
    if isinstance(exc, OverrideParseException) and exc.override and exc.override not in message:
        message = f"cannot parse the override {exc.override!r}: {message}"
    if cause is not None and str(cause).strip():
        message += f" ({str(cause).strip().splitlines()[0]})"
    return message


def config_problem(argv: Sequence[str], config_name: str, prog: str) -> str | None:
    """The configuration error Hydra would stop ``prog argv`` with, as one line, or None.

    Composes the config as ``@hydra.main`` will (same argument parser, same overrides, same
    run mode; in a sweep also every swept value of a config group and the first of any other
    list or range) without running anything. Commands that only show something (``--help``,
    ``--cfg``, ``--info``, shell completion) and ``--config-path`` / ``--config-dir`` /
    ``--experimental-rerun`` are left to Hydra (None).
    """
    args = _hydra_args(argv)
    if (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
            or args.experimental_rerun or args.config_path or args.config_dir):
        return None
    if GlobalHydra.instance().is_initialized():  # inside another Hydra app: nothing to pre-check
        return None
    name = args.config_name or config_name
    overrides = list(args.overrides)
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            hydra = GlobalHydra.instance().hydra
            multirun = args.multirun or hydra.get_mode(config_name=name, overrides=overrides) == RunMode.MULTIRUN
            hydra.compose_config(name, overrides, run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN)
            if multirun:
                for job in _sweep_samples(hydra, name, overrides):
                    hydra.compose_config(name, job, run_mode=RunMode.RUN)
    except CompactHydraException as exc:
        return hydra_error_message(exc, prog)
    except Exception:  # noqa: BLE001 - not a configuration error: Hydra reports it as it does
        log.debug("pre-composition failed", exc_info=True)
    return None


def _sweep_samples(hydra: Any, config_name: str, overrides: list[str]) -> list[list[str]]:
    """Override lists of sweep jobs that between them use every swept option of a config
    group and the first value of every other enumerable sweep (intervals, which a sweeper
    samples, are left out)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    first: list[str] = []
    groups: list[tuple[int, str, list[str]]] = []
    for o in parsed:
        if not o.is_sweep_override():
            first.append(o.input_line)
            continue
        try:
            values = list(o.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - an interval: the sweeper draws its values
            continue
        if not values:
            continue
        first.append(f"{o.get_key_element()}={values[0]}")
        groups.append((len(first) - 1, o.key_or_group, values[1:]))
    jobs = [first]
    loader = hydra.config_loader
    for index, group, rest in groups:
        if rest and loader.get_group_options(group, config_name=config_name, overrides=first):
            key = first[index].split("=", 1)[0]
            jobs += [first[:index] + [f"{key}={v}"] + first[index + 1:] for v in rest]
    return jobs


def run_console(app: Callable[[], Any], prog: str, config_name: str,
                argv: Sequence[str] | None = None) -> None:
    """Run the ``@hydra.main`` function ``app`` as the command ``prog``.

    A configuration error of Hydra's (an unknown key or config group option, bad override
    syntax) ends like every other bad input of the CLIs: ``<prog>: error: <one line>`` on
    stderr and exit status 2, before anything is written (see :func:`config_problem`).
    Everything else, sweeps (``-m``) included, is Hydra's as usual.

    Args:
        app: the decorated function (called with no arguments: Hydra reads ``sys.argv``).
        prog: the command's name for the message.
        config_name: the config ``app`` composes.
        argv: the arguments to check (default: ``sys.argv[1:]``, what Hydra reads).
    """
    problem = config_problem(sys.argv[1:] if argv is None else argv, config_name, prog)
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    app()


__all__ = ["CONFIG_MODULE", "build", "config_problem", "hydra_error_message", "in_multirun", "output_dir",
           "run_console"]
