"""Prometheus metrics: Distribution's series beside Wharf's, and bytes counted on every response path.

The reference is Debian's `docker-registry` (Distribution 2.8.2) with `http.debug.prometheus` on: the
same pushes and pulls go to it and to a real `wharf serve`, and Wharf must export every `registry_*`
family it exports, with the same type, label names and buckets, and the same request label values.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from oci_client import OCI_MANIFEST, digest_of
from prometheus_client.parser import text_string_to_metric_families
from registry2 import DockerRegistry, Registry2Client
from services import free_port
from wharf_process import WharfProcess

from node.metrics import Metrics

_ACCEPT = {"Accept": OCI_MANIFEST}
# Storage actions Distribution's base driver times (registry/storage/driver/base).
_DISTRIBUTION_ACTIONS = {
    "GetContent",
    "PutContent",
    "Reader",
    "Writer",
    "Stat",
    "List",
    "Move",
    "Delete",
    "URLFor",
    "Walk",
}


def _http(node: WharfProcess) -> httpx.Client:
    return httpx.Client(base_url=node.url, trust_env=False, timeout=30)


def _scrape(url: str) -> str:
    return httpx.get(url, timeout=10, trust_env=False).text


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("registry_")}


def _shape(family: Any) -> tuple[str, frozenset[str], tuple[float, ...]]:
    """(type, label names, buckets) of a metric family."""
    labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
    buckets = sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")})
    return family.type, labels, tuple(buckets)


def _values(family: Any, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == family.name + suffix}


def _workload(client: Registry2Client, layer: bytes) -> None:
    """What a registry:2 user's clients do: a push, then pulls, listings and a miss."""
    http = client.http
    assert http.get("/v2/").status_code == 200
    image = client.push_image("team/app", "v1", layers=[layer])
    for _ in range(2):
        assert http.get("/v2/team/app/manifests/v1", headers=_ACCEPT).status_code == 200
    assert http.head("/v2/team/app/manifests/v1", headers=_ACCEPT).status_code == 200
    assert http.get(f"/v2/team/app/blobs/{digest_of(layer)}").content == layer
    assert http.head(f"/v2/team/app/blobs/{digest_of(layer)}").status_code == 200
    assert http.get("/v2/team/app/tags/list").status_code == 200
    assert http.get("/v2/_catalog").status_code == 200
    assert http.get("/v2/team/app/manifests/missing", headers=_ACCEPT).status_code == 404
    assert http.get(f"/v2/team/app/manifests/{image.digest}", headers=_ACCEPT).status_code == 200


@pytest.fixture(scope="module")
def layer() -> bytes:
    return os.urandom(300_000)


@pytest.fixture(scope="module")
def distribution_metrics(tmp_path_factory: pytest.TempPathFactory, layer: bytes) -> str:
    workdir = tmp_path_factory.mktemp("registry2")
    debug = f"127.0.0.1:{free_port()}"
    extra = {"http": {"debug": {"addr": debug, "prometheus": {"enabled": True, "path": "/metrics"}}}}
    with DockerRegistry.on_filesystem(workdir, workdir / "root", extra=extra) as registry:
        with registry.http() as http:
            _workload(Registry2Client(http), layer)
        return _scrape(f"http://{debug}/metrics")


@pytest.fixture(scope="module")
def wharf_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WharfProcess]:
    with WharfProcess(tmp_path_factory.mktemp("wharf")) as process:
        yield process


@pytest.fixture(scope="module")
def wharf_metrics(wharf_node: WharfProcess, layer: bytes) -> str:
    with _http(wharf_node) as http:
        _workload(Registry2Client(http), layer)
    return _scrape(wharf_node.metrics_url)


def test_every_distribution_family_is_exported_with_its_type_labels_and_buckets(
    distribution_metrics: str, wharf_metrics: str
) -> None:
    theirs, ours = _families(distribution_metrics), _families(wharf_metrics)
    assert {"registry_http_requests", "registry_storage_action_seconds"} <= set(theirs), "the reference changed"
    for name, family in theirs.items():
        assert name in ours, f"{name} is not exported"
        assert _shape(ours[name]) == _shape(family), name


def test_request_counts_carry_distributions_code_handler_and_method_values(
    distribution_metrics: str, wharf_metrics: str
) -> None:
    theirs = _values(_families(distribution_metrics)["registry_http_requests"], "_total")
    ours = _values(_families(wharf_metrics)["registry_http_requests"], "_total")
    assert set(ours) == set(theirs)

    def counted(values: dict[Any, float]) -> dict[Any, float]:
        # Readiness polls of `GET /v2/` before the workload differ in number from run to run.
        return {labels: n for labels, n in values.items() if ("handler", "base") not in labels}

    assert counted(ours) == counted(theirs), "the same requests are counted the same way"


