"""Hang guards and process control for tests that run rag4dmc's commands as separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2,
          detail: Callable[[], str] = lambda: "") -> None:
    """Poll ``predicate`` until it holds; a hang guard that raises TimeoutError (with ``detail()``) past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:g} s: {detail()}")
        time.sleep(interval_s)


def sigkill_when(cmd: list[str], ready: Callable[[], bool], what: str, *, cwd, env: dict, timeout_s: float,
                 interval_s: float = 0.2) -> None:
    """Run ``cmd`` in a session of its own and SIGKILL its whole process group (Ray's workers included) as soon as
    ``ready()`` holds: a crash at an arbitrary point, as an operator or a preempted node causes one. Fails when the
    process ends before that (the kill would prove nothing) or ``ready`` does not hold within ``timeout_s``."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        until(lambda: proc.poll() is not None or ready(), timeout_s, what, interval_s)
        assert proc.poll() is None, f"the process finished before {what}, so it could not be interrupted; give it more work"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def processes_with_env(name: str, value: str) -> list[int]:
    """The live processes (zombies excluded) whose environment holds ``name=value``, among those this user may read:
    a marker set in the environment of a process that starts others finds every descendant, whatever its session
    or process group (Ray's workers each start their own)."""
    marker = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except OSError:  # gone meanwhile, or another user's
            continue
        found.append(int(entry))
    return found
