"""A store written by registry:2 is adopted, not ignored: served as it was, nothing copied or deleted,
and written back so registry:2 can serve it again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from oci_client import OCIClient
from registry2 import DockerRegistry, assert_serves, fill_many_tags, fill_store
from services import free_port, wait_until
from skopeo import skopeo

REPO_ROOT = Path(__file__).resolve().parent.parent


class Wharf:
    """`wharf serve` on a registry:2 user's own config.yml (the test adds a port and a GC schedule)."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config = {**config, "http": {**config.get("http", {}), "addr": f"127.0.0.1:{self.port}"}}
        self.config["http"]["debug"] = {"addr": f"127.0.0.1:{free_port()}"}
        self.config_path = workdir / f"wharf-{self.port}.yml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / f"wharf-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, timeout=30.0)

    def start(self) -> Wharf:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", str(self.config_path)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"wharf exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                with self.http() as http:
                    return http.get("/v2/").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=30, what="wharf serve")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
        self.proc = None

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args, str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO_ROOT,
        )

    def import_state(self) -> dict[str, Any] | None:
        done = self.command("import", "--status", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def wait_imported(self, timeout: float = 120) -> dict[str, Any]:
        def imported() -> dict[str, Any] | None:
            state = self.import_state()
            return state if state and state["state"] == "done" else None

        return wait_until(imported, timeout=timeout, interval=0.5, what="the import")

    def gc_cycles(self) -> int:
        with httpx.Client(trust_env=False) as http:
            text = http.get(f"http://{self.config['http']['debug']['addr']}/metrics").text
        return int(
            sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("wharf_gc_runs_total{"))
        )


def _fingerprint_files(root: Path) -> dict[str, str]:
    """Every object of Distribution's tree with a hash of its bytes."""
    tree = root / "docker"
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in tree.rglob("*") if p.is_file()
    }


def _skopeo_identical(a: str, b: str, ref: str, tmp: Path) -> None:
    for host, where in ((a, tmp / "from-a"), (b, tmp / "from-b")):
        shutil.rmtree(where, ignore_errors=True)
        skopeo("copy", "--all", "--src-tls-verify=false", f"docker://{host}/{ref}", f"dir:{where}")
    files_a = {p.name: p.read_bytes() for p in (tmp / "from-a").iterdir()}
    files_b = {p.name: p.read_bytes() for p in (tmp / "from-b").iterdir()}
    assert files_a == files_b


def _wharf_gc_settings() -> dict[str, Any]:
    return {"gc": {"interval": "1s", "grace": "1s"}}


def test_registry2_filesystem_store_is_served_whole_and_nothing_is_deleted(tmp_path):
    root = tmp_path / "registry"
    with DockerRegistry.on_filesystem(tmp_path, root) as registry:
        pushed = fill_store(registry, tmp_path)
        config = registry.config()
        original_port = registry.host
    del original_port
    before = _fingerprint_files(root)
    wharf = Wharf(tmp_path, {**config, **_wharf_gc_settings()})
    wharf.start()
    try:
        state = wharf.wait_imported()
        assert state["repositories_done"] == 3 and state["problems"] == 0, state
        assert _fingerprint_files(root) == before, "the import copied, moved or changed nothing"
        assert_serves(wharf, pushed)
        with wharf.http() as http:
            catalog = http.get("/v2/_catalog").json()["repositories"]
            assert catalog == sorted(pushed.repositories)
            # The OCI artifact is a referrer of v1, as Wharf's own pushes are.
            v1 = pushed.repositories["team/app"].tags["v1"]
            referrers = http.get(f"/v2/team/app/referrers/{v1}").json()["manifests"]
            assert [r.get("artifactType") for r in referrers] == ["application/spdx+json"]
        # The leader's GC (grace 1s, every 1s) runs a few cycles, then one by hand.
        wait_until(lambda: wharf.gc_cycles() >= 3, timeout=60, what="three GC cycles")
        manual = wharf.command("garbage-collect")
        assert manual.returncode == 0, manual.stderr
        assert _fingerprint_files(root) == before, "GC kept every object registry:2 wrote"
        assert_serves(wharf, pushed)
        with DockerRegistry(tmp_path, {"filesystem": {"rootdirectory": str(root)}}) as again:
            for ref in ("team/app:v1", "team/sub/app:latest", "library/base:1.0"):
                _skopeo_identical(again.host, wharf.host, ref, tmp_path)
    finally:
        wharf.stop()


