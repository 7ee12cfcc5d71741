#!/usr/bin/env python3
"""Side-by-side benchmark: Wharf (four server variants) against CNCF Distribution.

Every registry runs on filesystem storage under its own temporary directory, on loopback, one
registry at a time, and gets the same four loads:

  1. manifest GET by tag      wrk, N connections, Accept header set by a Lua script
  2. blob pull                a large blob GET over and over by a few concurrent clients
  3. blob push                monolithic uploads of large blobs (POST, then PUT ?digest= with the body)
  4. small-image pushes       config + 2 small layers + manifest, the whole client flow

Loads 2-4 use the small asyncio HTTP/1.1 client below (a Protocol, keep-alive, uvloop when installed), which
does far less work per request than httpx; wrk is run against load 1 and, as a sanity check,
against load 2, so the two clients can be compared on the same server.

Figures only: nothing here passes or fails. Usage:

    python loadtests/bench.py [--quick] [--duration S] [--blob-mib M] [--only a,b] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
MIB = 1 << 20


# --------------------------------------------------------------------------------------------
# Registries under test
# --------------------------------------------------------------------------------------------


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config_yaml(target: Target, root: Path, port: int, debug_port: int, accesslog: bool) -> str:
    # The same Distribution file for everyone (the registry:2 defaults); Wharf adds its two keys.
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        f"  accesslog: {{disabled: {'false' if accesslog else 'true'}}}",
        "  fields: {service: registry}",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {root / 'registry'}",
        "  cache: {blobdescriptor: inmemory}",
        "  delete: {enabled: true}",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        "  secret: loadtest-not-secret",
        # Metrics on for both, each on its own port (Wharf's default is 127.0.0.1:5001).
        f"  debug: {{addr: 127.0.0.1:{debug_port}, prometheus: {{enabled: true, path: /metrics}}}}",
        "  headers:",
        "    X-Content-Type-Options: [nosniff]",
    ]
    if target.kind == "wharf":
        lines += [f"  server: {target.server}", f"  workers: {target.workers}"]
    return "\n".join(lines) + "\n"


class Server:
    """One registry process group: started in its own session, stopped by its group id."""

    def __init__(self, target: Target, workdir: Path, accesslog: bool) -> None:
        self.target = target
        self.workdir = workdir
        self.accesslog = accesslog
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "server.log"
        self._log: Any = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config_yaml(self, debug_port: int) -> str:
        """The registry's config file (subclasses put other storage in it)."""
        return _config_yaml(self.target, self.workdir, self.port, debug_port, self.accesslog)

    def environment(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_") and k != "WHARF_CONFIG"}

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.workdir / "config.yml"
        config.write_text(self.config_yaml(free_port()))
        env = self.environment()
        if self.target.kind == "distribution":
            argv = ["docker-registry", "serve", str(config)]
        else:
            argv = [sys.executable, "-m", "node.cli", "serve", str(config)]
            env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=str(REPO_ROOT if self.target.kind == "wharf" else self.workdir),
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


def machine_busy() -> float:
    """CPU-seconds the whole machine spent busy (all cores; hypervisor steal included)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + (fields[7] if len(fields) > 7 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --------------------------------------------------------------------------------------------
# A small HTTP/1.1 keep-alive client on asyncio streams
# --------------------------------------------------------------------------------------------


class ProtocolError(Exception):
    pass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    size: int  # body bytes received (also when the body was discarded)


class _Wire(asyncio.Protocol):
    """The receiving side of one connection: a buffer, and a counter for bodies that are discarded."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._can_write: asyncio.Future[None] | None = None
        self._skip = 0  # body bytes still to be thrown away as they arrive

    # -- asyncio callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            if taken == len(data):
                if not self._skip:
                    self._wake()
                return
            data = data[taken:]
        self.buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake()
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def pause_writing(self) -> None:
        self._can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        self._can_write = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- for the client -------------------------------------------------------------------------
    async def _wait(self) -> None:
        if self.closed:
            raise ConnectionResetError(f"connection closed by the server ({self.error or 'EOF'})")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError(f"connection closed by the server ({self.error or 'EOF'})")
        if self._can_write is not None:
            await self._can_write

    async def read_until(self, sep: bytes, limit: int = 1 << 16) -> bytes:
        while True:
            at = self.buf.find(sep)
            if at >= 0:
                end = at + len(sep)
                data = bytes(self.buf[:end])
                del self.buf[:end]
                return data
            if len(self.buf) > limit:
                raise ProtocolError("response head too long")
            await self._wait()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._wait()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def skip(self, n: int) -> None:
        taken = min(n, len(self.buf))
        del self.buf[:taken]
        self._skip = n - taken
        while self._skip:
            await self._wait()

    async def read_to_eof(self) -> bytes:
        while not self.closed:
            await self._wait()
        data = bytes(self.buf)
        self.buf.clear()
        return data


class Conn:
    """One keep-alive HTTP/1.1 connection (no pipelining); reconnects after an error or close."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.wire: _Wire | None = None

    async def _connect(self) -> _Wire:
        _transport, wire = await asyncio.get_running_loop().create_connection(_Wire, self.host, self.port)
        sock = _transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _transport.set_write_buffer_limits(high=4 * MIB)
        return wire

    def close(self) -> None:
        if self.wire is not None and self.wire.transport is not None:
            self.wire.transport.close()
        self.wire = None

    async def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        body: bytes | bytearray | memoryview | list[Any] | None = None,
        *,
        discard: bool = False,
    ) -> Reply:
        try:
            return await self._request(method, target, headers, body, discard)
        except BaseException:
            self.close()
            raise

    async def _request(
        self, method: str, target: str, headers: dict[str, str] | None, body: Any, discard: bool
    ) -> Reply:
        if self.wire is None or self.wire.closed:
            self.wire = await self._connect()
        wire = self.wire
        transport = wire.transport
        assert transport is not None
        parts = [] if body is None else (body if isinstance(body, list) else [body])
        length = sum(len(p) for p in parts)
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {length}")
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), MIB):
                transport.write(view[start : start + MIB])
                await wire.drain()

        raw = await wire.read_until(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0]!r}")
        status = int(status_line[1])
        reply_headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                reply_headers[name.strip().lower()] = value.strip()
        payload = b""
        size = 0
        if method != "HEAD" and status not in (204, 304) and status >= 200:
            if "content-length" in reply_headers:
                size = int(reply_headers["content-length"])
                if discard:
                    await wire.skip(size)
                else:
                    payload = await wire.read_exactly(size)
            elif reply_headers.get("transfer-encoding", "").lower() == "chunked":
                pieces = []
                while True:
                    size_line = await wire.read_until(b"\r\n")
                    chunk_size = int(size_line.split(b";")[0], 16)
                    if chunk_size == 0:
                        await wire.read_until(b"\r\n")  # no trailers expected
                        break
                    data = await wire.read_exactly(chunk_size + 2)
                    size += chunk_size
                    if not discard:
                        pieces.append(data[:-2])
                payload = b"".join(pieces)
            else:
                payload = await wire.read_to_eof()
                size = len(payload)
                self.close()
        if reply_headers.get("connection", "").lower() == "close":
            self.close()
        return Reply(status, reply_headers, payload, size)


def location_target(location: str) -> str:
    parts = urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def with_query(target: str, key: str, value: str) -> str:
    return target + ("&" if "?" in target else "?") + f"{key}={value}"


class Unexpected(Exception):
    def __init__(self, what: str, reply: Reply) -> None:
        body = reply.body[:300].decode("utf-8", "replace")
        super().__init__(f"{what}: HTTP {reply.status} {body}")
        self.reply = reply
        self.what = what


def sha256_digest(data: bytes | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def upload_blob(conn: Conn, repo: str, digest: str, body: Any, *, single_post: bool = False) -> None:
    """POST then PUT ?digest= with the body; with single_post, try POST ?digest= first (OCI monolithic)."""
    headers = {"Content-Type": "application/octet-stream"}
    if single_post:
        reply = await conn.request("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", headers, body)
        if reply.status == 201:
            return
        if reply.status != 202:
            raise Unexpected("POST blob upload (monolithic)", reply)
    else:
        reply = await conn.request("POST", f"/v2/{repo}/blobs/uploads/", None, None)
        if reply.status != 202:
            raise Unexpected("POST blob upload", reply)
    target = with_query(location_target(reply.headers["location"]), "digest", digest)
    reply = await conn.request("PUT", target, headers, body)
    if reply.status != 201:
        raise Unexpected("PUT blob upload", reply)


def image_manifest(config: tuple[str, int], layers: list[tuple[str, int]]) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def image_config(nonce: str, layers: list[bytes]) -> bytes:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": [f"BENCH_NONCE={nonce}"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer) for layer in layers]},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


async def push_image(
    conn: Conn, repo: str, tag: str, nonce: str, layer_bytes: int, *, head_first: bool, single_post: bool
) -> int:
    """The whole client push of one small image; returns the number of requests made."""
    layers = [os.urandom(layer_bytes) for _ in range(2)]
    config = image_config(nonce, layers)
    requests = 0
    described = []
    for blob in [config, *layers]:
        digest = sha256_digest(blob)
        described.append((digest, len(blob)))
        if head_first:
            reply = await conn.request("HEAD", f"/v2/{repo}/blobs/{digest}")
            requests += 1
            if reply.status == 200:
                continue
            if reply.status != 404:
                raise Unexpected("HEAD blob", reply)
        await upload_blob(conn, repo, digest, blob, single_post=single_post)
        requests += 1 if single_post else 2
    manifest = image_manifest(described[0], described[1:])
    reply = await conn.request("PUT", f"/v2/{repo}/manifests/{tag}", {"Content-Type": OCI_MANIFEST}, manifest)
    requests += 1
    if reply.status != 201:
        raise Unexpected("PUT manifest", reply)
    return requests


# --------------------------------------------------------------------------------------------
# Load runner
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    ops: int = 0
    requests: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    other_cpu: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _error_key(exc: BaseException) -> str:
    if isinstance(exc, Unexpected):
        return str(exc)[:240]
    return f"{type(exc).__name__}: {exc}"[:240]


Op = Callable[[Conn, int, int], Awaitable[tuple[int, int]]]  # (conn, worker, seq) -> (requests, bytes)


async def run_load(
    server: Server, concurrency: int, duration: float, op: Op, *, max_ops: int | None = None, grace: float = 60.0
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
    cpu_client = time.process_time()
    cpu_server = server.cpu_seconds()
    cpu_machine = machine_busy()

    async def worker(index: int) -> None:
        nonlocal started_ops, last_done
        conn = Conn("127.0.0.1", server.port)
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
                    result.errors[_error_key(exc)] += 1
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
        result.errors[f"{len(pending)} worker(s) still busy {grace:.0f}s after the deadline (cancelled)"] += len(
            pending
        )
        await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            result.errors[_error_key(task.exception())] += 1  # type: ignore[arg-type]
    result.elapsed = max(last_done - start, 1e-9)
    result.client_cpu = time.process_time() - cpu_client
    result.server_cpu = server.cpu_seconds() - cpu_server
    result.other_cpu = max(0.0, machine_busy() - cpu_machine - result.client_cpu - result.server_cpu)
    return result


# --------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------

_UNITS_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_UNITS_SIZE = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def _wrk_time(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(match.group(1)) * _UNITS_TIME[match.group(2)] if match else float("nan")


def parse_wrk(output: str) -> dict[str, Any]:
    parsed: dict[str, Any] = {"non2xx": 0, "socket_errors": 0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", output):
        parsed["rps"] = float(m.group(1))
    if m := re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB|TB)", output):
        parsed["bytes_per_s"] = float(m.group(1)) * _UNITS_SIZE[m.group(2)]
    for pct in ("50", "75", "90", "99"):
        if m := re.search(rf"^\s+{pct}%\s+(\S+)", output, re.M):
            parsed[f"p{pct}"] = _wrk_time(m.group(1))
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+)", output):
        parsed["requests"] = int(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        parsed["non2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        parsed["socket_errors"] = sum(int(x) for x in m.groups())
        parsed["socket_detail"] = m.group(0)
    return parsed


async def run_wrk(
    server: Server, url: str, *, threads: int, connections: int, duration: float, script: Path | None, latency: bool
) -> dict[str, Any]:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s"]
    if latency:
        argv.append("--latency")
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    cpu_server = server.cpu_seconds()
    cpu_machine = machine_busy()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=duration + 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.decode(errors="replace")
    parsed = parse_wrk(text)
    parsed["raw"] = text
    parsed["client_cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    parsed["server_cpu"] = server.cpu_seconds() - cpu_server
    parsed["other_cpu"] = max(0.0, machine_busy() - cpu_machine - parsed["client_cpu"] - parsed["server_cpu"])
    parsed["duration"] = max(1, round(duration))
    if "rps" not in parsed:
        parsed["error"] = text.strip()[-500:]
    return parsed


WRK_ACCEPT_LUA = f"""-- written by loadtests/bench.py
wrk.method = "GET"
wrk.headers["Accept"] = "{ACCEPT}"
"""


# --------------------------------------------------------------------------------------------
# The four loads
# --------------------------------------------------------------------------------------------


@dataclass
class Settings:
    duration: float
    sanity_duration: float
    warmup: float
    connections: int
    wrk_threads: int
    blob_bytes: int
    pull_clients: int
    push_clients: int
    max_push_blobs: int
    image_clients: int
    layer_bytes: int
    max_images: int
    accesslog: bool


async def bench_registry(server: Server, s: Settings, workdir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    setup = Conn("127.0.0.1", server.port)

    # -- 1. manifest GET by tag -----------------------------------------------------------
    repo = "bench/manifest"
    layer = os.urandom(4096)
    config = image_config("manifest-get", [layer])
    for blob in (config, layer):
        await upload_blob(setup, repo, sha256_digest(blob), blob, single_post=True)
    manifest = image_manifest((sha256_digest(config), len(config)), [(sha256_digest(layer), len(layer))])
    reply = await setup.request("PUT", f"/v2/{repo}/manifests/latest", {"Content-Type": OCI_MANIFEST}, manifest)
    if reply.status != 201:
        raise Unexpected("setup: PUT manifest", reply)
    reply = await setup.request("GET", f"/v2/{repo}/manifests/latest", {"Accept": ACCEPT})
    if reply.status != 200 or reply.body != manifest:
        raise Unexpected("setup: GET manifest returned other bytes", reply)
    script = workdir / "accept.lua"
    script.write_text(WRK_ACCEPT_LUA)
    url = f"{server.base}/v2/{repo}/manifests/latest"
    if s.warmup > 0:
        await run_wrk(
            server,
            url,
            threads=s.wrk_threads,
            connections=s.connections,
            duration=s.warmup,
            script=script,
            latency=False,
        )
    progress(f"manifest GET: wrk -c{s.connections} {s.duration:.0f}s")
    out["manifest_wrk"] = await run_wrk(
        server, url, threads=s.wrk_threads, connections=s.connections, duration=s.duration, script=script, latency=True
    )
    manifest_len = len(manifest)

    async def get_manifest(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
        reply = await conn.request("GET", f"/v2/{repo}/manifests/latest", {"Accept": ACCEPT})
        if reply.status != 200 or reply.size != manifest_len:
            raise Unexpected("GET manifest", reply)
        return 1, reply.size

    progress(f"manifest GET: python client -c{s.connections} {s.sanity_duration:.0f}s (client check)")
    out["manifest_py"] = await run_load(server, s.connections, s.sanity_duration, get_manifest)

    # -- 1b. tag lists ----------------------------------------------------------------------
    # The same manifest under TAG_LIST_TAGS tags; the full list and a page of 100 from the middle.
    tags_repo = "bench/tags"
    for blob in (config, layer):
        await upload_blob(setup, tags_repo, sha256_digest(blob), blob, single_post=True)
    for n in range(TAG_LIST_TAGS):
        reply = await setup.request(
            "PUT", f"/v2/{tags_repo}/manifests/t{n:05d}", {"Content-Type": OCI_MANIFEST}, manifest
        )
        if reply.status != 201:
            raise Unexpected("setup: PUT tag", reply)
    for label, query in (("tags_full", ""), ("tags_page", f"?n=100&last=t{TAG_LIST_TAGS // 2:05d}")):
        progress(f"tags/list {label}: wrk -c{s.connections} {s.duration:.0f}s")
        out[label] = await run_wrk(
            server,
            f"{server.base}/v2/{tags_repo}/tags/list{query}",
            threads=s.wrk_threads,
            connections=s.connections,
            duration=s.duration,
            script=None,
            latency=True,
        )

    # -- 2. blob pull --------------------------------------------------------------------------
    repo = "bench/blob"
    big = os.urandom(s.blob_bytes)
    blob_digest = sha256_digest(big)
    await upload_blob(setup, repo, blob_digest, big)
    reply = await setup.request("GET", f"/v2/{repo}/blobs/{blob_digest}")
    if reply.status != 200 or sha256_digest(reply.body) != blob_digest:
        raise Unexpected("setup: GET blob returned other bytes", reply)
    setup.close()
    blob_len = len(big)

    async def pull(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
        reply = await conn.request("GET", f"/v2/{repo}/blobs/{blob_digest}", discard=True)
        if reply.status != 200 or reply.size != blob_len:
            raise Unexpected("GET blob", reply)
        return 1, reply.size

    progress(f"blob pull: {s.pull_clients} clients x {s.blob_bytes // MIB} MiB, {s.duration:.0f}s")
    out["pull"] = await run_load(server, s.pull_clients, s.duration, pull)
    progress(f"blob pull: wrk -c{s.pull_clients} {s.sanity_duration:.0f}s (client check)")
    out["pull_wrk"] = await run_wrk(
        server,
        f"{server.base}/v2/{repo}/blobs/{blob_digest}",
        threads=min(s.wrk_threads, s.pull_clients),
        connections=s.pull_clients,
        duration=s.sanity_duration,
        script=None,
        latency=False,
    )

    # -- 3. blob push --------------------------------------------------------------------------
    # Every upload is a different blob: the shared body plus a 16-byte tail. The hash of the body
    # is computed once and copied, so the client spends no time hashing 64 MiB per upload.
    body = memoryview(big)[:-16]
    body_hash = hashlib.sha256(body)

    async def push(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
        tail = f"{worker:04d}-{seq:010d}+".encode()
        assert len(tail) == 16
        hasher = body_hash.copy()
        hasher.update(tail)
        digest = "sha256:" + hasher.hexdigest()
        await upload_blob(conn, "bench/push", digest, [body, tail])
        return 2, len(body) + len(tail)

    progress(f"blob push: {s.push_clients} clients x {s.blob_bytes // MIB} MiB, {s.duration:.0f}s")
    out["push"] = await run_load(server, s.push_clients, s.duration, push, max_ops=s.max_push_blobs)

    # -- 4. small-image pushes --------------------------------------------------------------
    async def push_small(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
        requests = await push_image(
            conn,
            f"bench/images-{worker}",
            f"t{seq}",
            f"{worker}-{seq}-{time.time_ns()}",
            s.layer_bytes,
            head_first=True,
            single_post=False,
        )
        return requests, 0

    progress(f"image pushes: {s.image_clients} clients, {s.duration:.0f}s")
    out["images"] = await run_load(server, s.image_clients, s.duration, push_small, max_ops=s.max_images)
    return out


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


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt_num(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def _fmt_ms(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    return f"{seconds * 1000:.2f}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def _ratio(value: float | None, reference: float | None, *, is_ref: bool) -> str:
    if is_ref:
        return "1.00 (ref)"
    if value is None or reference is None or value != value or reference != reference or reference == 0:
        return "-"
    return f"{value / reference:.2f}x"


def _pct(cpu: float, elapsed: float) -> str:
    return f"{100 * cpu / elapsed:.0f}%" if elapsed > 0 else "-"


TAG_LIST_TAGS = 1000


def print_table(title: str, note: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    if note:
        print(f"  {note}")
    line = "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(headers))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))


def _per_cpu(amount: float | None, cpu: float) -> float | None:
    """`amount` of work per CPU-second the registry spent on it."""
    if amount is None or cpu <= 0:
        return None
    return amount / cpu


Row = Callable[[dict[str, Any]], tuple[list[str], list[float | None]]]


def comparison_table(
    title: str,
    note: str,
    headers: list[str],
    row: Row,
    ratio_headers: list[str],
    results: dict[str, dict[str, Any]],
    targets: list[Target],
    ref_key: str,
) -> None:
    """One table: a row per target (cells, then each figure divided by the reference target's)."""
    ref = results.get(ref_key)
    reference = row(ref)[1] if ref is not None and "error" not in ref else []
    rows = []
    for t in targets:
        if t.key not in results or "error" in results[t.key]:
            continue
        cells, figures = row(results[t.key])
        if t.key == ref_key:
            ratios = ["ref"] * len(figures)
        else:
            ratios = [_ratio(f, reference[i] if reference else None, is_ref=False) for i, f in enumerate(figures)]
        rows.append([t.label, *cells, *ratios])
    print_table(title, note, [*headers, *ratio_headers], rows)


def report(results: dict[str, dict[str, Any]], targets: list[Target], s: Settings) -> None:
    done = [t for t in targets if t.key in results and "error" not in results[t.key]]

    def table(
        title: str,
        note: str,
        headers: list[str],
        row: Callable[[dict[str, Any]], tuple[list[str], list[float | None]]],
        ratio_headers: list[str],
    ) -> None:
        comparison_table(title, note, headers, row, ratio_headers, results, done, "distribution")

    # 1. manifest GET
    def manifest_row(r: dict[str, Any]) -> tuple[list[str], list[float | None]]:
        w = r["manifest_wrk"]
        py: Result = r["manifest_py"]
        py_rps = py.ops / py.elapsed if py.ops else 0.0
        efficiency = _per_cpu(w.get("requests"), w["server_cpu"])
        cells = [
            _fmt_num(w.get("rps")),
            _fmt_ms(w.get("p50")),
            _fmt_ms(w.get("p99")),
            str(w.get("non2xx", 0) + w.get("socket_errors", 0)),
            _pct(w["server_cpu"], w["duration"]),
            _fmt_num(efficiency),
            _pct(w["client_cpu"], w["duration"]),
            _pct(w["other_cpu"], w["duration"]),
            _fmt_num(py_rps),
            _pct(py.client_cpu, py.elapsed),
        ]
        return cells, [w.get("rps"), w.get("p99"), efficiency]

    table(
        f"1. Manifest GET by tag (wrk -t{s.wrk_threads} -c{s.connections} -d{s.duration:.0f}s --latency, Accept via Lua)",
        f"py = the bench client on the same URL ({s.connections} connections, {s.sanity_duration:.0f}s), as a client check.",
        [
            "registry",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "srv CPU",
            "req/CPU-s",
            "wrk CPU",
            "other",
            "py req/s",
            "py CPU",
        ],
        manifest_row,
        ["ratio req/s", "ratio p99", "ratio /CPU"],
    )

    # 1b. tag lists
    for label, what in (("tags_full", f"all {TAG_LIST_TAGS} tags"), ("tags_page", "?n=100 from the middle")):

        def tags_row(r: dict[str, Any], label: str = label) -> tuple[list[str], list[float | None]]:
            w = r[label]
            efficiency = _per_cpu(w.get("requests"), w["server_cpu"])
            cells = [
                _fmt_num(w.get("rps")),
                _fmt_ms(w.get("p50")),
                _fmt_ms(w.get("p99")),
                str(w.get("non2xx", 0) + w.get("socket_errors", 0)),
                _pct(w["server_cpu"], w["duration"]),
                _fmt_num(efficiency),
                _pct(w["client_cpu"], w["duration"]),
            ]
            return cells, [w.get("rps"), w.get("p99"), efficiency]

        table(
            f"1b. GET /v2/<name>/tags/list, {what} (wrk -t{s.wrk_threads} -c{s.connections} -d{s.duration:.0f}s)",
            "The goal is 5x Distribution's req/s (issue: cost that does not grow with the registry).",
            ["registry", "req/s", "p50 ms", "p99 ms", "errors", "srv CPU", "req/CPU-s", "wrk CPU"],
            tags_row,
            ["ratio req/s", "ratio p99", "ratio /CPU"],
        )

    # 2. blob pull
    mib = s.blob_bytes // MIB

    def pull_row(r: dict[str, Any]) -> tuple[list[str], list[float | None]]:
        p: Result = r["pull"]
        w = r["pull_wrk"]
        rate = p.bytes / p.elapsed if p.ops else 0.0
        efficiency = _per_cpu(p.bytes / MIB, p.server_cpu)
        cells = [
            _fmt_num(rate / MIB),
            str(p.ops),
            _fmt_ms(p.percentile(0.5)),
            str(p.error_count),
            _pct(p.server_cpu, p.elapsed),
            _fmt_num(efficiency),
            _pct(p.client_cpu, p.elapsed),
            _pct(p.other_cpu, p.elapsed),
            _fmt_num((w.get("bytes_per_s") or float("nan")) / MIB),
            str(w.get("non2xx", 0) + w.get("socket_errors", 0)),
        ]
        return cells, [rate, efficiency]

    table(
        f"2. Blob pull: GET of one {mib} MiB blob, {s.pull_clients} concurrent clients, {s.duration:.0f}s",
        f"wrk = wrk -c{s.pull_clients} on the same URL for {s.sanity_duration:.0f}s, as a client check. per GET = one whole blob.",
        [
            "registry",
            "MiB/s",
            "GETs",
            "per GET ms",
            "errors",
            "srv CPU",
            "MiB/CPU-s",
            "cli CPU",
            "other",
            "wrk MiB/s",
            "wrk err",
        ],
        pull_row,
        ["ratio MiB/s", "ratio /CPU"],
    )

    # 3. blob push
    def push_row(r: dict[str, Any]) -> tuple[list[str], list[float | None]]:
        p: Result = r["push"]
        rate = p.bytes / p.elapsed if p.ops else 0.0
        efficiency = _per_cpu(p.bytes / MIB, p.server_cpu)
        cells = [
            _fmt_num(rate / MIB),
            str(p.ops),
            _fmt_ms(p.percentile(0.5)),
            _fmt_ms(p.percentile(0.99)),
            str(p.error_count),
            _pct(p.server_cpu, p.elapsed),
            _fmt_num(efficiency),
            _pct(p.client_cpu, p.elapsed),
            _pct(p.other_cpu, p.elapsed),
        ]
        return cells, [rate, efficiency]

    table(
        f"3. Blob push: {mib} MiB monolithic uploads (POST, PUT ?digest= + body), {s.push_clients} concurrent, {s.duration:.0f}s",
        f"every upload is a distinct blob; at most {s.max_push_blobs} per registry. Latency is per whole upload.",
        ["registry", "MiB/s", "blobs", "p50 ms", "p99 ms", "errors", "srv CPU", "MiB/CPU-s", "cli CPU", "other"],
        push_row,
        ["ratio MiB/s", "ratio /CPU"],
    )

    # 4. small images
    def images_row(r: dict[str, Any]) -> tuple[list[str], list[float | None]]:
        p: Result = r["images"]
        rate = p.ops / p.elapsed if p.ops else 0.0
        efficiency = _per_cpu(float(p.ops), p.server_cpu)
        cells = [
            _fmt_num(rate, 1),
            _fmt_num(p.requests / p.elapsed if p.ops else 0.0),
            str(p.ops),
            _fmt_ms(p.percentile(0.5)),
            _fmt_ms(p.percentile(0.99)),
            str(p.error_count),
            _pct(p.server_cpu, p.elapsed),
            _fmt_num(efficiency, 1),
            _pct(p.client_cpu, p.elapsed),
            _pct(p.other_cpu, p.elapsed),
        ]
        return cells, [rate, p.percentile(0.99), efficiency]

    table(
        f"4. Small-image pushes: config + 2 x {s.layer_bytes // 1024} KiB layers + manifest, {s.image_clients} concurrent, {s.duration:.0f}s",
        "per image: 3 x (HEAD blob, POST, PUT ?digest=) + PUT manifest = 10 requests; latency is per whole image.",
        [
            "registry",
            "images/s",
            "req/s",
            "images",
            "p50 ms",
            "p99 ms",
            "errors",
            "srv CPU",
            "img/CPU-s",
            "cli CPU",
            "other",
        ],
        images_row,
        ["ratio img/s", "ratio p99", "ratio /CPU"],
    )

    cores = len(os.sched_getaffinity(0))
    print("\nratio = Wharf / Distribution. Above 1.00 is better for throughput (req/s, MiB/s, images/s) and for work")
    print(
        f"per CPU-second (/CPU), worse for latency (p99). CPU% is of one core ({cores} here). 'other' is the CPU used by"
    )
    print(
        "everything but the registry and the load client, plus hypervisor steal: when it is high, throughput is noisy"
    )
    print("and the /CPU figures hold up better.")


def report_errors(results: dict[str, dict[str, Any]], targets: list[Target]) -> None:
    print("\nErrors seen")
    print("-----------")
    clean = True
    for t in targets:
        r = results.get(t.key)
        if r is None:
            continue
        if "error" in r:
            clean = False
            print(f"* {t.label}: run aborted: {r['error']}")
        for name in ("manifest_py", "pull", "push", "images"):
            res = r.get(name)
            if isinstance(res, Result) and res.errors:
                clean = False
                for key, count in res.errors.most_common(5):
                    print(f"* {t.label} [{name}] client saw {count} x {key}")
        for name in ("manifest_wrk", "pull_wrk"):
            w = r.get(name)
            if isinstance(w, dict):
                if w.get("error"):
                    clean = False
                    print(f"* {t.label} [{name}] wrk failed: {w['error']}")
                if w.get("non2xx") or w.get("socket_errors"):
                    clean = False
                    print(
                        f"* {t.label} [{name}] wrk: {w.get('non2xx', 0)} non-2xx/3xx responses; {w.get('socket_detail', '')}"
                    )
        log = r.get("log")
        if log:
            for key, count in log["statuses"].most_common(5):
                clean = False
                print(f"* {t.label} log: {count} x {key}")
            for key, count in log["groups"].most_common(5):
                clean = False
                print(f"* {t.label} log: {count} x {key}")
                example = log["examples"].get(key, "")
                if example:
                    print("    " + example.replace("\n", "\n    ")[:1500])
    if clean:
        print("none: every response was the expected 2xx and no server logged an error.")


def machine_context(s: Settings, workdir: Path) -> list[str]:
    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    def pkg(name: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:  # noqa: BLE001
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) // 1024 // 1024} GiB"
    fs = version(["stat", "-f", "-c", "%T", str(workdir)])
    return [
        "Machine",
        f"  nproc {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), {cpu}, {mem} RAM, {platform.system()} {platform.release()}",
        f"  python {platform.python_version()} ({sys.executable}); client: asyncio Protocol + {'uvloop ' + pkg('uvloop') if _have_uvloop() else 'default loop'}",
        f"  hypercorn {pkg('hypercorn')}, granian {pkg('granian')}, starlette {pkg('starlette')}; {version(['docker-registry', '--version'])}",
        f"  {version(['wrk', '-v'])}",
        f"  storage: filesystem under {workdir} ({fs}); loopback; one registry at a time; access logs {'on' if s.accesslog else 'off'}",
    ]


def _have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


async def run_all(
    targets: list[Target], s: Settings, base: Path, keep_logs: Path | None, servers: list[Server]
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for target in targets:
        workdir = base / target.key
        server = Server(target, workdir, s.accesslog)
        servers.append(server)
        started = time.monotonic()
        print(f"\n== {target.label}", flush=True)

        def progress(msg: str, _t0: float = started) -> None:
            print(f"   [{time.monotonic() - _t0:5.1f}s] {msg}", flush=True)

        try:
            server.start()
            await asyncio.get_running_loop().run_in_executor(None, server.wait_ready)
            progress(f"ready on port {server.port}")
            results[target.key] = await bench_registry(server, s, workdir, progress)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next registry
            results[target.key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"   failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            server.stop()
            results.setdefault(target.key, {})["log"] = scan_log(server)
            if keep_logs is not None:
                keep_logs.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):
                    shutil.copy(server.log_path, keep_logs / f"{target.key}.log")
            shutil.rmtree(workdir, ignore_errors=True)
        progress("stopped")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs and a 16 MiB blob: a smoke test of the bench")
    parser.add_argument("--duration", type=float, help="seconds per load (default 10, quick 3)")
    parser.add_argument("--blob-mib", type=int, help="blob size for pull and push (default 64, quick 16)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections for manifest GET (50)")
    parser.add_argument("--pull-clients", type=int, default=4)
    parser.add_argument("--push-clients", type=int, default=4)
    parser.add_argument("--image-clients", type=int, default=8)
    parser.add_argument("--layer-kib", type=int, default=4, help="size of each small-image layer (4 KiB)")
    parser.add_argument("--max-push-gib", type=float, default=12.0, help="cap on bytes pushed per registry in load 3")
    parser.add_argument("--no-accesslog", action="store_true", help="disable access logs in every registry")
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(t.key for t in TARGETS))
    parser.add_argument("--tmpdir", help="parent directory for the registries' data (default: system temp)")
    parser.add_argument("--keep-logs", type=Path, help="copy each server's log here")
    args = parser.parse_args(argv)

    duration = args.duration or (3.0 if args.quick else 10.0)
    blob_mib = args.blob_mib or (16 if args.quick else 64)
    blob_bytes = blob_mib * MIB
    s = Settings(
        duration=duration,
        sanity_duration=max(2.0, duration / 2),
        warmup=0.0 if args.quick else 1.0,
        connections=args.connections,
        wrk_threads=min(2, max(1, len(os.sched_getaffinity(0)))),
        blob_bytes=blob_bytes,
        pull_clients=args.pull_clients,
        push_clients=args.push_clients,
        max_push_blobs=max(args.push_clients, int(args.max_push_gib * (1 << 30) // blob_bytes)),
        image_clients=args.image_clients,
        layer_bytes=args.layer_kib * 1024,
        max_images=100_000,
        accesslog=not args.no_accesslog,
    )
    targets = TARGETS
    if args.only:
        wanted = {k.strip() for k in args.only.split(",") if k.strip()}
        unknown = wanted - {t.key for t in TARGETS}
        if unknown:
            parser.error(f"unknown registries: {', '.join(sorted(unknown))}")
        targets = [t for t in TARGETS if t.key in wanted]
    for tool in ("wrk",) + (("docker-registry",) if any(t.kind == "distribution" for t in targets) else ()):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2

    base = Path(tempfile.mkdtemp(prefix="wharf-bench-", dir=args.tmpdir))
    servers: list[Server] = []
    # SIGTERM ends the run like Ctrl-C: asyncio lets KeyboardInterrupt out of tasks and the loop.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    results: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    context: list[str] = []
    try:
        context = machine_context(s, base)
        print("\n".join(context), flush=True)
        if _have_uvloop():
            import uvloop

            results = uvloop.run(run_all(targets, s, base, args.keep_logs, servers))
        else:
            results = asyncio.run(run_all(targets, s, base, args.keep_logs, servers))
    except KeyboardInterrupt:
        print("\ninterrupted: stopping registries and removing temporary data", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nResults ({time.monotonic() - t0:.0f}s in all)")
    print("=======")
    print("\n".join(context))
    report(results, targets, s)
    report_errors(results, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
