"""The embedded KV backend: one SQLite file, for a node that runs with no other service."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .kv import (
    READS,
    Compare,
    Count,
    Delete,
    Get,
    KeyValue,
    LeaseGone,
    MemberSpace,
    Op,
    OutOfSpace,
    Put,
    StoreSpace,
    TxnResult,
    WatchEvent,
    check_txn_branch,
)

T = TypeVar("T")


def _prefix_end(prefix: str) -> str | None:
    """The smallest string above every string that starts with `prefix`; None for "" (no bound).

    Keys are TEXT compared bytewise, and UTF-8 byte order is code point order, so bumping the last
    code point bounds the prefix. (kv.prefix_end bumps the last byte, which can leave invalid UTF-8
    that SQLite cannot bind, and gives "\\0" for "", which as a bound would match nothing.)
    """
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if code == 0xD800:
            code = 0xE000  # surrogates are not characters
        if code <= 0x10FFFF:
            return "".join(chars) + chr(code)
    return None


def _under(prefix: str, low: str | None = None) -> tuple[str, tuple[str, ...]]:
    """A SQL condition (an index range) for keys under `prefix` (from `low` on), and its arguments."""
    high = _prefix_end(prefix)
    low = prefix if low is None else low
    if high is None:
        return "key >= ?", (low,)
    return "key >= ? AND key < ?", (low, high)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    version INTEGER NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    rev INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    key TEXT NOT NULL,
    type TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (rev, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0);
"""


class _Busy:
    """A read that found the database locked for a moment (see EmbeddedKV._read_here)."""


_BUSY = _Busy()
# Read-only transactions of at most this many keys run on the caller's thread.
_READ_HERE_KEYS = 16
# Counts up to this many keys run on the caller's thread.
_COUNT_HERE = 1000
# Commits on callers' threads between two checkpoints (SQLite's own default: about 1,000 log pages).
_CHECKPOINT_EVERY = 200
# How long the database thread's connection waits for a lock.
_BUSY_WAIT_MS = 30_000
# How long a checkpoint waits for a writer or a reader of an older snapshot (none: it is passive then).
_CHECKPOINT_WAIT_MS = 0
# The write-ahead log's file is cut back to this size when it starts again from its beginning.
_LOG_SIZE_LIMIT = 64 << 20

# Watch history kept for late or cross-process watchers; older changes are compacted.
_CHANGE_HISTORY = 10_000
_WATCH_POLL_SECONDS = 0.1
_LEASE_SWEEP_SECONDS = 0.25


