"""The hostile-input corpus for recipes: several hundred generated mutations of a complete recipe through
`ctcore check`, and every mutation that `check` accepts through a few steps of `ctcore run`.

A mutation replaces one value (by a wrong type, an absurd or non-finite number, a hostile string), removes or
renames a key or a section, or damages the file's bytes. Each case asserts the exit code, exactly one line on
stderr (`error: <file>: <what>` naming the key), no traceback, and that every file that existed before is
byte-identical afterwards. A mutation that `check` accepts must then train: exit 0 and finite weights.
"""

from __future__ import annotations

import math
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
import typer.testing
from helpers import DIFFUSION, ECT, snapshot, tiny_cd, tiny_recipe_text, train_tiny_diffusion
from typer.testing import CliRunner

import ctcore.cli as cli
from ctcore.recipe import dump_recipe, parse_recipe
from ctcore.registry import load_registry

REGISTRY = load_registry()
COMMAND = typer.main.get_command(cli.app)

FAST = {  # a complete recipe that trains in a few hundredths of a second, so accepted mutations can run
    "training": {"total_steps": 3, "log_every": 1, "checkpoint_every": 2, "sample_every": 3},
    "evaluation": {"distance": "none"},
}


def _base_doc() -> dict[str, dict[str, Any]]:
    """The tiny test recipe, resolved: every key of every section present (the metric's computed `c` too)."""
    recipe = parse_recipe(tiny_recipe_text("OUT", **FAST), REGISTRY, source="base")
    doc = tomllib.loads(dump_recipe(recipe))
    doc["metric"]["c"] = 0.1
    return doc


BASE = _base_doc()


def _diffusion_doc() -> dict[str, dict[str, Any]]:
    """The tiny recipe as an EDM diffusion run (edm objective, Heun sampler, no consistency parts), resolved."""
    recipe = parse_recipe(tiny_recipe_text("OUT", **FAST, **DIFFUSION), REGISTRY, source="base")
    return tomllib.loads(dump_recipe(recipe))


DIFFUSION_BASE = _diffusion_doc()


def _resolved(**overrides: Any) -> dict[str, dict[str, Any]]:
    """The tiny recipe with `overrides`, resolved (every key present)."""
    return tomllib.loads(dump_recipe(parse_recipe(tiny_recipe_text("OUT", **FAST, **overrides), REGISTRY,
                                                  source="base")))


ECT_BASE = _resolved(**ECT)
"""The tiny recipe as Easy Consistency Tuning: ect pairs (no curriculum), l2-norm, the EDM parameterization."""
CD_BASE = _resolved(**tiny_cd(train_tiny_diffusion(Path(tempfile.mkdtemp(prefix="ctcore-hostile-")) / "edm")))
"""The tiny recipe as consistency distillation of a tiny EDM run (trained once, outside any test's folder)."""

NUMBERS: list[Any] = [0, -1, 2**63 - 1, -(2**63), 0.5, 5e-324, 1e300, -1e300, math.nan, math.inf, -math.inf]
WRONG_TYPES: list[Any] = ["text", True, [], {"a": 1}]
STRINGS: list[Any] = ["", "a\x00b", "x" * 4096, "../../..", "\u202eevil", "line\nbreak", 7, False, ["a"]]
ARRAYS: list[Any] = [[], [math.nan], [1e300], ["a"], [[0.5]], [0.5] * 1001, 0.5]
BOOLS: list[Any] = [0, 1, "true", 1.5, [True]]


