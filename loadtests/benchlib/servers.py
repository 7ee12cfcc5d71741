"""Registry processes under test: Distribution or Wharf, one process group each, their config and log."""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchlib import REPO_ROOT
from benchlib.cpu import cpu_of


@dataclass
class Target:
    key: str
    label: str
    kind: str  # "distribution" | "wharf"
    server: str = ""
    workers: int = 1


TARGETS = [
    Target("distribution", "Distribution 2.8.2", "distribution"),
    Target("hypercorn-1", "Wharf hypercorn x1", "wharf", "hypercorn", 1),
    Target("hypercorn-2", "Wharf hypercorn x2", "wharf", "hypercorn", 2),
    Target("granian-1", "Wharf granian x1", "wharf", "granian", 1),
    Target("granian-2", "Wharf granian x2", "wharf", "granian", 2),
]
DISTRIBUTION = TARGETS[0]
WHARF_VARIANTS = {t.key: t for t in TARGETS if t.kind == "wharf"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def registry_config(
    target: Target, port: int, debug_port: int, storage: dict[str, Any], accesslog: bool
) -> dict[str, Any]:
    """The same Distribution file for every registry (the registry:2 defaults); Wharf's adds its two keys."""
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "accesslog": {"disabled": not accesslog}, "fields": {"service": "registry"}},
        "storage": {**storage, "cache": {"blobdescriptor": "inmemory"}, "delete": {"enabled": True}},
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": "loadtest-not-secret",
            # Metrics on for both, each on its own port (Wharf's default is 127.0.0.1:5001).
            "debug": {"addr": f"127.0.0.1:{debug_port}", "prometheus": {"enabled": True, "path": "/metrics"}},
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if target.kind == "wharf":
        config["http"].update(server=target.server, workers=target.workers)
    return config


class Server:
    """One registry process group: started in its own session, stopped by its group id.

    Its config is `registry_config` on filesystem storage under `workdir`; `wharf` holds sections
    only Wharf reads (coordinator, gc, audit, signatures ...), left out of Distribution's file.
    """

    def __init__(
        self, target: Target, workdir: Path, accesslog: bool = True, *, wharf: dict[str, Any] | None = None
    ) -> None:
        self.target = target
        self.workdir = workdir
        self.accesslog = accesslog
        self.wharf = wharf or {}
        self.code = REPO_ROOT  # the checkout whose node/ a Wharf process runs
        self.port = 0
        self.debug_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "server.log"
        self._log: Any = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage(self) -> dict[str, Any]:
        """The config's storage driver section (subclasses put other storage in it)."""
        return {"filesystem": {"rootdirectory": str(self.workdir / "registry")}}

    def config(self) -> dict[str, Any]:
        config = registry_config(self.target, self.port, self.debug_port, self.storage(), self.accesslog)
        if self.target.kind == "wharf":
            config.update(self.wharf)
        return config

    def environment(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_") and k != "WHARF_CONFIG"}

    def write_config(self, path: Path | None = None) -> Path:
        """Write the config file (on free ports, unless ports are set); a started server reads it."""
        if not self.port:
            self.port, self.debug_port = free_port(), free_port()
        path = path or self.workdir / "config.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return path

    def start(self) -> None:
        self.port = 0
        config = self.write_config()
        env = self.environment()
        if self.target.kind == "distribution":
            argv = ["docker-registry", "serve", str(config)]
        else:
            argv = [sys.executable, "-m", "node.cli", "serve", str(config)]
            env["PYTHONPATH"] = str(self.code) + os.pathsep + env.get("PYTHONPATH", "")
        # Appended to: a server started again (bench_hotpaths measures memory alone) keeps its log whole.
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            argv,
            cwd=str(self.code if self.target.kind == "wharf" else self.workdir),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.target.label} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    # Multi-worker servers: give every worker a moment to finish its start-up.
                    if self.target.workers > 1:
                        time.sleep(1.0)
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.target.label} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def cpu_seconds(self) -> float:
        """user+system CPU of every live process in the server's process group."""
        if self.proc is None:
            return 0.0
        return cpu_of(pgids=(self.proc.pid,))

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; make sure no worker of its group outlives it.
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.1)
            if not _group_alive(pgid):
                break
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def keep_log(self, keep_logs: Path | None, name: str) -> None:
        """Copy the server's log to `keep_logs/<name>.log` (when the run keeps logs)."""
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy(self.log_path, keep_logs / f"{name}.log")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --------------------------------------------------------------------------------------------
# Server logs
# --------------------------------------------------------------------------------------------


