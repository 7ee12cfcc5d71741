"""Webhook delivery, one of the leader's jobs: the events Notifier (node/notifications.py) queued in
the coordinator, moved in commit order to a queue per endpoint and repository partition and posted
in order, with Distribution's timeout, threshold and backoff, until the endpoint accepts them. A new
leader picks up where a dead one stopped: delivery is at least once, in order per repository, and
every event keeps its id. `endpoint_report` is what `wharf notifications status` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from coordinator import notifications as queue
from coordinator.election import current_leader
from coordinator.kv import KV, KeyValue

from .config import Config, NotificationEndpoint
from .metrics import Metrics
from .notifications import EVENTS_MEDIA_TYPE
from .services import Services

log = logging.getLogger("wharf.notifications")

# Events per envelope when a queue has a backlog, and the most bytes an envelope carries.
_ENVELOPE_EVENTS = 32
_ENVELOPE_BYTES = 1024 * 1024
_RETRY_SECONDS = 0.05
_IDLE_SECONDS = 5.0
_REPORT_SECONDS = 1.0
_GAUGE_SECONDS = 5.0


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
                watch = await queue.watch_inbox(self.kv)
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
        self.metrics.notifications_inbox.set(await queue.unsequenced(self.kv))
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
    return {
        "unsequenced": await queue.unsequenced(kv),
        "leader": await current_leader(kv, "maintenance"),
        "endpoints": rows,
    }
