"""Plugin discovery through entry points: builtins, providers, errors, broken and duplicate plugins."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pluggy
import pytest
import torch
from plugin_env import BUILTINS, EXAMPLE_PLUGIN_DIR, REPO_ROOT, fake_distribution, third_party_site
from typer.testing import CliRunner

import ctcore.registry
from ctcore.cli import app
from ctcore.errors import PluginError, UnknownComponentError, UsageError
from ctcore.registry import DISABLE_ENV, ONLY_ENV, load_registry

METRIC_PLUGIN = '''
import attrs
from ctcore import hookimpl


class {cls}:
    name = "{name}"
    summary = "a metric from a test plugin"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options, context):
        self.options = options


@hookimpl
def ctcore_register_metrics():
    return [{cls}]
'''

BROKEN_PLUGIN = 'raise ImportError("ctcore_fake_broken needs a library that is not installed")\n'

MISSPELT_PLUGIN = '''
from ctcore import hookimpl


@hookimpl
def ctcore_register_metric():  # the hook is ctcore_register_metrics
    return []
'''

PluginPath = Callable[[Path], Path]


def assert_builtins_present(registry: ctcore.registry.Registry) -> None:
    for kind, names in BUILTINS.items():
        assert set(names) <= set(registry.names(kind)), kind


def test_every_builtin_is_registered() -> None:
    registry = load_registry()
    assert registry.failures == []
    assert_builtins_present(registry)


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k, names in BUILTINS.items() for n in names])
def test_builtins_are_provided_by_the_ctcore_distribution(kind: str, name: str) -> None:
    provider = load_registry().provider(kind, name)
    assert provider.distribution == "ctcore"
    assert provider.module.startswith("ctcore_")


def test_unknown_name_suggests_the_closest_and_lists_the_available() -> None:
    registry = load_registry()  # the builtins alone (conftest), whatever else is installed
    with pytest.raises(UnknownComponentError) as info:
        registry.get("metric", "pseudo_huber")
    assert str(info.value) == (
        "unknown metric 'pseudo_huber'; did you mean 'pseudo-huber'? (available: l2, l2-norm, lpips, pseudo-huber)"
    )
    assert info.value.exit_code == 2

    with pytest.raises(UnknownComponentError) as info:
        registry.get("teacher", "zzz")
    assert str(info.value) == "unknown teacher 'zzz' (available: cd, ema, no-ema)"


def test_unknown_kind_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown component kind 'metrics'; did you mean 'metric'"):
        load_registry().names("metrics")


def test_duplicate_name_names_both_distributions(tmp_path: Path, plugin_path: PluginPath) -> None:
    source = METRIC_PLUGIN.format(cls="OtherL2", name="l2")
    plugin_path(fake_distribution(tmp_path, "ctcore-dup", {"dup": "ctcore_fake_dup"},
                                  {"ctcore_fake_dup": source}))
    with pytest.raises(PluginError) as info:
        load_registry()
    message = str(info.value)
    assert "metric 'l2' is registered twice" in message
    assert "by ctcore (entry point 'metrics')" in message
    assert "by ctcore-dup (entry point 'dup')" in message


def test_plugin_failing_to_import_is_recorded_and_skipped(tmp_path: Path, plugin_path: PluginPath) -> None:
    plugin_path(fake_distribution(tmp_path, "ctcore-broken", {"broken": "ctcore_fake_broken"},
                                  {"ctcore_fake_broken": BROKEN_PLUGIN}, version="2.3.4"))
    registry = load_registry()
    assert_builtins_present(registry)
    assert len(registry.failures) == 1
    failure = registry.failures[0]
    assert (failure.entry_point, failure.distribution) == ("broken", "ctcore-broken")
    assert "ImportError" in failure.error and "not installed" in failure.error
    message = failure.message()
    assert "'broken'" in message and "ctcore-broken" in message
    assert f"{DISABLE_ENV}=broken" in message


@pytest.mark.parametrize("disable", ["broken", "ctcore-broken", "other, broken"])
def test_disabled_plugin_is_skipped_without_failure(
    tmp_path: Path, plugin_path: PluginPath, monkeypatch: pytest.MonkeyPatch, disable: str
) -> None:
    plugin_path(fake_distribution(tmp_path, "ctcore-broken", {"broken": "ctcore_fake_broken"},
                                  {"ctcore_fake_broken": BROKEN_PLUGIN}))
    monkeypatch.setenv(DISABLE_ENV, disable)
    registry = load_registry()
    assert registry.failures == []
    assert "ctcore_fake_broken" not in sys.modules
    assert_builtins_present(registry)


def test_misspelt_hook_name_is_a_failure(tmp_path: Path, plugin_path: PluginPath) -> None:
    # Entry point "misspelt" sorts between the builtins "metrics" and "mlp": later plugins must still load.
    plugin_path(fake_distribution(tmp_path, "ctcore-misspelt", {"misspelt": "ctcore_fake_misspelt"},
                                  {"ctcore_fake_misspelt": MISSPELT_PLUGIN}))
    registry = load_registry()
    assert [(f.entry_point, f.distribution) for f in registry.failures] == [("misspelt", "ctcore-misspelt")]
    assert "ctcore_register_metric" in registry.failures[0].error
    assert_builtins_present(registry)


NAMELESS_PLUGIN = '''
from ctcore import hookimpl


class NoName:
    summary = "a metric without a name"


@hookimpl
def ctcore_register_metrics():
    return [NoName]
'''

UNDECORATED_PLUGIN = '''
def ctcore_register_metrics():  # forgot @ctcore.hookimpl: pluggy alone would ignore it silently
    return []
'''


@pytest.mark.parametrize(
    ("source", "error"),
    [(NAMELESS_PLUGIN, "without a kebab-case `name` attribute"),
     (UNDECORATED_PLUGIN, "ctcore_register_metrics lack the @ctcore.hookimpl decorator")],
    ids=["malformed-class", "undecorated-hook"],
)
def test_a_malformed_plugin_is_skipped_and_named(
    tmp_path: Path, plugin_path: PluginPath, source: str, error: str
) -> None:
    plugin_path(fake_distribution(tmp_path, "ctcore-bad", {"bad": "ctcore_fake_bad"}, {"ctcore_fake_bad": source}))
    registry = load_registry()  # does not raise: the rest of the registry still works
    assert [(f.entry_point, f.distribution) for f in registry.failures] == [("bad", "ctcore-bad")]
    assert error in registry.failures[0].error
    assert_builtins_present(registry)


def test_each_load_builds_an_independent_registry(tmp_path: Path, plugin_path: PluginPath) -> None:
    first = load_registry()
    source = METRIC_PLUGIN.format(cls="Late", name="late-metric")
    plugin_path(fake_distribution(tmp_path, "ctcore-late", {"late": "ctcore_fake_late"},
                                  {"ctcore_fake_late": source}))
    second = load_registry()
    assert first is not second
    assert first.plugin_manager is not second.plugin_manager
    assert "late-metric" in second.names("metric")
    assert "late-metric" not in first.names("metric")
    assert second.provider("metric", "late-metric").distribution == "ctcore-late"
    assert not any(isinstance(v, pluggy.PluginManager) for v in vars(ctcore.registry).values())


def test_example_plugin_registers_l1(tmp_path: Path, plugin_path: PluginPath) -> None:
    plugin_path(EXAMPLE_PLUGIN_DIR)
    plugin_path(fake_distribution(tmp_path, "ctcore-example", {"example": "ctcore_example"}))
    registry = load_registry()
    assert registry.failures == []
    assert "l1" in registry.names("metric")
    provider = registry.provider("metric", "l1")
    assert (provider.distribution, provider.entry_point, provider.module) == ("ctcore-example", "example",
                                                                              "ctcore_example")
    assert Path(sys.modules["ctcore_example"].__file__).is_relative_to(EXAMPLE_PLUGIN_DIR)

    metric = registry.create("metric", "l1")
    x = torch.tensor([[1.0, -2.0, 3.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    y = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 4.5]])
    torch.testing.assert_close(metric(x, y), torch.tensor([1.5, 1.0]))


def test_example_plugin_is_packaged_on_its_own() -> None:
    assert not (EXAMPLE_PLUGIN_DIR / "__init__.py").exists()  # not a package of the ctcore distribution
    project = tomllib.loads((EXAMPLE_PLUGIN_DIR / "pyproject.toml").read_text())["project"]
    assert (project["name"], project["version"]) == ("ctcore-example", "0.1.0")
    assert project["entry-points"]["ctcore"] == {"example": "ctcore_example"}
    assert any(dep.startswith("ctcore") and not dep.startswith("ctcore-") for dep in project["dependencies"])


def test_create_builds_context_and_options() -> None:
    registry = load_registry()
    assert registry.create("curriculum", "exponential", total_steps=400_000).num_scales(0) == 11
    assert registry.create("curriculum", "constant", num_scales=5).num_scales(10**6) == 5


def test_create_rejects_an_unknown_option() -> None:
    with pytest.raises(UsageError, match=r"metric 'pseudo-huber': .*'cc'.*\(its options: c\)"):
        load_registry().create("metric", "pseudo-huber", cc=1.0)


# ------------------------------------------------------------------------------- choosing the plugins loaded

BUILTIN_METRICS = ["l2", "l2-norm", "lpips", "pseudo-huber"]


@pytest.fixture
def only_plugin(tmp_path: Path, plugin_path: PluginPath) -> None:
    """The distribution `ctcore-only` (entry point `only`) registering the metric `only-metric`."""
    plugin_path(fake_distribution(tmp_path, "ctcore-only", {"only": "ctcore_fake_only"},
                                  {"ctcore_fake_only": METRIC_PLUGIN.format(cls="Only", name="only-metric")}))


@pytest.mark.parametrize(
    ("only", "disable", "metrics"),
    [
        ("ctcore", "", BUILTIN_METRICS),  # what the suite and its registry fixture see
        ("ctcore-only", "", ["only-metric"]),  # a distribution name
        ("only", "", ["only-metric"]),  # an entry-point name
        ("metrics", "", ["l2", "l2-norm", "pseudo-huber"]),  # one builtin entry point: lpips is another
        (" ctcore , only ", "", ["l2", "l2-norm", "lpips", "only-metric", "pseudo-huber"]),
        ("ctcore,ctcore-only", "only", BUILTIN_METRICS),  # CTCORE_DISABLE_PLUGINS applies on top
    ],
)
def test_only_plugins_loads_the_named_plugins_alone(
    only_plugin: None, monkeypatch: pytest.MonkeyPatch, only: str, disable: str, metrics: list[str]
) -> None:
    monkeypatch.setenv(ONLY_ENV, only)
    monkeypatch.setenv(DISABLE_ENV, disable)
    registry = load_registry()
    assert registry.failures == []
    assert registry.names("metric") == metrics


@pytest.mark.parametrize("only", [None, ""])
def test_without_only_plugins_a_user_sees_every_installed_plugin(only_plugin: None, only: str | None) -> None:
    result = CliRunner(env={ONLY_ENV: only}).invoke(app, ["list-components", "--json", "--kind", "metric"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: (r["distribution"], r["version"]) for r in json.loads(result.stdout)}
    assert rows["only-metric"] == ("ctcore-only", "0.1.0")
    assert set(BUILTIN_METRICS) <= set(rows)


def test_only_plugins_naming_no_installed_plugin_is_one_line_exit_2(only_plugin: None) -> None:
    dists = sorted({ep.dist.name for ep in md.entry_points(group="ctcore") if ep.dist is not None})
    assert {"ctcore", "ctcore-only"} <= set(dists)
    result = CliRunner(env={ONLY_ENV: "ctcore,ctcor, only,exampel"}).invoke(app, ["list-components"])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: {ONLY_ENV}: no installed plugin has the entry point or distribution name 'ctcor', 'exampel' "
        f"(distributions with plugins: {', '.join(dists)}); correct it, or unset {ONLY_ENV} to load every plugin\n"
    )
    assert result.stdout == ""


LISTING_TESTS = ["tests/test_registry.py", "tests/test_cli.py", "tests/test_help.py", "tests/test_distillation.py",
                 "tests/test_diffusion.py", "tests/test_loggers.py", "tests/test_objective_contracts.py"]
LISTING_KEYWORDS = ("test_registry or list_components or without_a_curriculum or must_sample_the_model "
                    "or consistency_sampling_of_a_diffusion or bad_logging_section or third_party")
"""The tests that pin component lists (`ctcore list-components`, 'available: ...' and 'use one of: ...' lines)."""


@pytest.mark.slow
def test_the_listing_tests_pass_with_a_third_party_plugin_installed(tmp_path: Path) -> None:
    """A distribution with one extra component of every kind installed (on PYTHONPATH) changes nothing the
    suite sees: conftest restricts it to the ctcore distribution and the fakes each test adds."""
    env = {k: v for k, v in os.environ.items() if k not in (ONLY_ENV, DISABLE_ENV)}  # as in a user's shell
    env["PYTHONPATH"] = os.pathsep.join([str(third_party_site(tmp_path)), *filter(None, [env.get("PYTHONPATH")])])
    dists = "import importlib.metadata as md; print([e.dist.name for e in md.entry_points(group='ctcore')])"
    found = subprocess.run([sys.executable, "-c", dists], env=env, capture_output=True, text=True, check=True)
    assert "'ctcore-thirdparty'" in found.stdout  # the subprocesses really have the plugin installed
    this = f"tests/test_registry.py::{test_the_listing_tests_pass_with_a_third_party_plugin_installed.__name__}"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *LISTING_TESTS, "-k",
         LISTING_KEYWORDS, "--deselect", this],  # -n 0: in one process, not pytest.ini's worker processes
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]  # 5 if nothing was selected
