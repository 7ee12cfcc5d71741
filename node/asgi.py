"""The app for servers that import it by path in worker processes (`node.asgi:app`)."""

from __future__ import annotations

import ctypes
import os
import signal

from .app import create_app
from .config import load
from .logs import configure_logging

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """A worker must not outlive `wharf serve`: an orphan would keep serving and keep leases."""
    parent = os.environ.get("WHARF_SERVE_PID")
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


_die_with_parent()
# `wharf serve` passes the configuration file to its workers through this one variable.
_config = load(os.environ.get("WHARF_CONFIG") or None)
_listener = configure_logging(_config.log)
app = create_app(_config)
