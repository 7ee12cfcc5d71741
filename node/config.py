"""The configuration tree: Distribution's config.yml plus Wharf's sections, with REGISTRY_* overrides.

Loaded and checked once, before any worker starts. Durations and sizes become numbers, addresses
are parsed, policy rules are compiled, and every Distribution section Wharf cannot honour stops
start-up with a message naming it. Every error is one line naming the key, the value and what is
expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml

from .cosign import KeyInvalid, load_public_key_file
from .patterns import repository_pattern
from .storage import layout

DEFAULT_DATA_DIR = "./wharf-data"
DEFAULT_ROOT = os.path.join(DEFAULT_DATA_DIR, "registry")


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration that cannot be served; the message is one line naming the key."""


class _FieldError(ConfigError):
    """A bad value, named relative to where it was found (a field of a section, a header name ...)."""

    def __init__(self, name: str | None, value: Any, expected: str) -> None:
        self.name, self.value, self.expected = name, value, expected
        super().__init__(_message(name, value, expected))

    def under(self, where: str) -> _FieldError:
        """The same error, named from one level further up."""
        return _FieldError(".".join(p for p in (where, self.name) if p) or None, self.value, self.expected)


def invalid(key: str, value: Any, expected: str) -> ConfigError:
    """The one shape of a configuration error: `key: expected ..., got VALUE`."""
    return ConfigError(_message(key, value, expected))


NO_VALUE: Any = object()  # for errors about a missing or misplaced key rather than a bad value
_SECRET_KEYS = ("password", "secret", "secretkey", "sessiontoken")


def _message(key: str | None, value: Any, expected: str) -> str:
    prefix = f"{key}: " if key else ""
    if value is NO_VALUE:
        return prefix + expected
    if key and key.rsplit(".", 1)[-1] in _SECRET_KEYS:
        shown = "(hidden)"
    elif isinstance(value, bool):
        shown = "true" if value else "false"  # as the YAML says it
    else:
        shown = repr(value[:120] if isinstance(value, str) else value)
        shown = shown if len(shown) <= 160 else shown[:157] + "..."
    return f"{prefix}expected {expected}, got {shown}"


# -- the grammars of values: durations, sizes, addresses, headers -------------------------------

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_UNITS["d"] = 86400.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
DURATION_EXPECTED = "a duration such as 30s, 10m, 1h30m, 7d or a number of seconds"
GO_DURATION_EXPECTED = (
    "a duration with a unit such as 500ms, 10s or 1h30m (registry:2 reads a bare number as nanoseconds)"
)


def parse_duration(text: str | float, *, unit_required: bool = False) -> float:
    """Seconds from Go's duration grammar ('30s', '1h30m', '500ms', '1.5h') plus days ('7d').

    A bare number is seconds for Wharf's own keys; for Distribution's keys (`unit_required`) only
    0 may go without a unit, since registry:2 would read the number as nanoseconds.
    """
    expected = GO_DURATION_EXPECTED if unit_required else DURATION_EXPECTED
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise _FieldError(None, text, expected)
    value = str(text).strip()
    if _NUMBER.fullmatch(value):
        seconds = float(value)
        if unit_required and seconds != 0:
            raise _FieldError(None, text, expected)
        return seconds
    total, position = 0.0, 0
    while position < len(value):
        match = _DURATION_PART.match(value, position)
        if match is None:
            raise _FieldError(None, text, expected)
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if not value:
        raise _FieldError(None, text, expected)
    return total


_SIZE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtp", start=1):
    _SIZE_UNITS[_letter] = _SIZE_UNITS[_letter + "b"] = 1000**_power
    _SIZE_UNITS[_letter + "i"] = _SIZE_UNITS[_letter + "ib"] = 1024**_power
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)")
SIZE_EXPECTED = (
    "a size in bytes or with a unit, such as 500MB, 10GiB or 1TB (K M G T P: powers of 1000; Ki Mi Gi Ti Pi: of 1024)"
)


def format_size(n: int) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 3.2 GiB (what logs, messages and commands print)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def parse_size(text: str | int) -> int:
    """Bytes: a whole number (Distribution's form, also `0x...` and `1_000`), or a number with a
    decimal (KB, MB, GB, TB, PB; also K, M ...) or binary (KiB, MiB, GiB, TiB, PiB) unit, any case."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise _FieldError(None, text, SIZE_EXPECTED)
    if isinstance(text, int):
        if text < 0:
            raise _FieldError(None, text, SIZE_EXPECTED)
        return text
    value = text.strip()
    try:
        whole = int(value, 0)
    except ValueError:
        pass
    else:
        if whole < 0:
            raise _FieldError(None, text, SIZE_EXPECTED)
        return whole
    match = _SIZE.fullmatch(value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise _FieldError(None, text, SIZE_EXPECTED)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class ListenAddress:
    """Where a listener binds: `host` empty means every interface, as `:5000` does in Distribution."""

    text: str
    host: str = ""
    port: int = 0
    path: str = ""  # a Unix socket (http.net: unix)

    @property
    def all_interfaces(self) -> bool:
        return not self.path and self.host in ("", "::", "0.0.0.0")

    def describe(self) -> str:
        """For the start-up line: which interfaces, in words an operator cannot misread."""
        if self.path:
            return f"unix socket {self.path}"
        if self.host in ("", "::"):
            return f"all interfaces (IPv4 and IPv6) port {self.port}"
        if self.host == "0.0.0.0":
            return f"all IPv4 interfaces port {self.port}"
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{shown}:{self.port} only"

    def overlaps(self, other: ListenAddress) -> bool:
        if self.path or other.path:
            return bool(self.path) and self.path == other.path
        return self.port == other.port and (self.all_interfaces or other.all_interfaces or self.host == other.host)


ADDRESS_EXPECTED = "HOST:PORT, [IPv6]:PORT or :PORT (every interface) with a port from 1 to 65535"
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


def parse_address(text: str, net: str = "tcp") -> ListenAddress:
    """`127.0.0.1:5000`, `[::1]:5000`, `localhost:5000`, `:5000` or `5000` (every interface)."""
    value = str(text).strip()
    if net == "unix":
        if not value or "\0" in value:
            raise _FieldError(None, text, "the path of a Unix socket (http.net: unix)")
        return ListenAddress(value, path=os.path.abspath(value))
    host, colon, port_text = value.rpartition(":")
    if not colon:
        host, port_text = "", value
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            if not isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
                raise ValueError(host)
        except ValueError:
            raise _FieldError(None, text, ADDRESS_EXPECTED) from None
    elif ":" in host:
        raise _FieldError(None, text, ADDRESS_EXPECTED + "; IPv6 addresses go in brackets, as [::1]:5000")
    elif host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            # Neither an address nor a host name (256.1.1.1 is no host name either).
            if not _HOSTNAME.fullmatch(host) or host.replace(".", "").isdigit():
                raise _FieldError(None, text, ADDRESS_EXPECTED) from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _FieldError(None, text, ADDRESS_EXPECTED)
    return ListenAddress(value, host, int(port_text))


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HEADERS_EXPECTED = "a mapping of header names to lists of values, such as X-Content-Type-Options: [nosniff]"


def parse_headers(value: Any) -> dict[str, list[str]]:
    """Distribution's `http.Header` in YAML: name -> list of values (a single value is taken as a list)."""
    if not isinstance(value, dict):
        raise _FieldError(None, value, HEADERS_EXPECTED)
    headers: dict[str, list[str]] = {}
    for name, values in value.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise _FieldError(None, name, "header names of letters, digits and !#$%&'*+-.^_`|~")
        if isinstance(values, (str, int, float)) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, list) or not all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values
        ):
            raise _FieldError(name, values, "a list of header values")
        texts = [str(v) for v in values]
        if any(ch in v for v in texts for ch in "\r\n\0") or not all(v.isascii() for v in texts):
            raise _FieldError(name, values, "header values of printable ASCII, without line breaks")
        headers[name] = texts
    return headers


def parse_log_fields(value: Any) -> dict[str, object]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in value.items()
    ):
        raise _FieldError(None, value, "a mapping of field names to plain values, such as service: registry")
    return dict(value)


AUTO_WORKERS = 0  # `http.workers: auto`, until _finish makes it a number
WORKERS_EXPECTED = "a whole number of worker processes from 1 to 256, or auto"


