"""Registry records in their compact form, and stores whose records an earlier Wharf wrote as JSON."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import pytest
from inprocess import InProcessRegistry
from oci_client import OCI_MANIFEST, digest_of
from usage_before import earlier_form

from coordinator import encoding, keys
from coordinator.gc import Collector
from coordinator.kv import KeyValue
from coordinator.metadata import (
    BlobRecord,
    LinkRecord,
    ManifestRecord,
    TagRecord,
    TouchRecord,
    decode,
    decode_blob,
    encode,
    encode_blob,
)
from coordinator.usage import Holding, ScopeUsage
from node.storage import layout
from node.usage import FigureKeeper

D = "sha256:" + "ab" * 32
E = "sha256:" + "cd" * 32
ANY = {"Accept": "*/*"}


def _legacy(record: object) -> bytes:
    """A record exactly as Wharf wrote every record before the compact form."""
    return json.dumps(asdict(record), separators=(",", ":")).encode()  # type: ignore[call-overload]


# -- the bytes an earlier Wharf wrote ---------------------------------------------------------------


def test_json_records_an_earlier_wharf_wrote_still_decode():
    blob = (
        b'{"size":10,"key":"docker/registry/v2/blobs/sha256/ab/' + b"ab" * 32 + b'/data",'
        b'"created":1712345678.123456,"imported":null,"corrupt":false}'
    )
    assert decode(BlobRecord, blob) == BlobRecord(10, layout.blob_key(D), 1712345678.123456)
    assert decode_blob(D, blob, layout.blob_key) == BlobRecord(10, layout.blob_key(D), 1712345678.123456)
    # Older still: before scrubs marked records corrupt.
    assert decode(BlobRecord, b'{"size":1,"key":"k","created":2.5,"imported":"used"}') == BlobRecord(
        1, "k", 2.5, "used"
    )
    assert decode(LinkRecord, b'{"size":5,"linked":3.25}') == LinkRecord(5, 3.25)
    assert decode(LinkRecord, b'{"size":5,"linked":3.25,"corrupt":true}') == LinkRecord(5, 3.25, True)
    tag = b'{"digest":"' + D.encode() + b'","media_type":"' + OCI_MANIFEST.encode() + b'","size":99,"pushed":7.5}'
    assert decode(TagRecord, tag) == TagRecord(D, OCI_MANIFEST, 99, 7.5)
    manifest = (
        b'{"digest":"' + D.encode() + b'","media_type":"' + OCI_MANIFEST.encode() + b'","size":300,'
        b'"blobs":["' + E.encode() + b'"],"manifests":[],"subject":null,"artifact_type":null,'
        b'"annotations":null,"pushed":1.5}'
    )
    assert decode(ManifestRecord, manifest) == ManifestRecord(D, OCI_MANIFEST, 300, [E], pushed=1.5)
    assert decode(TouchRecord, b'{"at":4.0}') == TouchRecord(4.0)


def test_a_field_a_later_version_adds_does_not_stop_a_record_reading():
    assert decode(LinkRecord, b'{"size":5,"linked":3.0,"region":"eu"}') == LinkRecord(5, 3.0)


# -- the compact form -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        TagRecord(D, OCI_MANIFEST, 1234, 1712345678.123),
        TagRecord("sha512:" + "0f" * 64, "application/x.unheard.of+json", 0, 0.0),
        TagRecord("sha256:" + "AB" * 32, "", 2**40, 1.0),  # upper-case hex is kept as text, not normalised
        LinkRecord(2**35, 1712345678.5),
        LinkRecord(0, 0.0, corrupt=True),
        TouchRecord(1712345678.25),
        ManifestRecord(D, OCI_MANIFEST, 900, [E] * 9, pushed=1712345678.001),
        ManifestRecord(
            D,
            "application/vnd.oci.image.index.v1+json",
            5,
            [],
            [E, "other:thing"],
            subject=E,
            artifact_type="application/x.sbom+json",
            annotations={"org.opencontainers.image.created": "2024", "naïve": "ünïcode ✓"},
            annotations_in_manifest=True,
        ),
    ],
)
def test_every_record_reads_back_as_written(record):
    raw = encode(record)
    assert encoding.is_compact(raw)
    assert decode(type(record), raw) == record


@pytest.mark.parametrize(
    "record",
    [
        ManifestRecord(D, OCI_MANIFEST, 900, [E] * 9, pushed=1712345678.001),
        ManifestRecord("other:digest", "application/x.unheard.of+json", 5, [], [E], subject=E, annotations={"a": "b"}),
        ManifestRecord("sha512:" + "0f" * 64, "", 0, []),
    ],
)
def test_a_pull_by_digest_reads_a_manifest_records_media_type_alone(record):
    """A GET or HEAD by digest decodes only the media type: the same as the whole record's, in either form."""
    assert encoding.manifest_media_type(encode(record)) == record.media_type
    assert encoding.manifest_media_type(_legacy(record)) == record.media_type
    with pytest.raises(encoding.RecordError):
        encoding.manifest_media_type(encode(TagRecord(D, OCI_MANIFEST, 1, 1.0)))
    with pytest.raises(encoding.RecordError):
        encoding.manifest_media_type(encode(record)[:3])


