"""Command-line overrides (`--set section.key=value`), sweeps over a grid of them, and extending a resumed run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import snapshot, write_tiny_recipe
from typer.testing import CliRunner, Result

from ctcore.build import EXTENSIBLE_KEYS, resume_run, start_run
from ctcore.checkpoints import list_checkpoints, load_checkpoint
from ctcore.cli import app
from ctcore.errors import UsageError
from ctcore.recipe import CORE_SECTIONS, parse_set_value, point_name, read_recipe, split_values, sweep_grid
from ctcore.training import train

CONSTANT = {"name": "constant", "num_scales": 9}
"""A curriculum whose N(k) does not depend on training.total_steps: extending changes no step."""


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def stats(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text(encoding="utf-8").splitlines()]


def same_weights(a, b) -> bool:
    for key in ("student", "eval_ema"):
        da, db = getattr(a, key).state_dict(), getattr(b, key).state_dict()
        if da.keys() != db.keys() or not all(torch.equal(da[n], db[n]) for n in da):
            return False
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    return all(torch.equal(torch.as_tensor(v), torch.as_tensor(ob[p][k])) for p, s in oa.items() for k, v in s.items())


# ------------------------------------------------------------------------------------------ --set values


@pytest.mark.parametrize(("raw", "value"), [
    ("2e-4", 2e-4), ("3", 3), ("true", True), ("[0.9, 0.99]", [0.9, 0.99]), ("[1,2]", [1, 2]),
    ("pseudo-huber", "pseudo-huber"), ('"a,b"', "a,b"), ("", ""), (" l2 ", "l2"), ("runs/x y", "runs/x y"),
    ("1\nx = 2", "1\nx = 2"),  # one value, never a second key
])
def test_a_set_value_is_a_toml_value_or_a_bare_string(raw, value):
    assert parse_set_value(raw) == value and type(parse_set_value(raw)) is type(value)


def test_sweep_values_split_at_commas_outside_brackets_and_quotes():
    assert split_values("1e-4,2e-4") == ["1e-4", "2e-4"]
    assert split_values("[1,2]") == ["[1,2]"]
    assert split_values("[0.9,0.99], [0.8,0.9]") == ["[0.9,0.99]", "[0.8,0.9]"]
    assert split_values('"a,b",c') == ['"a,b"', "c"]
    assert split_values("l2") == ["l2"]
    grid = sweep_grid(["training.lr=1e-4,2e-4", "metric.name=pseudo-huber,l2"])
    assert grid == [["training.lr=1e-4", "metric.name=pseudo-huber"], ["training.lr=1e-4", "metric.name=l2"],
                    ["training.lr=2e-4", "metric.name=pseudo-huber"], ["training.lr=2e-4", "metric.name=l2"]]
    assert [point_name(p) for p in grid][1] == "training.lr=1e-4,metric.name=l2"
    assert point_name(["sampling.sigma_mid=[1.5, 0.5]", "run.output_dir=a/b"]) == \
        "sampling.sigma_mid=_1.5,_0.5_,run.output_dir=a_b"
    with pytest.raises(UsageError, match=r"^--set training.lr=3: training.lr is set twice; give each key once, "
                                         r"with all its values comma-separated$"):
        sweep_grid(["training.lr=1,2", "training.lr=3"])


# ------------------------------------------------------------------------------------------ run and check


def test_run_with_set_trains_the_override_and_recipe_toml_records_it(tmp_path, registry):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", training={"total_steps": 2})
    result = invoke("run", recipe, "--set", "training.lr=2e-4", "--set", "network.dropout=0.2",
                    "--set", "metric.name=l2", "--no-progress")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "recipe.toml").read_text(encoding="utf-8")
    assert text.splitlines()[0] == (f"# resolved from {recipe} --set training.lr=2e-4 --set network.dropout=0.2 "
                                    "--set metric.name=l2")
    stored = read_recipe(tmp_path / "out" / "recipe.toml", registry)
    assert stored.training.lr == 2e-4 and stored.components["network"].options.dropout == 0.2
    assert stored.components["metric"].name == "l2" and stored.training.total_steps == 2
    assert list_checkpoints(tmp_path / "out")[-1].name == "ckpt-000000002.pt"


def test_check_with_set_prints_the_resolved_override(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out")
    result = invoke("check", recipe, "--no-build", "--set", "training.betas=[0.9,0.99]", "--set",
                    "run.name=a b")
    assert result.exit_code == 0, result.output
    assert "\nbetas = [0.9, 0.99]\n" in result.stdout and '\nname = "a b"\n' in result.stdout
    assert result.stdout.splitlines()[0] == f"# resolved from {recipe} --set 'training.betas=[0.9,0.99]' " \
                                            "--set 'run.name=a b'"


@pytest.mark.parametrize(("sets", "message"), [
    (["training.lr=abc"], "{r}: --set training.lr=abc: training.lr: expected a number, got 'abc' (a string)"),
    (["training.lr=2"], "{r}: --set training.lr=2: training.lr: must be within (0, 1] (Adam moves each weight by "
                        "about lr per step; papers use 1e-5 to 1e-3), got 2"),
    (["trainig.lr=1e-4"], "{r}: --set trainig.lr=1e-4: trainig: unknown section; did you mean [training]?"),
    (["training.lrr=1e-4"], "{r}: --set training.lrr=1e-4: training.lrr: unknown key; did you mean 'lr'?"),
    (["metric.name=foo"], "{r}: --set metric.name=foo: metric.name: unknown metric 'foo' (available: l2, l2-norm, "
                          "lpips, pseudo-huber)"),
    (["training.betas=[0.9]"], "{r}: --set training.betas=[0.9]: training.betas: expected an array of 2 values, "
                               "got 1"),
    (["training.lr"], "--set training.lr: expected section.key=value, e.g. --set training.lr=2e-4"),
    (["lr=1e-4"], "--set lr=1e-4: expected section.key=value, e.g. --set training.lr=2e-4"),
    (["=1"], "--set =1: expected section.key=value, e.g. --set training.lr=2e-4"),
    (["training.lr=1e-4", "training.lr=2e-4"], "--set training.lr=2e-4: training.lr is already set by --set "
                                               "training.lr=1e-4; give each key once"),
])
@pytest.mark.parametrize("command", ["run", "check", "bench"])
def test_a_bad_set_is_one_line_naming_it_and_exit_2(tmp_path, command, sets, message):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out")
    before = snapshot(tmp_path)
    result = invoke(command, recipe, *(a for s in sets for a in ("--set", s)))
    assert one_line_error(result, 2) == "error: " + message.format(r=recipe)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_problem_of_the_file_itself_is_not_blamed_on_a_set(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", training={"lr": 5.0})
    result = invoke("check", recipe, "--no-build", "--set", "training.batch_size=4", "--set", "metric.name=l3")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {recipe}: 2 problems in the recipe",
        "  training.lr: must be within (0, 1] (Adam moves each weight by about lr per step; papers use 1e-5 to "
        "1e-3), got 5",
        "  --set metric.name=l3: metric.name: unknown metric 'l3' (available: l2, l2-norm, lpips, pseudo-huber)",
    ]


def test_a_check_across_keys_names_the_set_whose_key_it_mentions(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out")
    result = invoke("check", recipe, "--no-build", "--set", "consistency.sigma_min=50")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {recipe}: 2 problems in the recipe",
        "  --set consistency.sigma_min=50: consistency.sigma_max: must be at least 2 x sigma_min = 100 (a finer grid "
        "between them has equal neighbours in float32), got 80; lower sigma_min or raise sigma_max",
        "  --set consistency.sigma_min=50: sampling.sigma_mid[0]: every value must lie in (sigma_min, sigma_max) = "
        "(50, 80), got 0.821",
    ]


def _curriculum(stdout: str) -> list[str]:
    """The [curriculum] section's lines of a resolved recipe as `ctcore check` prints it."""
    lines = stdout.splitlines()
    start = lines.index("[curriculum]")
    return lines[start + 1 : lines.index("", start)]


