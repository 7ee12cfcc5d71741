#!/usr/bin/env python3
"""The hot paths, Wharf beside Distribution on the same storage in one run, in rounds, with goals.

On each storage both registries run at once (filesystem: a directory of their own, Wharf on the
embedded coordinator; rgw: a root directory of their own in one Ceph RGW bucket, Wharf on etcd), get
the same seed data, then the same loads in rounds: in each round the registries take a load back to
back, in turn first, so a round's ratio compares figures taken seconds apart. A ratio is the median
of the rounds' ratios; each registry's server CPU per operation is printed beside its rate, since a
busy machine moves rates far more than CPU per operation.

  manifest GET by tag / by digest     wrk, OCI Accept header
  manifest HEAD by tag / by digest    ab -i (wrk waits for the body a HEAD announces)
  tags/list, whole (1,000 tags)       wrk
  small-image push                    config + 2 small layers + manifest, the whole client flow
  blob pull                           GETs of one large blob by a few clients (redirects followed)
  blob pull by wrk                    the same GETs by wrk, a client that is not the bottleneck (filesystem)
  resident memory                     idle, and while taking one large blob (--memory-mib), each
                                      registry alone (the others stopped, it started again on its store)

On rgw (Wharf on etcd) a third registry, Wharf with `--workers` worker processes (default: the
machine's usable cores, at least 2), takes the same loads in the same rounds, and a table says what
those workers buy over one: rate and CPU per operation, and memory idle and while taking the blob.
The embedded coordinator is for one process, so the filesystem run has no such registry.

At the end a goals table says PASS or MISS for each ratio issue 14 (and 13) asks for. Nothing here
is asserted in tests: a busy machine varies.

    python loadtests/bench_hotpaths.py [--storage filesystem,rgw] [--rounds 3] [--duration 5] [--loads ...]
                                       [--workers N (0: none)]
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
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import loads, session
from benchlib.client import MIB, Conn, Redirects
from benchlib.cpu import cores
from benchlib.images import setup_manifest, sha256_digest, upload_blob
from benchlib.report import fmt_num, machine_context, print_table
from benchlib.runner import run_load
from benchlib.s3 import RGWBackend, S3Registry
from benchlib.servers import DISTRIBUTION, Server, Target, scan_log
from benchlib.wrk import accept_script, run_ab
from rgw_server import missing_binaries

WHARF = Target("wharf", "Wharf granian x1", "wharf", "granian", 1)
BASELINE = Target("baseline", "Wharf granian x1, --baseline checkout", "wharf", "granian", 1)
TAGS = 1000


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


@dataclass
class Storage:
    name: str
    describe: str
    make: Callable[[Target, Path], Server]
    cpu: Callable[[], float] = lambda: 0.0
    close: Callable[[], None] = lambda: None


def filesystem(accesslog: bool) -> Storage:
    return Storage(
        "filesystem",
        "filesystem, a directory of its own per registry; Wharf on the embedded coordinator",
        lambda target, workdir: Server(target, workdir, accesslog),
    )


def rgw(accesslog: bool) -> Storage:
    missing = missing_binaries()
    if missing:
        raise RuntimeError(f"Ceph programs missing: {' '.join(missing)} (make deb-test installs them)")
    backend = RGWBackend().start()

    def make(target: Target, workdir: Path) -> Server:
        root = f"/bench-{target.key}-{os.urandom(3).hex()}"
        return S3Registry(target, workdir, accesslog, backend, root=root, prefix=f"/{target.key}/")

    return Storage(
        "rgw",
        "Ceph RGW (one memstore OSD), a root directory of its own per registry; Wharf on etcd (one member)",
        make,
        backend.cpu,
        backend.close,
    )


# --------------------------------------------------------------------------------------------
# Loads
# --------------------------------------------------------------------------------------------


@dataclass
class Seeded:
    manifest_digest: str = ""
    blob_digest: str = ""
    blob_len: int = 0


@dataclass
class Figure:
    """One load on one registry in one round."""

    rate: float
    ops: int
    server_cpu: float
    other_cpu: float
    errors: int = 0

    @property
    def cpu_ms(self) -> float:
        return 1e3 * self.server_cpu / max(self.ops, 1)


@dataclass
class Plan:
    duration: float
    rounds: int
    connections: int
    pull_clients: int
    image_clients: int
    blob_bytes: int
    layer_bytes: int
    memory_bytes: int
    s: loads.Settings
    workers: int = 0  # Wharf with this many workers beside Wharf with one (rgw only; 0: none)


def _figure(result: Any, rate: float, ops: int, errors: int) -> Figure:
    return Figure(rate, ops, result.server_cpu, result.other_cpu, errors)


LoadRun = Callable[[Server, Seeded, Plan, Path], Awaitable[Figure]]


def _wrk(path: Callable[[Seeded], str]) -> LoadRun:
    async def run(server: Server, seeded: Seeded, plan: Plan, workdir: Path) -> Figure:
        url = server.base + path(seeded)
        result = await loads.wrk_load(server, url, plan.s, script=accept_script(workdir), latency=False)
        return _figure(result, result.rps, result.requests, result.error_count)

    return run


def _ab(path: Callable[[Seeded], str]) -> LoadRun:
    async def run(server: Server, seeded: Seeded, plan: Plan, workdir: Path) -> Figure:
        result = await run_ab(server, server.base + path(seeded), plan.connections, plan.duration)
        return _figure(result, result.rps, result.requests, result.error_count)

    return run


async def _images(server: Server, seeded: Seeded, plan: Plan, workdir: Path) -> Figure:
    push = loads.image_pushes(f"bench/images-{time.time_ns()}", plan.layer_bytes)
    result = await run_load(server, plan.image_clients, plan.duration, push, max_ops=100_000)
    return _figure(result, result.rate, result.ops, result.error_count)


async def _pull(server: Server, seeded: Seeded, plan: Plan, workdir: Path) -> Figure:
    redirects = Redirects()
    try:
        pull = loads.blob_pull("bench/blob", seeded.blob_digest, seeded.blob_len, redirects.get)
        result = await run_load(server, plan.pull_clients, plan.duration, pull)
    finally:
        redirects.close()
    return _figure(result, result.mib_rate, result.ops, result.error_count)


async def _pull_wrk(server: Server, seeded: Seeded, plan: Plan, workdir: Path) -> Figure:
    """wrk GETs of the blob with the pull clients' connections: a client in C, so the rate is the
    server's, not the bench client's (the filesystem only: on rgw a GET is a redirect, and wrk does not
    follow it)."""
    url = f"{server.base}/v2/bench/blob/blobs/{seeded.blob_digest}"
    result = await loads.wrk_load(server, url, plan.s, connections=plan.pull_clients, latency=False)
    return _figure(result, result.mib_rate, result.requests, result.error_count)


def _manifest(by: str) -> Callable[[Seeded], str]:
    return lambda seeded: "/v2/bench/manifest/manifests/" + ("latest" if by == "tag" else seeded.manifest_digest)


@dataclass
class Load:
    key: str
    title: str
    unit: str
    run: LoadRun
    storages: tuple[str, ...] = ("filesystem", "rgw")  # where the load means something


LOADS = [
    Load("get_tag", "manifest GET by tag", "req/s", _wrk(_manifest("tag"))),
    Load("get_digest", "manifest GET by digest", "req/s", _wrk(_manifest("digest"))),
    Load("head_tag", "manifest HEAD by tag", "req/s", _ab(_manifest("tag"))),
    Load("head_digest", "manifest HEAD by digest", "req/s", _ab(_manifest("digest"))),
    Load("tags_full", f"tags/list, all {TAGS} tags", "req/s", _wrk(lambda seeded: "/v2/bench/tags/tags/list")),
    Load("images", "small-image push", "images/s", _images),
    Load("pull", "blob pull", "MiB/s", _pull),
    Load("pull_wrk", "blob pull by wrk", "MiB/s", _pull_wrk, storages=("filesystem",)),
]
TITLES = {load.key: load.title for load in LOADS}


async def seed(server: Server, plan: Plan) -> Seeded:
    conn = Conn("127.0.0.1", server.port)
    redirects = Redirects()
    try:
        manifest = await setup_manifest(conn, "bench/manifest")
        await loads.setup_tags(conn, "bench/tags", TAGS)
        _, digest = await loads.setup_blob(conn, "bench/blob", plan.blob_bytes, redirects.get)
    finally:
        conn.close()
        redirects.close()
    return Seeded(sha256_digest(manifest), digest, plan.blob_bytes)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children[ppid].append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def pss_mib(server: Server) -> float:
    """The registry's processes' proportional set size (a page several processes share counted once)."""
    assert server.proc is not None
    total = 0
    for pid in _tree(server.proc.pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    return total / MIB


async def peak_while_uploading(server: Server, size: int) -> float:
    """The most memory (PSS) the registry held while taking one `size`-byte blob in one streamed PUT."""
    piece = os.urandom(min(size, 64 * MIB))
    count = max(1, size // len(piece))
    hasher = hashlib.sha256()
    for _ in range(count):
        hasher.update(piece)
    peak = pss_mib(server)
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, pss_mib(server))
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    conn = Conn("127.0.0.1", server.port)
    try:
        await upload_blob(conn, "bench/memory", "sha256:" + hasher.hexdigest(), [piece] * count)
    finally:
        done.set()
        await sampler
        conn.close()
    return peak


async def measure_memory_alone(
    servers: dict[str, Server], storage: Storage, plan: Plan, run: Run, say: Callable[[str], None]
) -> None:
    """Each registry's memory with no other registry of the run beside it: every server is stopped,
    then each is started again alone on the store it was given (its data stays), measured idle and
    while taking one blob, and stopped. Pages that two Wharfs of one run share (the same libraries)
    would otherwise be counted half to each, and only for the one started later."""
    for server in servers.values():
        server.stop()
    loop = asyncio.get_running_loop()
    for key, server in servers.items():
        server.start()
        try:
            await loop.run_in_executor(None, server.wait_ready)
            await asyncio.sleep(1.0)  # start-up's last collection and frozen objects settle
            run.memory.setdefault(key, {})["idle"] = pss_mib(server)
            if key == "distribution" and storage.name == "rgw":
                continue  # memstore keeps the bytes in RAM either way: Wharf's figure is the one asked for
            say(f"memory: {server.target.label} alone takes a {plan.memory_bytes >> 20} MiB blob")
            run.memory[key]["upload"] = await peak_while_uploading(server, plan.memory_bytes)
        finally:
            server.stop()


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    storage: str
    describe: str
    duration: float
    figures: dict[str, dict[str, list[Figure]]] = field(default_factory=dict)  # load -> registry -> rounds
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # registry -> phase -> MiB
    workers: int = 0  # of the "workers" registry, if it ran
    failed: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def ratio(self, load: str, ours_key: str = "wharf", theirs_key: str = "distribution") -> float | None:
        rounds = self.figures.get(load, {})
        ours, theirs = rounds.get(ours_key, []), rounds.get(theirs_key, [])
        ratios = [a.rate / b.rate for a, b in zip(ours, theirs, strict=False) if b.rate > 0 and a.rate == a.rate]
        return statistics.median(ratios) if ratios else None


async def run_storage(
    storage: Storage, plan: Plan, chosen: list[Load], base: Path, keep_logs: Path | None, baseline: Path | None
) -> Run:
    run = Run(storage.name, storage.describe, plan.duration)
    run.workers = plan.workers
    servers: dict[str, Server] = {}
    seeded: dict[str, Seeded] = {}
    say = session.progress_since(time.monotonic())
    try:
        several = (
            [Target("workers", f"Wharf granian x{plan.workers}", "wharf", "granian", plan.workers)]
            if plan.workers > 1 and storage.name == "rgw"
            else []
        )
        for target in (DISTRIBUTION, WHARF, *([BASELINE] if baseline else []), *several):
            server = servers[target.key] = storage.make(target, base / storage.name / target.key)
            if baseline and target is BASELINE:
                server.code = baseline
            server.start()
            await asyncio.get_running_loop().run_in_executor(None, server.wait_ready)
            seeded[target.key] = await seed(server, plan)
            say(f"{target.label} ready on port {server.port}, seeded")
        for load in (load for load in chosen if storage.name in load.storages):
            per = run.figures.setdefault(load.key, {})
            for n in range(plan.rounds):
                order = list(servers)[n % len(servers) :] + list(servers)[: n % len(servers)]
                for key in order:
                    say(f"{load.key} round {n + 1}/{plan.rounds}: {servers[key].target.label}")
                    try:
                        figure = await load.run(servers[key], seeded[key], plan, base)
                    except Exception as exc:  # noqa: BLE001 - a figure of its own
                        figure = Figure(float("nan"), 0, 0.0, 0.0, 1)
                        run.problems.append(f"{load.key} on {key}: {type(exc).__name__}: {exc}"[:300])
                    per.setdefault(key, []).append(figure)
        if plan.memory_bytes:
            await measure_memory_alone(servers, storage, plan, run, say)
    finally:
        for key, server in servers.items():
            server.stop()
            scanned = scan_log(server)
            seen: collections.Counter[str] = collections.Counter()
            for counter in (scanned["statuses"], scanned["groups"]):
                for what, n in counter.items():
                    seen[re.sub(r"\d+", "N", what)] += n
            run.problems += [f"{key} log: {n} x {what}" for what, n in seen.items()]
            server.keep_log(keep_logs, f"{storage.name}-{key}")
        storage.close()
    return run


def _median(figures: list[Figure], attr: str) -> float | None:
    values = [getattr(f, attr) for f in figures if f.ops]
    return statistics.median(values) if values else None


def report_run(run: Run) -> None:
    headers = ["load", "registry", "rate", "CPU ms/op", "ratio", "CPU ratio", "rounds' ratios", "other CPU%"]
    rows = []
    for key, per in run.figures.items():
        unit = next(load.unit for load in LOADS if load.key == key)
        theirs = per.get("distribution", [])
        d_cpu = _median(theirs, "cpu_ms")
        for who, figures in per.items():
            cpu_ms = _median(figures, "cpu_ms")
            ratio = run.ratio(key, who) if who != "distribution" else None
            other = [100 * f.other_cpu / max(run.duration, 1e-9) for f in figures]
            rounds = [f"{w.rate / d.rate:.2f}" if d.rate else "-" for w, d in zip(figures, theirs, strict=False)]
            rows.append(
                [
                    f"{TITLES[key]} ({unit})" if who == "distribution" else "",
                    who,
                    fmt_num(_median(figures, "rate")),
                    fmt_num(cpu_ms, 3),
                    "ref" if who == "distribution" else fmt_num(ratio, 2),
                    "ref" if who == "distribution" else fmt_num(d_cpu / cpu_ms if d_cpu and cpu_ms else None, 2),
                    "" if who == "distribution" else " ".join(rounds),
                    fmt_num(statistics.median(other) if other else None),
                ]
            )
    note = (
        "rate and CPU per operation are medians of the rounds; ratio = the median of the rounds' rate ratios to "
        "Distribution; CPU ratio = Distribution's server CPU per operation / this registry's (above 1: it spends less)"
    )
    print_table(f"{run.storage}: {run.describe}", note, headers, rows)
    if run.memory:
        print("\nresident memory (PSS of every process of the registry, MiB):")
        for who, phases in run.memory.items():
            print(f"  {who:13s} " + ", ".join(f"{phase} {mib:.0f}" for phase, mib in phases.items()))


def report_workers(run: Run) -> None:
    """What several workers buy over one, in the same rounds: rate, CPU per operation, memory."""
    if "workers" not in run.memory:
        return
    rows = []
    for key, per in run.figures.items():
        if "workers" not in per or "wharf" not in per:
            continue
        unit = next(load.unit for load in LOADS if load.key == key)
        one, several = per["wharf"], per["workers"]
        rows.append(
            [
                f"{TITLES[key]} ({unit})",
                fmt_num(_median(one, "rate")),
                fmt_num(_median(several, "rate")),
                fmt_num(run.ratio(key, "workers", "wharf"), 2),
                fmt_num(_median(one, "cpu_ms"), 3),
                fmt_num(_median(several, "cpu_ms"), 3),
                str(sum(f.errors for f in one)) + " / " + str(sum(f.errors for f in several)),
            ]
        )
    for phase in ("idle", "upload"):
        one_mib, several_mib = run.memory["wharf"].get(phase), run.memory["workers"].get(phase)
        if one_mib is not None and several_mib is not None:
            rows.append([f"memory {phase} (MiB, PSS)", f"{one_mib:.0f}", f"{several_mib:.0f}", "", "", "", ""])
    headers = ["load", "1 worker", "N workers", "ratio N/1", "CPU ms/op 1", "CPU ms/op N", "errors 1 / N"]
    note = f"N = {run.workers} worker processes; ratio = the median of the rounds' rate ratios, same rounds"
    print_table(f"{run.storage}: what more workers buy", note, headers, rows)


# (storage, load, at least, source)
GOALS = [
    *(("filesystem", key, 4.0, "#14.1") for key in ("get_tag", "get_digest", "head_tag", "head_digest")),
    *(("rgw", key, 12.0, "#14.1") for key in ("get_tag", "get_digest", "head_tag", "head_digest")),
    ("filesystem", "images", 2.5, "#14.2"),
    ("rgw", "images", 3.0, "#14.2"),
    ("filesystem", "pull", 1.2, "#14.3 (#13.6: 1.0)"),
    ("filesystem", "pull_wrk", 1.2, "#14.3 (#13.6: 1.0)"),
    ("filesystem", "tags_full", 5.0, "#13.3"),
    ("rgw", "tags_full", 5.0, "#13.3"),
]
MEMORY_GOALS = [("idle", 100.0, "#13.7"), ("upload", 150.0, "#13.7")]


def report_goals(runs: list[Run]) -> None:
    """PASS or MISS per goal for this checkout's Wharf; the --baseline checkout's figure beside it."""
    rows = []
    for storage, key, least, source in GOALS:
        for run in runs:
            if run.storage == storage and key in run.figures:
                ratio = run.ratio(key)
                verdict = "MISS" if ratio is None or ratio < least else "PASS"
                before = fmt_num(run.ratio(key, "baseline"), 2) if "baseline" in run.figures[key] else ""
                rows.append([source, f"{storage}: {TITLES[key]} >= {least:g}x", fmt_num(ratio, 2), verdict, before])
    for run in runs:
        for phase, most, source in MEMORY_GOALS:
            mib = run.memory.get("wharf", {}).get(phase)
            if mib is not None:
                verdict = "PASS" if mib <= most else "MISS"
                before = run.memory.get("baseline", {}).get(phase)
                goal = f"{run.storage}: Wharf memory {phase} <= {most:.0f} MiB"
                rows.append([source, goal, f"{mib:.0f}", verdict, fmt_num(before)])
    headers = ["issue", "goal", "measured", "", "baseline"]
    print_table("Goals", "ratios are medians of the rounds' ratios", headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    loads.add_arguments(parser, blob_mib="default 64", max_push_gib="unused")
    parser.add_argument("--storage", default="filesystem", help="comma-separated: filesystem, rgw")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", help="comma-separated subset of: " + ", ".join(load.key for load in LOADS))
    parser.add_argument("--baseline", type=Path, help="another checkout of Wharf, run beside this one (before/after)")
    parser.add_argument("--memory-mib", type=int, default=1024, help="blob taken while memory is sampled (0: none)")
    parser.add_argument(
        "--workers", type=int, default=max(2, cores()), help="Wharf with this many workers beside one, on rgw (0: none)"
    )
    args = parser.parse_args(argv)
    s = loads.settings(args, blob_mib=64, max_push_gib=1.0)
    plan = Plan(
        s.duration, args.rounds, s.connections, s.pull_clients, s.image_clients, s.blob_bytes, s.layer_bytes,
        args.memory_mib * MIB, s, args.workers,
    )  # fmt: skip
    chosen = LOADS
    if args.loads:
        wanted = {k.strip() for k in args.loads.split(",")}
        chosen = [load for load in LOADS if load.key in wanted]
    for tool in ("wrk", "ab", "docker-registry"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    makers = {"filesystem": filesystem, "rgw": rgw}
    base = Path(tempfile.mkdtemp(prefix="wharf-hotpaths-", dir=args.tmpdir))
    runs: list[Run] = []
    print("\n".join(machine_context(f"{args.storage}; both registries at once; {args.rounds} rounds")), flush=True)
    print(f"load average before: {os.getloadavg()}; {cores()} cores", flush=True)
    try:
        with session.cleanup() as stack:
            stack.callback(shutil.rmtree, base, ignore_errors=True)
            for name in args.storage.split(","):
                print(f"\n== {name}", flush=True)
                storage = makers[name](s.accesslog)
                runs.append(session.run_async(run_storage(storage, plan, chosen, base, args.keep_logs, args.baseline)))
    except KeyboardInterrupt:
        return session.interrupted()
    print(f"\nload average after: {os.getloadavg()}")
    for run in runs:
        report_run(run)
        report_workers(run)
        for problem in run.problems[:20]:
            print(f"  problem: {problem}")
    report_goals(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
