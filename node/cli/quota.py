"""`wharf quota ls`: every configured quota with its usage."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from coordinator.quota import QuotaScope
from coordinator.quota import usage as quota_usage

from ..config import Config
from ..services import Services
from .output import size
from .registry import Commands, add_listing, with_services


def add_commands(commands: Commands) -> None:
    add_listing(commands, "quota", "show quota usage and limits", "list every quota with its usage", run_quota_ls)


def run_quota_ls(args: argparse.Namespace, config: Config) -> int:
    async def listing(services: Services) -> int:
        rows: list[dict[str, Any]] = []
        for q in services.policies.quotas:
            used = await quota_usage(services.kv, QuotaScope(q.scope, q.limit, q.label))
            rows.append(
                {
                    "scope": q.scope,
                    "kind": "namespace" if q.namespace else "repository",
                    "used": used,
                    "limit": q.limit,
                    "percent": round(100 * used / q.limit, 1) if q.limit else 100.0,
                }
            )
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print("no quotas configured")
            return 0
        width = max(len(r["scope"]) for r in rows)
        print(f"{'SCOPE':<{width}}  {'KIND':<10}  {'USED':>12}  {'LIMIT':>12}  {'USE%':>6}")
        for r in rows:
            print(
                f"{r['scope']:<{width}}  {r['kind']:<10}  {size(r['used']):>12}  {size(r['limit']):>12}  {r['percent']:>5.1f}%"
            )
        return 0

    return asyncio.run(with_services(config, listing, readonly=True))
