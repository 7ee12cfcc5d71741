"""CPU accounting from /proc: of processes and process groups, of the whole machine, of child processes."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterable


def cpu_of(*, pids: Iterable[int] = (), pgids: Iterable[int] = ()) -> float:
    """user+system CPU-seconds of the live processes `pids` and of every process in the groups `pgids`."""
    wanted, groups = set(pids), set(pgids)
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        rest = raw[raw.rfind(b")") + 2 :].split()
        if int(entry) in wanted or int(rest[2]) in groups:
            ticks += int(rest[11]) + int(rest[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def pid_meter(pid: int) -> Callable[[], float]:
    """A meter (CPU-seconds so far) of one process."""
    return lambda: cpu_of(pids=[pid])


def machine_busy() -> float:
    """CPU-seconds the whole machine spent busy (all cores; hypervisor steal included)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + (fields[7] if len(fields) > 7 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """user+system CPU-seconds of this process's children that have ended (wrk, `wharf gc` ...)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cores() -> int:
    return len(os.sched_getaffinity(0))