def test_setting_a_components_name_resets_its_section_to_the_new_components_defaults(tmp_path):
    """`--set curriculum.name=ct` on a recipe whose [curriculum] is exponential (s0 = 10, s1 = 1280): ct's own
    defaults (2, 150), not exponential's values, and a note naming the dropped keys; another --set of the section
    still applies (in any order); a key of the old component no longer blocks the new one; the same name keeps
    the file's options."""
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out",
                               curriculum={"name": "exponential", "s0": 10, "s1": 1280})
    note = ("note: --set curriculum.name=ct: [curriculum] takes the new component's defaults; dropped the file's "
            "options of 'exponential': s0 = 10, s1 = 1280 (set any of them again with --set curriculum.KEY=VALUE)")
    result = invoke("check", recipe, "--no-build", "--set", "curriculum.name=ct")
    assert result.exit_code == 0, result.output
    assert _curriculum(result.stdout) == ['name = "ct"', "s0 = 2", "s1 = 150"]
    assert result.stderr.splitlines()[0] == note
    result = invoke("check", recipe, "--no-build", "--set", "curriculum.s1=200", "--set", "curriculum.name=ct")
    assert result.exit_code == 0, result.output
    assert _curriculum(result.stdout) == ['name = "ct"', "s0 = 2", "s1 = 200"]
    assert result.stderr.splitlines()[0] == (
        "note: --set curriculum.name=ct: [curriculum] takes the new component's defaults; dropped the file's options "
        "of 'exponential': s0 = 10 (set any of them again with --set curriculum.KEY=VALUE)")
    result = invoke("check", recipe, "--no-build", "--set", "curriculum.name=constant", "--set",
                    "curriculum.num_scales=1281")
    assert result.exit_code == 0, result.output
    assert _curriculum(result.stdout) == ['name = "constant"', "num_scales = 1281"]
    result = invoke("check", recipe, "--no-build", "--set", "curriculum.name=exponential")
    assert result.exit_code == 0, result.output
    assert _curriculum(result.stdout) == ['name = "exponential"', "s0 = 10", "s1 = 1280"]
    assert "note:" not in result.stderr