class EmbeddedKV:
    """KV contract over SQLite.

    Small reads and write transactions run on the caller's thread when they need not wait for a
    lock (a WAL commit syncs nothing); anything that would wait, every range walk and every
    checkpoint runs on one private thread, so the event loop never blocks on disk. SQLite's own
    locking (WAL, BEGIN IMMEDIATE) serialises writers of this process and of several worker
    processes on one file. Watches poll the change table, and writers in this process wake them.
    """

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        """Open (and create, unless `readonly`) the file at `path`.

        Read-only opens create nothing: no file, no directory, no WAL or lock file, so dry runs and
        listings leave a store exactly as they found it. FileNotFoundError if there is no file.
        """
        self.path = os.path.abspath(path)
        self.readonly = readonly
        if readonly:
            if not os.path.isfile(self.path):
                raise FileNotFoundError(f"no coordinator file at {self.path}")
        else:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wharf-kv")
        self._local = threading.local()
        self._readers = threading.local()  # read connections of the threads that read here
        self._reader_conns: list[sqlite3.Connection] = []
        self._writers_here = threading.local()  # write connections of the threads that write here
        self._writer_conns: list[sqlite3.Connection] = []
        self._commits_here = 0
        # Set while a checkpoint waits for the database thread: writes then queue there behind it.
        self._checkpoint_pending = False
        self._watchers: set[_EmbeddedWatch] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        # Set when a write found the disk full, cleared by the next write that succeeds.
        self._full = False
        if not readonly:
            self._call_sync(self._init_db)

    # -- plumbing -------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.readonly:
                conn = self._connect_reader()
            else:
                conn = sqlite3.connect(self.path, isolation_level=None, timeout=_BUSY_WAIT_MS / 1000)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA journal_size_limit={_LOG_SIZE_LIMIT}")
            self._local.conn = conn
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        """A connection for reads only (snapshots, read-only opens); the file is in WAL mode already."""
        if self.readonly:
            return sqlite3.connect(_readonly_uri(self.path), uri=True, isolation_level=None, timeout=30)
        return sqlite3.connect(self.path, isolation_level=None, timeout=30)

    def _init_db(self) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _call_sync(self, fn: Callable[[], T]) -> T:
        return self._executor.submit(fn).result()

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise RuntimeError("embedded KV is closed")
        self._ensure_sweeper()
        return await asyncio.wrap_future(self._executor.submit(fn))

    def _ensure_sweeper(self) -> None:
        if self.readonly:
            return
        if self._sweeper is None or self._sweeper.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._sweeper = loop.create_task(self._sweep_leases_forever())

    def _write(self, fn: Callable[[sqlite3.Connection, _Writer], T]) -> T:
        if self.readonly:
            raise PermissionError(f"the coordinator {self.path} was opened read-only")
        return self._write_on(self._conn(), fn)

    async def _update(self, fn: Callable[[sqlite3.Connection, _Writer], T]) -> T:
        """A write transaction: here when the write lock is free at once, else on the database thread."""
        done = self._write_here(fn)
        if isinstance(done, _Busy):
            return await self._call(lambda: self._write(fn))
        # Let the others have a turn: a task writing in a loop must not hold the event loop.
        await asyncio.sleep(0)
        return done

    def _write_here(self, fn: Callable[[sqlite3.Connection, _Writer], T]) -> T | _Busy:
        """Run a write transaction on the calling thread, on a write connection of its own.

        In WAL mode with synchronous=NORMAL a commit appends a few pages to the log and syncs
        nothing, so a small transaction costs far less here than two thread hand-offs (and the
        fight for the interpreter lock that comes with them). This connection never waits: when
        another connection holds the write lock (the lease sweep, another worker process) the
        answer is _BUSY before anything was written, and the caller asks the database thread. It
        never checkpoints either (a checkpoint syncs the file): every _CHECKPOINT_EVERY commits
        the database thread is asked to.
        """
        if self.readonly:
            raise PermissionError(f"the coordinator {self.path} was opened read-only")
        if self._closed:
            raise RuntimeError("embedded KV is closed")
        if self._checkpoint_pending:
            return _BUSY  # queue behind the checkpoint, so that it finds the write lock free
        self._ensure_sweeper()
        conn = getattr(self._writers_here, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=0, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA journal_size_limit={_LOG_SIZE_LIMIT}")
            self._writers_here.conn = conn
            self._writer_conns.append(conn)
        try:
            result = self._write_on(conn, fn)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return _BUSY  # _write_on rolled back: nothing of it was written
            raise
        self._commits_here += 1
        if self._commits_here % _CHECKPOINT_EVERY == 0:
            self._checkpoint_soon()
        return result

    def _checkpoint_soon(self) -> None:
        """Copy the log back into the file on the database thread, so that the next write starts it again.

        A passive checkpoint never catches up with writers that keep committing: the log then only
        grows (150 MiB in 12 s of small pushes). RESTART, when it gets the lock, holds new writers
        off while it copies, so the next commit starts the log from its beginning. Until it has
        run, this process's writes queue on the database thread behind it (`_write_here` answers
        _BUSY), so a caller's-thread writer cannot keep the lock from it however busy the machine.
        It waits for no lock: with another process writing, or a reader of an older snapshot (a GC
        mark, a snapshot backup), it is a passive checkpoint, and the log starts again at a later one.
        """

        def checkpoint() -> None:
            try:
                conn = self._conn()
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(f"PRAGMA busy_timeout={_CHECKPOINT_WAIT_MS}")
                    try:
                        conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                    finally:
                        conn.execute(f"PRAGMA busy_timeout={_BUSY_WAIT_MS}")
            finally:
                self._checkpoint_pending = False

        self._checkpoint_pending = True
        try:
            self._executor.submit(checkpoint)
        except RuntimeError:  # the executor shut down: close checkpoints
            self._checkpoint_pending = False

    def _write_on(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection, _Writer], T]) -> T:
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                rev = conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
                writer = _Writer(conn, rev + 1)
                result = fn(conn, writer)
                if writer.changed:
                    conn.execute("UPDATE meta SET value=? WHERE name='revision'", (writer.rev,))
                    if writer.rev % 1000 == 0:
                        conn.execute("DELETE FROM changes WHERE rev < ?", (writer.rev - _CHANGE_HISTORY,))
                conn.execute("COMMIT")
            except BaseException:
                # SQLite rolls a transaction back itself on some errors (a full disk among them).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if _disk_full(exc):
                self._full = True
                raise OutOfSpace(f"the disk under {self.path} is full: {exc}", backend="embedded") from exc
            raise
        if writer.changed:
            self._full = False
        if writer.changed:
            for watch in list(self._watchers):
                watch.wake(writer.keys)
        return result

    def _read_here(self, fn: Callable[[sqlite3.Connection], T]) -> T | _Busy:
        """Run a small read on the calling thread, on a read connection of its own.

        A point read in WAL mode takes microseconds and never waits for the writer, so it costs far
        less here than a hop to the database thread. The connection never waits for a lock (busy
        timeout 0): on the rare lock (a checkpoint restarting the log, another process recovering
        it) the answer is _BUSY and the caller asks the database thread instead.
        """
        if self._closed:
            raise RuntimeError("embedded KV is closed")
        self._ensure_sweeper()
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            uri = _readonly_uri(self.path) if self.readonly else pathlib.Path(self.path).as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=0, check_same_thread=False)
            self._readers.conn = conn
            self._reader_conns.append(conn)
        try:
            return fn(conn)
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if "locked" in str(exc) or "busy" in str(exc):
                return _BUSY
            raise

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        found = self._read_here(lambda conn: _get(conn, key))
        if found is _BUSY:
            return await self._call(lambda: _get(self._conn(), key))
        return found  # type: ignore[return-value]

    async def range(self, prefix: str, *, start: str | None = None, limit: int = 0) -> list[KeyValue]:
        return await self._call(lambda: _range(self._conn(), prefix, start, limit))

    async def count(self, prefix: str) -> int:
        # A small count (a user's upload sessions, a repository's tags) is had here; a large one
        # on the database thread.
        found = self._read_here(lambda conn: _count(conn, prefix, _COUNT_HERE + 1))
        if isinstance(found, _Busy) or found > _COUNT_HERE:
            return await self._call(lambda: _count(self._conn(), prefix))
        return found

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[_EmbeddedSnapshot]:
        if self._closed:
            raise RuntimeError("embedded KV is closed")
        snapshot = _EmbeddedSnapshot(self._connect_reader)
        await snapshot.open()
        try:
            yield snapshot
        finally:
            await snapshot.close()

    # -- writes ---------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        def run(conn: sqlite3.Connection, w: _Writer) -> int:
            w.put(key, value, lease)
            return w.rev

        return await self._update(run)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        return await self._update(lambda conn, w: w.delete(key, prefix))

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        for branch in (success, failure):
            check_txn_branch(branch)

        def run(conn: sqlite3.Connection, w: _Writer) -> TxnResult:
            ok = all(_holds(conn, c) for c in compares)
            gets: list[KeyValue | None] = []
            counts: list[int] = []
            for op in success if ok else failure:
                if isinstance(op, Put):
                    w.put(op.key, op.value, op.lease)
                elif isinstance(op, Delete):
                    w.delete(op.key, op.prefix)
                elif isinstance(op, Get):
                    gets.append(_get(conn, op.key))
                elif isinstance(op, Count):
                    counts.append(_count(conn, op.prefix))
            return TxnResult(ok, gets, w.rev if w.changed else w.rev - 1, counts)

        if all(isinstance(op, READS) for op in (*success, *failure)):
            if len(compares) + len(success) + len(failure) <= _READ_HERE_KEYS:
                found = self._read_here(lambda conn: self._read_txn(compares, success, failure, conn))
                if not isinstance(found, _Busy):
                    return found
            return await self._call(lambda: self._read_txn(compares, success, failure))
        return await self._update(run)

    def _read_txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op],
        conn: sqlite3.Connection | None = None,
    ) -> TxnResult:
        """A transaction that writes nothing: one read snapshot, no write lock (works read-only too)."""
        conn = conn or self._conn()
        conn.execute("BEGIN")
        try:
            ok = all(_holds(conn, c) for c in compares)
            branch = success if ok else failure
            gets = [_get(conn, op.key) for op in branch if isinstance(op, Get)]
            counts = [_count(conn, op.prefix) for op in branch if isinstance(op, Count)]
            rev = conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
        finally:
            conn.execute("COMMIT")
        return TxnResult(ok, gets, rev, counts)

    # -- leases ---------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        def run(conn: sqlite3.Connection, w: _Writer) -> int:
            # Never an id used before (as etcd): a write naming a lease that ended must be refused,
            # not attached to whichever lease took its number. Files from before the counter start
            # it past every id still in use.
            row = conn.execute("SELECT value FROM meta WHERE name = 'lease'").fetchone()
            if row is None:  # both maxima through an index
                row = conn.execute(
                    "SELECT max(coalesce((SELECT max(id) FROM leases), 0),"
                    " coalesce((SELECT max(lease) FROM kv WHERE lease != 0), 0))"
                ).fetchone()
            lease = 1 + int(row[0])
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('lease', ?)", (lease,))
            conn.execute("INSERT INTO leases (id, ttl, expires) VALUES (?, ?, ?)", (lease, ttl, time.time() + ttl))
            return int(lease)

        return await self._update(run)

    async def refresh_lease(self, lease: int) -> bool:
        def run(conn: sqlite3.Connection, w: _Writer) -> bool:
            _expire(conn, w)
            cur = conn.execute("UPDATE leases SET expires = ? + ttl WHERE id = ?", (time.time(), lease))
            return cur.rowcount == 1

        return await self._update(run)

    async def revoke_lease(self, lease: int) -> None:
        def run(conn: sqlite3.Connection, w: _Writer) -> None:
            conn.execute("DELETE FROM leases WHERE id = ?", (lease,))
            for (key,) in conn.execute("SELECT key FROM kv WHERE lease = ?", (lease,)).fetchall():
                w.delete(key, False)

        await self._update(run)

    async def _sweep_leases_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(_LEASE_SWEEP_SECONDS)
            if self._closed:
                return
            if self._read_here(_nothing_expired) is True:
                continue  # the usual case: no write (whose lock would send writers to the database thread)
            try:
                await asyncio.wrap_future(self._executor.submit(lambda: self._write(_expire)))
            except RuntimeError:
                return  # executor shut down
            except OutOfSpace:
                continue  # expired leases go once there is room again

    # -- watch ----------------------------------------------------------------------------

    async def watch(self, prefix: str, *, start_revision: int = 0) -> _EmbeddedWatch:
        if start_revision <= 0:
            current = await self._call(
                lambda: self._conn().execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
            )
            start_revision = current + 1
        watch = _EmbeddedWatch(self, prefix, start_revision)
        self._watchers.add(watch)
        return watch

    def _changes_since(self, prefix: str, rev: int) -> list[WatchEvent]:
        where, bounds = _under(prefix)
        rows = self._conn().execute(
            f"SELECT rev, key, type, value FROM changes WHERE rev >= ? AND {where} ORDER BY rev, seq", (rev, *bounds)
        )
        return [WatchEvent(kind, key, value, r) for r, key, kind, value in rows]

    # -- space ----------------------------------------------------------------------------

    async def space(self) -> StoreSpace:
        def measure() -> MemberSpace:
            conn = self._conn()
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            revision = conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
            size = sum(_file_size(self.path + suffix) for suffix in ("", "-wal"))
            disk = os.statvfs(os.path.dirname(self.path))
            return MemberSpace(
                self.path,
                size=size,
                in_use=(pages - free) * page_size,
                # What the file could grow to: the filesystem is its quota.
                quota=size + disk.f_bavail * disk.f_frsize,
                revision=int(revision),
                alarms=("NOSPACE",) if self._full else (),
                leader=True,
            )

        return StoreSpace("embedded", (await self._call(measure),))

    async def compact(self, revision: int) -> None:
        """Forget watch history before `revision` (the store also trims it as it goes)."""

        def trim(conn: sqlite3.Connection, w: _Writer) -> None:
            conn.execute("DELETE FROM changes WHERE rev < ?", (revision,))

        await self._call(lambda: self._write(trim))  # may be many rows: not on the caller's thread

    async def defragment(self, member: str | None = None) -> None:
        """Rewrite the file without its free pages (VACUUM): writers in other processes wait meanwhile."""

        def vacuum() -> None:
            if self.readonly:
                raise PermissionError(f"the coordinator {self.path} was opened read-only")
            conn = self._conn()
            try:
                conn.execute("VACUUM")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                if _disk_full(exc):
                    raise OutOfSpace(
                        f"no room to rewrite {self.path} (a defragmentation needs its size again): {exc}",
                        backend="embedded",
                    ) from exc
                raise

        await self._call(vacuum)

    async def disarm(self) -> tuple[str, ...]:
        """Forget that a write found the disk full; the next write that still does says so again."""
        was, self._full = self._full, False
        return ("NOSPACE",) if was else ()

    # -- lifecycle ------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(lambda: self._conn().execute("SELECT 1").fetchone())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch in list(self._watchers):
            await watch.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.wrap_future(self._executor.submit(self._close_conn))
        self._executor.shutdown(wait=True)

    def _close_conn(self) -> None:
        # Readers first: the last connection to close checkpoints the WAL and removes it with its
        # -shm file, which only the writer's connection may do. Left behind, a later read-only open
        # (a dry run) would have to share them, and reading through the -shm file writes it.
        for other in (*self._reader_conns, *self._writer_conns):
            other.close()
        self._reader_conns.clear()
        self._writer_conns.clear()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _disk_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _readonly_uri(path: str) -> str:
    """A URI that opens `path` without writing anything beside it.

    With no WAL file nobody has the database open for writing, so it is opened immutable (SQLite
    then makes no -wal or -shm file); otherwise read-only, sharing the writers' WAL.
    """
    uri = pathlib.Path(os.path.abspath(path)).as_uri() + "?mode=ro"
    if not os.path.exists(path + "-wal"):
        uri += "&immutable=1"
    return uri


