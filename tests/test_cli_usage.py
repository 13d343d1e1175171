"""Usage errors on the command line are one line and exit 2, for every command and every bounded option; plain
progress lines when stderr is no terminal; run.threads set, recorded and restored."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import typer.main
from helpers import write_tiny_recipe
from plugin_env import REPO_ROOT
from typer.testing import CliRunner, Result

import ctcore.cli
from ctcore.cli import MAX_BATCH, MAX_COUNT, MAX_SEED, app

BOX = set("─│╭╮╰╯┌┐└┘━┃")

BASE_ARGS: dict[str, list[str]] = {
    "run": ["r.toml"],
    "check": ["r.toml"],
    "sweep": ["r.toml", "--set", "training.lr=1e-4,2e-4"],
    "sample": ["ckpt.pt"],
    "edit": ["inpaint", "ckpt.pt", "-o", "out.h5"],
    "eval": ["ckpt.pt", "--ref", "ref.npz"],
    "eval-ref-stats": ["data.h5", "stats.npz"],
    "search-sigmas": ["ckpt.pt", "--steps", "2"],
    "bench": ["r.toml"],
    "list-components": [],
    "report": ["run_dir"],
    "data import": ["source.tar.gz", "out.h5"],
    "data info": ["data.h5"],
    "data download": ["cifar10"],
    "convert openai-cm": ["source.pt", "out.pt"],
    "convert edm": ["source.pkl", "out.pt"],
    "export safetensors": ["ckpt.pt", "out.safetensors"],
    "export diffusers": ["ckpt.pt", "out_dir"],
}
"""Each command with placeholder arguments that let the parser reach its options (none of the files exist)."""


def commands() -> dict[str, typing.Any]:
    """Command path -> click command, for every command and subcommand of the app."""
    group = typer.main.get_command(app)
    found = {}
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", None)
        for sub_name, sub in (subcommands or {}).items():
            found[f"{name} {sub_name}"] = sub
        if not subcommands:
            found[name] = command
    return found


def int_options() -> list[tuple[str, str, typing.Any]]:
    """(command, option name, its click parameter) for every option the code declares as an integer."""
    out = []
    for name, command in commands().items():
        hints = typing.get_type_hints(command.callback)
        for param in command.params:
            hint = hints[param.name]
            if int in (hint, *typing.get_args(hint)) and param.opts[0].startswith("-"):
                out.append((name, param.opts[0], param))
    return out


def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> Result:
    """Invoke the app in an empty working directory, which must still be empty afterwards."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert list(tmp_path.iterdir()) == [], "a usage error wrote files"
    return result


