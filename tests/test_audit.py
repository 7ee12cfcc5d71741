"""The audit log: one line per decision, hash-chained across rotations, anchored in the coordinator, never lost."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from oci_client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, OCIClient, descriptor, digest_of, manifest_bytes
from secure_registry import TEAM_ACCESS, TEAM_USERS, SecureWharf, assert_refused, make_users, wharf_cli
from services import wait_until

from node.app import ROUTES
from node.audit import FIELD_CHARS, AuditIntent, AuditLog, AuditMiddleware, AuditUnavailable, _ChainedFile
from node.auditchain import Head, log_files, verify
from node.config import AuditConfig

ADMIN = ("admin", TEAM_USERS["admin"])
DEV = ("dev", TEAM_USERS["dev"])
ROBOT = ("robot", TEAM_USERS["robot"])
FIELDS = {"seq", "chain", "prev", "time", "user", "remote", "action", "object", "repository", "reference", "digest"}
FIELDS |= {"result", "status", "refused_by", "rule", "request_id"}


def _lines(path: Path) -> list[dict[str, Any]]:
    """Every line of an audit file, each parsed as JSON (a line that does not parse fails the test)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def _find(lines: list[dict[str, Any]], **wanted: Any) -> dict[str, Any]:
    found = [line for line in lines if all(line.get(k) == v for k, v in wanted.items())]
    assert found, f"no audit line with {wanted} in:\n" + "\n".join(map(json.dumps, lines))
    return found[-1]


def _verify(*args: str) -> tuple[int, str]:
    result = wharf_cli("audit", "verify", *args, check=False)
    return result.returncode, result.stdout + result.stderr


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
    assert push["digest"] == image.digest and push["status"] == 201 and push["object"] == "tag"
    assert push["request_id"] == pushed.headers["x-request-id"]
    # A change is announced before it is made.
    started = _find(lines, action="push", result="started", reference="v2")
    assert lines.index(started) < lines.index(push)
    _find(lines, action="push", result="success", object="blob", digest=layer, user="admin")
    _find(lines, action="push", result="success", reference="v1", digest=image.digest)
    _find(lines, action="pull", result="success", user="admin", reference="v1", digest=image.digest)
    _find(lines, action="pull", result="success", user="dev", reference=image.digest)
    _find(lines, action="pull", result="failure", user="dev", reference="missing", status=404)
    _find(
        lines, action="delete", result="denied", user="dev", repository="team/app", reference="v1", refused_by="access"
    )
    failure = _find(lines, result="denied", refused_by="signin", user="dev")
    assert failure["rule"] == "wrong password" and failure["action"] == "pull"
    _find(lines, action="delete", result="started", user="admin", reference="v1")
    # A delete by tag names the digest the tag had.
    _find(lines, action="delete", result="success", user="admin", reference="v1", digest=image.digest, status=202)
    _find(lines, action="delete", result="success", user="admin", reference=image.digest, digest=image.digest)
    _find(lines, action="delete", result="success", user="admin", object="blob", digest=layer)
    # HEAD is no pull: three pulls were made and three pull lines written.
    pulls = [(line["user"], line["reference"], line["result"]) for line in lines if line["action"] == "pull"]
    assert len([p for p in pulls if p[2] != "denied"]) == 3, pulls
    # audit.stdout: the same lines in the JSON log.
    logged = [json.loads(line) for line in log_text.splitlines() if '"msg": "audit"' in line]
    assert {(e["action"], e["result"]) for e in logged} == {(e["action"], e["result"]) for e in lines}
    assert verify(log_files([str(audit)])).ok


def _audited_team(tmp_path: Path, audit: Path, **sections: Any) -> SecureWharf:
    """The team's users and access rules over htpasswd, auditing into `audit`."""
    users = make_users(tmp_path / "htpasswd", TEAM_USERS)
    return SecureWharf(
        tmp_path / "wharf",
        http={"insecure": True},
        auth={"htpasswd": {"path": str(users)}},
        access=TEAM_ACCESS,
        audit={"path": str(audit)},
        **sections,
    )


