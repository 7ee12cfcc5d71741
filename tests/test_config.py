"""Configuration: Distribution's config.yml as is, Wharf's sections, REGISTRY_* overrides."""

from __future__ import annotations

import dataclasses
import os
import re
import typing

import pytest
import yaml

from node.config import ConfigError, auto_workers, load, parse_duration, parse_size, usable_cores

REGISTRY2_FILE = """
version: 0.1
storage:
  filesystem:
    rootdirectory: /var/lib/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:5000
"""


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return str(path)


def test_registry2_minimal_file_loads_with_embedded_coordinator_inside_storage_root(tmp_path):
    config = load(_write(tmp_path, REGISTRY2_FILE), environ={})
    assert config.storage.filesystem is not None
    assert config.storage.filesystem.rootdirectory == "/var/lib/registry"
    assert config.storage.delete.enabled is True
    assert config.http.addr == "127.0.0.1:5000"
    assert config.coordinator.etcd is None
    assert config.coordinator.embedded is not None
    assert config.coordinator.embedded.path == "/var/lib/registry/wharf/coordinator.db"


def test_no_file_serves_loopback_with_embedded_defaults():
    config = load(None, environ={})
    assert config.http.addr == "127.0.0.1:5000"
    assert config.storage.filesystem is not None
    assert config.coordinator.embedded is not None
    assert config.source is None


def test_environment_overrides_nested_keys_like_distribution(tmp_path):
    env = {
        "REGISTRY_HTTP_TLS_CERTIFICATE": "/certs/domain.crt",
        "REGISTRY_HTTP_TLS_KEY": "/certs/domain.key",
        "REGISTRY_AUTH": "htpasswd",
        "REGISTRY_AUTH_HTPASSWD_REALM": "Registry Realm",
        "REGISTRY_AUTH_HTPASSWD_PATH": "/auth/htpasswd",
        "REGISTRY_STORAGE_DELETE_ENABLED": "false",
        "REGISTRY_HTTP_ADDR": "0.0.0.0:5002",
    }
    config = load(_write(tmp_path, REGISTRY2_FILE), environ=env)
    assert config.http.tls.certificate == "/certs/domain.crt"
    assert config.http.tls.key == "/certs/domain.key"
    assert config.auth.mode == "htpasswd"
    assert config.auth.htpasswd is not None
    assert (config.auth.htpasswd.realm, config.auth.htpasswd.path) == ("Registry Realm", "/auth/htpasswd")
    assert config.storage.delete.enabled is False
    assert config.http.addr == "0.0.0.0:5002"


def test_environment_selects_storage_driver(tmp_path):
    env = {"REGISTRY_STORAGE": "s3", "REGISTRY_STORAGE_S3_BUCKET": "images", "REGISTRY_COORDINATOR_ETCD_PREFIX": "/w/"}
    config = load(_write(tmp_path, REGISTRY2_FILE), environ=env)
    assert config.storage.filesystem is None
    assert config.storage.s3 is not None and config.storage.s3.bucket == "images"
    assert config.coordinator.etcd is not None and config.coordinator.etcd.prefix == "/w/"


def test_etcd_coordinator_section(tmp_path):
    text = REGISTRY2_FILE + "coordinator:\n  etcd:\n    endpoints: [http://10.0.0.1:2379, http://10.0.0.2:2379]\n"
    config = load(_write(tmp_path, text), environ={})
    assert config.coordinator.etcd is not None
    assert config.coordinator.etcd.endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert config.coordinator.embedded is None


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("version: 0.1\nstorage:\n  filesystem: {}\n  s3: {bucket: b}\n", "exactly one driver"),
        ("version: 0.1\nhttp:\n  adr: 1\n", "unknown configuration key http.adr"),
        ("- a list\n", "mapping"),
        ("version: 0.1\nhttp:\n  workers: many\n", "whole number"),
        ("version: [\n", "not valid YAML"),
        ("coordinator:\n  embedded: {}\n  etcd: {}\n", "exactly one backend"),
    ],
)
def test_bad_files_are_refused_with_a_clear_message(tmp_path, text, complaint):
    with pytest.raises(ConfigError, match=complaint):
        load(_write(tmp_path, text), environ={})


