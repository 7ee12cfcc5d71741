"""The audit log's hash chain: how each line names the one before it, and checking a set of files.

Every line is one JSON object whose first keys are `seq` (1, 2, 3 ... across rotations), `chain`
(the log's id) and `prev`, the SHA-256 (hex) of the previous line's bytes without its newline
(64 zeros before line 1). The first line of a file thus names the last line of the file rotated
before it, and any edited, removed, reordered or inserted line breaks a link.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

GENESIS = "0" * 64
# Audit lines are a few hundred bytes; the tail of a file is read this far back for its last line.
TAIL_BYTES = 64 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ROTATED = re.compile(r"(.*)\.(\d+)")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class Head(NamedTuple):
    """A line as the chain sees it: its number, its own hash and the hash it names before it."""

    seq: int
    hash: str
    chain: str
    prev: str = GENESIS


def head_of(line: bytes) -> Head | None:
    """The chain fields of one line; None when it is not an audit line."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    seq, chain, prev = entry.get("seq"), entry.get("chain"), entry.get("prev")
    if type(seq) is not int or seq < 1 or not isinstance(chain, str) or not isinstance(prev, str):
        return None
    if not _HEX64.fullmatch(prev):
        return None
    return Head(seq, line_hash(line), chain, prev)


def last_line(fd: int, size: int) -> bytes | None:
    """The last line of an open regular file of `size` bytes (without its newline); None if empty."""
    if size <= 0:
        return None
    start = max(0, size - TAIL_BYTES)
    data = os.pread(fd, size - start, start)
    lines = data.rstrip(b"\n").rsplit(b"\n", 1)
    return lines[-1] if lines[-1] or len(lines) > 1 else None


def tail_head(path: str) -> tuple[Head | None, bytes | None]:
    """(chain fields, bytes) of the last line of the file at `path`; (None, None) if empty or absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    try:
        line = last_line(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return (head_of(line), line) if line is not None else (None, None)


def rotation_index(path: str) -> tuple[str, int]:
    """('audit.log', 2) for audit.log.2; ('audit.log', 0) for the live file."""
    match = _ROTATED.fullmatch(path)
    return (match.group(1), int(match.group(2))) if match else (path, 0)


def log_files(paths: list[str]) -> list[str]:
    """The files to check, oldest first: each live file given brings its rotated files (PATH.N)."""
    found: dict[str, tuple[str, int]] = {}
    for given in paths:
        base, index = rotation_index(given)
        found[given] = (base, index)
        if index == 0:
            directory = Path(given).parent
            prefix = Path(given).name + "."
            for sibling in directory.glob(glob_escape(prefix) + "*"):
                rotated = os.path.join(os.path.dirname(given), sibling.name)
                base_of, number = rotation_index(rotated)
                if number and base_of == given:
                    found[rotated] = (base_of, number)
    bases = list(dict.fromkeys(base for base, _ in found.values()))
    return sorted(found, key=lambda p: (bases.index(found[p][0]), -found[p][1]))


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def find_line(files: list[str], seq: int) -> bytes | None:
    """Line `seq` of a log (files oldest first), read from the newest file that can hold it.

    None when it should be there and is not; LookupError when it is older than every file.
    """
    for path in reversed(files):
        with open(path, "rb") as handle:
            first = head_of(handle.readline())
            if first is None or first.seq > seq:
                continue
            handle.seek(0)
            for raw in handle:
                head = head_of(raw)
                if head is not None and head.seq == seq:
                    return raw.rstrip(b"\n")
        return None
    raise LookupError(f"line {seq} is older than the files of the log")


# -- checking ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    path: str
    number: int  # 1-based line number within its file
    raw: bytes
    head: Head | None
    resumed: str | None = None  # why the writer continued from a line it could not find on disk

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"


@dataclass(frozen=True)
class Anchor:
    """What the coordinator recorded as the log's newest line."""

    seq: int
    hash: str
    time: str = ""


@dataclass
class Report:
    files: list[str]
    lines: int = 0
    chain: str | None = None
    first: Line | None = None
    last: Line | None = None
    problem: str | None = None  # the first thing found wrong, naming its file and line
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


def _lines(files: list[str]) -> Iterator[Line]:
    for path in files:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                raw = raw.rstrip(b"\n")
                head = head_of(raw)
                resumed = None
                if head is not None and b'"resumed"' in raw:
                    value = json.loads(raw).get("resumed")
                    resumed = str(value) if value else None
                yield Line(path, number, raw, head, resumed)