def test_each_decision_is_one_line_with_its_action_rule_and_digest(tmp_path):
    audit = tmp_path / "audit.log"
    process = _audited_team(
        tmp_path,
        audit,
        quotas=[{"repository": "team/small", "limit": "10"}],
        immutability=[{"name": "releases", "repositories": ["team/**"], "tags": [r"v\d+"]}],
        ratelimit={"authfailures": {"peraddress": 0, "peruser": 2, "window": "1m", "backoff": "1m"}},
    )
    config_blob, layer, chunked, big = b'{"os":"linux"}', b"decided layer", b"chunked blob", b"x" * 100
    expected: list[tuple[Any, ...]] = []  # (action, object, result, refused_by, rule, digest, user)

    def decided(action: str, obj: str | None, result: str, refused_by: str | None = None, **fields: Any) -> None:
        expected.append(
            (action, obj, result, refused_by, fields.get("rule"), fields.get("digest"), fields.get("user", "admin"))
        )

    with process, process.client(auth=ADMIN) as admin, process.client(auth=DEV) as dev:
        oci = OCIClient(admin)
        image = oci.push_image("team/app", "v1", config=config_blob, layers=[layer])
        decided("push", "blob", "success", digest=digest_of(config_blob))
        decided("push", "blob", "success", digest=digest_of(layer))
        decided("push", "tag", "success", digest=image.digest)
        # A chunked upload: its start and its commit are decisions; the PATCH in between is not.
        location = oci.start_upload("team/app")
        decided("push", "upload", "success")
        assert admin.patch(location, content=chunked, headers={"Content-Type": "application/octet-stream"}).is_success
        assert admin.put(location, params={"digest": digest_of(chunked)}).status_code == 201
        decided("push", "blob", "success", digest=digest_of(chunked))
        mounted = admin.post("/v2/team/copy/blobs/uploads/", params={"mount": digest_of(layer), "from": "team/app"})
        assert mounted.status_code == 201
        decided("push", "mount", "success", digest=digest_of(layer))
        # A pull (a HEAD is only a check).
        assert dev.head("/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST}).status_code == 200
        assert dev.get("/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST}).status_code == 200
        decided("pull", "tag", "success", digest=image.digest, user="dev")
        # A delete by tag names the digest the tag pointed at.
        assert oci.put_manifest("team/app", "scratch", image.body, image.media_type).status_code == 201
        decided("push", "tag", "success", digest=image.digest)
        assert admin.delete("/v2/team/app/manifests/scratch").status_code == 202
        decided("delete", "tag", "success", digest=image.digest)
        # A quota refusal.
        quota = admin.post("/v2/team/small/blobs/uploads/", params={"digest": digest_of(big)}, content=big)
        assert_refused(quota, 403, "DENIED")
        decided("push", "blob", "denied", "quota", rule="repository team/small (10 bytes)", digest=digest_of(big))
        # An access refusal: the robot may neither pull nor push here, and the line says push.
        with process.client(auth=ROBOT) as robot:
            assert_refused(robot.post("/v2/team/app/blobs/uploads/"), 403, "DENIED")
        decided("push", "upload", "denied", "access", rule="repository:team/app:pull,push", user="robot")
        # Immutability refusals, with the digest refused (a move) or protected (a delete).
        moved = manifest_bytes(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, config_blob),
                "layers": [descriptor(OCI_LAYER, chunked)],
            }
        )
        assert_refused(oci.put_manifest("team/app", "v1", moved, OCI_MANIFEST), 403, "DENIED")
        decided("push", "tag", "denied", "immutability", rule="releases", digest=digest_of(moved))
        assert_refused(admin.delete("/v2/team/app/manifests/v1"), 403, "DENIED")
        decided("delete", "tag", "denied", "immutability", rule="releases", digest=image.digest)
        # A rate-limited sign-in: two wrong passwords block the user, whose next request is refused.
        with process.client(auth=("dev", "wrong")) as wrong:
            for _ in range(2):
                assert_refused(wrong.get("/v2/team/app/tags/list"), 401, "UNAUTHORIZED")
                decided("pull", None, "denied", "signin", rule="wrong password", user="dev")
        assert_refused(dev.get("/v2/team/app/tags/list"), 429, "TOOMANYREQUESTS")
        decided("pull", None, "denied", "ratelimit", rule="authfailures user dev", user="dev")

    lines = _lines(audit)
    decisions = [line for line in lines if line["result"] != "started"]
    got = [
        (d["action"], d["object"], d["result"], d["refused_by"], d["rule"], d["digest"], d["user"]) for d in decisions
    ]
    assert got == expected
    assert decisions[-2]["blocked"] == ["user dev"]  # the failure that blocked says so
    # Each tag or manifest push and each delete that got past authentication announced itself first,
    # in a line of its own (blobs only change content behind names, and have no such line).
    started = [line for line in lines if line["result"] == "started"]
    by_request = {d["request_id"]: d for d in decisions}
    assert len({s["request_id"] for s in started}) == len(started)
    for line in started:
        outcome = by_request[line["request_id"]]
        assert lines.index(line) < lines.index(outcome) and outcome["action"] == line["action"]
        assert outcome["refused_by"] not in ("access", "signin", "ratelimit")
    changes = [d for d in decisions if d["action"] == "delete" or (d["action"] == "push" and d["object"] == "tag")]
    assert len(started) == len([d for d in changes if d["refused_by"] not in ("access", "signin", "ratelimit")])
    code, output = _verify("-c", str(process.config_path), str(audit))
    assert code == 0, output


