"""Every `--help` of the command line, found by walking the app (so commands added later are covered too), reads
well at 80 columns: no line wider, nothing cut short, no `<bool>` on flags, and argument names from one
vocabulary (RECIPE, CHECKPOINT, RUN_DIR, ...)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from ctcore.cli import app
from ctcore.registry import load_registry

COLUMNS = 80
ARGUMENT_NAMES = {"RECIPE", "CHECKPOINT", "RUN_DIR", "DATASET.h5", "OUT.h5", "OUT.npz", "OUT.pt", "SOURCE", "NAME",
                  "TASK", "OUT.safetensors", "OUT_DIR"}
"""The names arguments may show. A new kind of argument adds its name here, once, so that every command calls
the same thing by the same name."""
CANONICAL = {"recipe": "RECIPE", "recipe_path": "RECIPE", "checkpoint": "CHECKPOINT", "run_dir": "RUN_DIR",
             "run_dirs": "RUN_DIR", "dataset": "DATASET.h5"}
"""Parameter names whose argument must show one name."""


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(command path, click command) of `command` and every command below it."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(typer.main.get_command(app)))


def _is_argument(param: Any) -> bool:
    return param.param_type_name == "argument"


def _flat(text: str) -> str:
    """`text` without any whitespace: wrapping (and click's breaks after hyphens) cannot hide a cut."""
    return "".join(text.split())


def test_the_walk_finds_every_command() -> None:
    assert {" ".join(p) for p in COMMANDS} >= {"", "run", "check", "sample", "eval", "eval-ref-stats", "bench",
                                              "list-components", "data", "data import", "data info",
                                              "data download"}


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "ctcore")
def test_help_reads_well_at_80_columns(path: tuple[str, ...]) -> None:
    command = COMMANDS[path]
    result = CliRunner(env={"COLUMNS": str(COLUMNS)}).invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith(f"Usage: {' '.join(('ctcore', *path))} [OPTIONS]"), out
    wide = [line for line in out.splitlines() if len(line) > COLUMNS]
    assert wide == [], f"lines over {COLUMNS} columns"
    assert not re.search("[…╭╮╰╯│─┃━]", out), "a rich panel (it cuts help short at 80 columns)"
    assert "<bool>" not in out
    flat = _flat(out)
    assert _flat(command.help or "") in flat, "the command's help is cut short"
    for param in command.params:
        if getattr(param, "is_flag", False):
            record = param.get_help_record(typer.Context(command))
            assert record is not None and "<" not in record[0], f"{param.name}: a type shown on a flag: {record}"
        assert _flat(getattr(param, "help", None) or "") in flat, f"{param.name}: its help is cut short"
    for name, sub in getattr(command, "commands", {}).items():
        assert _flat(f"{name}{sub.get_short_help_str(limit=10_000)}") in flat, f"{name}: its summary is cut short"


SUMMARIES = {
    "": "Train consistency models (iCT, CT, CD, ECT) and diffusion models (EDM); sample, edit and evaluate them.",
    "run": "Train a consistency or diffusion model as a recipe describes; writes a run directory.",
    "check": "Validate a recipe, build its components for the data shape, and print it resolved with every default "
             "filled in.",
    "sweep": "Train the grid of --set values, one run after another, each in <sweep dir>/<key=value,...>.",
    "sample": "Generate samples from a checkpoint into an HDF5 store (uint8 images, seeds, labels) and an image grid.",
    "edit": "Edit images zero-shot with a consistency model (inpaint, colorize, superres, stroke) or interpolate "
            "between two seeds' noises; writes an HDF5 store and a grid (docs/editing.md).",
    "eval": "FID and Inception Score of a checkpoint's eval-EMA samples against reference statistics, or (--metric "
            "sliced-wasserstein) their distance to the training data.",
    "eval-ref-stats": "Inception statistics (mu, sigma) of every image of a dataset, for ctcore eval --ref; the file "
                      "records the FID protocol, and eval refuses to compare it with features made under another.",
    "search-sigmas": "Find the intermediate sigmas of a consistency model's multistep sampling by golden-section "
                     "search on a distance, one at a time, with the same seeds in every evaluation; prints every "
                     "evaluation, the best and the sigma_mid line to paste into the recipe's [sampling], and plots "
                     "distance against sigma.",
    "bench": "Time the recipe's real training step and one network evaluation per image (one-step sampling) on "
             "random data of its shape.",
    "list-components": "List installed components: kind, name, summary and the distribution that provides them.",
    "report": "Plot loss, distance (FID, IS when logged) and img/s against steps for one or more runs, and print a "
              "table of their final figures.",
    "data": "Import, inspect and download training datasets (HDF5: uint8 images (N, C, H, W), labels, attrs).",
    "data import": "Convert a dataset into ctcore's training format (what data.path in a recipe points at).",
    "data info": "Count, image shape, classes with per-class counts, and where the data came from.",
    "data download": "Download a dataset's official archive and verify its SHA-256; then run `ctcore data import` on "
                     "it.",
    "convert": "Import models trained elsewhere as ctcore checkpoints (for ctcore sample, edit, eval and run "
               "--init-from).",
    "convert openai-cm": "Convert a released OpenAI consistency model into a ctcore checkpoint (its weights as eval "
                         "EMA).",
    "convert edm": "Convert an EDM network pickle into a ctcore diffusion checkpoint (its EMA weights, its "
                   "preconditioning).",
    "export": "Write ctcore models for use elsewhere: safetensors weights with their recipe, or a diffusers pipeline.",
    "export safetensors": "Write a checkpoint's network weights as a .safetensors file with its recipe and provenance "
                          "as metadata (ctcore's commands read it like a checkpoint).",
    "export diffusers": "Write a consistency model as a diffusers ConsistencyModelPipeline folder (UNet2DModel and "
                        "CMStochasticIterativeScheduler) that ConsistencyModelPipeline.from_pretrained loads.",
}
"""What `ctcore --help` and each group's help say every command does, word for word: a new command adds its line,
and a change of what a command does changes its line here (ctcore trains diffusion models too, not only consistency
models; search-sigmas and edit work on consistency models only)."""


