"""Registry tokens (Docker's token spec): the built-in token service and the verification every node does.

The service signs JWTs with a private key (ES256/ES384 for EC keys, RS256 for RSA) and names the key
with the libtrust key id (`kid`) Distribution looks up; nodes hold only certificates or public keys
(`rootcertbundle`), so any node verifies any token and none can mint one.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..config import TokenAuth
from ..context import note
from ..errors import Denied, Unauthorized
from .access import Access, AccessControl, format_scopes, from_claim, parse_scopes, to_claim
from .basic import Credentials, PasswordSignIn, authorization, parse_basic

# Clock skew allowed between the token service and the nodes (Distribution allows the same).
LEEWAY_SECONDS = 60
TOKEN_PATH = "/auth/token"
_MAX_FORM_BYTES = 16 * 1024
_CACHE_ENTRIES = 10_000
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.S)

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class TokenError(ValueError):
    """A key or certificate file that cannot be used."""


class InvalidToken(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def key_id(key: PublicKey) -> str:
    """libtrust's key id: SHA-256 of the DER public key, first 240 bits, base32 in 12 groups of 4."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


_CURVE_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def algorithms_for(key: PublicKey | PrivateKey) -> list[str]:
    """The JWS algorithms a key can sign with; the first is what the token service uses."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        algorithm = _CURVE_ALGORITHMS.get(key.curve.name)
        if algorithm is None:
            raise TokenError(f"unsupported EC curve {key.curve.name}")
        return [algorithm]
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise TokenError("RSA keys must have at least 2048 bits")
        return ["RS256", "RS384", "RS512"]
    raise TokenError("token keys must be EC or RSA")


def load_signing_key(path: str) -> PrivateKey:
    try:
        with open(path, "rb") as handle:
            key = serialization.load_pem_private_key(handle.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise TokenError(f"cannot load the token signing key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TokenError(f"{path}: token signing keys must be EC or RSA")
    algorithms_for(key)
    return key


def load_trusted_keys(path: str) -> dict[str, PublicKey]:
    """kid -> public key for each certificate (or PUBLIC KEY block) in a PEM bundle."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise TokenError(f"cannot read auth.token.rootcertbundle {path}: {exc}") from None
    keys: dict[str, PublicKey] = {}
    for block in _PEM_BLOCK.finditer(data):
        kind = block.group(1)
        try:
            if kind == b"CERTIFICATE":
                key: Any = x509.load_pem_x509_certificate(block.group(0)).public_key()
            elif kind == b"PUBLIC KEY":
                key = serialization.load_pem_public_key(block.group(0))
            else:
                continue
        except ValueError as exc:
            raise TokenError(f"{path}: unreadable {kind.decode()} block: {exc}") from None
        if isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            algorithms_for(key)
            keys[key_id(key)] = key
    if not keys:
        raise TokenError(f"{path} holds no EC or RSA certificate or public key")
    return keys


@dataclass(frozen=True)
class TokenClaims:
    subject: str | None  # None for an anonymous token
    access: frozenset[Access]
    expires: float
    not_before: float


class TokenVerifier:
    """Checks signature (by `kid`, with only the algorithms the key allows), issuer, audience and times."""

    def __init__(
        self, *, issuer: str, service: str, keys: dict[str, PublicKey], algorithms: Iterable[str] = ()
    ) -> None:
        self.issuer = issuer
        self.service = service
        self._keys = keys
        self._only = set(algorithms)
        self._cache: OrderedDict[bytes, TokenClaims] = OrderedDict()

    def verify(self, token: str) -> TokenClaims:
        now = time.time()
        digest = hashlib.sha256(token.encode()).digest()
        claims = self._cache.get(digest)
        if claims is None:
            claims = self._verify(token)
            self._cache[digest] = claims
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        if now > claims.expires + LEEWAY_SECONDS:
            self._cache.pop(digest, None)
            raise InvalidToken("token expired")
        if now < claims.not_before - LEEWAY_SECONDS:
            raise InvalidToken("token not yet valid")
        return claims

    def _verify(self, token: str) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        kid, algorithm = header.get("kid"), header.get("alg")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidToken("token signed by an unknown key")
        allowed = [a for a in algorithms_for(key) if not self._only or a in self._only]
        if algorithm not in allowed:
            raise InvalidToken(f"signing algorithm {str(algorithm)[:20]!r} not allowed for this key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.service,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("token for another service") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("token from an untrusted issuer") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad token signature") from None
        except jwt.PyJWTError:
            raise InvalidToken("invalid token") from None
        subject = claims.get("sub")
        nbf = claims.get("nbf")
        return TokenClaims(
            subject if isinstance(subject, str) and subject else None,
            from_claim(claims.get("access")),
            float(claims["exp"]),
            float(nbf) if isinstance(nbf, int | float) else 0.0,
        )


