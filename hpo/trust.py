"""Which Python modules this process may import on a study's say-so.

A study's spec names a ``model.factory`` (``package.module:function``) that workers import
and run. The spec a worker reads from the storage was written by whoever can write the
database, which is not necessarily whoever runs the node. So a module is imported only
when this node trusts it:

- it is listed in ``$HPO_TRUSTED_MODULES`` (comma-separated module or package names; a
  package trusts its submodules), a node-local setting like ``$HPO_DATA_ROOT``; or
- a study file on this node named it: ``hpo launch`` and ``hpo worker --spec`` read the
  operator's own file, and ``hpo launch`` hands that trust to its children through
  ``$HPO_TRUSTED_MODULES``.

Anything else is refused before a trial is claimed (exit 2, naming ``model.factory``).
The trust model is written out in docs/robustness.md.
"""

from __future__ import annotations

from hpo.errors import UserError
from hpo.settings import TRUSTED_MODULES_ENV, env

_trusted_here: set[str] = set()


class UntrustedModule(UserError):
    """A study in the storage names a module this node does not trust."""


def trust_module(module: str) -> None:
    """Trust ``module`` in this process (a study file on this node named it)."""
    _trusted_here.add(module)


def trusted_modules() -> set[str]:
    listed = {part.strip() for part in (env(TRUSTED_MODULES_ENV) or "").split(",")}
    return (listed | _trusted_here) - {""}


def check_trusted(module: str, field: str) -> None:
    """Raise UntrustedModule unless ``module`` (or a package above it) is trusted here."""
    trusted = trusted_modules()
    parts = module.split(".")
    if any(".".join(parts[:n]) in trusted for n in range(1, len(parts) + 1)):
        return
    raise UntrustedModule(
        f"{field}: module {module!r} comes from the study in the storage, and this node does "
        f"not trust it: list it in ${TRUSTED_MODULES_ENV} or pass the study file with --spec"
    )
