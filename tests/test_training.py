"""The training loop: resumed runs equal uninterrupted ones bit for bit, checkpoints, teachers, quickstart learns."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import made_once_per_session, write_tiny_recipe

import ctcore
import ctcore.training
from ctcore.build import resume_run, start_run
from ctcore.checkpoints import list_checkpoints, load_checkpoint
from ctcore.recipe import read_recipe
from ctcore.training import TrainingStopped, train

REPO = Path(__file__).resolve().parents[1]


def _train(tmp_path: Path, registry, name: str, stop_at: int | None = None, **overrides):
    recipe = read_recipe(write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, **overrides), registry)
    run = start_run(recipe, registry)
    train(run, stop_at=stop_at, progress=False)
    return run


def _assert_same_state(a, b) -> None:
    for key in ("student", "eval_ema", "teacher"):
        sa = getattr(a, key) if key != "teacher" else a.teacher
        sb = getattr(b, key) if key != "teacher" else b.teacher
        da, db = sa.state_dict(), sb.state_dict()
        assert da.keys() == db.keys(), key
        for name in da:
            assert torch.equal(da[name], db[name]), f"{key}.{name} differs"
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    for pid, state in oa["state"].items():
        for k, v in state.items():
            other = ob["state"][pid][k]
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(other)), f"optimizer state {pid}.{k} differs"


@pytest.mark.parametrize(
    ("stop", "overrides"),
    [
        (6, {}),  # iCT: no-EMA teacher, dropout on (the tiny recipe has dropout 0.1)
        (5, {"teacher": {"name": "ema", "mu0": 0.9}, "curriculum": {"name": "ct", "s0": 2, "s1": 10},
             "noise_schedule": {"name": "uniform"}, "consistency": {"weighting": "uniform"}}),
        (7, {"training": {"optimizer": "adam", "warmup_steps": 4, "grad_clip": 1.0}}),
    ],
    ids=["ict", "ct-ema-teacher", "adam-warmup-clip"],
)
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, registry, stop, overrides):
    whole = _train(tmp_path, registry, "whole", **overrides)
    part = _train(tmp_path, registry, "part", stop_at=stop, **overrides)
    assert part.step == stop and list_checkpoints(part.out_dir)[-1].name == f"ckpt-{stop:09d}.pt"
    resumed = resume_run(None, registry, part.out_dir)
    assert resumed.step == stop
    train(resumed, progress=False)
    assert resumed.step == whole.step == 12
    _assert_same_state(whole, resumed)
    # and the check can fail: one more step breaks equality
    train(resumed, stop_at=None, progress=False)  # no-op at the end
    from ctcore.training import train_step

    train_step(resumed)
    with pytest.raises(AssertionError):
        _assert_same_state(whole, resumed)


def test_resume_continues_stats_and_keeps_the_start_distance(tmp_path, registry):
    part = _train(tmp_path, registry, "part", stop_at=6)
    first = part.initial_distance
    resumed = resume_run(None, registry, part.out_dir)
    summary = train(resumed, progress=False)
    assert summary["initial_distance"] == first
    rows = [json.loads(line) for line in (part.out_dir / "stats.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [2, 4, 6, 8, 10, 12]
    distances = [r for r in rows if r.get("event") == "distance"]
    assert [d["step"] for d in distances] == [0, 12]


def test_the_distance_is_measured_every_distance_every_steps_on_the_same_samples(tmp_path, registry):
    """evaluation.distance_every = 0 (the default) measures ten points over the run, every max(1, 25 // 10) = 2
    steps, besides step 0 and the end; 5 measures every 5 steps and the end, a multiple, once; distance = "none"
    never. Measuring changes no trained value (the three runs end with the same weights) and takes the same samples
    each time (the final weights measured again give the distance logged at the end, twice)."""
    from ctcore.evaluation import evaluate_distance

    runs = {every: _train(tmp_path, registry, f"every-{every}", training={"total_steps": 25},
                          evaluation={"distance_every": every}) for every in (0, 5)}
    never = _train(tmp_path, registry, "none", training={"total_steps": 25}, evaluation={"distance": "none"})
    assert sorted(_distances(runs[0].out_dir)) == [0, *range(2, 25, 2), 25]
    logged = [r["step"] for r in _stats(runs[5].out_dir) if r.get("event") == "distance"]
    assert logged == [0, 5, 10, 15, 20, 25]
    assert _distances(never.out_dir) == {}
    _assert_same_state(runs[0], runs[5])
    _assert_same_state(runs[0], never)
    end = _distances(runs[5].out_dir)[25]
    assert evaluate_distance(runs[5]) == evaluate_distance(runs[5]) == end == _distances(runs[0].out_dir)[25]


def _loss_rows(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("how", ["killed", "sigterm"])
def test_a_resume_inside_a_log_interval_logs_the_losses_of_the_uninterrupted_run(tmp_path, registry, monkeypatch,
                                                                                 how):
    """log_every 4, checkpoint_every 6: the checkpoint at step 6 holds the loss sum of steps 5 and 6, and the
    resumed run's row at step 8 averages steps 5 to 8, as the uninterrupted run's does (the same floats)."""
    training = {"log_every": 4, "checkpoint_every": 6, "sample_every": 1000}
    whole = _train(tmp_path, registry, "whole", training=training)
    whole.close()
    expected = _loss_rows(whole.out_dir)
    assert [step for step, _ in expected] == [4, 8, 12]

    real_step = ctcore.training.train_step

    def interrupted_step(run):
        if how == "killed" and run.step == 6:  # the process dies after the checkpoint at step 6
            raise RuntimeError("killed")
        result = real_step(run)
        if how == "sigterm" and run.step == 6:  # SIGTERM during step 6: the loop stops after it
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    recipe = read_recipe(write_tiny_recipe(tmp_path / "part.toml", tmp_path / "part", training=training), registry)
    part = start_run(recipe, registry)
    with monkeypatch.context() as m, pytest.raises(RuntimeError if how == "killed" else TrainingStopped):
        m.setattr(ctcore.training, "train_step", interrupted_step)
        train(part, progress=False, handle_signals=how == "sigterm")
    part.close()
    assert [p.name for p in list_checkpoints(part.out_dir)] == ["ckpt-000000006.pt"]
    state = load_checkpoint(part.out_dir / "checkpoints" / "ckpt-000000006.pt")
    assert state["loss_count"] == 2 and state["loss_sum"] > 0  # steps 5 and 6: half a log interval
    assert _loss_rows(part.out_dir) == expected[:1]

    resumed = resume_run(None, registry, part.out_dir)
    assert (resumed.step, resumed.loss_count, resumed.loss_sum) == (6, 2, state["loss_sum"])
    train(resumed, progress=False)
    resumed.close()
    assert _loss_rows(part.out_dir) == expected


def test_one_step_moves_the_eval_ema_by_one_minus_decay_towards_the_student(tmp_path, registry):
    """eval_ema <- decay eval_ema + (1 - decay) student after the optimizer step: torch.lerp(before, student,
    1 - decay) bit for bit, the formula within float32 rounding; buffers are the student's, copied."""
    from ctcore.build import build_run
    from ctcore.training import train_step

    run = build_run(read_recipe(write_tiny_recipe(tmp_path / "ema.toml", tmp_path / "ema"), registry), registry)
    decay = run.recipe.training.eval_ema_decay
    assert decay == 0.9
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an eval EMA apart from the student everywhere, as after some training
        for p in run.eval_ema.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        for b in run.eval_ema.buffers():
            b.zero_()  # the mlp's only buffer (its Fourier frequencies) never changes: make the copy show
    before = [p.detach().clone() for p in run.eval_ema.parameters()]
    student_before = [p.detach().clone() for p in run.student.parameters()]
    _, applied = train_step(run)
    assert applied and run.step == 1
    assert any(not torch.equal(a, b) for a, b in zip(run.student.parameters(), student_before, strict=True))
    named = list(run.eval_ema.named_parameters())
    for (name, ema), old, student in zip(named, before, run.student.parameters(), strict=True):
        assert torch.equal(ema, torch.lerp(old, student, 1 - decay)), name
        exact = decay * old.double() + (1 - decay) * student.double()
        bound = 2 * torch.finfo(torch.float32).eps * (old.double().abs() + student.double().abs())
        assert ((ema.double() - exact).abs() <= bound).all(), name
    buffers = list(run.eval_ema.named_buffers())
    assert buffers
    for (name, eb), sb in zip(buffers, run.student.buffers(), strict=True):
        assert torch.equal(eb, sb) and eb.abs().sum() > 0, name


def test_checkpoint_contents_and_retention(tmp_path, registry):
    run = _train(tmp_path, registry, "keep", training={"checkpoint_every": 2, "keep_checkpoints": 2})
    names = [p.name for p in list_checkpoints(run.out_dir)]
    assert names == ["ckpt-000000010.pt", "ckpt-000000012.pt"]
    assert not [p for p in (run.out_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp files
    state = load_checkpoint(run.out_dir / "checkpoints" / names[-1])
    assert state["step"] == 12
    assert set(state) >= {"student", "eval_ema", "teacher", "optimizer", "rng", "recipe", "provenance"}
    assert set(state["rng"]) == {"torch", "cuda", "index", "noise", "ranks"}
    assert state["rng"]["ranks"] is None and state["world_size"] == 1 and state["last_good_step"] == 12
    assert state["teacher"] == {}  # the no-EMA teacher is the student: nothing extra to store
    assert state["provenance"]["components"]["metric"] == {"name": "pseudo-huber", "distribution": "ctcore",
                                                          "version": ctcore.__version__}
    assert "[teacher]\nname = \"no-ema\"" in state["recipe"]


def test_teacher_and_eval_ema_are_different_things(tmp_path, registry):
    ict = _train(tmp_path, registry, "ict")
    assert ict.teacher.network is ict.student  # iCT: theta^- = stopgrad(theta)
    diffs = [not torch.equal(a, b) for a, b in zip(ict.eval_ema.parameters(), ict.student.parameters(), strict=True)]
    assert any(diffs)  # the eval EMA averages the student; it is not the teacher
    ct = _train(tmp_path, registry, "ct", teacher={"name": "ema", "mu0": 0.9})
    assert ct.teacher.network is not ct.student
    teacher_params = dict(ct.teacher.network.named_parameters())
    ema_params = dict(ct.eval_ema.named_parameters())
    assert any(not torch.equal(teacher_params[k], ema_params[k]) for k in teacher_params)
    state = load_checkpoint(list_checkpoints(ct.out_dir)[-1])
    assert state["teacher"].keys() == ct.student.state_dict().keys()


def test_warmup_learning_rate_is_logged(tmp_path, registry):
    run = _train(tmp_path, registry, "warm", training={"warmup_steps": 8, "lr": 0.01})
    rows = [json.loads(line) for line in (run.out_dir / "stats.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs[2] == pytest.approx(0.01 * 2 / 8)
    assert lrs[8] == pytest.approx(0.01)
    assert lrs[12] == pytest.approx(0.01)


def test_bf16_autocast_runs_on_cpu(tmp_path, registry):
    run = _train(tmp_path, registry, "bf16", training={"precision": "bf16"})
    assert run.precision == "bf16"
    rows = [json.loads(line) for line in (run.out_dir / "stats.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_run_writes_resolved_recipe_provenance_and_pictures(tmp_path, registry):
    run = _train(tmp_path, registry, "files")
    resolved = read_recipe(run.out_dir / "recipe.toml", registry)
    assert resolved.training == run.recipe.training and resolved.components == run.recipe.components
    prov = json.loads((run.out_dir / "provenance.json").read_text())
    assert prov["torch"] == torch.__version__ and prov["ctcore"] == ctcore.__version__
    assert prov["data_shape"] == [3, 4, 4]
    pngs = sorted(p.name for p in (run.out_dir / "samples").glob("*.png"))
    assert pngs == ["step-0000006-1step.png", "step-0000006-2step.png",
                    "step-0000012-1step.png", "step-0000012-2step.png"]
    from PIL import Image

    with Image.open(run.out_dir / "samples" / pngs[-1]) as im:
        assert im.format == "PNG" and im.width > im.height  # samples and data side by side


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's `ctcore run recipes/quickstart.toml`, trained to its 1,000 steps once per test session (shared
    by xdist's workers); run.threads = 0, as a user's run picks threads. Tests that write into it copy it first."""
    from typer.testing import CliRunner

    from ctcore.cli import app

    def make(folder: Path) -> None:
        result = CliRunner().invoke(app, ["run", str(REPO / "recipes" / "quickstart.toml"), "--output-dir",
                                          str(folder / "quickstart"), "--no-progress"])
        assert result.exit_code == 0, result.output

    return made_once_per_session(tmp_path_factory, "quickstart-1000", make) / "quickstart"


def _stats(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text(encoding="utf-8").splitlines()]


def _distances(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["sliced_wasserstein"] for r in _stats(run_dir) if r.get("event") == "distance"}


@pytest.mark.slow
def test_quickstart_learns_at_least_10x_better_than_untrained(quickstart):
    """The README's main job: the full quickstart recipe ends >= 10x closer to the data than at step 0 (12.7x with
    one thread, 12.8x with two), and its distance curve has 11 points (every 100 steps)."""
    distances = _distances(quickstart)
    assert sorted(distances) == list(range(0, 1001, 100))
    assert distances[1000] * 10 <= distances[0], distances


@pytest.mark.slow
def test_extending_the_finished_quickstart_keeps_its_curriculum_and_its_distance(quickstart, tmp_path):
    """The README's `--resume --set training.total_steps=...` on the finished quickstart, 1,000 -> 1,500 steps: the
    new plan (K' = 187) would give N = 321 at step 1,000 and reach 1,281 again only at step 1,309, but N(k) keeps the
    1,281 reached, and the run ends no worse than 1.1x its distance at step 1,000 (measured with one thread:
    0.0494 -> 0.0441, passing 0.1129 at step 1,200; re-planning the curriculum instead made it 0.0494 -> 0.0692)."""
    import shutil

    from typer.testing import CliRunner

    from ctcore.cli import app

    run_dir = Path(shutil.copytree(quickstart, tmp_path / "quickstart"))
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["run", str(run_dir), "--resume", "--set",
                                                             "training.total_steps=1500", "--no-progress"])
    assert result.exit_code == 0, result.output
    records = _stats(run_dir)
    scales = [(r["step"], r["num_scales"]) for r in records if "loss" in r]
    assert [n for _, n in scales] == sorted(n for _, n in scales)  # never backwards, over the whole log
    assert {n for step, n in scales if step > 1000} == {1281}
    [event] = [r for r in records if r.get("event") == "recipe_changed"]
    assert (event["changes"], event["num_scales"]) == ({"training.total_steps": [1000, 1500]}, [1281, 1281])
    distances = _distances(run_dir)
    assert sorted(distances) == [*range(0, 1001, 100), 1050, 1200, 1350, 1500]  # every 1,500 // 10 after it
    assert distances[1500] <= 1.1 * distances[1000], distances
    assert f"│ sliced Wasserstein to data │ at resume (step 1,000) {distances[1000]:.4f} -> now " \
           f"{distances[1500]:.4f} (" in result.stdout


@pytest.mark.slow
def test_the_bf16_quickstart_learns_at_least_5x_better_than_untrained(tmp_path, registry):
    """`--set training.precision=bf16` on CPU (bf16 autocast around the loss; weights, optimizer and eval EMA stay
    float32): the quickstart, shortened to 500 steps to keep the suite fast, still learns, 0.6289 -> 0.0784 (8.0x;
    the whole 1000 steps: 0.0363, 17.3x against fp32's 12.7x) with one thread."""
    recipe = read_recipe(REPO / "recipes" / "quickstart.toml", registry,
                         sets=["training.precision=bf16", "training.total_steps=500"])
    run = start_run(recipe, registry, tmp_path / "quickstart")
    assert run.precision == "bf16" and run.device.type == "cpu"
    outputs = set()
    hook = run.student.register_forward_hook(lambda module, args, out: outputs.add(out.dtype))
    summary = train(run, progress=False)
    hook.remove()
    assert outputs == {torch.bfloat16}  # the network ran under bf16 autocast (sampling and evaluation: eval EMA)
    assert all(p.dtype == torch.float32 for p in run.student.parameters())
    assert summary["step"] == recipe.training.total_steps
    assert summary["final_distance"] * 5 <= summary["initial_distance"], summary


def test_compile_switch_wraps_the_student_and_auto_is_off_on_cpu(tmp_path, registry):
    from ctcore.build import build_run
    from ctcore.devices import compile_enabled

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [compile_enabled(s, cpu) for s in ("auto", "on", "off")] == [False, True, False]
    assert [compile_enabled(s, cuda) for s in ("auto", "on", "off")] == [True, True, False]

    auto = build_run(read_recipe(write_tiny_recipe(tmp_path / "a.toml", tmp_path / "a"), registry), registry)
    assert auto.student_forward is auto.student
    on = build_run(read_recipe(write_tiny_recipe(tmp_path / "b.toml", tmp_path / "b",
                                                 training={"compile": "on"}), registry), registry)
    assert on.student_forward is not on.student
    assert on.student_forward._orig_mod is on.student  # torch.compile's wrapper around the same weights


def test_the_teacher_runs_in_train_mode(tmp_path, registry):
    run = _train(tmp_path, registry, "mode", teacher={"name": "ema", "mu0": 0.9})
    assert run.teacher.network.training and run.student.training and not run.eval_ema.training


@pytest.mark.parametrize(("opt", "expected"), [(torch.optim.Adam, {"fused": True}),
                                               (torch.optim.RAdam, {"foreach": True})])
def test_cuda_optimizer_options_are_ones_the_optimizer_accepts(opt, expected):
    from ctcore.devices import fast_optimizer_options

    options = fast_optimizer_options(opt, torch.device("cuda"))
    assert options == expected
    if "foreach" in options:  # constructible on CPU too; fused needs device tensors
        opt([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, **options)
    assert fast_optimizer_options(opt, torch.device("cpu")) == {}


def test_training_leaves_the_process_floating_point_mode_as_it_found_it(tmp_path, registry):
    def flushing() -> bool:
        return torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() == 0.0

    assert not flushing()
    _train(tmp_path, registry, "fp")
    assert not flushing()  # denormals are flushed only while training runs


def test_a_stats_line_cut_short_by_a_kill_stays_on_its_own_line(tmp_path, registry):
    from ctcore.reporting import read_stats

    part = _train(tmp_path, registry, "cut", stop_at=6)
    stats = part.out_dir / "stats.jsonl"
    whole_lines = stats.read_text().splitlines()
    with open(stats, "a") as f:
        f.write('{"time": 1, "step": 7, "lo')  # SIGKILL in the middle of a write
    resumed = resume_run(None, registry, part.out_dir)
    train(resumed, progress=False)
    lines = stats.read_text().splitlines()
    assert lines[: len(whole_lines)] == whole_lines and lines[len(whole_lines)] == '{"time": 1, "step": 7, "lo'
    rows = read_stats(part.out_dir)
    assert len(rows) == len(lines) - 1 and [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10, 12]
