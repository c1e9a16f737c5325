"""Exceptions for mistakes a user can fix (config, data, plugins).

The ``drpo`` command prints these as one line naming the key, file:line or plugin, and exits with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's config, data or environment, explained in one line."""


class ConfigError(UserError):
    """A config value that cannot work (names the config key)."""