def test_run_and_sweep_reset_a_renamed_component_alike(tmp_path, registry):
    """run records the new component's defaults in recipe.toml and prints the note; sweep checks every point with
    its own reset and prints each distinct note once."""
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", training={"total_steps": 2},
                               curriculum={"name": "exponential", "s0": 3, "s1": 9})
    result = invoke("run", recipe, "--set", "curriculum.name=ct", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "note: --set curriculum.name=ct: [curriculum] takes the new component's defaults; dropped the file's " \
           "options of 'exponential': s0 = 3, s1 = 9" in result.stderr
    stored = read_recipe(tmp_path / "out" / "recipe.toml", registry).components["curriculum"]
    assert (stored.name, stored.options.s0, stored.options.s1) == ("ct", 2, 150)
    result = invoke("sweep", recipe, "--set", "curriculum.name=ct,constant", "--set", "training.lr=1e-4,2e-4",
                    "--dry-run", "-o", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert [n.split(":")[1] for n in notes] == [" --set curriculum.name=ct", " --set curriculum.name=constant"]
    assert len(result.stdout.splitlines()) == 4


# ------------------------------------------------------------------------------------------------- sweeps


def test_sweep_dry_run_prints_one_run_command_per_point(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "runs" / "tiny")
    result = invoke("sweep", recipe, "--set", "training.lr=1e-4,2e-4", "--set", "metric.name=pseudo-huber,l2",
                    "--set", "training.betas=[0.9,0.99]", "--dry-run")
    assert result.exit_code == 0, result.output
    top = tmp_path / "runs" / "tiny"
    assert result.stdout.splitlines() == [
        f"ctcore run {recipe} --set training.lr={lr} --set metric.name={metric} --set 'training.betas=[0.9,0.99]' "
        f"-o {top}/training.lr={lr},metric.name={metric},training.betas=_0.9,0.99_"
        for lr in ("1e-4", "2e-4") for metric in ("pseudo-huber", "l2")]
    assert not top.exists()


def test_a_bad_value_in_any_point_is_reported_before_any_run_starts(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "runs" / "tiny")
    result = invoke("sweep", recipe, "--set", "training.lr=1e-4,abc", "--set", "metric.name=l2,foo")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {recipe}: 2 problems in the recipe",
        "  --set metric.name=foo: metric.name: unknown metric 'foo' (available: l2, l2-norm, lpips, pseudo-huber)",
        "  --set training.lr=abc: training.lr: expected a number, got 'abc' (a string)",
    ]
    assert not (tmp_path / "runs").exists()



EIGHT_KEYS = ("run.seed", "training.lr", "training.log_every", "training.checkpoint_every", "training.sample_every",
              "training.keep_checkpoints", "training.warmup_steps", "training.total_steps")


@pytest.mark.parametrize("axes", [
    [("training.lr", range(2, 1003))],
    [("training.lr", range(2, 8)), ("training.batch_size", range(0, -6, -1)), ("run.seed", range(-1, -7, -1)),
     ("data.resolution", range(0, -6, -1))],
    [(key, range(1, 21)) for key in EIGHT_KEYS],
], ids=["1001-values", "6x6x6x6", "20^8"])
def test_a_sweep_grid_larger_than_1000_points_is_refused_before_it_is_listed(tmp_path, axes):
    """At most MAX_SWEEP_POINTS (1,000) points, each a whole run checked before the first starts; the size is the
    product of the value counts, computed before the grid is listed (20^8 = 25.6 billion points would not fit in
    memory): one line, exit 2, no directory."""
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "runs" / "tiny")
    sets = [f"{key}={','.join(map(str, values))}" for key, values in axes]
    result = invoke("sweep", recipe, *(a for s in sets for a in ("--set", s)), "--dry-run")
    points = math.prod(len(values) for _, values in axes)
    shape = " x ".join(f"{len(values):,} ({key})" for key, values in axes)
    assert one_line_error(result, 2) == (
        f"error: --set: the sweep's grid has {points:,} points ({shape}), more than the 1,000 a sweep runs (each point "
        "is a whole run, and all are checked before the first starts); sweep fewer values, or split the sweep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]
    assert len(sweep_grid(["training.lr=1,2,3,4,5,6,7,8,9,10", f"run.seed={','.join(map(str, range(100)))}"])) == 1000


def test_sweep_points_that_would_share_a_directory_are_refused(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "runs" / "tiny")
    result = invoke("sweep", recipe, "--set", 'run.name="a b","a_b"', "--dry-run")
    assert one_line_error(result, 2) == ("error: sweep points ['run.name=\"a b\"'] and ['run.name=\"a_b\"'] would "
                                         "share the run directory 'run.name=_a_b_'; give values that differ in "
                                         "letters, digits or ._+=,-")


def test_an_interrupted_sweep_continues_where_it_stopped(tmp_path, registry, monkeypatch):
    """A SIGINT during point 2 (after step 3): exit 130 with point 1 finished, point 2 checkpointed at step 3,
    point 3 never started. Started again, the sweep skips the first (files byte-identical), resumes the second
    and starts the third."""
    import signal

    import ctcore.training

    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "runs" / "tiny", training={"total_steps": 6})
    top = tmp_path / "runs" / "tiny"
    sets = ["training.lr=1e-3,2e-3,3e-3"]
    step = ctcore.training.train_step

    def interrupted(run):
        out = step(run)
        if run.out_dir.name == "training.lr=2e-3" and run.step == 3:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(ctcore.training, "train_step", interrupted)
    result = invoke("sweep", recipe, "--set", *sets, "--no-progress")
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == ("the sweep stopped at point 2/3; run the same ctcore sweep command "
                                              "again to continue it")
    assert table_rows(result.stdout)[-3:] == [["1e-3", "trained", *closing_figures(top / "training.lr=1e-3")],
                                              ["2e-3", "stopped", *closing_figures(top / "training.lr=2e-3")],
                                              ["3e-3", "not started", "-", "-", "-"]]
    assert [p.name for p in list_checkpoints(top / "training.lr=2e-3")] == ["ckpt-000000003.pt"]
    assert sorted(p.name for p in top.iterdir()) == ["training.lr=1e-3", "training.lr=2e-3"]
    monkeypatch.setattr(ctcore.training, "train_step", step)
    finished = snapshot(top / "training.lr=1e-3")
    result = invoke("sweep", recipe, "--set", *sets, "--no-progress")
    assert result.exit_code == 0, result.output
    tables = ("┏", "┃", "┡", "┌", "│", "└", "├", " ", "3 sweep points", "sliced W and loss: the last logged")
    lines = [line for line in result.stdout.splitlines() if not line.startswith(tables)]
    # 6 steps are below the half-life of the tiny recipe's eval EMA (decay 0.9): each summary says so
    warning = "warning: the eval EMA (training.eval_ema_decay = 0.9) has a half-life of 7 steps; "
    advice = ("so its distance and samples show little of it: train longer, or lower training.eval_ema_decay for a "
              "smoke run")
    assert lines == [
        f"sweep point 1/3: {top}/training.lr=1e-3",
        f"{top}/training.lr=1e-3 already finished at step 6; nothing to do (extend it with `ctcore run "
        f"{top}/training.lr=1e-3 --resume --set training.total_steps=...`)",
        f"sweep point 2/3: {top}/training.lr=2e-3",
        f"resuming {top}/training.lr=2e-3 at step 3",
        "run tiny",
        f"{warning}after the 3 steps since the resume at step 3 it holds 27% of their training, {advice}",
        f"sweep point 3/3: {top}/training.lr=3e-3",
        f"run directory: {top}/training.lr=3e-3  (device cpu, precision fp32)",
        "run tiny",
        f"{warning}after the 6 steps of this run it holds 47% of their training, {advice}",
        f"sweep of 3 runs finished in {top}",
    ]
    assert table_rows(result.stdout)[-3:] == [["1e-3", "already finished", *closing_figures(top / "training.lr=1e-3")],
                                              ["2e-3", "trained", *closing_figures(top / "training.lr=2e-3")],
                                              ["3e-3", "trained", *closing_figures(top / "training.lr=3e-3")]]
    assert snapshot(top / "training.lr=1e-3") == finished
    for lr in ("2e-3", "3e-3"):
        assert list_checkpoints(top / f"training.lr={lr}")[-1].name == "ckpt-000000006.pt"
        assert read_recipe(top / f"training.lr={lr}" / "recipe.toml", registry).training.lr == float(lr)


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of each body row of the tables a command printed."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines() if line.startswith("│")]


