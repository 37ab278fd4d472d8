"""Runs a benchmarked command and measures it: wall time, CPU time and the peak RSS of its whole
process tree, sampled every 50 ms (the benches' one way to take these figures)."""

import contextlib
import subprocess
import sys
import time
from typing import NamedTuple


class Measured(NamedTuple):
    seconds: float
    # User and system time of the command and of the children it waited for.
    cpu_seconds: float
    peak_rss: int
    # Its standard output, when it was captured.
    out: str
    # Why it did not finish well; None when it exited 0.
    failure: str | None


def run_measured(cmd, *, stdout=subprocess.PIPE, max_rss=None, **popen):
    """Runs cmd to its end, or stops it once its tree holds more than max_rss bytes."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, **popen)
    ps = psutil.Process(proc.pid)
    peak, cpu = 0, 0.0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
            t = ps.cpu_times()
            cpu = max(cpu, t.user + t.system + t.children_user + t.children_system)
        if max_rss is not None and peak > max_rss:
            for p in [*ps.children(recursive=True), ps]:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            proc.communicate()
            failure = f"stopped past --max-rss ({max_rss / 2**30:.1f} GiB)"
            return Measured(time.perf_counter() - start, cpu, peak, "", failure)
        time.sleep(0.05)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    failure = None if proc.returncode == 0 else f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err[-4000:]}"
    return Measured(seconds, cpu, peak, (out or "").strip(), failure)


def run_or_exit(cmd, **kw):
    """run_measured, ending the bench with the command's error when it fails."""
    r = run_measured(cmd, **kw)
    if r.failure:
        sys.exit(r.failure)
    return r