def parse_workers(value: str | int) -> int:
    """`http.workers`: 1 to 256, or `auto` (AUTO_WORKERS: the machine's cores and the coordinator decide)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return AUTO_WORKERS
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _FieldError(None, value, WORKERS_EXPECTED)
    try:
        workers = int(value)
    except ValueError:
        raise _FieldError(None, value, WORKERS_EXPECTED) from None
    if not 1 <= workers <= 256:
        raise _FieldError(None, value, WORKERS_EXPECTED)
    return workers


def auto_workers(cores: int, *, embedded: bool) -> int:
    """What `http.workers: auto` (the default) runs: one worker on the embedded coordinator, else one
    for every two usable cores.

    A worker's Python runs on one core, and granian's I/O threads, the kernel's network stack and the
    storage and coordinator clients keep about as much again busy beside it, so a worker per core
    would leave them none; each further worker also costs about as much memory as the first (a node
    of one worker is one process within 100 MiB, issue 13). loadtests/bench_hotpaths.py prints what
    `--workers N` buys over one worker in the same run. The embedded coordinator is one SQLite file
    for one process: several workers on it raced on its leases and upload sessions (500s) there.
    """
    return 1 if embedded else max(1, cores // 2)


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # no CPU sets here (macOS)


class _Grammar:
    """A value grammar attached to a field's type (`Duration`, `Size` ...): how text becomes a value."""

    def __init__(self, parse: Callable[[Any], Any], expected: str, empty: Callable[[], Any] | None = None) -> None:
        self.parse = parse
        self.expected = expected
        self.empty = empty  # what an empty key (`headers:`) means, when it means something


# Seconds. Wharf's keys: a bare number is seconds. Distribution's keys (GoDuration): a unit is required.
Duration = Annotated[float, _Grammar(parse_duration, DURATION_EXPECTED)]
GoDuration = Annotated[float, _Grammar(lambda v: parse_duration(v, unit_required=True), GO_DURATION_EXPECTED)]
Size = Annotated[int, _Grammar(parse_size, SIZE_EXPECTED)]  # bytes
Headers = Annotated[dict[str, list[str]], _Grammar(parse_headers, HEADERS_EXPECTED, dict)]
LogFields = Annotated[dict[str, object], _Grammar(parse_log_fields, "a mapping of field names to plain values", dict)]
Workers = Annotated[int, _Grammar(parse_workers, WORKERS_EXPECTED)]


class _Section:
    """A dataclass of the tree. Built from a file, its values arrive parsed (see `_convert`); built
    in code, text given for a duration or a size is parsed here. `check()` runs either way, so no
    caller ever holds an unparsed duration or an unchecked rule."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            grammar = _grammar_of(_hints(type(self))[f.name])
            value = getattr(self, f.name)
            if grammar is None or not f.init or not isinstance(value, str):
                continue
            try:
                setattr(self, f.name, _parse(grammar, value, _unwrap(_hints(type(self))[f.name])[1]))
            except _FieldError as exc:
                raise exc.under(f.name) from None
        self.check()

    def check(self) -> None:
        """Rules of one section beyond the types of its fields; raise _FieldError naming the field."""


def _parse(grammar: _Grammar, value: Any, optional: bool) -> Any:
    if value is None or value == "":
        if optional:
            return None
        if grammar.empty is not None:
            return grammar.empty()
        raise _FieldError(None, value, grammar.expected)
    return grammar.parse(value)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return hints


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the hint without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return options[0], len(options) < len(typing.get_args(hint))
    return hint, False


def _grammar_of(hint: Any) -> _Grammar | None:
    inner, _ = _unwrap(hint)
    if typing.get_origin(inner) is Annotated:
        for extra in inner.__metadata__:
            if isinstance(extra, _Grammar):
                return extra
    return None


# -- log -------------------------------------------------------------------------------------

LOG_LEVELS = ("error", "warn", "info", "debug")
LOG_FORMATTERS = ("json", "text", "logstash")


@dataclass
class AccessLogConfig(_Section):
    disabled: bool = False


@dataclass
class LogConfig(_Section):
    """Distribution's log section. Wharf writes JSON unless `formatter` says text or logstash."""

    level: str = "info"
    formatter: str = "json"
    fields: LogFields = field(default_factory=dict)  # added to every line, the server's own included
    accesslog: AccessLogConfig = field(default_factory=AccessLogConfig)

    def check(self) -> None:
        self.level = self.level.lower()
        if self.level == "warning":
            self.level = "warn"
        if self.level not in LOG_LEVELS:
            raise _FieldError("level", self.level, "one of " + ", ".join(LOG_LEVELS))
        self.formatter = self.formatter.lower()
        if self.formatter not in LOG_FORMATTERS:
            raise _FieldError("formatter", self.formatter, "one of " + ", ".join(LOG_FORMATTERS))


# -- storage ---------------------------------------------------------------------------------


@dataclass
class FilesystemStorage(_Section):
    rootdirectory: str = "/var/lib/registry"
    maxthreads: int = 16

    def check(self) -> None:
        if not self.rootdirectory.strip():
            raise _FieldError("rootdirectory", self.rootdirectory, "a directory path")
        if "\0" in self.rootdirectory:
            raise _FieldError("rootdirectory", self.rootdirectory, "a directory path")
        if not 1 <= self.maxthreads <= 1024:
            raise _FieldError("maxthreads", self.maxthreads, "a number of threads from 1 to 1024")


@dataclass
class S3Storage(_Section):
    bucket: str = ""
    region: str = "us-east-1"
    regionendpoint: str = ""
    accesskey: str = ""
    secretkey: str = ""
    rootdirectory: str = ""
    chunksize: Size = 10 * 1024 * 1024
    forcepathstyle: bool = True
    encrypt: bool = False
    secure: bool = True
    v4auth: bool = True
    skipverify: bool = False
    # Accepted so Distribution files load; Wharf never copies a committed blob server-side.
    multipartcopychunksize: Size = 32 * 1024 * 1024
    multipartcopymaxconcurrency: int = 100
    multipartcopythresholdsize: Size = 32 * 1024 * 1024
    storageclass: str = "STANDARD"
    # Where clients reach the storage: used only to sign redirect URLs (nodes talk to regionendpoint).
    publicendpoint: str = ""

    def check(self) -> None:
        for name in ("regionendpoint", "publicendpoint"):
            value = getattr(self, name)
            if value:
                parts = urlsplit(value if "://" in value else "//" + value)
                if parts.scheme not in ("", "http", "https") or not parts.hostname:
                    raise _FieldError(name, value, "a URL such as https://s3.example.com")


@dataclass
class Toggle(_Section):
    enabled: bool = False


@dataclass
class RedirectConfig(_Section):
    disable: bool = False


@dataclass
class CacheConfig(_Section):
    """Distribution's blob descriptor cache. Accepted: Wharf caches what is immutable on its own."""

    blobdescriptor: str = ""
    layerinfo: str = ""  # the key's old name in Distribution

    def check(self) -> None:
        for name in ("blobdescriptor", "layerinfo"):
            if getattr(self, name) not in ("", "inmemory", "redis"):
                raise _FieldError(name, getattr(self, name), "inmemory or redis")


@dataclass
class UploadPurging(_Section):
    """Distribution's storage.maintenance.uploadpurging: abandoned upload sessions are removed."""

    enabled: bool = True
    age: GoDuration = 168 * 3600.0
    interval: GoDuration = 24 * 3600.0
    dryrun: bool = False

    def check(self) -> None:
        if self.enabled and self.interval <= 0:
            raise _FieldError("interval", self.interval, "a positive duration")
        if self.enabled and self.age <= 0:
            raise _FieldError("age", self.age, "a positive duration")


@dataclass
class ReadOnlyConfig(_Section):
    """Distribution's storage.maintenance.readonly: pulls are served, writes refused."""

    enabled: bool = False


@dataclass
class MaintenanceConfig(_Section):
    uploadpurging: UploadPurging = field(default_factory=UploadPurging)
    readonly: ReadOnlyConfig = field(default_factory=ReadOnlyConfig)


@dataclass
class StorageConfig(_Section):
    filesystem: FilesystemStorage | None = None
    s3: S3Storage | None = None
    delete: Toggle = field(default_factory=Toggle)
    redirect: RedirectConfig = field(default_factory=RedirectConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)

    def check(self) -> None:
        if self.s3 is not None and self.filesystem is not None:
            raise _FieldError(None, NO_VALUE, "configure exactly one driver (filesystem or s3), not both")


