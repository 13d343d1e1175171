"""Non-finite losses and gradients: the step is skipped and logged; too many in a row stop the run with a
checkpoint of the last good weights."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_tiny_recipe
from torch import nn

from ctcore.build import resume_run, start_run
from ctcore.checkpoints import load_checkpoint
from ctcore.errors import RunError
from ctcore.recipe import read_recipe
from ctcore.training import TrainingDiverged, train, train_step


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class PoisonedMetric(nn.Module):
    """Wraps the run's metric; at the listed steps k (run.step while the loss is computed) the loss or its gradient
    is NaN. Keyed on the step, not on the call: train() may compute a step twice (it redoes the steps since its
    rollback point when one was not finite), and a real NaN comes back when the step is redone."""

    def __init__(self, run, bad_steps: set[int], where: str = "loss", *, once: bool = False,
                 strict: bool = False) -> None:
        super().__init__()
        self.run, self.metric, self.bad_steps, self.where, self.once = run, run.metric, bad_steps, where, once
        self.strict = strict
        """Raise on non-finite inputs, as a component that refuses them would."""
        self.seen: collections.Counter[int] = collections.Counter()
        """How often each step was computed."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = self.run.step
        self.seen[k] += 1
        if self.strict and not bool(torch.isfinite(x).all()):
            raise ValueError(f"non-finite input at step {k}")
        bad = k in self.bad_steps and not (self.once and self.seen[k] > 1)  # once: a NaN that does not come back
        if bad and self.where == "grad":
            x = _NanGrad.apply(x)
        d = self.metric(x, y)
        return d * float("nan") if bad and self.where == "loss" else d


def _run(tmp_path: Path, registry, name: str, **training):
    training = {"total_steps": 12, "log_every": 2, **training}
    recipe = read_recipe(write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, training=training), registry)
    return start_run(recipe, registry)


def _state(run) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v.clone() for k, v in run.student.state_dict().items()}
    out |= {f"eval_ema.{k}": v.clone() for k, v in run.eval_ema.state_dict().items()}
    for pid, st in run.optimizer.state_dict()["state"].items():
        out |= {f"optimizer.{pid}.{k}": torch.as_tensor(v).clone() for k, v in st.items()}
    return out


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} changed"


