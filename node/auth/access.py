"""Access: token scopes (`repository:team/app:pull,push`) and the configured rules that grant actions."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..config import AccessConfig
from ..errors import NameInvalid
from ..patterns import repository_pattern
from ..reference import validate_name

PULL, PUSH, DELETE = "pull", "push", "delete"
REPOSITORY_ACTIONS = frozenset({PULL, PUSH, DELETE})


@dataclass(frozen=True)
class Access:
    """One action on one resource, as in a token's `access` claim and a challenge's `scope`."""

    type: str  # "repository" or "registry"
    name: str  # a repository name, or "catalog"
    action: str

    def detail(self) -> dict[str, str]:
        return {"Type": self.type, "Name": self.name, "Action": self.action}


CATALOG = Access("registry", "catalog", "*")


def parse_scopes(values: Iterable[str]) -> list[Access]:
    """Docker token scopes, several per value when space-separated; malformed ones are dropped."""
    accesses: list[Access] = []
    for value in values:
        for scope in value.split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            kind = kind.split("(", 1)[0]  # "repository(plugin)" names a resource class
            if not kind or not name or not actions:
                continue
            for action in actions.split(","):
                if action and Access(kind, name, action) not in accesses:
                    accesses.append(Access(kind, name, action))
    return accesses


def _grouped(accesses: Iterable[Access]) -> dict[tuple[str, str], list[str]]:
    grouped: dict[tuple[str, str], list[str]] = {}
    for access in accesses:
        actions = grouped.setdefault((access.type, access.name), [])
        if access.action not in actions:
            actions.append(access.action)
    return grouped


def format_scopes(accesses: Iterable[Access]) -> str:
    """'repository:a:pull,push repository:b:pull', in the order first named."""
    return " ".join(f"{kind}:{name}:{','.join(actions)}" for (kind, name), actions in _grouped(accesses).items())


def to_claim(accesses: Iterable[Access]) -> list[dict[str, Any]]:
    """The `access` claim of a registry token."""
    return [{"type": kind, "name": name, "actions": actions} for (kind, name), actions in _grouped(accesses).items()]


def from_claim(claim: Any) -> frozenset[Access]:
    """The accesses a token's `access` claim grants; anything malformed grants nothing."""
    if not isinstance(claim, list):
        return frozenset()
    granted: set[Access] = set()
    for entry in claim:
        if not isinstance(entry, dict):
            continue
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
        if not isinstance(kind, str) or not isinstance(name, str) or not isinstance(actions, list):
            continue
        granted.update(Access(kind, name, a) for a in actions if isinstance(a, str))
    return frozenset(granted)


def held(granted: frozenset[Access], access: Access) -> bool:
    """Whether a set of granted accesses covers `access` ("*" covers every action)."""
    return access in granted or Access(access.type, access.name, "*") in granted


def valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except NameInvalid:
        return False
    return True


@dataclass(frozen=True)
class _Rule:
    patterns: tuple[re.Pattern[str], ...]
    users: frozenset[str]
    groups: frozenset[str]
    anonymous: bool
    actions: frozenset[str]


class AccessControl:
    """The `access` rules: the union of what every rule that names the caller and repository grants.

    Without rules a signed-in user may do everything and an anonymous caller nothing, which is
    Distribution's behaviour with htpasswd.
    """

    def __init__(self, config: AccessConfig) -> None:
        self._rules = [
            _Rule(
                tuple(repository_pattern(p) for p in rule.repositories),
                frozenset(rule.users),
                frozenset(rule.groups),
                rule.anonymous,
                REPOSITORY_ACTIONS if "*" in rule.actions else frozenset(rule.actions),
            )
            for rule in config.rules
        ]
        self._groups: dict[str, frozenset[str]] = {}
        for group, members in config.groups.items():
            for member in members:
                self._groups[member] = self._groups.get(member, frozenset()) | {group}
        self.has_anonymous = any(rule.anonymous for rule in self._rules)

    def _names(self, rule: _Rule, user: str | None) -> bool:
        if user is None:
            return rule.anonymous
        return (
            rule.anonymous
            or user in rule.users
            or "*" in rule.users
            or bool(rule.groups & self._groups.get(user, frozenset()))
        )

    def actions(self, user: str | None, repository: str) -> frozenset[str]:
        """What `user` (None: anonymous) may do to `repository`."""
        if not self._rules:
            return REPOSITORY_ACTIONS if user is not None else frozenset()
        granted: set[str] = set()
        for rule in self._rules:
            if self._names(rule, user) and any(p.fullmatch(repository) for p in rule.patterns):
                granted |= rule.actions
        return frozenset(granted)

    def allows(self, user: str | None, access: Access) -> bool:
        if access.type == CATALOG.type and access.name == CATALOG.name:
            return user is not None or self.has_anonymous
        if access.type != "repository" or not valid_name(access.name):
            return False
        wanted = REPOSITORY_ACTIONS if access.action == "*" else {access.action}
        return wanted <= self.actions(user, access.name)

    def may_pull(self, user: str | None) -> Callable[[str], bool]:
        """A filter for `_catalog`: the repositories `user` may pull."""
        return lambda name: PULL in self.actions(user, name)

    def grant(self, user: str | None, requested: Iterable[Access]) -> list[Access]:
        """What a token for `user` may carry of what was asked for: each action checked on its own."""
        granted: list[Access] = []
        for access in requested:
            if access.type == "repository" and valid_name(access.name):
                wanted = sorted(REPOSITORY_ACTIONS) if access.action == "*" else [access.action]
                allowed = self.actions(user, access.name)
                granted.extend(Access(access.type, access.name, a) for a in wanted if a in allowed)
            elif access.type == CATALOG.type and access.name == CATALOG.name and self.allows(user, CATALOG):
                granted.append(CATALOG)
        return list(dict.fromkeys(granted))