def assert_one_line(result: Result, expected: str | None = None) -> str:
    """Exit 2, nothing on stdout, exactly one `error: ` line on stderr, no traceback or box; returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and not BOX & set(result.stderr), result.stderr
    if expected is not None:
        assert lines[0] == expected
    return lines[0]


def test_the_placeholder_table_covers_every_command() -> None:
    assert sorted(BASE_ARGS) == sorted(commands())


def test_every_integer_option_has_a_lower_and_an_upper_bound() -> None:
    options = int_options()
    assert len(options) >= 12
    unbounded = [f"{c} {o}" for c, o, info in options if info.min is None or info.max is None]
    assert unbounded == []


@pytest.mark.parametrize("command", sorted(BASE_ARGS))
def test_an_unknown_flag_is_one_line_for_every_command(command: str, tmp_path, monkeypatch) -> None:
    result = in_tmp(tmp_path, monkeypatch, [*command.split(), *BASE_ARGS[command], "--frobnicate-widgets"])
    assert_one_line(result, f"error: No such option: --frobnicate-widgets (see `ctcore {command} --help`)")


@pytest.mark.parametrize("command", [c for c in sorted(BASE_ARGS) if BASE_ARGS[c]])
def test_a_missing_argument_is_one_line(command: str, tmp_path, monkeypatch) -> None:
    line = assert_one_line(in_tmp(tmp_path, monkeypatch, command.split()))
    assert re.fullmatch(rf"error: Missing argument '[\w.]+' \(see `ctcore {command} --help`\)", line), line


@pytest.mark.parametrize("value_kind", ["below", "above", "huge", "text", "float"])
def test_every_integer_option_refuses_out_of_range_and_malformed_values(value_kind: str, tmp_path,
                                                                        monkeypatch) -> None:
    for command, option, info in int_options():
        value = {"below": str((info.min or 0) - 1), "above": str((info.max or 0) + 1), "huge": str(10**30),
                 "text": "many", "float": "2.5"}[value_kind]
        result = in_tmp(tmp_path, monkeypatch, [*command.split(), *BASE_ARGS[command], option, value])
        line = assert_one_line(result)
        assert line.startswith("error: Invalid value for ") and line.endswith(f"(see `ctcore {command} --help`)")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nosuch"], "No such command 'nosuch' (see `ctcore --help`)"),
        (["smaple", "x"], "No such command 'smaple'. Did you mean 'sample'? (see `ctcore --help`)"),
        (["data", "nosuch"], "No such command 'nosuch' (see `ctcore data --help`)"),
        (["sample", "c.pt", "-n", "-5"], "Invalid value for '--num-samples' / '-n': Input should be greater than or "
                                         "equal to 1 (see `ctcore sample --help`)"),
        (["sample", "c.pt", "-n", str(10**12)], f"Invalid value for '--num-samples' / '-n': Input should be less "
                                                f"than or equal to {MAX_COUNT} (see `ctcore sample --help`)"),
        (["sample", "c.pt", "--steps", "0"], "Invalid value for '--steps': Input should be greater than or equal "
                                             "to 1 (see `ctcore sample --help`)"),
        (["sample", "c.pt", "--batch-size", "0"], "Invalid value for '--batch-size': Input should be greater than "
                                                  "or equal to 1 (see `ctcore sample --help`)"),
        (["sample", "c.pt", "--seed", str(2**64)], f"Invalid value for '--seed': Input should be less than or equal "
                                                   f"to {MAX_SEED} (see `ctcore sample --help`)"),
        (["sample", "c.pt", "--weights", "foo"], "Invalid value for '--weights': 'foo' is not one of 'eval-ema', "
                                                 "'student' (see `ctcore sample --help`)"),
        (["sample", "c.pt", "-n"], "Option '-n' requires an argument (see `ctcore sample --help`)"),
        (["eval", "c.pt", "--ref", "r.npz", "--device", "quantum"],
         "Invalid value for '--device': must be cpu, cuda, cuda:N or auto, got 'quantum' (see `ctcore eval --help`)"),
        (["eval-ref-stats", "d.h5", "o.npz", "--device", "cuda:x"],
         "Invalid value for '--device': must be cpu, cuda, cuda:N or auto, got 'cuda:x' "
         "(see `ctcore eval-ref-stats --help`)"),
        (["eval", "c.pt", "--ref", "r.npz", "-n", "1"], "Invalid value for '--num-samples' / '-n': Input should be "
                                                        "greater than or equal to 2 (see `ctcore eval --help`)"),
        (["eval", "c.pt", "--metric", "kid"], "Invalid value for '--metric': 'kid' is not one of 'fid', "
                                              "'sliced-wasserstein' (see `ctcore eval --help`)"),
        (["eval", "c.pt", "--fid-protocol", "clean"], "Invalid value for '--fid-protocol': 'clean' is not one of "
                                                      "'tensorflow', 'pytorch-fid' (see `ctcore eval --help`)"),
        (["bench", "r.toml", "--batch", str(10**12)], f"Invalid value for '--batch': Input should be less than or "
                                                      f"equal to {MAX_BATCH} (see `ctcore bench --help`)"),
        (["bench", "r.toml", "--warmup", "-1"], "Invalid value for '--warmup': Input should be greater than or "
                                                "equal to 0 (see `ctcore bench --help`)"),
        (["data", "import", "s", "o.h5", "--resolution", "0"], "Invalid value for '--resolution': Input should be "
                                                               "greater than or equal to 1 (see `ctcore data import "
                                                               "--help`)"),
        # checked by ctcore before any work, in its own words
        (["sample", "c.pt", "--grid", "out.h5"], "--grid 'out.h5': give an image file name ending in .png (or "
                                                 ".jpg, .webp)"),
        (["data", "info", "d.h5", "--grid", "out.h5"], "--grid 'out.h5': give an image file name ending in .png "
                                                       "(or .jpg, .webp)"),
        (["sample", "c.pt", "--out", "x.png"], "--out 'x.png': give an HDF5 file name ending in .h5 or .hdf5"),
        (["data", "import", "s", "o.png"], "OUT.h5 'o.png': give an HDF5 file name ending in .h5 or .hdf5"),
        (["eval-ref-stats", "d.h5", "o.npy"], "OUT.npz 'o.npy': give a statistics file name ending in .npz"),
        (["sample", "c.pt", "--sigmas", "80,nan"], "--sigmas must be finite numbers, got '80,nan'"),
        (["eval", "c.pt", "--ref", "r.npz", "--sigmas", "1e400"], "--sigmas must be finite numbers, got '1e400'"),
        (["sample", "c.pt", "--sigmas", ","], "--sigmas must be 1 to 1000 comma-separated numbers like \"80,0.821\" "
                                              "(no plan samples more steps), got 0 values"),
        (["sample", "c.pt", "--sigmas", ",".join(["1"] * 1001)],
         "--sigmas must be 1 to 1000 comma-separated numbers like \"80,0.821\" (no plan samples more steps), got "
         "1001 values"),
    ],
    ids=lambda v: " ".join(v)[:40] if isinstance(v, list) else None,
)
def test_bad_arguments_give_one_exact_line(args: list[str], expected: str, tmp_path, monkeypatch) -> None:
    assert_one_line(in_tmp(tmp_path, monkeypatch, args), f"error: {expected}")



SEEDS = '--seeds must be two seeds "A,B" in 0..9223372035854775807, e.g. "0,1", got '


@pytest.mark.parametrize(("args", "expected"), [
    (["sample", "c.pt", "--sigmas", ",".join(["x"] * 1001)],
     "--sigmas must be 1 to 1000 comma-separated numbers like \"80,0.821\" (no plan samples more steps), got 1001 "
     "values"),
    (["sample", "c.pt", "--labels", ",".join(["0"] * 100_001)],
     "--labels takes at most 100,000 class labels (as many as a recipe's data.num_classes allows; they cycle over the "
     "samples), got 100,001"),
    (["edit", "interpolate", "c.pt", "-o", "o.h5", "--seeds", "\u00b2,1"], SEEDS + "'\u00b2,1'"),
    (["edit", "interpolate", "c.pt", "-o", "o.h5", "--seeds", "9" * 5000 + ",1"], SEEDS + f"'{'9' * 5000},1'"),
    (["edit", "interpolate", "c.pt", "-o", "o.h5", "--seeds", ",".join(["1"] * 100_000)],
     SEEDS + repr(",".join(["1"] * 100_000))),
], ids=["1001-sigmas-that-are-no-numbers", "100001-labels", "superscript-seed", "5000-digit-seed", "100000-seeds"])
def test_comma_lists_are_bounded_before_they_are_read(args: list[str], expected: str, tmp_path, monkeypatch) -> None:
    """A comma-separated option is counted before its values are converted: more --sigmas than any plan or
    --labels than classes is one line naming the limit; seeds that are no ASCII numbers of at most 19 digits (a
    superscript two, 5000 digits, which int() refuses) are the --seeds line, not a traceback."""
    assert_one_line(in_tmp(tmp_path, monkeypatch, args), f"error: {expected}")

def test_main_and_the_console_script_print_the_same_line(tmp_path, monkeypatch, capsys) -> None:
    """ctcore.cli.main (python -m ctcore and the console script) as CliRunner sees it; then real processes."""
    expected = ("error: Invalid value for '--num-samples' / '-n': Input should be greater than or equal to 1 "
                "(see `ctcore sample --help`)\n")
    monkeypatch.setattr(sys, "argv", ["ctcore", "sample", "c.pt", "-n", "-5"])
    with pytest.raises(SystemExit) as exit_info:
        ctcore.cli.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr() == ("", expected)

    script = shutil.which("ctcore", path=str(Path(sys.executable).parent))
    for argv in ([sys.executable, "-m", "ctcore"], [script]):
        proc = subprocess.run([*argv, "sample", "c.pt", "-n", "-5"], capture_output=True, text=True, cwd=tmp_path,
                              timeout=60)
        assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", expected), argv
    assert list(tmp_path.iterdir()) == []


def test_help_and_no_arguments_still_show_the_help() -> None:
    assert CliRunner().invoke(app, ["sample", "--help"]).exit_code == 0
    bare = CliRunner().invoke(app, [])
    assert bare.exit_code == 2 and "Usage: ctcore" in bare.stdout and "error" not in bare.stderr


def test_version_prints_the_installed_package_version(monkeypatch, capsys) -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"ctcore {version('ctcore')}\n", "")
    assert version("ctcore") == ctcore.__version__
    monkeypatch.setattr(sys, "argv", ["ctcore", "--version", "run"])  # eager: before the command's arguments
    with pytest.raises(SystemExit) as exit_info:
        ctcore.cli.main()
    assert exit_info.value.code == 0 and capsys.readouterr() == (f"ctcore {ctcore.__version__}\n", "")


def test_image_names_take_only_formats_ctcore_writes() -> None:
    from ctcore.errors import UsageError
    from ctcore.images import check_image_path

    for good in ("a.png", "a.PNG", "b.jpg", "b.jpeg", "c.webp", None):
        check_image_path(good)
    for bad in ("out.h5", "out.bufr", "out", "out.png.tmp"):
        with pytest.raises(UsageError):
            check_image_path(bad)


# --------------------------------------------------------------------------- with a real (tiny) checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (run.threads = 1) trained through the CLI with progress on (stderr captured: no
    terminal), started with torch at 2 threads; the count found afterwards is kept in threads-after.txt.

    (Training itself at 2 threads costs seconds on a loaded 2-core machine, so the switch is 2 -> 1 -> 2.)
    """
    tmp = tmp_path_factory.mktemp("tiny")
    recipe = write_tiny_recipe(tmp / "r.toml", tmp / "run", run={"threads": 1})
    torch.set_num_threads(2)
    try:
        result = CliRunner().invoke(app, ["run", str(recipe)])
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    assert result.exit_code == 0, result.output
    (tmp / "run" / "stderr.txt").write_text(result.stderr, encoding="utf-8")
    (tmp / "run" / "threads-after.txt").write_text(str(after), encoding="utf-8")
    return tmp / "run"


