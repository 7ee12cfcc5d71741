"""Distribution's health checks (`health.storagedriver`, `file`, `http`, `tcp`): periodic probes with a
failure threshold, whose state `/debug/ready` reports so a load balancer takes the node out of rotation,
and the debug listener's `/debug/health` as registry:2's does (503 and the failing checks)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import HealthConfig, HTTPHealth, TCPHealth
from .storage import layout
from .storage.driver import StorageDriver

log = logging.getLogger("wharf.health")

# Storage probes are not bounded in Distribution; here a hung storage counts as a failure.
_STORAGE_TIMEOUT = 10.0
# health-<pid>.json: one worker's failing checks, in the workers' shared directory.
_HEALTH_FILE = "health-"


@dataclass
class Check:
    """One periodic probe: unhealthy once `threshold` probes in a row failed (0 counts as 1)."""

    name: str
    interval: float
    threshold: int
    probe: Callable[[], Awaitable[None]]
    timeout: float
    failures: int = 0
    last_error: str = ""

    @property
    def healthy(self) -> bool:
        return self.failures < max(1, self.threshold)

    async def run_once(self) -> None:
        try:
            await asyncio.wait_for(self.probe(), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.last_error = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            was_healthy = self.healthy
            self.failures += 1
            if was_healthy and not self.healthy:
                log.error("health check %s failing (%d in a row): %s", self.name, self.failures, self.last_error)
            return
        if not self.healthy:
            log.info("health check %s passes again", self.name)
        self.failures = 0
        self.last_error = ""

    def state(self) -> str:
        if self.healthy:
            return "ok"
        return f"{self.last_error} ({self.failures} failures in a row)"


class HealthChecks:
    """The configured checks, each probed on its own schedule while the app runs.

    With `publish` (the worker processes' shared directory), each worker also writes its failing
    checks to a file there whenever they change, so the `wharf serve` process answers the debug
    listener's `/debug/health` for all of them (see `failing_in`).
    """

    def __init__(self, checks: list[Check], publish: str | None = None) -> None:
        self.checks = checks
        self._publish = os.path.join(publish, f"{_HEALTH_FILE}{os.getpid()}.json") if publish else None
        self._published: dict[str, str] | None = None

    @property
    def storage_checked(self) -> bool:
        """Whether storage health comes from `health.storagedriver` rather than a probe per request."""
        return any(c.name == "storage" for c in self.checks)

    @classmethod
    def from_config(cls, config: HealthConfig, storage: StorageDriver, publish: str | None = None) -> HealthChecks:
        checks = []
        driver = config.storagedriver
        if driver.enabled:

            async def storage_probe() -> None:
                # As Distribution's check: a stat of a path that need not exist; only errors count.
                await storage.stat(layout.ROOT + "/ready")

            checks.append(Check("storage", driver.interval, driver.threshold, storage_probe, _STORAGE_TIMEOUT))
        for file in config.file:
            checks.append(
                Check(f"file {file.file}", file.interval, file.threshold, _file_probe(file.file), _STORAGE_TIMEOUT)
            )
        for target in config.http:
            checks.append(
                Check(f"http {target.uri}", target.interval, target.threshold, _http_probe(target), target.timeout)
            )
        for tcp in config.tcp:
            checks.append(Check(f"tcp {tcp.addr}", tcp.interval, tcp.threshold, _tcp_probe(tcp), tcp.timeout))
        return cls(checks, publish)

    async def run(self) -> None:
        """Probe every check now and then every interval, until cancelled."""
        try:
            await asyncio.gather(*(self._every(check) for check in self.checks))
        finally:
            if self._publish is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._publish)

    async def _every(self, check: Check) -> None:
        while True:
            await check.run_once()
            self._share()
            await asyncio.sleep(check.interval)

    def states(self) -> dict[str, str]:
        return {check.name: check.state() for check in self.checks}

    def failing(self) -> dict[str, str]:
        """Each failing check and why, as Distribution's `/debug/health` names them ({} when all pass)."""
        return {check.name: check.state() for check in self.checks if not check.healthy}

    def _share(self) -> None:
        if self._publish is None:
            return
        failing = self.failing()
        if failing == self._published:
            return
        try:
            fd, temporary = tempfile.mkstemp(dir=os.path.dirname(self._publish), prefix=".health-")
            with os.fdopen(fd, "w") as out:
                json.dump(failing, out)
            os.replace(temporary, self._publish)
        except OSError as exc:
            log.warning("cannot share the health checks' state with the debug listener: %s", exc)
            return
        self._published = failing


def failing_in(directory: str) -> dict[str, str]:
    """The failing checks of every live worker that shares `directory` (the union of their files)."""
    failing: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if not (entry.name.startswith(_HEALTH_FILE) and entry.name.endswith(".json")):
                continue
            pid = entry.name[len(_HEALTH_FILE) : -len(".json")]
            if not pid.isdigit() or not pid_alive(int(pid)):
                continue  # a worker that died: its successor publishes its own
            try:
                with open(entry.path, encoding="utf-8") as found:
                    failing.update(json.load(found))
            except (OSError, ValueError):
                continue
    return failing


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _file_probe(path: str) -> Callable[[], Awaitable[None]]:
    async def probe() -> None:
        if await asyncio.to_thread(os.path.exists, path):
            raise RuntimeError(f"file exists: {path}")

    return probe


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _http_probe(target: HTTPHealth) -> Callable[[], Awaitable[None]]:
    # Proxies from the environment are honoured, except for loopback, as Go's HTTP client does.
    opener = (
        urllib.request.build_opener(urllib.request.ProxyHandler({}))
        if _is_loopback(urlsplit(target.uri).hostname or "")
        else urllib.request.build_opener()
    )

    def head() -> int:
        request = urllib.request.Request(target.uri, method="HEAD")
        for name, values in target.headers.items():
            request.add_header(name, ", ".join(values))
        try:
            with opener.open(request, timeout=target.timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    async def probe() -> None:
        status = await asyncio.to_thread(head)
        if status != target.statuscode:
            raise RuntimeError(f"HEAD {target.uri} answered {status}, expected {target.statuscode}")

    return probe


def _tcp_probe(target: TCPHealth) -> Callable[[], Awaitable[None]]:
    assert target.target is not None

    async def probe() -> None:
        assert target.target is not None
        _, writer = await asyncio.open_connection(target.target.host, target.target.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    return probe
