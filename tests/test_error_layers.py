"""What a request gets when its handler fails, now that the request context is the last-chance handler
and node/errors.py's HandledErrors (not Starlette's two error middlewares) applies the handlers."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from typing import Any

import pytest
from inprocess import InProcessRegistry

from coordinator.metadata import Conflict


def _failing_tag_read(registry: InProcessRegistry, exc: BaseException) -> None:
    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    registry.services.metadata.get_tag_checked = fail  # type: ignore[method-assign]


def _get(tmp_path: Path, exc: BaseException, method: str = "GET") -> Any:
    async def scenario() -> Any:
        registry = InProcessRegistry(tmp_path)
        try:
            _failing_tag_read(registry, exc)
            return await registry.http.request(method, "/v2/team/app/manifests/v1")
        finally:
            await registry.close()

    return asyncio.run(scenario())


def test_an_unexpected_error_is_an_oci_500_with_the_request_id_and_a_logged_traceback(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="wharf.access"):
        response = _get(tmp_path, RuntimeError("a bug"))
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["errors"][0]
    request_id = response.headers["x-request-id"]
    assert error["code"] == "UNKNOWN" and error["detail"]["request_id"] == request_id
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert logged and logged[0].exc_info is not None and "a bug" in str(logged[0].exc_info[1])


def test_a_head_that_fails_unexpectedly_has_no_body_but_says_its_length(tmp_path):
    response = _get(tmp_path, RuntimeError("a bug"), method="HEAD")
    assert response.status_code == 500 and response.content == b""
    assert int(response.headers["content-length"]) > 0


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (Conflict("commit kept racing"), 429, "TOOMANYREQUESTS"),
        (OSError(errno.ENOSPC, "No space left on device"), 503, "UNAVAILABLE"),
        # A handler that declines (any other OSError is a bug): the last-chance answer.
        (OSError(errno.EIO, "Input/output error"), 500, "UNKNOWN"),
    ],
)
def test_an_error_with_a_handler_gets_that_handlers_answer_through_every_layer(tmp_path, exc, status, code):
    response = _get(tmp_path, exc)
    assert response.status_code == status
    assert response.headers["x-request-id"]  # the request context still saw it
    assert response.json()["errors"][0]["code"] == code
    if status != 500:
        assert int(response.headers["retry-after"]) >= 1


def test_a_method_no_route_takes_is_unsupported_with_the_methods_allowed(tmp_path):
    async def scenario() -> Any:
        registry = InProcessRegistry(tmp_path)
        try:
            return await registry.http.request("BREW", "/v2/team/app/manifests/v1")
        finally:
            await registry.close()

    response = asyncio.run(scenario())
    assert response.status_code == 405
    assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert {"GET", "HEAD", "PUT", "DELETE"} <= {m.strip() for m in response.headers["allow"].split(",")}
