"""A killed ``hpo launch`` leaves no worker running on orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from hpo.launcher import die_with_parent
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], **die_with_parent())
    print(child.pid, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_children_of_a_killed_launch_stop() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as stat:
            if stat.read().split()[2] == "Z":  # stopped, waiting to be reaped by init
                return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child of a killed parent ran on")


class _Stopped(BaseException):
    pass


def _raise_stopped(number: int, frame: object) -> None:
    raise _Stopped(number)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_stop_signal_while_a_child_starts_is_handled_after_its_handle_is_kept() -> None:
    # A worker's stop handler raises; arriving inside Popen it used to lose the started
    # child's handle, so the cleanup that stops the followers could not reach it.
    from hpo.launcher import die_with_parent, stop_signals_held

    children: list[subprocess.Popen[bytes]] = []
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        with pytest.raises(_Stopped), stop_signals_held():
            os.kill(os.getpid(), signal.SIGTERM)  # held: nothing raises here
            time.sleep(0.05)  # a handler that raises would have run by now
            command = [sys.executable, "-c", "import time; time.sleep(120)"]
            children.append(subprocess.Popen(command, **die_with_parent()))
        assert len(children) == 1  # kept before the signal was handled
        # The handler in place before the block is back, and the child takes SIGTERM.
        assert signal.getsignal(signal.SIGTERM) is _raise_stopped
        children[0].terminate()
        assert children[0].wait(timeout=10) == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
