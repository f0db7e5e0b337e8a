"""Exceptions raised for bad input.

Every message names the problem *and* the fix, so a user who sees one on the command line
knows what to change. The CLI turns any :class:`MetaNASError` into a one-line message on
stderr and a non-zero exit status instead of a traceback.
"""

from __future__ import annotations


class MetaNASError(Exception):
    """Base class of all errors caused by user input (configs, data files, checkpoints)."""


class ConfigError(MetaNASError, ValueError):
    """A configuration value is invalid or inconsistent with another one."""


class DataError(MetaNASError):
    """A data file or folder is missing, unreadable, corrupt or too small for the request."""


class CheckpointError(MetaNASError):
    """A checkpoint is missing, corrupt, or does not fit the configured model."""
