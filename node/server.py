"""Listeners and the HTTP server: sockets bound once by `wharf serve`, then granian or hypercorn on them.

The main and debug sockets are bound here, in the `wharf serve` process, before any worker starts
and without SO_REUSEPORT: a port another process holds (a second `wharf serve`, registry:2, anything)
stops start-up with a message naming the address, and the worker processes of one `wharf serve`
share its one socket. Neither server is left to bind on its own: granian binds a socket per worker
with SO_REUSEPORT, which would let a second registry silently share the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import os
import signal
import socket
import ssl
import stat
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from granian._granian import SocketHolder
from granian.constants import HTTPModes, Interfaces, Loops, SSLProtocols
from granian.log import LogLevels
from granian.server import Server as GranianServer
from granian.server.embed import Server as EmbeddedGranian
from hypercorn.config import Config as _HypercornBase

from .config import Config, ListenAddress
from .logs import granian_log_config

log = logging.getLogger("wharf")

_BACKLOG = 1024


class ListenError(Exception):
    """A listener cannot be opened; the message names the key and the address."""


def bind(address: ListenAddress, key: str) -> socket.socket:
    """A listening socket for `address`, inheritable by worker processes; ListenError when it cannot be had."""
    if address.path:
        return _bind_unix(address, key)
    try:
        family, where = _resolve(address)
    except socket.gaierror as exc:
        raise ListenError(
            f"{key}: cannot listen on {address.text}: host {address.host} does not resolve ({exc.strerror})"
        ) from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR lets a restart bind over connections in TIME_WAIT; it never lets two listen.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and where[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as Go's [::] does
        sock.bind(where)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(_bind_failure(address, key, exc)) from None
    sock.set_inheritable(True)
    return sock


def _resolve(address: ListenAddress) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    if address.host in ("", "::"):
        return (
            (socket.AF_INET6, ("::", address.port))
            if socket.has_ipv6 and _ipv6_works()
            else (socket.AF_INET, ("0.0.0.0", address.port))
        )
    try:
        literal = ipaddress.ip_address(address.host)
    except ValueError:
        found = socket.getaddrinfo(address.host, address.port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        family, _, _, _, where = found[0]
        return family, where
    if literal.version == 6:
        return socket.AF_INET6, (address.host, address.port, 0, 0)
    return socket.AF_INET, (address.host, address.port)


def _ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _bind_failure(address: ListenAddress, key: str, exc: OSError) -> str:
    where = f"{key}: cannot listen on {address.text}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the address is already in use (another `wharf serve`, a registry or any other process listens there); stop it or choose another port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no interface of this machine has the address {address.host}"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return f"{where}: {exc.strerror or exc}"


def _bind_unix(address: ListenAddress, key: str) -> socket.socket:
    path = address.path
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise ListenError(f"{key}: cannot listen on {path}: it exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a socket nobody listens on: left by a process that died
            else:
                raise ListenError(f"{key}: cannot listen on {path}: another process listens there")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"{key}: cannot listen on {path}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def describe(sock: socket.socket, address: ListenAddress) -> str:
    """What the start-up line says about a bound listener."""
    if address.path:
        return address.describe()
    host = sock.getsockname()[0]
    if address.host in ("", "::") and sock.family == socket.AF_INET:
        return f"all IPv4 interfaces port {address.port} (no IPv6 here)"
    return address.describe() if address.host in ("", "::", "0.0.0.0") else f"{address.describe()} ({host})"


# -- the debug listener ----------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # scrapes are not access lines


class _DebugServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_debug(sock: socket.socket, app: Any) -> _DebugServer:
    """Serve a WSGI app (the metrics) on an already bound socket, in a thread."""
    server = _DebugServer(sock.getsockname()[:2], _QuietHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_name = "wharf-debug"
    server.server_port = sock.getsockname()[1]
    server.setup_environ()
    server.set_app(app)
    threading.Thread(target=server.serve_forever, name="wharf-debug", daemon=True).start()
    return server


# -- the HTTP servers ----------------------------------------------------------------------------


def client_ca_file(config: Config, directory: str) -> str | None:
    """`http.tls.clientcas` as one file (both servers take a single CA file)."""
    cas = config.http.tls.clientcas
    if not cas:
        return None
    if len(cas) == 1:
        return cas[0]
    combined = os.path.join(directory, "clientcas.pem")
    with open(combined, "wb") as out:
        for path in cas:
            out.write(Path(path).read_bytes().rstrip(b"\n") + b"\n")
    return combined


class _OnBoundSocket:
    """granian serving the socket `wharf serve` bound, instead of one SO_REUSEPORT socket per worker.

    granian has no public way to take a bound socket; this replaces the one step that makes its
    sockets (the path it takes on platforms without SO_REUSEPORT), so test_listeners.py guards it.
    """

    bound: socket.socket

    def _init_shared_socket(self) -> None:
        sock = self.bound
        self._ssp = None
        self._shd = SocketHolder(sock.fileno(), sock.family == socket.AF_UNIX, _BACKLOG)  # type: ignore[call-arg]
        self._sfd = sock.fileno()
        self._sso = sock

    def _drop_shared_socket(self) -> None:
        pass  # the socket is `wharf serve`'s; it closes with the process


class _GranianOnSocket(_OnBoundSocket, GranianServer):  # type: ignore[misc, valid-type]
    """granian's worker processes on the bound socket."""