def test_a_long_invalid_name_cannot_fill_the_log(tmp_path):
    # An anonymous caller's invalid names are audited (refused requests are), each field capped, so a
    # few requests cannot write megabytes and rotate the history away.
    audit = tmp_path / "audit.log"
    process = _audited_team(tmp_path, audit)
    long_name = "x/" * 20_000 + "A"
    with process, process.client() as http:
        before = audit.stat().st_size if audit.exists() else 0
        for _ in range(5):
            response = http.get(f"/v2/{long_name}/manifests/latest")
            assert 400 <= response.status_code < 500
        grown = audit.stat().st_size - before
    assert grown < 5 * 2 * FIELD_CHARS + 5 * 1024, grown
    capped = [line for line in _lines(audit) if str(line.get("repository", "")).startswith("x/x/")]
    assert len(capped) == 5
    for line in capped:
        assert line["repository"] == long_name[:FIELD_CHARS] + f"... ({len(long_name)} characters)"


def test_the_audit_file_rotates_by_size(tmp_path):
    audit = tmp_path / "audit.log"
    with SecureWharf(tmp_path / "wharf", audit={"path": str(audit), "maxsize": "2KB", "maxbackups": 2}) as process:
        with process.client() as http:
            image = OCIClient(http).push_image("team/app", "v1")
            for _ in range(40):
                assert http.get("/v2/team/app/manifests/v1", headers={"Accept": image.media_type}).status_code == 200
    files = sorted(tmp_path.glob("audit.log*"))
    # PATH.lock keeps a second process off the path while this one writes.
    assert [f.name for f in files] == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.lock"]
    files = files[:-1]
    for path in files:
        assert 0 < path.stat().st_size <= 2000
        for line in _lines(path):
            assert line["action"] in ("push", "pull")
    assert _lines(audit)[-1]["action"] == "pull"
    # The chain runs through the files: the first line of each names the last of the one before.
    assert _lines(audit)[0]["seq"] == _lines(tmp_path / "audit.log.1")[-1]["seq"] + 1


