"""Backups over real processes: `wharf backup` and `wharf restore` against a real `wharf serve`.

Each test runs on the embedded coordinator with filesystem storage and on etcd with S3 (moto):
images are pushed in a loop while a snapshot is taken, the coordinator is lost (its file deleted;
a new etcd prefix, or a new etcd with a fresh data directory), restored, and the registry started
again: every tag acknowledged before the snapshot must pull byte-identical.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from oci_client import OCI_MANIFEST, OCIClient
from services import EtcdCluster, wait_until
from wharf_process import WharfProcess

from coordinator.etcd import EtcdKV
from node.config import load

REPO_ROOT = Path(__file__).resolve().parent.parent
SNAPSHOTS = "wharf/snapshots/"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wharf_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "AWS_"))} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        cwd=str(REPO_ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in last, last


# -- pushing while a snapshot is taken -------------------------------------------------------------


@dataclass
class Pushed:
    repo: str
    tag: str
    acked: float
    manifest: bytes
    blobs: dict[str, bytes]


class PushLoop:
    """Pushes small images (a shared layer and one of their own) in a thread until stopped or refused."""

    def __init__(self, url: str, *, limit: int = 400, seconds: float = 120) -> None:
        self.url = url
        self.limit = limit
        self.seconds = seconds
        self.pushed: list[Pushed] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.shared = os.urandom(4096)

    def __enter__(self) -> PushLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Pushed]:
        self._stop.set()
        self._thread.join(60)
        return self.pushed

    def wait_for(self, count: int, timeout: float = 60) -> None:
        wait_until(lambda: len(self.pushed) >= count or self.error, timeout=timeout, what=f"{count} pushes")
        assert self.error is None, self.error

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        with httpx.Client(base_url=self.url, timeout=30) as http:
            client = OCIClient(http)
            n = 0
            while not self._stop.is_set() and n < self.limit and time.monotonic() < deadline:
                repo = f"team/app{n % 3}"
                own = os.urandom(2048) + str(n).encode()
                config = json.dumps({"architecture": "amd64", "os": "linux", "n": n}).encode()
                try:
                    image = client.push_image(repo, f"v{n}", layers=[self.shared, own], config=config)
                except (httpx.HTTPError, AssertionError) as exc:
                    self.error = exc  # the server was stopped under the loop: what was acked stands
                    return
                blobs = {_digest(b): b for b in (self.shared, own, config)}
                self.pushed.append(Pushed(repo, f"v{n}", time.time(), image.body, blobs))
                n += 1


def _digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_pulls_identical(url: str, images: list[Pushed]) -> None:
    assert images
    with httpx.Client(base_url=url, timeout=30) as http:
        for image in images:
            response = http.get(f"/v2/{image.repo}/manifests/{image.tag}", headers={"Accept": OCI_MANIFEST})
            assert response.status_code == 200, (image.repo, image.tag, response.text)
            assert response.content == image.manifest
            for digest, data in image.blobs.items():
                blob = http.get(f"/v2/{image.repo}/blobs/{digest}")
                assert blob.status_code == 200 and blob.content == data, (image.repo, image.tag, digest)


def header_of(data: bytes) -> dict[str, Any]:
    with gzip.open(__import__("io").BytesIO(data)) as f:
        return json.loads(f.readline())  # type: ignore[no-any-return]


def metric(process: WharfProcess, name: str) -> float | None:
    with _DIRECT.open(process.metrics_url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None


# -- the two deployments --------------------------------------------------------------------------


@dataclass
class Deployment:
    """Embedded coordinator on filesystem storage, or etcd on S3; what a test needs of either."""

    name: str
    tmp: Path
    etcd: EtcdCluster | None = None
    s3: Any = None
    roots: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)

    def settings(self, storage_root: str | None = None, **sections: Any) -> dict[str, Any]:
        """WharfProcess settings: a new coordinator (an etcd prefix, or the file a root gets by default)."""
        if self.name == "embedded":
            root = storage_root or str(self.tmp / "registry")
            return {"storage": {"filesystem": {"rootdirectory": root}, "delete": {"enabled": True}}, **sections}
        assert self.s3 is not None and self.etcd is not None
        root = storage_root or self.new_root()
        s3 = dataclasses.asdict(self.s3.storage_config(root))
        return {
            "storage": {"s3": s3, "delete": {"enabled": True}, "redirect": {"disable": True}},
            "coordinator": {"etcd": {"endpoints": self.etcd.endpoints, "prefix": self.new_prefix()}},
            **sections,
        }

    def new_root(self) -> str:
        root = f"/backup-{uuid.uuid4().hex[:12]}"
        self.roots.append(root)
        return root

    def new_prefix(self) -> str:
        prefix = f"/wharf-backup-{uuid.uuid4().hex[:12]}/"
        self.prefixes.append(prefix)
        return prefix

    def backup_target(self) -> str:
        if self.name == "embedded":
            return str(self.tmp / "backups")
        return f"s3://{self.s3.bucket}{self.new_root()}/nightly"

    def wipe_coordinator(self, process: WharfProcess) -> None:
        """Lose the coordinator: the embedded file goes; on etcd the node is pointed at an empty prefix."""
        if self.name == "embedded":
            path = load(str(process.config_path), environ={}).coordinator.embedded.path  # type: ignore[union-attr]
            for suffix in ("", "-wal", "-shm"):
                Path(path + suffix).unlink(missing_ok=True)
            assert not Path(path).exists()
        else:
            process.config["coordinator"]["etcd"]["prefix"] = self.new_prefix()
            process.config_path.write_text(yaml.safe_dump(process.config))

    def storage_root(self, process: WharfProcess) -> str:
        storage = process.config["storage"]
        return str(storage["s3"]["rootdirectory"] if "s3" in storage else storage["filesystem"]["rootdirectory"])

    def snapshots_in_storage(self, process: WharfProcess) -> dict[str, bytes]:
        """What is under wharf/snapshots/ now (a snapshot pruned while this reads is left out)."""
        root = self.storage_root(process)
        if self.name == "embedded":
            base = Path(root) / SNAPSHOTS
            found = {}
            for path in sorted(base.iterdir()) if base.is_dir() else []:
                try:
                    if not path.name.startswith(".tmp-"):
                        found[path.name] = path.read_bytes()
                except FileNotFoundError:
                    pass
            return found
        return {key.rsplit("/", 1)[-1]: data for key, data in self.objects(root.strip("/") + "/" + SNAPSHOTS).items()}

    def objects(self, prefix: str) -> dict[str, bytes]:
        client = self.s3.client()
        try:
            found = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.s3.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    try:
                        found[item["Key"]] = client.get_object(Bucket=self.s3.bucket, Key=item["Key"])["Body"].read()
                    except client.exceptions.NoSuchKey:
                        pass
            return found
        finally:
            client.close()

    def copy_storage(self, process: WharfProcess) -> str:
        """A copy of the storage alone (no coordinator file in it); returns the copy's root."""
        root = self.storage_root(process)
        if self.name == "embedded":
            copy = str(self.tmp / "registry-copy")
            shutil.copytree(root, copy)
            coordinator = load(str(process.config_path), environ={}).coordinator.embedded.path  # type: ignore[union-attr]
            if os.path.realpath(coordinator).startswith(os.path.realpath(root) + os.sep):
                relative = os.path.relpath(coordinator, root)
                for suffix in ("", "-wal", "-shm"):
                    Path(copy, relative + suffix).unlink(missing_ok=True)
            return copy
        copy = self.new_root()
        client = self.s3.client()
        try:
            source = root.strip("/") + "/"
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.s3.bucket, Prefix=source):
                for item in page.get("Contents", []):
                    target = copy.strip("/") + "/" + item["Key"][len(source) :]
                    client.copy_object(
                        Bucket=self.s3.bucket, Key=target, CopySource={"Bucket": self.s3.bucket, "Key": item["Key"]}
                    )
        finally:
            client.close()
        return copy

    def cleanup(self) -> None:
        if self.s3 is not None:
            for root in self.roots:
                self.s3.remove_prefix(root.strip("/") + "/")
        if self.etcd is not None and self.prefixes:
            endpoints = self.etcd.endpoints

            async def remove(prefix: str) -> None:
                kv = await EtcdKV.open(endpoints, prefix=prefix)
                try:
                    await kv.delete("", prefix=True)
                finally:
                    await kv.close()

            for prefix in self.prefixes:
                asyncio.run(remove(prefix))


