"""What the API modules share: the backends their process runs on, and the names, digests and documents they use."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
from oci_client import OCI_MANIFEST, digest_of
from wharf_process import WharfProcess

# Codes a registry may answer with beyond the spec's table: Distribution's own, kept by Wharf.
DISTRIBUTION_CODES = {"RANGE_INVALID", "TAG_INVALID", "PAGINATION_NUMBER_INVALID"}
MIB = 1024 * 1024
EMPTY_DIGEST = digest_of(b"")
UNKNOWN_DIGEST = digest_of(b"never pushed anywhere")
UUID = "3f2b7c1e-8a6d-4e2f-9b1a-0c5d7e9f1a2b"
LINK = re.compile(r'^<([^>]+)>;\s*rel="next"$')


class Backend:
    """Where a test's `wharf serve` keeps its content and metadata: the settings for WharfProcess.

    "embedded+filesystem" is the default configuration (storage and coordinator under the process's
    data dir). "etcd+s3" puts content in the session's S3 server (moto) and metadata in the session's
    etcd, each process under a root directory and key prefix of its own, removed when the suite is
    done; "etcd+rgw" does the same on the session's Ceph RADOS Gateway.
    """

    def __init__(self, name: str, s3_server: Any = None, etcd: Any = None) -> None:
        self.name = name
        self.s3_server = s3_server
        self.etcd = etcd
        self._roots: list[str] = []
        self._prefixes: list[str] = []

    def settings(self, **storage: Any) -> dict[str, Any]:
        """WharfProcess keyword arguments for one process on this backend (`storage` keys override)."""
        if self.name == "embedded+filesystem":
            return {"storage": storage} if storage else {}
        token = uuid.uuid4().hex[:12]
        root, prefix = f"/api-{token}", f"/wharf-api-{token}/"
        self._roots.append(root)
        self._prefixes.append(prefix)
        s3 = dataclasses.asdict(self.s3_server.storage_config(root))
        return {
            # Blob GETs are served by the node, not redirected to a presigned URL: the suite checks
            # the registry's own answers (Docker-Content-Digest, ranges, 206/416) and a redirect
            # would hand those to the S3 server. test_cluster_haproxy.py covers redirects.
            "storage": {"s3": s3, "delete": {"enabled": True}, "redirect": {"disable": True}, **storage},
            "coordinator": {"etcd": {"endpoints": self.etcd.endpoints, "prefix": prefix}},
        }

    def cleanup(self) -> None:
        for root in self._roots:
            self.s3_server.remove_prefix(root.strip("/") + "/")
        if self._prefixes:
            from coordinator.etcd import EtcdKV

            endpoints = self.etcd.endpoints

            async def remove(prefix: str) -> None:
                kv = await EtcdKV.open(endpoints, prefix=prefix)
                try:
                    await kv.delete("", prefix=True)
                finally:
                    await kv.close()

            for prefix in self._prefixes:
                asyncio.run(remove(prefix))


# Each S3 variant's server: moto, and a real Ceph RADOS Gateway.
S3_SERVERS = {"etcd+s3": "s3_server", "etcd+rgw": "rgw_server"}


def client_for(process: WharfProcess) -> httpx.Client:
    # One connection per request: the registry drops a kept-alive connection without saying so
    # after rejecting a request before its body arrived, which would make unrelated tests flaky.
    # test_connection_is_not_dropped_silently_after_an_early_error covers that on its own.
    return httpx.Client(base_url=process.url, trust_env=False, timeout=30, headers={"Connection": "close"})


def new_repo(prefix: str = "api") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def upload_id(location: str) -> str:
    return urlsplit(location).path.rstrip("/").rsplit("/", 1)[-1]


def next_link(response: httpx.Response) -> str | None:
    link = response.headers.get("link")
    if link is None:
        return None
    match = LINK.match(link)
    assert match, f"Link header is not RFC 5988 rel=next: {link!r}"
    return match.group(1)


def image_doc(config_digest: str, layer_digests: list[str], **fields: Any) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": 2},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 10} for d in layer_digests
        ],
        **fields,
    }


# Forms of If-None-Match that name the ETag Wharf sends ('"<digest>"'), as clients and caches write them.
def if_none_match_forms(digest: str) -> list[str]:
    return [f'"{digest}"', f'W/"{digest}"', f'"sha256:{"0" * 64}", W/"{digest}"', "*", digest]