def test_durations_parse_like_go():
    assert parse_duration("30s") == 30
    assert parse_duration("2h") == 7200
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    assert parse_duration("12") == 12
    with pytest.raises(ConfigError):
        parse_duration("5 parsecs")


def test_example_cluster_config_in_deploy_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "deploy" / "cluster" / "config.yml"
    config = load(str(path), environ={})
    assert config.storage.s3 is not None and config.storage.s3.bucket == "wharf"
    assert config.coordinator.etcd is not None and len(config.coordinator.etcd.endpoints) == 3
    assert config.storage.redirect.disable is False


def test_backup_section_defaults_to_hourly_snapshots_kept_a_day():
    backup = load(None, environ={}).backup
    assert (backup.enabled, backup.interval_seconds, backup.keep) == (True, 3600, 24)


def test_backup_section_parses_its_interval_at_load(tmp_path):
    text = REGISTRY2_FILE + "backup:\n  interval: 15m\n  keep: 4\n"
    backup = load(_write(tmp_path, text), environ={"REGISTRY_BACKUP_ENABLED": "false"}).backup
    assert (backup.enabled, backup.interval_seconds, backup.keep) == (False, 900, 4)
    assert (
        load(_write(tmp_path, REGISTRY2_FILE), environ={"REGISTRY_BACKUP_INTERVAL": "90"}).backup.interval_seconds == 90
    )


@pytest.mark.parametrize(
    "section, complaint",
    [
        ("interval: soon", "backup.interval: expected a duration such as 30s.*got 'soon'"),
        ("interval: 0s", "backup.interval: expected a duration of at least 1s, got '0s'"),
        ("keep: 0", "backup.keep: expected at least 1 snapshot, got 0"),
        ("keep: all", "backup.keep: expected a whole number"),
        ("every: 1h", "unknown configuration key backup.every"),
    ],
)
def test_a_bad_backup_section_stops_start_up_naming_the_key(tmp_path, section, complaint):
    with pytest.raises(ConfigError, match=complaint):
        load(_write(tmp_path, REGISTRY2_FILE + f"backup:\n  {section}\n"), environ={})


# -- one grammar for sizes, durations and addresses, in every section --------------------------

SIZES = [
    ("1TB", 10**12),
    ("1G", 10**9),
    ("10GiB", 10 * 1024**3),
    ("500mb", 500 * 10**6),
    ("64 KiB", 64 * 1024),
    ("1.5GB", 1_500_000_000),
    ("5242880", 5242880),
    ("0x100000", 1024**2),
    (5242880, 5242880),
]


@pytest.mark.parametrize("text, size", SIZES)
def test_one_size_grammar_in_quotas_audit_and_s3(tmp_path, text, size):
    assert parse_size(text) == size
    sections = {
        "quotas": [{"repository": "team/app", "limit": text}],
        "audit": {"path": str(tmp_path / "audit.log"), "maxsize": text},
    }
    config = load(_write(tmp_path, yaml.safe_dump({**yaml.safe_load(REGISTRY2_FILE), **sections})), environ={})
    assert config.quotas[0].limit == size
    assert config.audit.maxsize == size
    s3 = load(
        _write(tmp_path, S3_FILE),
        environ={"REGISTRY_STORAGE_S3_CHUNKSIZE": str(text), "REGISTRY_STORAGE_S3_MULTIPARTCOPYCHUNKSIZE": str(text)},
    ).storage.s3
    assert s3 is not None and s3.chunksize == size and s3.multipartcopychunksize == size


S3_FILE = """
storage:
  s3: {bucket: images}
coordinator:
  embedded: {path: /tmp/wharf-test-never-opened.db}
"""


@pytest.mark.parametrize("text", ["lots", "-1", "1XB", "1.5.5MB", "10 GiB please", True])
def test_a_bad_size_names_the_key_the_value_and_the_grammar(tmp_path, text):
    doc = {"quotas": [{"namespace": "team/", "limit": text}]}
    with pytest.raises(ConfigError) as caught:
        load(_write(tmp_path, yaml.safe_dump(doc)), environ={})
    message = str(caught.value)
    assert message.startswith("quotas[0].limit: expected a size in bytes or with a unit, such as 500MB, 10GiB or 1TB")
    assert repr(text).lower() in message.lower() and "\n" not in message


