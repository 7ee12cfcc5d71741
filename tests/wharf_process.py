"""Run `wharf serve` as a real process on loopback for integration tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from services import free_port, wait_until

T = TypeVar("T")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _status_kib(pid: int, field: str) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":")), 0)


def default_config(data_dir: Path, port: int, **sections: Any) -> dict[str, Any]:
    """A registry:2-style file on filesystem storage with the embedded coordinator."""
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(data_dir / "registry")}, "delete": {"enabled": True}},
        "http": {
            "addr": f"127.0.0.1:{port}",
            "debug": {"addr": f"127.0.0.1:{free_port()}"},
            # The whole suite runs under either ASGI server (the default is granian).
            "server": os.environ.get("WHARF_TEST_SERVER", "granian"),
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    if "s3" in config["storage"]:
        config["storage"].pop("filesystem", None)
    if "s3" in config["storage"]:
        # Filesystem stores keep their coordinator inside the root, as users get it by default.
        config.setdefault("coordinator", {"embedded": {"path": str(data_dir / "coordinator.db")}})
    return config


class WharfProcess:
    """One `wharf serve CONFIG` process; restartable, with its log kept in the data dir."""

    def __init__(self, data_dir: Path, *, port: int | None = None, env: dict[str, str] | None = None, **sections: Any):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config = default_config(self.data_dir, self.port, **sections)
        self.config_path = self.data_dir / "config.yml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = self.data_dir / "wharf.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config['http']['debug']['addr']}/metrics"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> WharfProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        log.close()
        try:
            wait_until(self._ready, timeout=timeout, what=f"wharf on port {self.port}")
        except BaseException:
            self.stop()  # a `with` block that never entered would leave it running
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"wharf exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with _DIRECT.open(self.url + "/v2/", timeout=1) as response:
                return bool(response.status == 200 and response.headers.get("Docker-Distribution-Api-Version"))
        except urllib.error.HTTPError as exc:
            return exc.code == 401 and bool(exc.headers.get("Docker-Distribution-Api-Version"))  # up, with auth on
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> WharfProcess:
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_log(self, since: int = 0) -> list[dict[str, Any]]:
        """The access lines (JSON with method, route, status ...) written after byte `since`."""
        entries = []
        for line in self.log_text()[since:].splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "method" in entry and "route" in entry:
                entries.append(entry)
        return entries

    def pids(self) -> list[int]:
        """The server's process and its worker processes."""
        assert self.proc is not None
        found, pending = [], [self.proc.pid]
        while pending:
            pid = pending.pop()
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pending += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found.append(pid)
        return found

    def rss_peak_kib(self) -> int:
        """The largest VmHWM (peak resident set) of the server and its worker processes."""
        peaks = [_status_kib(pid, "VmHWM") for pid in self.pids()]
        if not any(peaks):
            raise RuntimeError("no VmHWM")
        return max(peaks)

    def memory_mib(self) -> float:
        """The node's resident memory, all its processes together: their PSS (a page two of them
        share counted once), as loadtests/bench_hotpaths.py measures it for issue 13's goals."""
        total = 0
        for pid in self.pids():
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            total += sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
        return total / 1024

    def memory_peak_mib(self, work: Callable[[], T], *, every: float = 0.05) -> tuple[T, float]:
        """`work()`'s result and the most memory (memory_mib) the node held while it ran."""
        peak = [self.memory_mib()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(every):
                peak[0] = max(peak[0], self.memory_mib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = work()
        finally:
            done.set()
            sampler.join(10)
        return result, max(peak[0], self.memory_mib())

    def __enter__(self) -> WharfProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(nodes: list[WharfProcess]) -> Iterator[list[WharfProcess]]:
    """Start every node; stop them all however the block ends (those started before a failure too)."""
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
