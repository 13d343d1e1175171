"""Loggers are plugins: `[logging] backends` selects them, `jsonl` is always on, `tensorboard` writes event files
and `wandb` an offline W&B run whose values are read back here, a missing package or a failing logger is one line (a
failing wandb logger one warning, the run going on), and `check_logger` catches loggers that break the contract."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import pytest
from helpers import tiny_recipe_text, write_tiny_recipe
from PIL import Image
from plugin_env import fake_distribution
from typer.testing import CliRunner, Result

from ctcore.cli import app
from ctcore.errors import RecipeError
from ctcore.recipe import dump_recipe, parse_recipe
from ctcore.registry import load_registry
from ctcore.testing import check_logger

REGISTRY = load_registry()
TB_MISSING = ("logging.backends: the 'tensorboard' logger needs the tensorboard package, which is not installed: "
              "pip install 'ctcore[tensorboard]' (or remove 'tensorboard' from logging.backends)")


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, REGISTRY, source="r.toml")
    return info.value.problems


# ------------------------------------------------------------------------------------------------- recipes


def test_jsonl_is_always_on_and_the_resolved_recipe_lists_it_first(tmp_path: Path) -> None:
    cases = {None: ("jsonl",), (): ("jsonl",), ("tensorboard",): ("jsonl", "tensorboard"),
             ("tensorboard", "jsonl"): ("jsonl", "tensorboard")}
    for given, resolved in cases.items():
        extra = {} if given is None else {"logging": {"backends": list(given)}}
        recipe = parse_recipe(tiny_recipe_text(tmp_path, **extra), REGISTRY)
        assert recipe.logging.backends == resolved
        assert parse_recipe(dump_recipe(recipe), REGISTRY) == recipe
    text = dump_recipe(parse_recipe(tiny_recipe_text(tmp_path, logging={"backends": ["tensorboard"]}), REGISTRY))
    assert '[logging]\nbackends = ["jsonl", "tensorboard"]\n\n[logging.tensorboard]\nimages = true\n\n[network]' in text
    tuned = parse_recipe(tiny_recipe_text(tmp_path, logging={"backends": ["tensorboard"]})
                         + "\n[logging.tensorboard]\nimages = false\n", REGISTRY)
    assert tuned.loggers["tensorboard"].images is False


@pytest.mark.parametrize(("logging", "expected"), [
    ('backends = ["tensorbord"]', ["logging.backends: unknown logger 'tensorbord'; did you mean 'tensorboard'? "
                                   "(available: jsonl, tensorboard, wandb)"]),
    ('backends = ["tensorboard", "tensorboard"]',
     ["logging.backends: lists 'tensorboard' more than once; list each backend once"]),
    ('backends = "tensorboard"', ["logging.backends: expected an array, got 'tensorboard' (a string)"]),
    ('backend = ["jsonl"]', ["logging.backend: unknown key; did you mean 'backends'?"]),
    ('backends = ["jsonl"]\n[logging.tensorboard]\nimages = false',
     ["logging.tensorboard: options of a logger that logging.backends does not list; add 'tensorboard' to "
      "logging.backends or delete the table [logging.tensorboard]"]),
    ('backends = ["tensorboard"]\n[logging.tensorboard]\nimages = 1\nimage = true',
     ["logging.tensorboard.images: expected true or false, got 1 (an integer)",
      "logging.tensorboard.image: unknown key; did you mean 'images'?"]),
    ('[logging.mlflow]\nproject = "x"',
     ["logging.mlflow: unknown logger 'mlflow' (available: jsonl, tensorboard, wandb)"]),
    ('backends = ["wandb"]\n[logging.wandb]\nproject = "a/b"\nmode = "on"',
     ["logging.wandb.project: must be a W&B name (1 to 128 printable characters, none of / \\ # ? % :), got 'a/b'",
      "logging.wandb.mode: must be one of 'online', 'offline', 'disabled'; got 'on'"]),
])
def test_a_bad_logging_section_names_the_key_and_the_fix(tmp_path: Path, logging: str, expected: list[str]) -> None:
    assert problems(tiny_recipe_text(tmp_path) + "\n[logging]\n" + logging + "\n") == expected


# ------------------------------------------------------------------------------------------------ tensorboard


def test_tensorboard_logger_writes_every_scalar_and_sample_grid_of_the_run(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", logging={"backends": ["tensorboard"]})
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    logged = records(run)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    training = [r for r in logged if "event" not in r]
    assert [r["step"] for r in training] == [2, 4, 6, 8, 10, 12]
    for key in ("loss", "num_scales", "lr", "teacher_decay", "img_per_s"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [r["step"] for r in training], key
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in training], rel=1e-6), key
        assert [s.wall_time for s in scalars] == pytest.approx([r["time"] for r in training], abs=1e-3)
    distances = [r for r in logged if r.get("event") == "distance"]
    scalars = events.Scalars("eval/sliced_wasserstein")
    assert [(s.step, s.value) for s in scalars] == [(r["step"], pytest.approx(r["sliced_wasserstein"], rel=1e-6))
                                                   for r in distances] and len(distances) == 2
    grids = [r for r in logged if r.get("event") == "samples"]
    images = events.Images("samples")
    assert [i.step for i in images] == [r["step"] for r in grids] == [6, 12]
    for image, grid in zip(images, grids, strict=True):
        with Image.open(grid["path"]) as png:
            assert (image.width, image.height) == png.size
    assert sorted(p.parent.name for p in run.rglob("events.out.tfevents.*")) == ["tensorboard"]


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    recipe = write_tiny_recipe(tmp_path / "r.toml", run, logging={"backends": ["tensorboard"]})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    (run / "checkpoints" / "ckpt-000000012.pt").unlink()  # as if killed after step 12 was logged, before its checkpoint
    result = invoke("run", run, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    logged = [r for r in records(run) if "event" not in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8, 10, 12, 8, 10, 12]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    last = {r["step"]: r["loss"] for r in logged}
    assert [(s.step, s.value) for s in scalars] == [(k, pytest.approx(v, rel=1e-6)) for k, v in last.items()]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_a_missing_tensorboard_package_is_one_line_exit_2_and_nothing_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out" / "run", logging={"backends": ["tensorboard"]})
    for command in ("check", "run"):
        result = invoke(command, recipe)
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [f"error: {recipe}: {TB_MISSING}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


# ------------------------------------------------------------------------------------------------------ wandb

WANDB_MISSING = ("logging.backends: the 'wandb' logger needs the wandb package, which is not installed: pip install "
                 "'ctcore[wandb]' (or remove 'wandb' from logging.backends)")


def wandb_runs(run_dir: Path) -> list[dict[str, Any]]:
    """Every offline W&B run under <run dir>/wandb, in the order they started, read back from its run-<id>.wandb
    file (wandb's protobuf records in 32 KiB blocks, each piece behind a 7-byte header: checksum, length, type
    1 whole / 2 first / 3 middle / 4 last): id, name, project, config and the history rows without wandb's own keys."""
    import struct

    from wandb.proto import wandb_internal_pb2

    def values(items: Any) -> dict[str, Any]:
        """{key: value}, an item with a nested key (an image's fields) in a dict under its first part."""
        out: dict[str, Any] = {}
        for item in items:
            *parents, last = [item.key] if item.key else list(item.nested_key)
            place = out
            for part in parents:
                place = place.setdefault(part, {})
            place[last] = json.loads(item.value_json)
        return out

    runs = []
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        data, pos, pieces, records = path.read_bytes(), 7, b"", []
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
            if room < 7 or kind == 0:
                pos += room  # the rest of a block, too short for a header, or zero padding
                continue
            pieces = (b"" if kind in (1, 2) else pieces) + data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                records.append(wandb_internal_pb2.Record.FromString(pieces))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        config = values(run.config.update)
        history = []
        for r in records:
            if r.WhichOneof("record_type") == "config":
                config.update(values(r.config.update))
            elif r.WhichOneof("record_type") == "history":
                history.append({k: v for k, v in values(r.history.item).items() if not k.startswith("_")})
        runs.append({"id": run.run_id, "name": run.display_name, "project": run.project, "config": config,
                     "history": history, "start": run.start_time.ToNanoseconds(), "dir": path.parent})
    return sorted(runs, key=lambda r: r["start"])