def test_durations_follow_go_with_days_and_wharf_keys_take_bare_seconds(tmp_path):
    assert parse_duration("1.5h") == 5400
    assert parse_duration("2us") == pytest.approx(2e-6)
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration(90) == 90
    doc = {"gc": {"interval": 90, "grace": "1h30m", "orphaninterval": "7d"}}
    config = load(_write(tmp_path, yaml.safe_dump(doc)), environ={})
    assert (config.gc.interval, config.gc.grace, config.gc.orphaninterval) == (90, 5400, 7 * 86400)
    with pytest.raises(ConfigError, match="retention.interval: expected a duration of at least 1s, got '300ms'"):
        load(_write(tmp_path, "retention: {interval: 300ms}\n"), environ={})


@pytest.mark.parametrize(
    "key, text",
    [
        ("storage.maintenance.uploadpurging.age", "168"),
        ("http.draintimeout", "60"),
        ("health.storagedriver.interval", "10"),
    ],
)
def test_distribution_durations_need_a_unit_because_registry2_reads_bare_numbers_as_nanoseconds(tmp_path, key, text):
    variable = "REGISTRY_" + key.upper().replace(".", "_")
    with pytest.raises(ConfigError, match=f"{key}: expected a duration with a unit .* got {text}"):
        load(_write(tmp_path, REGISTRY2_FILE), environ={variable: text})
    config = load(_write(tmp_path, REGISTRY2_FILE), environ={variable: text + "s"})
    node: object = config
    for part in key.split("."):
        node = getattr(node, part)
    assert node == float(text)


@pytest.mark.parametrize(
    "addr, host, port, words",
    [
        (":5000", "", 5000, "all interfaces (IPv4 and IPv6) port 5000"),
        ("5000", "", 5000, "all interfaces (IPv4 and IPv6) port 5000"),
        ("0.0.0.0:5000", "0.0.0.0", 5000, "all IPv4 interfaces port 5000"),
        ("[::]:5000", "::", 5000, "all interfaces (IPv4 and IPv6) port 5000"),
        ("[::1]:5000", "::1", 5000, "[::1]:5000 only"),
        ("localhost:5000", "localhost", 5000, "localhost:5000 only"),
        ("127.0.0.1:65535", "127.0.0.1", 65535, "127.0.0.1:65535 only"),
    ],
)
def test_addresses_parse_at_load_and_a_port_alone_means_every_interface(addr, host, port, words):
    config = load(None, environ={"REGISTRY_HTTP_ADDR": addr, "REGISTRY_HTTP_DEBUG_ADDR": "127.0.0.1:5999"})
    assert (config.http.listen.host, config.http.listen.port) == (host, port)
    assert config.http.listen.describe() == words


@pytest.mark.parametrize(
    "addr", ["127.0.0.1:99999", "127.0.0.1:abc", "127.0.0.1:0", "::1:5000", "256.1.1.1:5000", "", "a b:5000", "[x]:1"]
)
def test_a_bad_address_names_the_key_and_the_value(addr):
    with pytest.raises(ConfigError) as caught:
        load(None, environ={"REGISTRY_HTTP_ADDR": addr})
    assert str(caught.value).startswith("http.addr: expected HOST:PORT")
    assert repr(addr) in str(caught.value)


def test_the_debug_listener_may_not_share_the_main_port():
    with pytest.raises(ConfigError, match="http.debug.addr: expected an address other than http.addr"):
        load(None, environ={"REGISTRY_HTTP_ADDR": ":5001", "REGISTRY_HTTP_DEBUG_ADDR": "127.0.0.1:5001"})
    assert load(None, environ={"REGISTRY_HTTP_ADDR": ":5001", "REGISTRY_HTTP_DEBUG_ADDR": ""}).http.debug.listen is None


def test_wharfs_default_debug_listener_gives_way_to_a_registry2_file_on_port_5001(tmp_path):
    # registry:2 has no debug listener unless the file names one: its file serving on :5001 must serve.
    config = load(_write(tmp_path, "version: 0.1\nhttp:\n  addr: :5001\n"), environ={})
    assert config.http.listen is not None and config.http.listen.port == 5001
    assert config.http.debug.listen is None
    assert len(config.warnings) == 1 and "no debug listener" in config.warnings[0]
    assert not load(_write(tmp_path, REGISTRY2_FILE), environ={}).warnings