def closing_figures(run_dir: Path) -> list[str]:
    """The sweep table's figures of a point, from its stats.jsonl: the last distance (.4f), the last training
    record's loss (.4g) and the median img/s."""
    records = stats(run_dir)
    training = [r for r in records if "event" not in r]
    speeds = sorted(r["img_per_s"] for r in training)
    distance = [r for r in records if r.get("event") == "distance"][-1]["sliced_wasserstein"]
    return [f"{distance:.4f}", f"{training[-1]['loss']:.4g}", f"{speeds[len(speeds) // 2]:,.0f}"]


def test_a_sweep_ends_with_a_table_of_its_points(tmp_path):
    """After the last point: one row per point with its value of each --set key as given, its status and its
    last distance, last loss and median img/s; started again with every point finished it prints the table too,
    with "-" for a point whose stats.jsonl is missing or damaged."""
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "runs" / "tiny", training={"total_steps": 2})
    top = tmp_path / "runs" / "tiny"
    sets = ["--set", "training.lr=1e-3,2e-3", "--set", "run.seed=7"]
    result = invoke("sweep", recipe, *sets, "--no-progress")
    assert result.exit_code == 0, result.output
    points = [top / "training.lr=1e-3,run.seed=7", top / "training.lr=2e-3,run.seed=7"]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("┃"))
    assert [c.strip() for c in header.split("┃")[1:-1]] == ["training.lr", "run.seed", "status", "sliced W", "loss",
                                                             "img/s"]
    rows = table_rows(result.stdout)[-2:]  # after the two runs' own summaries
    assert rows == [["1e-3", "7", "trained", *closing_figures(points[0])],
                    ["2e-3", "7", "trained", *closing_figures(points[1])]]
    assert lines[-2:] == ["sliced W and loss: the last logged; img/s: the median", f"sweep of 2 runs finished in {top}"]

    (points[0] / "stats.jsonl").unlink()
    (points[1] / "stats.jsonl").write_bytes(b"\xff\xfe not json \x00\n")
    again = invoke("sweep", recipe, *sets, "--no-progress")
    assert again.exit_code == 0, again.output
    assert table_rows(again.stdout) == [["1e-3", "7", "already finished", "-", "-", "-"],
                                        ["2e-3", "7", "already finished", "-", "-", "-"]]


