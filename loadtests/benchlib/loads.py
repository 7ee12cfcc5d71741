"""The loads the benches put on a registry, and the settings they share (durations, sizes, clients)."""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from benchlib.client import MIB, Conn, Reply, Unexpected
from benchlib.cpu import cores
from benchlib.images import (
    ACCEPT,
    push_image,
    put_manifest,
    setup_manifest,
    sha256_digest,
    upload_blob,
    upload_blob_chunked,
)
from benchlib.report import (
    IMAGE_RATIOS,
    MIB_RATIOS,
    REQUEST_RATIOS,
    Column,
    comparison_table,
    image_columns,
    transfer_columns,
    wrk_columns,
)
from benchlib.runner import Figures, Front, Meter, Op, run_load
from benchlib.servers import Target
from benchlib.wrk import WrkResult, accept_script, run_wrk

F = TypeVar("F", bound=Figures)


@dataclass
class Settings:
    duration: float
    sanity_duration: float
    warmup: float
    connections: int
    wrk_threads: int
    blob_bytes: int
    pull_clients: int
    push_clients: int
    max_push_blobs: int
    image_clients: int
    layer_bytes: int
    max_images: int
    accesslog: bool


def add_arguments(parser: argparse.ArgumentParser, *, blob_mib: str, max_push_gib: str) -> None:
    """The options of the four loads; `blob_mib` and `max_push_gib` say the defaults in the help."""
    parser.add_argument("--quick", action="store_true", help="3 s loads and small caps: a smoke test of the bench")
    parser.add_argument("--duration", type=float, help="seconds per load (default 10, quick 3)")
    parser.add_argument("--blob-mib", type=int, help=f"blob size for pull and push ({blob_mib})")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections for manifest GET (50)")
    parser.add_argument("--pull-clients", type=int, default=4)
    parser.add_argument("--push-clients", type=int, default=4)
    parser.add_argument("--image-clients", type=int, default=8)
    parser.add_argument("--layer-kib", type=int, default=4, help="size of each small-image layer (4 KiB)")
    parser.add_argument(
        "--max-push-gib", type=float, help=f"cap on bytes pushed per registry in load 3 ({max_push_gib})"
    )
    parser.add_argument("--no-accesslog", action="store_true", help="disable access logs in every registry")
    parser.add_argument("--tmpdir", help="parent directory for the registries' files (default: system temp)")
    parser.add_argument("--keep-logs", type=Path, help="copy each server's log here")