# -- http ------------------------------------------------------------------------------------

TLS_VERSIONS = ("tls1.2", "tls1.3")


@dataclass
class TLSConfig(_Section):
    certificate: str = ""
    key: str = ""
    clientcas: list[str] = field(default_factory=list)  # clients must present a certificate one of these signed
    minimumtls: str = "tls1.2"

    def check(self) -> None:
        if bool(self.certificate) != bool(self.key):
            missing = "key" if self.certificate else "certificate"
            raise _FieldError(missing, NO_VALUE, "certificate and key are set together")
        if self.clientcas and not self.certificate:
            raise _FieldError("clientcas", self.clientcas, "a certificate and key to go with client CAs")
        self.minimumtls = (self.minimumtls or "tls1.2").lower()
        if self.minimumtls not in TLS_VERSIONS:
            raise _FieldError(
                "minimumtls", self.minimumtls, "tls1.2 or tls1.3 (tls1.0 and tls1.1 are obsolete, RFC 8996)"
            )


@dataclass
class PrometheusConfig(_Section):
    """Distribution's http.debug.prometheus: the metrics endpoint on the debug listener."""

    enabled: bool = True
    path: str = "/metrics"

    def check(self) -> None:
        if not self.path.startswith("/") or any(c in self.path for c in " ?#\r\n"):
            raise _FieldError("path", self.path, "a URL path such as /metrics")


@dataclass
class DebugConfig(_Section):
    # Prometheus metrics at /metrics; empty turns the listener off.
    addr: str = "127.0.0.1:5001"
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    listen: ListenAddress | None = field(default=None, init=False, repr=False)
    # Whether the file or a variable names `addr`. Wharf's default is a courtesy registry:2 does not
    # offer, so it gives way (with a warning) where it would stop a registry:2 file from serving.
    given: bool = field(default=False, init=False, repr=False)

    def check(self) -> None:
        if self.addr:
            try:
                self.listen = parse_address(self.addr)
            except _FieldError as exc:
                raise exc.under("addr") from None


@dataclass
class UploadsConfig(_Section):
    """Wharf: bounds on open upload sessions."""

    # Open sessions one user (or, unauthenticated, one address) may hold; 0: no bound.
    maxsessions: int = 100
    # A session with no request for this long is removed with its bytes (by the leader).
    idletimeout: Duration = 3600.0

    def check(self) -> None:
        if self.maxsessions < 0:
            raise _FieldError("maxsessions", self.maxsessions, "a number of sessions, 0 (no bound) or more")
        if self.idletimeout < 10:
            raise _FieldError("idletimeout", self.idletimeout, "a duration of at least 10s")


@dataclass
class HTTP2Config(_Section):
    disabled: bool = False


SERVERS = ("granian", "hypercorn")


@dataclass
class HTTPConfig(_Section):
    addr: str = "127.0.0.1:5000"
    net: str = "tcp"
    prefix: str = ""  # serve under this path, as Distribution does: /prefix/v2/...
    host: str = ""  # absolute URLs in Location and Link headers start with it
    # Distribution needs the same secret on every node; Wharf keeps upload state in the
    # coordinator and accepts the key only so existing files load.
    secret: str = ""
    relativeurls: bool = False
    draintimeout: GoDuration | None = None
    tls: TLSConfig = field(default_factory=TLSConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    headers: Headers = field(default_factory=dict)
    http2: HTTP2Config = field(default_factory=HTTP2Config)
    # Wharf: the ASGI server and its worker processes. Granian served about twice the small requests
    # per CPU-second of Hypercorn in loadtests/bench.py, and sends files without copying.
    server: str = "granian"
    workers: Workers = AUTO_WORKERS  # see auto_workers()
    # Wharf: serve authentication over plain HTTP (only behind a TLS-terminating proxy).
    insecure: bool = False
    # Wharf: the load balancers and proxies (addresses or CIDR networks) whose X-Forwarded-For names
    # the client: sign-in limits, the access log and the audit then see the client, not the proxy.
    trustedproxies: list[str] = field(default_factory=list)
    uploads: UploadsConfig = field(default_factory=UploadsConfig)
    proxies: tuple[IPNetwork, ...] = field(default=(), init=False, repr=False)
    listen: ListenAddress = field(default=ListenAddress("127.0.0.1:5000", "127.0.0.1", 5000), init=False, repr=False)
    workers_auto: bool = field(default=False, init=False, repr=False)  # `workers` came from auto_workers()

    def check(self) -> None:
        self.net = self.net.lower() or "tcp"
        if self.net not in ("tcp", "unix"):
            raise _FieldError("net", self.net, "tcp or unix")
        try:
            self.listen = parse_address(self.addr, self.net)
        except _FieldError as exc:
            raise exc.under("addr") from None
        segments = [segment for segment in self.prefix.split("/") if segment]
        if any(not re.fullmatch(r"[A-Za-z0-9._~-]+", segment) or segment in (".", "..") for segment in segments):
            raise _FieldError("prefix", self.prefix, "a path such as /my/registry/")
        self.prefix = "/" + "/".join(segments) + "/" if segments else ""
        if self.host:
            parts = urlsplit(self.host)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
                raise _FieldError("host", self.host, "an absolute URL such as https://registry.example.com:5000")
            self.host = f"{parts.scheme}://{parts.netloc}"  # as Distribution: its path is not used
        if self.server not in SERVERS:
            raise _FieldError("server", self.server, "granian or hypercorn")
        if self.workers != AUTO_WORKERS and not 1 <= self.workers <= 256:
            raise _FieldError("workers", self.workers, WORKERS_EXPECTED)
        if self.draintimeout is not None and self.draintimeout > 3600:
            raise _FieldError("draintimeout", self.draintimeout, "at most 1h")
        networks = []
        for n, proxy in enumerate(self.trustedproxies):
            try:
                networks.append(ipaddress.ip_network(str(proxy).strip(), strict=False))
            except ValueError:
                raise _FieldError(f"trustedproxies[{n}]", proxy, "an IP address or network (10.0.0.0/8)") from None
        self.proxies = tuple(networks)


# -- coordinator and cluster (Wharf) ------------------------------------------------------------


@dataclass
class EmbeddedCoordinator(_Section):
    path: str = ""


@dataclass
class EtcdTLS(_Section):
    ca: str = ""
    cert: str = ""
    key: str = ""


@dataclass
class EtcdCompaction(_Section):
    """The leader compacts etcd's history this often (0 turns it off, for operators who compact
    themselves), keeping `keep` revisions behind the current one and everything younger than one
    interval, for watches that resume and snapshots being read."""

    interval: Duration = 300.0
    keep: int = 10_000

    def check(self) -> None:
        if self.interval != 0 and self.interval < 1:
            raise _FieldError("interval", self.interval, "a duration of at least 1s, or 0 to turn compaction off")
        if self.keep < 0:
            raise _FieldError("keep", self.keep, "a number of revisions, 0 or more")


@dataclass
class EtcdCoordinator(_Section):
    endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:2379"])
    prefix: str = "/wharf/"
    username: str = ""
    password: str = ""
    tls: EtcdTLS = field(default_factory=EtcdTLS)
    timeout: Duration = 5.0
    compaction: EtcdCompaction = field(default_factory=EtcdCompaction)

    def check(self) -> None:
        if not self.endpoints:
            raise _FieldError("endpoints", self.endpoints, "at least one etcd URL such as http://10.0.0.1:2379")
        for endpoint in self.endpoints:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise _FieldError("endpoints", endpoint, "etcd URLs such as http://10.0.0.1:2379")
            try:
                parts.port  # noqa: B018 (raises on a bad port)
            except ValueError:
                raise _FieldError("endpoints", endpoint, "etcd URLs such as http://10.0.0.1:2379") from None
        if not self.prefix:
            raise _FieldError("prefix", self.prefix, "a key prefix such as /wharf/")
        if self.timeout <= 0:
            raise _FieldError("timeout", self.timeout, "a positive duration")


@dataclass
class CoordinatorConfig(_Section):
    embedded: EmbeddedCoordinator | None = None
    etcd: EtcdCoordinator | None = None

    def check(self) -> None:
        if self.embedded is not None and self.etcd is not None:
            raise _FieldError(None, NO_VALUE, "configure exactly one backend (embedded or etcd), not both")


REGION_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
REGION_EXPECTED = "a region name: lower-case letters, digits and '-', at most 63 (eu, us-east-1)"


@dataclass
class ClusterConfig(_Section):
    # A name for this node in leader records and logs; host:port:pid when empty.
    node: str = ""
    # Seconds a leader's lease lives without a refresh: how fast another node takes over.
    leasettl: int = 10
    # This node's region (with `regions:`, the others); its storage is `storage.*`.
    region: str = ""

    def check(self) -> None:
        if not 2 <= self.leasettl <= 3600:
            raise _FieldError("leasettl", self.leasettl, "a number of seconds from 2 to 3600")
        if self.region and not REGION_NAME.fullmatch(self.region):
            raise _FieldError("region", self.region, REGION_EXPECTED)


# -- regions (Wharf) -----------------------------------------------------------------------------


@dataclass
class RegionStorage(_Section):
    """Another region's storage: one driver, as under `storage`."""

    filesystem: FilesystemStorage | None = None
    s3: S3Storage | None = None


@dataclass
class RegionConfig(_Section):
    """One other region: where its blobs are kept, and how fast this region's nodes copy into it."""

    storage: RegionStorage | None = None
    # Bytes per second of replication into that region, shared by this region's nodes; none: no limit.
    bandwidth: Size | None = None

    def check(self) -> None:
        if self.storage is None or (self.storage.s3 is None) == (self.storage.filesystem is None):
            raise _FieldError("storage", NO_VALUE, "that region's storage: exactly one driver, filesystem or s3")
        if self.storage.s3 is not None and not self.storage.s3.bucket:
            raise _FieldError("storage.s3.bucket", NO_VALUE, "a bucket name is required")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise _FieldError("bandwidth", self.bandwidth, "a positive size per second such as 200MiB")


# -- housekeeping and policies (Wharf) ----------------------------------------------------------


@dataclass
class GCConfig(_Section):
    """Online garbage collection, run by the cluster's leader on a schedule."""

    enabled: bool = True
    interval: Duration = 3600.0
    # Nothing uploaded, linked, pushed or shown to a client within this long is collected.
    grace: Duration = 3600.0
    # Also collect manifests no tag reaches (Distribution's --delete-untagged); children of a
    # tagged index and referrers of a live manifest are never untagged.
    deleteuntagged: bool = False
    # Sweeping storage for objects no record names lists the whole bucket: scheduled cycles do it
    # this often; `wharf gc` always does.
    orphaninterval: Duration = 86400.0

    def check(self) -> None:
        for name in ("interval", "orphaninterval"):
            if getattr(self, name) < 1:
                raise _FieldError(name, getattr(self, name), "a duration of at least 1s")


@dataclass
class BackupConfig(_Section):
    """Coordinator snapshots the leader writes into the storage (`wharf/snapshots/`), for
    `wharf restore --from-storage`."""

    enabled: bool = True
    interval: Duration = 3600.0
    # How many of the newest snapshots stay; older ones Wharf wrote there are deleted.
    keep: int = 24

    def check(self) -> None:
        if self.interval < 1:
            raise _FieldError("interval", self.interval, "a duration of at least 1s")
        if self.keep < 1:
            raise _FieldError("keep", self.keep, "at least 1 snapshot")

    @property
    def interval_seconds(self) -> float:
        return self.interval


def _compile_patterns(name: str, patterns: list[str]) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise _FieldError(name, pattern, f"a regular expression ({exc})") from None
    return tuple(compiled)


@dataclass
class ImmutabilityRule(_Section):
    """Tags matching `tags` (regular expressions, whole tag) in matching repositories never move."""

    repositories: list[str] = field(default_factory=lambda: ["**"])  # globs: * one segment, ** any
    tags: list[str] = field(default_factory=list)
    name: str = ""
    patterns: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False)

    def check(self) -> None:
        if not self.repositories:
            raise _FieldError("repositories", self.repositories, "at least one repository pattern")
        if not self.tags:
            raise _FieldError("tags", self.tags, "at least one tag pattern (a regular expression)")
        self.patterns = _compile_patterns("tags", self.tags)


