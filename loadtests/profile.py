#!/usr/bin/env python3
"""Profiles of Wharf's hot paths: a flame graph and a top-frames table for one operation under load.

One Wharf node (Granian, `--workers`, filesystem storage and the embedded coordinator, or Ceph RGW
and etcd with `--storage rgw`) gets the data an operation needs, then a steady load of that
operation while py-spy samples every process of the node (`--rate` Hz, `--duration` seconds). It
writes, under `--out` (loadtests/profiles/ by default):

  OP-STORAGE.svg      a flame graph (widths are samples; hover for the numbers)
  OP-STORAGE.txt      the top frames by own time and by inclusive time, the node's user and kernel
                      CPU per operation, and the load's throughput while it was sampled

Operations (`make profile OP=...`):

  manifest-get          GET /v2/<name>/manifests/<tag>       (wrk, OCI Accept header)
  manifest-get-digest   GET /v2/<name>/manifests/<digest>
  manifest-head         HEAD by tag
  manifest-head-digest  HEAD by digest
  tags-list             GET /v2/<name>/tags/list of 1,000 tags
  blob-head             HEAD /v2/<name>/blobs/<digest>
  blob-pull             GET of one 64 MiB blob, 4 clients (the bench client, bodies discarded)
  blob-push             monolithic uploads of 64 MiB blobs, 4 clients
  chunked-push          uploads of 64 MiB blobs in PATCHes of 1 MiB, 1 client (the way skopeo and containerd send)
  image-push            whole pushes of small images (config + 2 x 4 KiB layers + manifest), 8 clients

py-spy must be able to attach (root, or ptrace allowed). Samples are of Python stacks only; the
kernel's share is the `sys` figure of the table, from the node's own CPU accounting.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import loads
from benchlib.client import MIB, Conn, Redirects
from benchlib.images import ACCEPT, setup_manifest, sha256_digest
from benchlib.runner import Op, run_load
from benchlib.s3 import RGWBackend, S3Registry
from benchlib.servers import Server, Target
from benchlib.wrk import run_ab, run_wrk

HERE = Path(__file__).resolve().parent


OPERATIONS = (
    "manifest-get",
    "manifest-get-digest",
    "manifest-head",
    "manifest-head-digest",
    "tags-list",
    "blob-head",
    "blob-pull",
    "blob-push",
    "chunked-push",
    "image-push",
)


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _process_tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        rest = raw[raw.rfind(b")") + 2 :].split()
        children[int(rest[1])].append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU-seconds of `pids`, threads included."""
    user = system = 0
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        rest = raw[raw.rfind(b")") + 2 :].split()
        user += int(rest[11])
        system += int(rest[12])
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


# -- the loads --------------------------------------------------------------------------------


@dataclass
class Load:
    """What runs while py-spy samples: `run(seconds)` returns (operations, what one operation is)."""

    run: Callable[[float], Awaitable[int]]
    unit: str


def _wrk_load(server: Server, workdir: Path, path: str, method: str, connections: int) -> Load:
    script = workdir / f"{method.lower()}.lua"
    script.write_text(f'wrk.method = "{method}"\nwrk.headers["Accept"] = "{ACCEPT}"\n')

    async def run(seconds: float) -> int:
        if method == "HEAD":
            result = await run_ab(server, server.base + path, connections, seconds)
        else:
            result = await run_wrk(
                server,
                server.base + path,
                threads=2,
                connections=connections,
                duration=seconds,
                script=script,
                latency=False,
            )
        if result.error_count or result.error:
            raise RuntimeError(f"{method}: {result.error_count} errors; {result.error}")
        return result.requests

    return Load(run, "request")


def _client_load(server: Server, clients: int, op: Op, unit: str) -> Load:
    async def run(seconds: float) -> int:
        result = await run_load(server, clients, seconds, op)
        if result.errors:
            raise RuntimeError(f"load errors: {dict(result.errors.most_common(3))}")
        return result.ops

    return Load(run, unit)


