"""One set of flags everywhere: which commands take --progress/--no-progress, --device and --json is one table
(FLAGS, also the README's), checked against every command the app registers, sub-apps included, so a new command
must be added to it; the flags change how a command reports, never what it writes. And no message or help names a
Python function to a command-line user."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import typer.main
from helpers import one_line_error, tree_state, write_tiny_recipe
from plugin_env import REPO_ROOT
from typer.testing import CliRunner, Result

from ctcore.cli import _device_option, app
from ctcore.importers import write_dataset
from ctcore.sampling import read_sample_store


class Flags(typing.NamedTuple):
    progress: bool
    device: bool
    json: bool


FLAGS: dict[str, Flags] = {
    #                     progress  device  json
    "run": Flags(True, True, False),  # its results are the run directory (stats.jsonl)
    "check": Flags(False, False, False),  # seconds on the meta device; prints the recipe as TOML
    "sweep": Flags(True, True, False),  # as run
    "sample": Flags(True, True, True),
    "edit": Flags(True, True, True),
    "eval": Flags(True, True, True),
    "eval-ref-stats": Flags(True, True, True),
    "search-sigmas": Flags(True, True, True),
    "bench": Flags(False, True, True),  # a dozen timed steps
    "list-components": Flags(False, False, True),
    "report": Flags(False, False, True),
    "data import": Flags(True, False, True),
    "data info": Flags(False, False, True),
    "data download": Flags(True, False, True),
    "convert openai-cm": Flags(False, False, True),  # one file read and written, no network run
    "convert edm": Flags(False, False, True),  # as convert openai-cm
    "export safetensors": Flags(False, False, True),  # as convert
    "export diffusers": Flags(False, False, True),  # as convert: the weights are mapped, no network runs
}
"""Each command's shared flags: --progress/--no-progress where it can run for more than a few seconds, --device
where it runs a network, --json where it prints a result. The README's table says the same."""