def test_headers_take_distribution_lists_and_single_values(tmp_path):
    doc = {
        "http": {"headers": {"X-Content-Type-Options": ["nosniff"], "Strict-Transport-Security": "max-age=63072000"}}
    }
    config = load(_write(tmp_path, yaml.safe_dump(doc)), environ={})
    assert config.http.headers == {
        "X-Content-Type-Options": ["nosniff"],
        "Strict-Transport-Security": ["max-age=63072000"],
    }


@pytest.mark.parametrize(
    "headers, complaint",
    [
        ({"Bad Header": ["x"]}, "http.headers: expected header names"),
        ({"X-A": ["line\nbreak"]}, "http.headers.X-A: expected header values of printable ASCII"),
        ({"X-A": [{"a": 1}]}, "http.headers.X-A: expected a list of header values"),
        (["X-A"], "http.headers: expected a mapping of header names"),
    ],
)
def test_bad_headers_are_refused(tmp_path, headers, complaint):
    with pytest.raises(ConfigError, match=complaint):
        load(_write(tmp_path, yaml.safe_dump({"http": {"headers": headers}})), environ={})


# -- every Distribution section works or refuses ------------------------------------------------

ACCEPTED = [
    ("log: {fields: {service: registry, environment: staging}}", lambda c: c.log.fields["environment"] == "staging"),
    ("log: {formatter: text, level: DEBUG}", lambda c: (c.log.formatter, c.log.level) == ("text", "debug")),
    ("log: {formatter: logstash}", lambda c: c.log.formatter == "logstash"),
    ("log: {accesslog: {disabled: true}}", lambda c: c.log.accesslog.disabled),
    ("loglevel: warn", lambda c: c.log.level == "warn"),
    ("loglevel: debug\nlog: {level: error}", lambda c: c.log.level == "error"),
    ("storage: filesystem", lambda c: c.storage.filesystem is not None),
    (
        "storage: {cache: {blobdescriptor: redis}}",
        lambda c: "storage.cache.blobdescriptor" in " ".join(c.accepted_without_effect()),
    ),
    ("storage: {cache: {layerinfo: inmemory}}", lambda c: c.storage.cache.layerinfo == "inmemory"),
    ("storage: {maintenance: {readonly: {enabled: true}}}", lambda c: c.storage.maintenance.readonly.enabled),
    ("storage: {redirect: {disable: true}}", lambda c: c.storage.redirect.disable),
    (
        "redis: {addr: 'localhost:6379', password: x, db: 1, dialtimeout: 10ms, pool: {maxidle: 16, idletimeout: 300s}}",
        lambda c: (
            c.redis is not None
            and c.redis.pool.idletimeout == 300
            and any(n.startswith("redis:") for n in c.accepted_without_effect())
        ),
    ),
    (
        "health: {storagedriver: {enabled: true, interval: 10s, threshold: 3}}",
        lambda c: (c.health.storagedriver.interval, c.health.storagedriver.threshold) == (10, 3),
    ),
    (
        "health: {file: [{file: /tmp/down, interval: 1s}], http: [{uri: 'http://a/b', statuscode: 204, timeout: 3s}], tcp: [{addr: 'redis:6379', timeout: 3s}]}",
        lambda c: (
            (c.health.file[0].interval, c.health.http[0].statuscode, c.health.tcp[0].target.port) == (1, 204, 6379)
        ),
    ),
    (
        "notifications: {events: {includereferences: true}, endpoints: [{name: a, url: 'http://h/e', headers: {Authorization: [Bearer x]}, timeout: 500ms, threshold: 5, backoff: 1s, ignoredmediatypes: [application/octet-stream], ignore: {mediatypes: [a/b], actions: [pull]}}]}",
        lambda c: (
            (c.notifications.endpoints[0].timeout, c.notifications.endpoints[0].ignore.actions) == (0.5, ["pull"])
        ),
    ),
    (
        "compatibility: {schema1: {signingkeyfile: /etc/registry/key.json}}",
        lambda c: not c.compatibility.schema1.enabled,
    ),
    (
        "validation: {manifests: {urls: {allow: ['^https?://([^/]+\\.)*example\\.com/'], deny: ['^https?://www\\.example\\.com/']}}}",
        lambda c: (
            c.validation.url_refused("https://a.example.com/x") is None
            and c.validation.url_refused("https://www.example.com/x") is not None
        ),
    ),
    ("validation: {disabled: true}", lambda c: c.validation.url_refused("https://anywhere/x") is None),
    (
        "http: {secret: s, relativeurls: true, host: 'https://registry.example.com:5000/ignored', prefix: my/registry}",
        lambda c: (c.http.host, c.http.prefix) == ("https://registry.example.com:5000", "/my/registry/"),
    ),
    (
        "http: {draintimeout: 60s, http2: {disabled: true}}",
        lambda c: (c.http.draintimeout, c.http.http2.disabled) == (60, True),
    ),
    (
        "http: {tls: {certificate: /c.pem, key: /k.pem, clientcas: [/ca.pem], minimumtls: tls1.3}}",
        lambda c: c.http.tls.minimumtls == "tls1.3",
    ),
    ("http: {net: unix, addr: /run/wharf.sock}", lambda c: c.http.listen.path == "/run/wharf.sock"),
    (
        "http: {debug: {addr: 'localhost:5001', prometheus: {enabled: true, path: /metrics}}}",
        lambda c: c.http.debug.prometheus.path == "/metrics",
    ),
    ("proxy: {}", lambda c: not c.proxy.enabled),
    (
        "proxy: {remoteurl: 'https://registry-1.docker.io/', username: u, password: p, ttl: 24h}",
        lambda c: (
            c.proxy.mirror
            and [(u.prefix, u.remoteurl, u.username, u.ttl) for u in c.proxy.caches]
            == [("", "https://registry-1.docker.io", "u", 86400)]
        ),
    ),
    (
        "proxy: {upstreams: [{prefix: dockerhub, remoteurl: 'https://registry-1.docker.io', maxbytes: 50GiB},"
        " {prefix: quay/, remoteurl: 'https://quay.io', ttl: 1h}]}",
        lambda c: (
            not c.proxy.mirror
            and [(u.prefix, u.maxbytes, u.ttl) for u in c.proxy.caches]
            == [("dockerhub/", 50 * 1024**3, 168 * 3600), ("quay/", 0, 3600)]
            and c.proxy.caches[0].remote_name("dockerhub/library/alpine") == "library/alpine"
            and c.proxy.caches[0].remote_name("team/app") is None
        ),
    ),
    (
        "notifications: {endpoints: [{name: a, url: 'http://x/', timeout: 0, threshold: 0, ignore: {actions: [pull]}}]}",
        lambda c: (
            (c.notifications.endpoints[0].timeout_seconds, c.notifications.endpoints[0].threshold) == (1.0, 10)
            and not c.notifications.endpoints[0].accepts("pull", None)
            and c.notifications.endpoints[0].accepts("push", "application/vnd.oci.image.manifest.v1+json")
        ),
    ),
    (
        "http: {uploads: {maxsessions: 0, idletimeout: 90m}}",
        lambda c: (c.http.uploads.maxsessions, c.http.uploads.idletimeout) == (0, 5400),
    ),
]