def test_a_sweep_refuses_a_directory_that_holds_a_run(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", training={"total_steps": 2})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    result = invoke("sweep", recipe, "--set", "training.lr=1e-4,2e-4", "--dry-run")
    assert one_line_error(result, 1) == (f"error: {str(tmp_path / 'out')!r} holds a run, not a sweep; choose "
                                         "another sweep directory with --output-dir")


# ------------------------------------------------------------------------------------------ extending a run


def test_the_extensible_keys_exist_and_leave_the_training_numerics_alone():
    import attrs

    fields = {f"{s}.{f.name}" for s, cls in CORE_SECTIONS.items() for f in attrs.fields(cls)}
    assert fields >= EXTENSIBLE_KEYS
    assert {k for k in EXTENSIBLE_KEYS if k.startswith("evaluation.")} == {
        k for k in fields if k.startswith("evaluation.")}
    assert not {"training.lr", "training.batch_size", "run.seed", "run.threads"} & EXTENSIBLE_KEYS


def test_memory_knobs_may_change_on_resume_and_nothing_else_of_the_components(tmp_path, registry):
    """training.micro_batch_size and component options marked MEMORY_ONLY (ncsnpp's and adm's checkpoint_blocks)
    are the memory knobs; a component's other options stay refused on resume."""
    from pathlib import Path

    from ctcore.build import extensible, memory_knobs

    mlp = read_recipe(write_tiny_recipe(tmp_path / "mlp.toml", tmp_path / "out"), registry)
    assert memory_knobs(mlp) == {"training.micro_batch_size"}
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("ict_cifar10.toml", "ict_imagenet64.toml"):  # ncsnpp, adm
        recipe = read_recipe(recipes / name, registry)
        assert memory_knobs(recipe) == {"training.micro_batch_size", "network.checkpoint_blocks"}
        assert extensible("network.checkpoint_blocks", recipe) and not extensible("network.nf", recipe)
        assert not extensible("network.checkpoint_blocks")  # without the recipe: only the core's keys


def test_a_run_extended_on_resume_equals_a_straight_run_bit_for_bit(tmp_path, registry):
    """6 steps, then `--resume --set training.total_steps=10` (and other intervals), killed right after the
    extension (before a checkpoint under it), resumed again: the weights equal a straight 10-step run's."""
    def recipe(name: str, steps: int):
        path = write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, curriculum=CONSTANT,
                                 training={"total_steps": steps, "checkpoint_every": 4, "sample_every": 4})
        return read_recipe(path, registry)

    straight = start_run(recipe("straight", 10), registry)
    train(straight, progress=False)
    straight.close()
    part = start_run(recipe("part", 6), registry)
    train(part, progress=False)
    part.close()
    sets = ["training.total_steps=10", "training.log_every=3", "training.sample_every=5",
            "evaluation.num_samples=16"]
    extended = resume_run(None, registry, tmp_path / "part", sets=sets)
    assert extended.step == 6 and extended.recipe.training.total_steps == 10
    assert extended.recipe_changes == {"training.total_steps": ("6", "10"), "training.log_every": ("2", "3"),
                                       "training.sample_every": ("4", "5"), "evaluation.num_samples": ("32", "16")}
    extended.close()  # killed before it wrote a checkpoint: ckpt-6 (recipe total_steps = 6) must still resume
    text = (tmp_path / "part" / "recipe.toml").read_text(encoding="utf-8")
    assert text == extended.recipe_text and "\ntotal_steps = 10\n" in text
    assert not list((tmp_path / "part").glob(".recipe.toml.*"))  # written atomically, no temporary file left
    event = stats(tmp_path / "part")[-1]
    assert {k: v for k, v in event.items() if k != "time"} == {
        "event": "recipe_changed", "step": 6, "source": f"{tmp_path / 'part' / 'recipe.toml'} --set "
        + " --set ".join(sets), "num_scales": [9, 9],
        "changes": {"training.total_steps": [6, 10], "training.log_every": [2, 3], "training.sample_every": [4, 5],
                    "evaluation.num_samples": [32, 16]}}
    again = resume_run(None, registry, tmp_path / "part")
    assert again.step == 6 and again.recipe_changes == {}
    train(again, progress=False)
    again.close()
    assert again.step == straight.step == 10 and same_weights(straight, again)
    assert [r["step"] for r in stats(tmp_path / "part") if "loss" in r] == [2, 4, 6, 9, 10]
    assert [r.get("event") for r in stats(tmp_path / "part")].count("recipe_changed") == 1
    from ctcore.training import train_step  # and the comparison can fail

    train_step(again)
    assert not same_weights(straight, again)


