"""The spec's grammars for repository names, tags and digests, checked before any key is built."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import DigestInvalid, NameInvalid, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")

# Distribution's limit (it counts the host too, so this is generous by a host name).
NAME_MAX_LENGTH = 255


def validate_name(name: str) -> str:
    if len(name) > NAME_MAX_LENGTH:
        raise NameInvalid({"name": name[:300], "reason": f"longer than {NAME_MAX_LENGTH} characters"})
    if not _NAME.fullmatch(name):
        raise NameInvalid({"name": name[:300], "reason": "does not match the repository name grammar"})
    return name


def is_tag(reference: str) -> bool:
    return _TAG.fullmatch(reference) is not None


def validate_tag(tag: str) -> str:
    if not is_tag(tag):
        raise TagInvalid({"tag": tag[:300]}, message="invalid tag")
    return tag


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(text: str) -> Digest:
    """A digest of a supported algorithm; DIGEST_INVALID for anything else."""
    match = _DIGEST.fullmatch(text)
    if not match:
        raise DigestInvalid({"digest": text[:300]}, message="invalid digest")
    algorithm, hexpart = match.groups()
    expected = _HEX_LENGTH.get(algorithm)
    if expected is None:
        raise DigestInvalid({"digest": text[:300]}, message=f"unsupported digest algorithm {algorithm}")
    if len(hexpart) != expected or not _HEX.fullmatch(hexpart):
        raise DigestInvalid({"digest": text[:300]}, message="invalid digest")
    return Digest(algorithm, hexpart)


def looks_like_digest(reference: str) -> bool:
    return ":" in reference


@dataclass(frozen=True)
class Reference:
    """A manifest reference from a URL: a tag or a digest."""

    tag: str | None = None
    digest: Digest | None = None

    def __str__(self) -> str:
        return self.tag if self.tag is not None else str(self.digest)


def parse_reference(reference: str) -> Reference:
    if looks_like_digest(reference):
        return Reference(digest=parse_digest(reference))
    return Reference(tag=validate_tag(reference))
