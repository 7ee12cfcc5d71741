"""The configuration tree: Distribution's config.yml plus Wharf's sections, with REGISTRY_* overrides."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

DEFAULT_DATA_DIR = "./wharf-data"


class ConfigError(ValueError):
    pass


@dataclass
class LogConfig:
    level: str = "info"
    formatter: str = "json"
    accesslog: dict[str, Any] = field(default_factory=dict)  # {disabled: bool}
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class FilesystemStorage:
    rootdirectory: str = "/var/lib/registry"
    maxthreads: int = 16


@dataclass
class S3Storage:
    bucket: str = ""
    region: str = "us-east-1"
    regionendpoint: str = ""
    accesskey: str = ""
    secretkey: str = ""
    rootdirectory: str = ""
    chunksize: int = 10 * 1024 * 1024
    forcepathstyle: bool = True
    encrypt: bool = False
    secure: bool = True
    v4auth: bool = True
    skipverify: bool = False
    multipartcopychunksize: int = 32 * 1024 * 1024
    multipartcopymaxconcurrency: int = 100
    multipartcopythresholdsize: int = 32 * 1024 * 1024
    storageclass: str = "STANDARD"


@dataclass
class Toggle:
    enabled: bool = False


@dataclass
class RedirectConfig:
    disable: bool = False


@dataclass
class UploadPurging:
    """Distribution's storage.maintenance.uploadpurging: abandoned upload sessions are removed."""

    enabled: bool = True
    age: str = "168h"
    interval: str = "24h"
    dryrun: bool = False


@dataclass
class MaintenanceConfig:
    uploadpurging: UploadPurging = field(default_factory=UploadPurging)
    readonly: dict[str, Any] = field(default_factory=dict)


@dataclass
class StorageConfig:
    filesystem: FilesystemStorage | None = None
    s3: S3Storage | None = None
    delete: Toggle = field(default_factory=Toggle)
    redirect: RedirectConfig = field(default_factory=RedirectConfig)
    # Accepted for compatibility with Distribution files; Wharf's caches are its own.
    cache: dict[str, Any] = field(default_factory=dict)
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    inmemory: dict[str, Any] | None = None


@dataclass
class TLSConfig:
    certificate: str = ""
    key: str = ""
    clientcas: list[str] = field(default_factory=list)
    minimumtls: str = ""


@dataclass
class DebugConfig:
    # Prometheus metrics at /metrics; empty turns the listener off.
    addr: str = "127.0.0.1:5001"
    prometheus: dict[str, Any] = field(default_factory=dict)


