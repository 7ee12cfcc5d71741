"""A garbage collection cycle's mark, kept on disk: what the cycle read, queried in SQL.

A cycle reads every manifest, tag, link, touch and release record of the registry. Held in
Python that costs kilobytes per manifest (gigabytes at millions); here each page read from the
coordinator goes into a scratch SQLite file at once and the questions the cycle asks (what tags
reach, what nothing uses, which links are stale) are joins over it, so the cycle's memory is a page
of records plus SQLite's bounded cache, whatever the registry's size. The file lives in a
temporary directory and is removed when the cycle ends.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from . import keys
from .kv import KeyValue
from .metadata import LinkRecord, ManifestRecord, TagRecord, TouchRecord, decode

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE manifest (
    key TEXT PRIMARY KEY, repo TEXT NOT NULL, digest TEXT NOT NULL, revision INTEGER NOT NULL,
    subject_key TEXT, pushed REAL NOT NULL, size INTEGER NOT NULL,
    live INTEGER NOT NULL DEFAULT 0, by_tag INTEGER NOT NULL DEFAULT 0,
    doomed INTEGER NOT NULL DEFAULT 0, pending INTEGER NOT NULL DEFAULT 0, gone INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX manifest_subject ON manifest(subject_key) WHERE subject_key IS NOT NULL;
CREATE TABLE child (parent TEXT NOT NULL, child TEXT NOT NULL);
CREATE INDEX child_parent ON child(parent);
CREATE TABLE mblob (manifest TEXT NOT NULL, digest TEXT NOT NULL);
CREATE INDEX mblob_manifest ON mblob(manifest);
CREATE TABLE tag_root (manifest TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE released_blob (digest TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE released_manifest (key TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE repo (name TEXT PRIMARY KEY, revision INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE link (
    key TEXT PRIMARY KEY, repo TEXT NOT NULL, digest TEXT NOT NULL, revision INTEGER NOT NULL,
    size INTEGER NOT NULL, linked REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX link_digest ON link(digest);
CREATE TABLE touch (digest TEXT PRIMARY KEY, revision INTEGER NOT NULL, at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE used (digest TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE used_in (repo TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (repo, digest)) WITHOUT ROWID;
CREATE TABLE candidate (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, key TEXT NOT NULL, blob_revision INTEGER NOT NULL,
    touch_revision INTEGER NOT NULL, pending_revision INTEGER NOT NULL DEFAULT 0,
    saved INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE kept_imported (digest TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE recorded (digest TEXT PRIMARY KEY, key TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX recorded_key ON recorded(key);
"""

# SQLite's page cache for the mark, in KiB: what the cycle's memory is bounded by.
CACHE_KIB = 64 * 1024