def test_manifests_go_reads_and_python_finds_odd_are_adopted_byte_identical(tmp_path):
    # registry:2 decodes manifests with Go, which skips a field it does not know whatever number it
    # holds and reads bytes that are not UTF-8 inside a string as U+FFFD: such manifests are in
    # registry:2 stores, and adoption must take them as they are.
    root = tmp_path / "registry"
    bodies: dict[str, bytes] = {}
    with DockerRegistry.on_filesystem(tmp_path, root) as registry:
        client = registry.client()
        config_blob = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        config_digest = client.push_blob("odd/app", config_blob)
        layer = os.urandom(3000)
        layer_digest = client.push_blob("odd/app", layer)
        base = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config_blob),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer)}
            ],
        }
        text = json.dumps(base)
        bodies["huge-number"] = (text[:-1] + ', "x-extra": ' + "9" * 5000 + "}").encode()
        bodies["not-utf8"] = (text[:-1] + ', "annotations": {"note": "caf').encode() + b'\xe9"}}'
        with registry.http() as http:
            for tag, body in bodies.items():
                put = http.put(
                    f"/v2/odd/app/manifests/{tag}",
                    content=body,
                    headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
                )
                assert put.status_code == 201, (tag, put.text)
        config = registry.config()
    wharf = Wharf(tmp_path, config)
    wharf.start()
    try:
        state = wharf.wait_imported()
        assert state["problems"] == 0, state
        with wharf.http() as http:
            assert sorted(http.get("/v2/odd/app/tags/list").json()["tags"]) == sorted(bodies)
            for tag, body in bodies.items():
                got = http.get(
                    f"/v2/odd/app/manifests/{tag}", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
                )
                assert got.status_code == 200 and got.content == body, tag
                assert got.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    finally:
        wharf.stop()


