"""`wharf htpasswd add|remove|list`: users of an htpasswd file, with bcrypt passwords."""

from __future__ import annotations

import argparse
import sys

from ..auth import htpasswd
from .registry import Commands


def add_commands(commands: Commands) -> None:
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
    htpasswd.set_defaults(run=run_htpasswd)


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    password = getpass.getpass("New password: ")
    if getpass.getpass("Re-type new password: ") != password:
        raise ValueError("the passwords do not match")
    return password


def run_htpasswd(args: argparse.Namespace) -> int:
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
