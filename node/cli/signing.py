"""`wharf sign`, `wharf verify` and `wharf keygen`: cosign's signatures made and checked as a registry client."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .. import cosign
from ..signing import CommandError, keygen, sign, verify
from .registry import Commands


def _registry_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--username", "-u", help="registry user (the password then comes from --password-stdin)")
    cmd.add_argument("--password-stdin", action="store_true", help="read the registry password from stdin")
    cmd.add_argument("--authfile", help="auth file to read credentials from (auth.json or Docker's config.json)")
    cmd.add_argument("--plain-http", action="store_true", help="talk to the registry over HTTP, not HTTPS")
    cmd.add_argument("--insecure", action="store_true", help="do not verify the registry's TLS certificate")
    cmd.add_argument("--ca-cert", help="trust this CA certificate file for the registry")


def add_commands(commands: Commands) -> None:
    cmd = commands.add_parser("sign", help="sign an image (cosign's signature format)")
    cmd.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    cmd.add_argument("--key", required=True, help="private key: cosign's encrypted key, or PKCS#8/SEC1/PKCS#1 PEM")
    cmd.add_argument("-a", "--annotation", action="append", metavar="KEY=VALUE", help="add to the payload")
    cmd.add_argument("--referrer", action="store_true", help="also store the signature as an OCI 1.1 referrer")
    cmd.add_argument("--no-tag", action="store_true", help="do not write the sha256-<hex>.sig tag")
    _registry_options(cmd)
    cmd.set_defaults(run=_client(sign))
    cmd = commands.add_parser("verify", help="verify an image's signatures against a public key, as cosign does")
    cmd.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    cmd.add_argument("--key", required=True, help="PEM public key (ECDSA, RSA or Ed25519)")
    _registry_options(cmd)
    cmd.set_defaults(run=_client(verify))
    cmd = commands.add_parser("keygen", help="write a signing key pair (cosign.key, cosign.pub)")
    cmd.add_argument("--output-key-prefix", default="cosign", help="file name prefix (default cosign)")
    cmd.add_argument("--type", choices=["ecdsa-p256", "rsa", "ed25519"], default="ecdsa-p256")
    cmd.add_argument("--plain", action="store_true", help="write the private key unencrypted (PKCS#8 PEM)")
    cmd.add_argument("--force", action="store_true", help="replace existing files")
    cmd.set_defaults(run=_client(keygen))


def _client(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A registry client's command: no configuration file; its failures are one line and exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except (CommandError, cosign.KeyInvalid) as exc:
            print(f"wharf: {exc}", file=sys.stderr)
            return 1

    return run
