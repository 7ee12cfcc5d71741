"""Coordinator keys and records are the coordinator's words: `node/` never builds, parses or decodes them.

`coordinator/keys.py` builds and parses every key and `coordinator/metadata.py` (with the other
coordinator modules) decodes every record; a node asks them. Read from the source, three ways a node
module could speak the coordinator's layout itself:
- it uses `coordinator.keys` (a key builder, a parser or a prefix constant);
- it decodes a value read from the KV (`json.loads(found.value)`, `holder.value.decode()`);
- it writes a key prefix as a literal (`"tag/"`, `f"manifest/{repo}@"`).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

from coordinator import keys

ROOT = Path(__file__).resolve().parent.parent
# Every key and key prefix coordinator/keys.py names ("tag/", "gc/last-run", ...).
KEY_WORDS = sorted({v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str) and "/" in v})


@dataclasses.dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"  {self.path}:{self.line}: {self.what}"


def node_modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted((ROOT / "node").rglob("*.py")):
        yield str(path.relative_to(ROOT)), ast.parse(path.read_text(), filename=str(path))


def keys_names(tree: ast.Module) -> tuple[set[str], list[tuple[int, str]]]:
    """Names a module binds to `coordinator.keys` itself, and (line, name) of what it imports from it."""
    modules: set[str] = set()
    imported: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "coordinator":
            modules |= {alias.asname or alias.name for alias in node.names if alias.name == "keys"}
        elif isinstance(node, ast.ImportFrom) and node.module == "coordinator.keys":
            imported += [(node.lineno, alias.asname or alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "coordinator.keys":
                    modules.add(alias.asname or "coordinator.keys")
    return modules, imported


def key_uses(path: str, tree: ast.Module) -> Iterator[Finding]:
    modules, imported = keys_names(tree)
    for line, name in imported:
        yield Finding(path, line, f"imports {name} from coordinator.keys")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in modules:
            yield Finding(path, node.lineno, f"uses keys.{node.attr}")


# What a decoder is called: json's, and the records' own (`UploadSession.from_json`, ...).
DECODERS = ("loads", "load", "from_json", "from_bytes", "decode", "parse")


def record_decoding(path: str, tree: ast.Module) -> Iterator[Finding]:
    """A KV entry's `.value` given to a decoder, or decoded itself (`holder.value.decode()`)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called = ast.unparse(node.func)
        given = [part for arg in node.args for part in ast.walk(arg)]
        if called.endswith(".value.decode") or (
            called.rsplit(".", 1)[-1] in DECODERS
            and any(isinstance(part, ast.Attribute) and part.attr == "value" for part in given)
        ):
            yield Finding(path, node.lineno, f"decodes a KV value: {ast.unparse(node)[:100]}")


def literal_keys(path: str, tree: ast.Module) -> Iterator[Finding]:
    # An f-string's literal parts are Constants too: the f-string is judged by its start, once.
    parts = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    for node in ast.walk(tree):
        text = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
            text = node.value
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            text = str(node.values[0].value)
        if text is None:
            continue
        for word in KEY_WORDS:
            if text == word or (word.endswith("/") and text.startswith(word)):
                yield Finding(path, node.lineno, f"writes the coordinator key {word!r} as a literal: {text[:60]!r}")
                break


def findings() -> list[Finding]:
    found: list[Finding] = []
    for path, tree in node_modules():
        found += [*key_uses(path, tree), *record_decoding(path, tree), *literal_keys(path, tree)]
    return sorted(set(found), key=lambda f: (f.path, f.line, f.what))


def test_node_neither_builds_nor_parses_coordinator_keys_nor_decodes_records() -> None:
    found = findings()
    assert not found, (
        f"{len(found)} places in node/ speak the coordinator's layout (ask coordinator/ instead):\n"
        + "\n".join(str(f) for f in found)
    )


def test_the_checks_see_each_way_of_speaking_the_layout() -> None:
    source = (
        "import json\n"
        "from coordinator import keys as k\n"
        "from coordinator.keys import tag\n"
        "async def f(kv, repo, tags):\n"
        "    tags.append(1)\n"
        "    found = await kv.get(k.leader('gc'))\n"
        "    state = json.loads(found.value)\n"
        "    holder = found.value.decode(), Session.from_json(found.key, found.value)\n"
        "    await kv.range(f'manifest/{repo}@')\n"
        "    return 'gc/last-run', '/v2/tag/list', json.loads(body)\n"
    )
    tree = ast.parse(source)
    found = sorted((f.line, f.what.split(":")[0]) for f in [*key_uses("m", tree), *record_decoding("m", tree)])
    found += sorted((f.line, f.what.split(":")[0]) for f in literal_keys("m", tree))
    assert found == [
        (3, "imports tag from coordinator.keys"),
        (6, "uses keys.leader"),
        (7, "decodes a KV value"),
        (8, "decodes a KV value"),
        (8, "decodes a KV value"),
        (9, "writes the coordinator key 'manifest/' as a literal"),
        (10, "writes the coordinator key 'gc/last-run' as a literal"),
    ]
