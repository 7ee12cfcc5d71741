"""The compact byte form of the registry's most numerous records, and the JSON form before it.

Blob, link, manifest, tag and touch records are most of a coordinator's bytes, with the storage
figures' records beside them (coordinator/usage.py: what each repository holds of each object, and
the counters), and every byte is paid again by etcd on disk and in every snapshot. Their compact form starts with one byte naming
the record's kind (below 0x20, so never the `{` that begins the JSON earlier Wharf versions wrote):
both forms read, whichever a store holds. Inside, numbers are varints, times whole milliseconds,
digests their algorithm's number and raw bytes, and well-known media types one byte. Nothing that
can be derived is stored: a blob's storage key only when it is not the digest's content address.

The tables below are append-only: a number once given means that string for ever.
"""

from __future__ import annotations

import json
from typing import Any

BLOB, LINK, MANIFEST, TAG, TOUCH = 0x01, 0x02, 0x03, 0x04, 0x05
# The storage figures' records: a holding, an object held by one repository (the holding and its
# repository's name), an object's summary, and a scope's counter.
HOLDING, SOLE_HOLDING, USAGE_SUMMARY, SCOPE_USAGE = 0x06, 0x07, 0x08, 0x09
KINDS = {
    BLOB: "blob",
    LINK: "link",
    MANIFEST: "manifest",
    TAG: "tag",
    TOUCH: "touch",
    HOLDING: "holding",
    SOLE_HOLDING: "sole holding",
    USAGE_SUMMARY: "usage summary",
    SCOPE_USAGE: "scope usage",
}

# Digest algorithms stored as raw bytes: number -> (name, bytes). 0: the digest as text follows.
_ALGORITHMS = {1: ("sha256", 32), 2: ("sha512", 64)}
_ALGORITHM_NUMBERS = {name: (number, length) for number, (name, length) in _ALGORITHMS.items()}

# Media types (and artifact types) stored as one byte. 0: the string follows.
_MEDIA_TYPES = (
    "",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.empty.v1+json",
    "application/vnd.dev.cosign.artifact.sig.v1+json",
    "application/vnd.dev.sigstore.bundle.v0.3+json",
    "application/vnd.in-toto+json",
    "application/spdx+json",
    "application/vnd.cyclonedx+json",
    "application/vnd.cncf.helm.config.v1+json",
)
_MEDIA_NUMBERS = {name: number for number, name in enumerate(_MEDIA_TYPES) if number}

# Flags of a blob record.
_BLOB_KEY, _BLOB_USED, _BLOB_UNUSED, _BLOB_CORRUPT, _BLOB_IMPORTED_OTHER = 1, 2, 4, 8, 16
# Flags of a manifest record.
_HAS_SUBJECT, _HAS_ARTIFACT_TYPE, _HAS_ANNOTATIONS, _ANNOTATIONS_IN_MANIFEST = 1, 2, 4, 8
# Flags of a holding.
_HELD_LINK, _HELD_MANIFEST = 1, 2


class RecordError(ValueError):
    """Bytes that are neither a compact record of the expected kind nor JSON."""


def is_compact(raw: bytes) -> bool:
    return bool(raw) and raw[0] < 0x20


