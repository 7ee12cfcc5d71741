"""DELETE /wharf/v1/repositories/<name> and /wharf/v1/namespaces/<namespace>: whole repositories at once."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from coordinator.repositories import DeletedRepository, DeletionRunning, NotPermitted, Protected

from ..auth.access import DELETE, PUSH, Access
from ..context import note
from ..errors import Denied, NameUnknown, TooManyRequests, Unsupported
from ..routing import HOLDS_KEY
from .request import repository, services
from .usage import namespace_of, refusal_in


def _deleted(rows: list[DeletedRepository]) -> list[dict[str, Any]]:
    return [{"repository": row.name, **{k: v for k, v in asdict(row).items() if k != "name"}} for row in rows]


def _check_enabled(request: Request) -> None:
    if not services(request).config.storage.delete.enabled:
        raise Unsupported({"reason": "deletion is disabled (storage.delete.enabled)"})


def _refusal(exc: Exception) -> Exception:
    if isinstance(exc, Protected):
        repo, tag, rule = exc.tags[0]
        return Denied(
            [{"repository": r, "tag": t, "rule": why} for r, t, why in exc.tags[:10]],
            message=f"tag {tag} of {repo} is immutable (rule: {rule}); nothing was deleted",
            refused_by="immutability",
            rule=rule,
        )
    assert isinstance(exc, DeletionRunning)
    return TooManyRequests(
        {"reason": str(exc)}, message="a deletion of this name is under way", headers={"Retry-After": "1"}
    )


async def delete_repository(request: Request) -> Response:
    _check_enabled(request)
    svc = services(request)
    name = repository(request)
    try:
        deleted = await svc.repositories.delete_repository(name)
    except (Protected, DeletionRunning) as exc:
        raise _refusal(exc) from None
    if deleted is None:
        raise NameUnknown({"name": name})
    note(request.scope, tags=deleted.tags, manifests=deleted.manifests)
    return Response(json.dumps(_deleted([deleted])[0]).encode(), media_type="application/json")


async def delete_namespace(request: Request) -> Response:
    _check_enabled(request)
    svc = services(request)
    namespace = namespace_of(request)
    holds = request.scope.get("state", {}).get(HOLDS_KEY)

    def allowed(repo: str) -> bool:
        return holds is None or (holds(Access("repository", repo, PUSH)) and holds(Access("repository", repo, DELETE)))

    note(request.scope, repository=namespace)
    try:
        deleted = await svc.repositories.delete_namespace(namespace, allowed=allowed)
    except NotPermitted as exc:
        missing = [Access("repository", r, a) for r in exc.repos for a in (PUSH, DELETE)]
        raise await refusal_in(request, namespace, missing) from None
    except (Protected, DeletionRunning) as exc:
        raise _refusal(exc) from None
    if not deleted:
        raise NameUnknown({"namespace": namespace})
    note(request.scope, repositories=len(deleted))
    body = {"namespace": namespace, "repositories": _deleted(deleted)}
    return Response(json.dumps(body).encode(), media_type="application/json")
