"""Where studies live: SQLite by default, PostgreSQL or MariaDB for many nodes, through
Optuna's RDB storage. Primitives only (URLs, connections, transactions, locks, reads,
writes, heartbeats); what a worker does with them, which trial to claim, is ``hpo.claim``.

What makes a shared database safe for many workers:

- **Heartbeats** (``heartbeats``): every worker records one for its running trial every
  ``$HPO_HEARTBEAT_S`` seconds (20); a trial silent for ``$HPO_GRACE_S`` (60) is failed
  by the next claim and re-queued with its parameters and intermediate values.
- **A connection budget** (``urls.engine_options``): at most ``PoolSettings.max_connections``
  (2) per process, one of them kept between calls (docs/scale.md).
- **Reconnects and exactly-once writes** (``reconnect``): every call that fails for a lost
  connection is retried with backoff for up to ``$HPO_DB_RETRY_S`` seconds (300), and a
  write whose commit acknowledgement was lost is checked, never blindly repeated.
- **A study lock** (``locks``) that serializes "is there budget left? then create a
  trial", which makes ``--n-trials`` an exact study-wide total; on PostgreSQL a claim's
  common case is one message that takes the lock, counts and inserts (``one_message``).
- **Fewer round trips on PostgreSQL**: trial reads in one statement (``reads``), a running
  trial's writes in one statement each (``writes``), both in autocommit
  (``transactions``).

Passwords in URLs are never printed: everything user-facing goes through ``mask_url``.

The modules, lowest first: ``urls`` (URLs, engines, errors) · ``transactions`` ·
``reconnect`` (the retry rule and tokens) · ``counts`` · ``reads`` · ``writes`` ·
``heartbeats`` · ``new_trials`` (the rows a claim writes) · ``locks`` · ``one_message`` ·
``rdb`` (``ReconnectingRDBStorage``) · ``opening`` (``open_storage``, ``StudyRef``).
"""

from hpo.storage.counts import TrialCounts
from hpo.storage.locks import study_lock
from hpo.storage.one_message import AtOnceCounts, NoTrialAtOnce
from hpo.storage.opening import (
    MAX_RETRIES,
    SPEC_ATTR,
    SchemaVersionError,
    StudyRef,
    check_schema_version,
    open_storage,
    require_study,
    set_aside_side_files,
)
from hpo.storage.rdb import ReconnectingRDBStorage
from hpo.storage.reconnect import (
    CLAIM_TOKEN_ATTR,
    CREATE_TOKEN_ATTR,
    is_connection_error,
    retry_on_disconnect,
)
from hpo.storage.urls import (
    DEFAULT_SQLITE_FILE,
    StorageError,
    StudyNotFound,
    default_storage_url,
    engine_options,
    mask_url,
    resolve_storage_url,
    sqlite_path,
)

__all__ = [
    "CLAIM_TOKEN_ATTR",
    "CREATE_TOKEN_ATTR",
    "DEFAULT_SQLITE_FILE",
    "MAX_RETRIES",
    "SPEC_ATTR",
    "AtOnceCounts",
    "NoTrialAtOnce",
    "ReconnectingRDBStorage",
    "SchemaVersionError",
    "StorageError",
    "StudyNotFound",
    "StudyRef",
    "TrialCounts",
    "check_schema_version",
    "default_storage_url",
    "engine_options",
    "is_connection_error",
    "mask_url",
    "set_aside_side_files",
    "open_storage",
    "require_study",
    "resolve_storage_url",
    "retry_on_disconnect",
    "sqlite_path",
    "study_lock",
]
