"""The `ctcore` command line: help, list-components, check, run (fresh, refused, resumed), and clean failures
for bad recipes, missing data, corrupt checkpoints and missing plugins: an exit code and a message, never a
traceback."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import torch
from helpers import one_line_error, snapshot, tiny_recipe_text, write_tiny_recipe
from PIL import Image
from plugin_env import BUILTINS, EXAMPLE_PLUGIN_DIR, REPO_ROOT, fake_distribution
from typer.testing import CliRunner, Result

import ctcore
from ctcore.cli import app
from ctcore.components import KINDS
from ctcore.recipe import parse_recipe, read_recipe
from ctcore.registry import DISABLE_ENV, load_registry

RECIPES = sorted((REPO_ROOT / "recipes").glob("**/*.toml"))
QUICKSTART = REPO_ROOT / "recipes" / "quickstart.toml"
CTCORE_VERSION = md.version("ctcore")
CHECKPOINTS = ["ckpt-000000006.pt", "ckpt-000000012.pt"]
SAMPLE_PNGS = ["step-0000006-1step.png", "step-0000006-2step.png", "step-0000012-1step.png", "step-0000012-2step.png"]
WIDE = {"COLUMNS": "200"}  # rich tables and help: no wrapping
SUBPROCESS_ENV = {**{k: v for k, v in os.environ.items() if k != "CTCORE_DISABLE_PLUGINS"}, **WIDE}


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner(env=env).invoke(app, [str(a) for a in args])


def assert_clean_failure(result: Result, code: int) -> list[str]:
    """A handled failure: the exit code, no exception escaped, no traceback; returns the stderr lines."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ")
    return result.stderr.splitlines()


def table_rows(output: str) -> list[list[str]]:
    """The body rows of a rich table as lists of stripped cells; a cell folded over several lines (a long path)
    is joined again, its continuation lines being those whose first cell is empty."""
    rows: list[list[str]] = []
    for line in output.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if rows and not cells[0] and len(cells) == len(rows[-1]):
            rows[-1] = [a + b for a, b in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    return rows


# ----------------------------------------------------------------------------------------------- help


def test_help_lists_every_command() -> None:
    result = invoke("--help", env=WIDE)
    assert result.exit_code == 0, result.output
    assert ("Train consistency models (iCT, CT, CD, ECT) and diffusion models (EDM); sample, edit and evaluate "
            "them.") in " ".join(result.stdout.split())
    panel = result.stdout.split("\nCommands:\n", 1)[1]
    commands = [m.group(1) for m in re.finditer(r"^  (\S+)\s{2,}", panel, re.MULTILINE)]
    assert commands == ["run", "check", "sweep", "sample", "edit", "eval", "eval-ref-stats", "search-sigmas",
                        "bench", "list-components", "report", "data", "convert", "export"]


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("run", ["--resume", "--output-dir", "--progress"]),
        ("check", ["--build", "--no-build"]),
        ("sample", ["--num-samples", "--steps", "--sigmas", "--seed", "--out", "--grid", "--weights",
                    "--batch-size", "--overwrite"]),
        ("list-components", ["--kind", "--options", "--json"]),
    ],
)
def test_each_command_has_help(command: str, options: list[str]) -> None:
    result = invoke(command, "--help", env=WIDE)
    assert result.exit_code == 0, result.output
    assert f"Usage: ctcore {command} [OPTIONS]" in result.stdout
    for option in options:
        assert re.search(rf"{re.escape(option)}\b", result.stdout), option


# ------------------------------------------------------------------------------------- list-components


def test_list_components_shows_every_builtin_and_its_provider() -> None:
    result = invoke("list-components", env=WIDE)
    assert result.exit_code == 0, result.output
    assert result.stdout.lstrip().startswith("ctcore components")
    rows = {(r[0], r[1]): r for r in table_rows(result.stdout)}
    for kind, names in BUILTINS.items():
        for name in names:
            assert (kind, name) in rows, (kind, name)
            assert rows[(kind, name)][3] == f"ctcore {CTCORE_VERSION}"
            assert rows[(kind, name)][2], "summary is empty"
    assert rows[("metric", "pseudo-huber")][2] == (
        "iCT Pseudo-Huber distance sqrt(||x-y||^2 + c^2) - c on the whole sample"
    )


def test_list_components_kind_filters() -> None:
    result = invoke("list-components", "--kind", "metric", env=WIDE)
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    assert {r[0] for r in rows} == {"metric"}
    assert sorted(r[1] for r in rows) == sorted(load_registry().names("metric"))
    assert {"l2", "pseudo-huber"} <= {r[1] for r in rows}


