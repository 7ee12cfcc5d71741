"""htpasswd authentication: the file and `wharf htpasswd`, Basic challenges, reloads, failure limits, TLS."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import bcrypt
import pytest
from secure_registry import (
    SecureWharf,
    assert_refused,
    make_cert,
    make_users,
    wharf_cli,
)
from services import wait_until

from node import cli
from node.auth import htpasswd

USERS = {"alice": "alice-Secret-1", "bob": "bob:Secret:2"}
# Made by Apache's `htpasswd -nbB -C 5 carol carol-pass` (apache2-utils), kept verbatim.
APACHE_LINE = "carol:$2y$05$eV8a1VYx8cnI5wOnYPCG/uK5k8kwdDaXe/IwW3bsF0ilhfJs.zaRG"


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    root = tmp_path_factory.mktemp("htpasswd")
    users = make_users(root / "htpasswd", USERS)
    with SecureWharf(
        root / "wharf",
        http={"insecure": True},
        auth={"htpasswd": {"realm": "Test Realm", "path": str(users)}},
        ratelimit={"authfailures": {"peraddress": 0, "peruser": 0}},
    ) as process:
        process.users_file = users
        yield process


# -- the file and the command ------------------------------------------------------------------


def test_htpasswd_command_adds_changes_lists_and_removes_users(tmp_path, capsys):
    path = tmp_path / "htpasswd"
    path.write_text("# team registry users\n" + APACHE_LINE + "\ndave:{SHA}notbcrypt=\n")

    def wharf(*args: str) -> int:
        return cli.main(list(args))

    assert wharf("htpasswd", "add", str(path), "erin", "first", "--cost", "4") == 0
    assert wharf("htpasswd", "add", str(path), "erin", "second", "--cost", "4") == 0
    # A real `wharf` process, reading the password from stdin so it need not be on a command line.
    wharf_cli("htpasswd", "add", str(path), "frank", "--cost", "4", input="from-stdin\n")
    capsys.readouterr()
    assert wharf("htpasswd", "list", str(path)) == 0
    assert capsys.readouterr().out.split() == ["carol", "erin", "frank"]
    users = htpasswd.parse(path.read_text())
    assert bcrypt.checkpw(b"second", users["erin"]) and bcrypt.checkpw(b"from-stdin", users["frank"])
    assert "# team registry users" in path.read_text() and "dave:{SHA}" in path.read_text()
    assert wharf("htpasswd", "remove", str(path), "erin") == 0
    assert htpasswd.list_users(str(path)) == ["carol", "frank"]
    assert wharf("htpasswd", "remove", str(path), "erin") == 1
    assert wharf("htpasswd", "add", str(path), "bad:name", "x") == 1


def test_new_htpasswd_files_are_private(tmp_path):
    path = make_users(tmp_path / "htpasswd", {"alice": "pw"})
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_apache_bcrypt_entries_are_accepted_and_other_schemes_refused_by_the_registry(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text(APACHE_LINE + "\n")

    async def check() -> tuple[bool, bool]:
        with ThreadPoolExecutor(2) as pool:
            users_file = htpasswd.HtpasswdFile(str(path), pool)
            return await users_file.verify("carol", b"carol-pass"), await users_file.verify("carol", b"wrong")

    assert asyncio.run(check()) == (True, False)
    # `wharf htpasswd list` skips what the registry would refuse; the registry names it and stops.
    for line, scheme in (
        ("apr:$apr1$abcdefgh$0123456789abcdefghijkl", "Apache MD5"),
        ("sha:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "unsalted SHA-1"),
        ("plain:hunter2", "not a bcrypt hash"),
        ("broken:$2y$05$tooshort", "malformed bcrypt hash"),
        ("nohash", "not user:hash"),
    ):
        text = f"{APACHE_LINE}\n{line}\n"
        if not line.startswith("broken"):  # a malformed bcrypt hash shows only when it is checked
            assert list(htpasswd.parse(text)) == ["carol"]
        path.write_text(text)
        with ThreadPoolExecutor(1) as pool, pytest.raises(htpasswd.HtpasswdError) as refused:
            htpasswd.HtpasswdFile(str(path), pool)
        message = str(refused.value)
        assert scheme in message and str(path) in message and "line 2" in message, message
        if line != "nohash":
            assert f"user {line.partition(':')[0]}" in message, message


def test_an_empty_password_entry_stops_start_up_naming_the_user_and_file(tmp_path):
    users = make_users(tmp_path / "htpasswd", {"alice": "alice-pw"})
    with open(users, "a") as handle:
        handle.write(f"eve:{bcrypt.hashpw(b'', bcrypt.gensalt(4)).decode()}\n")
    process = SecureWharf(tmp_path / "wharf", http={"insecure": True}, auth={"htpasswd": {"path": str(users)}})
    result = wharf_cli("serve", str(process.config_path), check=False)
    assert result.returncode == 2, result.stderr
    assert f"htpasswd file {users} line 2: user eve has an empty password" in result.stderr


def test_a_reload_with_an_unusable_entry_keeps_the_previous_users(tmp_path):
    users = make_users(tmp_path / "htpasswd", {"alice": "alice-pw"})
    with SecureWharf(
        tmp_path / "wharf",
        http={"insecure": True},
        auth={"htpasswd": {"path": str(users)}},
        ratelimit={"authfailures": {"peraddress": 0, "peruser": 0}},  # the polling below fails a few times
    ) as process:
        with process.client(auth=("alice", "alice-pw")) as alice, process.client(auth=("eve", "")) as eve:
            assert alice.get("/v2/").status_code == 200
            good = users.read_text()
            users.write_text(good + f"eve:{bcrypt.hashpw(b'', bcrypt.gensalt(4)).decode()}\n")
            wait_until(  # the file is looked at when someone signs in
                lambda: (
                    alice.get("/v2/").status_code == 200
                    and "user eve has an empty password" in process.log_text()
                    and "the file is not reloaded: keeping its previous 1 users" in process.log_text()
                ),
                timeout=10,
                what="the refused reload to be logged",
            )
            assert alice.get("/v2/").status_code == 200
            assert eve.get("/v2/").status_code == 401
            # Fixed, the file loads again, new users included.
            users.write_text(good)
            make_users(users, {"frank": "frank-pw"})
            with process.client(auth=("frank", "frank-pw")) as frank:
                wait_until(lambda: frank.get("/v2/").status_code == 200, timeout=10, what="the fixed file to load")
            assert alice.get("/v2/").status_code == 200


def test_bcrypt_runs_off_the_loop_once_for_concurrent_requests_and_successes_are_cached(tmp_path, monkeypatch):
    path = make_users(tmp_path / "htpasswd", {"alice": "pw"})
    calls: list[str] = []
    real_check = htpasswd._check

    def counting_check(password: bytes, hashed: bytes) -> bool:
        calls.append(threading.current_thread().name)
        return real_check(password, hashed)

    monkeypatch.setattr(htpasswd, "_check", counting_check)

    async def scenario() -> list[bool]:
        with ThreadPoolExecutor(2, thread_name_prefix="bcrypt-pool") as pool:
            users_file = htpasswd.HtpasswdFile(str(path), pool)
            together = await asyncio.gather(*(users_file.verify("alice", b"pw") for _ in range(8)))
            again = await users_file.verify("alice", b"pw")
            wrong = [await users_file.verify("alice", b"nope") for _ in range(2)]
            return [*together, again, *wrong]

    results = asyncio.run(scenario())
    assert results == [True] * 9 + [False, False]
    # One check for the eight concurrent requests, none for the cached one, one per wrong attempt.
    assert len(calls) == 3
    assert all(name.startswith("bcrypt-pool") for name in calls)


# -- the registry ------------------------------------------------------------------------------


def test_requests_without_credentials_get_a_basic_challenge_and_an_oci_error(basic):
    with basic.client() as http:
        response = http.get("/v2/")
        assert_refused(response, 401, "UNAUTHORIZED")
        assert response.headers["www-authenticate"] == 'Basic realm="Test Realm"'
        head = http.head("/v2/team/app/manifests/latest")
        assert head.status_code == 401 and head.headers["www-authenticate"].startswith("Basic ")


@pytest.mark.parametrize(
    "auth",
    [("alice", "wrong"), ("nobody", "alice-Secret-1"), ("alice", ""), ("", "alice-Secret-1")],
    ids=["wrong-password", "unknown-user", "empty-password", "empty-user"],
)
def test_wrong_credentials_are_refused_with_a_challenge(basic, auth):
    with basic.client(auth=auth) as http:
        response = http.get("/v2/")
    assert_refused(response, 401, "UNAUTHORIZED")
    assert response.headers["www-authenticate"] == 'Basic realm="Test Realm"'


@pytest.mark.parametrize("value", ["Basic", "Basic !!!notbase64", "Basic " + base64.b64encode(b"nocolon").decode()])
def test_malformed_basic_headers_are_refused(basic, value):
    with basic.client() as http:
        response = http.get("/v2/", headers={"Authorization": value})
    assert_refused(response, 401, "UNAUTHORIZED")


def test_right_credentials_are_accepted_even_with_a_colon_in_the_password(basic):
    for user, password in USERS.items():
        with basic.client(auth=(user, password)) as http:
            assert http.get("/v2/").status_code == 200
            assert http.get("/v2/_catalog").status_code == 200


def test_htpasswd_changes_apply_without_a_restart(basic):
    with basic.client(auth=("grace", "grace-pw")) as http:
        assert http.get("/v2/").status_code == 401
        make_users(basic.users_file, {"grace": "grace-pw"})
        wait_until(lambda: http.get("/v2/").status_code == 200, timeout=10, what="the new user to be accepted")
        wharf_cli("htpasswd", "remove", str(basic.users_file), "grace")
        wait_until(lambda: http.get("/v2/").status_code == 401, timeout=10, what="the removed user to be refused")


def test_plain_http_with_auth_refuses_to_start_unless_allowed(tmp_path):
    users = make_users(tmp_path / "htpasswd", {"alice": "pw"})
    process = SecureWharf(tmp_path / "wharf", auth={"htpasswd": {"path": str(users)}})
    result = wharf_cli("serve", str(process.config_path), check=False)
    assert result.returncode == 2
    assert "credentials would be sent in clear" in result.stderr


def test_a_missing_htpasswd_file_stops_start_up_with_a_message(tmp_path):
    process = SecureWharf(
        tmp_path / "wharf", http={"insecure": True}, auth={"htpasswd": {"path": str(tmp_path / "missing")}}
    )
    result = wharf_cli("serve", str(process.config_path), check=False)
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_repeated_failures_from_one_address_get_429_until_the_back_off_ends(tmp_path):
    users = make_users(tmp_path / "htpasswd", {"alice": "pw"})
    with SecureWharf(
        tmp_path / "wharf",
        http={"insecure": True},
        auth={"htpasswd": {"path": str(users)}},
        ratelimit={"authfailures": {"peraddress": 3, "peruser": 0, "window": "30s", "backoff": "1s"}},
    ) as process:
        with process.client(auth=("alice", "wrong")) as wrong, process.client(auth=("alice", "pw")) as right:
            for _ in range(3):
                assert_refused(wrong.get("/v2/"), 401, "UNAUTHORIZED")
            throttled = right.get("/v2/")
            assert_refused(throttled, 429, "TOOMANYREQUESTS")
            assert 1 <= int(throttled.headers["retry-after"]) <= 2
            wait_until(lambda: right.get("/v2/").status_code == 200, timeout=10, what="the back-off to end")


def test_behind_a_trusted_proxy_the_failures_of_one_client_block_that_client_only(tmp_path):
    """Every client reaches Wharf from the load balancer's address; its X-Forwarded-For names them."""
    users = make_users(tmp_path / "htpasswd", {"alice": "pw"})
    with SecureWharf(
        tmp_path / "wharf",
        http={"insecure": True, "trustedproxies": ["127.0.0.1", "10.9.0.0/16"]},
        auth={"htpasswd": {"path": str(users)}},
        ratelimit={"authfailures": {"peraddress": 3, "peruser": 0, "window": "30s", "backoff": "30s"}},
    ) as process:
        with process.client(auth=("alice", "wrong")) as wrong, process.client(auth=("alice", "pw")) as right:
            for _ in range(3):  # through two proxies: the rightmost address no proxy of ours holds
                response = wrong.get("/v2/", headers={"X-Forwarded-For": "203.0.113.7, 10.9.1.1"})
                assert_refused(response, 401, "UNAUTHORIZED")
            assert_refused(wrong.get("/v2/", headers={"X-Forwarded-For": "203.0.113.7"}), 429, "TOOMANYREQUESTS")
            # Another client behind the same balancer signs in; the blocked one stays blocked.
            assert right.get("/v2/", headers={"X-Forwarded-For": "198.51.100.2"}).status_code == 200
            assert_refused(right.get("/v2/", headers={"X-Forwarded-For": "203.0.113.7"}), 429, "TOOMANYREQUESTS")
            # Forged entries left of the client's do not move it: the blocked client stays blocked.
            forged = right.get("/v2/", headers={"X-Forwarded-For": "198.51.100.99, 203.0.113.7"})
            assert_refused(forged, 429, "TOOMANYREQUESTS")
        # The access log names the client too.
        assert re.search(r'remote"?[=:] ?"?203\.0\.113\.7\b', process.log_text())


