"""Every numeric option of the core and of every builtin component has a two-sided range, checked when the recipe
is read, with the reason in the message; every value inside the ranges is numerically safe: edge values train
through `ctcore run` to finite weights, and the ranges' numerical claims (grids, seeds, lognormal masses) hold."""

from __future__ import annotations

import math
import typing
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from helpers import DIFFUSION, MEANFLOW, SCT, tiny_recipe_text, tiny_scd, write_tiny_recipe
from typer.testing import CliRunner

import ctcore
from ctcore.checkpoints import list_checkpoints, load_checkpoint
from ctcore.cli import app
from ctcore.components import BuildContext, entries_of, range_of, show
from ctcore.consistency import consistency_scalings, karras_sigmas, pair_weights
from ctcore.distributed import rank_seed
from ctcore.errors import RecipeError
from ctcore.recipe import CORE_SECTIONS, MAX_SEED, MAX_STEPS, parse_recipe, read_recipe

REGISTRY = ctcore.load_registry()
ONE_BELOW_1 = math.nextafter(1.0, 0.0)

# (section, component or None, key, lo, hi, brackets): the ranges, pinned. A numeric option missing here (or
# without a range in the code) fails test_every_numeric_option_has_a_two_sided_range.
RANGES = [
    ("run", None, "seed", 0, 10**18, "[]"),
    ("run", None, "threads", 0, 512, "[]"),
    ("data", None, "channels", 1, 1024, "[]"),
    ("data", None, "resolution", 1, 4096, "[]"),
    ("data", None, "num_images", 1, 100_000_000, "[]"),
    ("data", None, "num_classes", 0, 100_000, "[]"),
    ("consistency", None, "sigma_min", 1e-5, 100.0, "[]"),
    ("consistency", None, "sigma_max", 1e-3, 1e4, "[]"),
    ("consistency", None, "sigma_data", 1e-3, 1e3, "[]"),
    ("consistency", None, "rho", 0.1, 1000.0, "[]"),
    ("training", None, "total_steps", 1, 999_999_999, "[]"),
    ("training", None, "batch_size", 1, 1_000_000, "[]"),
    ("training", None, "micro_batch_size", 0, 1_000_000, "[]"),
    ("training", None, "lr", 0.0, 1.0, "(]"),
    ("training", None, "betas", 0.0, 1.0, "[)"),
    ("training", None, "eps", 1e-30, 1.0, "[]"),
    ("training", None, "weight_decay", 0.0, 1.0, "[]"),
    ("training", None, "warmup_steps", 0, 999_999_999, "[]"),
    ("training", None, "grad_clip", 0.0, 1e10, "[]"),
    ("training", None, "eval_ema_decay", 0.0, 1.0, "[)"),
    ("training", None, "log_every", 1, 999_999_999, "[]"),
    ("training", None, "checkpoint_every", 1, 999_999_999, "[]"),
    ("training", None, "sample_every", 1, 999_999_999, "[]"),
    ("training", None, "keep_checkpoints", 1, 100_000, "[]"),
    ("training", None, "max_nonfinite_steps", 0, 999_999_999, "[]"),
    ("sampling", None, "num_samples", 1, 100_000, "[]"),
    ("sampling", None, "seed", 0, 10**18, "[]"),
    ("sampling", None, "sigma_mid", 1e-5, 1e4, "[]"),
    ("evaluation", None, "distance_every", 0, 999_999_999, "[]"),
    ("evaluation", None, "num_samples", 1, 100_000, "[]"),
    ("evaluation", None, "num_projections", 1, 10_000, "[]"),
    ("evaluation", None, "fid_every", 0, 999_999_999, "[]"),
    ("evaluation", None, "fid_num_samples", 2, 1_000_000, "[]"),
    ("evaluation", None, "fid_steps", 1, 1001, "[]"),
    ("evaluation", None, "fid_batch_size", 1, 65_536, "[]"),
    ("evaluation", None, "is_split_seed", 0, 2**32 - 1, "[]"),
    ("network", "mlp", "width", 1, 65_536, "[]"),
    ("network", "mlp", "num_blocks", 1, 1000, "[]"),
    ("network", "mlp", "embedding_features", 1, 65_536, "[]"),
    ("network", "mlp", "fourier_scale", 0.0, 1000.0, "[]"),
    ("network", "mlp", "dropout", 0.0, 0.99, "[]"),
    ("network", "mlp", "time_inputs", 1, 2, "[]"),
    ("network", "ncsnpp", "nf", 4, 4096, "[]"),
    ("network", "ncsnpp", "ch_mult", 1, 64, "[]"),
    ("network", "ncsnpp", "num_res_blocks", 1, 64, "[]"),
    ("network", "ncsnpp", "attn_resolutions", 1, 4096, "[]"),
    ("network", "ncsnpp", "dropout", 0.0, 0.99, "[]"),
    ("network", "ncsnpp", "fir_kernel", 0.0, 1000.0, "[]"),
    ("network", "ncsnpp", "init_scale", 0.0, 10.0, "[]"),
    ("network", "ncsnpp", "fourier_scale", 0.0, 1000.0, "(]"),
    ("network", "ncsnpp", "channel_mult_noise", 1, 16, "[]"),
    ("network", "ncsnpp", "max_positions", 1, 1_000_000_000, "[]"),
    ("network", "ncsnpp", "augment_dim", 0, 64, "[]"),
    ("network", "ncsnpp", "time_inputs", 1, 2, "[]"),
    ("network", "adm", "model_channels", 1, 4096, "[]"),
    ("network", "adm", "channel_mult", 1, 64, "[]"),
    ("network", "adm", "num_res_blocks", 1, 64, "[]"),
    ("network", "adm", "attention_resolutions", 1, 4096, "[]"),
    ("network", "adm", "num_head_channels", 1, 65_536, "[]"),
    ("network", "adm", "dropout", 0.0, 0.99, "[]"),
    ("network", "adm", "dropout_max_resolution", 1, 4096, "[]"),
    ("network", "adm", "num_groups", 1, 1024, "[]"),
    ("network", "adm", "augment_dim", 0, 64, "[]"),
    ("network", "adm", "time_inputs", 1, 2, "[]"),
    ("metric", "pseudo-huber", "c", 1e-8, 1000.0, "[]"),
    ("metric", "lpips", "resize", 0, 4096, "[]"),
    ("noise_schedule", "lognormal", "p_mean", -20.0, 20.0, "[]"),
    ("noise_schedule", "lognormal", "p_std", 0.01, 100.0, "[]"),
    ("noise_schedule", "ect", "p_mean", -5.0, 5.0, "[]"),
    ("noise_schedule", "ect", "p_std", 0.01, 10.0, "[]"),
    ("noise_schedule", "ect", "q", 1.0, 1000.0, "(]"),
    ("noise_schedule", "ect", "k", 0.0, 1000.0, "[]"),
    ("noise_schedule", "ect", "b", 0.0, 1000.0, "[]"),
    ("noise_schedule", "ect", "d", 1, 10**9, "[]"),
    ("curriculum", "exponential", "s0", 1, 1_000_000, "[]"),
    ("curriculum", "exponential", "s1", 1, 1_000_000, "[]"),
    ("curriculum", "ct", "s0", 1, 1_000_000, "[]"),
    ("curriculum", "ct", "s1", 1, 1_000_000, "[]"),
    ("curriculum", "constant", "num_scales", 2, 1_000_000, "[]"),
    ("teacher", "ema", "mu0", 0.0, 1.0, "[)"),
    ("teacher", "ema", "s0", 1, 1_000_000, "[]"),
    ("teacher", "cd", "mu", 0.0, 1.0, "[)"),
    ("objective", "consistency", "ect_sigma_min", 0.0, 1.0, "[]"),
    ("objective", "edm", "p_mean", -20.0, 20.0, "[]"),
    ("objective", "edm", "p_std", 0.0, 20.0, "(]"),
    ("objective", "edm", "beta_d", 0.01, 100.0, "[]"),
    ("objective", "edm", "beta_min", 0.0, 20.0, "[]"),
    ("objective", "edm", "vp_steps", 2, 1_000_000, "[]"),
    ("objective", "edm", "epsilon_t", 1e-8, 0.5, "[]"),
    ("objective", "edm", "ve_sigma_min", 1e-5, 1e4, "[]"),
    ("objective", "edm", "ve_sigma_max", 1e-5, 1e4, "[]"),
    ("objective", "sct", "p_mean", -20.0, 20.0, "[]"),
    ("objective", "sct", "p_std", 0.0, 20.0, "(]"),
    ("objective", "sct", "time_scale", 1e-3, 1e6, "[]"),
    ("objective", "sct", "tangent_c", 1e-8, 1e6, "[]"),
    ("objective", "sct", "warmup_steps", 0, 100_000_000, "[]"),
    ("objective", "sct", "jvp_step", 1e-12, 1.0, "[]"),
    ("objective", "scd", "p_mean", -20.0, 20.0, "[]"),
    ("objective", "scd", "p_std", 0.0, 20.0, "(]"),
    ("objective", "scd", "time_scale", 1e-3, 1e6, "[]"),
    ("objective", "scd", "tangent_c", 1e-8, 1e6, "[]"),
    ("objective", "scd", "warmup_steps", 0, 100_000_000, "[]"),
    ("objective", "scd", "jvp_step", 1e-12, 1.0, "[]"),
    ("objective", "trigflow", "p_mean", -20.0, 20.0, "[]"),
    ("objective", "trigflow", "p_std", 0.0, 20.0, "(]"),
    ("objective", "trigflow", "time_scale", 1e-3, 1e6, "[]"),
    ("objective", "meanflow", "p_mean", -20.0, 20.0, "[]"),
    ("objective", "meanflow", "p_std", 0.0, 20.0, "(]"),
    ("objective", "meanflow", "ratio_r_neq_t", 0.0, 1.0, "[]"),
    ("objective", "meanflow", "adaptive_p", 0.0, 10.0, "[]"),
    ("objective", "meanflow", "adaptive_c", 1e-12, 1e6, "[]"),
    ("objective", "meanflow", "time_scale", 1e-3, 1e6, "[]"),
    ("objective", "meanflow", "jvp_step", 1e-12, 1.0, "[]"),
    ("sampler", "scm", "t_mid", 1e-6, math.pi / 2, "[)"),
    ("sampler", "meanflow", "t_mid", 1e-6, 1.0, "[)"),
    ("sampler", "heun", "steps", 1, 10_000, "[]"),
    ("sampler", "heun", "rho", 0.1, 1000.0, "[]"),
    ("sampler", "euler", "steps", 1, 10_000, "[]"),
    ("sampler", "euler", "rho", 0.1, 1000.0, "[]"),
]


