"""The one exception base for errors a user can cause.

The CLI turns any ``UserError`` into one line on stderr and exit code 2. It lives in its
own module so that catching it imports neither torch nor optuna (``hpo --help`` stays fast).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a study file, a name, a path, a URL, data on disk. The message is one
    line that names the file or field and what is allowed."""


class RunAborted(BaseException):
    """The run cannot go on for a reason outside the user's input (the storage file was
    deleted under it). The CLI prints its one-line message and exits 1. A BaseException,
    so that no ``except Exception`` in training or retrying swallows it on its way out."""
