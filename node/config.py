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

from .storage import layout

DEFAULT_DATA_DIR = "./wharf-data"
DEFAULT_ROOT = os.path.join(DEFAULT_DATA_DIR, "registry")


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
class ReadOnlyConfig:
    """Distribution's storage.maintenance.readonly: pushes and deletes refused, pulls served.

    The cluster-wide switch (`wharf maintenance readonly on|off`) does the same without a restart.
    """

    enabled: bool = False


@dataclass
class MaintenanceConfig:
    uploadpurging: UploadPurging = field(default_factory=UploadPurging)
    readonly: ReadOnlyConfig = field(default_factory=ReadOnlyConfig)


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
class PrometheusConfig:
    """Distribution's http.debug.prometheus; Wharf exports its metrics unless told not to."""

    enabled: bool = True
    path: str = "/metrics"

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ConfigError(f"http.debug.prometheus.path: expected a path starting with /, not {self.path!r}")


@dataclass
class DebugConfig:
    # Prometheus metrics at /metrics; empty turns the listener off.
    addr: str = "127.0.0.1:5001"
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)


@dataclass
class UploadsConfig:
    """Wharf: bounds on open upload sessions."""

    # Open sessions one user (or, unauthenticated, one address) may hold; 0: no bound.
    maxsessions: int = 100
    # A session with no request for this long is removed with its bytes (by the leader).
    idletimeout: str = "1h"


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
    # Wharf: the ASGI server and its worker processes. Granian served about twice the small requests
    # per CPU-second of Hypercorn in loadtests/bench.py, and sends files without copying.
    server: str = "granian"
    workers: int = 1
    # Wharf: serve authentication over plain HTTP (only behind a TLS-terminating proxy).
    insecure: bool = False
    uploads: UploadsConfig = field(default_factory=UploadsConfig)


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
class GCConfig:
    """Online garbage collection, run by the cluster's leader on a schedule."""

    enabled: bool = True
    interval: str = "1h"
    # Nothing uploaded, linked, pushed or shown to a client within this long is collected.
    grace: str = "1h"
    # Also collect manifests no tag reaches (Distribution's --delete-untagged); children of a
    # tagged index and referrers of a live manifest are never untagged.
    deleteuntagged: bool = False
    # Sweeping storage for objects no record names lists the whole bucket: scheduled cycles do it
    # this often; `wharf gc` always does.
    orphaninterval: str = "24h"


@dataclass
class BackupConfig:
    """Coordinator snapshots the leader writes into the storage (`wharf/snapshots/`), for
    `wharf restore --from-storage`. Durations are parsed here, at load."""

    enabled: bool = True
    interval: str = "1h"
    # How many of the newest snapshots stay; older ones Wharf wrote there are deleted.
    keep: int = 24

    def __post_init__(self) -> None:
        try:
            self.interval_seconds = parse_duration(self.interval)
        except ConfigError as exc:
            raise ConfigError(f"backup.interval: {exc}") from None
        if self.interval_seconds < 1:
            raise ConfigError("backup.interval must be at least 1s")
        if self.keep < 1:
            raise ConfigError("backup.keep must be at least 1")


@dataclass
class ImmutabilityRule:
    """Tags matching `tags` (regular expressions, whole tag) in matching repositories never move."""

    repositories: list[str] = field(default_factory=lambda: ["**"])  # globs: * one segment, ** any
    tags: list[str] = field(default_factory=list)
    name: str = ""


@dataclass
class RetentionPolicy:
    """Which tags a repository keeps; the rest are deleted and GC reclaims what they freed.

    A tag is kept if it matches `keeptags`, is among the `keeplast` most recently pushed, or was
    pushed within `olderthan`. Signature and attestation tags (`sha256-<hex>.sig`, `.att`,
    `.sbom`) follow their subject. `untaggedafter` deletes manifests no tag reaches once older.
    """

    repositories: list[str] = field(default_factory=lambda: ["**"])
    keeplast: int | None = None
    keeptags: list[str] = field(default_factory=list)
    olderthan: str = ""
    untaggedafter: str = ""
    name: str = ""


