"""The etcd KV backend: the KV contract over an etcd v3 cluster, through aetcd's gRPC layer.

aetcd's high-level `Client` lacks what the contract needs (range limits and count-only reads, TLS,
a watch that can be resumed after a failover, a keep-alive that closes its stream), so this module
drives etcd's gRPC services directly with aetcd's generated stubs and messages (`aetcd.rpc`) and
keeps one channel to one endpoint at a time:

- Every key is stored under `prefix` ("/wharf/" by default); callers never see it. A store this
  backend creates has the compact key layout (keys.pack: digests as raw bytes, under
  keys.COMPACT_LAYOUT); one that already holds text keys (written by an earlier version) keeps them.
- On a connection error the backend switches to the next endpoint (a fresh channel, so no stale
  reconnect backoff) and retries: reads, lease refreshes and revokes on any connection error,
  writes and transactions only when the request cannot have reached a server (connection refused,
  no leader). A request that may have been applied is never sent twice; its caller gets
  `EtcdUnavailable` and the next request goes to the next endpoint.
- A watch is one gRPC stream. It resumes on another endpoint from the revision after the last event
  it delivered, so a failover neither loses nor repeats events.
- Lease keep-alive is not here: `coordinator.lease.KeptLease` calls `refresh_lease` every TTL/3.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc

from . import keys
from .kv import (
    READS,
    Compare,
    Count,
    Delete,
    Get,
    KeyValue,
    LeaseGone,
    MemberSpace,
    Op,
    OutOfSpace,
    Put,
    SnapshotLost,
    StoreSpace,
    TxnResult,
    WatchEvent,
)
from .pointreads import PointReads

log = logging.getLogger("wharf.coordinator")

T = TypeVar("T")

_COMPARE_OPS = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}
_COMPARE_TARGETS = {
    "value": rpc.Compare.VALUE,
    "version": rpc.Compare.VERSION,
    "create_revision": rpc.Compare.CREATE,
    "mod_revision": rpc.Compare.MOD,
}

# Error details (lower case) that mean the request never reached a server able to apply it.
_UNREACHED = (
    "failed to connect",
    "connection refused",
    "connect failed",
    "dns resolution failed",
    "name resolution",
    "etcdserver: no leader",
    "etcdserver: not capable",
    "etcdserver: too many requests",
)
_CONNECTION_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,  # the channel was closed under the call
)

_REQUIRE_LEADER = (("hasleader", "true"),)

_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # Notice a dead peer on a long idle watch stream (etcd allows pings every 5 s at most).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


class EtcdError(aetcd.ClientError):
    """etcd refused or failed a request."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError, ConnectionError):
    """No endpoint answered, or the answer was lost; a write may or may not have been applied."""


class LeaseNotFound(EtcdError, LeaseGone):
    """A put or transaction named a lease that does not exist (any more)."""


