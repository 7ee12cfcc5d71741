"""The `wharf` command: serve the registry."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from .config import Config, ConfigError, load

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


def serve(config: Config) -> int:
    if config.source is None:
        print(
            '{"level":"warning","msg":"no configuration file: serving on defaults (embedded coordinator, '
            'filesystem storage under ./wharf-data, no authentication)"}',
            flush=True,
        )
    os.environ["WHARF_CONFIG"] = config.source or ""
    if config.http.server == "granian":
        return _serve_granian(config)
    hconfig = _hypercorn_config(config)
    if config.http.workers > 1:
        from hypercorn.run import run

        hconfig.application_path = "node.asgi:app"
        return run(hconfig)
    import uvloop
    from hypercorn.asyncio import serve as hypercorn_serve

    from .accesslog import configure_logging
    from .app import create_app

    listener = configure_logging(config.log.level)
    app = create_app(config)

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
        ssl_cert=config.http.tls.certificate or None,  # type: ignore[arg-type]
        ssl_key=config.http.tls.key or None,  # type: ignore[arg-type]
    )
    server.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wharf", description="Wharf container registry")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run a registry node")
    serve_cmd.add_argument("config", nargs="?", help="configuration file (Distribution config.yml superset)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            config = load(args.config or os.environ.get("REGISTRY_CONFIGURATION_PATH") or None)
        except ConfigError as exc:
            print(f"wharf: {exc}", file=sys.stderr)
            return 2
        return serve(config)
    return 2


if __name__ == "__main__":
    sys.exit(main())
