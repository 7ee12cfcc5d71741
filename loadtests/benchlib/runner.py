"""The load runner: N clients repeat one operation for a while; whole operations, latencies, errors, CPU."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from benchlib.client import MIB, Conn, Unexpected
from benchlib.cpu import machine_busy

# (conn, worker, seq) -> (requests made, bytes moved)
Op = Callable[[Conn, int, int], Awaitable[tuple[int, int]]]
# CPU-seconds so far of something beside the registry (etcd, moto, HAProxy, a GC process ...).
Meter = Callable[[], float]


class Front(Protocol):
    """What a load talks to: a loopback port, and the CPU of the registry processes behind it."""

    port: int

    def cpu_seconds(self) -> float: ...


class _InProcess:
    """A Front for work this very process does (an in-process GC cycle): no registry CPU of its own."""

    port = 0

    def cpu_seconds(self) -> float:
        return 0.0


IN_PROCESS = _InProcess()


@dataclass
class Figures:
    """Who spent the CPU during one load: the client, the registry, named meters, everything else."""

    client_cpu: float = 0.0
    server_cpu: float = 0.0
    other_cpu: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class CpuWindow:
    """CPU spent from now until `close`, split between the client, the registry, `meters` and the rest."""

    def __init__(self, front: Front, client: Meter, meters: dict[str, Meter] | None = None) -> None:
        self.front, self.client, self.meters = front, client, meters or {}
        self.start = {"client": client(), "server": front.cpu_seconds(), "machine": machine_busy()}
        self.start_meters = {name: meter() for name, meter in self.meters.items()}

    def close(self, figures: Figures) -> None:
        figures.client_cpu = self.client() - self.start["client"]
        figures.server_cpu = self.front.cpu_seconds() - self.start["server"]
        spent = {name: meter() - self.start_meters[name] for name, meter in self.meters.items()}
        figures.extra.update(spent)
        busy = machine_busy() - self.start["machine"]
        figures.other_cpu = max(0.0, busy - figures.client_cpu - figures.server_cpu - sum(spent.values()))


@dataclass
class Result(Figures):
    """What one load of the bench client did."""

    ops: int = 0
    requests: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rate(self) -> float:
        """Operations per second."""
        return self.ops / self.elapsed if self.ops else 0.0

    @property
    def mib_rate(self) -> float:
        return self.bytes / self.elapsed / MIB if self.ops else 0.0

    @property
    def mib(self) -> float:
        return self.bytes / MIB

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def error_key(exc: BaseException) -> str:
    if isinstance(exc, Unexpected):
        return str(exc)[:240]
    return f"{type(exc).__name__}: {exc}"[:240]


async def run_load(
    front: Front,
    concurrency: int,
    duration: float,
    op: Op,
    *,
    max_ops: int | None = None,
    grace: float = 60.0,
    meters: dict[str, Meter] | None = None,
) -> Result:
    """`concurrency` workers repeat `op` until `duration` is up (or `max_ops` started).

    Operations in flight at the deadline are allowed to finish (within `grace`), and the
    elapsed time runs to the last completion, so throughput counts only whole operations.
    """
    result = Result()
    started_ops = 0
    start = time.perf_counter()
    deadline = start + duration
    last_done = start
    window = CpuWindow(front, time.process_time, meters)

    async def worker(index: int) -> None:
        nonlocal started_ops, last_done
        conn = Conn("127.0.0.1", front.port)
        seq = 0
        try:
            while time.perf_counter() < deadline and (max_ops is None or started_ops < max_ops):
                started_ops += 1
                seq += 1
                t0 = time.perf_counter()
                try:
                    requests, nbytes = await op(conn, index, seq)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure is a figure here
                    result.errors[error_key(exc)] += 1
                    conn.close()
                    await asyncio.sleep(0.01)
                    continue
                t1 = time.perf_counter()
                result.ops += 1
                result.requests += requests
                result.bytes += nbytes
                result.latencies.append(t1 - t0)
                last_done = max(last_done, t1)
        finally:
            conn.close()

    tasks = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    _done, pending = await asyncio.wait(tasks, timeout=duration + grace)
    for task in pending:
        task.cancel()
    if pending:
        busy = f"{len(pending)} worker(s) still busy {grace:.0f}s after the deadline (cancelled)"
        result.errors[busy] += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            result.errors[error_key(task.exception())] += 1  # type: ignore[arg-type]
    result.elapsed = max(last_done - start, 1e-9)
    window.close(result)
    return result