class _EmbeddedOnSocket(_OnBoundSocket, EmbeddedGranian):  # type: ignore[misc, valid-type]
    """granian's one worker in this process, on its event loop, on the bound socket."""


def runtime_threads(workers: int) -> int:
    """granian's I/O threads per worker: the machine's cores shared among the workers.

    They move response bytes (a blob file's send reads and writes from them), so one thread per
    worker holds a blob pull to one core however many the machine has.
    """
    return max(1, len(os.sched_getaffinity(0)) // max(1, workers))


def granian_options(config: Config, sock: socket.socket, client_cas: str | None) -> dict[str, Any]:
    """granian's settings from the configuration: workers, HTTP/2, TLS, drain time, Wharf's log stream."""
    http = config.http
    listen = http.listen
    tls = http.tls
    options: dict[str, Any] = {
        "address": sock.getsockname()[0] if not listen.path else "127.0.0.1",
        "port": listen.port,
        "uds": Path(listen.path) if listen.path else None,
        "interface": Interfaces.ASGI,
        "workers": http.workers,
        "runtime_threads": runtime_threads(http.workers),
        "loop": Loops.uvloop,
        "http": HTTPModes.http1 if http.http2.disabled else HTTPModes.auto,
        "log_access": False,
        "log_dictconfig": granian_log_config(),
        "log_level": _GRANIAN_LEVELS.get(config.log.level, LogLevels.info),
        "ssl_cert": Path(tls.certificate) if tls.certificate else None,
        "ssl_key": Path(tls.key) if tls.key else None,
        "ssl_protocol_min": SSLProtocols.tls13 if tls.minimumtls == "tls1.3" else SSLProtocols.tls12,
        "ssl_ca": Path(client_cas) if client_cas else None,
        "ssl_client_verify": client_cas is not None,
    }
    if http.draintimeout is not None:
        options["workers_kill_timeout"] = max(1, math.ceil(http.draintimeout))
    return options


def run_granian(config: Config, sock: socket.socket, client_cas: str | None, target: str) -> int:
    """granian's workers on `sock`, each building its app by calling `target` (module:function)."""
    server = _GranianOnSocket(target, factory=True, **granian_options(config, sock, client_cas))
    server.bound = sock
    server.serve()
    return 0


def _embedded_warning(record: logging.LogRecord) -> bool:
    """Drop granian's start-up warning that its embedded server is experimental: Wharf runs one
    worker that way on purpose (the listener, drain and metrics tests cover it), and the line would
    send operators looking for a problem."""
    return record.getMessage() != "Embedded server is experimental!"


async def serve_granian_here(config: Config, sock: socket.socket, client_cas: str | None, app: Any) -> None:
    """One granian worker serving `app` in this process, on the running loop, until SIGINT or SIGTERM.

    No second process: a supervisor holding its own copy of the interpreter, boto3 and the rest
    would double a one-worker node's memory (issue 13: all processes of a node within 100 MiB).
    """
    options = granian_options(config, sock, client_cas)
    kill_timeout = options.pop("workers_kill_timeout", None)
    del options["workers"], options["loop"]  # one worker, on the loop this runs on
    server = _EmbeddedOnSocket(app, **options)  # configures granian's loggers
    logging.getLogger("_granian").addFilter(_embedded_warning)
    server.bound = sock
    server.workers_kill_timeout = kill_timeout
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)
    with contextlib.suppress(TimeoutError):  # the drain time ran out: the worker was stopped
        await server.serve()


_GRANIAN_LEVELS = {"error": LogLevels.error, "warn": LogLevels.warning, "debug": LogLevels.debug}


class HypercornConfig(_HypercornBase):  # type: ignore[misc]
    """Hypercorn's configuration with `http.tls.minimumtls` (Hypercorn itself fixes TLS 1.2)."""

    minimum_tls = ssl.TLSVersion.TLSv1_2

    def create_ssl_context(self) -> ssl.SSLContext | None:
        context = super().create_ssl_context()
        if context is not None:
            context.minimum_version = self.minimum_tls
        return context


def hypercorn_config(config: Config, sock: socket.socket, client_cas: str | None) -> HypercornConfig:
    """Hypercorn on the bound socket (`fd://`), its own messages in Wharf's log stream."""
    http = config.http
    hconfig = HypercornConfig()
    hconfig.bind = [f"fd://{sock.fileno()}"]
    hconfig.workers = http.workers
    hconfig.worker_class = "uvloop"
    hconfig.accesslog = None
    hconfig.errorlog = logging.getLogger("hypercorn.error")
    hconfig.keep_alive_timeout = 75
    # Blob uploads are streamed; do not let the server cap request bodies.
    hconfig.h11_max_incomplete_size = 64 * 1024
    if http.draintimeout is not None:
        hconfig.graceful_timeout = http.draintimeout
    if http.http2.disabled:
        hconfig.alpn_protocols = ["http/1.1"]
    if http.tls.certificate:
        hconfig.certfile = http.tls.certificate
        hconfig.keyfile = http.tls.key
        hconfig.minimum_tls = ssl.TLSVersion.TLSv1_3 if http.tls.minimumtls == "tls1.3" else ssl.TLSVersion.TLSv1_2
        if client_cas:
            hconfig.ca_certs = client_cas
            hconfig.verify_mode = ssl.CERT_REQUIRED
    return hconfig
