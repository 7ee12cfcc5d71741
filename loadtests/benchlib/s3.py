"""Registries on S3 and etcd: one moto_server and one etcd member for a whole bench, and configs naming them."""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from s3_server import S3Server, no_proxy_for_loopback
from services import EtcdCluster

from benchlib.cpu import cpu_of
from benchlib.runner import Figures, Meter
from benchlib.servers import Server, Target

BUCKET = "wharf-bench"
F = TypeVar("F", bound=Figures)


class S3Backend:
    """moto_server + etcd: their CPU, and the S3 requests moto logged (one access line each)."""

    def __init__(self) -> None:
        self.s3 = S3Server(bucket=BUCKET)
        self.etcd = EtcdCluster(1)

    def start(self) -> S3Backend:
        self.s3.start()
        self.etcd.start()
        return self

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.etcd.close()
        with contextlib.suppress(Exception):
            self.s3.close()

    def cpu(self) -> float:
        pgids = [self.s3.process.pid] if self.s3.process is not None else []
        pids = [m.process.pid for m in self.etcd.members if m.process is not None]
        return cpu_of(pids=pids, pgids=pgids)

    def _moto_log(self) -> Path | None:
        return Path(self.s3._log_dir) / "moto.log" if self.s3._log_dir else None

    def log_offset(self) -> int:
        path = self._moto_log()
        try:
            return path.stat().st_size if path else 0
        except OSError:
            return 0

    def s3_requests(self, since: int) -> collections.Counter[str]:
        """S3 requests moto served after byte `since` of its log, by method and status class."""
        counts: collections.Counter[str] = collections.Counter()
        path = self._moto_log()
        if path is None:
            return counts
        with contextlib.suppress(OSError), open(path, "rb") as handle:
            handle.seek(since)
            for line in handle.read().decode(errors="replace").splitlines():
                m = re.search(r'"([A-Z]+) \S+ HTTP/[\d.]+" (\d)\d\d ', line)
                if m and "/moto-api/" not in line:
                    counts[m.group(1)] += 1
                    counts[f"{m.group(2)}xx"] += 1
        return counts

    def object_count(self, prefix: str) -> tuple[int, int]:
        """Objects and bytes under `prefix` of the bucket."""
        client = self.s3.client()
        count = size = 0
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
                for item in page.get("Contents", []):
                    count += 1
                    size += item["Size"]
        finally:
            client.close()
        return count, size


def s3_total(counter: collections.Counter[str]) -> int:
    """S3 requests of every method (the status-class counts left out)."""
    return sum(v for k, v in counter.items() if not k.endswith("xx"))


async def measured(backend: S3Backend, load: Callable[..., Awaitable[F]], extra: dict[str, Meter] | None = None) -> F:
    """Run a load with the backend's CPU meter (and `extra` meters, such as HAProxy's); count its S3 requests.

    `load` is run_load or wrk_load with all their arguments but `meters`, whose CPU moves out of `other`.
    """
    offset = backend.log_offset()
    result = await load(meters={"backend_cpu": backend.cpu, **(extra or {})})
    result.extra["s3"] = backend.s3_requests(offset)
    return result


class S3Registry(Server):
    """A registry process whose config names the shared S3 server (and etcd, for Wharf)."""

    def __init__(
        self,
        target: Target,
        workdir: Path,
        accesslog: bool,
        backend: S3Backend,
        *,
        root: str,
        prefix: str = "",
        redirect: bool = True,
        node: str = "",
        gc: dict[str, Any] | None = None,
    ) -> None:
        wharf: dict[str, Any] = {
            "coordinator": {"etcd": {"endpoints": backend.etcd.endpoints, "prefix": prefix}},
            "gc": gc or {"enabled": False},  # measured on its own in bench_gc.py
        }
        if node:
            wharf["cluster"] = {"node": node}
        super().__init__(target, workdir, accesslog, wharf=wharf)
        self.backend = backend
        self.root = root
        self.redirect = redirect

    def storage(self) -> dict[str, Any]:
        s3 = self.backend.s3
        section: dict[str, Any] = {
            "accesskey": s3.access_key,
            "secretkey": s3.secret_key,
            "region": s3.region,
            "regionendpoint": s3.endpoint,
            "bucket": BUCKET,
            "rootdirectory": self.root,
            "secure": False,
            "v4auth": True,
        }
        if self.target.kind == "wharf":
            # Distribution 2.8 has no forcepathstyle key: it uses path style whenever regionendpoint is set.
            section["forcepathstyle"] = True
        return {"s3": section, "redirect": {"disable": not self.redirect}}

    def environment(self) -> dict[str, str]:
        # No AWS profile, CA bundle or proxy from the environment: the S3 server is plain HTTP on loopback.
        env = {k: v for k, v in super().environment().items() if not k.startswith("AWS_")}
        env.update(no_proxy_for_loopback(env))
        return env

    def remove_data(self) -> None:
        """Empty the registry's root directory of the bucket (moto keeps every object in memory)."""
        self.backend.s3.remove_prefix(self.root.strip("/") + "/")
