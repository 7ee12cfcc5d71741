"""ansible/ for real: site.yml builds a cluster from nothing, rolling-upgrade.yml upgrades it under load.

Hosts are inventory entries on this machine, each with its own loopback address (127.R.S.x, chosen
per run), its own ports and its own directory tree (every path the roles write is a role variable,
pointed under the host's directory), reached with `ansible_connection: local`. Network namespaces
would give each host an address too, but not a file system of its own, and ansible has no way into
one without an sshd per namespace; the addresses already keep the hosts' listeners apart. Services
run under a supervisord per host (`wharf_service_manager: supervisor`: systemd is not PID 1 here);
the systemd units are rendered and checked with `systemd-analyze verify` on their own.

Real parts: Debian's ansible and ansible-lint, etcd-server (3 members), haproxy, supervisor and
skopeo; the session's moto S3 server; Wharf installed by the role into one virtual environment per
node from a wheel built here out of this checkout (the next version is that wheel with its version
bumped; the broken one also never becomes ready). Secrets go through ansible-vault.

One cluster serves the whole module, so the tests run in order: site.yml once (a module fixture),
again (nothing changes), the read-only checks, then the upgrades: a broken build stops at the first
node, and the rolling upgrade under load starts from there, repairing that node first.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import glob
import hashlib
import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from images import assert_same_image, make_image
from s3_server import S3Server
from services import free_ports, scratch_root, wait_until
from skopeo import pull_args, push_args, retry_args, run_skopeo

REPO = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = REPO / "ansible"
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook")
ANSIBLE_LINT = shutil.which("ansible-lint")
PLAYBOOK_TIMEOUT = 600.0
ADMIN = "admin"
ADMIN_PASSWORD = f"admin-{uuid.uuid4().hex[:12]}"
VAULT_PASSWORD = uuid.uuid4().hex
ETCD, NODES, BALANCERS = ("etcd1", "etcd2", "etcd3"), ("node1", "node2", "node3"), ("lb1",)
# The client's loop while a rolling upgrade runs: until the upgrade ends, at most this many rounds
# and seconds, with a pause between rounds that leaves the upgrade its share of the machine.
LOAD_MAX_ROUNDS = 150
LOAD_MAX_SECONDS = 480.0
LOAD_PAUSE = 1.0
_ROOT_PREFIX = "wharf-ansible-"

pytestmark = [
    pytest.mark.skipif(
        ANSIBLE_PLAYBOOK is None or ANSIBLE_LINT is None,
        reason="ansible-playbook or ansible-lint not found: `make install-test` installs Debian's ansible and ansible-lint",
    ),
    # The first test also waits for the module's cluster: the wheel and a first site.yml.
    pytest.mark.timeout(900),
]


def _version(pyproject: str) -> str:
    found = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert found, "no version in pyproject.toml"
    return found.group(1)


BASE = _version((REPO / "pyproject.toml").read_text())
NEXT = f"{BASE}.post1"
BROKEN = f"{BASE}.post2"
_NEVER_READY = """

async def ready(request: Request) -> Response:  # noqa: F811  (a broken build, for the tests)
    return Response(b'{"broken": "this build never becomes ready"}', status_code=503)
"""


# -- playbook runs ---------------------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    output: str

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP: {host: {"ok": n, "changed": n, "failed": n, ...}}."""
        _, _, tail = self.output.rpartition("PLAY RECAP")
        hosts = {}
        for line in tail.splitlines():
            host, sep, counts = line.partition(" : ")
            if sep and "ok=" in counts:
                hosts[host.strip()] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
        return hosts

    def changed(self) -> dict[str, int]:
        return {host: counts["changed"] for host, counts in self.recap().items() if counts["changed"]}


