"""Reads HAProxy's CSV statistics page: the state of each server of one backend."""

from __future__ import annotations

import csv
import io


def wharf_haproxy_servers(text: str, backend: str) -> dict[str, dict[str, object]]:
    """{server: {"status": "UP" | "DOWN" | ..., "sessions": current sessions}} of `backend`."""
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines[0] = lines[0][2:]
    servers: dict[str, dict[str, object]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        servers[row["svname"]] = {"status": row.get("status", ""), "sessions": int(row.get("scur") or 0)}
    return servers


class FilterModule:
    def filters(self) -> dict[str, object]:
        return {"wharf_haproxy_servers": wharf_haproxy_servers}
