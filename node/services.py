"""What the request handlers share: configuration, storage, coordinator records and caches."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from coordinator.kv import KV
from coordinator.lease import NodeLease
from coordinator.metadata import Metadata
from coordinator.repositories import RepositoryRemover
from coordinator.uploads import UploadSessions
from coordinator.usage import Usage

from .caches import BlobLocations, ListCache, ManifestCache
from .config import Config
from .inventory import TagDetails
from .metrics import InstrumentedKV, InstrumentedStorage, Metrics
from .notifications import Notifier
from .policies import Policies
from .proxy.pullthrough import PullThrough
from .pulls import PullRecorder
from .readonly import ReadOnly
from .regions import Regions
from .space import Space
from .storage import layout
from .storage.driver import StorageDriver
from .touches import Touches
from .trust import Trust
from .upload import Uploader

log = logging.getLogger("wharf.services")


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
    space: Space
    notifier: Notifier
    trust: Trust
    proxy: PullThrough
    pulls: PullRecorder
    tag_details: TagDetails
    usage: Usage
    repositories: RepositoryRemover
    # None for a single region (no `regions:` in the configuration).
    regions: Regions | None = None

    @classmethod
    def build(cls, config: Config, kv: KV, storage: StorageDriver, metrics: Metrics | None = None) -> Services:
        metrics = metrics or Metrics()
        kv = InstrumentedKV(kv, metrics)
        storage = InstrumentedStorage(storage, metrics)
        metadata = Metadata(kv, address=layout.blob_key)
        sessions = UploadSessions(kv)
        lease = NodeLease(kv, max(config.cluster.leasettl, 2))
        policies = Policies.from_config(config)
        regions = Regions.from_config(config, storage, kv, metrics)
        uploader = Uploader(
            storage,
            sessions,
            metadata,
            lease,
            quotas_for=policies.quota_scopes,
            max_sessions=config.http.uploads.maxsessions,
            placed=regions.placed if regions is not None else None,
        )
        manifests = ManifestCache(metrics)
        blobs = BlobLocations(metadata, metrics)
        node_id = config.cluster.node or f"{socket.gethostname()}:{config.http.listen.port or 'unix'}:{os.getpid()}"
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
            node_id=node_id,
            tag_lists=ListCache(metrics, "tag_list"),
            catalog=ListCache(metrics, "catalog"),
            touches=Touches(metadata, config.gc.grace),
            policies=policies,
            readonly=ReadOnly(config.storage.maintenance.readonly.enabled, kv),
            space=Space(kv, metrics, "etcd" if config.coordinator.etcd is not None else "embedded"),
            notifier=Notifier(config, kv, metrics),
            trust=trust,
            proxy=PullThrough(config.proxy, kv, metadata, storage, sessions, uploader, metrics, node_id),
            pulls=PullRecorder(kv, config.inventory.pullinterval),
            tag_details=TagDetails(metadata, storage),
            usage=Usage(kv),
            repositories=RepositoryRemover(
                kv,
                node=node_id,
                quotas=policies.scopes,
                frozen=policies.immutability.rule_for,
                ttl=config.cluster.leasettl,
            ),
            regions=regions,
        )

    async def close(self) -> None:
        await self.proxy.close()
        try:
            await self.pulls.flush()
        except Exception as exc:
            log.warning("last-pulled times not written at shutdown: %s", exc)
        await self.uploader.lease.close()
        if self.regions is not None:
            await self.regions.close()
        await self.storage.close()
        await self.kv.close()
