#!/usr/bin/env python3
"""Side-by-side benchmark on S3: Wharf (S3 + etcd) against CNCF Distribution (its s3 driver), and a cluster run.

One `moto_server` (the S3 server the tests use) and one etcd member run on loopback for the whole
bench. Each registry stores its data under its own `rootdirectory` of the same bucket, which is
emptied after its turn (moto keeps every object in memory). Blob GETs answer 307 to a presigned S3
URL for both registries (`storage.redirect.disable: false`); the bench client follows it.

Part A, side by side (the four loads of bench.py, one registry at a time):

  1. manifest GET by tag      wrk, N connections (Distribution reads the tag and manifest from S3)
  2. blob pull                GET -> 307 -> GET of the presigned URL from the S3 server; and wrk on
                              the registry's redirect alone (307/s)
  3. blob push                monolithic uploads (POST, PUT ?digest= with the body)
  4. small-image pushes       config + 2 small layers + manifest, the whole client flow

Part B, the cluster: one Wharf node direct, the same node behind HAProxy, then three nodes behind
HAProxy (tests/haproxy.py: round robin, readiness checks, the deploy/ settings), all on the same S3
and etcd: manifest GET req/s and small-image pushes/s.

Figures only: nothing here passes or fails. The client, the load runner, wrk and the tables are
bench.py's. Usage:

    python loadtests/bench_s3.py [--quick] [--duration S] [--blob-mib M] [--only side,cluster]
                                 [--wharf granian-1] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for _path in (HERE, REPO_ROOT / "tests", REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench  # noqa: E402
from bench import (  # noqa: E402
    ACCEPT,
    MIB,
    OCI_MANIFEST,
    WRK_ACCEPT_LUA,
    Conn,
    Result,
    Settings,
    Target,
    Unexpected,
    _fmt_ms,
    _fmt_num,
    _pct,
    _per_cpu,
    comparison_table,
    cpu_of,
    image_config,
    image_manifest,
    location_target,
    push_image,
    run_load,
    run_wrk,
    scan_log,
    sha256_digest,
    upload_blob,
)
from haproxy import HAPROXY, HAProxy  # noqa: E402
from s3_server import S3Server, no_proxy_for_loopback  # noqa: E402
from services import ETCD_BINARY, EtcdCluster  # noqa: E402

BUCKET = "wharf-bench"
WHARF_VARIANTS = {t.key: t for t in bench.TARGETS if t.kind == "wharf"}


# --------------------------------------------------------------------------------------------
# The shared backend: one S3 server and one etcd member
# --------------------------------------------------------------------------------------------


class Backend:
    """moto_server + etcd: their CPU, and the S3 requests moto logged (one access line each)."""

    def __init__(self) -> None:
        self.s3 = S3Server(bucket=BUCKET)
        self.etcd = EtcdCluster(1)

    def start(self) -> Backend:
        self.s3.start()
        self.etcd.start()
        return self

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.etcd.close()
        with contextlib.suppress(Exception):
            self.s3.close()

    def cpu(self) -> float:
        pgids = [self.s3.process.pid] if self.s3.process is not None else []
        pids = [m.process.pid for m in self.etcd.members if m.process is not None]
        return cpu_of(pids=pids, pgids=pgids)

    def _moto_log(self) -> Path | None:
        return Path(self.s3._log_dir) / "moto.log" if self.s3._log_dir else None

    def log_offset(self) -> int:
        path = self._moto_log()
        try:
            return path.stat().st_size if path else 0
        except OSError:
            return 0

    def s3_requests(self, since: int) -> collections.Counter[str]:
        """S3 requests moto served after byte `since` of its log, by method and status class."""
        counts: collections.Counter[str] = collections.Counter()
        path = self._moto_log()
        if path is None:
            return counts
        with contextlib.suppress(OSError), open(path, "rb") as handle:
            handle.seek(since)
            for line in handle.read().decode(errors="replace").splitlines():
                m = re.search(r'"([A-Z]+) \S+ HTTP/[\d.]+" (\d)\d\d ', line)
                if m and "/moto-api/" not in line:
                    counts[m.group(1)] += 1
                    counts[f"{m.group(2)}xx"] += 1
        return counts

    def object_count(self, prefix: str) -> tuple[int, int]:
        """Objects and bytes under `prefix` of the bucket."""
        client = self.s3.client()
        count = size = 0
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
                for item in page.get("Contents", []):
                    count += 1
                    size += item["Size"]
        finally:
            client.close()
        return count, size


def registry_config(
    target: Target,
    port: int,
    debug_port: int,
    accesslog: bool,
    backend: Backend,
    root: str,
    prefix: str,
    redirect: bool,
    node: str,
) -> dict[str, Any]:
    """bench.py's registry:2-style file with S3 storage; Wharf's copy adds etcd and its own keys."""
    s3 = backend.s3
    storage_s3: dict[str, Any] = {
        "accesskey": s3.access_key,
        "secretkey": s3.secret_key,
        "region": s3.region,
        "regionendpoint": s3.endpoint,
        "bucket": BUCKET,
        "rootdirectory": root,
        "secure": False,
        "v4auth": True,
    }
    if target.kind == "wharf":
        # Distribution 2.8 has no forcepathstyle key: it uses path style whenever regionendpoint is set.
        storage_s3["forcepathstyle"] = True
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "accesslog": {"disabled": not accesslog}, "fields": {"service": "registry"}},
        "storage": {
            "s3": storage_s3,
            "cache": {"blobdescriptor": "inmemory"},
            "delete": {"enabled": True},
            "redirect": {"disable": not redirect},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": "loadtest-not-secret",
            "debug": {"addr": f"127.0.0.1:{debug_port}", "prometheus": {"enabled": True, "path": "/metrics"}},
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if target.kind == "wharf":
        config["http"]["server"] = target.server
        config["http"]["workers"] = target.workers
        config["coordinator"] = {"etcd": {"endpoints": backend.etcd.endpoints, "prefix": prefix}}
        config["gc"] = {"enabled": False}  # measured on its own in bench_gc.py
        if node:
            config["cluster"] = {"node": node}
    return config


class S3Registry(bench.Server):
    """A bench.py registry process whose config names the shared S3 server (and etcd, for Wharf)."""

    def __init__(
        self,
        target: Target,
        workdir: Path,
        accesslog: bool,
        backend: Backend,
        *,
        root: str,
        prefix: str = "",
        redirect: bool = True,
        node: str = "",
    ) -> None:
        super().__init__(target, workdir, accesslog)
        self.backend = backend
        self.root = root
        self.prefix = prefix
        self.redirect = redirect
        self.node = node

    def config_yaml(self, debug_port: int) -> str:
        config = registry_config(
            self.target,
            self.port,
            debug_port,
            self.accesslog,
            self.backend,
            self.root,
            self.prefix,
            self.redirect,
            self.node,
        )
        return yaml.safe_dump(config, sort_keys=False)

    def environment(self) -> dict[str, str]:
        # No AWS profile, CA bundle or proxy from the environment: the S3 server is plain HTTP on loopback.
        env = {k: v for k, v in super().environment().items() if not k.startswith("AWS_")}
        env.update(no_proxy_for_loopback(env))
        return env


class Front:
    """What a load talks to: a port, and the CPU of the registry processes behind it (run_load's `server`)."""

    def __init__(self, port: int, nodes: list[bench.Server]) -> None:
        self.port = port
        self.nodes = nodes

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        return cpu_of(pgids=[n.proc.pid for n in self.nodes if n.proc is not None])


async def measured(
    backend: Backend,
    coro: Coroutine[Any, Any, Any],
    *,
    extra: dict[str, Callable[[], float]] | None = None,
) -> Any:
    """Await a load (run_load or run_wrk) and add the backend's CPU and S3 requests to its figures.

    The backend's CPU (and any `extra` meter's, such as HAProxy's) moves out of `other`.
    """
    meters = {"backend_cpu": backend.cpu, **(extra or {})}
    before = {name: meter() for name, meter in meters.items()}
    offset = backend.log_offset()
    result = await coro
    spent = {name: meter() - before[name] for name, meter in meters.items()}
    requests = backend.s3_requests(offset)
    if isinstance(result, Result):
        result.extra.update(spent)
        result.extra["s3"] = requests
        result.other_cpu = max(0.0, result.other_cpu - sum(spent.values()))
    else:
        result.update(spent)
        result["s3"] = requests
        result["other_cpu"] = max(0.0, result["other_cpu"] - sum(spent.values()))
    return result


def _s3_total(counter: collections.Counter[str]) -> int:
    return sum(v for k, v in counter.items() if not k.endswith("xx"))


# --------------------------------------------------------------------------------------------
# Blob pulls that follow the redirect
# --------------------------------------------------------------------------------------------


class Redirects:
    """One connection per worker to wherever the registry redirects (the S3 server)."""

    def __init__(self) -> None:
        self.conns: dict[tuple[int, str, int], Conn] = {}
        self.hops: list[float] = []  # the registry's part: request to 307

    def conn(self, worker: int, location: str) -> Conn:
        parts = urlsplit(location)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"redirect to {location[:120]!r}: the bench client speaks plain HTTP only")
        key = (worker, parts.hostname, parts.port or 80)
        conn = self.conns.get(key)
        if conn is None:
            conn = self.conns[key] = Conn(parts.hostname, parts.port or 80)
        return conn

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()

    async def get(self, conn: Conn, worker: int, target: str, *, discard: bool) -> tuple[bytes, int, int]:
        """GET `target`; follow one 307/302 to storage. Returns (body, size, requests)."""
        t0 = time.perf_counter()
        reply = await conn.request("GET", target, discard=discard)
        if reply.status in (302, 307):
            self.hops.append(time.perf_counter() - t0)
            location = reply.headers.get("location", "")
            second = await self.conn(worker, location).request("GET", location_target(location), discard=discard)
            if second.status != 200:
                raise Unexpected("GET redirected blob from storage", second)
            return second.body, second.size, 2
        if reply.status != 200:
            raise Unexpected("GET blob", reply)
        return reply.body, reply.size, 1


