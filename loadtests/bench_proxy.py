#!/usr/bin/env python3
"""A cached pull through Wharf against a pull straight from the upstream and through Distribution's proxy.

One upstream (Debian's docker-registry, CNCF Distribution 2.8.2, filesystem storage) holds one image
(`--layers` layers of `--layer-mib` MiB). Three targets serve it on the same machine:

- `upstream`: the upstream itself, pulled straight;
- `wharf`: a Wharf node (granian, 1 worker, filesystem storage, embedded coordinator) caching the
  upstream under `hub/` (`proxy.upstreams`);
- `distribution-proxy`: a second docker-registry in proxy mode (`proxy.remoteurl`) in front of it.

Each cache is warmed by one whole pull first, so every measured pull is a cache hit. Three loads per
target, `--rounds` times in turn so the machine's load hits all alike, `--duration` seconds each:
manifest GETs by tag (what a CI job's base-image check costs; wrk -t2 -c16 with the OCI `Accept`),
GETs of one layer (wrk -t2 -c4) and whole-image pulls (manifest by tag, config, every layer, each
checked against its digest) by `--clients` httpx client threads, which at this size are part of what
is measured. Per load it prints requests (or pulls) per second, MiB/s and p50/p99 latency, the best
round of each.

Figures only: nothing passes or fails. Access logs are off everywhere. Usage:

    python loadtests/bench_proxy.py [--duration S] [--rounds N] [--clients C] [--layers N] [--layer-mib M]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import benchlib  # noqa: F401  (puts the repository and tests/ on sys.path)
import httpx
from benchlib.wrk import accept_script, parse_wrk
from oci_client import digest_of
from pullthrough import layer, pull, push_image
from registry2 import DockerRegistry
from wharf_process import WharfProcess

QUIET = {"level": "error", "accesslog": {"disabled": True}}
REPO, TAG = "library/base", "1"


@dataclass
class Figures:
    ops: int
    seconds: float
    nbytes: int
    latencies: list[float]
    p50: float | None = None  # ms, when the tool measured them (wrk) rather than the latencies
    p99: float | None = None

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else float("nan")

    @property
    def mib_rate(self) -> float:
        return self.nbytes / self.seconds / 2**20 if self.seconds else float("nan")

    def percentile(self, q: float) -> float:
        given = self.p50 if q == 50 else self.p99 if q == 99 else None
        if given is not None:
            return given
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100)[int(q) - 1] * 1000


def load(base_url: str, clients: int, duration: float, one: Callable[[httpx.Client], int]) -> Figures:
    """`clients` threads doing `one` (which returns the bytes it received) until `duration` is up."""
    stop = time.monotonic() + duration
    lock = threading.Lock()
    latencies: list[float] = []
    totals = [0, 0]

    def worker() -> None:
        with httpx.Client(base_url=base_url, timeout=60, trust_env=False) as http:
            while time.monotonic() < stop:
                began = time.perf_counter()
                received = one(http)
                took = time.perf_counter() - began
                with lock:
                    latencies.append(took)
                    totals[0] += 1
                    totals[1] += received

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 120)
    return Figures(totals[0], time.monotonic() - began, totals[1], latencies)


def wrk(url: str, connections: int, duration: float, script: Path | None) -> Figures:
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "20s", "--latency"]
    argv += ["-s", str(script)] if script is not None else []
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=duration + 60).stdout
    result = parse_wrk(out)
    if result.error or result.non2xx:
        raise RuntimeError(f"wrk {url}: {result.error or f'{result.non2xx} non-2xx answers'}")
    seconds = max(1, round(duration))
    p50, p99 = result.percentiles.get(0.5, float("nan")), result.percentiles.get(0.99, float("nan"))
    return Figures(result.requests, seconds, int(result.bytes_per_s * seconds), [], p50 * 1000, p99 * 1000)


def whole_pull(repo: str) -> Callable[[httpx.Client], int]:
    def one(http: httpx.Client) -> int:
        pulled = pull(http, repo, TAG)
        return sum(len(b) for b in pulled.manifests.values()) + sum(len(b) for b in pulled.blobs.values())

    return one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4, help="client threads of the whole-image pulls")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--layer-mib", type=float, default=2.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="wharf-bench-proxy-") as tmp:
        work = Path(tmp)
        upstream = DockerRegistry.on_filesystem(work / "upstream", work / "upstream/root", extra={"log": QUIET})
        upstream.start()
        try:
            size = int(args.layer_mib * 2**20)
            layers = [layer(f"bench-{i}", size) for i in range(args.layers)]
            image = push_image(upstream, REPO, TAG, layers)
            mirror = DockerRegistry.on_filesystem(
                work / "mirror", work / "mirror/root", extra={"log": QUIET, "proxy": {"remoteurl": upstream.url}}
            )
            wharf = WharfProcess(
                work / "wharf",
                log={"level": "warn", "accesslog": {"disabled": True}},
                proxy={"upstreams": [{"prefix": "hub/", "remoteurl": upstream.url}]},
            )
            mirror.start()
            wharf.start()
            try:
                targets = {
                    "upstream": (upstream.url, REPO),
                    "wharf": (wharf.url, "hub/" + REPO),
                    "distribution-proxy": (mirror.url, REPO),
                }
                for name, (url, repo) in targets.items():  # warm: one whole pull, checked
                    with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
                        pulled = pull(http, repo, TAG)
                        assert pulled.digest == image.digest, name
                        digest = hashlib.sha256(b"".join(pulled.blobs[d] for d in sorted(pulled.blobs))).hexdigest()
                        print(f"warm {name}: {pulled.digest[:19]} blobs {digest[:12]}", file=sys.stderr)
                script = accept_script(work)
                blob = digest_of(layers[0])
                loads: dict[str, Callable[[str, str], Figures]] = {
                    "manifest GET by tag": lambda url, repo: wrk(
                        f"{url}/v2/{repo}/manifests/{TAG}", 16, args.duration, script
                    ),
                    f"layer GET ({args.layer_mib:g} MiB)": lambda url, repo: wrk(
                        f"{url}/v2/{repo}/blobs/{blob}", 4, args.duration, None
                    ),
                    "whole-image pulls": lambda url, repo: load(url, args.clients, args.duration, whole_pull(repo)),
                }
                best: dict[tuple[str, str], Figures] = {}
                for round_ in range(args.rounds):
                    for load_name, measure in loads.items():
                        for name, (url, repo) in targets.items():
                            figures = measure(url, repo)
                            print(f"round {round_ + 1} {load_name} {name}: {figures.rate:.1f}/s", file=sys.stderr)
                            kept = best.get((load_name, name))
                            if kept is None or figures.rate > kept.rate:
                                best[(load_name, name)] = figures
                mib = args.layers * args.layer_mib
                print(
                    f"\nimage: {args.layers} layers x {args.layer_mib:g} MiB ({mib:g} MiB); "
                    f"{args.clients} clients, {args.duration:g}s x {args.rounds} rounds (best shown)\n"
                )
                for load_name in loads:
                    print(f"{load_name}")
                    print(f"  {'target':<20} {'per s':>9} {'MiB/s':>9} {'p50 ms':>9} {'p99 ms':>9}")
                    for name in targets:
                        f = best[(load_name, name)]
                        print(
                            f"  {name:<20} {f.rate:>9.1f} {f.mib_rate:>9.1f} "
                            f"{f.percentile(50):>9.1f} {f.percentile(99):>9.1f}"
                        )
                    print()
            finally:
                wharf.stop()
                mirror.stop()
        finally:
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
