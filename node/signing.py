"""`wharf sign`, `wharf verify` and `wharf keygen`: cosign-format signatures over the registry API.

The format is cosign's (node/cosign.py); these commands talk to any OCI registry, Wharf or not,
with the user's registry credentials: `--username` with `--password-stdin`, or the entry for the
registry in the usual auth files (containers' auth.json, Docker's config.json).
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from . import cosign

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
PASSWORD_ENV = "COSIGN_PASSWORD"  # the variable cosign reads, so scripts work with either tool


class CommandError(Exception):
    """Something the user can fix: printed as one line, exit status 1."""


# -- references ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    host: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return f"{self.host}/{self.repository}" + (f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}")


def parse_ref(text: str) -> ImageRef:
    """`HOST[:PORT]/REPO[:TAG|@DIGEST]`; the registry host must be named."""
    host, sep, rest = text.partition("/")
    if not sep or not rest or not ("." in host or ":" in host or host == "localhost"):
        raise CommandError(f"{text}: name the registry, as in 127.0.0.1:5000/{text}")
    repository, _, digest = rest.partition("@")
    tag = None
    name, colon, maybe_tag = repository.rpartition(":")
    if colon and "/" not in maybe_tag:
        repository, tag = name, maybe_tag
    if digest and ":" not in digest:
        raise CommandError(f"{text}: {digest} is not a digest")
    return ImageRef(host, repository, tag, digest or None)


# -- a small registry client -----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are followed by the client itself, so credentials never travel to a storage URL."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class RegistryClient:
    """The registry calls signing needs, with Basic or Bearer (token service) authentication."""

    def __init__(
        self, host: str, *, plain_http: bool, context: ssl.SSLContext | None, credentials: tuple[str, str] | None
    ) -> None:
        self.base = f"{'http' if plain_http else 'https'}://{host}"
        self.credentials = credentials
        handlers: list[Any] = [urllib.request.ProxyHandler({}), _NoRedirect()]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)
        self._authorization: str | None = None

    def _open(self, method: str, url: str, body: bytes | None, headers: dict[str, str], auth: bool) -> Reply:
        request = urllib.request.Request(url, data=body, method=method)
        for name, value in headers.items():
            request.add_header(name, value)
        if auth and self._authorization:
            request.add_unredirected_header("Authorization", self._authorization)
        try:
            with self._opener.open(request, timeout=60) as response:
                return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())
        except urllib.error.URLError as exc:
            raise CommandError(f"cannot reach {url}: {exc.reason}") from None

    def call(
        self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Reply:
        url = path if path.startswith("http") else self.base + path
        headers = headers or {}
        reply = self._open(method, url, body, headers, True)
        if reply.status == 401 and self._authenticate(reply.headers.get("www-authenticate", "")):
            reply = self._open(method, url, body, headers, True)
        for _ in range(5):
            if reply.status not in (301, 302, 303, 307, 308) or "location" not in reply.headers:
                break
            # A blob redirected to storage: its URL carries its own signature, never our credentials.
            target = urllib.parse.urljoin(url, reply.headers["location"])
            reply = self._open(method, target, body, {}, target.startswith(self.base))
        return reply

    def _authenticate(self, challenge: str) -> bool:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self.credentials is None:
                return False
            self._authorization = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            return True
        if scheme.lower() != "bearer":
            return False
        fields = dict(_challenge_fields(params))
        realm = fields.pop("realm", "")
        if not realm:
            return False
        query = urllib.parse.urlencode({k: v for k, v in fields.items() if k in ("service", "scope")})
        headers = {}
        if self.credentials is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        request = urllib.request.Request(realm + ("&" if "?" in realm else "?") + query, headers=headers)
        try:
            with self._opener.open(request, timeout=60) as response:
                doc = json.loads(response.read())
        except (urllib.error.URLError, ValueError) as exc:
            raise CommandError(f"the token service {realm} refused: {exc}") from None
        token = doc.get("token") or doc.get("access_token")
        if not token:
            return False
        self._authorization = f"Bearer {token}"
        return True

    def check(self, reply: Reply, what: str, *ok: int) -> Reply:
        if reply.status not in (ok or (200,)):
            detail = reply.body[:300].decode(errors="replace")
            raise CommandError(f"{what}: the registry answered {reply.status} {detail}")
        return reply

    def head_manifest(self, ref: ImageRef) -> Reply:
        path = f"/v2/{ref.repository}/manifests/{ref.reference}"
        return self.check(self.call("HEAD", path, headers={"Accept": MANIFEST_TYPES}), f"{ref}")

    def get_manifest(self, repository: str, reference: str) -> bytes | None:
        reply = self.call("GET", f"/v2/{repository}/manifests/{reference}", headers={"Accept": MANIFEST_TYPES})
        if reply.status == 404:
            return None
        return self.check(reply, f"{repository}:{reference}").body

    def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> None:
        reply = self.call(
            "PUT", f"/v2/{repository}/manifests/{reference}", body=body, headers={"Content-Type": media_type}
        )
        self.check(reply, f"pushing {repository}:{reference}", 201)

    def get_blob(self, repository: str, digest: str) -> bytes | None:
        reply = self.call("GET", f"/v2/{repository}/blobs/{digest}")
        if reply.status == 404:
            return None
        return self.check(reply, f"blob {digest}").body

    def push_blob(self, repository: str, data: bytes, digest: str) -> None:
        if self.call("HEAD", f"/v2/{repository}/blobs/{digest}").status == 200:
            return
        started = self.check(self.call("POST", f"/v2/{repository}/blobs/uploads/"), "starting an upload", 202)
        location = urllib.parse.urljoin(self.base + "/", started.headers.get("location", ""))
        separator = "&" if "?" in location else "?"
        reply = self.call(
            "PUT",
            f"{location}{separator}digest={urllib.parse.quote(digest)}",
            body=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        self.check(reply, f"uploading {digest}", 201)

    def referrers(self, repository: str, digest: str) -> list[dict[str, Any]]:
        reply = self.call("GET", f"/v2/{repository}/referrers/{digest}")
        if reply.status != 200:
            return []  # a registry without the referrers API
        try:
            found = json.loads(reply.body).get("manifests") or []
        except ValueError:
            return []
        return [d for d in found if isinstance(d, dict)]


def _challenge_fields(params: str) -> list[tuple[str, str]]:
    fields = []
    for part in params.split(","):
        name, _, value = part.strip().partition("=")
        if name:
            fields.append((name.strip().lower(), value.strip().strip('"')))
    return fields


def _auth_files() -> list[str]:
    found = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        found.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        found.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    docker = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    found.append(os.path.join(docker, "config.json"))
    return found


def credentials_for(host: str, args: argparse.Namespace) -> tuple[str, str] | None:
    """--username with --password-stdin, or the host's entry in the first auth file that has one."""
    if args.username:
        if not args.password_stdin:
            raise CommandError("--username needs --password-stdin (the password as one line on standard input)")
        return args.username, sys.stdin.readline().rstrip("\r\n")
    for path in [args.authfile] if args.authfile else _auth_files():
        try:
            with open(path) as handle:
                auths = json.load(handle).get("auths") or {}
        except (OSError, ValueError):
            continue
        entry = auths.get(host) or auths.get(f"https://{host}") or auths.get(f"http://{host}")
        if isinstance(entry, dict) and entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
    return None