@pytest.mark.parametrize(
    "record",
    [
        BlobRecord(10, layout.blob_key(D), 1712345678.125),
        BlobRecord(10, "docker/registry/v2/repositories/a/_uploads/u1/data", 1.0, "used"),
        BlobRecord(10, layout.blob_key(D), 1.0, "unused", corrupt=True),
        BlobRecord(10, layout.blob_key(D), 1.0, "something else"),
    ],
)
def test_blob_records_read_back_as_written(record):
    raw = encode_blob(D, record, layout.blob_key)
    assert decode_blob(D, raw, layout.blob_key) == record


def test_a_blob_at_its_content_address_stores_no_key():
    at_address = encode_blob(D, BlobRecord(30_000_000, layout.blob_key(D), 1712345678.0), layout.blob_key)
    elsewhere = encode_blob(D, BlobRecord(30_000_000, "somewhere/else/data", 1712345678.0), layout.blob_key)
    assert len(at_address) <= 12
    assert b"somewhere/else/data" in elsewhere
    assert layout.blob_key(D).encode() not in at_address
    # Without knowing the content address, nothing can be left out, and nothing is guessed when reading.
    assert layout.blob_key(D).encode() in encode_blob(D, BlobRecord(1, layout.blob_key(D), 1.0), None)
    with pytest.raises(encoding.RecordError):
        decode_blob(D, at_address, None)
    with pytest.raises(encoding.RecordError):
        decode(BlobRecord, at_address)


def test_a_record_of_another_kind_or_cut_short_is_refused_not_misread():
    raw = encode(TagRecord(D, OCI_MANIFEST, 1, 1.0))
    with pytest.raises(encoding.RecordError):
        decode(LinkRecord, raw)
    with pytest.raises(encoding.RecordError):
        decode(TagRecord, raw[:-1])
    with pytest.raises(encoding.RecordError):
        decode(TagRecord, raw + b"\0")


def test_an_eight_layer_image_takes_under_half_the_value_bytes_it_took_as_json():
    layers = [digest_of(os.urandom(8)) for _ in range(9)]
    manifest = ManifestRecord(D, OCI_MANIFEST, 1600, layers, pushed=1712345678.123456)
    tag = TagRecord(D, OCI_MANIFEST, 1600, 1712345678.123456)
    blobs = [(d, BlobRecord(30_000_000, layout.blob_key(d), 1712345678.123456)) for d in [*layers, D]]
    links = [LinkRecord(30_000_000, 1712345678.123456) for _ in layers]
    before = sum(len(_legacy(r)) for r in [manifest, tag, *links]) + sum(len(_legacy(b)) for _, b in blobs)
    after = sum(len(encode(r)) for r in [manifest, tag, *links])
    after += sum(len(encode_blob(d, b, layout.blob_key)) for d, b in blobs)
    assert after * 4 < before, (after, before)


def test_storage_figures_records_read_back_as_written_and_their_earlier_json_still_reads():
    for holding in (Holding(0), Holding(2**40, link=True), Holding(7, link=True, manifest=True)):
        assert Holding.decode(holding.encode()) == holding
        assert Holding.decode(holding.encode("team/ünïcode/app")) == holding
        assert Holding.decode(_legacy(holding)) == holding
    figures = ScopeUsage(2**41, 2**33, 5, 3, 1, 2)
    assert ScopeUsage.decode(figures.encode()) == figures and len(figures.encode()) <= 16
    assert ScopeUsage.decode(_legacy(figures)) == figures
    assert ScopeUsage.decode(b'{"linked":1,"unique":1,"exclusive":1,"objects":1,"exclusive_objects":1,"manifests":0}')
    assert ScopeUsage.decode(ScopeUsage(linked=-1).encode()) == ScopeUsage(linked=-1)  # kept, not refused
    with pytest.raises(encoding.RecordError):
        ScopeUsage.decode(Holding(1).encode())


# -- a store an earlier Wharf wrote -------------------------------------------------------------------


