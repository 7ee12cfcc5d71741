"""`wharf cert`: a self-signed TLS certificate and key for test set-ups."""

from __future__ import annotations

import argparse
import sys

from ..tls import write_certificate
from .registry import Commands


def add_commands(commands: Commands) -> None:
    cert = commands.add_parser("cert", help="make a self-signed TLS certificate and key for test set-ups")
    cert.add_argument("hosts", nargs="+", metavar="HOST", help="host names or IP addresses it is valid for")
    cert.add_argument("--dir", default="certs", help="where to write domain.crt and domain.key (default ./certs)")
    cert.add_argument("--days", type=int, default=365)
    cert.add_argument("--key-type", choices=["ec", "rsa"], default="ec")
    cert.add_argument("--force", action="store_true", help="replace existing files")
    cert.set_defaults(run=run_cert)


def run_cert(args: argparse.Namespace) -> int:
    try:
        cert, key = write_certificate(args.dir, args.hosts, days=args.days, key_type=args.key_type, force=args.force)
    except (OSError, ValueError) as exc:
        print(f"wharf: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {cert} and {key}\n"
        f"serve with:  REGISTRY_HTTP_TLS_CERTIFICATE={cert} REGISTRY_HTTP_TLS_KEY={key} wharf serve\n"
        f"trust with:  cp {cert} /etc/docker/certs.d/{args.hosts[0]}:5000/ca.crt  "
        f"(skopeo: --dest-cert-dir / --src-cert-dir naming a directory holding it as ca.crt)"
    )
    return 0
