"""``python -m hpo``: the same as the ``hpo`` command (used to start worker processes).

``python -m`` puts the working directory first on ``sys.path``; it is taken off again
before anything else is imported, so a stray module there (an ``x.py`` beside the study)
is never imported in place of, or as, the code a study names.
"""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()) and not getattr(sys.flags, "safe_path", False):
    del sys.path[0]

from hpo.cli import main  # noqa: E402 - after the path is cleaned

main()