@dataclass
class RetentionConfig:
    enabled: bool = True
    interval: str = "1h"
    policies: list[RetentionPolicy] = field(default_factory=list)


@dataclass
class QuotaRule:
    """A byte limit on what one repository, or every repository under a namespace, links."""

    repository: str = ""  # an exact repository name
    namespace: str = ""  # a prefix such as "team/" (every repository under it, together)
    limit: str = ""  # bytes, or with a unit: 500MiB, 10GiB, 1TB


@dataclass
class SignaturePolicy:
    """Pulls of images from matching repositories need a cosign signature by one of `keys`.

    `enforce` refuses an unsigned pull with DENIED; `warn` serves it, logs and counts it.
    `requiresignedtags` also refuses pointing a tag at an unsigned image. Keys are PEM public keys
    (ECDSA, RSA, Ed25519), read and checked at load into `public_keys`; globs compile into `patterns`.
    """

    name: str = ""
    repositories: list[str] = field(default_factory=lambda: ["**"])  # globs as in retention and immutability
    keys: list[str] = field(default_factory=list)
    mode: str = "enforce"
    requiresignedtags: bool = False

    def __post_init__(self) -> None:
        from .cosign import KeyInvalid, load_public_key_file
        from .policies import repository_pattern

        if not self.repositories or not all(isinstance(p, str) and p for p in self.repositories):
            raise ConfigError(f"signatures policy {self.name!r}: repositories needs at least one pattern")
        self.name = self.name or ",".join(self.repositories)
        where = f"signatures policy {self.name!r}"
        if self.mode not in ("enforce", "warn"):
            raise ConfigError(f"{where}: mode must be enforce or warn, not {self.mode!r}")
        if not self.keys:
            raise ConfigError(f"{where}: keys needs at least one public key file")
        self.patterns = [repository_pattern(p) for p in self.repositories]
        self.public_keys = []
        for i, path in enumerate(self.keys):
            try:
                self.public_keys.append(load_public_key_file(str(path)))
            except KeyInvalid as exc:
                raise ConfigError(f"{where}, keys[{i}]: {exc}") from None


@dataclass
class SignaturesConfig:
    """`signatures.policies`: the first policy whose repositories match a repository applies to it."""

    policies: list[SignaturePolicy] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [policy.name for policy in self.policies]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"signatures.policies: two policies are named {name!r}; names must be unique")


@dataclass
class ClusterConfig:
    # A name for this node in leader records and logs; host:port:pid when empty.
    node: str = ""
    # Seconds a leader's lease lives without a refresh: how fast another node takes over.
    leasettl: int = 10


@dataclass
class HtpasswdAuth:
    """Distribution's auth.htpasswd: users with bcrypt passwords in an Apache htpasswd file."""

    realm: str = "wharf"
    path: str = ""


@dataclass
class TokenAuth:
    """Distribution's auth.token, plus Wharf's own token service (on when `signingkey` is set)."""

    realm: str = ""  # where clients get tokens; empty with `signingkey`: this node's /auth/token
    service: str = ""  # the audience tokens must name
    issuer: str = ""
    rootcertbundle: str = ""  # certificates (or public keys) whose keys sign valid tokens
    autoredirect: bool = False
    signingalgorithms: list[str] = field(default_factory=list)
    # Wharf's token service: the private key it signs with (EC P-256/P-384 or RSA), its users
    # (an htpasswd file), and how long access and refresh tokens live.
    signingkey: str = ""
    htpasswd: str = ""
    expiration: str = "5m"
    refreshexpiration: str = "24h"


@dataclass
class AuthConfig:
    htpasswd: HtpasswdAuth | None = None
    token: TokenAuth | None = None
    silly: dict[str, Any] | None = None

    @property
    def mode(self) -> str | None:
        """The auth mode: htpasswd, token, or None when the registry is open."""
        if self.htpasswd is not None:
            return "htpasswd"
        return "token" if self.token is not None else None