def legacy(raw: bytes) -> dict[str, Any]:
    """The fields of a record in the JSON form (every record before the compact form)."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise RecordError("a JSON record must be an object")
    return data


# -- writing ------------------------------------------------------------------------------------


class _Out:
    def __init__(self, kind: int) -> None:
        self.buf = bytearray((kind,))

    def byte(self, value: int) -> None:
        self.buf.append(value)

    def varint(self, value: int) -> None:
        if value < 0:
            raise RecordError(f"a record number cannot be negative: {value}")
        while value >= 0x80:
            self.buf.append((value & 0x7F) | 0x80)
            value >>= 7
        self.buf.append(value)

    def text(self, value: str) -> None:
        raw = value.encode("utf-8", "surrogatepass")
        self.varint(len(raw))
        self.buf += raw

    def millis(self, seconds: float) -> None:
        self.varint(max(round(seconds * 1000), 0))

    def digest(self, value: str) -> None:
        algorithm, _, hexdigits = value.partition(":")
        known = _ALGORITHM_NUMBERS.get(algorithm)
        if known is not None and len(hexdigits) == 2 * known[1]:
            try:
                raw = bytes.fromhex(hexdigits)
            except ValueError:
                raw = b""
            # Only a digest that reads back as the same text is stored as bytes.
            if raw and raw.hex() == hexdigits:
                self.byte(known[0])
                self.buf += raw
                return
        self.byte(0)
        self.text(value)

    def media(self, value: str) -> None:
        number = _MEDIA_NUMBERS.get(value)
        if number is not None:
            self.byte(number)
        else:
            self.byte(0)
            self.text(value)


# -- reading ------------------------------------------------------------------------------------


class _In:
    def __init__(self, raw: bytes, kind: int) -> None:
        if not raw or raw[0] != kind:
            found = KINDS.get(raw[0], f"0x{raw[0]:02x}") if raw else "nothing"
            raise RecordError(f"expected a compact {KINDS[kind]} record, found {found}")
        self.raw = raw
        self.at = 1

    def byte(self) -> int:
        if self.at >= len(self.raw):
            raise RecordError("a compact record ends early")
        value = self.raw[self.at]
        self.at += 1
        return value

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            part = self.byte()
            value |= (part & 0x7F) << shift
            if part < 0x80:
                return value
            shift += 7

    def take(self, length: int) -> bytes:
        if self.at + length > len(self.raw):
            raise RecordError("a compact record ends early")
        part = self.raw[self.at : self.at + length]
        self.at += length
        return part

    def text(self) -> str:
        return self.take(self.varint()).decode("utf-8", "surrogatepass")

    def millis(self) -> float:
        return self.varint() / 1000

    def digest(self) -> str:
        number = self.byte()
        if number == 0:
            return self.text()
        try:
            name, length = _ALGORITHMS[number]
        except KeyError:
            raise RecordError(f"unknown digest algorithm number {number}") from None
        return f"{name}:{self.take(length).hex()}"

    def media(self) -> str:
        number = self.byte()
        if number == 0:
            return self.text()
        if number >= len(_MEDIA_TYPES):
            raise RecordError(f"unknown media type number {number}")
        return _MEDIA_TYPES[number]

    def end(self) -> None:
        if self.at != len(self.raw):
            raise RecordError("a compact record has bytes after its end")


# -- the records ----------------------------------------------------------------------------------


def pack_blob(size: int, created: float, key: str | None, imported: str | None, corrupt: bool) -> bytes:
    """`key` None: the bytes are at the digest's content address (the key is not stored)."""
    flags = _BLOB_CORRUPT if corrupt else 0
    if key is not None:
        flags |= _BLOB_KEY
    if imported == "used":
        flags |= _BLOB_USED
    elif imported == "unused":
        flags |= _BLOB_UNUSED
    elif imported is not None:
        flags |= _BLOB_IMPORTED_OTHER
    out = _Out(BLOB)
    out.byte(flags)
    out.varint(size)
    out.millis(created)
    if key is not None:
        out.text(key)
    if flags & _BLOB_IMPORTED_OTHER:
        assert imported is not None
        out.text(imported)
    return bytes(out.buf)


def unpack_blob(raw: bytes) -> dict[str, Any]:
    """The fields of a blob record; "key" is None when the bytes are at the content address."""
    if not is_compact(raw):
        return legacy(raw)
    src = _In(raw, BLOB)
    flags = src.byte()
    fields: dict[str, Any] = {"size": src.varint(), "created": src.millis()}
    fields["key"] = src.text() if flags & _BLOB_KEY else None
    if flags & _BLOB_USED:
        fields["imported"] = "used"
    elif flags & _BLOB_UNUSED:
        fields["imported"] = "unused"
    elif flags & _BLOB_IMPORTED_OTHER:
        fields["imported"] = src.text()
    else:
        fields["imported"] = None
    fields["corrupt"] = bool(flags & _BLOB_CORRUPT)
    src.end()
    return fields


def pack_link(size: int, linked: float, corrupt: bool) -> bytes:
    out = _Out(LINK)
    out.byte(1 if corrupt else 0)
    out.varint(size)
    out.millis(linked)
    return bytes(out.buf)


def unpack_link(raw: bytes) -> dict[str, Any]:
    if not is_compact(raw):
        return legacy(raw)
    src = _In(raw, LINK)
    corrupt = bool(src.byte() & 1)
    fields = {"size": src.varint(), "linked": src.millis(), "corrupt": corrupt}
    src.end()
    return fields


def pack_tag(digest: str, media_type: str, size: int, pushed: float) -> bytes:
    out = _Out(TAG)
    out.digest(digest)
    out.media(media_type)
    out.varint(size)
    out.millis(pushed)
    return bytes(out.buf)


def unpack_tag(raw: bytes) -> dict[str, Any]:
    if not is_compact(raw):
        return legacy(raw)
    src = _In(raw, TAG)
    fields = {"digest": src.digest(), "media_type": src.media(), "size": src.varint(), "pushed": src.millis()}
    src.end()
    return fields


def pack_manifest(
    digest: str,
    media_type: str,
    size: int,
    blobs: list[str],
    manifests: list[str],
    subject: str | None,
    artifact_type: str | None,
    annotations: dict[str, str] | None,
    pushed: float,
    annotations_in_manifest: bool,
) -> bytes:
    flags = 0
    if subject is not None:
        flags |= _HAS_SUBJECT
    if artifact_type is not None:
        flags |= _HAS_ARTIFACT_TYPE
    if annotations is not None:
        flags |= _HAS_ANNOTATIONS
    if annotations_in_manifest:
        flags |= _ANNOTATIONS_IN_MANIFEST
    out = _Out(MANIFEST)
    out.byte(flags)
    out.digest(digest)
    out.media(media_type)
    out.varint(size)
    out.millis(pushed)
    for references in (blobs, manifests):
        out.varint(len(references))
        for reference in references:
            out.digest(reference)
    if subject is not None:
        out.digest(subject)
    if artifact_type is not None:
        out.media(artifact_type)
    if annotations is not None:
        out.text(json.dumps(annotations, separators=(",", ":"), ensure_ascii=False))
    return bytes(out.buf)


