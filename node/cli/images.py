"""`wharf rm` and `wharf immutability ls`: images deleted by reference, and the tags no one may delete."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from ..config import Config
from ..errors import RegistryError
from ..reference import Reference, parse_digest, validate_name, validate_tag
from ..services import Services
from .registry import Commands, add_listing, with_config, with_services


def add_commands(commands: Commands) -> None:
    rm = commands.add_parser("rm", help="delete images by tag or digest", description="Delete images.")
    rm.add_argument("references", nargs="+", metavar="REPO:TAG|REPO@DIGEST")
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

    async def remove(services: Services) -> int:
        if services.readonly.active:
            print(f"wharf rm: the registry is {services.readonly.describe()}; nothing was deleted", file=sys.stderr)
            return 1
        failures = 0
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


async def _remove_one(services: Services, reference: str, *, tag_only: bool) -> str:
    metadata = services.metadata
    if "@" in reference:
        repo, digest = reference.split("@", 1)
        validate_name(repo)
        await services.policies.immutability.check_delete(metadata, repo, Reference(digest=parse_digest(digest)))
        if not await metadata.delete_manifest(repo, digest):
            raise ValueError("no such manifest")
        return f"deleted {repo}@{digest}"
    repo, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        raise ValueError("expected REPO:TAG or REPO@DIGEST")
    validate_name(repo)
    validate_tag(tag)
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