class _EmbeddedSnapshot:
    """One SQLite read transaction on a connection and thread of its own.

    In WAL mode a reader sees the database as of its transaction's first read and never blocks
    the writer, so the store's one writer thread goes on while pages are read here.
    """

    backend = "embedded"

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wharf-kv-snapshot")
        self._connection: sqlite3.Connection | None = None
        self.revision = 0

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            if self._connection is None:
                raise RuntimeError("the snapshot is closed")
            return fn(self._connection)

        return await asyncio.wrap_future(self._executor.submit(run))

    async def open(self) -> None:
        def begin() -> int:
            self._connection = self._connect()
            self._connection.execute("BEGIN")
            # The first read fixes what the transaction sees.
            return int(self._connection.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0])

        try:
            self.revision = await asyncio.wrap_future(self._executor.submit(begin))
        except BaseException:
            await self.close()
            raise

    async def range(self, prefix: str, *, start: str | None = None, limit: int = 0) -> list[KeyValue]:
        return await self._call(lambda conn: _range(conn, prefix, start, limit))

    async def count(self, prefix: str) -> int:
        return await self._call(lambda conn: _count(conn, prefix))

    async def close(self) -> None:
        def end() -> None:
            conn, self._connection = self._connection, None
            if conn is not None:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                conn.close()

        await asyncio.wrap_future(self._executor.submit(end))
        self._executor.shutdown(wait=True)


