"""A command on a registry: its configuration loaded, its store opened as `wharf serve` opens it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..config import Config, load
from ..services import Services
from ..store import Mode, open_store

T = TypeVar("T")

Commands = argparse._SubParsersAction  # type: ignore[type-arg]


def load_config(args: argparse.Namespace) -> Config:
    """The configuration a command names (positional or `--config`), else REGISTRY_CONFIGURATION_PATH's,
    else the defaults; ConfigError (one line, exit 2) when it is wrong."""
    path = getattr(args, "config", None) or os.environ.get("REGISTRY_CONFIGURATION_PATH") or None
    return load(path)


def with_config(run: Callable[[argparse.Namespace, Config], int]) -> Callable[[argparse.Namespace], int]:
    """A command that works on the registry's configuration: `run(args, config)`."""

    def command(args: argparse.Namespace) -> int:
        return run(args, load_config(args))

    return command


async def with_services(
    config: Config, work: Callable[[Services], Awaitable[T]], *, readonly: bool = False, mode: Mode | None = None
) -> T:
    """Open the store as `wharf serve` does (StoreRefused if it is not there or not one store).

    `readonly` (dry runs, listings) creates and changes nothing anywhere.
    """
    store = await open_store(config, mode or ("read" if readonly else "write"))
    services = Services.build(config, store.kv, store.storage)
    try:
        await services.readonly.switch.refresh()
        return await work(services)
    finally:
        await services.close()


def store_command(
    commands: Commands,
    name: str,
    run: Callable[[argparse.Namespace, Config], int],
    *,
    help: str,
    description: str | None = None,
    dry_run: str | None = None,
) -> argparse.ArgumentParser:
    """`wharf NAME [--dry-run] [--json] [CONFIG]`: a command on the registry's store; `dry_run` is
    what the dry run does (no --dry-run without it)."""
    cmd: argparse.ArgumentParser = commands.add_parser(name, help=help, description=description)
    cmd.add_argument("config", nargs="?", help="configuration file")
    if dry_run is not None:
        cmd.add_argument("--dry-run", "-d", action="store_true", help=dry_run)
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    cmd.set_defaults(run=with_config(run))
    return cmd


def add_listing(
    commands: Commands, name: str, help: str, ls_help: str, run: Callable[[argparse.Namespace, Config], int]
) -> None:
    """`wharf NAME ls [--json] [CONFIG]`."""
    group = commands.add_parser(name, help=help)
    store_command(group.add_subparsers(dest=f"{name}_action", required=True), "ls", run, help=ls_help)
