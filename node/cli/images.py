"""`wharf rm` and `wharf immutability ls`: images (or whole repositories and namespaces) deleted by
reference, and the tags no one may delete."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from coordinator.repositories import DeletionRunning, Protected

from ..config import Config
from ..errors import RegistryError
from ..reference import Reference, parse_digest
from ..services import Services
from .inventory import resolve
from .output import size
from .registry import Commands, add_listing, with_config, with_services


def add_commands(commands: Commands) -> None:
    rm = commands.add_parser(
        "rm",
        help="delete images by tag or digest, or whole repositories and namespaces",
        description="Delete images, or whole repositories (--repository) and namespaces (--namespace): every "
        "tag, manifest and link at once; GC reclaims the space. References as docker prints them, host too.",
    )
    rm.add_argument("references", nargs="*", metavar="REPO:TAG|REPO@DIGEST")
    rm.add_argument("--repository", action="append", default=[], metavar="REPO", help="delete the whole repository")
    rm.add_argument(
        "--namespace", action="append", default=[], metavar="NAMESPACE/", help="delete every repository under it"
    )
    rm.add_argument("--config", "-c", help="configuration file")
    rm.add_argument("--tag-only", action="store_true", help="remove the tag, keep the manifest")
    rm.set_defaults(run=with_config(run_rm))

    add_listing(
        commands,
        "immutability",
        "show immutable-tag rules and the tags they protect",
        "list protected tags, by rule",
        run_immutability_ls,
    )


def run_rm(args: argparse.Namespace, config: Config) -> int:
    if not config.storage.delete.enabled:
        print("wharf rm: deletion is disabled (storage.delete.enabled)", file=sys.stderr)
        return 2

    if not (args.references or args.repository or args.namespace):
        print("wharf rm: name images, --repository or --namespace", file=sys.stderr)
        return 2

    async def remove(services: Services) -> int:
        if services.readonly.active:
            print(f"wharf rm: the registry is {services.readonly.describe()}; nothing was deleted", file=sys.stderr)
            return 1
        failures = 0
        for name in args.repository:
            failures += await _remove_whole(services, name, namespace=False)
        for name in args.namespace:
            failures += await _remove_whole(services, name, namespace=True)
        for reference in args.references:
            try:
                message = await _remove_one(services, reference, tag_only=args.tag_only)
            except (RegistryError, ValueError) as exc:
                print(f"wharf rm: {reference}: {exc}", file=sys.stderr)
                failures += 1
                continue
            print(message)
        return 1 if failures else 0

    return asyncio.run(with_services(config, remove))


async def _remove_whole(services: Services, text: str, *, namespace: bool) -> int:
    """Delete a repository or a namespace whole; 1 if it failed (said on stderr), else 0."""
    try:
        reference = await resolve(services, text.rstrip("/") + "/" if namespace else text)
    except RegistryError as exc:
        print(f"wharf rm: {text}: {exc.message}", file=sys.stderr)
        return 1
    if reference.tag is not None or reference.digest is not None:
        print(f"wharf rm: {text}: --repository takes a repository, not an image", file=sys.stderr)
        return 1
    remover = services.repositories
    try:
        if namespace:
            deleted = await remover.delete_namespace(reference.name)
        else:
            one = await remover.delete_repository(reference.name)
            deleted = [one] if one is not None else []
    except (Protected, DeletionRunning) as exc:
        print(f"wharf rm: {reference.name}: {exc}; nothing more was deleted", file=sys.stderr)
        return 1
    if not deleted:
        print(f"wharf rm: {reference.name}: no such {'namespace' if namespace else 'repository'}", file=sys.stderr)
        return 1
    for row in deleted:
        print(
            f"deleted repository {row.name}: {row.tags} tags, {row.manifests} manifests, {row.links} blob links "
            f"({size(row.linked_bytes)} linked); GC reclaims what no other repository holds"
        )
    return 0


async def _remove_one(services: Services, text: str, *, tag_only: bool) -> str:
    metadata = services.metadata
    ref = await resolve(services, text)
    if ref.namespace:
        raise ValueError("that is a namespace: use --namespace")
    repo = ref.name
    if ref.digest is not None:
        digest = str(ref.digest)
        await services.policies.immutability.check_delete(metadata, repo, Reference(digest=ref.digest))
        if not await metadata.delete_manifest(repo, digest):
            raise ValueError("no such manifest")
        return f"deleted {repo}@{digest}"
    if ref.tag is None:
        raise ValueError("expected REPO:TAG or REPO@DIGEST (or --repository REPO)")
    tag = ref.tag
    record = await metadata.get_tag(repo, tag)
    if record is None:
        raise ValueError("no such tag")
    await services.policies.immutability.check_delete(
        metadata, repo, Reference(tag=tag) if tag_only else Reference(digest=parse_digest(record.digest))
    )
    if tag_only:
        await metadata.delete_tag(repo, tag)
        return f"untagged {repo}:{tag} (manifest {record.digest} kept)"
    others = [t for t in await metadata.tags_of_digest(repo, record.digest) if t != tag]
    await metadata.delete_manifest(repo, record.digest)
    also = f" and its other tags {', '.join(sorted(others))}" if others else ""
    return f"deleted {repo}:{tag} ({record.digest}){also}"


def run_immutability_ls(args: argparse.Namespace, config: Config) -> int:
    async def listing(services: Services) -> int:
        immutability = services.policies.immutability
        rows: list[dict[str, str]] = []
        for repository in await services.metadata.list_repositories():
            for tag, record in (await services.metadata.tag_records(repository)).items():
                rule = immutability.rule_for(repository, tag)
                if rule is not None:
                    rows.append({"repository": repository, "tag": tag, "digest": record.digest, "rule": rule})
        if args.json:
            print(json.dumps({"rules": immutability.labels, "protected": rows}, indent=2))
            return 0
        if not immutability:
            print("no immutability rules configured")
            return 0
        print("rules: " + "; ".join(immutability.labels))
        if not rows:
            print("no tag is protected yet")
            return 0
        width = max(len(r["repository"]) + len(r["tag"]) + 1 for r in rows)
        print(f"{'TAG':<{width}}  {'DIGEST':<71}  RULE")
        for r in rows:
            print(f"{r['repository'] + ':' + r['tag']:<{width}}  {r['digest']:<71}  {r['rule']}")
        return 0

    return asyncio.run(with_services(config, listing, readonly=True))
