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
