"""What the request handlers share: configuration, storage, coordinator records and caches."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from coordinator.kv import KV
from coordinator.lease import NodeLease
from coordinator.metadata import Metadata
from coordinator.uploads import UploadSessions

from .caches import BlobLocations, ListCache, ManifestCache
from .config import Config
from .metrics import InstrumentedKV, InstrumentedStorage, Metrics
from .notifications import Notifier
from .policies import Policies
from .readonly import ReadOnly
from .storage.driver import StorageDriver
from .touches import Touches
from .trust import Trust
from .upload import Uploader


@dataclass
class Services:
    """Everything a node's handlers and jobs share, built once by `build`."""

    config: Config
    kv: KV
    storage: StorageDriver
    metadata: Metadata
    sessions: UploadSessions
    uploader: Uploader
    manifests: ManifestCache
    blobs: BlobLocations
    metrics: Metrics
    node_id: str
    tag_lists: ListCache
    catalog: ListCache
    touches: Touches
    policies: Policies
    readonly: ReadOnly
    notifier: Notifier
    trust: Trust

    @classmethod
    def build(cls, config: Config, kv: KV, storage: StorageDriver, metrics: Metrics | None = None) -> Services:
        metrics = metrics or Metrics()
        kv = InstrumentedKV(kv, metrics)
        storage = InstrumentedStorage(storage, metrics)
        metadata = Metadata(kv)
        sessions = UploadSessions(kv)
        lease = NodeLease(kv, max(config.cluster.leasettl, 2))
        policies = Policies.from_config(config)
        uploader = Uploader(
            storage,
            sessions,
            metadata,
            lease,
            quotas_for=policies.quota_scopes,
            max_sessions=config.http.uploads.maxsessions,
        )
        manifests = ManifestCache(metrics)
        blobs = BlobLocations(metadata, metrics)
        trust = Trust(
            config.signatures.policies,
            metadata=metadata,
            storage=storage,
            manifests=manifests,
            blobs=blobs,
            metrics=metrics,
        )
        return cls(
            config=config,
            kv=kv,
            storage=storage,
            metadata=metadata,
            sessions=sessions,
            uploader=uploader,
            manifests=manifests,
            blobs=blobs,
            metrics=metrics,
            node_id=config.cluster.node or f"{socket.gethostname()}:{config.http.listen.port or 'unix'}:{os.getpid()}",
            tag_lists=ListCache(metrics, "tag_list"),
            catalog=ListCache(metrics, "catalog"),
            touches=Touches(metadata, config.gc.grace),
            policies=policies,
            readonly=ReadOnly(config.storage.maintenance.readonly.enabled, kv),
            notifier=Notifier(config, kv, metrics),
            trust=trust,
        )

    async def close(self) -> None:
        await self.uploader.lease.close()
        await self.storage.close()
        await self.kv.close()
