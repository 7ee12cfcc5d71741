"""One store, one truth: where a store's metadata lives, its identity, and commands that change nothing."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from oci_client import OCIClient, digest_of
from services import free_port, wait_until
from wharf_process import WharfProcess

from coordinator import keys
from coordinator.etcd import EtcdKV
from coordinator.kv import Put

REPO_ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra)
    return env


def wharf(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd or REPO_ROOT,
        env=env or _env(),
    )


class Serve:
    """`wharf serve` started as a user would: any cwd, a file or none, REGISTRY_* variables."""

    def __init__(self, cwd: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.cwd = cwd
        self.args = args
        self.env = _env(REGISTRY_HTTP_ADDR=f"127.0.0.1:{self.port}", REGISTRY_HTTP_DEBUG_ADDR="", **(env or {}))
        self.log = cwd / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> httpx.Client:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", *self.args],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"wharf exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                return self.http.get("/v2/").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=30, what="wharf serve")
        return self.http

    def __exit__(self, *exc: object) -> None:
        self.http.close()
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(20)


def _tags(http: httpx.Client, repo: str) -> list[str]:
    response = http.get(f"/v2/{repo}/tags/list")
    return response.json()["tags"] if response.status_code == 200 else []


def _write_config(path: Path, root: Path, **sections: Any) -> Path:
    config: dict[str, Any] = {
        "version": 0.1,
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{free_port()}", "debug": {"addr": ""}},
        **sections,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime (ns)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            st = path.stat()
            found[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return found


def test_make_run_store_is_the_same_store_for_a_file_variables_and_every_command(tmp_path):
    home = tmp_path / "home"
    elsewhere = tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    root = home / "wharf-data" / "registry"
    # `make run`: no file, started in the checkout.
    with Serve(home) as http:
        image = OCIClient(http).push_image("team/app", "v1", layers=[os.urandom(3000)])
    assert (root / "wharf" / "coordinator.db").is_file(), "the metadata lives inside the storage root"
    assert not (home / "wharf-data" / "coordinator.db").exists()
    # A registry:2 style file naming only the root, from another directory.
    config = _write_config(elsewhere / "config.yml", root, gc={"grace": "0s"})
    with Serve(elsewhere, str(config)) as http:
        assert _tags(http, "team/app") == ["v1"]
    # REGISTRY_* variables without a file, from yet another directory.
    with Serve(elsewhere, env={"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(root)}) as http:
        assert _tags(http, "team/app") == ["v1"]
        assert http.get(f"/v2/team/app/manifests/{image.digest}", headers={"Accept": image.media_type}).content == (
            image.body
        )
    assert not (elsewhere / "wharf-data").exists(), "nothing is created where the process merely started"
    # Every command pointed at that root finds the same store.
    listed = wharf("immutability", "ls", "--json", str(config), cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr
    quota = wharf("quota", "ls", str(config), cwd=elsewhere)
    assert quota.returncode == 0, quota.stderr
    explained = wharf("gc", "--explain", f"team/app@{image.digest}", str(config), cwd=elsewhere)
    assert explained.returncode == 0 and "tagged as team/app:v1" in explained.stdout, explained.stdout
    before = _files(root / "docker")
    collected = wharf("garbage-collect", str(config), cwd=elsewhere)
    assert collected.returncode == 0, collected.stderr
    assert _files(root / "docker") == before, "a manual GC never deletes what a tag uses"
    with Serve(home) as http:
        assert _tags(http, "team/app") == ["v1"]


def test_coordinator_file_beside_the_root_is_moved_in_at_first_start(tmp_path):
    root = tmp_path / "registry"
    old = tmp_path / "registry-coordinator.db"
    earlier = _write_config(tmp_path / "earlier.yml", root, coordinator={"embedded": {"path": str(old)}})
    with Serve(tmp_path, str(earlier)) as http:
        OCIClient(http).push_image("team/app", "v1")
    assert old.is_file()
    config = _write_config(tmp_path / "config.yml", root)
    # A read-only command reads it where it is and moves nothing.
    listed = wharf("immutability", "ls", str(config))
    assert listed.returncode == 0, listed.stderr
    assert old.is_file() and not (root / "wharf" / "coordinator.db").exists()
    serve = Serve(tmp_path, str(config))
    with serve as http:
        assert _tags(http, "team/app") == ["v1"]
    assert not old.exists() and (root / "wharf" / "coordinator.db").is_file()
    assert "moved the coordinator file" in serve.log.read_text()


def test_default_store_of_an_earlier_make_run_is_moved_in(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    old = home / "wharf-data" / "coordinator.db"
    earlier = _write_config(home / "earlier.yml", home / "wharf-data" / "registry")
    earlier_config = yaml.safe_load(earlier.read_text())
    earlier_config["coordinator"] = {"embedded": {"path": str(old)}}
    earlier.write_text(yaml.safe_dump(earlier_config))
    with Serve(home, str(earlier)) as http:
        OCIClient(http).push_image("team/app", "v1")
    with Serve(home) as http:
        assert _tags(http, "team/app") == ["v1"]
    assert not old.exists()


def test_dry_runs_and_listings_change_no_file_and_no_mtime(tmp_path):
    root = tmp_path / "registry"
    config = _write_config(
        tmp_path / "config.yml",
        root,
        gc={"grace": "0s"},
        retention={"policies": [{"repositories": ["**"], "keeplast": 1}]},
    )
    with WharfProcess(tmp_path / "node", storage={"filesystem": {"rootdirectory": str(root)}}) as node:
        client = OCIClient(httpx.Client(base_url=node.url))
        for n in range(3):
            client.push_image("team/app", f"v{n}", layers=[os.urandom(2000)])
        digest = client.push_image("team/app", "gone").digest
        assert client.http.delete(f"/v2/team/app/manifests/{digest}").status_code == 202
    before = _files(root)
    for args in (
        ("gc", "--dry-run", str(config)),
        ("gc", "--dry-run", "--delete-untagged", "--delete-unaccounted", str(config)),
        ("retention", "apply", "--dry-run", str(config)),
        ("quota", "ls", str(config)),
        ("immutability", "ls", str(config)),
        ("gc", "--explain", "team/app@" + digest, str(config)),
    ):
        result = wharf(*args)
        assert result.returncode == 0, (args, result.stderr)
    dry = wharf("gc", "--dry-run", str(config))
    assert "would delete" in dry.stdout and "dry run: nothing was changed" in dry.stdout
    assert _files(root) == before


def test_commands_on_a_missing_store_create_nothing(tmp_path):
    root = tmp_path / "nothing-here"
    config = _write_config(tmp_path / "config.yml", root)
    for args in (
        ("gc", "--dry-run", str(config)),
        ("gc", str(config)),
        ("quota", "ls", str(config)),
        ("rm", "-c", str(config), "team/app:v1"),
    ):
        result = wharf(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "no Wharf store" in result.stderr
    assert wharf("retention", "apply", "--dry-run", str(config)).stdout == "no retention policies configured\n"
    assert not root.exists()


def test_lost_embedded_coordinator_is_refused_and_nothing_is_written(tmp_path):
    root = tmp_path / "registry"
    config = _write_config(tmp_path / "config.yml", root)
    with Serve(tmp_path, str(config)) as http:
        OCIClient(http).push_image("team/app", "v1")
    shutil.move(root / "wharf" / "coordinator.db", tmp_path / "lost.db")
    before = _files(root)
    started = subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=_env(),
    )
    assert started.returncode == 2
    assert "wharf restore CONFIG --from-storage" in started.stderr
    assert _files(root) == before, "no coordinator file, no identity, no blob was touched"
    gc = wharf("gc", str(config))
    assert gc.returncode == 2 and "wharf restore" in gc.stderr
    assert _files(root) == before


def test_coordinator_of_another_store_is_refused(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    config_a = _write_config(tmp_path / "a.yml", first)
    config_b = _write_config(tmp_path / "b.yml", second)
    for config in (config_a, config_b):
        with Serve(tmp_path, str(config)) as http:
            OCIClient(http).push_image("team/app", "v1")
    # B's storage with A's coordinator file: two different registries.
    swapped = _write_config(
        tmp_path / "swapped.yml", second, coordinator={"embedded": {"path": str(first / "wharf" / "coordinator.db")}}
    )
    before = (_files(first), _files(second))
    started = wharf("serve", str(swapped))
    assert started.returncode == 2
    assert "belongs to store" in started.stderr and "nothing was written or deleted" in started.stderr
    assert (_files(first), _files(second)) == before


@pytest.mark.parametrize("case", ["empty prefix", "other prefix", "swapped bucket"])
def test_etcd_and_s3_mismatches_are_refused(tmp_path, etcd, s3_server, case):
    prefix = f"/store-test-{os.getpid()}-{free_port()}/"
    root_a, root_b = f"/id-a-{free_port()}", f"/id-b-{free_port()}"

    def node(directory: str, root: str, etcd_prefix: str) -> WharfProcess:
        return WharfProcess(
            tmp_path / directory,
            storage={"s3": dataclasses.asdict(s3_server.storage_config(root))},
            coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": etcd_prefix}},
        )

    try:
        with node("a", root_a, prefix + "a/") as a:
            OCIClient(httpx.Client(base_url=a.url)).push_image("team/app", "v1")
        with node("b", root_b, prefix + "b/") as b:
            OCIClient(httpx.Client(base_url=b.url)).push_image("team/app", "v1")
        pairs = {
            "empty prefix": (root_a, prefix + "new/"),
            "other prefix": (root_a, prefix + "b/"),
            "swapped bucket": (f"/id-empty-{free_port()}", prefix + "a/"),
        }
        root, etcd_prefix = pairs[case]
        bad = node("bad", root, etcd_prefix)
        objects_before = s3_server.keys()
        result = wharf("serve", str(bad.config_path))
        assert result.returncode == 2, result.stderr
        assert "nothing was written or deleted" in result.stderr
        assert s3_server.keys() == objects_before
        if case == "empty prefix":
            assert "wharf restore CONFIG --from-storage" in result.stderr
            assert etcd.keys(prefix + "new/") == []
    finally:
        for root in (root_a, root_b):
            s3_server.remove_prefix(root.strip("/") + "/")
        etcd.delete_prefix(prefix)


def test_an_etcd_store_with_the_text_keys_of_earlier_versions_serves_and_grows_in_them(tmp_path, etcd):
    """A store created now has compact keys; one an earlier Wharf wrote keeps its text keys, and works."""
    prefix = f"/store-layout-{os.getpid()}-{free_port()}/"
    storage = {"filesystem": {"rootdirectory": str(tmp_path / "registry")}, "delete": {"enabled": True}}

    def node(directory: str, etcd_prefix: str) -> WharfProcess:
        return WharfProcess(
            tmp_path / directory,
            storage=storage,
            coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": etcd_prefix}},
        )

    def stored_keys(etcd_prefix: str) -> list[bytes]:
        found = json.loads(etcd._etcdctl("get", "--prefix", etcd_prefix, "--keys-only", "-w", "json"))
        return [base64.b64decode(item["key"])[len(etcd_prefix) :] for item in found.get("kvs", [])]

    async def as_text_keys(source: str, target: str) -> int:
        """Every record of the store at `source`, under the text keys an earlier version wrote at `target`."""
        old = await EtcdKV.open(etcd.endpoints, prefix=source)
        new = await EtcdKV.open(etcd.endpoints, prefix=target, layout="text")
        try:
            records = [kv for kv in await old.range("") if not kv.lease]
            for start in range(0, len(records), 100):
                await new.txn([], [Put(kv.key, kv.value) for kv in records[start : start + 100]])
            return len(records)
        finally:
            await old.close()
            await new.close()

    try:
        with node("a", prefix + "a/") as a:
            first = OCIClient(httpx.Client(base_url=a.url)).push_image("team/app", "v1", layers=[b"one" * 1000])
        assert all(key.startswith(keys.COMPACT_LAYOUT) for key in stored_keys(prefix + "a/"))
        assert asyncio.run(as_text_keys(prefix + "a/", prefix + "b/")) > 5
        with node("b", prefix + "b/") as b:
            http = httpx.Client(base_url=b.url)
            pulled = http.get("/v2/team/app/manifests/v1", headers={"Accept": "*/*"})
            assert pulled.status_code == 200 and pulled.headers["docker-content-digest"] == first.digest
            assert http.get(f"/v2/team/app/blobs/{digest_of(b'one' * 1000)}").content == b"one" * 1000
            OCIClient(http).push_image("team/app", "v2", layers=[b"two" * 1000])
            assert _tags(http, "team/app") == ["v1", "v2"]
        text = stored_keys(prefix + "b/")
        assert b"tag/team/app@v2" in text and not any(key.startswith(keys.COMPACT_LAYOUT) for key in text)
    finally:
        etcd.delete_prefix(prefix)
