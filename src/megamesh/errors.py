"""Errors a user can act on.

Anything raised as a `MegameshError` is a user mistake (bad config, bad layout, bad
path): the CLI prints its message on one line and exits non-zero, never a traceback.
"""

from __future__ import annotations


class MegameshError(Exception):
    """A mistake in what the user asked for; the message says what is allowed."""

    exit_code = 2


class ConfigError(MegameshError, ValueError):
    """A config field, preset name, override or layout that is not allowed."""
