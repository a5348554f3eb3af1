"""The one exception for bad input: a setting, a file or a dataset that cannot make a run,
said before anything is computed. The entry points (`pipelines.cli`) print it as one line
and exit 2; any other exception is a failed run and keeps its traceback (exit 1).

It is a ValueError, so code that already expects ValueError for bad values still catches it.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: name the bad value and what was expected."""
