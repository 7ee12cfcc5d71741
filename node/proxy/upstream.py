"""A client of one upstream registry: manifests, blobs and tags, with Basic or token (Docker Hub) auth.

Every failure is one of four exceptions that name the upstream, so a client of the cache is told
which upstream failed and how: unreachable or overloaded (UpstreamUnavailable: connection errors,
timeouts, 5xx, 429 with its Retry-After), credentials refused (UpstreamRefused), not there
(UpstreamNotFound), or an answer that cannot be right (UpstreamInvalid).
"""

from __future__ import annotations

import base64
import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from ..config import Upstream
from ..manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

# Every manifest type Wharf stores, best first: the upstream answers with what it holds.
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
USER_AGENT = "wharf-pull-through-cache"
CHUNK = 1 << 20
_TOKEN_ENTRIES = 10_000
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
# Tags lists are read a page at a time, this many pages at most.
_TAG_PAGES = 100


class UpstreamError(Exception):
    """An upstream request that failed; the message names the upstream and says what happened."""

    reason = "error"

    def __init__(self, upstream: Upstream, what: str, *, status: int | None = None) -> None:
        named = upstream.name if upstream.name == upstream.remoteurl else f"{upstream.name} ({upstream.remoteurl})"
        super().__init__(f"upstream {named}: {what}")
        self.upstream = upstream
        self.status = status


class UpstreamUnavailable(UpstreamError):
    """Unreachable, timed out, 5xx, or 429 (then `retry_after` says for how long, when it said)."""

    reason = "unavailable"

    def __init__(self, upstream: Upstream, what: str, *, status: int | None = None, retry_after: str | None = None):
        super().__init__(upstream, what, status=status)
        self.retry_after = retry_after
        if status == 429:
            self.reason = "ratelimited"


class UpstreamRefused(UpstreamError):
    """The upstream (or its token service) refused the configured credentials, or access with them."""

    reason = "refused"


class UpstreamNotFound(UpstreamError):
    """The upstream does not have it; `code` is the upstream's own error code when it sent one."""

    reason = "notfound"

    def __init__(self, upstream: Upstream, what: str, *, code: str | None = None) -> None:
        super().__init__(upstream, what, status=404)
        self.code = code


class UpstreamInvalid(UpstreamError):
    """An answer that cannot be right: a digest that does not match, a manifest Wharf cannot store."""

    reason = "invalid"


@dataclass(frozen=True)
class RemoteManifest:
    digest: str | None  # from Docker-Content-Digest; None when a HEAD did not say
    media_type: str
    body: bytes | None  # None for a HEAD


@dataclass(frozen=True)
class _Challenge:
    scheme: str  # "basic" or "bearer"
    realm: str = ""
    service: str = ""


