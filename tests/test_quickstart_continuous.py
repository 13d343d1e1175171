"""The continuous-time toy recipes of the README (issue 26), as a user runs them: each ends at least 5x closer to
the data than its untrained network, and samples in one and two steps with its own sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO_ROOT
from typer.testing import CliRunner

from ctcore.cli import app
from ctcore.sampling import read_sample_store

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("name", "sampler", "steps"), [("quickstart_sct", "scm", 400),
                                                        ("quickstart_meanflow", "meanflow", 320)])
def test_a_continuous_time_quickstart_learns_at_least_5x_and_samples(tmp_path, monkeypatch, name, sampler,
                                                                     steps) -> None:
    """Measured on one thread of an idle 2-core machine: sct 0.6289 -> 0.0872 (7.2x, 21 s of training), meanflow
    0.5957 -> 0.0746 (8.0x, 19 s)."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", str(REPO_ROOT / "recipes" / f"{name}.toml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    run_dir = Path("runs") / name
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    found = [(r["step"], r["sliced_wasserstein"]) for r in records if r.get("event") == "distance"]
    (first, start), (last, end) = found[0], found[-1]
    assert (first, last) == (0, steps)
    assert end * 5 <= start, (start, end)
    for n in (1, 2):
        sample = CliRunner().invoke(app, ["sample", str(run_dir), "-n", "4", "--steps", str(n)])
        assert sample.exit_code == 0, sample.output
        store = read_sample_store(run_dir / "samples" / f"ckpt-{steps:09d}-{n}step-4.h5")
        assert (store["attrs"]["sampler"], store["attrs"]["evaluations"]) == (sampler, n)
        assert store["images"].shape == (4, 3, 8, 8)
