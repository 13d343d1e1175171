"""Warm starts: `ctcore run RECIPE --init-from CHECKPOINT_OR_RUN_DIR [--init-weights eval-ema|student]` starts
the student, eval EMA and teacher from another run's weights, with a fresh optimizer, step and curriculum, and
records the source in provenance; a source that is unsound or does not fit the recipe's network is one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DIFFUSION, ECT, finished_tiny_run, tree_state, write_tiny_recipe
from typer.testing import CliRunner, Result

from ctcore.build import resume_run, start_run
from ctcore.checkpoints import list_checkpoints, load_checkpoint
from ctcore.cli import app
from ctcore.errors import RunError
from ctcore.recipe import read_recipe

EMA = {"name": "ema", "mu0": 0.9}  # a teacher with its own copy of the network, so its start is checked too
LAST = "ckpt-000000012.pt"
FIRST = "ckpt-000000006.pt"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result: Result, code: int) -> str:
    """The single error line of a handled failure (exit `code`, nothing on stdout, no traceback)."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.output
    return result.stderr.removeprefix("error: ").rstrip("\n")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (checkpoints at steps 6 and 12) to start from; tests never write into it."""
    return finished_tiny_run(tmp_path_factory.mktemp("source"), "src")


def equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_directory_starts_every_network_from_its_newest_eval_ema(source: Path, tmp_path: Path,
                                                                        registry) -> None:
    recipe = read_recipe(write_tiny_recipe(tmp_path / "new.toml", tmp_path / "new", teacher=EMA,
                                           training={"lr": 5e-4}), registry)
    newest = source / "checkpoints" / LAST
    ema = load_checkpoint(newest)["eval_ema"]
    run = start_run(recipe, registry, init_from=source)
    try:
        for network in (run.student, run.eval_ema, run.teacher.network):  # the student, and copies of it
            assert equal_state(network.state_dict(), ema)
        assert run.teacher.network is not run.student and run.eval_ema is not run.student
        assert run.step == 0 and run.optimizer.state_dict()["state"] == {}  # a fresh optimizer
        assert run.optimizer.param_groups[0]["lr"] == 5e-4
        record = {"checkpoint": str(newest), "sha256": sha256(newest), "weights": "eval-ema", "step": 12,
                  "run_id": json.loads((source / "provenance.json").read_text())["run_id"]}
        written = json.loads((tmp_path / "new" / "provenance.json").read_text(encoding="utf-8"))
        assert written["init_from"] == record and run.provenance["init_from"] == record
    finally:
        run.close()


def test_student_weights_of_a_checkpoint_file_on_request(source: Path, tmp_path: Path, registry) -> None:
    recipe = read_recipe(write_tiny_recipe(tmp_path / "new.toml", tmp_path / "new"), registry)
    first = source / "checkpoints" / FIRST
    state = load_checkpoint(first)
    run = start_run(recipe, registry, init_from=first, init_weights="student")
    try:
        assert equal_state(run.student.state_dict(), state["student"])
        assert equal_state(run.eval_ema.state_dict(), state["student"])
        assert not equal_state(state["student"], state["eval_ema"])  # the two choices differ
        assert run.provenance["init_from"]["weights"] == "student" and run.provenance["init_from"]["step"] == 6
    finally:
        run.close()


def test_the_cli_trains_from_the_source_says_so_and_keeps_the_record_across_a_resume(source: Path,
                                                                                   tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "new.toml", tmp_path / "new")
    before = tree_state(source)
    result = invoke("run", recipe, "--init-from", source, "--init-weights", "student", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1] == (
        f"initialised from {source / 'checkpoints' / LAST} (its student weights at step 12); optimizer, step, "
        "curriculum and random streams start fresh")
    assert "sliced Wasserstein to data │ initial " in result.stdout
    assert tree_state(source) == before  # the source is only read
    record = json.loads((tmp_path / "new" / "provenance.json").read_text())["init_from"]
    assert [load_checkpoint(p)["provenance"]["init_from"] for p in list_checkpoints(tmp_path / "new")] == [record] * 2
    (tmp_path / "new" / "checkpoints" / LAST).unlink()  # resume from step 6: the record stays in what it writes
    again = invoke("run", tmp_path / "new", "--resume", "--no-progress")
    assert again.exit_code == 0, again.output
    assert load_checkpoint(tmp_path / "new" / "checkpoints" / LAST)["provenance"]["init_from"] == record


def _nan_eval_ema(path: Path) -> None:
    state = load_checkpoint(path)
    name = next(iter(state["eval_ema"]))
    state["eval_ema"][name] = torch.full_like(state["eval_ema"][name], float("nan"))
    torch.save(state, path)


@pytest.mark.parametrize("overrides", [ECT, DIFFUSION], ids=["ect", "edm"])
def test_a_warm_start_without_a_curriculum_does_not_name_one(source: Path, tmp_path: Path, overrides: dict) -> None:
    recipe = write_tiny_recipe(tmp_path / "new.toml", tmp_path / "new", training={"total_steps": 2}, **overrides)
    result = invoke("run", recipe, "--init-from", source, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1] == (f"initialised from {source / 'checkpoints' / LAST} (its eval-ema weights "
                                             "at step 12); optimizer, step and random streams start fresh")


@pytest.mark.parametrize("case", ["wider", "conditional", "nan", "corrupt", "empty-dir", "missing", "a-recipe"])
def test_a_source_that_does_not_fit_or_is_unsound_is_one_line_and_writes_nothing(source: Path, tmp_path: Path,
                                                                                 case: str) -> None:
    copy = Path(shutil.copytree(source, tmp_path / "src"))
    ckpt = copy / "checkpoints" / LAST
    out = tmp_path / "new" / "run"
    overrides: dict = {}
    if case == "wider":
        overrides = {"network": {"name": "mlp", "width": 16, "num_blocks": 1, "embedding_features": 8}}
    elif case == "conditional":
        overrides = {"data": {"num_classes": 8}}
    recipe = write_tiny_recipe(tmp_path / "new.toml", out, **overrides)
    target: Path = copy
    fit = f"--init-from {str(ckpt)!r} does not fit network 'mlp' of {recipe}: "
    fix = ("; initialise from a run of the same network (options, image shape, num_classes), or change the recipe "
           "to match it")
    expected = {
        "wider": fit + "tensor 'inp.weight': the recipe's network expects shape (16, 48), the checkpoint's eval_ema "
                       "has (32, 48)" + fix,
        "conditional": fit + "tensor 'label_embed.weight': the recipe's network has it, the checkpoint's eval_ema "
                             "does not" + fix,
        "nan": f"checkpoint {str(ckpt)!r} holds non-finite values in eval_ema['fourier.freqs']; the run had diverged "
               "when it was written: use an earlier checkpoint from its checkpoints/ folder",
        "corrupt": f"checkpoint {str(ckpt)!r} is corrupt or not a ctcore checkpoint (",
        "a-recipe": f"checkpoint {str(recipe)!r} is corrupt or not a ctcore checkpoint (UnpicklingError: Unsupported "
                    "operand 91); give --init-from a checkpoint that ctcore wrote (checkpoints/ckpt-*.pt), or its run "
                    "directory",
        "empty-dir": f"--init-from {str(tmp_path / 'empty')!r} holds no checkpoint (checkpoints/ckpt-*.pt); give a "
                     "checkpoint file, or a run directory that has written one",
        "missing": f"--init-from {str(tmp_path / 'absent.pt')!r} not found; train that run (or convert that "
                   "model) first, or give --init-from the checkpoint file or run directory of an existing run",
    }[case]
    if case == "nan":
        _nan_eval_ema(ckpt)
    elif case == "corrupt":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif case == "empty-dir":
        target = tmp_path / "empty"
        target.mkdir()
    elif case == "missing":
        target = tmp_path / "absent.pt"
    elif case == "a-recipe":
        target = recipe
    before = tree_state(copy)
    message = one_line(invoke("run", recipe, "--init-from", target, "--no-progress"), 1)
    assert (message[: len(expected)] if case == "corrupt" else message) == expected
    assert not (tmp_path / "new").exists()  # no run directory, not even its parent
    assert tree_state(copy) == before


def test_init_from_with_resume_or_init_weights_alone_are_usage_errors(source: Path, tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "new.toml", tmp_path / "new")
    assert one_line(invoke("run", source, "--resume", "--init-from", source), 2) == (
        f"--init-from {str(source)!r} starts a new run from another run's weights, and --resume continues a run "
        "from its own: give one of them")
    assert one_line(invoke("run", recipe, "--init-weights", "student"), 2) == (
        "--init-weights student chooses the weights of --init-from CHECKPOINT: add --init-from, or leave out "
        "--init-weights")
    assert one_line(invoke("run", recipe, "--init-from", source, "--init-weights", "teacher"), 2).startswith(
        "Invalid value for '--init-weights': 'teacher' is not one of")
    assert not (tmp_path / "new").exists()


def test_a_warm_started_run_killed_before_its_first_checkpoint_restarts_from_the_same_weights(
        source: Path, tmp_path: Path, registry) -> None:
    src = Path(shutil.copytree(source, tmp_path / "src"))
    recipe = read_recipe(write_tiny_recipe(tmp_path / "new.toml", tmp_path / "new"), registry)
    start_run(recipe, registry, init_from=src).close()  # killed before its first checkpoint
    run = resume_run(None, registry, tmp_path / "new")
    try:
        assert run.restarted and run.step == 0
        assert equal_state(run.student.state_dict(), load_checkpoint(src / "checkpoints" / LAST)["eval_ema"])
        assert run.provenance["init_from"]["checkpoint"] == str(src / "checkpoints" / LAST)
    finally:
        run.close()
    ckpt = src / "checkpoints" / LAST
    recorded = sha256(ckpt)
    torch.save(load_checkpoint(src / "checkpoints" / FIRST), ckpt)  # a sound checkpoint, but another one
    with pytest.raises(RunError) as info:
        resume_run(None, registry, tmp_path / "new")
    assert info.value.message == (
        f"the run in {str(tmp_path / 'new')!r} was started with --init-from {str(ckpt)!r}, which has changed since "
        f"(sha256 {sha256(ckpt)}, recorded {recorded}), so it cannot restart from step 0; put the original "
        "checkpoint back, or start a new run")