def test_list_components_options_shows_defaults() -> None:
    result = invoke("list-components", "--kind", "noise_schedule", "--options", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\n\n") == [
        '[noise_schedule] name = "ect"  (ctcore 0.1.0)\n'
        "  ECT continuous pairs: t lognormal, r = t (1 - n(t)/q^a), a grows every d steps\n"
        "  p_mean = -1.1  # in [-5, 5]\n"
        "  p_std = 2.0  # in [0.01, 10]\n"
        "  q = 2.0  # in (1, 1000]\n"
        "  k = 8.0  # in [0, 1000]\n"
        "  b = 1.0  # in [0, 1000]\n"
        "  d = 25_000  # in [1, 1_000_000_000]",
        '[noise_schedule] name = "lognormal"  (ctcore 0.1.0)\n'
        "  iCT pair sampling: lognormal mass on [sigma_i, sigma_{i+1}]\n"
        "  p_mean = -1.1  # in [-20, 20]\n"
        "  p_std = 2.0  # in [0.01, 100]",
        '[noise_schedule] name = "uniform"  (ctcore 0.1.0)\n'
        "  CT pair sampling: every adjacent pair equally likely\n"
        "  (no options)\n",
    ]
    metric = invoke("list-components", "--kind", "metric", "--options", env={"COLUMNS": "80"}).stdout
    assert "  c = (computed when omitted; ctcore check shows it)  # in [1e-08, 1000]\n" in metric


def test_list_components_json() -> None:
    result = invoke("list-components", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert all(set(r) == {"kind", "name", "summary", "distribution", "version", "options", "ranges"} for r in rows)
    by_name = {(r["kind"], r["name"]): r for r in rows}
    for kind, names in BUILTINS.items():
        for name in names:
            assert by_name[(kind, name)]["distribution"] == "ctcore"
            assert by_name[(kind, name)]["version"] == CTCORE_VERSION
    assert by_name[("noise_schedule", "lognormal")]["options"] == {"p_mean": -1.1, "p_std": 2.0}
    assert by_name[("curriculum", "exponential")]["options"] == {"s0": 10, "s1": 1280}
    assert by_name[("metric", "pseudo-huber")]["options"] == {"c": None}
    assert by_name[("metric", "l2")]["options"] == {}
    assert by_name[("noise_schedule", "lognormal")]["ranges"] == {"p_mean": "in [-20, 20]", "p_std": "in [0.01, 100]"}
    assert by_name[("network", "ncsnpp")]["ranges"]["ch_mult"] == "1 to 12 entries, each in [1, 64]"

    metrics = json.loads(invoke("list-components", "--json", "--kind", "metric").stdout)
    assert metrics == [r for r in rows if r["kind"] == "metric"]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("bogus", "unknown component kind 'bogus' (available: curriculum, logger, metric, network, noise_schedule, "
                  "objective, sampler, teacher)"),
        ("metrc", "unknown component kind 'metrc'; did you mean 'metric'? (available: curriculum, logger, metric, "
                  "network, noise_schedule, objective, sampler, teacher)"),
        ("noise-schedule", "unknown component kind 'noise-schedule'; did you mean 'noise_schedule'? (available: "
                           "curriculum, logger, metric, network, noise_schedule, objective, sampler, teacher)"),
    ],
)
def test_list_components_unknown_kind_exits_2(kind: str, message: str) -> None:
    result = invoke("list-components", "--kind", kind)
    assert assert_clean_failure(result, 2) == [f"error: {message}"]
    assert result.stdout == ""


# ----------------------------------------------------------------------------------------------- check


FROM_RUNS = {  # recipes that start from another run's checkpoint, which a fresh checkout does not have yet
    "quickstart_cd.toml": "run.init_from: 'runs/quickstart_diffusion' not found",
    "quickstart_ect.toml": "run.init_from: 'runs/quickstart_diffusion' not found",
    "cd_cifar10.toml": "run.init_from: 'models/edm-cifar10-32x32-uncond-ve.pt' not found",
    "ect_cifar10.toml": "run.init_from: 'models/edm-cifar10-32x32-uncond-vp.pt' not found",
    "sct_cifar10.toml": "run.init_from: 'runs/trigflow-cifar10' not found",
    "scd_cifar10.toml": "run.init_from: 'runs/trigflow-cifar10' not found",
}


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.name in FROM_RUNS],
                         ids=[p.name for p in RECIPES if p.name in FROM_RUNS])
def test_a_recipe_that_starts_from_another_run_names_the_missing_run_in_one_line(recipe: Path) -> None:
    """Before its diffusion run exists, `check` stops at run.init_from, which names it (exit 2); with --no-build
    the recipe itself is valid. tests/test_quickstart_sequence.py checks the toy ones once their run exists."""
    line = one_line_error(invoke("check", recipe))
    assert line == (f"{recipe}: {FROM_RUNS[recipe.name]}; train that run (or convert that model) first, "
                    "or give run.init_from the checkpoint file or run directory of an existing run"), line
    result = invoke("check", recipe, "--no-build")
    assert result.exit_code == 0, result.output
    assert parse_recipe(result.stdout, load_registry(), source=str(recipe)) == read_recipe(recipe, load_registry())


FROM_TEACHERS = {  # sCD recipes: their diffusion teacher is another run (or a converted model) not there yet
    "quickstart_scd.toml": "runs/quickstart_diffusion",
}


