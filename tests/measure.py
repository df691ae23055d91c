"""What a child process used, read from /proc while it lives (Linux only).

One rule holds everything here together: a child's memory is its own VmHWM, never the
``ru_maxrss`` that `wait4` reports for it.  Linux carries the high-water mark of the forked
copy of the parent across exec, so ``ru_maxrss`` of a child is at least the parent's resident
set at the fork (``true`` started from a 440 MB benchmark process reports 438 MB).  VmHWM
disappears with the process, so it is sampled until the process exits.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.procs import ROOT, clean_env

#: How often a measured child's VmHWM is read: growth in its last millisecond can be missed.
SAMPLE_INTERVAL = 0.001


@dataclass(frozen=True, slots=True)
class ProcUsage:
    """What a process has used so far."""

    #: User plus system CPU time of all its threads, seconds.
    cpu_seconds: float
    #: Peak resident set size (VmHWM), bytes.
    peak_rss_bytes: int


def proc_usage(pid: int) -> ProcUsage:
    """CPU time and peak RSS of a live process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return ProcUsage((utime + stime) / os.sysconf("SC_CLK_TCK"), peak_rss(pid))


def status_bytes(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, ...) in bytes; 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def current_rss(pid: int) -> int:
    """Resident set size (VmRSS) of a live process now, bytes; 0 once it has exited."""
    return status_bytes(pid, "VmRSS")


def peak_rss(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process so far, bytes; 0 once it has exited."""
    return status_bytes(pid, "VmHWM")


@dataclass(frozen=True, slots=True)
class MeasuredRun:
    """A child process run to completion, with what it used."""

    returncode: int
    wall_seconds: float
    #: From `wait4`: user plus system time of the child (its own, not inherited).
    cpu_seconds: float
    #: The child's VmHWM, sampled every `SAMPLE_INTERVAL` until it exited, bytes.
    peak_rss_bytes: int
    stdout: str
    stderr: str


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600,
    watch: Callable[[float], None] | None = None,
) -> MeasuredRun:
    """Run `cmd` (clean environment plus `env`, repo root as cwd) to completion and measure it.

    Wall time runs from just before the fork to the reap.  `watch`, if given, is called with
    the seconds elapsed at every sample, to time events the child leaves in files.  The
    child is killed after `timeout` seconds (then the run has a nonzero status).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=clean_env(env), cwd=ROOT)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(SAMPLE_INTERVAL):
                peak = max(peak, peak_rss(proc.pid))
                if watch is not None:
                    watch(time.perf_counter() - started)

        sampler = threading.Thread(target=sample, name="vmhwm-sampler", daemon=True)
        sampler.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            # Wait for the exit without reaping, so the sampler never reads a reused PID.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        finally:
            killer.cancel()
            done.set()
            sampler.join()
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
        out.seek(0)
        err.seek(0)
        return MeasuredRun(
            returncode=proc.returncode,
            wall_seconds=wall,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            peak_rss_bytes=peak,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )
