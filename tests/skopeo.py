"""Run Debian's `skopeo` against a registry on loopback, for end-to-end and cluster tests.

Every call runs with `--insecure-policy` (no system signature policy needed) and TLS verification off
on the registry side, with a timeout, stdin closed and output captured. `skopeo()`, `push()` and
`pull()` fail the test unless skopeo exits 0; `run_skopeo()` and `try_push()` return the outcome so a
test can count failures (the fault tests do).
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

SKOPEO = "skopeo"
SKOPEO_TIMEOUT = 180.0


@dataclass(frozen=True)
class SkopeoResult:
    command: list[str]
    returncode: int  # -1 when the timeout ended it
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        return f"{' '.join(self.command)} exited {self.returncode}:\n{self.stderr}\n{self.stdout}"


def run_skopeo(*args: str, timeout: float = SKOPEO_TIMEOUT) -> SkopeoResult:
    """Run skopeo (policy checks off) and return its outcome; a timeout kills it and counts as failure."""
    command = [SKOPEO, "--insecure-policy", *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return SkopeoResult(command, -1, out, f"timed out after {timeout:.0f}s\n{err}")
    return SkopeoResult(command, result.returncode, result.stdout, result.stderr)


def skopeo(*args: str, timeout: float = SKOPEO_TIMEOUT) -> str:
    """Run skopeo (policy checks off); fail the test with its output unless it exits 0."""
    result = run_skopeo(*args, timeout=timeout)
    assert result.ok, result.describe()
    return result.stdout


def push_args(layout: Path, tag: str, destination: str, *extra: str) -> list[str]:
    return ["copy", *extra, "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{destination}"]


def pull_args(source: str, layout: Path, tag: str, *extra: str) -> list[str]:
    return ["copy", *extra, "--src-tls-verify=false", f"docker://{source}", f"oci:{layout}:{tag}"]


def push(layout: Path, tag: str, destination: str, *extra: str, timeout: float = SKOPEO_TIMEOUT) -> None:
    """Copy `oci:<layout>:<tag>` to `docker://<destination>`; fail the test unless skopeo exits 0."""
    skopeo(*push_args(layout, tag, destination, *extra), timeout=timeout)


def pull(source: str, layout: Path, tag: str, *extra: str, timeout: float = SKOPEO_TIMEOUT) -> None:
    """Copy `docker://<source>` to `oci:<layout>:<tag>`; fail the test unless skopeo exits 0."""
    Path(layout).parent.mkdir(parents=True, exist_ok=True)  # skopeo creates the layout, not its parent
    skopeo(*pull_args(source, layout, tag, *extra), timeout=timeout)


def try_push(layout: Path, tag: str, destination: str, *extra: str, timeout: float = SKOPEO_TIMEOUT) -> SkopeoResult:
    """Like `push`, but return the outcome instead of failing the test."""
    return run_skopeo(*push_args(layout, tag, destination, *extra), timeout=timeout)


@functools.cache
def copy_supports(flag: str) -> bool:
    """Whether this skopeo's `copy` knows `flag` (e.g. `--retry-times`, which older versions lack)."""
    result = run_skopeo("copy", "--help", timeout=30)
    return result.ok and flag in result.stdout


def retry_args(times: int = 3) -> tuple[str, ...]:
    """`--retry-times N` when this skopeo supports it (1.9 does), else nothing."""
    return ("--retry-times", str(times)) if copy_supports("--retry-times") else ()
