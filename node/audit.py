"""The audit log: one hash-chained JSON line per decision (push, pull, delete, refusal), or the request fails.

A request's line is built as it goes: `AuditMiddleware` (outside authentication) starts it from
the route, handlers add what they learn with `note`, and an error that refuses the request
carries `refused_by`, `rule` and its own facts (node/errors.py); the middleware writes the line
when the response starts. Which requests are decisions is the app's table (node/app.py); any
other request gets a line only when a check refuses it. A manifest or tag push and a delete that
passed authentication first get a `started` line (`AuditIntent`, inside authentication), so what
is pulled by name never changes without the file showing it: if that line cannot be written the
request is refused with 503 before anything changes, and if the outcome line cannot be written the
client gets 500 instead of a success nobody recorded. A blob upload or mount only adds content
behind names; its one line is written before the client hears of it, or the client gets 503.

The file rotates by size; each line carries the hash of the one before (node/auditchain.py), and
the newest line's number and hash go to the coordinator now and then, so `wharf audit verify`
finds lines edited, removed, reordered or cut from the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import queue
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator import audit as anchors
from coordinator.kv import KV

from .auditchain import GENESIS, Head, find_line, head_of, last_line, line_hash, log_files, tail_head
from .auth.access import CATALOG, DELETE, PULL, PUSH
from .config import AuditConfig, ConfigError
from .context import NOTES_KEY, Notes
from .errors import ERROR_KEY, RegistryError, Unavailable, send_error
from .routing import STATE_KEY, Target, resolve, routed

log = logging.getLogger("wharf.audit")

# Where a request's Decision is kept in scope["state"].
DECISION_KEY = "wharf.audit"
# The fields every line has, in this order after `time`, `action` and `result` (null when unknown).
FIELDS = ("object", "user", "remote", "repository", "reference", "digest", "status", "refused_by", "rule")
# The most characters of a field that comes from the request (a name, a tag, a user name): valid
# ones are far shorter (a repository name 255 at most, a sha512 digest 135), and an anonymous caller
# must not be able to fill the log, and rotate its history away, with a few long invalid names.
FIELD_CHARS = 512
# A writer that keeps finding the file replaced under it (rotations by other workers) gives up.
_LOCK_ATTEMPTS = 8
# How often a writer alone on its path looks whether the file is still there and still its own.
RECHECK_SECONDS = 1.0
# One encoder for every line (json.dumps with options builds a new one each call). ASCII only.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


class AuditUnavailable(Unavailable):
    message = "the audit log cannot be written"


_second: tuple[int, str] = (0, "")


def _now() -> str:
    """UTC now, to the millisecond (the second's text is formatted once per second)."""
    global _second
    now = time.time()
    whole = int(now)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(whole)))
    return f"{_second[1]}{int((now - whole) * 1000):03d}Z"


class _State(NamedTuple):
    """The live file as a writer sees it (size 0 for a device or pipe)."""

    regular: bool
    dev: int
    ino: int
    size: int


