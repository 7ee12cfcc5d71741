"""The app for servers that start worker processes and build it there (`node.asgi:worker_app`).

`wharf serve` loads and checks the configuration before any worker starts, then tells each worker
two things at the process boundary: the configuration file (CONFIG_ENV; the worker loads it as the
supervisor did, REGISTRY_* variables included) and the supervisor's pid (SERVE_PID_ENV), which a
worker must not outlive. Nothing happens at import: the server calls `worker_app()` in the worker.
"""

from __future__ import annotations

import ctypes
import os
import signal

from starlette.applications import Starlette

from .app import create_app
from .config import load
from .logs import configure_logging

CONFIG_ENV = "WHARF_CONFIG"
SERVE_PID_ENV = "WHARF_SERVE_PID"
# The application path each server is given: hypercorn evaluates it, granian calls it (factory).
HYPERCORN_PATH = "node.asgi:worker_app()"
GRANIAN_TARGET = "node.asgi:worker_app"

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: str | None) -> None:
    """A worker must not outlive `wharf serve`: an orphan would keep serving and keep leases."""
    if not parent:
        return
    try:
        # SIGKILL, not SIGTERM: a worker winding down gracefully would finish (and keep claims and
        # leases for) requests the dead node's clients are already retrying elsewhere.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: the supervisor has to stop the whole process group
    if os.getppid() != int(parent):
        os._exit(1)  # the parent died before the signal was armed


def worker_app() -> Starlette:
    """This worker's app, on the configuration `wharf serve` checked."""
    _die_with_parent(os.environ.get(SERVE_PID_ENV))
    config = load(os.environ.get(CONFIG_ENV) or None)
    listener = configure_logging(config.log)
    app = create_app(config)
    app.state.log_listener = listener  # lives as long as the worker's app
    return app
