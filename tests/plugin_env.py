"""Test helpers for plugin discovery: fake installed distributions, without pip.

`fake_distribution` writes a `<name>-<version>.dist-info` folder (plus module sources) into a fresh
directory; the `plugin_path` fixture puts such directories on sys.path for one test, so
`importlib.metadata.entry_points(group="ctcore")` sees the fake distribution, adds it to CTCORE_ONLY_PLUGINS
(which conftest sets to `ctcore`, so that plugins installed for real stay out of the suite), and forgets the
modules imported from them afterwards so tests never leak plugins into each other.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ctcore.registry import ONLY_ENV

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
    """A function that prepends a directory to sys.path for this test and lets the registry load the
    distributions installed there; modules imported from the added directories are removed from sys.modules
    afterwards."""
    added: list[Path] = []

    def add(directory: Path) -> Path:
        monkeypatch.syspath_prepend(str(directory))  # also invalidates the import and metadata caches
        names = [d.metadata["Name"] for d in md.distributions(path=[str(directory)])]
        if os.environ.get(ONLY_ENV) and names:
            monkeypatch.setenv(ONLY_ENV, ",".join([os.environ[ONLY_ENV], *names]))
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
    "logger": ["jsonl", "tensorboard", "wandb"],
}
"""Every component the ctcore distribution registers, by kind."""

THIRD_PARTY_PLUGIN = '''
import attrs
import torch
from torch import nn

from ctcore_curricula import Constant
from ctcore_loggers import Jsonl
from ctcore_noise import Uniform
from ctcore_objectives import Edm
from ctcore_samplers import Euler
from ctcore_teachers import NoEma

from ctcore import hookimpl


class ExtraMetric(nn.Module):
    name = "extra-metric"
    summary = "mean absolute difference per sample (a third-party plugin in the tests)"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options, context):
        super().__init__()
        self.options = options

    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(dim=1)


class ExtraNet(nn.Module):
    name = "extra-net"
    summary = "a learnt scale of the input plus a learnt multiple of c_noise (a third-party plugin in the tests)"
    noise_conditioning = "fourier"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options, context):
        super().__init__()
        if context.num_classes:
            raise ValueError("extra-net is unconditional")
        self.options = options
        self.scale = nn.Parameter(torch.ones(()))
        self.shift = nn.Parameter(torch.full((), 0.1))

    def forward(self, x, c_noise, labels=None):
        return self.scale * x + self.shift * c_noise.reshape(-1, *[1] * (x.dim() - 1))


def renamed(cls, name):
    """A builtin under another name, as a third party might extend one."""
    return type(cls.__name__, (cls,), {"name": name, "summary": f"{cls.summary} (a third-party plugin in the tests)"})


@hookimpl
def ctcore_register_metrics():
    return [ExtraMetric]


@hookimpl
def ctcore_register_networks():
    return [ExtraNet]


@hookimpl
def ctcore_register_objectives():
    return [renamed(Edm, "extra-objective")]


@hookimpl
def ctcore_register_noise_schedules():
    return [renamed(Uniform, "extra-schedule")]


@hookimpl
def ctcore_register_curricula():
    return [renamed(Constant, "extra-curriculum")]


@hookimpl
def ctcore_register_teachers():
    return [renamed(NoEma, "extra-teacher")]


@hookimpl
def ctcore_register_samplers():
    return [renamed(Euler, "extra-sampler")]


@hookimpl
def ctcore_register_loggers():
    return [renamed(Jsonl, "extra-logger")]
'''
"""A working third-party plugin with one component of every kind, each named `extra-...` (`extra-metric`,
`extra-net`, ...), that is no part of the project."""


def third_party_site(tmp_path: Path) -> Path:
    """A site directory in which the distribution `ctcore-thirdparty` 9.9.9 (entry point `thirdparty`) is installed,
    as if by pip: put it on a subprocess's PYTHONPATH to run anything with a third-party plugin installed."""
    return fake_distribution(tmp_path, "ctcore-thirdparty", {"thirdparty": "ctcore_thirdparty"},
                             {"ctcore_thirdparty": THIRD_PARTY_PLUGIN}, version="9.9.9")
