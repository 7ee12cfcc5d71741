"""Real services for tests: local etcd clusters, free ports.

Everything here starts real processes on loopback and cleans up after itself; waits poll with a
deadline instead of sleeping for a guessed time.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from coordinator import keys
from node.health import pid_alive

ETCD_BINARY = os.environ.get("WHARF_TEST_ETCD", "/usr/bin/etcd")

# Health checks go straight to loopback, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    return free_ports(1, host)[0]


# Test servers listen on ports below the kernel's ephemeral range, where no outgoing connection
# takes one between its choice and the server's bind. Each pytest-xdist process picks from its own
# window of that range, so two processes of one run never choose the same port, and at random, so
# that two runs side by side rarely do; within a process a port is handed out once (a port chosen
# for one server is never chosen again for another that starts before the first has bound it).
_PORTS_LOW = 10_000


def _port_window() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        high = 32_768
    high = max(high, _PORTS_LOW + 2_000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker) if worker.isdigit() else 0
    span = (high - _PORTS_LOW) // max(count, 1)
    return range(_PORTS_LOW + index * span, _PORTS_LOW + (index + 1) * span)


_WINDOW = _port_window()
_HANDED_OUT: set[int] = set()
_PICK = random.Random()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host`, none handed out before in this process."""
    ports: list[int] = []
    for _ in range(len(_WINDOW)):
        if len(ports) == count:
            return ports
        port = _PICK.choice(_WINDOW)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue  # taken (or still in TIME_WAIT): another one
        _HANDED_OUT.add(port)
        ports.append(port)
    if len(ports) == count:
        return ports
    raise RuntimeError(f"no {count} free ports on {host} in {_WINDOW.start}-{_WINDOW.stop - 1}")


