"""Distribution's sections have the effect they have in registry:2: Debian's stock file, headers, log
fields and formats, health checks feeding readiness, prefix and host in URLs, manifest URL validation."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from inprocess import InProcessRegistry
from oci_client import OCI_CONFIG, OCIClient, descriptor, digest_of
from registry2 import DOCKER_REGISTRY
from secure_registry import make_users
from services import free_port, wait_until
from wharf_process import WharfProcess

from coordinator.readonly import set_switch
from node.config import ConfigError, LogConfig, load
from node.logs import JSONFormatter, LogstashFormatter, TextFormatter

REPO_ROOT = Path(__file__).resolve().parent.parent
DEBIAN_STOCK = Path("/etc/docker/registry/config.yml")
FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


def stock_file(directory: Path, port: int) -> Path:
    """Debian's /etc/docker/registry/config.yml with only its port and its storage root changed."""
    if not DEBIAN_STOCK.is_file():
        pytest.skip("Debian's docker-registry package is not installed")
    text = DEBIAN_STOCK.read_text()
    assert text.count(":5000") == 1 and text.count("/var/lib/docker-registry") == 1
    changed = text.replace(":5000", f":{port}").replace("/var/lib/docker-registry", str(directory / "registry"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yml"
    path.write_text(changed)
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    # Wharf's own default debug port (5001) may be taken on a shared machine; the file does not name one.
    return {**env, "REGISTRY_HTTP_DEBUG_ADDR": f"127.0.0.1:{free_port()}", **extra}


def _serve_once(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO_ROOT),
        env=env,
    )


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_registry2_sends_the_stock_files_header_and_logs_its_field(tmp_path):
    """What the acceptance compares Wharf with: Debian's own registry on the same file."""
    if not os.path.exists(DOCKER_REGISTRY):
        pytest.skip("docker-registry is not installed")
    port = free_port()
    config = stock_file(tmp_path, port)
    log_path = tmp_path / "registry.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([DOCKER_REGISTRY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=5) as client:

            def answered() -> httpx.Response | None:
                try:
                    return client.get("/v2/")
                except httpx.TransportError:
                    return None

            response = wait_until(answered, timeout=30, what="docker-registry")
        assert response.status_code == 401
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["WWW-Authenticate"] == 'Basic realm="basic-realm"'
    finally:
        proc.terminate()
        proc.wait(15)
    # registry:2 puts the fields on its own lines (not on those of a request's context).
    listening = [line for line in log_path.read_text().splitlines() if 'msg="listening on' in line]
    assert listening and "service=registry" in listening[0]


def test_debians_stock_file_serves_as_registry2_once_passwords_have_a_safe_way_in(tmp_path):
    port = free_port()
    config = stock_file(tmp_path / "stock", port)

    # As it stands: htpasswd on plain HTTP is refused (registry:2 would send passwords in clear).
    refused = _serve_once(config, _env())
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    for way_out in ("http.tls.certificate", "http.tls.key", "http.insecure: true", "REGISTRY_HTTP_INSECURE=true"):
        assert way_out in refused.stderr

    # A TLS proxy in front: the file names a directory as its htpasswd file, which registry:2 starts
    # with and then fails every sign-in; Wharf says so at start.
    refused = _serve_once(config, _env(REGISTRY_HTTP_INSECURE="true"))
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith(
        "wharf: auth.htpasswd.path: expected an htpasswd file, got the directory '/etc/docker/registry'"
    )

    # With a users file: every section has registry:2's effect.
    users = make_users(tmp_path / "htpasswd", {"alice": "alice-pw"})
    node = WharfProcess(
        tmp_path / "node", port=port, env=_env(REGISTRY_HTTP_INSECURE="true", REGISTRY_AUTH_HTPASSWD_PATH=str(users))
    )
    node.config_path.write_text(config.read_text())
    with node:
        with httpx.Client(base_url=node.url, trust_env=False, timeout=10) as anonymous:
            challenge = anonymous.get("/v2/")
        assert challenge.status_code == 401
        assert challenge.headers["WWW-Authenticate"] == 'Basic realm="basic-realm"'
        assert challenge.headers["X-Content-Type-Options"] == "nosniff"
        with httpx.Client(base_url=node.url, trust_env=False, timeout=10, headers=_basic("alice", "alice-pw")) as http:
            assert http.get("/v2/").headers["X-Content-Type-Options"] == "nosniff"
            image = OCIClient(http).push_image("team/app", "v1")
            pulled = http.get("/v2/team/app/manifests/v1", headers={"Accept": image.media_type})
            assert pulled.content == image.body and pulled.headers["X-Content-Type-Options"] == "nosniff"
            assert http.delete(f"/v2/team/app/manifests/{image.digest}").status_code == 202  # storage.delete
            ready = http.get("/debug/ready")
            assert ready.status_code == 200 and ready.json()["storage"] == "ok"  # health.storagedriver's check
        assert (tmp_path / "stock" / "registry" / "docker" / "registry" / "v2" / "blobs").is_dir()
        entries = _json_lines(node.log_text())
    # log.fields: on every line, the HTTP server's own and the access lines included.
    assert entries and all(e.get("service") == "registry" for e in entries), [e for e in entries if "service" not in e][
        :3
    ]
    assert any(e["logger"] == "granian" for e in entries)
    assert any(e["logger"] == "wharf.access" for e in entries)
    assert any(str(e["msg"]).startswith("storage.cache.blobdescriptor: inmemory accepted") for e in entries)


def test_text_format_with_fields_covers_the_servers_lines_and_access_lines_can_be_turned_off(tmp_path):
    log = {
        "formatter": "text",
        "fields": {"service": "registry", "environment": "staging"},
        "accesslog": {"disabled": True},
    }
    with WharfProcess(tmp_path / "node", log=log) as node:
        with httpx.Client(base_url=node.url, trust_env=False, timeout=10) as http:
            for _ in range(3):
                assert http.get("/v2/").status_code == 200
        lines = [line for line in node.log_text().splitlines() if line.strip()]
    pattern = re.compile(r'time="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z" level=\w+ msg=.* logger=\S+')
    assert lines and all(pattern.match(line) for line in lines), [line for line in lines if not pattern.match(line)][:3]
    without = [line for line in lines if not (" environment=staging" in line and " service=registry" in line)]
    assert not without, without[:3]
    assert any("logger=granian" in line for line in lines)
    assert not any("msg=request" in line for line in lines)


def test_formatters_put_the_fields_on_every_line():
    record = logging.LogRecord("wharf", logging.WARNING, __file__, 1, "disk %s", ("full",), None)
    record.fields = {"repository": "team/app"}  # type: ignore[attr-defined]
    fields = LogConfig(fields={"service": "registry"}).fields
    as_json = json.loads(JSONFormatter(fields).format(record))
    assert {k: as_json[k] for k in ("level", "logger", "msg", "service", "repository")} == {
        "level": "warning",
        "logger": "wharf",
        "msg": "disk full",
        "service": "registry",
        "repository": "team/app",
    }
    logstash = json.loads(LogstashFormatter(fields).format(record))
    assert (logstash["@version"], logstash["message"], logstash["service"]) == ("1", "disk full", "registry")
    assert logstash["@timestamp"].endswith("Z")
    text = TextFormatter(fields).format(record)
    assert text.endswith('level=warning msg="disk full" logger=wharf repository=team/app service=registry')


@pytest.mark.parametrize("workers", [1, 2])
def test_health_checks_take_a_node_out_of_rotation_and_back(tmp_path, workers):
    down = tmp_path / "down"
    health = {
        "storagedriver": {"enabled": True, "interval": "200ms", "threshold": 2},
        "file": [{"file": str(down), "interval": "200ms"}],
    }
    coordinator = {"embedded": {"path": str(tmp_path / "coordinator.db")}}
    with WharfProcess(tmp_path / "node", health=health, coordinator=coordinator, http={"workers": workers}) as node:
        root = Path(node.config["storage"]["filesystem"]["rootdirectory"])
        debug_health = node.metrics_url.removesuffix("/metrics") + "/debug/health"
        with httpx.Client(base_url=node.url, trust_env=False, timeout=10) as http:

            def ready_is(status: int) -> dict[str, str] | None:
                response = http.get("/debug/ready")
                return response.json() if response.status_code == status else None

            def debug_health_is(status: int) -> httpx.Response | None:
                # registry:2's monitoring URL on the debug listener: the failing checks, and 503.
                response = http.get(debug_health)
                return response if response.status_code == status else None

            ready = wait_until(lambda: ready_is(200), timeout=20, what="ready")
            assert ready.pop("coordinator_space")  # room in the coordinator, in words
            assert ready == {
                "coordinator": "ok",
                "storage": "ok",
                f"file {down}": "ok",
                "readonly": "writable",
            }
            assert wait_until(lambda: debug_health_is(200), timeout=20, what="/debug/health").json() == {}
            down.write_text("maintenance")
            states = wait_until(lambda: ready_is(503), timeout=20, what="unready while the file exists")
            assert states[f"file {down}"].startswith("RuntimeError: file exists")
            failing = wait_until(lambda: debug_health_is(503), timeout=20, what="/debug/health failing").json()
            assert list(failing) == [f"file {down}"] and failing[f"file {down}"].startswith("RuntimeError: file exists")
            down.unlink()
            wait_until(lambda: ready_is(200), timeout=20, what="ready again")
            assert wait_until(lambda: debug_health_is(200), timeout=20, what="/debug/health passing").json() == {}

            moved = root.with_name("registry-away")
            root.rename(moved)
            root.write_text("storage gone")  # every storage operation now fails
            states = wait_until(lambda: ready_is(503), timeout=20, what="unready once storage fails twice")
            assert "failures in a row" in states["storage"]
            root.unlink()
            moved.rename(root)
            wait_until(lambda: ready_is(200), timeout=20, what="ready once storage answers")
        entries = _json_lines(node.log_text())
    assert any(e["msg"].startswith("health check storage failing") for e in entries)


# -- in this process: headers, prefix, host, validation ------------------------------------------


@pytest.fixture
async def registry_with(tmp_path):
    made: list[InProcessRegistry] = []

    def make(**sections: object) -> InProcessRegistry:
        http = {"debug": {"addr": ""}, **sections.pop("http", {})}  # type: ignore[dict-item]
        (tmp_path / f"r{len(made)}").mkdir()
        registry = InProcessRegistry(tmp_path / f"r{len(made)}", http=http, **sections)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        await registry.close()


async def test_configured_headers_are_on_every_response_and_never_replace_the_handlers(registry_with):
    registry = registry_with(
        http={"headers": {"X-Content-Type-Options": ["nosniff"], "Content-Type": ["text/html"], "X-Multi": ["a", "b"]}}
    )
    for method, path, status in [
        ("GET", "/v2/", 200),
        ("GET", "/v2/nothing/here", 404),
        ("GET", "/v2/a/manifests/latest", 404),
        ("PATCH", "/v2/_catalog", 405),
        ("GET", "/debug/ready", 200),
    ]:
        response = await registry.http.request(method, path)
        assert response.status_code == status, (path, response.text)
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers.get_list("X-Multi") == ["a", "b"]
        assert response.headers["Content-Type"].startswith("application/json")


async def test_a_prefix_serves_the_api_under_it_and_urls_carry_it(registry_with):
    registry = registry_with(http={"prefix": "/my/registry/"})
    assert (await registry.http.get("/my/registry/v2/")).status_code == 200
    started = await registry.http.post("/my/registry/v2/team/app/blobs/uploads/")
    assert started.status_code == 202
    location = started.headers["Location"]
    assert location.startswith("/my/registry/v2/team/app/blobs/uploads/")
    data = b"layer"
    finished = await registry.http.put(location, params={"digest": digest_of(data)}, content=data)
    assert finished.status_code == 201
    assert finished.headers["Location"] == f"/my/registry/v2/team/app/blobs/{digest_of(data)}"
    assert (await registry.http.get(finished.headers["Location"])).content == data


async def test_read_only_and_request_metrics_see_requests_under_a_prefix(registry_with):
    registry = registry_with(http={"prefix": "/my/registry/"})
    await set_switch(registry.kv, True, by="test")
    await registry.services.readonly.switch.refresh()
    refused = await registry.http.post("/my/registry/v2/team/app/blobs/uploads/")
    assert refused.status_code == 405, refused.text
    assert refused.json()["errors"][0]["code"] == "UNSUPPORTED"
    deleted = await registry.http.delete("/my/registry/v2/team/app/manifests/sha256:" + "a" * 64)
    assert deleted.status_code == 405
    # Distribution's request metrics name the handler of a request under the prefix too.
    assert (await registry.http.get("/my/registry/v2/")).status_code == 200
    registry.services.metrics.flush()
    exposition = registry.services.metrics.exposition().decode()
    assert re.search(r'registry_http_requests_total\{[^}]*handler="base"', exposition), exposition


async def test_catalog_maxentries_sizes_the_pages_as_in_registry2(registry_with):
    registry = registry_with(catalog={"maxentries": 2})
    for n in range(5):
        config = json.dumps({"n": n}).encode()
        await registry.blob(f"team/r{n}", config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor(OCI_CONFIG, config),
            "layers": [],
        }
        await registry.put_manifest(f"team/r{n}", "v1", manifest)
    # Without n: maxentries repositories, and a Link to the rest (registry:2 2.8 answers the same).
    first = await registry.http.get("/v2/_catalog")
    assert first.json() == {"repositories": ["team/r0", "team/r1"]}
    assert first.headers["Link"] == '</v2/_catalog?n=2&last=team%2Fr1>; rel="next"'
    # A larger n gets maxentries and a Link (registry:2 refuses it; a page the client can follow is kinder).
    larger = await registry.http.get("/v2/_catalog", params={"n": 5, "last": "team/r1"})
    assert larger.json() == {"repositories": ["team/r2", "team/r3"]}
    assert "Link" in larger.headers
    last = await registry.http.get("/v2/_catalog", params={"last": "team/r3"})
    assert last.json() == {"repositories": ["team/r4"]} and "Link" not in last.headers
    assert (await registry.http.get("/v2/_catalog", params={"n": 1})).json() == {"repositories": ["team/r0"]}


def test_catalog_maxentries_must_be_a_positive_number(tmp_path):
    for bad in (0, -1, "many"):
        path = tmp_path / "config.yml"
        path.write_text(f"version: 0.1\ncatalog:\n  maxentries: {bad}\n")
        with pytest.raises(ConfigError, match="catalog.maxentries"):
            load(str(path), environ={})


def test_variables_that_name_no_key_are_ignored_and_named_in_the_log(tmp_path):
    # Kubernetes gives a pod these for a Service named `registry` (and `registry-http`): registry:2
    # ignores them, and so must Wharf, or it cannot start there.
    links = {
        "REGISTRY_PORT": "tcp://10.0.0.1:5000",
        "REGISTRY_PORT_5000_TCP": "tcp://10.0.0.1:5000",
        "REGISTRY_PORT_5000_TCP_ADDR": "10.0.0.1",
        "REGISTRY_PORT_5000_TCP_PORT": "5000",
        "REGISTRY_PORT_5000_TCP_PROTO": "tcp",
        "REGISTRY_SERVICE_HOST": "10.0.0.1",
        "REGISTRY_SERVICE_PORT": "5000",
        "REGISTRY_SERVICE_PORT_HTTP": "5000",
        "REGISTRY_HTTP_SERVICE_HOST": "10.0.0.2",
        "REGISTRY_HTTP_PORT": "tcp://10.0.0.2:5000",
        "REGISTRY_UNHEARD_OF": "s3cr3t-value",
        "REGISTRY_AUTH_FILE": "/run/containers/0/auth.json",  # podman's and skopeo's, not ours
    }
    config = load(None, environ={**links, "REGISTRY_STORAGE_DELETE_ENABLED": "false"})
    assert sorted(config.ignored_variables) == sorted(links)
    assert config.storage.delete.enabled is False  # the variables that are keys still apply
    # A misspelt key inside a section Wharf knows still stops start-up, as any unknown key does.
    with pytest.raises(ConfigError, match="unknown configuration key http.adr"):
        load(None, environ={"REGISTRY_HTTP_ADR": "0.0.0.0:5000"})
    with WharfProcess(tmp_path / "node", env=links) as node:
        with httpx.Client(base_url=node.url, trust_env=False, timeout=10) as http:
            assert http.get("/v2/").status_code == 200
        text = node.log_text()
    for name in links:
        assert f"{name} names no configuration key" in text
    assert "s3cr3t-value" not in text and "10.0.0.1" not in text


def test_an_error_in_a_key_a_variable_set_names_the_variable(tmp_path):
    # The file may not have the key at all: the operator must learn where it came from.
    with pytest.raises(ConfigError, match=r"http.adr .*\(set by the variable REGISTRY_HTTP_ADR\)$"):
        load(None, environ={"REGISTRY_HTTP_ADR": "0.0.0.0:5000"})
    with pytest.raises(ConfigError, match=r"'maybe' \(set by the variable REGISTRY_STORAGE_DELETE_ENABLED\)$"):
        load(None, environ={"REGISTRY_STORAGE_DELETE_ENABLED": "maybe", "REGISTRY_HTTP_ADDR": "127.0.0.1:5000"})
    with pytest.raises(ConfigError, match=r"notifications.endpoints\[0\].*REGISTRY_NOTIFICATIONS_ENDPOINTS\)$"):
        load(None, environ={"REGISTRY_NOTIFICATIONS_ENDPOINTS": "hook"})
    # A section Wharf refuses stops start-up when a variable sets it, as it does in the file.
    for variable in ("REGISTRY_REPORTING_BUGSNAG_APIKEY", "REGISTRY_MIDDLEWARE_STORAGE", "REGISTRY_POLICY_X"):
        with pytest.raises(ConfigError, match=rf"not supported.*\(set by the variable {variable}\)$"):
            load(None, environ={variable: "value"})
    # An error in the file names no variable, even with variables set beside it.
    path = tmp_path / "config.yml"
    path.write_text("version: 0.1\nstorage:\n  delete:\n    enabled: maybe\n")
    with pytest.raises(ConfigError) as raised:
        load(str(path), environ={"REGISTRY_HTTP_ADDR": "127.0.0.1:5000"})
    assert "variable" not in str(raised.value)


async def test_host_makes_urls_absolute_unless_relativeurls(registry_with):
    absolute = registry_with(http={"host": "https://registry.example.com:5443"})
    started = await absolute.http.post("/v2/team/app/blobs/uploads/")
    assert started.headers["Location"].startswith("https://registry.example.com:5443/v2/team/app/blobs/uploads/")
    for n in range(2):
        await absolute.blob(f"team/r{n}", b"x")
        config = json.dumps({"n": n}).encode()
        await absolute.blob(f"team/r{n}", config)
        await absolute.put_manifest(
            f"team/r{n}",
            "v1",
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": descriptor(OCI_CONFIG, config),
                "layers": [],
            },
        )
    page = await absolute.http.get("/v2/_catalog", params={"n": 1})
    assert page.headers["Link"].startswith("<https://registry.example.com:5443/v2/_catalog?n=1&last=")
    relative = registry_with(http={"host": "https://registry.example.com:5443", "relativeurls": True})
    started = await relative.http.post("/v2/team/app/blobs/uploads/")
    assert started.headers["Location"].startswith("/v2/team/app/blobs/uploads/")