def _make_rotated_log(tmp_path: Path, **audit: Any) -> tuple[SecureWharf, Path]:
    """A registry whose audit log has rotated twice (three files); stopped, so the log is complete."""
    log = tmp_path / "log" / "audit.log"
    log.parent.mkdir()
    process = SecureWharf(
        tmp_path / "wharf", audit={"path": str(log), "maxsize": "2KB", "maxbackups": 5, **audit}
    ).start()
    with process.client() as http:
        image = OCIClient(http).push_image("team/app", "v1")
        for _ in range(40):
            if (log.parent / "audit.log.2").exists() and len(_lines(log)) >= 3:
                break
            assert http.get("/v2/team/app/manifests/v1", headers={"Accept": image.media_type}).status_code == 200
    process.stop()
    names = sorted(p.name for p in log.parent.iterdir())
    assert names == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.lock"]
    return process, log


def _copy(log: Path, where: Path) -> Path:
    shutil.copytree(log.parent, where)
    return where / log.name


def _rewrite(path: Path, change: Any) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(change(lines)))


def test_verify_passes_an_untouched_log_and_names_the_first_line_tampered_with(tmp_path):
    process, log = _make_rotated_log(tmp_path)
    config = str(process.config_path)
    code, output = _verify("-c", config, str(log))
    assert code == 0 and "ok: " in output and "the coordinator's record of line" in output, output
    # The same through the files named one by one, in any order.
    files = [str(log.parent / name) for name in ("audit.log", "audit.log.2", "audit.log.1")]
    assert _verify(*files)[0] == 0
    middle = _lines(log.parent / "audit.log.1")

    edited = _copy(log, tmp_path / "edited")
    _rewrite(edited.parent / "audit.log.1", lambda ls: [ls[0].replace(b"127.0.0.1", b"127.0.0.2"), *ls[1:]])
    code, output = _verify(str(edited))
    assert code == 1 and f"audit.log.1:1: line {middle[0]['seq']} was changed" in output, output

    removed = _copy(log, tmp_path / "removed")
    _rewrite(removed.parent / "audit.log.1", lambda ls: ls[:1] + ls[2:])
    code, output = _verify(str(removed))
    assert code == 1 and f"audit.log.1:2: line {middle[1]['seq']} is missing" in output, output

    swapped = _copy(log, tmp_path / "swapped")
    _rewrite(swapped.parent / "audit.log.1", lambda ls: [ls[1], ls[0], *ls[2:]])
    code, output = _verify(str(swapped))
    assert code == 1 and "audit.log.1:1: lines are out of order" in output, output

    # Cutting the newest lines leaves a sound chain: only the coordinator's record shows it.
    cut = _copy(log, tmp_path / "cut")
    newest = _lines(cut)
    _rewrite(cut, lambda ls: ls[:-2])
    assert _verify(str(cut))[0] == 0
    code, output = _verify("-c", config, str(cut))
    assert code == 1, output
    assert f"audit.log:{len(newest) - 2}: the log ends at line {newest[-3]['seq']}" in output, output
    assert f"lines {newest[-2]['seq']}-{newest[-1]['seq']} are missing, cut from the end" in output, output

    gone = _copy(log, tmp_path / "gone")
    (gone.parent / "audit.log.1").unlink()
    code, output = _verify(str(gone))
    assert code == 1 and "audit.log:1: " in output and "a rotated file" in output, output
    # The oldest file gone, though rotation (audit.maxbackups: 5) never dropped one: the configuration tells.
    oldest = _copy(log, tmp_path / "oldest")
    (oldest.parent / "audit.log.2").unlink()
    assert _verify(str(oldest))[0] == 0
    code, output = _verify("-c", config, str(oldest))
    assert code == 1 and "audit.log.1:1: lines 1-" in output and "the oldest rotated file was removed" in output


