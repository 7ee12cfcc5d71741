"""The `wharf` command: one module per command family, one way to dispatch.

Each family's `add_commands` registers its commands; each command sets `run`, a function of the
parsed arguments that returns the exit status. Commands on a registry load its configuration and
open its store through `registry` (as `wharf serve` does). A failure the user can fix (a wrong
configuration, a store that is not the one configured, a busy port) is one line on stderr and exit
status 2, whatever the command.
"""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from ..server import ListenError
from ..store import StoreRefused
from . import (
    audit,
    backup,
    cert,
    gc,
    images,
    maintenance,
    notifications,
    quota,
    retention,
    serve,
    signing,
    store,
    users,
)

FAMILIES = (serve, users, cert, gc, images, quota, retention, store, backup, audit, maintenance, notifications, signing)


def parser() -> argparse.ArgumentParser:
    wharf = argparse.ArgumentParser(prog="wharf", description="Wharf container registry")
    commands = wharf.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.add_commands(commands)
    return wharf


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ConfigError, StoreRefused, ListenError) as exc:
        print(f"wharf: {exc}", file=sys.stderr)
        return 2
