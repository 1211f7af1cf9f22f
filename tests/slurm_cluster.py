"""A one-node Slurm cluster for the tests: munged, slurmctld and slurmd (Debian's slurm-wlm
and munge) on loopback, with their own key, ports, state and spool directories.

Locally the tests skip (with the reason) when Slurm or munge is not installed; in CI
(``HPO_REQUIRE_SLURM=1``, set by ``.ci/run``, which installs both) they fail instead, as
they do when the cluster does not come up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .processes import stop_process

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "hpotestnode"
START_TIMEOUT_S = 60


def _require(reason: str) -> None:
    if os.environ.get("HPO_REQUIRE_SLURM") == "1":
        pytest.fail(f"HPO_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config(root: Path, cpus: int, memory_mb: int) -> str:
    host = socket.gethostname().split(".")[0]
    return f"""\
ClusterName=hpotest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser={os.environ.get("USER", "root") if os.getuid() else "root"}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
KillWait=60
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={NODE} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


def slurm(env: dict[str, str], *argv: str, check: bool = True) -> str:
    """A Slurm client command against the test cluster; its stdout."""
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


@contextlib.contextmanager
def slurm_cluster(cpus: int = 3, memory_mb: int = 6000) -> Iterator[dict[str, str]]:
    """Start the cluster; yield the environment its clients need (``SLURM_CONF``); stop
    its three daemons after (by their own process ids) and remove its directory."""
    missing = [name for name in DAEMONS if shutil.which(name, path="/usr/sbin:/usr/bin") is None]
    if missing:
        _require(f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm munge)")
    # Short: a Unix socket's path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="hpo-slurm-", dir="/tmp"))
    for directory in ("state", "spool"):
        (root / directory).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(_config(root, cpus, memory_mb))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    logs = (root / "daemons.log").open("w")
    commands = [
        ["/usr/sbin/munged", "-F", "-f", f"--socket={root}/munge.sock", f"--key-file={key}",
         f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid",
         f"--seed-file={root}/munged.seed"],
        ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(conf)],
        ["/usr/sbin/slurmd", "-D", "-N", NODE, "-f", str(conf)],
    ]  # fmt: skip
    daemons: list[subprocess.Popen] = []
    try:
        for command in commands:
            daemons.append(subprocess.Popen(command, env=env, stdout=logs, stderr=logs))
            time.sleep(1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            state = slurm(env, "sinfo", "-h", "-n", NODE, "-o", "%t", check=False).strip()
            if state == "idle":
                break
            exited = [d.args[0] for d in daemons if d.poll() is not None]
            if exited or time.monotonic() > deadline:
                logs.flush()
                _require(
                    f"the test Slurm cluster did not come up (node {state or '?'}; exited: "
                    f"{exited}): {(root / 'daemons.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield env
    finally:
        for daemon in reversed(daemons):
            stop_process(daemon, timeout=30)
        logs.close()
        _stop_step_daemons(conf)
        shutil.rmtree(root, ignore_errors=True)


def _stop_step_daemons(conf: Path) -> None:
    """SIGKILL the slurmstepd processes this cluster's slurmd started (they carry its
    SLURM_CONF) that outlive it, waiting to report to the stopped daemons."""
    marker = f"SLURM_CONF={conf}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "cmdline").read_bytes().startswith(b"slurmstepd"):
                continue
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
