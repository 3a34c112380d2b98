"""Errors a person can fix: printed as one line, exit status 2 from the command line."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input found before any heavy work: a config key, a path, a model name, an option."""
