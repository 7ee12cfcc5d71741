#!/usr/bin/env python3
"""What a signature policy costs a manifest GET: the same node, the same run, with and without a policy.

One Wharf node (Granian, 1 worker, filesystem storage) holds two copies of one small image: `open/app`
(no policy covers it) and `prod/app` (an `enforce` policy on `prod/**`, the image signed in cosign's
tag scheme). After one warm-up pull of each, wrk loads `GET /v2/<repo>/manifests/latest` (and, in a
second table, by digest) on the two repositories in turn, `--rounds` times each, interleaved, so
that a change in the machine's load hits both alike. Per load it prints req/s, p50, p99 and, from
the node's own metrics, the coordinator and storage operations it made per request: a verified pull
answers with one coordinator read (the tag, or record, together with its signature's marks) and no
storage read, exactly as the pull without a policy does.

Figures only: nothing passes or fails. `--coordinator etcd` runs the node on an etcd member instead
of the embedded coordinator. Usage:

    python loadtests/bench_signatures.py [--duration S] [--rounds N] [--connections C] [--coordinator embedded|etcd]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchlib.client import Conn, Unexpected
from benchlib.images import ACCEPT, put_manifest, sha256_digest, upload_blob
from benchlib.report import fmt_ms
from benchlib.servers import Server, Target
from benchlib.wrk import WrkResult, accept_script, run_wrk

from node import cosign

TARGET = Target("granian-1", "Wharf granian x1", "wharf", "granian", 1)


def policy_server(workdir: Path, public_key: Path, etcd: list[str] | None) -> Server:
    """A Wharf node with a signature policy on `prod/**` (and etcd, if asked)."""
    policy = {"name": "production", "repositories": ["prod/**"], "keys": [str(public_key)], "mode": "enforce"}
    wharf: dict[str, Any] = {"signatures": {"policies": [policy]}}
    if etcd:
        wharf["coordinator"] = {
            "etcd": {"endpoints": etcd, "prefix": f"/wharf-bench-signatures-{uuid.uuid4().hex[:8]}/"}
        }
    return Server(TARGET, workdir, accesslog=False, wharf=wharf)


async def _blob(conn: Conn, repo: str, data: bytes) -> dict[str, Any]:
    digest = sha256_digest(data)
    await upload_blob(conn, repo, digest, data, single_post=True)
    return {"digest": digest, "size": len(data)}


async def _manifest(conn: Conn, repo: str, reference: str, body: bytes) -> str:
    await put_manifest(conn, repo, reference, body)
    return sha256_digest(body)


async def populate(conn: Conn, port: int, key: cosign.PrivateKey) -> dict[str, str]:
    """The same image in `open/app` and `prod/app` (signed there); returns each repository's digest."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layers = [os.urandom(4096), os.urandom(4096)]
    digests = {}
    for repo in ("open/app", "prod/app"):
        manifest = {
            "schemaVersion": 2,
            "mediaType": cosign.OCI_MANIFEST,
            "config": {"mediaType": cosign.OCI_CONFIG, **await _blob(conn, repo, config)},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **await _blob(conn, repo, layer)}
                for layer in layers
            ],
        }
        digests[repo] = await _manifest(conn, repo, "latest", json.dumps(manifest).encode())
    digest = digests["prod/app"]
    payload = cosign.simple_signing_payload(f"127.0.0.1:{port}/prod/app", digest)
    layer = cosign.layer_descriptor(payload, cosign.sign(key, payload))
    signature, signature_config = cosign.tag_scheme_manifest([layer])
    await _blob(conn, "prod/app", payload)
    await _blob(conn, "prod/app", signature_config)
    await _manifest(conn, "prod/app", cosign.signature_tag(digest), signature)
    pulls = [("open/app", "latest"), ("prod/app", "latest"), ("prod/app", digest), ("open/app", digests["open/app"])]
    for repo, reference in pulls:  # also warms the caches
        reply = await conn.request("GET", f"/v2/{repo}/manifests/{reference}", {"Accept": ACCEPT})
        if reply.status != 200:
            raise Unexpected(f"GET {repo}:{reference}", reply)
    return digests


OPERATIONS = ("coordinator", "storage", "lookups")
_SAMPLE = re.compile(r"^(wharf_[a-z_]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$", re.M)


async def operations(server: Server) -> dict[str, float]:
    """Coordinator and storage operations the node has made, and signature look-ups, from its metrics."""
    conn = Conn("127.0.0.1", server.debug_port)
    try:
        reply = await conn.request("GET", "/metrics")
    finally:
        conn.close()
    totals: dict[str, float] = {"coordinator": 0.0, "storage": 0.0, "lookups": 0.0}
    for name, labels, value in _SAMPLE.findall(reply.body.decode()):
        if name == "wharf_coordinator_operation_duration_seconds_count" and "refresh_lease" not in labels:
            totals["coordinator"] += float(value)
        elif name == "wharf_storage_operation_duration_seconds_count":
            totals["storage"] += float(value)
        elif name == "wharf_signature_verifications_total":
            totals["lookups"] += float(value)
    return totals