# --------------------------------------------------------------------------------------------
# Part A: the four loads on S3
# --------------------------------------------------------------------------------------------


async def setup_manifest(conn: Conn, repo: str) -> bytes:
    layer = os.urandom(4096)
    config = image_config("manifest-get", [layer])
    for blob in (config, layer):
        await upload_blob(conn, repo, sha256_digest(blob), blob, single_post=True)
    manifest = image_manifest((sha256_digest(config), len(config)), [(sha256_digest(layer), len(layer))])
    reply = await conn.request("PUT", f"/v2/{repo}/manifests/latest", {"Content-Type": OCI_MANIFEST}, manifest)
    if reply.status != 201:
        raise Unexpected("setup: PUT manifest", reply)
    reply = await conn.request("GET", f"/v2/{repo}/manifests/latest", {"Accept": ACCEPT})
    if reply.status != 200 or reply.body != manifest:
        raise Unexpected("setup: GET manifest returned other bytes", reply)
    return manifest


async def manifest_load(
    front: Any, backend: Backend, s: Settings, workdir: Path, repo: str, extra: dict[str, Callable[[], float]] | None
) -> dict[str, Any]:
    script = workdir / "accept.lua"
    script.write_text(WRK_ACCEPT_LUA)
    url = f"{front.base}/v2/{repo}/manifests/latest"
    kwargs: dict[str, Any] = {"threads": s.wrk_threads, "connections": s.connections, "script": script}
    if s.warmup > 0:
        await run_wrk(front, url, duration=s.warmup, latency=False, **kwargs)
    result: dict[str, Any] = await measured(
        backend, run_wrk(front, url, duration=s.duration, latency=True, **kwargs), extra=extra
    )
    return result


