"""Garbage collection racing real pushes: no tagged image ever breaks, and space comes back.

The race runs for WHARF_RACE_SECONDS (60 by default, as the acceptance asks).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml
from gc_race import race, verify_tagged_images
from services import wait_until
from wharf_process import WharfProcess

from node.storage import layout

RACE_SECONDS = float(os.environ.get("WHARF_RACE_SECONDS", "60"))
GRACE_SECONDS = 2
ROOT = Path(__file__).resolve().parent.parent


def _gc_command(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "gc", "--delete-untagged", "--json", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def _final_collection(config: Path) -> None:
    """After the grace period, one more cycle (retrying while the leader's own cycle holds the lock)."""
    time.sleep(GRACE_SECONDS + 1)

    def ran() -> bool:
        done = _gc_command(config)
        if done.returncode == 0:
            return True
        assert "already running" in done.stderr, done.stderr
        return False

    wait_until(ran, timeout=60, interval=0.5, what="a final garbage collection cycle")


def _report(result, live: set[str], stored: int, live_bytes: int) -> str:
    return (
        f"pushes ok={result.pushes_ok} failed={result.pushes_failed}, retags ok={result.retags_ok} "
        f"failed={result.retags_failed}; live blobs={len(live)} live bytes={live_bytes} stored bytes={stored}; "
        f"first failures: {result.failures[:5]}"
    )


def test_pushes_racing_gc_on_embedded_defaults_never_break_a_tagged_image(tmp_path):
    node = WharfProcess(
        tmp_path / "wharf",
        gc={"enabled": True, "interval": "1s", "grace": f"{GRACE_SECONDS}s", "deleteuntagged": True},
    )
    with node:
        result = race([node.url], "race/app", seconds=RACE_SECONDS, pushers=4)
        tags, _, _ = verify_tagged_images(node.url, "race/app")
        assert tags > 0
        _final_collection(node.config_path)
        _, live, live_bytes = verify_tagged_images(node.url, "race/app")
        blobs_dir = Path(node.config["storage"]["filesystem"]["rootdirectory"]) / layout.BLOBS
        stored_files = [p for p in blobs_dir.rglob("data")]
        stored = {
            layout.digest_from_blob_key(str(p.relative_to(blobs_dir.parent.parent.parent.parent))) for p in stored_files
        }
        stored_bytes = sum(p.stat().st_size for p in stored_files)
        report = _report(result, live, stored_bytes, live_bytes)
        print(report)
        assert result.pushes_ok > 20, report
        assert stored - live == set(), f"unreferenced blobs left after the final cycle: {report}"
        assert stored_bytes <= 1.5 * live_bytes, report
        assert "Traceback" not in node.log_text()


def test_pushes_through_two_nodes_racing_a_gc_loop_on_s3_and_etcd(tmp_path, etcd, s3_server):
    prefix = f"/wharf-race-{uuid.uuid4().hex[:8]}/"
    s3 = dataclasses.asdict(s3_server.storage_config())
    settings = {
        "storage": {"s3": s3, "delete": {"enabled": True}, "redirect": {"disable": True}},
        "coordinator": {"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
        # The nodes push; a separate process collects, back to back.
        "gc": {"enabled": False, "grace": f"{GRACE_SECONDS}s", "deleteuntagged": True},
    }
    nodes = [WharfProcess(tmp_path / f"node{i}", **settings) for i in range(2)]
    gc_config = tmp_path / "gc.yml"
    gc_config.write_text(yaml.safe_dump({**nodes[0].config, "http": {"debug": {"addr": ""}}}))
    stop = threading.Event()
    cycles: list[int] = []

    def collect_loop() -> None:
        deadline = time.monotonic() + RACE_SECONDS + 60
        while not stop.is_set() and time.monotonic() < deadline:
            done = _gc_command(gc_config)
            cycles.append(done.returncode)

    try:
        for node in nodes:
            node.start()
        collector = threading.Thread(target=collect_loop, daemon=True)
        collector.start()
        result = race([n.url for n in nodes], "race/app", seconds=RACE_SECONDS, pushers=4)
        stop.set()
        collector.join(180)
        for node in nodes:
            tags, _, _ = verify_tagged_images(node.url, "race/app")
            assert tags > 0
        _final_collection(gc_config)
        _, live, live_bytes = verify_tagged_images(nodes[1].url, "race/app")
        client = s3_server.client()
        root = s3["rootdirectory"].strip("/") + "/"
        stored: set[str] = set()
        stored_bytes = 0
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=s3_server.bucket, Prefix=root + layout.BLOBS
        ):
            for item in page.get("Contents", []):
                digest = layout.digest_from_blob_key(item["Key"][len(root) :])
                if digest:
                    stored.add(digest)
                    stored_bytes += item["Size"]
        report = _report(result, live, stored_bytes, live_bytes) + f"; gc cycles={len(cycles)} failed={cycles.count(1)}"
        print(report)
        assert result.pushes_ok > 10, report
        assert cycles.count(0) >= 3, report
        assert stored - live == set(), f"unreferenced blobs left after the final cycle: {report}"
        for node in nodes:
            assert "Traceback" not in node.log_text(), node.log_tail()
    finally:
        stop.set()
        for node in nodes:
            node.stop()
        s3_server.remove_prefix(s3["rootdirectory"])