@pytest.mark.parametrize("server", ["s3_server", "rgw_server"])
def test_registry2_s3_store_is_adopted_in_the_same_bucket(tmp_path, server, etcd, request):
    s3_server = request.getfixturevalue(server)
    root = f"/adopt-{free_port()}"
    prefix = f"/adopt-{free_port()}/"
    try:
        with DockerRegistry.on_s3(tmp_path, s3_server, root) as registry:
            pushed = fill_store(registry, tmp_path)
            config = registry.config()
        before = {k: v for k, v in s3_server.keys(root.strip("/") + "/docker/").items()}
        config["coordinator"] = {"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}}
        wharf = Wharf(tmp_path, {**config, **_wharf_gc_settings()})
        wharf.start()
        try:
            wharf.wait_imported()
            assert s3_server.keys(root.strip("/") + "/docker/") == before
            assert_serves(wharf, pushed)
            wait_until(lambda: wharf.gc_cycles() >= 3, timeout=60, what="three GC cycles")
            assert wharf.command("garbage-collect").returncode == 0
            assert s3_server.keys(root.strip("/") + "/docker/") == before, "every object stays, same bytes"
            assert_serves(wharf, pushed)
        finally:
            wharf.stop()
    finally:
        s3_server.remove_prefix(root.strip("/") + "/")
        etcd.delete_prefix(prefix)


@pytest.mark.parametrize("storage", ["filesystem", "s3"])
def test_export_lets_registry2_serve_old_and_new_images_byte_identical(tmp_path, storage, request):
    if storage == "filesystem":
        root_dir = tmp_path / "registry"
        distribution = DockerRegistry.on_filesystem(tmp_path, root_dir)
        extra: dict[str, Any] = {}
    else:
        server = request.getfixturevalue("s3_server")
        root = f"/export-{free_port()}"
        distribution = DockerRegistry.on_s3(tmp_path, server, root)
        extra = {"coordinator": {"embedded": {"path": str(tmp_path / "coordinator.db")}}}
        request.addfinalizer(lambda: server.remove_prefix(root.strip("/") + "/"))
    with distribution:
        pushed = fill_store(distribution, tmp_path)
        config = distribution.config()
    if storage == "s3":
        # Small parts, so a large blob pushed through Wharf is a multipart upload, stored where it was
        # uploaded until the export copies it to where registry:2 looks.
        config["storage"]["s3"]["chunksize"] = 5 * 1024 * 1024
    wharf = Wharf(tmp_path, {**config, **extra})
    wharf.start()
    try:
        wharf.wait_imported()
        config_blob = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        layers = {"team/app": [os.urandom(5000), os.urandom(11 * 1024 * 1024 + 5)], "fresh/repo": [os.urandom(3000)]}
        with wharf.http() as http:
            client = OCIClient(http)
            new = client.push_image("team/app", "v3", layers=layers["team/app"])
            moved = client.push_image("fresh/repo", "latest", layers=layers["fresh/repo"])
        pushed.add_image("team/app", new, [config_blob, *layers["team/app"]], "v3")
        pushed.add_image("fresh/repo", moved, [config_blob, *layers["fresh/repo"]], "latest")
        dry = wharf.command("export", "--dry-run")
        assert dry.returncode == 0 and "nothing was changed" in dry.stdout, dry.stderr
        counted = wharf.command("export", "--dry-run", "--json")
        exported = wharf.command("export", "--json")
        assert exported.returncode == 0, exported.stdout + exported.stderr
        # The dry run says what the export then does: the same links to write, the same already right.
        would, did = json.loads(counted.stdout), json.loads(exported.stdout)
        assert did["links_written"] > 0
        assert (would["links_written"], would["links_unchanged"]) == (did["links_written"], did["links_unchanged"])
        again = wharf.command("export", "--json")
        assert json.loads(again.stdout)["links_written"] == 0, "a second export writes nothing"
        # Deleted through Wharf after the export: registry:2 still serves it, Wharf must not adopt it again.
        with wharf.http() as http:
            gone = pushed.repositories["team/sub/app"].tags["latest"]
            assert http.delete(f"/v2/team/sub/app/manifests/{gone}").status_code == 202
    finally:
        wharf.stop()
    with distribution:
        # Every tag, old and new, every manifest and every blob, byte-identical, and the catalog.
        assert_serves(distribution, pushed)
        with distribution.http() as http:
            assert sorted(http.get("/v2/_catalog").json()["repositories"]) == sorted(pushed.repositories)
        # What registry:2 does while it serves the store: a new tag, a tag moved, a manifest deleted.
        time.sleep(1.1)  # link times are the storage's, in whole seconds on some: after the export's
        client = distribution.client()
        rolled_back = client.push_image("rolled/back", "v1", layers=[os.urandom(2000)])
        moved = client.push_image("team/app", "v2", layers=[os.urandom(2500)])
        deleted = pushed.repositories["team/sub/app"].tags["docker"]
        with distribution.http() as http:
            assert http.delete(f"/v2/team/sub/app/manifests/{deleted}").status_code == 202
            assert http.get("/v2/team/sub/app/tags/list").json()["tags"] == ["latest"]
    # Forward again: the first start imports registry:2's tree again and takes what it changed.
    forward = Wharf(tmp_path, {**config, **extra})
    forward.start()
    try:
        assert "written back in registry:2's layout by `wharf export`" in forward.log_path.read_text()
        forward.wait_imported()
        with forward.http() as http:
            got = http.get("/v2/rolled/back/manifests/v1", headers={"Accept": rolled_back.media_type})
            assert got.status_code == 200 and got.content == rolled_back.body
            got = http.get("/v2/team/app/manifests/v2", headers={"Accept": moved.media_type})
            assert got.status_code == 200 and got.content == moved.body
            # Deleted through registry:2 since the export (its tag), and through Wharf (not adopted again).
            listed = http.get("/v2/team/sub/app/tags/list")
            assert listed.status_code == 404 or not listed.json()["tags"], listed.text
            v1 = pushed.repositories["team/app"].tags["v1"]
            assert http.get("/v2/team/app/manifests/v1").headers.get("Docker-Content-Digest") == v1
    finally:
        forward.stop()
    after = Wharf(tmp_path, {**config, **extra})
    after.start()
    try:
        with after.http() as http:
            assert http.get("/v2/team/app/manifests/v2").headers.get("Docker-Content-Digest") == moved.digest
        assert "written back in registry:2's layout" not in after.log_path.read_text()
    finally:
        after.stop()


def _coordinator_records(path: Path) -> dict[str, bytes]:
    """What an import wrote: registry records, without import timing or leases."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT key, value FROM kv").fetchall()
    keep = ("repo/", "tag/", "manifest/", "link/", "blob/", "referrer/")
    return {key: value for key, value in rows if key.startswith(keep)}


def _import_progress(path: Path) -> dict[str, Any] | None:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            row = db.execute("SELECT value FROM kv WHERE key = 'store/import'").fetchone()
    except sqlite3.Error:
        return None
    return json.loads(row[0]) if row else None


def test_import_killed_midway_resumes_to_the_same_result_as_an_uninterrupted_one(tmp_path):
    root = tmp_path / "registry"
    with DockerRegistry.on_filesystem(tmp_path, root) as registry:
        pushed = fill_store(registry, tmp_path)
        for n in range(8):
            fill_many_tags(registry, pushed, f"many/r{n}", 260)
        config = registry.config()
    assert sum(len(r.tags) for r in pushed.repositories.values()) >= 2000
    twin = tmp_path / "twin"
    shutil.copytree(root, twin / "registry", copy_function=shutil.copy2)
    # The twin: imported in one go, by hand.
    twin_config = {**config, "storage": {**config["storage"], "filesystem": {"rootdirectory": str(twin / "registry")}}}
    whole = Wharf(twin, twin_config)
    done = whole.command("import")
    assert done.returncode == 0, done.stderr
    # The original: killed mid-import, then started again.
    wharf = Wharf(tmp_path, config)
    coordinator = root / "wharf" / "coordinator.db"
    wharf.start()
    progress = wait_until(
        lambda: (p := _import_progress(coordinator)) is not None and p.get("repositories_done", 0) >= 2 and p,
        timeout=120,
        interval=0.02,
        what="an import under way",
    )
    wharf.stop(signal.SIGKILL)
    assert progress["state"] == "running"
    assert _import_progress(coordinator)["repositories_done"] < 11, "killed midway, not at the end"
    wharf.start()
    try:
        state = wharf.wait_imported()
        assert state["repositories_done"] == 11
        assert_serves(wharf, pushed)
    finally:
        wharf.stop()
    assert _coordinator_records(coordinator) == _coordinator_records(twin / "registry" / "wharf" / "coordinator.db")


def test_dry_run_import_changes_nothing_and_a_gc_before_import_is_refused(tmp_path):
    root = tmp_path / "registry"
    with DockerRegistry.on_filesystem(tmp_path, root) as registry:
        fill_store(registry, tmp_path)
        config = registry.config()
    wharf = Wharf(tmp_path, config)
    files = {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}
    dry = wharf.command("import", "--dry-run")
    assert dry.returncode == 0 and "3/3 repositories" in dry.stdout and "nothing was changed" in dry.stdout, dry
    gc = wharf.command("gc")
    assert gc.returncode == 2 and "not adopted yet" in gc.stderr
    assert {str(p): p.stat().st_mtime_ns for p in root.rglob("*")} == files
    assert not (root / "wharf").exists()
    time.sleep(0)  # the store is untouched until wharf serve or wharf import adopts it
