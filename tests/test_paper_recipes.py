"""The paper recipes carry the paper's settings, and each ablation switches exactly one iCT change back."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctcore.build import build_components, recipe_differences
from ctcore.recipe import Recipe, read_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load(registry, name: str) -> Recipe:
    return read_recipe(RECIPES / name, registry)


def options(recipe: Recipe, kind: str) -> dict:
    import attrs

    spec = recipe.components[kind]
    return {"name": spec.name, **attrs.asdict(spec.options)}


def test_ict_cifar10_has_the_paper_settings(registry) -> None:
    r = load(registry, "ict_cifar10.toml")
    t = r.training
    assert (t.batch_size, t.optimizer, t.lr, t.total_steps, t.eval_ema_decay) == (1024, "radam", 1e-4, 400_000, 0.99993)
    assert options(r, "curriculum") == {"name": "exponential", "s0": 10, "s1": 1280}
    assert options(r, "noise_schedule") == {"name": "lognormal", "p_mean": -1.1, "p_std": 2.0}
    assert options(r, "metric") == {"name": "pseudo-huber", "c": None}  # c = 0.00054 sqrt(3072)
    assert options(r, "teacher") == {"name": "no-ema"}
    assert r.consistency.weighting == "inverse-delta"
    net = options(r, "network")
    assert (net["name"], net["dropout"], net["fourier_scale"], net["nf"], net["ch_mult"], net["num_res_blocks"]) == (
        "ncsnpp", 0.3, 0.02, 128, (2, 2, 2), 4)
    assert r.sampling.sigma_mid == (0.821,)
    assert (r.data.source, r.data.resolution, r.data.num_classes, r.data.random_flip) == ("hdf5", 32, 0, True)
    metric = build_components(r, registry, device="meta")["metric"]
    assert round(metric.c, 4) == 0.0299


def test_ct_l2_cifar10_has_the_cm_settings(registry) -> None:
    r = load(registry, "ct_l2_cifar10.toml")
    t = r.training
    assert (t.batch_size, t.optimizer, t.lr, t.total_steps, t.eval_ema_decay) == (512, "radam", 2e-4, 800_000, 0.9999)
    assert options(r, "teacher") == {"name": "ema", "mu0": 0.9, "schedule": "adaptive", "s0": 2}
    assert options(r, "noise_schedule") == {"name": "uniform"}
    assert options(r, "curriculum") == {"name": "ct", "s0": 2, "s1": 150}
    assert options(r, "metric") == {"name": "l2"}
    assert r.consistency.weighting == "uniform"
    net = options(r, "network")
    assert (net["fourier_scale"], net["dropout"]) == (16.0, 0.0)


@pytest.mark.parametrize(("name", "blocks", "params"), [("ict_cifar10.toml", 4, 56_395_523),
                                                         ("ict_deep_cifar10.toml", 8, 97_610_499)])
def test_cifar10_networks(registry, name: str, blocks: int, params: int) -> None:
    r = load(registry, name)
    net = build_components(r, registry, device="meta")["network"]
    assert options(r, "network")["num_res_blocks"] == blocks
    assert sum(p.numel() for p in net.parameters()) == params


@pytest.mark.parametrize(("name", "blocks", "params"), [("ict_imagenet64.toml", 3, 295_899_267),
                                                         ("ict_deep_imagenet64.toml", 6, 495_357_699)])
def test_imagenet64_recipes(registry, name: str, blocks: int, params: int) -> None:
    r = load(registry, name)
    assert (r.data.resolution, r.data.num_classes) == (64, 1000)
    assert r.sampling.sigma_mid == (1.526,)
    assert options(r, "network")["name"] == "adm" and options(r, "network")["num_res_blocks"] == blocks
    assert options(r, "teacher") == {"name": "no-ema"} and r.consistency.weighting == "inverse-delta"
    metric = build_components(r, registry, device="meta")["metric"]
    assert round(metric.c, 4) == 0.0599
    net = build_components(r, registry, device="meta")["network"]
    assert sum(p.numel() for p in net.parameters()) == params


ABLATIONS = {
    "ema_teacher.toml": ["teacher.name: \"no-ema\" -> \"ema\"", "teacher.mu0: (unset) -> 0.9",
                         "teacher.schedule: (unset) -> \"adaptive\"", "teacher.s0: (unset) -> 10"],
    "l2_metric.toml": ["metric.name: \"pseudo-huber\" -> \"l2\""],
    "uniform_pairs.toml": ["noise_schedule.name: \"lognormal\" -> \"uniform\"",
                           "noise_schedule.p_mean: -1.1 -> (unset)", "noise_schedule.p_std: 2.0 -> (unset)"],
    "ct_curriculum.toml": ["curriculum.name: \"exponential\" -> \"ct\"", "curriculum.s0: 10 -> 2",
                           "curriculum.s1: 1280 -> 150"],
    "uniform_weighting.toml": ["consistency.weighting: \"inverse-delta\" -> \"uniform\""],
    "fourier16.toml": ["network.fourier_scale: 0.02 -> 16.0"],
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_switches_exactly_one_ict_change_back(registry, name: str) -> None:
    base = load(registry, "ict_cifar10.toml")
    ablation = read_recipe(RECIPES / "ablations" / name, registry)
    changes = [c.strip() for c in recipe_differences(base, ablation) if not c.strip().startswith("run.name:")]
    assert changes == ABLATIONS[name]


def test_every_ablation_is_listed() -> None:
    assert sorted(p.name for p in (RECIPES / "ablations").glob("*.toml")) == sorted(ABLATIONS)


def test_edm_cifar10_has_the_edm_settings(registry) -> None:
    r = load(registry, "edm_cifar10.toml")
    t = r.training
    assert (t.batch_size, t.optimizer, t.lr, t.betas, t.eps) == (512, "adam", 1e-3, (0.9, 0.999), 1e-8)
    assert (t.total_steps, t.warmup_steps, t.eval_ema_decay) == (390_625, 19_531, 0.99929047)
    assert round(0.5 ** (512 / 500_000), 8) == t.eval_ema_decay  # EMA half-life 500 kimg at batch 512
    assert options(r, "objective") == {"name": "edm", "p_mean": -1.2, "p_std": 1.2, "preconditioning": "edm",
                                       "beta_d": 19.9, "beta_min": 0.1, "vp_steps": 1000, "epsilon_t": 1e-5,
                                       "ve_sigma_min": 0.02, "ve_sigma_max": 100.0}  # vp's and ve's unused
    assert options(r, "sampler") == {"name": "heun", "steps": 18, "rho": 7.0}
    assert set(r.components) == {"network", "objective", "sampler"}  # no metric, schedule, curriculum, teacher
    assert (r.consistency.sigma_min, r.consistency.sigma_max, r.consistency.sigma_data) == (0.002, 80.0, 0.5)
    assert (r.evaluation.fid_steps, r.sampling.sigma_mid) == (18, ())
    net = options(r, "network")
    assert (net["name"], net["nf"], net["ch_mult"], net["num_res_blocks"], net["attn_resolutions"]) == (
        "ncsnpp", 128, (2, 2, 2), 4, (16,))
    assert (net["dropout"], net["fourier_scale"], net["fir_kernel"]) == (0.13, 16.0, (1.0, 3.0, 3.0, 1.0))
    assert (net["progressive_input"], net["progressive"]) == ("residual", "none")
    assert (r.data.source, r.data.resolution, r.data.num_classes) == ("hdf5", 32, 0)


def changed_keys(base: Recipe, other: Recipe) -> list[str]:
    """`section.key` of every setting in which two resolved recipes differ (run.name aside: the run directory)."""
    return [c.strip().split(":")[0] for c in recipe_differences(base, other)
            if not c.strip().startswith("run.name:")]


def test_ict_cifar10_small_keeps_every_ict_technique_and_shrinks_only_its_size(registry) -> None:
    """The mid-size recipe is this project's scaling of the paper's: the network, batch and run shrink; every iCT
    technique (teacher, metric, pairs, weighting, curriculum, optimizer, lr, dropout, Fourier scale) is kept."""
    small = load(registry, "ict_cifar10_small.toml")
    assert changed_keys(load(registry, "ict_cifar10.toml"), small) == [
        "training.total_steps", "training.batch_size", "training.eval_ema_decay", "training.checkpoint_every",
        "training.sample_every", "network.nf", "network.num_res_blocks"]
    net = build_components(small, registry, device="meta")["network"]
    assert sum(p.numel() for p in net.parameters()) == 11_544_323  # "about 10-15M parameters"
    assert (small.training.total_steps, small.training.batch_size) == (100_000, 256)
    text = (RECIPES / "ict_cifar10_small.toml").read_text(encoding="utf-8")
    assert "THIS PROJECT'S CHOICE, not the paper's recipe" in text


def test_quickstart_cifar16_ct_switches_every_ict_change_back_and_nothing_else(registry) -> None:
    """The 16 px CPU pair differs exactly as quickstart_ct differs from quickstart: the six iCT changes."""
    ict = load(registry, "quickstart_cifar16.toml")
    ct = load(registry, "quickstart_cifar16_ct.toml")
    assert [c.strip() for c in recipe_differences(ict, ct) if not c.strip().startswith("run.name:")] == [
        "consistency.weighting: \"inverse-delta\" -> \"uniform\"", "network.fourier_scale: 0.02 -> 16.0",
        "metric.name: \"pseudo-huber\" -> \"l2\"", "noise_schedule.name: \"lognormal\" -> \"uniform\"",
        "noise_schedule.p_mean: -1.1 -> (unset)", "noise_schedule.p_std: 2.0 -> (unset)",
        "curriculum.name: \"exponential\" -> \"ct\"", "curriculum.s0: 10 -> 2", "curriculum.s1: 1280 -> 150",
        "teacher.name: \"no-ema\" -> \"ema\"", "teacher.mu0: (unset) -> 0.9",
        "teacher.schedule: (unset) -> \"adaptive\"", "teacher.s0: (unset) -> 2"]
    assert (ict.data.source, ict.data.path, ict.data.resolution) == ("hdf5", "data/cifar10-train-16.h5", 16)
    net = build_components(ict, registry, device="meta")["network"]
    assert sum(p.numel() for p in net.parameters()) == 1_284_035


def test_ict_cifar10_24gb_is_the_paper_recipe_but_for_memory_knobs_and_fits_22_gib(registry) -> None:
    """Only memory knobs (ctcore.build.memory_knobs) differ from ict_cifar10, and the CUDA estimate is <= 22 GiB
    (the paper recipe in one pass: about 70.5 GiB)."""
    from ctcore.build import memory_knobs
    from ctcore.preflight import preflight

    paper, small_card = load(registry, "ict_cifar10.toml"), load(registry, "ict_cifar10_24gb.toml")
    changed = changed_keys(paper, small_card)
    assert changed == ["training.micro_batch_size"]
    assert set(changed) <= memory_knobs(small_card)
    assert memory_knobs(small_card) == {"training.micro_batch_size", "network.checkpoint_blocks"}
    on_cuda = [read_recipe(RECIPES / name, registry, ["run.device=\"cuda\""])
               for name in ("ict_cifar10.toml", "ict_cifar10_24gb.toml")]
    full, split = (preflight(r, registry).memory for r in on_cuda)
    assert (full.batch, split.batch) == (1024, 256)
    gib = 2**30
    assert split.peak(on_cpu=False) <= 22 * gib < full.peak(on_cpu=False)
    assert round(split.peak(on_cpu=False) / gib, 1) == 19.1 and round(full.peak(on_cpu=False) / gib, 1) == 70.5


@pytest.mark.parametrize(("name", "objective", "dropout"), [("sct_cifar10.toml", "sct", 0.2),
                                                            ("scd_cifar10.toml", "scd", 0.0)])
def test_scm_cifar10_recipes_have_the_paper_settings(registry, name: str, objective: str, dropout: float) -> None:
    """sCM App. G.2 (CIFAR-10): the values of sCT and sCD, which differ only in dropout and the teacher."""
    r = load(registry, name)
    t = r.training
    assert options(r, "objective") == {"name": objective, "p_mean": -1.0, "p_std": 1.4, "time_scale": 1.0,
                                       "tangent_normalization": True, "tangent_c": 0.1, "warmup_steps": 10_000,
                                       "adaptive_weighting": True, "jvp_method": "forward-ad", "jvp_step": 1e-6,
                                       "jvp_precision": "fp32"}
    assert options(r, "sampler") == {"name": "scm", "t_mid": 1.1}
    assert (t.optimizer, t.lr, t.betas, t.eps, t.batch_size, t.warmup_steps) == (
        "radam", 1e-4, (0.9, 0.99), 1e-8, 512, 0)
    assert t.eval_ema_decay == round(0.5 ** (512 / 500_000), 8)  # EMA half-life 0.5 Mimg at batch 512
    assert t.total_steps == 400_000  # NOT FOUND in the paper: this recipe's choice
    assert (r.consistency.sigma_max, r.consistency.sigma_data) == (80.0, 0.5)  # T = arctan(160)
    net = options(r, "network")
    assert (net["embedding_type"], net["channel_mult_noise"], net["fir_kernel"], net["progressive_input"]) == (
        "positional", 1, (1.0, 1.0), "none")  # EDM's DDPM++
    assert (net["dropout"], net["logvar_head"], net["time_inputs"]) == (dropout, True, 1)
    assert (r.run.init_from, r.run.init_weights) == ("runs/trigflow-cifar10", "eval-ema")  # the teacher's EMA
    assert t.compile == ("off" if dropout else "auto")  # an eager JVP shares no mask with a compiled pass
    if objective == "scd":
        assert options(r, "teacher") == {"name": "cd", "checkpoint": "runs/trigflow-cifar10",
                                         "weights": "eval-ema", "solver": "heun", "mu": 0.0}
    else:
        assert "teacher" not in r.components
        net_built = build_components(r, registry, device="meta")["network"]
        assert sum(p.numel() for p in net_built.parameters()) == 55_732_868


def test_scd_cifar10_differs_from_sct_cifar10_only_in_dropout_objective_and_teacher(registry) -> None:
    sct, scd = load(registry, "sct_cifar10.toml"), load(registry, "scd_cifar10.toml")
    assert changed_keys(sct, scd) == ["training.compile", "network.dropout", "objective.name", "teacher.name",
                                      "teacher.checkpoint", "teacher.weights", "teacher.solver", "teacher.mu"]


def test_trigflow_cifar10_is_the_scm_teacher_with_the_students_network(registry) -> None:
    """sCM App. G.1: dropout 0.13, batch 512, 400k, Adam 1e-3 (0.9, 0.999), eps 1e-8; the network is the sCT / sCD
    student's tensor for tensor (their run.init_from), so only the dropout differs."""
    r = load(registry, "trigflow_cifar10.toml")
    t = r.training
    assert options(r, "objective") == {"name": "trigflow", "p_mean": -0.8, "p_std": 1.6, "time_scale": 1.0,
                                       "adaptive_weighting": True}
    assert (t.optimizer, t.lr, t.betas, t.eps, t.batch_size, t.total_steps) == (
        "adam", 1e-3, (0.9, 0.999), 1e-8, 512, 400_000)
    assert options(r, "sampler") == {"name": "heun", "steps": 18, "rho": 7.0}
    sct = load(registry, "sct_cifar10.toml")
    teacher_net, student_net = options(r, "network"), options(sct, "network")
    assert teacher_net["dropout"] == 0.13
    assert {k: v for k, v in teacher_net.items() if k != "dropout"} == {
        k: v for k, v in student_net.items() if k != "dropout"}
    assert options(sct, "objective")["time_scale"] == options(r, "objective")["time_scale"]