def _cls(section: str, component: str | None) -> type:
    return CORE_SECTIONS[section] if component is None else REGISTRY.get(section, component).Options


def _field(section: str, component: str | None, key: str) -> attrs.Attribute:
    cls = _cls(section, component)
    attrs.resolve_types(cls)
    return attrs.fields_dict(cls)[key]


def _is_tuple(field: attrs.Attribute) -> bool:
    return typing.get_origin(field.type) is tuple


def _is_int(field: attrs.Attribute) -> bool:
    t = field.type
    return t is int or (typing.get_origin(t) is tuple and typing.get_args(t)[0] is int)


def _outside(entry: tuple) -> list[tuple[str, float]]:
    """("below", v) and ("above", v): the nearest values outside each bound (the bound itself when open)."""
    section, component, key, lo, hi, brackets = entry
    if _is_int(_field(section, component, key)):
        return [("below", lo - 1), ("above", hi + 1)]
    below = lo if brackets[0] == "(" else math.nextafter(lo, -math.inf)
    above = hi if brackets[1] == ")" else math.nextafter(hi, math.inf)
    return [("below", below), ("above", above)]


def _override(section: str, component: str | None, key: str, value: object) -> dict[str, dict]:
    """Recipe overrides setting one option; a tuple option gets a one-entry array (betas: two entries)."""
    field = _field(section, component, key)
    if _is_tuple(field):
        value = [value, 0.5] if key == "betas" else [value]
    values = {key: value}
    if section == "objective" and component == "consistency":  # the consistency recipe with its own objective
        return {section: {"name": component, **values}}
    if component in ("sct", "scm"):  # the sampler's override keeps the objective's options of its group
        return {**SCT, "objective": {"name": "sct"}, section: {"name": component, **values}}
    if component == "scd":
        return {**tiny_scd("runs/diffusion"), section: {"name": component, **values}}
    if component == "meanflow":
        return {**MEANFLOW, section: {"name": component, **values}}
    if component == "trigflow":
        return {**DIFFUSION, "network": {"logvar_head": True}, section: {"name": component, **values}}
    if section in ("objective", "sampler"):  # a diffusion recipe: the edm objective, no consistency parts
        return {**DIFFUSION, section: {"name": component, **values}}
    if component == "ect":  # continuous pairs: the recipe has no curriculum
        return {section: {"name": component, **values}, "curriculum": None}
    return {section: {"name": component, **values} if component else values}


