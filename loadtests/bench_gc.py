#!/usr/bin/env python3
"""Garbage collection on S3 + etcd: one cycle over a large registry, and pushes while GC runs.

Everything runs on loopback: one `moto_server` (the tests' S3 server) and one etcd member.

Part 1, one cycle at scale. The registry is populated *in-process*, not over HTTP: for each of
`--manifests` images (default 10,000) this writes `--blobs-per-manifest` small blobs (default 5,
so 50,000 blobs) and the manifest's own bytes straight through Wharf's S3 storage driver, and the
records through the coordinator's Metadata API (`commit_blob`, `put_manifest` with a tag) on etcd:
the same objects and records a push makes, without ~500,000 HTTP requests (pushing 50,000 blobs
through a node here would take most of an hour). Every blob is used by one manifest only. Then
`--unreferenced` of the manifests (default 30%) are deleted with `Metadata.delete_manifest` (as
`DELETE /v2/<name>/manifests/<digest>` does), which leaves their blobs and manifest bytes
unreferenced. Once everything is older than `--grace`, one `collect()` (node/gc.py, what `wharf gc`
and the leader's schedule run) is timed: mark, sweep, bytes freed, S3 requests; a second cycle,
with nothing left to collect, shows what a cycle costs on a registry of that size.

Part 2, pushes with and without GC. One Wharf node on the same S3 and etcd (the registry of part 1
still in it) takes small-image pushes (bench.py's load 4, except each client cycles through
`--tags` tags, so older images lose their tag and become garbage) for `--push-seconds`, first
without GC, then with GC cycles running back to back (`--gc-mode`: `loop`, a process calling
`collect(delete_untagged=True)` again and again; `cli`, `wharf gc --delete-untagged` run again and
again; `node`, the node itself with `gc.interval: 1s`), `--push-grace` (2s) grace. Afterwards every
tag the pushers left is pulled back (manifest, and every blob through its redirect) and checked.

Figures only: nothing here passes or fails. Usage:

    python loadtests/bench_gc.py [--quick] [--manifests N] [--unreferenced F] [--push-seconds S]
                                 [--gc-mode loop|cli|node] [--only cycle,push]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from benchlib import session
from benchlib.client import Conn, Redirects, Unexpected
from benchlib.cpu import children_cpu, cores, cpu_of
from benchlib.images import ACCEPT, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, sha256_digest
from benchlib.loads import image_pushes
from benchlib.report import (
    Column,
    comparison_table,
    cpu,
    fmt_pct,
    image_columns,
    machine_context,
    print_problems,
    print_table,
    report_errors,
    results_heading,
)
from benchlib.runner import IN_PROCESS, CpuWindow, Figures, Result, run_load
from benchlib.s3 import S3Backend, S3Registry, measured, s3_total
from benchlib.servers import REPO_ROOT, WHARF_VARIANTS, Target, scan_log

ROOT = "/gc-bench"
PREFIX = "/gc-bench/"
# Part 2 with --push-fresh: a registry of its own, without part 1's images.
FRESH_ROOT = "/gc-push"
FRESH_PREFIX = "/gc-push/"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------------------------
# Config and in-process services
# --------------------------------------------------------------------------------------------


def write_config(
    path: Path,
    backend: S3Backend,
    variant: Target,
    gc: dict[str, Any],
    accesslog: bool,
    root: str = ROOT,
    prefix: str = PREFIX,
) -> Path:
    """The config of a Wharf node on the bench's S3 and etcd, for a process that is not a node (GC, `wharf gc`)."""
    return S3Registry(variant, path.parent, accesslog, backend, root=root, prefix=prefix, gc=gc).write_config(path)


async def open_services(config_path: Path) -> Any:
    from node.config import load
    from node.services import Services
    from node.store import open_kv, open_storage

    config = load(str(config_path), environ={})
    return Services.build(config, await open_kv(config), open_storage(config))


