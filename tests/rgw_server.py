"""A real Ceph RADOS Gateway for tests: one monitor, one in-memory OSD and radosgw on loopback.

Debian's ceph packages (`ceph-mon ceph-osd radosgw ceph-common`) run a micro cluster with no
manager and no authentication: the OSD keeps its objects in RAM (memstore), the monitor's store,
the logs and the admin sockets live in one temporary directory (on tmpfs when there is room), and
`close()` removes it. Ports and directories are the instance's own, so several clusters (one per
simulated region) run side by side. Each cluster directory records the test run's pid and its
daemons' pids, so a run that was killed leaves nothing behind once the next one starts.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from s3_server import _PROXY_VARS, S3Endpoint
from services import free_ports, scratch_root, sweep_stale_clusters, wait_until

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool")
# Debian's python3 has the `rados` module (python3-rados, a dependency of ceph-common).
_SYSTEM_PYTHON = "/usr/bin/python3"
# `ceph osd new UUID 0` without the `ceph` CLI, which takes ~1 s to connect and ask the monitor
# which commands it knows.
_OSD_NEW = """
import json, sys, rados
cluster = rados.Rados(conffile=sys.argv[1])
cluster.connect(timeout=20)
ret, _, message = cluster.mon_command(json.dumps({"prefix": "osd new", "uuid": sys.argv[2], "id": 0}), b"")
sys.exit(f"osd new: {message} ({ret})" if ret else 0)
"""
_ROOT_PREFIX = "wharf-rgw-"
_RGW_NAME = "client.rgw.wharf"
# OSDs bind ports in this range (`ms bind port min/max`): a monitor or gateway port inside it could
# be taken by another cluster's OSD between choosing and binding it.
_OSD_PORTS = range(6800, 7301)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# {root} is the cluster directory; `$name` and `$id` are Ceph's own metavariables.
_CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
# One OSD holds every pool's only copy.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
# Each of the pools radosgw creates at start commits one map change: 1 s apiece by default.
paxos propose interval = 0.1
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
run dir = {root}/run
admin socket = {root}/run/$name.asok
log file = {root}/log/$name.log
mon data = {root}/mon-$id
osd data = {root}/osd-$id
mon cluster log file = {root}/log/cluster.log
# A port taken between choosing and binding it fails at once (and the cluster starts on new ones),
# instead of after two more tries 5 s apart.
ms bind retry count = 1

[client]
# radosgw otherwise asks the monitor for a secure session, which `auth none` cannot give, and loops
# on error -13 without ever serving.
ms mon client mode = crc

[{rgw_name}]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {root}/rgw
# Deleted objects are reclaimed within a minute instead of hours: memstore keeps them in RAM.
rgw gc obj min wait = 30
rgw gc processor period = 30
"""


def missing_binaries() -> list[str]:
    """The Ceph programs this machine lacks (`make test` installs them)."""
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if not glob.glob("/usr/lib/python3/dist-packages/rados.*.so"):
        missing.append("python3-rados")
    return missing


