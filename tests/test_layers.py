"""The import rule of ../shared/DESIGN.md, read from the source of every module.

* ``feedback`` imports neither ``serve`` nor ``train``;
* ``train`` reaches serving only over HTTP: it never imports ``serve``;
* ``serve`` imports ``train`` only in the CLI root (``serve/cli*.py``);
* torch, trl and vllm are imported lazily (inside functions), so that a command
  that does not train or generate starts without loading them;
* no SQL text in ``serve/``: the stores' queries live in ``feedback/``.

Every import statement counts, the lazy ones inside functions too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "trl", "vllm")


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level package, line, at module level) of each import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.extend((name.split(".")[0], node.lineno, id(node) in top_level) for name in names)
    return found


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def broken_rules(path: Path) -> list[str]:
    package = path.relative_to(REPO).parts[0]
    cli_root = package == "serve" and path.parent == REPO / "serve" and path.name.startswith("cli")
    forbidden = {"feedback": {"serve", "train"}, "train": {"serve"},
                 "serve": set() if cli_root else {"train"}}.get(package, set())
    where = path.relative_to(REPO)
    problems = [f"{where}:{line} imports {name}" for name, line, _ in imports(path) if name in forbidden]
    problems += [f"{where}:{line} imports {name} at module level" for name, line, top in imports(path)
                 if top and name in HEAVY]
    return problems


@pytest.mark.parametrize("package", ["feedback", "train", "serve"])
def test_import_rule(package):
    files = modules(package)
    assert files, f"no modules found in {package}/"
    problems = [p for f in files for p in broken_rules(f)]
    assert not problems, "\n".join(problems)


SQL = re.compile(r"\b(SELECT\s|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(OR\s+REPLACE\s+)?"
                 r"(TEMP\s+)?(TABLE|VIEW|INDEX)|COPY\s*\()")


def test_no_sql_in_serve():
    """The stores' queries live in feedback/ (serve calls them): no SQL text in serve/."""
    found = [f"{f.relative_to(REPO)}:{n}" for f in modules("serve")
             for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if SQL.search(line)]
    assert not found, "SQL in serve/: " + ", ".join(found)
    assert SQL.search('db.query("SELECT count(*) FROM turns")') and not SQL.search("methods: DELETE, GET")


def test_the_check_sees_lazy_imports(tmp_path):
    """The reader catches an import inside a function, not only at the top (it cannot pass by missing them)."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from train import loop\n    import torch.nn\n", encoding="utf-8")
    assert imports(module) == [("os", 1, True), ("train", 4, False), ("torch", 5, False)]
