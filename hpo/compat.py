"""Every private name of Optuna, torch and torchvision that hpo relies on, in one place.

Each has no public equivalent (the reason is beside it). ``tests/test_compat.py`` checks
that every one still exists in the installed versions, so an upgrade that removes one
fails there, loudly, instead of deep inside a trial. Everywhere else hpo uses public API
only (``tests/test_architecture.py`` enforces it).

Imports of torch and torchvision happen inside the functions: importing this module must
stay cheap for commands that never train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Private methods of optuna.storages.RDBStorage that Optuna's own cache layer
# (``optuna.storages._CachedStorage``, which wraps every RDBStorage a Study holds) calls
# on its backend. ``hpo.storage`` wraps each public *and* these private calls with the
# reconnect retry, or a database restart would surface through the cache layer's calls
# as a failed trial (seen: a PostgreSQL restart failed a trial in ``_get_trials``).
RDB_STORAGE_PRIVATE_METHODS: tuple[str, ...] = (
    "_get_stale_trial_ids",
    "_get_trials",
    "_create_new_trial",
    "_set_trial_param",
    "_get_best_trial_id",
)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX).

    torch has no public query; ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` is what
    torch's own CPU autocast tests use. Without the instructions bf16 autocast on CPU is
    emulated and slower than fp32, so hpo uses it only when this is True.
    """
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pcam_file_names(split: str) -> tuple[str, str]:
    """The (images, targets) HDF5 file names torchvision's PCAM expects for ``split``.

    torchvision keeps them in the private ``PCAM._FILES`` table; hpo reads the files
    itself (memory-mapped, see ``hpo.data``) and names them in "not found" errors.
    """
    from torchvision.datasets import PCAM

    files = PCAM._FILES[split]
    return files["images"][0], files["targets"][0]


def pcam_folder(dataset: Any) -> Path:
    """The directory a ``torchvision.datasets.PCAM`` instance reads its files from.

    Only the private ``_base_folder`` says it (today ``root / "pcam"``); taking it from
    the dataset keeps hpo right if torchvision moves the files.
    """
    return Path(dataset._base_folder)
