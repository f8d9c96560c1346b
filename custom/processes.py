"""Worker processes that end with their parent.

A ``ProcessPoolExecutor`` worker (spawn) outlives a parent killed with SIGKILL: nothing tells it to stop, so it
keeps preparing subjects and writing cache entries that no manifest will list, then waits forever for work.
``die_with_parent`` (a pool ``initializer``, or called first thing in any worker) ends the worker when its
parent goes away:

- on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker the moment the parent thread that
  started it dies;
- everywhere, a daemon thread that checks every ``interval`` seconds whether the parent is still the parent
  (``os.getppid()`` changes when it dies: the worker is re-parented) and ends the process with ``os._exit``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Linux only: the kernel sends ``sig`` to this process when its parent dies. True when set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:  # Linux: state is the field after the ")" of the name
            return handle.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _watch_parent(parent_pid: int, direct: bool, interval: float) -> None:
    stop = threading.Event()
    while not stop.wait(interval):
        # a direct child is re-parented the moment its parent dies (a dead, unreaped parent still "exists")
        if (os.getppid() != parent_pid) if direct else not _alive(parent_pid):
            os._exit(1)  # no clean-up: the parent that would read our results is gone


def die_with_parent(parent_pid: int | None = None, interval: float = 1.0) -> bool:
    """End this process when the process ``parent_pid`` (default: the current parent) dies.

    Returns whether the kernel signal was set (the watchdog thread runs in every case). If the parent is
    already gone when this runs, the process ends at once. ``parent_pid`` need not be the direct parent (a
    forkserver start): then the watchdog polls whether it still exists. The kernel signal follows the thread
    that started this process, so start workers from a thread that outlives them (the main thread does)."""
    parent_pid = os.getppid() if parent_pid is None else int(parent_pid)
    armed = _set_parent_death_signal()
    direct = os.getppid() == parent_pid
    if not direct and not _alive(parent_pid):  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent_pid, direct, interval), name="die-with-parent", daemon=True
    ).start()
    return armed


__all__ = ["die_with_parent"]