class RGWServer(S3Endpoint):
    """A monitor, an OSD and radosgw with one user and one bucket; a context manager, or `start()` and `close()`."""

    def __init__(
        self,
        *,
        bucket: str = "wharf-test",
        start_timeout: float = 60.0,
        memstore_bytes: int = 8 * 1024**3,
    ) -> None:
        self.bucket = bucket
        self.start_timeout = start_timeout
        # What the OSD reports as its size; memory is taken only as objects are written.
        self.memstore_bytes = memstore_bytes
        self.root: str | None = None
        self.port = 0
        self.mon_ports = (0, 0)
        self.started_in: float | None = None  # seconds from the first command to a ready bucket
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._env = {
            k: v
            for k, v in os.environ.items()
            if k not in _PROXY_VARS and not k.startswith(("CEPH_", "AWS_", "PYTHON", "VIRTUAL_ENV"))
        }

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> RGWServer:
        missing = missing_binaries()
        if missing:
            raise FileNotFoundError(f"Ceph programs not found: {' '.join(missing)} (make test installs them)")
        scratch = scratch_root()
        sweep_stale_clusters(scratch, prefix=_ROOT_PREFIX)
        began = time.monotonic()
        self.root = tempfile.mkdtemp(prefix=_ROOT_PREFIX, dir=scratch)
        with open(os.path.join(self.root, "owner"), "w") as f:
            f.write(str(os.getpid()))
        deadline = began + self.start_timeout
        try:
            # A free port can be taken between choosing and binding it: start again on new ones.
            for _attempt in range(3):
                try:
                    self._start_cluster(deadline)
                except _PortTaken:
                    self._kill_all()
                    continue
                self.started_in = time.monotonic() - began
                return self
            raise RuntimeError(f"Ceph could not bind its ports after 3 attempts: {self.log_tail()}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill every daemon and remove the cluster (its objects live in the OSD's memory). Safe twice."""
        self._kill_all()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> RGWServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop_gateway(self) -> None:
        """Stop radosgw alone (the monitor and the OSD keep the objects): the S3 endpoint is down."""
        process = self._processes.pop(_RGW_NAME, None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def start_gateway(self, timeout: float = 60.0) -> None:
        """Start radosgw again on its port after `stop_gateway`; returns once it answers."""
        if _RGW_NAME in self._processes:
            return
        self._spawn(_RGW_NAME, ["radosgw", "-c", self._conf, "-n", _RGW_NAME, "-f"])
        self._wait(self._gateway_answers, time.monotonic() + timeout, f"radosgw on {self.endpoint}")

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of every daemon's log and output, for failure messages."""
        if self.root is None:
            return ""
        tails = []
        for folder in ("log", "out"):
            directory = os.path.join(self.root, folder)
            for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
                try:
                    with open(os.path.join(directory, name), "rb") as f:
                        tail = b"".join(f.readlines()[-lines:]).decode(errors="replace")
                except OSError:
                    continue
                if tail:
                    tails.append(f"--- {folder}/{name}\n{tail}")
        return "\n".join(tails)

    # -- the start sequence ---------------------------------------------------------------

    def _start_cluster(self, deadline: float) -> None:
        assert self.root is not None
        for entry in os.scandir(self.root):  # what an attempt on other ports left
            if entry.is_dir():
                shutil.rmtree(entry.path)
            elif entry.name != "owner":
                os.remove(entry.path)
        for folder in ("run", "log", "out", "rgw", "osd-0"):
            os.makedirs(os.path.join(self.root, folder))
        ports = [p for p in free_ports(6) if p not in _OSD_PORTS][:3]
        if len(ports) < 3:
            raise _PortTaken("no free ports outside the OSD range")
        self.mon_ports = (ports[0], ports[1])
        self.port = ports[2]
        fsid = str(uuid.uuid4())
        with open(self._conf, "w") as f:
            f.write(
                _CEPH_CONF.format(
                    fsid=fsid,
                    root=self.root,
                    mon_v2=self.mon_ports[0],
                    mon_v1=self.mon_ports[1],
                    rgw_port=self.port,
                    rgw_name=_RGW_NAME,
                    memstore_bytes=self.memstore_bytes,
                )
            )
        monmap = os.path.join(self.root, "monmap")
        mon_addrs = f"[v2:127.0.0.1:{self.mon_ports[0]},v1:127.0.0.1:{self.mon_ports[1]}]"
        self._run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon_addrs, monmap], deadline)
        self._run(["ceph-mon", "-c", self._conf, "--mkfs", "-i", "a", "--monmap", monmap], deadline)
        self._spawn("mon.a", ["ceph-mon", "-c", self._conf, "-i", "a", "-f"])
        self._wait(lambda: self._daemon_state("mon.a", "mon_status", "state") == "leader", deadline, "the monitor")

        osd_uuid = str(uuid.uuid4())
        self._run([_SYSTEM_PYTHON, "-c", _OSD_NEW, self._conf, osd_uuid], deadline)
        self._run(["ceph-osd", "-c", self._conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], deadline)
        self._spawn("osd.0", ["ceph-osd", "-c", self._conf, "-i", "0", "-f"])
        # radosgw started before the OSD is up waits ~5 s for its first write to be resent.
        self._wait(lambda: self._daemon_state("osd.0", "status", "state") == "active", deadline, "the OSD")

        self._spawn(_RGW_NAME, ["radosgw", "-c", self._conf, "-n", _RGW_NAME, "-f"])
        self._wait(self._gateway_answers, deadline, f"radosgw on {self.endpoint}")
        self._run(
            [
                "radosgw-admin", "-c", self._conf, "user", "create", "--uid=wharf-test", "--display-name=wharf-test",
                f"--access-key={self.access_key}", f"--secret={self.secret_key}",
            ],
            deadline,
        )  # fmt: skip
        self.create_bucket()

    @property
    def _conf(self) -> str:
        assert self.root is not None
        return os.path.join(self.root, "ceph.conf")

    def _run(self, args: list[str], deadline: float) -> None:
        assert self.root is not None
        timeout = max(deadline - time.monotonic(), 1.0)
        try:
            done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, env=self._env, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{args[0]} did not finish in {timeout:.1f}s: {self.log_tail()}") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            if "Address already in use" in output:
                raise _PortTaken(output)
            raise RuntimeError(f"{' '.join(args[:3])} failed ({done.returncode}): {output}\n{self.log_tail()}")

    def _spawn(self, name: str, args: list[str]) -> None:
        assert self.root is not None
        with open(os.path.join(self.root, "out", f"{name}.out"), "ab") as out:
            # Same process group as the test run: whatever ends the run's group ends Ceph too.
            process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self._env
            )
        self._processes[name] = process
        with open(os.path.join(self.root, f"{name}.pid"), "w") as f:
            f.write(str(process.pid))

    def _wait(self, predicate: Any, deadline: float, what: str) -> None:
        try:
            wait_until(predicate, timeout=max(deadline - time.monotonic(), 0.0), what=what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None

    def _check_running(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                if self._port_taken(name):
                    raise _PortTaken(name)
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log_tail()}")

    def _port_taken(self, name: str) -> bool:
        assert self.root is not None
        for path in (os.path.join(self.root, "log", f"{name}.log"), os.path.join(self.root, "out", f"{name}.out")):
            try:
                with open(path, "rb") as f:
                    if b"Address already in use" in f.read():
                        return True
            except OSError:
                pass
        return False

    def _daemon_state(self, name: str, command: str, field: str) -> Any:
        """A field of a daemon's answer on its admin socket, or None while it cannot answer yet."""
        self._check_running()
        assert self.root is not None
        path = os.path.join(self.root, "run", f"{name}.asok")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(path)
                sock.sendall(json.dumps({"prefix": command}).encode() + b"\0")
                header = _receive(sock, 4)
                return json.loads(_receive(sock, struct.unpack(">I", header)[0])).get(field)
        except (OSError, ValueError):
            return None

    def _gateway_answers(self) -> bool:
        self._check_running()
        try:
            with _DIRECT.open(self.endpoint, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answered
        except (urllib.error.URLError, OSError):
            return False

    def _kill_all(self) -> None:
        # SIGKILL: the data is in memory and goes anyway, and an OSD told to stop waits for the monitor.
        for name in reversed(list(self._processes)):
            process = self._processes.pop(name)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("admin socket closed early")
        data += chunk
    return data


class _PortTaken(RuntimeError):
    pass
