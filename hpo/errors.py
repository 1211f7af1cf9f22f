"""The one exception base for errors a user can cause.

The CLI turns any ``UserError`` into one line on stderr and exit code 2. It lives in its
own module so that catching it imports neither torch nor optuna (``hpo --help`` stays fast).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a study file, a name, a path, a URL, data on disk. The message is one
    line that names the file or field and what is allowed."""
