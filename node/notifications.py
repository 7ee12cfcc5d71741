"""Webhook notifications as Distribution sends them, queued durably in the coordinator.

Request side (`Notifier`): handlers build Distribution's events (push, pull, mount, delete, with
target, request, actor and source records) and hand them to the coordinator with the change they
describe, in its transaction; pulls are recorded (in batches shared by concurrent requests) before
they are answered. Delivery (`Dispatcher`) is one of the leader's jobs: it moves events in commit
order to a queue per endpoint and repository partition and posts each queue's events in order, with
Distribution's timeout, threshold and backoff, until the endpoint accepts them. A new leader picks up
where a dead one stopped: delivery is at least once, in order per repository, and every event keeps
its id. `wharf notifications status` shows each endpoint's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from coordinator import keys
from coordinator import notifications as queue
from coordinator.kv import KV, KeyValue, Op

from .config import Config, NotificationEndpoint

if TYPE_CHECKING:
    from .metrics import Metrics
    from .services import Services

log = logging.getLogger("wharf.notifications")

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
# What Distribution names a blob's media type in its events: it does not know better.
BLOB_MEDIA_TYPE = "application/octet-stream"
# Events per envelope when a queue has a backlog, and the most bytes an envelope carries.
_ENVELOPE_EVENTS = 32
_ENVELOPE_BYTES = 1024 * 1024
# Pull events recorded in one transaction, at most.
_RECORD_BATCH = 100
_RETRY_SECONDS = 0.05
_IDLE_SECONDS = 5.0
_REPORT_SECONDS = 1.0
_GAUGE_SECONDS = 5.0

Event = tuple[str, bytes]  # (inbox record name, JSON)
_created = itertools.count()


def _no_events(_: Any) -> list[Op]:
    return []


def references(body: bytes) -> list[dict[str, Any]]:
    """The descriptors a manifest names (config and layers, or an index's manifests), as events list them."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    named = doc.get("manifests") if "manifests" in doc else [doc.get("config"), *(doc.get("layers") or [])]
    return [{k: d[k] for k in ("mediaType", "size", "digest") if k in d} for d in named or [] if isinstance(d, dict)]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class Notifier:
    """Builds events for requests and records them; inert (one attribute test) without endpoints."""

    def __init__(self, config: Config, kv: KV, metrics: Metrics) -> None:
        settings = config.notifications
        self.endpoints = [e for e in settings.endpoints if not e.disabled]
        self.enabled = bool(self.endpoints)
        self.include_references = settings.events.includereferences
        self.kv = kv
        self.metrics = metrics
        listen = config.http.listen
        where = f"{socket.gethostname()}:{listen.port}" if not listen.path else f"{socket.gethostname()}:{listen.path}"
        self.source = {"addr": where, "instanceID": str(uuid.uuid4())}
        self.host = config.http.host.rstrip("/")
        self.prefix = config.http.prefix.rstrip("/")
        self._waiting: list[tuple[list[Event], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def wants(self, action: str, media_type: str | None = None) -> bool:
        return self.enabled and any(e.accepts(action, media_type) for e in self.endpoints)

    def route(self, event: dict[str, Any]) -> list[str]:
        """The endpoints that take this event (Distribution's ignore rules)."""
        action, media_type = event.get("action", ""), event.get("target", {}).get("mediaType")
        return [e.name for e in self.endpoints if e.accepts(action, media_type)]

    # -- building events --------------------------------------------------------------------

    def _url(self, request: Request, path: str) -> str:
        base = self.host or f"{request.url.scheme}://{request.headers.get('host') or request.url.netloc}"
        return f"{base}{self.prefix}{path}"

    def _event(self, request: Request, action: str, target: dict[str, Any]) -> Event:
        state = request.scope.get("state", {})
        forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
        client = request.scope.get("client")
        addr = forwarded or (f"{client[0]}:{client[1]}" if client else "")
        user = state.get("user")
        event_id = str(uuid.uuid4())
        # Events of one transaction share its revision: the record's name keeps their order.
        record = f"{time.time_ns():020d}.{next(_created) % 1_000_000:06d}.{event_id}"
        event = {
            "id": event_id,
            "timestamp": _now(),
            "action": action,
            "target": target,
            "request": {
                "id": state.get("request_id", ""),
                "addr": addr,
                "host": request.headers.get("host", ""),
                "method": request.method,
                "useragent": request.headers.get("user-agent", ""),
            },
            "actor": {"name": user} if user else {},
            "source": self.source,
        }
        return record, json.dumps(event, separators=(",", ":")).encode()

    def manifest(
        self,
        request: Request,
        action: str,
        repository: str,
        digest: str,
        media_type: str,
        size: int,
        *,
        tag: str | None = None,
        references: Sequence[dict[str, Any]] = (),
    ) -> Event:
        target: dict[str, Any] = {
            "mediaType": media_type,
            "size": size,
            "digest": digest,
            "length": size,
            "repository": repository,
            "url": self._url(request, f"/v2/{repository}/manifests/{digest}"),
        }
        if tag:
            target["tag"] = tag
        if self.include_references and references:
            target["references"] = list(references)
        return self._event(request, action, target)

    def blob(
        self, request: Request, action: str, repository: str, digest: str, size: int, *, source: str | None = None
    ) -> Event:
        target: dict[str, Any] = {
            "mediaType": BLOB_MEDIA_TYPE,
            "size": size,
            "digest": digest,
            "length": size,
            "repository": repository,
        }
        if source:
            target["fromRepository"] = source
        target["url"] = self._url(request, f"/v2/{repository}/blobs/{digest}")
        return self._event(request, action, target)

    def deleted(self, request: Request, repository: str, *, digest: str | None = None, tag: str | None = None) -> Event:
        """A manifest or blob (by digest) or a tag gone: Distribution sends only these two fields."""
        target: dict[str, Any] = {"digest": digest} if digest else {}
        target["repository"] = repository
        if tag:
            target["tag"] = tag
        return self._event(request, "delete", target)

    # -- what handlers hand to the coordinator ------------------------------------------------

    def blob_events(
        self, request: Request, action: str, repository: str, digest: str, *, source: str | None = None
    ) -> Callable[[int], list[Op]]:
        """Records for a blob event, given the blob's size (known only once it is stored)."""
        if not self.wants(action, BLOB_MEDIA_TYPE):
            return _no_events
        return lambda size: self.ops(self.blob(request, action, repository, digest, size, source=source))

    def delete_events(self, request: Request, repository: str, *, digest: str) -> Callable[[list[str]], list[Op]]:
        """Records for a manifest deleted by digest and for each of its tags that went with it."""
        if not self.wants("delete"):
            return _no_events
        return lambda tags: self.ops(
            self.deleted(request, repository, digest=digest),
            *(self.deleted(request, repository, tag=tag) for tag in tags),
        )

    # -- recording ----------------------------------------------------------------------------

    def ops(self, *events: Event | None) -> list[Op]:
        """Inbox records for the transaction of the change the events describe."""
        return [queue.inbox_put(name, body) for name, body in (e for e in events if e is not None)]

    async def record(self, *events: Event) -> None:
        """Record events no other write carries (pulls) before the request is answered.

        Concurrent requests share one transaction. A coordinator that cannot take them does not
        fail the pull: the loss is logged and counted.
        """
        if not events:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((list(events), done))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        try:
            await done
        except Exception as exc:
            self.metrics.notifications_unrecorded.inc(len(events))
            log.warning("could not record %d notification event(s): %s", len(events), exc)

    async def _flush(self) -> None:
        while self._waiting:
            batch: list[tuple[list[Event], asyncio.Future[None]]] = []
            count = 0
            while self._waiting and count + len(self._waiting[0][0]) <= _RECORD_BATCH:
                item = self._waiting.pop(0)
                batch.append(item)
                count += len(item[0])
            if not batch:
                batch.append(self._waiting.pop(0))
            try:
                await queue.record(self.kv, [event for events, _ in batch for event in events])
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)


# -- delivery, by the leader ---------------------------------------------------------------------


class _Endpoint:
    """One endpoint's delivery: Distribution's breaker (threshold, backoff) shared by its queues."""

    def __init__(self, settings: NotificationEndpoint, metrics: Metrics, node: str) -> None:
        self.settings = settings
        self.name = settings.name
        self.status = queue.DeliveryStatus(node=node)
        self.dirty = True
        self._metrics = metrics
        headers = [("Content-Type", EVENTS_MEDIA_TYPE), ("User-Agent", "wharf-notifications")]
        self.headers = headers + [(name, value) for name, values in settings.headers.items() for value in values]
        self._logged_failure = 0.0

    async def wait_turn(self) -> None:
        """After `threshold` failures in a row, wait `backoff` from the last one before trying again."""
        if self.status.failures >= self.settings.threshold:
            wait = self.status.last_failure + self.settings.backoff_seconds - time.time()
            self.status.backing_off_until = self.status.last_failure + self.settings.backoff_seconds
            if wait > 0:
                await asyncio.sleep(wait)

    async def post(self, client: Any, items: list[KeyValue]) -> bool:
        import httpx

        body = b'{"events":[' + b",".join(item.value for item in items) + b"]}"
        count = len(items)
        events = self._metrics.notifications_events
        started = time.perf_counter()
        try:
            response = await client.post(
                self.settings.url, content=body, headers=self.headers, timeout=self.settings.timeout_seconds
            )
        except httpx.HTTPError as exc:
            events.labels("Errors", self.name).inc(count)
            self._failed(f"{type(exc).__name__}: {exc}"[:300])
            return False
        finally:
            self._metrics.notifications_delivery.labels(self.name).observe(time.perf_counter() - started)
        code = f"{response.status_code} {response.reason_phrase}".strip()
        self._metrics.notifications_status.labels(code, self.name).inc(count)
        self.status.statuses[code] = self.status.statuses.get(code, 0) + count
        if 200 <= response.status_code < 400:
            events.labels("Successes", self.name).inc(count)
            if self.status.failures:
                log.info("notification endpoint %s accepts events again", self.name)
            self.status.failures = 0
            self.status.backing_off_until = 0.0
            self.status.last_success = time.time()
            self.status.delivered += count
            self.dirty = True
            return True
        events.labels("Failures", self.name).inc(count)
        self._failed(f"response status {code} unaccepted")
        return False

    def _failed(self, error: str) -> None:
        status = self.status
        status.failures += 1
        status.last_failure = time.time()
        status.last_error = error
        self.dirty = True
        if status.failures == 1 or time.monotonic() - self._logged_failure > 30:
            self._logged_failure = time.monotonic()
            log.warning(
                "notification endpoint %s (%s): %s; retrying%s",
                self.name,
                self.settings.url,
                error,
                f", backing off {self.settings.backoff_seconds:g}s between tries"
                if status.failures >= self.settings.threshold
                else "",
                extra={"fields": {"endpoint": self.name, "failures": status.failures, "error": error}},
            )


class Dispatcher:
    """The leader's delivery: sequence the inbox, post every queue in order, report progress."""

    def __init__(self, services: Services) -> None:
        self.kv = services.kv
        self.notifier = services.notifier
        self.metrics = services.metrics
        self.endpoints = [_Endpoint(e, services.metrics, services.node_id) for e in self.notifier.endpoints]
        self._inbox = asyncio.Event()
        self._wake = {(e.name, shard): asyncio.Event() for e in self.endpoints for shard in range(queue.PARTITIONS)}

    async def run(self) -> None:
        import httpx

        async with httpx.AsyncClient(follow_redirects=True) as client:
            tasks = [self._sequence(), self._watch_inbox(), self._report()]
            tasks += [self._deliver(client, e, shard) for e in self.endpoints for shard in range(queue.PARTITIONS)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for endpoint in self.endpoints:
                    # Only the leader reports the cluster's queues.
                    self.metrics.notifications_pending.labels(endpoint.name).set(0)
                    self.metrics.notifications_oldest.labels(endpoint.name).set(0)
                self.metrics.notifications_inbox.set(0)

    async def _sequence(self) -> None:
        while True:
            self._inbox.clear()
            try:
                moved = await queue.sequence(self.kv, self.notifier.route)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("notification events could not be queued: %s; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for (name, shard), count in moved.items():
                self.metrics.notifications_events.labels("Events", name).inc(count)
                self._wake[(name, shard)].set()
            if not moved:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._inbox.wait(), 1.0)

    async def _watch_inbox(self) -> None:
        while True:
            try:
                watch = await self.kv.watch(keys.NOTIFY_INBOX)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(1.0)
                continue
            try:
                self._inbox.set()  # anything written before the watch opened
                async for event in watch:
                    if event.type == "put":
                        self._inbox.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(_RETRY_SECONDS)
            finally:
                with contextlib.suppress(Exception):
                    await watch.close()

    async def _deliver(self, client: Any, endpoint: _Endpoint, shard: int) -> None:
        wake = self._wake[(endpoint.name, shard)]
        while True:
            wake.clear()
            try:
                items = await queue.queued(self.kv, endpoint.name, shard, _ENVELOPE_EVENTS)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(1.0)
                continue
            if not items:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), _IDLE_SECONDS)
                continue
            size = 0
            for i, item in enumerate(items):
                size += len(item.value)
                if i and size > _ENVELOPE_BYTES:
                    items = items[:i]
                    break
            await endpoint.wait_turn()
            if not await endpoint.post(client, items):
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            await self._acknowledge(items)

    async def _acknowledge(self, items: list[KeyValue]) -> None:
        for attempt in range(5):
            try:
                await queue.delivered(self.kv, items)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt == 4:
                    log.warning(
                        "delivered events could not be dropped from their queue (%s): they will be sent again", exc
                    )
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _report(self) -> None:
        last_gauges = 0.0
        while True:
            for endpoint in self.endpoints:
                if endpoint.dirty:
                    endpoint.dirty = False
                    try:
                        await queue.write_status(self.kv, endpoint.name, endpoint.status)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        endpoint.dirty = True
            if time.monotonic() - last_gauges >= _GAUGE_SECONDS:
                last_gauges = time.monotonic()
                with contextlib.suppress(Exception):
                    await self._gauges()
            await asyncio.sleep(_REPORT_SECONDS)

    async def _gauges(self) -> None:
        self.metrics.notifications_inbox.set(await self.kv.count(keys.NOTIFY_INBOX))
        for endpoint in self.endpoints:
            self.metrics.notifications_pending.labels(endpoint.name).set(await queue.pending(self.kv, endpoint.name))
            oldest = await queue.oldest(self.kv, endpoint.name)
            self.metrics.notifications_oldest.labels(endpoint.name).set(time.time() - oldest if oldest else 0)


async def endpoint_report(kv: KV, config: Config) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    configured = {e.name: e for e in config.notifications.endpoints}
    names = list(configured) + [n for n in await queue.queued_endpoints(kv) if n not in configured]
    now = time.time()
    for name in names:
        settings = configured.get(name)
        status = await queue.read_status(kv, name)
        oldest = await queue.oldest(kv, name)
        rows.append(
            {
                "endpoint": name,
                "url": settings.url if settings else None,
                "state": "not configured" if settings is None else ("disabled" if settings.disabled else "enabled"),
                "pending": await queue.pending(kv, name),
                "oldest_pending_seconds": round(now - oldest, 3) if oldest else None,
                "delivered": status.delivered if status else 0,
                "consecutive_failures": status.failures if status else 0,
                "last_success": status.last_success or None if status else None,
                "last_failure": status.last_failure or None if status else None,
                "last_error": status.last_error or None if status else None,
                "delivering_node": status.node if status else None,
                "statuses": status.statuses if status else {},
            }
        )
    leader = await kv.get(keys.leader("maintenance"))
    return {
        "unsequenced": await kv.count(keys.NOTIFY_INBOX),
        "leader": leader.value.decode() if leader else None,
        "endpoints": rows,
    }
