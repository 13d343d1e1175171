"""The objective and sampler plugin kinds: `ctcore.testing` passes the builtins and catches broken objectives and
samplers with the rule they break, and a third-party objective and sampler installed through entry points train,
checkpoint and sample like the builtins."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from ctcore_objectives import Consistency, Edm
from ctcore_samplers import Consistency as ConsistencySampler
from ctcore_samplers import Euler, Heun
from helpers import DIFFUSION, write_tiny_recipe
from plugin_env import fake_distribution
from typer.testing import CliRunner

import ctcore
from ctcore.build import start_run
from ctcore.checkpoints import list_checkpoints, load_checkpoint
from ctcore.cli import app
from ctcore.components import OBJECTIVE_PARTS, NoiseLevels
from ctcore.sampling import read_sample_store
from ctcore.testing import check_component
from ctcore.training import train

PluginPath = Callable[[Path], Path]


@pytest.mark.parametrize(("kind", "cls"), [("objective", Consistency), ("objective", Edm),
                                           ("sampler", ConsistencySampler), ("sampler", Heun), ("sampler", Euler)],
                         ids=["objective:consistency", "objective:edm", "sampler:consistency", "sampler:heun",
                              "sampler:euler"])
def test_the_builtin_objectives_and_samplers_meet_their_contract(kind: str, cls: type) -> None:
    check_component(kind, cls)
    assert ctcore.load_registry().get(kind, cls.name) is cls


# ----------------------------------------------------------------------------------- broken objectives


class NoisyObjective(Edm):
    """Draws from torch's global generator: processes of one run would train on different batches."""

    def loss(self, batch):  # type: ignore[no-untyped-def]
        return super().loss(batch) * (1 + 0.01 * torch.rand(()))


class PerSampleObjective(Edm):
    def loss(self, batch):  # type: ignore[no-untyped-def]
        return super().loss(batch).expand(2)


class DetachedObjective(Edm):
    def loss(self, batch):  # type: ignore[no-untyped-def]
        return super().loss(batch).detach()


class UnknownPartObjective(Edm):
    uses: ClassVar[tuple[str, ...]] = ("ema",)


class ListUsesObjective(Edm):
    uses = ["teacher"]  # type: ignore[assignment]


class TwiceUsesObjective(Edm):
    uses: ClassVar[tuple[str, ...]] = ("teacher", "teacher")


class FlowObjective(Edm):
    model = "flow"  # type: ignore[assignment]


class CapitalSamplerObjective(Edm):
    default_sampler: ClassVar[str] = "Heun"


class HalfPassObjective(Edm):
    network_passes: ClassVar[int] = 0


class FlatDenoiseObjective(Edm):
    def denoise(self, network, x, sigma, labels, constants):  # type: ignore[no-untyped-def]
        return super().denoise(network, x, sigma, labels, constants).flatten(1)


