"""The audit log: one JSON line per push, pull, delete, failed sign-in and denial, or the request fails.

Lines go to a file that rotates by size (and, optionally, to stdout through the JSON log). A
push or delete first writes a `started` line, so a change is never made that the file does not
show; if that line cannot be written the request is refused with 503 before anything changes, and
if the outcome line cannot be written the client gets 500 instead of a success nobody recorded.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api import blobs, manifests
from .auth.target import resolve
from .config import AuditConfig, ConfigError
from .errors import RegistryError, Unavailable, error_response

log = logging.getLogger("wharf.audit")

# The handlers whose requests are audited, and the action each one is.
_ACTIONS = {
    manifests.get_manifest: "pull",
    manifests.put_manifest: "push",
    manifests.delete_manifest: "delete",
    blobs.delete_blob: "delete",
}


class AuditUnavailable(Unavailable):
    message = "the audit log cannot be written"


class _RotatingFile:
    """Appends whole lines; past `max_bytes` moves the file to .1 (.1 to .2, ...) and starts anew.

    Several worker processes may append to one path: each reopens the path when another has rotated
    it (the inode changed), and O_APPEND keeps their lines whole.
    """

    def __init__(self, path: str, max_bytes: int, backups: int, fsync: bool) -> None:
        self.path = path
        self._max = max_bytes
        self._backups = backups
        self._fsync = fsync
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _reopen(self) -> None:
        os.close(self._fd)
        self._fd = self._open()

    def write(self, data: bytes) -> None:
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            self._reopen()
        else:
            mine = os.fstat(self._fd)
            if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                self._reopen()
        st = os.fstat(self._fd)
        if stat.S_ISREG(st.st_mode) and st.st_size > 0 and st.st_size + len(data) > self._max:
            self._rotate()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self._fsync:
            os.fsync(self._fd)

    def _rotate(self) -> None:
        if self._backups == 0:
            os.ftruncate(self._fd, 0)
            return
        for i in range(self._backups - 1, 0, -1):
            older = f"{self.path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._reopen()

    def close(self) -> None:
        os.close(self._fd)


class AuditLog:
    def __init__(self, config: AuditConfig) -> None:
        # One thread: lines keep their order and rotation never races a write.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="wharf-audit")
        self._file = (
            _RotatingFile(config.path, config.maxsize, config.maxbackups, config.fsync) if config.path else None
        )
        self._stdout = config.stdout
        self.pulls = config.pulls

    @classmethod
    def open(cls, config: AuditConfig) -> AuditLog | None:
        """The configured audit log (its file opened now, so a bad path stops start-up); None when off."""
        if not config.path and not config.stdout:
            return None
        try:
            return cls(config)
        except OSError as exc:
            raise ConfigError(f"audit.path {config.path}: {exc.strerror or exc}") from None

    async def record(self, action: str, result: str, **fields: Any) -> None:
        """Write one line; AuditUnavailable (503) when it cannot be written."""
        now = datetime.datetime.now(datetime.UTC)
        entry: dict[str, Any] = {
            "time": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
            "action": action,
            "result": result,
            "user": None,
            "remote": None,
            "repository": None,
            "reference": None,
            "digest": None,
        }
        entry.update(fields)
        if self._file is not None:
            line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._file.write, line)
            except OSError as exc:
                log.error("audit log %s cannot be written: %s", self._file.path, exc)
                raise AuditUnavailable({"reason": "the audit log cannot be written"}) from None
        if self._stdout:
            log.info("audit", extra={"fields": entry})

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._file is not None:
            self._file.close()


def _header(message: Message, name: bytes) -> str | None:
    for key, value in message.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class AuditMiddleware:
    """ASGI middleware: the push, pull and delete lines, written before the response goes out."""

    def __init__(self, app: ASGIApp, *, audit: AuditLog, routes: list[Any]) -> None:
        self.app = app
        self.audit = audit
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        target = resolve(self.routes, scope)
        # HEAD reaches the GET handler too (Starlette adds it), but only checks: no pull.
        action = None
        if target.endpoint is not None and scope["method"] != "HEAD":
            action = _ACTIONS.get(target.endpoint)  # type: ignore[call-overload]
        if action is None or (action == "pull" and not self.audit.pulls):
            await self.app(scope, receive, send)
            return
        state = scope.get("state") or {}
        client = scope.get("client")
        reference = target.params.get("reference")
        digest = target.params.get("digest")
        if digest is None and isinstance(reference, str) and ":" in reference:
            digest = reference
        fields: dict[str, Any] = {
            "user": state.get("user"),
            "remote": client[0] if client else None,
            "repository": target.repository,
            "reference": reference if reference is not None else digest,
            "digest": digest,
            "request_id": state.get("request_id"),
        }
        method = scope["method"]
        if action != "pull":
            try:
                await self.audit.record(action, "started", **fields)
            except RegistryError as exc:
                await error_response(exc, method)(scope, receive, send)
                return
        replaced = False
        recorded = False

        async def audited_send(message: Message) -> None:
            nonlocal replaced, recorded
            if replaced:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                recorded = True
                try:
                    await self.audit.record(
                        action,
                        "success" if status < 400 else "failure",
                        **{**fields, "digest": _header(message, b"docker-content-digest") or fields["digest"]},
                        status=status,
                    )
                except AuditUnavailable as unavailable:
                    replaced = True
                    error = unavailable
                    if action != "pull":
                        # The change may have been made: say so rather than report a success unrecorded.
                        error = AuditUnavailable(
                            {"reason": "the audit log cannot be written; the operation may have completed"}
                        )
                        error.status = 500
                    await error_response(error, method)(scope, receive, send)
                    return
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except Exception:
            if not recorded and action != "pull":
                try:
                    await self.audit.record(action, "failure", **fields, status=500)
                except AuditUnavailable:
                    pass
            raise
