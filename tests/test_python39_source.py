"""The package declares Python >= 3.9 (pyproject's requires-python): its source may use no call that only newer
Pythons accept. Ruff's py39 target checks the syntax; these are the library calls it lets through."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("fastflow", "kernels") for p in (ROOT / folder).rglob("*.py"))
NEWER_KEYWORDS = {"zip": {"strict"}, "dataclass": {"kw_only", "slots", "match_args"}}  # Python 3.10
NEWER_ATTRIBUTES = {"pairwise", "bit_count"}  # itertools.pairwise, int.bit_count: 3.10


def _newer_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            newer = NEWER_KEYWORDS.get(name, set()) & {k.arg for k in node.keywords}
            found += [f"line {node.lineno}: {name}({k}=...)" for k in sorted(newer)]
            union = (
                len(node.args) == 2 and isinstance(node.args[1], ast.BinOp) and isinstance(node.args[1].op, ast.BitOr)
            )
            if name in ("isinstance", "issubclass") and union:  # isinstance(x, A | B): 3.10
                found.append(f"line {node.lineno}: {name}(x, A | B)")
        if isinstance(node, ast.Attribute) and node.attr in NEWER_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_the_scan_finds_a_newer_call():
    source = (
        "for a, b in zip(x, y, strict=True): pass\nn.bit_count()\n@dataclasses.dataclass(slots=True)\nclass A: pass\n"
    )
    assert sorted(_newer_calls(ast.parse(source + "isinstance(x, int | float)"))) == [
        "line 1: zip(strict=...)",
        "line 2: .bit_count",
        "line 3: dataclass(slots=...)",
        "line 5: isinstance(x, A | B)",
    ]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_runs_on_python39(path):
    assert _newer_calls(ast.parse(path.read_text(encoding="utf-8"))) == []
