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

Figures only: nothing here passes or fails. The client, the loads, wrk and the tables are benchlib's,
as bench.py's are. Usage:

    python loadtests/bench_s3.py [--quick] [--duration S] [--blob-mib M] [--only side,cluster]
                                 [--wharf granian-1] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchlib import loads, session
from benchlib.client import Redirects
from benchlib.cpu import cores, pid_meter
from benchlib.loads import Settings, Table
from benchlib.report import (
    Column,
    cpu,
    errors,
    fmt_ms,
    latency,
    machine_context,
    per_cpu,
    rate,
    report_errors,
    results_heading,
)
from benchlib.runner import Meter, run_load
from benchlib.s3 import BUCKET, S3Backend, S3Registry, measured, s3_total
from benchlib.servers import DISTRIBUTION, WHARF_VARIANTS, Server, Target, merge_scans, scan_log
from benchlib.wrk import accept_script
from haproxy import HAPROXY, HAProxy
from services import ETCD_BINARY

# --------------------------------------------------------------------------------------------
# Part A: the four loads on S3, one registry after the other
# --------------------------------------------------------------------------------------------


async def bench_s3_registry(
    server: S3Registry, backend: S3Backend, s: Settings, workdir: Path, progress: session.Progress
) -> dict[str, Any]:
    redirects = Redirects()  # blob GETs follow the registry's 307 to the S3 server
    try:
        out = await loads.standard_loads(
            server,
            s,
            workdir,
            progress,
            measure=lambda load: measured(backend, load),
            get=redirects.get,
            pull_wrk={"connections": s.connections},  # the registry's redirect alone (wrk does not follow it)
        )
    finally:
        redirects.close()
    out["redirected"] = bool(redirects.hops)
    out["pull"].extra["hops"] = redirects.hops
    loop = asyncio.get_running_loop()
    out["objects"] = await loop.run_in_executor(None, backend.object_count, server.root.strip("/") + "/")
    return out


async def run_side_by_side(
    targets: list[Target], backend: S3Backend, s: Settings, base: Path, args: argparse.Namespace, servers: list[Server]
) -> dict[str, dict[str, Any]]:
    def make(target: Target, workdir: Path) -> Server:
        prefix = f"/bench-{target.key}/"
        redirect = not args.redirect_disable
        return S3Registry(
            target, workdir, s.accesslog, backend, root=f"/{target.key}", prefix=prefix, redirect=redirect
        )

    async def bench(server: Server, workdir: Path, progress: session.Progress) -> dict[str, Any]:
        assert isinstance(server, S3Registry)
        return await bench_s3_registry(server, backend, s, workdir, progress)

    async def remove_data(target: Target) -> None:  # frees moto's memory for the next registry
        await asyncio.get_running_loop().run_in_executor(None, backend.s3.remove_prefix, f"{target.key}/")

    return await session.one_at_a_time(
        targets,
        make,
        bench,
        base=base,
        servers=servers,
        keep_logs=args.keep_logs,
        heading=" on S3",
        log_prefix="s3-",
        after=remove_data,
    )


# --------------------------------------------------------------------------------------------
# Part B: one node, one node behind HAProxy, three nodes behind HAProxy
# --------------------------------------------------------------------------------------------

# Where the nodes' logs (all steps together) go in the cluster results: for "Errors seen" only.
LOGS = Target("node-logs", "Wharf nodes (logs of all steps)", "wharf")
CLUSTER_STEPS = [
    Target("direct-1", "1 node, direct", "wharf"),
    Target("haproxy-1", "1 node via HAProxy", "wharf"),
    Target("haproxy-3", "3 nodes via HAProxy", "wharf"),
]


class Front:
    """What a load talks to: a port, and the CPU of the registry processes behind it."""

    def __init__(self, port: int, nodes: list[Server]) -> None:
        self.port = port
        self.nodes = nodes

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        return sum(node.cpu_seconds() for node in self.nodes)


