#!/usr/bin/env python3
"""What the audit log costs: small-image pushes (and manifest pulls) per second with audit on and off.

Two Wharf registries run side by side on filesystem storage, the same configuration but for the
`audit` section (one writes the hash-chained file, one has none). The same loads go to each in
turn, round after round (off, on, off, on ...), so both see the same machine; the figures are the
medians of the rounds and their ratio. With --together both are loaded at the same moment, which
on a busy shared machine gives both the same noise (each then has about half the CPU). Every push writes two lines per blob (started, success) and
two for the manifest; every manifest GET one. After the rounds the audit file is checked with the
same code as `wharf audit verify`.

Figures only: nothing here passes or fails. The client, the loads and the load runner are benchlib's. Usage:

    python loadtests/bench_audit.py [--quick] [--rounds N] [--duration S] [--server granian] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from benchlib import loads
from benchlib.runner import Result, run_load
from benchlib.servers import Server, Target

from node.auditchain import log_files, verify


def audited(target: Target, workdir: Path, audit_path: Path, settings: list[str]) -> Server:
    """A Wharf server with an audit log at `audit_path`; `settings` are KEY=VALUE audit settings (YAML values)."""
    audit: dict[str, Any] = {"path": str(audit_path)}
    for setting in settings:
        key, _, value = setting.partition("=")
        audit[key] = yaml.safe_load(value)
    return Server(target, workdir, wharf={"audit": audit})


async def _round(server: Server, pull: tuple[str, int], args: argparse.Namespace, round_no: int) -> dict[str, Result]:
    push = loads.image_pushes("bench/images", args.layer_kib * 1024, tag_prefix=f"r{round_no}-t")
    results = {"push": await run_load(server, args.clients, args.duration, push)}
    if not args.no_pulls:
        results["pull"] = await run_load(server, args.pull_clients, args.duration, loads.manifest_get(*pull))
    return results


def _figures(results: list[Result]) -> dict[str, float]:
    rates = [r.rate for r in results]
    per_cpu = [r.ops / r.server_cpu for r in results if r.server_cpu > 0]
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "per_cpu": statistics.median(per_cpu) if per_cpu else float("nan"),
        "errors": float(sum(r.error_count for r in results)),
        "other": statistics.median([r.other_cpu / r.elapsed for r in results]),
    }


async def run(args: argparse.Namespace, workdir: Path) -> int:
    target = Target(
        f"{args.server}-{args.workers}", f"Wharf {args.server} x{args.workers}", "wharf", args.server, args.workers
    )
    audit_path = workdir / "on" / "audit" / "audit.log"
    audit_path.parent.mkdir(parents=True)
    servers = {"off": Server(target, workdir / "off"), "on": audited(target, workdir / "on", audit_path, args.set)}
    pulls: dict[str, tuple[str, int]] = {}
    try:
        for server in servers.values():
            server.start()
        for name, server in servers.items():
            server.wait_ready()
            manifest = await loads.setup_manifest_at(server.port, "bench/pull")
            pulls[name] = ("/v2/bench/pull/manifests/latest", len(manifest))
        rounds: dict[str, dict[str, list[Result]]] = {name: {"push": [], "pull": []} for name in servers}
        for round_no in range(args.rounds):
            if args.together:
                print(f"round {round_no + 1}/{args.rounds}: both at once", file=sys.stderr, flush=True)
                both = await asyncio.gather(*(_round(servers[n], pulls[n], args, round_no) for n in servers))
                for name, results in zip(servers, both, strict=True):
                    for load, result in results.items():
                        rounds[name][load].append(result)
                continue
            order = ("off", "on") if round_no % 2 == 0 else ("on", "off")
            for name in order:
                print(f"round {round_no + 1}/{args.rounds}: audit {name}", file=sys.stderr, flush=True)
                for load, result in (await _round(servers[name], pulls[name], args, round_no)).items():
                    rounds[name][load].append(result)
    finally:
        for server in servers.values():
            server.stop()
    files = log_files([str(audit_path)])
    report = verify(files)
    print(f"\n{target.label}, {args.rounds} rounds of {args.duration:.0f} s per load, {os.cpu_count()} CPUs")
    print(
        f"{'load':<34} {'audit off':>12} {'audit on':>12} {'on/off':>8} {'per CPU-s off':>14} {'on':>8} "
        f"{'on/off':>7} {'errors':>7}"
    )
    for load, label in (("push", "small-image pushes/s (median)"), ("pull", "manifest GETs/s (median)")):
        if not rounds["off"][load]:
            continue
        off, on = _figures(rounds["off"][load]), _figures(rounds["on"][load])
        print(
            f"{label:<34} {off['median']:>12.1f} {on['median']:>12.1f} {on['median'] / off['median']:>8.3f} "
            f"{off['per_cpu']:>14.1f} {on['per_cpu']:>8.1f} {on['per_cpu'] / off['per_cpu']:>7.3f} "
            f"{off['errors'] + on['errors']:>7.0f}"
        )
        spread = "  ".join(
            f"{name} {f['min']:.1f}-{f['max']:.1f}, other CPU {f['other'] * 100:.0f}%"
            for name, f in (("off", off), ("on", on))
        )
        print(f"{'':<34} rounds: {spread}")
    state = "sound" if report.ok else f"BROKEN: {report.problem}"
    print(f"audit file: {report.lines} lines in {len(files)} files, chain {state}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s: a smoke test of the bench")
    parser.add_argument("--rounds", type=int, help="rounds per registry (default 4, quick 2)")
    parser.add_argument("--duration", type=float, help="seconds per load and round (default 10, quick 3)")
    parser.add_argument("--server", default="granian", choices=["granian", "hypercorn"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8, help="concurrent pushing clients (8)")
    parser.add_argument("--pull-clients", type=int, default=16, help="concurrent pulling clients (16)")
    parser.add_argument("--layer-kib", type=int, default=4, help="size of each of the two layers (4 KiB)")
    parser.add_argument("--no-pulls", action="store_true", help="pushes only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an audit setting (fsync=true)")
    parser.add_argument(
        "--together",
        action="store_true",
        help="load both registries at the same time (each gets the same noise on a busy machine)",
    )
    parser.add_argument("--tmpdir", help="parent directory for the registries' files (default: system temp)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    workdir = Path(tempfile.mkdtemp(prefix="wharf-bench-audit-", dir=args.tmpdir))
    try:
        return asyncio.run(run(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
