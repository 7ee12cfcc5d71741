"""The web pages: each page reads what the API would give the same person, and renders it as HTML.

Every page is rendered on the server from the records a handler of the API reads (the catalog,
tag details, manifests, referrers, usage), filtered by the same access rules, so a page shows
nothing its viewer could not pull, and makes no request of its own to the API. With authentication
on, every page but the sign-in page and its stylesheet wants a session (node/ui/session.py).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from coordinator import gc as gc_records
from coordinator import retention_apply as retention_records
from coordinator.metadata import TagRecord
from coordinator.quota import QuotaScope
from coordinator.quota import usage as quota_usage
from coordinator.usage import TOTAL

from .. import cosign
from .. import manifest as manifests
from ..api.manifests import manifest_bytes
from ..auth.access import PULL
from ..auth.basic import Credentials
from ..auth.services import AuthServices
from ..config import Config
from ..context import note
from ..errors import ERROR_KEY, ManifestUnknown, RegistryError
from ..gc import collect
from ..inventory import SORTS, timestamp
from ..reference import is_tag, parse_digest, validate_name
from ..replication import report as replication_report
from ..retention import make_plan
from ..services import Services
from . import present
from .session import COOKIE, Person, Sessions

log = logging.getLogger("wharf.ui")

HERE = Path(__file__).parent
PAGE = 50  # repositories or tags a page lists
MAX_QUERY = 200  # characters of a search, filter or cursor
MAX_CONFIG_BYTES = 1024 * 1024  # an image config read to show its platform and history
MAX_SHOWN_MANIFEST = 256 * 1024
MAX_REFERRERS = 200
PREVIEW_SECONDS = 300.0
MAX_MATCHES = 64
MAX_PLATFORMS = 100_000  # image manifests whose platform is kept  # searches (per viewer) whose matching repositories are kept  # a GC or retention preview is shown again for this long before it is redone

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class NotFound(Exception):
    """A page about something that does not exist, or that the viewer may not see (the same page)."""


@dataclass(frozen=True)
class Viewer:
    """Who looks at a page and what they may see."""

    person: Person | None  # None: authentication is off (everyone sees everything)
    may: Callable[[str], bool]

    @property
    def user(self) -> str | None:
        return self.person.user if self.person is not None else None

    def may_pull(self, repository: str) -> bool:
        return self.may(repository)


def _static_version() -> str:
    digest = hashlib.sha256()
    for path in sorted((HERE / "static").iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


class UI:
    """The pages of one node, built once from the configuration and the authentication services."""

    def __init__(self, config: Config, auth: AuthServices) -> None:
        self.config = config
        self.auth = auth
        self.enabled = config.ui.enabled
        self.base = config.http.prefix.rstrip("/") + "/ui"
        self._sessions: Sessions | None = None
        self._previews: dict[str, tuple[float, Any]] = {}
        self._platform_of: OrderedDict[str, str] = OrderedDict()  # image manifest digest -> os/arch
        self._matches: OrderedDict[tuple[str, str | None, bool], tuple[list[str], list[str]]] = OrderedDict()
        self._previewing: dict[str, asyncio.Lock] = {"gc": asyncio.Lock(), "retention": asyncio.Lock()}
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(present.FILTERS)
        self.env.globals.update(base=self.base, static_version=_static_version(), image_configs=IMAGE_CONFIGS)

    # -- routes ------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """The routes under /ui; they sign people in themselves, so authentication lets them through."""
        if not self.enabled:
            return [Route("/ui", self._off), Route("/ui/{rest:path}", self._off, methods=["GET", "HEAD", "POST"])]
        page = self._page
        return [
            Route("/ui", self._to_home),
            Route("/ui/", page(self.repositories)),
            Route("/ui/sign-in", self.sign_in_page, methods=["GET", "HEAD"]),
            Route("/ui/sign-in", self.sign_in, methods=["POST"]),
            Route("/ui/guest", self.guest, methods=["POST"]),
            Route("/ui/sign-out", self.sign_out, methods=["POST"]),
            Route("/ui/usage", page(self.usage)),
            Route("/ui/maintenance", page(self.maintenance)),
            Route("/ui/r/{name:path}/-/manifest/{reference}", page(self.image)),
            Route("/ui/r/{name:path}", page(self.repository)),
            Mount("/ui/static", app=StaticFiles(directory=HERE / "static"), name="ui-static"),
            Route("/ui/{rest:path}", self._unknown, methods=["GET", "HEAD", "POST"]),
        ]

    async def _off(self, request: Request) -> Response:
        return Response("the web pages are turned off (ui.enabled: false)\n", 404, media_type="text/plain")

    async def _to_home(self, request: Request) -> Response:
        return RedirectResponse(self.base + "/", 308)

    async def _unknown(self, request: Request) -> Response:
        viewer = await self._viewer(request)
        if viewer is None:
            return self._to_sign_in(request)
        return self._render(request, "error.html", viewer, status=404, title="Not found", message="No such page.")

    # -- sessions ------------------------------------------------------------------------------

    def sessions(self, request: Request) -> Sessions:
        if self._sessions is None:
            svc: Services = request.app.state.services
            self._sessions = Sessions(
                self.auth, svc.kv, secret=self.config.http.secret, lifetime=self.config.ui.session
            )
        return self._sessions

    async def _viewer(self, request: Request) -> Viewer | None:
        """The viewer of a request; None when authentication is on and the request has no valid session."""
        if not self.auth.enabled:
            return Viewer(None, lambda _: True)
        person = await self.sessions(request).person(request.cookies.get(COOKIE))
        if person is None:
            return None
        request.scope.setdefault("state", {})["user"] = person.user
        access = self.auth.access
        user = person.user
        return Viewer(person, lambda name: PULL in access.actions(user, name))

    def _page(
        self, handler: Callable[[Request, Viewer], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def page(request: Request) -> Response:
            viewer = await self._viewer(request)
            if viewer is None:
                return self._to_sign_in(request)
            try:
                return await handler(request, viewer)
            except NotFound as exc:
                message = str(exc) or "Nothing here."
                return self._render(request, "error.html", viewer, status=404, title="Not found", message=message)
            except RegistryError as exc:
                status = exc.status if 400 <= exc.status < 500 else 404
                return self._render(
                    request, "error.html", viewer, status=status, title="Not found", message=exc.message
                )

        return page

    def _to_sign_in(self, request: Request) -> Response:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{self.base}/sign-in?{urlencode({'next': here})}", 303)

    def _next(self, value: str | None) -> str:
        """Where to go after signing in: a page of these web pages, never another site."""
        home = self.base + "/"
        if not value or len(value) > 2000 or not value.startswith(home) or "\\" in value:
            return home
        parts = urlsplit(value)
        if parts.scheme or parts.netloc or value.startswith("//"):
            return home
        return value

    def _same_site(self, request: Request) -> bool:
        """A form posted from these pages, not from another site (sign-in and sign-out change the session)."""
        if request.headers.get("sec-fetch-site") == "cross-site":
            return False
        origin = request.headers.get("origin")
        if origin is None or origin == "null":
            return origin is None
        return urlsplit(origin).netloc == request.headers.get("host", "")

    def _cookie(self, response: Response, request: Request, value: str, max_age: int) -> None:
        response.set_cookie(
            COOKIE,
            value,
            max_age=max_age,
            path=self.base + "/",
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )

    async def sign_in_page(self, request: Request) -> Response:
        if not self.auth.enabled:
            return RedirectResponse(self.base + "/", 303)
        return self._sign_in_form(request, next=self._next(request.query_params.get("next")))

    def _sign_in_form(self, request: Request, *, next: str, error: str | None = None, status: int = 200) -> Response:
        sessions = self.sessions(request)
        return self._render(
            request,
            "signin.html",
            None,
            status=status,
            title="Sign in",
            next=next,
            error=error,
            passwords=sessions.passwords,
            guests=sessions.guests,
        )

    async def sign_in(self, request: Request) -> Response:
        if not self.auth.enabled:
            return RedirectResponse(self.base + "/", 303)
        form = await _form(request)
        target = self._next(_text(form.get("next")))
        if not self._same_site(request):
            return self._sign_in_form(request, next=target, error="This form was sent from another site.", status=403)
        user, password = _text(form.get("username")), _text(form.get("password"))
        if not user or not password or len(user) > 256 or len(password) > 1024:
            return self._sign_in_form(request, next=target, error="Enter a user name and a password.", status=400)
        if not self.sessions(request).passwords:
            return self._sign_in_form(request, next=target, error="Signing in with a password is off.", status=403)
        client = request.client
        try:
            signed = await self.auth.sign_in.sign_in(
                Credentials(user, password.encode()), remote=client.host if client else None, challenge={}
            )
        except RegistryError as exc:
            # The audit line of a refused sign-in, as for the API (node/audit.py reads it).
            request.scope.setdefault("state", {})[ERROR_KEY] = exc
            note(request.scope, action="login", object="ui")
            status = 429 if exc.status == 429 else 401
            message = "Too many failed sign-ins; try again later." if status == 429 else "Wrong user name or password."
            response = self._sign_in_form(request, next=target, error=message, status=status)
            response.headers.update({k: v for k, v in exc.headers.items() if k.lower() == "retry-after"})
            return response
        request.scope.setdefault("state", {})["user"] = signed
        note(request.scope, record=True, action="login", object="ui")
        response = RedirectResponse(target, 303)
        sessions = self.sessions(request)
        self._cookie(response, request, await sessions.issue(signed), int(sessions.lifetime))
        return response

    async def guest(self, request: Request) -> Response:
        """A session for someone who does not sign in: what anonymous callers may pull."""
        sessions = self.sessions(request)
        if not self.auth.enabled or not sessions.guests or not self._same_site(request):
            return RedirectResponse(self.base + "/sign-in", 303)
        form = await _form(request)
        response = RedirectResponse(self._next(_text(form.get("next"))), 303)
        self._cookie(response, request, await sessions.issue(None), int(sessions.lifetime))
        return response

    async def sign_out(self, request: Request) -> Response:
        response = RedirectResponse(self.base + "/sign-in" if self.auth.enabled else self.base + "/", 303)
        if self._same_site(request):
            response.delete_cookie(COOKIE, path=self.base + "/")
        return response

    # -- rendering -----------------------------------------------------------------------------

    def _render(
        self, request: Request, template: str, viewer: Viewer | None, *, status: int = 200, **context: Any
    ) -> Response:
        svc: Services = request.app.state.services
        body = self.env.get_template(template).render(
            viewer=viewer,
            auth=self.auth.enabled,
            multi_region=svc.regions is not None,
            readonly=svc.readonly.active,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(body, status, headers=SECURITY_HEADERS)

    # -- repositories ----------------------------------------------------------------------------

    async def repositories(self, request: Request, viewer: Viewer) -> Response:
        svc: Services = request.app.state.services
        query = _bounded(request.query_params.get("q")).strip().lower()
        after = _bounded(request.query_params.get("after"))
        every = await svc.catalog.get("", svc.metadata.repository_list)
        matching = self._matching(every, query, viewer)
        start = bisect.bisect_right(matching, after) if after else 0
        names = matching[start : start + PAGE]
        more = start + PAGE < len(matching)
        summaries = await svc.tag_details.summaries(names)
        usage = await svc.usage.scopes(names) if names else {}
        rows = [
            {
                "name": name,
                "tags": count,
                "pushed": newest,
                "stored": usage[name].unique if name in usage else None,
            }
            for name, (count, newest) in ((n, summaries[n]) for n in names)
        ]
        return self._render(
            request,
            "repositories.html",
            viewer,
            title="Repositories",
            rows=rows,
            query=query,
            total=len(matching),
            registry_empty=not every,
            shown_from=start + 1,
            next_after=names[-1] if more and names else None,
            first_page=start == 0,
            host=self._host(request),
        )

    def _matching(self, every: list[str], query: str, viewer: Viewer) -> list[str]:
        """The repositories a viewer may pull whose names hold `query`, kept while the catalog stands
        (the catalog cache hands out the same list until a repository comes or goes)."""
        key = (query, viewer.user, viewer.person is None)
        cached = self._matches.get(key)
        if cached is not None and cached[0] is every:
            self._matches.move_to_end(key)
            return cached[1]
        found = [n for n in every if (not query or query in n.lower()) and viewer.may_pull(n)]
        self._matches[key] = (every, found)
        while len(self._matches) > MAX_MATCHES:
            self._matches.popitem(last=False)
        return found

    # -- one repository ----------------------------------------------------------------------------

    def _repository(self, request: Request, viewer: Viewer) -> str:
        name = str(request.path_params["name"]).strip("/")
        try:
            validate_name(name)
        except RegistryError:
            raise NotFound("No such repository.") from None
        if not viewer.may_pull(name):
            raise NotFound("No such repository.")  # the same page as for one that does not exist
        return name

    async def repository(self, request: Request, viewer: Viewer) -> Response:
        svc: Services = request.app.state.services
        name = self._repository(request, viewer)
        sort = request.query_params.get("sort") or "pushed"
        if sort not in SORTS:
            sort = "pushed"
        pattern = _bounded(request.query_params.get("filter")).strip() or None
        last = _bounded(request.query_params.get("last")) or None
        page = await svc.tag_details.page(name, sort=sort, n=PAGE, last=last, pattern=pattern)
        if not page.rows and not last and not pattern and not await svc.metadata.repository_exists(name):
            raise NotFound("No such repository.")
        tags = await svc.tag_details.tags(name)
        count = len(tags)
        signatures = await asyncio.gather(*(self._signature(svc, name, row["digest"], tags) for row in page.rows))
        platforms = await asyncio.gather(*(self._platforms(svc, name, row) for row in page.rows))
        rows = []
        for row, signature, platform in zip(page.rows, signatures, platforms, strict=True):
            subject = cosign.signature_tag_subject(row["tag"]) if cosign.is_artifact_tag(row["tag"]) else None
            kind = row["tag"].rsplit(".", 1)[-1] if cosign.is_artifact_tag(row["tag"]) else None
            rows.append({**row, "signature": signature, "platform_names": platform, "subject": subject, "kind": kind})
        figures = (await svc.usage.scopes([name])).get(name)
        newest = next((r for r in rows if not r["kind"]), None)
        return self._render(
            request,
            "repository.html",
            viewer,
            title=name,
            name=name,
            rows=rows,
            sort=sort,
            sorts=SORTS,
            pattern=pattern or "",
            next_last=page.next,
            count=count,
            stored=figures.unique if figures else None,
            example_tag=newest["tag"] if newest else None,
            host=self._host(request),
            insecure=request.url.scheme != "https",
        )

    async def _signature(
        self, svc: Services, repo: str, digest: str, tags: Mapping[str, TagRecord] | None = None
    ) -> dict[str, Any]:
        """A manifest's signature state: verified under the signature policy that covers the
        repository, or (with none) whether a cosign signature of it is stored (`tags`: the
        repository's tags, when the caller has them)."""
        rule = svc.trust.rule_for(repo)
        if rule is not None:
            verdict = await svc.trust.verify(rule, repo, digest, counted=False)
            state = "verified" if verdict.signed else ("unsigned-required" if rule.mode != "warn" else "unsigned-warn")
            return {"state": state, "rule": rule.name, "how": verdict.how}
        if tags is None:
            tags = await svc.tag_details.tags(repo)
        found = cosign.signature_tag(digest) in tags
        how = f"tag {cosign.signature_tag(digest)}" if found else ""
        if not found:
            referrers = await svc.metadata.list_referrers(repo, digest, limit=MAX_REFERRERS)
            signed = [r for r in referrers if r.get("artifactType") in _SIGNATURE_TYPES]
            found = bool(signed)
            how = f"referrer {signed[0]['digest']}" if signed else ""
        if found:
            return {"state": "signed", "rule": None, "how": f"{how} (no signature policy covers this repository)"}
        return {"state": "none", "rule": None, "how": "no signature stored"}

    async def _platforms(self, svc: Services, repo: str, row: dict[str, Any]) -> list[str]:
        """The platforms of a tag: an index's children, or an image's config."""
        if row.get("platforms") is not None:
            names = [present.platform(p.get("platform")) for p in row["platforms"]]
            return [n for n in names if n]
        if row.get("mediaType") not in manifests.IMAGE_TYPES:
            return []
        digest = row["digest"]
        known = self._platform_of.get(digest)
        if known is not None:
            return [known] if known else []
        config = await self._config(svc, repo, digest)
        name = present.platform(config) if config else None
        if config is not None:  # a digest's config never changes; one not read now may be later
            self._platform_of[digest] = name or ""
            while len(self._platform_of) > MAX_PLATFORMS:
                self._platform_of.popitem(last=False)
        return [name] if name else []

    async def _manifest(self, svc: Services, digest: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(await manifest_bytes(svc, digest))
        except (ManifestUnknown, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    async def _config(self, svc: Services, repo: str, digest: str) -> dict[str, Any] | None:
        """An image's config, when its manifest names one that is stored and not too large to show."""
        doc = await self._manifest(svc, digest)
        descriptor = doc.get("config") if doc else None
        if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
            return None
        return await self._blob_json(svc, repo, descriptor["digest"])

    async def _blob_json(self, svc: Services, repo: str, digest: str) -> dict[str, Any] | None:
        """A small JSON blob linked in `repo` (an image config), read and checked against its digest.
        Not kept: the tag list keeps the platform it needs by manifest digest (`_platforms`)."""
        link = await svc.metadata.get_link(repo, digest)
        if link is None or link.corrupt or link.size > MAX_CONFIG_BYTES:
            return None
        try:
            key = await svc.blobs.key(digest)
            body = await (svc.regions.read_bytes(digest, key) if svc.regions else svc.storage.read_bytes(key))
        except FileNotFoundError:
            return None
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    # -- one image -------------------------------------------------------------------------------

    async def image(self, request: Request, viewer: Viewer) -> Response:
        svc: Services = request.app.state.services
        name = self._repository(request, viewer)
        reference = str(request.path_params["reference"])
        tag = None
        if is_tag(reference):
            tag = reference
            record = await svc.metadata.get_tag(name, tag)
            if record is None:
                raise NotFound(f"No tag {tag} in {name}.")
            digest = record.digest
        else:
            try:
                digest = str(parse_digest(reference))
            except RegistryError:
                raise NotFound("Not a tag or a digest.") from None
        manifest = await svc.metadata.get_manifest(name, digest)
        if manifest is None:
            raise NotFound(f"No manifest {digest} in {name}.")
        missing = False
        try:
            body = await manifest_bytes(svc, digest)
        except ManifestUnknown:
            body, missing = b"", True
        doc: dict[str, Any] = {}
        if body:
            try:
                loaded = json.loads(body)
                doc = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                doc = {}
        described = (await svc.tag_details.describe(name, [digest])).get(digest)
        config = await self._config(svc, name, digest) if manifest.media_type in manifests.IMAGE_TYPES else None
        sizes = await svc.metadata.blob_sizes(manifest.blobs)
        layers = [
            {**layer, "stored": layer.get("digest") in sizes}
            for layer in doc.get("layers") or []
            if isinstance(layer, dict)
        ]
        children = list(described.platforms) if described and described.platforms is not None else []
        referrers = await svc.metadata.list_referrers(name, digest, limit=MAX_REFERRERS)
        tags = sorted(await svc.metadata.tags_of_digest(name, digest))
        shown = body[:MAX_SHOWN_MANIFEST]
        try:
            pretty = (
                json.dumps(json.loads(body), indent=2)
                if len(body) <= MAX_SHOWN_MANIFEST
                else shown.decode("utf-8", "replace")
            )
        except ValueError:
            pretty = shown.decode("utf-8", "replace")
        config_descriptor = doc.get("config") if isinstance(doc.get("config"), dict) else None
        return self._render(
            request,
            "image.html",
            viewer,
            title=f"{name}@{digest[:19]}",
            name=name,
            tag=tag,
            digest=digest,
            record=manifest,
            described=described,
            missing=missing,
            config=config,
            config_descriptor=config_descriptor,
            config_missing=config_descriptor is not None and config is None,
            layers=layers,
            children=children,
            referrers=referrers,
            tags=tags,
            subject=manifest.subject,
            signature=await self._signature(svc, name, digest),
            pretty=pretty,
            truncated=len(body) > MAX_SHOWN_MANIFEST,
            host=self._host(request),
            insecure=request.url.scheme != "https",
            pushed=timestamp(manifest.pushed) if manifest.pushed else None,
        )

    def _host(self, request: Request) -> str:
        """The registry's address as a client names it in `docker pull`."""
        if self.config.http.host:
            return urlsplit(self.config.http.host).netloc
        return request.headers.get("host") or f"{request.url.hostname}:{request.url.port}"

    # -- usage -----------------------------------------------------------------------------------

    async def _sees_every(self, svc: Services, viewer: Viewer, prefix: str = "") -> bool:
        """Whether the viewer may pull every repository under `prefix` (the API's rule for figures
        about more than one repository)."""
        if viewer.person is None:
            return True
        every = await svc.catalog.get("", svc.metadata.repository_list)
        return all(viewer.may_pull(n) for n in every if n.startswith(prefix))

    async def usage(self, request: Request, viewer: Viewer) -> Response:
        svc: Services = request.app.state.services
        quotas = []
        for q in svc.policies.quotas:
            visible = await self._sees_every(svc, viewer, q.scope) if q.namespace else viewer.may_pull(q.scope)
            if not visible:
                continue
            used = await quota_usage(svc.kv, QuotaScope(q.scope, q.limit, q.label))
            percent = 100.0 * used / q.limit if q.limit else 100.0
            quotas.append(
                {"scope": q.scope, "namespace": q.namespace, "used": used, "limit": q.limit, "percent": percent}
            )
        everything = await self._sees_every(svc, viewer)
        total = (await svc.usage.scope(TOTAL)) if everything else None
        every = await svc.catalog.get("", svc.metadata.repository_list)
        names = [n for n in every if viewer.may_pull(n)]
        figures = await svc.usage.scopes(names) if len(names) <= 20_000 else {}
        largest = sorted(((f.unique, n, f) for n, f in figures.items()), reverse=True)[:20]
        return self._render(
            request,
            "usage.html",
            viewer,
            title="Usage",
            quotas=quotas,
            total=total,
            largest=[
                {"name": n, "unique": f.unique, "linked": f.linked, "manifests": f.manifests} for _, n, f in largest
            ],
            counted=len(figures),
        )

    # -- maintenance -----------------------------------------------------------------------------

    async def maintenance(self, request: Request, viewer: Viewer) -> Response:
        svc: Services = request.app.state.services
        if not await self._sees_every(svc, viewer):
            return self._render(
                request,
                "error.html",
                viewer,
                status=403,
                title="Maintenance",
                message="Garbage collection, retention and replication concern every repository: "
                "this page is for those who may pull them all.",
            )
        preview = request.query_params.get("preview")
        gc_preview = await self._preview("gc", lambda: self._gc_preview(svc)) if preview == "gc" else None
        retention_preview = (
            await self._preview("retention", lambda: self._retention_preview(svc)) if preview == "retention" else None
        )
        regions = await replication_report(svc) if svc.regions is not None else None
        last_gc = await gc_records.last_run(svc.kv)
        gc_config = self.config.gc
        next_gc = last_gc["finished"] + gc_config.interval if last_gc and gc_config.enabled else None
        return self._render(
            request,
            "maintenance.html",
            viewer,
            title="Maintenance",
            gc=gc_config,
            last_gc=last_gc,
            next_gc=next_gc,
            gc_preview=gc_preview,
            retention=self.config.retention,
            last_retention=await retention_records.last_run(svc.kv),
            retention_preview=retention_preview,
            regions=regions,
            readonly_status=svc.readonly.status(),
            now=time.time(),
        )

    async def _preview(self, kind: str, make: Callable[[], Awaitable[Any]]) -> Any:
        """A preview made at most once per PREVIEW_SECONDS, one at a time (each reads the whole registry)."""
        async with self._previewing[kind]:
            made = self._previews.get(kind)
            if made is not None and time.monotonic() - made[0] < PREVIEW_SECONDS:
                return made[1]
            result = await make()
            self._previews[kind] = (time.monotonic(), result)
            return result

    async def _gc_preview(self, svc: Services) -> dict[str, Any]:
        summary = await collect(svc, dry_run=True, orphans=False)
        report = summary.report()
        report["deleted"] = report["deleted"][:MAX_REFERRERS]
        report["made"] = time.time()
        return report

    async def _retention_preview(self, svc: Services) -> dict[str, Any]:
        if not self.config.retention.policies:
            return {"rows": [], "total": 0, "made": time.time(), "policies": 0}
        plan = await make_plan(svc)
        rows = plan.rows()
        return {
            "rows": rows[:500],
            "total": len(rows),
            "made": time.time(),
            "policies": len(self.config.retention.policies),
        }


# An image's config types: an image's artifact type, in OCI 1.1's sense, only when it is none of these.
IMAGE_CONFIGS = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
_SIGNATURE_TYPES = frozenset({cosign.SIGNATURE_ARTIFACT, "application/vnd.cncf.notary.signature"})


MAX_FORM_BYTES = 16 * 1024


async def _form(request: Request) -> dict[str, str]:
    """The fields of a small URL-encoded form (the sign-in forms); nothing for anything else."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
    return {name: values[0] for name, values in fields.items() if values}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _bounded(value: str | None) -> str:
    return (value or "")[:MAX_QUERY]
