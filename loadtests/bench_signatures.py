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
import hashlib
import http.client
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

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for _path in (HERE, REPO_ROOT / "tests", REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench import ACCEPT, WRK_ACCEPT_LUA, Server, Target, run_wrk  # noqa: E402

from node import cosign  # noqa: E402

TARGET = Target("granian-1", "Wharf granian x1", "wharf", "granian", 1)


class PolicyServer(Server):
    """bench.py's Wharf node, with a signature policy on `prod/**` (and etcd, if asked)."""

    def __init__(self, workdir: Path, public_key: Path, etcd: list[str] | None) -> None:
        super().__init__(TARGET, workdir, accesslog=False)
        self.public_key = public_key
        self.etcd = etcd

    def config_yaml(self, debug_port: int) -> str:
        text = super().config_yaml(debug_port)
        policy = {"name": "production", "repositories": ["prod/**"], "keys": [str(self.public_key)], "mode": "enforce"}
        text += "signatures: " + json.dumps({"policies": [policy]}) + "\n"
        if self.etcd:
            prefix = f"/wharf-bench-signatures-{uuid.uuid4().hex[:8]}/"
            text += "coordinator: " + json.dumps({"etcd": {"endpoints": self.etcd, "prefix": prefix}}) + "\n"
        self.debug_port = debug_port
        return text


def _call(server: Server, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _blob(server: Server, repo: str, data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, _, text = _call(server, "POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", data)
    assert status == 201, (status, text)
    return {"digest": digest, "size": len(data)}


def _manifest(server: Server, repo: str, reference: str, body: bytes) -> str:
    status, headers, text = _call(
        server, "PUT", f"/v2/{repo}/manifests/{reference}", body, {"Content-Type": cosign.OCI_MANIFEST}
    )
    assert status == 201, (status, text)
    return str(headers["docker-content-digest"])


def populate(server: Server, key: cosign.PrivateKey) -> dict[str, str]:
    """The same image in `open/app` and `prod/app` (signed there); returns each repository's digest."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layers = [os.urandom(4096), os.urandom(4096)]
    digests = {}
    for repo in ("open/app", "prod/app"):
        manifest = {
            "schemaVersion": 2,
            "mediaType": cosign.OCI_MANIFEST,
            "config": {"mediaType": cosign.OCI_CONFIG, **_blob(server, repo, config)},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(server, repo, layer)}
                for layer in layers
            ],
        }
        digests[repo] = _manifest(server, repo, "latest", json.dumps(manifest).encode())
    digest = digests["prod/app"]
    payload = cosign.simple_signing_payload(f"127.0.0.1:{server.port}/prod/app", digest)
    layer = cosign.layer_descriptor(payload, cosign.sign(key, payload))
    signature, signature_config = cosign.tag_scheme_manifest([layer])
    _blob(server, "prod/app", payload)
    _blob(server, "prod/app", signature_config)
    _manifest(server, "prod/app", cosign.signature_tag(digest), signature)
    for repo, reference in (("open/app", "latest"), ("prod/app", "latest"), ("prod/app", digest)):
        status, _, text = _call(server, "GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT})
        assert status == 200, (repo, status, text)  # also warms the caches
    status, _, _ = _call(server, "GET", f"/v2/open/app/manifests/{digests['open/app']}", headers={"Accept": ACCEPT})
    assert status == 200
    return digests


_SAMPLE = re.compile(r"^(wharf_[a-z_]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$", re.M)


def operations(server: PolicyServer) -> dict[str, float]:
    """Coordinator and storage operations the node has made, and signature look-ups, from its metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", server.debug_port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    totals: dict[str, float] = {"coordinator": 0.0, "storage": 0.0, "lookups": 0.0}
    for name, labels, value in _SAMPLE.findall(text):
        if name == "wharf_coordinator_operation_duration_seconds_count" and "refresh_lease" not in labels:
            totals["coordinator"] += float(value)
        elif name == "wharf_storage_operation_duration_seconds_count":
            totals["storage"] += float(value)
        elif name == "wharf_signature_verifications_total":
            totals["lookups"] += float(value)
    return totals


async def load(server: PolicyServer, path: str, args: argparse.Namespace, script: Path) -> dict[str, Any]:
    before = operations(server)
    result = await run_wrk(
        server,
        f"{server.base}{path}",
        threads=2,
        connections=args.connections,
        duration=args.duration,
        script=script,
        latency=True,
    )
    after = operations(server)
    requests = max(1, result.get("requests", 1))
    for what in ("coordinator", "storage", "lookups"):
        result[what] = (after[what] - before[what]) / requests
    return result


@contextlib.contextmanager
def coordinator(kind: str) -> Iterator[list[str] | None]:
    if kind == "embedded":
        yield None
        return
    from services import EtcdCluster

    with EtcdCluster(1) as etcd:
        yield etcd.endpoints


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def report(title: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    print(f"\n{title}")
    print(
        f"{'repository':<27} {'req/s, min .. max':<26} {'req/s':>6} {'req/CPU-s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'KV/req':>7} {'storage/req':>11} {'look-ups/req':>12} {'non-2xx':>7}"
    )
    rates, per_cpu = {}, {}
    for label, results in rows.items():
        rates[label] = sum(r.get("rps", 0.0) for r in results) / len(results)
        cpu = sum(r["server_cpu"] for r in results)
        per_cpu[label] = sum(r.get("requests", 0) for r in results) / cpu if cpu else 0.0
        p50 = sorted(r.get("p50", 0.0) for r in results)[len(results) // 2]
        p99 = sorted(r.get("p99", 0.0) for r in results)[len(results) // 2]
        spread = sorted(r.get("rps", 0.0) for r in results)
        each = f"{spread[0]:.0f} .. {spread[-1]:.0f}"
        print(
            f"{label:<27} {each:<26} {rates[label]:>6.0f} "
            f"{per_cpu[label]:>9.0f} {_ms(p50):>7} {_ms(p99):>7} "
            f"{sum(r['coordinator'] for r in results) / len(results):>7.3f} "
            f"{sum(r['storage'] for r in results) / len(results):>11.3f} "
            f"{sum(r['lookups'] for r in results) / len(results):>12.4f} {sum(r.get('non2xx', 0) for r in results):>7}"
        )
    without, with_ = list(rows)
    # Each round's two loads ran back to back: their ratio is what the machine's drift disturbs least.
    paired = sorted(
        w.get("rps", 0.0) / max(o.get("rps", 0.0), 1e-9) for o, w in zip(rows[without], rows[with_], strict=True)
    )
    paired_cpu = sorted(
        (w.get("requests", 0) / max(w["server_cpu"], 1e-9))
        / max(o.get("requests", 0) / max(o["server_cpu"], 1e-9), 1e-9)
        for o, w in zip(rows[without], rows[with_], strict=True)
    )
    print(
        f"with policy / without: median of the rounds' ratios req/s {paired[len(paired) // 2]:.3f}, "
        f"req/CPU-s {paired_cpu[len(paired_cpu) // 2]:.3f}; of the means req/s {rates[with_] / rates[without]:.3f}, "
        f"req/CPU-s {per_cpu[with_] / per_cpu[without]:.3f} (1.00 = no cost; the aim is at least 0.80)"
    )


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="wharf-bench-signatures-"))
    key = cosign.generate_key("ecdsa-p256")
    public = workdir / "cosign.pub"
    public.write_bytes(cosign.public_pem(key.public_key()))
    script = workdir / "accept.lua"
    script.write_text(WRK_ACCEPT_LUA)
    with coordinator(args.coordinator) as etcd:
        server = PolicyServer(workdir / "node", public, etcd)
        server.start()
        try:
            server.wait_ready()
            digests = populate(server, key)
            by_tag: dict[str, list[dict[str, Any]]] = {"open/app (no policy)": [], "prod/app (enforce, signed)": []}
            by_digest: dict[str, list[dict[str, Any]]] = {"open/app (no policy)": [], "prod/app (enforce, signed)": []}
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
