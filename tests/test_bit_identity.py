"""iCT and CT runs are bit-identical to the ones before objectives became plugins (issue 12) and before noise
schedules returned (sigma_lo, sigma_hi) pairs (issue 13): the consistency objective's step equals a transcription
of the training step as it was, and short quickstart runs reproduce the state digests recorded before either
change (on the machine type they were recorded on)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_recipe

from ctcore.build import start_run
from ctcore.consistency import denoise, karras_sigmas, pair_weights, shared_rng
from ctcore.recipe import read_recipe
from ctcore.training import train, train_step, update_ema

REPO = Path(__file__).resolve().parents[1]

RECORDED = {  # 40 steps, run.threads 1, torch 2.13.0 CPU on AVX512, recorded at commit 45dfa51
    "quickstart": "14aa5bff1b3ac9517bd1d2a22bbdca1595e27b40f47a9a1d4721e835f2a8addc",
    "quickstart_ct": "82b16b5f68d637bb1d06a76c2f2ff860e938ba882c5a05806d6250fcc6b13f5a",
}
RECORDED_ON = ("2.13.0", "AVX512")


def state_digest(run) -> str:
    """SHA-256 of everything training changes: student, eval EMA, teacher and optimizer state, in key order."""
    h = hashlib.sha256()
    for part in (run.student.state_dict(), run.eval_ema.state_dict(), run.teacher.state_dict()):
        for key in sorted(part):
            h.update(key.encode())
            h.update(part[key].detach().cpu().contiguous().numpy().tobytes())
    for _, state in sorted(run.optimizer.state_dict()["state"].items()):
        for key in sorted(state):
            h.update(torch.as_tensor(state[key]).cpu().numpy().tobytes())
    return h.hexdigest()


def consistency_loss_before(student, teacher, metric, x, labels, sigmas, pair, z, *, weighting, sigma_min,
                            sigma_data):
    """ctcore.consistency.consistency_loss as it was before noise schedules returned pairs (commit 4b63224)."""
    def expand(v):
        return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)

    sigmas = sigmas.to(x.device)
    sigma_hi, sigma_lo = sigmas[pair + 1], sigmas[pair]
    weights = pair_weights(sigmas, weighting)[pair]
    with shared_rng(x.device):
        student_out = denoise(student, x + expand(sigma_hi) * z, sigma_hi, labels, sigma_min=sigma_min,
                              sigma_data=sigma_data)
    with torch.no_grad():
        teacher_out = denoise(teacher, x + expand(sigma_lo) * z, sigma_lo, labels, sigma_min=sigma_min,
                              sigma_data=sigma_data)
    distances = metric(student_out.float(), teacher_out.float()) * weights.to(torch.float32)
    return distances.mean(), distances.detach()


def step_before_objectives(run) -> None:
    """The training step as ctcore.training.train_step was before objectives (commit 45dfa51), transcribed."""
    r, t, world = run.recipe, run.recipe.training, run.world
    k = run.step
    num_scales = run.curriculum.num_scales(k)
    c = r.consistency
    sigmas = karras_sigmas(num_scales, c.sigma_min, c.sigma_max, c.rho).to(run.device)
    x, labels = run.data.batch(t.batch_size, run.index_generator, rank=world.rank, world_size=world.world_size)
    share = world.share(t.batch_size)
    pair = run.noise_schedule.sample(sigmas, t.batch_size, run.index_generator).to(run.device)[share]
    z = torch.randn((t.batch_size, *x.shape[1:]), generator=run.noise_generator, device=run.device)[share]
    if t.warmup_steps > 0:
        for group in run.optimizer.param_groups:
            group["lr"] = t.lr * min(1.0, (k + 1) / t.warmup_steps)
    teacher = run.student_forward if run.teacher.network is run.student else run.teacher.network
    loss, _ = consistency_loss_before(run.student_forward, teacher, run.metric, x, labels, sigmas, pair, z,
                                      weighting=c.weighting, sigma_min=c.sigma_min, sigma_data=c.sigma_data)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.student.parameters(), t.grad_clip)
    run.step = k + 1
    run.optimizer.step()
    run.teacher.update(run.student, k, num_scales)
    update_ema(run.eval_ema, run.student, t.eval_ema_decay)


@pytest.mark.parametrize("overrides", [
    {},  # iCT: no-EMA teacher, dropout 0.1 (the shared mask), pseudo-huber, lognormal pairs, exponential N(k)
    {"teacher": {"name": "ema", "mu0": 0.9}, "curriculum": {"name": "ct", "s0": 2, "s1": 10},
     "noise_schedule": {"name": "uniform"}, "consistency": {"weighting": "uniform"}, "metric": {"name": "l2"},
     "training": {"optimizer": "adam", "warmup_steps": 3, "grad_clip": 1.0}},
], ids=["ict", "ct-ema-l2-adam"])
def test_the_consistency_objective_steps_exactly_as_the_step_before_objectives(tmp_path, registry, overrides):
    digests, generators = [], []
    for name, step in (("now", train_step), ("before", step_before_objectives)):
        # one run after the other: the dropout masks come from the global generator, which building a run seeds
        recipe = read_recipe(write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, **overrides), registry)
        run = start_run(recipe, registry)
        for _ in range(8):
            step(run)
        assert run.step == 8
        digests.append(state_digest(run))
        generators.append((run.index_generator.get_state(), run.noise_generator.get_state(), torch.get_rng_state()))
        run.close()
    assert digests[0] == digests[1]
    assert all(a.equal(b) for a, b in zip(*generators, strict=True))


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_quickstart_runs_reproduce_the_digests_recorded_before_objectives(tmp_path, registry, name):
    here = (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability())
    if here != RECORDED_ON:
        pytest.skip(f"digests were recorded with torch {RECORDED_ON[0]} on {RECORDED_ON[1]}; this is {here} (the "
                    "step-by-step comparison above holds everywhere)")
    recipe = read_recipe(REPO / "recipes" / f"{name}.toml", registry, [
        "training.total_steps=40", "run.threads=1", f"run.output_dir={tmp_path / 'run'}", "evaluation.distance=none",
        "training.sample_every=1000", "training.checkpoint_every=1000"])
    run = start_run(recipe, registry)
    try:
        train(run, progress=False)
        assert state_digest(run) == RECORDED[name]
    finally:
        run.close()


def _before_objectives(recipe_text: str) -> str:
    """A resolved recipe as ctcore wrote it before objectives and samplers: no [objective] or [sampler] section."""
    blocks = recipe_text.split("\n\n")
    return "\n\n".join(b for b in blocks if not b.startswith(("[objective]", "[sampler]")))


def test_a_run_written_before_objectives_resumes_to_the_same_weights_and_samples(tmp_path, registry):
    """Checkpoints and recipe.toml of runs from before objectives (no [objective] / [sampler], provenance naming
    five kinds) resume as consistency runs, to the weights of an uninterrupted run, and sample."""
    from ctcore.build import resume_run
    from ctcore.checkpoints import list_checkpoints
    from ctcore.sampling import sample_from_checkpoint

    def run_to(name: str, stop_at: int | None):
        recipe = read_recipe(write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name), registry)
        run = start_run(recipe, registry)
        train(run, stop_at=stop_at, progress=False)
        run.close()
        return run

    whole = run_to("whole", None)
    run_to("part", 6)
    old = tmp_path / "part"
    (old / "recipe.toml").write_text(_before_objectives((old / "recipe.toml").read_text()), encoding="utf-8")
    for path in list_checkpoints(old):
        state = torch.load(path, weights_only=True)
        assert "[objective]" in state["recipe"]
        state["recipe"] = _before_objectives(state["recipe"])
        for kind in ("objective", "sampler"):
            del state["provenance"]["components"][kind]
        torch.save(state, path)
    resumed = resume_run(None, registry, old)
    assert resumed.recipe.components["objective"].name == "consistency"
    assert resumed.step == 6
    train(resumed, progress=False)
    resumed.close()
    assert state_digest(resumed) == state_digest(whole)
    result = sample_from_checkpoint(old, registry, num_samples=4, out=tmp_path / "s.h5")
    assert result["plan"] == "1-step [80.0]"