@dataclass
class AccessRule:
    """Who may do what to which repositories; `*` and `**` globs as in zot."""

    repositories: list[str] = field(default_factory=lambda: ["**"])
    users: list[str] = field(default_factory=list)  # "*": every signed-in user
    groups: list[str] = field(default_factory=list)
    anonymous: bool = False  # also callers without credentials (pull only)
    actions: list[str] = field(default_factory=lambda: ["pull"])  # pull, push, delete or *


@dataclass
class AccessConfig:
    """Without rules every signed-in user may do everything and anonymous callers nothing."""

    groups: dict[str, list[str]] = field(default_factory=dict)
    rules: list[AccessRule] = field(default_factory=list)


@dataclass
class AuditConfig:
    """One hash-chained JSON line per decision (push, pull, delete, refusal); off without path or stdout."""

    path: str = ""
    stdout: bool = False
    maxsize: str = "100MB"  # rotate to path.1 ... beyond this size
    maxbackups: int = 5
    fsync: bool = False
    pulls: bool = True
    # How often the newest line's number and hash go to the coordinator (also at each rotation and
    # at shutdown), so lines cut from the end of the log are noticed.
    checkpoint: str = "10s"


@dataclass
class AuthFailureLimits:
    """Failed sign-ins allowed per window before a caller gets 429 for `backoff`; 0 turns a limit off."""

    peraddress: int = 20
    peruser: int = 10
    window: str = "1m"
    backoff: str = "1m"


@dataclass
class RateLimitConfig:
    authfailures: AuthFailureLimits = field(default_factory=AuthFailureLimits)


@dataclass
class NotificationIgnore:
    mediatypes: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)


_NOTIFICATION_ACTIONS = ("pull", "push", "mount", "delete")


@dataclass
class NotificationEndpoint:
    """One webhook, as in Distribution's notifications.endpoints (its defaults: 1s, 10, 1s)."""

    name: str = ""
    disabled: bool = False
    url: str = ""
    headers: dict[str, Any] = field(default_factory=dict)  # name: [values]
    timeout: str = "1s"
    threshold: int = 10  # consecutive failures before waiting `backoff` between tries
    backoff: str = "1s"
    ignoredmediatypes: list[str] = field(default_factory=list)
    ignore: NotificationIgnore = field(default_factory=NotificationIgnore)

    def __post_init__(self) -> None:
        where = f"notifications.endpoints[{self.name or '?'}]"
        if not self.name:
            raise ConfigError("notifications.endpoints: every endpoint needs a name")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.url: expected an http:// or https:// URL, not {self.url!r}")
        for key, value in (("timeout", self.timeout), ("backoff", self.backoff)):
            try:
                parse_duration(value)
            except ConfigError as exc:
                raise ConfigError(f"{where}.{key}: {exc}") from None
        # As in Distribution, zero (or less) means the default.
        self.timeout_seconds = parse_duration(self.timeout) if parse_duration(self.timeout) > 0 else 1.0
        self.backoff_seconds = parse_duration(self.backoff) if parse_duration(self.backoff) > 0 else 1.0
        if self.threshold <= 0:
            self.threshold = 10
        headers: dict[str, list[str]] = {}
        for header, values in self.headers.items():
            values = [values] if isinstance(values, str) else values
            if not isinstance(values, list) or not all(isinstance(v, (str, int, float)) for v in values):
                raise ConfigError(f"{where}.headers.{header}: expected a list of values")
            headers[str(header)] = [str(v) for v in values]
        self.headers = headers
        unknown = [a for a in self.ignore.actions if a not in _NOTIFICATION_ACTIONS]
        if unknown:
            raise ConfigError(
                f"{where}.ignore.actions: {unknown[0]!r} is not one of {', '.join(_NOTIFICATION_ACTIONS)}"
            )

    def accepts(self, action: str, media_type: str | None) -> bool:
        if self.disabled or action in self.ignore.actions:
            return False
        return not media_type or (media_type not in self.ignoredmediatypes and media_type not in self.ignore.mediatypes)


