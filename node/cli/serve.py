"""`wharf serve`: check everything, bind the listeners, open the store, then run the server."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from coordinator.metadata import ImportState, Metadata

from .. import asgi, server
from ..audit import AuditLog
from ..auth.services import AuthServices
from ..config import Config
from ..health import HealthChecks, failing_in
from ..logs import configure_logging
from ..metrics import MULTIPROC_ENV, StorageFigures, debug_app
from ..storage import layout
from ..store import StoreRefused, describe_coordinator, describe_storage, open_store
from ..tls import check_certificates, check_listener
from .registry import Commands, load_config

log = logging.getLogger("wharf")


def add_commands(commands: Commands) -> None:
    cmd = commands.add_parser("serve", help="run a registry node")
    cmd.add_argument("config", nargs="?", help="configuration file (Distribution config.yml superset)")
    cmd.set_defaults(run=lambda args: serve(load_config(args)))


@dataclass
class _Listeners:
    """The sockets `wharf serve` binds before anything else: a busy port stops it at once."""

    main: socket.socket
    debug: socket.socket | None

    @classmethod
    def bind(cls, config: Config) -> _Listeners:
        main = server.bind(config.http.listen, "http.addr")
        debug = None
        if config.http.debug.listen is not None:
            try:
                debug = server.bind(config.http.debug.listen, "http.debug.addr")
            except server.ListenError as exc:
                if config.http.debug.given:
                    main.close()
                    raise
                # Only Wharf's default, which registry:2 does not have (a second registry on the
                # host, say): serve as registry:2 would, without the debug listener, and say so.
                config.warnings.append(
                    f"{exc}; serving without a debug listener (no metrics): set http.debug.addr to a free "
                    "address to have one, or to '' to stop this warning"
                )
        return cls(main, debug)


def serve(config: Config) -> int:
    """Check everything, bind the listeners, open the store, then run the server: a refusal at any
    step is one line on stderr and exit status 2, before a worker starts or a port is answered."""
    check_listener(config)
    check_certificates(config)
    _check_security(config)
    listeners = _Listeners.bind(config)
    listener = configure_logging(config.log)
    try:
        try:
            store = asyncio.run(_prepare_store(config))
        except (StoreRefused, _StoreUnusable) as exc:
            print(f"wharf: {exc}", file=sys.stderr)
            return 2
        _log_startup(config, store, listeners)
        return _run_server(config, listeners)
    finally:
        listener.stop()


def _check_security(config: Config) -> None:
    """Open the audit log and build authentication once, then drop them, so a missing file or a bad
    key stops `wharf serve` (ConfigError) before any worker starts, rather than in every worker."""
    audit = AuditLog.open(config.audit)
    try:
        AuthServices.build(config).close()
    finally:
        if audit is not None:
            audit.close()


class _StoreUnusable(Exception):
    """The storage or the coordinator cannot be opened or written."""


async def _prepare_store(config: Config) -> dict[str, object]:
    """Open the store once before any worker starts: refuse a mismatch, claim or adopt a new one."""
    if config.storage.filesystem is not None:
        _check_writable(config.storage.filesystem.rootdirectory)
    try:
        store = await open_store(config, "serve")
    except StoreRefused:
        raise
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise _StoreUnusable(
            f"cannot open the store ({describe_storage(config)}, coordinator {describe_coordinator(config)}): {reason}"
        ) from None
    try:
        metadata = Metadata(store.kv)
        found = await metadata.import_state()
        handed_over = await metadata.handed_over()
        if handed_over is not None and (found is None or found.state == "done"):
            # registry:2 may have served the store since `wharf export`: the leader imports its tree
            # again, taking what registry:2 changed since (node/importer.py, `_since_handover`).
            found = ImportState("pending", requested=time.time())
            await metadata.set_import_state(found)
        state = found.state if found is not None else None
        return {
            "identity": store.identity.id if store.identity else None,
            "found": store.found,
            "import": state,
            "handed_over": handed_over,
        }
    finally:
        await store.close()


def _check_writable(root: str) -> None:
    """The filesystem root and the folders Wharf writes in it accept writes, before anything is served."""
    key = "storage.filesystem.rootdirectory"
    try:
        os.makedirs(os.path.join(root, layout.WHARF_DIR), exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=os.path.join(root, layout.WHARF_DIR))
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            raise _StoreUnusable(f"{key}: expected a directory, got {root!r}, which is under or is a file") from None
        raise _StoreUnusable(
            f"{key}: cannot write to {exc.filename or root} ({exc.strerror or exc}); give the user running "
            f"wharf (uid {os.getuid()}) write access to {root}, or choose another directory"
        ) from None
    for folder in (root, *(os.path.join(root, layout.ROOT, part) for part in ("", "blobs", "repositories"))):
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise _StoreUnusable(
                f"{key}: cannot write to {os.path.normpath(folder)} (permission denied); give the user running "
                f"wharf (uid {os.getuid()}) write access to {root}, or choose another directory"
            )


def _log_startup(config: Config, store: dict[str, object], listeners: _Listeners) -> None:
    """What this node serves and how, in one line an operator can trust."""
    auth = config.auth.mode or "none"
    if config.auth.token is not None and config.auth.token.signingkey:
        auth = "token (built-in token service)"
    listen = server.describe(listeners.main, config.http.listen)
    debug = config.http.debug
    fields = {
        "listen": listen,
        "addr": config.http.addr,
        "tls": config.http.tls.certificate or "off",
        "auth": auth,
        "storage": describe_storage(config),
        "coordinator": describe_coordinator(config),
        "store": store["identity"],
        "store_found": store["found"],
        "import": store["import"] or "none",
        "metrics": (
            f"{server.describe(listeners.debug, debug.listen)} {debug.prometheus.path}"
            if listeners.debug is not None and debug.listen is not None
            else "off"
        ),
        "config": config.source or "none (defaults)",
        "server": f"{config.http.server}, {config.http.workers} worker(s)"
        + (" (auto)" if config.http.workers_auto else ""),
    }
    log.info(
        "wharf serving %s on %s (%s, auth %s) with %s and %s",
        store["identity"],
        listen,
        "TLS" if config.http.tls.certificate else "plain HTTP",
        auth,
        fields["storage"],
        fields["coordinator"],
        extra={"fields": fields},
    )
    for note in config.accepted_without_effect():
        log.info(note)
    for variable in config.ignored_variables:  # the name only: a value may be a secret
        log.warning("%s names no configuration key: ignored, as registry:2 ignores it", variable)
    for warning in config.warnings:
        log.warning("%s", warning)
    handed_over = store.get("handed_over")
    if isinstance(handed_over, float):
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(handed_over))
        log.warning(
            "this store was written back in registry:2's layout by `wharf export` at %s: importing its "
            "registry:2 tree again, so that what registry:2 changed since (tags pushed, moved or deleted) "
            "is taken in; until that import is done, those changes are not served",
            when,
        )
    if config.source is None:
        log.warning(
            "no configuration file: serving on defaults (%s, %s, auth %s)",
            fields["storage"],
            fields["coordinator"],
            auth,
        )
    if store["import"] in ("pending", "running"):
        log.warning(
            "adopting a registry:2 store: its repositories appear as the import records them; "
            "`wharf import --status CONFIG` shows progress"
        )
    embedded = config.coordinator.embedded
    fs = config.storage.filesystem
    if embedded is not None and fs is not None and not embedded.path.startswith(fs.rootdirectory + os.sep):
        log.warning(
            "coordinator.embedded.path %s is outside the storage root %s: a copy or backup of the root "
            "alone will not carry the tags",
            embedded.path,
            fs.rootdirectory,
        )


def _run_server(config: Config, listeners: _Listeners) -> int:
    os.environ[asgi.CONFIG_ENV] = config.source or ""
    os.environ[asgi.SERVE_PID_ENV] = str(os.getpid())
    private = tempfile.mkdtemp(prefix="wharf-serve-")
    try:
        client_cas = server.client_ca_file(config, private)
        if config.http.workers > 1:
            # Workers are separate processes: they share their figures through a directory and
            # this process answers scrapes for all of them.
            multiproc = os.path.join(private, "metrics")
            os.mkdir(multiproc)
            os.environ[MULTIPROC_ENV] = multiproc
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            registry.register(StorageFigures(multiproc))
            if listeners.debug is not None:
                server.serve_debug(listeners.debug, _debug_app(config, registry, lambda: failing_in(multiproc)))
            if config.http.server == "granian":
                return server.run_granian(config, listeners.main, client_cas, asgi.GRANIAN_TARGET)
            from hypercorn.run import run

            hconfig = server.hypercorn_config(config, listeners.main, client_cas)
            hconfig.application_path = asgi.HYPERCORN_PATH
            return run(hconfig)
        return _serve_here(config, listeners, client_cas)
    finally:
        shutil.rmtree(private, ignore_errors=True)
        if config.http.listen.path:
            with contextlib.suppress(OSError):
                os.unlink(config.http.listen.path)  # the socket file this process made


def _debug_app(config: Config, registry: CollectorRegistry, health: Callable[[], dict[str, str]]) -> object:
    prometheus = config.http.debug.prometheus
    return debug_app(registry, prometheus.path, metrics=prometheus.enabled, health=health)


def _serve_here(config: Config, listeners: _Listeners, client_cas: str | None) -> int:
    """One worker in this process (no worker processes to share figures with): the one process is
    the whole node, so one worker costs one interpreter's memory, not two."""
    import uvloop
    from hypercorn.asyncio import serve as hypercorn_serve

    from ..app import create_app

    app = create_app(config, serving=True)
    if listeners.debug is not None:

        def failing() -> dict[str, str]:
            checks: HealthChecks | None = getattr(app.state, "health", None)  # made as the app starts
            return checks.failing() if checks is not None else {}

        server.serve_debug(listeners.debug, _debug_app(config, app.state.metrics.registry, failing))

    async def main() -> None:
        if config.http.server == "granian":
            await server.serve_granian_here(config, listeners.main, client_cas, app)
            return
        hconfig = server.hypercorn_config(config, listeners.main, client_cas)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await hypercorn_serve(app, hconfig, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    uvloop.run(main())
    return 0