def test_wandb_logs_an_offline_run_in_the_run_directory_and_a_resume_continues_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # overrides the recipe's "online": nothing leaves this machine
    run = tmp_path / "run"
    recipe = tmp_path / "r.toml"
    recipe.write_text(tiny_recipe_text(run, logging={"backends": ["wandb"]})
                      + '\n[logging.wandb]\nproject = "ctcore-tests"\n', encoding="utf-8")
    result = invoke("run", recipe, "--no-progress")
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    logged = records(run)
    [first] = wandb_runs(run)
    assert first["id"] == (run / "wandb" / "ctcore-run-id").read_text(encoding="utf-8").strip()
    assert (first["name"], first["project"]) == ("tiny", "ctcore-tests")
    assert first["config"]["run"]["name"] == "tiny" and first["config"]["logging"] == {
        "backends": ["jsonl", "wandb"], "wandb": {"project": "ctcore-tests", "entity": "", "mode": "online",
                                                  "images": True}}  # the resolved recipe
    training = [r for r in logged if "event" not in r]
    rows = [r for r in first["history"] if "train/loss" in r]
    assert [r["step"] for r in rows] == [r["step"] for r in training] == [2, 4, 6, 8, 10, 12]
    for key in ("loss", "num_scales", "lr", "teacher_decay", "img_per_s"):
        assert [r[f"train/{key}"] for r in rows] == pytest.approx([r[key] for r in training], rel=1e-12), key
    distances = [(r["step"], r["sliced_wasserstein"]) for r in logged if r.get("event") == "distance"]
    assert [(r["step"], r["eval/sliced_wasserstein"]) for r in first["history"]
            if "eval/sliced_wasserstein" in r] == distances and len(distances) == 2
    grids = [r for r in logged if r.get("event") == "samples"]
    images = [r for r in first["history"] if "samples" in r]
    assert [r["step"] for r in images] == [r["step"] for r in grids] == [6, 12]
    for row, grid in zip(images, grids, strict=True):
        with Image.open(grid["path"]) as png, Image.open(first["dir"] / "files" / row["samples"]["path"]) as logged_png:
            assert logged_png.size == png.size and np.array_equal(np.asarray(logged_png), np.asarray(png))

    (run / "checkpoints" / "ckpt-000000012.pt").unlink()  # as if killed after step 12 was logged, before its checkpoint
    result = invoke("run", run, "--resume", "--no-progress")
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    again, resumed = wandb_runs(run)
    assert again["id"] == resumed["id"] == first["id"] and resumed["name"] == "tiny"
    assert [r["step"] for r in resumed["history"] if "train/loss" in r] == [8, 10, 12]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml", "run"]  # wandb wrote under the run only
    assert sorted(p.name for p in (run / "wandb").iterdir() if p.is_dir() and not p.is_symlink()) == sorted(
        r["dir"].name for r in (first, resumed))  # offline runs only: no run-* folder of a synced one


