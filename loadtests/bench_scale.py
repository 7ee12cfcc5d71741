"""Cost against size: server CPU per push, per tag list and per delete as a repository grows.

A repository is filled to 0, 5,000 and 20,000 tags (each tag its own image: a config blob and a
manifest, so tags, manifests, links and blob records all grow), and at each size three loads run:

- pushes: 16 concurrent clients push small images (HEAD, upload, manifest PUT) into it;
- a page of the tag list (`?n=100` from the middle), and the whole tag list;
- deletes: manifests deleted by digest, one at a time.

The figure is the server's CPU per operation (all its processes, and etcd's where it is the
coordinator), which a busy machine disturbs less than wall-clock time. It runs for Wharf on the
embedded coordinator and on etcd, with and without a namespace quota over the repository, and for
Distribution 2.8.2 (Debian's docker-registry) where it has the operation. Every 5xx is counted.
Nothing is asserted: the tables print the figures and the ratio of the largest size to the smallest.

    python loadtests/bench_scale.py                    # about 10 minutes
    python loadtests/bench_scale.py --sizes 0,2000 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchlib import loads
from benchlib.client import Conn, Unexpected
from benchlib.cpu import cpu_of
from benchlib.images import image_config, image_manifest, put_manifest, sha256_digest, upload_blob
from benchlib.runner import Result, run_load
from benchlib.servers import Server, Target
from services import EtcdCluster

REPO = "scale/app"
PUSHERS = 16


class ScaleServer(Server):
    """A registry process with Wharf's coordinator and quota choices in its file; etcd's CPU counts as its own."""

    def __init__(self, target: Target, workdir: Path, *, etcd: EtcdCluster | None, quota: bool) -> None:
        wharf: dict[str, Any] = {"gc": {"enabled": False}}
        if etcd is not None:
            wharf["coordinator"] = {"etcd": {"endpoints": etcd.endpoints, "prefix": f"/scale-{uuid.uuid4().hex[:8]}/"}}
        if quota:
            wharf["quotas"] = [{"namespace": "scale/", "limit": "1TiB"}]
        super().__init__(target, workdir, accesslog=False, wharf=wharf)
        self.etcd = etcd

    def cpu_seconds(self) -> float:
        own = super().cpu_seconds()
        if self.etcd is None:
            return own
        return own + cpu_of(pids=[m.process.pid for m in self.etcd.members if m.process is not None])


async def push_config_image(conn: Conn, tag: str, nonce: str, layer: bytes) -> bytes:
    """An image of a config of its own and the shared `layer` (already in REPO) under `tag`; its manifest."""
    config = image_config(nonce, [layer] if layer else [])
    await upload_blob(conn, REPO, sha256_digest(config), config, single_post=True)
    layers = [(sha256_digest(layer), len(layer))] if layer else []
    manifest = image_manifest((sha256_digest(config), len(config)), layers)
    await put_manifest(conn, REPO, tag, manifest)
    return manifest


async def grow(server: ScaleServer, tags: int, have: int) -> int:
    """Add tags (each its own small image) until the repository holds `tags`; returns the count."""
    layer = b"scale layer"

    async def add(worker: int) -> None:
        conn = Conn("127.0.0.1", server.port)
        try:
            for n in range(have + worker, tags, 8):
                await push_config_image(conn, f"f{n:06d}", f"fill-{n}", layer)
        finally:
            conn.close()

    setup = Conn("127.0.0.1", server.port)
    await upload_blob(setup, REPO, sha256_digest(layer), layer, single_post=True)
    setup.close()
    await asyncio.gather(*(add(w) for w in range(8)))
    return max(tags, have)


def server_errors(result: Result) -> int:
    """Operations that got a 5xx answer."""
    return sum(n for key, n in result.errors.items() if re.search(r"HTTP 5\d\d", key))


async def measure(server: ScaleServer, duration: float, deletes: int = 200) -> dict[str, Any]:
    """Server CPU per push, per tag-list page, per whole tag list and per delete; 5xx counted."""
    out: dict[str, Any] = {}
    fives = 0
    push = loads.image_pushes(REPO, 1024, per_client=False, tag_prefix="p")
    result = await run_load(server, PUSHERS, duration, push)
    out["push"] = (result.server_cpu / max(result.ops, 1), result.ops, result.error_count)
    fives += server_errors(result)

    middle = "f" + "5" * 6
    for label, query in (("tags page", f"?n=100&last={middle}"), ("tags full", "")):

        async def listing(conn: Conn, worker: int, seq: int, query: str = query) -> tuple[int, int]:
            reply = await conn.request("GET", f"/v2/{REPO}/tags/list{query}")
            if reply.status != 200:
                raise Unexpected("GET tags/list", reply)
            return 1, reply.size

        result = await run_load(server, 4, duration, listing)
        out[label] = (result.server_cpu / max(result.ops, 1), result.ops, result.error_count)
        fives += server_errors(result)

    # Deletes: images pushed for the purpose, then deleted by digest one at a time.
    conn = Conn("127.0.0.1", server.port)
    digests = [
        sha256_digest(await push_config_image(conn, f"d{n:04d}", f"delete-{n}-{time.time_ns()}", b""))
        for n in range(deletes)
    ]
    before = server.cpu_seconds()
    statuses: collections.Counter[int] = collections.Counter()
    for digest in digests:
        reply = await conn.request("DELETE", f"/v2/{REPO}/manifests/{digest}")
        statuses[reply.status] += 1
    errors = len(digests) - statuses[202]
    out["delete"] = ((server.cpu_seconds() - before) / len(digests), len(digests), errors)
    conn.close()
    out["5xx"] = fives + sum(n for status, n in statuses.items() if status >= 500)
    return out


def variants(include_distribution: bool) -> list[tuple[str, Target, bool, bool]]:
    wharf = Target("granian-1", "Wharf", "wharf", "granian", 1)
    found = [
        ("embedded", wharf, False, False),
        ("embedded + quota", wharf, False, True),
        ("etcd", wharf, True, False),
        ("etcd + quota", wharf, True, True),
    ]
    if include_distribution:
        found.insert(
            0, ("Distribution 2.8.2", Target("distribution", "Distribution 2.8.2", "distribution"), False, False)
        )
    return found


def report(results: dict[str, dict[int, dict[str, Any]]], sizes: list[int]) -> None:
    operations = ["push", "tags page", "tags full", "delete"]
    for op in operations:
        print(f"\n== {op}: server CPU per operation (ms), by tags in the repository")
        header = f"{'registry':<22}" + "".join(f"{size:>12,}" for size in sizes) + f"{'ratio':>8}{'errors':>8}"
        print(header)
        for name, by_size in results.items():
            cells = []
            values = []
            errors = 0
            for size in sizes:
                figure = by_size.get(size, {}).get(op)
                if figure is None:
                    cells.append(f"{'-':>12}")
                    continue
                cpu, _ops, errs = figure
                values.append(cpu)
                errors += errs
                cells.append(f"{cpu * 1000:>12.2f}")
            ratio = f"{values[-1] / values[0]:>8.2f}" if len(values) > 1 and values[0] > 0 else f"{'-':>8}"
            print(f"{name:<22}" + "".join(cells) + ratio + f"{errors:>8}")
    print("\nratio: the largest size over the smallest (the goal: within 1.5 for all but the whole tag list)")
    for name, by_size in results.items():
        fives = sum(by_size.get(size, {}).get("5xx", 0) for size in sizes)
        print(f"{name}: {fives} responses with status 5xx")


async def main_async(args: argparse.Namespace) -> None:
    sizes = sorted(int(s) for s in args.sizes.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="wharf-bench-scale-", dir=args.tmpdir))
    results: dict[str, dict[int, dict[str, Any]]] = {}
    etcd = EtcdCluster(1).start()
    try:
        chosen = [v for v in variants(not args.no_distribution) if not args.only or v[0] in args.only.split(",")]
        for name, target, on_etcd, quota in chosen:
            server = ScaleServer(target, workdir / name.replace(" ", "-"), etcd=etcd if on_etcd else None, quota=quota)
            server.start()
            server.wait_ready()
            try:
                have = 0
                results[name] = {}
                for size in sizes:
                    print(f"{name}: {size:,} tags", flush=True)
                    have = await grow(server, size, have)
                    results[name][size] = await measure(server, args.duration, args.deletes)
            finally:
                server.stop()
                shutil.rmtree(server.workdir, ignore_errors=True)
    finally:
        etcd.close()
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,5000,20000", help="comma-separated tag counts")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load")
    parser.add_argument(
        "--deletes", type=int, default=200, help="manifests deleted one at a time per size (CPU is read in 10 ms ticks)"
    )
    parser.add_argument("--no-distribution", action="store_true", help="Wharf only")
    parser.add_argument("--only", help="comma-separated registries to run, by their names in the tables")
    parser.add_argument("--tmpdir", help="where the registries' data go (default: system temp)")
    asyncio.run(main_async(parser.parse_args()))
    os.sync()


if __name__ == "__main__":
    main()