@dataclass
class RetentionPolicy(_Section):
    """Which tags a repository keeps; the rest are deleted and GC reclaims what they freed.

    A tag is kept if it matches `keeptags`, is among the `keeplast` most recently pushed, was
    pushed within `olderthan`, or was pulled within `pulledwithin` (a tag never pulled is not; pair
    it with `olderthan` to spare new pushes). Signature and attestation tags (`sha256-<hex>.sig`, `.att`,
    `.sbom`) follow their subject. `untaggedafter` deletes manifests no tag reaches once older.
    """

    repositories: list[str] = field(default_factory=lambda: ["**"])
    keeplast: int | None = None
    keeptags: list[str] = field(default_factory=list)
    olderthan: Duration | None = None
    untaggedafter: Duration | None = None
    pulledwithin: Duration | None = None
    name: str = ""
    keep_patterns: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False)

    def check(self) -> None:
        if not self.repositories:
            raise _FieldError("repositories", self.repositories, "at least one repository pattern")
        if self.keeplast is not None and self.keeplast < 0:
            raise _FieldError("keeplast", self.keeplast, "a number of tags, 0 or more")
        self.keep_patterns = _compile_patterns("keeptags", self.keeptags)


@dataclass
class RetentionConfig(_Section):
    enabled: bool = True
    interval: Duration = 3600.0
    policies: list[RetentionPolicy] = field(default_factory=list)

    def check(self) -> None:
        if self.interval < 1:
            raise _FieldError("interval", self.interval, "a duration of at least 1s")


@dataclass
class InventoryConfig(_Section):
    """What is stored, for people: tag details, storage per repository, last-pulled times."""

    # How often each node writes the last-pulled times of the manifests it served: the coordinator
    # sees at most one write per manifest, node and interval, and readers see a pull this late.
    pullinterval: Duration = 180.0
    # Repositories (and namespaces) the storage metrics name, by linked bytes; the rest are summed.
    metricstop: int = 20

    def check(self) -> None:
        if not 0.1 <= self.pullinterval <= 86400:
            raise _FieldError("pullinterval", self.pullinterval, "a duration from 0.1s to 24h")
        if not 0 <= self.metricstop <= 1000:
            raise _FieldError("metricstop", self.metricstop, "a number of repositories from 0 to 1000")


@dataclass
class UIConfig(_Section):
    """The web pages under /ui/: what is stored, for people, read-only, behind the API's access rules."""

    enabled: bool = True
    # How long a sign-in lasts; a changed password or a removed user ends it at once.
    session: Duration = 12 * 3600.0

    def check(self) -> None:
        if not 60 <= self.session <= 30 * 86400:
            raise _FieldError("session", self.session, "a duration from 1m to 30 days")


@dataclass
class QuotaRule(_Section):
    """A byte limit on what one repository, or every repository under a namespace, links."""

    repository: str = ""  # an exact repository name
    namespace: str = ""  # a prefix such as "team/" (every repository under it, together)
    limit: Size | None = None  # bytes, or with a unit: 500MiB, 10GiB, 1TB

    def check(self) -> None:
        if bool(self.repository) == bool(self.namespace):
            raise _FieldError(None, NO_VALUE, "each rule names exactly one of repository or namespace")
        if self.limit is None:
            raise _FieldError("limit", NO_VALUE, "a limit is required (bytes, or with a unit: 10GiB)")


# -- auth, access, audit, rate limits ----------------------------------------------------------


@dataclass
class SignaturePolicy(_Section):
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

    def check(self) -> None:
        if not self.repositories or not all(isinstance(p, str) and p for p in self.repositories):
            raise _FieldError("repositories", self.repositories, "at least one repository pattern")
        self.name = self.name or ",".join(self.repositories)
        if self.mode not in ("enforce", "warn"):
            raise _FieldError("mode", self.mode, "enforce or warn")
        if not self.keys:
            raise _FieldError("keys", self.keys, "at least one public key file")
        self.patterns = [repository_pattern(p) for p in self.repositories]
        self.public_keys = []
        for i, key in enumerate(self.keys):
            try:
                self.public_keys.append(load_public_key_file(str(key)))
            except KeyInvalid as exc:
                raise _FieldError(f"keys[{i}]", key, f"a PEM public key file ({exc})") from None