def test_the_newest_line_reaches_the_coordinator_while_serving(tmp_path):
    process, log = _make_rotated_log(tmp_path, checkpoint="200ms")
    process.start()
    try:
        with process.client() as http:
            for _ in range(3):
                assert http.get("/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST}).status_code == 200

            def recorded() -> bool:
                code, output = _verify("-c", str(process.config_path), str(log))
                return code == 0 and f"record of line {_lines(log)[-1]['seq']} " in output

            wait_until(recorded, timeout=20, interval=0.3, what="the newest line in the coordinator")
    finally:
        process.stop(signal.SIGKILL)  # no record at shutdown: what is there was written while serving
    newest = _lines(log)
    _rewrite(log, lambda ls: ls[:-1])
    code, output = _verify("-c", str(process.config_path), str(log))
    assert code == 1 and f"line {newest[-1]['seq']} is missing, cut from the end" in output, output


def test_lines_cut_while_no_node_was_writing_stay_visible_after_a_restart(tmp_path):
    process, log = _make_rotated_log(tmp_path)
    newest = _lines(log)
    _rewrite(log, lambda ls: ls[:-2])
    with process, process.client() as http:
        assert http.get("/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST}).status_code == 200
    assert "the log ends at line" in process.log_text()
    after = _lines(log)[-1]
    # The node went on from the coordinator's record, not from the cut file, and said why.
    assert after["seq"] == newest[-1]["seq"] + 1 and "resumed" in after
    code, output = _verify("-c", str(process.config_path), str(log))
    assert code == 1 and f"does not continue line {newest[-3]['seq']}" in output, output


def test_writers_sharing_one_file_keep_one_chain_through_rotations(tmp_path):
    """What several worker processes do: each append re-reads what another wrote or rotated."""
    path = str(tmp_path / "audit.log")
    writers = [_ChainedFile(path, 1500, 3, False, shared=True) for _ in range(2)]
    for i in range(30):
        writers[i % 3 % 2].append([{"action": "pull", "n": i, "padding": "x" * 100}])
    for writer in writers:
        writer.close()
    files = log_files([path])
    assert len(files) == 4
    report = verify(files)
    assert report.ok, report.problem
    seqs = [line["n"] for name in files for line in _lines(Path(name))]
    assert seqs == list(range(30 - len(seqs), 30))
    # Lines that came in together go out in one write, rotating as often as they need.
    batch = _ChainedFile(path, 1500, 3, False)
    batch.append([{"action": "pull", "n": 30 + i, "padding": "x" * 100} for i in range(20)])
    assert verify(log_files([path])).ok
    assert _lines(Path(path))[-1]["n"] == 49 and all(Path(f).stat().st_size <= 1500 for f in log_files([path]))
    # A second process that also thinks it is alone on the path is refused, not let in to break the chain.
    other = _ChainedFile(path, 1500, 3, False)
    with pytest.raises(OSError, match="being written by another process"):
        other.append([{"action": "pull"}])
    other.close()
    batch.close()


def test_a_restarted_writer_checks_the_coordinators_record_against_the_file(tmp_path):
    path = str(tmp_path / "audit.log")
    first = _ChainedFile(path, 1500, 2, False)
    heads = []
    for i in range(40):  # rotates: line 1 ends up in no file
        first.append([{"action": "pull", "n": i, "padding": "x" * 100}])
        heads.append(first.head)
    first.close()
    assert _lines(Path(log_files([path])[0]))[0]["seq"] > 1
    assert heads[0] is not None and heads[5] is not None and heads[-1] is not None

    def anchored(head: Head) -> str | None:
        writer = _ChainedFile(path, 1500, 2, False)
        try:
            return writer.anchor(head)
        finally:
            writer.close()

    # A record a few lines behind the file (the node crashed before recording the rest): fine.
    assert anchored(heads[-3]) is None
    # A record older than every file cannot be compared: fine too.
    assert anchored(heads[0]) is None
    # A record the file does not hold: the next line goes on from the record and says why.
    forged = _ChainedFile(path, 1500, 2, False)
    wrong = Head(heads[-3].seq, "0" * 64, heads[-3].chain)
    assert forged.anchor(wrong) == f"line {wrong.seq} is not the line the coordinator recorded"
    forged.append([{"action": "pull"}])
    forged.close()
    newest = _lines(Path(path))[-1]
    assert newest["seq"] == heads[-1].seq + 1 and newest["prev"] == "0" * 64 and "resumed" in newest
    report = verify(log_files([path]))
    assert not report.ok and "does not continue" in str(report.problem)


def test_worker_processes_share_one_chain_in_one_file(tmp_path):
    log = tmp_path / "audit.log"
    process = SecureWharf(
        tmp_path / "wharf", http={"workers": 2}, audit={"path": str(log), "maxsize": "4KB", "maxbackups": 20}
    )
    with process, process.client() as http:
        image = OCIClient(http).push_image("team/app", "v1")

        def pull(_: int) -> None:
            # A new connection each time, so both workers get requests.
            with process.client() as fresh:
                response = fresh.get("/v2/team/app/manifests/v1", headers={"Accept": image.media_type})
                assert response.status_code == 200

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(pull, range(80)))
        code, output = _verify("-c", str(process.config_path), str(log))
    assert code == 0, output
    lines = [line for name in log_files([str(log)]) for line in _lines(Path(name))]
    assert len([line for line in lines if line["action"] == "pull"]) == 80
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))


