"""Everything hpo reads from the environment, and the node-local settings of a worker.

This is the only module that reads ``os.environ``. Two kinds of settings live here:

- **Process settings**: the storage URL, where study files are, heartbeat timing, the
  database-retry window, the connection pool of each process, the artifact directory, a
  worker's log label.
- **Node-local settings** (``NodeSettings``): the data root, the device, the CPU thread
  count and the checkpoint directory. They describe *this machine*, not the study: a
  cluster mounts PCam under a different path on every node, and a study created on a GPU
  node may be joined from a CPU node. They come from CLI flags or ``HPO_DATA_ROOT``,
  ``HPO_DEVICE``, ``HPO_NUM_THREADS``, ``HPO_CHECKPOINT_DIR``, override the values stored
  in the study's spec on this node only, and never count as a spec difference
  (``hpo.spec.NODE_LOCAL_FIELDS``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from hpo.errors import UserError

STORAGE_ENV = "HPO_STORAGE"
STUDIES_DIR_ENV = "HPO_STUDIES_DIR"
ARTIFACTS_ENV = "HPO_ARTIFACTS"
LABEL_ENV = "HPO_WORKER_LABEL"
HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S = "HPO_HEARTBEAT_S", 20.0
GRACE_ENV, DEFAULT_GRACE_S = "HPO_GRACE_S", 60.0
DB_RETRY_ENV, DEFAULT_DB_RETRY_S = "HPO_DB_RETRY_S", 300.0
POOL_SIZE_ENV, DEFAULT_POOL_SIZE = "HPO_DB_POOL_SIZE", 1
POOL_OVERFLOW_ENV, DEFAULT_POOL_OVERFLOW = "HPO_DB_MAX_OVERFLOW", 1
PRE_PING_ENV = "HPO_DB_PRE_PING"
LOCK_DATABASE_ENV = "HPO_LOCK_DATABASE"
DATA_ROOT_ENV = "HPO_DATA_ROOT"
DEVICE_ENV = "HPO_DEVICE"
THREADS_ENV = "HPO_NUM_THREADS"
CHECKPOINT_ENV = "HPO_CHECKPOINT_DIR"
TRUSTED_MODULES_ENV = "HPO_TRUSTED_MODULES"
DASHBOARD_HOSTS_ENV = "HPO_DASHBOARD_HOSTS"
# ``--track``: trials go to MLflow at $MLFLOW_TRACKING_URI (MLflow's own variable); a child
# worker gets the URI in HPO_TRACK_MLFLOW.
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
TRACK_ENV = "HPO_TRACK_MLFLOW"
CUDA_VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
OMP_WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
DASHBOARD_USER_ENV = "HPO_DASHBOARD_USER"
DASHBOARD_PASSWORD_ENV = "HPO_DASHBOARD_PASSWORD"

DeviceChoice = Literal["auto", "cpu", "cuda"]
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class SettingsError(UserError):
    """An environment variable or node-local flag with a value hpo cannot use."""


def env(name: str) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    value = os.environ.get(name)
    return value if value else None


def default_omp_wait_policy() -> None:
    """Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless
    the user set the variable. Process-wide: call it first thing at an entry point, before
    torch is imported (the OpenMP runtime reads it once); child workers inherit it.

    Why: a spinning thread waits at every parallel region for a sibling the OS has
    descheduled. On the shared 2-core machine at load 8, a small-cnn step (B=64, 48 px,
    2 threads) took 0.44-0.83 s spinning and 0.11 s passive (one thread: 0.10 s); see
    docs/benchmarks.md.
    """
    os.environ.setdefault(OMP_WAIT_POLICY_ENV, "PASSIVE")


def environment() -> dict[str, str]:
    """A copy of this process's environment (for starting child processes)."""
    return dict(os.environ)


def positive_seconds(name: str, default: float) -> float:
    """``$name`` as a positive number of seconds, else ``default``."""
    raw = env(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"${name} = {raw!r} is not a number of seconds") from None
    if value <= 0:
        raise SettingsError(f"${name} = {raw!r} must be positive")
    return value


COLLECTIVE_TIMEOUT_ENV = "HPO_COLLECTIVE_TIMEOUT_S"


def collective_timeout_s() -> float:
    """Seconds a rank of a data-parallel trial waits in one collective (or for the group
    to form) before the trial fails as hung (``hpo.distributed``): ``$HPO_COLLECTIVE_TIMEOUT_S``,
    default 600. It must cover rank 0's evaluation and checkpoint between two steps."""
    return positive_seconds(COLLECTIVE_TIMEOUT_ENV, 600.0)


