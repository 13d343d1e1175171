"""A mistyped path names the closest existing one in its folder, in one message (ctcore.errors.path_not_found), for
every command and every kind of path a command reads: checkpoints and run directories (sample, edit, eval,
search-sigmas, run --resume, run --init-from and run.init_from, teacher.checkpoint, report), recipes, datasets,
dataset sources, reference statistics, Inception weights, convert sources, edit's --images and --mask."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import one_line_error, tiny_cd, tree_state, write_tiny_recipe
from typer.testing import CliRunner, Result

from ctcore.cli import app
from ctcore.data import hdf5_summary
from ctcore.editing import read_mask, read_source
from ctcore.errors import RunError, UsageError, near_path, path_not_found

TRAIN_RUN = ("train that run (or convert that model) first, or give --init-from the checkpoint file or run "
             "directory of an existing run")


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with the names a user mistypes: runs/quickstart (a run directory's name), recipes,
    data files, reference statistics, a released model and Inception weights (empty files: the messages come
    before anything is read)."""
    monkeypatch.chdir(tmp_path)
    for folder in ("runs/quickstart/checkpoints", "runs/quickstart-ct", "recipes", "data", "refs", "models"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("data/cifar10-train.h5", "data/cifar-10-python.tar.gz", "refs/cifar10-train.npz",
                 "models/cd_imagenet64_lpips.pt", "models/edm-cifar10-32x32-uncond-vp.pkl", "weights.pth",
                 "runs/quickstart/checkpoints/ckpt-000000012.pt"):
        (tmp_path / name).write_bytes(b"")
    write_tiny_recipe(tmp_path / "recipes" / "quickstart.toml", "runs/new")
    return tmp_path


@pytest.mark.parametrize(("typed", "meant"), [
    ("runs/quickstrat", "runs/quickstart"),
    ("./runs/quikstart", "runs/quickstart"),
    ("rusn/quickstrat/checkpoints", "runs/quickstart/checkpoints"),  # every mistyped part, each in its folder
    ("runs/quickstart/checkpoints/ckpt-000000013.pt", "runs/quickstart/checkpoints/ckpt-000000012.pt"),
    ("runs/quickstart", None),  # exists
    ("runs/zzz", None),  # nothing close
    ("runs/zzz/ckpt.pt", None),
    ("", None),
])
def test_near_path_corrects_each_part_in_its_own_folder(tree: Path, typed: str, meant: str | None) -> None:
    assert near_path(typed) == meant
    assert near_path(tree / typed) == (None if meant is None else str(tree / meant))  # absolute stays absolute


def test_the_message_adds_the_guess_only_when_there_is_one(tree: Path) -> None:
    assert path_not_found("checkpoint 'runs/quickstrat'", "runs/quickstrat", "fix") == (
        "checkpoint 'runs/quickstrat' not found (did you mean 'runs/quickstart'?); fix")
    assert path_not_found("checkpoint 'runs/zzz'", "runs/zzz") == "checkpoint 'runs/zzz' not found"


CHECKPOINT = "checkpoint 'runs/quickstrat' not found (did you mean 'runs/quickstart'?)"


MISTYPED = [
    (["sample", "runs/quickstrat"], 1, CHECKPOINT),
    (["sample", "rusn/quickstart"], 1, "checkpoint 'rusn/quickstart' not found (did you mean 'runs/quickstart'?)"),
    (["sample", "runs/zzz"], 1, "checkpoint 'runs/zzz' not found"),
    (["edit", "inpaint", "runs/quickstrat", "-o", "e.h5", "--images", "data/cifar10-train.h5", "--mask-kind", "box"],
     1, CHECKPOINT),
    (["eval", "runs/quickstrat", "--metric", "sliced-wasserstein"], 1, CHECKPOINT),
    (["eval", "runs/quickstrat", "--ref", "refs/cifar10-train.npz", "--inception", "weights.pth"], 1, CHECKPOINT),
    (["search-sigmas", "runs/quickstrat", "--steps", "2"], 1, CHECKPOINT),
    (["export", "safetensors", "runs/quickstrat", "out.safetensors"], 1, CHECKPOINT),
    (["export", "diffusers", "runs/quickstrat", "pipeline"], 1, CHECKPOINT),
    (["run", "runs/quickstrat", "--resume"], 1,
     "nothing to resume: run directory 'runs/quickstrat' not found (did you mean 'runs/quickstart'?)"),
    (["run", "recipes/quickstart.toml", "--init-from", "runs/quickstrat"], 1,
     f"--init-from 'runs/quickstrat' not found (did you mean 'runs/quickstart'?); {TRAIN_RUN}"),
    (["report", "runs/quickstart-tc"], 2, "RUN_DIR 'runs/quickstart-tc' not found (did you mean "
                                          "'runs/quickstart-ct'?); give a run directory that `ctcore run` wrote (it "
                                          "holds stats.jsonl)"),
    (["run", "recipes/quickstrat.toml"], 2, "recipes/quickstrat.toml: file not found (did you mean "
                                            "'recipes/quickstart.toml'?); check the path (recipes live in recipes/)"),
    (["check", "recipes/quickstrat.toml"], 2, "recipes/quickstrat.toml: file not found (did you mean "
                                              "'recipes/quickstart.toml'?); check the path (recipes live in "
                                              "recipes/)"),
    (["convert", "openai-cm", "models/cd_imagenet64_lpip.pt", "out.pt"], 1,
     "'models/cd_imagenet64_lpip.pt' not found (did you mean 'models/cd_imagenet64_lpips.pt'?); give a released "
     "OpenAI consistency-model file (e.g. cd_imagenet64_lpips.pt from openai/consistency_models)"),
    (["convert", "edm", "models/edm-cifar10-32x32-uncond-pv.pkl", "out.pt"], 1,
     "'models/edm-cifar10-32x32-uncond-pv.pkl' not found (did you mean 'models/edm-cifar10-32x32-uncond-vp.pkl'?); "
     "give a network pickle from NVlabs/edm (network-snapshot-*.pkl or a released edm-*.pkl)"),
    (["data", "info", "data/cifar10-trian.h5"], 1,
     "dataset file 'data/cifar10-trian.h5' not found (did you mean 'data/cifar10-train.h5'?); create one with: "
     "ctcore data import SOURCE data/cifar10-trian.h5"),
    (["data", "import", "data/cifar-10-pyhton.tar.gz", "out.h5"], 1,
     "dataset source 'data/cifar-10-pyhton.tar.gz' not found (did you mean 'data/cifar-10-python.tar.gz'?); give "
     "the downloaded archive, an image folder, or .npz batches (get CIFAR-10 with: ctcore data download cifar10)"),
    (["eval-ref-stats", "data/cifar10-trian.h5", "out.npz", "--inception", "weights.pth"], 1,
     "dataset file 'data/cifar10-trian.h5' not found (did you mean 'data/cifar10-train.h5'?); create one with: "
     "ctcore data import SOURCE data/cifar10-trian.h5"),
    (["eval", "runs/quickstart", "--ref", "refs/cifar10-trian.npz", "--inception", "weights.pth"], 1,
     "reference statistics 'refs/cifar10-trian.npz' not found (did you mean 'refs/cifar10-train.npz'?); compute "
     "them with `ctcore eval-ref-stats DATASET.h5 OUT.npz --inception PATH`, or give an .npz with `mu` and `sigma` "
     "from pytorch-fid or clean-fid"),
]
"""(command line, exit code, message) for each command and each kind of path it reads."""


@pytest.mark.parametrize(("args", "code", "message"), MISTYPED, ids=[" ".join(a) for a, _, _ in MISTYPED])
def test_a_mistyped_path_names_its_closest_sibling_in_one_line(tree: Path, args: list[str], code: int,
                                                               message: str) -> None:
    before = tree_state(tree)
    assert one_line_error(invoke(*args), code) == message
    assert tree_state(tree) == before  # nothing written


def test_mistyped_inception_weights_name_the_file_meant(tree: Path) -> None:
    result = invoke("eval", "runs/quickstart", "--ref", "refs/cifar10-train.npz", "--inception", "wieghts.pth")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: Inception weights file 'wieghts.pth' (--inception) not found (did you "
                                    "mean 'weights.pth'?). Download ")


@pytest.mark.parametrize(("key", "recipe_overrides", "message"), [
    ("run.init_from", {"run": {"init_from": "runs/quickstrat"}},
     "run.init_from: 'runs/quickstrat' not found (did you mean 'runs/quickstart'?); train that run (or convert "
     "that model) first, or give run.init_from the checkpoint file or run directory of an existing run"),
    ("teacher.checkpoint", tiny_cd("runs/quickstrat"),
     "teacher.checkpoint: 'runs/quickstrat' not found (did you mean 'runs/quickstart'?); train the diffusion model "
     "first (a recipe with objective 'edm' or 'trigflow' whose run writes it), or set teacher.checkpoint to the run "
     "directory or checkpoint file of a run with objective 'edm' or 'trigflow'"),
], ids=["run.init_from", "teacher.checkpoint"])
def test_a_recipe_key_naming_a_mistyped_run_names_its_closest_sibling(tree: Path, key: str,
                                                                      recipe_overrides: dict, message: str) -> None:
    recipe = write_tiny_recipe(tree / "recipes" / "warm.toml", "runs/new", **recipe_overrides)
    assert one_line_error(invoke("check", recipe)) == f"{recipe}: {message}"
    assert not (tree / "runs" / "new").exists()


def test_check_of_a_recipe_with_a_mistyped_data_path_names_its_closest_sibling(tree: Path) -> None:
    recipe = write_tiny_recipe(tree / "recipes" / "hdf5.toml", "runs/new",
                               data={"source": "hdf5", "path": "data/cifar10-trian.h5"})
    result = invoke("check", recipe)  # not an error at check (the paper recipes name files made later): a note
    assert result.exit_code == 0, result.output
    assert ("; data file 'data/cifar10-trian.h5' does not exist yet (did you mean 'data/cifar10-train.h5'?): create "
            "it before training (") in result.stderr


def test_a_mistyped_data_path_names_its_closest_sibling(tree: Path) -> None:
    with pytest.raises(RunError) as info:
        hdf5_summary("data/cifar10-trian.h5")
    assert info.value.message.startswith("dataset file 'data/cifar10-trian.h5' (data.path in the recipe) not found "
                                         "(did you mean 'data/cifar10-train.h5'?); create it with `ctcore data "
                                         "import SOURCE data/cifar10-trian.h5`")


def test_mistyped_edit_images_and_mask_name_their_closest_siblings(tree: Path) -> None:
    with pytest.raises(UsageError) as info:
        read_source("data/cifar10-trian.h5", (3, 4, 4))
    assert info.value.message == ("--images 'data/cifar10-trian.h5' not found (did you mean 'data/cifar10-train.h5'?); "
                                  "give a ctcore HDF5 dataset, an image file or a folder of images")
    (tree / "mask.png").write_bytes(b"")
    with pytest.raises(UsageError) as info:
        read_mask("msk.png", 4)
    assert info.value.message == ("--mask 'msk.png' not found (did you mean 'mask.png'?); give an image of 4x4 "
                                  "pixels (white = keep), or a generated mask with --mask-kind")
