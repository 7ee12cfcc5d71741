"""Signature policies on the pull path: which rule covers a repository and whether a manifest is signed.

A manifest counts as signed under a rule when a cosign simple-signing signature by one of the
rule's keys names its digest, found at its `sha256-<hex>.sig` tag or among its OCI 1.1 referrers in
the same repository, or when an index of that repository that lists it is signed so.

Verdicts are kept per (repository, digest) with the marks of the records they rest on (the
signature tag, the referrer entry, the parent index's record; for "unsigned", the repository
record, which every push into the repository rewrites). A GET checks those marks in the same
coordinator read it makes anyway, so a signature deleted through any node is noticed by the next
pull on every node, and an already verified pull costs no extra storage or coordinator round trip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from coordinator.metadata import Mark, Metadata

from . import cosign
from .caches import BlobLocations, ManifestCache
from .config import SignaturePolicy
from .metrics import Metrics
from .storage import layout
from .storage.driver import StorageDriver

log = logging.getLogger("wharf.trust")

UNSIGNED_RECHECK_SECONDS = 30.0

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
# Layers a container runtime unpacks into a filesystem.
_FILESYSTEM_LAYERS = ("application/vnd.oci.image.layer.", "application/vnd.docker.image.rootfs.")
_IMAGE_CONFIGS = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
# Layers of what clients fetch to verify an image, never to run it: signatures (cosign's simple signing
# and sigstore bundles), attestations (DSSE envelopes, in-toto statements), SBOMs.
_VERIFICATION_LAYERS = (
    "application/vnd.dev.cosign.",
    "application/vnd.dev.sigstore.",
    "application/vnd.dsse.",
    "application/vnd.in-toto",
    "application/spdx",
    "text/spdx",
    "application/vnd.cyclonedx",
    "application/vnd.syft",
    "application/vnd.cncf.notary.",
    cosign.OCI_EMPTY,
)


class _Bounded(Generic[K, V]):
    """A dict that forgets its oldest entries beyond `size`."""

    def __init__(self, size: int) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._size = size

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


@dataclass(frozen=True)
class Verdict:
    """Whether `digest` is signed under a rule, and the records that make it so (or show nothing new)."""

    digest: str
    signed: bool
    how: str  # where the signature was found, or why none counts
    marks: tuple[Mark, ...]
    # "Unsigned" is also looked at again after a while: it rests on the repository record, and a
    # path that adds records without rewriting it (the adoption of a registry:2 store) must not
    # keep a signed image refused for long.
    until: float = float("inf")


@dataclass(frozen=True)
class Decision:
    """What a policy made of one pull: allowed (signed, or not an image), warned or refused."""

    rule: str
    mode: str
    outcome: str  # allowed | warned | refused
    how: str

    @property
    def audit_fields(self) -> dict[str, str]:
        """The audit line's fields: the rule, the decision and where the signature was (or why none counts)."""
        return {"rule": self.rule, "decision": self.outcome, "signature": self.how}