def _foreign_manifest(config: bytes, urls: list[str]) -> dict[str, object]:
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": descriptor("application/vnd.docker.container.image.v1+json", config),
        "layers": [{"mediaType": FOREIGN, "size": 10, "digest": "sha256:" + "a" * 64, "urls": urls}],
    }


async def _put(registry: InProcessRegistry, urls: list[str]) -> httpx.Response:
    config = b'{"os": "windows"}'
    await registry.blob("win/app", config)
    doc = _foreign_manifest(config, urls)
    return await registry.http.put(
        "/v2/win/app/manifests/v1", content=json.dumps(doc), headers={"Content-Type": str(doc["mediaType"])}
    )


async def test_foreign_layer_urls_are_validated_as_registry2_validates_them(registry_with):
    url = "https://go.microsoft.com/fwlink/?linkid=1"
    default = registry_with()
    refused = await _put(default, [url])
    assert refused.status_code == 400 and refused.json()["errors"][0]["code"] == "MANIFEST_INVALID"
    assert "validation.manifests.urls.allow" in refused.text
    allowing = registry_with(
        validation={"manifests": {"urls": {"allow": [r"^https://go\.microsoft\.com/"], "deny": ["linkid=2"]}}}
    )
    assert (await _put(allowing, [url])).status_code == 201
    assert (await _put(allowing, ["https://go.microsoft.com/fwlink/?linkid=2"])).status_code == 400
    assert (await _put(allowing, ["ftp://go.microsoft.com/x"])).status_code == 400
    disabled = registry_with(validation={"disabled": True})
    assert (await _put(disabled, ["https://anywhere.example/layer"])).status_code == 201
    assert (await _put(disabled, ["https://anywhere.example/layer#fragment"])).status_code == 400


def test_registry2_refuses_foreign_urls_by_default_too(tmp_path):
    """The default the test above holds Wharf to, checked on Debian's registry."""
    if not os.path.exists(DOCKER_REGISTRY):
        pytest.skip("docker-registry is not installed")
    from registry2 import DockerRegistry, Registry2Client

    with DockerRegistry.on_filesystem(tmp_path, tmp_path / "root") as registry, registry.http() as http:
        config = b'{"os": "windows"}'
        Registry2Client(http).push_blob("win/app", config)
        doc = _foreign_manifest(config, ["https://go.microsoft.com/fwlink/?linkid=1"])
        response = http.put(
            "/v2/win/app/manifests/v1", content=json.dumps(doc), headers={"Content-Type": str(doc["mediaType"])}
        )
        assert response.status_code >= 400
