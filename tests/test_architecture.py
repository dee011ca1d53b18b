"""The house rules that code review would otherwise have to remember.

- Every module of the package and of the release tools in ``tools/`` sits in a layer of the
  import-linter contract in setup.cfg (``make contracts`` checks the layers; this test checks
  that no module escapes them).
- Library code imports at module top; only the CLI imports lazily (for ``--help`` speed).
  A library import inside a function must say why in a comment on its line or the line above
  (an optional dependency, or a reader that keeps ``ingest`` quick to import).
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = {
    "pipeline": "corona_ct.pipeline",
    "models": "corona_ct.models",
    "data": "corona_ct.data",
    "tools": "tools",
}
CLI_FILES = ("pipeline/cli.py", "pipeline/__main__.py")
CLI_FOLDERS = ("pipeline/commands/",)


def _layer_entries() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    layers = parser["importlinter:contract:layers"]["layers"]
    return {name.strip() for line in layers.splitlines() for name in line.split(":") if name.strip()}


def _library_files() -> list[Path]:
    return sorted(
        path
        for folder in PACKAGES
        for path in (REPO_ROOT / folder).rglob("*.py")
        if "weights" not in path.parts
    )


def _dotted(path: Path) -> str:
    relative = path.relative_to(REPO_ROOT).with_suffix("")
    parts = [PACKAGES[relative.parts[0]], *relative.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_every_module_sits_in_a_layer() -> None:
    entries = _layer_entries()
    roots = set(PACKAGES.values())
    unplaced = [
        name
        for name in map(_dotted, _library_files())
        if name not in roots and not any(name == entry or name.startswith(entry + ".") for entry in entries)
    ]
    assert not unplaced, (
        f"add these modules to a layer in setup.cfg [importlinter:contract:layers]: {unplaced}"
    )


def _guarded(tree: ast.AST) -> set[int]:
    """ids of nodes under ``try: ... except ImportError`` or ``if TYPE_CHECKING:``."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        guarded_body: list[ast.stmt] = []
        if (
            isinstance(node, ast.Try)
            and any(
                isinstance(handler.type, ast.Name)
                and handler.type.id in {"ImportError", "ModuleNotFoundError"}
                for handler in node.handlers
            )
        ) or (
            isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        ):
            guarded_body = node.body
        ids.update(id(inner) for statement in guarded_body for inner in ast.walk(statement))
    return ids


def _unexplained_lazy_imports(path: Path, root: Path = REPO_ROOT) -> list[str]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    guarded = _guarded(tree)
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in guarded:
                continue
            line, above = lines[node.lineno - 1], lines[node.lineno - 2]
            if "#" not in line and "#" not in above:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {line.strip()}")
    return sorted(set(found))


def test_library_code_imports_at_module_top() -> None:
    library = [
        path
        for path in _library_files()
        if not str(path.relative_to(REPO_ROOT)).startswith(CLI_FOLDERS)
        and str(path.relative_to(REPO_ROOT)) not in CLI_FILES
    ]
    assert len(library) > 40
    found = [hit for path in library for hit in _unexplained_lazy_imports(path)]
    assert not found, "move these imports to the module top (or say why not in a comment):\n" + "\n".join(
        found
    )


def test_the_lazy_import_check_can_fail(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    import json\n    return json\n\n\n"
        "def g():\n    # optional dependency\n    import timm\n\n\n"
        "def h():\n    try:\n        import grad_cam\n    except ImportError:\n        return None\n"
    )
    assert _unexplained_lazy_imports(probe, tmp_path) == ["probe.py:2: import json"]
