"""Errors a user can fix. The CLI prints them as one line and exits 2 (no traceback)."""
from __future__ import annotations


class HPNInputError(ValueError):
    """Bad input from the user: the message names the key or file and the fix."""


class ConfigError(HPNInputError):
    """A config key is unknown or has a value out of range."""


class DataError(HPNInputError):
    """A data file, column or label set cannot be used."""
