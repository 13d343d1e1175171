"""Test helpers for plugin discovery: fake installed distributions, without pip.

`fake_distribution` writes a `<name>-<version>.dist-info` folder (plus module sources) into a fresh
directory; the `plugin_path` fixture puts such directories on sys.path for one test, so
`importlib.metadata.entry_points(group="ctcore")` sees the fake distribution, and forgets the modules
imported from them afterwards so tests never leak plugins into each other.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLUGIN_DIR = REPO_ROOT / "plugins" / "ctcore-example"
"""The separately packaged example plugin; its import package `ctcore_example` lives directly inside."""


def fake_distribution(
    tmp_path: Path,
    dist_name: str,
    entry_points: dict[str, str],
    modules: dict[str, str] | None = None,
    version: str = "0.1.0",
) -> Path:
    """Write an installed-looking distribution with `ctcore` entry points; returns the directory to put on
    sys.path. `modules` maps module names (dotted for packages) to their source."""
    # One directory per distribution: importlib.metadata caches directory listings by path.
    site = tmp_path / f"site-{dist_name}-{version}"
    site.mkdir(parents=True)
    dist_info = site / f"{re.sub(r'[-_.]+', '_', dist_name)}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
    lines = ["[ctcore]", *(f"{name} = {target}" for name, target in entry_points.items())]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in (modules or {}).items():
        *packages, leaf = module.split(".")
        folder = site
        for package in packages:
            folder = folder / package
            folder.mkdir(exist_ok=True)
            (folder / "__init__.py").touch()
        (folder / f"{leaf}.py").write_text(source)
    return site


def _is_under(module: object, roots: list[Path]) -> bool:
    file = getattr(module, "__file__", None)
    if not file:
        return False
    path = Path(file).resolve()
    return any(path.is_relative_to(root) for root in roots)


@pytest.fixture
def plugin_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], Path]]:
    """A function that prepends a directory to sys.path for this test; modules imported from the added
    directories are removed from sys.modules afterwards."""
    added: list[Path] = []

    def add(directory: Path) -> Path:
        monkeypatch.syspath_prepend(str(directory))  # also invalidates the import and metadata caches
        added.append(Path(directory).resolve())
        return directory

    yield add
    for name, module in list(sys.modules.items()):
        if _is_under(module, added):
            del sys.modules[name]


BUILTINS: dict[str, list[str]] = {
    "network": ["adm", "mlp", "ncsnpp"],
    "metric": ["l2", "lpips", "pseudo-huber"],
    "noise_schedule": ["lognormal", "uniform"],
    "curriculum": ["constant", "ct", "exponential"],
    "teacher": ["ema", "no-ema"],
    "objective": ["consistency", "edm"],
    "sampler": ["consistency", "euler", "heun"],
    "logger": ["jsonl", "tensorboard"],
}
"""Every component the ctcore distribution registers, by kind."""