@pytest.mark.parametrize("name", sorted(FROM_TEACHERS))
def test_a_recipe_whose_teacher_is_missing_names_it_in_one_line(name: str) -> None:
    """Before its teacher exists, `check` stops at teacher.checkpoint, which names it (exit 2); with --no-build
    the recipe itself is valid."""
    recipe = REPO_ROOT / "recipes" / name
    line = one_line_error(invoke("check", recipe))
    assert line == (f"{recipe}: teacher.checkpoint: '{FROM_TEACHERS[name]}' not found; train the diffusion model "
                    "first (a recipe with objective 'edm' or 'trigflow' whose "
                    "run writes it), or set teacher.checkpoint to the run directory or checkpoint file of a run "
                    "with objective 'edm' or 'trigflow'"), line
    result = invoke("check", recipe, "--no-build")
    assert result.exit_code == 0, result.output
    assert parse_recipe(result.stdout, load_registry(), source=str(recipe)) == read_recipe(recipe, load_registry())


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.name not in FROM_RUNS | FROM_TEACHERS],
                         ids=[p.name for p in RECIPES if p.name not in FROM_RUNS | FROM_TEACHERS])
def test_every_shipped_recipe_passes_check_and_prints_itself_resolved(recipe: Path) -> None:
    result = invoke("check", recipe)
    assert result.exit_code == 0, result.output
    registry = load_registry()
    assert result.stdout.startswith(f"# resolved from {recipe}\n")
    assert parse_recipe(result.stdout, registry, source=str(recipe)) == read_recipe(recipe, registry)
    assert re.fullmatch(
        rf"ok: {re.escape(str(recipe))} is valid; network \S+ has [\d,]+ parameters; "
        r"(synthetic data, [\d,]+ images of shape \(\d+, \d+, \d+\)"
        r"|data file '[^']+' does not exist yet: create it before training \(.*\)); "
        r"training needs about [\d.]+ [KMGT]iB in one process \(.*(activations [\d.]+ [KMGT]iB for [\d,]+ images at "
        r"[\d.]+ [KMGT]iB each|rollback copy [\d.]+ [KMGT]iB).*\)\n",
        result.stderr,
    ), result.stderr


def test_check_quickstart() -> None:
    result = invoke("check", QUICKSTART)
    assert result.exit_code == 0, result.output
    registry = load_registry()
    recipe = parse_recipe(result.stdout, registry, source=str(QUICKSTART))
    assert recipe == read_recipe(QUICKSTART, registry)
    assert recipe.components["network"].name == "mlp"
    assert recipe.training.total_steps == 1000
    assert recipe.sampling.sigma_mid == (0.821,)
    assert re.fullmatch(
        rf"ok: {re.escape(str(QUICKSTART))} is valid; network mlp has [\d,]+ parameters; "
        r"synthetic data, 20,000 images of shape \(3, 8, 8\); training needs about [\d.]+ MiB in one process "
        r"\(data loading [\d.]+ MiB, evaluation on the host [\d.]+ MiB, rollback copy 12.1 MiB\)\n",
        result.stderr,
    ), result.stderr


def test_check_fills_in_every_default(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", tmp_path / "out")
    result = invoke("check", recipe, "--no-build")
    assert result.exit_code == 0, result.output
    assert result.stderr == f"ok: {recipe} is valid; components not built (--no-build)\n"
    for line in ["sigma_max = 80.0", "rho = 7.0", 'optimizer = "radam"', "betas = [0.9, 0.999]",
                 'distance = "sliced-wasserstein"', "p_mean = -1.1", "fourier_scale = 0.02", "clip = true",
                 # Pseudo-Huber's c, computed for the data shape (3, 4, 4): a value, not "not set"
                 f"# c = {0.00054 * math.sqrt(48)!r}  (computed: 0.00054 * sqrt(3*4*4); omitted from the recipe)"]:
        assert f"\n{line}\n" in result.stdout, line
    assert "not set" not in result.stdout
    assert "[evaluation]\n" in result.stdout
    assert not (tmp_path / "out").exists()


BAD_RECIPES = {
    "malformed-toml": (
        '[run]\nname = "x"\nseed = = 3\n',
        ["invalid TOML: Invalid value (at line 3, column 8)"],
    ),
    "unknown-key": (
        tiny_recipe_text("OUT", run={"sed": 1}, training={"learning_rate": 1.0}),
        ["run.sed: unknown key; did you mean 'seed'?",
         "training.learning_rate: unknown key (known keys: total_steps, batch_size, micro_batch_size, optimizer, lr, "
         "betas, eps, "
         "weight_decay, warmup_steps, grad_clip, eval_ema_decay, precision, compile, log_every, checkpoint_every, "
         "sample_every, keep_checkpoints, max_nonfinite_steps)"],
    ),
    "wrong-type": (
        tiny_recipe_text("OUT", training={"total_steps": 1.5, "batch_size": "big"}, sampling={"clip": "yes"}),
        ["training.total_steps: expected an integer, got 1.5 (a float)",
         "training.batch_size: expected an integer, got 'big' (a string)",
         "sampling.clip: expected true or false, got 'yes' (a string)"],
    ),
}


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_a_bad_recipe_gives_one_line_per_problem_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, command: str
) -> None:
    monkeypatch.chdir(tmp_path)
    text, problems = BAD_RECIPES[case]
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text.replace("OUT", str(tmp_path / "out")), encoding="utf-8")
    result = invoke(command, recipe)
    lines = assert_clean_failure(result, 2)
    n = len(problems)
    assert lines == ([f"error: {recipe}: {problems[0]}"] if n == 1 else
                     [f"error: {recipe}: {n} problems in the recipe", *(f"  {p}" for p in problems)])
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]  # no run directory, no ./runs


