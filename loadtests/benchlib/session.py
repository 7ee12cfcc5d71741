"""Running a bench: the event loop, Ctrl-C and SIGTERM, clean-up, and registries measured one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from benchlib.report import have_uvloop
from benchlib.servers import Server, Target, scan_log

T = TypeVar("T")
Progress = Callable[[str], None]


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop when it is installed (as the bench client is measured), else on asyncio's loop."""
    if have_uvloop():
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


@contextlib.contextmanager
def cleanup() -> Iterator[contextlib.ExitStack]:
    """SIGTERM ends the run as Ctrl-C does; what is put on the stack is undone at the end, whatever happened."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with contextlib.ExitStack() as stack:
            yield stack
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted() -> int:
    print("\ninterrupted: stopping everything and removing temporary data", file=sys.stderr)
    return 130


def stop_all(servers: list[Server]) -> None:
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


def progress_since(started: float, width: int = 5) -> Progress:
    """A progress line printer: `[seconds since started] message`."""

    def say(message: str) -> None:
        print(f"   [{time.monotonic() - started:{width}.1f}s] {message}", flush=True)

    return say


async def one_at_a_time(
    targets: list[Target],
    make: Callable[[Target, Path], Server],
    bench: Callable[[Server, Path, Progress], Awaitable[dict[str, Any]]],
    *,
    base: Path,
    servers: list[Server],
    keep_logs: Path | None,
    heading: str = "",
    log_prefix: str = "",
    after: Callable[[Target], Awaitable[None]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Start each target's registry in a directory of its own, bench it, stop it, scan its log.

    A registry that fails is reported and the run goes on to the next; `after` runs once each is stopped.
    """
    results: dict[str, dict[str, Any]] = {}
    for target in targets:
        workdir = base / target.key
        server = make(target, workdir)
        servers.append(server)
        progress = progress_since(time.monotonic())
        print(f"\n== {target.label}{heading}", flush=True)
        try:
            server.start()
            await asyncio.get_running_loop().run_in_executor(None, server.wait_ready)
            progress(f"ready on port {server.port}")
            results[target.key] = await bench(server, workdir, progress)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next registry
            results[target.key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"   failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            server.stop()
            results.setdefault(target.key, {})["log"] = scan_log(server)
            server.keep_log(keep_logs, log_prefix + target.key)
            shutil.rmtree(workdir, ignore_errors=True)
            if after is not None:
                await after(target)
        progress("stopped")
    return results