class UpstreamClient:
    """One upstream registry over one connection pool. Tokens are kept per scope until they expire."""

    def __init__(self, upstream: Upstream, *, timeout: float = 30.0, transport: Any = None) -> None:
        self.upstream = upstream
        self._http = httpx.AsyncClient(
            base_url=upstream.remoteurl,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            follow_redirects=True,  # blob GETs go to a CDN at some registries; Authorization is not sent on
            headers={"User-Agent": USER_AGENT},
            transport=transport,
        )
        self._challenge: _Challenge | None = None
        self._tokens: OrderedDict[str, tuple[str, float]] = OrderedDict()

    async def close(self) -> None:
        await self._http.aclose()

    # -- the registry API -------------------------------------------------------------------------

    async def manifest(self, repository: str, reference: str, *, head: bool = False) -> RemoteManifest:
        path = f"/v2/{repository}/manifests/{reference}"
        response = await self._send("HEAD" if head else "GET", path, repository, headers={"Accept": ACCEPT})
        try:
            self._raise_for(
                response,
                f"manifest {repository}:{reference}" if ":" not in reference else f"manifest {repository}@{reference}",
            )
            media_type = response.headers.get("content-type", "").split(";", 1)[0].strip()
            body = None if head else await response.aread()
            return RemoteManifest(response.headers.get("docker-content-digest"), media_type, body)
        finally:
            await response.aclose()

    async def blob_size(self, repository: str, digest: str) -> int:
        response = await self._send("HEAD", f"/v2/{repository}/blobs/{digest}", repository)
        try:
            self._raise_for(response, f"blob {digest} of {repository}")
            length = response.headers.get("content-length")
            if length is None or not length.isdigit():
                raise UpstreamInvalid(self.upstream, f"no size for blob {digest} of {repository}")
            return int(length)
        finally:
            await response.aclose()

    @contextlib.asynccontextmanager
    async def blob(self, repository: str, digest: str) -> AsyncIterator[tuple[int | None, AsyncIterator[bytes]]]:
        """(size if the upstream said it, the bytes) of a blob, read as the caller goes."""
        response = await self._send("GET", f"/v2/{repository}/blobs/{digest}", repository, stream=True)
        try:
            self._raise_for(response, f"blob {digest} of {repository}")
            length = response.headers.get("content-length")
            size = int(length) if length is not None and length.isdigit() else None
            yield size, self._chunks(response, f"blob {digest} of {repository}")
        finally:
            await response.aclose()

    async def tags(self, repository: str) -> list[str]:
        """Every tag the upstream lists for the repository (following its pages)."""
        found: list[str] = []
        path = f"/v2/{repository}/tags/list"
        for _ in range(_TAG_PAGES):
            response = await self._send("GET", path, repository)
            try:
                self._raise_for(response, f"tags of {repository}")
                body = await response.aread()
            finally:
                await response.aclose()
            try:
                tags = httpx.Response(200, content=body).json().get("tags") or []
            except ValueError:
                raise UpstreamInvalid(self.upstream, f"tags of {repository}: not JSON") from None
            found += [t for t in tags if isinstance(t, str)]
            following = _next_link(response.headers.get("link", ""))
            if following is None:
                break
            path = following
        return found

    async def _chunks(self, response: httpx.Response, what: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_bytes(CHUNK):
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(self.upstream, f"{what}: the transfer broke ({_describe(exc)})") from None

    # -- requests with authentication ---------------------------------------------------------------

    async def _send(
        self, method: str, path: str, repository: str, *, headers: dict[str, str] | None = None, stream: bool = False
    ) -> httpx.Response:
        """A request, authenticated as the upstream asks (once it has said how), retried once on 401."""
        scope = f"repository:{repository}:pull"
        for attempt in range(2):
            sent = dict(headers or {})
            credential = await self._credential(scope) if self._challenge is not None else None
            if credential:
                sent["Authorization"] = credential
            request = self._http.build_request(method, path, headers=sent)
            try:
                response = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise UpstreamUnavailable(self.upstream, f"{method} {path}: {_describe(exc)}") from None
            if response.status_code != 401:
                if not stream and method != "HEAD":
                    await response.aread()
                return response
            challenge = _parse_challenge(response.headers.get("www-authenticate", ""))
            await response.aclose()
            if attempt == 1 or challenge is None:
                raise self._refused(f"{method} {path} answered 401 after signing in")
            if challenge.scheme == "basic" and not self.upstream.username:
                raise self._refused("asks for a user name and password, and none are configured")
            self._challenge = challenge
            self._tokens.pop(scope, None)
        raise AssertionError("unreachable")

    def _refused(self, what: str) -> UpstreamRefused:
        who = f"as {self.upstream.username}" if self.upstream.username else "anonymously"
        return UpstreamRefused(self.upstream, f"{what} (signing in {who}); check its username and password")

    async def _credential(self, scope: str) -> str | None:
        challenge = self._challenge
        assert challenge is not None
        if challenge.scheme == "basic":
            return _basic(self.upstream.username, self.upstream.password)
        cached = self._tokens.get(scope)
        if cached is not None and cached[1] > time.monotonic():
            self._tokens.move_to_end(scope)
            return f"Bearer {cached[0]}"
        token, lifetime = await self._token(challenge, scope)
        self._tokens[scope] = (token, time.monotonic() + max(lifetime - 10, lifetime / 2))
        while len(self._tokens) > _TOKEN_ENTRIES:
            self._tokens.popitem(last=False)
        return f"Bearer {token}"

    async def _token(self, challenge: _Challenge, scope: str) -> tuple[str, float]:
        """A token from the upstream's token service (Docker Hub's flow), with the configured credentials."""
        params = {"scope": scope}
        if challenge.service:
            params["service"] = challenge.service
        headers = {}
        if self.upstream.username:
            headers["Authorization"] = _basic(self.upstream.username, self.upstream.password)
            params["account"] = self.upstream.username
        try:
            response = await self._http.get(challenge.realm, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(self.upstream, f"token service {challenge.realm}: {_describe(exc)}") from None
        if response.status_code in (401, 403):
            raise self._refused(f"its token service {challenge.realm} answered {response.status_code}")
        if response.status_code == 429 or response.status_code >= 500:
            raise UpstreamUnavailable(
                self.upstream,
                f"token service {challenge.realm} answered {response.status_code}",
                status=response.status_code,
                retry_after=response.headers.get("retry-after"),
            )
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if response.status_code != 200 or not isinstance(token, str) or not token:
            raise UpstreamInvalid(
                self.upstream, f"token service {challenge.realm} gave no token ({response.status_code})"
            )
        return token, lifetime

    def _raise_for(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        if status == 404:
            raise UpstreamNotFound(self.upstream, f"{what} is not there", code=_error_code(response))
        if status == 403:
            raise self._refused(f"{what}: access denied (403)")
        if status == 429 or status >= 500:
            raise UpstreamUnavailable(
                self.upstream,
                f"{what}: answered {status}",
                status=status,
                retry_after=response.headers.get("retry-after"),
            )
        raise UpstreamInvalid(self.upstream, f"{what}: answered {status}", status=status)


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _parse_challenge(header: str) -> _Challenge | None:
    scheme, _, params = header.strip().partition(" ")
    values = dict(_CHALLENGE_PARAM.findall(params))
    if scheme.lower() == "basic":
        return _Challenge("basic", values.get("realm", ""))
    if scheme.lower() == "bearer" and values.get("realm", "").startswith(("http://", "https://")):
        return _Challenge("bearer", values["realm"], values.get("service", ""))
    return None


def _error_code(response: httpx.Response) -> str | None:
    try:
        errors = response.json().get("errors") if response.content else None
        code = errors[0].get("code") if errors else None
    except (ValueError, AttributeError, IndexError, TypeError, httpx.ResponseNotRead):
        return None
    return code if isinstance(code, str) else None


def _next_link(header: str) -> str | None:
    match = re.match(r"\s*<([^>]+)>\s*;\s*rel=\"?next\"?", header)
    if match is None:
        return None
    target = match.group(1)
    return target if target.startswith("/v2/") else None


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