async def prepare(op: str, server: Server, workdir: Path, connections: int) -> Load:
    conn = Conn("127.0.0.1", server.port)
    redirects = Redirects()
    try:
        if op.startswith("manifest-"):
            manifest = await setup_manifest(conn, "profile/manifest")
            ref = sha256_digest(manifest) if op.endswith("-digest") else "latest"
            method = "HEAD" if "-head" in op else "GET"
            return _wrk_load(server, workdir, f"/v2/profile/manifest/manifests/{ref}", method, connections)
        if op == "tags-list":
            await loads.setup_tags(conn, "profile/tags", 1000)
            return _wrk_load(server, workdir, "/v2/profile/tags/tags/list", "GET", connections)
        if op == "blob-head":
            _, digest = await loads.setup_blob(conn, "profile/blob", 4096, redirects.get)
            return _wrk_load(server, workdir, f"/v2/profile/blob/blobs/{digest}", "HEAD", connections)
        if op == "blob-pull":
            big, digest = await loads.setup_blob(conn, "profile/pull", 64 * MIB, redirects.get)
            return _client_load(
                server, 4, loads.blob_pull("profile/pull", digest, len(big), redirects.get), "64 MiB GET"
            )
        if op == "blob-push":
            return _client_load(server, 4, loads.blob_push("profile/push", os.urandom(64 * MIB)), "64 MiB upload")
        if op == "chunked-push":
            return _client_load(
                server, 1, loads.chunked_push("profile/chunked", os.urandom(64 * MIB), MIB), "64 MiB upload"
            )
        if op == "image-push":
            return _client_load(server, 8, loads.image_pushes("profile/images", 4096), "image")
    finally:
        conn.close()
    raise ValueError(f"unknown operation {op!r}; one of: {', '.join(OPERATIONS)}")


