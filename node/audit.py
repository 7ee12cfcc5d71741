"""The audit log: one hash-chained JSON line per decision (push, pull, delete, refusal), or the request fails.

A request's line is built as it goes: `AuditMiddleware` (outside authentication) starts it from
the route, handlers add what they learn with `note`, and an error that refuses the request
carries `refused_by`, `rule` and its own facts (node/errors.py); the middleware writes the line
when the response starts. Which requests are decisions is the app's table (node/app.py); any
other request gets a line only when a check refuses it. A push or delete that passed
authentication first gets a `started` line (`AuditIntent`, inside authentication), so a change is
never made that the file does not show: if that line cannot be written the request is refused with
503 before anything changes, and if the outcome line cannot be written the client gets 500 instead
of a success nobody recorded.

The file rotates by size; each line carries the hash of the one before (node/auditchain.py), and
the newest line's number and hash go to the coordinator now and then, so `wharf audit verify`
finds lines edited, removed, reordered or cut from the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator import audit as anchors
from coordinator.kv import KV

from .auditchain import GENESIS, Head, find_line, head_of, last_line, line_hash, log_files, tail_head
from .auth.access import CATALOG, DELETE, PULL, PUSH
from .auth.target import STATE_KEY, Target, resolve
from .config import AuditConfig, ConfigError, parse_duration, parse_size
from .errors import ERROR_KEY, RegistryError, Unavailable, send_error

log = logging.getLogger("wharf.audit")

# Where a request's Decision is kept in scope["state"].
DECISION_KEY = "wharf.audit"
# The fields every line has, in this order after `time`, `action` and `result` (null when unknown).
FIELDS = ("object", "user", "remote", "repository", "reference", "digest", "status", "refused_by", "rule")
# A writer that keeps finding the file replaced under it (rotations by other workers) gives up.
_LOCK_ATTEMPTS = 8


class AuditUnavailable(Unavailable):
    message = "the audit log cannot be written"


def _now() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


class _ChainedFile:
    """Appends chained lines; past `max_bytes` moves the file to .1 (.1 to .2, ...) and starts anew.

    Several worker processes may append to one path. Each append holds an exclusive flock on the
    live file, so lines stay whole and form one chain: a writer that finds the file other than it
    left it (another worker wrote or rotated) reads the newest line back and goes on from it. If
    the file went backwards (lines removed), it goes on from the newest line it knows of instead
    and says why in the line (`resumed`), so the gap stays visible to `wharf audit verify`.
    """

    def __init__(self, path: str, max_bytes: int, backups: int, fsync: bool) -> None:
        self.path = path
        self._max = max_bytes
        self._backups = backups
        self._fsync = fsync
        self._fd = self._open()
        self.head: Head | None = None  # the newest line known: written here, read back, or the coordinator's
        self.rotations = 0
        self._left: tuple[int, int, int] | None = None  # (dev, inode, size) as the last append here left it
        self._resume: str | None = None  # why the next line goes on from `head` rather than from the disk

    def _open(self) -> int:
        # Read too: a writer reads the last line back when another worker wrote it.
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _reopen(self) -> None:
        os.close(self._fd)
        self._fd = self._open()

    def _is_current(self, st: os.stat_result) -> bool:
        """Whether our descriptor is still the file at `path` (not rotated or removed by another)."""
        if not stat.S_ISREG(st.st_mode):
            return True  # a device or pipe (tests, /dev/stdout): nothing rotates it
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino)

    def _locked(self, work: Callable[[os.stat_result], Any]) -> Any:
        """Run `work` holding the live file's lock; it returns None to be run again (after a rotation)."""
        for _ in range(_LOCK_ATTEMPTS):
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                st = os.fstat(self._fd)
                if self._is_current(st):
                    result = work(st)
                    if result is not None:
                        return result
                    continue
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._reopen()
        raise OSError(f"{self.path} keeps being replaced while it is written")

    def append(self, entry: dict[str, Any]) -> bytes:
        """Write one line for `entry`; returns the line (without its newline)."""
        return self._locked(lambda st: self._append(st, entry))  # type: ignore[no-any-return]

    def _append(self, st: os.stat_result, entry: dict[str, Any]) -> bytes | None:
        regular = stat.S_ISREG(st.st_mode)
        size = st.st_size if regular else 0
        lead = b""
        if regular and self._left != (st.st_dev, st.st_ino, size):
            lead = self._catch_up(size)
        head = self.head
        fields: dict[str, Any] = {
            "seq": head.seq + 1 if head else 1,
            "chain": head.chain if head else secrets.token_hex(8),
            "prev": head.hash if head else GENESIS,
            **entry,
        }
        if self._resume:
            fields["resumed"] = self._resume
        line = json.dumps(fields, separators=(",", ":"), default=str).encode()
        data = lead + line + b"\n"
        if regular and size > 0 and size + len(data) > self._max:
            self._rotate(st)
            return None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self._fsync:
            os.fsync(self._fd)
        self.head = Head(fields["seq"], line_hash(line), fields["chain"], fields["prev"])
        self._resume = None
        if regular:
            self._left = (st.st_dev, st.st_ino, size + len(data))
        return line

    def _disk_head(self, size: int) -> tuple[Head | None, bytes | None]:
        """The newest line on disk: the live file's last, or (when it is empty) the last rotated one's."""
        if size > 0:
            raw = last_line(self._fd, size)
            return (head_of(raw) if raw is not None else None), raw
        if self._backups > 0:
            return tail_head(f"{self.path}.1")
        return None, None

    def _catch_up(self, size: int) -> bytes:
        """Take the newest line from disk unless it is older than one we know; b"\\n" if the file lacks one."""
        disk, raw = self._disk_head(size)
        known = self.head
        if raw is not None and disk is None:
            chain = known.chain if known else secrets.token_hex(8)
            self.head = Head(known.seq if known else 0, line_hash(raw), chain)
            self._resume = "the newest line on disk is damaged"
        elif disk is None:
            if known is not None and self._backups > 0:
                self._resume = f"the log was empty, but line {known.seq} had been written: its files were removed"
        elif known is None or (disk.chain == known.chain and disk.seq > known.seq) or disk == known:
            self.head = disk
        else:
            self._resume = (
                f"the newest line on disk was {disk.seq}, but line {known.seq} had been written: lines were removed"
            )
        if size > 0 and os.pread(self._fd, 1, size - 1) != b"\n":
            return b"\n"
        return b""

    def _rotate(self, st: os.stat_result) -> None:
        """Start a new live file, holding the old one's lock until the new one is locked too."""
        self.rotations += 1
        if self._backups == 0:
            os.ftruncate(self._fd, 0)
            self._left = (st.st_dev, st.st_ino, 0)
            return
        for i in range(self._backups - 1, 0, -1):
            older = f"{self.path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        old = self._fd
        self._fd = self._open()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.close(old)
        new = os.fstat(self._fd)
        self._left = (new.st_dev, new.st_ino, 0)

    def disk_head(self) -> Head | None:
        """The newest line on disk now (for finding the coordinator's record of this log)."""

        def read(st: os.stat_result) -> tuple[Head | None]:
            return (self._disk_head(st.st_size if stat.S_ISREG(st.st_mode) else 0)[0],)

        return self._locked(read)[0]  # type: ignore[no-any-return]

    def anchor(self, recorded: Head) -> str | None:
        """At start: go on from the coordinator's record of the newest line; why the disk disagrees, if it does."""

        def check(st: os.stat_result) -> tuple[str | None]:
            if not stat.S_ISREG(st.st_mode):
                return (None,)
            disk, _ = self._disk_head(st.st_size)
            problem = None
            if disk is None:
                problem = f"the log is empty, but the coordinator recorded line {recorded.seq}: its files were removed"
            elif disk.chain != recorded.chain or disk.seq < recorded.seq:
                problem = f"the log ends at line {disk.seq}, but the coordinator recorded line {recorded.seq}"
            elif disk.seq == recorded.seq and disk.hash != recorded.hash:
                problem = f"line {disk.seq} is not the line the coordinator recorded"
            elif disk.seq > recorded.seq:
                try:
                    line = find_line(log_files([self.path]), recorded.seq)
                except LookupError:
                    line = None  # rotated away since it was recorded: nothing left to compare
                else:
                    if line is None or line_hash(line) != recorded.hash:
                        problem = f"line {recorded.seq} is not the line the coordinator recorded"
            if problem is None:
                self.head = disk
            else:
                seq = max(disk.seq if disk is not None and disk.chain == recorded.chain else 0, recorded.seq)
                self.head = Head(seq, recorded.hash, recorded.chain)
                self._resume = problem + "; lines were removed or changed while no node was writing"
            self._left = (st.st_dev, st.st_ino, st.st_size)
            return (problem,)

        return self._locked(check)[0]  # type: ignore[no-any-return]

    def close(self) -> None:
        os.close(self._fd)


