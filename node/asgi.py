"""The app for servers that import it by path in worker processes (`node.asgi:app`)."""

from __future__ import annotations

import os

from .accesslog import configure_logging
from .app import create_app
from .config import load

# `wharf serve` passes the configuration file to its workers through this one variable.
_config = load(os.environ.get("WHARF_CONFIG") or None)
_listener = configure_logging(_config.log.level)
app = create_app(_config)
