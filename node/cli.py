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

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

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
    if config.source is None:
        print(
            '{"level":"warning","msg":"no configuration file: serving on defaults (embedded coordinator, '
            'filesystem storage under ./wharf-data, no authentication)"}',
            flush=True,
        )
    os.environ["WHARF_CONFIG"] = config.source or ""
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