def settings(args: argparse.Namespace, *, blob_mib: int, max_push_gib: float) -> Settings:
    """Settings from `add_arguments`' options; `blob_mib` and `max_push_gib` are the defaults for this run."""
    duration = args.duration or (3.0 if args.quick else 10.0)
    blob_bytes = (args.blob_mib or blob_mib) * MIB
    cap = args.max_push_gib or max_push_gib
    return Settings(
        duration=duration,
        sanity_duration=max(2.0, duration / 2),
        warmup=0.0 if args.quick else 1.0,
        connections=args.connections,
        wrk_threads=min(2, max(1, cores())),
        blob_bytes=blob_bytes,
        pull_clients=args.pull_clients,
        push_clients=args.push_clients,
        max_push_blobs=max(args.push_clients, int(cap * (1 << 30) // blob_bytes)),
        image_clients=args.image_clients,
        layer_bytes=args.layer_kib * 1024,
        max_images=100_000,
        accesslog=not args.no_accesslog,
    )


async def wrk_load(
    front: Front,
    url: str,
    s: Settings,
    *,
    duration: float | None = None,
    connections: int | None = None,
    script: Path | None = None,
    latency: bool = True,
    meters: dict[str, Meter] | None = None,
) -> WrkResult:
    """wrk on `url` with the settings' threads, connections and duration (unless given)."""
    connections = connections or s.connections
    return await run_wrk(
        front,
        url,
        threads=min(s.wrk_threads, connections),
        connections=connections,
        duration=duration or s.duration,
        script=script,
        latency=latency,
        meters=meters,
    )


async def warm_up(front: Front, url: str, s: Settings, script: Path | None = None) -> None:
    """The settings' warm-up of wrk on `url`, before the load that is measured (none with --quick)."""
    if s.warmup > 0:
        await wrk_load(front, url, s, duration=s.warmup, script=script, latency=False)


async def setup_manifest_at(port: int, repo: str) -> bytes:
    """`setup_manifest` on a connection of its own to the registry at `port`."""
    conn = Conn("127.0.0.1", port)
    try:
        return await setup_manifest(conn, repo)
    finally:
        conn.close()


def manifest_get(path: str, size: int) -> Op:
    """GET of one manifest (the OCI and Docker types in Accept), checked by its size."""

    async def get(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
        reply = await conn.request("GET", path, {"Accept": ACCEPT})
        if reply.status != 200 or reply.size != size:
            raise Unexpected("GET manifest", reply)
        return 1, reply.size

    return get


async def plain_get(conn: Conn, worker: int, path: str, discard: bool) -> tuple[Reply, int]:
    """A blob GET answered by the registry itself: (its reply, 1 request)."""
    reply = await conn.request("GET", path, discard=discard)
    if reply.status != 200:
        raise Unexpected("GET blob", reply)
    return reply, 1


# (conn, worker, path, discard the body) -> (the blob's reply, requests made): a blob GET, and
# whatever following a redirect to storage takes (`Redirects.get`).
BlobGet = Callable[[Conn, int, str, bool], Awaitable[tuple[Reply, int]]]


def blob_pull(repo: str, digest: str, size: int, get: BlobGet = plain_get) -> Op:
    """GET of one whole blob, over and over; its body is counted and dropped."""

    async def pull(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
        reply, requests = await get(conn, worker, f"/v2/{repo}/blobs/{digest}", True)
        if reply.size != size:
            raise RuntimeError(f"GET blob: {reply.size} bytes, expected {size}")
        return requests, reply.size

    return pull


def blob_push(repo: str, data: bytes) -> Op:
    """Monolithic uploads (POST, then PUT ?digest= with the body), every one a different blob.

    Each blob is `data` but its last 16 bytes, plus a 16-byte tail of its own; the hash of the shared
    part is computed once and copied, so the client spends no time hashing the body per upload.
    """
    body = memoryview(data)[:-16]
    body_hash = hashlib.sha256(body)

    async def push(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
        tail = f"{worker:04d}-{seq:010d}+".encode()
        assert len(tail) == 16
        hasher = body_hash.copy()
        hasher.update(tail)
        await upload_blob(conn, repo, "sha256:" + hasher.hexdigest(), [body, tail])
        return 2, len(body) + len(tail)

    return push


def chunked_push(repo: str, data: bytes, chunk: int) -> Op:
    """Chunked uploads: POST, PATCH after PATCH of `chunk` bytes (Content-Range), then PUT ?digest= without a body.

    Each blob is `data` but its last 16 bytes, plus a 16-byte tail of its own, as in blob_push.
    """
    body = memoryview(data)[:-16]
    body_hash = hashlib.sha256(body)

    async def push(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
        tail = f"{worker:04d}-{seq:010d}+".encode()
        hasher = body_hash.copy()
        hasher.update(tail)
        blob = bytes(body) + tail
        return await upload_blob_chunked([conn], repo, "sha256:" + hasher.hexdigest(), blob, chunk), len(blob)

    return push


def image_pushes(repo: str, layer_bytes: int, *, per_client: bool = True, tags: int = 0, tag_prefix: str = "t") -> Op:
    """Whole pushes of small images: config + 2 random layers (HEAD, POST, PUT ?digest= each) + manifest PUT.

    Into `<repo>-<client>`, tagged `<tag_prefix><seq>` (or, with `tags`, cycling through that many tags
    per client, so older images lose their tag); or, without `per_client`, all into `repo` itself,
    each under a tag of its own.
    """

    async def push(conn: Conn, worker: int, seq: int) -> tuple[int, int]:
        now = time.time_ns()
        if per_client:
            name, tag = f"{repo}-{worker}", f"{tag_prefix}{seq % tags if tags else seq}"
        else:
            name, tag = repo, f"{tag_prefix}{worker}-{seq}-{now}"
        nonce = f"{name}-{worker}-{seq}-{now}"
        return await push_image(conn, name, tag, nonce, layer_bytes, head_first=True, single_post=False), 0

    return push


async def setup_tags(conn: Conn, repo: str, tags: int) -> None:
    """One small image in `repo` under `tags` tags (t00000, t00001 ...): the tag-list loads' repository."""
    manifest = await setup_manifest(conn, repo)
    for n in range(tags):
        await put_manifest(conn, repo, f"t{n:05d}", manifest, "setup: PUT tag")


async def setup_blob(conn: Conn, repo: str, size: int, get: BlobGet = plain_get) -> tuple[bytes, str]:
    """A random blob of `size` bytes in `repo`, read back once and checked; returns it and its digest."""
    data = os.urandom(size)
    digest = sha256_digest(data)
    await upload_blob(conn, repo, digest, data)
    reply, _ = await get(conn, -1, f"/v2/{repo}/blobs/{digest}", False)
    if sha256_digest(reply.body) != digest:
        raise Unexpected("setup: GET blob returned other bytes", reply)
    return data, digest


@dataclass
class Table:
    """What a bench adds to one of the standard tables: its note, columns and ratios after the standard ones."""

    note: str = ""
    columns: list[Column] = field(default_factory=list)
    ratios: dict[str, str] = field(default_factory=dict)
    number: int = 0  # the table's number, when not the load's own (1 to 4)


def load_tables(
    results: dict[str, dict[str, Any]],
    targets: list[Target],
    s: Settings,
    tables: dict[str, Table],
    *,
    ref: str = "distribution",
    number: str = "",
    via: str = "",
    meters: Callable[[str], tuple[Column, ...]] = lambda load: (),
    after: Callable[[str], None] | None = None,
    first: str = "registry",
) -> None:
    """The tables of the four loads (`manifest_wrk`, `pull`, `push`, `images`) that `tables` names.

    `number` prefixes the tables' numbers, `via` says how a blob pull reaches the bytes, `meters`
    gives a load's columns of other processes' CPU, and `after` prints what follows a table.
    """
    mib, kib, seconds = s.blob_bytes // MIB, s.layer_bytes // 1024, f"{s.duration:.0f}s"
    standard = {
        "manifest_wrk": (
            f"{number}1. Manifest GET by tag (wrk -t{s.wrk_threads} -c{s.connections} -d{seconds} --latency, "
            "Accept via Lua)",
            wrk_columns("manifest_wrk", meters("manifest_wrk")),
            REQUEST_RATIOS,
        ),
        "pull": (
            f"{number}2. Blob pull: GET of one {mib} MiB blob{via}, {s.pull_clients} concurrent clients, {seconds}",
            transfer_columns("pull", "GETs", meters("pull")),
            MIB_RATIOS,
        ),
        "push": (
            f"{number}3. Blob push: {mib} MiB monolithic uploads (POST, PUT ?digest= + body), "
            f"{s.push_clients} concurrent, {seconds}",
            transfer_columns("push", "blobs", meters("push")),
            MIB_RATIOS,
        ),
        "images": (
            f"{number}4. Small-image pushes: config + 2 x {kib} KiB layers + manifest, {s.image_clients} concurrent, "
            + seconds,
            image_columns("images", meters("images")),
            IMAGE_RATIOS,
        ),
    }
    for n, (load, (title, columns, ratios)) in enumerate(standard.items(), 1):
        if load in tables:
            table = tables[load]
            if table.number:
                title = title.replace(f"{number}{n}.", f"{number}{table.number}.", 1)
            columns = [*columns, *table.columns]
            comparison_table(title, table.note, columns, {**ratios, **table.ratios}, results, targets, ref, first)
            if after is not None:
                after(load)


# A load to run (run_load or wrk_load with its arguments but `meters`, the CPU meters of other
# processes), and how a bench runs one: `unmeasured` gives no meters; S3 benches count the backend's
# CPU and S3 requests (benchlib.s3.measured).
Load = Callable[..., Awaitable[F]]
Measure = Callable[[Load[Any]], Awaitable[Any]]


async def unmeasured(load: Load[F]) -> F:
    return await load(meters={})


async def standard_loads(
    front: Front,
    s: Settings,
    workdir: Path,
    progress: Callable[[str], None],
    *,
    measure: Measure = unmeasured,
    get: BlobGet = plain_get,
    pull_wrk: dict[str, Any] | None = None,
    after_manifest: Callable[[Conn], Awaitable[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The four loads, one after the other, on `front`: their figures by load name.

    `manifest_wrk` and `manifest_py` (load 1, by wrk and by the bench client; then `after_manifest`'s),
    `pull` and `pull_wrk` (load 2: by the bench client, whose blob GETs go through `get`, then wrk
    with `pull_wrk`'s options), `push` (load 3) and `images` (load 4).
    """
    out: dict[str, Any] = {}
    base = f"http://127.0.0.1:{front.port}"
    setup = Conn("127.0.0.1", front.port)
    try:
        path = "/v2/bench/manifest/manifests/latest"
        manifest = await setup_manifest(setup, "bench/manifest")
        script = accept_script(workdir)
        await warm_up(front, base + path, s, script)
        progress(f"manifest GET: wrk -c{s.connections} {s.duration:.0f}s")
        out["manifest_wrk"] = await measure(partial(wrk_load, front, base + path, s, script=script))
        progress(f"manifest GET: python client -c{s.connections} {s.sanity_duration:.0f}s (client check)")
        get_manifest = manifest_get(path, len(manifest))
        out["manifest_py"] = await measure(partial(run_load, front, s.connections, s.sanity_duration, get_manifest))
        if after_manifest is not None:
            out.update(await after_manifest(setup))

        big, digest = await setup_blob(setup, "bench/blob", s.blob_bytes, get)
        progress(f"blob pull: {s.pull_clients} clients x {s.blob_bytes // MIB} MiB, {s.duration:.0f}s")
        pull = blob_pull("bench/blob", digest, len(big), get)
        out["pull"] = await measure(partial(run_load, front, s.pull_clients, s.duration, pull))
        options = {"duration": s.sanity_duration, **(pull_wrk or {})}
        progress(f"blob pull: wrk -c{options.get('connections', s.connections)} {s.sanity_duration:.0f}s")
        url = f"{base}/v2/bench/blob/blobs/{digest}"
        out["pull_wrk"] = await measure(partial(wrk_load, front, url, s, **options))

        progress(f"blob push: {s.push_clients} clients x {s.blob_bytes // MIB} MiB, {s.duration:.0f}s")
        push = blob_push("bench/push", big)
        out["push"] = await measure(
            partial(run_load, front, s.push_clients, s.duration, push, max_ops=s.max_push_blobs)
        )

        progress(f"image pushes: {s.image_clients} clients, {s.duration:.0f}s")
        images = image_pushes("bench/images", s.layer_bytes)
        out["images"] = await measure(
            partial(run_load, front, s.image_clients, s.duration, images, max_ops=s.max_images)
        )
    finally:
        setup.close()
    return out
