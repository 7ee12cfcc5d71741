"""The spool behind large job reports: records past the first few go to disk and come back in order."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass

from coordinator.spool import Spool
from node.cli.output import print_json, table, table_lines


@dataclass(frozen=True)
class Row:
    name: str
    count: int
    at: float
    note: str | None = None


def test_records_past_those_held_in_memory_come_back_from_disk_in_order():
    spool = Spool(Row, keep=2)
    assert not spool and len(spool) == 0 and list(spool) == []
    rows = [Row(f"r{n}", n, n / 3, None if n % 2 else 'x\ny "quoted" é') for n in range(10)]
    spool.extend(rows)
    assert len(spool) == 10 and spool
    assert list(spool) == rows
    assert list(spool) == rows, "a spool can be read again"
    spool.append(Row("last", -1, 0.0))
    assert list(spool)[-1] == Row("last", -1, 0.0) and len(spool) == 11
    spool.close()
    assert list(spool) == [] and len(spool) == 0


def test_a_spool_that_holds_nothing_in_memory_still_counts_and_reads_back():
    spool = Spool(Row, keep=0)
    spool.append(Row("only", 1, 1.0))
    assert spool and len(spool) == 1 and list(spool) == [Row("only", 1, 1.0)]


def test_a_spool_within_its_limit_writes_no_file():
    spool = Spool(Row, keep=3)
    spool.extend([Row("a", 1, 1.0), Row("b", 2, 2.0), Row("c", 3, 3.0)])
    assert spool._file is None
    spool.append(Row("d", 4, 4.0))
    assert spool._file is not None


def test_a_table_read_twice_from_its_source_matches_one_built_in_memory():
    rows = [{"a": "x", "b": "long value"}, {"a": "longer key", "b": "y"}]
    columns = [("a", "A"), ("b", "B")]
    assert list(table_lines(lambda: iter(rows), columns)) == table(rows, columns)
    assert table(rows, columns)[0] == "A           B"


def test_streamed_json_parses_to_the_same_report():
    report = {"dry_run": True, "delete": iter([{"x": 1}, {"y": [1, 2]}]), "skipped": iter([]), "summary": None}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_json(report)
    assert json.loads(out.getvalue()) == {
        "dry_run": True,
        "delete": [{"x": 1}, {"y": [1, 2]}],
        "skipped": [],
        "summary": None,
    }
