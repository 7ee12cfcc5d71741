"""The container image behaves like registry:2: its command, its config file and its defaults, exercised
outside a container (no container engine runs here) with the image's paths moved into a temporary root."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from oci_client import OCIClient
from services import free_port, wait_until

from node.config import load

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
IMAGE_CONFIG = DEPLOY / "registry-config.yml"
DEBIAN_STOCK = Path("/etc/docker/registry/config.yml")


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    instructions = []
    for line in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def test_the_image_runs_the_entry_point_on_registry2s_paths():
    found = dockerfile()
    assert ("ENTRYPOINT", '["/entrypoint.sh"]') in found
    assert ("CMD", '["/etc/docker/registry/config.yml"]') in found
    assert ("VOLUME", '["/var/lib/registry"]') in found
    assert ("EXPOSE", "5000") in found
    assert ("COPY", "deploy/registry-config.yml /etc/docker/registry/config.yml") in found
    assert ("COPY", "deploy/entrypoint.sh /entrypoint.sh") in found
    # As registry:2: root in the container, so a host directory mounted on the volume is writable.
    assert not [args for word, args in found if word == "USER"]
    assert os.access(ENTRYPOINT, os.X_OK)


def test_the_images_config_is_registry2s_listening_everywhere_with_everything_in_the_volume():
    config = load(str(IMAGE_CONFIG), environ={})
    assert config.http.listen.all_interfaces and config.http.listen.port == 5000
    assert config.storage.filesystem is not None and config.storage.filesystem.rootdirectory == "/var/lib/registry"
    assert config.coordinator.embedded is not None
    assert config.coordinator.embedded.path == "/var/lib/registry/wharf/coordinator.db"
    assert config.auth.mode is None
    if DEBIAN_STOCK.is_file():
        # The same sections as the file registry:2 ships, but for Debian's own root and password file.
        ours, debian = yaml.safe_load(IMAGE_CONFIG.read_text()), yaml.safe_load(DEBIAN_STOCK.read_text())
        debian.pop("auth")
        debian["storage"]["filesystem"]["rootdirectory"] = "/var/lib/registry"
        debian["storage"].pop("delete")
        assert ours == debian


@pytest.fixture
def fake_wharf(tmp_path):
    """A `wharf` on PATH that records how the entry point called it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "called.json"
    recorder = tmp_path / "record.py"
    recorder.write_text(
        "import json, os, sys\n"
        "env = {k: v for k, v in os.environ.items() if k.startswith('REGISTRY_')}\n"
        f"json.dump({{'args': sys.argv[1:], 'env': env}}, open({str(record)!r}, 'w'))\n"
    )
    script = bin_dir / "wharf"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(recorder))} "$@"\n')
    script.chmod(0o755)

    def run(*args: str, **env: str) -> dict[str, object]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        base["PATH"] = f"{bin_dir}:{base['PATH']}"
        subprocess.run(["sh", str(ENTRYPOINT), *args], env={**base, **env}, check=True, timeout=30)
        return json.loads(record.read_text())

    return run


def test_with_its_config_file_the_image_serves_that_file(fake_wharf, tmp_path):
    config = tmp_path / "etc" / "config.yml"
    config.parent.mkdir()
    config.write_text("version: 0.1\n")
    called = fake_wharf(str(config), WHARF_IMAGE_CONFIG=str(config))
    assert called == {"args": ["serve", str(config)], "env": {}}


def test_without_a_config_file_the_image_serves_registry2s_defaults(fake_wharf, tmp_path):
    absent = str(tmp_path / "etc" / "docker" / "registry" / "config.yml")
    called = fake_wharf(absent, WHARF_IMAGE_CONFIG=absent)
    assert called == {
        "args": ["serve"],
        "env": {"REGISTRY_HTTP_ADDR": ":5000", "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/var/lib/registry"},
    }
    # REGISTRY_* variables still win, and another driver takes the root's place.
    called = fake_wharf(absent, WHARF_IMAGE_CONFIG=absent, REGISTRY_HTTP_ADDR=":6000", REGISTRY_STORAGE="s3")
    assert called["env"] == {"REGISTRY_HTTP_ADDR": ":6000", "REGISTRY_STORAGE": "s3"}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["serve", "/etc/docker/registry/config.yml"], ["serve", "/etc/docker/registry/config.yml"]),
        (
            ["garbage-collect", "/etc/docker/registry/config.yml"],
            ["garbage-collect", "/etc/docker/registry/config.yml"],
        ),
        (["/srv/registry.yaml"], ["serve", "/srv/registry.yaml"]),
        (["--help"], ["--help"]),
    ],
)
def test_the_entry_point_takes_registry2s_arguments(fake_wharf, args, expected):
    assert fake_wharf(*args)["args"] == expected


