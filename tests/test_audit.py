"""The audit log: a line for every push, pull, delete, failed sign-in and denial, rotated, never lost."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from oci_client import OCIClient, digest_of
from secure_registry import TEAM_ACCESS, TEAM_USERS, SecureWharf, assert_refused, make_users

from node.app import ROUTES
from node.audit import AuditLog, AuditMiddleware, AuditUnavailable
from node.config import AuditConfig

ADMIN = ("admin", TEAM_USERS["admin"])
DEV = ("dev", TEAM_USERS["dev"])
FIELDS = {"time", "user", "remote", "action", "repository", "reference", "digest", "result"}


def _lines(path: Path) -> list[dict[str, Any]]:
    """Every line of an audit file, each parsed as JSON (a line that does not parse fails the test)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def _find(lines: list[dict[str, Any]], **wanted: Any) -> dict[str, Any]:
    found = [line for line in lines if all(line.get(k) == v for k, v in wanted.items())]
    assert found, f"no audit line with {wanted} in:\n" + "\n".join(map(json.dumps, lines))
    return found[-1]


def test_every_operation_of_a_session_is_audited(tmp_path):
    users = make_users(tmp_path / "htpasswd", TEAM_USERS)
    audit = tmp_path / "audit" / "audit.log"
    audit.parent.mkdir()
    with SecureWharf(
        tmp_path / "wharf",
        http={"insecure": True},
        auth={"htpasswd": {"path": str(users)}},
        access=TEAM_ACCESS,
        audit={"path": str(audit), "stdout": True},
    ) as process:
        with process.client(auth=ADMIN) as admin, process.client(auth=DEV) as dev:
            image = OCIClient(admin).push_image("team/app", "v1", layers=[b"audited layer"])
            pushed = admin.put(
                "/v2/team/app/manifests/v2", content=image.body, headers={"Content-Type": image.media_type}
            )
            assert pushed.status_code == 201
            accept = {"Accept": image.media_type}
            assert admin.get("/v2/team/app/manifests/v1", headers=accept).status_code == 200
            assert admin.head("/v2/team/app/manifests/v1", headers=accept).status_code == 200
            assert dev.get(f"/v2/team/app/manifests/{image.digest}", headers=accept).status_code == 200
            assert dev.get("/v2/team/app/manifests/missing").status_code == 404
            assert_refused(dev.delete("/v2/team/app/manifests/v1"), 403, "DENIED")
            with process.client(auth=("dev", "not-the-password")) as wrong:
                assert_refused(wrong.get("/v2/team/app/tags/list"), 401, "UNAUTHORIZED")
            assert admin.delete("/v2/team/app/manifests/v1").status_code == 202
            assert admin.delete(f"/v2/team/app/manifests/{image.digest}").status_code == 202
            layer = digest_of(b"audited layer")
            assert admin.delete(f"/v2/team/app/blobs/{layer}").status_code == 202
    log_text = process.log_text()  # once stopped: the JSON log is written by a thread

    lines = _lines(audit)
    for line in lines:
        assert FIELDS <= set(line), line
    push = _find(lines, action="push", result="success", reference="v2")
    assert push["user"] == "admin" and push["remote"] == "127.0.0.1" and push["repository"] == "team/app"
    assert push["digest"] == image.digest and push["status"] == 201
    assert push["request_id"] == pushed.headers["x-request-id"]
    # A change is announced before it is made.
    started = _find(lines, action="push", result="started", reference="v2")
    assert lines.index(started) < lines.index(push)
    _find(lines, action="push", result="success", reference="v1", digest=image.digest)
    _find(lines, action="pull", result="success", user="admin", reference="v1", digest=image.digest)
    _find(lines, action="pull", result="success", user="dev", reference=image.digest)
    _find(lines, action="pull", result="failure", user="dev", reference="missing", status=404)
    _find(lines, action="delete", result="denied", user="dev", repository="team/app", reference="v1")
    failure = _find(lines, action="login", result="failure", user="dev")
    assert failure["reason"] == "wrong password"
    _find(lines, action="delete", result="started", user="admin", reference="v1")
    _find(lines, action="delete", result="success", user="admin", reference="v1", status=202)
    _find(lines, action="delete", result="success", user="admin", reference=image.digest, digest=image.digest)
    _find(lines, action="delete", result="success", user="admin", digest=layer)
    # HEAD is no pull: three pulls were made and three pull lines written.
    pulls = [(line["user"], line["reference"], line["result"]) for line in lines if line["action"] == "pull"]
    assert len(pulls) == 3, pulls
    # audit.stdout: the same lines in the JSON log.
    logged = [json.loads(line) for line in log_text.splitlines() if '"msg": "audit"' in line]
    assert {(e["action"], e["result"]) for e in logged} == {(e["action"], e["result"]) for e in lines}


