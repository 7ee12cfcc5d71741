"""The rules built on repository patterns: immutable tags and byte quotas."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.metadata import Metadata
from coordinator.quota import QuotaScope, QuotaScopes

from .config import Config, ImmutabilityRule, QuotaRule
from .errors import Denied
from .patterns import repository_matches
from .reference import Reference


@dataclass(frozen=True)
class _Immutable:
    rule: ImmutabilityRule

    @property
    def label(self) -> str:
        return self.rule.name or f"{','.join(self.rule.repositories)} tags {','.join(self.rule.tags)}"


class Immutability:
    """Which tags may never be moved or deleted."""

    def __init__(self, rules: list[ImmutabilityRule]) -> None:
        # The configuration compiled each rule's tag patterns at load.
        self._rules = [_Immutable(rule) for rule in rules]

    def __bool__(self) -> bool:
        return bool(self._rules)

    @property
    def labels(self) -> list[str]:
        return [entry.label for entry in self._rules]

    def rule_for(self, repository: str, tag: str) -> str | None:
        """The name of the rule that freezes this tag, or None."""
        for entry in self._rules:
            if repository_matches(entry.rule.repositories, repository) and any(
                t.fullmatch(tag) for t in entry.rule.patterns
            ):
                return entry.label
        return None

    async def check_delete(self, metadata: Metadata, repository: str, ref: Reference) -> None:
        """DENIED if deleting this tag, or this manifest with its tags, would remove an immutable tag."""
        if not self._rules:
            return
        tags = [ref.tag] if ref.tag is not None else list(await metadata.tags_of_digest(repository, str(ref.digest)))
        for tag in tags:
            rule = self.rule_for(repository, tag)
            if rule is None:
                continue
            if ref.digest is not None:
                digest: str | None = str(ref.digest)
            else:
                record = await metadata.get_tag(repository, tag)
                digest = record.digest if record is not None else None
            raise Denied(
                {"tag": tag, "rule": rule},
                message=f"tag {tag} is immutable (rule: {rule}) and cannot be deleted",
                refused_by="immutability",
                rule=rule,
                audit={"digest": digest},
            )


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
    """The configured rules (checked, limits in bytes, at load) as quotas the uploader applies."""
    quotas = []
    for rule in rules:
        scope = rule.repository or rule.namespace
        namespace = bool(rule.namespace)
        if namespace and not scope.endswith("/"):
            scope += "/"
        assert rule.limit is not None
        quotas.append(Quota(scope, rule.limit, namespace))
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