async def bounded(limit: int, calls: list[Callable[[], Any]], progress: Callable[[int], None] | None = None) -> None:
    gate = asyncio.Semaphore(limit)
    done = 0

    async def one(call: Callable[[], Any]) -> None:
        nonlocal done
        async with gate:
            await call()
        done += 1
        if progress is not None:
            progress(done)

    await asyncio.gather(*(one(c) for c in calls))


# --------------------------------------------------------------------------------------------
# Part 1: populate, then one timed cycle
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Populated:
    manifests: list[tuple[str, str, list[str]]]  # (repo, manifest digest, blob digests)
    deleted: list[int]  # indexes into manifests
    blob_bytes: int
    manifest_bytes: int
    seconds: float
    delete_seconds: float
    last_write: float


async def populate(services: Any, args: argparse.Namespace, say: Callable[[str], None]) -> Populated:
    from coordinator.metadata import ManifestRecord
    from node.storage import layout

    storage, metadata = services.storage, services.metadata
    n = args.manifests
    repos = [f"gcbench/r{j:03d}" for j in range(max(1, n // 100))]
    manifests: list[tuple[str, str, list[str]]] = [("", "", [])] * n
    totals = {"blob": 0, "manifest": 0}
    seed = os.urandom(16)
    t0 = time.perf_counter()
    report_every = max(1, n // 10)

    def blob_data(i: int, k: int) -> bytes:
        # Distinct, cheap bytes: a counter hashed into the first block, then filler.
        head = hashlib.sha256(seed + f"{i}/{k}".encode()).digest()
        return (head * (args.blob_bytes // 32 + 1))[: args.blob_bytes]

    async def one(i: int) -> None:
        repo = repos[i % len(repos)]
        blobs = [blob_data(i, k) for k in range(args.blobs_per_manifest)]
        digests = [sha256_digest(b) for b in blobs]

        async def store(data: bytes, digest: str) -> None:
            key = layout.blob_key(digest)
            await storage.write_bytes(key, data)
            await metadata.commit_blob(repo, digest, len(data), key)

        await asyncio.gather(*(store(b, d) for b, d in zip(blobs, digests, strict=True)))
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digests[0], "size": len(blobs[0])},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": d, "size": len(b)}
                for d, b in zip(digests[1:], blobs[1:], strict=True)
            ],
        }
        body = json.dumps(doc, separators=(",", ":")).encode()
        digest = sha256_digest(body)
        key = layout.blob_key(digest)
        await storage.write_bytes(key, body)
        record = ManifestRecord(digest, OCI_MANIFEST, len(body), blobs=digests, pushed=time.time())
        await metadata.put_manifest(repo, record, tag=f"t{i}", storage_key=key)
        manifests[i] = (repo, digest, digests)
        totals["blob"] += sum(len(b) for b in blobs)
        totals["manifest"] += len(body)

    def progress(done: int) -> None:
        if done % report_every == 0 or done == n:
            rate = done / (time.perf_counter() - t0)
            say(f"populated {done:,}/{n:,} manifests ({rate:,.0f}/s)")

    await bounded(args.concurrency, [lambda i=i: one(i) for i in range(n)], progress)
    seconds = time.perf_counter() - t0

    rng = random.Random(5)
    deleted = sorted(rng.sample(range(n), int(round(n * args.unreferenced))))
    t1 = time.perf_counter()

    async def delete(i: int) -> None:
        repo, digest, _ = manifests[i]
        if not await metadata.delete_manifest(repo, digest):
            raise RuntimeError(f"delete_manifest({repo}@{digest}) found nothing")

    await bounded(args.concurrency, [lambda i=i: delete(i) for i in deleted])
    say(f"deleted {len(deleted):,} manifests (their tags with them)")
    return Populated(
        manifests, deleted, totals["blob"], totals["manifest"], seconds, time.perf_counter() - t1, time.time()
    )


async def kv_count(kv: Any, prefix: str) -> int:
    from coordinator import keys

    count = 0
    start = None
    while True:
        page = await kv.range(prefix, start=start, limit=5000)
        count += len(page)
        if len(page) < 5000:
            return count
        start = keys.after(page[-1].key)


async def counts(services: Any, backend: S3Backend) -> dict[str, Any]:
    """The blob objects in the bucket (count, bytes), and the KV's manifest, blob, link and tag records."""
    from coordinator import keys
    from node.storage import layout

    objects = await asyncio.get_running_loop().run_in_executor(
        None, backend.object_count, ROOT.strip("/") + "/" + layout.BLOBS
    )
    records = {"manifests": keys.MANIFESTS, "blobs": keys.BLOBS, "links": keys.LINKS, "tags": keys.TAGS}
    return {"objects": objects, **{name: await kv_count(services.kv, prefix) for name, prefix in records.items()}}


async def timed_cycle(services: Any, backend: S3Backend) -> dict[str, Any]:
    from node.gc import collect

    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def progress(phase: str, done: int, total: int) -> None:
        now = time.perf_counter() - t0
        marks.setdefault(f"{phase}:first", now)
        marks[f"{phase}:last"] = now
        marks[f"{phase}:total"] = total

    offset = backend.log_offset()
    window = CpuWindow(IN_PROCESS, time.process_time, {"backend_cpu": backend.cpu})  # the collector runs here
    summary = await collect(services, progress=progress)
    wall = time.perf_counter() - t0
    spent = Figures()
    window.close(spent)
    return {
        "summary": summary,
        "wall": wall,
        "marks": marks,
        "s3": backend.s3_requests(offset),
        "gc_cpu": spent.client_cpu,
        "backend_cpu": spent.extra["backend_cpu"],
        "other_cpu": spent.other_cpu,
    }


async def part_cycle(
    args: argparse.Namespace, backend: S3Backend, base: Path, say: Callable[[str], None]
) -> dict[str, Any]:

    variant = WHARF_VARIANTS[args.wharf]
    config_path = write_config(base / "gc-cycle.yml", backend, variant, {"enabled": False, "grace": args.grace}, True)
    services = await open_services(config_path)
    out: dict[str, Any] = {}
    try:
        say(
            f"populating: {args.manifests:,} manifests x {args.blobs_per_manifest} blobs of {args.blob_bytes} B, "
            f"{args.concurrency} at a time"
        )
        pop = await populate(services, args, say)
        out["populated"] = pop
        grace = _seconds(args.grace)
        wait = pop.last_write + grace + 1 - time.time()
        if wait > 0:
            say(f"waiting {wait:.0f}s for the grace period ({args.grace}) to pass")
            await asyncio.sleep(wait)
        out["before"] = await counts(services, backend)
        say("collecting: one cycle")
        out["first"] = await timed_cycle(services, backend)
        s = out["first"]["summary"]
        say(
            f"cycle: {out['first']['wall']:.1f}s, {s.manifests_deleted} manifests, {s.blobs_deleted} blobs, "
            f"{_size(s.bytes_freed)} freed"
        )
        out["after"] = await counts(services, backend)
        say("collecting: a second cycle (nothing left to collect)")
        out["second"] = await timed_cycle(services, backend)
        say(f"second cycle: {out['second']['wall']:.1f}s")
        say(f"checking {args.check_sample} kept and {args.check_sample} deleted images in the KV and the bucket")
        out["check"] = await check_storage(services, pop, args.check_sample)
    finally:
        await services.close()
    return out


async def check_storage(services: Any, pop: Populated, sample: int) -> dict[str, Any]:
    """A sample of kept images must have every object; a sample of deleted ones none."""
    from node.storage import layout

    rng = random.Random(7)
    gone = set(pop.deleted)
    kept = [i for i in range(len(pop.manifests)) if i not in gone]
    problems: list[str] = []
    checks: list[tuple[str, str, bool]] = []
    for pool, present in ((kept, True), (pop.deleted, False)):
        for i in rng.sample(pool, min(sample, len(pool))):
            repo, digest, blobs = pop.manifests[i]
            checks += [(repo, d, present) for d in [digest, *blobs]]

    async def check(repo: str, digest: str, present: bool) -> None:
        record = await services.metadata.get_blob(digest)
        size = await services.storage.stat(record.key if record else layout.blob_key(digest))
        if (size is not None) != present or (record is not None) != present:
            problems.append(f"{repo}@{digest}: {'missing' if present else 'still there'} (record {record})")

    await bounded(32, [lambda c=c: check(*c) for c in checks])
    return {"checked": len(checks), "problems": problems}


def _seconds(text: str) -> float:
    from node.config import parse_duration

    return parse_duration(text)


def report_cycle(out: dict[str, Any], args: argparse.Namespace) -> None:
    pop: Populated = out["populated"]
    n = len(pop.manifests)
    blobs = n * args.blobs_per_manifest
    print(
        f"\nGC-1. One collection cycle over {n:,} manifests / {blobs:,} blobs ({args.blob_bytes} B each) on S3 + etcd, "
        f"{len(pop.deleted):,} manifests ({args.unreferenced:.0%}) deleted beforehand"
    )
    print(
        f"  populated in-process (S3 driver + Metadata API, {args.concurrency} images at a time) in {pop.seconds:.0f}s: "
        f"{n / pop.seconds:,.0f} images/s, {(blobs + n) / pop.seconds:,.0f} objects/s; deletes took {pop.delete_seconds:.1f}s"
    )
    before, after = out["before"], out["after"]
    rows = []
    for name in ("manifests", "blobs", "links", "tags"):
        rows.append([f"KV {name} records", f"{before[name]:,}", f"{after[name]:,}", f"{before[name] - after[name]:,}"])
    rows.append(
        [
            "S3 blob objects",
            f"{before['objects'][0]:,}",
            f"{after['objects'][0]:,}",
            f"{before['objects'][0] - after['objects'][0]:,}",
        ]
    )
    rows.append(
        [
            "S3 blob bytes",
            _size(before["objects"][1]),
            _size(after["objects"][1]),
            _size(before["objects"][1] - after["objects"][1]),
        ]
    )
    print_table("Records and objects", "", ["", "before", "after", "removed"], rows)
    expected_objects = len(pop.deleted) * (args.blobs_per_manifest + 1)
    print(
        f"  expected to go: {expected_objects:,} objects ({len(pop.deleted):,} manifests x (1 + {args.blobs_per_manifest} blobs))"
    )

    rows = []
    for key, label in (("first", "cycle 1 (collects)"), ("second", "cycle 2 (nothing to do)")):
        c = out[key]
        s = c["summary"]
        marks = c["marks"]
        mark = marks.get("mark:first", float("nan"))
        cand = marks.get("candidates:first", float("nan"))
        sweep_end = marks.get("sweep:last", cand)
        run_end = s.duration
        rows.append(
            [
                label,
                f"{c['wall']:.1f}",
                f"{mark:.1f}",
                f"{cand - mark:.1f}",
                f"{sweep_end - cand:.1f}",
                f"{max(0.0, run_end - sweep_end):.1f}",
                f"{max(0.0, c['wall'] - run_end):.1f}",
                f"{s.manifests_deleted:,}",
                f"{s.blobs_deleted:,}",
                _size(s.bytes_freed),
                f"{s.links_deleted:,}",
                f"{s3_total(c['s3']):,}",
                *(fmt_pct(c[who], c["wall"]) for who in ("gc_cpu", "backend_cpu", "other_cpu")),
            ]
        )
    print_table(
        "Cycle phases",
        "phases (s): manifests = untagged/orphaned manifests and reading every manifest; scan = links, touches, blob records;"
        "\n  sweep = pending marks, rescan, one KV txn + one S3 DELETE per blob; links = stale links; orphans = listing the"
        "\n  bucket for objects no record names. GC CPU = this process (the collector runs in it). The deleted images'"
        "\n  manifest records went with DELETE, so GC deletes their bytes as blobs; links del counts only links removed"
        "\n  on their own (a deleted blob's links go with it).",
        ["", "total s", "manifests", "scan", "sweep", "links", "orphans", "manifests del", "blobs del", "freed"]
        + ["links del", "S3 req", "GC CPU", "S3+etcd", "other"],
        rows,
    )
    for key in ("first", "second"):
        c = out[key]
        parts = [f"{k} {v:,}" for k, v in sorted(c["s3"].items()) if not k.endswith("xx")]
        print(f"  S3 requests, {key} cycle: {', '.join(parts) or 'none'}")
    check = out["check"]
    fine = f"{check['checked']} sampled objects of kept and deleted images all as expected (kept: record + object; "
    print_problems("storage check", check["problems"], f"in {check['checked']} objects", fine + "deleted: neither)")


# --------------------------------------------------------------------------------------------
# Part 2: pushes without and with GC running
# --------------------------------------------------------------------------------------------


class GCRunner:
    """GC cycles back to back while the pushes run, in one of three ways; counts cycles and CPU."""

    def __init__(self, mode: str, config_path: Path, workdir: Path) -> None:
        self.mode = mode
        self.config_path = config_path
        self.workdir = workdir
        self.cycles: list[dict[str, Any]] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.proc: subprocess.Popen[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = False
        self._cpu_start = 0.0
        self.cpu = 0.0
        self.out = workdir / "gc-cycles.jsonl"
        self._log: Any = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REGISTRY_"))}
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    async def start(self) -> None:
        if self.mode == "loop":
            self._log = open(self.workdir / "gc-loop.log", "wb")
            argv = [sys.executable, str(Path(__file__).resolve()), "--gc-loop", str(self.config_path), str(self.out)]
            self.proc = subprocess.Popen(
                argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
            )
        elif self.mode == "cli":
            self._cpu_start = children_cpu()
            self._task = asyncio.ensure_future(self._cli_loop())

    def cpu_seconds(self) -> float:
        if self.mode == "loop" and self.proc is not None:
            return cpu_of(pgids=[self.proc.pid])
        if self.mode == "cli":
            return children_cpu() - self._cpu_start
        return 0.0

    async def _cli_loop(self) -> None:
        while not self._stop:
            started = time.time()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "node.cli",
                "gc",
                "--delete-untagged",
                "--json",
                str(self.config_path),
                cwd=str(REPO_ROOT),
                env=self.env(),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), timeout=600)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                self.errors["wharf gc: still running after 600s (killed)"] += 1
                continue
            if proc.returncode != 0:
                self.errors[f"wharf gc exit {proc.returncode}: {err.decode(errors='replace').strip()[-200:]}"] += 1
                await asyncio.sleep(0.2)
                continue
            summary = json.loads(out)
            summary.pop("deleted", None)
            self.cycles.append({"start": started, "end": time.time(), **summary})

    async def stop(self, timeout: float = 180.0) -> None:
        self._stop = True
        self.cpu = self.cpu_seconds()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                self._task.cancel()
                self.errors["wharf gc loop did not stop in time"] += 1
        if self.proc is not None:
            # The loop finishes the cycle it is in, then exits.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                self.errors["GC loop still in a cycle after the pushes; killed"] += 1
            self.proc = None
            if self._log is not None:
                self._log.close()
            if self.out.exists():
                for line in self.out.read_text().splitlines():
                    entry = json.loads(line)
                    if entry.get("error"):
                        self.errors[entry["error"][:240]] += 1
                    else:
                        self.cycles.append(entry)

    def node_cycles(self, log_text: str) -> None:
        for line in log_text.splitlines():
            if "garbage collection cycle" not in line or not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                end = entry.get("finished") or time.time()
                self.cycles.append({"start": entry.get("started", end), "end": end, **entry})


async def gc_loop_main(config_path: str, out_path: str) -> int:
    """The `--gc-loop` process: collect(delete_untagged=True) back to back until SIGTERM."""
    from node import gc

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    services = await open_services(Path(config_path))
    try:
        with open(out_path, "a") as out:
            while not stop.is_set():
                started = time.time()
                try:
                    summary = await gc.collect(services, delete_untagged=True)
                except gc.CycleRunning:
                    await asyncio.sleep(0.1)
                    continue
                except Exception as exc:  # noqa: BLE001 - recorded, and the loop goes on
                    out.write(
                        json.dumps({"start": started, "end": time.time(), "error": f"{type(exc).__name__}: {exc}"})
                        + "\n"
                    )
                    out.flush()
                    await asyncio.sleep(0.5)
                    continue
                fields = {k: v for k, v in dataclasses.asdict(summary).items() if k != "deleted"}
                out.write(json.dumps({"start": started, "end": time.time(), **fields}) + "\n")
                out.flush()
    finally:
        await services.close()
    return 0


async def verify_tags(port: int, clients: int) -> dict[str, Any]:
    """Every tag the pushers left: its manifest, and every blob through the redirect, with the right digest."""
    conn = Conn("127.0.0.1", port)
    redirects = Redirects()
    problems: list[str] = []
    images = blobs = 0
    try:
        for worker in range(clients):
            repo = f"gcpush/c-{worker}"
            reply = await conn.request("GET", f"/v2/{repo}/tags/list")
            if reply.status == 404:
                continue
            if reply.status != 200:
                problems.append(f"{repo}: tags/list {reply.status}")
                continue
            for tag in json.loads(reply.body).get("tags") or []:
                images += 1
                reply = await conn.request("GET", f"/v2/{repo}/manifests/{tag}", {"Accept": ACCEPT})
                if reply.status != 200:
                    problems.append(f"{repo}:{tag}: manifest {reply.status}")
                    continue
                doc = json.loads(reply.body)
                for desc in [doc["config"], *doc["layers"]]:
                    blobs += 1
                    try:
                        got, _ = await redirects.get(conn, 0, f"/v2/{repo}/blobs/{desc['digest']}", False)
                    except Unexpected as exc:
                        problems.append(f"{repo}:{tag} blob {desc['digest'][:19]}: {exc}"[:200])
                        continue
                    if sha256_digest(got.body) != desc["digest"]:
                        problems.append(f"{repo}:{tag} blob {desc['digest'][:19]}: other bytes")
    finally:
        conn.close()
        redirects.close()
    return {"images": images, "blobs": blobs, "problems": problems}


async def part_push(
    args: argparse.Namespace, backend: S3Backend, base: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    variant = WHARF_VARIANTS[args.wharf]
    results: dict[str, Any] = {}
    gc_config = {"enabled": False, "grace": args.push_grace, "deleteuntagged": True}
    root, prefix = (FRESH_ROOT, FRESH_PREFIX) if args.push_fresh else (ROOT, PREFIX)
    for key, with_gc in (("no-gc", False), ("gc", True)):
        node_gc = with_gc and args.gc_mode == "node"
        gc_section = {**gc_config, "enabled": True, "interval": "1s"} if node_gc else gc_config
        workdir = base / f"push-{key}"
        workdir.mkdir(parents=True, exist_ok=True)
        node = f"bench-{key}"
        server = S3Registry(variant, workdir, True, backend, root=root, prefix=prefix, node=node, gc=gc_section)
        runner: GCRunner | None = None
        try:
            server.start()
            await asyncio.get_running_loop().run_in_executor(None, server.wait_ready)
            if with_gc:
                gc_path = write_config(workdir / "gc.yml", backend, variant, gc_config, True, root, prefix)
                runner = GCRunner(args.gc_mode, gc_path, workdir)
                await runner.start()
            label = f"with GC ({args.gc_mode})" if with_gc else "without GC"
            say(f"pushes {label}: {args.image_clients} clients, {args.push_seconds:.0f}s")
            extra = {"gc_cpu": runner.cpu_seconds} if runner is not None and args.gc_mode != "node" else None
            t_start = time.time()
            op = image_pushes("gcpush/c", args.layer_kib * 1024, tags=args.tags)
            push = partial(run_load, server, args.image_clients, args.push_seconds, op)
            result: Result = await measured(backend, push, extra)
            t_end = time.time()
            entry: dict[str, Any] = {"images": result, "window": (t_start, t_end)}
            if runner is not None:
                say("stopping the GC loop (it finishes its cycle)")
                await runner.stop()
                if args.gc_mode == "node":
                    runner.node_cycles(server.log_path.read_text(errors="replace"))
                entry["gc"] = runner
            say("checking every tag the pushers left")
            entry["verify"] = await verify_tags(server.port, args.image_clients)
            results[key] = entry
        except Exception as exc:  # noqa: BLE001
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"failed: {type(exc).__name__}: {exc}")
            if runner is not None:
                await runner.stop(timeout=30)
        finally:
            server.stop()
            results.setdefault(key, {})["log"] = scan_log(server)
            server.keep_log(args.keep_logs, f"gc-{key}-node")
            if args.keep_logs is not None and (workdir / "gc-loop.log").exists():
                with contextlib.suppress(OSError):
                    shutil.copy(workdir / "gc-loop.log", args.keep_logs / f"gc-{key}-loop.log")
            shutil.rmtree(workdir, ignore_errors=True)
    return results


PUSH_TARGETS = [Target("no-gc", "pushes without GC", "wharf"), Target("gc", "pushes with GC looping", "wharf")]


def _overlapping(r: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The GC cycles that overlapped a run's pushes (None for the run without GC)."""
    runner: GCRunner | None = r.get("gc")
    if runner is None:
        return None
    t_start, t_end = r["window"]
    return [c for c in runner.cycles if c["end"] >= t_start and c["start"] <= t_end]


def _cycles(header: str, figure: Callable[[list[dict[str, Any]]], str]) -> Column:
    return Column(header, _overlapping, lambda cycles: "-" if cycles is None else figure(cycles))


def report_push(results: dict[str, Any], args: argparse.Namespace) -> None:
    gc_cpu = [] if args.gc_mode == "node" else [cpu("images", "GC CPU", "gc_cpu")]
    columns = [
        *image_columns("images", (*gc_cpu, cpu("images", "S3+etcd", "backend_cpu"))),
        _cycles("cycles", lambda cycles: str(len(cycles))),
        _cycles("cycle s", lambda c: f"{sum(x['end'] - x['start'] for x in c) / len(c):.1f}" if c else "-"),
        _cycles("manifests del", lambda cycles: str(sum(c.get("manifests_deleted", 0) for c in cycles))),
        _cycles("blobs del", lambda cycles: str(sum(c.get("blobs_deleted", 0) for c in cycles))),
    ]
    mode = {
        "loop": "a process running collect(delete_untagged=True) back to back",
        "cli": "`wharf gc --delete-untagged` run back to back",
        "node": "the node itself, gc.interval 1s",
    }[args.gc_mode]
    title = (
        f"GC-2. Small-image pushes through one Wharf node (S3 + etcd), {args.image_clients} concurrent, "
        f"{args.push_seconds:.0f}s, each client cycling through {args.tags} tags"
    )
    registry = (
        "a registry of its own (--push-fresh)" if args.push_fresh else "the registry of GC-1 still in it (if it ran)"
    )
    note = (
        f"GC: {mode}; grace {args.push_grace}; {registry}. srv CPU is the node's, GC included in mode 'node'."
        "\n  cycles = GC cycles that overlapped the pushes; cycle s = their mean duration; deleted = by those cycles."
    )
    ratios = {"ratio img/s": "images/s", "ratio p99": "p99 ms"}
    comparison_table(title, note, columns, ratios, results, PUSH_TARGETS, "no-gc", first="run")
    for t in PUSH_TARGETS:
        r = results.get(t.key, {})
        if (v := r.get("verify")) is not None:
            fine = f"all {v['images']} tagged images pulled back whole ({v['blobs']} blobs, digests checked)"
            print_problems(t.label, v["problems"], f"pulling back {v['images']} tagged images", fine)
        runner = r.get("gc")
        if runner is not None and runner.errors:
            for key, count in runner.errors.most_common(5):
                print(f"  GC: {count} x {key}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, backend: S3Backend, base: Path, parts: set[str]) -> dict[str, Any]:
    say = session.progress_since(time.monotonic(), width=6)
    out: dict[str, Any] = {}
    if "cycle" in parts:
        print("\n== part 1: one GC cycle at scale", flush=True)
        try:
            out["cycle"] = await part_cycle(args, backend, base, say)
        except Exception as exc:  # noqa: BLE001
            out["cycle_error"] = f"{type(exc).__name__}: {exc}"
            say(f"failed: {out['cycle_error']}")
    if "push" in parts:
        print("\n== part 2: pushes without and with GC", flush=True)
        out["push"] = await part_push(args, backend, base, say)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 manifests and 5 s of pushes: a smoke test")
    parser.add_argument("--manifests", type=int, help="images to populate (10,000; quick 1,000)")
    parser.add_argument("--blobs-per-manifest", type=int, default=5, help="blobs each image uses (5)")
    parser.add_argument("--blob-bytes", type=int, default=1024, help="size of each populated blob (1024)")
    parser.add_argument("--unreferenced", type=float, default=0.3, help="fraction of images deleted before GC (0.3)")
    parser.add_argument("--grace", default="5s", help="gc.grace for part 1 (5s); populating waits it out")
    parser.add_argument("--concurrency", type=int, default=32, help="images populated at a time (32)")
    parser.add_argument("--check-sample", type=int, default=50, help="images of each kind checked after GC (50)")
    parser.add_argument("--push-seconds", type=float, help="seconds of pushes per run (30; quick 5)")
    parser.add_argument("--image-clients", type=int, default=8)
    parser.add_argument("--layer-kib", type=int, default=4)
    parser.add_argument("--tags", type=int, default=4, help="tags each push client cycles through (4)")
    parser.add_argument("--push-grace", default="2s", help="gc.grace while pushing (2s)")
    parser.add_argument("--gc-mode", choices=["loop", "cli", "node"], default="loop")
    parser.add_argument(
        "--push-fresh", action="store_true", help="part 2 on a registry of its own, not on part 1's 10,000 images"
    )
    parser.add_argument("--wharf", default="granian-1", help="server variant: " + ", ".join(WHARF_VARIANTS))
    parser.add_argument("--only", default="cycle,push", help="parts to run: cycle, push (default both)")
    parser.add_argument("--tmpdir", help="parent directory for config files and logs (default: system temp)")
    parser.add_argument("--keep-logs", type=Path, help="copy the node's and the GC loop's logs here")
    parser.add_argument("--gc-loop", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gc_loop:
        return asyncio.run(gc_loop_main(*args.gc_loop))

    args.manifests = args.manifests or (1000 if args.quick else 10_000)
    args.push_seconds = args.push_seconds or (5.0 if args.quick else 30.0)
    if args.wharf not in WHARF_VARIANTS:
        parser.error(f"--wharf: choose from {', '.join(WHARF_VARIANTS)}")
    if not 0 <= args.unreferenced <= 1:
        parser.error("--unreferenced is a fraction between 0 and 1")
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if parts - {"cycle", "push"}:
        parser.error("--only: cycle, push")

    base = Path(tempfile.mkdtemp(prefix="wharf-bench-gc-", dir=args.tmpdir))
    backend = S3Backend()
    t0 = time.monotonic()
    context = machine_context("S3 (moto_server, in memory) + etcd (1 member) on loopback; access logs on")
    try:
        with session.cleanup() as stack:
            stack.callback(shutil.rmtree, base, ignore_errors=True)
            stack.callback(backend.close)
            print("\n".join(context), flush=True)
            print("starting moto_server and etcd ...", flush=True)
            backend.start()
            results = session.run_async(run_all(args, backend, base, parts))
    except KeyboardInterrupt:
        return session.interrupted()
    results_heading(t0, context)
    if "cycle" in results:
        report_cycle(results["cycle"], args)
    elif "cycle_error" in results:
        print(f"\nGC-1 failed: {results['cycle_error']}")
    if "push" in results:
        report_push(results["push"], args)
        report_errors(results["push"], PUSH_TARGETS)
    print(
        f"\n{cores()} cores run everything here (node, GC, etcd, moto_server, the client): GC competes with the pushes"
        "\nfor the same CPU, which a cluster with its own etcd and S3 would not. moto is a slow, in-memory S3."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
