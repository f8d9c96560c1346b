"""Worker processes of a prepare run end with it: ``kill -9`` of a run with ``--num_workers 2`` leaves no worker
behind (they would go on preparing subjects and writing cache entries, then wait forever for work).

A real ``bundle/scripts/prepare.py run`` on small phantoms in a subprocess; its workers are found by PID under
``/proc`` (children whose command line is multiprocessing's ``spawn_main``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from custom.prepare.phantom import make_phantom

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(spacing_mm=2.5, scale_range=(1.15, 1.25))  # as tests/test_prepare_workflow.py: quick at 1 mm
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _stat(pid: int) -> list | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # a zombie is dead, only not yet reaped


def _cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS if fields else 0.0  # utime + stime


def _workers(parent: int) -> list:
    """PIDs of the pool workers of ``parent``: its children running multiprocessing's spawn_main."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None or int(fields[1]) != parent:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _wait_for(predicate, timeout: float, process) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process is not None and process.poll() is not None:
            return predicate()
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("means", ["kernel signal", "watchdog thread"])
def test_die_with_parent(means):
    """Each of the two means alone ends a child whose parent is killed: the kernel's parent-death signal (the
    watchdog polls only once an hour), and the watchdog thread (the kernel signal is not set)."""
    child = (
        "import sys, time\nimport custom.processes as p\n"
        + ("p._set_parent_death_signal = lambda *a: False\n" if means == "watchdog thread" else "")
        + f"armed = p.die_with_parent(interval={0.2 if means == 'watchdog thread' else 3600})\n"
        "print('armed', armed, flush=True)\ntime.sleep(600)\n"
    )
    parent = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "print(child.pid, flush=True)\ntime.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = int(run.stdout.readline())
        assert run.stdout.readline().split() == ["armed", "True" if means == "kernel signal" else "False"]
        assert _running(pid)
        run.send_signal(signal.SIGKILL)
        run.wait(30)
        assert _wait_for(lambda: not _running(pid), 3.0, None), f"child {pid} outlived its parent"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(30)
        if pid and _running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # about 55 s on the 2-core CPU VM
def test_workers_die_with_a_killed_run(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(4):
        make_phantom(scans / f"subj{i}.nii.gz", seed=20 + i, **SMALL)
    cache_dir = tmp_path / "cache"
    log = (tmp_path / "run.log").open("w")
    command = [
        sys.executable,
        str(REPO / "bundle" / "scripts" / "prepare.py"),
        "run",
        "--source",
        str(scans),
        "--cache_dir",
        str(cache_dir),
        "--num_workers",
        "2",
        "--progress",
        "False",
        "--log_level",
        "WARNING",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    workers = []
    try:
        assert _wait_for(
            lambda: len(_workers(run.pid)) == 2, 120, run
        ), f"no two workers appeared (run exit {run.poll()}): {(tmp_path / 'run.log').read_text()[-2000:]}"
        workers = _workers(run.pid)
        # past their imports and into the subjects: several CPU seconds each
        assert _wait_for(
            lambda: all(_cpu_seconds(w) >= 6.0 for w in workers), 180, run
        ), f"workers never got busy (run exit {run.poll()})"
        assert run.poll() is None, "the run finished before it could be killed"
        finished = sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith("."))
        assert len([n for n in finished if n.startswith("subj")]) < 4  # work was still left to do

        run.send_signal(signal.SIGKILL)  # no clean-up handler of the run gets to run
        run.wait(30)
        start = time.monotonic()
        all_gone = _wait_for(lambda: not any(_running(w) for w in workers), 10, None)
        seconds = time.monotonic() - start
        assert all_gone, f"workers {[w for w in workers if _running(w)]} outlived the killed run"
        assert seconds < 5.0, f"workers took {seconds:.1f} s to end"
        time.sleep(1.0)  # nothing goes on writing the cache
        after = sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith("."))
        assert after == finished
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(30)
        for pid in workers:  # the PIDs this test started, if the fix did not end them
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()
