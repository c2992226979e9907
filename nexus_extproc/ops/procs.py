"""Child processes that die with their parent (Linux prctl(PR_SET_PDEATHSIG)), so a parent killed with -9
leaves no worker, fake upstream or Envoy holding its ports. A no-op where prctl does not exist."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
PARENT_ENV = "NEXUS_PARENT_PID"


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel for `sig` when the parent exits. The check after it closes the race with a parent
    that died before the call (the kernel would never send the signal then)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def die_with_parent_from_env() -> None:
    """For a child that sets it up itself (no preexec_fn in a threaded parent): the parent passes its pid."""
    pid = os.environ.get(PARENT_ENV)
    if pid and pid.isdigit():
        die_with_parent(int(pid))


def preexec_die_with_parent() -> Callable[[], None]:
    """A preexec_fn for subprocess.Popen, for parents with no other threads (a binary child such as Envoy
    cannot set it up itself)."""
    parent = os.getpid()
    return lambda: die_with_parent(parent)