def test_any_other_command_runs_as_given(tmp_path):
    result = subprocess.run(["sh", str(ENTRYPOINT), "echo", "inside"], capture_output=True, text=True, timeout=30)
    assert result.stdout == "inside\n"


def test_the_images_command_serves_pushes_and_keeps_them_in_the_volume(tmp_path):
    """`docker run -p 5000:5000 -v /data/registry:/var/lib/registry IMAGE`, with the volume in a temp root
    and a free port for 5000 (set, as users may, through REGISTRY_* variables)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wharf = bin_dir / "wharf"
    wharf.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m node.cli "$@"\n')
    wharf.chmod(0o755)
    etc = tmp_path / "etc" / "docker" / "registry"
    etc.mkdir(parents=True)
    (etc / "config.yml").write_text(IMAGE_CONFIG.read_text())  # the image's file, unchanged
    volume = tmp_path / "data" / "registry"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHONPATH=str(REPO_ROOT),
        WHARF_IMAGE_CONFIG=str(etc / "config.yml"),
        REGISTRY_HTTP_ADDR=f":{port}",
        REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=str(volume),
        REGISTRY_HTTP_DEBUG_ADDR="",
    )
    log_path = tmp_path / "container.log"

    def run_container() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                ["sh", str(ENTRYPOINT), str(etc / "config.yml")],  # ENTRYPOINT + CMD
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(tmp_path),
                env=env,
            )

    def wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
        def up() -> bool:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            try:
                return client.get("/v2/").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout=30, what="the image's command")

    def stop(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as client:
        proc = run_container()
        try:
            wait_ready(client, proc)
            image = OCIClient(client).push_image("team/app", "v1")
            response = client.get("/v2/team/app/manifests/v1", headers={"Accept": image.media_type})
            assert response.content == image.body
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        finally:
            stop(proc)
        # The volume alone is the registry: blobs and the coordinator both live in it.
        assert (volume / "wharf" / "coordinator.db").is_file()
        assert (volume / "docker" / "registry" / "v2" / "blobs").is_dir()
        proc = run_container()  # a new container on the same volume
        try:
            wait_ready(client, proc)
            assert client.get("/v2/team/app/tags/list").json() == {"name": "team/app", "tags": ["v1"]}
        finally:
            stop(proc)
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    serving = [e for e in entries if str(e["msg"]).startswith("wharf serving")]
    assert serving and all(f"on all interfaces (IPv4 and IPv6) port {port}" in str(e["msg"]) for e in serving)
    assert all(e.get("service") == "registry" for e in entries)


@pytest.mark.skipif(not os.environ.get("WHARF_TEST_IMAGE"), reason="set WHARF_TEST_IMAGE to a built image to run it")
def test_the_built_image_runs_the_registry2_guides_command(tmp_path):
    """`docker run -d -p 5000:5000 -v /data/registry:/var/lib/registry IMAGE` with podman (or the command in
    WHARF_TEST_PODMAN), on a free host port; then a new container on the same volume keeps the tags.

    Opt-in: it needs a container engine and a built image (`podman build -f deploy/Dockerfile -t wharf .`).
    """
    engine = shlex.split(os.environ.get("WHARF_TEST_PODMAN", "podman"))
    image = os.environ["WHARF_TEST_IMAGE"]
    volume = tmp_path / "data" / "registry"
    volume.mkdir(parents=True)
    port = free_port()

    def run() -> str:
        started = subprocess.run(
            [*engine, "run", "-d", "-p", f"{port}:5000", "-v", f"{volume}:/var/lib/registry", image],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return started.stdout.strip()

    def remove(container: str) -> None:
        subprocess.run([*engine, "rm", "-f", "-t", "10", container], capture_output=True, timeout=120)

    def up(client: httpx.Client) -> bool:
        try:
            return client.get("/v2/").status_code == 200
        except httpx.TransportError:
            return False

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as client:
        container = run()
        try:
            wait_until(lambda: up(client), timeout=60, what="the container")
            assert client.get("/v2/").headers["X-Content-Type-Options"] == "nosniff"
            OCIClient(client).push_image("team/app", "v1")
        finally:
            remove(container)
        assert (volume / "wharf" / "coordinator.db").is_file()
        container = run()
        try:
            wait_until(lambda: up(client), timeout=60, what="a new container on the same volume")
            assert client.get("/v2/team/app/tags/list").json()["tags"] == ["v1"]
        finally:
            remove(container)
