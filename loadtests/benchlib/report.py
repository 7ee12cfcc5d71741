"""Tables of figures: columns read from one registry's results, ratios to a reference, errors, the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.cpu import cores
from benchlib.runner import Result
from benchlib.servers import Target
from benchlib.wrk import WrkResult


def fmt_num(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def fmt_ms(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    return f"{seconds * 1000:.2f}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def fmt_pct(cpu: float, elapsed: float) -> str:
    return f"{100 * cpu / elapsed:.0f}%" if elapsed > 0 else "-"


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or value != value or reference != reference or reference == 0:
        return "-"
    return f"{value / reference:.2f}x"


def print_table(title: str, note: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    if note:
        print(f"  {note}")
    line = "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(headers))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))


@dataclass(frozen=True)
class Column:
    """One column of a table: a figure read from one registry's results (a dict of loads), and its text."""

    header: str
    value: Callable[[dict[str, Any]], Any]
    text: Callable[[Any], str] = str


# Columns over one load's figures (a Result of the bench client, or a WrkResult): `load` names it in the results.


def rate(load: str, header: str = "req/s", digits: int = 0) -> Column:
    return Column(header, lambda r: r[load].rate, lambda v: fmt_num(v, digits))


def mib_rate(load: str, header: str = "MiB/s") -> Column:
    return Column(header, lambda r: r[load].mib_rate, fmt_num)


def request_rate(load: str, header: str = "req/s") -> Column:
    return Column(header, lambda r: r[load].requests / r[load].elapsed if r[load].ops else 0.0, fmt_num)


def count(load: str, header: str) -> Column:
    return Column(header, lambda r: r[load].ops)


def latency(load: str, q: float, header: str) -> Column:
    return Column(header, lambda r: r[load].percentile(q), fmt_ms)


def errors(load: str, header: str = "errors") -> Column:
    return Column(header, lambda r: r[load].error_count)


def cpu(load: str, header: str, who: str) -> Column:
    """CPU as a share of one core over the load: who is "server", "client", "other" or a meter's name."""

    def spent(r: dict[str, Any]) -> str:
        figures = r[load]
        used = getattr(figures, f"{who}_cpu") if who in ("server", "client", "other") else figures.extra.get(who, 0.0)
        return fmt_pct(used, figures.elapsed)

    return Column(header, spent)


def per_cpu(load: str, header: str, amount: str = "ops", digits: int = 0) -> Column:
    """Work per CPU-second of the registry: `amount` is "ops" (requests, images) or "mib"."""

    def value(r: dict[str, Any]) -> float | None:
        figures = r[load]
        done = figures.mib if amount == "mib" else float(figures.ops)
        return done / figures.server_cpu if figures.server_cpu > 0 else None

    return Column(header, value, lambda v: fmt_num(v, digits))


def timing(load: str, p50: str = "p50 ms", p99: str = "p99 ms") -> list[Column]:
    return [latency(load, 0.5, p50), latency(load, 0.99, p99), errors(load)]


def served(
    load: str,
    client: str,
    per: str = "req/CPU-s",
    amount: str = "ops",
    meters: tuple[Column, ...] = (),
    digits: int = 0,
) -> list[Column]:
    """Who spent the CPU: the registry (and its work per CPU-second), `meters`, the client, everything else."""
    return [
        cpu(load, "srv CPU", "server"),
        per_cpu(load, per, amount, digits),
        *meters,
        cpu(load, client, "client"),
        cpu(load, "other", "other"),
    ]


def comparison_table(
    title: str,
    note: str,
    columns: list[Column],
    ratios: dict[str, str],
    results: dict[str, dict[str, Any]],
    targets: list[Target],
    ref_key: str,
    first: str = "registry",
) -> None:
    """A row per target: its columns, then (`ratios`: ratio header -> column header) figures over the reference's."""
    by_header = {c.header: c for c in columns}
    compared = [by_header[header] for header in ratios.values()]
    ref = results.get(ref_key)
    reference = [c.value(ref) for c in compared] if ref is not None and "error" not in ref else []
    rows = []
    for t in targets:
        r = results.get(t.key)
        if r is None or "error" in r:
            continue
        if t.key == ref_key:
            shares = ["ref"] * len(compared)
        else:
            shares = [ratio(c.value(r), reference[i] if reference else None) for i, c in enumerate(compared)]
        rows.append([t.label, *(c.text(c.value(r)) for c in columns), *shares])
    print_table(title, note, [first, *(c.header for c in columns), *ratios], rows)