class _Writer:
    """Applies puts and deletes inside one SQLite transaction at one new revision."""

    def __init__(self, conn: sqlite3.Connection, rev: int) -> None:
        self.conn = conn
        self.rev = rev
        self.changed = False
        self.keys: list[str] = []  # changed, in order
        self._seq = 0

    def _log(self, key: str, kind: str, value: bytes) -> None:
        self.conn.execute("INSERT INTO changes VALUES (?, ?, ?, ?, ?)", (self.rev, self._seq, key, kind, value))
        self._seq += 1
        self.changed = True
        self.keys.append(key)

    def put(self, key: str, value: bytes, lease: int) -> None:
        if lease and self.conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
            raise LeaseGone(f"lease {lease} not found")
        self.conn.execute(
            "INSERT INTO kv (key, value, version, create_rev, mod_rev, lease) VALUES (?, ?, 1, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value, version=version+1, "
            "mod_rev=excluded.mod_rev, lease=excluded.lease",
            (key, bytes(value), self.rev, self.rev, lease),
        )
        self._log(key, "put", bytes(value))

    def delete(self, key: str, prefix: bool) -> int:
        if not prefix:
            if not self.conn.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount:
                return 0
            self._log(key, "delete", b"")
            return 1
        where, bounds = _under(key)
        keys = [k for (k,) in self.conn.execute(f"SELECT key FROM kv WHERE {where}", bounds)]
        for k in keys:
            self.conn.execute("DELETE FROM kv WHERE key = ?", (k,))
            self._log(k, "delete", b"")
        return len(keys)