def unpack_manifest(raw: bytes) -> dict[str, Any]:
    if not is_compact(raw):
        return legacy(raw)
    src = _In(raw, MANIFEST)
    flags = src.byte()
    fields: dict[str, Any] = {"digest": src.digest(), "media_type": src.media(), "size": src.varint()}
    fields["pushed"] = src.millis()
    fields["blobs"] = [src.digest() for _ in range(src.varint())]
    fields["manifests"] = [src.digest() for _ in range(src.varint())]
    fields["subject"] = src.digest() if flags & _HAS_SUBJECT else None
    fields["artifact_type"] = src.media() if flags & _HAS_ARTIFACT_TYPE else None
    fields["annotations"] = json.loads(src.text()) if flags & _HAS_ANNOTATIONS else None
    fields["annotations_in_manifest"] = bool(flags & _ANNOTATIONS_IN_MANIFEST)
    src.end()
    return fields


def manifest_media_type(raw: bytes) -> str:
    """A manifest record's media type alone, without decoding its references (a pull by digest)."""
    if not is_compact(raw):
        media_type = legacy(raw).get("media_type")
        if not isinstance(media_type, str):
            raise RecordError("a manifest record has no media type")
        return media_type
    src = _In(raw, MANIFEST)
    src.byte()  # flags
    src.digest()
    return src.media()


def pack_touch(at: float) -> bytes:
    out = _Out(TOUCH)
    out.millis(at)
    return bytes(out.buf)


def unpack_touch(raw: bytes) -> dict[str, Any]:
    if not is_compact(raw):
        return legacy(raw)
    src = _In(raw, TOUCH)
    fields = {"at": src.millis()}
    src.end()
    return fields


# -- the storage figures' records ----------------------------------------------------------------


def pack_holding(size: int, link: bool, manifest: bool, repository: str | None = None) -> bytes:
    """What one repository holds of one object; with `repository`, the one repository that holds it."""
    out = _Out(HOLDING if repository is None else SOLE_HOLDING)
    out.byte((_HELD_LINK if link else 0) | (_HELD_MANIFEST if manifest else 0))
    out.varint(size)
    if repository is not None:
        out.text(repository)
    return bytes(out.buf)


def unpack_holding(raw: bytes) -> dict[str, Any]:
    """A holding's fields (JSON before the compact form); a sole holding's carry its "repository"."""
    if not is_compact(raw):
        return legacy(raw)
    src = _In(raw, SOLE_HOLDING if raw[0] == SOLE_HOLDING else HOLDING)
    flags = src.byte()
    fields: dict[str, Any] = {"size": src.varint(), "link": bool(flags & _HELD_LINK)}
    fields["manifest"] = bool(flags & _HELD_MANIFEST)
    if raw[0] == SOLE_HOLDING:
        fields["repository"] = src.text()
    src.end()
    return fields


def is_sole_holding(raw: bytes) -> bool:
    return bool(raw) and raw[0] == SOLE_HOLDING


def pack_usage_summary(size: int, repositories: int, manifests: int, namespaces: dict[str, list[int]]) -> bytes:
    """An object's summary: its size, how many repositories (and manifests) hold it, per namespace too."""
    out = _Out(USAGE_SUMMARY)
    out.varint(size)
    out.varint(repositories)
    out.varint(manifests)
    out.varint(len(namespaces))
    for namespace, (held, held_manifests) in sorted(namespaces.items()):
        out.text(namespace)
        out.varint(held)
        out.varint(held_manifests)
    return bytes(out.buf)


def unpack_usage_summary(raw: bytes) -> dict[str, Any]:
    if not is_compact(raw):
        return legacy(raw)
    src = _In(raw, USAGE_SUMMARY)
    fields: dict[str, Any] = {"size": src.varint(), "repositories": src.varint(), "manifests": src.varint()}
    namespaces = {}
    for _ in range(src.varint()):
        namespace = src.text()
        namespaces[namespace] = [src.varint(), src.varint()]
    fields["namespaces"] = namespaces
    src.end()
    return fields


_SCOPE_FIELDS = ("linked", "unique", "exclusive", "objects", "exclusive_objects", "manifests")


def pack_scope_usage(figures: dict[str, int]) -> bytes:
    """A repository's, namespace's or the registry's counter: its figures, in a fixed order."""
    out = _Out(SCOPE_USAGE)
    for name in _SCOPE_FIELDS:
        out.varint(figures[name])
    return bytes(out.buf)


def unpack_scope_usage(raw: bytes) -> dict[str, Any]:
    if not is_compact(raw):
        return legacy(raw)
    src = _In(raw, SCOPE_USAGE)
    fields = {name: src.varint() for name in _SCOPE_FIELDS}
    src.end()
    return fields