def test_an_audit_log_that_cannot_be_written_fails_the_operation_and_changes_no_name(tmp_path):
    layer = b"layer"
    with SecureWharf(tmp_path / "wharf") as process, process.client() as http:
        image = OCIClient(http).push_image("team/app", "v1", layers=[layer])
    full = SecureWharf(tmp_path / "wharf", port=process.port, audit={"path": "/dev/full"})
    with full, full.client() as http:
        # A blob's one line is written before the client hears of the upload: it hears 503.
        blob = b"another layer"
        pushed = http.post("/v2/team/app/blobs/uploads/", params={"digest": digest_of(blob)}, content=blob)
        assert_refused(pushed, 503, "UNAVAILABLE")
        # A tag push or a delete is refused before it is made, as its `started` line is.
        response = OCIClient(http).put_manifest("team/app", "v2", image.body, image.media_type)
        assert_refused(response, 503, "UNAVAILABLE")
        assert http.get("/v2/team/app/tags/list").json()["tags"] == ["v1"]
        assert_refused(http.get("/v2/team/app/manifests/v1"), 503, "UNAVAILABLE")
        assert http.head(f"/v2/team/app/blobs/{digest_of(layer)}").status_code == 200
        assert_refused(http.delete(f"/v2/team/app/blobs/{digest_of(layer)}"), 503, "UNAVAILABLE")
        assert http.head(f"/v2/team/app/blobs/{digest_of(layer)}").status_code == 200
        assert_refused(http.delete("/v2/team/app/manifests/v1"), 503, "UNAVAILABLE")
        assert http.get("/v2/team/app/tags/list").json()["tags"] == ["v1"]
    assert "audit log /dev/full cannot be written" in full.log_text()


def test_an_unopenable_audit_path_stops_start_up(tmp_path):
    process = SecureWharf(tmp_path / "wharf", audit={"path": str(tmp_path / "no" / "such" / "dir" / "audit.log")})
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
        inner = AuditIntent(handler, audit=audit, routes=ROUTES)
        app = AuditMiddleware(inner, audit=audit, routes=ROUTES)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://wharf") as http:
            response = await http.put("/v2/team/app/manifests/v1", content=b"{}")
        audit.close()
        assert audit.writes == [("push", "started")]
        return response

    response = asyncio.run(scenario())
    assert response.status_code == 500
    assert response.json()["errors"][0]["code"] == "UNAVAILABLE"


@pytest.mark.parametrize("setting", ["maxsize: 10", "maxsize: lots", "checkpoint: 0s", "checkpoint: soon"])
def test_audit_settings_are_checked_at_start_up(tmp_path, setting):
    from node.config import ConfigError, load

    path = tmp_path / "config.yml"
    path.write_text(f"audit:\n  path: {tmp_path / 'a.log'}\n  {setting}\n")
    with pytest.raises(ConfigError):
        load(str(path), environ={})
