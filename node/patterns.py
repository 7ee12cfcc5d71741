"""Repository name patterns, as every rule (access, retention, immutability, quotas, signatures) reads them."""

from __future__ import annotations

import re
from functools import lru_cache


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