@pytest.mark.parametrize("text, effect", ACCEPTED, ids=[t.split(":")[0] + str(i) for i, (t, _) in enumerate(ACCEPTED)])
def test_distribution_sections_wharf_honours_load_typed(tmp_path, text, effect):
    assert effect(load(_write(tmp_path, text + "\n"), environ={}))


REFUSED = [
    ("proxy: {remoteurl: 'registry-1.docker.io'}", "proxy.remoteurl: expected the upstream registry's URL"),
    (
        "proxy: {remoteurl: 'https://a.example.com', upstreams: [{prefix: b/, remoteurl: 'https://b.example.com'}]}",
        "proxy: either remoteurl",
    ),
    ("proxy: {remoteurl: 'https://a.example.com', ttl: 60}", "proxy.ttl: expected a duration with a unit"),
    ("proxy: {remoteurl: 'https://a.example.com', username: u}", "proxy.password: username and password go together"),
    (
        "proxy: {upstreams: [{prefix: hub/, remoteurl: 'https://a.example.com'}, {prefix: hub/x, remoteurl: 'https://b.example.com'}]}",
        r"proxy.upstreams\[1\].prefix: expected a prefix apart from upstreams\[0\]'s \(hub/\)",
    ),
    (
        "proxy: {upstreams: [{prefix: Hub, remoteurl: 'https://a.example.com'}]}",
        r"proxy.upstreams\[0\].prefix: expected a repository",
    ),
    (
        "proxy: {upstreams: [{prefix: hub/, remoteurl: 'https://a.example.com', maxbytes: lots}]}",
        r"proxy.upstreams\[0\].maxbytes: expected a size",
    ),
    ("middleware: {storage: [{name: cloudfront}]}", "middleware: registry, repository and storage middleware"),
    ("reporting: {bugsnag: {apikey: k}}", "reporting: bugsnag and newrelic"),
    ("policy: {repository: {classes: [image]}}", "policy: repository class policies"),
    ("log: {hooks: [{type: mail, levels: [panic]}]}", "log.hooks: log hooks"),
    ("http: {tls: {letsencrypt: {cachefile: /c, email: a@b}}}", "http.tls.letsencrypt: Let's Encrypt is not built in"),
    (
        "http: {tls: {ciphersuites: [TLS_AES_128_GCM_SHA256]}}",
        "http.tls.ciphersuites: cipher suites are not configurable",
    ),
    ("http: {tls: {minimumtls: tls1.0}}", "http.tls.minimumtls: expected tls1.2 or tls1.3"),
    ("auth: {silly: {realm: r, service: s}}", "auth.silly: silly auth"),
    ("storage: {inmemory: null}", "storage.inmemory: the inmemory driver is not supported"),
    ("storage: {azure: {accountname: a}}", "storage.azure: Wharf's storage drivers are filesystem and s3"),
    ("storage: {gcs: {bucket: b}}", "storage.gcs: Wharf's storage drivers"),
    ("storage: {swift: {username: u}}", "storage.swift: Wharf's storage drivers"),
    ("storage: {oss: {bucket: b}}", "storage.oss: Wharf's storage drivers"),
    (
        "storage: {cache: {blobdescriptor: memcached}}",
        "storage.cache.blobdescriptor: expected inmemory or redis, got 'memcached'",
    ),
    (
        "compatibility: {schema1: {enabled: true}}",
        "compatibility.schema1.enabled: expected false: Wharf stores no Docker schema1",
    ),
    ("version: 0.2", "version: expected 0.1"),
    (
        "notifications: {endpoints: [{name: a, url: 'http://h'}, {name: a, url: 'http://i'}]}",
        r"notifications.endpoints\[1\].name: expected a name of its own \(this one is used twice\)",
    ),
    (
        "notifications: {endpoints: [{name: a, url: 'http://h', ignore: {actions: [fly]}}]}",
        r"notifications.endpoints\[0\].ignore.actions: expected actions from pull, push, mount, delete",
    ),
    ("health: {http: [{uri: nowhere}]}", r"health.http\[0\].uri: expected an http:// or https:// URL"),
    ("validation: {manifests: {urls: {deny: ['(']}}}", "validation.manifests.urls.deny: expected a regular expression"),
    ("http: {uploads: {idletimeout: 5s}}", "http.uploads.idletimeout: expected a duration of at least 10s, got '5s'"),
]