def test_meanflow_cifar10_has_the_paper_settings(registry) -> None:
    """MeanFlow App. A and py-meanflow cifar10_v0.sh (facts26 items 9-13)."""
    r = load(registry, "meanflow_cifar10.toml")
    t = r.training
    assert options(r, "objective") == {"name": "meanflow", "p_mean": -2.0, "p_std": 2.0, "ratio_r_neq_t": 0.75,
                                       "adaptive_p": 0.75, "adaptive_c": 1e-3, "time_scale": 1.0,
                                       "jvp_method": "forward-ad", "jvp_step": 1e-6, "jvp_precision": "fp32"}
    assert options(r, "sampler") == {"name": "meanflow", "t_mid": 0.5, "deterministic": True}  # eq. 12's jumps
    assert r.consistency.sigma_max == 10_000.0  # sampling from flow time 0.9999, the paper's t = 1 to 1e-4
    assert (t.optimizer, t.lr, t.betas, t.weight_decay, t.batch_size) == ("adam", 6e-4, (0.9, 0.999), 0.0, 1024)
    assert (t.total_steps, t.warmup_steps, t.eval_ema_decay, t.precision) == (800_000, 10_000, 0.99995, "fp32")
    assert (r.data.random_flip, r.data.num_classes, r.data.resolution) == (True, 0, 32)
    net = options(r, "network")
    assert (net["nf"], net["ch_mult"], net["num_res_blocks"], net["attn_resolutions"]) == (128, (2, 2, 2), 4, (16,))
    assert (net["channel_mult_noise"], net["fir_kernel"], net["dropout"]) == (2, (1.0, 3.0, 3.0, 1.0), 0.2)
    assert (net["embedding_type"], net["progressive_input"], net["progressive"]) == ("positional", "none", "none")
    assert (net["time_inputs"], net["logvar_head"]) == (2, False)
    net_built = build_components(r, registry, device="meta")["network"]
    assert sum(p.numel() for p in net_built.parameters()) == 56_192_515  # official 55,930,883: see the recipe