@dataclass
class NotificationEvents:
    includereferences: bool = False  # manifest events list the descriptors the manifest names


@dataclass
class NotificationsConfig:
    """Distribution's notifications: webhooks for pushes, pulls, mounts and deletes.

    Wharf queues events durably in the coordinator and the cluster's leader delivers them.
    """

    events: NotificationEvents = field(default_factory=NotificationEvents)
    endpoints: list[NotificationEndpoint] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [e.name for e in self.endpoints]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ConfigError(f"notifications.endpoints: the name {duplicated[0]!r} is used twice")


@dataclass
class Config:
    version: str = "0.1"
    log: LogConfig = field(default_factory=LogConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    gc: GCConfig = field(default_factory=GCConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    quotas: list[QuotaRule] = field(default_factory=list)
    immutability: list[ImmutabilityRule] = field(default_factory=list)
    auth: AuthConfig = field(default_factory=AuthConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    signatures: SignaturesConfig = field(default_factory=SignaturesConfig)
    # Sections parsed by later features; kept so that Distribution files load unchanged.
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
    # The coordinator is not named here: it follows the root, wherever a REGISTRY_* variable puts it.
    return {
        "storage": {
            "filesystem": {"rootdirectory": DEFAULT_ROOT},
            "delete": {"enabled": True},
        },
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
        storage.filesystem = FilesystemStorage(DEFAULT_ROOT)
    if storage.filesystem is not None:
        if not storage.filesystem.rootdirectory:
            raise ConfigError("storage.filesystem.rootdirectory must not be empty")
        # One meaning wherever a command runs from: the start-up line and every CLI name the same root.
        storage.filesystem.rootdirectory = os.path.abspath(storage.filesystem.rootdirectory)
    coordinator = config.coordinator
    if coordinator.embedded is not None and coordinator.etcd is not None:
        raise ConfigError("coordinator: configure exactly one backend (embedded or etcd)")
    if coordinator.etcd is None:
        if coordinator.embedded is None:
            coordinator.embedded = EmbeddedCoordinator()
        if not coordinator.embedded.path:
            if storage.filesystem is None:
                raise ConfigError("coordinator.embedded.path is required with non-filesystem storage")
            # Inside the storage root, outside Distribution's tree: the root alone is the whole registry.
            coordinator.embedded.path = embedded_path_in(storage.filesystem.rootdirectory)
        coordinator.embedded.path = os.path.abspath(coordinator.embedded.path)
    purging = storage.maintenance.uploadpurging
    for value in (purging.age, purging.interval, config.gc.interval, config.gc.grace, config.gc.orphaninterval):
        parse_duration(value)
    if parse_duration(config.http.uploads.idletimeout) < 10:
        raise ConfigError("http.uploads.idletimeout must be at least 10s")
    if config.http.uploads.maxsessions < 0:
        raise ConfigError("http.uploads.maxsessions must not be negative (0: no bound)")
    if config.cluster.leasettl < 2:
        raise ConfigError("cluster.leasettl must be at least 2 seconds")
    from .retention import rules_from  # the rules live with retention; checked here so a bad file fails at start

    rules_from(config.retention)
    if config.http.debug.addr and config.http.debug.addr == config.http.addr:
        raise ConfigError("http.debug.addr must differ from http.addr")
    if config.http.workers < 1:
        raise ConfigError("http.workers must be at least 1")
    if config.http.server not in ("hypercorn", "granian"):
        raise ConfigError("http.server must be hypercorn or granian")
    _check_security(config)


def embedded_path_in(root: str) -> str:
    """Where the embedded coordinator lives in a filesystem root: `<root>/wharf/coordinator.db`."""
    return os.path.join(os.path.abspath(root), layout.WHARF_DIR, "coordinator.db")


def legacy_embedded_paths(root: str) -> list[str]:
    """Where earlier Wharf versions kept the embedded coordinator of this root (beside it)."""
    root = os.path.abspath(root)
    found = [os.path.join(os.path.dirname(root), os.path.basename(root) + "-coordinator.db")]
    if root == os.path.abspath(DEFAULT_ROOT):
        found.append(os.path.join(os.path.dirname(root), "coordinator.db"))
    return found


_ACTIONS = ("pull", "push", "delete", "*")


def _check_security(config: Config) -> None:
    """The auth, access, audit and ratelimit sections: one auth mode, complete, rules that parse."""
    auth = config.auth
    if auth.silly is not None:
        raise ConfigError("auth.silly is not supported; use htpasswd or token")
    if auth.htpasswd is not None and auth.token is not None:
        raise ConfigError("auth: configure exactly one of htpasswd or token")
    if auth.htpasswd is not None and not auth.htpasswd.path:
        raise ConfigError("auth.htpasswd.path is required")
    token = auth.token
    if token is not None:
        for key in ("service", "issuer"):
            if not getattr(token, key):
                raise ConfigError(f"auth.token.{key} is required")
        if not token.rootcertbundle and not token.signingkey:
            raise ConfigError("auth.token: rootcertbundle (or signingkey, for the built-in token service) is required")
        if not token.realm and not token.signingkey:
            raise ConfigError("auth.token.realm is required when another service issues the tokens")
        if token.htpasswd and not token.signingkey:
            raise ConfigError("auth.token.htpasswd needs auth.token.signingkey (the built-in token service)")
        for value in (token.expiration, token.refreshexpiration):
            if parse_duration(value) <= 0:
                raise ConfigError("auth.token: token lifetimes must be positive")
    groups = config.access.groups
    for group, members in groups.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"access.groups.{group}: expected a list of user names")
    for i, rule in enumerate(config.access.rules):
        where = f"access.rules[{i}]"
        if not rule.repositories:
            raise ConfigError(f"{where}.repositories: at least one pattern is required")
        unknown = [a for a in rule.actions if a not in _ACTIONS]
        if unknown or not rule.actions:
            raise ConfigError(f"{where}.actions: each must be one of {', '.join(_ACTIONS)}")
        if rule.anonymous and set(rule.actions) != {"pull"}:
            raise ConfigError(f"{where}: anonymous callers may only be granted pull")
        missing = [g for g in rule.groups if g not in groups]
        if missing:
            raise ConfigError(f"{where}.groups: no such group {missing[0]!r} in access.groups")
    audit = config.audit
    if parse_size(audit.maxsize) < 1000:
        raise ConfigError("audit.maxsize must be at least 1KB")
    if audit.maxbackups < 0:
        raise ConfigError("audit.maxbackups must not be negative")
    if parse_duration(audit.checkpoint) <= 0:
        raise ConfigError("audit.checkpoint must be positive")
    limits = config.ratelimit.authfailures
    if limits.peraddress < 0 or limits.peruser < 0:
        raise ConfigError("ratelimit.authfailures: limits must not be negative")
    if parse_duration(limits.window) <= 0 or parse_duration(limits.backoff) <= 0:
        raise ConfigError("ratelimit.authfailures: window and backoff must be positive")


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
        item = (typing.get_args(hint) or (Any,))[0]
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]  # type: ignore[arg-type]
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


def parse_size(text: str) -> int:
    """'100MB', '64KiB', '1G' or a bare number of bytes."""
    text = str(text).strip()
    units = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "KI": 1024, "MI": 1024**2, "GI": 1024**3}
    number = text.rstrip("bBkKmMgGiI ")
    unit = text[len(number) :].strip().upper()
    unit = unit[:-1] if unit.endswith("B") and unit != "B" else unit
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"invalid size {text!r}") from None
    if unit not in units or value < 0:
        raise ConfigError(f"invalid size {text!r}")
    return int(value * units[unit])
