"""Property-based fuzzing of a real registry: random names, tags, digests, headers and manifests.

Whatever arrives, the registry answers below 500 with an OCI error body when it refuses, stays up,
and a refused request changes nothing: neither a coordinator record nor a stored file.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oci_client import OCIClient, digest_of
from secure_registry import SecureWharf, make_users
from services import wait_until

USERS = {"admin": "admin-pw", "reader": "reader-pw"}
ACCESS = {
    "rules": [
        {"repositories": ["**"], "users": ["admin"], "actions": ["*"]},
        {"repositories": ["fuzz/**"], "users": ["reader"], "actions": ["pull"]},
        {"repositories": ["public/**"], "anonymous": True, "actions": ["pull"]},
    ]
}
KNOWN_BLOBS = [b"fuzz layer", b'{"architecture":"amd64","os":"linux"}']
# Modest by default (a few seconds); WHARF_FUZZ_EXAMPLES=5000 for a long hunt.
EXAMPLES = int(os.environ.get("WHARF_FUZZ_EXAMPLES", "200"))


@dataclass
class Registry:
    process: SecureWharf
    http: httpx.Client
    image_digest: str

    @property
    def root(self) -> Path:
        return self.process.data_dir

    def snapshot(self) -> tuple[list[tuple[Any, ...]], list[tuple[str, int]]]:
        """Coordinator records (but leader leases, which tick on their own) and stored files."""
        embedded = self.process.config.get("coordinator", {}).get("embedded", {})
        database = embedded.get("path") or str(self.root / "registry" / "wharf" / "coordinator.db")
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
            records = connection.execute(
                "SELECT key, value, version, mod_rev FROM kv WHERE key NOT LIKE 'leader/%' ORDER BY key"
            ).fetchall()
        connection.close()
        files = []
        for folder, _, names in os.walk(self.root / "registry" / "docker"):
            for name in names:
                path = Path(folder) / name
                files.append((str(path.relative_to(self.root)), path.stat().st_size))
        return records, sorted(files)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    users = make_users(root / "htpasswd", USERS)
    with SecureWharf(
        root / "wharf",
        http={"insecure": True},
        auth={"htpasswd": {"path": str(users)}},
        access=ACCESS,
        # The newest audit line goes to the coordinator on a clock too (every 10 s by default): a
        # line of an earlier request recorded between two snapshots is not this request's change.
        audit={"path": str(root / "audit.log"), "checkpoint": "24h"},
        ratelimit={"authfailures": {"peraddress": 0, "peruser": 0}},
        # What the leader writes on its own clock (a collection cycle, last-pulled times) would change
        # state between two snapshots whatever the request was: the state compared is the requests'.
        gc={"enabled": False},
        inventory={"pullinterval": "24h"},
    ) as process:
        with process.client(auth=("admin", USERS["admin"])) as http:
            image = OCIClient(http).push_image("fuzz/base", "v1", layers=[KNOWN_BLOBS[0]], config=KNOWN_BLOBS[1])
            # The storage figures of that push are settled by the leader within seconds: before the
            # first snapshot, not between two.
            wait_until(lambda: http.get("/wharf/v1/usage").json().get("current"), timeout=60, what="usage settled")
        with process.client() as http:
            yield Registry(process, http, image.digest)
        assert process.proc is not None and process.proc.poll() is None, "the registry died:\n" + process.log_tail()


# -- strategies --------------------------------------------------------------------------------

_PRINTABLE = st.characters(min_codepoint=32, max_codepoint=126)
_COMPONENT = st.from_regex(r"[a-z0-9]+(?:[._-][a-z0-9]+)?", fullmatch=True)
_VALID_NAME = st.lists(_COMPONENT, min_size=1, max_size=3).map("/".join)
_NAMES = st.one_of(
    st.sampled_from(["fuzz/base", "fuzz/other", "public/x", "other/thing"]),
    _VALID_NAME,
    st.text(min_size=0, max_size=40),
    st.text(alphabet="abc/._-:@%", min_size=1, max_size=30),
)
_HEX64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_DIGESTS = st.one_of(
    st.sampled_from([digest_of(b) for b in KNOWN_BLOBS]),
    _HEX64.map(lambda h: "sha256:" + h),
    st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=130).map(lambda h: "sha256:" + h),
    st.sampled_from(["sha512:", "md5:abc", "sha256", ":", "sha256:../../etc"]),
    st.text(max_size=80),
)
_TAGS = st.one_of(
    st.sampled_from(["v1", "latest", "v2"]),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True),
    st.text(max_size=140),
)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


_AUTHORIZATION = st.one_of(
    st.just(_basic("admin", USERS["admin"])),
    st.just(_basic("admin", USERS["admin"])),
    st.just(_basic("reader", USERS["reader"])),
    st.none(),
    st.builds(
        _basic, st.text(_PRINTABLE, max_size=20).filter(lambda u: ":" not in u), st.text(_PRINTABLE, max_size=20)
    ),
    st.text(_PRINTABLE, max_size=60).map(lambda t: "Bearer " + t),
    st.text(_PRINTABLE, max_size=60),
)
_MEDIA_TYPES = st.one_of(
    st.sampled_from(
        [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            "application/octet-stream",
            "application/json",
        ]
    ),
    st.text(_PRINTABLE, max_size=40),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
_DESCRIPTOR = st.fixed_dictionaries(
    {"mediaType": _MEDIA_TYPES, "digest": _DIGESTS, "size": st.one_of(st.integers(-5, 10**12), _JSON)},
    optional={"platform": _JSON, "annotations": _JSON, "artifactType": _MEDIA_TYPES, "urls": _JSON},
)
_MANIFEST = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.one_of(st.just(2), st.integers(-3, 5), _JSON),
        "mediaType": _MEDIA_TYPES,
        "config": st.one_of(_DESCRIPTOR, _JSON),
        "layers": st.one_of(st.lists(_DESCRIPTOR, max_size=3), _JSON),
        "manifests": st.one_of(st.lists(_DESCRIPTOR, max_size=3), _JSON),
        "subject": st.one_of(_DESCRIPTOR, _JSON),
        "artifactType": _MEDIA_TYPES,
        "annotations": _JSON,
    },
)
_BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=2048),
    _MANIFEST.map(lambda m: json.dumps(m).encode()),
    _JSON.map(lambda j: json.dumps(j).encode()),
)
_QUERY_KEYS = ["n", "last", "digest", "mount", "from", "artifactType"]
_QUERY = st.dictionaries(
    st.sampled_from(_QUERY_KEYS),
    st.one_of(_DIGESTS, _NAMES, st.integers(-5, 10**20).map(str), st.text(_PRINTABLE, max_size=20)),
    max_size=3,
)


def _path(kind: str, name: str, reference: str, digest: str, upload: str) -> str:
    n = quote(name, safe="/")
    r, d, u = quote(reference, safe=":"), quote(digest, safe=":"), quote(upload, safe="-")
    return {
        "base": "/v2/",
        "catalog": "/v2/_catalog",
        "tags": f"/v2/{n}/tags/list",
        "manifest": f"/v2/{n}/manifests/{r}",
        "manifest-digest": f"/v2/{n}/manifests/{d}",
        "blob": f"/v2/{n}/blobs/{d}",
        "upload-start": f"/v2/{n}/blobs/uploads/",
        "upload": f"/v2/{n}/blobs/uploads/{u}",
        "referrers": f"/v2/{n}/referrers/{d}",
        "raw": "/" + quote(name, safe="/%"),
    }[kind]


_REQUESTS = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"]),
        "path": st.builds(
            _path,
            st.sampled_from(
                [
                    "base",
                    "catalog",
                    "tags",
                    "manifest",
                    "manifest-digest",
                    "blob",
                    "upload-start",
                    "upload",
                    "referrers",
                    "raw",
                ]
            ),
            _NAMES,
            _TAGS,
            _DIGESTS,
            st.one_of(st.uuids().map(str), st.text(max_size=40)),
        ),
        "query": _QUERY,
        "authorization": _AUTHORIZATION,
        "headers": st.dictionaries(
            st.sampled_from(["Content-Type", "Accept", "Range", "Content-Range", "X-Request-Id", "Host"]),
            st.one_of(
                _MEDIA_TYPES, st.text(_PRINTABLE, max_size=40), st.sampled_from(["bytes=0-10", "0-5", "bytes=-1"])
            ),
            max_size=3,
        ),
        "body": _BODIES,
    }
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(request=_REQUESTS)
def test_random_requests_never_fail_the_server_or_change_state_when_refused(registry, request):
    before = registry.snapshot()
    headers = {k: v.strip() for k, v in request["headers"].items()}
    if request["authorization"] is not None:
        headers["Authorization"] = request["authorization"].strip()
    response = registry.http.request(
        request["method"],
        request["path"],
        params=request["query"],
        headers=headers,
        content=request["body"] if request["method"] in ("PUT", "POST", "PATCH") else None,
    )
    status = response.status_code
    assert status < 500, f"{request['method']} {request['path']}: {status} {response.text[:500]}"
    if status >= 400:
        if request["method"] != "HEAD":
            body = response.json()
            assert isinstance(body.get("errors"), list) and body["errors"][0]["code"], body
        assert registry.snapshot() == before, f"refused with {status} but changed state: {request}"