def test_a_missing_recipe_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    lines = assert_clean_failure(invoke("check", missing), 2)
    assert lines == [f"error: {missing}: file not found; check the path (recipes live in recipes/)"]


def test_a_bad_recipe_in_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[run]\nname = "x"\nseed = = 3\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "ctcore", "check", str(recipe)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=SUBPROCESS_ENV)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == f"error: {recipe}: invalid TOML: Invalid value (at line 3, column 8)\n"


# ------------------------------------------------------------------------------------------------- run


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Result]:
    """(recipe, run directory, result) of one tiny run through `ctcore run` with the default progress bar;
    tests that write into the run copy it first."""
    root = tmp_path_factory.mktemp("finished")
    recipe = write_tiny_recipe(root / "tiny.toml", root / "run")
    result = invoke("run", recipe)
    return recipe, root / "run", result


@pytest.fixture
def run_copy(finished: tuple[Path, Path, Result], tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished[1], tmp_path / "run"))


def test_run_exits_0_and_reports(finished: tuple[Path, Path, Result]) -> None:
    _, run_dir, result = finished
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert result.stdout.startswith(f"run directory: {run_dir}  (device cpu, precision fp32)\n")
    rows = {r[0]: r[1] for r in table_rows(result.stdout)}
    assert rows["steps"] == "0 -> 12"
    assert rows["run directory"] == str(run_dir)
    assert "Traceback" not in result.output


def test_run_writes_the_run_directory(finished: tuple[Path, Path, Result]) -> None:
    _, run_dir, _ = finished
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints", "provenance.json", "recipe.toml", "samples", "stats.jsonl"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == CHECKPOINTS
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == SAMPLE_PNGS
    for png in SAMPLE_PNGS:
        with Image.open(run_dir / "samples" / png) as img:
            img.verify()
            assert img.format == "PNG"
    state = torch.load(run_dir / "checkpoints" / CHECKPOINTS[-1], map_location="cpu", weights_only=True)
    assert state["format"] == "ctcore-checkpoint-1" and state["step"] == 12


def test_run_stores_the_resolved_recipe(finished: tuple[Path, Path, Result]) -> None:
    recipe_path, run_dir, _ = finished
    registry = load_registry()
    text = (run_dir / "recipe.toml").read_text(encoding="utf-8")
    assert text.startswith(f"# resolved from {recipe_path}\n")
    stored = parse_recipe(text, registry, source="stored")
    assert attrs.evolve(stored, source=str(recipe_path)) == read_recipe(recipe_path, registry)


def test_run_writes_provenance(finished: tuple[Path, Path, Result]) -> None:
    recipe_path, run_dir, _ = finished
    prov = json.loads((run_dir / "provenance.json").read_text(encoding="utf-8"))
    assert prov["ctcore"] == ctcore.__version__
    assert prov["torch"] == str(torch.__version__)
    assert prov["python"] == platform.python_version()
    assert prov["data_shape"] == [3, 4, 4] and prov["num_classes"] == 0
    recipe = read_recipe(recipe_path, load_registry())
    assert set(prov["components"]) == set(KINDS)
    for kind in KINDS:
        assert prov["components"][kind] == {"name": recipe.components[kind].name, "distribution": "ctcore",
                                            "version": CTCORE_VERSION}


def test_run_logs_stats(finished: tuple[Path, Path, Result]) -> None:
    _, run_dir, _ = finished
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text(encoding="utf-8").splitlines()]
    training = [r for r in records if "event" not in r]
    assert [r["step"] for r in training] == [2, 4, 6, 8, 10, 12]
    assert all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) and r["loss"] > 0 for r in training)
    curriculum = load_registry().create("curriculum", "exponential", total_steps=12, s0=2, s1=8)
    assert [r["num_scales"] for r in training] == [curriculum.num_scales(r["step"] - 1) for r in training]
    assert [r["num_scales"] for r in training] == [3, 3, 5, 5, 9, 9]
    distances = [r for r in records if r.get("event") == "distance"]
    assert [r["step"] for r in distances] == [0, 12]
    assert all(isinstance(r["sliced_wasserstein"], float) and r["sliced_wasserstein"] > 0 for r in distances)
    assert [r["step"] for r in records if r.get("event") == "checkpoint"] == [6, 12]
    assert [r["step"] for r in records if r.get("event") == "samples"] == [6, 12]


def test_running_into_an_existing_run_exits_1_and_changes_nothing(
    finished: tuple[Path, Path, Result], run_copy: Path
) -> None:
    recipe_path = finished[0]
    before = snapshot(run_copy)
    result = invoke("run", recipe_path, "--output-dir", run_copy, "--no-progress")
    assert assert_clean_failure(result, 1) == [
        f"error: output directory {str(run_copy)!r} is not empty (it holds an earlier run); it finished at step 12: "
        f"extend it with `ctcore run {run_copy} --resume --set training.total_steps=...`, or choose another "
        "directory with --output-dir (or run.output_dir), or delete it"
    ]
    assert result.stdout == ""
    assert snapshot(run_copy) == before


