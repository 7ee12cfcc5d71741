"""Configuration: Distribution's config.yml as is, Wharf's sections, REGISTRY_* overrides."""

from __future__ import annotations

import pytest

from node.config import ConfigError, load, parse_duration

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
        "REGISTRY_HTTP_ADDR": "0.0.0.0:5001",
    }
    config = load(_write(tmp_path, REGISTRY2_FILE), environ=env)
    assert config.http.tls.certificate == "/certs/domain.crt"
    assert config.http.tls.key == "/certs/domain.key"
    assert config.auth.mode == "htpasswd"
    assert config.auth.htpasswd is not None
    assert (config.auth.htpasswd.realm, config.auth.htpasswd.path) == ("Registry Realm", "/auth/htpasswd")
    assert config.storage.delete.enabled is False
    assert config.http.addr == "0.0.0.0:5001"


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
        ("interval: soon", "backup.interval: invalid duration"),
        ("interval: 0s", "backup.interval must be at least 1s"),
        ("keep: 0", "backup.keep must be at least 1"),
        ("keep: all", "backup.keep: expected a whole number"),
        ("every: 1h", "unknown configuration key backup.every"),
    ],
)
def test_a_bad_backup_section_stops_start_up_naming_the_key(tmp_path, section, complaint):
    with pytest.raises(ConfigError, match=complaint):
        load(_write(tmp_path, REGISTRY2_FILE + f"backup:\n  {section}\n"), environ={})