class TokenIssuer:
    """Signs access tokens, and refresh tokens (a different audience, so never taken for access)."""

    def __init__(self, key: PrivateKey, *, issuer: str, service: str, expiration: float, refresh_expiration: float):
        self._key = key
        self.algorithm = algorithms_for(key)[0]
        self.kid = key_id(key.public_key())
        self.issuer = issuer
        self.service = service
        self.expiration = int(expiration)
        self.refresh_expiration = int(refresh_expiration)

    @property
    def public_key(self) -> PublicKey:
        return self._key.public_key()

    @property
    def _refresh_audience(self) -> str:
        return f"{self.service}#refresh"

    def _sign(self, subject: str, audience: str, lifetime: int, **extra: Any) -> tuple[str, int]:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": now + lifetime,
            "nbf": now,
            "iat": now,
            "jti": secrets.token_urlsafe(16),
            **extra,
        }
        token = jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"kid": self.kid, "typ": "JWT"})
        return token, now

    def access_token(self, subject: str | None, access: list[Access]) -> tuple[str, int]:
        """(token, issued at)."""
        return self._sign(subject or "", self.service, self.expiration, access=to_claim(access))

    def refresh_token(self, subject: str) -> str:
        return self._sign(subject, self._refresh_audience, self.refresh_expiration)[0]

    def refresh_subject(self, token: str) -> str:
        """The user a refresh token was issued to; InvalidToken otherwise."""
        try:
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=[self.algorithm],
                audience=self._refresh_audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError:
            raise InvalidToken("invalid refresh token") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("invalid refresh token")
        return subject


def build_issuer(config: TokenAuth) -> TokenIssuer:
    return TokenIssuer(
        load_signing_key(config.signingkey),
        issuer=config.issuer,
        service=config.service,
        expiration=config.expiration,
        refresh_expiration=config.refreshexpiration,
    )


def _iso(timestamp: int) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TokenService:
    """GET /auth/token (Docker's token spec) and POST /auth/token (its OAuth2 password and refresh grants)."""

    def __init__(self, issuer: TokenIssuer, sign_in: PasswordSignIn, access: AccessControl) -> None:
        self.issuer = issuer
        self.sign_in = sign_in
        self.access = access
        self._challenge = {"WWW-Authenticate": f'Basic realm="{issuer.service}"'}

    def routes(self) -> list[Route]:
        return [
            Route(TOKEN_PATH, self.get, methods=["GET"]),
            Route(TOKEN_PATH, self.post, methods=["POST"]),
        ]

    def _check_service(self, service: str | None) -> None:
        if service and service != self.issuer.service:
            raise Denied({"service": service[:200]}, message="this token service issues tokens for another service")

    def _remote(self, request: Request) -> str | None:
        return request.client.host if request.client else None

    async def get(self, request: Request) -> Response:
        note(request.scope, record=True, action="token")
        params = request.query_params
        self._check_service(params.get("service"))
        remote = self._remote(request)
        user = None
        header = authorization(request.scope["headers"])
        if header is not None and header[0] == "basic":
            try:
                credentials = parse_basic(header[1])
            except ValueError:
                self.sign_in.check_not_blocked(remote)
                raise self.sign_in.refuse(
                    remote,
                    None,
                    "malformed Basic credentials",
                    message="malformed credentials",
                    headers=self._challenge,
                ) from None
            if credentials is not None:
                user = await self.sign_in.sign_in(credentials, remote=remote, challenge=self._challenge)
        offline = params.get("offline_token", "").lower() == "true"
        return await self._respond(request, user, parse_scopes(params.getlist("scope")), offline, token_field=True)

    async def post(self, request: Request) -> Response:
        note(request.scope, record=True, action="token")
        form = await self._form(request)
        self._check_service(form.get("service"))
        remote = self._remote(request)
        grant = form.get("grant_type")
        if grant == "password":
            username = form.get("username", "")
            if not username:
                raise Unauthorized(message="username is required", headers=self._challenge)
            credentials = Credentials(username, form.get("password", "").encode())
            user: str | None = await self.sign_in.sign_in(credentials, remote=remote, challenge=self._challenge)
        elif grant == "refresh_token":
            self.sign_in.check_not_blocked(remote)
            try:
                user = self.issuer.refresh_subject(form.get("refresh_token", ""))
            except InvalidToken as exc:
                raise self.sign_in.refuse(
                    remote, None, exc.reason, message=exc.reason, headers=self._challenge
                ) from None
            users = self.sign_in.users
            if users is None or user not in users:
                raise self.sign_in.refuse(
                    remote,
                    user,
                    "refresh token of a removed user",
                    message="invalid refresh token",
                    headers=self._challenge,
                )
        else:
            raise Unauthorized(
                {"grant_type": str(grant)[:50]}, message="unsupported grant type", headers=self._challenge
            )
        offline = form.get("access_type") == "offline"
        return await self._respond(request, user, parse_scopes([form.get("scope", "")]), offline, token_field=False)

    async def _form(self, request: Request) -> dict[str, str]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_FORM_BYTES:
                raise Unauthorized(message="request too large", headers=self._challenge)
        parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {key: values[-1] for key, values in parsed.items()}

    async def _respond(
        self, request: Request, user: str | None, requested: list[Access], offline: bool, *, token_field: bool
    ) -> Response:
        granted = self.access.grant(user, requested)
        token, issued = self.issuer.access_token(user, granted)
        body: dict[str, Any] = {
            "access_token": token,
            "expires_in": self.issuer.expiration,
            "issued_at": _iso(issued),
            "scope": format_scopes(granted),
        }
        if token_field:
            body["token"] = token
        if offline and user is not None:
            body["refresh_token"] = self.issuer.refresh_token(user)
        note(request.scope, user=user, requested=format_scopes(requested), granted=format_scopes(granted))
        return Response(
            json.dumps(body).encode(),
            media_type="application/json",
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )
