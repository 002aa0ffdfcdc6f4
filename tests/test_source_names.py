"""No module of the package defines one top-level name twice: the second definition silently
replaces the first for every caller (ruff's F811 flags only a redefinition of an unused name;
session 25 shipped one for a commit: a helper of the drop-in's rerank replaced by another)."""

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "colbert_triton"


def _defined_twice(source: str) -> list[str]:
    tree = ast.parse(source)
    names = Counter(node.name for node in tree.body
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
    return [name for name, count in names.items() if count > 1]


@pytest.mark.parametrize("module", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_top_level_name_is_defined_twice(module):
    assert _defined_twice(module.read_text()) == []


def test_the_check_sees_a_redefinition():
    assert _defined_twice("def helper(a):\n    return a\n\n\nclass Other:\n    pass\n\n\n"
                          "def helper(b, c):\n    return b\n") == ["helper"]