def test_storage_actions_use_distributions_action_and_driver_names(wharf_metrics: str) -> None:
    family = _families(wharf_metrics)["registry_storage_action_seconds"]
    seen = {dict(labels)["action"] for labels in _values(family, "_count")}
    drivers = {dict(labels)["driver"] for labels in _values(family, "_count")}
    assert seen and seen <= _DISTRIBUTION_ACTIONS
    assert {"Writer", "Move", "PutContent"} <= seen, "a push writes, moves and puts"
    assert drivers == {"filesystem"}


def test_bytes_of_a_blob_get_are_counted_in_metrics_and_access_log(wharf_node: WharfProcess) -> None:
    data = os.urandom(1_234_567)
    with _http(wharf_node) as http:
        client = Registry2Client(http)
        digest = client.push_blob("team/bytes", data)
        before = _families(_scrape(wharf_node.metrics_url))
        since = len(wharf_node.log_text())
        response = client.http.get(f"/v2/team/bytes/blobs/{digest}")
        assert response.content == data
    after = _families(_scrape(wharf_node.metrics_url))

    def blob_bytes(families: dict[str, Any]) -> float:
        return _values(families["registry_http_response_size_bytes"], "_sum").get((("handler", "blob"),), 0.0)

    assert blob_bytes(after) - blob_bytes(before) == len(data)
    wharf_route = "/v2/{name:path}/blobs/{digest}"
    wharf_bytes = [
        s.value
        for f in text_string_to_metric_families(_scrape(wharf_node.metrics_url))
        if f.name == "wharf_http_response_bytes"
        for s in f.samples
        if s.labels.get("route") == wharf_route and s.name.endswith("_total")
    ]
    assert wharf_bytes and wharf_bytes[0] >= len(data)
    lines = [e for e in wharf_node.access_log(since) if e["route"] == wharf_route and e["method"] == "GET"]
    assert [e["bytes_out"] for e in lines] == [len(data)]


def test_prometheus_path_and_switch_are_honoured(tmp_path: Path) -> None:
    moved = {"addr": f"127.0.0.1:{free_port()}", "prometheus": {"enabled": True, "path": "/custom"}}
    with WharfProcess(tmp_path / "moved", http={"debug": moved}) as node:
        text = httpx.get(f"http://{moved['addr']}/custom", timeout=10, trust_env=False)
        assert text.status_code == 200 and "wharf_http_requests_total" in text.text
        assert httpx.get(f"http://{moved['addr']}/metrics", timeout=10, trust_env=False).status_code == 404
        assert httpx.get(node.url + "/v2/", timeout=10, trust_env=False).status_code == 200
    off = {"addr": f"127.0.0.1:{free_port()}", "prometheus": {"enabled": False}}
    with WharfProcess(tmp_path / "off", http={"debug": off}) as node:
        # As Distribution: the debug listener stays up (it serves more than figures), with no /metrics.
        assert httpx.get(f"http://{off['addr']}/metrics", timeout=10, trust_env=False).status_code == 404
        assert httpx.get(node.url + "/v2/", timeout=10, trust_env=False).status_code == 200


async def test_request_path_figures_are_written_once_idle_or_within_50_ms_under_load() -> None:
    """Updates on the request path are gathered and written together, never later than 50 ms."""
    metrics = Metrics()
    labels = {"method": "GET", "route": "/v2/", "status": "200"}

    def count() -> float | None:
        return metrics.registry.get_sample_value("wharf_http_requests_total", labels)

    metrics.request_started("base")
    metrics.request_started("base")
    metrics.observe_request("GET", "/v2/", 200, 0, 2, 0.001, handler="base")
    metrics.request_finished("base")
    assert not count(), "another request is in flight: written a little later"
    assert metrics.registry.get_sample_value("registry_http_in_flight_requests", {"handler": "base"}) is None
    await asyncio.sleep(0.2)
    assert count() == 1
    assert metrics.registry.get_sample_value("registry_http_in_flight_requests", {"handler": "base"}) == 1
    metrics.observe_request("GET", "/v2/", 200, 0, 2, 0.001, handler="base")
    metrics.request_finished("base")
    assert count() == 2, "nothing in flight: written at once"
    assert (
        metrics.registry.get_sample_value(
            "registry_http_request_duration_seconds_bucket", {"handler": "base", "method": "get", "le": "0.005"}
        )
        == 2
    )
