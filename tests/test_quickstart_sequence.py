"""The toy recipes in the README's order, as a user runs them from a fresh checkout: quickstart_diffusion trains
the diffusion model that quickstart_cd distils and quickstart_ect tunes, both naming it by the relative path
runs/quickstart_diffusion. Each ends at least 5x closer to the data than where it started, and samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO_ROOT, made_once_per_session
from typer.testing import CliRunner, Result

from ctcore.cli import app
from ctcore.recipe import read_recipe
from ctcore.registry import load_registry
from ctcore.sampling import read_sample_store

pytestmark = pytest.mark.slow


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def distances(run_dir: Path) -> list[tuple[int, float]]:
    """(step, sliced Wasserstein distance) of every distance record of a run's stats.jsonl."""
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [(r["step"], r["sliced_wasserstein"]) for r in records if r.get("event") == "distance"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory like a fresh checkout's after `ctcore run recipes/quickstart_diffusion.toml`, trained
    once per test session and shared by pytest-xdist's workers (helpers.made_once_per_session)."""

    def train(where: Path) -> None:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(where)
            result = invoke("run", REPO_ROOT / "recipes" / "quickstart_diffusion.toml", "--no-progress")
        assert result.exit_code == 0, result.output

    return made_once_per_session(tmp_path_factory, "quickstart-checkout", train)


def test_the_diffusion_quickstart_learns_at_least_5x_and_samples(checkout: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured 15.7x (0.5442 -> 0.0347; training 17.6 s on one thread); `ctcore sample` uses Heun's 35 NFE."""
    monkeypatch.chdir(checkout)
    found = distances(Path("runs/quickstart_diffusion"))
    (first, start), (last, end) = found[0], found[-1]
    assert (first, last) == (0, 1000)
    assert end * 5 <= start, (start, end)
    result = invoke("sample", "runs/quickstart_diffusion", "-n", 8)
    assert result.exit_code == 0, result.output
    store = read_sample_store(Path("runs/quickstart_diffusion/samples/ckpt-000001000-18step-8.h5"))
    assert (store["attrs"]["sampler"], store["attrs"]["evaluations"]) == ("heun", 35)
    assert store["images"].shape == (8, 3, 8, 8)


@pytest.mark.parametrize("name", ["quickstart_cd", "quickstart_ect"])
def test_distilling_and_tuning_the_diffusion_quickstart_learn_at_least_5x_and_sample_in_one_step(
        checkout: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The student starts as the diffusion model (run.init_from), so step 0 is its denoiser used as a one-step
    consistency function. Measured on a 2-core machine: cd 0.3172 -> 0.0477 (6.7x, 600 steps), ect 0.3172 ->
    0.0410 (7.7x, 1,000 steps at batch 128; 5.1x to 6.3x with run.seed 1 to 4); a randomly initialised student
    starts at 0.5442."""
    monkeypatch.chdir(checkout)
    recipe = REPO_ROOT / "recipes" / f"{name}.toml"
    check = invoke("check", recipe)
    assert check.exit_code == 0, check.output
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "initialised from runs/quickstart_diffusion/checkpoints/ckpt-000001000.pt" in result.stdout
    run_dir = Path("runs") / name
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["init_from"]["checkpoint"] == "runs/quickstart_diffusion/checkpoints/ckpt-000001000.pt"
    found = distances(run_dir)
    (first, start), (last, end) = found[0], found[-1]
    steps = read_recipe(recipe, load_registry()).training.total_steps
    assert (first, last) == (0, steps)
    assert end * 5 <= start, (start, end)
    sample = invoke("sample", run_dir, "-n", 8, "--steps", 1)
    assert sample.exit_code == 0, sample.output
    store = read_sample_store(run_dir / "samples" / f"ckpt-{steps:09d}-1step-8.h5")
    assert (store["attrs"]["sampler"], store["attrs"]["evaluations"]) == ("consistency", 1)


def test_continuous_time_distillation_of_the_diffusion_quickstart_learns_at_least_5x_and_samples_in_two_steps(
        checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quickstart_scd: sCD's tangent from runs/quickstart_diffusion's denoiser; the student starts from scratch.
    Measured 0.6289 -> 0.0885 (7.1x, 400 steps, 28 s on one thread)."""
    monkeypatch.chdir(checkout)
    recipe = REPO_ROOT / "recipes" / "quickstart_scd.toml"
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 0, result.output
    found = distances(Path("runs/quickstart_scd"))
    (first, start), (last, end) = found[0], found[-1]
    assert (first, last) == (0, 400)
    assert end * 5 <= start, (start, end)
    sample = invoke("sample", "runs/quickstart_scd", "-n", 8, "--steps", 2)
    assert sample.exit_code == 0, sample.output
    store = read_sample_store(Path("runs/quickstart_scd/samples/ckpt-000000400-2step-8.h5"))
    assert (store["attrs"]["sampler"], store["attrs"]["evaluations"]) == ("scm", 2)
