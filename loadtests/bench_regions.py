#!/usr/bin/env python3
"""Pull latency in a far region, before and after replication: two regions on loopback, 50 ms apart.

Region a and region b each have their own S3 (a Ceph RGW cluster each, or `--s3 moto`) and one Wharf
node; one etcd member is shared. Each node reaches the other region's storage through a user-space
delay proxy (tests/delay_proxy.py; the kernel here has no netem) that delays every byte by
`--delay` seconds each way (50 ms by default: a round trip between the regions costs 100 ms).

Images (config + one layer of each `--sizes`) are pushed in region a while the link into region b
is held, so nothing is copied yet. A client in region b then pulls each image `--rounds` times
(manifest by tag, then every blob, following redirects; one warm-up pull first, not counted): its node streams the blobs from region a's
storage. The link is released, the bench waits until every copy is recorded, and the same pulls run
again: blob GETs now answer 307 into region b's own storage.

Figures only: nothing here passes or fails. Usage:

    python loadtests/bench_regions.py [--s3 rgw|moto] [--delay 0.05] [--rounds 20] [--sizes 64KiB,4MiB,32MiB]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import benchlib  # noqa: F401 - puts the repository root and tests/ on sys.path
import httpx
from benchlib.report import machine_context
from delay_proxy import DelayProxy
from oci_client import OCI_MANIFEST, OCIClient, digest_of
from s3_server import S3Endpoint, S3Server
from services import EtcdCluster, wait_until
from wharf_process import WharfProcess

from node.config import parse_size

REPO = "bench/regions"


def _storage(s3: S3Endpoint, root: str, endpoint: str) -> dict[str, Any]:
    return dataclasses.asdict(s3.storage_config(root, regionendpoint=endpoint))


def _s3(kind: str, bucket: str) -> Any:
    if kind == "rgw":
        from rgw_server import RGWServer

        return RGWServer(bucket=bucket)
    return S3Server(bucket=bucket)


def _pull(http: httpx.Client, tag: str) -> dict[str, Any]:
    """One whole pull; the seconds it took, and how many blob GETs were redirected."""
    started = time.perf_counter()
    manifest = http.get(f"/v2/{REPO}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    manifest.raise_for_status()
    doc = json.loads(manifest.content)
    redirected = 0
    for digest in [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]:
        got = http.get(f"/v2/{REPO}/blobs/{digest}")
        got.raise_for_status()
        if digest_of(got.content) != digest:
            raise RuntimeError(f"{digest}: the bytes pulled do not match")
        redirected += bool(got.history)
    return {"seconds": time.perf_counter() - started, "redirected": redirected}


def _pulls(http: httpx.Client, tag: str, rounds: int) -> list[dict[str, Any]]:
    _pull(http, tag)  # warm: connections open, caches filled; not counted
    return [_pull(http, tag) for _ in range(rounds)]


def _figures(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"{statistics.median(ordered) * 1000:8.1f} {p90 * 1000:8.1f} {ordered[-1] * 1000:8.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--s3", choices=("rgw", "moto"), default="rgw")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds each way between the regions")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sizes", default="64KiB,4MiB,32MiB", help="one image per layer size")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    token = uuid.uuid4().hex[:8]
    where = f"two regions, {args.s3} each, delay {args.delay * 1000:.0f} ms each way, {args.rounds} pulls per image"
    print("\n".join(machine_context(where)), flush=True)
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-regions-")))
        s3 = {name: stack.enter_context(_s3(args.s3, f"bench-region-{name}")) for name in ("a", "b")}
        etcd = stack.enter_context(EtcdCluster(1))
        inbound = {
            name: stack.enter_context(
                DelayProxy(("127.0.0.1", int(urlsplit(s3[name].endpoint).port or 0)), delay=args.delay)
            )
            for name in ("a", "b")
        }
        nodes = {}
        for name, other in (("a", "b"), ("b", "a")):
            node = WharfProcess(
                base / name,
                storage={"s3": _storage(s3[name], f"/{token}-{name}", s3[name].endpoint), "delete": {"enabled": True}},
                coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": f"/bench-{token}/"}},
                cluster={"node": name, "region": name},
                regions={other: {"storage": {"s3": _storage(s3[other], f"/{token}-{other}", inbound[other].url)}}},
                gc={"enabled": False},
                backup={"enabled": False},
                log={"level": "warning"},
            )
            stack.callback(node.stop)
            nodes[name] = node.start(timeout=90)

        inbound["b"].hold()  # copies into b wait: region b's pulls read from region a
        tags = []
        with httpx.Client(base_url=nodes["a"].url, trust_env=False, timeout=120) as http:
            client = OCIClient(http)
            for size in sizes:
                tag = f"layer-{size}"
                client.push_image(REPO, tag, layers=[os.urandom(size)], config=json.dumps({"size": size}).encode())
                tags.append(tag)
        rows: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
        with httpx.Client(base_url=nodes["b"].url, trust_env=False, timeout=120, follow_redirects=True) as http:
            for tag in tags:
                pulls = _pulls(http, tag, args.rounds)
                assert not any(p["redirected"] for p in pulls), "a blob was in region b before replication"
                rows["before"][tag] = [p["seconds"] for p in pulls]
            inbound["b"].release()
            started = time.monotonic()
            wait_until(
                lambda: not etcd.records(f"/bench-{token}/", "replicate/queue/"),
                timeout=600,
                interval=0.2,
                what="replication",
            )
            print(f"replicated in {time.monotonic() - started:.1f} s after the link was released")
            for tag in tags:
                pulls = _pulls(http, tag, args.rounds)
                assert all(p["redirected"] == 2 for p in pulls), "a blob GET in region b was not redirected into b"
                rows["after"][tag] = [p["seconds"] for p in pulls]
        print(f"\n{'image (one layer)':<20} {'when':<22} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8}")
        for tag in tags:
            for when, label in (("before", "before (from a)"), ("after", "after (b's storage)")):
                print(f"{tag:<20} {label:<22} {_figures(rows[when][tag])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