@dataclass
class HTTPConfig:
    addr: str = "127.0.0.1:5000"
    net: str = "tcp"
    prefix: str = ""
    host: str = ""
    # Distribution needs the same secret on every node; Wharf keeps upload state in the
    # coordinator and accepts the key only so existing files load.
    secret: str = ""
    relativeurls: bool = False
    draintimeout: str = ""
    tls: TLSConfig = field(default_factory=TLSConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    headers: dict[str, list[str]] = field(default_factory=dict)
    http2: dict[str, Any] = field(default_factory=dict)
    # Wharf: the ASGI server and its worker processes.
    server: str = "hypercorn"
    workers: int = 1


@dataclass
class EmbeddedCoordinator:
    path: str = ""


@dataclass
class EtcdTLS:
    ca: str = ""
    cert: str = ""
    key: str = ""


@dataclass
class EtcdCoordinator:
    endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:2379"])
    prefix: str = "/wharf/"
    username: str = ""
    password: str = ""
    tls: EtcdTLS = field(default_factory=EtcdTLS)
    timeout: float = 5.0


@dataclass
class CoordinatorConfig:
    embedded: EmbeddedCoordinator | None = None
    etcd: EtcdCoordinator | None = None


@dataclass
class ClusterConfig:
    # A name for this node in leader records and logs; host:port:pid when empty.
    node: str = ""
    # Seconds a leader's lease lives without a refresh: how fast another node takes over.
    leasettl: int = 10


@dataclass
class Config:
    version: str = "0.1"
    log: LogConfig = field(default_factory=LogConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Sections parsed by later features; kept so that Distribution files load unchanged.
    auth: dict[str, Any] = field(default_factory=dict)
    notifications: dict[str, Any] = field(default_factory=dict)
    redis: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    proxy: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    compatibility: dict[str, Any] = field(default_factory=dict)
    # Where the file came from; None when running on defaults.
    source: str | None = None

    @property
    def storage_driver(self) -> str:
        return "s3" if self.storage.s3 is not None else "filesystem"


# Sections whose single key names the driver, settable as REGISTRY_STORAGE=s3 like Distribution.
_TYPED_SECTIONS = {"storage": ("filesystem", "s3", "inmemory"), "auth": ("htpasswd", "token", "silly")}


def load(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (or nothing), apply REGISTRY_* overrides, fill defaults."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as handle:
                loaded = yaml.safe_load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        raw = loaded or {}
    else:
        raw = _no_file_defaults()
    for name in sorted(environ):
        if name.startswith("REGISTRY_") and name != "REGISTRY_CONFIGURATION_PATH":
            _apply_override(raw, name[len("REGISTRY_") :].lower().split("_"), environ[name])
    config = _build(Config, raw, "")
    config.source = path
    _finish(config, path)
    return config


def _no_file_defaults() -> dict[str, Any]:
    return {
        "storage": {
            "filesystem": {"rootdirectory": os.path.join(DEFAULT_DATA_DIR, "registry")},
            "delete": {"enabled": True},
        },
        "coordinator": {"embedded": {"path": os.path.join(DEFAULT_DATA_DIR, "coordinator.db")}},
    }


def _apply_override(raw: dict[str, Any], path: list[str], value: str) -> None:
    parsed = yaml.safe_load(value) if value != "" else ""
    if len(path) == 1 and path[0] in _TYPED_SECTIONS and isinstance(parsed, str):
        section = raw.get(path[0]) or {}
        for other in _TYPED_SECTIONS[path[0]]:
            if other != parsed:
                section.pop(other, None)
        section.setdefault(parsed, {})
        raw[path[0]] = section
        return
    node = raw
    for part in path[:-1]:
        existing = next((k for k in node if str(k).lower() == part), None)
        if existing is None or not isinstance(node[existing], dict):
            node[existing or part] = {}
        node = node[existing or part]
    leaf = next((k for k in node if str(k).lower() == path[-1]), path[-1])
    node[leaf] = parsed


def _finish(config: Config, path: str | None) -> None:
    storage = config.storage
    if storage.s3 is not None and storage.filesystem is not None:
        raise ConfigError("storage: configure exactly one driver (filesystem or s3)")
    if storage.inmemory is not None:
        raise ConfigError("storage.inmemory is not supported; use filesystem")
    if storage.s3 is None and storage.filesystem is None:
        storage.filesystem = FilesystemStorage(os.path.join(DEFAULT_DATA_DIR, "registry"))
    coordinator = config.coordinator
    if coordinator.embedded is not None and coordinator.etcd is not None:
        raise ConfigError("coordinator: configure exactly one backend (embedded or etcd)")
    if coordinator.etcd is None:
        if coordinator.embedded is None:
            coordinator.embedded = EmbeddedCoordinator()
        if not coordinator.embedded.path:
            if storage.filesystem is None:
                raise ConfigError("coordinator.embedded.path is required with non-filesystem storage")
            # Beside the storage root, so a registry:2 file needs nothing new.
            root = os.path.abspath(storage.filesystem.rootdirectory)
            coordinator.embedded.path = os.path.join(os.path.dirname(root), os.path.basename(root) + "-coordinator.db")
    purging = storage.maintenance.uploadpurging
    for value in (purging.age, purging.interval):
        parse_duration(value)
    if config.cluster.leasettl < 2:
        raise ConfigError("cluster.leasettl must be at least 2 seconds")
    if config.http.workers < 1:
        raise ConfigError("http.workers must be at least 1")
    if config.http.server not in ("hypercorn", "granian"):
        raise ConfigError("http.server must be hypercorn or granian")


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'configuration'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key, value in raw.items():
        name = str(key).lower()
        if name not in known:
            raise ConfigError(f"unknown configuration key {where + '.' if where else ''}{key}")
        kwargs[name] = _convert(hints[name], value, f"{where + '.' if where else ''}{name}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            # `filesystem:` with nothing under it still selects that driver.
            if dataclasses.is_dataclass(options[0]):
                return options[0]()  # type: ignore[operator]
            return {} if typing.get_origin(options[0]) is dict else None
        return _convert(options[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)  # type: ignore[arg-type]
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return value
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected a whole number")
        try:
            return int(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: expected a whole number") from exc
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected a number") from exc
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string")
        return "" if value is None else str(value)
    return value


def parse_duration(text: str) -> float:
    """'30s', '2h', '1h30m', '500ms' or a bare number of seconds."""
    text = str(text).strip()
    try:
        return float(text)
    except ValueError:
        pass
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total, number = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not number:
            raise ConfigError(f"invalid duration {text!r}")
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    if number:
        raise ConfigError(f"invalid duration {text!r}: missing unit")
    return total
