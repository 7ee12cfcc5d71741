"""`wharf serve` refuses what it cannot serve with one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from services import free_port
from wharf_process import default_config

REPO_ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


def serve(
    tmp_path: Path, sections: dict[str, Any] | None = None, *, text: str | None = None, user: int | None = None
) -> subprocess.CompletedProcess[str]:
    """`wharf serve CONFIG` on a registry:2-style file with `sections` merged in (or `text` as the file)."""
    config = default_config(tmp_path, free_port())
    for key, value in (sections or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = tmp_path / "config.yml"
    path.write_text(text if text is not None else yaml.safe_dump(config))
    path.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    command = [sys.executable, "-m", "node.cli", "serve", str(path)]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=str(REPO_ROOT), env=env)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *parts: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:], result.stdout[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("wharf: "), line
    for part in parts:
        assert part in line, (part, line)
    return line


def _root(tmp_path: Path) -> str:
    return str(tmp_path / "registry")


BAD_VALUES = [
    # The tracebacks the issue lists.
    ("port out of range", {"http": {"addr": "127.0.0.1:99999"}}, ["http.addr", "'127.0.0.1:99999'", "1 to 65535"]),
    ("port not a number", {"http": {"addr": "127.0.0.1:abc"}}, ["http.addr", "'127.0.0.1:abc'", "HOST:PORT"]),
    ("bad debug address", {"http": {"debug": {"addr": "nonsense"}}}, ["http.debug.addr", "'nonsense'", "HOST:PORT"]),
    ("debug port 0", {"http": {"debug": {"addr": "127.0.0.1:0"}}}, ["http.debug.addr", "'127.0.0.1:0'"]),
    ("invalid quota size", {"quotas": [{"repository": "a", "limit": "lots"}]}, ["quotas[0].limit", "'lots'", "10GiB"]),
    ("quota without a limit", {"quotas": [{"namespace": "team/"}]}, ["quotas[0].limit", "required"]),
    # Found by trying hostile values.
    ("IPv6 without brackets", {"http": {"addr": "::1:5000"}}, ["http.addr", "'::1:5000'", "brackets"]),
    ("address nobody has", {"http": {"addr": "192.0.2.123:5000"}}, ["http.addr", "192.0.2.123", "no interface"]),
    ("host that does not resolve", {"http": {"addr": "no-such-host.invalid:5000"}}, ["http.addr", "does not resolve"]),
    ("workers 0", {"http": {"workers": 0}}, ["http.workers", "got 0"]),
    ("unknown server", {"http": {"server": "uvicorn"}}, ["http.server", "'uvicorn'", "granian or hypercorn"]),
    ("log level", {"log": {"level": "loud"}}, ["log.level", "'loud'", "error, warn, info, debug"]),
    ("log formatter", {"log": {"formatter": "xml"}}, ["log.formatter", "'xml'", "json, text, logstash"]),
    ("header name", {"http": {"headers": {"Bad Header": ["x"]}}}, ["http.headers", "'Bad Header'"]),
    ("bare Distribution duration", {"http": {"draintimeout": 60}}, ["http.draintimeout", "got 60", "nanoseconds"]),
    ("negative duration", {"gc": {"interval": "-1h"}}, ["gc.interval", "'-1h'"]),
    ("immutability regex", {"immutability": [{"tags": ["v("]}]}, ["immutability[0].tags", "'v('"]),
    ("retention regex", {"retention": {"policies": [{"keeptags": ["("]}]}}, ["retention.policies[0].keeptags", "'('"]),
    ("access action", {"access": {"rules": [{"actions": ["fly"]}]}}, ["access.rules[0].actions", "fly"]),
    (
        "etcd endpoint",
        {"coordinator": {"etcd": {"endpoints": ["nowhere"]}}},
        ["coordinator.etcd.endpoints", "'nowhere'"],
    ),
    ("lease TTL", {"cluster": {"leasettl": 1}}, ["cluster.leasettl", "got 1"]),
    ("unknown key", {"http": {"adr": "1"}}, ["unknown configuration key http.adr", "did you mean http.addr"]),
    ("version", {"version": "2"}, ["version", "'2'", "0.1"]),
    ("proxy section", {"proxy": {"remoteurl": "https://registry-1.docker.io"}}, ["proxy:", "pull-through cache"]),
    ("schema1", {"compatibility": {"schema1": {"enabled": True}}}, ["compatibility.schema1.enabled", "schema1"]),
    (
        "TLS file missing",
        {"http": {"tls": {"certificate": "/nope.crt", "key": "/nope.key"}}},
        ["http.tls.certificate", "/nope.crt"],
    ),
    ("TLS key without certificate", {"http": {"tls": {"key": "/k.pem"}}}, ["http.tls.certificate", "together"]),
    ("obsolete TLS", {"http": {"tls": {"minimumtls": "tls1.0"}}}, ["http.tls.minimumtls", "'tls1.0'"]),
    ("audit size", {"audit": {"stdout": True, "maxsize": "10"}}, ["audit.maxsize", "'10'", "1KB"]),
]


@pytest.mark.parametrize("sections, parts", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_a_bad_value_is_one_clear_line_and_exit_2(tmp_path, sections, parts):
    assert_one_clear_line(serve(tmp_path, sections), *parts)


def test_a_root_under_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    result = serve(tmp_path, {"storage": {"filesystem": {"rootdirectory": str(tmp_path / "file" / "registry")}}})
    assert_one_clear_line(result, "storage.filesystem.rootdirectory", "expected a directory")


@pytest.fixture
def open_dir():
    """A directory every user may enter (pytest's own are private to their owner)."""
    path = Path(tempfile.mkdtemp(prefix="wharf-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_root_that_cannot_be_written_is_refused_before_listening(open_dir):
    root = open_dir / "registry"
    root.mkdir()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to run as another user")
        result = serve(open_dir, user=NOBODY)  # root-owned directory, mode 755: nobody may not write
    else:
        root.chmod(0o555)
        result = serve(open_dir)
    assert_one_clear_line(result, "storage.filesystem.rootdirectory", "cannot write to", str(root), "uid")
    assert "Listening" not in result.stdout


def test_a_yaml_syntax_error_is_one_line_naming_where(tmp_path):
    result = serve(tmp_path, text="http:\n  addr: [\n  debug: 1\n")
    assert_one_clear_line(result, "config.yml line", "not valid YAML")


def test_a_missing_file_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", str(tmp_path / "absent.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO_ROOT),
        env=env,
    )
    assert_one_clear_line(result, "cannot read configuration", "absent.yml", "No such file")