def _expected(entry: tuple, value: float) -> str:
    section, component, key, lo, hi, brackets = entry
    field = _field(section, component, key)
    index = "[0]" if _is_tuple(field) else ""
    interval = f"{brackets[0]}{show(lo)}, {show(hi)}{brackets[1]}"
    return f"{section}.{key}{index}: must be within {interval} ({range_of(field).reason}), got {show(value)}"


def _problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, REGISTRY, source="r.toml")
    return info.value.problems


OUTSIDE = [pytest.param(entry, side, value, id=f"{entry[1] or entry[0]}.{entry[2]}-{side}")
           for entry in RANGES for side, value in _outside(entry)]


# ------------------------------------------------------------------------------------ every option, each bound


def test_every_numeric_option_has_a_two_sided_range():
    """Enumerates the numeric fields of every core section and builtin component: each has a Within validator
    with finite lo < hi (variable-length arrays also an entry count), and each is pinned in RANGES."""
    pinned = {(s, c, k) for s, c, k, *_ in RANGES}
    classes = [(name, None, cls) for name, cls in CORE_SECTIONS.items()]
    classes += [(r["kind"], r["name"], REGISTRY.get(r["kind"], r["name"]).Options)
                for r in REGISTRY.rows() if r["distribution"] == "ctcore"]
    numeric, problems = [], []
    for section, component, cls in classes:
        attrs.resolve_types(cls)
        for field in attrs.fields(cls):
            types = {a for a in typing.get_args(field.type) if a is not type(None) and a is not Ellipsis}
            if not ({field.type} | types) & {int, float}:
                continue
            numeric.append((section, component, field.name))
            r = range_of(field)
            where = f"{component or section}.{field.name}"
            if r is None or not (math.isfinite(r.lo) and math.isfinite(r.hi) and r.lo < r.hi):
                problems.append(f"{where}: no two-sided range")
            if _is_tuple(field) and typing.get_args(field.type)[-1] is Ellipsis and entries_of(field) is None:
                problems.append(f"{where}: a variable-length array without an entry count")
            if (section, component, field.name) not in pinned:
                problems.append(f"{where}: not pinned in RANGES")
    assert problems == []
    assert sorted(numeric, key=str) == sorted(pinned, key=str)
    assert len(numeric) == 119  # every kind has its builtins here: a new numeric option must be added above


@pytest.mark.parametrize(("entry", "side", "value"), OUTSIDE)
def test_a_value_just_outside_a_bound_is_refused_with_the_range_and_reason(tmp_path, entry, side, value):
    section, component, key = entry[:3]
    assert _problems(tiny_recipe_text(tmp_path, **_override(section, component, key, value))) == [
        _expected(entry, value)]