def scan_log(server: Server) -> dict[str, Any]:
    """Errors in a server's log: error-level lines and 5xx access lines, grouped."""
    groups: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    try:
        lines = server.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return {"groups": groups, "statuses": statuses, "examples": examples}
    traceback: list[str] = []
    for line in lines:
        entry: dict[str, Any] | None = None
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
        if entry is not None:
            if traceback:
                _add_group(groups, examples, traceback[-1], "\n".join(traceback[-10:]))
                traceback = []
            level = str(entry.get("level", "")).lower()
            status = entry.get("status") or entry.get("http.response.status")
            if status == 499:
                # Wharf logs 499 when no response started: the client went away, or the handler raised.
                statuses[f"{entry.get('method', '?')} {entry.get('route', '?')} -> 499 (no response started)"] += 1
            if isinstance(status, int) and status >= 500:
                statuses[
                    f"{entry.get('method', entry.get('http.request.method', '?'))} {entry.get('route', entry.get('http.request.uri', '?'))} -> {status}"
                ] += 1
            if level in ("error", "critical", "fatal", "panic"):
                text = "\n".join(str(entry.get(k) or "") for k in ("msg", "error")).strip()
                text_lines = [ln for ln in text.splitlines() if ln.strip()]
                first = text_lines[0] if text_lines else ""
                last = text_lines[-1].strip() if len(text_lines) > 1 else ""
                key = f"{entry.get('logger', '')}: {first}" + (f" | {last}" if last else "")
                _add_group(groups, examples, key, "\n".join(text_lines[-10:]))
            continue
        # Non-JSON lines: Python tracebacks, Distribution's logfmt, hypercorn/granian text.
        if line.startswith("Traceback") or traceback:
            traceback.append(line)
            if line and not line.startswith((" ", "Traceback", "During handling", "The above exception")):
                _add_group(groups, examples, line.strip(), "\n".join(traceback[-10:]))
                traceback = []
            continue
        status_match = re.search(r"http\.response\.status=(\d+)", line)
        client_error = status_match is not None and status_match.group(1).startswith("4")
        if ("level=error" in line or "level=fatal" in line or "level=panic" in line) and not client_error:
            # Distribution logs every 4xx (a HEAD for a blob not yet pushed, say) at error level: skipped.
            msg = re.search(r'msg="([^"]*)"', line)
            err = re.search(r'err\.message="([^"]*)"', line)
            key = (msg.group(1) if msg else line[:120]) + (f" ({err.group(1)})" if err else "")
            _add_group(groups, examples, key, line[:1500])
        if m := re.search(r'" (5\d\d) \d+ "', line):  # Distribution's combined access log
            statuses[f"HTTP {m.group(1)}"] += 1
        if re.search(r"\b(ERROR|CRITICAL|Exception|panic:)\b", line) and "level=" not in line:
            _add_group(groups, examples, line.strip()[:200], line[:1500])
    if traceback:
        _add_group(groups, examples, traceback[-1], "\n".join(traceback[-10:]))
    return {"groups": groups, "statuses": statuses, "examples": examples}


def _add_group(groups: collections.Counter[str], examples: dict[str, str], key: str, example: str) -> None:
    key = re.sub(r"[0-9a-f]{32,64}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", key)
    key = re.sub(r"'/[^']*'", "'<path>'", key)[:300]  # one group for the same error on different files
    groups[key] += 1
    examples.setdefault(key, example)


def merge_scans(scans: list[dict[str, Any]]) -> dict[str, Any]:
    """The log scans of several servers as one (a cluster's nodes)."""
    merged: dict[str, Any] = {"groups": collections.Counter(), "statuses": collections.Counter(), "examples": {}}
    for scanned in scans:
        merged["groups"].update(scanned["groups"])
        merged["statuses"].update(scanned["statuses"])
        for key, example in scanned["examples"].items():
            merged["examples"].setdefault(key, example)
    return merged