@pytest.fixture(params=["embedded", "etcd+s3"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    if request.param == "embedded":
        chosen = Deployment("embedded", tmp_path)
    else:
        chosen = Deployment(
            "etcd+s3", tmp_path, etcd=request.getfixturevalue("etcd"), s3=request.getfixturevalue("s3_server")
        )
    try:
        yield chosen
    finally:
        chosen.cleanup()


def _snapshot_at(deployment: Deployment, target: str) -> bytes:
    """The one snapshot a `wharf backup --to target` wrote."""
    if deployment.name == "embedded":
        (only,) = Path(target).iterdir()
        return only.read_bytes()
    prefix = target[len(f"s3://{deployment.s3.bucket}/") :] + "/"
    (only,) = deployment.objects(prefix).values()
    return only


# -- the tests ------------------------------------------------------------------------------------


def test_a_backup_taken_during_pushes_restores_every_tag_acknowledged_before_it(deployment, tmp_path):
    node = WharfProcess(tmp_path / "node", **deployment.settings(backup={"enabled": False}))
    target = deployment.backup_target()
    with node:
        with PushLoop(node.url) as loop:
            loop.wait_for(15)
            backup = wharf_cli("backup", str(node.config_path), "--to", target)
            assert backup.returncode == 0, backup.stderr
            count_at_backup = len(loop.pushed)
            loop.wait_for(count_at_backup + 10)  # and pushes went on after it
        pushed = loop.stop()
        assert loop.error is None, loop.error
    assert "wrote" in backup.stdout and "keys at revision" in backup.stdout
    header = header_of(_snapshot_at(deployment, target))
    before = [p for p in pushed if p.acked < header["created_unix"]]
    assert len(before) >= 15

    deployment.wipe_coordinator(node)
    restored = wharf_cli("restore", str(node.config_path), "--from", target)
    assert restored.returncode == 0, restored.stderr
    assert "restored" in restored.stdout
    again = wharf_cli("restore", str(node.config_path), "--from", target)
    assert_one_line_failure(again, 3, "refused", "not empty", "--force")
    forced = wharf_cli("restore", str(node.config_path), "--from", target, "--force")
    assert forced.returncode == 0, forced.stderr
    assert " 0 keys written, 0 deleted" in forced.stdout

    with node:
        assert_pulls_identical(node.url, before)
        with httpx.Client(base_url=node.url, timeout=30) as http:
            catalog = http.get("/v2/_catalog").json()["repositories"]
        assert {p.repo for p in before} <= set(catalog)


def test_a_copy_of_the_storage_alone_restores_every_tag_as_of_the_leaders_last_snapshot(deployment, tmp_path):
    node = WharfProcess(tmp_path / "node", **deployment.settings(backup={"interval": "2s", "keep": 3}))
    with node:
        with PushLoop(node.url) as loop:
            loop.wait_for(5)
            started = time.time()
            # Several of the leader's snapshots while pushes go on, then the node stops under the loop.
            wait_until(
                lambda: (
                    sum(1 for name in deployment.snapshots_in_storage(node) if name.endswith(".jsonl.gz")) >= 3
                    and len(loop.pushed) >= 25
                ),
                timeout=90,
                what="three scheduled snapshots",
            )
            wait_until(lambda: metric(node, "wharf_backup_last_snapshot_bytes"), timeout=30, what="backup metric")
            assert (metric(node, "wharf_backup_last_snapshot_timestamp_seconds") or 0) >= started
            assert (metric(node, "wharf_backup_last_snapshot_keys") or 0) > 0
            foreign = _plant_foreign_objects(deployment, node)
            wait_until(
                lambda: (
                    len([n for n in deployment.snapshots_in_storage(node) if n not in foreign]) == 3
                    and loop.pushed[-1].acked > started + 4
                ),
                timeout=60,
                what="pruning to three snapshots",
            )
            node.stop()
        pushed = loop.stop()
    logged = [line for line in node.log_text().splitlines() if "coordinator snapshot" in line]
    assert len(logged) >= 3 and all("keys at revision" in line for line in logged)

    snapshots = deployment.snapshots_in_storage(node)
    for name in foreign:
        assert name in snapshots, f"{name} is not Wharf's to delete"
    ours = sorted(n for n in snapshots if n not in foreign)
    assert len(ours) <= 3 + 1  # backup.keep, and one more if the node stopped between writing and pruning
    header = header_of(snapshots[ours[-1]])
    before = [p for p in pushed if p.acked < header["created_unix"]]
    assert len(before) >= 20

    copy = deployment.copy_storage(node)
    with EtcdCluster(1) if deployment.etcd is not None else _nothing() as fresh:
        settings = deployment.settings(storage_root=copy)
        if fresh is not None:  # on etcd: a new etcd, with a fresh data directory
            settings["coordinator"] = {"etcd": {"endpoints": fresh.endpoints, "prefix": "/wharf/"}}
        restored_node = WharfProcess(tmp_path / "restored", **settings)
        restored = wharf_cli("restore", str(restored_node.config_path), "--from-storage")
        assert restored.returncode == 0, restored.stderr
        assert ours[-1] in restored.stderr
        with restored_node:
            assert_pulls_identical(restored_node.url, before)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        pass


def _plant_foreign_objects(deployment: Deployment, node: WharfProcess) -> list[str]:
    """Objects beside the snapshots that are not Wharf's snapshots: pruning must leave them."""
    names = ["README.txt", "wharf-coordinator-20200101T000000.000Z-r1.jsonl.gz.kept-by-hand"]
    root = deployment.storage_root(node)
    if deployment.name == "embedded":
        for name in names:
            (Path(root) / SNAPSHOTS / name).write_bytes(b"an operator's file")
    else:
        client = deployment.s3.client()
        try:
            for name in names:
                client.put_object(Bucket=deployment.s3.bucket, Key=root.strip("/") + "/" + SNAPSHOTS + name, Body=b"x")
        finally:
            client.close()
    return names


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `root` with its mtime (ns) and size."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in [root, *root.rglob("*")]}


def _bucket(deployment: Deployment) -> dict[str, tuple[str, Any]]:
    client = deployment.s3.client()
    try:
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=deployment.s3.bucket):
            for item in page.get("Contents", []):
                found[item["Key"]] = (item["ETag"], item["LastModified"])
        uploads = client.list_multipart_uploads(Bucket=deployment.s3.bucket).get("Uploads", [])
        found.update({f"upload {u['Key']}": (u["UploadId"], None) for u in uploads})
        return found
    finally:
        client.close()


def _etcd_revision(deployment: Deployment) -> int:
    async def revision() -> int:
        assert deployment.etcd is not None
        kv = await EtcdKV.open(deployment.etcd.endpoints, prefix="/")
        try:
            return (await kv.txn([], [])).revision
        finally:
            await kv.close()

    return asyncio.run(revision())


def test_dry_runs_create_and_change_nothing_anywhere(deployment, tmp_path):
    node = WharfProcess(tmp_path / "node", **deployment.settings(backup={"interval": "1h"}))
    target = deployment.backup_target()
    with node:
        wait_until(lambda: deployment.snapshots_in_storage(node), timeout=30, what="the leader's first snapshot")
        with PushLoop(node.url, limit=5) as loop:
            loop.wait_for(5)
    assert wharf_cli("backup", str(node.config_path), "--to", target).returncode == 0
    # The same storage with a coordinator that does not exist yet (a file elsewhere, or a new prefix).
    elsewhere = {"coordinator": {"embedded": {"path": str(tmp_path / "empty" / "lost.db")}}}
    empty_settings = deployment.settings(storage_root=deployment.storage_root(node))
    empty = WharfProcess(
        tmp_path / "empty", **(empty_settings | elsewhere if deployment.name == "embedded" else empty_settings)
    )
    new_dir = tmp_path / "never-created"
    commands = [
        ["backup", str(node.config_path), "--to", str(new_dir), "--dry-run"],
        ["backup", str(node.config_path), "--to", target, "--dry-run"],
        ["restore", str(node.config_path), "--from", target, "--dry-run", "--force"],
        ["restore", str(node.config_path), "--from-storage", "--dry-run", "--force"],
        ["restore", str(empty.config_path), "--from", target, "--dry-run"],
        ["restore", str(empty.config_path), "--from-storage", "--dry-run"],
    ]
    if deployment.name == "etcd+s3":
        commands.append(["backup", str(node.config_path), "--to", deployment.backup_target(), "--dry-run"])
    files, bucket, revision = _tree(tmp_path), None, None
    if deployment.name == "etcd+s3":
        bucket, revision = _bucket(deployment), _etcd_revision(deployment)
    time.sleep(0.02)  # past the file system's timestamp granularity: a change would now show in an mtime
    for command in commands:
        result = wharf_cli(*command)
        assert result.returncode == 0, (command, result.stderr)
        assert "dry run" in result.stdout and "nothing was written" in result.stdout, (command, result.stdout)
    refused = wharf_cli("restore", str(node.config_path), "--from", target, "--dry-run")
    assert_one_line_failure(refused, 3, "refused", "not empty")
    assert not new_dir.exists()
    assert _tree(tmp_path) == files
    if deployment.name == "etcd+s3":
        assert _bucket(deployment) == bucket
        assert _etcd_revision(deployment) == revision


def test_backup_and_restore_failures_are_one_line_with_an_exit_code(tmp_path):
    node = WharfProcess(tmp_path / "node")
    config = str(node.config_path)
    assert_one_line_failure(wharf_cli("backup", config, "--to", str(tmp_path / "b")), 1, "no coordinator")
    assert not (tmp_path / "b").exists()
    assert_one_line_failure(wharf_cli("restore", config, "--from", str(tmp_path / "nowhere")), 1, "no such file")
    assert_one_line_failure(wharf_cli("restore", config, "--from-storage"), 1, "no snapshots")
    assert_one_line_failure(wharf_cli("backup", config, "--to", "s3:///prefix"), 2, "bucket")
    (tmp_path / "empty-dir").mkdir()
    assert_one_line_failure(wharf_cli("restore", config, "--from", str(tmp_path / "empty-dir")), 1, "no snapshots")
    header = {"format": "wharf-coordinator-snapshot", "version": 1, "revision": 9, "created_unix": 1.0}
    header.update({"backend": "etcd", "keys_at_revision": 1})
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(json.dumps(header).encode() + b'\n{"k": "repo/a", "v": ""}\n')[:-4])
    assert_one_line_failure(wharf_cli("restore", config, "--from", str(broken)), 1, "damaged snapshot")
    assert not Path(load(config, environ={}).coordinator.embedded.path).exists()  # type: ignore[union-attr]
    unreachable = WharfProcess(tmp_path / "etcd-down", coordinator={"etcd": {"endpoints": ["http://127.0.0.1:1"]}})
    result = wharf_cli("backup", str(unreachable.config_path), "--to", str(tmp_path / "b"), timeout=60)
    assert_one_line_failure(result, 1)
    assert result.stderr.count("\n") == 1