@pytest.mark.parametrize("text, complaint", REFUSED, ids=[t.split(":")[0] + str(i) for i, (t, _) in enumerate(REFUSED)])
def test_distribution_sections_wharf_cannot_honour_stop_start_up_naming_them(tmp_path, text, complaint):
    with pytest.raises(ConfigError, match=complaint) as caught:
        load(_write(tmp_path, text + "\n"), environ={})
    assert "\n" not in str(caught.value)


def test_env_can_select_a_refused_driver_and_is_refused_too(tmp_path):
    with pytest.raises(ConfigError, match="storage.inmemory"):
        load(_write(tmp_path, REGISTRY2_FILE), environ={"REGISTRY_STORAGE": "inmemory"})
    with pytest.raises(ConfigError, match="auth.silly"):
        load(_write(tmp_path, REGISTRY2_FILE), environ={"REGISTRY_AUTH": "silly"})


def _sections(cls, seen=None):
    seen = seen if seen is not None else set()
    if cls in seen:
        return seen
    seen.add(cls)
    for f in dataclasses.fields(cls):
        for hint in [typing.get_type_hints(cls)[f.name], *typing.get_args(typing.get_type_hints(cls)[f.name])]:
            for inner in [hint, *typing.get_args(hint)]:
                if dataclasses.is_dataclass(inner):
                    _sections(inner, seen)
    return seen


