#!/usr/bin/env python3
"""What one request costs Wharf's Python, counted in instructions: this checkout against another.

On a shared two-core machine a rate, or even CPU time, moves by a fifth between identical runs; an
instruction count does not. This runs the registry app in one process (embedded coordinator,
filesystem storage, access log on, the collector settled as a serving process settles it), calls it
directly with ASGI scopes (no client, no server, no socket), and counts the instructions of N
requests of each kind under `valgrind --tool=callgrind`, minus those of a run that makes none:

  get-tag      GET /v2/<name>/manifests/<tag>      (OCI Accept header)
  get-digest   GET by digest
  head-tag     HEAD by tag
  head-digest  HEAD by digest

    python loadtests/request_cost.py [--baseline DIR] [--requests 2000] [--cases get-tag,head-digest]

`--baseline DIR` is another checkout of Wharf (say `git archive main | tar -x -C DIR`), counted the
same way, so the table says before and after. What it leaves out is the ASGI server's share (Granian
parsing and sending) and the kernel's: `bench_hotpaths.py` measures those, beside Distribution.
Each count takes about a minute (valgrind runs Python some fifty times slower); valgrind is
Debian's `valgrind` package (`apt-get install valgrind`). Keep `--requests` in the thousands: the
collector runs every few dozen requests, and with a few hundred whether one more of its runs falls
inside the count moves a figure by a few percent (500 requests once read +3% where 2,000 read -8%).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ("get-tag", "get-digest", "head-tag", "head-digest")

# Run in the child, with the checkout's code first on sys.path: one image pushed, then N requests.
_CHILD = r"""
import asyncio, gc, json, os, sys, tempfile
from pathlib import Path

checkout, case, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path[:0] = [checkout, os.path.join(checkout, "tests")]
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)  # the access log's lines
from inprocess import InProcessRegistry  # noqa: E402
from oci_client import digest_of  # noqa: E402
import node.app  # noqa: E402

ACCEPT = b"application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


async def main():
    registry = InProcessRegistry(Path(tempfile.mkdtemp()))
    app = registry.http._transport.app
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    layer = os.urandom(1000)
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": await registry.blob("r/app", config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": await registry.blob("r/app", layer), "size": len(layer)}],
    }
    digest, _ = await registry.put_manifest("r/app", "v1", doc)
    method, by = case.split("-")
    path = f"/v2/r/app/manifests/{'v1' if by == 'tag' else digest}"
    statuses = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    def scope():
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method.upper(),
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"wharf"), (b"accept", ACCEPT), (b"user-agent", b"request-cost")],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 5000), "state": {},
        }

    settle = getattr(node.app, "_settle_memory", None)
    if settle is not None:
        settle()  # as a serving process does once it has started
    for _ in range(50):  # warm: caches filled, statements prepared
        await app(scope(), receive, send)
    for _ in range(count):
        await app(scope(), receive, send)
    assert set(statuses) == {200}, statuses[-5:]
    await registry.close()


asyncio.run(main())
"""

_COLLECTED = re.compile(r"Collected\s*:\s*([\d,]+)")


def _instructions(python: str, checkout: Path, case: str, count: int, script: Path) -> int:
    run = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            python,
            str(script),
            str(checkout),
            case,
            str(count),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    found = _COLLECTED.search(run.stderr)
    if run.returncode != 0 or found is None:
        raise SystemExit(f"{checkout}: {case} x {count} failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_request(python: str, checkout: Path, case: str, count: int, script: Path) -> int:
    """Instructions of one request of `case`: N requests' count less that of none, over N."""
    return (
        _instructions(python, checkout, case, count, script) - _instructions(python, checkout, case, 0, script)
    ) // count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another checkout of Wharf, counted beside this one")
    parser.add_argument("--requests", type=int, default=2000, help="requests per count (default 2000)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or args.requests < 1:
        parser.error(f"unknown cases {unknown}" if unknown else "--requests must be 1 or more")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    checkouts = {"wharf": ROOT}
    if args.baseline is not None:
        checkouts["baseline"] = args.baseline.resolve()
    with tempfile.TemporaryDirectory() as scratch:
        script = Path(scratch) / "request_cost_child.py"
        script.write_text(_CHILD)
        rows = []
        for case in cases:
            figures = {
                name: per_request(sys.executable, path, case, args.requests, script) for name, path in checkouts.items()
            }
            rows.append((case, figures))
            print(f"  {case}: " + ", ".join(f"{name} {value:,}" for name, value in figures.items()), file=sys.stderr)
    print(f"instructions per request (callgrind, {args.requests} requests, in one process, no server)")
    header = f"{'request':14s}" + "".join(f"{name:>12s}" for name in checkouts)
    if len(checkouts) > 1:
        header += f"{'change':>10s}"
    print(header)
    for case, figures in rows:
        line = f"{case:14s}" + "".join(f"{value:>12,}" for value in figures.values())
        if "baseline" in figures and figures["baseline"]:
            line += f"{(figures['wharf'] - figures['baseline']) / figures['baseline']:>+10.1%}"
        print(line)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")  # the same dict layouts in every count
    sys.exit(main())
