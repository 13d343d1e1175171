"""A checkpoint is checked completely before anything is restored: each defect is one line naming the file, the
defect and the fix, for `run --resume`, `sample` and `eval`; a checkpoint of another run is refused and never
deleted; a run killed before its first checkpoint restarts from step 0."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from helpers import snapshot, write_tiny_recipe
from typer.testing import CliRunner, Result

from ctcore.build import resume_run, start_run
from ctcore.checkpoints import list_checkpoints, load_checkpoint, validate_checkpoint
from ctcore.cli import app
from ctcore.errors import RunError
from ctcore.recipe import read_recipe
from ctcore.training import train

EMA = {"name": "ema", "mu0": 0.9}  # a teacher with weights of its own, so its tensors are checked too
ONLY_RESUME = ("it was not written by ctcore run, or is damaged: resume from an earlier checkpoint (move this one "
               "out of checkpoints/) or sample from it with ctcore sample")
DAMAGED_RESUME = ("it is damaged or was not written by ctcore run: resume from an earlier checkpoint (move this one "
                  "out of checkpoints/)")
DAMAGED_SAMPLE = ("it is damaged or was not written by ctcore run: use an earlier checkpoint from its checkpoints/ "
                  "folder")
DIVERGED_RESUME = ("the run had diverged when it was written: resume from an earlier checkpoint (move this one out "
                   "of checkpoints/), or start a new run with a lower training.lr or a training.grad_clip")
DIVERGED_SAMPLE = "the run had diverged when it was written: use an earlier checkpoint from its checkpoints/ folder"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def clean_failure(result: Result, code: int = 1) -> list[str]:
    """Exit code, no escaped exception or traceback, nothing on stdout; the stderr lines."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and result.stdout == ""
    return result.stderr.splitlines()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with an EMA teacher, finished through `ctcore run` (checkpoints at steps 6 and 12)."""
    root = tmp_path_factory.mktemp("validation")
    result = invoke("run", write_tiny_recipe(root / "tiny.toml", root / "run", teacher=EMA), "--no-progress")
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture
def run_dir(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def tamper(run_dir: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    """Edit the newest checkpoint of a run in place; its path."""
    path = list_checkpoints(run_dir)[-1]
    state = torch.load(path, weights_only=True)
    edit(state)
    _save_deep(state, path)
    return path


def _nested(depth: int) -> list[Any]:
    """[[[...]]], `depth` lists deep: deeper than Python's recursion limit, it cannot be shown or compared."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _save_deep(state: dict[str, Any], path: Path) -> None:
    """torch.save, in a thread with a large stack and recursion limit: pickling a deeply nested value recurses."""
    limit, stack = sys.getrecursionlimit(), threading.stack_size(256 << 20)
    sys.setrecursionlimit(50_000)
    try:
        worker = threading.Thread(target=torch.save, args=(state, path))
        worker.start()
        worker.join()
    finally:
        sys.setrecursionlimit(limit)
        threading.stack_size(stack)