def _events(run, name: str) -> list[dict]:
    rows = [json.loads(line) for line in (run.out_dir / "stats.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == name]


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_non_finite_step_changes_nothing_and_is_logged(tmp_path, registry, where):
    run = _run(tmp_path, registry, where)
    run.metric = run.objective.parts["metric"] = PoisonedMetric(run, {3, 4}, where)
    train(run, stop_at=3, progress=False)
    before = _state(run)
    train(run, stop_at=5, progress=False)  # steps k = 3 and 4: both poisoned
    assert run.step == 5 and run.nonfinite_run == 2 and run.last_good_step == 3
    _assert_equal(before, _state(run))  # weights, eval EMA and optimizer state untouched
    events = _events(run, "nonfinite")
    assert [(e["step"], e["consecutive"], e["last_good_step"]) for e in events] == [(4, 1, 3), (5, 2, 3)]
    if where == "loss":
        assert [e["loss"] for e in events] == ["nan", "nan"]  # strict JSON: non-finite numbers as strings
    else:
        assert all(isinstance(e["loss"], float) for e in events)  # the loss was finite, its gradient was not
    train(run, stop_at=6, progress=False)  # a good step again: training goes on and the counter resets
    assert run.nonfinite_run == 0 and run.last_good_step == 6
    after = _state(run)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("student."))
    logged = [json.loads(line) for line in (run.out_dir / "stats.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r and "event" not in r}
    # skipped losses stay out of the logged mean: an interval with no applied step logs "nan"
    assert sorted(losses) == [2, 3, 4, 5, 6] and losses[4] == losses[5] == "nan", losses
    assert all(isinstance(losses[k], float) for k in (2, 3, 6)), losses


def _losses(run) -> dict[int, object]:
    rows = [json.loads(line) for line in (run.out_dir / "stats.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}


def test_inside_train_a_bad_step_is_taken_back_and_redone_before_the_weights_are_read(tmp_path, registry):
    """train() applies steps k = 4..7 without reading their flag; at step 8 (a log line and a checkpoint) it reads
    it once, finds step 5 non-finite, restores the state of step 4 and redoes the four steps one by one, each checked
    alone. Everything then equals steps taken alone by train_step (one read each), bit for bit: weights, eval EMA,
    optimizer state, generators; the checkpoint at step 8 holds those weights and the events are a checked step's."""
    training = {"log_every": 4, "checkpoint_every": 4, "sample_every": 1000}
    a = _run(tmp_path, registry, "deferred", **training)
    a.metric = a.objective.parts["metric"] = PoisonedMetric(a, {5})
    train(a, stop_at=8, progress=False)
    generators = [torch.get_rng_state(), a.index_generator.get_state(), a.noise_generator.get_state()]
    b = _run(tmp_path, registry, "alone", **training)
    b.metric = b.objective.parts["metric"] = PoisonedMetric(b, {5})
    applied = [train_step(b)[1] for _ in range(8)]
    assert applied == [True] * 5 + [False] + [True] * 2
    _assert_equal(_state(a), _state(b))
    assert all(torch.equal(x, y) for x, y in zip(generators, [torch.get_rng_state(), b.index_generator.get_state(),
                                                               b.noise_generator.get_state()], strict=True))
    assert (a.step, a.nonfinite_run, a.last_good_step) == (b.step, b.nonfinite_run, b.last_good_step) == (8, 0, 8)
    assert a.metric.seen == {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2, 7: 2}  # the interval was computed twice
    assert b.metric.seen == dict.fromkeys(range(8), 1)
    saved = load_checkpoint(a.out_dir / "checkpoints" / "ckpt-000000008.pt")
    for key, value in saved["student"].items():
        assert torch.equal(value, b.student.state_dict()[key]), key
    assert [(e["step"], e["consecutive"], e["last_good_step"]) for e in _events(a, "nonfinite")] == [(6, 1, 5)]
    assert sorted(_losses(a)) == [4, 8] and all(isinstance(v, float) for v in _losses(a).values())


def test_the_periodic_distance_reads_the_weights_after_the_bad_steps_are_redone(tmp_path, registry):
    """evaluation.distance_every = 8 in a 12-step run whose other readers come only at the end: step 5's NaN update
    is applied unchecked, and the distance at step 8 is the first reader. It settles first (steps 0..7 redone one by
    one, step 5 skipped), so it measures the weights of steps taken alone, not NaN ones."""
    from ctcore.evaluation import evaluate_distance

    def run(name: str):
        path = write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, evaluation={"distance_every": 8},
                                 training={"log_every": 1000, "checkpoint_every": 1000, "sample_every": 1000})
        made = start_run(read_recipe(path, registry), registry)
        made.metric = made.objective.parts["metric"] = PoisonedMetric(made, {5})
        return made

    a, b = run("deferred"), run("alone")
    train(a, progress=False)
    assert [train_step(b)[1] for _ in range(8)] == [True] * 5 + [False] + [True] * 2
    assert [e["step"] for e in _events(a, "distance")] == [0, 8, 12] and not _events(a, "warning")
    assert _events(a, "distance")[1]["sliced_wasserstein"] == evaluate_distance(b)
    assert a.metric.seen == {**dict.fromkeys(range(8), 2), **dict.fromkeys(range(8, 12), 1)}  # 0..7 redone


def test_a_component_that_refuses_the_spoilt_weights_after_an_unchecked_bad_step_stops_nothing(tmp_path, registry):
    """Step k = 5's NaN update is applied unchecked, so step 6 runs on NaN weights, where a component that refuses
    non-finite inputs raises: train() goes back to step 4, redoes the steps one by one (step 5 skipped) and goes on,
    ending as steps taken alone by train_step, bit for bit."""
    training = {"log_every": 4, "checkpoint_every": 4, "sample_every": 1000}
    a = _run(tmp_path, registry, "deferred", **training)
    a.metric = a.objective.parts["metric"] = PoisonedMetric(a, {5}, strict=True)
    train(a, stop_at=8, progress=False)
    b = _run(tmp_path, registry, "alone", **training)
    b.metric = b.objective.parts["metric"] = PoisonedMetric(b, {5}, strict=True)
    assert [train_step(b)[1] for _ in range(8)] == [True] * 5 + [False] + [True] * 2
    _assert_equal(_state(a), _state(b))
    assert a.metric.seen == {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2, 7: 1}  # 6 raised, then ran on good weights
    assert [(e["step"], e["consecutive"]) for e in _events(a, "nonfinite")] == [(6, 1)]
    assert not _events(a, "error")


def test_a_nan_that_does_not_come_back_when_the_step_is_redone_leaves_no_trace(tmp_path, registry):
    """A step that was non-finite once but is finite when train() redoes it (on a GPU a non-deterministic kernel
    could do that) is applied: the run ends bit for bit as a run that never saw the NaN, its logged losses too, so
    going back restores every state the steps depend on (weights, optimizer, generators, the loss sum)."""
    flaky = _run(tmp_path, registry, "flaky")
    flaky.metric = flaky.objective.parts["metric"] = PoisonedMetric(flaky, {5}, once=True)
    train(flaky, progress=False)
    clean = _run(tmp_path, registry, "clean")
    train(clean, progress=False)
    _assert_equal(_state(flaky), _state(clean))
    assert flaky.metric.seen[4] == flaky.metric.seen[5] == 2  # log_every 2: steps 4 and 5 were redone
    assert not _events(flaky, "nonfinite") and flaky.last_good_step == 12
    assert _losses(flaky) == _losses(clean) and len(_losses(clean)) == 6


def test_too_many_consecutive_bad_steps_stop_with_a_checkpoint_of_the_last_good_weights(tmp_path, registry):
    run = _run(tmp_path, registry, "diverge", max_nonfinite_steps=3)
    run.metric = run.objective.parts["metric"] = PoisonedMetric(run, set(range(2, 100)))
    train(run, stop_at=2, progress=False)
    good = _state(run)
    with pytest.raises(TrainingDiverged) as info:
        train(run, progress=False)
    ckpt = run.out_dir / "checkpoints" / "ckpt-000000005.pt"
    assert info.value.message == (
        f"training stopped at step 5: 3 consecutive steps had a non-finite loss or gradient "
        f"(training.max_nonfinite_steps = 3; last loss nan); {ckpt} holds the weights of the last good step 2. "
        f"Look at the `nonfinite` events in {run.out_dir / 'stats.jsonl'}; then resume with "
        f"`ctcore run {run.out_dir} --resume`, or start a new run with a lower training.lr or a training.grad_clip")
    state = load_checkpoint(ckpt)
    assert state["step"] == 5 and state["last_good_step"] == 2 and state["nonfinite_run"] == 3
    for key, value in state["student"].items():
        assert torch.equal(value, good[f"student.{key}"])
    assert [e["step"] for e in _events(run, "diverged")] == [5]
    resumed = resume_run(None, registry, run.out_dir)  # the checkpoint resumes like any other
    assert (resumed.step, resumed.last_good_step, resumed.nonfinite_run) == (5, 2, 3)


def test_the_check_can_be_switched_off_but_non_finite_weights_are_never_checkpointed(tmp_path, registry):
    """max_nonfinite_steps = 0: the NaN goes into the weights; the next checkpoint refuses to write them, so
    retention never replaces the last finite checkpoint with a non-finite one."""
    run = _run(tmp_path, registry, "off", max_nonfinite_steps=0, checkpoint_every=2, keep_checkpoints=1)
    run.metric = run.objective.parts["metric"] = PoisonedMetric(run, {2})  # step k = 2
    with pytest.raises(RunError) as info:
        train(run, progress=False)
    assert not _events(run, "nonfinite")
    assert not all(torch.isfinite(p).all() for p in run.student.parameters())  # the NaN went into the weights
    good = run.out_dir / "checkpoints" / "ckpt-000000002.pt"
    assert info.value.message == (
        "training produced non-finite values in student['embed.0.weight'] by step 4, so its checkpoint was not "
        f"written (the latest, {str(good)!r}, is kept): start a new run with a lower training.lr or a "
        "training.grad_clip and set training.max_nonfinite_steps above 0 (0 switches off the guard that skips "
        "non-finite steps)")
    assert sorted(p.name for p in good.parent.iterdir()) == [good.name]  # no temporary file either
    assert all(torch.isfinite(v).all() for v in load_checkpoint(good)["student"].values())


def test_a_good_run_is_unchanged_by_the_check(tmp_path, registry):
    """The check only reads; with no bad step the weights equal a run without it, bit for bit."""
    a = _run(tmp_path, registry, "checked")  # built, then trained: building seeds the dropout generator
    train(a, progress=False)
    b = _run(tmp_path, registry, "unchecked", max_nonfinite_steps=0)
    train(b, progress=False)
    _assert_equal(_state(a), _state(b))


def test_a_diverging_run_exits_1_with_one_line_and_a_checkpoint(tmp_path):
    """A real divergence, through the CLI, with in-range settings: Adam with beta2 = 0 (so v = g^2 of the last step
    alone), beta1 = 0.9 and eps = 1e-30 divides momentum by a vanishing gradient; the weights blow up at step 3."""
    training = {"total_steps": 40, "optimizer": "adam", "lr": 1.0, "betas": [0.9, 0.0], "eps": 1e-30,
                "weight_decay": 1.0, "max_nonfinite_steps": 3}
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", training=training)
    proc = subprocess.run([sys.executable, "-m", "ctcore", "run", str(recipe), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: training stopped at step 5: 3 consecutive steps had a non-finite loss")
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-000000005.pt"
    assert f"{ckpt} holds the weights of the last good step 2" in line
    state = load_checkpoint(ckpt)
    assert all(torch.isfinite(v).all() for v in state["student"].values())
    assert state["last_good_step"] == 2


# ------------------------------------------------------------------ non-finite network outputs (finite weights)


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a finished tiny run, a copy of its last checkpoint whose weights are finite but 1e20 times larger, so the
    network's activations overflow float32: every output is inf or NaN)."""
    from ctcore.registry import load_registry

    root = tmp_path_factory.mktemp("overflow")
    registry = load_registry()
    run = start_run(read_recipe(write_tiny_recipe(root / "r.toml", root / "run"), registry), registry)
    try:
        train(run, progress=False)
    finally:
        run.close()
    state = load_checkpoint(run.out_dir / "checkpoints" / "ckpt-000000012.pt")
    for key in ("student", "eval_ema"):
        state[key] = {k: v * 1e20 if v.is_floating_point() else v for k, v in state[key].items()}
    bad = root / "bad" / "overflow.pt"
    bad.parent.mkdir()
    torch.save(state, bad)
    return run.out_dir, bad


def _nonfinite_line(ckpt: Path, count: int, total: int, seeds: str) -> str:
    return (f"checkpoint {str(ckpt)!r} gives non-finite outputs at sigma 80 for {count} of {total} samples of a "
            f"batch (seeds {seeds}): its weights are finite, but its network overflows or returns NaN there; nothing "
            f"was written. Try another checkpoint of the run (or --weights student), or other --sigmas")


def test_every_command_that_turns_outputs_into_images_or_numbers_refuses_non_finite_ones(
        overflowing: tuple[Path, Path], tmp_path: Path) -> None:
    """sample, edit (an edit task and interpolate), eval (sliced Wasserstein and FID) and search-sigmas on a checkpoint
    whose finite weights overflow: one line naming the checkpoint, the sigma and how many samples, exit 1, and nothing
    written (not black images, not a finite-looking distance, not a sigma 'optimum')."""
    from helpers import one_line_error, snapshot
    from test_fid import randomised_inception
    from typer.testing import CliRunner

    from ctcore.cli import app
    from ctcore.fid import save_statistics
    from ctcore.importers import write_dataset

    _, bad = overflowing
    work = tmp_path / "work"
    work.mkdir()
    weights = work / "inception.pth"
    torch.save(randomised_inception().state_dict(), weights)
    refs = write_dataset(work / "refs.h5", torch.full((3, 3, 4, 4), 128, dtype=torch.uint8).numpy(), None, {})
    stats = save_statistics(work / "ref.npz", {"mu": np.zeros(2048), "sigma": np.eye(2048),
                                               "fid_protocol": "tensorflow"})
    before = snapshot(tmp_path)
    commands = {
        "sample": (["sample", bad, "-n", 8, "--seed", 3, "-o", work / "s.h5"], 8, 8, "3, 4, 5, ..."),
        "edit inpaint": (["edit", "inpaint", bad, "--images", refs, "--mask-kind", "half", "--seed", 2, "-o",
                          work / "e.h5"], 3, 3, "2, 3, 4"),
        "edit interpolate": (["edit", "interpolate", bad, "--seeds", "0,1", "--num", 4, "-o", work / "i.h5"], 4, 4,
                             None),
        "eval distance": (["eval", bad, "--metric", "sliced-wasserstein", "-n", 5], 5, 5,
                          "10000000, 10000001, 10000002, ..."),
        "eval fid": (["eval", bad, "--ref", stats, "--inception", weights, "-n", 2, "--no-progress"], 2, 2, "0, 1"),
        "search-sigmas": (["search-sigmas", bad, "--steps", 2, "-n", 4, "--tolerance", 1.0, "--plot",
                           work / "p.png"], 4, 4, "10000000, 10000001, 10000002, ..."),
    }
    for name, (args, count, total, seeds) in commands.items():
        result = CliRunner().invoke(app, [str(a) for a in args])
        line = one_line_error(result, code=1)
        expected = _nonfinite_line(bad, count, total, seeds or "")
        if seeds is None:  # interpolated noise is no seed's own
            expected = expected.replace(" (seeds )", "")
        assert line == expected, name
        assert snapshot(tmp_path) == before, name


def test_the_output_check_names_the_sigma_the_rows_and_their_seeds_and_sees_through_the_clamp() -> None:
    """A model function that is finite at sigma 80 and returns +inf for two samples at sigma 0.821: clamping would
    make them white pixels; the check raises with that sigma, those rows and their seeds."""
    from ctcore.sampling import NonFiniteOutputs, generate

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = x.clamp(-1, 1).clone()
        if float(sigma[0]) < 1:
            out[1] = float("inf")
            out[3, 0, 0, 0] = float("nan")
        return out

    images, _ = generate(denoiser, (3, 4, 4), [10, 11, 12, 13], [80.0], batch_size=4)  # one step: all finite
    assert images.shape == (4, 3, 4, 4)
    with pytest.raises(NonFiniteOutputs) as info:
        generate(denoiser, (3, 4, 4), [10, 11, 12, 13, 14], [80.0, 0.821], batch_size=8)
    failure = info.value
    assert (failure.sigma, failure.rows, failure.total, failure.seeds) == (pytest.approx(0.821), [1, 3], 5, [11, 13])
    assert str(failure) == "non-finite outputs at sigma 0.821 for 2 of 5 samples of a batch (seeds 11, 13)"


def test_a_run_whose_eval_ema_gives_non_finite_outputs_records_warnings_and_goes_on(tmp_path, registry):
    """The evaluated function (not the trained one) returns NaN: the run trains to its end; the in-run distances
    and sample grids are warnings in stats.jsonl, on stderr and in the summary instead of numbers and pictures."""
    from io import StringIO

    from rich.console import Console

    run = _run(tmp_path, registry, "nan-eval")
    objective = run.objective
    objective.denoise = lambda network, x, sigma, labels, constants: torch.full_like(x, float("nan"))
    err = StringIO()
    summary = train(run, progress=False, console=Console(file=err, width=300))
    assert run.step == 12 and summary["final_distance"] is None and run.initial_distance is None
    warnings = _events(run, "warning")
    assert [(w["step"], w["about"]) for w in warnings] == [
        (0, "sliced Wasserstein distance"), (6, "sample grid"), (12, "sample grid"),
        (12, "sliced Wasserstein distance")]
    first = ("no sliced Wasserstein distance at step 0: the eval EMA gives non-finite outputs at sigma 80 for 32 of "
             "32 samples of a batch (seeds 10000000, 10000001, 10000002, ...); training goes on")
    assert warnings[0]["warning"] == first and summary["warnings"][0] == first
    assert err.getvalue().splitlines()[0] == f"warning: {first}"
    assert not _events(run, "distance") and not _events(run, "samples")
    assert not (run.out_dir / "samples").exists() or not list((run.out_dir / "samples").iterdir())
    assert all(torch.isfinite(p).all() for p in run.student.parameters())  # training itself went on


def test_a_run_whose_every_step_was_skipped_ends_with_a_warning_not_a_plain_nan_loss(tmp_path, registry):
    from io import StringIO

    from rich.console import Console

    from ctcore.cli import _print_summary

    run = _run(tmp_path, registry, "all-skipped", max_nonfinite_steps=100)
    run.metric = run.objective.parts["metric"] = PoisonedMetric(run, set(range(100)))
    summary = train(run, progress=False)
    assert summary["skipped_steps"] == 12 and summary["loss"] != summary["loss"]  # NaN: nothing was applied
    expected = (f"every one of the 12 steps was skipped: each had a non-finite loss or gradient, so the weights are "
                f"still those of step 0; see the `nonfinite` events in {run.out_dir / 'stats.jsonl'}, and start "
                f"again with a lower training.lr or a training.grad_clip")
    assert summary["warnings"] == [expected]
    out = StringIO()
    _print_summary(Console(file=out, width=400), run, summary)
    text = out.getvalue()
    flat = " ".join(text.split())
    assert "│ loss (last interval) │ none: every step of the interval was skipped │" in flat and "nan" not in text
    assert "│ skipped steps │ 12 (non-finite loss or gradient) │" in flat
    assert text.rstrip().splitlines()[-1] == f"warning: {expected}"