async def run_cluster(
    variant: Target,
    backend: S3Backend,
    s: Settings,
    base: Path,
    args: argparse.Namespace,
    servers: list[Server],
    lbs: list[HAProxy],
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    nodes: list[S3Registry] = []
    loop = asyncio.get_running_loop()
    progress = session.progress_since(time.monotonic())
    print(f"\n== cluster: {variant.label} nodes on S3 + etcd", flush=True)

    def add_node(i: int) -> S3Registry:
        target = Target(f"node{i}", f"node{i}", "wharf", variant.server, variant.workers)
        node = S3Registry(
            target,
            base / f"node{i}",
            s.accesslog,
            backend,
            root="/cluster",
            prefix="/bench-cluster/",
            redirect=not args.redirect_disable,
            node=f"node{i}",
        )
        servers.append(node)
        nodes.append(node)
        node.start()
        return node

    def start_lb() -> HAProxy:
        lb = HAProxy([("127.0.0.1", n.port) for n in nodes])
        if args.haproxy_keepalive:
            lb.config.write_text(lb.config.read_text().replace("option http-server-close", "option http-keep-alive"))
        lbs.append(lb)
        return lb.start()

    async def step(front: Front, key: str, label: str, extra: dict[str, Meter]) -> dict[str, Any]:
        out: dict[str, Any] = {"nodes": len(front.nodes)}
        progress(f"{label}: manifest GET wrk -c{s.connections} {s.duration:.0f}s")
        url, script = front.base + "/v2/bench/manifest/manifests/latest", accept_script(base)
        await loads.warm_up(front, url, s, script)
        out["manifest_wrk"] = await measured(backend, partial(loads.wrk_load, front, url, s, script=script), extra)
        progress(f"{label}: image pushes, {s.image_clients} clients, {s.duration:.0f}s")
        op = loads.image_pushes(f"bench/{key}", s.layer_bytes)
        push = partial(run_load, front, s.image_clients, s.duration, op, max_ops=s.max_images)
        out["images"] = await measured(backend, push, extra)
        return out

    try:
        first = add_node(0)
        await loop.run_in_executor(None, first.wait_ready)
        await loads.setup_manifest_at(first.port, "bench/manifest")
        for target in CLUSTER_STEPS:
            lb: HAProxy | None = None
            try:
                if target.key == "haproxy-3":
                    for i in (1, 2):
                        add_node(i)
                    for node in nodes:
                        await loop.run_in_executor(None, node.wait_ready)
                front = Front(first.port, [first])
                extra: dict[str, Meter] = {}
                if target.key.startswith("haproxy"):
                    lb = await loop.run_in_executor(None, start_lb)
                    await asyncio.sleep(1.5)  # two readiness checks: every backend is up
                    front = Front(lb.port, list(nodes))
                    if lb.proc is not None:
                        extra["lb_cpu"] = pid_meter(lb.proc.pid)
                results[target.key] = await step(front, target.key, target.label, extra)
            except Exception as exc:  # noqa: BLE001
                results[target.key] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"   failed: {type(exc).__name__}: {exc}", flush=True)
            finally:
                if lb is not None:
                    lb.close()
                    lbs.remove(lb)
    finally:
        session.stop_all(list(nodes))
        results[LOGS.key] = {"log": merge_scans([scan_log(node) for node in nodes])}
        for node in nodes:
            node.keep_log(args.keep_logs, f"s3-cluster-{node.target.key}")
            shutil.rmtree(node.workdir, ignore_errors=True)
        await loop.run_in_executor(None, backend.s3.remove_prefix, "cluster/")
        progress("stopped")
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def s3_per_op(load: str) -> Column:
    """S3 requests moto served per operation of the load."""

    def value(r: dict[str, Any]) -> float | None:
        figures = r[load]
        return s3_total(figures.extra["s3"]) / figures.ops if figures.ops else None

    return Column("S3 req/op", value, lambda v: "-" if v is None else f"{v:.1f}")


def s3_meters(load: str) -> tuple[Column, ...]:
    return cpu(load, "S3+etcd", "backend_cpu"), s3_per_op(load)


S3_BREAKDOWN = {
    "manifest_wrk": "manifest GET",
    "pull": "blob pull (the client's own GET from S3 included)",
    "push": "blob upload",
    "images": "image",
}


def s3_breakdown(results: dict[str, dict[str, Any]], targets: list[Target], load: str) -> None:
    """One line per registry: the S3 requests of one load per operation, by method and status class."""
    print(f"  S3 requests per {S3_BREAKDOWN[load]}, by method:")
    for t in targets:
        figures = results.get(t.key, {}).get(load)
        if figures is None or not figures.ops:
            continue
        counter, ops = figures.extra["s3"], figures.ops
        parts = [f"{k} {v / ops:.1f}" for k, v in sorted(counter.items()) if not k.endswith("xx")]
        statuses = [f"{k} {v / ops:.1f}" for k, v in sorted(counter.items()) if k.endswith("xx") and k != "2xx"]
        answered = f" (answered {', '.join(statuses)})" if statuses else ""
        print(f"    {t.label}: {', '.join(parts) or 'none'}{answered}")