def test_the_audit_file_rotates_by_size(tmp_path):
    audit = tmp_path / "audit.log"
    with SecureWharf(tmp_path / "wharf", audit={"path": str(audit), "maxsize": "2KB", "maxbackups": 2}) as process:
        with process.client() as http:
            image = OCIClient(http).push_image("team/app", "v1")
            for _ in range(40):
                assert http.get("/v2/team/app/manifests/v1", headers={"Accept": image.media_type}).status_code == 200
    files = sorted(tmp_path.glob("audit.log*"))
    assert [f.name for f in files] == ["audit.log", "audit.log.1", "audit.log.2"]
    for path in files:
        assert 0 < path.stat().st_size <= 2000
        for line in _lines(path):
            assert line["action"] in ("push", "pull")
    assert _lines(audit)[-1]["action"] == "pull"


def test_an_audit_log_that_cannot_be_written_fails_the_operation_and_changes_nothing(tmp_path):
    with SecureWharf(tmp_path / "wharf", audit={"path": "/dev/full"}) as process:
        with process.client() as http:
            oci = OCIClient(http)
            config, layer = b"{}", b"layer"
            oci.push_blob("team/app", config)  # blob uploads are not audited
            oci.push_blob("team/app", layer)
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {
                        "mediaType": "application/vnd.oci.image.config.v1+json",
                        "digest": digest_of(config),
                        "size": len(config),
                    },
                    "layers": [],
                }
            ).encode()
            response = http.put(
                "/v2/team/app/manifests/v1",
                content=manifest,
                headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            )
            assert_refused(response, 503, "UNAVAILABLE")
            assert http.get("/v2/team/app/tags/list").json()["tags"] == []
            assert http.get(f"/v2/team/app/manifests/{digest_of(manifest)}").status_code == 503
            assert_refused(http.get("/v2/team/app/manifests/v1"), 503, "UNAVAILABLE")
            assert http.head(f"/v2/team/app/blobs/{digest_of(layer)}").status_code == 200
            assert_refused(http.delete(f"/v2/team/app/blobs/{digest_of(layer)}"), 503, "UNAVAILABLE")
            assert http.head(f"/v2/team/app/blobs/{digest_of(layer)}").status_code == 200
        assert "audit log /dev/full cannot be written" in process.log_text()


def test_an_unopenable_audit_path_stops_start_up(tmp_path):
    process = SecureWharf(tmp_path / "wharf", audit={"path": str(tmp_path / "no" / "such" / "dir" / "audit.log")})
    from secure_registry import wharf_cli

    result = wharf_cli("serve", str(process.config_path), check=False)
    assert result.returncode == 2 and "audit.path" in result.stderr


def test_a_change_whose_outcome_cannot_be_recorded_is_reported_as_a_failure():
    """The `started` line was written, the outcome line was not: the client must not see success."""

    class SecondWriteFails(AuditLog):
        def __init__(self) -> None:
            super().__init__(AuditConfig(stdout=False))
            self.writes: list[tuple[str, str]] = []

        async def record(self, action: str, result: str, **fields: Any) -> None:
            if self.writes:
                raise AuditUnavailable({"reason": "disk full"})
            self.writes.append((action, result))

    async def handler(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def scenario() -> httpx.Response:
        audit = SecondWriteFails()
        app = AuditMiddleware(handler, audit=audit, routes=ROUTES)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://wharf") as http:
            response = await http.put("/v2/team/app/manifests/v1", content=b"{}")
        audit.close()
        assert audit.writes == [("push", "started")]
        return response

    response = asyncio.run(scenario())
    assert response.status_code == 500
    assert response.json()["errors"][0]["code"] == "UNAVAILABLE"


@pytest.mark.parametrize("maxsize", ["10", "lots"])
def test_audit_sizes_are_checked_at_start_up(tmp_path, maxsize):
    from node.config import ConfigError, load

    path = tmp_path / "config.yml"
    path.write_text(f"audit:\n  path: {tmp_path / 'a.log'}\n  maxsize: {maxsize}\n")
    with pytest.raises(ConfigError):
        load(str(path), environ={})
