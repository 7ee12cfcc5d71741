"""Garbage collection's and retention's memory and time against the registry's size, with synthetic
coordinators.

Fills an embedded coordinator straight through its SQLite file (not over HTTP: a million images
would take hours to push) with N images: each a manifest with a tag, a config and three layers of
which two come from a shared pool, their layer links and blob records; every tenth image is then
untagged (deleteuntagged collects it). A retention dry run (keep the 5 newest tags of every
repository, untagged manifests older than a day go) and a `wharf gc` cycle then run, each in its own
process, and the figures are each one's peak resident memory and duration. Nothing is asserted: the
figures are printed.

    python loadtests/bench_gc_memory.py                  # 10,000, 100,000 and 1,000,000 images
    python loadtests/bench_gc_memory.py --sizes 20000    # one size
    python loadtests/bench_gc_memory.py --sizes 100000 --retention apply --no-gc   # a real retention run only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO_ROOT
from benchlib.images import OCI_MANIFEST, sha256_digest

from coordinator import keys
from coordinator.embedded import EmbeddedKV

SHARED_LAYERS = 500


def _digest(text: str) -> str:
    return sha256_digest(text.encode())


def fill(path: Path, images: int) -> None:
    """`images` synthetic images in the embedded coordinator file at `path`."""
    asyncio_kv = EmbeddedKV(str(path))  # creates the schema, as a node would
    import asyncio

    asyncio.run(asyncio_kv.close())
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    revision = 0
    now = time.time() - 7 * 86400
    rows: list[tuple[str, bytes, int, int, int, int]] = []

    def add(key: str, value: bytes) -> None:
        nonlocal revision
        revision += 1
        rows.append((key, value, 1, revision, revision, 0))

    def flush() -> None:
        db.executemany(
            "INSERT OR REPLACE INTO kv (key, value, version, create_rev, mod_rev, lease) VALUES (?,?,?,?,?,?)", rows
        )
        rows.clear()

    shared = [_digest(f"shared {n}") for n in range(SHARED_LAYERS)]
    for digest in shared:
        add(keys.blob(digest), json.dumps({"size": 10_000_000, "key": digest, "created": now}).encode())
    repos = max(1, images // 100)
    for n in range(images):
        repo = f"team{n % 17}/app{n % repos}"
        add(keys.repository(repo), b"{}")
        config, own = _digest(f"config {n}"), _digest(f"layer {n}")
        layers = [shared[n % SHARED_LAYERS], shared[(n * 7) % SHARED_LAYERS], own]
        manifest = _digest(f"manifest {n}")
        for digest, size in ((config, 1500), (own, 30_000_000)):
            add(keys.blob(digest), json.dumps({"size": size, "key": digest, "created": now}).encode())
        for digest in [config, *layers]:
            add(keys.link(repo, digest), json.dumps({"size": 1000, "linked": now}).encode())
        record = {
            "digest": manifest,
            "media_type": OCI_MANIFEST,
            "size": 900,
            "blobs": [config, *layers],
            "manifests": [],
            "subject": None,
            "artifact_type": "application/vnd.oci.image.config.v1+json",
            "annotations": None,
            "pushed": now,
            "annotations_in_manifest": False,
        }
        add(keys.manifest(repo, manifest), json.dumps(record).encode())
        add(keys.blob(manifest), json.dumps({"size": 900, "key": manifest, "created": now}).encode())
        if n % 10:
            add(
                keys.tag(repo, f"v{n}"),
                json.dumps({"digest": manifest, "media_type": OCI_MANIFEST, "size": 900, "pushed": now}).encode(),
            )
            add(keys.tagged(repo, manifest, f"v{n}"), b"")
        if len(rows) >= 50_000:
            flush()
    add(keys.TAG_INDEX_BUILT, b"{}")
    flush()
    db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (revision,))
    db.commit()
    db.close()


# Runs a command and prints, last on stderr, the peak resident memory (KiB) of it alone.
_MEASURED = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(done.returncode)"
)


def _write_config(workdir: Path) -> Path:
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'registry'}\n  delete:\n    enabled: true\n"
        f"coordinator:\n  embedded:\n    path: {workdir / 'coordinator.db'}\n"
        "gc:\n  grace: 0s\nhttp:\n  debug:\n    addr: ''\n"
        "retention:\n  policies:\n    - name: newest five\n      repositories: ['**']\n      keeplast: 5\n"
        "      untaggedafter: 1d\n"
    )
    (workdir / "registry").mkdir(exist_ok=True)
    return config


def _measured(args: list[str], keyword: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, the summary line) of one `wharf` process."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, sys.executable, "-m", "node.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=7200,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    peak = int(done.stderr.strip().splitlines()[-1]) / 1024
    summary = next((line for line in done.stdout.splitlines() if keyword in line), done.stdout[:200])
    return seconds, peak, summary


def run_retention(config: Path, dry_run: bool = True) -> tuple[float, float, str]:
    if dry_run:
        return _measured(["retention", "apply", "--dry-run", str(config)], "would delete")
    return _measured(["retention", "apply", str(config)], "deleted")


def run_gc(config: Path, dry_run: bool) -> tuple[float, float, str]:
    args = ["gc", "--delete-untagged", str(config)]
    if dry_run:
        args.insert(1, "--dry-run")
    return _measured(args, "delete")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated image counts")
    parser.add_argument("--dry-run", action="store_true", help="measure dry runs (nothing deleted)")
    parser.add_argument("--tmpdir", help="where the coordinators go (default: system temp)")
    parser.add_argument(
        "--retention",
        choices=["dry-run", "apply"],
        default="dry-run",
        help="measure a retention dry run (default) or a real run that deletes what the policy says",
    )
    parser.add_argument("--no-gc", action="store_true", help="measure retention only")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    print(
        f"{'images':>10} {'keys':>10} {'fill s':>8} {'retention s':>12} {'peak MiB':>9} "
        f"{'gc s':>8} {'peak MiB':>9}  summary"
    )
    for size in sizes:
        workdir = Path(tempfile.mkdtemp(prefix="wharf-bench-gc-", dir=args.tmpdir))
        try:
            started = time.perf_counter()
            fill(workdir / "coordinator.db", size)
            filled = time.perf_counter() - started
            with sqlite3.connect(workdir / "coordinator.db") as db:
                count = db.execute("SELECT count(*) FROM kv").fetchone()[0]
            config = _write_config(workdir)
            kept_s, kept_peak, kept = run_retention(config, args.retention == "dry-run")
            seconds, peak, summary = (0.0, 0.0, kept) if args.no_gc else run_gc(config, args.dry_run)
            print(
                f"{size:>10,} {count:>10,} {filled:>8.1f} {kept_s:>12.1f} {kept_peak:>9.0f} "
                f"{seconds:>8.1f} {peak:>9.0f}  {summary}",
                flush=True,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