class AuditLog:
    def __init__(self, config: AuditConfig) -> None:
        # One thread: lines keep their order and rotation never races a write.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="wharf-audit")
        self._file = (
            _ChainedFile(os.path.abspath(config.path), parse_size(config.maxsize), config.maxbackups, config.fsync)
            if config.path
            else None
        )
        self._stdout = config.stdout
        self.pulls = config.pulls
        self._interval = parse_duration(config.checkpoint)
        self._kv: KV | None = None
        self._node = ""
        self._anchored: Head | None = None
        self._rotations = 0
        self._wake = asyncio.Event()
        self._anchoring: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, config: AuditConfig) -> AuditLog | None:
        """The configured audit log (its file opened now, so a bad path stops start-up); None when off."""
        if not config.path and not config.stdout:
            return None
        try:
            return cls(config)
        except OSError as exc:
            raise ConfigError(f"audit.path {config.path}: {exc.strerror or exc}") from None

    async def _run(self, work: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    async def record(self, action: str, result: str, **fields: Any) -> None:
        """Write one line; AuditUnavailable (503) when it cannot be written."""
        entry: dict[str, Any] = {"time": _now(), "action": action, "result": result}
        for name in FIELDS:
            entry[name] = fields.pop(name, None)
        entry.update(fields)
        if self._file is not None:
            try:
                await self._run(self._file.append, entry)
            except OSError as exc:
                log.error("audit log %s cannot be written: %s", self._file.path, exc)
                raise AuditUnavailable({"reason": "the audit log cannot be written"}) from None
            if self._file.rotations != self._rotations:
                self._rotations = self._file.rotations
                self._wake.set()  # a rotated file's last line goes to the coordinator at once
        if self._stdout:
            log.info("audit", extra={"fields": entry})

    # -- the coordinator's record of the newest line ---------------------------------------------

    async def attach(self, kv: KV, node: str) -> None:
        """Go on from the coordinator's record of this log, and record its newest line from now on."""
        if self._file is None:
            return
        self._kv, self._node = kv, node
        try:
            disk = await self._run(self._file.disk_head)
            recorded = await (anchors.read_head(kv, disk.chain) if disk is not None else self._last_recorded(kv))
            if recorded is not None:
                problem = await self._run(self._file.anchor, Head(recorded.seq, recorded.hash, recorded.chain))
                if problem:
                    log.error("audit log %s: %s (wharf audit verify shows where)", self._file.path, problem)
        except Exception as exc:  # the coordinator is checked at start-up anyway; serving goes on
            log.warning("audit log %s: the coordinator's record could not be read: %s", self._file.path, exc)
        self._anchored = self._file.head
        self._anchoring = asyncio.get_running_loop().create_task(self._anchor_loop())

    async def _last_recorded(self, kv: KV) -> anchors.AuditHead | None:
        """This node's newest record for this path: the log's files may all have gone."""
        assert self._file is not None
        path = self._file.path
        mine = [head for head in await anchors.list_heads(kv) if head.node == self._node and head.path == path]
        return max(mine, key=lambda head: head.time) if mine else None

    async def _anchor_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self._anchor()

    async def _anchor(self) -> None:
        assert self._file is not None and self._kv is not None
        head = self._file.head
        if head is None or head == self._anchored:
            return
        record = anchors.AuditHead(head.chain, head.seq, head.hash, _now(), self._node, self._file.path)
        try:
            await anchors.advance_head(self._kv, record)
        except Exception as exc:
            log.warning(
                "audit log %s: line %d could not be recorded in the coordinator: %s", record.path, head.seq, exc
            )
            return
        self._anchored = head

    async def detach(self) -> None:
        """Stop recording, after recording the newest line once more."""
        if self._anchoring is None:
            return
        self._anchoring.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._anchoring
        self._anchoring = None
        await self._anchor()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._file is not None:
            self._file.close()


# -- one line per decision -----------------------------------------------------------------------


@dataclass
class Decision:
    """One request's audit line in the making."""

    action: str  # what the request asks to do: push, pull, delete, catalog, login, token ...
    fields: dict[str, Any] = field(default_factory=dict)
    due: bool = False  # a line even when nothing refuses the request (a decision endpoint, or noted)
    change: bool = False  # a push or delete: a `started` line before the handler runs
    started: bool = False  # that line was written


def note(scope: Scope, *, record: bool = False, **facts: Any) -> None:
    """Add facts (a digest, the action) to this request's audit line; `record`: write one whatever happens.

    Does nothing when the audit log is off.
    """
    decision = (scope.get("state") or {}).get(DECISION_KEY)
    if isinstance(decision, Decision):
        decision.fields.update(facts)
        decision.due = decision.due or record


def _action(target: Target) -> str:
    """What a request asks to do, by the access it needs: push wins over delete over pull."""
    names = {a.action for a in target.needs if a.type == "repository" and a.name == target.repository}
    for action in (PUSH, DELETE, PULL):
        if action in names:
            return action
    if CATALOG in target.needs:
        return "catalog"
    if getattr(target.route, "path", None) == "/v2/":
        return "login"  # `docker login` signs in against the base endpoint
    return "request"


def _header(message: Message, name: bytes) -> str | None:
    for key, value in message.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class AuditMiddleware:
    """ASGI middleware, outside authentication: the one line of each decision, written before the response."""

    def __init__(
        self, app: ASGIApp, *, audit: AuditLog, routes: list[Any], decisions: Mapping[Callable[..., Any], str]
    ) -> None:
        self.app = app
        self.audit = audit
        self.routes = routes
        self.decisions = decisions  # endpoint -> what it decides on (the line's `object`)

    def _decision(self, scope: Scope, target: Target) -> Decision:
        params = target.params
        query = scope.get("query_string", b"")
        reference = params.get("reference")
        digest = params.get("digest")
        if digest is None and isinstance(reference, str) and ":" in reference:
            digest = reference
        obj = self.decisions.get(target.endpoint) if target.endpoint is not None else None  # type: ignore[call-overload]
        if obj == "manifest" and digest is None and reference is not None:
            obj = "tag"
        elif obj == "upload":
            given = QueryParams(query)
            if given.get("mount") is not None:
                obj, digest = "mount", given.get("mount")
            elif given.get("digest") is not None:
                obj, digest = "blob", given.get("digest")
        elif obj == "blob" and digest is None and query:
            digest = QueryParams(query).get("digest")
        client = scope.get("client")
        action = _action(target)
        # HEAD reaches the GET handler too (Starlette adds it), but only checks: no pull.
        due = obj is not None and scope["method"] != "HEAD" and (action != PULL or self.audit.pulls)
        fields = {
            "object": obj,
            "remote": client[0] if client else None,
            "repository": target.repository,
            "reference": reference if reference is not None else digest,
            "digest": digest,
        }
        return Decision(action, fields, due=due, change=due and action in (PUSH, DELETE))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        target = resolve(self.routes, scope)
        state[STATE_KEY] = target
        decision = state[DECISION_KEY] = self._decision(scope, target)
        replaced = False
        recorded = False

        async def audited_send(message: Message) -> None:
            nonlocal replaced, recorded
            if replaced:
                return
            if message["type"] == "http.response.start":
                recorded = True
                try:
                    await self._record(scope, decision, message["status"], _header(message, b"docker-content-digest"))
                except AuditUnavailable as unavailable:
                    replaced = True
                    error: RegistryError = unavailable
                    if decision.started:
                        # The change may have been made: say so rather than report a success unrecorded.
                        error = AuditUnavailable(
                            {"reason": "the audit log cannot be written; the operation may have completed"}
                        )
                        error.status = 500
                    await send_error(error, scope, receive, send)
                    return
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except Exception:
            if not recorded and decision.due:
                with contextlib.suppress(AuditUnavailable):
                    await self._record(scope, decision, 500, None)
            raise

    async def _record(self, scope: Scope, decision: Decision, status: int, digest: str | None) -> None:
        state = scope.get("state") or {}
        error = state.get(ERROR_KEY)
        refused_by = error.refused_by if isinstance(error, RegistryError) else None
        if refused_by is None and (not decision.due or status == 401):
            return  # not a decision, or a challenge to sign in (no credentials were given)
        if isinstance(error, AuditUnavailable) and not decision.started:
            return  # the `started` line could not be written: neither will this one
        fields: dict[str, Any] = {**decision.fields}
        fields.setdefault("user", state.get("user"))
        if digest and status < 300:
            fields["digest"] = digest
        if isinstance(error, RegistryError):
            fields.update(error.audit)
            fields["refused_by"], fields["rule"] = refused_by, error.rule
        action = fields.pop("action", decision.action)
        result = "denied" if refused_by else "success" if status < 400 else "failure"
        await self.audit.record(action, result, status=status, request_id=state.get("request_id"), **fields)


class AuditIntent:
    """ASGI middleware, inside authentication: the `started` line of a push or delete, before it is made."""

    def __init__(self, app: ASGIApp, *, audit: AuditLog) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state") or {}
        decision = state.get(DECISION_KEY)
        if scope["type"] == "http" and isinstance(decision, Decision) and decision.change:
            fields = {**decision.fields, "user": state.get("user"), "request_id": state.get("request_id")}
            try:
                await self.audit.record(decision.action, "started", **fields)
            except RegistryError as exc:
                await send_error(exc, scope, receive, send)
                return
            decision.started = True
        await self.app(scope, receive, send)