def _range(conn: sqlite3.Connection, prefix: str, start: str | None, limit: int) -> list[KeyValue]:
    low = prefix if start is None or start < prefix else start
    where, bounds = _under(prefix, low)
    sql = f"SELECT key, value, version, create_rev, mod_rev, lease FROM kv WHERE {where} ORDER BY key"
    args: tuple[object, ...] = bounds
    if limit > 0:
        sql += " LIMIT ?"
        args += (limit,)
    return [KeyValue(*row) for row in conn.execute(sql, args)]


def _count(conn: sqlite3.Connection, prefix: str, limit: int = 0) -> int:
    """Keys under `prefix`; with `limit`, counted up to that many at most."""
    where, bounds = _under(prefix)
    if limit:
        sql = f"SELECT count(*) FROM (SELECT 1 FROM kv WHERE {where} LIMIT ?)"
        return int(conn.execute(sql, (*bounds, limit)).fetchone()[0])
    return int(conn.execute(f"SELECT count(*) FROM kv WHERE {where}", bounds).fetchone()[0])


def _get(conn: sqlite3.Connection, key: str) -> KeyValue | None:
    row = conn.execute(
        "SELECT key, value, version, create_rev, mod_rev, lease FROM kv WHERE key = ?", (key,)
    ).fetchone()
    return KeyValue(*row) if row else None


