"""`wharf ls` and `wharf du`: what is stored, for people (and `--json` for scripts).

Both take a reference as docker prints it (`host:port/team/app:v1`), a repository, or a namespace
(`team/`). The host part is dropped unless the whole name is a repository here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from coordinator.repositories import repositories_under
from coordinator.usage import TOTAL, ScopeUsage

from .. import gc
from ..config import Config
from ..errors import RegistryError
from ..inventory import SORTS
from ..reference import ImageReference, parse_image_reference
from ..services import Services
from .output import size, table
from .registry import Commands, with_config, with_services

_PAGE = 1000


def add_commands(commands: Commands) -> None:
    ls = commands.add_parser(
        "ls",
        help="list repositories, or a repository's tags with their details",
        description="List repositories (all, or under NAMESPACE/), or one repository's tags with digest, "
        "type, size, push and last-pull time.",
    )
    ls.add_argument("reference", nargs="?", metavar="REPO[:TAG]|NAMESPACE/", help="as docker prints it, host too")
    ls.add_argument("--config", "-c", help="configuration file")
    ls.add_argument("--sort", choices=["name", "pushed", "pulled"], default="name", help="tag order (default: name)")
    ls.add_argument("--pattern", help="only tags matching this glob (v1.*)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(run=with_config(run_ls))

    du = commands.add_parser(
        "du",
        help="storage per repository and namespace: linked, exclusive, shared, and what GC would free",
        description="Storage figures: bytes linked, exclusive (what deleting the scope frees), shared with "
        "other repositories, and what a garbage collection would free now.",
    )
    du.add_argument("scope", nargs="?", metavar="REPO|NAMESPACE/", help="as docker prints it, host too")
    du.add_argument("--config", "-c", help="configuration file")
    du.add_argument("--recount", action="store_true", help="check every figure against the records first")
    du.add_argument("--no-gc", action="store_true", help="skip the garbage collection dry run")
    du.add_argument("--json", action="store_true", help="machine-readable output")
    du.set_defaults(run=with_config(run_du))


async def resolve(services: Services, text: str) -> ImageReference:
    """The reference `text` names here: with its host part dropped, unless the whole is a repository."""
    reference = parse_image_reference(text)
    if reference.host is None:
        return reference
    whole = reference.without_host()
    if whole.namespace:
        if await repositories_under(services.kv, whole.name):
            return whole
    elif await services.metadata.repository_exists(whole.name):
        return whole
    return ImageReference(None, reference.name, reference.tag, reference.digest)


def _fail(command: str, message: str) -> int:
    print(f"wharf {command}: {message}", file=sys.stderr)
    return 1


# -- ls -------------------------------------------------------------------------------------


def run_ls(args: argparse.Namespace, config: Config) -> int:
    async def listing(services: Services) -> int:
        try:
            reference = await resolve(services, args.reference) if args.reference else None
        except RegistryError as exc:
            return _fail("ls", f"{args.reference}: {exc.message}")
        if reference is None or reference.namespace:
            return await _list_repositories(services, reference.name if reference else "", args)
        return await _list_tags(services, reference, args)

    return asyncio.run(with_services(config, listing, readonly=True))


async def _list_repositories(services: Services, namespace: str, args: argparse.Namespace) -> int:
    names = [name for name in await services.metadata.list_repositories() if name.startswith(namespace)]
    figures = await services.usage.scopes(names)
    rows: list[dict[str, Any]] = []
    for name in names:
        usage = figures[name]
        rows.append(
            {
                "repository": name,
                "tags": await services.metadata.tag_count(name),
                "linked": usage.linked,
                "exclusive": usage.exclusive,
                "shared": usage.shared,
            }
        )
    if args.json:
        print(json.dumps({"namespace": namespace or None, "repositories": rows}, indent=2))
        return 0
    if not rows:
        print(f"no repositories under {namespace}" if namespace else "no repositories")
        return 0 if not namespace else 1
    shown = [
        {
            "repository": r["repository"],
            "tags": str(r["tags"]),
            "linked": size(r["linked"]),
            "exclusive": size(r["exclusive"]),
            "shared": size(r["shared"]),
        }
        for r in rows
    ]
    columns = [
        ("repository", "REPOSITORY"),
        ("tags", "TAGS"),
        ("linked", "LINKED"),
        ("exclusive", "EXCLUSIVE"),
        ("shared", "SHARED"),
    ]
    print("\n".join(table(shown, columns)))
    return 0


async def _list_tags(services: Services, reference: ImageReference, args: argparse.Namespace) -> int:
    repo = reference.name
    pattern = reference.tag or args.pattern
    sort = args.sort if args.sort in SORTS else "name"
    rows: list[dict[str, Any]] = []
    last: str | None = None
    while True:
        page = await services.tag_details.page(repo, sort=sort, n=_PAGE, last=last, pattern=pattern)
        rows += page.rows
        if page.next is None:
            break
        last = page.next
    if reference.digest is not None:
        rows = [row for row in rows if row["digest"] == str(reference.digest)]
    if not rows and not await services.metadata.repository_exists(repo):
        return _fail("ls", f"no repository {repo}")
    if args.json:
        print(json.dumps({"repository": repo, "tags": rows}, indent=2))
        return 0
    if not rows:
        print(f"no tags in {repo}" + (f" matching {pattern}" if pattern else ""))
        return 0 if not reference.tag else 1
    shown = [
        {
            "tag": row["tag"],
            "digest": row["digest"].split(":", 1)[-1][:12],
            "type": _kind(row),
            "size": size(row["size"]) if row["size"] is not None else "?",
            "pushed": _when(row["pushed"]),
            "pulled": _when(row["pulled"]) if row["pulled"] else "never",
        }
        for row in rows
    ]
    columns = [
        ("tag", "TAG"),
        ("digest", "DIGEST"),
        ("type", "TYPE"),
        ("size", "SIZE"),
        ("pushed", "PUSHED"),
        ("pulled", "PULLED"),
    ]
    print("\n".join(table(shown, columns)))
    return 0


def _kind(row: dict[str, Any]) -> str:
    platforms = row.get("platforms")
    if platforms is not None:
        named = [p["platform"] for p in platforms if isinstance(p.get("platform"), dict)]
        arches = [
            "/".join(part for part in (p.get("os"), p.get("architecture"), p.get("variant")) if part)
            for p in named
            if p.get("os") != "unknown"
        ]
        return "index: " + ", ".join(arches) if arches else f"index ({len(platforms)})"
    artifact = row.get("artifactType")
    if artifact and "image.config" not in artifact and "container.image" not in artifact:
        return f"artifact: {artifact}"
    return "image"


def _when(stamp: str | None) -> str:
    """An RFC 3339 stamp as people read it: 2024-05-01 12:00:03."""
    if not stamp:
        return ""
    return stamp.replace("T", " ").split(".")[0].rstrip("Z")


# -- du -------------------------------------------------------------------------------------


def run_du(args: argparse.Namespace, config: Config) -> int:
    async def report(services: Services) -> int:
        try:
            reference = await resolve(services, args.scope) if args.scope else None
        except RegistryError as exc:
            return _fail("du", f"{args.scope}: {exc.message}")
        if reference is not None and (reference.tag is not None or reference.digest is not None):
            return _fail("du", f"{args.scope}: name a repository or a namespace, not an image")
        scope = reference.name if reference is not None else TOTAL
        if args.recount:
            await services.usage.reconcile()
        # Whatever changed since the leader last counted, counted now (a store with no node running too).
        await services.usage.build()
        await services.usage.settle()
        figures = await services.usage.scope(scope)
        if scope and not figures and not await _exists(services, scope):
            return _fail("du", f"no repository or namespace {scope}")
        parts = await _parts(services, scope)
        reclaimable = None if args.no_gc else await _reclaimable(services, scope)
        data: dict[str, Any] = {"scope": scope or None, **figures.report(), "current": await services.usage.current()}
        if reclaimable is not None:
            data["gc_reclaimable"], data["gc_reclaimable_here"] = reclaimable
        data["parts"] = [{"scope": name, **usage.report()} for name, usage in parts]
        if args.json:
            print(json.dumps(data, indent=2))
            return 0
        print(_du_text(scope, figures, data, parts))
        return 0

    return asyncio.run(with_services(config, report))


async def _exists(services: Services, scope: str) -> bool:
    if scope.endswith("/"):
        return bool(await repositories_under(services.kv, scope))
    return await services.metadata.repository_exists(scope)


async def _parts(services: Services, scope: str) -> list[tuple[str, ScopeUsage]]:
    """What a namespace (or the registry) is made of: the repositories and namespaces one level down."""
    if scope and not scope.endswith("/"):
        return []
    depth = scope.count("/")
    found = []
    async for name, usage in services.usage.under(scope):
        if name == scope:
            continue
        level = name.count("/") - (1 if name.endswith("/") else 0)
        if level == depth:
            found.append((name, usage))
    return found


async def _reclaimable(services: Services, scope: str) -> tuple[int, int]:
    """(bytes a collection would free now, the part of them this scope holds), from a dry run."""
    summary = await gc.collect(services, dry_run=True, orphans=False)
    if not scope:
        return summary.bytes_freed, summary.bytes_freed
    digests = [item for item in summary.deleted if "@" not in item and " " not in item]
    sizes = await services.metadata.blob_sizes(digests)
    here = 0
    for digest in digests:
        holders = await services.usage.holders(digest)
        if any(repo == scope or (scope.endswith("/") and repo.startswith(scope)) for repo in holders):
            here += sizes.get(digest, 0)
    return summary.bytes_freed, here


def _du_text(scope: str, figures: ScopeUsage, data: dict[str, Any], parts: list[tuple[str, ScopeUsage]]) -> str:
    title = scope or "the registry"
    lines = [f"{title}:"]
    if scope:
        lines += [
            f"  linked     {size(figures.linked):>12}   ({figures.objects} objects, {figures.manifests} manifests)",
            f"  exclusive  {size(figures.exclusive):>12}   what deleting {title} frees",
            f"  shared     {size(figures.shared):>12}   also held by other repositories",
        ]
    else:
        lines += [
            f"  stored     {size(figures.unique):>12}   each object once ({figures.objects} objects)",
            f"  linked     {size(figures.linked):>12}   each object once per repository holding it",
        ]
    if "gc_reclaimable" in data:
        here = "" if not scope else f" ({size(data['gc_reclaimable_here'])} of it held here)"
        lines.append(f"  gc frees   {size(data['gc_reclaimable']):>12}   if it ran now{here}")
    if not data["current"]:
        lines.append("  (changes are still being counted: the figures are a few seconds old)")
    if parts:
        rows = [
            {
                "scope": name,
                "linked": size(usage.linked),
                "exclusive": size(usage.exclusive),
                "shared": size(usage.shared),
            }
            for name, usage in sorted(parts, key=lambda item: -item[1].linked)
        ]
        lines.append("")
        lines += table(
            rows,
            [("scope", "REPOSITORY/NAMESPACE"), ("linked", "LINKED"), ("exclusive", "EXCLUSIVE"), ("shared", "SHARED")],
        )
    return "\n".join(lines)