def test_extending_a_k_dependent_curriculum_never_moves_n_backwards(tmp_path):
    """iCT's exponential curriculum has K = total_steps: 6 steps with K' = 2 reach N = 9 (s1 + 1); extended to
    K = 30 (K' = 10) the new plan would start again at N = 3 (steps 6..9) and 5 (10..19), but N(k) keeps the 9 the
    run reached, as the printed note and the recipe_changed event say."""
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", training={"total_steps": 6, "log_every": 1})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    result = invoke("run", tmp_path / "out", "--resume", "--set", "training.total_steps=30", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == [
        f"resuming {tmp_path / 'out'} at step 6 (training.total_steps: 6 -> 30)",
        "note: the curriculum's N(k) depends on training.total_steps: the new plan gives 3 at step 6, below the 9 "
        "the run reached, so N(k) stays 9 until the plan passes it (an extended run never moves its curriculum "
        "backwards)",
    ]
    n = {r["step"]: r["num_scales"] for r in stats(tmp_path / "out") if "loss" in r}
    assert [n[k] for k in range(1, 31)] == [3, 3, 5, 5] + [9] * 26  # logged at k for step k - 1
    [event] = [r for r in stats(tmp_path / "out") if r.get("event") == "recipe_changed"]
    assert event["num_scales"] == [9, 9]


