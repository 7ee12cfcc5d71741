"""The `wharf` command: serve the registry."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from . import admin, audit_cli
from .config import Config, ConfigError, load
from .metrics import MULTIPROC_ENV

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
    if not addr:
        return
    if registry is None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    host, port = _split_addr(addr)
    try:
        start_http_server(port, host, registry=registry)
    except OSError as exc:
        # Metrics matter less than serving images: say so loudly and go on.
        log.error("debug listener on %s failed: %s", addr, exc)


def serve(config: Config) -> int:
    from .auth.services import check_security
    from .tls import check_listener

    check_listener(config)
    check_security(config)
    if config.source is None:
        print(
            '{"level":"warning","msg":"no configuration file: serving on defaults (embedded coordinator, '
            'filesystem storage under ./wharf-data, no authentication)"}',
            flush=True,
        )
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

    from .accesslog import configure_logging
    from .app import create_app

    listener = configure_logging(config.log.level)
    app = create_app(config)
    _start_debug_listener(config, app.state.metrics.registry)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await hypercorn_serve(app, hconfig, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    try:
        uvloop.run(main())
    finally:
        listener.stop()
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
    audit_cli.add_commands(commands)
    args = parser.parse_args(argv)
    if hasattr(args, "run"):
        try:
            config = load(getattr(args, "config", None) or os.environ.get("REGISTRY_CONFIGURATION_PATH") or None)
        except ConfigError as exc:
            print(f"wharf: {exc}", file=sys.stderr)
            return 2
        return int(args.run(args, config))
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
