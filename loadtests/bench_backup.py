#!/usr/bin/env python3
"""Coordinator snapshots: how long a dump and a restore take, and how big the file is, per backend.

A real `wharf serve` (filesystem storage, embedded coordinator) takes `--images` small-image pushes
over HTTP (config + a shared layer + a layer of its own + manifest, 3 repositories) until its
coordinator holds about 10,000 keys, the records a push really makes. Then, with the node stopped:

- `wharf backup CONFIG --to DIR` end to end (a process, as an operator runs it);
- in-process dumps of the embedded coordinator (median of 3);
- a restore of that snapshot into a fresh embedded file, and into a fresh prefix of a real etcd;
- in-process dumps of the etcd copy (median of 3), to a discarding sink and into S3 (moto) through
  the storage driver, as the leader's scheduled snapshot writes it.

Figures only: nothing here passes or fails. Usage:

    python loadtests/bench_backup.py [--images N] [--pushers P]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from benchlib import REPO_ROOT
from oci_client import OCIClient
from s3_server import S3Server, no_proxy_for_loopback
from services import EtcdCluster
from wharf_process import WharfProcess

from coordinator import snapshot
from coordinator.embedded import EmbeddedKV
from coordinator.etcd import EtcdKV
from coordinator.kv import KV
from node.config import embedded_path_in


def push(url: str, images: int, pushers: int) -> float:
    shared = os.urandom(4096)
    counter = iter(range(images))
    lock = threading.Lock()

    def work() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            client = OCIClient(http)
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                client.push_image(f"team/app{n % 3}", f"v{n}", layers=[shared, os.urandom(2048)])

    started = time.monotonic()
    threads = [threading.Thread(target=work) for _ in range(pushers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - started


async def timed_dump(kv: KV, runs: int = 3) -> tuple[float, snapshot.SnapshotInfo, bytes]:
    seconds, data, info = [], b"", None
    for _ in range(runs):
        captured = bytearray()

        async def sink(chunk: bytes, captured: bytearray = captured) -> None:
            captured.extend(chunk)

        started = time.perf_counter()
        info = await snapshot.dump(kv, sink)
        seconds.append(time.perf_counter() - started)
        data = bytes(captured)
    assert info is not None
    return statistics.median(seconds), info, data


async def timed_restore(kv: KV, data: bytes) -> tuple[float, snapshot.RestoreResult]:
    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(data), 1 << 20):
            yield data[i : i + (1 << 20)]

    started = time.perf_counter()
    result = await snapshot.restore(kv, chunks)
    return time.perf_counter() - started, result


def row(what: str, seconds: float, keys: int, size: int | None = None) -> None:
    extra = f"  {size / 1024:8.1f} KiB" if size is not None else ""
    print(f"{what:<58} {seconds:7.3f} s  {keys:6d} keys  {keys / seconds:9.0f} keys/s{extra}")


async def measure(base: Path, images: int, pushers: int) -> None:
    node = WharfProcess(base / "node", backup={"enabled": False}, gc={"enabled": False})
    with node:
        took = push(node.url, images, pushers)
    print(f"pushed {images} images with {pushers} clients in {took:.1f}s")
    path = embedded_path_in(node.config["storage"]["filesystem"]["rootdirectory"])

    target = base / "backups"
    started = time.perf_counter()
    cli = subprocess.run(
        [sys.executable, "-m", "node.cli", "backup", str(node.config_path), "--to", str(target)],
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
    )
    cli_seconds = time.perf_counter() - started
    assert cli.returncode == 0, cli.stderr
    (file,) = target.iterdir()
    print(cli.stdout.strip())

    embedded = EmbeddedKV(path, readonly=True)
    try:
        seconds, info, data = await timed_dump(embedded)
    finally:
        await embedded.close()
    print()
    row("wharf backup --to DIR (whole command, process start included)", cli_seconds, info.keys, file.stat().st_size)
    row("dump, embedded coordinator (median of 3)", seconds, info.keys, info.size)
    print(f"{'':<58} uncompressed lines {len(__import__('gzip').decompress(data)) / 1024:.1f} KiB")

    fresh = EmbeddedKV(str(base / "restored.db"))
    try:
        seconds, result = await timed_restore(fresh, data)
        row(f"restore into an empty embedded coordinator ({result.transactions} txns)", seconds, result.written)
    finally:
        await fresh.close()

    with EtcdCluster(1) as cluster:
        etcd = await EtcdKV.open(cluster.endpoints, prefix="/bench/")
        try:
            seconds, result = await timed_restore(etcd, data)
            row(f"restore into an empty etcd prefix ({result.transactions} txns)", seconds, result.written)
            seconds, info, _ = await timed_dump(etcd)
            row("dump, etcd coordinator (median of 3)", seconds, info.keys, info.size)
            os.environ.update(no_proxy_for_loopback())
            with S3Server() as s3:
                from node.backup import storage_snapshots
                from node.storage.s3 import S3Driver

                driver = S3Driver(s3.storage_config("/bench"))
                try:
                    store = storage_snapshots(driver)
                    started = time.perf_counter()
                    _, info = await store.write(etcd)
                    row(
                        "etcd snapshot into S3 storage (the leader's job)",
                        time.perf_counter() - started,
                        info.keys,
                        info.size,
                    )
                finally:
                    await driver.close()
        finally:
            await etcd.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images pushed (about 5 coordinator keys each)")
    parser.add_argument("--pushers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wharf-bench-backup-") as base:
        asyncio.run(measure(Path(base), args.images, args.pushers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