class Mark:
    """One cycle's scratch database; every call runs on its own thread, off the event loop."""

    def __init__(self, directory: str | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="wharf-gc-", dir=directory)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wharf-gc-mark")
        self._db: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(os.path.join(self._dir, "mark.db"), isolation_level=None, check_same_thread=False)
            for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{CACHE_KIB}", "temp_store=FILE"):
                db.execute(f"PRAGMA {pragma}")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(self._open()))

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    async def __aenter__(self) -> Mark:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- loading what the coordinator holds, a page at a time ---------------------------------

    async def add_manifests(self, page: Sequence[KeyValue]) -> None:
        rows, children, blobs = [], [], []
        for kv in page:
            repo, digest = keys.split_repo_key(kv.key, keys.MANIFESTS)
            record = decode(ManifestRecord, kv.value)
            subject = keys.manifest(repo, record.subject) if record.subject else None
            rows.append((kv.key, repo, digest, kv.mod_revision, subject, record.pushed, record.size))
            children += [(kv.key, keys.manifest(repo, child)) for child in record.manifests]
            blobs += [(kv.key, blob) for blob in dict.fromkeys(record.blobs)]

        def write(db: sqlite3.Connection) -> None:
            with _txn(db):
                db.executemany(
                    "INSERT OR REPLACE INTO manifest (key, repo, digest, revision, subject_key, pushed, size) VALUES (?,?,?,?,?,?,?)",
                    rows,
                )
                db.executemany("INSERT INTO child VALUES (?,?)", children)
                db.executemany("INSERT INTO mblob VALUES (?,?)", blobs)

        await self.run(write)

    async def add_tags(self, page: Sequence[KeyValue]) -> None:
        roots = [
            (keys.manifest(keys.split_repo_key(kv.key, keys.TAGS)[0], decode(TagRecord, kv.value).digest),)
            for kv in page
        ]
        await self.run(lambda db: _executemany(db, "INSERT OR IGNORE INTO tag_root VALUES (?)", roots))

    async def add_releases(self, blobs: Iterable[tuple[str, float]], manifests: Iterable[tuple[str, float]]) -> None:
        def write(db: sqlite3.Connection) -> None:
            with _txn(db):
                db.executemany(
                    "INSERT INTO released_blob VALUES (?,?) ON CONFLICT(digest) DO UPDATE SET at = max(at, excluded.at)",
                    list(blobs),
                )
                db.executemany(
                    "INSERT INTO released_manifest VALUES (?,?) ON CONFLICT(key) DO UPDATE SET at = max(at, excluded.at)",
                    list(manifests),
                )

        await self.run(write)

    async def add_repositories(self, page: Sequence[KeyValue]) -> None:
        rows = [(kv.key[len(keys.REPOSITORIES) :], kv.mod_revision) for kv in page]
        await self.run(lambda db: _executemany(db, "INSERT OR REPLACE INTO repo VALUES (?,?)", rows))

    async def add_links(self, page: Sequence[KeyValue]) -> None:
        rows = []
        for kv in page:
            repo, digest = keys.split_repo_key(kv.key, keys.LINKS)
            link = decode(LinkRecord, kv.value)
            rows.append((kv.key, repo, digest, kv.mod_revision, link.size, link.linked))
        await self.run(lambda db: _executemany(db, "INSERT OR REPLACE INTO link VALUES (?,?,?,?,?,?)", rows))

    async def add_touches(self, page: Sequence[KeyValue]) -> None:
        rows = [(kv.key[len(keys.TOUCHES) :], kv.mod_revision, decode(TouchRecord, kv.value).at) for kv in page]
        await self.run(lambda db: _executemany(db, "INSERT OR REPLACE INTO touch VALUES (?,?,?)", rows))

    # -- manifests ----------------------------------------------------------------------------

    async def mark_live(self, cutoff: float) -> None:
        """Live: reachable from a tag, or from a manifest pushed within the grace (and not released
        since), through index children and the referrers of what is reached. `by_tag`: from tags alone."""

        def mark(db: sqlite3.Connection) -> None:
            walk = """
                WITH RECURSIVE reached(k) AS (
                    {roots}
                    UNION
                    SELECT c.child FROM child c JOIN reached r ON c.parent = r.k
                    UNION
                    SELECT m.key FROM manifest m JOIN reached r ON m.subject_key = r.k
                )
                UPDATE manifest SET {flag} = 1 WHERE key IN (SELECT k FROM reached)
            """
            tags = "SELECT t.manifest FROM tag_root t"
            young = """
                SELECT m.key FROM manifest m LEFT JOIN released_manifest r ON r.key = m.key
                WHERE m.pushed >= :cutoff AND m.pushed > coalesce(r.at, 0)
            """
            with _txn(db):
                db.execute(walk.format(roots=tags, flag="by_tag"))
                db.execute(walk.format(roots=f"{tags} UNION {young}", flag="live"), {"cutoff": cutoff})

        await self.run(mark)

    async def mark_doomed(self, delete_untagged: bool) -> None:
        """Doomed: with `delete_untagged`, everything not live; else only referrers (signatures,
        SBOMs) whose subject is gone, or doomed itself."""

        def mark(db: sqlite3.Connection) -> None:
            with _txn(db):
                if delete_untagged:
                    db.execute("UPDATE manifest SET doomed = 1 WHERE live = 0")
                    return
                while True:
                    changed = db.execute(
                        """
                        UPDATE manifest SET doomed = 1
                        WHERE live = 0 AND doomed = 0 AND subject_key IS NOT NULL AND (
                            NOT EXISTS (SELECT 1 FROM manifest s WHERE s.key = manifest.subject_key)
                            OR EXISTS (SELECT 1 FROM manifest s WHERE s.key = manifest.subject_key AND s.doomed = 1)
                        )
                        """
                    ).rowcount
                    if not changed:
                        return

        await self.run(mark)

    async def held_young_manifests(self) -> list[tuple[int, float]]:
        """(size, pushed) of manifests kept only for being young (with delete_untagged)."""
        return await self.run(
            lambda db: db.execute("SELECT size, pushed FROM manifest WHERE live = 1 AND by_tag = 0").fetchall()
        )

    async def doomed_after(
        self, after: str, limit: int, *, pending: bool = False
    ) -> list[tuple[str, str, str, int, str | None, int]]:
        """Up to `limit` doomed manifests after key `after` (only those marked pending, with `pending`):
        (key, repo, digest, revision, subject digest, pending mark revision)."""
        condition = "doomed = 1 AND pending > 0" if pending else "doomed = 1"

        def read(db: sqlite3.Connection) -> list[tuple[str, str, str, int, str | None, int]]:
            rows = db.execute(
                f"SELECT key, repo, digest, revision, subject_key, pending FROM manifest "
                f"WHERE {condition} AND key > ? ORDER BY key LIMIT ?",
                (after, limit),
            ).fetchall()
            return [(k, r, d, rev, s.rsplit("@", 1)[1] if s else None, p) for k, r, d, rev, s, p in rows]

        return await self.run(read)

    async def count_doomed(self) -> int:
        return await self.run(lambda db: db.execute("SELECT count(*) FROM manifest WHERE doomed = 1").fetchone()[0])

    async def set_manifests(self, column: str, keys_: Sequence[str], value: int = 1) -> None:
        assert column in ("gone", "doomed", "pending")
        await self.run(
            lambda db: _executemany(db, f"UPDATE manifest SET {column} = ? WHERE key = ?", [(value, k) for k in keys_])
        )

    async def set_pending(self, rows: Sequence[tuple[int, str]]) -> None:
        """(pending mark revision, manifest key) pairs."""
        await self.run(lambda db: _executemany(db, "UPDATE manifest SET pending = ? WHERE key = ?", rows))

    # -- blobs ----------------------------------------------------------------------------------

    async def mark_used(self, *, dry_run: bool, now: float) -> int:
        """What the manifests that stay use; doomed ones release what only they used, now.

        A dry run still holds the manifests a real run would delete: they count as gone here.
        Returns how many manifests were seen.
        """
        stays = "doomed = 0" if dry_run else "gone = 0"

        def mark(db: sqlite3.Connection) -> int:
            with _txn(db):
                db.execute(f"INSERT OR IGNORE INTO used SELECT digest FROM manifest WHERE {stays}")
                db.execute(
                    f"INSERT OR IGNORE INTO used SELECT b.digest FROM mblob b JOIN manifest m ON m.key = b.manifest WHERE m.{stays}"
                )
                db.execute(
                    f"INSERT OR IGNORE INTO used_in SELECT m.repo, b.digest FROM mblob b JOIN manifest m ON m.key = b.manifest WHERE m.{stays}"
                )
                gone = "doomed = 1" if dry_run else "gone = 1"
                for statement in (
                    f"SELECT digest FROM manifest WHERE {gone}",
                    f"SELECT b.digest FROM mblob b JOIN manifest m ON m.key = b.manifest WHERE m.{gone}",
                ):
                    db.execute(
                        f"INSERT INTO released_blob SELECT digest, :now FROM ({statement}) WHERE true "
                        "ON CONFLICT(digest) DO UPDATE SET at = excluded.at",
                        {"now": now},
                    )
                return int(db.execute("SELECT count(*) FROM manifest").fetchone()[0])

        return await self.run(mark)

    async def blob_facts(self, digests: Sequence[str]) -> dict[str, tuple[bool, float, float, int]]:
        """Per digest: (used by a manifest that stays, last link or touch time, released at, touch revision)."""

        def read(db: sqlite3.Connection) -> dict[str, tuple[bool, float, float, int]]:
            facts: dict[str, tuple[bool, float, float, int]] = {}
            for start in range(0, len(digests), 500):
                chunk = list(digests[start : start + 500])
                marks = ",".join("?" * len(chunk))
                used = {d for (d,) in db.execute(f"SELECT digest FROM used WHERE digest IN ({marks})", chunk)}
                linked = dict(
                    db.execute(
                        f"SELECT digest, max(linked) FROM link WHERE digest IN ({marks}) GROUP BY digest", chunk
                    ).fetchall()
                )
                touched = {
                    d: (at, rev)
                    for d, rev, at in db.execute(
                        f"SELECT digest, revision, at FROM touch WHERE digest IN ({marks})", chunk
                    )
                }
                released = dict(
                    db.execute(f"SELECT digest, at FROM released_blob WHERE digest IN ({marks})", chunk).fetchall()
                )
                for digest in chunk:
                    touch_at, touch_revision = touched.get(digest, (0.0, 0))
                    facts[digest] = (
                        digest in used,
                        max(float(linked.get(digest) or 0.0), touch_at),
                        float(released.get(digest, 0.0)),
                        touch_revision,
                    )
            return facts

        return await self.run(read)

    async def add_candidates(self, rows: Sequence[tuple[str, int, str, int, int]]) -> None:
        await self.run(
            lambda db: _executemany(
                db,
                "INSERT OR REPLACE INTO candidate (digest, size, key, blob_revision, touch_revision) VALUES (?,?,?,?,?)",
                rows,
            )
        )

    async def add_recorded(self, rows: Sequence[tuple[str, str]]) -> None:
        """(digest, storage key) of every blob record: what the storage sweep may not call unaccounted."""
        await self.run(lambda db: _executemany(db, "INSERT OR REPLACE INTO recorded VALUES (?,?)", rows))

    async def recorded_of(self, digests: Sequence[str], keys_: Sequence[str]) -> tuple[set[str], set[str]]:
        """Which of `digests` have a blob record, and which of `keys_` a blob record names."""

        def read(db: sqlite3.Connection) -> tuple[set[str], set[str]]:
            found_digests: set[str] = set()
            found_keys: set[str] = set()
            for values, column, into in ((list(digests), "digest", found_digests), (list(keys_), "key", found_keys)):
                for start in range(0, len(values), 500):
                    chunk = values[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    into.update(
                        v for (v,) in db.execute(f"SELECT {column} FROM recorded WHERE {column} IN ({marks})", chunk)
                    )
            return found_digests, found_keys

        return await self.run(read)

    async def keep_imported(self, digests: Sequence[str]) -> None:
        await self.run(
            lambda db: _executemany(db, "INSERT OR IGNORE INTO kept_imported VALUES (?)", [(d,) for d in digests])
        )

    async def candidates_after(self, after: str, limit: int, where: str) -> list[tuple[str, int, str, int, int, int]]:
        """(digest, size, key, blob revision, touch revision, pending revision) of candidates."""
        return await self.run(
            lambda db: db.execute(
                f"SELECT digest, size, key, blob_revision, touch_revision, pending_revision FROM candidate "
                f"WHERE digest > ? AND {where} ORDER BY digest LIMIT ?",
                (after, limit),
            ).fetchall()
        )

    async def update_candidates(self, column: str, rows: Sequence[tuple[int, str]]) -> None:
        assert column in ("pending_revision", "saved", "deleted")
        await self.run(lambda db: _executemany(db, f"UPDATE candidate SET {column} = ? WHERE digest = ?", rows))

    async def links_of(self, digests: Sequence[str]) -> dict[str, dict[str, int]]:
        def read(db: sqlite3.Connection) -> dict[str, dict[str, int]]:
            found: dict[str, dict[str, int]] = {}
            for start in range(0, len(digests), 500):
                chunk = list(digests[start : start + 500])
                marks = ",".join("?" * len(chunk))
                for key, digest, revision in db.execute(
                    f"SELECT key, digest, revision FROM link WHERE digest IN ({marks})", chunk
                ):
                    found.setdefault(digest, {})[key] = revision
            return found

        return await self.run(read)

    async def link_sizes(self, keys_: Sequence[str]) -> dict[str, int]:
        def read(db: sqlite3.Connection) -> dict[str, int]:
            found: dict[str, int] = {}
            for start in range(0, len(keys_), 500):
                chunk = list(keys_[start : start + 500])
                marks = ",".join("?" * len(chunk))
                found.update(db.execute(f"SELECT key, size FROM link WHERE key IN ({marks})", chunk).fetchall())
            return found

        return await self.run(read)

    async def scope_usage(self, repository: str | None, namespace: str | None) -> int:
        """Bytes the links of one repository, or of every repository under a namespace, take."""
        args: tuple[Any, ...]
        if repository is not None:
            query, args = "SELECT coalesce(sum(size), 0) FROM link WHERE repo = ?", (repository,)
        else:
            assert namespace is not None
            query, args = (
                "SELECT coalesce(sum(size), 0) FROM link WHERE substr(repo, 1, ?) = ?",
                (len(namespace), namespace),
            )
        return await self.run(lambda db: int(db.execute(query, args).fetchone()[0]))

    async def stale_links_after(
        self, after: str, limit: int, cutoff: float
    ) -> list[tuple[str, str, str, int, int, int]]:
        """Links nothing in their repository uses (the blob lives on elsewhere), not young, whose
        blob this cycle did not collect: (key, repo, digest, revision, touch revision, repo revision)."""
        query = """
            SELECT l.key, l.repo, l.digest, l.revision, coalesce(t.revision, 0), r.revision
            FROM link l
            JOIN repo r ON r.name = l.repo
            LEFT JOIN touch t ON t.digest = l.digest
            LEFT JOIN released_blob rb ON rb.digest = l.digest
            WHERE l.key > :after
              AND NOT (l.linked >= :cutoff AND l.linked > coalesce(rb.at, 0))
              AND NOT (coalesce(t.at, 0) >= :cutoff AND coalesce(t.at, 0) > coalesce(rb.at, 0))
              AND NOT EXISTS (SELECT 1 FROM used_in u WHERE u.repo = l.repo AND u.digest = l.digest)
              AND NOT EXISTS (SELECT 1 FROM candidate c WHERE c.digest = l.digest AND c.deleted = 1)
              AND NOT EXISTS (SELECT 1 FROM kept_imported k WHERE k.digest = l.digest)
            ORDER BY l.key LIMIT :limit
        """
        return await self.run(
            lambda db: db.execute(query, {"after": after, "limit": limit, "cutoff": cutoff}).fetchall()
        )

    async def repository_revision(self, repo: str) -> int | None:
        found = await self.run(lambda db: db.execute("SELECT revision FROM repo WHERE name = ?", (repo,)).fetchone())
        return int(found[0]) if found else None


class _txn:
    """BEGIN ... COMMIT around a batch of statements (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN")
        return self.db

    def __exit__(self, kind: Any, *exc: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _executemany(db: sqlite3.Connection, sql: str, rows: Sequence[Any]) -> None:
    if rows:
        with _txn(db):
            db.executemany(sql, rows)
