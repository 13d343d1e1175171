"""Importing ctcore, its hook markers and the CLI stays light: torch loads only when a command needs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["ctcore", "ctcore.cli", "ctcore.hookspecs", "ctcore.errors"])
def test_import_does_not_load_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_public_api_names_resolve_lazily() -> None:
    import ctcore

    for name in ctcore.__all__:
        assert getattr(ctcore, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = ctcore.nope


def _ctcore_imports(path) -> set[str]:
    """ctcore modules a source file imports, at module level, inside functions or for type checking only (a
    type-only import is still a dependency between the modules)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctcore."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ctcore."))
    return found


def test_no_import_cycle_in_ctcore() -> None:
    """Imports go down the layers (cli -> build -> training -> checkpoints / sampling / evaluation -> ...); a cycle
    anywhere, even through an import inside a function, fails here with the cycle spelled out."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "ctcore"
    graph = {f"ctcore.{p.stem}": _ctcore_imports(p) for p in package.glob("*.py") if p.stem != "__init__"}
    assert len(graph) > 15 and "ctcore.checkpoints" in graph["ctcore.build"]  # the scan sees real imports

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_sampling_checkpoints_and_evaluation_never_import_training() -> None:
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "ctcore"
    for name in ("sampling", "checkpoints", "evaluation", "fid", "build"):
        assert "ctcore.training" not in _ctcore_imports(package / f"{name}.py"), name