@dataclass
class Hosts:
    """The inventory: addresses, ports and directories of the hosts, and how to run playbooks on them."""

    root: Path
    s3: S3Server
    s3_root: str
    wheels: dict[str, Path]
    addresses: dict[str, str] = field(default_factory=dict)
    ports: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def inventory(self) -> Path:
        return self.root / "inventory"

    def host_dir(self, host: str) -> Path:
        return self.root / "hosts" / host

    def node_url(self, node: str) -> str:
        return f"http://{self.addresses[node]}:{self.ports[node]['wharf_node_port']}"

    @property
    def registry(self) -> str:
        return f"{self.addresses['lb1']}:{self.ports['lb1']['wharf_haproxy_port']}"

    def stats_url(self) -> str:
        return f"http://{self.addresses['lb1']}:{self.ports['lb1']['wharf_haproxy_stats_port']}/stats;csv"

    def supervisor_config(self, host: str) -> Path:
        return self.host_dir(host) / "etc/supervisor/supervisord.conf"

    def env(self) -> dict[str, str]:
        drop = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("AWS_", "REGISTRY_"))}
        env.update(
            ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
            ANSIBLE_HOME=str(self.root / "ansible-home"),
            ANSIBLE_LOCAL_TEMP=str(self.root / "ansible-tmp"),
            ANSIBLE_NOCOLOR="1",
            # Modules run without a copy to a temporary file first (the local connection can).
            ANSIBLE_PIPELINING="True",
            ANSIBLE_FORCE_COLOR="0",
            PYTHONDONTWRITEBYTECODE="1",
        )
        return env

    def play(self, playbook: str, *extra: str, timeout: float = PLAYBOOK_TIMEOUT) -> Run:
        command = [
            str(ANSIBLE_PLAYBOOK),
            "-i",
            str(self.inventory),
            "--vault-password-file",
            str(self.root / "vault-password"),
            playbook,
            *extra,
        ]
        started = time.monotonic()
        try:
            done = subprocess.run(
                command,
                cwd=ANSIBLE_DIR,
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
            raise AssertionError(f"{playbook} still running after {timeout:.0f}s:\n{out[-6000:]}") from None
        print(f"{Path(playbook).name} {' '.join(extra)}: {time.monotonic() - started:.0f}s")
        return Run(done.returncode, done.stdout + done.stderr)

    def supervised_pid(self, host: str, program: str) -> int:
        """The pid supervisord runs `program` under (a new one after every restart)."""
        done = subprocess.run(
            ["supervisorctl", "-c", str(self.supervisor_config(host)), "pid", program],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return int(done.stdout.strip())

    def versions(self) -> dict[str, str]:
        return {node: httpx.get(self.node_url(node) + "/debug/health", timeout=10).json()["version"] for node in NODES}

    def _balancer_rows(self) -> list[dict[str, str]]:
        text = httpx.get(self.stats_url(), timeout=10).text
        return list(csv.DictReader(io.StringIO(text.removeprefix("# "))))

    def balancer_states(self) -> dict[str, str]:
        rows = self._balancer_rows()
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "wharf" and row["svname"] in NODES}

    def trouble(self, limit: int = 12) -> str:
        """The nodes' log lines about answers of 500 and up and about warnings, for a failure's message."""
        found = []
        for node in NODES:
            for path in sorted((self.host_dir(node) / "var/log/wharf").glob("*")):
                with contextlib.suppress(OSError):
                    lines = path.read_text(errors="replace").splitlines()
                    bad = [
                        line
                        for line in lines
                        if re.search(r'status"?[=:] ?"?5\d\d\b|level"?[=:] ?"?(warning|error)', line)
                    ]
                    found += [f"{node} {path.name}: {line[:600]}" for line in bad[-limit:]]
        return "\n".join(found) or "(no node logged a 5xx or a warning)"

    def balancer_errors(self) -> dict[str, int]:
        """What HAProxy counted going wrong: 5xx it answered, failed connections and responses, retries."""
        counters = {}
        for row in self._balancer_rows():
            if row["pxname"] == "registry" and row["svname"] == "FRONTEND":
                counters["answered 5xx"] = int(row["hrsp_5xx"] or 0)
            if row["pxname"] == "wharf" and row["svname"] == "BACKEND":
                for name in ("econ", "eresp", "wretr", "wredis"):
                    counters[name] = int(row[name] or 0)
        return counters


def _plan(root: Path, s3: S3Server, s3_root: str, wheels: dict[str, Path]) -> Hosts:
    hosts = Hosts(root, s3, "/" + s3_root, wheels)
    # One /24 of loopback for this run; ports chosen free on each host's own address.
    prefix = f"127.{random.randint(100, 254)}.{random.randint(1, 254)}"
    layout = {
        **{h: (11 + i, ("wharf_etcd_client_port", "wharf_etcd_peer_port")) for i, h in enumerate(ETCD)},
        **{h: (21 + i, ("wharf_node_port", "wharf_node_debug_port")) for i, h in enumerate(NODES)},
        **{h: (31 + i, ("wharf_haproxy_port", "wharf_haproxy_stats_port")) for i, h in enumerate(BALANCERS)},
    }
    for host, (last, names) in layout.items():
        address = f"{prefix}.{last}"
        hosts.addresses[host] = address
        hosts.ports[host] = dict(zip(names, free_ports(len(names), address), strict=True))
    _write_inventory(hosts)
    return hosts


def _write_inventory(hosts: Hosts) -> None:
    def entries(names: tuple[str, ...]) -> dict[str, Any]:
        return {h: {"ansible_host": hosts.addresses[h], **hosts.ports[h]} for h in names}

    wheelhouse = hosts.wheels[BASE].parent
    inventory = {
        "all": {
            "children": {
                "wharf_etcd": {"hosts": entries(ETCD)},
                "wharf_nodes": {"hosts": entries(NODES)},
                "wharf_haproxy": {"hosts": entries(BALANCERS)},
                "region_test": {"hosts": {h: None for h in NODES + BALANCERS}, "vars": {"wharf_region": "test"}},
            }
        }
    }
    # Every path a role writes, under the host's own directory; every listener on its own address.
    here = "{{ wharf_test_hosts }}/{{ inventory_hostname }}"
    settings = {
        "ansible_connection": "local",
        "ansible_python_interpreter": "/usr/bin/python3",
        "wharf_service_manager": "supervisor",
        # The Makefile installs Debian's packages; the roles' apt checks cost a minute a run here.
        "wharf_supervisor_install_package": False,
        "wharf_etcd_install_package": False,
        "wharf_node_install_packages": False,
        "wharf_haproxy_install_package": False,
        "wharf_test_hosts": str(hosts.root / "hosts"),
        "wharf_supervisor_config": f"{here}/etc/supervisor/supervisord.conf",
        "wharf_supervisor_include_dir": f"{here}/etc/supervisor/conf.d",
        "wharf_supervisor_socket": f"{here}/run/supervisor.sock",
        "wharf_supervisor_pidfile": f"{here}/run/supervisord.pid",
        "wharf_supervisor_log_dir": f"{here}/log",
        "wharf_etcd_user": "root",
        "wharf_etcd_data_dir": f"{here}/var/lib/wharf-etcd",
        "wharf_etcd_env_file": f"{here}/etc/default/wharf-etcd",
        "wharf_version": BASE,
        "wharf_node_package": str(hosts.wheels[BASE]),
        # Modules compile when first imported: installing three venvs of boto3 is CPU enough here.
        "wharf_node_pip_extra_args": f"--no-index --find-links {wheelhouse} --no-compile",
        "wharf_node_user": "root",
        "wharf_node_group": "root",
        "wharf_node_create_user": False,
        "wharf_node_venv": f"{here}/opt/wharf/venv",
        "wharf_node_config_dir": f"{here}/etc/wharf",
        "wharf_node_data_dir": f"{here}/var/lib/wharf",
        "wharf_node_log_dir": f"{here}/var/log/wharf",
        "wharf_node_listen_address": "{{ ansible_host }}",
        "wharf_node_s3_bucket": hosts.s3.bucket,
        "wharf_node_s3_endpoint": hosts.s3.endpoint,
        "wharf_node_s3_region": hosts.s3.region,
        "wharf_node_s3_access_key": hosts.s3.access_key,
        "wharf_node_s3_secret_key": "{{ vault_wharf_s3_secret_key }}",
        "wharf_node_s3_root_directory": hosts.s3_root,
        "wharf_node_s3_secure": False,
        "wharf_node_admin_user": ADMIN,
        "wharf_node_admin_password": "{{ vault_wharf_admin_password }}",
        "wharf_node_leasettl": 3,
        "wharf_node_backup_to": f"{here}/backups",
        "wharf_haproxy_config": f"{here}/etc/haproxy/haproxy.cfg",
        "wharf_haproxy_address": "{{ ansible_host }}",
        "wharf_haproxy_stats_address": "{{ ansible_host }}",
        "wharf_haproxy_check_interval": "500ms",
        "wharf_node_config": {"gc": {"enabled": False}},
    }
    group_vars = hosts.inventory / "group_vars" / "all"
    group_vars.mkdir(parents=True)
    (hosts.inventory / "hosts.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    (group_vars / "main.yml").write_text(yaml.safe_dump(settings, sort_keys=False))
    vault = group_vars / "vault.yml"
    vault.write_text(
        yaml.safe_dump({"vault_wharf_s3_secret_key": hosts.s3.secret_key, "vault_wharf_admin_password": ADMIN_PASSWORD})
    )
    (hosts.root / "vault-password").write_text(VAULT_PASSWORD + "\n")
    subprocess.run(
        ["ansible-vault", "encrypt", "--vault-password-file", str(hosts.root / "vault-password"), str(vault)],
        check=True,
        capture_output=True,
        env=hosts.env(),
        timeout=60,
    )
    assert vault.read_text().startswith("$ANSIBLE_VAULT;")


# -- wheels: this checkout, its next version, a broken one ----------------------------------------


def _checkout_copy(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--", "pyproject.toml", "node", "coordinator", "README.md"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        target = dest / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name.decode(), target)
    return dest


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _reversioned(wheel: Path, version: str, *, never_ready: bool = False) -> Path:
    """The same wheel as another version (its METADATA, dist-info and RECORD rewritten), and for the
    broken build a readiness that never passes: what a build of the next version would hold."""
    old_info, new_info = f"wharf-{BASE}.dist-info/", f"wharf-{version}.dist-info/"
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as source:
        for name in source.namelist():
            data = source.read(name)
            if name == old_info + "RECORD":
                continue
            if name == old_info + "METADATA":
                data = re.sub(rb"^Version: .*$", f"Version: {version}".encode(), data, count=1, flags=re.M)
            if never_ready and name == "node/api/health.py":
                data += _NEVER_READY.encode()
            files[new_info + name.removeprefix(old_info) if name.startswith(old_info) else name] = data
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    files[new_info + "RECORD"] = (record + f"{new_info}RECORD,,\n").encode()
    target = wheel.with_name(wheel.name.replace(f"wharf-{BASE}-", f"wharf-{version}-", 1))
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in files.items():
            out.writestr(name, data)
    return target


def _build_wheels(root: Path) -> dict[str, Path]:
    wheelhouse = root / "wheels"
    source = _checkout_copy(root / "src")
    # One build, which also gathers every dependency, so the nodes install with --no-index.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheelhouse), str(source)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (base,) = wheelhouse.glob(f"wharf-{BASE}-*.whl")
    return {BASE: base, NEXT: _reversioned(base, NEXT), BROKEN: _reversioned(base, BROKEN, never_ready=True)}


# -- the machine's hosts ---------------------------------------------------------------------------


def _supervisord_pids(root: Path) -> list[int]:
    pids = []
    for pid_file in glob.glob(str(root / "hosts" / "*" / "run" / "supervisord.pid")):
        try:
            pid = int(Path(pid_file).read_text())
            if str(root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except (OSError, ValueError):
            pass
    return pids


def _stop_hosts(root: Path) -> None:
    """Stop every supervisord of the run (each stops its programs first), then remove the tree."""
    pids = _supervisord_pids(root)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        time.sleep(0.2)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


def _sweep_stale_runs(parent: str) -> None:
    """A killed test run leaves its hosts running: stop those whose test process is gone."""
    for root in glob.glob(os.path.join(parent, _ROOT_PREFIX + "*")):
        try:
            owner = int(Path(root, "owner").read_text())
            os.kill(owner, 0)
            continue
        except ProcessLookupError:
            _stop_hosts(Path(root))
        except (OSError, ValueError):
            continue


@pytest.fixture(scope="module")
def hosts(s3_server: S3Server) -> Iterator[Hosts]:
    parent = scratch_root() or tempfile.gettempdir()
    _sweep_stale_runs(parent)
    root = Path(tempfile.mkdtemp(prefix=_ROOT_PREFIX, dir=parent))
    (root / "owner").write_text(str(os.getpid()))
    s3_root = f"ansible-{uuid.uuid4().hex[:8]}"
    try:
        yield _plan(root, s3_server, s3_root, _build_wheels(root))
    finally:
        _stop_hosts(root)
        s3_server.remove_prefix(s3_root)


@pytest.fixture(scope="module")
def site(hosts: Hosts) -> Run:
    """The first site.yml: a cluster from nothing."""
    return hosts.play("site.yml")


# -- the client -------------------------------------------------------------------------------------


def _creds(direction: str) -> tuple[str, ...]:
    return (f"--{direction}-creds", f"{ADMIN}:{ADMIN_PASSWORD}")


def _push_pull(hosts: Hosts, work: Path, name: str, seed: int, *extra: str) -> list[str]:
    """Push an image through the load balancer and pull it back; the failures, if any."""
    source = work / f"src-{seed}"
    make_image(source, "v1", layers=2, layer_size=16 * 1024, seed=seed)
    target = f"{hosts.registry}/{name}:v{seed}"
    pushed = run_skopeo(*push_args(source, "v1", target, *_creds("dest"), *extra), timeout=120)
    if not pushed.ok:
        return [pushed.describe()]
    pulled_dir = work / f"pulled-{seed}"
    pulled = run_skopeo(*pull_args(target, pulled_dir, "v1", *_creds("src"), *extra), timeout=120)
    if not pulled.ok:
        return [pulled.describe()]
    assert_same_image(source, "v1", pulled_dir, "v1")
    shutil.rmtree(source)
    shutil.rmtree(pulled_dir)
    return []


class Load:
    """Pushes and pulls through the load balancer in a loop until stopped (bounded in rounds and time)."""

    def __init__(self, hosts: Hosts, work: Path) -> None:
        self.hosts, self.work = hosts, work
        self.rounds = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + LOAD_MAX_SECONDS
        for seed in range(1000, 1000 + LOAD_MAX_ROUNDS):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            try:
                self.failures += _push_pull(self.hosts, self.work, "load/app", seed, *retry_args(3))
            except Exception as exc:  # reported by the test
                self.failures.append(repr(exc))
            self.rounds += 1
            self.stop.wait(LOAD_PAUSE)

    def __enter__(self) -> Load:
        self.thread.start()
        wait_until(lambda: self.rounds >= 1 or self.failures, timeout=120, what="the first push and pull")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(300)


# -- the tests --------------------------------------------------------------------------------------


def test_site_builds_the_cluster_from_nothing(hosts: Hosts, site: Run):
    assert site.returncode == 0, site.output[-8000:]
    recap = site.recap()
    assert set(recap) == set(ETCD + NODES + BALANCERS)
    assert all(counts["failed"] == 0 and counts["unreachable"] == 0 for counts in recap.values()), recap
    # Three members in one cluster, three nodes on it, every node in the load balancer.
    etcd1 = f"http://{hosts.addresses['etcd1']}:{hosts.ports['etcd1']['wharf_etcd_client_port']}"
    members = subprocess.run(
        ["etcdctl", "--endpoints", etcd1, "member", "list"],
        env={**os.environ, "ETCDCTL_API": "3"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert members.returncode == 0, members.stderr
    assert sorted(line.split(", ")[2] for line in members.stdout.splitlines()) == list(ETCD), members.stdout
    assert hosts.versions() == {node: BASE for node in NODES}
    assert hosts.balancer_states() == {node: "UP" for node in NODES}
    # The configuration came from the inventory; the secrets only through the vault, never printed.
    config = yaml.safe_load((hosts.host_dir("node2") / "etc/wharf/config.yml").read_text())
    assert len(config["coordinator"]["etcd"]["endpoints"]) == 3
    assert config["storage"]["s3"]["secretkey"] == hosts.s3.secret_key
    assert config["cluster"]["node"] == "node2" and config["gc"] == {"enabled": False}
    assert ADMIN_PASSWORD not in site.output and hosts.s3.secret_key not in site.output


def test_skopeo_pushes_and_pulls_through_the_load_balancer(hosts: Hosts, site: Run, tmp_path: Path):
    assert site.returncode == 0, "site.yml failed"
    assert _push_pull(hosts, tmp_path, "team/app", 1) == []
    # The admin user is the only way in.
    refused = run_skopeo(
        "inspect", "--tls-verify=false", "--creds", f"{ADMIN}:wrong", f"docker://{hosts.registry}/team/app:v1"
    )
    assert not refused.ok


def test_a_second_site_run_changes_nothing(hosts: Hosts, site: Run):
    assert site.returncode == 0, "site.yml failed"
    pids = {node: hosts.supervised_pid(node, "wharf") for node in NODES}
    again = hosts.play("site.yml")
    assert again.returncode == 0, again.output[-8000:]
    assert again.changed() == {}, again.output[-8000:]
    assert {node: hosts.supervised_pid(node, "wharf") for node in NODES} == pids


def test_site_refuses_to_change_the_version_of_running_nodes(hosts: Hosts, site: Run):
    assert site.returncode == 0, "site.yml failed"
    refused = hosts.play("site.yml", "-e", f"wharf_version={NEXT}")
    assert refused.returncode != 0
    assert "rolling-upgrade.yml moves nodes to it one at a time" in refused.output
    # It stops before changing anything, on every host: no etcd member, node or HAProxy was touched.
    assert refused.changed() == {}
    assert "PLAY [Run the etcd members]" not in refused.output, refused.output[-8000:]
    assert hosts.versions() == {node: BASE for node in NODES}


def test_backup_playbook_writes_a_snapshot_on_one_node(hosts: Hosts, site: Run):
    assert site.returncode == 0, "site.yml failed"
    dry = hosts.play("backup.yml", "--check")
    assert dry.returncode == 0, dry.output[-8000:]
    assert "dry run: would write" in dry.output
    backups = hosts.host_dir("node1") / "backups"
    assert not list(backups.glob("*")), "the dry run wrote something"
    run = hosts.play("backup.yml")
    assert run.returncode == 0, run.output[-8000:]
    assert set(run.changed()) == {"node1"}
    (snapshot,) = backups.glob("*")
    venv = hosts.host_dir("node1") / "opt/wharf/venv"
    config = hosts.host_dir("node1") / "etc/wharf/config.yml"
    check = subprocess.run(
        [str(venv / "bin/wharf"), "restore", str(config), "--from", str(snapshot), "--dry-run", "--force"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "keys" in check.stdout
    assert not (hosts.host_dir("node2") / "backups").exists()


def test_systemd_units_from_deploy_pass_systemd_analyze_verify(hosts: Hosts, site: Run):
    """What production gets: deploy/systemd's units verbatim, a drop-in with the inventory's paths."""
    assert site.returncode == 0, "site.yml failed"
    units = hosts.root / "systemd"
    playbook = hosts.root / "verify-units.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Render and verify the units as under systemd",
                    "hosts": "etcd1:node1",
                    "gather_facts": False,
                    "vars": {"wharf_service_manager": "systemd"},
                    "tasks": [
                        {
                            "name": "The etcd member's unit",
                            "ansible.builtin.include_role": {"name": "wharf_etcd", "tasks_from": "systemd-units"},
                            "vars": {"wharf_etcd_systemd_unit_dir": f"{units}/{{{{ inventory_hostname }}}}"},
                            "when": "inventory_hostname == 'etcd1'",
                        },
                        {
                            "name": "The node's unit",
                            "ansible.builtin.include_role": {"name": "wharf_node", "tasks_from": "systemd-units"},
                            "vars": {"wharf_node_systemd_unit_dir": f"{units}/{{{{ inventory_hostname }}}}"},
                            "when": "inventory_hostname == 'node1'",
                        },
                    ],
                }
            ],
            sort_keys=False,
        )
    )
    run = hosts.play(str(playbook))
    assert run.returncode == 0, run.output[-8000:]
    assert "systemd-analyze verify" in run.output
    for host, unit in (("etcd1", "wharf-etcd.service"), ("node1", "wharf.service")):
        assert (units / host / unit).read_bytes() == (REPO / "deploy/systemd" / unit).read_bytes()
    dropin = (units / "node1/wharf.service.d/ansible.conf").read_text()
    assert f"ExecStart={hosts.host_dir('node1')}/opt/wharf/venv/bin/wharf serve " in dropin
    # The check has teeth: a unit whose program is missing stops the play.
    broken = hosts.play(str(playbook), "--limit", "node1", "-e", f"wharf_node_venv={hosts.root}/no-such-venv")
    assert broken.returncode != 0
    assert "is not executable" in broken.output


def _upgrade_args(version: str, hosts: Hosts) -> list[str]:
    return ["-e", f"wharf_version={version}", "-e", f"wharf_node_package={hosts.wheels[version]}"]


def test_upgrade_failing_its_health_check_stops_at_the_first_node(hosts: Hosts, site: Run, tmp_path: Path):
    assert site.returncode == 0, "site.yml failed"
    before = hosts.versions()
    pids = {node: hosts.supervised_pid(node, "wharf") for node in NODES[1:]}
    failed = hosts.play("rolling-upgrade.yml", *_upgrade_args(BROKEN, hosts), "-e", "wharf_node_ready_timeout=5")
    assert failed.returncode != 0
    assert "node1 failed its upgrade" in failed.output, failed.output[-8000:]
    recap = failed.recap()
    assert recap["node1"]["failed"] == 1 and recap["node1"]["rescued"] == 1
    # The first node runs the broken build and stays drained; the others were not touched.
    assert hosts.versions() == {"node1": BROKEN, **{n: before[n] for n in NODES[1:]}}
    assert {node: hosts.supervised_pid(node, "wharf") for node in NODES[1:]} == pids
    assert (hosts.host_dir("node1") / "etc/wharf/config.yml.drain").exists()
    wait_until(
        lambda: hosts.balancer_states() == {"node1": "DOWN", "node2": "UP", "node3": "UP"},
        timeout=30,
        what="node1 out of the load balancer, the others in",
    )
    # The cluster still serves; the next test's upgrade repairs node1 first.
    assert _push_pull(hosts, tmp_path, "team/after-failure", 2) == []


def test_rolling_upgrade_under_load_fails_no_client_operation(hosts: Hosts, site: Run, tmp_path: Path):
    """From wherever the cluster stands (after the previous test: node1 drained on a broken build),
    one node at a time to the next version, while a client pushes and pulls through HAProxy."""
    assert site.returncode == 0, "site.yml failed"
    upgrade = _upgrade_args(NEXT, hosts)
    errors_before = hosts.balancer_errors()
    started = time.monotonic()
    with Load(hosts, tmp_path) as load:
        run = hosts.play("rolling-upgrade.yml", *upgrade)
        took = time.monotonic() - started
        rounds_during = load.rounds
        loading_to_the_end = load.thread.is_alive()
    assert run.returncode == 0, run.output[-8000:]
    assert loading_to_the_end, f"the client stopped before the upgrade ended ({rounds_during} rounds in {took:.0f}s)"
    assert load.failures == [], "\n".join(load.failures[:3]) + "\n" + hosts.trouble()
    assert rounds_during >= 3, f"only {rounds_during} push+pull rounds in {took:.0f}s of upgrade"
    # Not even a retry was needed: HAProxy answered no 5xx and never failed to reach a node.
    assert hosts.balancer_errors() == errors_before
    assert hosts.versions() == {node: NEXT for node in NODES}
    assert hosts.balancer_states() == {node: "UP" for node in NODES}
    assert not any((hosts.host_dir(n) / "etc/wharf/config.yml.drain").exists() for n in NODES)
    print(f"rolling upgrade of 3 nodes: {took:.0f}s, {rounds_during} push+pull rounds meanwhile, none failed")
    # Run again, it leaves every node alone: nothing changes, nothing restarts.
    pids = {node: hosts.supervised_pid(node, "wharf") for node in NODES}
    again = hosts.play("rolling-upgrade.yml", *upgrade)
    assert again.returncode == 0, again.output[-8000:]
    assert again.changed() == {}, again.output[-8000:]
    assert {node: hosts.supervised_pid(node, "wharf") for node in NODES} == pids


def test_ansible_lint_is_clean():
    done = subprocess.run(
        [str(ANSIBLE_LINT), "--offline", "--nocolor", "-p"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg")},
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