def report_errors(results: dict[str, dict[str, Any]], targets: list[Target]) -> None:
    """Every unexpected status the clients and wrk saw, and the error lines of each server's log."""
    print("\nErrors seen")
    print("-----------")
    lines = []
    for t in targets:
        r = results.get(t.key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"* {t.label}: run aborted: {r['error']}")
        for name, figures in r.items():
            if isinstance(figures, Result):
                lines += [f"* {t.label} [{name}] client saw {n} x {key}" for key, n in figures.errors.most_common(5)]
            elif isinstance(figures, WrkResult):
                if figures.error:
                    lines.append(f"* {t.label} [{name}] wrk failed: {figures.error}")
                if figures.error_count:
                    lines.append(
                        f"* {t.label} [{name}] wrk: {figures.non2xx} non-2xx/3xx responses; {figures.socket_detail}"
                    )
        log = r.get("log")
        if log:
            lines += [f"* {t.label} log: {n} x {key}" for key, n in log["statuses"].most_common(5)]
            for key, n in log["groups"].most_common(5):
                lines.append(f"* {t.label} log: {n} x {key}")
                if example := log["examples"].get(key, ""):
                    lines.append("    " + example.replace("\n", "\n    ")[:1500])
    print("\n".join(lines) if lines else "none: every response was the expected 2xx and no server logged an error.")


def print_problems(label: str, problems: list[str], what: str, fine: str) -> None:
    """`label: N problems <what>, e.g.:` and five of them, or `label: <fine>`."""
    if not problems:
        print(f"  {label}: {fine}")
        return
    print(f"  {label}: {len(problems)} problems {what}, e.g.:")
    for problem in problems[:5]:
        print(f"    {problem}")


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def machine_context(storage: str) -> list[str]:
    """Lines about the machine and the software measured; `storage` ends them (where the data lives)."""

    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    def pkg(name: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:  # noqa: BLE001
            return "?"

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) // 1024 // 1024} GiB"
    loop = "uvloop " + pkg("uvloop") if have_uvloop() else "default loop"
    return [
        "Machine",
        f"  nproc {cores()} (cpu_count {os.cpu_count()}), {model}, {mem} RAM, {platform.system()} {platform.release()}",
        f"  python {platform.python_version()} ({sys.executable}); client: asyncio Protocol + {loop}",
        f"  hypercorn {pkg('hypercorn')}, granian {pkg('granian')}, starlette {pkg('starlette')}; "
        + version(["docker-registry", "--version"]),
        f"  {version(['wrk', '-v'])}",
        f"  storage: {storage}",
    ]


def results_heading(started: float, context: list[str]) -> None:
    """The heading of a run's results (its time since `started`, on the monotonic clock), and the machine again."""
    print(f"\nResults ({time.monotonic() - started:.0f}s in all)")
    print("=======")
    print("\n".join(context))


def filesystem_type(path: Path) -> str:
    try:
        return subprocess.run(
            ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


# The columns of the four kinds of load, with `meters` (columns of other processes' CPU) before the client's.


def wrk_columns(load: str, meters: tuple[Column, ...] = ()) -> list[Column]:
    return [rate(load), *timing(load), *served(load, "wrk CPU", meters=meters)]


def transfer_columns(load: str, what: str, meters: tuple[Column, ...] = ()) -> list[Column]:
    """Blob loads: MiB/s, how many `what` (GETs, blobs), latency per whole blob."""
    return [mib_rate(load), count(load, what), *timing(load), *served(load, "cli CPU", "MiB/CPU-s", "mib", meters)]


def image_columns(load: str, meters: tuple[Column, ...] = ()) -> list[Column]:
    return [
        rate(load, "images/s", 1),
        request_rate(load),
        count(load, "images"),
        *timing(load),
        *served(load, "cli CPU", "img/CPU-s", meters=meters, digits=1),
    ]


REQUEST_RATIOS = {"ratio req/s": "req/s", "ratio p99": "p99 ms", "ratio /CPU": "req/CPU-s"}
MIB_RATIOS = {"ratio MiB/s": "MiB/s", "ratio /CPU": "MiB/CPU-s"}
IMAGE_RATIOS = {"ratio img/s": "images/s", "ratio p99": "p99 ms", "ratio /CPU": "img/CPU-s"}