# -- reading py-spy's samples -----------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def read_collapsed(path: Path) -> collections.Counter[tuple[str, ...]]:
    """py-spy's raw output: one `frame;frame;...;leaf count` line per distinct stack."""
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _function(frame: str) -> str:
    """A frame without its line number: `func (file)`."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match.group('func')} ({match.group('file')})"


def top_frames(stacks: collections.Counter[tuple[str, ...]], limit: int = 30) -> tuple[list[str], int]:
    total = sum(stacks.values())
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for stack, count in stacks.items():
        functions = [_function(frame) for frame in stack]
        own[functions[-1]] += count
        for name in set(functions):
            inclusive[name] += count
    lines = [f"{'own %':>7}  {'incl %':>7}  function (file)"]
    for name, count in own.most_common(limit):
        lines.append(f"{100 * count / total:7.1f}  {100 * inclusive[name] / total:7.1f}  {name}")
    lines += ["", f"{'incl %':>7}  {'own %':>7}  function (file), by inclusive time"]
    for name, count in inclusive.most_common(limit):
        lines.append(f"{100 * count / total:7.1f}  {100 * own[name] / total:7.1f}  {name}")
    return lines, total


def flame_svg(stacks: collections.Counter[tuple[str, ...]], title: str) -> str:
    """A plain SVG flame graph: roots at the bottom, one box per frame, width by samples."""
    tree: dict[str, Any] = {"n": 0, "kids": {}}
    for stack, count in stacks.items():
        node = tree
        node["n"] += count
        for frame in stack:
            node = node["kids"].setdefault(frame, {"n": 0, "kids": {}})
            node["n"] += count

    def depth(node: dict[str, Any]) -> int:
        return 1 + max((depth(kid) for kid in node["kids"].values()), default=0)

    width, row = 1600.0, 17
    height = row * (depth(tree) + 2)
    total = max(tree["n"], 1)
    boxes: list[str] = []

    def draw(node: dict[str, Any], frame: str, x: float, level: int) -> None:
        w = width * node["n"] / total
        if w < 0.5:
            return
        y = height - row * (level + 1)
        if level > 0:
            hue = 20 + (hash(_function(frame)) % 40)
            label = html.escape(frame)
            text = html.escape(frame[: int(w / 7)]) if w > 30 else ""
            pct = 100 * node["n"] / total
            boxes.append(
                f"<g><title>{label} ({node['n']} samples, {pct:.2f}%)</title>"
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" fill="hsl({hue},90%,60%)"/>'
                f'<text x="{x + 3:.1f}" y="{y + row - 5}">{text}</text></g>'
            )
        kid_x = x
        for name, kid in sorted(node["kids"].items()):
            draw(kid, name, kid_x, level + 1)
            kid_x += width * kid["n"] / total

    draw(tree, "all", 0.0, 0)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'font-family="monospace" font-size="11">'
        f'<text x="4" y="14" font-size="13">{html.escape(title)}</text>' + "".join(boxes) + "</svg>\n"
    )


# -- the run ------------------------------------------------------------------------------


async def profile(args: argparse.Namespace) -> int:
    spy = _py_spy()
    if spy is None:
        print("profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="wharf-profile-"))
    name = f"{args.op}-{args.storage}"
    backend = None
    server: Server | None = None
    try:
        target = Target("wharf", f"Wharf granian x{args.workers}", "wharf", "granian", args.workers)
        if args.storage == "rgw":
            backend = RGWBackend().start()
            server = S3Registry(
                target, base / "wharf", not args.no_accesslog, backend, root="/profile", prefix="/profile/"
            )
        else:
            server = Server(target, base / "wharf", not args.no_accesslog)
        server.start()
        await asyncio.get_running_loop().run_in_executor(None, server.wait_ready)
        assert server.proc is not None
        load = await prepare(args.op, server, base, args.connections)
        await load.run(args.warmup)
        pids = _process_tree(server.proc.pid)
        raw = base / "samples.txt"
        spy_argv = [spy, "record", "--pid", str(server.proc.pid), "--subprocesses", "--format", "raw"]
        spy_argv += ["--rate", str(args.rate), "--duration", str(int(args.duration)), "--output", str(raw)]
        spy_argv += ["--nonblocking"] if args.nonblocking else []
        spy_argv += [] if args.all_threads else ["--gil"]
        spy_argv += ["--native"] if args.native else []
        if args.strace:
            return await _count_syscalls(load, pids, args, name, out)
        before = _cpu_split(pids)
        started = time.monotonic()
        sampler = subprocess.Popen(spy_argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await asyncio.sleep(0.5)  # py-spy attaches
        ops = await load.run(args.duration - 1.0)
        spent = time.monotonic() - started
        after = _cpu_split(pids)
        _, errors = sampler.communicate(timeout=args.duration + 60)
        if sampler.returncode != 0 or not raw.exists():
            print(f"profile: py-spy failed: {errors.decode(errors='replace')[-800:]}", file=sys.stderr)
            return 1
        stacks = read_collapsed(raw)
        lines, total = top_frames(stacks, args.top)
        user, system = after[0] - before[0], after[1] - before[1]
        per = 1e3 / max(ops, 1)
        head = [
            f"{name}: {args.op} on {args.storage}, Wharf granian x{args.workers}, "
            f"access log {'off' if args.no_accesslog else 'on'}",
            f"load: {ops} x {load.unit} in {spent:.1f} s ({ops / spent:,.0f}/s while sampled, py-spy attached)",
            f"node CPU: user {user:.2f} s + kernel {system:.2f} s = {user + system:.2f} s "
            f"({100 * system / max(user + system, 1e-9):.0f}% in the kernel); "
            f"{(user + system) * per:.3f} ms of CPU per {load.unit}",
            f"samples: {total} at {args.rate} Hz over every process of the node",
            "",
        ]
        (out / f"{name}.txt").write_text("\n".join(head + lines) + "\n")
        (out / f"{name}.svg").write_text(flame_svg(stacks, head[0] + " - " + head[2]))
        if args.keep_raw:
            shutil.copy(raw, out / f"{name}.collapsed")
        print("\n".join(head + lines[: args.top + 1]))
        print(f"\nwritten: {out / (name + '.svg')}, {out / (name + '.txt')}")
        return 0
    finally:
        if server is not None:
            server.stop()
        if backend is not None:
            backend.close()
        shutil.rmtree(base, ignore_errors=True)


async def _count_syscalls(load: Load, pids: list[int], args: argparse.Namespace, name: str, out: Path) -> int:
    """The node's system calls during the load (strace -c -f), per operation: the kernel side of a path."""
    if shutil.which("strace") is None:
        print("profile: strace is not installed", file=sys.stderr)
        return 2
    argv = ["strace", "-c", "-f", "-q"]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    await asyncio.sleep(1.0)  # strace attaches to every thread
    ops = await load.run(args.duration)
    tracer.send_signal(2)
    _, report = tracer.communicate(timeout=60)
    lines = [f"{name}: system calls of the node during {ops} x {load.unit} (strace -c -f; calls per operation added)"]
    for line in report.decode(errors="replace").splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit():
            lines.append(f"{line}   {int(fields[3]) / max(ops, 1):10.2f}/op")
        else:
            lines.append(line)
    (out / f"{name}.syscalls.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", choices=OPERATIONS)
    parser.add_argument("--storage", choices=("filesystem", "rgw"), default="filesystem")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds sampled (15)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rate", type=int, default=200, help="samples per second (200)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--nonblocking", action="store_true", help="py-spy samples without pausing the node")
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample threads that wait too (default: only the one holding the GIL)",
    )
    parser.add_argument("--native", action="store_true", help="native frames too (slows the node several-fold)")
    parser.add_argument("--strace", action="store_true", help="count system calls (strace -c) instead of sampling")
    parser.add_argument("--no-accesslog", action="store_true")
    parser.add_argument("--keep-raw", action="store_true", help="also keep py-spy's collapsed stacks")
    parser.add_argument("--out", default=str(HERE / "profiles"))
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(profile(args))
    return asyncio.run(profile(args))


if __name__ == "__main__":
    sys.exit(main())