def test_plain_progress_lines_at_each_log_interval_when_stderr_is_no_terminal(tiny_run: Path) -> None:
    lines = (tiny_run / "stderr.txt").read_text(encoding="utf-8").splitlines()
    pattern = r"step (\d+)/12  loss (\S+)  N\(k\) (\d+)  ([\d,]+) img/s  ETA (\d+:\d\d:\d\d)"
    matches = [re.fullmatch(pattern, line) for line in lines]
    assert all(matches), lines
    assert [int(m[1]) for m in matches] == [2, 4, 6, 8, 10, 12]  # log_every 2 of 12 steps: nothing else
    logged = [r for r in map(json.loads, (tiny_run / "stats.jsonl").read_text().splitlines()) if "loss" in r
              and "event" not in r]
    assert [f"{r['loss']:.4g}" for r in logged] == [m[2] for m in matches]
    assert [int(m[3]) for m in matches] == [r["num_scales"] for r in logged]
    assert matches[-1][5] == "0:00:00"


def test_no_progress_prints_no_lines(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", training={"total_steps": 4})
    result = CliRunner().invoke(app, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_run_threads_is_applied_recorded_and_restored(tiny_run: Path) -> None:
    assert json.loads((tiny_run / "provenance.json").read_text())["threads"] == 1  # set from 2 before building
    assert "threads = 1\n" in (tiny_run / "recipe.toml").read_text()
    assert (tiny_run / "threads-after.txt").read_text() == "2"  # restored after the in-process command


def test_sample_beyond_the_recipe_and_a_bad_grid_change_nothing(tiny_run: Path) -> None:
    from helpers import snapshot

    before = snapshot(tiny_run)
    for args, expected in [
        (["--steps", "3"], "--steps 3: 3 steps need 2 intermediate sigmas but the recipe's sampling.sigma_mid has "
                           "[0.821]; pass --sigmas explicitly, e.g. --sigmas 80,0.821"),
        (["--grid", str(tiny_run / "g.h5")], f"--grid {str(tiny_run / 'g.h5')!r}: give an image file name ending "
                                             f"in .png (or .jpg, .webp)"),
        (["--sigmas", "inf"], "--sigmas must be finite numbers, got 'inf'"),
    ]:
        assert_one_line(CliRunner().invoke(app, ["sample", str(tiny_run), "-n", "2", *args]), f"error: {expected}")
    assert snapshot(tiny_run) == before


def test_sampling_uses_the_recipe_threads_and_restores_them(tiny_run: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = torch.set_num_threads
    real(2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n))[1])
    result = CliRunner().invoke(app, ["sample", str(tiny_run), "-n", "2", "-o", str(tmp_path / "s.h5")])
    assert result.exit_code == 0, result.output
    assert seen == [1, 2] and torch.get_num_threads() == 2  # the recipe's 1, then the 2 found before


# ------------------------------------------------------------------------------------------ units


def test_automatic_threads_are_half_the_usable_cpus_split_among_local_processes(monkeypatch) -> None:
    from ctcore.devices import resolve_threads

    assert resolve_threads(3) == 3
    for cpus, local, expected in [(1, None, 1), (2, None, 1), (4, None, 2), (16, None, 8), (64, None, 8),
                                  (16, "4", 2), (16, "16", 1), (16, "junk", 8)]:
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, n=cpus: set(range(n)), raising=False)
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert resolve_threads(0) == expected, (cpus, local)