@dataclass
class SignaturesConfig(_Section):
    """`signatures.policies`: the first policy whose repositories match a repository applies to it."""

    policies: list[SignaturePolicy] = field(default_factory=list)

    def check(self) -> None:
        names = [policy.name for policy in self.policies]
        for name in names:
            if names.count(name) > 1:
                raise _FieldError("policies", name, "unique policy names (this one is used twice)")


@dataclass
class HtpasswdAuth(_Section):
    """Distribution's auth.htpasswd: users with bcrypt passwords in an Apache htpasswd file."""

    realm: str = "wharf"
    path: str = ""

    def check(self) -> None:
        if not self.path:
            raise _FieldError("path", NO_VALUE, "the path of an htpasswd file is required")


@dataclass
class TokenAuth(_Section):
    """Distribution's auth.token, plus Wharf's own token service (on when `signingkey` is set)."""

    realm: str = ""  # where clients get tokens; empty with `signingkey`: this node's /auth/token
    service: str = ""  # the audience tokens must name
    issuer: str = ""
    rootcertbundle: str = ""  # certificates (or public keys) whose keys sign valid tokens
    # As Distribution: the realm is this registry's /auth/token, at the host the client used.
    autoredirect: bool = False
    signingalgorithms: list[str] = field(default_factory=list)
    # Wharf's token service: the private key it signs with (EC P-256/P-384 or RSA), its users
    # (an htpasswd file), and how long access and refresh tokens live.
    signingkey: str = ""
    htpasswd: str = ""
    expiration: Duration = 300.0
    refreshexpiration: Duration = 86400.0

    def check(self) -> None:
        for key in ("service", "issuer"):
            if not getattr(self, key):
                raise _FieldError(key, NO_VALUE, "is required")
        if not self.rootcertbundle and not self.signingkey:
            raise _FieldError("rootcertbundle", NO_VALUE, "is required (or signingkey, for the built-in token service)")
        if not self.realm and not self.signingkey and not self.autoredirect:
            raise _FieldError("realm", NO_VALUE, "is required when another service issues the tokens")
        if self.htpasswd and not self.signingkey:
            raise _FieldError("htpasswd", self.htpasswd, "signingkey too (the built-in token service)")
        for name in ("expiration", "refreshexpiration"):
            if getattr(self, name) <= 0:
                raise _FieldError(name, getattr(self, name), "a positive duration")


@dataclass
class AuthConfig(_Section):
    htpasswd: HtpasswdAuth | None = None
    token: TokenAuth | None = None

    def check(self) -> None:
        if self.htpasswd is not None and self.token is not None:
            raise _FieldError(None, NO_VALUE, "configure exactly one of htpasswd or token")

    @property
    def mode(self) -> str | None:
        """The auth mode: htpasswd, token, or None when the registry is open."""
        if self.htpasswd is not None:
            return "htpasswd"
        return "token" if self.token is not None else None


ACTIONS = ("pull", "push", "delete", "*")


@dataclass
class AccessRule(_Section):
    """Who may do what to which repositories; `*` and `**` globs as in zot."""

    repositories: list[str] = field(default_factory=lambda: ["**"])
    users: list[str] = field(default_factory=list)  # "*": every signed-in user
    groups: list[str] = field(default_factory=list)
    anonymous: bool = False  # also callers without credentials (pull only)
    actions: list[str] = field(default_factory=lambda: ["pull"])  # pull, push, delete or *

    def check(self) -> None:
        if not self.repositories:
            raise _FieldError("repositories", self.repositories, "at least one repository pattern")
        unknown = [a for a in self.actions if a not in ACTIONS]
        if unknown or not self.actions:
            raise _FieldError("actions", unknown or self.actions, "actions from " + ", ".join(ACTIONS))
        if self.anonymous and set(self.actions) != {"pull"}:
            raise _FieldError("actions", self.actions, "only pull for anonymous callers")


@dataclass
class AccessConfig(_Section):
    """Without rules every signed-in user may do everything and anonymous callers nothing."""

    groups: dict[str, list[str]] = field(default_factory=dict)
    rules: list[AccessRule] = field(default_factory=list)

    def check(self) -> None:
        for group, members in self.groups.items():
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise _FieldError(f"groups.{group}", members, "a list of user names")
        for i, rule in enumerate(self.rules):
            missing = [g for g in rule.groups if g not in self.groups]
            if missing:
                raise _FieldError(f"rules[{i}].groups", missing[0], "a group defined in access.groups")


@dataclass
class AuditConfig(_Section):
    """One hash-chained JSON line per decision (push, pull, delete, refusal); off without path or stdout."""

    path: str = ""
    stdout: bool = False
    maxsize: Size = 100 * 1000 * 1000  # rotate to path.1 ... beyond this size
    maxbackups: int = 5
    fsync: bool = False
    pulls: bool = True
    # How often the newest line's number and hash go to the coordinator (also at each rotation and
    # at shutdown), so lines cut from the end of the log are noticed.
    checkpoint: Duration = 10.0

    def check(self) -> None:
        if self.maxsize < 1000:
            raise _FieldError("maxsize", self.maxsize, "at least 1KB")
        if self.maxbackups < 0:
            raise _FieldError("maxbackups", self.maxbackups, "a number of files, 0 or more")
        if self.checkpoint <= 0:
            raise _FieldError("checkpoint", self.checkpoint, "a positive duration")


@dataclass
class AuthFailureLimits(_Section):
    """Failed sign-ins allowed per window before a caller gets 429 for `backoff`; 0 turns a limit off."""

    peraddress: int = 20
    peruser: int = 10
    window: Duration = 60.0
    backoff: Duration = 60.0

    def check(self) -> None:
        for name in ("peraddress", "peruser"):
            if getattr(self, name) < 0:
                raise _FieldError(name, getattr(self, name), "a number of failures, 0 (off) or more")
        for name in ("window", "backoff"):
            if getattr(self, name) <= 0:
                raise _FieldError(name, getattr(self, name), "a positive duration")


@dataclass
class RateLimitConfig(_Section):
    authfailures: AuthFailureLimits = field(default_factory=AuthFailureLimits)


# -- the pull-through cache (Distribution's proxy section, and several upstreams) -------------------

# Distribution's default time a fetched tag is trusted (its repositoryTTL, one week).
PROXY_TTL = 168 * 3600.0
_REPOSITORY_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


def _check_remote_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise _FieldError("remoteurl", value, "the upstream registry's URL, such as https://registry-1.docker.io")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise _FieldError(
            "remoteurl", value, "the upstream registry's URL, such as https://registry-1.docker.io"
        ) from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


@dataclass
class UpstreamConfig(_Section):
    """Wharf: repositories under `prefix` are cached from `remoteurl`, where they are named without it."""

    prefix: str = ""
    remoteurl: str = ""
    username: str = ""
    password: str = ""
    # How long a cached tag is served before a HEAD asks the upstream whether it moved.
    ttl: GoDuration = PROXY_TTL
    # The byte budget of this upstream's cached images; 0: no budget. Least recently pulled go first.
    maxbytes: Size = 0

    def check(self) -> None:
        components = self.prefix.strip("/").split("/")
        if not self.prefix.strip("/") or not all(_REPOSITORY_COMPONENT.fullmatch(c) for c in components):
            raise _FieldError("prefix", self.prefix, "a repository name prefix such as dockerhub/ (lower case)")
        self.prefix = "/".join(components) + "/"
        self.remoteurl = _check_remote_url(self.remoteurl)
        if bool(self.username) != bool(self.password):
            raise _FieldError(
                "password" if self.username else "username", NO_VALUE, "username and password go together"
            )
        if self.ttl <= 0:
            raise _FieldError("ttl", self.ttl, "a positive duration")


@dataclass(frozen=True)
class Upstream:
    """One cached upstream as the cache uses it: registry:2's (prefix "", every repository) or one of
    `proxy.upstreams`."""

    prefix: str
    remoteurl: str
    username: str
    password: str = field(repr=False)
    ttl: float = PROXY_TTL
    maxbytes: int = 0

    @property
    def name(self) -> str:
        """How logs, metrics and commands name it: its prefix, or the URL for registry:2's mode."""
        return self.prefix.rstrip("/") or self.remoteurl

    def remote_name(self, repository: str) -> str | None:
        """The upstream's name for a repository here, or None when it is not under the prefix."""
        if not repository.startswith(self.prefix) or repository == self.prefix.rstrip("/"):
            return None
        return repository[len(self.prefix) :]


