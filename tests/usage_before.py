"""The storage figures' records as every Wharf version before the compact ones kept them, for tests
that compare against them or rewrite a store into that form."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict

from coordinator import keys
from coordinator.kv import KV, KeyValue
from coordinator.usage import ScopeUsage, Usage, namespaces_of


def as_json(fields: dict) -> bytes:  # type: ignore[type-arg]
    return json.dumps(fields, separators=(",", ":")).encode()


async def object_records(usage: Usage, object_key: str) -> list[tuple[str, bytes]]:
    """An object's records in the earlier form: a JSON summary, and a JSON holder record per repository."""
    digest = object_key[len(keys.USAGE_OBJECTS) :]
    holders = await usage.holders(digest)
    namespaces: dict[str, list[int]] = {}
    for repo, holding in sorted(holders.items()):
        for namespace in namespaces_of(repo):
            counts = namespaces.setdefault(namespace, [0, 0])
            counts[0] += 1
            counts[1] += int(holding.manifest)
    summary = {
        "size": next(iter(holders.values())).size,
        "repositories": len(holders),
        "manifests": sum(holding.manifest for holding in holders.values()),
        "namespaces": namespaces,
    }
    return [(object_key, as_json(summary))] + [
        (keys.usage_holder(digest, repo), as_json(asdict(h))) for repo, h in sorted(holders.items())
    ]


def counter_record(record: KeyValue) -> tuple[str, bytes]:
    return record.key, as_json(asdict(ScopeUsage.decode(record.value)))


async def earlier_form(kv: KV, records: Iterable[KeyValue]) -> list[tuple[str, bytes]]:
    """The storage figures' records among `records`, each as the earlier versions kept it."""
    usage = Usage(kv)
    earlier: list[tuple[str, bytes]] = []
    for record in records:
        if record.key.startswith(keys.USAGE_OBJECTS):
            earlier += await object_records(usage, record.key)
        elif record.key.startswith((keys.USAGE_SCOPES, keys.USAGE_TOTAL)):
            earlier.append(counter_record(record))
    return earlier
