"""Recipe reading: round trips, the exact problem lines of bad recipes, and every shipped recipe validates."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ctcore.errors import RecipeError
from ctcore.recipe import Recipe, _toml_string, dump_recipe, parse_recipe, read_recipe

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"

MINIMAL = """\
[network]
name = "mlp"

[metric]
name = "pseudo-huber"

[noise_schedule]
name = "lognormal"

[curriculum]
name = "exponential"

[teacher]
name = "no-ema"
"""


def _problems(text: str, registry) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, registry, source="bad.toml")
    return info.value.problems


# ------------------------------------------------------------------------------------------ valid recipes


def test_minimal_recipe_has_defaults(registry):
    recipe = parse_recipe(MINIMAL, registry, source="minimal.toml")
    assert isinstance(recipe, Recipe)
    assert recipe.source == "minimal.toml"
    assert recipe.training.total_steps == 400_000
    assert recipe.consistency.weighting == "inverse-delta"
    assert (recipe.consistency.sigma_min, recipe.consistency.sigma_max) == (0.002, 80.0)
    assert recipe.components["curriculum"].name == "exponential"
    curriculum = recipe.components["curriculum"].options
    assert (curriculum.s0, curriculum.s1) == (10, 1280)
    assert recipe.components["metric"].options.c is None
    assert recipe.section("teacher").name == "no-ema"
    assert recipe.section("training") is recipe.training


def test_minimal_recipe_round_trips(registry):
    recipe = parse_recipe(MINIMAL, registry, source="minimal.toml")
    text = dump_recipe(recipe)
    again = parse_recipe(text, registry, source="minimal.toml")
    assert again == recipe
    assert dump_recipe(again) == text


def test_the_dump_shows_a_computed_default_as_its_value_and_reads_back_unset(registry):
    from ctcore.recipe import build_context

    data = '[data]\nsource = "hdf5"\npath = "mnist.h5"\nchannels = 1\nresolution = 28\n'
    recipe = parse_recipe(MINIMAL + data, registry, source="mnist.toml")
    text = dump_recipe(recipe)
    built = registry.get("metric", "pseudo-huber")(recipe.components["metric"].options, build_context(recipe))
    assert built.c == 0.00054 * 28  # what training uses: 0.00054 * sqrt(1*28*28)
    assert f"\n# c = {built.c!r}  (computed: 0.00054 * sqrt(1*28*28); omitted from the recipe)\n" in text
    assert "not set" not in text
    again = parse_recipe(text, registry, source="mnist.toml")
    assert again == recipe and again.components["metric"].options.c is None  # still follows the data shape
    explicit = dump_recipe(parse_recipe(MINIMAL.replace('"pseudo-huber"', '"pseudo-huber"\nc = 0.03'), registry))
    assert "\nc = 0.03\n" in explicit and "computed" not in explicit


def test_non_default_recipe_round_trips(registry):
    text = MINIMAL.replace('name = "no-ema"', 'name = "ema"\nschedule = "adaptive-code"\nmu0 = 0.95').replace(
        'name = "pseudo-huber"', 'name = "pseudo-huber"\nc = 0.03'
    ) + (
        '[run]\nname = "a \\"quoted\\" name"\nseed = 7\n'
        '[data]\nsource = "hdf5"\npath = "C:\\\\data\\\\cifar.h5"\nrandom_flip = true\n'
        "[training]\nbetas = [0.9, 0.99]\nlr = 1\ntotal_steps = 50_000\n"
        "[sampling]\nsigma_mid = [2.0, 0.821]\n"
    )
    recipe = parse_recipe(text, registry, source="custom.toml")
    assert recipe.run.name == 'a "quoted" name' and recipe.data.path == "C:\\data\\cifar.h5"
    assert recipe.training.lr == 1.0 and isinstance(recipe.training.lr, float)
    assert recipe.sampling.sigma_mid == (2.0, 0.821)
    assert recipe.components["teacher"].options.mu0 == 0.95
    assert parse_recipe(dump_recipe(recipe), registry, source="custom.toml") == recipe


def test_dump_escapes_control_characters():
    # A TOML basic string may not hold a raw newline; the writer escapes it so that it reads back. (No recipe
    # string accepts control characters any more, but the writer stays correct for any text.)
    text = "two\nlines\x00\x7f\\ \"q\""
    assert tomllib.loads(f"k = {_toml_string(text)}")["k"] == text


# -------------------------------------------------------------------------------------------- bad recipes

BAD = [
    pytest.param(
        MINIMAL + "[trainng]\nlr = 1.0\n",
        ["trainng: unknown section; did you mean [training]?"],
        id="unknown-section",
    ),
    pytest.param(
        MINIMAL + "[training]\nbatch_sise = 4\n",
        ["training.batch_sise: unknown key; did you mean 'batch_size'?"],
        id="unknown-key",
    ),
    pytest.param(
        MINIMAL + '[data]\nrandom_flip = "false"\n',
        ["data.random_flip: expected true or false, got 'false' (a string)"],
        id="string-for-bool",
    ),
    pytest.param(
        MINIMAL + "[training]\ntotal_steps = 2.0\n",
        ["training.total_steps: expected an integer, got 2.0 (a float)"],
        id="float-for-int",
    ),
    pytest.param(
        MINIMAL + '[training]\nlr = "1e-4"\n',
        ["training.lr: expected a number, got '1e-4' (a string)"],
        id="string-for-float",
    ),
    pytest.param(
        MINIMAL + '[training]\noptimizer = "radm"\n',
        ["training.optimizer: must be one of 'radam', 'adam'; got 'radm' (did you mean 'radam'?)"],
        id="bad-literal",
    ),
    pytest.param(
        MINIMAL + '[consistency]\nweighting = "inverse_delta"\n',
        [
            "consistency.weighting: must be one of 'inverse-delta', 'uniform'; got 'inverse_delta' "
            "(did you mean 'inverse-delta'?)"
        ],
        id="bad-literal-underscore",
    ),
    pytest.param(
        MINIMAL + "[training]\nbatch_size = -4\n",
        ["training.batch_size: must be within [1, 1_000_000] (examples per step; papers use up to 4096), got -4"],
        id="negative-batch-size",
    ),
    pytest.param(
        MINIMAL.replace('"lognormal"', '"lognormall"'),
        [
            "noise_schedule.name: unknown noise schedule 'lognormall'; did you mean 'lognormal'? "
            "(available: ect, lognormal, uniform)"
        ],
        id="unknown-component",
    ),
    pytest.param(
        MINIMAL.replace('name = "mlp"', 'name = "mlp"\nwidht = 3'),
        ["network.widht: unknown key; did you mean 'width'?"],
        id="unknown-component-option",
    ),
    pytest.param(
        MINIMAL.replace('name = "mlp"', 'name = "mlp"\ndropout = 1.5'),
        ["network.dropout: must be within [0, 0.99] (kept activations are scaled by 1 / (1 - p); iCT uses 0.3), "
         "got 1.5"],
        id="component-option-out-of-range",
    ),
    pytest.param(
        MINIMAL.replace('[teacher]\nname = "no-ema"\n', ""),
        ["teacher: missing section; add [teacher] with name = one of: cd, ema, no-ema"],
        id="missing-component-section",
    ),
    pytest.param(
        MINIMAL.replace('name = "no-ema"', ""),
        ["teacher.name: missing; one of: cd, ema, no-ema"],
        id="missing-name",
    ),
    pytest.param(
        MINIMAL.replace('name = "exponential"', 'name = "exponential"\ns0 = 20\ns1 = 10'),
        ["curriculum.s1: must be >= s0 (20), got 10"],
        id="s1-below-s0",
    ),
    pytest.param(
        MINIMAL + "[sampling]\nsigma_mid = [100.0]\n",
        ["sampling.sigma_mid[0]: every value must lie in (sigma_min, sigma_max) = (0.002, 80), got 100"],
        id="sigma-mid-above-max",
    ),
    pytest.param(
        MINIMAL + "[sampling]\nsigma_mid = [0.001]\n",
        ["sampling.sigma_mid[0]: every value must lie in (sigma_min, sigma_max) = (0.002, 80), got 0.001"],
        id="sigma-mid-below-min",
    ),
    pytest.param(
        MINIMAL + '[data]\nsource = "hdf5"\n',
        ['data.path: required when data.source = "hdf5" (the HDF5 file to train on)'],
        id="hdf5-without-path",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_bad_recipe_problem_lines(registry, text, expected):
    assert _problems(text, registry) == expected


def test_malformed_toml_reports_line_and_column(registry):
    text = MINIMAL + "[training]\ntotal_steps = = 3\n"
    line = text.splitlines().index("total_steps = = 3") + 1
    problems = _problems(text, registry)
    assert len(problems) == 1
    assert problems[0].startswith("invalid TOML: ")
    assert f"(at line {line}, column 15)" in problems[0]


def test_every_problem_reported_at_once(registry):
    text = MINIMAL.replace('name = "mlp"', 'name = "mlp"\nwidht = 3').replace('"uniform"', '"x"') + (
        "[trainng]\n"
        '[training]\nbatch_size = 0\nlr = "x"\n'
        "[data]\nrandom_flip = 1\n"
    )
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, registry, source="several.toml")
    err = info.value
    assert err.problems == [
        "trainng: unknown section; did you mean [training]?",
        "data.random_flip: expected true or false, got 1 (an integer)",
        "training.batch_size: must be within [1, 1_000_000] (examples per step; papers use up to 4096), got 0",
        "training.lr: expected a number, got 'x' (a string)",
        "network.widht: unknown key; did you mean 'width'?",
    ]
    rendered = err.render()
    assert rendered.startswith("several.toml: 5 problems in the recipe\n")
    assert all(f"  {p}" in rendered.splitlines() for p in err.problems)


def test_rendered_message_starts_with_source_file(registry, tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text(MINIMAL + "[training]\nbatch_size = -4\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        read_recipe(path, registry)
    assert info.value.source == str(path)
    assert str(info.value) == (f"{path}: training.batch_size: must be within [1, 1_000_000] (examples per step; "
                               "papers use up to 4096), got -4")
    assert info.value.problems == [
        "training.batch_size: must be within [1, 1_000_000] (examples per step; papers use up to 4096), got -4"]


def test_read_recipe_missing_file(registry, tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(RecipeError) as info:
        read_recipe(path, registry)
    assert info.value.render().startswith(str(path))
    assert len(info.value.problems) == 1
    assert "file not found" in info.value.problems[0]


def test_read_recipe_valid_file(registry, tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    recipe = read_recipe(path, registry)
    assert recipe.source == str(path)
    assert recipe == parse_recipe(MINIMAL, registry, source=str(path))


# --------------------------------------------------------------------------------------- shipped recipes

SHIPPED = sorted(RECIPES_DIR.glob("**/*.toml"))


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=str(p.relative_to(RECIPES_DIR))) for p in SHIPPED]
    or [pytest.param(None, marks=pytest.mark.skip(reason="no recipes/**/*.toml yet"), id="none")],
)
def test_shipped_recipe_is_valid(registry, path):
    recipe = read_recipe(path, registry)
    assert parse_recipe(dump_recipe(recipe), registry, source=str(path)) == recipe