async def load(server: Server, path: str, args: argparse.Namespace, script: Path) -> WrkResult:
    before = await operations(server)
    result = await run_wrk(
        server, f"{server.base}{path}", threads=2, connections=args.connections, duration=args.duration, script=script
    )
    after = await operations(server)
    for what in OPERATIONS:
        result.extra[what] = (after[what] - before[what]) / max(1, result.requests)
    return result


@contextlib.contextmanager
def coordinator(kind: str) -> Iterator[list[str] | None]:
    if kind == "embedded":
        yield None
        return
    from services import EtcdCluster

    with EtcdCluster(1) as etcd:
        yield etcd.endpoints


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _per_cpu(r: WrkResult) -> float:
    return r.requests / max(r.server_cpu, 1e-9)


def report(title: str, rows: dict[str, list[WrkResult]]) -> None:
    print(f"\n{title}")
    print(
        f"{'repository':<27} {'req/s, min .. max':<26} {'req/s':>6} {'req/CPU-s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'KV/req':>7} {'storage/req':>11} {'look-ups/req':>12} {'non-2xx':>7}"
    )
    rates, per_cpu = {}, {}
    for label, results in rows.items():
        rates[label] = sum(r.rps for r in results) / len(results)
        cpu = sum(r.server_cpu for r in results)
        per_cpu[label] = sum(r.requests for r in results) / cpu if cpu else 0.0
        p50, p99 = (fmt_ms(_median([r.percentile(q) for r in results])) for q in (0.5, 0.99))
        spread = sorted(r.rps for r in results)
        each = f"{spread[0]:.0f} .. {spread[-1]:.0f}"
        kv, storage, lookups = (sum(r.extra[what] for r in results) / len(results) for what in OPERATIONS)
        print(
            f"{label:<27} {each:<26} {rates[label]:>6.0f} {per_cpu[label]:>9.0f} {p50:>7} {p99:>7} "
            f"{kv:>7.3f} {storage:>11.3f} {lookups:>12.4f} {sum(r.non2xx for r in results):>7}"
        )
    without, with_ = list(rows)
    # Each round's two loads ran back to back: their ratio is what the machine's drift disturbs least.
    pairs = list(zip(rows[without], rows[with_], strict=True))
    paired = _median([w.rps / max(o.rps, 1e-9) for o, w in pairs])
    paired_cpu = _median([_per_cpu(w) / max(_per_cpu(o), 1e-9) for o, w in pairs])
    print(
        f"with policy / without: median of the rounds' ratios req/s {paired:.3f}, req/CPU-s {paired_cpu:.3f}; "
        f"of the means req/s {rates[with_] / rates[without]:.3f}, req/CPU-s {per_cpu[with_] / per_cpu[without]:.3f} "
        "(1.00 = no cost; the aim is at least 0.80)"
    )


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="wharf-bench-signatures-"))
    key = cosign.generate_key("ecdsa-p256")
    public = workdir / "cosign.pub"
    public.write_bytes(cosign.public_pem(key.public_key()))
    script = accept_script(workdir)
    with coordinator(args.coordinator) as etcd:
        server = policy_server(workdir / "node", public, etcd)
        server.start()
        try:
            server.wait_ready()
            conn = Conn("127.0.0.1", server.port)
            try:
                digests = await populate(conn, server.port, key)
            finally:
                conn.close()
            by_tag: dict[str, list[WrkResult]] = {"open/app (no policy)": [], "prod/app (enforce, signed)": []}
            by_digest: dict[str, list[WrkResult]] = {"open/app (no policy)": [], "prod/app (enforce, signed)": []}
            for round_ in range(args.rounds):
                # Every other round the policy's load goes first, so a drift in the machine's load
                # favours neither.
                order = [("open/app", 0), ("prod/app", 1)]
                if round_ % 2:
                    order.reverse()
                for repo, i in order:
                    rows = list(by_tag.values())[i]
                    rows.append(await load(server, f"/v2/{repo}/manifests/latest", args, script))
                for repo, i in order:
                    rows = list(by_digest.values())[i]
                    rows.append(await load(server, f"/v2/{repo}/manifests/{digests[repo]}", args, script))
                print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            server.stop()
    print(
        f"\nManifest GET, one Wharf node (Granian, 1 worker, {args.coordinator} coordinator), wrk -t2 "
        f"-c{args.connections}, {args.duration:.0f}s per load, {args.rounds} interleaved rounds."
    )
    report("GET /v2/<repo>/manifests/latest", by_tag)
    report("GET /v2/<repo>/manifests/<digest>", by_digest)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per load (default 3)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of each load (default 10)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--coordinator", choices=["embedded", "etcd"], default="embedded")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, config)")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