class _ChainedFile:
    """Appends chained lines; past `max_bytes` moves the file to .1 (.1 to .2, ...) and starts anew.

    A writer alone on its path (one worker process) keeps the file's state itself and spends one
    system call per write; it looks at the path again every RECHECK_SECONDS, in case something
    else moved the file. Several worker processes may share one path (`shared`): each append then
    holds an exclusive flock on the live file, so lines stay whole and form one chain, and a writer
    that finds the file other than it left it (another worker wrote or rotated) reads the newest
    line back and goes on from it. Either way, if the file went backwards (lines removed), the
    writer goes on from the newest line it knows of and says why in the line (`resumed`), so the gap
    stays visible to `wharf audit verify`. A lock on PATH.lock, shared or exclusive, keeps two
    processes that both think they are alone off one path.
    """

    def __init__(self, path: str, max_bytes: int, backups: int, fsync: bool, *, shared: bool = False) -> None:
        self.path = path
        self._max = max_bytes
        self._backups = backups
        self._fsync = fsync
        self._shared = shared
        self._fd = self._open()
        self._claim: int | None = None  # the descriptor holding PATH.lock, once writing began
        self.head: Head | None = None  # the newest line known: written here, read back, or the coordinator's
        self.rotations = 0
        self._left: _State | None = None  # the file as the last write here left it
        self._recheck = 0.0  # when a writer alone next looks at the path
        self._resume: str | None = None  # why the next line goes on from `head` rather than from the disk
        self._mutex = threading.Lock()  # the event loop and the writer thread may both write

    def _open(self) -> int:
        # Read too: a writer reads the last line back when another worker wrote it.
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _reopen(self) -> None:
        os.close(self._fd)
        self._fd = self._open()

    def _take_claim(self) -> None:
        if self._claim is not None or not stat.S_ISREG(os.fstat(self._fd).st_mode):
            return
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self._shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(
                f"{self.path} is being written by another process: give each node its own audit.path"
            ) from None
        self._claim = fd

    def _current(self) -> _State | None:
        """The live file now; None if our descriptor is no longer it (rotated or removed by another)."""
        if not self._shared and self._left is not None and time.monotonic() < self._recheck:
            return self._left  # alone on the path: the file is as the last write left it
        st = os.fstat(self._fd)
        regular = stat.S_ISREG(st.st_mode)
        if regular:
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                return None
            if (current.st_dev, current.st_ino) != (st.st_dev, st.st_ino):
                return None
        self._recheck = time.monotonic() + RECHECK_SECONDS
        return _State(regular, st.st_dev, st.st_ino, st.st_size if regular else 0)

    def _locked(self, work: Callable[[_State], Any], *, rounds: int = 1) -> Any:
        """Run `work` on the live file (locked when shared); it returns None to be run again (it rotated)."""
        with self._mutex:
            self._take_claim()
            for _ in range(_LOCK_ATTEMPTS + 2 * rounds):
                if self._shared:
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
                try:
                    state = self._current()
                    if state is not None:
                        result = work(state)
                        if result is not None:
                            return result
                        continue
                finally:
                    if self._shared:
                        fcntl.flock(self._fd, fcntl.LOCK_UN)
                self._reopen()
            raise OSError(f"{self.path} keeps being replaced while it is written")

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Write one line per entry, in order, in as few writes as rotation allows."""
        pending = entries

        def work(state: _State) -> bool | None:
            nonlocal pending
            pending = self._append(state, pending)
            return None if pending else True

        self._locked(work, rounds=len(entries))

    def _append(self, state: _State, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the lines that fit in the live file; the entries left once it has rotated ([] when none)."""
        data = bytearray()
        if state.regular and self._left != state:
            data += self._catch_up(state.size)
        head, resume = self.head, self._resume
        size = state.size
        for done, entry in enumerate(entries):
            fields: dict[str, Any] = {
                "seq": head.seq + 1 if head else 1,
                "chain": head.chain if head else secrets.token_hex(8),
                "prev": head.hash if head else GENESIS,
                **entry,
            }
            if resume:
                fields["resumed"] = resume
            line = _ENCODER.encode(fields).encode()
            if state.regular and size + len(data) > 0 and size + len(data) + len(line) + 1 > self._max:
                self._write(state, data, head, resume)
                self._rotate()
                return entries[done:]
            data += line + b"\n"
            head, resume = Head(fields["seq"], line_hash(line), fields["chain"], fields["prev"]), None
        self._write(state, data, head, resume)
        return []

    def _write(self, state: _State, data: bytearray, head: Head | None, resume: str | None) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if data and self._fsync:
                os.fsync(self._fd)
        except OSError:
            self._left = None  # maybe half written: look at the file again next time
            raise
        self.head, self._resume = head, resume
        if state.regular:
            self._left = state._replace(size=state.size + len(data))

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

    def _rotate(self) -> None:
        """Start a new live file, holding the old one's lock until the new one is locked too."""
        self.rotations += 1
        if self._backups == 0:
            os.ftruncate(self._fd, 0)
        else:
            for i in range(self._backups - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
            old = self._fd
            self._fd = self._open()
            if self._shared:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.close(old)
        new = os.fstat(self._fd)
        self._left = _State(True, new.st_dev, new.st_ino, 0)

    def disk_head(self) -> Head | None:
        """The newest line on disk now (for finding the coordinator's record of this log)."""

        def read(state: _State) -> tuple[Head | None]:
            return (self._disk_head(state.size)[0],)

        return self._locked(read)[0]  # type: ignore[no-any-return]

    def anchor(self, recorded: Head) -> str | None:
        """At start: go on from the coordinator's record of the newest line; why the disk disagrees, if it does."""

        def check(state: _State) -> tuple[str | None]:
            if not state.regular:
                return (None,)
            disk, _ = self._disk_head(state.size)
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
            self._left = state
            return (problem,)

        return self._locked(check)[0]  # type: ignore[no-any-return]

    def close(self) -> None:
        os.close(self._fd)
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None


class _Writer:
    """One thread that runs the audit file's work in order, off the event loop.

    Lighter than an executor round trip: a queue put there, one call_soon_threadsafe back.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, work: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run `work` in the thread; `done(result, error)` then runs on the calling event loop."""
        if self._thread is None:
            # Started at first use: a server that forks its workers after importing the app must
            # not leave the thread behind in the parent.
            self._thread = threading.Thread(target=self._serve, name="wharf-audit", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()

        def reply(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(done, result, error)

        self._jobs.put((work, reply))

    async def run(self, work: Callable[[], Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.submit(work, done)
        return await future

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, reply = job
            try:
                result, error = work(), None
            except BaseException as exc:  # handed back to the loop, which decides
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                reply(result, error)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


class AuditLog:
    def __init__(self, config: AuditConfig, *, shared: bool = False) -> None:
        # The file's work off the event loop: the reads at start-up, and the lines when fsync is on.
        self._writer = _Writer()
        self._file = (
            _ChainedFile(
                os.path.abspath(config.path),
                config.maxsize,
                config.maxbackups,
                config.fsync,
                shared=shared,
            )
            if config.path
            else None
        )
        self._stdout = config.stdout
        self.pulls = config.pulls
        self._interval = config.checkpoint
        self._kv: KV | None = None
        self._node = ""
        self._anchored: Head | None = None
        self._rotations = 0
        # Lines wait here for the next write, one for all the lines that came in meanwhile.
        self._queue: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._writing = False
        # Lines go into the page cache from the event loop (keep the file on a local filesystem);
        # with fsync each waits for the disk, so the writer thread writes them.
        self._inline = not config.fsync
        self._wake = asyncio.Event()
        self._anchoring: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, config: AuditConfig, *, shared: bool = False) -> AuditLog | None:
        """The configured audit log (its file opened now, so a bad path stops start-up); None when off.

        `shared`: several worker processes write the file (http.workers > 1).
        """
        if not config.path and not config.stdout:
            return None
        try:
            return cls(config, shared=shared)
        except OSError as exc:
            raise ConfigError(f"audit.path {config.path}: {exc.strerror or exc}") from None

    async def _run(self, work: Callable[..., Any], *args: Any) -> Any:
        return await self._writer.run(lambda: work(*args))

    async def record(self, action: str, result: str, **fields: Any) -> None:
        """Write one line (returns once it is in the file); AuditUnavailable (503) when it cannot be."""
        entry: dict[str, Any] = {"time": _now(), "action": action, "result": result}
        for name in FIELDS:
            value = fields.pop(name, None)
            if isinstance(value, str) and len(value) > FIELD_CHARS:
                value = value[:FIELD_CHARS] + f"... ({len(value)} characters)"
            entry[name] = value
        entry.update(fields)
        if self._file is not None:
            written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue.append((entry, written))
            if not self._writing:
                self._write_queued()
            await written
        if self._stdout:
            log.info("audit", extra={"fields": entry})

    def _write_queued(self) -> None:
        """Write every queued line in one batch, then the lines queued meanwhile.

        Without fsync the batch is written on the event loop, once the requests that are ready
        have queued their lines: a line into the page cache takes microseconds, while each write
        hands the GIL to any other thread that wants it, which the loop then waits to get back;
        one write for every line of a loop turn keeps that to once. With fsync each write waits for
        the disk, and the writer thread does it.
        """
        assert self._file is not None
        self._writing = True
        loop = asyncio.get_running_loop()
        file = self._file

        def done(_: Any, error: BaseException | None) -> None:
            self._writing = False
            if error is not None:
                log.error("audit log %s cannot be written: %s", file.path, error)
            for _, written in batch:
                if written.done():
                    continue  # its request went away; the line was written all the same
                if error is not None:
                    written.set_exception(AuditUnavailable({"reason": "the audit log cannot be written"}))
                else:
                    written.set_result(None)
            if file.rotations != self._rotations:
                self._rotations = file.rotations
                self._wake.set()  # a rotated file's last line goes to the coordinator at once
            if self._queue:
                self._write_queued()

        batch: list[tuple[dict[str, Any], asyncio.Future[None]]] = []

        def write() -> None:
            nonlocal batch
            batch, self._queue = self._queue, []
            try:
                file.append([entry for entry, _ in batch])
            except Exception as exc:  # whatever it is, the lines were not written: their requests fail
                done(None, exc)
            else:
                done(None, None)

        if self._inline:
            loop.call_soon(write)
        else:
            batch, self._queue = self._queue, []
            self._writer.submit(lambda: file.append([entry for entry, _ in batch]), done)

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
        self._writer.close()
        if self._file is not None:
            self._file.close()


# -- one line per decision -----------------------------------------------------------------------


@dataclass
class Decision:
    """One request's audit line in the making: described from its route once known, plus notes."""

    notes: Notes = field(default_factory=Notes)  # what handlers add (node/context.py `note`)
    described: bool = False
    action: str | None = None  # what the request asks to do: push, pull, delete, catalog, login, token ...
    fields: dict[str, Any] = field(default_factory=dict)  # object, remote, repository, reference, digest
    due: bool = False  # a line even when nothing refuses the request (a decision endpoint, or noted)
    change: bool = False  # a tag or manifest push, or a delete: a `started` line before the handler runs
    started: bool = False  # that line was written

    def line(self) -> dict[str, Any]:
        return {**self.fields, **self.notes}


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


# The action of a decision endpoint, by method (what `_action` finds for them, without asking).
_METHOD_ACTIONS = {"GET": PULL, "HEAD": PULL, "PUT": PUSH, "POST": PUSH, "DELETE": DELETE}
# What only changes the content behind names (a blob linked, or mounted) gets no `started` line:
# tags and deletions do, as they change what is pulled by name.
_INTENT_OBJECTS = frozenset({"manifest", "tag"})


class _Describer:
    """Fills a request's Decision from its route: which endpoint, what it decides on, which digest."""

    def __init__(self, audit: AuditLog, routes: list[Any]) -> None:
        self.audit = audit
        self.routes = routes

    def describe(self, scope: Scope, decision: Decision) -> None:
        """From the route the request was given (by the router, or by authentication): no matching here."""
        if decision.described:
            return
        decision.described = True
        target = (scope.get("state") or {}).get(STATE_KEY)
        if isinstance(target, Target):
            obj, params = target.audit, target.params
        else:
            obj = getattr(scope.get("route"), "audit", None)
            params = scope.get("path_params") or {}
        query = scope.get("query_string", b"")
        reference = params.get("reference")
        digest = params.get("digest")
        if digest is None and isinstance(reference, str) and ":" in reference:
            digest = reference
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
        method = scope["method"]
        name = params.get("name")
        decision.fields = {
            "object": obj,
            "remote": client[0] if client else None,
            "repository": name if isinstance(name, str) else None,
            "reference": reference if reference is not None else digest,
            "digest": digest,
        }
        if obj is None:
            return  # audited only if refused; its action is found then (see `action`)
        decision.action = _METHOD_ACTIONS.get(method, "request")
        # HEAD reaches the GET handler too (Starlette adds it), but only checks: no pull.
        decision.due = (
            decision.due
            or decision.notes.record
            or (method != "HEAD" and (decision.action != PULL or self.audit.pulls))
        )
        decision.change = decision.due and decision.action in (PUSH, DELETE)
        decision.change = decision.change and (obj in _INTENT_OBJECTS or decision.action == DELETE)

    def action(self, scope: Scope, decision: Decision) -> str:
        """What the request asked to do, for one that is no decision endpoint: found by its route's needs."""
        if decision.action is None:
            decision.action = _action(routed(self.routes, scope))
        return decision.action


class AuditMiddleware:
    """ASGI middleware, outside authentication: the one line of each decision, written before the response.

    It matches no route itself: by the time the response starts, the router (or authentication,
    which refused the request) has said which route it was.
    """

    def __init__(self, app: ASGIApp, *, audit: AuditLog, routes: list[Any]) -> None:
        self.app = app
        self.audit = audit
        self.describer = _Describer(audit, routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        decision = state[DECISION_KEY] = Decision()
        state[NOTES_KEY] = decision.notes
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
            if not recorded:
                with contextlib.suppress(AuditUnavailable):
                    await self._record(scope, decision, 500, None)
            raise

    async def _record(self, scope: Scope, decision: Decision, status: int, digest: str | None) -> None:
        state = scope.get("state") or {}
        self.describer.describe(scope, decision)
        error = state.get(ERROR_KEY)
        refused_by = error.refused_by if isinstance(error, RegistryError) else None
        # What a signature policy decided (node/trust.py): its rule, the decision and why. A pull it
        # warned about is a decision even with pull lines off.
        signature = dict(state.get("signature") or {})
        warned = signature.get("decision") == "warned"
        due = decision.due or decision.notes.record
        if refused_by is None and not warned and (not due or status == 401):
            return  # not a decision, or a challenge to sign in (no credentials were given)
        if isinstance(error, AuditUnavailable) and not decision.started:
            return  # the `started` line could not be written: neither will this one
        fields = decision.line()
        fields.setdefault("user", state.get("user"))
        refused_digest = signature.pop("digest", None)
        fields.update(signature)
        if digest and status < 300:
            fields["digest"] = digest
        elif refused_digest:
            fields["digest"] = refused_digest  # a refused pull sends no Docker-Content-Digest
        if isinstance(error, RegistryError):
            fields.update(error.audit)
            fields["refused_by"], fields["rule"] = refused_by, error.rule
        action = fields.pop("action", None) or self.describer.action(scope, decision)
        result = "denied" if refused_by else "success" if status < 400 else "failure"
        await self.audit.record(action, result, status=status, request_id=state.get("request_id"), **fields)


# A change with a `started` line comes by one of these (a tag pushed, anything deleted).
_CHANGING_METHODS = frozenset({"PUT", "DELETE"})


class AuditIntent:
    """ASGI middleware, inside authentication: the `started` line of a change, before it is made."""

    def __init__(self, app: ASGIApp, *, audit: AuditLog, routes: list[Any]) -> None:
        self.app = app
        self.audit = audit
        self.routes = routes
        self.describer = _Describer(audit, routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state") or {}
        decision = state.get(DECISION_KEY)
        if scope["type"] == "http" and isinstance(decision, Decision) and scope["method"] in _CHANGING_METHODS:
            if STATE_KEY not in state:
                state[STATE_KEY] = resolve(self.routes, scope)  # the router has not matched it yet
            self.describer.describe(scope, decision)
            if decision.change:
                line = {**decision.line(), "user": state.get("user"), "request_id": state.get("request_id")}
                action = line.pop("action", None) or self.describer.action(scope, decision)
                try:
                    await self.audit.record(action, "started", **line)
                except RegistryError as exc:
                    await send_error(exc, scope, receive, send)
                    return
                decision.started = True
        await self.app(scope, receive, send)
