"""wrk: run it against a URL, parse what it prints, and account the CPU around it."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.client import MIB
from benchlib.cpu import children_cpu
from benchlib.images import ACCEPT
from benchlib.runner import CpuWindow, Figures, Front, Meter

_UNITS_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_UNITS_SIZE = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
PERCENTILES = (0.5, 0.75, 0.9, 0.99)

ACCEPT_LUA = f"""-- written by loadtests/benchlib/wrk.py
wrk.method = "GET"
wrk.headers["Accept"] = "{ACCEPT}"
"""


@dataclass
class WrkResult(Figures):
    """What one wrk run measured; `elapsed` is its -d."""

    requests: int = 0
    elapsed: float = 0.0
    rps: float = float("nan")
    bytes_per_s: float = float("nan")
    percentiles: dict[float, float] = field(default_factory=dict)
    non2xx: int = 0
    socket_errors: int = 0
    socket_detail: str = ""
    raw: str = ""
    error: str = ""

    @property
    def ops(self) -> int:
        return self.requests

    @property
    def rate(self) -> float:
        return self.rps

    @property
    def mib_rate(self) -> float:
        return self.bytes_per_s / MIB

    @property
    def error_count(self) -> int:
        return self.non2xx + self.socket_errors

    def percentile(self, q: float) -> float:
        return self.percentiles.get(q, float("nan"))


def _wrk_time(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(match.group(1)) * _UNITS_TIME[match.group(2)] if match else float("nan")


def parse_wrk(output: str) -> WrkResult:
    parsed = WrkResult(raw=output)
    if m := re.search(r"Requests/sec:\s+([\d.]+)", output):
        parsed.rps = float(m.group(1))
    if m := re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB|TB)", output):
        parsed.bytes_per_s = float(m.group(1)) * _UNITS_SIZE[m.group(2)]
    for q in PERCENTILES:
        if m := re.search(rf"^\s+{round(q * 100)}%\s+(\S+)", output, re.M):
            parsed.percentiles[q] = _wrk_time(m.group(1))
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+)", output):
        parsed.requests = int(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        parsed.non2xx = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        parsed.socket_errors = sum(int(x) for x in m.groups())
        parsed.socket_detail = m.group(0)
    if parsed.rps != parsed.rps:
        parsed.error = output.strip()[-500:]
    return parsed


def accept_script(workdir: Path) -> Path:
    """A wrk script that sends GETs with the OCI and Docker manifest types in `Accept`."""
    script = workdir / "accept.lua"
    script.write_text(ACCEPT_LUA)
    return script


async def run_wrk(
    front: Front,
    url: str,
    *,
    threads: int,
    connections: int,
    duration: float,
    script: Path | None = None,
    latency: bool = True,
    meters: dict[str, Meter] | None = None,
) -> WrkResult:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s"]
    if latency:
        argv.append("--latency")
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    window = CpuWindow(front, children_cpu, meters)
    out = await _output(argv, duration)
    result = parse_wrk(out.decode(errors="replace"))
    window.close(result)
    result.elapsed = max(1, round(duration))
    return result


async def _output(argv: list[str], duration: float) -> bytes:
    """What a load client printed, run for `duration` (killed a minute past it)."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=duration + 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out


async def run_ab(front: Front, url: str, connections: int, duration: float) -> WrkResult:
    """ApacheBench HEADs (keep-alive) on `url`, in WrkResult's shape: wrk cannot time HEAD requests (it
    waits for the body that Content-Length announces), ab can (-i)."""
    seconds = max(1, round(duration))
    argv = ["ab", "-k", "-q", "-i", "-c", str(connections), "-t", str(seconds), "-n", "100000000", "-s", "10"]
    argv += ["-H", f"Accept: {ACCEPT}", url]
    window = CpuWindow(front, children_cpu)
    out = await _output(argv, duration)
    text = out.decode(errors="replace")
    result = WrkResult(raw=text, elapsed=seconds)
    if m := re.search(r"Requests per second:\s+([\d.]+)", text):
        result.rps = float(m.group(1))
    if m := re.search(r"Complete requests:\s+(\d+)", text):
        result.requests = int(m.group(1))
    if m := re.search(r"Non-2xx responses:\s+(\d+)", text):
        result.non2xx = int(m.group(1))
    if m := re.search(r"Failed requests:\s+(\d+)", text):
        result.socket_errors = int(m.group(1))
    if result.rps != result.rps:
        result.error = text.strip()[-300:]
    window.close(result)
    return result
