"""Non-finite losses and gradients: the step is skipped and logged; too many in a row stop the run with a
checkpoint of the last good weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_recipe
from torch import nn

from ctcore.build import resume_run, start_run
from ctcore.checkpoints import load_checkpoint
from ctcore.errors import RunError
from ctcore.recipe import read_recipe
from ctcore.training import TrainingDiverged, train


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class PoisonedMetric(nn.Module):
    """Wraps the run's metric; at the listed calls (call c is step k = c) the loss or its gradient is NaN."""

    def __init__(self, metric: nn.Module, bad_calls: set[int], where: str = "loss") -> None:
        super().__init__()
        self.metric, self.bad_calls, self.where, self.calls = metric, bad_calls, where, 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bad = self.calls in self.bad_calls
        self.calls += 1
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
    run.metric = run.objective.parts["metric"] = PoisonedMetric(run.metric, {3, 4}, where)
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


def test_too_many_consecutive_bad_steps_stop_with_a_checkpoint_of_the_last_good_weights(tmp_path, registry):
    run = _run(tmp_path, registry, "diverge", max_nonfinite_steps=3)
    run.metric = run.objective.parts["metric"] = PoisonedMetric(run.metric, set(range(2, 100)))
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
    run.metric = run.objective.parts["metric"] = PoisonedMetric(run.metric, {2})  # step k = 2
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