def report_side(results: dict[str, dict[str, Any]], targets: list[Target], s: Settings) -> None:
    def hop(r: dict[str, Any]) -> float:
        hops = sorted(r["pull"].extra.get("hops", []))
        return hops[len(hops) // 2] if hops else float("nan")

    seconds = f"{s.sanity_duration:.0f}s"
    tables = {
        "manifest_wrk": Table(
            "S3+etcd = CPU of moto_server and etcd; S3 req/op = requests moto served per GET. "
            f"py = bench client, {seconds}.",
            [rate("manifest_py", "py req/s")],
        ),
        "pull": Table(
            f"307 ms = the registry's part (p50). 307/s = wrk -c{s.connections} on the blob URL, redirect only, "
            f"{seconds}, with its p99 and requests per CPU-second of the registry.",
            [
                Column("307 ms", hop, fmt_ms),
                rate("pull_wrk", "307/s"),
                latency("pull_wrk", 0.99, "307 p99"),
                per_cpu("pull_wrk", "307/CPU-s"),
                errors("pull_wrk", "wrk err"),
            ],
            {"ratio 307/s": "307/s", "ratio 307/CPU": "307/CPU-s"},
        ),
        "push": Table(
            f"every upload a distinct blob; at most {s.max_push_blobs} per registry. S3 req/op = S3 requests per upload."
        ),
        "images": Table(
            "10 requests per image; S3 req/op = S3 requests per image; objects = S3 objects under the registry's "
            "root at the end.",
            [Column("objects", lambda r: r.get("objects", (0, 0))[0], lambda v: f"{v:,}")],
        ),
    }
    loads.load_tables(
        results,
        targets,
        s,
        tables,
        number="S3-",
        via=" -> 307 -> GET from S3",
        meters=s3_meters,
        after=lambda load: s3_breakdown(results, targets, load),
    )
    if not all(results.get(t.key, {}).get("redirected", True) for t in targets):
        print("\nnote: a registry answered blob GETs with 200 (no redirect); its pull figures stream through it.")
    print(
        "\nratio = Wharf / Distribution, both on the same S3 server. 'S3+etcd' is the CPU of moto_server and etcd"
        "\n(of one core); moto is a Python server that keeps objects in memory, far slower than real S3, so loads"
        "\nthat need many S3 requests per operation are bound by it."
    )


def report_cluster(results: dict[str, dict[str, Any]], s: Settings) -> None:
    tables = {
        "manifest_wrk": Table(
            "through the cluster. srv CPU = all Wharf nodes together; LB = HAProxy. ratio = this setup / 1 node direct."
        ),
        "images": Table(
            "10 requests per image, round robin: consecutive requests of one push land on different nodes.", number=2
        ),
    }
    loads.load_tables(
        results,
        CLUSTER_STEPS,
        s,
        tables,
        ref="direct-1",
        number="C-",
        meters=lambda load: (cpu(load, "LB CPU", "lb_cpu"), cpu(load, "S3+etcd", "backend_cpu")),
        first="setup",
    )
    print(
        f"\nThis machine has {cores()} cores for everything: the nodes, HAProxy, etcd, moto_server, wrk and the client.\n"
        "Three nodes cannot add CPU here; the 3-node ratio shows the cost of spreading the same cores over more\n"
        "processes plus HAProxy (and that cross-node uploads work under load), not how a cluster of three machines\n"
        "scales. 'other' counts what else ran on the machine meanwhile."
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    loads.add_arguments(parser, blob_mib="16; moto keeps it in RAM", max_push_gib="1, quick 0.5")
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
    args = parser.parse_args(argv)
    s = loads.settings(args, blob_mib=16, max_push_gib=0.5 if args.quick else 1.0)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if parts - {"side", "cluster"}:
        parser.error(f"--only: unknown parts {', '.join(sorted(parts - {'side', 'cluster'}))}")
    keys = [k.strip() for k in args.wharf.split(",") if k.strip()]
    unknown = [k for k in keys if k not in WHARF_VARIANTS]
    if unknown or not keys:
        parser.error(f"--wharf: unknown variants {unknown}; choose from {', '.join(WHARF_VARIANTS)}")
    side_targets = ([] if args.no_distribution else [DISTRIBUTION]) + [WHARF_VARIANTS[k] for k in keys]
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
    servers: list[Server] = []
    lbs: list[HAProxy] = []
    backend = S3Backend()
    t0 = time.monotonic()
    blobs = "streamed" if args.redirect_disable else "redirected (307)"
    log = "on" if s.accesslog else "off"
    context = machine_context(
        f"S3 (moto_server, bucket {BUCKET}, one root directory per registry); Wharf's coordinator: etcd "
        f"(1 member); loopback; blob GETs {blobs}; access logs {log}"
    )
    results: dict[str, Any] = {}
    try:
        with session.cleanup() as stack:
            stack.callback(shutil.rmtree, base, ignore_errors=True)
            stack.callback(backend.close)
            stack.callback(lambda: [lb.close() for lb in lbs])
            stack.callback(session.stop_all, servers)
            print("\n".join(context), flush=True)
            print("starting moto_server and etcd ...", flush=True)
            backend.start()

            async def run_all() -> None:
                if "side" in parts:
                    results["side"] = await run_side_by_side(side_targets, backend, s, base, args, servers)
                if "cluster" in parts:
                    variant = WHARF_VARIANTS[keys[0]]
                    results["cluster"] = await run_cluster(variant, backend, s, base, args, servers, lbs)

            session.run_async(run_all())
    except KeyboardInterrupt:
        return session.interrupted()
    results_heading(t0, context)
    if "side" in results:
        report_side(results["side"], side_targets, s)
        report_errors(results["side"], side_targets)
    if "cluster" in results:
        report_cluster(results["cluster"], s)
        report_errors(results["cluster"], [*CLUSTER_STEPS, LOGS])
    return 0


if __name__ == "__main__":
    sys.exit(main())