def image_op(s: Settings, repo_prefix: str) -> bench.Op:
    async def push_small(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
        requests = await push_image(
            conn,
            f"{repo_prefix}-{worker}",
            f"t{seq}",
            f"{repo_prefix}-{worker}-{seq}-{time.time_ns()}",
            s.layer_bytes,
            head_first=True,
            single_post=False,
        )
        return requests, 0

    return push_small


async def bench_s3_registry(
    server: S3Registry, backend: Backend, s: Settings, workdir: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    setup = Conn("127.0.0.1", server.port)
    redirects = Redirects()
    try:
        # -- 1. manifest GET by tag ---------------------------------------------------------
        repo = "bench/manifest"
        manifest = await setup_manifest(setup, repo)
        progress(f"manifest GET: wrk -c{s.connections} {s.duration:.0f}s")
        out["manifest_wrk"] = await manifest_load(server, backend, s, workdir, repo, None)
        manifest_len = len(manifest)

        async def get_manifest(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
            reply = await conn.request("GET", f"/v2/{repo}/manifests/latest", {"Accept": ACCEPT})
            if reply.status != 200 or reply.size != manifest_len:
                raise Unexpected("GET manifest", reply)
            return 1, reply.size

        progress(f"manifest GET: python client -c{s.connections} {s.sanity_duration:.0f}s (client check)")
        out["manifest_py"] = await measured(backend, run_load(server, s.connections, s.sanity_duration, get_manifest))

        # -- 2. blob pull, following the redirect ---------------------------------------------
        repo = "bench/blob"
        big = os.urandom(s.blob_bytes)
        blob_digest = sha256_digest(big)
        await upload_blob(setup, repo, blob_digest, big)
        body, _size, hops = await redirects.get(setup, -1, f"/v2/{repo}/blobs/{blob_digest}", discard=False)
        if sha256_digest(body) != blob_digest:
            raise RuntimeError("setup: GET blob returned other bytes")
        out["redirected"] = hops == 2
        redirects.close()
        redirects.hops.clear()
        del body
        blob_len = len(big)

        async def pull(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
            _body, size, requests = await redirects.get(conn, worker, f"/v2/{repo}/blobs/{blob_digest}", discard=True)
            if size != blob_len:
                raise RuntimeError(f"GET blob: {size} bytes, expected {blob_len}")
            return requests, size

        progress(f"blob pull: {s.pull_clients} clients x {s.blob_bytes // MIB} MiB, {s.duration:.0f}s")
        out["pull"] = await measured(backend, run_load(server, s.pull_clients, s.duration, pull))
        out["pull"].extra["hops"] = list(redirects.hops)
        redirects.close()
        progress(f"blob GET redirect only: wrk -c{s.connections} {s.sanity_duration:.0f}s")
        out["pull_wrk"] = await measured(
            backend,
            run_wrk(
                server,
                f"{server.base}/v2/{repo}/blobs/{blob_digest}",
                threads=s.wrk_threads,
                connections=s.connections,
                duration=s.sanity_duration,
                script=None,
                latency=True,
            ),
        )

        # -- 3. blob push ---------------------------------------------------------------------
        body_view = memoryview(big)[:-16]
        body_hash = hashlib.sha256(body_view)

        async def push(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
            tail = f"{worker:04d}-{seq:010d}+".encode()
            hasher = body_hash.copy()
            hasher.update(tail)
            await upload_blob(conn, "bench/push", "sha256:" + hasher.hexdigest(), [body_view, tail])
            return 2, len(body_view) + len(tail)

        progress(f"blob push: {s.push_clients} clients x {s.blob_bytes // MIB} MiB, {s.duration:.0f}s")
        out["push"] = await measured(
            backend, run_load(server, s.push_clients, s.duration, push, max_ops=s.max_push_blobs)
        )

        # -- 4. small-image pushes ------------------------------------------------------------
        progress(f"image pushes: {s.image_clients} clients, {s.duration:.0f}s")
        out["images"] = await measured(
            backend,
            run_load(server, s.image_clients, s.duration, image_op(s, "bench/images"), max_ops=s.max_images),
        )
        out["objects"] = await asyncio.get_running_loop().run_in_executor(
            None, backend.object_count, server.root.strip("/") + "/"
        )
        return out
    finally:
        setup.close()
        redirects.close()


async def run_side_by_side(
    targets: list[Target],
    backend: Backend,
    s: Settings,
    base: Path,
    keep_logs: Path | None,
    servers: list[bench.Server],
    redirect: bool,
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for target in targets:
        workdir = base / target.key
        root = f"/{target.key}"
        server = S3Registry(
            target, workdir, s.accesslog, backend, root=root, prefix=f"/bench-{target.key}/", redirect=redirect
        )
        servers.append(server)
        started = time.monotonic()
        print(f"\n== {target.label} on S3", flush=True)

        def progress(msg: str, _t0: float = started) -> None:
            print(f"   [{time.monotonic() - _t0:5.1f}s] {msg}", flush=True)

        try:
            server.start()
            await asyncio.get_running_loop().run_in_executor(None, server.wait_ready)
            progress(f"ready on port {server.port}")
            results[target.key] = await bench_s3_registry(server, backend, s, workdir, progress)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next registry
            results[target.key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"   failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            server.stop()
            results.setdefault(target.key, {})["log"] = scan_log(server)
            _keep_log(keep_logs, server, target.key)
            shutil.rmtree(workdir, ignore_errors=True)
            # Frees moto's memory for the next registry.
            await asyncio.get_running_loop().run_in_executor(None, backend.s3.remove_prefix, root.strip("/") + "/")
        progress("stopped")
    return results


def _keep_log(keep_logs: Path | None, server: bench.Server, name: str) -> None:
    if keep_logs is not None:
        keep_logs.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copy(server.log_path, keep_logs / f"s3-{name}.log")


# --------------------------------------------------------------------------------------------
# Part B: one node, one node behind HAProxy, three nodes behind HAProxy
# --------------------------------------------------------------------------------------------

# Where the nodes' logs (all steps together) go in the cluster results: for "Errors seen" only.
LOGS = Target("node-logs", "Wharf nodes (logs of all steps)", "wharf")
CLUSTER_STEPS = [
    ("direct-1", "1 node, direct"),
    ("haproxy-1", "1 node via HAProxy"),
    ("haproxy-3", "3 nodes via HAProxy"),
]


async def run_cluster(
    variant: Target,
    backend: Backend,
    s: Settings,
    base: Path,
    keep_logs: Path | None,
    servers: list[bench.Server],
    lbs: list[HAProxy],
    redirect: bool,
    lb_keepalive: bool,
) -> tuple[dict[str, dict[str, Any]], list[Target]]:
    results: dict[str, dict[str, Any]] = {}
    root = "/cluster"
    nodes: list[S3Registry] = []
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    print(f"\n== cluster: {variant.label} nodes on S3 + etcd", flush=True)

    def progress(msg: str) -> None:
        print(f"   [{time.monotonic() - started:5.1f}s] {msg}", flush=True)

    def add_node(i: int) -> S3Registry:
        target = Target(f"node{i}", f"node{i}", "wharf", variant.server, variant.workers)
        node = S3Registry(
            target, base / f"node{i}", s.accesslog, backend, root=root, prefix="/bench-cluster/", node=f"node{i}"
        )
        node.redirect = redirect
        servers.append(node)
        nodes.append(node)
        node.start()
        return node

    def start_lb() -> HAProxy:
        lb = HAProxy([("127.0.0.1", n.port) for n in nodes])
        if lb_keepalive:
            lb.config.write_text(lb.config.read_text().replace("option http-server-close", "option http-keep-alive"))
        lbs.append(lb)
        return lb.start()

    targets = [Target(key, label, "wharf") for key, label in CLUSTER_STEPS]
    try:
        first = add_node(0)
        await loop.run_in_executor(None, first.wait_ready)
        setup = Conn("127.0.0.1", first.port)
        try:
            await setup_manifest(setup, "bench/manifest")
        finally:
            setup.close()
        for key, label in CLUSTER_STEPS:
            lb: HAProxy | None = None
            try:
                if key == "haproxy-3":
                    for i in (1, 2):
                        add_node(i)
                    for node in nodes:
                        await loop.run_in_executor(None, node.wait_ready)
                if key.startswith("haproxy"):
                    lb = await loop.run_in_executor(None, start_lb)
                    await asyncio.sleep(1.5)  # two readiness checks: every backend is up
                    front = Front(lb.port, list(nodes))
                else:
                    front = Front(first.port, [first])
                extra = {"lb_cpu": _pid_cpu(lb.proc.pid)} if lb is not None and lb.proc is not None else {}
                progress(f"{label}: manifest GET wrk -c{s.connections} {s.duration:.0f}s")
                out: dict[str, Any] = {"nodes": len(front.nodes)}
                out["manifest_wrk"] = await manifest_load(front, backend, s, base, "bench/manifest", extra)
                progress(f"{label}: image pushes, {s.image_clients} clients, {s.duration:.0f}s")
                out["images"] = await measured(
                    backend,
                    run_load(front, s.image_clients, s.duration, image_op(s, f"bench/{key}"), max_ops=s.max_images),
                    extra=extra,
                )
                results[key] = out
            except Exception as exc:  # noqa: BLE001
                results[key] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"   failed: {type(exc).__name__}: {exc}", flush=True)
            finally:
                if lb is not None:
                    lb.close()
                    lbs.remove(lb)
    finally:
        for node in nodes:
            node.stop()
        merged: dict[str, Any] = {
            "groups": collections.Counter(),
            "statuses": collections.Counter(),
            "examples": {},
        }
        for node in nodes:
            scanned = scan_log(node)
            merged["groups"].update(scanned["groups"])
            merged["statuses"].update(scanned["statuses"])
            for k, v in scanned["examples"].items():
                merged["examples"].setdefault(k, v)
            _keep_log(keep_logs, node, f"cluster-{node.target.key}")
            shutil.rmtree(node.workdir, ignore_errors=True)
        results[LOGS.key] = {"log": merged}
        await loop.run_in_executor(None, backend.s3.remove_prefix, root.strip("/") + "/")
        progress("stopped")
    return results, targets


def _pid_cpu(pid: int) -> Callable[[], float]:
    return lambda: cpu_of(pids=[pid])


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _s3_per_op(r: Any, ops: int) -> str:
    counter = r.extra.get("s3") if isinstance(r, Result) else r.get("s3")
    if counter is None or not ops:
        return "-"
    return f"{_s3_total(counter) / ops:.1f}"


def s3_breakdown(results: dict[str, dict[str, Any]], targets: list[Target], load: str, what: str) -> None:
    """One line per registry: the S3 requests of one load per operation, by method and status class."""
    print(f"  S3 requests per {what}, by method:")
    for t in targets:
        r = results.get(t.key, {}).get(load)
        if r is None:
            continue
        counter = r.extra.get("s3") if isinstance(r, Result) else r.get("s3")
        ops = r.ops if isinstance(r, Result) else r.get("requests", 0)
        if counter is None or not ops:
            continue
        parts = [f"{k} {v / ops:.1f}" for k, v in sorted(counter.items()) if not k.endswith("xx")]
        statuses = [f"{k} {v / ops:.1f}" for k, v in sorted(counter.items()) if k.endswith("xx") and k != "2xx"]
        print(
            f"    {t.label}: "
            + (", ".join(parts) or "none")
            + (f" (answered {', '.join(statuses)})" if statuses else "")
        )


def report_side(results: dict[str, dict[str, Any]], targets: list[Target], s: Settings) -> None:
    def table(title: str, note: str, headers: list[str], row: bench.Row, ratio_headers: list[str]) -> None:
        comparison_table(title, note, headers, row, ratio_headers, results, targets, "distribution")

    def manifest_row(r: dict[str, Any]) -> tuple[list[str], list[float | None]]:
        w = r["manifest_wrk"]
        py: Result = r["manifest_py"]
        efficiency = _per_cpu(w.get("requests"), w["server_cpu"])
        cells = [
            _fmt_num(w.get("rps")),
            _fmt_ms(w.get("p50")),
            _fmt_ms(w.get("p99")),
            str(w.get("non2xx", 0) + w.get("socket_errors", 0)),
            _pct(w["server_cpu"], w["duration"]),
            _fmt_num(efficiency),
            _pct(w["backend_cpu"], w["duration"]),
            _s3_per_op(w, w.get("requests", 0)),
            _pct(w["client_cpu"], w["duration"]),
            _pct(w["other_cpu"], w["duration"]),
            _fmt_num(py.ops / py.elapsed if py.ops else 0.0),
        ]
        return cells, [w.get("rps"), w.get("p99"), efficiency]

    table(
        f"S3-1. Manifest GET by tag (wrk -t{s.wrk_threads} -c{s.connections} -d{s.duration:.0f}s --latency, Accept via Lua)",
        f"S3+etcd = CPU of moto_server and etcd; S3 req/op = requests moto served per GET. py = bench client, {s.sanity_duration:.0f}s.",
        [
            "registry",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "srv CPU",
            "req/CPU-s",
            "S3+etcd",
            "S3 req/op",
            "wrk CPU",
            "other",
            "py req/s",
        ],
        manifest_row,
        ["ratio req/s", "ratio p99", "ratio /CPU"],
    )
    s3_breakdown(results, targets, "manifest_wrk", "manifest GET")

    mib = s.blob_bytes // MIB

    def pull_row(r: dict[str, Any]) -> tuple[list[str], list[float | None]]:
        p: Result = r["pull"]
        w = r["pull_wrk"]
        rate = p.bytes / p.elapsed if p.ops else 0.0
        hops = sorted(p.extra.get("hops", []))
        hop50 = hops[len(hops) // 2] if hops else float("nan")
        cells = [
            _fmt_num(rate / MIB),
            str(p.ops),
            _fmt_ms(p.percentile(0.5)),
            _fmt_ms(hop50),
            str(p.error_count),
            _pct(p.server_cpu, p.elapsed),
            _pct(p.extra["backend_cpu"], p.elapsed),
            _pct(p.client_cpu, p.elapsed),
            _pct(p.other_cpu, p.elapsed),
            _fmt_num(w.get("rps")),
            _fmt_ms(w.get("p99")),
            _pct(w["server_cpu"], w["duration"]),
            str(w.get("non2xx", 0) + w.get("socket_errors", 0)),
        ]
        return cells, [rate, w.get("rps"), _per_cpu(w.get("requests"), w["server_cpu"])]

    table(
        f"S3-2. Blob pull: GET of one {mib} MiB blob -> 307 -> GET from S3, {s.pull_clients} concurrent clients, {s.duration:.0f}s",
        f"307 ms = the registry's part (p50). 307/s = wrk -c{s.connections} on the blob URL, redirect only, "
        f"{s.sanity_duration:.0f}s, with its p99 and the registry's CPU.",
        [
            "registry",
            "MiB/s",
            "GETs",
            "per GET ms",
            "307 ms",
            "errors",
            "srv CPU",
            "S3+etcd",
            "cli CPU",
            "other",
            "307/s",
            "307 p99",
            "307 srv",
            "wrk err",
        ],
        pull_row,
        ["ratio MiB/s", "ratio 307/s", "ratio 307/CPU"],
    )
    s3_breakdown(results, targets, "pull", "blob pull (the client's own GET from S3 included)")

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
            _pct(p.extra["backend_cpu"], p.elapsed),
            _s3_per_op(p, p.ops),
            _pct(p.client_cpu, p.elapsed),
            _pct(p.other_cpu, p.elapsed),
        ]
        return cells, [rate, efficiency]

    table(
        f"S3-3. Blob push: {mib} MiB monolithic uploads (POST, PUT ?digest= + body), {s.push_clients} concurrent, {s.duration:.0f}s",
        f"every upload a distinct blob; at most {s.max_push_blobs} per registry. S3 req/op = S3 requests per upload.",
        [
            "registry",
            "MiB/s",
            "blobs",
            "p50 ms",
            "p99 ms",
            "errors",
            "srv CPU",
            "MiB/CPU-s",
            "S3+etcd",
            "S3 req/op",
            "cli CPU",
            "other",
        ],
        push_row,
        ["ratio MiB/s", "ratio /CPU"],
    )
    s3_breakdown(results, targets, "push", "blob upload")

    def images_row(r: dict[str, Any]) -> tuple[list[str], list[float | None]]:
        p: Result = r["images"]
        rate = p.ops / p.elapsed if p.ops else 0.0
        efficiency = _per_cpu(float(p.ops), p.server_cpu)
        objects, _size = r.get("objects", (0, 0))
        cells = [
            _fmt_num(rate, 1),
            str(p.ops),
            _fmt_ms(p.percentile(0.5)),
            _fmt_ms(p.percentile(0.99)),
            str(p.error_count),
            _pct(p.server_cpu, p.elapsed),
            _fmt_num(efficiency, 1),
            _pct(p.extra["backend_cpu"], p.elapsed),
            _s3_per_op(p, p.ops),
            _pct(p.client_cpu, p.elapsed),
            _pct(p.other_cpu, p.elapsed),
            _fmt_num(objects),
        ]
        return cells, [rate, p.percentile(0.99), efficiency]

    table(
        f"S3-4. Small-image pushes: config + 2 x {s.layer_bytes // 1024} KiB layers + manifest, {s.image_clients} concurrent, {s.duration:.0f}s",
        "10 requests per image; S3 req/op = S3 requests per image; objects = S3 objects under the registry's root at the end.",
        [
            "registry",
            "images/s",
            "images",
            "p50 ms",
            "p99 ms",
            "errors",
            "srv CPU",
            "img/CPU-s",
            "S3+etcd",
            "S3 req/op",
            "cli CPU",
            "other",
            "objects",
        ],
        images_row,
        ["ratio img/s", "ratio p99", "ratio /CPU"],
    )
    s3_breakdown(results, targets, "images", "image")
    if not all(results.get(t.key, {}).get("redirected", True) for t in targets):
        print("\nnote: a registry answered blob GETs with 200 (no redirect); its pull figures stream through it.")


def report_cluster(results: dict[str, dict[str, Any]], targets: list[Target], s: Settings) -> None:
    def table(title: str, note: str, headers: list[str], row: bench.Row, ratio_headers: list[str]) -> None:
        comparison_table(title, note, headers, row, ratio_headers, results, targets, "direct-1")

    def manifest_row(r: dict[str, Any]) -> tuple[list[str], list[float | None]]:
        w = r["manifest_wrk"]
        cells = [
            _fmt_num(w.get("rps")),
            _fmt_ms(w.get("p50")),
            _fmt_ms(w.get("p99")),
            str(w.get("non2xx", 0) + w.get("socket_errors", 0)),
            _pct(w["server_cpu"], w["duration"]),
            _pct(w.get("lb_cpu", 0.0), w["duration"]),
            _pct(w["backend_cpu"], w["duration"]),
            _pct(w["client_cpu"], w["duration"]),
            _pct(w["other_cpu"], w["duration"]),
        ]
        return cells, [w.get("rps"), w.get("p99"), _per_cpu(w.get("requests"), w["server_cpu"])]

    headers = ["setup", "req/s", "p50 ms", "p99 ms", "errors", "nodes CPU", "LB CPU", "S3+etcd", "wrk CPU", "other"]
    table(
        f"C-1. Manifest GET by tag through the cluster (wrk -t{s.wrk_threads} -c{s.connections} -d{s.duration:.0f}s)",
        "nodes CPU = all Wharf nodes together; LB = HAProxy. ratio = this setup / 1 node direct.",
        headers,
        manifest_row,
        ["ratio req/s", "ratio p99", "ratio /CPU"],
    )

    def images_row(r: dict[str, Any]) -> tuple[list[str], list[float | None]]:
        p: Result = r["images"]
        rate = p.ops / p.elapsed if p.ops else 0.0
        cells = [
            _fmt_num(rate, 1),
            _fmt_ms(p.percentile(0.5)),
            _fmt_ms(p.percentile(0.99)),
            str(p.error_count),
            _pct(p.server_cpu, p.elapsed),
            _pct(p.extra.get("lb_cpu", 0.0), p.elapsed),
            _pct(p.extra["backend_cpu"], p.elapsed),
            _pct(p.client_cpu, p.elapsed),
            _pct(p.other_cpu, p.elapsed),
        ]
        return cells, [rate, p.percentile(0.99), _per_cpu(float(p.ops), p.server_cpu)]

    table(
        f"C-2. Small-image pushes through the cluster, {s.image_clients} concurrent, {s.duration:.0f}s",
        "10 requests per image, round robin: consecutive requests of one push land on different nodes.",
        ["setup", "images/s", "p50 ms", "p99 ms", "errors", "nodes CPU", "LB CPU", "S3+etcd", "cli CPU", "other"],
        images_row,
        ["ratio img/s", "ratio p99", "ratio /CPU"],
    )
    cores = len(os.sched_getaffinity(0))
    print(
        f"\nThis machine has {cores} cores for everything: the nodes, HAProxy, etcd, moto_server, wrk and the client.\n"
        "Three nodes cannot add CPU here; the 3-node ratio shows the cost of spreading the same cores over more\n"
        "processes plus HAProxy (and that cross-node uploads work under load), not how a cluster of three machines\n"
        "scales. 'other' counts what else ran on the machine meanwhile."
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


async def run_all(
    args: argparse.Namespace,
    side_targets: list[Target],
    variant: Target,
    s: Settings,
    base: Path,
    backend: Backend,
    servers: list[bench.Server],
    lbs: list[HAProxy],
    parts: set[str],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    redirect = not args.redirect_disable
    if "side" in parts:
        out["side"] = await run_side_by_side(side_targets, backend, s, base, args.keep_logs, servers, redirect)
    if "cluster" in parts:
        out["cluster"] = await run_cluster(
            variant, backend, s, base, args.keep_logs, servers, lbs, redirect, args.haproxy_keepalive
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s loads and small caps: a smoke test of the bench")
    parser.add_argument("--duration", type=float, help="seconds per load (default 10, quick 3)")
    parser.add_argument(
        "--blob-mib", type=int, default=16, help="blob size for pull and push (16; moto keeps it in RAM)"
    )
    parser.add_argument("--connections", type=int, default=50, help="wrk connections for manifest GET (50)")
    parser.add_argument("--pull-clients", type=int, default=4)
    parser.add_argument("--push-clients", type=int, default=4)
    parser.add_argument("--image-clients", type=int, default=8)
    parser.add_argument("--layer-kib", type=int, default=4, help="size of each small-image layer (4 KiB)")
    parser.add_argument("--max-push-gib", type=float, help="cap on bytes pushed per registry in load 3 (1, quick 0.5)")
    parser.add_argument("--no-accesslog", action="store_true", help="disable access logs in every registry")
    parser.add_argument("--only", default="side,cluster", help="parts to run: side, cluster (default both)")
    parser.add_argument(
        "--wharf",
        default="granian-1",
        help="Wharf variants for part A, comma-separated (the first also runs the cluster): "
        + ", ".join(WHARF_VARIANTS),
    )
    parser.add_argument("--no-distribution", action="store_true", help="part A without Distribution")
    parser.add_argument("--redirect-disable", action="store_true", help="stream blob GETs through the registries")
    parser.add_argument(
        "--haproxy-keepalive",
        action="store_true",
        help="HAProxy keeps server connections open (the tests' and deploy/ config close them per request)",
    )
    parser.add_argument("--tmpdir", help="parent directory for the registries' files (default: system temp)")
    parser.add_argument("--keep-logs", type=Path, help="copy each server's log here")
    args = parser.parse_args(argv)

    duration = args.duration or (3.0 if args.quick else 10.0)
    blob_bytes = args.blob_mib * MIB
    max_push_gib = args.max_push_gib or (0.5 if args.quick else 1.0)
    s = Settings(
        duration=duration,
        sanity_duration=max(2.0, duration / 2),
        warmup=0.0 if args.quick else 1.0,
        connections=args.connections,
        wrk_threads=min(2, max(1, len(os.sched_getaffinity(0)))),
        blob_bytes=blob_bytes,
        pull_clients=args.pull_clients,
        push_clients=args.push_clients,
        max_push_blobs=max(args.push_clients, int(max_push_gib * (1 << 30) // blob_bytes)),
        image_clients=args.image_clients,
        layer_bytes=args.layer_kib * 1024,
        max_images=100_000,
        accesslog=not args.no_accesslog,
    )
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if parts - {"side", "cluster"}:
        parser.error(f"--only: unknown parts {', '.join(sorted(parts - {'side', 'cluster'}))}")
    keys = [k.strip() for k in args.wharf.split(",") if k.strip()]
    unknown = [k for k in keys if k not in WHARF_VARIANTS]
    if unknown or not keys:
        parser.error(f"--wharf: unknown variants {unknown}; choose from {', '.join(WHARF_VARIANTS)}")
    side_targets = [] if args.no_distribution else [t for t in bench.TARGETS if t.kind == "distribution"]
    side_targets += [WHARF_VARIANTS[k] for k in keys]
    variant = WHARF_VARIANTS[keys[0]]
    tools = ["wrk", "moto_server", "etcd"]
    if "side" in parts and not args.no_distribution:
        tools.append("docker-registry")
    if "cluster" in parts:
        tools.append("haproxy")
    found = {"etcd": os.access(ETCD_BINARY, os.X_OK), "haproxy": os.access(HAPROXY, os.X_OK)}
    for tool in tools:
        if not found.get(tool, shutil.which(tool) is not None):
            print(f"bench_s3: {tool} is not installed", file=sys.stderr)
            return 2

    base = Path(tempfile.mkdtemp(prefix="wharf-bench-s3-", dir=args.tmpdir))
    servers: list[bench.Server] = []
    lbs: list[HAProxy] = []
    backend = Backend()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.monotonic()
    context: list[str] = []
    results: dict[str, Any] = {}
    try:
        context = bench.machine_context(s, base)
        context[-1] = (
            f"  storage: S3 (moto_server, bucket {BUCKET}, one root directory per registry); Wharf's coordinator: "
            f"etcd (1 member); loopback; blob GETs {'streamed' if args.redirect_disable else 'redirected (307)'}; "
            f"access logs {'on' if s.accesslog else 'off'}"
        )
        print("\n".join(context), flush=True)
        print("starting moto_server and etcd ...", flush=True)
        backend.start()
        runner = run_all(args, side_targets, variant, s, base, backend, servers, lbs, parts)
        if bench._have_uvloop():
            import uvloop

            results = uvloop.run(runner)
        else:
            results = asyncio.run(runner)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything and removing temporary data", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()
        for lb in lbs:
            with contextlib.suppress(Exception):
                lb.close()
        backend.close()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nResults ({time.monotonic() - t0:.0f}s in all)")
    print("=======")
    print("\n".join(context))
    if "side" in results:
        report_side(results["side"], side_targets, s)
        print(
            "\nratio = Wharf / Distribution, both on the same S3 server. 'S3+etcd' is the CPU of moto_server and etcd"
            "\n(of one core); moto is a Python server that keeps objects in memory, far slower than real S3, so loads"
            "\nthat need many S3 requests per operation are bound by it."
        )
        bench.report_errors(results["side"], side_targets)
    if "cluster" in results:
        cluster_results, cluster_targets = results["cluster"]
        report_cluster(cluster_results, cluster_targets, s)
        bench.report_errors(cluster_results, [*cluster_targets, LOGS])
    return 0


if __name__ == "__main__":
    sys.exit(main())
