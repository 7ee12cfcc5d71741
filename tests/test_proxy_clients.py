"""Clients configured the usual way: podman and skopeo with Wharf as a mirror in `registries.conf`, and
the paths docker's `registry-mirrors` asks for.

The upstream is Debian's docker-registry holding a real image (gzip'ed tar layers, a config whose
diff_ids match them), so podman stores it as it would any base image. After one warm pull through
the mirror, the upstream is stopped and the same pulls still succeed, served by Wharf.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import httpx
from images import assert_same_image, make_image
from pullthrough import cache_status, pull, upstream_registry
from secure_registry import wharf_cli
from skopeo import pull_args, push, skopeo
from wharf_process import WharfProcess

PODMAN_TIMEOUT = 180


def _registries_conf(path: Path, upstream: str, mirror: str) -> Path:
    """podman's and skopeo's mirror setting: pulls of `upstream` images ask `mirror` first."""
    path.write_text(
        f'[[registry]]\nlocation = "{upstream}"\ninsecure = true\n\n'
        f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
    )
    return path


class Podman:
    """podman with its own image store and registries.conf (nothing of the machine's is read or written)."""

    def __init__(self, workdir: Path, registries: Path) -> None:
        # podman refuses a run root path longer than 50 characters: pytest's tmp_path can be longer.
        self.base = [
            "podman",
            "--root",
            str(workdir / "root"),
            "--runroot",
            str(workdir / "run"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
        ]
        self.env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(registries), "TMPDIR": str(workdir)}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.base, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=PODMAN_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        return result


def test_podman_skopeo_and_docker_mirror_paths_pull_from_wharf_with_the_upstream_stopped_after_one_warm_pull(tmp_path):
    upstream = upstream_registry(tmp_path / "upstream").start()
    try:
        image = make_image(tmp_path / "layout", "3.16", layers=2, layer_size=32 * 1024)
        push(tmp_path / "layout", "3.16", f"{upstream.host}/library/alpine:3.16")
        wharf = WharfProcess(tmp_path / "wharf", proxy={"upstreams": [{"prefix": "hub/", "remoteurl": upstream.url}]})
        with wharf, contextlib.ExitStack() as stack:
            registries = _registries_conf(tmp_path / "registries.conf", upstream.host, f"{wharf.host}/hub")
            podman = Podman(
                Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wharf-podman-", dir="/tmp"))), registries
            )
            name = f"{upstream.host}/library/alpine:3.16"
            podman.run("pull", "-q", name)
            # The warm pull went through the mirror: Wharf holds the image.
            cached = json.loads(wharf_cli("cache", "ls", "--json", str(wharf.config_path)).stdout)
            assert [(row["repository"], row["digest"], row["complete"]) for row in cached] == [
                ("hub/library/alpine", image.digest, True)
            ]
            podman.run("rmi", "-a", "-f")
            upstream.stop()
            podman.run("pull", "-q", name)
            assert podman.run("image", "inspect", "--format", "{{.Digest}}", name).stdout.strip() == image.digest
            # skopeo reads the same file: with the upstream stopped it copies the image, every blob
            # byte-identical, from the mirror.
            skopeo("--registries-conf", str(registries), *pull_args(name, tmp_path / "copied", "3.16"))
            assert assert_same_image(tmp_path / "layout", "3.16", tmp_path / "copied", "3.16") == image.digest
            # docker's registry-mirrors with a path (http://wharf/hub, docker 25 and later) asks for
            # /hub/v2/library/alpine/...: the same cached image, the upstream still stopped.
            with httpx.Client(base_url=f"{wharf.url}/hub", timeout=60, trust_env=False) as docker:
                assert docker.get("/v2/").status_code == 200
                pulled = pull(docker, "library/alpine", "3.16")
                assert pulled.digest == image.digest and set(pulled.blobs) == set(image.blob_digests)
                assert all(cache_status(h).startswith("wharf; hit") for h in pulled.headers)
                assert docker.get(f"{wharf.url}/other/v2/").status_code == 404
    finally:
        upstream.stop()