def wait_until(predicate, *, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Call `predicate` until it returns something truthy; raise TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


_ROOT_PREFIX = "wharf-etcd-"


def sweep_stale_clusters(parent: str | None = None, prefix: str = _ROOT_PREFIX) -> None:
    """Remove what a killed test run left behind: its service processes and their data dirs.

    Each cluster's directory (named `prefix...` under `parent`) holds an `owner` file with the test
    run's pid and one `*.pid` file per process; a directory whose owner is gone is cleaned (a pid is
    killed only if that process still names the directory on its command line).
    """
    parent = parent or tempfile.gettempdir()
    for root in glob.glob(os.path.join(parent, prefix + "*")):
        try:
            with open(os.path.join(root, "owner")) as f:
                owner = int(f.read())
        except (OSError, ValueError):
            continue  # being created right now, or not ours
        if pid_alive(owner):
            continue
        for pid_file in glob.glob(os.path.join(root, "*.pid")):
            try:
                with open(pid_file) as f:
                    pid = int(f.read())
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if root.encode() in f.read():
                        os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
        shutil.rmtree(root, ignore_errors=True)


def scratch_root() -> str | None:
    """Where data dirs go: tmpfs if there is plenty (fsync is then nearly free), else the default."""
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize >= 2 * 1024**3 and os.access(shm, os.W_OK):
        return shm
    return None


@dataclass
class _Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    process: subprocess.Popen[bytes] | None = None
    log_file: object | None = field(default=None, repr=False)

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster:
    """One or three (or any number of) `etcd` members on free loopback ports.

    Use as a context manager, or call `start()` and `close()`. Data and logs live in one temporary
    directory (on tmpfs when available) that `close()` removes: the WAL preallocates 64 MB a member.
    """

    def __init__(
        self,
        size: int = 1,
        *,
        binary: str = ETCD_BINARY,
        heartbeat_ms: int = 100,
        election_ms: int = 1000,
        start_timeout: float = 30.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.size = size
        self.binary = binary
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.start_timeout = start_timeout
        self.extra_args = tuple(extra_args)
        self.root: str | None = None
        self.members: list[_Member] = []

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> EtcdCluster:
        if not os.access(self.binary, os.X_OK):
            raise FileNotFoundError(f"etcd binary not found or not executable: {self.binary}")
        scratch = scratch_root()
        sweep_stale_clusters(scratch)
        self.root = tempfile.mkdtemp(prefix=_ROOT_PREFIX, dir=scratch)
        with open(os.path.join(self.root, "owner"), "w") as f:
            f.write(str(os.getpid()))
        try:
            # A free port can be taken by someone else between choosing and binding it:
            # start the whole cluster again on new ports if a member could not bind.
            for attempt in range(3):
                self._plan(attempt)
                for i in range(self.size):
                    self._spawn(i, initial_state="new")
                try:
                    self.wait_healthy()
                    return self
                except _PortTaken:
                    self._kill_all()
                    continue
            raise RuntimeError("etcd could not bind its ports after 3 attempts")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill every member and remove all data. Safe to call twice."""
        self._kill_all()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- members --------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of every member, running or not, in member order."""
        return [m.client_url for m in self.members]

    def endpoint(self, i: int) -> str:
        return self.members[i].client_url

    def _etcdctl(self, *args: str, endpoints: list[str] | None = None) -> str:
        result = subprocess.run(
            ["etcdctl", "--endpoints", ",".join(endpoints or self.endpoints), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=True,
        )
        return result.stdout

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` (with the prefix), straight from etcd."""
        return [line for line in self._etcdctl("get", "--prefix", "--keys-only", prefix).splitlines() if line]

    def records(self, prefix: str, under: str = "") -> dict[str, bytes]:
        """The store at etcd prefix `prefix`: its keys that start with `under`, named as Wharf names them
        (a store's keys are text, or in the compact layout: coordinator.keys.pack), and their values."""
        raw = json.loads(self._etcdctl("get", "--prefix", prefix, "-w", "json"))
        found = {}
        base = prefix.encode()
        for item in raw.get("kvs", []):
            stored = base64.b64decode(item["key"])[len(base) :]
            if stored.startswith(keys.COMPACT_LAYOUT):
                key = keys.unpack(stored[len(keys.COMPACT_LAYOUT) :])
            else:
                key = stored.decode("utf-8", "surrogateescape")
            if key.startswith(under):
                found[key] = base64.b64decode(item.get("value", ""))
        return found

    def value(self, key: str) -> bytes | None:
        """One key's value straight from etcd, or None."""
        out = subprocess.run(
            ["etcdctl", "--endpoints", ",".join(self.endpoints), "get", key, "--print-value-only"],
            capture_output=True,
            timeout=30,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=True,
        ).stdout
        return out.rstrip(b"\n") if out else None

    def delete_prefix(self, prefix: str) -> None:
        self._etcdctl("del", "--prefix", prefix)

    def leader(self) -> int:
        """The index of the member that leads the cluster, as the running members report it."""
        running = [m.client_url for i, m in enumerate(self.members) if self.running(i)]
        for status in json.loads(self._etcdctl("endpoint", "status", "-w", "json", endpoints=running)):
            if status["Status"]["leader"] == status["Status"]["header"]["member_id"]:
                return self.endpoints.index(status["Endpoint"])
        raise RuntimeError("no running etcd member says it leads")

    def running(self, i: int) -> bool:
        proc = self.members[i].process
        return proc is not None and proc.poll() is None

    def stop_member(self, i: int, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop member `i` (SIGTERM, or SIGKILL with `kill=True` to simulate a crash)."""
        member = self.members[i]
        proc = member.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        member.process = None
        self._close_log(member)

    def start_member(self, i: int, *, wait: bool = True) -> None:
        """Start member `i` again on its old ports and data; wait until it serves (and has a leader)."""
        if self.running(i):
            return
        self._spawn(i, initial_state="existing")
        if wait:
            self.wait_member_healthy(i)

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until every running member reports healthy (which needs an elected leader)."""
        for i in range(self.size):
            if self.members[i].process is not None:
                self.wait_member_healthy(i, timeout)

    def wait_member_healthy(self, i: int, timeout: float | None = None) -> None:
        member = self.members[i]
        wait_until(
            lambda: self._healthy(member),
            timeout=timeout if timeout is not None else self.start_timeout,
            what=f"etcd member {member.name} at {member.client_url} to become healthy (log: {self.log_tail(i)!r})",
        )

    def log_tail(self, i: int, lines: int = 20) -> str:
        try:
            with open(self.members[i].log_path, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    # -- internals ------------------------------------------------------------------------

    def _plan(self, attempt: int) -> None:
        assert self.root is not None
        ports = free_ports(2 * self.size)
        self.members = []
        for i in range(self.size):
            name = f"m{i}"
            data_dir = os.path.join(self.root, f"{name}-{attempt}")
            self.members.append(
                _Member(
                    name=name,
                    client_port=ports[2 * i],
                    peer_port=ports[2 * i + 1],
                    data_dir=data_dir,
                    log_path=os.path.join(self.root, f"{name}-{attempt}.log"),
                )
            )

    def _spawn(self, i: int, *, initial_state: str) -> None:
        member = self.members[i]
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        args = [
            self.binary,
            "--name", member.name,
            "--data-dir", member.data_dir,
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", initial_state,
            "--initial-cluster-token", f"wharf-test-{os.getpid()}-{id(self)}",
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
            *self.extra_args,
        ]  # fmt: skip
        self._close_log(member)
        log_file = open(member.log_path, "ab")
        member.log_file = log_file
        # Same process group as the test run: whatever ends the run's group ends etcd too.
        member.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        with open(os.path.join(self.root or "", f"{member.name}.pid"), "w") as f:
            f.write(str(member.process.pid))

    def _healthy(self, member: _Member) -> bool:
        proc = member.process
        if proc is None:
            raise RuntimeError(f"etcd member {member.name} is not running")
        if proc.poll() is not None:
            tail = self.log_tail(self.members.index(member))
            if "address already in use" in tail:
                raise _PortTaken(tail)
            raise RuntimeError(f"etcd member {member.name} exited with {proc.returncode}: {tail}")
        try:
            with _DIRECT.open(f"{member.client_url}/health", timeout=1) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _kill_all(self) -> None:
        for i, member in enumerate(self.members):
            if member.process is not None:
                self.stop_member(i, kill=True)

    @staticmethod
    def _close_log(member: _Member) -> None:
        if member.log_file is not None:
            member.log_file.close()  # type: ignore[attr-defined]
            member.log_file = None


class _PortTaken(RuntimeError):
    pass