async def _as_written_before(reg: InProcessRegistry) -> int:
    """Rewrite every blob, link, manifest, tag and touch record into the JSON an earlier Wharf wrote."""
    rewritten = 0
    for prefix, cls in (
        (keys.LINKS, LinkRecord),
        (keys.MANIFESTS, ManifestRecord),
        (keys.TAGS, TagRecord),
        (keys.TOUCHES, TouchRecord),
        (keys.BLOBS, BlobRecord),
    ):
        for kv in await reg.kv.range(prefix):
            if cls is BlobRecord:
                record: object = decode_blob(kv.key[len(keys.BLOBS) :], kv.value, layout.blob_key)
            else:
                record = decode(cls, kv.value)
            await reg.kv.put(kv.key, _legacy(record))
            rewritten += 1
    return rewritten


async def _image(reg: InProcessRegistry, repo: str, tag: str, layers: list[bytes]) -> str:
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": [digest_of(x) for x in layers]}).encode()
    descs = [
        {"mediaType": "application/octet-stream", "digest": await reg.blob(repo, blob), "size": len(blob)}
        for blob in [config, *layers]
    ]
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {**descs[0], "mediaType": "application/vnd.oci.image.config.v1+json"},
        "layers": descs[1:],
    }
    return (await reg.put_manifest(repo, tag, doc))[0]


async def test_a_store_an_earlier_wharf_wrote_serves_pushes_deletes_and_collects(tmp_path):
    reg = InProcessRegistry(tmp_path)
    try:
        shared, old_only = os.urandom(5000), os.urandom(4000)
        old = await _image(reg, "team/app", "v1", [shared, old_only])
        assert (await reg.http.head(f"/v2/team/app/blobs/{digest_of(shared)}")).status_code == 200  # a touch
        assert await _as_written_before(reg) >= 8
        reg.services.manifests = type(reg.services.manifests)(reg.services.metrics)  # nothing remembered

        pulled = await reg.http.get("/v2/team/app/manifests/v1", headers=ANY)
        assert pulled.status_code == 200 and pulled.headers["docker-content-digest"] == old
        for layer in (shared, old_only):
            got = await reg.http.get(f"/v2/team/app/blobs/{digest_of(layer)}")
            assert got.status_code == 200 and got.content == layer
        assert (await reg.http.get("/v2/team/app/tags/list")).json()["tags"] == ["v1"]

        # A new image on an old layer: its link and blob record are the earlier Wharf's.
        mounted = await reg.http.post(
            "/v2/other/app/blobs/uploads/", params={"mount": digest_of(shared), "from": "team/app"}
        )
        assert mounted.status_code == 201
        assert (await reg.http.get(f"/v2/other/app/blobs/{digest_of(shared)}")).content == shared
        new = await _image(reg, "team/app", "v2", [shared, os.urandom(3000)])
        assert (await reg.http.get("/v2/team/app/manifests/v2", headers=ANY)).headers["docker-content-digest"] == new

        # Deleting the old image lets collection take what only it used, and nothing else.
        assert (await reg.http.delete(f"/v2/team/app/manifests/{old}")).status_code == 202
        summary = await Collector(reg.kv, grace=0, address=reg.services.metadata.address).run(
            reg.services.storage.delete
        )
        assert summary.blobs_deleted >= 2  # the old manifest's bytes, its own layer (and config)
        assert (await reg.http.head(f"/v2/team/app/blobs/{digest_of(old_only)}")).status_code == 404
        assert (await reg.http.get(f"/v2/team/app/blobs/{digest_of(shared)}")).content == shared
        assert (await reg.http.get("/v2/team/app/manifests/v2", headers=ANY)).status_code == 200
    finally:
        await reg.close()


async def test_records_written_now_are_compact_and_carry_no_content_address(tmp_path):
    reg = InProcessRegistry(tmp_path)
    try:
        layer = os.urandom(1000)
        await _image(reg, "team/app", "v1", [layer])
        found = await reg.kv.range("")
        records = [kv for kv in found if kv.key.startswith((keys.BLOBS, keys.LINKS, keys.MANIFESTS, keys.TAGS))]
        assert len(records) == 7  # config and layer: blob and link each; the manifest: blob record, record, tag
        assert len([kv for kv in records if kv.key.startswith(keys.TAGS)]) == 1
        for kv in records:
            assert encoding.is_compact(kv.value), kv.key
            assert b"docker/registry" not in kv.value, kv.key
    finally:
        await reg.close()


# -- bytes per image ----------------------------------------------------------------------------------

