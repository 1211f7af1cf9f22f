"""The ``hpo`` command. Thin: parse, call one library function, print.

Nothing in hpo imports this package; it imports everything it needs, lazily inside each
command so ``hpo --help`` stays fast.
"""

from __future__ import annotations

import sys

from hpo.cli import export, inspect, run  # noqa: F401  (registers the commands on ``app``)
from hpo.cli.app import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - entry point for ``python -m hpo``
    sys.exit(app())