@pytest.mark.parametrize(("cls", "problem"), [
    (NoisyObjective, "loss(batch) must draw its randomness only from batch.index_generator and "
                     "batch.noise_generator: another global seed changed it (every process of a run must draw the "
                     "same global batch)"),
    (PerSampleObjective, "loss(batch) must return a scalar tensor, got (2,)"),
    (DetachedObjective, "loss(batch) must be differentiable in the student, but it does not require grad"),
    (UnknownPartObjective, "`uses` must be a tuple of distinct kinds among metric, noise_schedule, curriculum, "
                           "teacher, got ('ema',)"),
    (ListUsesObjective, "`uses` must be a tuple of distinct kinds among metric, noise_schedule, curriculum, "
                        "teacher, got ['teacher']"),
    (TwiceUsesObjective, "`uses` must be a tuple of distinct kinds among metric, noise_schedule, curriculum, "
                         "teacher, got ('teacher', 'teacher')"),
    (FlowObjective, "`model` must be one of 'consistency', 'diffusion' (what the trained network computes), "
                    "got 'flow'"),
    (CapitalSamplerObjective, "`default_sampler` must name a sampler (kebab-case), got 'Heun'"),
    (HalfPassObjective, "`network_passes` must be an int in [1, 1000] (forward-pass equivalents per training "
                        "image), got 0"),
    (FlatDenoiseObjective, "denoise(network, x, sigma, labels, constants) must return finite values shaped like x "
                           "(3, 3, 4, 4), got (3, 48)"),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_check_objective_names_the_broken_rule(cls: type, problem: str) -> None:
    with pytest.raises(AssertionError) as info:
        check_component("objective", cls)
    assert str(info.value) == f"{cls.__qualname__}: {problem}"


# ------------------------------------------------------------------------------------- broken samplers


class MiscountingSampler(Heun):
    def evaluations(self, sigmas: list[float]) -> int:
        return 2 * len(sigmas)  # forgets that the last step, to sigma = 0, is a single Euler step


class JitteringSampler(Heun):
    """Adds noise from torch's global generator: samples would not follow from their seeds."""

    def sample(self, denoiser, noise, sigmas, labels, levels, clip):  # type: ignore[no-untyped-def]
        out = super().sample(denoiser, noise, sigmas, labels, levels, False)
        return (out + 0.01 * torch.randn_like(out)).clamp(-1, 1)


class RisingSampler(Heun):
    def plan(self, steps, sigmas, levels):  # type: ignore[no-untyped-def]
        return super().plan(steps, sigmas, levels)[::-1] if sigmas is None else super().plan(steps, sigmas, levels)


class TrustingSampler(Heun):
    """Takes explicit sigmas as given, even when they increase."""

    def plan(self, steps, sigmas, levels):  # type: ignore[no-untyped-def]
        return [float(s) for s in sigmas] if sigmas is not None else super().plan(steps, None, levels)


class UnclippedSampler(Heun):
    def sample(self, denoiser, noise, sigmas, labels, levels, clip):  # type: ignore[no-untyped-def]
        return 10 * super().sample(denoiser, noise, sigmas, labels, levels, False)


class NoDrawSampler(Heun):
    def noise_draws(self, sigmas: list[float]) -> int:
        return 0


RISING = str(Heun(Heun.Options(), None).plan(None, None, NoiseLevels(0.002, 80.0, (0.821,)))[::-1])


@pytest.mark.parametrize(("cls", "problem"), [
    (MiscountingSampler, "evaluations(plan) says 36 network evaluations, but sample() made 35"),
    (JitteringSampler, "sample() must use no randomness but `noise`: another global seed changed the images"),
    (RisingSampler, f"plan(None, None, levels) must decrease, got {RISING}"),
    (TrustingSampler, "plan(None, [0.821, 80.0], levels) must raise ValueError: the sigmas increase"),
    (UnclippedSampler, "sample(..., clip=True) must return images within [-1, 1]"),
    (NoDrawSampler, "noise_draws(plan) must be an int >= 1, got 0"),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_check_sampler_names_the_broken_rule(cls: type, problem: str) -> None:
    with pytest.raises(AssertionError) as info:
        check_component("sampler", cls)
    assert str(info.value) == f"{cls.__qualname__}: {problem}"


def test_every_objective_part_is_a_kind_the_recipe_knows() -> None:
    assert OBJECTIVE_PARTS == ("metric", "noise_schedule", "curriculum", "teacher")
    assert Consistency.uses == OBJECTIVE_PARTS and Edm.uses == ()
    assert (Consistency.model, Edm.model) == ("consistency", "diffusion")
    assert (Consistency.default_sampler, Edm.default_sampler) == ("consistency", "heun")


# ------------------------------------------------------------------------------- a third-party plugin

PLUGIN = '''
import attrs
import torch

from ctcore import hookimpl
from ctcore_objectives import edm_denoise


class PlainDenoising:
    name = "plain-denoising"
    summary = "unweighted denoising with log-uniform sigma in [0.01, 10] (a test plugin)"
    model = "diffusion"
    uses = ()
    default_sampler = "geometric-euler"
    network_passes = 3

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options, context):
        self.options = options

    def bind(self, student, parts):
        pass

    def loss(self, batch):
        x = batch.x
        u = torch.rand((batch.batch_size,), generator=batch.noise_generator, device=x.device)[batch.share]
        sigma = 0.01 * 1000.0 ** u
        z = torch.randn((batch.batch_size, *x.shape[1:]), generator=batch.noise_generator,
                        device=x.device)[batch.share]
        out = edm_denoise(batch.student, x + sigma.reshape(-1, 1, 1, 1) * z, sigma, batch.labels,
                          batch.constants.sigma_data)
        return (out - x).square().mean()

    def after_step(self, step):
        pass

    def log_fields(self, step):
        return {"plain_steps": step + 1}

    def denoise(self, network, x, sigma, labels, constants):
        return edm_denoise(network, x, sigma, labels, constants.sigma_data)


class GeometricEuler:
    name = "geometric-euler"
    summary = "Euler steps of the probability-flow ODE on a geometric grid (a test plugin)"
    model = "diffusion"

    @attrs.frozen
    class Options:
        steps: int = attrs.field(default=5, validator=attrs.validators.and_(attrs.validators.ge(1),
                                                                           attrs.validators.le(100)))

    def __init__(self, options, context):
        self.options = options

    def plan(self, steps, sigmas, levels):
        if sigmas is None:
            n = self.options.steps if steps is None else steps
            ratio = levels.sigma_min / levels.sigma_max
            sigmas = [levels.sigma_max * ratio ** (i / max(n - 1, 1)) for i in range(n)]
        sigmas = [float(s) for s in sigmas]
        if any(b >= a for a, b in zip(sigmas, sigmas[1:])) or not all(0 < s <= levels.sigma_max for s in sigmas):
            raise ValueError(f"sigmas must decrease within (0, {levels.sigma_max}], got {sigmas}")
        return sigmas

    def preview_plans(self, levels):
        return {"geometric": self.plan(None, None, levels)}

    def noise_draws(self, sigmas):
        return 1

    def evaluations(self, sigmas):
        return len(sigmas)

    def sample(self, denoiser, noise, sigmas, labels, levels, clip):
        x = noise[0] * sigmas[0]
        for s, nxt in zip(sigmas, [*sigmas[1:], 0.0]):
            d = denoiser(x, torch.full((x.shape[0],), s, device=x.device), labels)
            x = x + (nxt - s) * (x - d) / s
        return x.clamp(-1, 1) if clip else x


@hookimpl
def ctcore_register_objectives():
    return [PlainDenoising]


@hookimpl
def ctcore_register_samplers():
    return [GeometricEuler]
'''


def test_a_third_party_objective_and_sampler_train_checkpoint_and_sample(tmp_path: Path,
                                                                          plugin_path: PluginPath) -> None:
    plugin_path(fake_distribution(tmp_path, "ctcore-plain", {"plain": "ctcore_fake_plain"},
                                  {"ctcore_fake_plain": PLUGIN}, version="0.3.0"))
    registry = ctcore.load_registry()
    assert registry.failures == []
    for kind, name in (("objective", "plain-denoising"), ("sampler", "geometric-euler")):
        provider = registry.provider(kind, name)
        assert (provider.distribution, provider.entry_point) == ("ctcore-plain", "plain")
        check_component(kind, registry.get(kind, name))

    overrides = {**DIFFUSION, "objective": {"name": "plain-denoising"}, "sampler": None}  # its default sampler
    recipe = ctcore.read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", **overrides), registry)
    assert recipe.components["sampler"].name == "geometric-euler"
    run = start_run(recipe, registry)
    try:
        train(run, progress=False)
    finally:
        run.close()
    state = load_checkpoint(list_checkpoints(run.out_dir)[-1])
    components = state["provenance"]["components"]
    assert set(components) == {"network", "objective", "sampler"}
    assert components["objective"] == {"name": "plain-denoising", "distribution": "ctcore-plain", "version": "0.3.0"}
    assert components["sampler"] == {"name": "geometric-euler", "distribution": "ctcore-plain", "version": "0.3.0"}
    rows = [json.loads(line) for line in (run.out_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["plain_steps"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10, 12]  # its log fields
    assert sorted(p.name for p in (run.out_dir / "samples").glob("*.png")) == [
        "step-0000006-geometric.png", "step-0000012-geometric.png"]

    for extra, sampler, evaluations in (([], "geometric-euler", 5), (["--sampler", "heun", "--steps", 3], "heun", 5)):
        out = tmp_path / f"{sampler}.h5"
        result = CliRunner().invoke(app, ["sample", str(run.out_dir), "-n", "4", "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
        attrs = read_sample_store(out)["attrs"]
        assert (attrs["sampler"], attrs["evaluations"]) == (sampler, evaluations)
    assert read_sample_store(tmp_path / "geometric-euler.h5")["attrs"]["sigmas"] == pytest.approx(
        [80.0 * (0.002 / 80.0) ** (i / 4) for i in range(5)])
    result = CliRunner().invoke(app, ["sample", str(run.out_dir), "--sampler", "consistency"])
    assert result.exit_code == 2 and re.search(r"holds a diffusion model \(objective 'plain-denoising'\); use one of: "
                                               r"euler, geometric-euler, heun\n$", result.stderr), result.stderr
