"""The documentation keeps up with the code: hooks, builtin components and their options, recipe sections,
CLI commands and contract checks must all be documented. Each test lists everything that is missing."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import attrs
import pytest

import ctcore
import ctcore.hookspecs
import ctcore.testing
from ctcore.cli import app
from ctcore.components import ALL_KINDS, KINDS, BuildContext, entries_of, range_of
from ctcore.recipe import CORE_SECTIONS
from ctcore.registry import DISABLE_ENV, ONLY_ENV

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RECIPES_DOC = ROOT / "docs" / "recipes.md"
PLUGINS_DOC = ROOT / "docs" / "plugins.md"

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")


def _read(path: Path) -> str:
    if not path.is_file():
        pytest.fail(f"{path.relative_to(ROOT)} is missing")
    return path.read_text(encoding="utf-8")


def _section(text: str, title_token: str) -> str | None:
    """The text under the first Markdown heading that contains `title_token`, up to the next heading of the
    same or a higher level; None when no heading contains it."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _HEADING.match(line)
        if m and title_token in m.group(2):
            level = len(m.group(1))
            body = []
            for nxt in lines[i + 1 :]:
                n = _HEADING.match(nxt)
                if n and len(n.group(1)) <= level:
                    break
                body.append(nxt)
            return "\n".join(body)
    return None


def _fail_if_missing(missing: list[str], where: Path, what: str) -> None:
    __tracebackhide__ = True
    if missing:
        pytest.fail(f"{where.relative_to(ROOT)} does not document {len(missing)} {what}:\n  " + "\n  ".join(missing))


def hook_names() -> list[str]:
    return sorted(
        name
        for name, fn in inspect.getmembers(ctcore.hookspecs, inspect.isfunction)
        if name.startswith("ctcore_register_")
    )


def cli_command_names() -> list[str]:
    names = []
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        names.append(name)
    return names


def check_function_names() -> list[str]:
    return sorted(
        name
        for name, fn in inspect.getmembers(ctcore.testing, inspect.isfunction)
        if name.startswith("check_") and fn.__module__ == ctcore.testing.__name__
    )


def test_the_code_has_what_the_docs_are_checked_against():
    assert len(hook_names()) == len(ALL_KINDS)
    assert {"run", "check", "sample", "list-components"} <= set(cli_command_names())
    assert "check_component" in check_function_names()


def test_every_hook_is_documented_in_plugins_md():
    text = _read(PLUGINS_DOC)
    _fail_if_missing([h for h in hook_names() if f"`{h}`" not in text], PLUGINS_DOC, "hooks")


def test_every_contract_check_is_documented_in_plugins_md():
    text = _read(PLUGINS_DOC)
    _fail_if_missing(
        [f for f in check_function_names() if f"`{f}" not in text], PLUGINS_DOC, "ctcore.testing functions"
    )


def test_build_context_and_plugin_switches_are_documented_in_plugins_md():
    text = _read(PLUGINS_DOC)
    wanted = [f.name for f in attrs.fields(BuildContext)] + [DISABLE_ENV, ONLY_ENV, "hookimpl"]
    _fail_if_missing([w for w in wanted if w not in text], PLUGINS_DOC, "BuildContext fields or plugin switches")


def test_every_builtin_component_and_option_is_documented_in_recipes_md():
    text = _read(RECIPES_DOC)
    missing = []
    for row in ctcore.load_registry().rows():
        if row["distribution"] != "ctcore":
            continue
        where = f"{row['kind']} {row['name']!r}"
        body = _component_section(text, row["kind"], row["name"])
        if body is None:
            missing.append(f"{where}: no heading containing `{row['name']}`")
            continue
        for option in row["options"]:
            if f"`{option}`" not in body:
                missing.append(f"{where}: option `{option}` (in its section)")
    _fail_if_missing(missing, RECIPES_DOC, "builtin components or options")


def test_every_section_and_core_field_is_documented_in_recipes_md():
    text = _read(RECIPES_DOC)
    missing = []
    for kind in KINDS:
        if _section(text, f"`[{kind}]`") is None:
            missing.append(f"[{kind}]: no heading containing `[{kind}]`")
    for name, cls in CORE_SECTIONS.items():
        body = _section(text, f"`[{name}]`")
        if body is None:
            missing.append(f"[{name}]: no heading containing `[{name}]`")
            continue
        missing += [f"{name}.{f.name}" for f in attrs.fields(cls) if f"`{f.name}`" not in body]
    _fail_if_missing(missing, RECIPES_DOC, "recipe sections or keys")