def _holds(conn: sqlite3.Connection, c: Compare) -> bool:
    kv = _get(conn, c.key)
    if c.target == "value":
        if kv is None:
            return False
        actual: int | bytes = kv.value
    else:
        attr = {"version": "version", "create_revision": "create_revision", "mod_revision": "mod_revision"}[c.target]
        actual = getattr(kv, attr) if kv is not None else 0
    operand = c.operand
    if c.op == "==":
        return actual == operand
    if c.op == "!=":
        return actual != operand
    if c.op == "<":
        return actual < operand  # type: ignore[operator]
    return actual > operand  # type: ignore[operator]


def _nothing_expired(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM leases WHERE expires < ? LIMIT 1", (time.time(),)).fetchone() is None


def _expire(conn: sqlite3.Connection, w: _Writer) -> None:
    now = time.time()
    expired = [lid for (lid,) in conn.execute("SELECT id FROM leases WHERE expires < ?", (now,))]
    for lid in expired:
        for (key,) in conn.execute("SELECT key FROM kv WHERE lease = ?", (lid,)).fetchall():
            w.delete(key, False)
        conn.execute("DELETE FROM leases WHERE id = ?", (lid,))


class _EmbeddedWatch:
    def __init__(self, store: EmbeddedKV, prefix: str, start_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._next = start_revision
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._closed = False

    def wake(self, changed: Sequence[str]) -> None:
        """A writer of this process changed `changed`: look again if one is under the prefix.

        (Writes of other processes are found by the poll.)
        """
        if any(key.startswith(self._prefix) for key in changed):
            self._loop.call_soon_threadsafe(self._event.set)

    async def close(self) -> None:
        self._closed = True
        self._store._watchers.discard(self)
        self._event.set()

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[WatchEvent]:
        while not self._closed:
            self._event.clear()
            start = self._next
            try:
                events = await self._store._call(functools.partial(self._store._changes_since, self._prefix, start))
            except RuntimeError:
                return
            for event in events:
                self._next = event.mod_revision + 1
                yield event
                if self._closed:
                    return
            if not events:
                try:
                    await asyncio.wait_for(self._event.wait(), _WATCH_POLL_SECONDS)
                except TimeoutError:
                    pass