def test_a_wandb_failure_is_one_warning_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    def log(self: Any, data: dict, *args: Any, **kwargs: Any) -> None:
        if data["step"] == 4:
            raise ConnectionError("W&B is down\n(details)")
        return real(self, data, *args, **kwargs)

    real = wandb.Run.log
    monkeypatch.setattr(wandb.Run, "log", log)
    run = tmp_path / "run"
    recipe = write_tiny_recipe(tmp_path / "r.toml", run, logging={"backends": ["wandb", "tensorboard"]})
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: the wandb logger failed at step 4 (ConnectionError: W&B is down (details)) and stops; training goes "
        "on, and stats.jsonl and the other loggers keep every record"]
    assert [r["step"] for r in records(run) if "event" not in r] == [2, 4, 6, 8, 10, 12]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-000000006.pt", "ckpt-000000012.pt"]
    [logged] = wandb_runs(run)
    assert [r["step"] for r in logged["history"] if "train/loss" in r] == [2]  # nothing after the failure

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)  # a failure as the run starts: the same warning, at start
    result = invoke("run", write_tiny_recipe(tmp_path / "r2.toml", tmp_path / "run2",
                                             logging={"backends": ["wandb"]}), "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: the wandb logger failed starting at step 0 (UsageError: No API key configured. Use `wandb login` to "
        "log in.) and stops; training goes on, and stats.jsonl and the other loggers keep every record"]
    assert len(list((tmp_path / "run2" / "checkpoints").iterdir())) == 2


def test_a_missing_wandb_package_is_one_line_exit_2_and_nothing_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out" / "run", logging={"backends": ["wandb"]})
    for command in ("check", "run"):
        result = invoke(command, recipe)
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [f"error: {recipe}: {WANDB_MISSING}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


# ------------------------------------------------------------------------------------------ a third-party one

FLAKY = '''
from pathlib import Path
from typing import ClassVar

import attrs

from ctcore import hookimpl


class Flaky:
    name: ClassVar[str] = "flaky"
    summary: ClassVar[str] = "fails at step 4"

    @attrs.frozen
    class Options:
        fail_at: int = 4

    def __init__(self, options, context):
        self.options, self.seen, self.dir = options, [], None

    def start(self, run_dir, step, config):
        self.dir = Path(run_dir)
        (self.dir / "flaky-started").write_text(f"{step} {config['run']['name']}")

    def log(self, record):
        self.seen.append(record["step"])
        if record.get("event") is None and record["step"] == self.options.fail_at:
            raise RuntimeError("backend down")  # FAIL

    def close(self):
        (self.dir / "flaky-closed").write_text(" ".join(map(str, self.seen)))


@hookimpl
def ctcore_register_loggers():
    return [Flaky]
'''


def test_a_third_party_logger_gets_every_record_and_its_exception_stops_the_run_in_one_line(
        tmp_path: Path, plugin_path) -> None:
    plugin_path(fake_distribution(tmp_path, "ctcore-flaky", {"flaky": "ctcore_flaky"},
                                  {"ctcore_flaky.__init__": FLAKY}, version="1.0"))
    result = invoke("list-components", "--kind", "logger", "--json")
    assert [(r["name"], r["distribution"]) for r in json.loads(result.stdout)] == [
        ("flaky", "ctcore-flaky"), ("jsonl", "ctcore"), ("tensorboard", "ctcore"), ("wandb", "ctcore")]
    run = tmp_path / "run"
    recipe = write_tiny_recipe(tmp_path / "r.toml", run, logging={"backends": ["flaky"]})
    result = invoke("run", recipe, "--no-progress")
    line = next(i for i, text in enumerate(FLAKY.splitlines(), 1) if text.endswith("# FAIL"))
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        f"error: logger 'flaky' from distribution 'ctcore-flaky 1.0' raised RuntimeError: backend down (in "
        f"ctcore_flaky/__init__.py:{line}, log); the run stopped at step 4, no checkpoint was written yet: fix or "
        f"update the plugin, then ctcore run {run} --resume"]
    assert (run / "flaky-started").read_text() == "0 tiny"
    assert (run / "flaky-closed").read_text() == "0 2 4 4"  # the error event reached it too, then it was closed
    logged = records(run)
    assert [r.get("event") for r in logged] == ["distance", None, None, "error"]
    assert logged[-1]["error"] == "RuntimeError: backend down"
    assert json.loads((run / "provenance.json").read_text())["loggers"] == {
        "jsonl": {"distribution": "ctcore", "version": "0.1.0"},
        "flaky": {"distribution": "ctcore-flaky", "version": "1.0"}}