def test_no_section_of_the_tree_is_an_untyped_mapping():
    from node.config import Config

    untyped = []
    for cls in _sections(Config):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if typing.get_origin(hint) is dict and typing.get_args(hint)[1:] in ((typing.Any,), ()):
                untyped.append(f"{cls.__name__}.{f.name}")
    assert untyped == []


def test_debians_stock_registry_config_loads_as_registry2_reads_it():
    config = load(DEBIAN_STOCK, environ={})
    assert config.log.fields == {"service": "registry"}
    assert config.storage.cache.blobdescriptor == "inmemory"
    assert (
        config.storage.filesystem is not None and config.storage.filesystem.rootdirectory == "/var/lib/docker-registry"
    )
    assert config.storage.delete.enabled
    assert config.http.listen.all_interfaces and config.http.listen.port == 5000
    assert config.http.headers == {"X-Content-Type-Options": ["nosniff"]}
    assert config.auth.htpasswd is not None and config.auth.htpasswd.realm == "basic-realm"
    driver = config.health.storagedriver
    assert (driver.enabled, driver.interval, driver.threshold) == (True, 10, 3)


DEBIAN_STOCK = "/etc/docker/registry/config.yml"


def test_policy_rules_built_in_code_are_parsed_and_compiled_as_from_a_file():
    from node.config import ImmutabilityRule, QuotaRule, RetentionPolicy

    assert RetentionPolicy(olderthan="30d").olderthan == 30 * 86400
    assert QuotaRule(repository="a", limit="1TB").limit == 10**12
    assert ImmutabilityRule(tags=["v[0-9]+"]).patterns[0].fullmatch("v12")
    with pytest.raises(ConfigError, match="tags: expected a regular expression"):
        ImmutabilityRule(tags=["v("])


def test_errors_are_one_line_and_hide_secrets(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(_write(tmp_path, "http:\n  addr: [\n  x: 1\n"), environ={})
    assert "\n" not in str(caught.value) and "line " in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load(_write(tmp_path, S3_FILE), environ={"REGISTRY_STORAGE_S3_SECRETKEY": "[hunter2]"})
    assert "hunter2" not in str(caught.value) and "storage.s3.secretkey" in str(caught.value)


REGIONS_FILE = """
version: 0.1
cluster:
  region: eu
storage:
  s3: {bucket: wharf-eu, regionendpoint: http://rgw.eu.internal:7480, publicendpoint: https://rgw.eu.example}
coordinator:
  etcd: {endpoints: [http://10.0.0.1:2379]}
regions:
  us:
    storage:
      s3: {bucket: wharf-us, regionendpoint: https://rgw.us.example}
    bandwidth: 200MiB
  ap:
    storage:
      filesystem: {rootdirectory: relative/ap}
"""


def test_regions_section_names_every_other_region_with_its_storage_and_bandwidth(tmp_path):
    config = load(_write(tmp_path, REGIONS_FILE), environ={})
    assert config.cluster.region == "eu"
    assert config.storage.s3 is not None and config.storage.s3.publicendpoint == "https://rgw.eu.example"
    assert list(config.regions) == ["us", "ap"]
    us = config.regions["us"]
    assert us.storage is not None and us.storage.s3 is not None and us.storage.s3.bucket == "wharf-us"
    assert us.bandwidth == 200 * 1024 * 1024
    ap = config.regions["ap"]
    assert ap.bandwidth is None
    assert ap.storage is not None and ap.storage.filesystem is not None
    assert ap.storage.filesystem.rootdirectory.startswith("/")  # made absolute at load, as storage's is


def test_a_file_without_regions_is_one_region_as_before(tmp_path):
    config = load(_write(tmp_path, REGISTRY2_FILE), environ={})
    assert config.regions == {} and config.cluster.region == ""


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("regions: {us: {storage: {filesystem: {}}}}\n", "cluster.region: this node's region, required with regions"),
        ("cluster: {region: EU}\n", "cluster.region: expected a region name"),
        ("cluster: {region: eu}\nregions: {eu: {storage: {filesystem: {}}}}\n", "regions.eu: only the other regions"),
        ("cluster: {region: eu}\nregions: {us: {}}\n", "regions.us.storage: that region's storage"),
        ("cluster: {region: eu}\nregions: {us: {storage: {s3: {}}}}\n", "regions.us.storage.s3.bucket"),
        ("cluster: {region: eu}\nregions: {us: {storage: {filesystem: {}}, bandwidth: 0}}\n", "bandwidth"),
        ("cluster: {region: eu}\nregions: {us: {storage: {filesystem: {}}, speed: 1}}\n", "unknown configuration key"),
        ("storage: {s3: {bucket: b, publicendpoint: 'ftp://x'}}\ncoordinator: {etcd: {}}\n", "publicendpoint"),
    ],
)
def test_bad_regions_stop_start_up_naming_the_key(tmp_path, text, complaint):
    with pytest.raises(ConfigError, match=re.escape(complaint)):
        load(_write(tmp_path, text), environ={})


