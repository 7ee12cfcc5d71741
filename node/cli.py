"""The `wharf` command: serve the registry."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from coordinator import keys

from . import admin, audit_cli, backup, notifications, readonly, signing
from .config import Config, ConfigError, load
from .metrics import MULTIPROC_ENV, serve_debug_listener
from .store import StoreRefused, describe_coordinator, describe_storage, open_store

log = logging.getLogger("wharf")


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def _hypercorn_config(config: Config):  # type: ignore[no-untyped-def]
    from hypercorn.config import Config as HypercornConfig

    hconfig = HypercornConfig()
    hconfig.bind = [config.http.addr]
    hconfig.workers = config.http.workers
    hconfig.worker_class = "uvloop"
    hconfig.accesslog = None
    # Hypercorn's own messages go through the JSON log like everything else.
    hconfig.errorlog = logging.getLogger("hypercorn.error")
    hconfig.keep_alive_timeout = 75
    # Blob uploads are streamed; do not let the server cap request bodies.
    hconfig.h11_max_incomplete_size = 64 * 1024
    if config.http.tls.certificate:
        hconfig.certfile = config.http.tls.certificate
        hconfig.keyfile = config.http.tls.key
    return hconfig


def _start_debug_listener(config: Config, registry: CollectorRegistry | None) -> None:
    """Prometheus metrics on `http.debug.addr` (like Distribution's :5001), in a thread."""
    addr = config.http.debug.addr
    if not addr or not config.http.debug.prometheus.enabled:
        return
    if registry is None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    host, port = _split_addr(addr)
    try:
        serve_debug_listener(host, port, registry, config.http.debug.prometheus.path)
    except OSError as exc:
        # Metrics matter less than serving images: say so loudly and go on.
        log.error("debug listener on %s failed: %s", addr, exc)


def serve(config: Config) -> int:
    from .accesslog import configure_logging
    from .auth.services import check_security
    from .tls import check_listener

    check_listener(config)
    check_security(config)
    listener = configure_logging(config.log.level)
    try:
        try:
            store = asyncio.run(_prepare_store(config))
        except StoreRefused as exc:
            log.error("refusing to start: %s", exc)
            print(f"wharf: {exc}", file=sys.stderr)
            return 2
        _log_startup(config, store)
        return _run_server(config)
    finally:
        listener.stop()


async def _prepare_store(config: Config) -> dict[str, object]:
    """Open the store once before any worker starts: refuse a mismatch, claim or adopt a new one."""
    store = await open_store(config, "serve")
    try:
        found = await store.kv.get(keys.IMPORT_STATE)
        state = json.loads(found.value).get("state") if found else None
        return {"identity": store.identity.id if store.identity else None, "found": store.found, "import": state}
    finally:
        await store.close()


def _log_startup(config: Config, store: dict[str, object]) -> None:
    """What this node serves and how, in one line an operator can trust."""
    host, port = _split_addr(config.http.addr)
    auth = config.auth.mode or "none"
    if config.auth.token is not None and config.auth.token.signingkey:
        auth = "token (built-in token service)"
    fields = {
        "listen": f"{host}:{port}",
        "tls": config.http.tls.certificate or "off",
        "auth": auth,
        "storage": describe_storage(config),
        "coordinator": describe_coordinator(config),
        "store": store["identity"],
        "store_found": store["found"],
        "import": store["import"] or "none",
        "metrics": (config.http.debug.addr + config.http.debug.prometheus.path)
        if config.http.debug.addr and config.http.debug.prometheus.enabled
        else "off",
        "config": config.source or "none (defaults)",
        "server": f"{config.http.server}, {config.http.workers} worker(s)",
    }
    log.info(
        "wharf serving %s on %s (%s, auth %s) with %s and %s",
        store["identity"],
        fields["listen"],
        "TLS" if config.http.tls.certificate else "plain HTTP",
        auth,
        fields["storage"],
        fields["coordinator"],
        extra={"fields": fields},
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


def _run_server(config: Config) -> int:
    os.environ["WHARF_CONFIG"] = config.source or ""
    os.environ["WHARF_SERVE_PID"] = str(os.getpid())
    if config.http.server == "granian" or config.http.workers > 1:
        # Workers are separate processes: they share their figures through a directory and
        # this process answers scrapes for all of them.
        multiproc = tempfile.mkdtemp(prefix="wharf-metrics-")
        os.environ[MULTIPROC_ENV] = multiproc
        try:
            _start_debug_listener(config, None)
            if config.http.server == "granian":
                return _serve_granian(config)
            from hypercorn.run import run

            hconfig = _hypercorn_config(config)
            hconfig.application_path = "node.asgi:app"
            return run(hconfig)
        finally:
            shutil.rmtree(multiproc, ignore_errors=True)
    hconfig = _hypercorn_config(config)
    import uvloop
    from hypercorn.asyncio import serve as hypercorn_serve

    from .app import create_app

    app = create_app(config)
    _start_debug_listener(config, app.state.metrics.registry)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await hypercorn_serve(app, hconfig, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    uvloop.run(main())
    return 0


def _serve_granian(config: Config) -> int:
    from granian.constants import Interfaces, Loops
    from granian.server import Server

    host, port = _split_addr(config.http.addr)
    server = Server(
        "node.asgi:app",
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=config.http.workers,
        loop=Loops.uvloop,
        log_access=False,
        ssl_cert=Path(config.http.tls.certificate) if config.http.tls.certificate else None,
        ssl_key=Path(config.http.tls.key) if config.http.tls.key else None,
    )
    server.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wharf", description="Wharf container registry")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run a registry node")
    serve_cmd.add_argument("config", nargs="?", help="configuration file (Distribution config.yml superset)")
    _add_htpasswd_parser(commands)
    _add_cert_parser(commands)
    admin.add_commands(commands)
    backup.add_commands(commands)
    audit_cli.add_commands(commands)
    readonly.add_commands(commands)
    notifications.add_commands(commands)
    signing.add_commands(commands)
    args = parser.parse_args(argv)
    if hasattr(args, "signing"):
        return signing.run(args)  # registry clients: no configuration file
    if hasattr(args, "run"):
        try:
            config = load(getattr(args, "config", None) or os.environ.get("REGISTRY_CONFIGURATION_PATH") or None)
        except ConfigError as exc:
            print(f"wharf: {exc}", file=sys.stderr)
            return 2
        try:
            return int(args.run(args, config))
        except StoreRefused as exc:
            print(f"wharf: {exc}", file=sys.stderr)
            return 2
    if args.command == "serve":
        try:
            config = load(args.config or os.environ.get("REGISTRY_CONFIGURATION_PATH") or None)
            return serve(config)
        except ConfigError as exc:
            print(f"wharf: {exc}", file=sys.stderr)
            return 2
    if args.command == "htpasswd":
        return _htpasswd(args)
    if args.command == "cert":
        return _cert(args)
    return 2


def _add_htpasswd_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    htpasswd = commands.add_parser("htpasswd", help="manage users in an htpasswd file (bcrypt)")
    actions = htpasswd.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a user or change its password")
    add.add_argument("file")
    add.add_argument("user")
    add.add_argument("password", nargs="?", help="the password (default: prompt, or one line from stdin)")
    add.add_argument("--cost", type=int, default=10, help="bcrypt cost, 4-31 (default 10)")
    remove = actions.add_parser("remove", help="remove a user")
    remove.add_argument("file")
    remove.add_argument("user")
    listing = actions.add_parser("list", help="list user names")
    listing.add_argument("file")


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    password = getpass.getpass("New password: ")
    if getpass.getpass("Re-type new password: ") != password:
        raise ValueError("the passwords do not match")
    return password


def _htpasswd(args: argparse.Namespace) -> int:
    from .auth import htpasswd

    try:
        if args.action == "add":
            if not 4 <= args.cost <= 31:
                raise ValueError("--cost must be between 4 and 31")
            password = args.password if args.password is not None else _read_password()
            created = htpasswd.set_password(args.file, args.user, password, args.cost)
            print(f"{'Adding' if created else 'Updating'} password for user {args.user}", file=sys.stderr)
        elif args.action == "remove":
            if not htpasswd.remove_user(args.file, args.user):
                print(f"wharf: no user {args.user} in {args.file}", file=sys.stderr)
                return 1
            print(f"Deleting password for user {args.user}", file=sys.stderr)
        else:
            for user in htpasswd.list_users(args.file):
                print(user)
    except (OSError, ValueError) as exc:
        print(f"wharf: {exc}", file=sys.stderr)
        return 1
    return 0


def _add_cert_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cert = commands.add_parser("cert", help="make a self-signed TLS certificate and key for test set-ups")
    cert.add_argument("hosts", nargs="+", metavar="HOST", help="host names or IP addresses it is valid for")
    cert.add_argument("--dir", default="certs", help="where to write domain.crt and domain.key (default ./certs)")
    cert.add_argument("--days", type=int, default=365)
    cert.add_argument("--key-type", choices=["ec", "rsa"], default="ec")
    cert.add_argument("--force", action="store_true", help="replace existing files")


def _cert(args: argparse.Namespace) -> int:
    from .tls import write_certificate

    try:
        cert, key = write_certificate(args.dir, args.hosts, days=args.days, key_type=args.key_type, force=args.force)
    except (OSError, ValueError) as exc:
        print(f"wharf: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {cert} and {key}\n"
        f"serve with:  REGISTRY_HTTP_TLS_CERTIFICATE={cert} REGISTRY_HTTP_TLS_KEY={key} wharf serve\n"
        f"trust with:  cp {cert} /etc/docker/certs.d/{args.hosts[0]}:5000/ca.crt  "
        f"(skopeo: --dest-cert-dir / --src-cert-dir naming a directory holding it as ca.crt)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
