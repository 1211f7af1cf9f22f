"""``python -m hpo``: the same as the ``hpo`` command (used to start worker processes)."""

from hpo.cli import main

main()