def test_regional_deploy_files_load_and_name_the_same_regions():
    import shutil
    import subprocess
    from pathlib import Path

    deploy = Path(__file__).resolve().parent.parent / "deploy" / "regions"
    configs = {path.stem.removeprefix("config-"): load(str(path), environ={}) for path in deploy.glob("config-*.yml")}
    assert set(configs) == {"eu", "us"}
    for region, config in configs.items():
        assert config.cluster.region == region
        assert set(config.regions) | {region} == set(configs)
        assert config.storage.s3 is not None and config.storage.s3.publicendpoint
        other = next(iter(config.regions.values()))
        assert other.storage is not None and other.storage.s3 is not None and other.bandwidth
    # Each region's bucket is the same bucket wherever it is named.
    eu, us = configs["eu"], configs["us"]
    assert eu.storage.s3 == us.regions["eu"].storage.s3  # type: ignore[union-attr]
    assert us.storage.s3 == eu.regions["us"].storage.s3  # type: ignore[union-attr]
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    for cfg in deploy.glob("haproxy-*.cfg"):
        checked = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr


# -- http.workers: auto ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cores, embedded, workers",
    [(1, False, 1), (2, False, 1), (3, False, 1), (4, False, 2), (16, False, 8), (2, True, 1), (16, True, 1)],
)
def test_auto_workers_are_one_per_two_cores_and_one_on_the_embedded_coordinator(cores, embedded, workers):
    assert auto_workers(cores, embedded=embedded) == workers


ETCD = "coordinator:\n  etcd: {endpoints: ['http://127.0.0.1:2379']}\n"


@pytest.mark.parametrize(
    "text, environ, workers, auto",
    [
        ("version: 0.1\n", {}, 1, True),  # the embedded coordinator: one process
        ("version: 0.1\n" + ETCD, {}, 4, True),
        ("version: 0.1\nhttp: {workers: auto}\n" + ETCD, {}, 4, True),
        ("version: 0.1\nhttp: {workers: 3}\n" + ETCD, {}, 3, False),
        ("version: 0.1\nhttp: {workers: 3}\n" + ETCD, {"REGISTRY_HTTP_WORKERS": "auto"}, 4, True),
        ("version: 0.1\nhttp: {workers: 2}\n", {}, 2, False),  # asked for by name: given
    ],
)
def test_workers_default_to_auto_from_the_usable_cores(tmp_path, monkeypatch, text, environ, workers, auto):
    monkeypatch.setattr("node.config.usable_cores", lambda: 8)
    config = load(_write(tmp_path, text), environ=environ)
    assert (config.http.workers, config.http.workers_auto) == (workers, auto)


def test_usable_cores_are_this_process_cpu_set():
    assert usable_cores() == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.parametrize("value", ["0", "257", "-1", "some", "1.5"])
def test_workers_out_of_range_are_refused_naming_auto(tmp_path, value):
    with pytest.raises(
        ConfigError, match=r"http.workers: expected a whole number of worker processes from 1 to 256, or auto"
    ):
        load(_write(tmp_path, f"version: 0.1\nhttp: {{workers: '{value}'}}\n"), environ={})
