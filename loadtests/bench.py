#!/usr/bin/env python3
"""Side-by-side benchmark: Wharf (four server variants) against CNCF Distribution.

Every registry runs on filesystem storage under its own temporary directory, on loopback, one
registry at a time, and gets the same four loads:

  1. manifest GET by tag      wrk, N connections, Accept header set by a Lua script
  2. blob pull                a large blob GET over and over by a few concurrent clients
  3. blob push                monolithic uploads of large blobs (POST, then PUT ?digest= with the body)
  4. small-image pushes       config + 2 small layers + manifest, the whole client flow

and, between 1 and 2, wrk on the tag list of a repository of 1,000 tags (whole, and a page of 100).
Loads 2-4 use benchlib's small asyncio HTTP/1.1 client (a Protocol, keep-alive, uvloop when
installed), which does far less work per request than httpx; wrk is run against load 1 and, as a
sanity check, against load 2, so the two clients can be compared on the same server.

Figures only: nothing here passes or fails. Usage:

    python loadtests/bench.py [--quick] [--duration S] [--blob-mib M] [--only a,b] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import loads, session
from benchlib.client import Conn
from benchlib.cpu import cores
from benchlib.loads import Settings, Table
from benchlib.report import (
    REQUEST_RATIOS,
    comparison_table,
    cpu,
    errors,
    filesystem_type,
    machine_context,
    mib_rate,
    rate,
    report_errors,
    results_heading,
    wrk_columns,
)
from benchlib.servers import TARGETS, Server, Target

TAG_LIST_TAGS = 1000
TAG_LISTS = {"tags_full": "", "tags_page": f"?n=100&last=t{TAG_LIST_TAGS // 2:05d}"}


async def bench_registry(server: Server, s: Settings, workdir: Path, progress: session.Progress) -> dict[str, Any]:
    async def tag_lists(setup: Conn) -> dict[str, Any]:
        """The full tag list of a repository of TAG_LIST_TAGS tags, and a page of 100 from its middle."""
        await loads.setup_tags(setup, "bench/tags", TAG_LIST_TAGS)
        out = {}
        for label, query in TAG_LISTS.items():
            progress(f"tags/list {label}: wrk -c{s.connections} {s.duration:.0f}s")
            out[label] = await loads.wrk_load(server, f"{server.base}/v2/bench/tags/tags/list{query}", s)
        return out

    pull_wrk = {"connections": s.pull_clients, "latency": False}
    return await loads.standard_loads(server, s, workdir, progress, pull_wrk=pull_wrk, after_manifest=tag_lists)


def report(results: dict[str, dict[str, Any]], targets: list[Target], s: Settings) -> None:
    done = [t for t in targets if t.key in results and "error" not in results[t.key]]
    tables = {
        "manifest_wrk": Table(
            f"py = the bench client on the same URL ({s.connections} connections, {s.sanity_duration:.0f}s), "
            "as a client check.",
            [rate("manifest_py", "py req/s"), cpu("manifest_py", "py CPU", "client")],
        ),
        "pull": Table(
            f"wrk = wrk -c{s.pull_clients} on the same URL for {s.sanity_duration:.0f}s, as a client check. "
            "Latency is per whole blob.",
            [mib_rate("pull_wrk", "wrk MiB/s"), errors("pull_wrk", "wrk err")],
        ),
        "push": Table(f"every upload is a distinct blob; at most {s.max_push_blobs} per registry."),
        "images": Table("per image: 3 x (HEAD blob, POST, PUT ?digest=) + PUT manifest = 10 requests."),
    }
    loads.load_tables(results, done, s, {"manifest_wrk": tables.pop("manifest_wrk")})
    for label, what in (("tags_full", f"all {TAG_LIST_TAGS} tags"), ("tags_page", "?n=100 from the middle")):
        title = f"1b. GET /v2/<name>/tags/list, {what} (wrk -t{s.wrk_threads} -c{s.connections} -d{s.duration:.0f}s)"
        note = "The goal is 5x Distribution's req/s (issue: cost that does not grow with the registry)."
        comparison_table(title, note, wrk_columns(label), REQUEST_RATIOS, results, done, "distribution")
    loads.load_tables(results, done, s, tables)
    print("\nratio = Wharf / Distribution. Above 1.00 is better for throughput (req/s, MiB/s, images/s) and for work")
    print(f"per CPU-second (/CPU), worse for latency (p99). CPU% is of one core ({cores()} here). 'other' is the CPU")
    print("used by everything but the registry and the load client, plus hypervisor steal: when it is high,")
    print("throughput is noisy and the /CPU figures hold up better.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    loads.add_arguments(parser, blob_mib="default 64, quick 16", max_push_gib="12")
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(t.key for t in TARGETS))
    args = parser.parse_args(argv)
    s = loads.settings(args, blob_mib=16 if args.quick else 64, max_push_gib=12.0)
    targets = TARGETS
    if args.only:
        wanted = {k.strip() for k in args.only.split(",") if k.strip()}
        if unknown := wanted - {t.key for t in TARGETS}:
            parser.error(f"unknown registries: {', '.join(sorted(unknown))}")
        targets = [t for t in TARGETS if t.key in wanted]
    for tool in ("wrk",) + (("docker-registry",) if any(t.kind == "distribution" for t in targets) else ()):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2

    base = Path(tempfile.mkdtemp(prefix="wharf-bench-", dir=args.tmpdir))
    servers: list[Server] = []
    t0 = time.monotonic()
    log = "on" if s.accesslog else "off"
    storage = f"filesystem under {base} ({filesystem_type(base)}); loopback; one registry at a time; access logs {log}"
    context = machine_context(storage)
    try:
        with session.cleanup() as stack:
            stack.callback(shutil.rmtree, base, ignore_errors=True)
            stack.callback(session.stop_all, servers)
            print("\n".join(context), flush=True)

            def make(target: Target, workdir: Path) -> Server:
                return Server(target, workdir, s.accesslog)

            async def bench(server: Server, workdir: Path, progress: session.Progress) -> dict[str, Any]:
                return await bench_registry(server, s, workdir, progress)

            run = session.one_at_a_time(targets, make, bench, base=base, servers=servers, keep_logs=args.keep_logs)
            results = session.run_async(run)
    except KeyboardInterrupt:
        return session.interrupted()
    results_heading(t0, context)
    report(results, targets, s)
    report_errors(results, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
