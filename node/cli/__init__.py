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
    cache,
    cert,
    coordinator,
    gc,
    images,
    inventory,
    maintenance,
    notifications,
    quota,
    replication,
    retention,
    serve,
    signing,
    store,
    users,
)

FAMILIES = (
    serve,
    users,
    cert,
    gc,
    images,
    inventory,
    quota,
    retention,
    store,
    backup,
    audit,
    maintenance,
    notifications,
    replication,
    signing,
    cache,
    coordinator,
)


def parser() -> argparse.ArgumentParser:
    wharf = argparse.ArgumentParser(prog="wharf", description="Wharf container registry")
    commands = wharf.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.add_commands(commands)
    return wharf


# How Go's flags (registry:2's `garbage-collect --dry-run=true`, in many a cron job) spell a boolean.
_GO_TRUE = frozenset({"1", "t", "true"})
_GO_FALSE = frozenset({"0", "f", "false"})


def _switches(command: argparse.ArgumentParser) -> set[str]:
    """The option strings of every on/off flag of `command` and its subcommands."""
    found: set[str] = set()
    for action in command._actions:
        if isinstance(action, argparse._StoreTrueAction):
            found.update(action.option_strings)
        elif isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _switches(sub)
    return found


def go_booleans(command: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--flag=true` as `--flag`, `--flag=false` as nothing, for on/off flags, as Go's flag package
    takes them; anything else is left for argparse to judge."""
    switches = _switches(command)
    out: list[str] = []
    for arg in argv:
        option, equals, value = arg.partition("=")
        if equals and option in switches and value.lower() in _GO_TRUE | _GO_FALSE:
            if value.lower() in _GO_TRUE:
                out.append(option)
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    wharf = parser()
    args = wharf.parse_args(go_booleans(wharf, sys.argv[1:] if argv is None else argv))
    try:
        return int(args.run(args))
    except (ConfigError, StoreRefused, ListenError) as exc:
        print(f"wharf: {exc}", file=sys.stderr)
        return 2