def first_chain(files: list[str]) -> str | None:
    """The chain id of the first audit line found (the one whose anchor to look up)."""
    for line in _lines(files):
        if line.head is not None:
            return line.head.chain
    return None


def _missing(first: int, last: int) -> str:
    return f"line {first} is missing" if first == last else f"lines {first}-{last} are missing"


def _link_problem(a: Line, b: Line, c: Line | None) -> str | None:
    """What is wrong between consecutive lines a and b (c follows b, if any)."""
    assert a.head is not None and b.head is not None
    if b.head.chain != a.head.chain:
        return f"{b.where}: line belongs to another audit log (chain {b.head.chain}, not {a.head.chain})"
    if b.head.seq == a.head.seq + 1 and b.head.prev == a.head.hash:
        return None
    if b.resumed:
        return f"{b.where}: line {b.head.seq} does not continue line {a.head.seq}: {b.resumed}"
    if b.head.seq == a.head.seq + 1:
        if c is not None and c.head is not None and c.head.prev != b.head.hash:
            return f"{b.where}: line {b.head.seq} was changed after it was written"
        return f"{a.where}: line {a.head.seq} was changed after it was written (line {b.head.seq} names another hash)"
    if b.head.seq > a.head.seq + 1:
        if c is not None and c.head is not None and c.head.seq == a.head.seq + 1:
            return f"{b.where}: lines are out of order: line {b.head.seq} comes before line {c.head.seq}"
        missing = _missing(a.head.seq + 1, b.head.seq - 1)
        if a.path != b.path:
            return (
                f"{b.where}: {missing} between {a.path} and {b.path}: a rotated file (or lines at its end) was removed"
            )
        return f"{b.where}: {missing} after {a.where}: removed"
    return f"{b.where}: lines are out of order: line {b.head.seq} comes after line {a.head.seq}"


def verify(files: list[str], anchor: Anchor | None = None, *, backups: int | None = None) -> Report:
    """Check the chain through `files` (oldest first) and, with `anchor`, that its newest line is there.

    `backups` (audit.maxbackups) tells whether a chain that does not start at line 1 lost files.
    """
    report = Report(files)
    window: list[Line] = []
    anchored: Line | None = None

    def check(a: Line | None, b: Line, c: Line | None) -> str | None:
        if b.head is None:
            return f"{b.where}: not an audit line (edited or damaged)"
        if a is None:
            if b.head.seq == 1 and b.head.prev != GENESIS:
                return f"{b.where}: line 1 was changed after it was written"
            if b.head.seq > 1:
                if backups and rotation_index(b.path)[1] < backups:
                    # Rotation drops only PATH.<maxbackups>: a younger oldest file means one was removed.
                    return (
                        f"{b.where}: lines 1-{b.head.seq - 1} are missing: the oldest rotated file was removed "
                        f"(audit.maxbackups keeps {backups}; give archived files too)"
                    )
                report.notes.append(f"lines before {b.head.seq} are not in the files given (rotated away)")
            return None
        return _link_problem(a, b, c)

    previous: Line | None = None
    for line in _lines(files):
        window.append(line)
        if len(window) < 2:
            continue
        b, c = window[0], window[1]
        report.problem = check(previous, b, c)
        if report.problem:
            return report
        previous = b
        window.pop(0)
        report.lines += 1
        if anchor is not None and b.head is not None and b.head.seq == anchor.seq:
            anchored = b
        report.first = report.first or b
    if window:
        b = window[0]
        report.problem = check(previous, b, None)
        if report.problem:
            return report
        report.lines += 1
        report.first = report.first or b
        if anchor is not None and b.head is not None and b.head.seq == anchor.seq:
            anchored = b
        previous = b
    report.last = previous
    if previous is None or previous.head is None:
        if anchor is not None:
            report.problem = f"the log is empty but the coordinator recorded line {anchor.seq}: every line was removed"
        return report
    report.chain = previous.head.chain
    if anchor is None:
        return report
    if anchored is not None:
        assert anchored.head is not None
        if anchored.head.hash != anchor.hash:
            report.problem = (
                f"{anchored.where}: line {anchor.seq} is not the line the coordinator recorded at {anchor.time}"
            )
    elif anchor.seq > previous.head.seq:
        report.problem = (
            f"{previous.where}: the log ends at line {previous.head.seq}, but the coordinator recorded line "
            f"{anchor.seq} at {anchor.time}: {_missing(previous.head.seq + 1, anchor.seq)}, cut from the end"
        )
    else:
        report.notes.append(f"the coordinator's record (line {anchor.seq}) is older than the files given")
    return report