def test_an_s3_target_elsewhere_takes_its_endpoint_by_flag_and_credentials_from_the_environment(tmp_path, s3_server):
    node = WharfProcess(tmp_path / "node", backup={"enabled": False})
    prefix = f"elsewhere-{uuid.uuid4().hex[:12]}"
    target = f"s3://{s3_server.bucket}/{prefix}"
    flags = ["--s3-endpoint", s3_server.endpoint, "--s3-region", s3_server.region]
    credentials = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    try:
        with node:
            with PushLoop(node.url, limit=8) as loop:
                loop.wait_for(8)
            pushed = loop.stop()
            without = wharf_cli("backup", str(node.config_path), "--to", target, *flags)
            assert_one_line_failure(without, 1, "credentials")
            backup = wharf_cli("backup", str(node.config_path), "--to", target, *flags, env=credentials)
            assert backup.returncode == 0, backup.stderr
        (key,) = Deployment("etcd+s3", tmp_path, s3=s3_server).objects(prefix + "/")
        name = key.rsplit("/", 1)[-1]
        Path(load(str(node.config_path), environ={}).coordinator.embedded.path).unlink()  # type: ignore[union-attr]
        restored = wharf_cli("restore", str(node.config_path), "--from", f"{target}/{name}", *flags, env=credentials)
        assert restored.returncode == 0, restored.stderr
        with node:
            assert_pulls_identical(node.url, pushed)
    finally:
        s3_server.remove_prefix(prefix + "/")