# What etcd adds to every record it stores, beside its key and value: the revision it is filed under
# (17 bytes), bbolt's leaf entry (16) and the protobuf fields of its KeyValue (about 12).
ETCD_RECORD_OVERHEAD = 45
ETCD_PREFIX = "/wharf/"


def _earlier_json(key: str, raw: bytes) -> bytes:
    """A record of the image as every Wharf before the compact records wrote it."""
    for prefix, cls in ((keys.LINKS, LinkRecord), (keys.MANIFESTS, ManifestRecord), (keys.TAGS, TagRecord)):
        if key.startswith(prefix):
            return _legacy(decode(cls, raw))
    if key.startswith(keys.BLOBS):
        return _legacy(decode_blob(key[len(keys.BLOBS) :], raw, layout.blob_key))
    return raw  # the digest -> tag index entry and the repository's record


def _stored_now(kv: KeyValue) -> int:
    """What etcd stores of a record for a store created now: its key in the compact layout, its value."""
    return len(ETCD_PREFIX) + len(keys.COMPACT_LAYOUT + keys.pack(kv.key)) + len(kv.value)


def _json(fields: dict) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


async def _settled(reg: InProcessRegistry) -> None:
    """Run the leader's storage figures job until every change is counted (bounded in time)."""
    keeper = FigureKeeper(reg.services)
    deadline = time.monotonic() + 30
    while not await reg.services.usage.current():
        assert time.monotonic() < deadline, "the push's storage figures did not settle"
        await keeper.count()


async def test_an_eight_layer_image_takes_at_most_half_its_earlier_bytes_in_etcd(tmp_path):
    """The records one pushed image leaves, once its storage figures are counted too, as etcd stores them
    for a store created now (compact records, compact keys) and as they were before (JSON records, text
    keys): the goal is half, live and on disk."""
    reg = InProcessRegistry(tmp_path)
    try:
        layers = [bytes([n]) * (20_000 + n) for n in range(8)]
        await _image(reg, "bench/repository-00000", "v1", layers)
        await _settled(reg)
        everything = await reg.kv.range("")
        families = (keys.BLOBS, keys.LINKS, keys.MANIFESTS, keys.TAGS, keys.TAGGED, keys.REPOSITORIES)
        records = [kv for kv in everything if kv.key.startswith(families)]
        assert len(records) == 23  # 10 blob records, 9 links, the manifest, its tag and index entry, the repository
        now = sum(_stored_now(kv) for kv in records)
        before = sum(len(ETCD_PREFIX) + len(kv.key) + len(_earlier_json(kv.key, kv.value)) for kv in records)
        overhead = ETCD_RECORD_OVERHEAD * len(records)
        # About 34% and 44% now; `make bench-metadata` measures 33% and 40% in a filled etcd.
        assert now <= 0.5 * before, (now, before)
        assert now + overhead <= 0.47 * (before + overhead), (now + overhead, before + overhead)

        # With what the storage figures' settler then keeps (the store's one "counted whole" note aside):
        # an object record for each of the 10 objects, counters for the repository, its namespace, the total.
        usage = [kv for kv in everything if kv.key.startswith(keys.USAGE) and kv.key != keys.USAGE_BUILT]
        assert not [kv for kv in usage if kv.key.startswith(keys.USAGE_MARKS)], "settled"
        earlier = await earlier_form(reg.kv, usage)
        assert len(earlier) == 23  # then: 10 summaries, 10 holder records, 3 counters
        whole_now = now + sum(_stored_now(kv) for kv in usage)
        whole_before = before + sum(len(ETCD_PREFIX) + len(key) + len(value) for key, value in earlier)
        overhead_now = ETCD_RECORD_OVERHEAD * (len(records) + len(usage))
        overhead_before = ETCD_RECORD_OVERHEAD * (len(records) + len(earlier))
        # About 31% and 40% now (2,839 of 9,184 bytes live); the JSON figures of earlier versions made it 52% and 61%.
        assert whole_now <= 0.5 * whole_before, (whole_now, whole_before)
        assert whole_now + overhead_now <= 0.5 * (whole_before + overhead_before), (
            whole_now + overhead_now,
            whole_before + overhead_before,
        )
    finally:
        await reg.close()


def test_a_record_with_fields_a_later_version_added_still_reads():
    fields = {"digest": "sha256:" + "a" * 64, "media_type": OCI_MANIFEST, "size": 12, "pushed": 1.5}
    assert decode(TagRecord, json.dumps(fields).encode()) == TagRecord(**fields)
    later = decode(TagRecord, json.dumps({**fields, "signed_by": "someone"}).encode())
    assert later == TagRecord(**fields)
