#!/usr/bin/env python3
"""The web pages at 10,000 repositories: each page's latency beside `_catalog?n=100`'s, same run.

One Wharf on filesystem storage with the embedded coordinator is filled over HTTP: one image is
pushed, then each further repository gets the same blobs by cross-repository mount and its own
tag (a push as `crane copy` does it). Then, in turns (so both see the same machine), a client asks
`_catalog?n=100` and each page: the first page of repositories, a search that matches a tenth of
them, a page deep in the list, a repository's tag page and an image page. It reports the median
and 95th percentile latency and the server's CPU per request; nothing is asserted.

    python loadtests/bench_ui.py                  # 10,000 repositories (fills in a few minutes)
    python loadtests/bench_ui.py --repositories 2000 --requests 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib.client import Conn
from benchlib.images import OCI_MANIFEST, push_one_layer_image
from benchlib.report import fmt_ms, fmt_num, print_table
from benchlib.servers import WHARF_VARIANTS, Server

FILLERS = 16


async def _fill(port: int, repositories: int) -> None:
    """Repositories bench/r00000 ... with one image each, by mount from the first."""
    conn = Conn("127.0.0.1", port)
    layer = os.urandom(4096)
    manifest = await push_one_layer_image(conn, "bench/r00000", "latest", "ui-bench", layer)
    conn.close()
    config, layers = _blobs(manifest)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(1, repositories):
        queue.put_nowait(i)
    started = time.monotonic()

    async def filler() -> None:
        own = Conn("127.0.0.1", port)
        try:
            while not queue.empty():
                i = queue.get_nowait()
                repo = f"bench/r{i:05d}"
                for digest in [config, *layers]:
                    reply = await own.request("POST", f"/v2/{repo}/blobs/uploads/?mount={digest}&from=bench/r00000")
                    if reply.status != 201:
                        raise RuntimeError(f"mount into {repo}: {reply.status} {reply.body[:200]!r}")
                reply = await own.request(
                    "PUT", f"/v2/{repo}/manifests/latest", {"Content-Type": OCI_MANIFEST}, manifest
                )
                if reply.status != 201:
                    raise RuntimeError(f"manifest into {repo}: {reply.status} {reply.body[:200]!r}")
                if i % 1000 == 0:
                    print(f"  filled {i} repositories ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        finally:
            own.close()

    await asyncio.gather(*(filler() for _ in range(FILLERS)))


def _blobs(manifest: bytes) -> tuple[str, list[str]]:
    doc = json.loads(manifest)
    return doc["config"]["digest"], [layer["digest"] for layer in doc["layers"]]


async def _measure(server: Server, paths: dict[str, str], requests: int) -> dict[str, tuple[list[float], float]]:
    """Latencies and server CPU seconds per path, the paths asked in turns."""
    conn = Conn("127.0.0.1", server.port)
    found: dict[str, tuple[list[float], float]] = {name: ([], 0.0) for name in paths}
    try:
        for name, path in paths.items():  # one of each first: caches warm, as a person's second look
            reply = await conn.request("GET", path)
            if reply.status != 200:
                raise RuntimeError(f"{name} {path}: {reply.status} {reply.body[:300]!r}")
        for _ in range(requests):
            for name, path in paths.items():
                cpu = server.cpu_seconds()
                started = time.perf_counter()
                reply = await conn.request("GET", path)
                elapsed = time.perf_counter() - started
                used = server.cpu_seconds() - cpu
                if reply.status != 200:
                    raise RuntimeError(f"{name} {path}: {reply.status}")
                latencies, total = found[name]
                latencies.append(elapsed)
                found[name] = (latencies, total + used)
    finally:
        conn.close()
    return found


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repositories", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200, help="requests of each page (default 200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wharf-bench-ui-") as work:
        server = Server(WHARF_VARIANTS["granian-1"], Path(work), accesslog=False)
        server.start()
        server.wait_ready()
        try:
            filling = time.monotonic()
            await _fill(server.port, args.repositories)
            filled = time.monotonic() - filling
            middle = f"bench/r{args.repositories // 2:05d}"
            paths = {
                "_catalog?n=100": "/v2/_catalog?n=100",
                "repositories, first page": "/ui/",
                "repositories, a page deep in": f"/ui/?after={middle}",
                "search (a tenth match)": "/ui/?q=r0001" if args.repositories >= 2000 else "/ui/?q=r00",
                "a repository's tags": f"/ui/r/{middle}",
                "an image": f"/ui/r/{middle}/-/manifest/latest",
            }
            found = await _measure(server, paths, args.requests)
        finally:
            server.stop()
    rows = []
    catalog = statistics.median(found["_catalog?n=100"][0])
    for name, (latencies, cpu) in found.items():
        median = statistics.median(latencies)
        rows.append(
            [
                name,
                fmt_ms(median),
                fmt_ms(_p95(latencies)),
                fmt_ms(cpu / len(latencies)),
                fmt_num(median / catalog, 2) + "x",
            ]
        )
    print_table(
        f"Web pages at {args.repositories:,} repositories (filled over HTTP in {filled:.0f} s; "
        f"load average {os.getloadavg()[0]:.1f})",
        "each page asked in turn with _catalog?n=100, one client, keep-alive, after one warm-up request",
        ["request", "p50", "p95", "server CPU/req", "p50 vs _catalog"],
        rows,
    )


if __name__ == "__main__":
    asyncio.run(main())