def test_every_command_says_what_it_does() -> None:
    assert {" ".join(p): c.get_short_help_str(limit=10_000) for p, c in COMMANDS.items()} == SUMMARIES


OPTION_HELP = {
    ("run", "--init-from"): "Start the network from another run's weights (a checkpoint, or a run directory: its "
                            "newest); the optimizer, the step, the curriculum (if any) and the random streams start "
                            "fresh.",
    ("run", "--device"): "cpu, cuda or auto: the recipe's run.device for this command.",
    ("sample", "--device"): "cpu, cuda, cuda:N or auto (default: the recipe's run.device).",
    ("eval-ref-stats", "--device"): "cpu, cuda, cuda:N or auto.",
}
"""Option help that once said something untrue (ECT and EDM have no curriculum), pinned."""


@pytest.mark.parametrize(("path", "option"), list(OPTION_HELP), ids=[f"{p} {o}" for p, o in OPTION_HELP])
def test_option_help_says_what_applies(path: str, option: str) -> None:
    [param] = [p for p in COMMANDS[tuple(path.split())].params if option in p.opts]
    assert param.help == OPTION_HELP[path, option]


@pytest.mark.parametrize("path", [p for p, c in COMMANDS.items() if any(_is_argument(a) for a in c.params)],
                         ids=lambda p: " ".join(p))
def test_arguments_have_one_name_for_one_thing(path: tuple[str, ...]) -> None:
    for arg in (a for a in COMMANDS[path].params if _is_argument(a)):
        metavar = arg.metavar or arg.name
        assert metavar is not None and set(metavar.removesuffix("...").split("|")) <= ARGUMENT_NAMES, (
            f"argument {arg.name!r} shows {metavar!r}: set metavar= to one of {sorted(ARGUMENT_NAMES)} (or add a "
            "new name to ARGUMENT_NAMES)")
        if arg.name in CANONICAL:
            assert metavar.removesuffix("...") == CANONICAL[arg.name], (arg.name, metavar)


def test_list_components_options_reads_well_at_80_columns() -> None:
    result = CliRunner(env={"COLUMNS": str(COLUMNS)}).invoke(app, ["list-components", "--options"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line for line in lines if len(line) > COLUMNS] == []
    assert "…" not in result.stdout
    for row in load_registry().rows():  # every component, its summary and each option with its range, in full
        block = _flat(result.stdout.split(f'[{row["kind"]}] name = "{row["name"]}"', 1)[1].split("\n\n", 1)[0])
        assert _flat(row["summary"]) in block
        for key in row["options"]:
            assert _flat(f"{key} = ") in block and _flat(row["ranges"].get(key, "")) in block, (row["name"], key)


@pytest.mark.parametrize("path", [p for p, c in COMMANDS.items() if hasattr(c, "commands")],
                         ids=lambda p: " ".join(p) or "ctcore")
def test_a_group_without_a_command_prints_its_help(path: tuple[str, ...]) -> None:
    runner = CliRunner(env={"COLUMNS": str(COLUMNS)})
    bare, help_ = runner.invoke(app, list(path)), runner.invoke(app, [*path, "--help"])
    assert (bare.exit_code, bare.stdout, bare.stderr) == (2, help_.stdout, "")