# --------------------------------------------------------------------------------------------- the contract


def _logger(**methods: Any) -> type:
    """A logger class whose methods are the defaults below, replaced by `methods`."""

    class Probe:
        name: ClassVar[str] = "probe"
        summary: ClassVar[str] = "a test logger"

        @attrs.frozen
        class Options:
            pass

        def __init__(self, options: Any, context: Any) -> None:
            self.dir = None

        def start(self, run_dir: Path, step: int, config: dict) -> None:
            self.dir = run_dir

        def log(self, record: dict) -> None:
            pass

        def close(self) -> None:
            pass

    for name, fn in methods.items():
        setattr(Probe, name, fn)
    return Probe


def test_check_logger_passes_the_builtins_and_catches_broken_loggers(tmp_path: Path) -> None:
    for name in ("jsonl", "tensorboard"):
        check_logger(REGISTRY.get("logger", name))
    check_logger(REGISTRY.get("logger", "tensorboard"), images=False)
    check_logger(REGISTRY.get("logger", "wandb"), mode="offline", images=False)
    check_logger(_logger())

    def writes_early(self: Any, options: Any, context: Any) -> None:
        Path("stray.txt").write_text("x")

    def writes_elsewhere(self: Any, run_dir: Path, step: int, config: dict) -> None:
        Path("wandb").mkdir(exist_ok=True)

    def mutates(self: Any, record: dict) -> None:
        record.pop("time", None)

    def rejects_unknown_events(self: Any, record: dict) -> None:
        if record.get("event") not in (None, "distance", "samples", "fid", "checkpoint", "nonfinite"):
            raise KeyError(record["event"])

    with pytest.raises(AssertionError, match=r"Probe: the constructor must not write anything \(open files in "
                                             r"start\(\)\), but it wrote \['stray.txt'\]$"):
        check_logger(_logger(__init__=writes_early))
    with pytest.raises(AssertionError, match=r"Probe: write only under the run directory given to start\(\); it also "
                                             r"wrote \['wandb'\] in the working directory$"):
        check_logger(_logger(start=writes_elsewhere))
    with pytest.raises(AssertionError, match=r"Probe: log\(record\) must not change the record \(every logger gets "
                                             r"the same one\), but it changed \{'time': 1\.0, 'event': 'distance'"):
        check_logger(_logger(log=mutates))
    with pytest.raises(KeyError, match="a-future-event"):
        check_logger(_logger(log=rejects_unknown_events))


def test_tensorboard_writes_the_fields_of_any_objective(tmp_path: Path) -> None:
    """An objective's own log fields reach TensorBoard: an edm run logs loss, lr and img/s but no num_scales, and
    a training record with a field no builtin writes (a third party's `stage`) becomes train/stage."""
    from ctcore_loggers import TensorBoard
    from helpers import DIFFUSION
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", logging={"backends": ["tensorboard"]},
                               **DIFFUSION)
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/sliced_wasserstein", "train/img_per_s", "train/loss",
                                                "train/lr"]
    logger = TensorBoard(TensorBoard.Options(), None)
    logger.start(tmp_path / "other", 0, {})
    logger.log({"time": 1.0, "step": 3, "loss": 0.5, "stage": 2, "note": "text"})
    logger.close()
    events = EventAccumulator(str(tmp_path / "other" / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/stage"]
    assert [(s.step, s.value) for s in events.Scalars("train/stage")] == [(3, 2.0)]