def commands() -> dict[str, typing.Any]:
    """Command path -> click command, for every command of the app and of its sub-apps (groups hold none)."""
    found: dict[str, typing.Any] = {}

    def walk(command: typing.Any, path: tuple[str, ...]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            found[" ".join(path)] = command
        for name, sub in (subcommands or {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


def test_every_command_is_in_the_table() -> None:
    assert sorted(commands()) == sorted(FLAGS)


def _option(command: typing.Any, flag: str) -> typing.Any:
    return next((p for p in command.params if flag in (*p.opts, *getattr(p, "secondary_opts", []))), None)


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_each_command_takes_the_flags_of_its_row(name: str) -> None:
    command, want = commands()[name], FLAGS[name]
    progress, device, as_json = (_option(command, f) for f in ("--progress", "--device", "--json"))
    assert (progress is not None, device is not None, as_json is not None) == want
    if progress is not None:
        assert (progress.opts, progress.secondary_opts, progress.default) == (["--progress"], ["--no-progress"], True)
    if device is not None:  # cpu, cuda, cuda:N or auto, checked by the one callback
        assert device.opts == ["--device"] and device.callback.__wrapped__ is _device_option
    if as_json is not None:
        assert (as_json.opts, as_json.secondary_opts, as_json.is_flag, as_json.default) == (["--json"], [], True,
                                                                                            False)
    overwrite = _option(command, "--overwrite")  # where a command has it: one plain flag too
    assert overwrite is None or (overwrite.opts, overwrite.secondary_opts) == (["--overwrite"], [])


def test_the_readme_holds_the_same_table() -> None:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    head = "| command | `--progress` | `--device` | `--json` |"
    rows = text.split(head, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[0].strip("`")] = Flags(*(c.startswith("yes") for c in cells[1:]))
    assert table == FLAGS


# ------------------------------------------------------------------------------ the flags change no result


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run whose recipe asks for CUDA, trained with --device cpu."""
    root = tmp_path_factory.mktemp("flags")
    recipe = write_tiny_recipe(root / "tiny.toml", root / "run", run={"device": "cuda"})
    result = invoke("run", recipe, "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert 'device = "cpu"' in (root / "run" / "recipe.toml").read_text()  # --device is run.device
    return root / "run"


def _same_store(a: Path, b: Path) -> None:
    """Two stores hold the same datasets and attributes (but the time they were written)."""
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert sorted(fa) == sorted(fb)
        for key in fa:
            assert np.array_equal(fa[key][...], fb[key][...]), key
        attrs = [{k: v for k, v in f.attrs.items() if k != "created"} for f in (fa, fb)]
        assert attrs[0].keys() == attrs[1].keys()
        assert all(np.array_equal(attrs[0][k], attrs[1][k]) for k in attrs[0])


def test_sample_with_device_no_progress_and_json_writes_the_same_store(run_dir: Path, tmp_path: Path) -> None:
    plain = invoke("sample", run_dir, "-n", "5", "--batch-size", "2", "-o", tmp_path / "a.h5")
    assert plain.exit_code == 0, plain.output
    assert plain.stderr == "sample 1-step 5/5  ETA 0:00:00\n"  # the progress line off a terminal
    assert plain.stdout == (f"wrote 5 samples (1-step [80.0]) to {tmp_path / 'a.h5'} and a grid to "
                            f"{tmp_path / 'a.png'}\n")
    flagged = invoke("sample", run_dir, "-n", "5", "--batch-size", "2", "-o", tmp_path / "b.h5", "--device", "cpu",
                     "--no-progress", "--json")
    assert flagged.exit_code == 0, flagged.output
    assert flagged.stderr == ""
    assert json.loads(flagged.stdout) == {
        "store": str(tmp_path / "b.h5"), "grid": str(tmp_path / "b.png"), "num_samples": 5, "plan": "1-step [80.0]",
        "seed": 0, "sigmas": [80.0], "sampler": "consistency", "weights": "eval-ema",
        "checkpoint": str(run_dir / "checkpoints" / "ckpt-000000012.pt"), "step": 12, "device": "cpu"}
    _same_store(tmp_path / "a.h5", tmp_path / "b.h5")


@pytest.fixture
def cuda_checkpoint(run_dir: Path, tmp_path: Path) -> Path:
    """The run's last checkpoint with its embedded recipe asking for CUDA."""
    state = torch.load(run_dir / "checkpoints" / "ckpt-000000012.pt", weights_only=True)
    state["recipe"] = state["recipe"].replace('device = "cpu"', 'device = "cuda"')
    torch.save(state, tmp_path / "cuda.pt")
    return tmp_path / "cuda.pt"


def test_device_replaces_the_recipes_device(cuda_checkpoint: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():  # without --device: the recipe's
        without = one_line_error(invoke("sample", cuda_checkpoint, "-n", "2", "-o", tmp_path / "s.h5"))
        assert without == ('device "cuda" (--device, else the recipe\'s run.device) needs CUDA, and this machine has '
                           'no CUDA device; use "auto" or "cpu"')
        assert not (tmp_path / "s.h5").exists()
    for args in (["sample", cuda_checkpoint, "-n", "2", "-o", tmp_path / "s.h5"],
                 ["edit", "interpolate", cuda_checkpoint, "--seeds", "0,1", "--num", "2", "-o", tmp_path / "e.h5"],
                 ["eval", cuda_checkpoint, "--metric", "sliced-wasserstein", "-n", "4"],
                 ["search-sigmas", cuda_checkpoint, "--steps", "2", "-n", "4", "--tolerance", "1",
                  "--plot", tmp_path / "p.png"]):
        result = invoke(*args, "--device", "cpu", "--json", "--no-progress")
        assert result.exit_code == 0, (args, result.output)
        assert json.loads(result.stdout)["checkpoint"] == str(cuda_checkpoint)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ctcore HDF5 dataset of 5 random 4x4 RGB images."""
    path = tmp_path_factory.mktemp("flags-source") / "refs.h5"
    images = torch.randint(0, 256, (5, 3, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    write_dataset(path, images.numpy(), None, {"source": "test"})
    return path


def test_edit_with_device_no_progress_and_json_writes_the_same_store(run_dir: Path, source: Path,
                                                                     tmp_path: Path) -> None:
    common = ["edit", "inpaint", run_dir, "--images", source, "--indices", "0:5", "--mask-kind", "box",
              "--batch-size", "2"]
    plain = invoke(*common, "-o", tmp_path / "a.h5")
    assert plain.exit_code == 0, plain.output
    assert plain.stderr == "edit inpaint 5/5  ETA 0:00:00\n"
    flagged = invoke(*common, "-o", tmp_path / "b.h5", "--device", "cpu", "--no-progress", "--json")
    assert flagged.exit_code == 0, flagged.output
    assert flagged.stderr == ""
    out = json.loads(flagged.stdout)
    assert sorted(out) == ["checkpoint", "count", "device", "grid", "plan", "sigmas", "step", "store", "task"]
    assert (out["store"], out["grid"], out["count"], out["task"], out["step"], out["device"]) == (
        str(tmp_path / "b.h5"), str(tmp_path / "b.png"), 5, "inpaint", 12, "cpu")
    assert out["plan"] == "4-step 80, 16.78, 2.24, 0.1312" and len(out["sigmas"]) == 4
    _same_store(tmp_path / "a.h5", tmp_path / "b.h5")
    assert read_sample_store(tmp_path / "b.h5")["attrs"]["sigmas"] == out["sigmas"]


def test_the_distance_shows_its_progress_unless_no_progress(run_dir: Path) -> None:
    shown = invoke("eval", run_dir, "--metric", "sliced-wasserstein", "-n", "4")
    hidden = invoke("eval", run_dir, "--metric", "sliced-wasserstein", "-n", "4", "--no-progress")
    assert shown.exit_code == hidden.exit_code == 0, shown.output + hidden.output
    assert (shown.stderr, hidden.stderr) == ("sliced Wasserstein 1-step 4/4  ETA 0:00:00\n", "")
    assert shown.stdout == hidden.stdout


def test_device_with_a_set_of_run_device_or_cuda_n_in_a_recipe_is_one_line(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run")
    for args in (["run", recipe], ["sweep", recipe, "--set", "training.lr=1e-3,2e-3"]):
        message = one_line_error(invoke(*args, "--set", "run.device=cpu", "--device", "cpu"))
        assert message == "--device cpu and --set run.device=cpu both choose the device: give one of them"
    for args in (["run", recipe], ["sweep", recipe, "--set", "training.lr=1e-3,2e-3"], ["bench", recipe]):
        message = one_line_error(invoke(*args, "--device", "cuda:1"))
        assert message == ("--device cuda:1: a recipe runs on auto, cpu or cuda (run.device); choose the GPU with "
                           "CUDA_VISIBLE_DEVICES=1 and --device cuda")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


def test_sweep_and_bench_take_the_device(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run", run={"device": "cuda"})
    before = tree_state(tmp_path)
    dry = invoke("sweep", recipe, "--set", "training.lr=1e-3,2e-3", "--device", "cpu", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.splitlines() == [
        f"ctcore run {recipe} --set training.lr=1e-3 -o {tmp_path / 'run' / 'training.lr=1e-3'} --device cpu",
        f"ctcore run {recipe} --set training.lr=2e-3 -o {tmp_path / 'run' / 'training.lr=2e-3'} --device cpu"]
    bench = invoke("bench", recipe, "--steps", "1", "--warmup", "0", "--batch", "4", "--device", "cpu", "--json")
    assert bench.exit_code == 0, bench.output
    assert json.loads(bench.stdout)["device"] == "cpu"
    assert tree_state(tmp_path) == before


def test_data_import_and_download_print_json_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from PIL import Image

    import ctcore.importers

    for i in range(4):  # two classes of 8x8 noise images
        folder = tmp_path / "images" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    result = invoke("data", "import", tmp_path / "images", tmp_path / "d.h5", "--json", "--no-progress")
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    out = json.loads(result.stdout)
    assert {k: out[k] for k in ("out", "format", "split", "count", "shape", "num_classes", "class_names")} == {
        "out": str(tmp_path / "d.h5"), "format": "image-folder", "split": "all", "count": 4, "shape": [3, 8, 8],
        "num_classes": 2, "class_names": ["a", "b"]}
    archive = tmp_path / "dl" / "cifar-10-python.tar.gz"  # already in place with its checksum: no network
    archive.parent.mkdir()
    archive.write_bytes(b"payload")
    digest = hashlib.sha256(b"payload").hexdigest()
    monkeypatch.setitem(ctcore.importers.DOWNLOADS, "cifar10", ("http://unused.invalid/", digest, archive.name))
    result = invoke("data", "download", "cifar10", "--dest", tmp_path / "dl", "--json", "--no-progress")
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert json.loads(result.stdout) == {"name": "cifar10", "path": str(archive), "sha256": digest,
                                         "next": f"ctcore data import {archive} data/cifar10-train.h5 (the path the "
                                                 "recipes read)"}


# ---------------------------------------------------------------------- no Python names for command-line users


PYTHON_NAMES = re.compile(r"\b[a-z]+_[a-z_]+\(|\btorch\.[a-z_]+\(|\bload_inception\b|\bload_denoiser\b|weights_only")
"""What a command-line user cannot act on: a function call (`load_inception(PATH)`), torch's loader and its
keyword."""


class Pickled:
    """An object a weights file must not hold (loading it would run code)."""


def test_help_and_messages_name_no_python_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctcore.inception import missing_weights

    texts = {f"ctcore {name} --help": invoke(*name.split(), "--help").stdout for name in commands()}
    texts["ctcore --help"] = invoke("--help").stdout
    monkeypatch.setenv("CTCORE_CACHE", str(tmp_path / "cache"))
    texts["weights not in the cache"] = missing_weights(None)
    texts["weights not at --inception"] = missing_weights(tmp_path / "w.pth")
    from ctcore_lpips.weights import load_state_dict  # a weights file that holds more than tensors

    torch.save({"w": Pickled()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError) as info:
        load_state_dict("backbone_weights", tmp_path / "pickled.pth", "VGG16 weights")
    texts["an lpips weights file holding objects"] = str(info.value)
    for where, text in texts.items():
        assert text and not PYTHON_NAMES.search(text), (where, PYTHON_NAMES.search(text or ""))