def _toml(value: Any) -> str:
    """A TOML value for any of the mutation values (non-finite floats and inline tables included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"


def _text(doc: dict[str, dict[str, Any]], out: Path) -> str:
    lines = [f"{section} = {_toml(value)}" for section, value in doc.items() if not isinstance(value, dict)]
    for section, table in doc.items():
        if not isinstance(table, dict):
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(str(out) if (section, k) == ('run', 'output_dir') else v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _values_for(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return BOOLS
    if isinstance(value, int | float):
        return NUMBERS + WRONG_TYPES
    if isinstance(value, str):
        return STRINGS
    return ARRAYS


def _mutations() -> list[tuple[str, Any]]:
    """(id, how) pairs; `how` is ("set", section, key, value), ("drop", section, key), ("rename", ...), or
    ("bytes", transform) for damage to the file itself."""
    cases: list[tuple[str, Any]] = []
    for section, table in BASE.items():
        for key, value in table.items():
            if (section, key) == ("run", "output_dir"):
                continue
            for new in _values_for(value):
                cases.append((f"{section}.{key}={_toml(new)[:24]}", ("set", section, key, new)))
            cases.append((f"{section}.{key}:dropped", ("drop", section, key)))
            cases.append((f"{section}.{key}:misspelt", ("rename", section, key, key + "x")))
        cases.append((f"[{section}]:dropped", ("drop", section, None)))
        cases.append((f"[{section}]:a-number", ("set", None, section, 3)))
    cases.append(("[extra]:unknown-section", ("set", None, "extra", {"a": 1})))
    text = _text(BASE, Path("OUT")).encode()
    for cut in range(7, len(text) - 1, max(1, len(text) // 40)):
        cases.append((f"truncated-at-{cut}", ("bytes", lambda b, cut=cut: b[:cut])))
    for name, transform in {
        "utf8-bom": lambda b: b"\xef\xbb\xbf" + b,
        "crlf": lambda b: b.replace(b"\n", b"\r\n"),
        "nul-byte": lambda b: b.replace(b"[training]", b"[train\x00ing]"),
        "invalid-utf8": lambda b: b.replace(b'"tiny"', b'"\xff\xfe"'),
        "utf16": lambda b: b.decode().encode("utf-16"),
        "duplicate-key": lambda b: b.replace(b"[training]\n", b"[training]\nlr = 0.1\nlr = 0.2\n"),
        "duplicate-section": lambda b: b + b"[training]\nlr = 0.1\n",
        "empty-file": lambda b: b"",
        "binary-noise": lambda b: bytes(range(256)) * 8,
        "deep-nesting": lambda b: b + b"[extra]\nx = " + b"[" * 5000 + b"]" * 5000 + b"\n",
    }.items():
        cases.append((name, ("bytes", transform)))
    return cases


def _option_mutations(prefix: str, base: dict[str, dict[str, Any]], sections: tuple[str, ...]) -> list:
    """Every option of `sections` in `base` set to each hostile value, dropped and misspelt, ids `prefix:...`."""
    cases: list[tuple[str, Any]] = []
    for section in sections:
        for key, value in base[section].items():
            if key == "name":
                continue
            for new in _values_for(value):
                cases.append((f"{prefix}:{section}.{key}={_toml(new)[:24]}", ("set", section, key, new)))
            cases.append((f"{prefix}:{section}.{key}:dropped", ("drop", section, key)))
            cases.append((f"{prefix}:{section}.{key}:misspelt", ("rename", section, key, key + "x")))
    return cases


def _diffusion_mutations() -> list[tuple[str, Any]]:
    """Mutations of what only a diffusion recipe has: the edm objective's and the Heun sampler's options, the
    [sampler] section dropped (the objective's default sampler), a consistency part added (refused)."""
    cases = _option_mutations("edm", DIFFUSION_BASE, ("objective", "sampler"))
    cases.append(("edm:[sampler]:dropped", ("drop", "sampler", None)))
    cases.append(("edm:[sampler]:consistency", ("set", None, "sampler", {"name": "consistency"})))
    for part, name in (("teacher", "no-ema"), ("metric", "l2"), ("curriculum", "constant"),
                       ("noise_schedule", "uniform")):
        cases.append((f"edm:[{part}]:added", ("set", None, part, {"name": name})))
    return cases


def _distillation_mutations() -> list[tuple[str, Any]]:
    """Mutations of the ect schedule's and the consistency objective's options (a curriculum added: refused)
    and of the cd teacher's (its checkpoint path among them)."""
    cases = _option_mutations("ect", ECT_BASE, ("noise_schedule", "objective"))
    cases.append(("ect:[curriculum]:added", ("set", None, "curriculum", {"name": "constant"})))
    return cases + _option_mutations("cd", CD_BASE, ("teacher",))


MUTATIONS = _mutations()
DIFFUSION_MUTATIONS = _diffusion_mutations() + _distillation_mutations()


def _apply(how: tuple, out: Path, base: dict[str, dict[str, Any]] | None = None) -> bytes:
    doc = {s: dict(t) for s, t in (base or BASE).items()}
    kind = how[0]
    if kind == "bytes":
        return how[1](_text(doc, out).encode())
    if kind == "set" and how[1] is None:
        doc[how[2]] = how[3]
    elif kind == "set":
        doc[how[1]][how[2]] = how[3]
    elif kind == "drop" and how[2] is None:
        del doc[how[1]]
    elif kind == "drop":
        del doc[how[1]][how[2]]
    else:
        doc[how[1]][how[3]] = doc[how[1]].pop(how[2])
    return _text(doc, out).encode()


@pytest.fixture
def fast_cli(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The real `ctcore` command, built once and with one registry for the whole corpus (about 15 ms a case)."""
    monkeypatch.setattr(cli, "_registry", lambda: REGISTRY)
    monkeypatch.setattr(typer.testing, "_get_command", lambda _app: COMMAND)
    return CliRunner()


def test_the_corpus_is_large_and_covers_every_key() -> None:
    assert len(MUTATIONS) >= 500
    keys = {(how[1], how[2]) for _, how in MUTATIONS if how[0] == "set" and how[1] is not None}
    assert keys == {(s, k) for s, t in BASE.items() for k in t if (s, k) != ("run", "output_dir")}
    assert len({name for name, _ in MUTATIONS}) == len(MUTATIONS)


WHAT = re.compile(r"([a-z_]+(\.[a-z_0-9]+)?(\[\d+\])?: |(network|metric|noise schedule|curriculum|teacher|objective|"
                  r"sampler) '"
                  r"|invalid TOML: |cannot read the file: )")
"""How a one-line refusal goes on after the file name: `section.key: `, `section: `, a component, or the file."""

ACCEPTED: dict[str, bytes] = {}
"""Mutations `check` accepted, for the run test below (filled as the check cases run)."""


def _base_of(name: str) -> dict[str, dict[str, Any]]:
    return {"edm": DIFFUSION_BASE, "ect": ECT_BASE, "cd": CD_BASE}.get(name.split(":")[0], BASE)


@pytest.mark.parametrize(("name", "how"), MUTATIONS + DIFFUSION_MUTATIONS,
                         ids=[n for n, _ in MUTATIONS + DIFFUSION_MUTATIONS])
def test_check_of_a_mutated_recipe_is_ok_or_one_line(tmp_path: Path, fast_cli: CliRunner, name: str,
                                                     how: tuple) -> None:
    out = tmp_path / "out"
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(_apply(how, out, _base_of(name)))
    (tmp_path / "notes.txt").write_text("a researcher's file next to the recipe\n", encoding="utf-8")
    before = snapshot(tmp_path)
    result = fast_cli.invoke(cli.app, ["check", str(recipe)])
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit) or result.exception is None, repr(result.exception)
    assert snapshot(tmp_path) == before and not out.exists()
    if result.exit_code == 0:
        assert result.stderr.startswith(f"ok: {recipe} is valid;"), result.stderr
        ACCEPTED[name] = recipe.read_bytes()
        return
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"error: {recipe}: "), lines[0]
    first = lines[0].removeprefix(f"error: {recipe}: ")
    if how[0] != "bytes" or len(lines) == 1:  # one changed value or key: one problem, one line naming it
        assert len(lines) == 1 and WHAT.match(first), result.stderr
    else:  # a damaged file can lose several sections: a header, then one line per problem
        assert first == f"{len(lines) - 1} problems in the recipe", result.stderr
        assert all(line.startswith("  ") and WHAT.match(line[2:]) for line in lines[1:]), result.stderr


def test_every_mutation_check_accepts_trains(tmp_path: Path, fast_cli: CliRunner) -> None:
    """Values that pass `check` must not crash the run: each accepted mutation trains 3 steps (at most: a
    dropped or smaller total_steps stays as it is) with exit 0 and finite weights."""
    if not ACCEPTED:  # run alone: find the accepted mutations first
        for name, how in MUTATIONS + DIFFUSION_MUTATIONS:
            recipe = tmp_path / "probe.toml"
            recipe.write_bytes(_apply(how, tmp_path / "never", _base_of(name)))
            if fast_cli.invoke(cli.app, ["check", "--no-build", str(recipe)]).exit_code == 0:
                ACCEPTED[name] = recipe.read_bytes()
    assert len(ACCEPTED) >= 40, sorted(ACCEPTED)
    failures = []
    for i, (name, text) in enumerate(sorted(ACCEPTED.items())):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        recipe = folder / "r.toml"
        out = folder / "out"
        recipe.write_bytes(text.replace(str(tmp_path).encode(), str(folder).encode()))
        doc = tomllib.loads(recipe.read_text(encoding="utf-8-sig"))
        doc.setdefault("run", {})["output_dir"] = str(out)
        training = doc.setdefault("training", {})  # a dropped key falls back to the paper's 400,000 steps
        training["total_steps"] = min(training.get("total_steps", 3), 3)
        recipe.write_text(_text(doc, out), encoding="utf-8")
        result = fast_cli.invoke(cli.app, ["run", str(recipe), "--no-progress"])
        if "Traceback" in result.output or result.exit_code != 0:
            failures.append(f"{name}: exit {result.exit_code}: {result.stderr.strip()[-300:]}")
            continue
        from ctcore.checkpoints import list_checkpoints

        state = torch.load(list_checkpoints(out)[-1], weights_only=True)
        if not all(torch.isfinite(t).all() for t in state["student"].values()):
            failures.append(f"{name}: non-finite weights")
    assert failures == []
