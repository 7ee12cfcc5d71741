"""Listeners: a busy port stops start-up naming the address; the workers of one `wharf serve` share one
socket; a port alone (`:5000`) means every interface and the start-up line says so."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from oci_client import OCIClient
from services import free_port, wait_until
from wharf_process import WharfProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVERS = [("granian", 2), ("hypercorn", 1), ("hypercorn", 2)]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


def _serve(config_path: Path, timeout: float = 20.0) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", str(config_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO_ROOT),
        env=_env(),
    )
    return result, time.monotonic() - started


def _listening_sockets(port: int) -> int:
    """How many sockets listen on 127.0.0.1:port (one per worker if each bound its own)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return sum(1 for line in table.readlines()[1:] if line.split()[1] == wanted and line.split()[3] == "0A")


@pytest.mark.parametrize("server, workers", SERVERS, ids=[f"{s}-{w}" for s, w in SERVERS])
def test_a_second_wharf_serve_on_a_busy_port_exits_while_the_first_answers_every_request(tmp_path, server, workers):
    http = {"server": server, "workers": workers}
    with WharfProcess(tmp_path / "first", http=http) as first:
        with httpx.Client(base_url=first.url, trust_env=False, timeout=10) as client:
            OCIClient(client).push_image("only/first", "v1")
        answers: list[int] = []
        wrong: list[str] = []
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=first.url, trust_env=False, timeout=10) as client:
                while not stop.is_set() and len(answers) < 100_000:
                    try:
                        response = client.get("/v2/_catalog")
                    except httpx.HTTPError as exc:  # a refused or reset connection is a missed request too
                        wrong.append(repr(exc))
                        continue
                    answers.append(response.status_code)
                    if response.status_code != 200 or response.json()["repositories"] != ["only/first"]:
                        wrong.append(f"{response.status_code} {response.text[:200]}")

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            second = WharfProcess(tmp_path / "second", port=first.port, http=http)
            result, seconds = _serve(second.config_path)
        finally:
            stop.set()
            thread.join(30)
        assert result.returncode != 0 and seconds < 20
        assert result.stderr.strip() == (
            f"wharf: http.addr: cannot listen on 127.0.0.1:{first.port}: the address is already in use "
            "(another `wharf serve`, a registry or any other process listens there); stop it or choose another port"
        )
        assert "Traceback" not in result.stdout + result.stderr
        assert answers and not wrong, wrong[:5]
        if server == "granian":
            assert _listening_sockets(first.port) == 1  # two workers, one socket
        with httpx.Client(base_url=first.url, trust_env=False, timeout=10) as client:
            assert client.get("/v2/_catalog").json()["repositories"] == ["only/first"]


@pytest.mark.parametrize("which", ["http.addr", "http.debug.addr"])
def test_a_port_another_program_holds_stops_start_up_naming_the_address(tmp_path, which):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        if which == "http.addr":
            process = WharfProcess(tmp_path / "node", port=busy)
        else:
            process = WharfProcess(tmp_path / "node", http={"debug": {"addr": f"127.0.0.1:{busy}"}})
        result, seconds = _serve(process.config_path)
    assert result.returncode == 2 and seconds < 20
    assert result.stderr.startswith(f"wharf: {which}: cannot listen on 127.0.0.1:{busy}: the address is already in use")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stdout
    # Nothing was left bound: the main port is free again.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", process.port))


def test_two_registry2_files_serve_side_by_side_without_naming_a_debug_listener(tmp_path):
    # registry:2 opens no debug port unless told to; Wharf's default one (127.0.0.1:5001) must not
    # keep a second registry on the host from starting. Here the port is held, as a first one would.
    with contextlib.ExitStack() as stack:
        holder = stack.enter_context(socket.socket())
        try:
            holder.bind(("127.0.0.1", 5001))
            holder.listen()
        except OSError:
            pass  # already held by something else: just as good
        port = free_port()
        data = tmp_path / "node"
        data.mkdir()
        config = data / "config.yml"
        config.write_text(
            f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {data / 'registry'}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        log = stack.enter_context(open(data / "wharf.log", "wb"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO_ROOT),
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=5) as client:

                def up() -> bool:
                    assert proc.poll() is None, (data / "wharf.log").read_text()
                    try:
                        return client.get("/v2/").status_code == 200
                    except httpx.HTTPError:
                        return False

                wait_until(up, timeout=30, what="wharf beside a held 127.0.0.1:5001")
        finally:
            proc.terminate()
            proc.wait(30)
    text = (data / "wharf.log").read_text()
    assert "cannot listen on 127.0.0.1:5001" in text and "serving without a debug listener" in text


def test_a_port_alone_listens_on_every_interface_and_the_start_up_line_says_so(tmp_path):
    port = free_port()
    with WharfProcess(tmp_path / "node", port=port, http={"addr": f":{port}"}) as node:
        for host in ("127.0.0.1", "[::1]"):
            with httpx.Client(trust_env=False, timeout=10) as client:
                assert client.get(f"http://{host}:{port}/v2/").status_code == 200
        entries = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
        line = next(e for e in entries if e["msg"].startswith("wharf serving"))
        assert f"on all interfaces (IPv4 and IPv6) port {port}" in line["msg"]
        assert line["listen"] == f"all interfaces (IPv4 and IPv6) port {port}"


def test_a_unix_socket_listener_serves_and_a_second_one_is_refused(tmp_path):
    path = tmp_path / "wharf.sock"
    node = WharfProcess(tmp_path / "node", http={"net": "unix", "addr": str(path)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve", str(node.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(REPO_ROOT),
        env=_env(),
    )
    try:
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, base_url="http://wharf", trust_env=False, timeout=5) as client:

            def up() -> bool:
                try:
                    return client.get("/v2/").status_code == 200
                except httpx.TransportError:
                    assert proc.poll() is None, "wharf exited"
                    return False

            wait_until(up, timeout=30, what="wharf on a unix socket")
            result, _ = _serve(WharfProcess(tmp_path / "second", http={"net": "unix", "addr": str(path)}).config_path)
            assert result.returncode == 2
            assert result.stderr.strip() == f"wharf: http.addr: cannot listen on {path}: another process listens there"
            assert client.get("/v2/").status_code == 200
    finally:
        proc.terminate()
        proc.wait(15)
