"""Repository patterns and the rules built on them: immutable tags and byte quotas."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from coordinator.quota import QuotaScope, QuotaScopes

from .config import Config, ConfigError, ImmutabilityRule, QuotaRule

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int) -> int:
    """'500MiB', '10GiB', '1TB' or a number of bytes."""
    match = _SIZE.fullmatch(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"invalid size {text!r}: use bytes or a unit such as MiB, GiB, GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@lru_cache(maxsize=1024)
def repository_pattern(pattern: str) -> re.Pattern[str]:
    """`*` and `?` stay within one path segment, `**` crosses them (zot's and doublestar's meaning)."""
    parts = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts))


def repository_matches(patterns: list[str], name: str) -> bool:
    """Globs over repository names: `*` within one path segment, `**` across segments."""
    return any(repository_pattern(p).fullmatch(name) for p in patterns)


@dataclass(frozen=True)
class _Immutable:
    rule: ImmutabilityRule
    tags: tuple[re.Pattern[str], ...]

    @property
    def label(self) -> str:
        return self.rule.name or f"{','.join(self.rule.repositories)} tags {','.join(self.rule.tags)}"


class Immutability:
    """Which tags may never be moved or deleted."""

    def __init__(self, rules: list[ImmutabilityRule]) -> None:
        self._rules = []
        for rule in rules:
            try:
                compiled = tuple(re.compile(t) for t in rule.tags)
            except re.error as exc:
                raise ConfigError(f"immutability: bad tag pattern: {exc}") from exc
            self._rules.append(_Immutable(rule, compiled))

    def __bool__(self) -> bool:
        return bool(self._rules)

    @property
    def labels(self) -> list[str]:
        return [entry.label for entry in self._rules]

    def rule_for(self, repository: str, tag: str) -> str | None:
        """The name of the rule that freezes this tag, or None."""
        for entry in self._rules:
            if repository_matches(entry.rule.repositories, repository) and any(t.fullmatch(tag) for t in entry.tags):
                return entry.label
        return None


@dataclass(frozen=True)
class Quota:
    scope: str  # a repository name, or a namespace prefix ending in '/'
    limit: int
    namespace: bool

    @property
    def label(self) -> str:
        return f"{'namespace' if self.namespace else 'repository'} {self.scope} ({self.limit} bytes)"

    def covers(self, repository: str) -> bool:
        return repository.startswith(self.scope) if self.namespace else repository == self.scope


def quotas_from(rules: list[QuotaRule]) -> list[Quota]:
    quotas = []
    for rule in rules:
        if bool(rule.repository) == bool(rule.namespace):
            raise ConfigError("quotas: each rule names exactly one of repository or namespace")
        scope = rule.repository or rule.namespace
        namespace = bool(rule.namespace)
        if namespace and not scope.endswith("/"):
            scope += "/"
        quotas.append(Quota(scope, parse_size(rule.limit), namespace))
    return quotas


@dataclass
class Policies:
    immutability: Immutability
    quotas: list[Quota]

    @classmethod
    def from_config(cls, config: Config) -> Policies:
        return cls(Immutability(config.immutability), quotas_from(config.quotas))

    def quotas_for(self, repository: str) -> list[Quota]:
        return [q for q in self.quotas if q.covers(repository)]

    def quota_scopes(self, repository: str) -> list[QuotaScope]:
        return [QuotaScope(q.scope, q.limit, q.label) for q in self.quotas_for(repository)]

    @property
    def scopes(self) -> QuotaScopes:
        """Every configured quota as coordinator scopes (garbage collection keeps their counters)."""
        return QuotaScopes(QuotaScope(q.scope, q.limit, q.label) for q in self.quotas)
