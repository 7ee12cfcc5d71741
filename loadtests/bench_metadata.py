"""The metadata plane's ceiling: coordinator bytes per image, live and on disk, and what an 8 GiB etcd holds.

A coordinator is filled directly (not over HTTP) with synthetic images of one shape: 8 layers and a
config blob of their own, an OCI image manifest naming them, one tag, 100 images a repository. Each
image is written as the records a push leaves: a blob record per layer, config and manifest, a link
per blob in its repository, the manifest record, the tag and its digest -> tag index entry (and
the repository's record once); and the records the storage figures' settler keeps once the push is
counted (coordinator/usage.py; leave them out with --without-usage): what its repository holds of
each of its 10 objects, and the counters of its repository (once a repository), of the namespace
and of the registry (once a store). They are written in three forms, each into a fresh store:

- `json`: the JSON records every Wharf before the compact form wrote (blob records with their
  storage key; for each object a summary and a holder record) under text keys, which a store may
  still hold and which still read;
- `compact`: the compact records (coordinator/encoding.py: varints, raw digests, media types as one
  byte, no storage key for a blob at its content address; an object one repository holds has one
  object record naming it, no summary and no holder record), still under text keys;
- `compact-keys`: what Wharf writes into a store it creates now: compact records under the compact
  key layout (coordinator/keys.py pack: each digest of a key as 33 bytes, not 71). The embedded
  coordinator keeps text keys, so this form is etcd's only.

For each it reports the live key+value bytes per image, etcd's database size in use and on disk
after compaction and defragmentation per image, how long compaction and defragmentation took, and
the projected number of such images an 8 GiB etcd (its recommended maximum) holds; and the
embedded coordinator's file per image. Nothing is asserted.

    python loadtests/bench_metadata.py                      # 200,000 images, every form (about 40 minutes)
    python loadtests/bench_metadata.py --images 20000 --backends etcd
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from benchlib.images import OCI_MANIFEST, image_manifest
from benchlib.report import fmt_num, print_table
from services import EtcdCluster

from coordinator import keys
from coordinator.embedded import EmbeddedKV
from coordinator.etcd import EtcdKV
from coordinator.kv import KV, Put
from coordinator.metadata import BlobRecord, LinkRecord, ManifestRecord, TagRecord, encode, encode_blob
from coordinator.usage import TOTAL, Holding, ScopeUsage
from node.storage import layout

LAYERS = 8
PER_REPOSITORY = 100
BATCH = 120  # puts a transaction (etcd takes 128 operations by default)
WRITERS = 8
EIGHT_GIB = 8 << 30
ETCD_QUOTA = 16 << 30
GOAL = 0.5  # at most half the bytes an image took before the compact records (issue 15)


def _digest(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def _legacy(record: object) -> bytes:
    """A record as Wharf wrote it before the compact form: its fields as JSON."""
    return json.dumps(asdict(record), separators=(",", ":")).encode()  # type: ignore[call-overload]


NAMESPACE = "bench/"


@functools.cache
def _image_bytes() -> tuple[int, int]:
    """(bytes, objects) of one image: every image has the same sizes."""
    body = image_manifest((_digest("config"), 1_500), [(_digest(f"l{i}"), 20_000_000 + i) for i in range(LAYERS)])
    return sum(20_000_000 + i for i in range(LAYERS)) + 1_500 + len(body), LAYERS + 2


def usage_puts(n: int, images: int, form: str, repo: str, objects: list[tuple[str, int, bool]]) -> list[Put]:
    """The storage figures' records of image `n` once counted: each object (digest, size, is the manifest)
    held by its one repository; its repository's counter with its first image, the namespace's and the
    registry's with the store's first (with the figures they end with)."""
    puts: list[Put] = []
    for digest, size, manifest in objects:
        holding = Holding(size, link=not manifest, manifest=manifest)
        if form == "json":
            summary = {
                "size": size,
                "repositories": 1,
                "manifests": int(manifest),
                "namespaces": {NAMESPACE: [1, int(manifest)]},
            }
            puts.append(Put(keys.usage_object(digest), _json(summary)))
            puts.append(Put(keys.usage_holder(digest, repo), _legacy(holding)))
        else:
            puts.append(Put(keys.usage_object(digest), holding.encode(repo)))
    size, count = _image_bytes()
    scopes = []
    if n % PER_REPOSITORY == 0:
        scopes.append((repo, min(PER_REPOSITORY, images - n)))
    if n == 0:
        scopes += [(NAMESPACE, images), (TOTAL, images)]
    for scope, held in scopes:
        figures = ScopeUsage(size * held, size * held, size * held, count * held, count * held, held)
        puts.append(Put(keys.usage_scope(scope), _legacy(figures) if form == "json" else figures.encode()))
    return puts


def _json(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def image_puts(n: int, form: str, now: float, images: int = 0) -> list[Put]:
    """The records one pushed image leaves (its repository's record with the first image of it), and
    with `images` (the store's number) the storage figures' records its counting leaves."""
    repo = f"bench/repository-{n // PER_REPOSITORY:05d}"
    layers = [(_digest(f"{n}/layer/{i}"), 20_000_000 + i) for i in range(LAYERS)]
    config = (_digest(f"{n}/config"), 1_500)
    body = image_manifest(config, layers)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    blob_form = _legacy if form == "json" else None  # compact and compact-keys write the same records
    small = _legacy if form == "json" else encode
    puts: list[Put] = []
    for blob, size in [*layers, config, (digest, len(body))]:
        record = BlobRecord(size, layout.blob_key(blob), now)
        value = blob_form(record) if blob_form else encode_blob(blob, record, layout.blob_key)
        puts.append(Put(keys.blob(blob), value))
    for blob, size in [*layers, config]:
        puts.append(Put(keys.link(repo, blob), small(LinkRecord(size, now))))
    manifest = ManifestRecord(digest, OCI_MANIFEST, len(body), [d for d, _ in [config, *layers]], pushed=now)
    puts.append(Put(keys.manifest(repo, digest), small(manifest)))
    tag = f"v{n % PER_REPOSITORY}"
    puts.append(Put(keys.tag(repo, tag), small(TagRecord(digest, OCI_MANIFEST, len(body), now))))
    puts.append(Put(keys.tagged(repo, digest, tag), b""))
    if n % PER_REPOSITORY == 0:
        puts.append(Put(keys.repository(repo), b"{}"))
    if images:
        objects = [(blob, size, False) for blob, size in [*layers, config]] + [(digest, len(body), True)]
        puts += usage_puts(n, images, form, repo, objects)
    return puts


def _batches(images: int, form: str, usage: bool) -> Iterator[list[Put]]:
    now = time.time()
    batch: list[Put] = []
    for n in range(images):
        batch.extend(image_puts(n, form, now, images if usage else 0))
        if len(batch) >= BATCH:
            yield batch[:BATCH]
            batch = batch[BATCH:]
    if batch:
        yield batch


@dataclass
class Figures:
    backend: str
    form: str
    images: int
    records: int
    live: int  # key + value bytes, the prefix included
    fill_seconds: float
    in_use: int = 0  # after compaction and defragmentation
    on_disk: int = 0
    on_disk_before: int = 0  # before them
    compact_seconds: float = 0.0
    defrag_seconds: float = 0.0


def stored_key_bytes(key: str, form: str) -> int:
    """What a key takes as stored: text, or the compact layout's mark and packed form."""
    return 1 + len(keys.pack(key)) if form == "compact-keys" else len(key.encode())


async def _fill(kv: KV, prefix: str, images: int, form: str, usage: bool) -> tuple[int, int, float]:
    """(records, live bytes, seconds) of filling `kv` with `images` images."""
    live = 0
    started = time.monotonic()
    batches = _batches(images, form, usage)
    done = 0

    async def writer() -> None:
        nonlocal live, done
        for batch in batches:
            live += sum(len(prefix) + stored_key_bytes(p.key, form) + len(p.value) for p in batch)
            await kv.txn([], batch)
            done += len(batch)

    await asyncio.gather(*(writer() for _ in range(WRITERS)))
    return done, live, time.monotonic() - started


async def measure_etcd(images: int, form: str, usage: bool) -> Figures:
    prefix = "/wharf/"  # the default; each run has an etcd of its own
    with EtcdCluster(1, extra_args=("--quota-backend-bytes", str(ETCD_QUOTA))) as etcd:
        layout = "compact" if form == "compact-keys" else "text"
        kv = await EtcdKV.open(etcd.endpoints, prefix=prefix, timeout=60, layout=layout)
        try:
            records, live, seconds = await _fill(kv, prefix, images, form, usage)
            figures = Figures("etcd", form, images, records, live, seconds)
            figures.on_disk_before = (await kv.space()).members[0].size
            started = time.monotonic()
            await kv.compact((await kv.txn([], [])).revision)
            figures.compact_seconds = time.monotonic() - started
            return await _defragmented(kv, figures)
        finally:
            await kv.close()


async def _defragmented(kv: KV, figures: Figures) -> Figures:
    """Defragment the store; its time and what the store then takes, in use and on disk."""
    started = time.monotonic()
    await kv.defragment()
    figures.defrag_seconds = time.monotonic() - started
    member = (await kv.space()).members[0]
    figures.in_use, figures.on_disk = member.in_use, member.size
    return figures


async def measure_embedded(images: int, form: str, usage: bool) -> Figures:
    with tempfile.TemporaryDirectory(prefix="wharf-bench-metadata-") as root:
        kv = EmbeddedKV(os.path.join(root, "coordinator.db"))
        try:
            records, live, seconds = await _fill(kv, "", images, form, usage)
            figures = Figures("embedded", form, images, records, live, seconds)
            figures.on_disk_before = (await kv.space()).members[0].size
            return await _defragmented(kv, figures)
        finally:
            await kv.close()


def _report(results: list[Figures], usage: bool) -> None:
    rows = []
    for f in results:
        per_disk = f.on_disk / f.images
        rows.append(
            [
                f"{f.backend} {f.form}",
                fmt_num(f.images),
                fmt_num(f.records / f.images, 1),
                fmt_num(f.live / f.images),
                fmt_num(f.in_use / f.images),
                fmt_num(per_disk),
                fmt_num(f.on_disk_before / f.images),
                f"{f.fill_seconds:.1f}",
                f"{f.compact_seconds:.2f}" if f.backend == "etcd" else "-",
                f"{f.defrag_seconds:.2f}",
                fmt_num(EIGHT_GIB / per_disk) if f.backend == "etcd" else "-",
            ]
        )
    print_table(
        "Coordinator bytes per image",
        f"{LAYERS} layers + config + OCI manifest + 1 tag an image, {PER_REPOSITORY} images a repository, "
        + ("with" if usage else "without")
        + " the storage figures' records; 'disk' after compaction and defragmentation",
        [
            "store, records",
            "images",
            "records",
            "live B",
            "in use B",
            "disk B",
            "disk B before",
            "fill s",
            "compact s",
            "defrag s",
            "images in 8 GiB",
        ],
        rows,
    )
    by = {(f.backend, f.form): f for f in results}
    for backend in ("etcd", "embedded"):
        before = by.get((backend, "json"))
        for form, what in (("compact", "compact records"), ("compact-keys", "compact records and keys")):
            after = by.get((backend, form))
            if before and after:
                live, disk = after.live / before.live, after.on_disk / before.on_disk
                verdict = "PASS" if live <= GOAL and disk <= GOAL else "MISS"
                print(
                    f"  {backend}: {what}: {after.live / after.images:,.0f} B live and {after.on_disk / after.images:,.0f}"
                    f" B on disk an image, before {before.live / before.images:,.0f} and "
                    f"{before.on_disk / before.images:,.0f}: {live:.0%} of the JSON records' live bytes and {disk:.0%} "
                    f"of their bytes on disk (goal: at most {GOAL:.0%} of both): {verdict}"
                )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200_000, help="images a store is filled with")
    parser.add_argument("--backends", default="etcd,embedded", help="etcd, embedded or both")
    parser.add_argument(
        "--forms", default="json,compact,compact-keys", help="json (before), compact, compact-keys (now): any of them"
    )
    parser.add_argument(
        "--without-usage", action="store_true", help="leave out the storage figures' records (the push's records alone)"
    )
    args = parser.parse_args()
    usage = not args.without_usage
    results = []
    for backend in args.backends.split(","):
        for form in args.forms.split(","):
            if backend == "embedded" and form == "compact-keys":
                continue  # the embedded coordinator keeps text keys
            measure = measure_etcd if backend == "etcd" else measure_embedded
            figures = await measure(args.images, form, usage)
            print(f"{backend} {form}: {figures}", flush=True)
            results.append(figures)
    _report(results, usage)


if __name__ == "__main__":
    asyncio.run(main())