def test_running_into_a_non_empty_directory_without_checkpoints_does_not_suggest_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", out)
    lines = assert_clean_failure(invoke("run", recipe, "--no-progress"), 1)
    assert lines == [f"error: output directory {str(out)!r} is not empty (it holds an earlier run); choose another "
                     "directory with --output-dir (or run.output_dir), or delete it"]
    assert snapshot(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_run_on_a_directory_without_resume_exits_2(run_copy: Path) -> None:
    before = snapshot(run_copy)
    lines = assert_clean_failure(invoke("run", run_copy), 2)
    assert lines == [f"error: {str(run_copy)!r} is a directory: give a recipe file, or add --resume"]
    assert snapshot(run_copy) == before


def test_an_output_dir_that_is_a_file_exits_1(tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.write_text("a file", encoding="utf-8")
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", tmp_path / "out")
    result = invoke("run", recipe, "--output-dir", occupied, "--no-progress")
    assert_clean_failure(result, 1)
    assert occupied.read_text(encoding="utf-8") == "a file"


def test_resume_of_a_finished_run_has_nothing_to_do(run_copy: Path) -> None:
    before = snapshot(run_copy)
    result = invoke("run", run_copy, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"{run_copy} already finished at step 12; nothing to do (extend it with `ctcore run "
                             f"{run_copy} --resume --set training.total_steps=...`)\n")
    assert snapshot(run_copy) == before


def test_resume_continues_from_the_latest_checkpoint_exactly(finished: tuple[Path, Path, Result],
                                                             run_copy: Path) -> None:
    (run_copy / "checkpoints" / CHECKPOINTS[-1]).unlink()
    result = invoke("run", run_copy, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"resuming {run_copy} at step 6\n")
    assert {r[0]: r[1] for r in table_rows(result.stdout)}["steps"] == "6 -> 12"
    original = torch.load(finished[1] / "checkpoints" / CHECKPOINTS[-1], weights_only=True)
    resumed = torch.load(run_copy / "checkpoints" / CHECKPOINTS[-1], weights_only=True)
    assert resumed["step"] == 12
    for key in ("student", "eval_ema"):
        assert original[key].keys() == resumed[key].keys()
        assert all(torch.equal(original[key][k], resumed[key][k]) for k in original[key]), key


def _summary(result: Result) -> tuple[str, list[str]]:
    """The distance row of a run's summary table (printed at 300 columns: one line) and its warning lines."""
    assert result.exit_code == 0, result.output
    rows = {r[0]: r[1] for r in table_rows(result.stdout)}
    return rows["sliced Wasserstein to data"], [ln for ln in result.stdout.splitlines() if ln.startswith("warning:")]


def _distances(run_dir: Path) -> dict[int, float]:
    """{step: distance} of a run's stats.jsonl (the last of each step), whole records only."""
    found = {}
    for line in (run_dir / "stats.jsonl").read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line a test damaged on purpose
            continue
        if record.get("event") == "distance" and "sliced_wasserstein" in record:
            found[record["step"]] = record["sliced_wasserstein"]
    return found


@pytest.mark.parametrize(("at_resume", "verdict"), [(9.0, "better"), (0.0001, "worse")])
def test_the_summary_of_an_extended_run_compares_its_end_with_the_distance_at_the_resume(
        run_copy: Path, at_resume: float, verdict: str) -> None:
    """The finished 12-step run extended to 40 steps: the row compares the end with the last distance logged at or
    before step 12 in stats.jsonl (here a record appended after the real one, so that the run must come out better,
    or worse), read past damaged lines and a record of a later step; a regression is called one."""
    with (run_copy / "stats.jsonl").open("ab") as stats:
        stats.write(f'{{"event": "distance", "step": 12, "sliced_wasserstein": {at_resume}}}\n'.encode()
                    + b'\xff\xfe{"event": "distance", "step": 12}\n{"event": "distance", "step": 30, '
                    b'"sliced_wasserstein": 0.5}\n{"event": "distance", "step": 12, "sliced_wasser')
    row, warnings = _summary(invoke("run", run_copy, "--resume", "--set", "training.total_steps=40",
                                    "--no-progress", env={"COLUMNS": "300"}))
    now = _distances(run_copy)[40]
    ratio = at_resume / now if verdict == "better" else now / at_resume
    assert row == f"at resume (step 12) {at_resume:.4f} -> now {now:.4f} ({ratio:.2f}x {verdict})"
    assert warnings == []


def test_a_summary_whose_eval_ema_could_not_move_says_so_instead_of_better(tmp_path: Path) -> None:
    """A 40-step smoke run with the paper recipes' eval EMA decay 0.99993 (half-life 9,902 steps) holds 0.28% of
    its training, so the summary gives no verdict and warns; extending a run by 2 steps at decay 0.9 (half-life
    7 steps) alike."""
    recipe = write_tiny_recipe(tmp_path / "smoke.toml", tmp_path / "smoke",
                               training={"total_steps": 40, "eval_ema_decay": 0.99993})
    row, warnings = _summary(invoke("run", recipe, "--no-progress", env={"COLUMNS": "300"}))
    d = _distances(tmp_path / "smoke")
    assert row == (f"untrained {d[0]:.4f} -> trained {d[40]:.4f} (no verdict: the eval EMA holds 0.28% of the "
                   "training, see the warning)")
    assert warnings == [
        "warning: the eval EMA (training.eval_ema_decay = 0.99993) has a half-life of 9,902 steps; after the 40 "
        "steps of this run it holds 0.28% of their training, so its distance and samples show little of it: train "
        "longer, or lower training.eval_ema_decay for a smoke run"]
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", tmp_path / "tiny")
    assert _summary(invoke("run", recipe, "--no-progress", env={"COLUMNS": "300"}))[1] == []  # 12 steps: 72%
    row, warnings = _summary(invoke("run", tmp_path / "tiny", "--resume", "--set", "training.total_steps=14",
                                    "--no-progress", env={"COLUMNS": "300"}))
    d = _distances(tmp_path / "tiny")
    assert row == (f"at resume (step 12) {d[12]:.4f} -> now {d[14]:.4f} (no verdict: the eval EMA holds 19% of the "
                   "training since the resume, see the warning)")
    assert warnings == [
        "warning: the eval EMA (training.eval_ema_decay = 0.9) has a half-life of 7 steps; after the 2 steps since "
        "the resume at step 12 it holds 19% of their training, so its distance and samples show little of it: "
        "train longer, or lower training.eval_ema_decay for a smoke run"]


def test_a_fresh_run_that_ends_farther_from_the_data_is_called_worse(finished: tuple[Path, Path, Result]) -> None:
    """The summary's fresh-run row, for a run that ended farther from the data than it started (the summary as
    train() returns it, printed by the CLI's summary): `(1.5x worse)`, never `0.7x better`."""
    from io import StringIO

    from rich.console import Console

    from ctcore.build import build_run
    from ctcore.cli import _print_summary

    recipe, run_dir, _ = finished
    run = build_run(read_recipe(recipe, load_registry()), load_registry(), run_dir)
    out = StringIO()
    _print_summary(Console(file=out, width=300), run, {"start_step": 0, "step": 12, "seconds": 1.0, "loss": 0.5,
                                                       "initial_distance": 0.2, "final_distance": 0.3,
                                                       "eval_ema_moved": 0.72, "warnings": []})
    assert {r[0]: r[1] for r in table_rows(out.getvalue())}["sliced Wasserstein to data"] == (
        "untrained 0.2000 -> trained 0.3000 (1.5x worse)")


def test_resume_with_the_same_recipe_continues(finished: tuple[Path, Path, Result], run_copy: Path) -> None:
    (run_copy / "checkpoints" / CHECKPOINTS[-1]).unlink()
    recipe = write_tiny_recipe(run_copy.parent / "same.toml", finished[1])  # output_dir as in the stored recipe
    result = invoke("run", recipe, "--resume", "--output-dir", run_copy, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"resuming {run_copy} at step 6\n")
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == CHECKPOINTS


def test_resume_with_a_changed_recipe_exits_2_and_names_the_change(
    finished: tuple[Path, Path, Result], run_copy: Path
) -> None:
    recipe = write_tiny_recipe(run_copy.parent / "changed.toml", finished[1], training={"lr": 2e-3})
    before = snapshot(run_copy)
    result = invoke("run", recipe, "--resume", "--output-dir", run_copy, "--no-progress")
    assert assert_clean_failure(result, 2) == [
        f"error: {recipe} differs from the recipe of the run in {str(run_copy)!r}, so it cannot resume it:",
        "  training.lr: 0.001 -> 0.002",
        "resume with the run directory instead of a recipe, or start a new run",
    ]
    assert snapshot(run_copy) == before


def test_a_changed_key_is_named_with_its_section(finished: tuple[Path, Path, Result], run_copy: Path) -> None:
    recipe = write_tiny_recipe(run_copy.parent / "changed.toml", finished[1], sampling={"num_samples": 8})
    result = invoke("run", recipe, "--resume", "--output-dir", run_copy, "--no-progress")
    lines = assert_clean_failure(result, 2)
    assert "  sampling.num_samples: 4 -> 8" in lines, lines


def test_resume_without_checkpoints_exits_1(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    lines = assert_clean_failure(invoke("run", empty, "--resume", "--no-progress"), 1)
    assert lines == [f"error: nothing to resume: {str(empty / 'checkpoints')!r} holds no checkpoint (ckpt-*.pt)"]
    assert list(empty.iterdir()) == []


# --------------------------------------------------------------------------------------- missing dataset


def test_a_missing_dataset_exits_1_and_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "train.h5"
    recipe = write_tiny_recipe(tmp_path / "hdf5.toml", tmp_path / "out", data={"source": "hdf5", "path": str(data)})
    expected = [
        f"error: dataset file {str(data)!r} (data.path in the recipe) not found; create it with `ctcore data import "
        f"SOURCE {data}` (SOURCE: cifar-10-python.tar.gz from `ctcore data download cifar10`, an image folder, zip "
        "or tar with one subfolder per class, or ImageNet 64x64 .npz batches), or point data.path at an existing file"
    ]
    result = invoke("run", recipe, "--no-progress")
    assert assert_clean_failure(result, 1) == expected
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hdf5.toml"]  # no run directory, no ./runs

    # check validates a recipe whose data does not exist yet (the paper recipes ship that way) and says so
    result = invoke("check", recipe)
    assert result.exit_code == 0 and result.stdout.startswith(f"# resolved from {recipe}\n")
    assert "does not exist yet: create it before training" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hdf5.toml"]


def test_a_missing_dataset_in_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    data = tmp_path / "train.h5"
    recipe = write_tiny_recipe(tmp_path / "hdf5.toml", tmp_path / "out", data={"source": "hdf5", "path": str(data)})
    proc = subprocess.run([sys.executable, "-m", "ctcore", "run", str(recipe), "--no-progress"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=SUBPROCESS_ENV)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: dataset file {str(data)!r} (data.path in the recipe) not found; ")
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ corrupt checkpoints


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_sampling_a_corrupt_checkpoint_exits_1(run_copy: Path) -> None:
    ckpt = run_copy / "checkpoints" / CHECKPOINTS[-1]
    corrupt(ckpt)
    for target in (ckpt, run_copy):  # the file itself, or the run whose latest checkpoint it is
        result = invoke("sample", target, "-n", "2")
        lines = assert_clean_failure(result, 1)
        assert len(lines) == 1
        assert lines[0].startswith(f"error: checkpoint {str(ckpt)!r} is corrupt or not a ctcore checkpoint (")
        assert lines[0].endswith("); use an earlier file in its checkpoints/ folder")
    assert sorted(p.name for p in (run_copy / "samples").iterdir()) == SAMPLE_PNGS


def test_resuming_from_a_corrupt_checkpoint_exits_1(run_copy: Path) -> None:
    ckpt = run_copy / "checkpoints" / CHECKPOINTS[-1]
    corrupt(ckpt)
    before = snapshot(run_copy)
    result = invoke("run", run_copy, "--resume", "--no-progress")
    lines = assert_clean_failure(result, 1)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: checkpoint {str(ckpt)!r} is corrupt")
    assert result.stdout == ""
    assert snapshot(run_copy) == before


def test_a_file_that_is_not_a_checkpoint_exits_1(tmp_path: Path) -> None:
    foreign = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    lines = assert_clean_failure(invoke("sample", foreign), 1)
    assert lines == [f"error: checkpoint {str(foreign)!r} is not a ctcore checkpoint (format ctcore-checkpoint-1); "
                     "use an earlier file in its checkpoints/ folder"]


# --------------------------------------------------------------------------------------- plugins


@pytest.fixture
def example_plugin(plugin_path: Callable[[Path], Path], tmp_path: Path) -> None:
    """Install-free ctcore-example: its sources on sys.path plus a fake dist-info with the entry point."""
    plugin_path(EXAMPLE_PLUGIN_DIR)
    plugin_path(fake_distribution(tmp_path, "ctcore-example", {"example": "ctcore_example"}))


@pytest.fixture
def l1_run(example_plugin: None, tmp_path: Path) -> Path:
    """A finished tiny run whose metric `l1` comes from ctcore-example."""
    recipe = write_tiny_recipe(tmp_path / "l1.toml", tmp_path / "l1-run", metric={"name": "l1"})
    check = invoke("check", recipe)
    assert check.exit_code == 0, check.output
    assert '\n[metric]\nname = "l1"\n' in check.stdout
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 0, result.output
    return tmp_path / "l1-run"


def test_the_example_plugin_is_listed(example_plugin: None) -> None:
    result = invoke("list-components", env=WIDE)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    rows = {(r[0], r[1]): r for r in table_rows(result.stdout)}
    assert rows[("metric", "l1")][2:] == ["mean absolute difference per sample", "ctcore-example 0.1.0"]
    assert rows[("metric", "l2")][3] == f"ctcore {CTCORE_VERSION}"
    rows_json = json.loads(invoke("list-components", "--json", "--kind", "metric").stdout)
    assert {"kind": "metric", "name": "l1", "summary": "mean absolute difference per sample",
            "distribution": "ctcore-example", "version": "0.1.0", "options": {}, "ranges": {}} in rows_json


def test_a_run_records_the_plugin_that_provided_its_metric(l1_run: Path) -> None:
    prov = json.loads((l1_run / "provenance.json").read_text(encoding="utf-8"))
    assert prov["components"]["metric"] == {"name": "l1", "distribution": "ctcore-example", "version": "0.1.0"}
    assert sorted(p.name for p in (l1_run / "checkpoints").iterdir()) == CHECKPOINTS


@pytest.mark.parametrize("disabled", ["example", "ctcore-example"])
def test_a_checkpoint_whose_plugin_is_missing_names_it(
    l1_run: Path, monkeypatch: pytest.MonkeyPatch, disabled: str
) -> None:
    monkeypatch.setenv(DISABLE_ENV, disabled)
    assert "l1" not in load_registry().names("metric")
    ckpt = l1_run / "checkpoints" / CHECKPOINTS[-1]
    expected = [
        f"error: checkpoint {str(ckpt)!r} needs metric 'l1' from the distribution 'ctcore-example' (version 0.1.0), "
        "which is not installed or is disabled; install it (pip install ctcore-example) and try again"
    ]
    before = snapshot(l1_run)
    for args in (["sample", ckpt, "-n", "2"], ["sample", l1_run, "-n", "2"], ["run", l1_run, "--resume"]):
        result = invoke(*args)
        assert assert_clean_failure(result, 1) == expected, args
        assert result.stdout == ""
    assert snapshot(l1_run) == before

    # with the plugin back, the same checkpoint samples fine
    monkeypatch.delenv(DISABLE_ENV)
    result = invoke("sample", ckpt, "-n", "2")
    assert result.exit_code == 0, result.output


def test_resume_of_a_directory_with_another_output_dir_exits_2(
    finished: tuple[Path, Path, Result], run_copy: Path, tmp_path: Path
) -> None:
    result = invoke("run", run_copy, "--resume", "--output-dir", tmp_path / "elsewhere", "--no-progress")
    assert result.exit_code == 2, result.output
    assert "drop --output-dir" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "elsewhere").exists()


def test_check_validates_a_recipe_whose_data_file_does_not_exist_yet(tmp_path: Path) -> None:
    missing = tmp_path / "cifar10.h5"
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out",
                               data={"source": "hdf5", "path": str(missing), "num_classes": 10})
    result = invoke("check", recipe)
    assert result.exit_code == 0, result.output
    assert (
        f"data file {str(missing)!r} does not exist yet: create it before training (an HDF5 file with uint8 "
        "`images` shaped (N, 3, 4, 4) and `labels`); training needs about "
    ) in result.stderr


def test_check_refuses_a_data_file_of_the_wrong_shape(tmp_path: Path) -> None:
    import h5py
    import numpy as np

    data = tmp_path / "d.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("images", data=np.zeros((5, 3, 8, 8), np.uint8))
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", data={"source": "hdf5", "path": str(data)})
    result = invoke("check", recipe)
    assert result.exit_code == 1
    assert result.stderr == (f"error: dataset file {str(data)!r} holds images of shape (3, 8, 8), but the recipe's "
                             "[data] declares channels = 3, resolution = 4; make them agree\n")


@pytest.mark.parametrize(
    ("labels", "message"),
    [(None, "data.num_classes is 3 but dataset file {data!r} has no `labels` dataset"),
     ([0, 1, 2, 3, 0], "dataset file {data!r} has labels in [0, 3], outside 0..2 (data.num_classes = 3)"),
     ([-1, 0, 1, 2, 0], "dataset file {data!r} has labels in [-1, 2], outside 0..2 (data.num_classes = 3)")],
    ids=["no-labels", "label-too-high", "negative-label"],
)
def test_check_refuses_labels_that_a_class_conditional_run_would_refuse(tmp_path: Path, labels, message: str) -> None:
    import h5py
    import numpy as np

    data = tmp_path / "d.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("images", data=np.zeros((5, 3, 4, 4), np.uint8))
        if labels is not None:
            f.create_dataset("labels", data=np.array(labels, np.int64))
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out",
                               data={"source": "hdf5", "path": str(data), "num_classes": 3})
    for command in (["check", recipe], ["run", recipe, "--no-progress"]):
        result = invoke(*command)
        assert assert_clean_failure(result, 1) == [f"error: {message.format(data=str(data))}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe", ["ict_cifar10.toml", "ablations/l2_metric.toml"])
def test_check_of_a_paper_recipe_after_the_readme_import_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              recipe: str) -> None:
    """The README imports CIFAR-10 into data/cifar10-train.h5 and then checks the paper recipes from the checkout;
    here in a folder of our own, so the result never depends on what the checkout's data/ holds."""
    import h5py
    import numpy as np

    monkeypatch.chdir(tmp_path)
    path = REPO_ROOT / "recipes" / recipe
    assert ("; data file 'data/cifar10-train.h5' does not exist yet: create it before training (an HDF5 file with "
            "uint8 `images` shaped (N, 3, 32, 32)); training needs about ") in invoke("check", path).stderr
    (tmp_path / "data").mkdir()
    with h5py.File(tmp_path / "data" / "cifar10-train.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((7, 3, 32, 32), np.uint8))
        f.create_dataset("labels", data=np.arange(7) % 3)
    result = invoke("check", path)
    assert result.exit_code == 0, result.output
    assert "; data 'data/cifar10-train.h5': 7 images of shape (3, 32, 32); training needs about " in result.stderr
    with h5py.File(tmp_path / "data" / "cifar10-train.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((7, 3, 8, 8), np.uint8))
    assert assert_clean_failure(invoke("check", path), 1) == [
        "error: dataset file 'data/cifar10-train.h5' holds images of shape (3, 8, 8), but the recipe's [data] "
        "declares channels = 3, resolution = 32; make them agree"]
