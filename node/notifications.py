"""Webhook notifications as Distribution sends them, queued durably in the coordinator.

Request side (`Notifier`): handlers build Distribution's events (push, pull, mount, delete, with
target, request, actor and source records) and hand them to the coordinator with the change they
describe, in its transaction; pulls are recorded (in batches shared by concurrent requests) before
they are answered. Delivery is the leader's job (node/delivery.py).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from starlette.requests import Request

from coordinator import notifications as queue
from coordinator.kv import KV, Op

from .config import Config
from .metrics import Metrics

log = logging.getLogger("wharf.notifications")

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
# What Distribution names a blob's media type in its events: it does not know better.
BLOB_MEDIA_TYPE = "application/octet-stream"
# Pull events recorded in one transaction, at most.
_RECORD_BATCH = 100

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