def is_image(body: bytes) -> bool:
    """Whether a manifest is something a runtime may run: an index, or an image, whatever its layers' types.

    Signatures, attestations, SBOMs and other artifacts are not: clients fetch them to verify, so a
    policy never holds them back. An image config with layers counts as an image unless every layer
    is of a verification type (a cosign signature has an image config); runtimes unpack layers of
    any other type (application/octet-stream, application/x-tar ...), so those never make an image
    an artifact. Media types are compared without case. A manifest that cannot be told apart counts
    as an image.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        return True
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2 or "manifests" in doc:
        return True
    layers = doc.get("layers")
    if not isinstance(layers, list):
        return True
    types = []
    for layer in layers:
        media_type = layer.get("mediaType") if isinstance(layer, dict) else None
        if not isinstance(media_type, str) or media_type.lower().startswith(_FILESYSTEM_LAYERS):
            return True
        types.append(media_type.lower())
    config = doc.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    if not isinstance(config_type, str) or config_type.lower() in _IMAGE_CONFIGS:
        return not layers or not all(t.startswith(_VERIFICATION_LAYERS) for t in types)
    return False  # another config (an artifact's): runtimes refuse to run it


class Trust:
    """The configured signature policies and what this node has verified under them."""

    def __init__(
        self,
        policies: list[SignaturePolicy],
        *,
        metadata: Metadata,
        storage: StorageDriver,
        manifests: ManifestCache,
        blobs: BlobLocations,
        metrics: Metrics,
    ) -> None:
        self.policies = policies
        self._metadata = metadata
        self._storage = storage
        self._manifests = manifests
        self._blobs = blobs
        self._metrics = metrics
        self._rule_of: dict[str, SignaturePolicy | None] = {}
        self._verdicts: _Bounded[tuple[str, str], Verdict] = _Bounded(100_000)
        # The digest each tag pointed at when last pulled: which verdict to check on the next pull.
        self._tags: _Bounded[tuple[str, str], str] = _Bounded(100_000)
        self._images: _Bounded[str, bool] = _Bounded(100_000)
        # (rule, signature manifest, subject) -> whether it holds a valid signature: all immutable.
        self._checked: _Bounded[tuple[str, str, str], bool] = _Bounded(100_000)
        # The pull counters by (rule, decision), looked up once: the pull path is hot.
        self._pulls: dict[tuple[str, str], Any] = {}

    def __bool__(self) -> bool:
        return bool(self.policies)

    def rule_for(self, repository: str) -> SignaturePolicy | None:
        """The first policy whose repositories match, or None."""
        if not self.policies:
            return None
        if repository in self._rule_of:
            return self._rule_of[repository]
        found = next((p for p in self.policies if any(r.fullmatch(repository) for r in p.patterns)), None)
        if len(self._rule_of) >= 10_000:
            self._rule_of.clear()
        self._rule_of[repository] = found
        return found

    # -- the pull path ---------------------------------------------------------------------------

    def held(self, repository: str, *, digest: str | None = None, tag: str | None = None) -> Verdict | None:
        """The verdict this node holds for a digest (or for what a tag pointed at when last pulled)."""
        if digest is None and tag is not None:
            digest = self._tags.get((repository, tag))
        return self._verdicts.get((repository, digest)) if digest is not None else None

    async def decide(
        self,
        rule: SignaturePolicy,
        repository: str,
        digest: str,
        body: bytes,
        *,
        tag: str | None = None,
        held: Verdict | None = None,
    ) -> Decision:
        """The decision for one pull; `held` is a verdict whose marks the caller's read found unchanged."""
        if tag is not None and self._tags.get((repository, tag)) != digest:
            self._tags.put((repository, tag), digest)
        if held is not None and held.digest == digest and (held.signed or time.monotonic() < held.until):
            verdict = held
        elif not self.image(digest, body):
            return self._decided(rule, "allowed", "not an image (a signature, attestation or other artifact)")
        else:
            verdict = await self.verify(rule, repository, digest)
        if verdict.signed:
            return self._decided(rule, "allowed", verdict.how)
        return self._decided(rule, "warned" if rule.mode == "warn" else "refused", verdict.how)

    def _decided(self, rule: SignaturePolicy, outcome: str, how: str) -> Decision:
        counter = self._pulls.get((rule.name, outcome))
        if counter is None:
            counter = self._pulls[(rule.name, outcome)] = self._metrics.signature_pulls.labels(rule.name, outcome)
        counter.inc()
        return Decision(rule.name, rule.mode, outcome, how)

    def image(self, digest: str, body: bytes) -> bool:
        found = self._images.get(digest)
        if found is None:
            found = is_image(body)
            self._images.put(digest, found)
        return found

    # -- verification ----------------------------------------------------------------------------

    async def verify(self, rule: SignaturePolicy, repository: str, digest: str, *, counted: bool = True) -> Verdict:
        """Look for a valid signature of `digest` now, from the records; remember the verdict.

        `counted`: the verification is one the metrics count (a pull's); the web pages' are not."""
        metadata = self._metadata
        # Read first: anything pushed after this moment (a new signature) changes it.
        nothing_new = await metadata.repository_mark(repository)
        verdict = await self._signed(rule, repository, digest)
        if verdict is None:
            verdict = await self._signed_through_index(rule, repository, digest)
        if verdict is None:
            how = f"no valid signature by a key of rule {rule.name}"
            verdict = Verdict(digest, False, how, (nothing_new,), time.monotonic() + UNSIGNED_RECHECK_SECONDS)
        self._verdicts.put((repository, digest), verdict)
        if counted:
            self._metrics.signature_verifications.labels(rule.name, "signed" if verdict.signed else "unsigned").inc()
        return verdict

    async def _signed(self, rule: SignaturePolicy, repository: str, digest: str) -> Verdict | None:
        """A signature of `digest` itself, at its signature tag or among its referrers."""
        tag = cosign.signature_tag(digest)
        for mark, manifest, kind in await self._metadata.pointers_to(repository, tag, digest):
            if await self._holds_signature(rule, manifest, digest):
                where = f"tag {tag}" if kind == "tag" else f"referrer {manifest}"
                return Verdict(digest, True, f"signed ({where})", (mark,))
        return None

    async def _signed_through_index(self, rule: SignaturePolicy, repository: str, digest: str) -> Verdict | None:
        """A signed index of the repository that lists `digest`."""
        metadata = self._metadata
        subjects = {cosign.signature_tag_subject(t) for t in await metadata.tags_with_prefix(repository, "sha")}
        subjects |= await metadata.referrer_subjects(repository)
        subjects.discard(None)
        subjects.discard(digest)
        records = await metadata.manifests_marked(repository, sorted(s for s in subjects if s))
        for parent, (record, mark) in records.items():
            if digest not in record.manifests:
                continue
            signed = self.held(repository, digest=parent)
            if signed is None or not signed.signed:
                signed = await self._signed(rule, repository, parent)
            if signed is not None and signed.signed:
                return Verdict(digest, True, f"listed in index {parent}, {signed.how}", (*signed.marks, mark))
        return None

    async def _holds_signature(self, rule: SignaturePolicy, manifest: str, subject: str) -> bool:
        """Whether manifest `manifest` carries a signature of `subject` by one of the rule's keys."""
        key = (rule.name, manifest, subject)
        known = self._checked.get(key)
        if known is not None:
            return known
        body = await self._manifest(manifest)
        if body is None:
            return False
        complete = True
        for layer in cosign.signature_layers(body):
            payload = await self._payload(layer)
            if payload is None:
                complete = False  # unreadable now; not remembered as invalid
                continue
            if cosign.check(layer, payload, subject, rule.public_keys) is not None:
                self._checked.put(key, True)
                return True
        if complete:
            self._checked.put(key, False)
        return False

    async def _manifest(self, digest: str) -> bytes | None:
        body = self._manifests.get(digest)
        if body is None:
            try:
                body = await self._storage.read_bytes(layout.blob_key(digest))
            except FileNotFoundError:
                return None
            if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                return None
            self._manifests.put(digest, body)
        return body

    async def _payload(self, layer: cosign.SignatureLayer) -> bytes | None:
        if layer.payload_size > cosign.MAX_PAYLOAD_BYTES:
            return None
        try:
            payload = await self._storage.read_bytes(await self._blobs.key(layer.payload_digest))
        except FileNotFoundError:
            return None
        return payload if cosign.payload_matches(layer, payload) else None