@dataclass
class ProxyConfig(_Section):
    """Distribution's proxy section: with `remoteurl` the whole registry is a pull-through cache of one
    upstream (writes refused, as in registry:2); with `upstreams`, repositories under each prefix are
    cached from that upstream and every other repository is hosted as usual."""

    remoteurl: str = ""
    username: str = ""
    password: str = ""
    ttl: GoDuration = PROXY_TTL
    upstreams: list[UpstreamConfig] = field(default_factory=list)
    # Every cached upstream, registry:2's single one (prefix "") included.
    caches: list[Upstream] = field(default_factory=list, init=False, repr=False)

    def check(self) -> None:
        if self.remoteurl and self.upstreams:
            raise _FieldError(
                None,
                NO_VALUE,
                "either remoteurl (every repository is cached from one upstream, as in registry:2) or upstreams "
                "(each under its prefix, beside hosted repositories), not both",
            )
        if self.remoteurl:
            url = _check_remote_url(self.remoteurl)
            if bool(self.username) != bool(self.password):
                raise _FieldError(
                    "password" if self.username else "username", NO_VALUE, "username and password go together"
                )
            if self.ttl <= 0:
                raise _FieldError("ttl", self.ttl, "a positive duration")
            self.caches = [Upstream("", url, self.username, self.password, self.ttl, 0)]
            return
        if self.username or self.password:
            raise _FieldError("username", NO_VALUE, "remoteurl too (or credentials under each of upstreams)")
        for i, upstream in enumerate(self.upstreams):
            for j, other in enumerate(self.upstreams[:i]):
                if upstream.prefix.startswith(other.prefix) or other.prefix.startswith(upstream.prefix):
                    raise _FieldError(
                        f"upstreams[{i}].prefix",
                        upstream.prefix,
                        f"a prefix apart from upstreams[{j}]'s ({other.prefix})",
                    )
        self.caches = [
            Upstream(u.prefix, u.remoteurl, u.username, u.password, u.ttl, u.maxbytes) for u in self.upstreams
        ]

    @property
    def enabled(self) -> bool:
        return bool(self.caches)

    @property
    def mirror(self) -> bool:
        """registry:2's mode: the whole registry mirrors one upstream and hosts nothing."""
        return bool(self.remoteurl)


# -- Distribution's other sections ------------------------------------------------------------


@dataclass
class NotificationEvents(_Section):
    includereferences: bool = False


@dataclass
class NotificationIgnore(_Section):
    mediatypes: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    def check(self) -> None:
        unknown = [a for a in self.actions if a not in NOTIFICATION_ACTIONS]
        if unknown:
            raise _FieldError("actions", unknown[0], "actions from " + ", ".join(NOTIFICATION_ACTIONS))


NOTIFICATION_ACTIONS = ("pull", "push", "mount", "delete")


@dataclass
class NotificationEndpoint(_Section):
    """One webhook, with Distribution's fields and defaults: zero (or less) means 1s, 10, 1s."""

    name: str = ""
    disabled: bool = False
    url: str = ""
    headers: Headers = field(default_factory=dict)
    timeout: GoDuration = 1.0
    threshold: int = 10  # consecutive failures before waiting `backoff` between tries
    backoff: GoDuration = 1.0
    ignoredmediatypes: list[str] = field(default_factory=list)
    ignore: NotificationIgnore = field(default_factory=NotificationIgnore)

    def check(self) -> None:
        if not self.name:
            raise _FieldError("name", NO_VALUE, "every endpoint needs a name")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _FieldError("url", self.url, "an http:// or https:// URL")
        # As in Distribution, zero means the default.
        self.timeout = self.timeout or 1.0
        self.backoff = self.backoff or 1.0
        if self.threshold <= 0:
            self.threshold = 10

    @property
    def timeout_seconds(self) -> float:
        return self.timeout

    @property
    def backoff_seconds(self) -> float:
        return self.backoff

    def accepts(self, action: str, media_type: str | None) -> bool:
        """Whether an event of this action and target media type goes to this endpoint."""
        if self.disabled or action in self.ignore.actions:
            return False
        return not media_type or (media_type not in self.ignoredmediatypes and media_type not in self.ignore.mediatypes)


@dataclass
class NotificationsConfig(_Section):
    events: NotificationEvents = field(default_factory=NotificationEvents)
    endpoints: list[NotificationEndpoint] = field(default_factory=list)

    def check(self) -> None:
        seen: set[str] = set()
        for i, endpoint in enumerate(self.endpoints):
            if endpoint.name in seen:
                raise _FieldError(f"endpoints[{i}].name", endpoint.name, "a name of its own (this one is used twice)")
            seen.add(endpoint.name)


@dataclass
class RedisPool(_Section):
    maxidle: int = 0
    maxactive: int = 0
    idletimeout: GoDuration | None = None


@dataclass
class RedisConfig(_Section):
    """Accepted so registry:2 files load: Distribution used Redis only as a blob descriptor cache."""

    addr: str = ""
    password: str = ""
    db: int = 0
    dialtimeout: GoDuration | None = None
    readtimeout: GoDuration | None = None
    writetimeout: GoDuration | None = None
    pool: RedisPool = field(default_factory=RedisPool)


@dataclass
class StorageDriverHealth(_Section):
    """Distribution's health.storagedriver: probe the storage every interval; unready after
    `threshold` failures in a row (0 or 1: the first failure)."""

    enabled: bool = False
    interval: GoDuration = 10.0
    threshold: int = 0

    def check(self) -> None:
        if self.interval <= 0:
            raise _FieldError("interval", self.interval, "a positive duration")
        if self.threshold < 0:
            raise _FieldError("threshold", self.threshold, "a number of failures, 0 or more")


@dataclass
class FileHealth(_Section):
    """Unready while this file exists: take a node out of rotation by creating it."""

    file: str = ""
    interval: GoDuration = 10.0
    threshold: int = 0

    def check(self) -> None:
        if not self.file:
            raise _FieldError("file", NO_VALUE, "the path of the file to check is required")
        if self.interval <= 0:
            raise _FieldError("interval", self.interval, "a positive duration")


