"""The pull-through cache over real HTTP: Debian's docker-registry upstream, a `wharf serve` in front.

registry:2's mode (`proxy.remoteurl`): first pulls byte-identical with the upstream, later ones served
locally, pulls going on with the upstream stopped, tags moved upstream seen after the TTL and not
before, writes refused as Distribution refuses them. `proxy.upstreams`: a cache by prefix beside
hosted repositories, in the catalog and tag lists, with `wharf cache ls|status` and metrics.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
import urllib.request

import httpx
import pytest
from oci_client import OCIClient, assert_error, digest_of
from pullthrough import (
    ACCEPT,
    access_log,
    blob_gets,
    blob_gets_after,
    cache_status,
    layer,
    manifest_requests,
    pull,
    push_image,
    push_index,
    upstream_registry,
)
from secure_registry import wharf_cli
from services import wait_until
from wharf_process import WharfProcess

KIB = 1024


@pytest.fixture()
def upstream(tmp_path):
    registry = upstream_registry(tmp_path / "upstream").start()
    try:
        yield registry
    finally:
        registry.stop()


def _mirror(tmp_path, upstream, **proxy) -> WharfProcess:
    return WharfProcess(tmp_path / "wharf", proxy={"remoteurl": upstream.url, **proxy})


def _client(node: WharfProcess) -> httpx.Client:
    return httpx.Client(base_url=node.url, timeout=60, trust_env=False)


def test_first_pull_through_the_mirror_is_byte_identical_and_later_pulls_stay_local(tmp_path, upstream):
    single = push_image(upstream, "library/alpine", "3.16", [layer("base"), layer("alpine")])
    arm = push_image(
        upstream, "library/busybox", None, [layer("base"), layer("arm")], config=b'{"architecture":"arm64"}'
    )
    amd = push_image(upstream, "library/busybox", None, [layer("base"), layer("amd")])
    index = push_index(upstream, "library/busybox", "1.36", [amd, arm])
    with upstream.http() as direct:
        expected = {(r, t): pull(direct, r, t) for r, t in [("library/alpine", "3.16"), ("library/busybox", "1.36")]}
    assert expected[("library/alpine", "3.16")].digest == single.digest
    assert expected[("library/busybox", "1.36")].digest == index.digest
    seen = len(access_log(upstream))
    base_gets = blob_gets(upstream, digest_of(layer("base")))
    with _mirror(tmp_path, upstream) as wharf, _client(wharf) as http:
        for (repo, tag), want in expected.items():
            got = pull(http, repo, tag)
            assert got.digest == want.digest
            assert got.manifests == want.manifests and got.blobs == want.blobs
            assert "fwd=miss" in cache_status(got.headers[0])
            # A layer another cached image brought is linked, not fetched again.
            assert all(cache_status(h) in ("wharf; hit", "wharf; fwd=miss; stored") for h in got.headers)
        # The layer every image shares came from the upstream once.
        assert blob_gets_after(upstream, digest_of(layer("base")), base_gets + 1) == base_gets + 1
        fetched = access_log(upstream)[seen:]
        assert {m for m, _, _ in fetched} <= {"GET", "HEAD"}
        seen = len(access_log(upstream))
        for (repo, tag), want in expected.items():
            again = pull(http, repo, tag)
            assert again.manifests == want.manifests and again.blobs == want.blobs
            assert all(cache_status(h) == "wharf; hit" for h in again.headers)
        assert access_log(upstream)[seen:] == [], "a cached pull within the TTL asks the upstream nothing"
        # Pulled by digest: the same bytes, from the cache.
        by_digest = http.get(f"/v2/library/busybox/manifests/{arm.digest}", headers={"Accept": ACCEPT})
        assert by_digest.status_code == 200 and by_digest.content == arm.body


def test_pulls_of_cached_images_go_on_with_the_upstream_stopped(tmp_path, upstream):
    image = push_image(upstream, "library/alpine", "3.16", [layer("one"), layer("two")])
    push_image(upstream, "library/alpine", "3.17", [layer("three")])
    with _mirror(tmp_path, upstream, ttl="1s") as wharf, _client(wharf) as http:
        warm = pull(http, "library/alpine", "3.16")
        upstream.stop()
        time.sleep(1.2)  # past the TTL: the tag is asked about, and the upstream does not answer
        cold = pull(http, "library/alpine", "3.16")
        assert cold.digest == image.digest and cold.blobs == warm.blobs and cold.manifests == warm.manifests
        status = cache_status(cold.headers[0])
        assert "fwd=stale" in status and "upstream" in status
        assert wait_until(lambda: "serving the cached library/alpine:3.16 past its TTL" in wharf.log_text(), timeout=10)
        # What was never pulled cannot be served; the error names the upstream.
        missing = http.get("/v2/library/alpine/manifests/3.17", headers={"Accept": ACCEPT})
        error = assert_error(missing, 503, "UNAVAILABLE")
        assert upstream.url in error["message"] and error["detail"]["upstream"] == upstream.url
        # The upstream comes back: the tag is confirmed and no longer stale.
        upstream.start()
        again = http.get("/v2/library/alpine/manifests/3.16", headers={"Accept": ACCEPT})
        assert again.status_code == 200 and cache_status(again.headers) == "wharf; hit"
        assert manifest_requests(upstream, "library/alpine", "3.16")[-1] == "HEAD"


def test_a_tag_deleted_upstream_is_gone_from_the_cache_after_the_ttl(tmp_path, upstream):
    """The upstream answering 404 is not the upstream being down: the tag is not served stale."""
    image = push_image(upstream, "team/app", "old", [layer("gone")])
    kept = push_image(upstream, "team/app", "kept", [layer("kept")])
    with _mirror(tmp_path, upstream, ttl="1s") as wharf, _client(wharf) as http:
        assert pull(http, "team/app", "old").digest == image.digest
        assert pull(http, "team/app", "kept").digest == kept.digest
        with upstream.http() as direct:
            assert direct.delete(f"/v2/team/app/manifests/{image.digest}").status_code == 202
        time.sleep(1.2)  # past the TTL: the tag is asked about
        gone = http.get("/v2/team/app/manifests/old", headers={"Accept": ACCEPT})
        assert_error(gone, 404, "MANIFEST_UNKNOWN")
        assert "fwd=stale" not in gone.headers.get("Cache-Status", "")
        tags = http.get("/v2/team/app/tags/list").json()["tags"]
        assert "old" not in tags and "kept" in tags
        assert pull(http, "team/app", "kept").digest == kept.digest


def test_a_tag_moved_upstream_is_seen_after_the_ttl_and_not_before(tmp_path, upstream):
    ttl = 4.0
    first = push_image(upstream, "team/app", "stable", [layer("v1")])
    with _mirror(tmp_path, upstream, ttl=f"{ttl:.0f}s") as wharf, _client(wharf) as http:
        assert pull(http, "team/app", "stable").digest == first.digest
        cached_at = time.monotonic()
        moved = push_image(upstream, "team/app", "stable", [layer("v2")])
        asked = len(manifest_requests(upstream, "team/app", "stable"))
        # Within the TTL: the cached digest, and the upstream is not asked.
        while time.monotonic() - cached_at < ttl - 1.5:
            assert pull(http, "team/app", "stable").digest == first.digest
            time.sleep(0.3)
        assert len(manifest_requests(upstream, "team/app", "stable")) == asked

        def current() -> str:
            return str(pull(http, "team/app", "stable").digest)

        wait_until(lambda: current() == moved.digest, timeout=ttl + 20, interval=0.2, what="the moved tag")
        assert time.monotonic() - cached_at >= ttl - 0.5
        # Asked with a HEAD first (upstream rate limits count GETs), then the new manifest fetched.
        asks = manifest_requests(upstream, "team/app", "stable")[asked:]
        assert asks[0] == "HEAD"
        assert layer("v2") in pull(http, "team/app", "stable").blobs.values()


def test_writes_are_refused_as_registry2_refuses_them_in_proxy_mode(tmp_path, upstream):
    image = push_image(upstream, "library/alpine", "3.16", [layer("w")])
    with _mirror(tmp_path, upstream) as wharf, _client(wharf) as http:
        pull(http, "library/alpine", "3.16")
        blob = digest_of(layer("w"))
        refused = [
            http.post("/v2/library/alpine/blobs/uploads/"),
            http.post("/v2/other/blobs/uploads/", params={"digest": blob}, content=layer("w")),
            http.put(
                "/v2/library/alpine/manifests/3.16", content=image.body, headers={"Content-Type": image.media_type}
            ),
            http.delete(f"/v2/library/alpine/manifests/{image.digest}"),
            http.delete(f"/v2/library/alpine/blobs/{blob}"),
        ]
        for response in refused:
            error = assert_error(response, 405, "UNSUPPORTED")
            assert response.headers["allow"] == "GET, HEAD"
            assert "pull-through cache" in error["message"]
        assert pull(http, "library/alpine", "3.16").digest == image.digest
        routes = {entry["route"] for entry in wharf.access_log() if entry["status"] == 405}
        assert "/v2/{name:path}/blobs/uploads/" in routes


def test_upstreams_by_prefix_are_cached_beside_hosted_repositories(tmp_path, upstream):
    cached = push_image(upstream, "library/alpine", "3.16", [layer("hub")])
    push_image(upstream, "library/alpine", "3.17", [layer("hub2")])
    other = upstream_registry(tmp_path / "other").start()
    tool = push_image(other, "org/tool", "1", [layer("quay")])
    wharf = WharfProcess(
        tmp_path / "wharf",
        proxy={
            "upstreams": [
                {"prefix": "hub/", "remoteurl": upstream.url},
                {"prefix": "quay/", "remoteurl": other.url},
            ]
        },
        inventory={"pullinterval": "0.2s"},
    )
    with contextlib.ExitStack() as stack:
        stack.callback(other.stop)
        _cached_beside_hosted(wharf, upstream, other, cached, tool)


def _cached_beside_hosted(wharf: WharfProcess, upstream, other, cached, tool) -> None:
    with wharf, _client(wharf) as http:
        hosted = OCIClient(http).push_image("team/app", "v1", layers=[b"hosted layer"])
        got = pull(http, "hub/library/alpine", "3.16")
        assert got.digest == cached.digest
        assert pull(http, "team/app", "v1").digest == hosted.digest
        assert all(cache_status(h) == "" for h in pull(http, "team/app", "v1").headers), "hosted: no cache header"
        # Writes under the prefix are refused; beside it they work.
        assert_error(http.post("/v2/hub/library/alpine/blobs/uploads/"), 405, "UNSUPPORTED")
        assert http.post("/v2/team/other/blobs/uploads/").status_code == 202
        # What is not upstream is unknown, as the upstream says.
        assert_error(
            http.get("/v2/hub/library/alpine/manifests/nope", headers={"Accept": ACCEPT}), 404, "MANIFEST_UNKNOWN"
        )
        catalog = http.get("/v2/_catalog").json()["repositories"]
        assert "hub/library/alpine" in catalog and "team/app" in catalog
        tags = http.get("/v2/hub/library/alpine/tags/list").json()
        assert tags == {"name": "hub/library/alpine", "tags": ["3.16", "3.17"]}  # cached, and the upstream's
        # The command line and the metrics see the cache.
        listed = json.loads(wharf_cli("cache", "ls", "--json", str(wharf.config_path)).stdout)
        assert [(r["repository"], r["tags"], r["digest"], r["complete"]) for r in listed] == [
            ("hub/library/alpine", ["3.16"], cached.digest, True)
        ]
        assert listed[0]["size"] == len(cached.body) + len(layer("hub")) + len(_config(http, "hub/library/alpine"))
        wait_until(
            lambda: json.loads(wharf_cli("cache", "ls", "--json", str(wharf.config_path)).stdout)[0]["last_pulled"],
            timeout=20,
            what="the last pull in the listing",
        )

        def counted() -> dict:
            status = json.loads(wharf_cli("cache", "status", "--json", str(wharf.config_path)).stdout)
            return status["upstreams"][0]

        # The manifest and its layer were fetched; its config, the bytes of the hosted image's, was linked.
        config = json.loads(cached.body)["config"]["digest"]
        assert blob_gets(upstream, config) == 0
        row = wait_until(lambda: (r := counted())["misses"] >= 2 and r["hits"] >= 3 and r, timeout=20, what="counts")
        assert row["upstream"] == "hub" and row["images"] == 1 and row["misses"] == 2
        assert row["upstream_bytes"] >= len(layer("hub")) and row["used"] == listed[0]["size"]
        text = wharf_cli("cache", "status", str(wharf.config_path)).stdout
        assert "upstream hub: hub/* from " + upstream.url in text and "hit ratio" in text
        with urllib.request.urlopen(wharf.metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        assert 'wharf_proxy_misses_total{kind="blob",upstream="hub"}' in metrics
        assert 'wharf_proxy_upstream_bytes_total{upstream="hub"}' in metrics
        # A second upstream under its own prefix: each repository comes from the upstream its prefix names.
        assert pull(http, "quay/org/tool", "1").digest == tool.digest
        assert_error(http.get("/v2/hub/org/tool/manifests/1", headers={"Accept": ACCEPT}), 404, "MANIFEST_UNKNOWN")
        assert manifest_requests(other, "library/alpine", "3.16") == []
        assert "quay/org/tool" in http.get("/v2/_catalog").json()["repositories"]
        listed = json.loads(wharf_cli("cache", "ls", "--json", str(wharf.config_path)).stdout)
        assert sorted((r["upstream"], r["repository"]) for r in listed) == [
            ("hub", "hub/library/alpine"),
            ("quay", "quay/org/tool"),
        ]


def _config(http: httpx.Client, repo: str) -> bytes:
    doc = json.loads(http.get(f"/v2/{repo}/manifests/3.16", headers={"Accept": ACCEPT}).content)
    return http.get(f"/v2/{repo}/blobs/{doc['config']['digest']}").content


class _LyingUpstream:
    """An upstream whose layer's bytes do not hash to the digest its manifest names."""

    def __init__(self, size: int) -> None:
        self.config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        self.layer = layer("the real layer", size)
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": digest_of(self.config),
                    "size": len(self.config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": digest_of(self.layer),
                        "size": len(self.layer),
                    }
                ],
            }
        ).encode()
        lies = {
            "/v2/": (b"{}", {}),
            "/v2/team/app/manifests/v1": (self.manifest, {"Docker-Content-Digest": digest_of(self.manifest)}),
            f"/v2/team/app/blobs/{digest_of(self.config)}": (self.config, {}),
            f"/v2/team/app/blobs/{digest_of(self.layer)}": (b"x" * len(self.layer), {}),  # the lie
        }

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body, headers = lies.get(self.path.split("?")[0], (b'{"errors":[{"code":"NOT_FOUND"}]}', None))
                self.send_response(200 if headers is not None else 404)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if self.path.split("?")[0].endswith("/manifests/v1"):
                    self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _LyingUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("size", [KIB, 3 * 1024 * KIB], ids=["one chunk", "several chunks"])
def test_a_blob_whose_upstream_bytes_do_not_match_is_never_stored_nor_answered_200(tmp_path, size):
    with _LyingUpstream(size) as lying:
        with WharfProcess(tmp_path / "wharf", proxy={"remoteurl": lying.url}) as wharf, _client(wharf) as http:
            blob = f"/v2/team/app/blobs/{digest_of(lying.layer)}"
            assert http.get("/v2/team/app/manifests/v1", headers={"Accept": ACCEPT}).status_code == 200
            for _ in range(2):
                try:
                    answered = http.get(blob)
                except httpx.HTTPError:
                    continue  # bytes had gone out when the digest was found wrong: the transfer is cut off
                if size == KIB:
                    # Its one chunk is held until verified: an OCI error, naming the upstream.
                    error = assert_error(answered, 502, "UNAVAILABLE")
                    assert "not stored, not served" in error["message"]
                else:
                    assert answered.status_code != 200 or answered.content != lying.layer
            # Not stored: no file of that digest anywhere under the node's storage.
            assert not any((tmp_path / "wharf").rglob(digest_of(lying.layer).split(":", 1)[1]))