def test_x_forwarded_for_from_a_peer_that_is_not_a_trusted_proxy_is_not_believed(tmp_path):
    users = make_users(tmp_path / "htpasswd", {"alice": "pw"})
    with SecureWharf(
        tmp_path / "wharf",
        http={"insecure": True, "trustedproxies": ["10.9.0.0/16"]},  # not the tests' 127.0.0.1
        auth={"htpasswd": {"path": str(users)}},
        ratelimit={"authfailures": {"peraddress": 3, "peruser": 0, "window": "30s", "backoff": "30s"}},
    ) as process:
        with process.client(auth=("alice", "wrong")) as wrong:
            for n in range(3):  # a new address each time: were it believed, nothing would be blocked
                response = wrong.get("/v2/", headers={"X-Forwarded-For": f"203.0.113.{n}"})
                assert_refused(response, 401, "UNAUTHORIZED")
            assert_refused(wrong.get("/v2/", headers={"X-Forwarded-For": "203.0.113.9"}), 429, "TOOMANYREQUESTS")


def test_repeated_failures_for_one_user_block_that_user_only(tmp_path):
    users = make_users(tmp_path / "htpasswd", {"alice": "pw", "bob": "pw"})
    with SecureWharf(
        tmp_path / "wharf",
        http={"insecure": True},
        auth={"htpasswd": {"path": str(users)}},
        ratelimit={"authfailures": {"peraddress": 0, "peruser": 2, "window": "30s", "backoff": "1s"}},
    ) as process:
        with process.client(auth=("alice", "wrong")) as wrong:
            for _ in range(2):
                assert wrong.get("/v2/").status_code == 401
        with process.client(auth=("alice", "pw")) as alice, process.client(auth=("bob", "pw")) as bob:
            assert_refused(alice.get("/v2/"), 429, "TOOMANYREQUESTS")
            assert bob.get("/v2/").status_code == 200
            wait_until(lambda: alice.get("/v2/").status_code == 200, timeout=10, what="alice's back-off to end")