@dataclass
class HTTPHealth(_Section):
    """Unready while a HEAD of `uri` does not answer `statuscode`."""

    uri: str = ""
    headers: Headers = field(default_factory=dict)
    statuscode: int = 200
    timeout: GoDuration = 5.0
    interval: GoDuration = 10.0
    threshold: int = 0

    def check(self) -> None:
        parts = urlsplit(self.uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _FieldError("uri", self.uri, "an http:// or https:// URL")
        if not 100 <= self.statuscode <= 599:
            raise _FieldError("statuscode", self.statuscode, "an HTTP status code")
        for name in ("timeout", "interval"):
            if getattr(self, name) <= 0:
                raise _FieldError(name, getattr(self, name), "a positive duration")


@dataclass
class TCPHealth(_Section):
    """Unready while a TCP connection to `addr` fails."""

    addr: str = ""
    timeout: GoDuration = 5.0
    interval: GoDuration = 10.0
    threshold: int = 0
    target: ListenAddress | None = field(default=None, init=False, repr=False)

    def check(self) -> None:
        try:
            self.target = parse_address(self.addr)
        except _FieldError as exc:
            raise exc.under("addr") from None
        if not self.target.host:
            raise _FieldError("addr", self.addr, "HOST:PORT with a host")
        for name in ("timeout", "interval"):
            if getattr(self, name) <= 0:
                raise _FieldError(name, getattr(self, name), "a positive duration")


@dataclass
class HealthConfig(_Section):
    storagedriver: StorageDriverHealth = field(default_factory=StorageDriverHealth)
    file: list[FileHealth] = field(default_factory=list)
    http: list[HTTPHealth] = field(default_factory=list)
    tcp: list[TCPHealth] = field(default_factory=list)


@dataclass
class Schema1Config(_Section):
    enabled: bool = False
    signingkeyfile: str = ""

    def check(self) -> None:
        if self.enabled:
            raise _FieldError(
                "enabled",
                self.enabled,
                "false: Wharf stores no Docker schema1 manifests (deprecated and unsigned in practice); "
                "push schema2 or OCI images",
            )


@dataclass
class CompatibilityConfig(_Section):
    schema1: Schema1Config = field(default_factory=Schema1Config)


@dataclass
class URLRules(_Section):
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    allowed: re.Pattern[str] | None = field(default=None, init=False, repr=False)
    denied: re.Pattern[str] | None = field(default=None, init=False, repr=False)

    def check(self) -> None:
        _compile_patterns("allow", self.allow)
        _compile_patterns("deny", self.deny)
        if self.allow:
            self.allowed = re.compile("|".join(f"(?:{p})" for p in self.allow))
        if self.deny:
            self.denied = re.compile("|".join(f"(?:{p})" for p in self.deny))


@dataclass
class ManifestValidation(_Section):
    urls: URLRules = field(default_factory=URLRules)


@dataclass
class CatalogConfig(_Section):
    """Distribution's catalog: the most repositories one `_catalog` page holds, and its size without `n`."""

    maxentries: int = 1000

    def check(self) -> None:
        if isinstance(self.maxentries, bool) or not isinstance(self.maxentries, int) or self.maxentries < 1:
            raise _FieldError("maxentries", self.maxentries, "a whole number of at least 1")


@dataclass
class ValidationConfig(_Section):
    """Distribution's validation: which URLs foreign (non-distributable) layers may name.

    As in registry:2 2.8: on unless `disabled`; with neither `allow` nor `deny`, no URL is allowed.
    """

    enabled: bool = False  # Distribution's older switch, replaced by `disabled`
    disabled: bool = False
    manifests: ManifestValidation = field(default_factory=ManifestValidation)

    def url_refused(self, url: str) -> str | None:
        """Why a foreign layer may not name this URL, or None when it may."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.fragment:
            return "foreign layer URLs must be http or https, without a fragment"
        if self.disabled and not self.enabled:
            return None
        rules = self.manifests.urls
        if not rules.allow and not rules.deny:
            return "no foreign layer URL is allowed (validation.manifests.urls.allow is empty)"
        if rules.allowed is not None and not rules.allowed.search(url):
            return "not allowed by validation.manifests.urls.allow"
        if rules.denied is not None and rules.denied.search(url):
            return "refused by validation.manifests.urls.deny"
        return None


@dataclass
class Config(_Section):
    version: str = "0.1"
    log: LogConfig = field(default_factory=LogConfig)
    loglevel: str = ""  # Distribution's old name for log.level
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
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    signatures: SignaturesConfig = field(default_factory=SignaturesConfig)
    inventory: InventoryConfig = field(default_factory=InventoryConfig)
    ui: UIConfig = field(default_factory=UIConfig)
    redis: RedisConfig | None = None
    health: HealthConfig = field(default_factory=HealthConfig)
    compatibility: CompatibilityConfig = field(default_factory=CompatibilityConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    # Every other region's storage, by region name (this node's own is `storage`, named by cluster.region).
    regions: dict[str, RegionConfig] = field(default_factory=dict)
    # Where the file came from; None when running on defaults.
    source: str | None = field(default=None, init=False)
    # REGISTRY_* variables that name no key of the tree, ignored as Distribution ignores them.
    ignored_variables: list[str] = field(default_factory=list, init=False)
    # What start-up should warn of (a default that gave way).
    warnings: list[str] = field(default_factory=list, init=False)

    def check(self) -> None:
        if str(self.version) != "0.1":
            raise _FieldError("version", self.version, "0.1 (the only version of Distribution's configuration)")
        if self.loglevel and self.loglevel.lower() not in LOG_LEVELS:
            raise _FieldError("loglevel", self.loglevel, "one of " + ", ".join(LOG_LEVELS))
        if self.regions:
            self._check_regions()

    def _check_regions(self) -> None:
        if not self.cluster.region:
            raise _FieldError("cluster.region", NO_VALUE, "this node's region, required with regions")
        for name in self.regions:
            if not REGION_NAME.fullmatch(name):
                raise _FieldError(f"regions.{name}", name, REGION_EXPECTED)
        if self.cluster.region in self.regions:
            raise _FieldError(
                f"regions.{self.cluster.region}",
                NO_VALUE,
                "only the other regions: this node's own (cluster.region) keeps its blobs in storage.*",
            )

    @property
    def storage_driver(self) -> str:
        return "s3" if self.storage.s3 is not None else "filesystem"

    def accepted_without_effect(self) -> list[str]:
        """One line for each Distribution section this file sets that Wharf has no need of."""
        notes = []
        cache = self.storage.cache.blobdescriptor or self.storage.cache.layerinfo
        if cache:
            notes.append(
                f"storage.cache.blobdescriptor: {cache} accepted; Wharf already caches what is immutable "
                "(manifest bytes by digest, blob locations) in every node and reads tags from its coordinator"
            )
        if self.redis is not None:
            notes.append(
                "redis: accepted and not used; registry:2 kept only its blob descriptor cache there, which "
                "Wharf keeps in every node (immutable entries need no shared cache)"
            )
        return notes


# -- sections refused, with the reason and the way out ------------------------------------------

_STORAGE_DRIVERS = "Wharf's storage drivers are filesystem and s3 (any S3-compatible service)"
# key -> why it stops start-up. Checked on the raw file before typing, so the message names the section.
_REFUSED: dict[str, str] = {
    "middleware": "registry, repository and storage middleware (cloudfront, redirect ...) are not supported; remove the section",
    "reporting": "bugsnag and newrelic reporting are not supported; Wharf exports Prometheus metrics on http.debug.addr",
    "policy": "repository class policies are not supported; remove the section",
    "log.hooks": "log hooks (mail on error) are not supported; alert on the log stream or on the metrics instead",
    "http.tls.letsencrypt": "Let's Encrypt is not built in; give http.tls.certificate and http.tls.key (from certbot or a TLS proxy)",
    "http.tls.ciphersuites": "cipher suites are not configurable; Wharf uses the TLS library's modern defaults (TLS 1.2+ AEAD)",
    "auth.silly": "silly auth (any Authorization header passes) is not supported; use auth.htpasswd or auth.token",
    "storage.inmemory": "the inmemory driver is not supported; use filesystem (on a tmpfs such as /dev/shm for a throw-away registry)",
    "storage.azure": _STORAGE_DRIVERS,
    "storage.gcs": _STORAGE_DRIVERS,
    "storage.swift": _STORAGE_DRIVERS,
    "storage.oss": _STORAGE_DRIVERS,
}
# Refused even when empty: naming the driver selects it.
_REFUSED_WHEN_PRESENT = {
    "storage.inmemory",
    "storage.azure",
    "storage.gcs",
    "storage.swift",
    "storage.oss",
    "auth.silly",
}


def _refuse_unsupported(raw: dict[str, Any]) -> None:
    for key, reason in _REFUSED.items():
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node:
            continue
        value = node[parts[-1]]
        if key in _REFUSED_WHEN_PRESENT or value not in (None, {}, [], ""):
            raise ConfigError(f"{key}: {reason}")
        del node[parts[-1]]  # an empty section does nothing in registry:2 either


# -- loading ---------------------------------------------------------------------------------

# Sections whose single key names the driver, settable as REGISTRY_STORAGE=s3 like Distribution.
_TYPED_SECTIONS = {
    "storage": ("filesystem", "s3", "inmemory", "azure", "gcs", "swift", "oss"),
    "auth": ("htpasswd", "token", "silly"),
}


# The top-level keys a REGISTRY_* variable may set: Wharf's sections, and those it refuses (a variable
# that sets one stops start-up as the file's section does, since registry:2 would use it). Others are
# not configuration: Distribution logs and ignores them, and so does Wharf (Kubernetes sets
# REGISTRY_PORT and the like for a Service named `registry`; they must not stop a node from starting).
_SECTIONS = frozenset(f.name for f in dataclasses.fields(Config) if f.init) | {k for k in _REFUSED if "." not in k}
# Kubernetes' service links (<SERVICE>_SERVICE_HOST, <SERVICE>_PORT_5000_TCP_ADDR ...), for a Service
# named `registry` or `registry-<anything>`: never configuration, whatever section they seem to name.
_SERVICE_LINK = re.compile(
    r"REGISTRY(?:_[A-Z0-9]+)*_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT(?:_[0-9]+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)?)"
)


# Other programs' variables that look like keys: REGISTRY_AUTH_FILE is the auth file of podman, skopeo
# and buildah, often exported in CI shells (Distribution has no `auth.file`).
_NOT_OURS = frozenset({"REGISTRY_AUTH_FILE"})


def load(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (or nothing), apply REGISTRY_* overrides, parse and check everything."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read(path)
    else:
        raw = _no_file_defaults()
    ignored: list[str] = []
    overrides: dict[str, str] = {}  # the key each variable set -> the variable
    for name in sorted(environ):
        if name.startswith("REGISTRY_") and name != "REGISTRY_CONFIGURATION_PATH":
            path_parts = name[len("REGISTRY_") :].lower().split("_")
            if path_parts[0] not in _SECTIONS or _SERVICE_LINK.fullmatch(name) or name in _NOT_OURS:
                ignored.append(name)
                continue
            _apply_override(raw, path_parts, environ[name], name)
            overrides[".".join(path_parts)] = name
    try:
        return _load_tree(raw, path, ignored)
    except ConfigError as exc:
        raise _naming_variable(exc, overrides) from None


def _naming_variable(exc: ConfigError, overrides: Mapping[str, str]) -> ConfigError:
    """The same error, naming the REGISTRY_* variable that set the key it names (the file may not have it)."""
    message = str(exc)
    named = re.match(r"(?:unknown configuration key )?([a-z0-9_.\[\]-]+)", message)
    if named is None:
        return exc
    key = re.sub(r"\[\d+\]", "", named.group(1).rstrip(":"))  # notifications.endpoints[0] -> ...endpoints
    for set_key, variable in overrides.items():
        if set_key == key or set_key.startswith(key + ".") or key.startswith(set_key + "."):
            return ConfigError(f"{message} (set by the variable {variable})")
    return exc


def _load_tree(raw: dict[str, Any], path: str | None, ignored: list[str]) -> Config:
    raw = _lower_keys(raw)
    if isinstance(raw.get("storage"), str):  # `storage: filesystem`, as Distribution allows
        raw["storage"] = {raw["storage"]: {}}
    log_section = raw.get("log")
    if raw.get("loglevel") and (not isinstance(log_section, dict) or not log_section.get("level")):
        # Distribution's old top-level key, used when log.level is not set.
        raw["log"] = {**(log_section if isinstance(log_section, dict) else {}), "level": raw["loglevel"]}
    _refuse_unsupported(raw)
    config = _build(Config, raw, "")
    config.source = path
    config.ignored_variables = ignored
    http_section = raw.get("http")
    debug_section = http_section.get("debug") if isinstance(http_section, dict) else None
    config.http.debug.given = isinstance(debug_section, dict) and "addr" in debug_section
    _finish(config)
    return config


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected YAML in UTF-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (version, storage, http ...)")
    return loaded or {}


def _lower_keys(raw: Any) -> Any:
    # Distribution's keys are case-insensitive in practice (its environment overrides are).
    if isinstance(raw, dict):
        return {
            (k.lower() if isinstance(k, str) else k): (v if _keeps_case(k) else _lower_keys(v)) for k, v in raw.items()
        }
    if isinstance(raw, list):
        return [_lower_keys(v) for v in raw]
    return raw


def _keeps_case(key: Any) -> bool:
    """Mappings whose keys are data, not configuration keys: header names, log fields, groups."""
    return isinstance(key, str) and key.lower() in ("headers", "fields", "groups")


def _no_file_defaults() -> dict[str, Any]:
    # The coordinator is not named here: it follows the root, wherever a REGISTRY_* variable puts it.
    return {
        "storage": {
            "filesystem": {"rootdirectory": DEFAULT_ROOT},
            "delete": {"enabled": True},
        },
    }


def _apply_override(raw: dict[str, Any], path: list[str], value: str, variable: str) -> None:
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value  # not YAML: the text itself, as Distribution takes it
    if len(path) == 1 and path[0] in _TYPED_SECTIONS and isinstance(parsed, str):
        section = raw.get(path[0]) or {}
        if not isinstance(section, dict):
            section = {}
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


def _finish(config: Config) -> None:
    """What needs more than one section: defaults that follow the storage, listeners that collide."""
    storage = config.storage
    if storage.s3 is None and storage.filesystem is None:
        storage.filesystem = FilesystemStorage(DEFAULT_ROOT)
    if storage.filesystem is not None:
        # One meaning wherever a command runs from: the start-up line and every CLI name the same root.
        storage.filesystem.rootdirectory = os.path.abspath(storage.filesystem.rootdirectory)
    for region in config.regions.values():
        assert region.storage is not None
        if region.storage.filesystem is not None:
            region.storage.filesystem.rootdirectory = os.path.abspath(region.storage.filesystem.rootdirectory)
    if storage.s3 is not None and not storage.s3.bucket:
        raise invalid("storage.s3.bucket", NO_VALUE, "a bucket name is required")
    coordinator = config.coordinator
    if coordinator.etcd is None:
        if coordinator.embedded is None:
            coordinator.embedded = EmbeddedCoordinator()
        if not coordinator.embedded.path:
            if storage.filesystem is None:
                raise invalid(
                    "coordinator.embedded.path", NO_VALUE, "required with s3 storage (or use coordinator.etcd)"
                )
            # Inside the storage root, outside Distribution's tree: the root alone is the whole registry.
            coordinator.embedded.path = embedded_path_in(storage.filesystem.rootdirectory)
        coordinator.embedded.path = os.path.abspath(coordinator.embedded.path)
    if config.http.workers == AUTO_WORKERS:
        config.http.workers = auto_workers(usable_cores(), embedded=coordinator.etcd is None)
        config.http.workers_auto = True
    debug = config.http.debug
    if debug.listen is not None and debug.listen.overlaps(config.http.listen):
        if not debug.given:
            # A registry:2 file serving on :5001 names no debug listener: it must serve as it did.
            debug.listen = None
            config.warnings.append(
                f"http.debug.addr: Wharf's default {debug.addr} is where http.addr ({config.http.addr}) "
                "serves, so there is no debug listener (no metrics); set http.debug.addr to have one"
            )
            return
        raise invalid("http.debug.addr", debug.addr, f"an address other than http.addr ({config.http.addr})")


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


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise invalid(where or "configuration", raw, "a mapping")
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).lower()
        full = f"{where}.{name}" if where else name
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean {where + '.' if where else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown configuration key {full}{hint}; known here: {', '.join(known)}")
        kwargs[name] = _convert(hints[name], value, full)
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        value = exc.value
        if exc.name in raw and isinstance(value, (int, float)) and isinstance(raw[exc.name], str):
            value = raw[exc.name]  # as the file says it (`0s`), not as parsed (0.0)
        raise ConfigError(_message(exc.under(where).name or "configuration", value, exc.expected)) from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    """A value from the file or the environment, as the field's type wants it; errors name `where`."""
    inner, optional = _unwrap(hint)
    grammar = _grammar_of(hint)
    if grammar is not None:
        try:
            return _parse(grammar, value, optional)
        except _FieldError as exc:
            raise ConfigError(_message(exc.under(where).name, exc.value, exc.expected)) from None
    if value is None:
        if dataclasses.is_dataclass(inner):
            # `filesystem:` with nothing under it still selects that driver.
            return inner()  # type: ignore[operator]
        if optional:
            return None
        if typing.get_origin(inner) in (list, dict):
            return typing.get_origin(inner)()
        if inner is str:
            return ""
        raise invalid(where, value, _EXPECTED.get(inner, "a value"))
    if dataclasses.is_dataclass(inner):
        return _build(inner, value, where)  # type: ignore[arg-type]
    origin = typing.get_origin(inner)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise invalid(where, value, "a list")
        item = (typing.get_args(inner) or (Any,))[0]
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]  # type: ignore[arg-type]
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise invalid(where, value, "a mapping")
        key_type, value_type = typing.get_args(inner) or (Any, Any)
        return {str(k): _convert(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise invalid(where, value, "true or false")
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise invalid(where, value, "a whole number")
        try:
            return int(value)
        except ValueError:
            raise invalid(where, value, "a whole number") from None
    if inner is float:
        if isinstance(value, bool):
            raise invalid(where, value, "a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise invalid(where, value, "a number") from None
    if inner is str:
        if isinstance(value, (dict, list)):
            raise invalid(where, value, "a string")
        return str(value)
    return value


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number"}