def test_the_curriculum_floor_holds_until_the_new_plan_passes_it_across_resumes(tmp_path, registry):
    """s0 = 2, s1 = 32, K = 10 (K' = 2): N = 3, 3, 5, 5, 9, 9, then 17 at step 6, where the run stops. Extended to
    K = 20 (K' = 4), whose plan gives 5 at steps 6..7, 9 at 8..11, 17 at 12..15 and 33 from 16: N(k) is max(17,
    that). The extension is killed before its first checkpoint and resumed again (the floor then comes from the
    checkpoint's own recipe), stopped at step 10 and resumed once more (the floor comes from the checkpoint):
    steps 10 and 11, where the new plan gives 9, still train at 17 (the grid, the EMA teacher's mu(k), the logs)."""
    import math

    out = tmp_path / "out"
    path = write_tiny_recipe(tmp_path / "r.toml", out, curriculum={"name": "exponential", "s0": 2, "s1": 32},
                             teacher={"name": "ema", "mu0": 0.9},
                             training={"total_steps": 10, "log_every": 1, "checkpoint_every": 2})
    run = start_run(read_recipe(path, registry), registry)
    train(run, stop_at=6, progress=False)
    run.close()
    extended = resume_run(None, registry, out, sets=["training.total_steps=20"])
    assert (extended.curriculum.floor, extended.extended_num_scales) == (17, (17, 17))
    extended.close()  # killed before a checkpoint under the new recipe: ckpt-6 holds no floor yet
    assert load_checkpoint(list_checkpoints(out)[-1])["num_scales_floor"] == 1
    again = resume_run(None, registry, out)
    assert (again.step, again.recipe_changes, again.curriculum.floor) == (6, {}, 17)
    train(again, stop_at=10, progress=False)
    again.close()
    assert load_checkpoint(list_checkpoints(out)[-1])["num_scales_floor"] == 17
    last = resume_run(None, registry, out)
    assert (last.step, last.curriculum.floor) == (10, 17)
    used = []  # N(k) as the objective's grid and the teacher's update receive it
    grid, update = last.objective.sigmas, last.teacher.update
    last.objective.sigmas = lambda n, constants, device: (used.append(("grid", n)), grid(n, constants, device))[1]
    last.teacher.update = lambda student, step, n: (used.append(("teacher", n)), update(student, step, n))[1]
    train(last, progress=False)
    last.close()
    assert used == [(part, n) for n in [17] * 6 + [33] * 4 for part in ("grid", "teacher")]
    records = [r for r in stats(out) if "loss" in r]
    assert [r["num_scales"] for r in records] == [3, 3, 5, 5, 9, 9] + [17] * 10 + [33] * 4
    assert [r["teacher_decay"] for r in records] == [math.exp(2 * math.log(0.9) / r["num_scales"]) for r in records]


