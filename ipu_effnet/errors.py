"""Errors a person can fix: printed as one line by the command line.

UsageError: bad input found before any heavy work (exit status 2). RunError: a run that started and had
to stop for a reason someone must look at, with what is safe to resume from (exit status 1).
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input found before any heavy work: a config key, a path, a model name, an option."""


class RunError(RuntimeError):
    """A run stopped by a fault (non-finite loss, a checkpoint that cannot be written): one line naming
    what happened and the last good checkpoint."""
