"""Errors the user can fix from the message alone. The command-line tools print them as one line,
`<tool>: error: <message>`, and exit with status 2 (`dq.config.cli_errors`); any other exception keeps its
traceback, since it points at a bug rather than at a setting or a file."""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors whose message names the setting or file to fix and what to do."""


class ConfigError(UserError, ValueError):
    """A setting the user can fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the config names is not there."""


class CheckpointError(UserError, RuntimeError, ValueError):
    """A model directory or checkpoint exists but cannot be loaded (corrupt, incomplete, or written for something
    else). A `ValueError` too, as the block-checkpoint and saved-student errors it replaced were."""


class NonFiniteSamplesError(UserError, RuntimeError):
    """A model sampled NaN or infinite images: it cannot be scored. What was measured is kept (results.json)."""