def _component_section(text: str, kind: str, name: str) -> str | None:
    """The text under the heading of component `name` within its kind's section (`[logging]` for loggers), so
    that two kinds may share a name (the objective and the sampler `meanflow`)."""
    kind_body = _section(text, f"`[{'logging' if kind == 'logger' else kind}]`")
    return None if kind_body is None else _section(kind_body, f"`{name}`")


def _documented_sections() -> list[tuple[str, str, type]]:
    """(heading token, what, attrs class) for every core section and builtin component."""
    out = [(f"`[{name}]`", f"[{name}]", cls) for name, cls in CORE_SECTIONS.items()]
    registry = ctcore.load_registry()
    for row in registry.rows():
        if row["distribution"] == "ctcore":
            options = registry.get(row["kind"], row["name"]).Options
            out.append(((row["kind"], row["name"]), f"{row['kind']} {row['name']!r}", options))
    return out


def test_every_documented_range_is_the_validators_range():
    """The type column of each option's row shows exactly the range its validator checks (e.g. `[-20, 20]`,
    `(0, 1]`), and for arrays the allowed number of entries (`1 to 12`)."""
    text = _read(RECIPES_DOC)
    missing = []
    for token, what, cls in _documented_sections():
        body = (_component_section(text, *token) if isinstance(token, tuple) else _section(text, token)) or ""
        rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]*) \|", body, re.M)}
        for field in attrs.fields(cls):
            r, e = range_of(field), entries_of(field)
            if r is None:
                continue
            wanted = [r.interval] + ([f"{e.lo} to {e.hi}"] if e is not None else [])
            cell = rows.get(field.name, "")
            missing += [f"{what}: `{field.name}` shows {cell!r}, not {w!r}" for w in wanted if w not in cell]
    _fail_if_missing(missing, RECIPES_DOC, "ranges as the validators check them")


def test_readme_shows_every_cli_command_and_the_two_main_commands():
    text = _read(README)
    missing = [f"ctcore {c}" for c in cli_command_names() if f"ctcore {c}" not in text]
    missing += [cmd for cmd in ("ctcore run recipes/quickstart.toml", "python -m pytest") if cmd not in text]
    _fail_if_missing(missing, README, "commands")


def test_docs_link_to_each_other():
    text = _read(README)
    missing = [doc for doc in ("docs/recipes.md", "docs/plugins.md") if doc not in text]
    _fail_if_missing(missing, README, "links")


def test_every_test_named_in_reliability_md_exists() -> None:
    """docs/reliability.md backs each guarantee with tests by name (`tests/x.py::test_y`, then `::test_z` for more
    in the same file, parametrisations in [...] allowed); a renamed or deleted test must not leave a claim behind."""
    text = _read(ROOT / "docs" / "reliability.md")
    missing, named, current = [], 0, None
    for m in re.finditer(r"(tests/[\w/]+\.py)|::(\w+)", text):  # in order: `::name` belongs to the last file
        if m.group(1):
            current = m.group(1)
            if not (ROOT / current).is_file():
                missing.append(current)
            continue
        named += 1
        source = (ROOT / current).read_text(encoding="utf-8") if current and (ROOT / current).is_file() else ""
        if not re.search(rf"^def {m.group(2)}\(", source, re.MULTILINE):
            missing.append(f"{current}::{m.group(2)}")
    assert named >= 60 and missing == []


def test_the_readmes_test_section_names_every_module_with_slow_tests() -> None:
    """The README tells how long the suite takes and which tests `-m "not slow"` skips: every test module that
    marks a test slow is named there (a new slow test in another module must be added)."""
    section = _section(_read(README), "Test: `python -m pytest`")
    assert section is not None, "README.md has no section 'Test: `python -m pytest`'"
    slow = sorted(p.name for p in (ROOT / "tests").glob("test_*.py")
                  if re.search(r"pytest\.mark\.slow\b", p.read_text(encoding="utf-8")))
    assert len(slow) >= 5, slow
    missing = [name for name in slow if f"`{name.removesuffix('.py')}`" not in section]
    assert missing == [], f"README.md's test section does not name these modules with slow tests: {missing}"
    assert re.search(r"\d+ (s|seconds|minutes)\b.*2 cores|2 cores.*\d+ (s|seconds|minutes)\b", section, re.S), \
        "README.md's test section does not say how long the suite takes on 2 cores"
    assert '-m "not slow"' in section