def _set(*keys: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(state: dict[str, Any]) -> None:
        target = state
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value
    return edit


def _drop(*keys: Any) -> Callable[[dict[str, Any]], None]:
    def edit(state: dict[str, Any]) -> None:
        target = state
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return edit


def _poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def poisoned(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[3] = value
        return t
    return poisoned


NUM_PARAMS = 18  # the tiny MLP's parameters (its state dict also holds the Fourier-feature buffer)
# (edit, the defect named, resume's fix, sample's fix, or None: sampling the eval EMA is unaffected)
CASES: dict[str, tuple[Callable, str, str, str | None]] = {
    "student of the wrong shape": (
        _set("student", "embed.0.weight", value=torch.zeros(32, 8)),
        "has student['embed.0.weight'] of the wrong shape: network 'mlp' of its recipe expects (32, 16), found (32, 8)",
        ONLY_RESUME, None),
    "eval EMA of the wrong shape": (
        _set("eval_ema", "blocks.0.fc1.weight", value=torch.zeros(32, 16)),
        "has eval_ema['blocks.0.fc1.weight'] of the wrong shape: network 'mlp' of its recipe expects (32, 32), "
        "found (32, 16)", DAMAGED_RESUME, DAMAGED_SAMPLE),
    "eval EMA missing a tensor": (
        _drop("eval_ema", "out.bias"), "lacks eval_ema['out.bias'], which network 'mlp' of its recipe has",
        DAMAGED_RESUME, DAMAGED_SAMPLE),
    "teacher with a foreign tensor": (
        _set("teacher", "extra.weight", value=torch.zeros(2)),
        "has teacher['extra.weight'], which teacher 'ema' of its recipe does not have", ONLY_RESUME, None),
    "no optimizer": (_drop("optimizer"), "has no optimizer state (key `optimizer`)", ONLY_RESUME, None),
    "optimizer state missing a key": (
        _drop("optimizer", "state", 0, "exp_avg"),
        "lacks optimizer['state'][0]['exp_avg'] (the optimizer keeps step, exp_avg, exp_avg_sq for each parameter)",
        ONLY_RESUME, None),
    "optimizer group of the wrong size": (
        _set("optimizer", "param_groups", 0, "params", value=lambda ids: ids[:-1]),
        f"has an optimizer param group for {NUM_PARAMS - 1} parameters, but the network of its recipe has "
        f"{NUM_PARAMS}", ONLY_RESUME, None),
    "optimizer group without betas": (
        _drop("optimizer", "param_groups", 0, "betas"), "has an optimizer param group without `betas`",
        ONLY_RESUME, None),
    "optimizer moment of the wrong shape": (
        _set("optimizer", "state", 1, "exp_avg_sq", value=torch.zeros(3)),
        "has optimizer['state'][1]['exp_avg_sq'] of the wrong shape: its parameter has (32,), found (3,)",
        ONLY_RESUME, None),
    "RNG state of the wrong size": (
        _set("rng", "index", value=torch.zeros(10, dtype=torch.uint8)),
        "has rng['index'] that a cpu random generator does not accept (Expected a CPUGeneratorImplState of size "
        "5056 but found the input RNG state size to be 10)", ONLY_RESUME, None),
    "RNG state that is no byte tensor": (
        _set("rng", "torch", value=lambda t: t.long()),
        "has rng['torch'] of dtype torch.int64, but an RNG state is a torch.ByteTensor (uint8)", ONLY_RESUME, None),
    "RNG state rejected by the generator": (
        _set("rng", "noise", value=lambda t: torch.zeros_like(t)),
        "has rng['noise'] that a cpu random generator does not accept (Invalid mt19937 state)", ONLY_RESUME, None),
    "no provenance": (_drop("provenance"), "has no provenance (key `provenance`)", DAMAGED_RESUME, DAMAGED_SAMPLE),
    "provenance without data_shape": (
        _drop("provenance", "data_shape"),
        "has provenance['data_shape'] None, but it must be the image shape [C, H, W]", DAMAGED_RESUME, DAMAGED_SAMPLE),
    "step nested too deeply": (
        _set("step", value=_nested(5000)), "holds values nested too deeply to check", DAMAGED_RESUME, DAMAGED_SAMPLE),
    "data_shape nested too deeply": (
        _set("provenance", "data_shape", value=[3, 8, _nested(5000)]), "holds values nested too deeply to check",
        DAMAGED_RESUME, DAMAGED_SAMPLE),
    "run id nested too deeply": (
        _set("provenance", "run_id", value=_nested(5000)),
        "has provenance['run_id'] of type list, but a run id is a string", DAMAGED_RESUME, DAMAGED_SAMPLE),
    "run id that is a number": (
        _set("provenance", "run_id", value=5), "has provenance['run_id'] of type int, but a run id is a string",
        DAMAGED_RESUME, DAMAGED_SAMPLE),
    "negative step": (
        _set("step", value=-3), "has step -3, but a step is a whole number >= 0", DAMAGED_RESUME, DAMAGED_SAMPLE),
    "step that is no integer": (
        _set("step", value=6.5), "has step 6.5, but a step is a whole number >= 0", DAMAGED_RESUME, DAMAGED_SAMPLE),
    "no loss count": (_drop("loss_count"), "has no `loss_count`", ONLY_RESUME, None),
    "curriculum floor of 0": (
        _set("num_scales_floor", value=0), "has num_scales_floor 0, but it must be a whole number from 1 to "
        "16,777,216 (the N(k) the curriculum keeps after an extension)", ONLY_RESUME, None),
    "NaN student": (
        _set("student", "inp.weight", value=_poison(float("nan"))),
        "holds non-finite values in student['inp.weight']", DIVERGED_RESUME, None),
    "NaN eval EMA": (
        _set("eval_ema", "blocks.0.fc1.weight", value=_poison(float("nan"))),
        "holds non-finite values in eval_ema['blocks.0.fc1.weight']", DIVERGED_RESUME, DIVERGED_SAMPLE),
    "infinite teacher": (
        _set("teacher", "out.weight", value=_poison(float("inf"))),
        "holds non-finite values in teacher['out.weight']", DIVERGED_RESUME, None),
    "NaN optimizer moment": (
        _set("optimizer", "state", 2, "exp_avg", value=_poison(float("nan"))),
        "holds non-finite values in optimizer['state'][2]['exp_avg']", DIVERGED_RESUME, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_defective_checkpoint_is_one_line_for_resume_and_sample_and_changes_nothing(run_dir: Path,
                                                                                     case: str) -> None:
    edit, defect, resume_fix, sample = CASES[case]
    ckpt = tamper(run_dir, edit)
    before = snapshot(run_dir)
    assert clean_failure(invoke("run", run_dir, "--resume", "--no-progress")) == [
        f"error: checkpoint {str(ckpt)!r} {defect}; {resume_fix}"]
    assert snapshot(run_dir) == before
    result = invoke("sample", run_dir, "-n", "2")
    if sample is None:  # sample reads only the step, recipe, provenance and eval EMA: it works
        assert result.exit_code == 0, result.output
        after = snapshot(run_dir)
        assert {k: after[k] for k in before} == before
        assert sorted(set(after) - set(before)) == ["samples/ckpt-000000012-1step-2.h5",
                                                   "samples/ckpt-000000012-1step-2.png"]
    else:
        assert clean_failure(result) == [f"error: checkpoint {str(ckpt)!r} {defect}; {sample}"]
        assert snapshot(run_dir) == before


def test_sampling_the_student_needs_a_sound_student(run_dir: Path) -> None:
    ckpt = tamper(run_dir, CASES["NaN student"][0])
    lines = clean_failure(invoke("sample", ckpt, "-n", "2", "--weights", "student"))
    assert lines == [f"error: checkpoint {str(ckpt)!r} holds non-finite values in student['inp.weight']; "
                     f"{DIVERGED_SAMPLE}"]


def test_eval_refuses_a_non_finite_eval_ema_before_sampling(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`ctcore eval` through the CLI; the Inception network is a stand-in on the meta device (never run)."""
    import ctcore.inception
    from ctcore.fid import save_statistics
    from ctcore.inception import FIDInceptionV3

    with torch.device("meta"):
        stand_in = FIDInceptionV3()
    monkeypatch.setattr(ctcore.inception, "load_inception", lambda *args, **kwargs: stand_in)
    monkeypatch.setattr(ctcore.inception, "missing_weights", lambda *args, **kwargs: None)
    ref = save_statistics(tmp_path / "ref.npz", {"mu": np.zeros(2048), "sigma": np.eye(2048)})
    ckpt = tamper(run_dir, CASES["NaN eval EMA"][0])
    before = snapshot(run_dir)
    lines = clean_failure(invoke("eval", run_dir, "--ref", ref, "-n", "2", "--no-progress"))
    assert lines == [f"error: checkpoint {str(ckpt)!r} holds non-finite values in "
                     f"eval_ema['blocks.0.fc1.weight']; {DIVERGED_SAMPLE}"]
    assert snapshot(run_dir) == before


def test_every_checkpoint_ctcore_writes_passes_validation(finished: Path, registry) -> None:
    for ckpt in list_checkpoints(finished):
        state = load_checkpoint(ckpt)
        for use in ("resume", "eval-ema", "student"):
            recipe = validate_checkpoint(state, ckpt, registry, use=use)
            assert recipe.components["teacher"].name == "ema"


def test_a_checkpoint_from_before_the_curriculum_floor_still_resumes_and_extends(run_dir: Path) -> None:
    """Checkpoints written before `num_scales_floor` existed have no floor (1): an extension sets it from the
    N(k) the run reached (9 at step 12 of the tiny recipe's curriculum), and the new checkpoints hold it."""
    assert load_checkpoint(list_checkpoints(run_dir)[-1])["num_scales_floor"] == 1  # a run never extended
    tamper(run_dir, _drop("num_scales_floor"))
    result = invoke("run", run_dir, "--resume", "--set", "training.total_steps=14", "--no-progress")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(list_checkpoints(run_dir)[-1])["num_scales_floor"] == 9


# ------------------------------------------------------------------------------ checkpoints of other runs


def _other_run(finished: Path, tmp_path: Path, **training: Any) -> Path:
    """A run whose recipe is the finished run's but for `training` (same run.output_dir in the recipe)."""
    recipe = write_tiny_recipe(tmp_path / "other.toml", finished, teacher=EMA, training=training)
    result = invoke("run", recipe, "--output-dir", tmp_path / "other", "--no-progress")
    assert result.exit_code == 0, result.output
    return tmp_path / "other"


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "provenance.json").read_text(encoding="utf-8"))["run_id"]


def test_a_checkpoint_of_another_run_copied_in_is_refused_and_the_runs_own_checkpoints_survive(
    finished: Path, run_dir: Path, tmp_path: Path
) -> None:
    other = _other_run(finished, tmp_path, total_steps=18, lr=2e-3, checkpoint_every=18, sample_every=18)
    foreign = run_dir / "checkpoints" / "ckpt-000000018.pt"
    shutil.copy(other / "checkpoints" / "ckpt-000000018.pt", foreign)
    before = snapshot(run_dir)
    fix = "move it out of checkpoints/ to resume from ckpt-000000012.pt"
    assert clean_failure(invoke("run", run_dir, "--resume", "--no-progress")) == [
        f"error: checkpoint {str(foreign)!r} belongs to another run (run id {_run_id(other)}; the run in "
        f"{str(run_dir)!r} is {_run_id(run_dir)}); {fix}"]
    assert snapshot(run_dir) == before
    # a checkpoint from before run ids: the recipes are compared (resolved, not as text)
    tamper(run_dir, lambda state: state["provenance"].pop("run_id"))
    before = snapshot(run_dir)
    assert clean_failure(invoke("run", run_dir, "--resume", "--no-progress")) == [
        f"error: checkpoint {str(foreign)!r} was written under another recipe than "
        f"{str(run_dir / 'recipe.toml')!r} (training.lr: 0.002 -> 0.001), so it belongs to another run; {fix}"]
    assert snapshot(run_dir) == before


def test_a_checkpoint_of_the_same_recipe_without_an_id_still_resumes(run_dir: Path) -> None:
    """Checkpoints written before run ids: equal recipes are enough (the id check needs both ids)."""
    (run_dir / "checkpoints" / "ckpt-000000012.pt").unlink()
    tamper(run_dir, lambda state: state["provenance"].pop("run_id"))
    result = invoke("run", run_dir, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"resuming {run_dir} at step 6\n")
    assert load_checkpoint(run_dir / "checkpoints" / "ckpt-000000012.pt")["provenance"]["run_id"] == _run_id(run_dir)


def test_retention_deletes_only_checkpoints_this_run_wrote(tmp_path: Path, registry) -> None:
    recipe = read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run",
                                           training={"checkpoint_every": 4, "keep_checkpoints": 1}), registry)
    run = start_run(recipe, registry)
    train(run, stop_at=4, progress=False)
    folder = run.out_dir / "checkpoints"
    state = load_checkpoint(folder / "ckpt-000000004.pt")
    torch.save({**state, "provenance": {**state["provenance"], "run_id": "f" * 32}}, folder / "ckpt-000000001.pt")
    legacy = {**state, "provenance": {k: v for k, v in state["provenance"].items() if k != "run_id"}}
    torch.save(legacy, folder / "ckpt-000000002.pt")  # no run id: another run's, from before run ids
    (folder / "ckpt-000000003.pt").write_bytes(b"not a checkpoint")
    others = {name: (folder / name).read_bytes() for name in ("ckpt-000000001.pt", "ckpt-000000002.pt",
                                                              "ckpt-000000003.pt")}
    train(run, progress=False)
    run.close()
    assert sorted(p.name for p in folder.iterdir()) == [*others, "ckpt-000000012.pt"]
    assert all((folder / name).read_bytes() == data for name, data in others.items())


def test_a_damaged_provenance_or_a_missing_recipe_is_refused(run_dir: Path) -> None:
    (run_dir / "provenance.json").write_text("{cut sh", encoding="utf-8")
    before = snapshot(run_dir)
    lines = clean_failure(invoke("run", run_dir, "--resume", "--no-progress"))
    assert lines == [f"error: {str(run_dir / 'provenance.json')!r} is damaged (Expecting property name enclosed in "
                     "double quotes: line 1 column 2 (char 1)); it records the run's id: put it back, or delete it "
                     "to resume with the recipe check alone"]
    assert snapshot(run_dir) == before
    (run_dir / "recipe.toml").unlink()
    assert clean_failure(invoke("run", run_dir, "--resume", "--no-progress")) == [
        f"error: run directory {str(run_dir)!r} has no recipe.toml, so its checkpoints cannot be checked against "
        "its recipe; put the run's recipe.toml back, or start a new run"]



@pytest.mark.parametrize(("content", "problem"), [
    (b'{"run_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply to read"),
    (b"{" + b'"a": {' * 100_000, "nested too deeply to read"),
    (b"\x00", "Expecting value: line 1 column 1 (char 0)"),
    (b'{"run_id": "\xff\xfe"}', "'utf-8' codec can't decode byte 0xff in position 12: invalid start byte"),
    (b'{"run_id": "a", "step": ' + b"9" * 5000 + b"}",
     "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"),
    (b"[1, 2]", "it holds an array, not an object"),
    (b'"run"', "it holds a string, not an object"),
    (b'{"run_id": 5}', "its run_id is a number, not a string"),
    (b'{"run_id": [[["a"]]]}', "its run_id is an array, not a string"),
], ids=["nested-array", "nested-object", "nul", "invalid-utf8", "5000-digits", "array", "string", "run-id-number",
        "run-id-array"])
def test_a_hostile_provenance_is_one_line_and_changes_nothing(run_dir: Path, content: bytes, problem: str) -> None:
    (run_dir / "provenance.json").write_bytes(content)
    before = snapshot(run_dir)
    lines = clean_failure(invoke("run", run_dir, "--resume", "--no-progress"))
    assert lines == [f"error: {str(run_dir / 'provenance.json')!r} is damaged ({problem}); it records the run's id: "
                     "put it back, or delete it to resume with the recipe check alone"]
    assert snapshot(run_dir) == before


def test_a_recipe_toml_nested_too_deeply_in_an_occupied_directory_is_one_line(run_dir: Path, tmp_path: Path) -> None:
    """The hint of the occupied-directory message reads recipe.toml's total_steps; a hostile file drops the hint."""
    (run_dir / "recipe.toml").write_text("[training]\ntotal_steps = " + "[" * 100_000 + "\n")
    before = snapshot(run_dir)
    recipe = write_tiny_recipe(tmp_path / "r.toml", run_dir)
    lines = clean_failure(invoke("run", recipe, "--no-progress"))
    assert lines == [f"error: output directory {str(run_dir)!r} is not empty (it holds an earlier run); pass --resume "
                     "to continue it, or choose another directory with --output-dir (or run.output_dir), or delete "
                     "it"]
    assert snapshot(run_dir) == before

# ------------------------------------------------------------------------- killed before its first checkpoint


def test_a_run_killed_before_its_first_checkpoint_restarts_from_step_0(finished: Path, tmp_path: Path,
                                                                      registry) -> None:
    """What a kill before the first checkpoint leaves: recipe.toml, provenance.json, a cut stats.jsonl and a
    partial temporary checkpoint. `--resume` restarts it and ends bit-identical to the uninterrupted run."""
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", finished, teacher=EMA)  # the finished run's recipe
    killed = tmp_path / "killed"
    start_run(read_recipe(recipe, registry), registry, killed).close()
    (killed / "stats.jsonl").write_text('{"event": "distance", "step": 0}\n{"step": 2, "loss": 0.1}\n{"step": 4, "lo')
    (killed / "checkpoints").mkdir()
    (killed / "checkpoints" / ".ckpt-000000006.pt.k2x9.tmp").write_bytes(b"half a checkpoint")
    provenance = (killed / "provenance.json").read_bytes()

    assert clean_failure(invoke("run", recipe, "--output-dir", killed, "--no-progress")) == [
        f"error: output directory {str(killed)!r} is not empty (it holds an earlier run); pass --resume to continue "
        "it, or choose another directory with --output-dir (or run.output_dir), or delete it"]
    changed = write_tiny_recipe(tmp_path / "changed.toml", finished, teacher=EMA, training={"lr": 2e-3})
    assert clean_failure(invoke("run", changed, "--resume", "--output-dir", killed, "--no-progress"), 2)[1] == (
        "  training.lr: 0.001 -> 0.002")

    result = invoke("run", recipe, "--resume", "--output-dir", killed, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(
        f"no checkpoint in {killed / 'checkpoints'} (the run was stopped before its first one): restarting "
        f"{killed} from step 0 with its recipe.toml; stats.jsonl begins anew\n")
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["ckpt-000000006.pt", "ckpt-000000012.pt"]
    assert (killed / "provenance.json").read_bytes() == provenance
    records = [json.loads(line) for line in (killed / "stats.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in records if r.get("event") == "distance"] == [0, 12]
    a, b = load_checkpoint(finished / "checkpoints" / "ckpt-000000012.pt"), load_checkpoint(
        killed / "checkpoints" / "ckpt-000000012.pt")
    for key in ("student", "eval_ema", "teacher"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert b["provenance"]["run_id"] == json.loads(provenance)["run_id"]
    assert not (killed / ".lock").exists()


def test_a_run_directory_without_recipe_or_checkpoint_has_nothing_to_resume(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    (folder / "samples").mkdir(parents=True)
    assert clean_failure(invoke("run", folder, "--resume", "--no-progress")) == [
        f"error: nothing to resume: {str(folder / 'checkpoints')!r} holds no checkpoint (ckpt-*.pt)"]
    assert sorted(p.name for p in folder.iterdir()) == ["samples"]


def test_resume_run_reports_the_restart(tmp_path: Path, registry) -> None:
    recipe = read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run"), registry)
    start_run(recipe, registry).close()
    (tmp_path / "run" / "provenance.json").unlink()  # killed between writing recipe.toml and provenance.json
    run = resume_run(None, registry, tmp_path / "run")
    try:
        assert run.restarted and run.step == 0
        written = json.loads((tmp_path / "run" / "provenance.json").read_text(encoding="utf-8"))
        assert written["run_id"] == run.provenance["run_id"] and len(written["run_id"]) == 32
        assert attrs.evolve(run.recipe, source="x") == attrs.evolve(recipe, source="x")
    finally:
        run.close()
    with pytest.raises(RunError, match="nothing to resume"):
        resume_run(None, registry, tmp_path / "absent")
