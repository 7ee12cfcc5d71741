"""Pulls of cached repositories: served from the cache, fetched from the upstream on a miss.

A repository is cached when an upstream's prefix covers it (registry:2's `proxy.remoteurl` covers
every repository). What a pull fetches is stored as ordinary content of that repository: manifests
by `Metadata.put_manifest` (their references follow, as clients fetch them), blobs through upload
sessions (node/proxy/fetch.py). So later pulls are served from storage like pushed images, and GC,
retention and quotas apply to them by the same rules.

A cached tag is served without asking the upstream for `ttl` after the upstream last confirmed it;
then a HEAD asks (sparing the upstream's rate limits) and a moved tag is fetched. When the upstream
is down or answers 5xx or 429, the cached tag is served all the same, said in the `Cache-Status`
header (RFC 9211) and in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from coordinator.cache import CacheCounts, CacheRecords, add_counts
from coordinator.kv import KV
from coordinator.metadata import BeingCollected, ManifestRecord, Metadata
from coordinator.pulls import Pulls
from coordinator.quota import QuotaExceeded
from coordinator.uploads import CommitIntent, UploadSession, UploadSessions

from .. import manifest as manifests
from ..config import ProxyConfig, Upstream
from ..errors import BlobUnknown, Denied, ManifestInvalid, ManifestUnknown, RegistryError, TooManyRequests, Unavailable
from ..metrics import Metrics
from ..reference import Reference
from ..storage import layout
from ..storage.driver import StorageDriver
from ..upload import Uploader, quota_denied
from .fetch import BlobFetches
from .upstream import (
    UpstreamClient,
    UpstreamError,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamUnavailable,
)

log = logging.getLogger("wharf.proxy")

# Where a request's cache outcome is kept in scope["state"], for the Cache-Status header.
STATE_KEY = "wharf.cache"
# A node adds its counts to the coordinator this often.
_COUNTS_SECONDS = 2.0
# An upstream's tag list is asked again after this long.
_TAG_LIST_SECONDS = 30.0
_TAG_LISTS = 1000
# Larger annotations stay in the manifest bytes (as for pushes, see node/api/manifests.py).
_MAX_RECORD_ANNOTATIONS = 16 * 1024
# Rounds of waiting for another request's fetch before giving up on a blob.
_ROUNDS = 3

Headers = Callable[[str, int], dict[str, str]]


@dataclass
class Cache:
    """One upstream as this node serves it: its settings, its client, its counts since the last report."""

    upstream: Upstream
    client: UpstreamClient
    counts: CacheCounts = field(default_factory=CacheCounts)

    @property
    def name(self) -> str:
        return self.upstream.name


@dataclass(frozen=True)
class Outcome:
    """How the cache answered a pull: from the cache, fetched from the upstream, or served stale."""

    cache: str
    fetched: bool = False
    stale: int | None = None  # the upstream's status when it failed (0: it could not be reached)

    def header(self) -> str:
        """The Cache-Status field (RFC 9211) for this answer."""
        if self.stale is not None:
            status = f"; fwd-status={self.stale}" if self.stale else ""
            return f'wharf; fwd=stale{status}; detail="upstream {self.cache} unavailable, served from the cache"'
        return "wharf; fwd=miss; stored" if self.fetched else "wharf; hit"


class PullThrough:
    """Every cached upstream of this registry, and what pulls of their repositories do."""

    def __init__(
        self,
        config: ProxyConfig,
        kv: KV,
        metadata: Metadata,
        storage: StorageDriver,
        sessions: UploadSessions,
        uploader: Uploader,
        metrics: Metrics,
        holder: str,
    ) -> None:
        self.config = config
        self.kv = kv
        self.metadata = metadata
        self.storage = storage
        self.sessions = sessions
        self.uploader = uploader
        self.metrics = metrics
        self.records = CacheRecords(kv)
        self.pulls = Pulls(kv)
        self.caches = [Cache(upstream, UpstreamClient(upstream)) for upstream in config.caches]
        self.fetches = BlobFetches(self.records, uploader, uploader.lease, holder)
        # Tag checks in flight on this node: concurrent pulls of one tag ask the upstream once.
        self._checks: dict[tuple[str, str], asyncio.Future[Outcome]] = {}
        self._tag_lists: dict[str, tuple[float, list[str]]] = {}
        for cache in self.caches:
            metrics.proxy_budget.labels(cache.name).set(cache.upstream.maxbytes)

    @property
    def enabled(self) -> bool:
        return bool(self.caches)

    @property
    def mirror(self) -> bool:
        """registry:2's mode: every repository is cached, nothing is hosted."""
        return self.config.mirror

    def cache_of(self, repository: str) -> tuple[Cache, str] | None:
        """The cache that covers a repository and the upstream's name for it; None for a hosted one."""
        for cache in self.caches:
            remote = cache.upstream.remote_name(repository)
            if remote is not None:
                return cache, remote
        return None

    def covers(self, repository: str) -> bool:
        return self.cache_of(repository) is not None

    # -- manifests ----------------------------------------------------------------------------------

    async def manifest(self, request: Request, repository: str, ref: Reference) -> None:
        """Make a manifest pull of a cached repository answerable from the cache (fetching on a miss,
        asking about a tag past its TTL); the handler then serves it as it serves pushed content."""
        found = self.cache_of(repository)
        if found is None:
            return
        cache, remote = found
        if ref.tag is not None:
            outcome = await self._tag(cache, repository, remote, ref.tag)
        else:
            outcome = await self._by_digest(cache, repository, remote, str(ref.digest))
        request.scope.setdefault("state", {})[STATE_KEY] = outcome

    async def _tag(self, cache: Cache, repository: str, remote: str, tag: str) -> Outcome:
        current, check = await self.records.tag(repository, tag)
        if current is not None and check is not None and check.fresh(current.digest, cache.upstream.ttl):
            self._hit(cache, "manifest")
            return Outcome(cache.name)
        key = (repository, tag)
        pending = self._checks.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._checks[key] = future
        try:
            outcome = await self._ask_tag(cache, repository, remote, tag, current.digest if current else None)
            future.set_result(outcome)
            return outcome
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters (if any) raise it themselves
            raise
        finally:
            del self._checks[key]

    async def _ask_tag(self, cache: Cache, repository: str, remote: str, tag: str, cached: str | None) -> Outcome:
        """Ask the upstream what the tag names now: a HEAD when a copy is here, a GET otherwise."""
        client = cache.client
        try:
            if cached is not None:
                head = await client.manifest(remote, tag, head=True)
                if head.digest == cached:
                    await self.records.confirm(repository, tag, cached)
                    self._hit(cache, "manifest")
                    return Outcome(cache.name)
                moved = await client.manifest(remote, head.digest or tag)
                await self._store_manifest(cache, repository, moved.body or b"", moved.media_type, head.digest, tag)
            else:
                fetched = await client.manifest(remote, tag)
                await self._store_manifest(
                    cache, repository, fetched.body or b"", fetched.media_type, fetched.digest, tag
                )
        except UpstreamError as exc:
            self._upstream_failed(cache, exc)
            if cached is not None and isinstance(exc, UpstreamNotFound):
                # The upstream deleted the tag: so does the cache (the manifest stays, by digest).
                log.info("upstream %s no longer has %s:%s; the cached tag goes", cache.name, remote, tag)
                await self.metadata.delete_tag(repository, tag)
                await self.records.forget(repository, [tag])
            if cached is None or isinstance(exc, (UpstreamInvalid, UpstreamNotFound)):
                raise _registry_error(exc, "manifest", {"tag": tag}) from None
            self._stale(cache, repository, tag, exc)
            return Outcome(cache.name, stale=exc.status or 0)
        self._miss(cache, "manifest")
        return Outcome(cache.name, fetched=True)

    async def _by_digest(self, cache: Cache, repository: str, remote: str, digest: str) -> Outcome:
        if await self.metadata.get_manifest(repository, digest) is not None:
            self._hit(cache, "manifest")
            return Outcome(cache.name)
        try:
            fetched = await cache.client.manifest(remote, digest)
            await self._store_manifest(cache, repository, fetched.body or b"", fetched.media_type, digest, None)
        except UpstreamError as exc:
            self._upstream_failed(cache, exc)
            raise _registry_error(exc, "manifest", {"digest": digest}) from None
        self._miss(cache, "manifest")
        return Outcome(cache.name, fetched=True)

    async def _store_manifest(
        self, cache: Cache, repository: str, body: bytes, media_type: str, expected: str | None, tag: str | None
    ) -> None:
        """Store a manifest the upstream sent (only if it hashes to the digest asked for or announced)."""
        self._fetched(cache, len(body))
        algorithm = expected.split(":", 1)[0] if expected and expected.startswith("sha512:") else "sha256"
        digest = manifests.compute_digest(body, algorithm)
        if expected is not None and expected != digest:
            raise UpstreamInvalid(cache.upstream, f"manifest {expected} came as {digest}: not stored, not served")
        try:
            parsed = manifests.parse(body, media_type or None)
        except ManifestInvalid as exc:
            raise UpstreamInvalid(cache.upstream, f"manifest {digest} cannot be stored here: {exc.detail}") from None
        large = len(json.dumps(parsed.annotations or {})) > _MAX_RECORD_ANNOTATIONS
        record = ManifestRecord(
            digest=digest,
            media_type=parsed.media_type,
            size=len(body),
            blobs=parsed.blobs,
            manifests=parsed.manifests,
            subject=parsed.subject,
            artifact_type=parsed.artifact_type,
            annotations=parsed.annotations if not large else None,
            annotations_in_manifest=large,
            pushed=time.time(),
        )
        key = layout.blob_key(digest)
        # With regions: this region's copy, and the copies the others still need, as for a push.
        placed = self.uploader.placed
        events = list(await placed(digest, len(body), key)) if placed is not None else []
        intent = None
        try:
            if await self.storage.stat(key) != len(body):
                intent = await self._write_manifest(repository, digest, key, body)
            try:
                await self.metadata.put_manifest(
                    repository, record, tag=tag, storage_key=key, intent=intent, events=events, references_follow=True
                )
            except BeingCollected:
                # Garbage collection was deleting these very bytes: wait, store them again, retry.
                await self.metadata.wait_collected(digest)
                if intent is None:
                    intent = await self._write_manifest(repository, digest, key, body)
                else:
                    await self.storage.write_bytes(key, body)
                await self.metadata.put_manifest(
                    repository, record, tag=tag, storage_key=key, intent=intent, events=events, references_follow=True
                )
        except BaseException:
            if intent is not None:
                await self.uploader.reclaim(intent, key)
            raise
        if tag is not None:
            await self.records.confirm(repository, tag, digest)
        await self._link_stored(repository, record.blobs)

    async def _write_manifest(self, repository: str, digest: str, key: str, body: bytes) -> UploadSession:
        """Write manifest bytes under a commit intent, so a crash leaves nothing unrecorded behind."""
        existed = await self.storage.stat(key) is not None
        intent = await self.sessions.create(
            self.sessions.new_id(), repository, {}, commit=CommitIntent(digest, key, existed)
        )
        await self.storage.write_bytes(key, body)
        return intent

    async def _link_stored(self, repository: str, blobs: list[str]) -> None:
        """Link into the repository what the manifest names and this registry stores already (another
        cached repository fetched it): no second fetch of a shared layer."""
        for digest in blobs:
            if await self.metadata.get_link(repository, digest) is not None:
                continue
            record = await self.metadata.get_blob(digest)
            if record is None or record.corrupt:
                continue
            with contextlib.suppress(BeingCollected, QuotaExceeded):
                await self.metadata.commit_blob(
                    repository, digest, record.size, record.key, quotas=self.uploader.quotas_for(repository)
                )

    # -- tags lists ---------------------------------------------------------------------------------

    async def tag_list(self, repository: str, cached: list[str]) -> list[str]:
        """The tags of a cached repository: what is cached, with what the upstream lists (when it
        answers; its list is asked again after 30 s)."""
        found = self.cache_of(repository)
        if found is None:
            return cached
        cache, remote = found
        now = time.monotonic()
        kept = self._tag_lists.get(repository)
        if kept is None or now - kept[0] > _TAG_LIST_SECONDS:
            try:
                kept = (now, await cache.client.tags(remote))
            except UpstreamError as exc:
                self._upstream_failed(cache, exc)
                return cached
            self._tag_lists[repository] = kept
            while len(self._tag_lists) > _TAG_LISTS:
                self._tag_lists.pop(next(iter(self._tag_lists)))
        return sorted({*cached, *kept[1]})

    # -- blobs --------------------------------------------------------------------------------------

    async def blob(
        self, request: Request, repository: str, digest: str, *, head: bool, headers: Headers
    ) -> Response | None:
        """A blob pull of a cached repository: None when the blob is here (the handler serves it);
        otherwise the answer, fetching from the upstream (streamed to this client as it is stored)."""
        found = self.cache_of(repository)
        if found is None:
            return None
        cache, remote = found
        state = request.scope.setdefault("state", {})
        if await self.metadata.get_link(repository, digest) is not None:
            self._hit(cache, "blob")
            state[STATE_KEY] = Outcome(cache.name)
            return None
        try:
            if await self._link_if_stored(cache, repository, remote, digest):
                self._hit(cache, "blob")
                state[STATE_KEY] = Outcome(cache.name)
                return None
            if head:
                size = await cache.client.blob_size(remote, digest)
                return Response(headers=headers(digest, size), media_type="application/octet-stream")
            response = await self._fetch_blob(cache, repository, remote, digest, request, headers)
        except UpstreamError as exc:
            self._upstream_failed(cache, exc)
            raise _registry_error(exc, "blob", {"digest": digest}) from None
        self._miss(cache, "blob")
        state[STATE_KEY] = Outcome(cache.name, fetched=True)
        return response

    async def _link_if_stored(self, cache: Cache, repository: str, remote: str, digest: str) -> bool:
        """Link a blob stored here for another repository once the upstream says this one has it too."""
        record = await self.metadata.get_blob(digest)
        if record is None or record.corrupt:
            return False
        await cache.client.blob_size(remote, digest)
        try:
            await self.metadata.commit_blob(
                repository, digest, record.size, record.key, quotas=self.uploader.quotas_for(repository)
            )
        except BeingCollected:
            return False
        except QuotaExceeded as exc:
            raise quota_denied(exc) from None
        return True

    async def _fetch_blob(
        self, cache: Cache, repository: str, remote: str, digest: str, request: Request, headers: Headers
    ) -> Response | None:
        """Fetch (or wait for the fetch of) a blob; stream it to this client if it is the first."""
        ranged = request.headers.get("range") is not None
        for _ in range(_ROUNDS):
            fetch = self.fetches.running(digest)
            first = fetch is None
            if fetch is None:
                fetch = self.fetches.start(cache.client, remote, repository, digest, lambda n: self._fetched(cache, n))
            await fetch.started.wait()
            if first and not ranged and not fetch.followed and fetch.size is not None:
                chunks = fetch.listen()
                if chunks is not None:
                    # The answer starts with the first bytes: a fetch that fails before any came (a
                    # small blob whose digest is wrong: its only chunk is held until verified) is
                    # answered with an OCI error below, not a cut-off 200.
                    body = chunks.__aiter__()
                    try:
                        head = await anext(body, b"")
                    except Exception:  # the fetch's own error is raised below
                        head = None
                    if head is not None:
                        return StreamingResponse(
                            _prepended(head, body),
                            headers=headers(digest, fetch.size),
                            media_type="application/octet-stream",
                        )
            await fetch.done.wait()
            if await self.metadata.get_link(repository, digest) is not None:
                return None
            if await self._link_if_stored(cache, repository, remote, digest):
                return None
            if fetch.error is not None and not fetch.followed:
                error = fetch.error
                if isinstance(error, UpstreamError):
                    raise error
                if isinstance(error, RegistryError):
                    raise error
                if isinstance(error, QuotaExceeded):
                    raise quota_denied(error)
                raise UpstreamUnavailable(cache.upstream, f"blob {digest}: the fetch failed ({error})")
        raise UpstreamUnavailable(cache.upstream, f"blob {digest}: fetches by other requests kept failing")

    async def last_pulled(self, images: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """When each (repository, manifest digest) was last pulled, as far as nodes have written it
        (inventory.pullinterval), for least-recently-pulled eviction and `wharf cache ls`."""
        by_repository: dict[str, list[str]] = {}
        for repository, digest in images:
            by_repository.setdefault(repository, []).append(digest)
        found: dict[tuple[str, str], float] = {}
        for repository, digests in by_repository.items():
            for digest, at in (await self.pulls.last_pulled(repository, digests)).items():
                found[(repository, digest)] = at
        return found

    # -- counts and metrics -------------------------------------------------------------------------

    def _hit(self, cache: Cache, kind: str) -> None:
        cache.counts.hits += 1
        self.metrics.add(self.metrics.proxy_hits.labels(cache.name, kind))

    def _miss(self, cache: Cache, kind: str) -> None:
        cache.counts.misses += 1
        self.metrics.add(self.metrics.proxy_misses.labels(cache.name, kind))

    def _fetched(self, cache: Cache, size: int) -> None:
        cache.counts.upstream_bytes += size
        self.metrics.add(self.metrics.proxy_upstream_bytes.labels(cache.name), size)

    def _upstream_failed(self, cache: Cache, exc: UpstreamError) -> None:
        if isinstance(exc, UpstreamNotFound):
            return  # an answer, not a failure
        cache.counts.upstream_errors += 1
        self.metrics.add(self.metrics.proxy_upstream_errors.labels(cache.name, exc.reason))
        log.warning("%s", exc, extra={"fields": {"upstream": cache.name, "reason": exc.reason}})

    def _stale(self, cache: Cache, repository: str, tag: str, exc: UpstreamError) -> None:
        cache.counts.stale += 1
        cache.counts.hits += 1
        self.metrics.add(self.metrics.proxy_stale.labels(cache.name))
        self.metrics.add(self.metrics.proxy_hits.labels(cache.name, "manifest"))
        log.warning(
            "serving the cached %s:%s past its TTL: %s",
            repository,
            tag,
            exc,
            extra={"fields": {"upstream": cache.name, "repository": repository, "tag": tag, "stale": True}},
        )

    async def report(self) -> None:
        """Add this node's counts since the last report to each upstream's record in the coordinator."""
        for cache in self.caches:
            delta, cache.counts = cache.counts, CacheCounts()
            if not delta:
                continue
            try:
                written = await add_counts(self.kv, cache.name, delta)
            except Exception:
                written = False
            if not written:
                cache.counts.add(delta)  # tried again with the next report

    async def run(self) -> None:
        """Report counts every few seconds, until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(_COUNTS_SECONDS)
                try:
                    await self.report()
                except Exception as exc:
                    log.warning("could not report cache counts: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.report())

    async def close(self) -> None:
        await self.fetches.close()
        for cache in self.caches:
            await cache.client.close()


async def _prepended(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for chunk in rest:
        yield chunk


def _registry_error(exc: UpstreamError, kind: str, detail: dict[str, str]) -> RegistryError:
    """What a client is told when the cache cannot answer because of its upstream."""
    detail = {**detail, "upstream": exc.upstream.name}
    if isinstance(exc, UpstreamNotFound):
        if kind == "manifest":
            return ManifestUnknown(detail, message=str(exc))
        return BlobUnknown(detail, message=str(exc))
    if isinstance(exc, UpstreamRefused):
        return Denied(detail, message=str(exc))
    if isinstance(exc, UpstreamUnavailable) and exc.status == 429:
        headers = {"Retry-After": exc.retry_after} if exc.retry_after else {}
        return TooManyRequests(detail, message=str(exc), headers=headers)
    error = Unavailable(detail, message=str(exc))
    if isinstance(exc, UpstreamInvalid):
        error.status = 502
    elif isinstance(exc, UpstreamUnavailable) and exc.retry_after:
        error.headers["Retry-After"] = exc.retry_after
    return error
