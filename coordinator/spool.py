"""An append-only list of records that spills to disk: a job's report costs disk, not memory.

A retention run over a large backlog names hundreds of thousands of tags. Its plan and its result
are kept in Spools: the first `keep` records in memory, the rest as JSON lines in an unlinked
temporary file (gone when the process ends or the Spool is closed), read back in order on each
iteration. Records are flat frozen dataclasses (str, int, float, None fields).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any, Generic, TypeVar

T = TypeVar("T")

KEEP = 4096  # records held in memory before the rest go to the file
_READ = 1 << 16


class Spool(Generic[T]):
    def __init__(self, kind: type[T], *, keep: int | None = None) -> None:
        self.kind = kind
        self.keep = KEEP if keep is None else keep
        self._held: list[T] = []
        self._file: IO[bytes] | None = None
        self._spilled = 0

    def append(self, item: T) -> None:
        if len(self._held) < self.keep:
            self._held.append(item)
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="wharf-spool-")
        self._file.write(json.dumps(dataclasses.astuple(item)).encode() + b"\n")  # type: ignore[call-overload]
        self._spilled += 1

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.append(item)

    def __len__(self) -> int:
        return len(self._held) + self._spilled

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[T]:
        """The records in the order appended; appending while iterating is not supported."""
        yield from self._held
        if self._file is None:
            return
        self._file.flush()
        fd, offset, rest = self._file.fileno(), 0, b""
        while chunk := os.pread(fd, _READ, offset):
            offset += len(chunk)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield self._load(line)
        if rest:
            yield self._load(rest)

    def _load(self, line: bytes) -> T:
        fields: list[Any] = json.loads(line)
        return self.kind(*fields)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._held, self._spilled = [], 0
