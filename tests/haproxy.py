"""Debian's HAProxy in front of Wharf nodes, for cluster tests: round robin, readiness checks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from services import free_port, wait_until

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

_CONFIG = """
global
    maxconn 2048

defaults
    mode http
    timeout connect 2s
    timeout client 5m
    timeout server 5m
    option http-server-close

frontend registry
    bind 127.0.0.1:{port}
    default_backend wharf

backend wharf
    balance roundrobin
    option httpchk GET /debug/ready
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
    retry-on conn-failure empty-response
    retries 2
    option redispatch 1
{servers}
"""


class HAProxy:
    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="wharf-haproxy-"))
        servers = "\n".join(f"    server node{i} {host}:{port} check" for i, (host, port) in enumerate(backends))
        self.config = self.dir / "haproxy.cfg"
        self.config.write_text(_CONFIG.format(port=self.port, servers=servers))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> HAProxy:
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy config refused: {check.stdout}{check.stderr}")
        log = open(self.dir / "haproxy.log", "wb")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._listening, timeout=15, what="haproxy to listen")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError((self.dir / "haproxy.log").read_text())
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
