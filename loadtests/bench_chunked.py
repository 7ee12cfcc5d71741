#!/usr/bin/env python3
"""Chunked blob uploads on S3: PATCHes of 1 MiB and 5 MiB against one monolithic PUT, Wharf beside Distribution.

On each S3 server (moto_server, the tests' S3; and Ceph RGW, a real one) both registries take the
same uploads of one fresh random blob, one registry after the other within a round, in turn first:

  monolithic     POST, then PUT ?digest= with the whole blob as the body
  chunked 1 MiB  POST, PATCH after PATCH of 1 MiB (Content-Range), then PUT ?digest= without a body
  chunked 5 MiB  the same with 5 MiB chunks (S3's smallest multipart part)
  chunked odd    the same with chunks of 1,000,003 bytes (no chunk ends on a part boundary)
  1 MiB, 2 nodes 1 MiB chunks, each PATCH on the other of two nodes of the registry (same storage;
                 Wharf's on the same etcd, Distribution's with the same http.secret), as a round-robin
                 load balancer without affinity sends them; the PUT lands on the first

A figure is the median of the rounds (MB/s = 10^6 bytes per second, from the POST to the 201), with
the registry's CPU-seconds per GiB beside it (the busy machine moves rates far more than CPU).
Each registry has a root directory of its own in one bucket, emptied after every upload (moto keeps
objects in memory). Wharf runs on etcd (one member) with the default 10 MiB part size.

The goal (issue 13): Wharf's 1 MiB chunked rate at least half its own monolithic rate, on each S3
server; PASS or MISS per server. Nothing is asserted: a busy machine varies.

    python loadtests/bench_chunked.py [--s3 moto,rgw] [--rounds 3] [--blob-mib 64] [--wharf granian-1] [--code DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchlib.client import Conn
from benchlib.images import upload_blob, upload_blob_chunked
from benchlib.report import machine_context
from benchlib.s3 import RGWBackend, S3Backend, S3Registry
from benchlib.servers import DISTRIBUTION, WHARF_VARIANTS, Server, Target
from rgw_server import missing_binaries

MiB = 1024 * 1024
# Mode: (chunk size, 0 for one PUT; nodes the PATCHes alternate between).
MODES = {
    "monolithic": (0, 1),
    "chunked 1 MiB": (MiB, 1),
    "chunked 5 MiB": (5 * MiB, 1),
    "chunked odd": (1_000_003, 1),
    "1 MiB, 2 nodes": (MiB, 2),
}


@dataclass
class Run:
    seconds: float
    cpu: float  # the registry's CPU-seconds for the upload


async def upload(ports: list[int], repository: str, data: bytes, chunk: int) -> None:
    """One blob upload, the way clients do it: monolithic when `chunk` is 0, else PATCH by PATCH.

    Each PATCH goes to the next of `ports` in turn; the POST and the PUT to the first.
    """
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conns = [Conn("127.0.0.1", port) for port in ports]
    try:
        if chunk:
            await upload_blob_chunked(conns, repository, digest, data, chunk)
        else:
            await upload_blob(conns[0], repository, digest, data)
    finally:
        for c in conns:
            c.close()


def measure(nodes: Sequence[Server], data: bytes, chunk: int, remove: Callable[[], None]) -> Run:
    cpu = sum(node.cpu_seconds() for node in nodes)
    t0 = time.perf_counter()
    asyncio.run(upload([node.port for node in nodes], "bench/chunked", data, chunk))
    seconds = time.perf_counter() - t0
    used = sum(node.cpu_seconds() for node in nodes) - cpu
    remove()
    return Run(seconds, used)


def bench_backend(
    name: str, backend: S3Backend, targets: list[Target], args: argparse.Namespace, base: Path
) -> dict[str, dict[str, list[Run]]]:
    size = blob_mib(name, args) * MiB
    nodes: dict[str, list[S3Registry]] = {}  # two per registry, on the same root (and etcd prefix)
    results: dict[str, dict[str, list[Run]]] = {t.key: {m: [] for m in MODES} for t in targets}
    try:
        for target in targets:
            for i in range(2):
                server = S3Registry(
                    target,
                    base / f"{name}-{target.key}-{i}",
                    False,
                    backend,
                    root=f"/chunked-{target.key}",
                    prefix=f"/{target.key}/",
                    node=f"node{i}" if target.kind == "wharf" else "",
                )
                if args.code and target.kind == "wharf":
                    server.code = Path(args.code)  # another checkout, to compare before and after a change
                server.start()
                nodes.setdefault(target.key, []).append(server)
        servers = [pair[0] for pair in nodes.values()]
        for pair in nodes.values():
            for server in pair:
                server.wait_ready()
        for round_ in range(args.rounds):
            order = servers if round_ % 2 == 0 else list(reversed(servers))
            for mode, (chunk, count) in MODES.items():
                for server in order:
                    data = os.urandom(size)
                    run = measure(nodes[server.target.key][:count], data, chunk, server.remove_data)
                    results[server.target.key][mode].append(run)
                    rate = size / run.seconds / 1e6
                    print(
                        f"  {name} round {round_ + 1} {server.target.label:<22} {mode:<14} {rate:7.1f} MB/s", flush=True
                    )
    finally:
        for pair in nodes.values():
            for server in pair:
                server.stop()
            pair[0].remove_data()
    return results


def blob_mib(name: str, args: argparse.Namespace) -> int:
    return int(args.moto_blob_mib if name == "moto" else args.blob_mib)


def report(name: str, results: dict[str, dict[str, list[Run]]], targets: list[Target], size: int) -> list[str]:
    """Print one server's table; return its goal lines."""

    def rate(runs: list[Run]) -> float:
        return statistics.median(size / r.seconds / 1e6 for r in runs)

    def cpu_per_gib(runs: list[Run]) -> float:
        return statistics.median(r.cpu for r in runs) * (1 << 30) / size

    print(
        f"\n{name}: MB/s (median), registry CPU-s per GiB in brackets; ratio = this mode / the same registry's monolithic"
    )
    header = f"  {'mode':<14}" + "".join(f"{t.label:>36}" for t in targets)
    print(header)
    for mode in MODES:
        cells = []
        for t in targets:
            runs = results[t.key][mode]
            mono = rate(results[t.key]["monolithic"])
            cells.append(f"{rate(runs):8.1f} ({cpu_per_gib(runs):5.1f} s/GiB) x{rate(runs) / mono:4.2f}")
        print(f"  {mode:<14}" + "".join(f"{c:>36}" for c in cells))
    goals = []
    for t in targets:
        if t.kind != "wharf":
            continue
        for mode in ("chunked 1 MiB", "1 MiB, 2 nodes"):
            ratio = rate(results[t.key][mode]) / rate(results[t.key]["monolithic"])
            verdict = "PASS" if ratio >= 0.5 else "MISS"
            goals.append(f"  {verdict}  {name}: {t.label}, {mode}: {ratio:.2f}x its monolithic rate (goal >= 0.5)")
    return goals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--s3", default="moto,rgw", help="S3 servers: moto, rgw (default both)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blob-mib", type=int, default=64, help="blob size on RGW (default 64)")
    parser.add_argument(
        "--moto-blob-mib", type=int, default=32, help="blob size on moto (default 32: Distribution's odd chunks crawl)"
    )
    parser.add_argument("--wharf", default="granian-1", help="Wharf variant: " + ", ".join(WHARF_VARIANTS))
    parser.add_argument("--no-distribution", action="store_true")
    parser.add_argument("--code", default="", help="run Wharf from this checkout instead (e.g. main, for a before)")
    parser.add_argument("--tmpdir", default=None)
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.s3.split(",") if k.strip()]
    if set(kinds) - {"moto", "rgw"} or args.wharf not in WHARF_VARIANTS:
        parser.error("--s3 takes moto and/or rgw; --wharf one of " + ", ".join(WHARF_VARIANTS))
    if "rgw" in kinds and missing_binaries():
        print(f"bench_chunked: Ceph programs missing: {' '.join(missing_binaries())}", file=sys.stderr)
        return 2
    if not args.no_distribution and shutil.which("docker-registry") is None:
        print("bench_chunked: docker-registry is not installed", file=sys.stderr)
        return 2
    targets = ([] if args.no_distribution else [DISTRIBUTION]) + [WHARF_VARIANTS[args.wharf]]
    print(
        "\n".join(
            machine_context(
                f"S3: {', '.join(kinds)}; Wharf on etcd (1 member); blobs of {args.moto_blob_mib} MiB (moto), {args.blob_mib} MiB (RGW)"
            )
        )
    )
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    base = Path(tempfile.mkdtemp(prefix="wharf-bench-chunked-", dir=args.tmpdir))
    goals: list[str] = []
    try:
        for kind in kinds:
            backend = RGWBackend() if kind == "rgw" else S3Backend()
            print(f"\n== {kind}: starting the S3 server and etcd ...", flush=True)
            backend.start()
            try:
                results = bench_backend(kind, backend, targets, args, base)
            finally:
                backend.close()
            goals += report(kind, results, targets, blob_mib(kind, args) * MiB)
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("Goals:")
    print("\n".join(goals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