GROUPS = {
    "core-mlp-lognormal-exponential-ema": [e for e in RANGES if e[1] in (None, "mlp", "pseudo-huber", "lognormal",
                                                                          "exponential", "ema")],
    "ncsnpp-lpips-ct": [e for e in RANGES if e[1] in ("ncsnpp", "lpips", "ct")],
    "adm-constant": [e for e in RANGES if e[1] in ("adm", "constant")],
    "edm-heun": [e for e in RANGES if e[1] in ("edm", "heun")],
    "euler": [e for e in RANGES if e[1] == "euler"],
    "ect-cd": [e for e in RANGES if e[1] in ("ect", "cd")],
    "sct-scm": [e for e in RANGES if e[1] in ("sct", "scm")],
    "scd": [e for e in RANGES if e[1] == "scd"],
    "meanflow": [e for e in RANGES if e[1] == "meanflow"],
    "trigflow": [e for e in RANGES if e[1] == "trigflow"],
}


@pytest.mark.parametrize("side", ["below", "above"])
@pytest.mark.parametrize("group", list(GROUPS))
def test_ctcore_check_refuses_every_bound_with_one_line_each(tmp_path, group, side):
    """All options of a group just outside one side at once, through `ctcore check`: exit 2, a header line and
    exactly one line per option, no traceback."""
    overrides: dict[str, dict] = {}
    expected = []
    for entry in GROUPS[group]:
        value = dict(_outside(entry))[side]
        for section, values in _override(*entry[:3], value).items():
            if values is None:  # a section the recipe leaves out
                overrides[section] = None
            else:
                overrides.setdefault(section, {}).update(values)
        expected.append(_expected(entry, value))
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", **overrides)
    result = CliRunner().invoke(app, ["check", str(recipe)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and result.stdout == ""
    header, *lines = result.stderr.splitlines()
    assert header == f"error: {recipe}: {len(expected)} problems in the recipe"
    assert sorted(line.strip() for line in lines) == sorted(expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("overrides", "line"), [
    ({"sampling": {"sigma_mid": [1.0] * 1001}}, "sampling.sigma_mid: must have 0 to 1000 entries (one network "
                                                "evaluation each), got 1001"),
    ({"network": {"name": "ncsnpp", "ch_mult": []}}, "network.ch_mult: must have 1 to 12 entries (one per "
                                                     "resolution level), got 0"),
    ({"network": {"name": "ncsnpp", "ch_mult": [1] * 13}}, "network.ch_mult: must have 1 to 12 entries (one per "
                                                           "resolution level), got 13"),
    ({"network": {"name": "ncsnpp", "attn_resolutions": [8] * 17}}, "network.attn_resolutions: must have 0 to 16 "
                                                                    "entries (feature-map heights), got 17"),
    ({"network": {"name": "ncsnpp", "fir_kernel": [1.0] * 17}}, "network.fir_kernel: must have 1 to 16 entries "
                                                                "(1-D FIR taps), got 17"),
    ({"network": {"name": "ncsnpp", "fir_kernel": [0.0, 0.0]}}, "network.fir_kernel: must have a positive sum "
                                                                "(the taps are normalised by it), got (0.0, 0.0)"),
    ({"network": {"name": "adm", "channel_mult": []}}, "network.channel_mult: must have 1 to 12 entries (one per "
                                                       "resolution level), got 0"),
    ({"network": {"name": "adm", "attention_resolutions": [8] * 17}}, "network.attention_resolutions: must have 0 "
                                                                      "to 16 entries (feature-map sizes), got 17"),
    ({"training": {"betas": [0.9, 1.0]}}, "training.betas[1]: must be within [0, 1) (bias correction divides by "
                                          "1 - beta^k), got 1"),
    ({"metric": {"name": "lpips", "resize": 15}}, "metric.resize: must be 0 (no resizing) or >= 16 (VGG16 pools "
                                                  "four times), got 15"),
    ({"noise_schedule": {"name": "lognormal", "p_mean": 1e10}}, "noise_schedule.p_mean: must be within [-20, 20] "
     "(ln sigma of any grid lies within [-11.6, 9.3]; iCT -1.1), got 1e+10"),
    ({"curriculum": {"name": "exponential", "s0": 20, "s1": 10}}, "curriculum.s1: must be >= s0 (20), got 10"),
])
def test_entry_counts_and_other_rules_are_one_line_each(tmp_path, overrides, line):
    assert _problems(tiny_recipe_text(tmp_path, **overrides)) == [line]


@pytest.mark.parametrize(("sigma_min", "sigma_max", "ok"), [(0.002, 0.004, True), (0.002, 0.0039, False),
                                                             (100.0, 200.0, True), (1e-3, 1.9e-3, False)])
def test_sigma_max_must_be_twice_sigma_min(tmp_path, sigma_min, sigma_max, ok):
    text = tiny_recipe_text(tmp_path, consistency={"sigma_min": sigma_min, "sigma_max": sigma_max},
                            sampling={"sigma_mid": []}, evaluation={"distance": "none"})
    if ok:
        assert parse_recipe(text, REGISTRY).consistency.sigma_max == sigma_max
    else:
        assert _problems(text) == [
            f"consistency.sigma_max: must be at least 2 x sigma_min = {show(2 * sigma_min)} (a finer grid between "
            f"them has equal neighbours in float32), got {show(sigma_max)}; lower sigma_min or raise sigma_max"]


# -------------------------------------------------------------------------------------- the issue's examples


ISSUE_EXAMPLES = [
    pytest.param({"noise_schedule": {"name": "lognormal", "p_mean": 1e10}}, "noise_schedule.p_mean", id="p_mean"),
    pytest.param({"consistency": {"rho": 1e-5}}, "consistency.rho", id="rho"),
    pytest.param({"consistency": {"sigma_data": 1e200}}, "consistency.sigma_data", id="sigma_data"),
    pytest.param({"curriculum": {"name": "exponential", "s0": 10, "s1": 10**12}}, "curriculum.s1", id="s1"),
    pytest.param({"network": {"name": "mlp", "width": 10**9}}, "network.width", id="width"),
    pytest.param({"network": {"name": "mlp", "num_blocks": 10**11}}, "network.num_blocks", id="num_blocks"),
    pytest.param({"network": {"name": "ncsnpp", "num_res_blocks": 10**11}}, "network.num_res_blocks", id="blocks"),
    pytest.param({"training": {"batch_size": 10**12}}, "training.batch_size", id="batch"),
    pytest.param({"data": {"num_images": 10**12}}, "data.num_images", id="num_images"),
    pytest.param({"curriculum": {"name": "constant", "num_scales": 10**9}}, "curriculum.num_scales", id="scales"),
    pytest.param({"evaluation": {"num_samples": 10**9}}, "evaluation.num_samples", id="eval-samples"),
    pytest.param({"evaluation": {"fid_num_samples": 10**9}}, "evaluation.fid_num_samples", id="fid-samples"),
    pytest.param({"sampling": {"num_samples": 10**9}}, "sampling.num_samples", id="grid-samples"),
    pytest.param({"run": {"seed": 2**63}}, "run.seed", id="seed-2^63"),
    pytest.param({"sampling": {"seed": 2**64}}, "sampling.seed", id="sampling-seed-2^64"),
    pytest.param({"training": {"weight_decay": 1e308}}, "training.weight_decay", id="weight_decay"),
    pytest.param({"run": {"name": "a\x00b"}}, "run.name", id="nul-in-name"),
    pytest.param({"data": {"channels": 2**63 - 1, "source": "hdf5", "path": "x.h5"}}, "data.channels", id="channels"),
]


@pytest.mark.parametrize(("overrides", "key"), ISSUE_EXAMPLES)
def test_the_issue_examples_are_refused_by_check(tmp_path, overrides, key):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", **overrides)
    result = CliRunner().invoke(app, ["check", str(recipe)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {recipe}: {key}: must ")


# ------------------------------------------------------------------------------------------------ strings

_NAME = "(it names the run directory runs/<name>)"


@pytest.mark.parametrize(("name", "message"), [
    ("", f"must not be empty {_NAME}; choose a name, got ''"),
    ("a\x00b", f"must not contain control characters such as NUL or a newline {_NAME}; choose another name, "
               "got 'a\\x00b'"),
    ("two\nlines", f"must not contain control characters such as NUL or a newline {_NAME}; choose another name, "
                   "got 'two\\nlines'"),
    ("a/b", "must not contain '/' or '\\' (it names one directory, runs/<name>); choose another name, or set "
            "run.output_dir to place the run elsewhere, got 'a/b'"),
    ("a\\b", "must not contain '/' or '\\' (it names one directory, runs/<name>); choose another name, or set "
             "run.output_dir to place the run elsewhere, got 'a\\\\b'"),
    ("\u202eevil", "must not contain invisible formatting characters such as a direction override or a "
                   f"zero-width space {_NAME}: the name would display differently from the directory; choose "
                   "another name, got '\\u202eevil'"),
    ("a\u200bb", "must not contain invisible formatting characters such as a direction override or a "
                 f"zero-width space {_NAME}: the name would display differently from the directory; choose "
                 "another name, got 'a\\u200bb'"),
    (".", f"must not be '.' or '..' {_NAME}; choose another name, got '.'"),
    ("..", f"must not be '.' or '..' {_NAME}; choose another name, got '..'"),
    ("é" * 128, f"must be at most 255 bytes in UTF-8 {_NAME}, not 256; choose a shorter name, got "
                f"'{'é' * 20}...'"),
])
def test_run_name_must_be_a_directory_name(tmp_path, name, message):
    assert _problems(tiny_recipe_text(tmp_path, run={"name": name})) == [f"run.name: {message}"]


@pytest.mark.parametrize("name", ["a" * 255, "é" * 127, "run.1_α-β", "...", ".hidden"])
def test_usable_run_names_pass(tmp_path, name):
    assert parse_recipe(tiny_recipe_text(tmp_path, run={"name": name}), REGISTRY).run.name == name


@pytest.mark.parametrize(("overrides", "key"), [
    ({"run": {"output_dir": "runs/a\x00"}}, "run.output_dir"),
    ({"data": {"path": "data/x\n.h5"}}, "data.path"),
    ({"evaluation": {"inception": "w\x1b.pth"}}, "evaluation.inception"),
    ({"evaluation": {"fid_reference": "r\x7f.npz"}}, "evaluation.fid_reference"),
    ({"metric": {"name": "lpips", "backbone_weights": "v\x00.pth"}}, "metric.backbone_weights"),
    ({"metric": {"name": "lpips", "heads_weights": "h\x85.pth"}}, "metric.heads_weights"),
])
def test_paths_refuse_control_characters(tmp_path, overrides, key):
    value = next(v for section in overrides.values() for k, v in section.items() if k != "name")
    text = tiny_recipe_text(value) if key == "run.output_dir" else tiny_recipe_text(tmp_path, **overrides)
    assert _problems(text) == [f"{key}: must not contain control characters such as NUL or a newline (it is a "
                               f"file path); retype it, got {value!r}"]


def test_a_recipe_with_a_utf8_byte_order_mark_reads_like_one_without(tmp_path):
    plain = write_tiny_recipe(tmp_path / "plain.toml", tmp_path / "run")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert attrs.evolve(read_recipe(bom, REGISTRY), source=str(plain)) == read_recipe(plain, REGISTRY)
    result = CliRunner().invoke(app, ["check", str(bom), "--no-build"])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- the numerics behind the ranges


@pytest.mark.parametrize("rho", [0.1, 7.0, 1000.0])
@pytest.mark.parametrize(("sigma_min", "sigma_max"), [(1e-5, 2e-5), (1e-5, 1e4), (100.0, 200.0), (100.0, 1e4)])
def test_every_grid_in_range_is_strictly_increasing_with_finite_weights(sigma_min, sigma_max, rho):
    """The largest grid (1,000,001 points) at the corners of sigma_min, sigma_max >= 2 sigma_min and rho:
    strictly increasing in float64 and float32, finite inverse-delta weights and scalings."""
    s = karras_sigmas(1_000_001, sigma_min, sigma_max, rho)
    assert torch.isfinite(s).all() and (s.diff() > 0).all()
    assert (s.float().diff() > 0).all()  # the student and teacher always see different sigmas
    w = pair_weights(s, "inverse-delta")
    assert torch.isfinite(w).all() and float(w.max()) < 1e30
    for sigma_data in (1e-3, 1e3):
        for c in consistency_scalings(s.float(), sigma_min, sigma_data):
            assert torch.isfinite(c).all()


def test_below_the_sigma_ratio_a_fine_grid_has_equal_float32_neighbours():
    """Why sigma_max >= 2 sigma_min: at a ratio of 1.1 a million-point grid collapses in float32."""
    s = karras_sigmas(1_000_001, 1.0, 1.1, 7.0)
    assert int((s.float().diff() <= 0).sum()) > 100_000


def test_rho_far_below_the_range_overflows_the_grid():
    """Why rho >= 0.1: sigma^(1/rho) leaves float64 near rho = 0.02 (1e4^(1/0.01) = 1e400): the crash `rho = 1e-5`
    caused at step 1."""
    with pytest.raises(OverflowError):
        karras_sigmas(11, 1e-5, 1e4, 0.01)
    assert torch.isfinite(karras_sigmas(11, 1e-5, 1e4, 0.1)).all()


def test_every_derived_seed_fits_torch_and_int64():
    """The largest seeds plus the largest offsets ctcore adds: seed + 2, per-rank dropout seeds after
    MAX_STEPS steps on 2^20 ranks, sample seeds seed + j."""
    derived = [MAX_SEED + 2, rank_seed(MAX_SEED + MAX_STEPS, 2**20), MAX_SEED + 1_000_000]
    assert max(derived) < 2**63 - 1
    for seed in derived:
        torch.Generator().manual_seed(seed)
    np.asarray([MAX_SEED + j for j in range(100_000, 100_010)], dtype=np.int64)


def _lognormal(p_mean: float, p_std: float):
    cls = REGISTRY.get("noise_schedule", "lognormal")
    return cls(cls.Options(p_mean=p_mean, p_std=p_std), BuildContext())


def test_lognormal_masses_are_unchanged_on_the_grid():
    """The plain erf computation is kept bit for bit where its masses do not vanish (valid runs unchanged)."""
    s = karras_sigmas(11)
    cdf = torch.erf((torch.log(s) + 1.1) / (math.sqrt(2.0) * 2.0))
    plain = (cdf[1:] - cdf[:-1]) / (cdf[1:] - cdf[:-1]).sum()
    assert torch.equal(_lognormal(-1.1, 2.0).probabilities(s), plain)
    assert plain.tolist() == pytest.approx([0.063, 0.182, 0.246, 0.214, 0.142, 0.081, 0.041, 0.020, 0.009, 0.004],
                                           abs=6e-4)  # the values docs/recipes.md quotes


@pytest.mark.parametrize(("p_mean", "p_std", "peak"), [(20.0, 0.01, -1), (-20.0, 0.01, 0), (10.0, 0.5, -1),
                                                        (-20.0, 0.5, 0), (20.0, 100.0, 0), (5.0, 0.01, -1)])
def test_lognormal_far_off_the_grid_still_gives_a_distribution(p_mean, p_std, peak):
    """Where every erf rounds to +-1 (the plain masses are all 0 and would divide 0 by 0), the masses come from log
    space: finite, non-negative, summing to 1, the mass at the end nearest the lognormal; sampling works."""
    s = karras_sigmas(1281)
    p = _lognormal(p_mean, p_std).probabilities(s)
    assert torch.isfinite(p).all() and (p >= 0).all() and abs(float(p.sum()) - 1.0) < 1e-12
    assert int(p.argmax()) == (peak % len(p))
    draws = torch.multinomial(p, 64, replacement=True, generator=torch.Generator().manual_seed(0))
    assert draws.min() >= 0 and draws.max() < len(p)


def test_lognormal_on_a_device_decides_without_reading_back():
    """Off the CPU, torch.where picks plain or log-space masses on the device (run here on the meta device)."""
    p = _lognormal(20.0, 0.01).probabilities(karras_sigmas(11).to("meta"))
    assert p.device.type == "meta" and p.shape == (10,)


def test_log_space_masses_agree_with_erf_where_both_are_accurate():
    from ctcore_noise import _log_space_masses

    s = karras_sigmas(1281)
    for p_mean, p_std in [(-1.1, 2.0), (3.0, 0.5), (-5.0, 0.3)]:
        plain = _lognormal(p_mean, p_std).probabilities(s)
        far = _log_space_masses((torch.log(s) - p_mean) / p_std)
        assert float((plain - far).abs().max()) < 1e-12


# ----------------------------------------------------------------------- edge values through `ctcore run`

_MLP = {"name": "mlp", "width": 32, "num_blocks": 1, "embedding_features": 8, "dropout": 0.1}

EDGES = {
    "sigma_min-min": {"consistency": {"sigma_min": 1e-5}},
    "sigma_min-max": {"consistency": {"sigma_min": 100.0, "sigma_max": 1e4}, "sampling": {"sigma_mid": [500.0]}},
    "sigma_max-max": {"consistency": {"sigma_max": 1e4}},
    "sigma_max-min": {"consistency": {"sigma_min": 1e-5, "sigma_max": 1e-3}, "sampling": {"sigma_mid": []}},
    "sigma_ratio-2": {"consistency": {"sigma_min": 0.5, "sigma_max": 1.0}, "sampling": {"sigma_mid": [0.7]}},
    "sigma_data-min": {"consistency": {"sigma_data": 1e-3}},
    "sigma_data-max": {"consistency": {"sigma_data": 1e3}},
    "rho-min": {"consistency": {"rho": 0.1}},
    "rho-max": {"consistency": {"rho": 1000.0}},
    "p_mean-min": {"noise_schedule": {"name": "lognormal", "p_mean": -20.0}},
    "p_mean-max": {"noise_schedule": {"name": "lognormal", "p_mean": 20.0}},
    "p_std-min": {"noise_schedule": {"name": "lognormal", "p_std": 0.01}},
    "p_std-max": {"noise_schedule": {"name": "lognormal", "p_std": 100.0}},
    "p_mean-max-p_std-min": {"noise_schedule": {"name": "lognormal", "p_mean": 20.0, "p_std": 0.01}},
    "lr-max": {"training": {"lr": 1.0}},
    "lr-min": {"training": {"lr": 5e-324}},
    "lr-max-adam": {"training": {"lr": 1.0, "optimizer": "adam"}},
    "eps-min": {"training": {"eps": 1e-30}},
    "eps-max": {"training": {"eps": 1.0}},
    "weight_decay-max": {"training": {"weight_decay": 1.0}},
    "betas-min": {"training": {"betas": [0.0, 0.0]}},
    "betas-max": {"training": {"betas": [ONE_BELOW_1, ONE_BELOW_1]}},
    "betas-max-adam": {"training": {"betas": [ONE_BELOW_1, ONE_BELOW_1], "optimizer": "adam"}},
    "grad_clip-max": {"training": {"grad_clip": 1e10}},
    "grad_clip-min": {"training": {"grad_clip": 5e-324}},
    "eval_ema_decay-min": {"training": {"eval_ema_decay": 0.0}},
    "eval_ema_decay-max": {"training": {"eval_ema_decay": ONE_BELOW_1}},
    "warmup_steps-max": {"training": {"warmup_steps": 999_999_999}},
    "batch_size-min": {"training": {"batch_size": 1}},
    "max_nonfinite_steps-min": {"training": {"max_nonfinite_steps": 0}},
    "intervals-max": {"training": {"log_every": 999_999_999, "checkpoint_every": 999_999_999,
                                   "sample_every": 999_999_999, "keep_checkpoints": 100_000}},
    "keep_checkpoints-min": {"training": {"keep_checkpoints": 1, "checkpoint_every": 1}},
    "seeds-max": {"run": {"seed": 10**18}, "sampling": {"seed": 10**18}},
    "fourier_scale-min": {"network": {**_MLP, "fourier_scale": 0.0}},
    "fourier_scale-max": {"network": {**_MLP, "fourier_scale": 1000.0}},
    "dropout-max": {"network": {**_MLP, "dropout": 0.99}},
    "dropout-min": {"network": {**_MLP, "dropout": 0.0}},
    "mlp-sizes-min": {"network": {"name": "mlp", "width": 1, "num_blocks": 1, "embedding_features": 1}},
    "c-min": {"metric": {"name": "pseudo-huber", "c": 1e-8}},
    "c-max": {"metric": {"name": "pseudo-huber", "c": 1000.0}},
    "exponential-s0-min-s1-max": {"curriculum": {"name": "exponential", "s0": 1, "s1": 1_000_000}},
    "ct-s0-min-s1-max": {"curriculum": {"name": "ct", "s0": 1, "s1": 1_000_000}, "noise_schedule": {"name": "uniform"}},
    "constant-num_scales-min": {"curriculum": {"name": "constant", "num_scales": 2}},
    "constant-num_scales-max": {"curriculum": {"name": "constant", "num_scales": 1_000_000},
                                "training": {"total_steps": 2}},
    "mu0-min": {"teacher": {"name": "ema", "mu0": 0.0}},
    "mu0-max-s0-max": {"teacher": {"name": "ema", "mu0": ONE_BELOW_1, "s0": 1_000_000}},
    "resolution-min": {"data": {"resolution": 1}},
    "sampling-min": {"sampling": {"num_samples": 1, "sigma_mid": []}},
    "sigma_mid-many": {"sampling": {"num_samples": 1, "sigma_mid": [79.0 - 0.07 * i for i in range(1000)]}},
    "evaluation-min": {"evaluation": {"distance": "sliced-wasserstein", "num_samples": 1, "num_projections": 1}},
    "vp-max": {**DIFFUSION, "objective": {"name": "edm", "preconditioning": "vp", "beta_d": 100.0, "beta_min": 20.0,
                                          "vp_steps": 1_000_000, "epsilon_t": 0.5}},
    "vp-min": {**DIFFUSION, "objective": {"name": "edm", "preconditioning": "vp", "beta_d": 0.01, "beta_min": 0.0,
                                          "vp_steps": 2, "epsilon_t": 1e-8}},
    "ve-widest": {**DIFFUSION, "objective": {"name": "edm", "preconditioning": "ve", "ve_sigma_min": 1e-5,
                                             "ve_sigma_max": 1e4}},
    "ve-narrowest": {**DIFFUSION, "objective": {"name": "edm", "preconditioning": "ve", "ve_sigma_min": 1e-5,
                                                "ve_sigma_max": 2e-5}},
}


@pytest.mark.parametrize("overrides", list(EDGES.values()), ids=list(EDGES))
def test_an_edge_value_trains_to_finite_weights(tmp_path, overrides):
    overrides = {k: None if v is None else dict(v) for k, v in overrides.items()}  # None: a section left out
    training = {"total_steps": 3, "log_every": 1, "checkpoint_every": 3, "sample_every": 3,
                **overrides.pop("training", {})}
    evaluation = {"distance": "none", **overrides.pop("evaluation", {})}
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", training=training, evaluation=evaluation,
                               **overrides)
    result = CliRunner().invoke(app, ["run", str(recipe), "--no-progress"])
    assert "Traceback" not in result.output
    assert result.exit_code == 0, result.output
    state = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert state["step"] == training["total_steps"]
    for part in ("student", "eval_ema"):
        assert all(torch.isfinite(v).all() for v in state[part].values()), part


@pytest.mark.parametrize(("name", "options"), [
    ("ncsnpp", {"nf": 8, "ch_mult": (1, 1), "num_res_blocks": 1, "attn_resolutions": (2,), "init_scale": 10.0,
                "fourier_scale": 1000.0, "dropout": 0.99, "fir_kernel": (1000.0,) + (0.0,) * 15}),
    ("ncsnpp", {"nf": 4, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": (), "fir_kernel": (1.0,),
                "fourier_scale": 5e-324, "resblock_type": "ddpm", "progressive": "output_skip",
                "progressive_input": "input_skip"}),
    ("ncsnpp", {"nf": 4, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": (), "embedding_type": "positional",
                "channel_mult_noise": 16, "max_positions": 1_000_000_000, "label_input": "noise", "augment_dim": 64}),
    ("ncsnpp", {"nf": 4, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": (), "embedding_type": "positional",
                "channel_mult_noise": 1, "max_positions": 1, "endpoint": False, "label_input": "noise"}),
    ("adm", {"model_channels": 8, "channel_mult": (1, 1), "num_res_blocks": 1, "attention_resolutions": (2,),
             "num_head_channels": 8, "num_groups": 8, "dropout": 0.99, "dropout_max_resolution": 4096}),
    ("adm", {"model_channels": 8, "channel_mult": (1,), "num_res_blocks": 1, "attention_resolutions": (),
             "num_head_channels": 8, "num_groups": 8, "noise_embedding": "edm", "augment_dim": 64}),
    ("adm", {"model_channels": 1, "channel_mult": (1,), "num_res_blocks": 1, "attention_resolutions": (),
             "num_head_channels": 1, "num_groups": 1, "dropout": 0.0, "dropout_max_resolution": 1}),
])
def test_network_edge_options_give_finite_outputs_and_gradients(name, options):
    torch.manual_seed(0)
    cls = REGISTRY.get("network", name)
    net = cls(cls.Options(**options), BuildContext(data_shape=(3, 4, 4), num_classes=2))
    x = torch.randn(2, 3, 4, 4)
    out = net(x, torch.tensor([-2.0, 1.0]) * (250.0 if name == "adm" else 1.0), torch.tensor([0, 1]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_recipes_in_the_repository_are_inside_every_range():
    for path in sorted((Path(__file__).resolve().parent.parent / "recipes").glob("**/*.toml")):
        read_recipe(path, REGISTRY)