class RevisionCompacted(EtcdError):
    """A watch asked for history that etcd has already compacted."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd history before revision {compact_revision} is compacted")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class _Endpoint:
    url: str
    target: str  # host:port for gRPC
    secure: bool


def _parse_endpoint(url: str) -> _Endpoint:
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an etcd endpoint URL: {url!r}")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return _Endpoint(url, f"{host}:{parts.port or 2379}", parts.scheme == "https")


def _range_end(key: bytes) -> bytes:
    """The smallest key greater than every key starting with `key` (b"\\0": no upper bound)."""
    raw = bytearray(key)
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"


# -- pages that do not walk the rest of the range ----------------------------------------------
#
# etcd 3.4 collects every key of a range before it applies a limit, so a page of 100 keys from a
# range of 100,000 costs as much as reading them all, and paging through a range is quadratic. A
# page is therefore read through a bounded window [low, high) whose width, as a number over the
# first _WINDOW_BYTES bytes after the range's prefix, is fitted to the density seen last time:
# each request walks about as many keys as it returns.

_WINDOW_BYTES = 48
_SPACE = 1 << (8 * _WINDOW_BYTES)
_MAX_FITS = 10_000
_GROWTH = 16

PageFetch = Callable[[bytes, bytes, int], Awaitable[tuple[list[Any], int]]]


def _position(key: bytes, base: bytes) -> int:
    """Where `key` lies in the space of keys under `base`, as a number."""
    return int.from_bytes(key[len(base) :][:_WINDOW_BYTES].ljust(_WINDOW_BYTES, b"\0"), "big")


def _at(base: bytes, position: int) -> bytes:
    return base + position.to_bytes(_WINDOW_BYTES, "big")


@dataclass
class _Fit:
    """What the last pages under one base taught: a window width that holds about a page, and
    where the first key lies (windows from before it would be empty)."""

    width: int
    first: int


async def bounded_page(
    fetch: PageFetch, base: bytes, low: bytes, high: bytes, limit: int, fits: dict[bytes, _Fit]
) -> list[Any]:
    """The first `limit` keys of [low, high) under `base` (high b"\\0": no end), through fitted windows.

    `fetch(low, high, limit)` reads one window and gives (its keys up to limit, how many it holds).
    `fits` remembers what each base's pages showed, for the next page.
    """
    position = _position(low, base)
    fit = fits.get(base)
    if fit is None:
        # First page under this base: one plain read, whose count fits the windows of the next ones.
        kvs, count = await fetch(low, high, limit)
        if len(fits) > _MAX_FITS:
            fits.clear()
        if kvs:
            first = _position(bytes(kvs[0].key), base)
            span = max(_position(bytes(kvs[-1].key), base) - first, 1)
            width = _SPACE if count <= limit else max(1, span * limit // max(len(kvs), 1))
            fits[base] = _Fit(width, first if low == base else 0)
        return kvs
    found: list[Any] = []
    start = max(position, fit.first) if low == base else position
    width = fit.width
    while True:
        end_position = start + width
        window_end = high if end_position >= _SPACE else _at(base, end_position)
        if high != b"\0" and window_end > high:
            window_end = high
        kvs, count = await fetch(low, window_end, limit - len(found))
        if low == base and kvs:
            fit.first = min(fit.first, _position(bytes(kvs[0].key), base))
        found += kvs
        if len(found) >= limit:
            # The window held `count` keys in `width`: next time take about one page's worth.
            fit.width = max(1, width * limit // max(count, 1))
            return found
        if window_end == high:
            return found
        low, start = window_end, end_position
        width *= _GROWTH if count == 0 else max(2, limit // max(count, 1))


def _classify(exc: grpc.aio.AioRpcError) -> str:
    """'unreached' (safe to resend anything), 'ambiguous' (connection trouble, maybe applied),
    'auth' (token expired: authenticate again), or 'error' (etcd said no)."""
    code = exc.code()
    details = (exc.details() or "").lower()
    if code == grpc.StatusCode.UNAUTHENTICATED and "invalid auth token" in details:
        return "auth"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many requests" in details:
        return "unreached"
    if code in _CONNECTION_CODES:
        if code == grpc.StatusCode.UNAVAILABLE and any(s in details for s in _UNREACHED):
            return "unreached"
        return "ambiguous"
    return "error"


# What etcd answers to a write while its NOSPACE alarm is raised (or the write would pass the quota).
_NOSPACE = "database space exceeded"


def _translate(exc: grpc.aio.AioRpcError, endpoint: str) -> EtcdError | OutOfSpace:
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _NOSPACE in details:
        return OutOfSpace(f"etcd at {endpoint} is out of space (NOSPACE alarm): {details}", backend="etcd")
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return LeaseNotFound(details, code)
    if code in _CONNECTION_CODES or code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return EtcdUnavailable(f"etcd at {endpoint}: {code.name}: {details}", code)
    return EtcdError(f"etcd at {endpoint}: {code.name}: {details}", code)


class _Connection:
    """One gRPC channel to one endpoint, with its stubs and (if auth is on) its token."""

    def __init__(self, index: int, endpoint: _Endpoint, kv: EtcdKV) -> None:
        self.index = index
        self.endpoint = endpoint
        if endpoint.secure or kv._credentials is not None:
            creds = kv._credentials or grpc.ssl_channel_credentials()
            self.channel = grpc.aio.secure_channel(endpoint.target, creds, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(endpoint.target, options=_CHANNEL_OPTIONS)
        self.kv = rpc.KVStub(self.channel)
        self.lease = rpc.LeaseStub(self.channel)
        self.watch = rpc.WatchStub(self.channel)
        self._username = kv.username
        self._password = kv.password
        self._timeout = kv.timeout
        # A member cut off from its cluster's leader answers "no leader" at once (and we move on)
        # instead of holding the request until it times out.
        self.metadata: tuple[tuple[str, str], ...] = _REQUIRE_LEADER
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()

    async def ready(self) -> None:
        if self._username is None or self._token is not None:
            return
        async with self._auth_lock:
            if self._token is None:
                request = rpc.AuthenticateRequest(name=self._username, password=self._password or "")
                resp = await rpc.AuthStub(self.channel).Authenticate(request, timeout=self._timeout)
                self._token = resp.token
                self.metadata = (*_REQUIRE_LEADER, ("token", resp.token))

    def forget_token(self) -> None:
        self._token = None
        self.metadata = _REQUIRE_LEADER

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)


class EtcdKV:
    """The KV contract over etcd v3. Create with `await EtcdKV.open(...)`, or construct and then
    `await kv.connect()` (or `async with EtcdKV(...) as kv`), on the event loop that will use it."""

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        prefix: str = "/wharf/",
        username: str | None = None,
        password: str | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        timeout: float = 5.0,
        layout: str | None = None,
    ) -> None:
        """`layout`: "compact" or "text" to choose the key layout; None (the default) takes the one the
        store has, and the compact one for an empty store."""
        if layout not in (None, "compact", "text"):
            raise ValueError(f"unknown key layout {layout!r}")
        self.layout = layout
        self._tls_files = (ca, cert, key)
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        if password is not None and username is None:
            raise ValueError("an etcd password needs a username")
        self.endpoints = [e.strip() for e in endpoints]
        self._endpoints = [_parse_endpoint(e) for e in self.endpoints]
        self.prefix = prefix
        self._prefix = prefix.encode("utf-8", "surrogateescape")
        # Where this store's keys start: the prefix, and the compact layout's mark after it.
        self._base = self._prefix + (keys.COMPACT_LAYOUT if layout == "compact" else b"")
        self._packed: dict[str, bytes] = {}  # key -> its stored form, for the compact layout
        # Fitted page windows by range prefix (see bounded_page).
        self._widths: dict[bytes, _Fit] = {}
        self.username = username
        self.password = password
        self.timeout = timeout
        self._credentials: grpc.ChannelCredentials | None = None
        if ca is not None or cert is not None:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca),
                private_key=_read(key),
                certificate_chain=_read(cert),
            )
        self._conn: _Connection | None = None
        self._retiring: dict[asyncio.Task[None], _Connection] = {}
        self._watches: set[_EtcdWatch] = set()
        self._closed = False
        # Channels to single members by client URL, for status and defragmentation.
        self._members: dict[str, _Connection] = {}
        self._quotas: dict[str, tuple[float, int]] = {}  # client URL -> (when read, bytes)
        # Point reads under load share round trips (one Txn of Gets), never answering from the past.
        self._points: PointReads[str, KeyValue | None] = PointReads(self._get_one, self._get_many)

    @classmethod
    async def open(cls, endpoints: Sequence[str] | str, prefix: str = "/wharf/", **kwargs: Any) -> EtcdKV:
        """Construct and connect; raises `EtcdUnavailable` if no endpoint answers."""
        kv = cls(endpoints, prefix, **kwargs)
        await kv.connect()
        return kv

    async def connect(self) -> None:
        """Open a channel to the first endpoint that answers (must run on the serving loop)."""
        if self._closed:
            raise RuntimeError("EtcdKV is closed")
        if self._conn is None:
            self._conn = _Connection(0, self._endpoints[0], self)
        try:
            await self.ping()
            if self.layout is None:
                self._use_layout(await self._stored_layout())
        except BaseException:
            conn, self._conn = self._conn, None  # stays usable: connect() may be tried again
            if conn is not None:
                await conn.close()
            raise

    async def __aenter__(self) -> EtcdKV:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def endpoint(self) -> str:
        """The endpoint requests currently go to."""
        return self._endpoints[self._conn.index if self._conn else 0].url

    # -- plumbing -------------------------------------------------------------------------

    async def _stored_layout(self) -> str:
        """The key layout the store has: compact if it has a compact key, text if it has another, and
        compact for an empty store."""
        compact = self._prefix + keys.COMPACT_LAYOUT
        found = await self._range(rpc.RangeRequest(key=compact, range_end=_range_end(compact), limit=1, keys_only=True))
        if found.kvs:
            return "compact"
        # Every store an earlier version started holds its identity; only one without needs the range.
        if (await self._range(rpc.RangeRequest(key=self._prefix + keys.STORE_IDENTITY.encode(), keys_only=True))).kvs:
            return "text"
        text = rpc.RangeRequest(key=self._prefix or b"\0", range_end=_range_end(self._prefix), limit=1, keys_only=True)
        return "text" if (await self._range(text)).kvs else "compact"

    def _use_layout(self, layout: str) -> None:
        self.layout = layout
        self._base = self._prefix + (keys.COMPACT_LAYOUT if layout == "compact" else b"")
        self._packed.clear()

    def _k(self, key: str) -> bytes:
        if self.layout == "compact":
            # Request paths ask for the same few keys again and again (a tag, a manifest, its links).
            stored = self._packed.get(key)
            if stored is None:
                if len(self._packed) >= _PACKED_KEYS:
                    self._packed.clear()
                stored = self._packed[key] = self._base + keys.pack(key)
            return stored
        if self.layout is None:
            raise RuntimeError("EtcdKV is not connected: await connect() first")
        return self._base + key.encode("utf-8", "surrogateescape")

    def _key(self, raw: bytes) -> str:
        """The key a stored key is (without the prefix and the layout's mark)."""
        stored = bytes(raw[len(self._base) :])
        if self.layout == "compact":
            return keys.unpack(stored)
        return stored.decode("utf-8", "surrogateescape")

    def _kv(self, kv: Any) -> KeyValue:
        return KeyValue(
            key=self._key(kv.key),
            value=bytes(kv.value),
            version=kv.version,
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
            lease=kv.lease,
        )

    def _current(self) -> _Connection:
        if self._conn is None:
            raise RuntimeError("EtcdKV is closed" if self._closed else "EtcdKV is not connected: await connect() first")
        return self._conn

    async def _rpc(self, fn: Callable[[_Connection], Awaitable[T]], *, idempotent: bool) -> T:
        """Run `fn` on the current connection, failing over between endpoints as described above."""
        # Every endpoint once, and a couple more for a lone endpoint coming back from a restart.
        max_tries = max(3, len(self._endpoints) + 1)
        tries = 0
        reauthenticated = False
        while True:
            conn = self._current()
            try:
                await conn.ready()
                return await fn(conn)
            except asyncio.CancelledError:
                if not _cancelled_under_us():
                    raise  # our caller is being cancelled
                # The channel was closed under the call: by close(), or retired after a failover.
                if self._closed:
                    raise EtcdError("EtcdKV was closed during the request") from None
                tries += 1
                if conn is self._conn or not idempotent or tries >= max_tries:
                    raise EtcdUnavailable(f"etcd request to {conn.endpoint.url} was cut off") from None
                continue
            except grpc.aio.AioRpcError as exc:
                kind = _classify(exc)
                if kind == "auth" and not reauthenticated:
                    reauthenticated = True
                    conn.forget_token()
                    continue
                if kind in ("unreached", "ambiguous"):
                    self._failover(conn, exc)
                    tries += 1
                    if tries < max_tries and (kind == "unreached" or idempotent):
                        if tries >= len(self._endpoints):
                            # Every endpoint failed once: give a restarting member a moment.
                            await asyncio.sleep(min(0.1 * 2 ** (tries - len(self._endpoints)), 1.0))
                        continue
                raise _translate(exc, conn.endpoint.url) from exc

    def _failover(self, failed: _Connection, exc: BaseException | None = None) -> None:
        """Point new requests at the next endpoint, unless someone already moved on from `failed`."""
        if self._conn is not failed or self._closed:
            return
        index = (failed.index + 1) % len(self._endpoints)
        self._conn = _Connection(index, self._endpoints[index], self)
        if index != failed.index:
            log.warning(
                "etcd endpoint %s failed (%s); using %s", failed.endpoint.url, _brief(exc), self._conn.endpoint.url
            )
        # Let requests still in flight on the old channel finish (or time out) on their own.
        task = asyncio.get_running_loop().create_task(failed.close(grace=self.timeout + 1))
        self._retiring[task] = failed
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        return await self._points.get(key)

    async def _get_one(self, key: str) -> KeyValue | None:
        resp = await self._range(rpc.RangeRequest(key=self._k(key)))
        return self._kv(resp.kvs[0]) if resp.kvs else None

    async def _get_many(self, names: Sequence[str]) -> list[KeyValue | None]:
        return (await self.txn([], [Get(name) for name in names])).gets

    async def range(self, prefix: str, *, start: str | None = None, limit: int = 0) -> list[KeyValue]:
        base = self._k(prefix)
        high = _range_end(base)
        low = base
        if start is not None:
            low = max(low, self._k(start))
            if high != b"\0" and low >= high:
                return []
        if limit <= 0:
            resp = await self._range(rpc.RangeRequest(key=low, range_end=high))
            return [self._kv(kv) for kv in resp.kvs]

        async def fetch(lo: bytes, hi: bytes, want: int) -> tuple[list[Any], int]:
            resp = await self._range(rpc.RangeRequest(key=lo, range_end=hi, limit=want))
            return list(resp.kvs), int(resp.count)

        return [self._kv(kv) for kv in await bounded_page(fetch, base, low, high, limit, self._widths)]

    async def count(self, prefix: str) -> int:
        low = self._k(prefix)
        resp = await self._range(rpc.RangeRequest(key=low, range_end=_range_end(low), count_only=True))
        return int(resp.count)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[_EtcdSnapshot]:
        # Any linearizable read gives the store's current revision; reads at it stay consistent.
        resp = await self._range(rpc.RangeRequest(key=self._prefix or b"\0", count_only=True))
        snapshot = _EtcdSnapshot(self, int(resp.header.revision))
        try:
            yield snapshot
        finally:
            snapshot.closed = True

    async def _range(self, request: Any) -> Any:
        """A linearizable Range (reads are idempotent: retried on the next endpoint)."""
        return await self._rpc(
            lambda c: c.kv.Range(request, timeout=self.timeout, metadata=c.metadata), idempotent=True
        )

    # -- writes ---------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        request = rpc.PutRequest(key=self._k(key), value=bytes(value), lease=lease)
        resp = await self._rpc(lambda c: c.kv.Put(request, timeout=self.timeout, metadata=c.metadata), idempotent=False)
        return int(resp.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        request = self._delete_request(key, prefix)
        resp = await self._rpc(
            lambda c: c.kv.DeleteRange(request, timeout=self.timeout, metadata=c.metadata), idempotent=False
        )
        return int(resp.deleted)

    def _delete_request(self, key: str, prefix: bool) -> Any:
        raw = self._k(key)
        if prefix:
            return rpc.DeleteRangeRequest(key=raw, range_end=_range_end(raw))
        return rpc.DeleteRangeRequest(key=raw)

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        request = rpc.TxnRequest(
            compare=[self._compare(c) for c in compares],
            success=[self._op(op) for op in success],
            failure=[self._op(op) for op in failure],
        )
        read_only = all(isinstance(op, READS) for op in (*success, *failure))
        resp = await self._rpc(
            lambda c: c.kv.Txn(request, timeout=self.timeout, metadata=c.metadata), idempotent=read_only
        )
        gets: list[KeyValue | None] = []
        counts: list[int] = []
        for op, result in zip(success if resp.succeeded else failure, resp.responses, strict=True):
            if isinstance(op, Get):
                kvs = result.response_range.kvs
                gets.append(self._kv(kvs[0]) if kvs else None)
            elif isinstance(op, Count):
                counts.append(int(result.response_range.count))
        return TxnResult(bool(resp.succeeded), gets, int(resp.header.revision), counts)

    def _compare(self, c: Compare) -> Any:
        try:
            message = rpc.Compare(key=self._k(c.key), result=_COMPARE_OPS[c.op], target=_COMPARE_TARGETS[c.target])
        except KeyError as exc:
            raise ValueError(f"unsupported comparison {c!r}") from exc
        operand = c.operand
        if c.target == "value":
            if isinstance(operand, str):
                operand = operand.encode()
            if not isinstance(operand, (bytes, bytearray, memoryview)):
                raise TypeError(f"a value comparison needs bytes, not {type(operand).__name__}")
            message.value = bytes(operand)
        else:
            if not isinstance(operand, int) or isinstance(operand, bool):
                raise TypeError(f"a {c.target} comparison needs an int, not {type(operand).__name__}")
            setattr(message, c.target, operand)
        return message

    def _op(self, op: Op) -> Any:
        if isinstance(op, Put):
            return rpc.RequestOp(request_put=rpc.PutRequest(key=self._k(op.key), value=bytes(op.value), lease=op.lease))
        if isinstance(op, Delete):
            return rpc.RequestOp(request_delete_range=self._delete_request(op.key, op.prefix))
        if isinstance(op, Get):
            return rpc.RequestOp(request_range=rpc.RangeRequest(key=self._k(op.key)))
        if isinstance(op, Count):
            low = self._k(op.prefix)
            return rpc.RequestOp(request_range=rpc.RangeRequest(key=low, range_end=_range_end(low), count_only=True))
        raise TypeError(f"not a transaction op: {op!r}")

    # -- leases ---------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        request = rpc.LeaseGrantRequest(TTL=int(ttl))
        # A grant whose answer was lost leaves an empty lease that expires on its own: safe to retry.
        resp = await self._rpc(
            lambda c: c.lease.LeaseGrant(request, timeout=self.timeout, metadata=c.metadata), idempotent=True
        )
        if resp.error:
            raise EtcdError(f"lease grant failed: {resp.error}")
        return int(resp.ID)

    async def refresh_lease(self, lease: int) -> bool:
        async def keep_alive(c: _Connection) -> bool:
            call = c.lease.LeaseKeepAlive(timeout=self.timeout, metadata=c.metadata)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
                await call.done_writing()
                resp = await call.read()
            finally:
                call.cancel()
            if resp is grpc.aio.EOF:
                raise EtcdUnavailable("etcd closed the keep-alive stream without an answer")
            return int(resp.TTL) > 0  # etcd answers TTL 0 for a lease that has expired

        return await self._rpc(keep_alive, idempotent=True)

    async def revoke_lease(self, lease: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease)
        try:
            await self._rpc(
                lambda c: c.lease.LeaseRevoke(request, timeout=self.timeout, metadata=c.metadata), idempotent=True
            )
        except LeaseNotFound:
            pass  # already expired or revoked: the keys are gone either way

    # -- watch ----------------------------------------------------------------------------

    async def watch(self, prefix: str, *, start_revision: int = 0) -> _EtcdWatch:
        key = self._k(prefix)
        if start_revision <= 0:
            # Pin "after the watch opens" to a revision, so a resumed stream knows where to go on.
            resp = await self._range(rpc.RangeRequest(key=key, count_only=True))
            start_revision = int(resp.header.revision) + 1
        watch = _EtcdWatch(self, key, _range_end(key), start_revision)
        await watch._open()
        self._watches.add(watch)
        return watch

    # -- space ----------------------------------------------------------------------------

    async def space(self) -> StoreSpace:
        """Every member's database size, size in use, quota, revision and alarms.

        The quota is read from the member's `/metrics` (etcd_server_quota_backend_bytes): etcd 3.4's
        status does not carry it. A member that does not answer is listed with its error.
        """
        members = await self._rpc(
            lambda c: rpc.ClusterStub(c.channel).MemberList(
                rpc.MemberListRequest(), timeout=self.timeout, metadata=c.metadata
            ),
            idempotent=True,
        )
        alarms = await self._alarms()
        found = await asyncio.gather(*(self._member_space(m, alarms) for m in members.members))
        return StoreSpace("etcd", tuple(sorted(found, key=lambda m: m.name)))

    async def _alarms(self) -> dict[int, list[str]]:
        request = rpc.AlarmRequest(action=rpc.AlarmRequest.GET, memberID=0, alarm=rpc.NONE)
        resp = await self._rpc(
            lambda c: rpc.MaintenanceStub(c.channel).Alarm(request, timeout=self.timeout, metadata=c.metadata),
            idempotent=True,
        )
        found: dict[int, list[str]] = {}
        for alarm in resp.alarms:
            found.setdefault(int(alarm.memberID), []).append(rpc.AlarmType.Name(alarm.alarm))
        return found

    def _member_url(self, member: Any) -> str:
        urls = [str(u) for u in member.clientURLs]
        for url in urls:
            if url.rstrip("/") in (e.rstrip("/") for e in self.endpoints):
                return url
        return urls[0] if urls else ""

    def member_connection(self, url: str) -> _Connection:
        conn = self._members.get(url)
        if conn is None:
            conn = self._members[url] = _Connection(-1, _parse_endpoint(url), self)
        return conn

    async def _member_space(self, member: Any, alarms: dict[int, list[str]]) -> MemberSpace:
        url = self._member_url(member)
        member_id = f"{int(member.ID):x}"
        try:
            if not url:
                raise EtcdError(f"member {member.name or member_id} has no client URL")
            conn = self.member_connection(url)
            await conn.ready()
            status = await self._on_member(
                conn, lambda: rpc.MaintenanceStub(conn.channel).Status(rpc.StatusRequest(), timeout=self.timeout)
            )
        except (EtcdError, OSError) as exc:
            return MemberSpace(
                url, 0, 0, 0, 0, tuple(alarms.get(int(member.ID), ())), member_id=member_id, error=str(exc)
            )
        size = int(status.dbSize)
        return MemberSpace(
            url,
            size=size,
            in_use=int(status.dbSizeInUse) or size,
            quota=await self._quota(url, fresh_if_below=size / 0.8 if not alarms.get(int(member.ID)) else None),
            revision=int(status.header.revision),
            alarms=tuple(alarms.get(int(member.ID), ())),
            leader=int(status.leader) == int(status.header.member_id),
            member_id=member_id,
        )

    async def _on_member(self, conn: _Connection, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, conn.endpoint.url) from exc

    async def _quota(self, url: str, fresh_if_below: float | None) -> int:
        """The member's quota, read again once a minute, and at every call while it has an alarm raised
        or is near its quota (an operator raising it is seen at once). `fresh_if_below`: None reads anew."""
        cached = self._quotas.get(url)
        if (
            cached is not None
            and fresh_if_below is not None
            and cached[1] > fresh_if_below
            and time.monotonic() - cached[0] < _QUOTA_CACHE_SECONDS
        ):
            return cached[1]
        try:
            quota = await asyncio.to_thread(_read_quota, url, self._tls_files, self.timeout)
        except (OSError, ValueError) as exc:
            log.debug("cannot read the quota of etcd member %s: %s", url, exc)
            quota = 0
        self._quotas[url] = (time.monotonic(), quota)
        return quota

    async def compact(self, revision: int) -> None:
        """Forget every revision before `revision` (the current state stays); already done is fine.

        Returns once the history is gone from the database, not when etcd has only scheduled it: a
        defragmentation right after (`wharf coordinator defrag`) must find the space free, or it
        shrinks nothing and a full store stays full.
        """
        request = rpc.CompactionRequest(revision=revision, physical=True)
        try:
            await self._rpc(
                lambda c: c.kv.Compact(request, timeout=max(self.timeout, _COMPACT_TIMEOUT), metadata=c.metadata),
                idempotent=True,
            )
        except EtcdError as exc:
            if "has been compacted" not in str(exc):
                raise

    async def defragment(self, member: str | None = None) -> None:
        """Give a member's free pages back to the disk (it answers nothing else meanwhile)."""
        conn = self.member_connection(member or self.endpoint)
        await conn.ready()
        await self._on_member(
            conn,
            lambda: rpc.MaintenanceStub(conn.channel).Defragment(
                rpc.DefragmentRequest(), timeout=_DEFRAGMENT_TIMEOUT, metadata=conn.metadata
            ),
        )

    async def disarm(self) -> tuple[str, ...]:
        """Clear every member's NOSPACE alarm; returns the alarms cleared. A write that still does not
        fit raises it again."""
        cleared = []
        for member_id, names in (await self._alarms()).items():
            if "NOSPACE" not in names:
                continue
            request = rpc.AlarmRequest(action=rpc.AlarmRequest.DEACTIVATE, memberID=member_id, alarm=rpc.NOSPACE)

            def deactivate(c: _Connection, r: Any = request) -> Awaitable[Any]:
                return rpc.MaintenanceStub(c.channel).Alarm(r, timeout=self.timeout, metadata=c.metadata)

            await self._rpc(deactivate, idempotent=True)
            cleared.append("NOSPACE")
        return tuple(cleared)

    # -- lifecycle ------------------------------------------------------------------------

    async def ping(self) -> None:
        """A linearizable read: raises `EtcdUnavailable` unless a member with a leader answers."""
        await self._range(rpc.RangeRequest(key=self._prefix or b"\0", count_only=True))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch in list(self._watches):
            await watch.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        await self._points.drain()
        for member in list(self._members.values()):
            await member.close()
        self._members.clear()
        retiring = list(self._retiring.items())
        for _, old in retiring:
            await old.close()  # no more grace: cancels what is left on it
        for task, _ in retiring:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass


class _EtcdSnapshot:
    """Ranges at one fixed revision: etcd serves them from its history until it is compacted."""

    backend = "etcd"

    def __init__(self, kv: EtcdKV, revision: int) -> None:
        self._kv = kv
        self.revision = revision
        self.closed = False

    async def _at_revision(self, request: Any) -> Any:
        if self.closed:
            raise RuntimeError("the snapshot is closed")
        request.revision = self.revision
        try:
            return await self._kv._range(request)
        except EtcdError as exc:
            if exc.code == grpc.StatusCode.OUT_OF_RANGE:
                raise SnapshotLost(
                    f"etcd compacted its history past revision {self.revision} while the snapshot was read"
                ) from exc
            raise

    async def range(self, prefix: str, *, start: str | None = None, limit: int = 0) -> list[KeyValue]:
        kv = self._kv
        base = kv._k(prefix)
        high = _range_end(base)
        low = base
        if start is not None:
            low = max(low, kv._k(start))
            if high != b"\0" and low >= high:
                return []
        if limit <= 0:
            resp = await self._at_revision(rpc.RangeRequest(key=low, range_end=high))
            return [kv._kv(item) for item in resp.kvs]

        async def fetch(lo: bytes, hi: bytes, want: int) -> tuple[list[Any], int]:
            resp = await self._at_revision(rpc.RangeRequest(key=lo, range_end=hi, limit=want))
            return list(resp.kvs), int(resp.count)

        return [kv._kv(item) for item in await bounded_page(fetch, base, low, high, limit, kv._widths)]

    async def count(self, prefix: str) -> int:
        low = self._kv._k(prefix)
        resp = await self._at_revision(rpc.RangeRequest(key=low, range_end=_range_end(low), count_only=True))
        return int(resp.count)


class _EtcdWatch:
    """One etcd watch stream over a key range, resumed on the next endpoint if its stream breaks."""

    def __init__(self, kv: EtcdKV, key: bytes, range_end: bytes, start_revision: int) -> None:
        self._kv = kv
        self._key = key
        self._range_end = range_end
        self._next = start_revision  # the first revision not yet received
        self._conn: _Connection | None = None
        self._call: Any = None
        self._pending: collections.deque[WatchEvent] = collections.deque()
        self._closed = False

    async def _open(self) -> None:
        """Create the stream (from `self._next`) on a working endpoint and wait until etcd confirms it."""
        kv = self._kv
        max_tries = max(2, len(kv._endpoints))
        tries = 0
        while True:
            if self._closed:
                return
            conn = kv._current()
            call = None
            try:
                await conn.ready()
                call = conn.watch.Watch(metadata=conn.metadata)
                create = rpc.WatchCreateRequest(key=self._key, range_end=self._range_end, start_revision=self._next)
                await call.write(rpc.WatchRequest(create_request=create))
                resp = await asyncio.wait_for(call.read(), kv.timeout)
            except asyncio.CancelledError:
                if not _cancelled_under_us():
                    raise
                if self._closed or kv._closed:
                    return
                tries += 1  # the channel was retired under us: go again on the current one
                if tries >= max_tries:
                    raise EtcdUnavailable("cannot open an etcd watch: the stream was cut off") from None
                continue
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                if call is not None:
                    call.cancel()
                if isinstance(exc, TimeoutError):
                    kind = "ambiguous"
                else:
                    kind = _classify(exc)
                    if kind == "auth" and tries == 0:
                        conn.forget_token()
                        tries += 1
                        continue
                if kind not in ("unreached", "ambiguous"):
                    assert isinstance(exc, grpc.aio.AioRpcError)
                    raise _translate(exc, conn.endpoint.url) from exc
                kv._failover(conn, exc)
                tries += 1
                if tries >= max_tries:
                    raise EtcdUnavailable(f"cannot open an etcd watch: {_brief(exc)}") from exc
                continue
            if resp is grpc.aio.EOF or not resp.created or resp.canceled:
                call.cancel()
                reason = "stream ended" if resp is grpc.aio.EOF else resp.cancel_reason or "cancelled"
                raise EtcdError(f"etcd refused the watch: {reason}")
            if self._closed:
                call.cancel()
                return
            self._conn, self._call = conn, call
            return

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[WatchEvent]:
        kv = self._kv
        while True:
            while self._pending:
                yield self._pending.popleft()
            if self._closed or self._call is None:
                return
            call, conn = self._call, self._conn
            assert conn is not None
            try:
                resp = await call.read()
            except asyncio.CancelledError:
                if not _cancelled_under_us():
                    raise  # the consumer is being cancelled
                if self._closed or kv._closed:
                    return  # close() cancelled the stream
                # The stream's channel was retired after a failover: resume on the current one.
                await self._open()
                continue
            except grpc.aio.AioRpcError as exc:
                if self._closed:
                    return
                kind = _classify(exc)
                if kind not in ("unreached", "ambiguous", "auth"):
                    raise _translate(exc, conn.endpoint.url) from exc
                log.warning(
                    "etcd watch stream at %s broke (%s); resuming from revision %d",
                    conn.endpoint.url,
                    _brief(exc),
                    self._next,
                )
                if kind == "auth":
                    conn.forget_token()
                else:
                    kv._failover(conn, exc)
                await self._open()
                continue
            if self._closed:
                return
            if resp is grpc.aio.EOF:
                log.warning(
                    "etcd closed a watch stream at %s; resuming from revision %d", conn.endpoint.url, self._next
                )
                call.cancel()
                await self._open()
                continue
            if resp.compact_revision:
                call.cancel()
                self._call = None
                raise RevisionCompacted(int(resp.compact_revision))
            if resp.canceled:
                call.cancel()
                self._call = None
                raise EtcdError(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason given'}")
            for event in resp.events:
                item = event.kv
                self._pending.append(
                    WatchEvent(
                        "delete" if event.type == rpc.Event.DELETE else "put",
                        kv._key(item.key),
                        bytes(item.value) if event.type != rpc.Event.DELETE else b"",
                        int(item.mod_revision),
                    )
                )
                self._next = int(item.mod_revision) + 1

    async def close(self) -> None:
        self._closed = True
        self._kv._watches.discard(self)
        call, self._call = self._call, None
        if call is not None:
            call.cancel()


_QUOTA_CACHE_SECONDS = 60.0
# Stored forms of keys remembered by one client (about 1 MB at most).
_PACKED_KEYS = 8192
_COMPACT_TIMEOUT = 60.0
_DEFRAGMENT_TIMEOUT = 600.0
_QUOTA_LINE = re.compile(rb"^etcd_server_quota_backend_bytes\s+(\S+)\s*$", re.MULTILINE)


def _read_quota(url: str, tls: tuple[str | None, str | None, str | None], timeout: float) -> int:
    """A member's --quota-backend-bytes, from its Prometheus metrics."""
    ca, cert, key = tls
    context = None
    if url.startswith("https"):
        context = ssl.create_default_context(cafile=ca)
        if cert and key:
            context.load_cert_chain(cert, key)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    with opener.open(url.rstrip("/") + "/metrics", timeout=timeout) as response:
        match = _QUOTA_LINE.search(response.read())
    if match is None:
        raise ValueError("no etcd_server_quota_backend_bytes in its metrics")
    return int(float(match.group(1)))


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _cancelled_under_us() -> bool:
    """True when a CancelledError came from a gRPC call cancelled locally (its channel closed),
    not from a cancellation of the task we run in."""
    task = asyncio.current_task()
    return task is None or task.cancelling() == 0


def _brief(exc: BaseException | None) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)
