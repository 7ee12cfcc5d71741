"""Bit rot and hand-edited files: never served as valid; found on read (manifests) and by `wharf scrub`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
from oci_client import OCIClient, assert_error, digest_of
from services import wait_until
from wharf_process import WharfProcess

from node.storage import layout

REPO_ROOT = Path(__file__).resolve().parent.parent


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_blobs_and_manifests_are_refused_reported_and_repaired_by_a_push(tmp_path):
    node = WharfProcess(tmp_path / "node")
    root = Path(node.config["storage"]["filesystem"]["rootdirectory"])
    layer = b"layer bytes " * 2000
    with node:
        client = OCIClient(httpx.Client(base_url=node.url))
        image = client.push_image("team/app", "v1", layers=[layer])
        other = client.push_image("team/other", "v1", layers=[b"other layer"])
    _flip_a_byte(root / layout.blob_key(digest_of(layer)))
    _flip_a_byte(root / layout.blob_key(other.digest))
    with node:
        http = httpx.Client(base_url=node.url)
        # A manifest is checked on every read from storage.
        assert_error(
            http.get(f"/v2/team/other/manifests/{other.digest}", headers={"Accept": "*/*"}), 404, "MANIFEST_UNKNOWN"
        )
        wait_until(lambda: "does not match its digest" in node.log_text(), timeout=10, what="the log line")
        scrub = subprocess.run(
            [sys.executable, "-m", "node.cli", "scrub", "--json", str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
        assert scrub.returncode == 1, scrub.stderr
        found = {bad["digest"] for bad in json.loads(scrub.stdout)["corrupt"]}
        assert digest_of(layer) in found and other.digest in found
        assert http.head(f"/v2/team/app/blobs/{digest_of(layer)}").status_code == 404
        assert_error(http.get(f"/v2/team/app/blobs/{digest_of(layer)}"), 404, "BLOB_UNKNOWN")
        # The client, told the blob is unknown, pushes it again: that repairs it.
        assert OCIClient(http).push_blob("team/app", layer) == digest_of(layer)
        got = http.get(f"/v2/team/app/blobs/{digest_of(layer)}")
        assert got.status_code == 200 and got.content == layer
        assert (root / layout.blob_key(digest_of(layer))).read_bytes() == layer
        assert http.get("/v2/team/app/manifests/v1", headers={"Accept": "*/*"}).content == image.body