@pytest.mark.parametrize("value", [-1, 513, 1000])
def test_run_threads_out_of_range_is_a_recipe_error(value: int, tmp_path: Path) -> None:
    from ctcore.errors import RecipeError
    from ctcore.recipe import read_recipe
    from ctcore.registry import load_registry

    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", run={"threads": value})
    with pytest.raises(RecipeError) as info:
        read_recipe(recipe, load_registry())
    assert info.value.problems == [f"run.threads: must be within [0, 512] (0: automatic; beyond a two-socket "
                                   f"server's cores (2 x 192) threads only wait, and each takes 16 to 75 MiB of "
                                   f"address space), got {value}"]


def test_cuda_devices_that_do_not_exist_are_usage_errors() -> None:
    from ctcore.devices import resolve_device
    from ctcore.errors import UsageError

    missing = "cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(UsageError, match="CUDA device|does not exist"):
        resolve_device(missing)


def test_line_progress_prints_a_plain_line_per_interval_and_at_the_end() -> None:
    from rich.console import Console

    from ctcore.reporting import LineProgress, progress_line

    out = io.StringIO()
    bar = LineProgress(Console(file=out, width=40), interval=3600)
    with bar:
        task = bar.add_task("FID 1-step", total=4)
        for _ in range(4):
            bar.advance(task, 1)
        bar.advance(task, 1)  # past the end: no second final line
    assert out.getvalue() == "FID 1-step 4/4  ETA 0:00:00\n"
    assert progress_line(400, 4000, 3.41249, 81, 15120.4, 54.4) == \
        "step 400/4000  loss 3.412  N(k) 81  15,120 img/s  ETA 0:00:54"


def test_the_fid_and_import_bars_fall_back_to_lines_off_a_terminal(capsys) -> None:
    from ctcore.fid import _progress
    from ctcore.importers import _progress as import_progress

    bar, task = _progress(True, "reference statistics", 3)
    with bar:
        bar.advance(task, 3)
    with import_progress(True) as make:
        make("reading", 2).update(2)
    assert capsys.readouterr().err == "reference statistics 3/3  ETA 0:00:00\nreading 2/2  ETA 0:00:00\n"


def test_the_readme_states_how_threads_change_results() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert ("CPU results are deterministic for a given thread count, not across thread counts"
            in " ".join(readme.split()))