NCCL_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


def survive_nccl_errors() -> None:
    """Process-wide, at the worker's start (rank 0 of data-parallel trials on GPUs), before
    any NCCL group forms: a failed or timed-out NCCL collective aborts the communicators
    and raises (torch's mode 2, "clean up only") instead of torch's default of ending the
    process, so the worker fails the trial, re-queues it and goes on. Unless set already."""
    os.environ.setdefault(NCCL_ERROR_HANDLING_ENV, "2")


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in whole seconds; the grace period is always
    longer than the interval, or every trial would look stale between two beats."""
    interval = max(1, round(positive_seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)))
    grace = max(interval + 1, round(positive_seconds(GRACE_ENV, DEFAULT_GRACE_S)))
    return interval, grace


def db_retry_seconds() -> float:
    """How long a storage call keeps retrying across a lost connection."""
    return positive_seconds(DB_RETRY_ENV, DEFAULT_DB_RETRY_S)


def _count(name: str, default: int, minimum: int) -> int:
    raw = env(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or int(raw) < minimum:
        raise SettingsError(f"${name} = {raw!r} must be an integer >= {minimum}")
    return int(raw)


@dataclass(frozen=True)
class PoolSettings:
    """The database connections one hpo process may hold (PostgreSQL and MariaDB).

    A worker needs at most two at once: the study lock's transaction plus one storage call
    while it claims a trial, or a per-epoch report while its heartbeat thread beats. So the
    default keeps one open between calls and opens a second only for those moments (closed
    again when returned): 1 idle connection per worker while it trains, at most 2
    (docs/scale.md has the measurements). ``pre_ping`` costs one round trip per storage
    call; hpo's reconnect retry already recovers a dropped connection, so it is off unless
    ``$HPO_DB_PRE_PING=1``.
    """

    size: int = DEFAULT_POOL_SIZE
    max_overflow: int = DEFAULT_POOL_OVERFLOW
    pre_ping: bool = False

    @property
    def max_connections(self) -> int:
        return self.size + self.max_overflow

    @classmethod
    def from_env(cls) -> PoolSettings:
        """``$HPO_DB_POOL_SIZE`` (>= 1), ``$HPO_DB_MAX_OVERFLOW`` (>= 0),
        ``$HPO_DB_PRE_PING`` (0/1). Raises SettingsError naming the variable."""
        pre_ping = env(PRE_PING_ENV) or "0"
        if pre_ping not in ("0", "1"):
            raise SettingsError(f"${PRE_PING_ENV} = {pre_ping!r} must be 0 or 1")
        return cls(
            size=_count(POOL_SIZE_ENV, DEFAULT_POOL_SIZE, 1),
            max_overflow=_count(POOL_OVERFLOW_ENV, DEFAULT_POOL_OVERFLOW, 0),
            pre_ping=pre_ping == "1",
        )


def lock_database() -> str | None:
    """``$HPO_LOCK_DATABASE``: the database name the study lock's transactions connect to
    instead of the storage URL's, on the same server and with the same credentials; None
    when unset. Meant for a PgBouncer alias of the study's database with a small pool of
    its own (docs/scale.md): workers waiting for the lock then queue inside PgBouncer, in
    order, instead of each holding one of the server connections every other call needs.
    Raises SettingsError for a value that is not a plain database name."""
    raw = env(LOCK_DATABASE_ENV)
    if raw is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.$-]{0,62}", raw):
        raise SettingsError(
            f"${LOCK_DATABASE_ENV} = {raw!r} must be a database name (letters, digits, "
            "'_', '.', '-', '$'; at most 63 characters), e.g. hpo_lock"
        )
    return raw


@dataclass(frozen=True)
class NodeSettings:
    """Settings of this node that override the study spec here and nowhere else.

    None means "keep the study's value". Build it with ``from_env`` (CLI flags win over
    the environment), apply it with ``StudySpec.on_node``; ``to_env`` hands it to child
    processes.
    """

    data_root: Path | None = None
    device: DeviceChoice | None = None
    num_threads: int | None = None
    checkpoint_dir: Path | None = None
    mlflow_uri: str | None = None  # --track: MLflow tracking where the study file names none

    @classmethod
    def from_env(
        cls,
        *,
        data_root: Path | None = None,
        device: str | None = None,
        num_threads: int | None = None,
        checkpoint_dir: Path | None = None,
        track: bool = False,
    ) -> NodeSettings:
        """Flags given here, else ``HPO_DATA_ROOT`` / ``HPO_DEVICE`` / ``HPO_NUM_THREADS``
        / ``HPO_CHECKPOINT_DIR``; ``track`` (``--track``) takes ``$MLFLOW_TRACKING_URI``.
        Raises SettingsError naming the variable or flag."""
        device = device or env(DEVICE_ENV)
        if device is not None and device not in DEVICE_CHOICES:
            raise SettingsError(
                f"device {device!r} (--device or ${DEVICE_ENV}) must be one of "
                f"{', '.join(DEVICE_CHOICES)}"
            )
        if num_threads is None and env(THREADS_ENV) is not None:
            raw = cast(str, env(THREADS_ENV))
            if not raw.isdigit() or int(raw) < 1:
                raise SettingsError(f"${THREADS_ENV} = {raw!r} must be a positive integer")
            num_threads = int(raw)
        if num_threads is not None and num_threads < 1:
            raise SettingsError(f"--threads {num_threads} must be a positive integer")
        root = data_root or _path(env(DATA_ROOT_ENV))
        checkpoints = checkpoint_dir or _path(env(CHECKPOINT_ENV))
        mlflow_uri = env(TRACK_ENV)
        if track:
            mlflow_uri = env(MLFLOW_URI_ENV)
            if not mlflow_uri:
                raise SettingsError(f"--track needs ${MLFLOW_URI_ENV} (the MLflow tracking URI)")
        device_choice = cast("DeviceChoice | None", device)
        return cls(root, device_choice, num_threads, checkpoints, mlflow_uri)

    def to_env(self) -> dict[str, str]:
        """Environment variables that give a child process the same node settings."""
        values = {
            DATA_ROOT_ENV: self.data_root,
            DEVICE_ENV: self.device,
            THREADS_ENV: self.num_threads,
            CHECKPOINT_ENV: self.checkpoint_dir,
            TRACK_ENV: self.mlflow_uri,
        }
        return {name: str(value) for name, value in values.items() if value is not None}


def dashboard_credentials() -> tuple[str, str] | None:
    """(user, password) of the dashboard's HTTP basic auth from ``$HPO_DASHBOARD_USER`` and
    ``$HPO_DASHBOARD_PASSWORD``; None when neither is set. Raises SettingsError when only
    one is (the message names the missing one, never the value)."""
    user, password = env(DASHBOARD_USER_ENV), env(DASHBOARD_PASSWORD_ENV)
    if user is None and password is None:
        return None
    if user is None or password is None:
        missing = DASHBOARD_USER_ENV if user is None else DASHBOARD_PASSWORD_ENV
        raise SettingsError(f"${missing} is not set (the dashboard's credentials need both)")
    if ":" in user:
        raise SettingsError(f"${DASHBOARD_USER_ENV} must not contain ':' (HTTP basic auth)")
    return user, password


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which a batch scheduler or
    ``taskset`` narrows), the ceiling for thread and CPU-worker counts."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


THREADS_SOURCES = f"threads (--threads, ${THREADS_ENV} or training.num_threads)"


def check_cpu_count(value: int | None, what: str) -> None:
    """Raise SettingsError unless ``value`` (threads or worker processes, named by ``what``)
    is at most the cores this process may use: far more fails late (a segfault in the
    thread pool, a fork failure halfway through starting workers)."""
    if value is not None and value > available_cores():
        raise SettingsError(
            f"{what} = {value} exceeds the {available_cores()} CPU core(s) this process may use"
        )


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


# --------------------------------------------------------------------------- fault injection

KILL_AT_ENV = "HPO_TEST_KILL_AT"
# The phases a worker can be killed at, in the order a trial reaches them (tests only).
KILL_PHASES = ("claimed", "step", "checkpoint-partial", "checkpoint-write", "tell", "told")
_phase_counts: dict[str, int] = {}


def kill_point(phase: str) -> None:
    """Test-only fault injection: SIGKILL this process the n-th time it reaches ``phase``
    when ``$HPO_TEST_KILL_AT`` is ``phase`` or ``phase:n`` (``tests/test_kill_phases.py``).

    A kill -9 at a chosen point of a trial (just claimed, mid-epoch, between a checkpoint's
    write and its rename, before and after the tell) reached deterministically, with no
    sleep-and-hope timing. Unset (always, outside those tests) it is one dictionary lookup.
    """
    wanted = os.environ.get(KILL_AT_ENV)
    if not wanted or wanted.split(":")[0] != phase:
        return
    _phase_counts[phase] = _phase_counts.get(phase, 0) + 1
    if _phase_counts[phase] == int(wanted.partition(":")[2] or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