def client_for(ref: ImageRef, args: argparse.Namespace) -> RegistryClient:
    context = None
    if not args.plain_http:
        if args.insecure:
            context = ssl._create_unverified_context()
        elif args.ca_cert:
            context = ssl.create_default_context(cafile=args.ca_cert)
    return RegistryClient(
        ref.host, plain_http=args.plain_http, context=context, credentials=credentials_for(ref.host, args)
    )


# -- passwords -------------------------------------------------------------------------------------


def _password(confirm: bool) -> bytes:
    if PASSWORD_ENV in os.environ:
        return os.environ[PASSWORD_ENV].encode()
    if not sys.stdin.isatty():
        raise CommandError(f"the key is encrypted: set {PASSWORD_ENV} (it may be empty) or run in a terminal")
    password = getpass.getpass("Enter password for private key: ")
    if confirm and getpass.getpass("Enter password for private key again: ") != password:
        raise CommandError("the passwords do not match")
    return password.encode()


# -- the commands ----------------------------------------------------------------------------------


def sign(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    try:
        with open(args.key, "rb") as handle:
            key_data = handle.read()
    except OSError as exc:
        raise CommandError(f"cannot read {args.key}: {exc.strerror or exc}") from None
    key = cosign.load_private_key(key_data, lambda: _password(False), args.key)
    client = client_for(ref, args)
    head = client.head_manifest(ref)
    digest = head.headers.get("docker-content-digest") or ""
    if ref.digest and digest != ref.digest:
        raise CommandError(f"{ref}: the registry names it {digest or 'without a digest'}")
    if not digest.startswith("sha256:"):
        raise CommandError(f"{ref}: the registry gave no sha256 digest for it")
    annotations = dict(_annotation(a) for a in args.annotation or [])
    payload = cosign.simple_signing_payload(f"{ref.host}/{ref.repository}", digest, annotations or None)
    layer = cosign.layer_descriptor(payload, cosign.sign(key, payload))
    client.push_blob(ref.repository, payload, layer["digest"])
    if not args.no_tag:
        tag = cosign.signature_tag(digest)
        layers = _existing_layers(client.get_manifest(ref.repository, tag))
        if not _already_signed(layers, payload, key):
            layers.append(layer)
        manifest, config = cosign.tag_scheme_manifest(layers)
        client.push_blob(ref.repository, config, "sha256:" + _sha256(config))
        client.put_manifest(ref.repository, tag, manifest, cosign.OCI_MANIFEST)
        print(f"Pushing signature to: {ref.host}/{ref.repository}:{tag}", file=sys.stderr)
    if args.referrer:
        subject = {
            "mediaType": head.headers.get("content-type", "").split(";")[0] or cosign.OCI_MANIFEST,
            "digest": digest,
            "size": int(head.headers.get("content-length") or 0),
        }
        client.push_blob(ref.repository, cosign.EMPTY_CONFIG, "sha256:" + _sha256(cosign.EMPTY_CONFIG))
        manifest = cosign.referrer_manifest(subject, layer)
        referrer = "sha256:" + _sha256(manifest)
        client.put_manifest(ref.repository, referrer, manifest, cosign.OCI_MANIFEST)
        print(f"Pushing signature to: {ref.host}/{ref.repository}@{referrer} (referrer)", file=sys.stderr)
    return 0


def _annotation(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise CommandError(f"-a {text}: annotations are KEY=VALUE")
    return name, value


def _existing_layers(manifest: bytes | None) -> list[dict[str, Any]]:
    """The signature layers already at the signature tag: a new signature is added beside them."""
    if manifest is None:
        return []
    try:
        layers = json.loads(manifest).get("layers") or []
    except (ValueError, AttributeError):
        return []
    return [layer for layer in layers if isinstance(layer, dict) and layer.get("mediaType") == cosign.SIMPLE_SIGNING]


def _already_signed(layers: list[dict[str, Any]], payload: bytes, key: cosign.PrivateKey) -> bool:
    """Whether a layer already holds a signature of this payload by this key (ECDSA signatures differ each time)."""
    manifest, _ = cosign.tag_scheme_manifest(layers)
    for existing in cosign.signature_layers(manifest):
        if cosign.payload_matches(existing, payload) and cosign.verify(key.public_key(), existing.signature, payload):
            return True
    return False


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def verify(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    key = cosign.load_public_key_file(args.key)
    client = client_for(ref, args)
    digest = client.head_manifest(ref).headers.get("docker-content-digest") or ""
    if ref.digest and digest != ref.digest:
        raise CommandError(f"{ref}: the registry names it {digest or 'without a digest'}")
    manifests = []
    tagged = client.get_manifest(ref.repository, cosign.signature_tag(digest))
    if tagged is not None:
        manifests.append(tagged)
    for descriptor in client.referrers(ref.repository, digest):
        body = client.get_manifest(ref.repository, str(descriptor.get("digest")))
        if body is not None:
            manifests.append(body)
    valid = []
    for body in manifests:
        for layer in cosign.signature_layers(body):
            payload = client.get_blob(ref.repository, layer.payload_digest)
            if payload is not None and cosign.check(layer, payload, digest, [key]) is not None:
                valid.append(json.loads(payload))
    if not valid:
        print(f"Error: no matching signatures for {ref.host}/{ref.repository}@{digest}", file=sys.stderr)
        return 1
    print(
        f"\nVerification for {ref.host}/{ref.repository}@{digest} --\n"
        "The following checks were performed on each of these signatures:\n"
        "  - The cosign claims were validated\n"
        "  - The signatures were verified against the specified public key\n",
        file=sys.stderr,
    )
    print(json.dumps(valid))
    return 0


def keygen(args: argparse.Namespace) -> int:
    private_path, public_path = f"{args.output_key_prefix}.key", f"{args.output_key_prefix}.pub"
    for path in (private_path, public_path):
        if os.path.exists(path) and not args.force:
            raise CommandError(f"{path} exists; pass --force to replace it")
    key = cosign.generate_key(args.type)
    if args.plain:
        private = cosign.plain_private_key(key)
    else:
        private = cosign.encrypt_private_key(key, _password(True))
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private)
    with open(public_path, "wb") as handle:
        handle.write(cosign.public_pem(key.public_key()))
    kind = "plain PKCS#8" if args.plain else "encrypted (cosign's format)"
    print(f"Private key written to {private_path} ({kind})\nPublic key written to {public_path}", file=sys.stderr)
    return 0
