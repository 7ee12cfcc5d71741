"""What the benches share: the HTTP client, loads, wrk, CPU accounting, registry processes and tables.

A bench runs as `python loadtests/bench_x.py`, so its own folder is on `sys.path` and `import benchlib`
finds this package. Importing it puts the repository root first on `sys.path` (the bench measures
this checkout's `node/` and `coordinator/`, whatever is installed) and then `tests/` (etcd, moto and
HAProxy as the tests start them): a bench imports `benchlib` before those, which isort's order of
the names (`benchlib` before `haproxy`, `s3_server`, `services`, `wharf_process`) keeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
for _path in (REPO_ROOT / "tests", REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
