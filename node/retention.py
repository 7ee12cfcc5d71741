"""Retention policies from a node: rules from the config, one planned and guarded run, a logged summary.

The coordinator decides and deletes tags and manifest records; the garbage collector then reclaims
the blobs they freed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.retention import Plan, Rule, decisions, plan
from coordinator.retention_apply import Applier, Result
from coordinator.runlock import run_lock

from .config import RetentionConfig, RetentionPolicy
from .patterns import repository_matches
from .services import Services

log = logging.getLogger("wharf.retention")


class RunInProgress(Exception):
    """Another process is applying retention right now."""


def _label(index: int, policy: RetentionPolicy) -> str:
    return policy.name or f"policy {index + 1} ({', '.join(policy.repositories)})"


def _rule(index: int, policy: RetentionPolicy) -> Rule:
    """A policy as the planner's rule; the configuration compiled its patterns and durations at load."""
    globs = list(policy.repositories)

    def covers(repository: str) -> bool:
        return repository_matches(globs, repository)

    return Rule(
        _label(index, policy),
        covers,
        policy.keeplast,
        policy.keep_patterns,
        policy.olderthan,
        policy.untaggedafter,
        policy.pulledwithin,
    )


def rules_from(config: RetentionConfig) -> list[Rule]:
    """The configured policies as planner rules, in order (the first that covers a repository applies)."""
    return [_rule(i, policy) for i, policy in enumerate(config.policies)]


@dataclass
class Run:
    plan: Plan
    result: Result | None  # None for a dry run


async def make_plan(services: Services, *, now: float | None = None) -> Plan:
    rules = rules_from(services.config.retention)
    return await plan(services.kv, rules, now=now, frozen=services.policies.immutability.rule_for)


async def _apply_as_planned(services: Services, applier: Applier, now: float | None) -> tuple[Plan, Result]:
    """Each repository's decision applied as soon as it is made; the plan is recorded beside."""
    found = await Plan.start(services.kv, now)
    rules = rules_from(services.config.retention)
    each = decisions(services.kv, rules, now=found.now, frozen=services.policies.immutability.rule_for)
    return found, await applier.apply_each(each, found)


async def apply(
    services: Services,
    *,
    dry_run: bool = False,
    now: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Run:
    """Plan from the current state and, unless a dry run, apply the plan under a cluster-wide lock.

    A real run applies each repository's decision as soon as it is made, so neither the KV reads
    nor the plan are held for the whole registry (the plan and result spill to disk when large).
    A run cut short (the leader went away) leaves its progress record; the next run plans again
    from what is there now, so nothing is deleted twice and no policy is skipped.
    """
    if dry_run:
        found = await make_plan(services, now=now)
        log.info(
            "retention dry run",
            extra={"fields": {"tags": len(found.tags), "manifests": len(found.manifests), "kept": len(found.kept)}},
        )
        return Run(found, None)
    kv = services.kv
    services.readonly.check()
    async with run_lock(kv, "retention", services.node_id, ttl=services.config.cluster.leasettl, busy=RunInProgress):
        started = time.perf_counter()
        applier = Applier(kv, node=services.node_id, progress=progress)
        applier.may_delete = lambda: not services.readonly.active
        found, result = await _apply_as_planned(services, applier, now)
    if result.interrupted is not None:
        log.info(
            "retention: an earlier run did not finish; this run planned again and completed it",
            extra={"fields": {"interrupted": result.interrupted}},
        )
    for row in result.each_row():
        log.info(
            "retention: %s %s %s",
            row["action"],
            row["repository"],
            row["reference"],
            extra={"fields": row},
        )
    for skipped in result.skipped:
        log.info(
            "retention: kept %s %s: %s",
            skipped.repository,
            skipped.reference,
            skipped.why,
            extra={"fields": {"repository": skipped.repository, "reference": skipped.reference, "why": skipped.why}},
        )
    summary = result.summary() | {"duration": round(time.perf_counter() - started, 3)}
    log.info("retention run", extra={"fields": summary})
    return Run(found, result)