def test_a_change_that_would_rewrite_the_past_is_refused_on_resume(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", training={"total_steps": 2})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    before = snapshot(tmp_path / "out")
    result = invoke("run", tmp_path / "out", "--resume", "--set", "training.total_steps=4", "--set",
                    "training.lr=2e-3", "--no-progress")
    assert one_line_error(result, 2) == (
        f"error: --set training.lr=2e-3: training.lr cannot change when the run in {str(tmp_path / 'out')!r} "
        "resumes (0.001 -> 0.002): its past steps were trained with it; on resume only training.total_steps, "
        "log_every, checkpoint_every, sample_every, keep_checkpoints, the [evaluation] settings, [logging] and the "
        "memory knobs (training.micro_batch_size, and component options such as [network] checkpoint_blocks) may "
        "change; start a new run instead")
    result = invoke("run", tmp_path / "out", "--resume", "--set", "training.total_steps=abc")
    assert one_line_error(result, 2) == (f"error: {tmp_path / 'out' / 'recipe.toml'}: --set training.total_steps=abc: "
                                         "training.total_steps: expected an integer, got 'abc' (a string)")
    assert snapshot(tmp_path / "out") == before


def test_total_steps_cannot_shrink_below_the_steps_already_trained(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", curriculum=CONSTANT,
                               training={"total_steps": 4})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    before = snapshot(tmp_path / "out")
    result = invoke("run", tmp_path / "out", "--resume", "--set", "training.total_steps=2", "--no-progress")
    assert one_line_error(result, 2) == (
        f"error: --set training.total_steps=2: the run in {str(tmp_path / 'out')!r} has already trained 4 steps, so "
        "training.total_steps cannot become 2 on resume; give at least 4, or start a new run (a checkpoint of an "
        "earlier step can seed one with --init-from)")
    assert snapshot(tmp_path / "out") == before  # recipe.toml and stats.jsonl untouched


def test_a_tensorboard_logger_can_be_added_when_a_run_resumes(tmp_path):
    """Where records go changes no trained step: `--resume --set logging.backends=[...]` adds TensorBoard to a
    finished run extended by two steps, and recipe.toml records it."""
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", curriculum=CONSTANT,
                               training={"total_steps": 2, "log_every": 1})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    result = invoke("run", tmp_path / "out", "--resume", "--set", "training.total_steps=4", "--set",
                    'logging.backends=["jsonl","tensorboard"]', "--no-progress")
    assert result.exit_code == 0, result.output
    assert 'backends = ["jsonl", "tensorboard"]' in (tmp_path / "out" / "recipe.toml").read_text(encoding="utf-8")
    assert len(list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [r["step"] for r in stats(tmp_path / "out") if "loss" in r] == [1, 2, 3, 4]


def test_a_recipe_with_a_longer_total_steps_extends_on_resume(tmp_path, registry):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", curriculum=CONSTANT,
                               training={"total_steps": 2})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    result = invoke("run", recipe, "--resume", "--set", "training.total_steps=4", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"resuming {tmp_path / 'out'} at step 2 (training.total_steps: 2 -> 4)\n")
    assert list_checkpoints(tmp_path / "out")[-1].name == "ckpt-000000004.pt"


def test_the_occupied_directory_message_of_a_finished_run_says_how_to_extend_it(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", training={"total_steps": 2})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    result = invoke("run", recipe, "--no-progress")
    out = tmp_path / "out"
    assert one_line_error(result, 1) == (
        f"error: output directory {str(out)!r} is not empty (it holds an earlier run); it finished at step 2: "
        f"extend it with `ctcore run {out} --resume --set training.total_steps=...`, or choose another directory "
        "with --output-dir (or run.output_dir), or delete it")