def test_registry2_environment_variables_set_up_tls_and_htpasswd(tmp_path):
    """The classic guide's variables, unchanged: TLS certificate and key, htpasswd realm and path."""
    cert, key = make_cert(tmp_path / "certs")
    (tmp_path / "auth").mkdir()
    users = make_users(tmp_path / "auth" / "htpasswd", {"alice": "pw"})
    env = {
        "REGISTRY_HTTP_TLS_CERTIFICATE": str(cert),
        "REGISTRY_HTTP_TLS_KEY": str(key),
        "REGISTRY_AUTH": "htpasswd",
        "REGISTRY_AUTH_HTPASSWD_REALM": "Registry Realm",
        "REGISTRY_AUTH_HTPASSWD_PATH": str(users),
    }
    with SecureWharf(tmp_path / "wharf", ca=cert, env=env) as process:
        with process.client() as http:
            response = http.get("/v2/")
            assert_refused(response, 401, "UNAUTHORIZED")
            assert response.headers["www-authenticate"] == 'Basic realm="Registry Realm"'
        with process.client(auth=("alice", "pw")) as http:
            assert http.get("/v2/").status_code == 200
        with process.client(auth=("alice", "pw"), http2=True) as http:
            response = http.get("/v2/")
            assert (response.status_code, response.http_version) == (200, "HTTP/2")
