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


@dataclass(frozen=True)
class ImageReference:
    """A reference as docker prints it: [HOST[:PORT]/]NAME[:TAG][@DIGEST], or a namespace (NAME/)."""

    host: str | None
    name: str  # a repository, or a namespace ending in '/'
    tag: str | None = None
    digest: Digest | None = None

    @property
    def namespace(self) -> bool:
        return self.name.endswith("/")

    def without_host(self) -> ImageReference:
        """The reference read as if its first component belonged to the repository name."""
        if self.host is None:
            return self
        return ImageReference(None, f"{self.host}/{self.name}", self.tag, self.digest)


def parse_image_reference(text: str) -> ImageReference:
    """Split a full reference; the first component is a host by docker's rule (it has '.' or ':',
    or is localhost). NAME_INVALID, TAG_INVALID or DIGEST_INVALID for what does not parse."""
    host: str | None = None
    rest = text
    first, slash, remainder = text.partition("/")
    if slash and remainder and ("." in first or ":" in first or first == "localhost"):
        host, rest = first, remainder
    digest = None
    if "@" in rest:
        rest, _, raw = rest.partition("@")
        digest = parse_digest(raw)
    tag = None
    head, colon, candidate = rest.rpartition(":")
    if colon and "/" not in candidate:
        rest, tag = head, validate_tag(candidate)
    name = rest
    validate_name(name[:-1] if name.endswith("/") else name)
    if name.endswith("/") and (tag is not None or digest is not None):
        raise NameInvalid({"name": text[:300], "reason": "a namespace takes no tag or digest"})
    if host is not None and ":" in host:
        port = host.rpartition(":")[2]
        if not port.isdigit():
            raise NameInvalid({"name": text[:300], "reason": f"{host} is not HOST:PORT"})
    return ImageReference(host, name, tag, digest)
