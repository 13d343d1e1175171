"""Zero-shot editing (ctcore.editing, `ctcore edit`): the transforms are orthogonal, and the results keep what
they promise to keep, exactly, for any model (an untrained toy MLP here)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from helpers import (
    DIFFUSION,
    MEANFLOW,
    SCT,
    TINY,
    bomb_png,
    finished_tiny_run,
    one_line_error,
    tiny_scd,
    tree_state,
    write_tiny_recipe,
)
from PIL import Image
from typer.testing import CliRunner, Result

from ctcore.cli import app
from ctcore.consistency import denoise
from ctcore.editing import (
    EDIT_LEVELS,
    STROKE_LEVELS,
    colorize,
    edit,
    edit_images,
    inpaint,
    interpolation_noise,
    karras_levels,
    luminance,
    luminance_matrix,
    make_masks,
    patch_matrix,
    patch_means,
    superres,
    transform_matrix,
)
from ctcore.importers import write_dataset
from ctcore.registry import load_registry
from ctcore.sampling import generate, sample_noise

SHAPE = (3, 8, 8)
LAST_CKPT = "ckpt-000000012.pt"
SIGMAS = karras_levels(0.002, 80.0, 7.0, EDIT_LEVELS)


@pytest.fixture(scope="module")
def denoiser():
    """An untrained toy MLP whose output layer is random (not zero), so results are far from the references."""
    torch.manual_seed(0)
    net = load_registry().create("network", "mlp", data_shape=SHAPE, num_classes=0, total_steps=10, width=64,
                                 num_blocks=1, embedding_features=16, zero_init_output=False).eval()
    return lambda x, s, y: denoise(net, x, s, y) * 3.0  # pushed hard against [-1, 1]


def references(n: int = 6) -> torch.Tensor:
    """uint8 references with saturated colours and extremes (0 and 255), where clamping would break exactness."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    images[0] = 255
    images[1] = 0
    images[2, 0], images[2, 1:] = 255, 0
    return images


def test_the_transforms_are_orthogonal_to_float_precision() -> None:
    for m in (luminance_matrix(), patch_matrix(2), patch_matrix(4)):
        assert torch.allclose(m @ m.T, torch.eye(len(m), dtype=torch.float64), atol=1e-12)
    lum = luminance_matrix()[0]
    w = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float64)
    assert torch.allclose(lum, w / w.norm(), atol=1e-12)
    assert torch.allclose(patch_matrix(2)[0], torch.full((4,), 0.5, dtype=torch.float64), atol=1e-12)
    for transform in (colorize(), superres(2, 8), superres(4, 8), inpaint(torch.ones(1, 1, 8, 8))):
        a = transform_matrix(transform, SHAPE)
        assert (a @ a.T - torch.eye(len(a))).abs().max() < 1e-6, transform.name
        x = torch.randn(2, *SHAPE)
        assert (transform.inverse(transform.forward(x)) - x).abs().max() < 1e-5


def test_inpainting_keeps_every_known_pixel_exactly(denoiser) -> None:
    inputs = references()
    seeds = list(range(len(inputs)))
    for kind in ("box", "half", "random-pixels", "strokes"):
        masks = make_masks(kind, seeds, 8)
        assert 0 < int(masks.sum()) < masks.numel(), kind
        images, _ = edit_images(denoiser, inputs, inpaint(masks.float()), masks, SIGMAS, seeds)
        known = masks.bool().expand_as(inputs)
        assert torch.equal(images[known], inputs[known]), kind
        assert not torch.equal(images[~known], inputs[~known]), kind


def test_superres_keeps_every_patch_mean_within_one_grey_level(denoiser) -> None:
    inputs = references()
    for factor in (2, 4):
        transform = superres(factor, 8)
        images, _ = edit_images(denoiser, inputs, transform, None, SIGMAS, list(range(len(inputs))))
        gap = (patch_means(images, factor) - patch_means(inputs, factor)).abs().max()
        assert gap <= 1.0, (factor, gap)
        assert not torch.equal(images, inputs)


def test_colorize_keeps_every_pixel_luminance_within_one_grey_level(denoiser) -> None:
    inputs = references()
    images, _ = edit_images(denoiser, inputs, colorize(), None, SIGMAS, list(range(len(inputs))))
    assert (luminance(images) - luminance(inputs)).abs().max() <= 1.0
    assert (images.int() - inputs.int()).abs().max() > 20  # the colour is generated, not copied


def test_without_the_fit_clamping_would_break_the_luminance(denoiser) -> None:
    """The references and model above push results out of [-1, 1]: the guarantee needs Transform.fit."""
    inputs = references()
    clamped = dataclasses.replace(colorize(), fit=lambda x: x.clamp(-1.0, 1.0))
    images, _ = edit_images(denoiser, inputs, clamped, None, SIGMAS, list(range(len(inputs))))
    assert (luminance(images) - luminance(inputs)).abs().max() > 5.0


def test_edit_follows_algorithm_4_step_by_step() -> None:
    """x = f(y_known + s1 z1); clamp; put the known back; x = f(x + sqrt(s^2 - s_min^2) z_n); clamp; ..."""
    calls = []

    def f(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        calls.append((x.clone(), sigma.clone()))
        return 0.3 * x + 0.01

    ref = references(3)[:2].float() / 127.5 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    z = torch.randn((3, 2, *SHAPE), generator=torch.Generator().manual_seed(0))
    sigmas = [80.0, 2.0, 0.5]
    out = edit(f, ref, inpaint(mask), mask, sigmas, noise=z, sigma_min=0.002)
    keep = mask.bool().expand_as(ref)
    x = torch.where(keep, ref, 0.0) + 80.0 * z[0]
    for k, sigma in enumerate(sigmas):
        if k:
            x = x + (sigma**2 - 0.002**2) ** 0.5 * z[k]
        assert torch.allclose(calls[k][0], x, atol=1e-5) and torch.all(calls[k][1] == sigma)
        x = torch.where(keep, ref, (0.3 * x + 0.01).clamp(-1, 1))
    assert torch.allclose(out, x, atol=1e-6) and torch.equal(out[keep], ref[keep])


def test_edit_with_nothing_known_is_sampling_and_draws_from_the_generator(denoiser) -> None:
    seeds = [3, 4]
    sampled, _ = generate(denoiser, SHAPE, seeds, SIGMAS)
    nothing = torch.zeros((2, 1, 8, 8), dtype=torch.uint8)
    edited, _ = edit_images(denoiser, references(3)[:2], inpaint(nothing.float()), nothing, SIGMAS, seeds)
    assert torch.equal(edited, sampled)
    ref = references(3)[:2].float() / 127.5 - 1
    a = edit(denoiser, ref, colorize(), None, SIGMAS, torch.Generator().manual_seed(5))
    b = edit(denoiser, ref, colorize(), None, SIGMAS, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_interpolation_endpoints_are_the_seeds_noise_exactly() -> None:
    z, labels, alphas = interpolation_noise(7, 9, 5, SHAPE, 2, num_classes=4)
    assert alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    za, la = sample_noise(7, SHAPE, 2, 4)
    zb, lb = sample_noise(9, SHAPE, 2, 4)
    assert torch.equal(z[:, 0], za) and torch.equal(z[:, -1], zb)
    assert labels.tolist() == [la, la, la, lb, lb]
    norms = z[0].flatten(1).norm(dim=1)
    assert (norms - za[0].norm()).abs().max() < 0.2 * za[0].norm()  # on the sphere, not through its inside


# ---------------------------------------------------------------------------------------------- `ctcore edit`


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (RGB 4x4 images) and nothing else; tests write only into their own tmp_path."""
    return finished_tiny_run(tmp_path_factory.mktemp("edit-run"))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ctcore HDF5 dataset of 10 saturated 4x4 RGB images with labels."""
    path = tmp_path_factory.mktemp("edit-source") / "refs.h5"
    images = torch.randint(0, 256, (10, 3, 4, 4), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    images[0] = 255
    write_dataset(path, images.numpy(), np.arange(10) % 8, {"source": "test"})
    return path


def test_edit_inpaint_writes_the_store_and_the_grid_and_keeps_known_pixels(run_dir: Path, source: Path,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "inpaint.h5"
    result = invoke("edit", "inpaint", run_dir, "--images", source, "--indices", "2:8", "--mask-kind",
                    "random-pixels", "--seed", 5, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote 6 inpaint results (4-step 80, 16.78, 2.24, 0.1312) to {out} and a grid to " \
                            f"{out.with_suffix('.png')}\n"
    with h5py.File(out) as f:
        assert sorted(f) == ["images", "inputs", "masks", "seeds"]  # no labels: the model is unconditional
        images, inputs, masks = (torch.from_numpy(f[k][...]) for k in ("images", "inputs", "masks"))
        assert f["seeds"][...].tolist() == [5, 6, 7, 8, 9, 10]
        attrs = dict(f.attrs)
    assert images.dtype == inputs.dtype == masks.dtype == torch.uint8
    assert images.shape == inputs.shape == (6, 3, 4, 4) and masks.shape == (6, 1, 4, 4)
    with h5py.File(source) as f:
        assert torch.equal(inputs, torch.from_numpy(f["images"][2:8]))
    known = masks.bool().expand_as(images)
    assert torch.equal(images[known], inputs[known]) and not torch.equal(images, inputs)
    ckpt = run_dir / "checkpoints" / LAST_CKPT
    assert attrs["task"] == "inpaint" and attrs["checkpoint"] == str(ckpt)
    assert attrs["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert list(attrs["sigmas"]) == karras_levels(0.002, 80.0, 7.0, EDIT_LEVELS)
    assert attrs["transform"] == "identity" and attrs["factor"] == 1 and attrs["mask"] == "random-pixels"
    grid = Image.open(out.with_suffix(".png"))
    assert grid.size == (3 * (64 + 1) + 1, 18 + 6 * (64 + 1) + 1)  # captions; reference | degraded | result, 6 rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inpaint.h5", "inpaint.png"]  # no lock, no temporary


def test_edit_superres_and_colorize_keep_their_components_and_store_zero_masks(run_dir: Path, source: Path,
                                                                               tmp_path: Path) -> None:
    for task, extra, check in (("superres", ["--factor", 2], lambda a, b: patch_means(a, 2) - patch_means(b, 2)),
                               ("colorize", [], lambda a, b: luminance(a) - luminance(b))):
        out = tmp_path / f"{task}.h5"
        result = invoke("edit", task, run_dir, "--images", source, *extra, "-o", out, "--sigmas", "80,0.5")
        assert result.exit_code == 0, result.output
        with h5py.File(out) as f:
            images, inputs = torch.from_numpy(f["images"][...]), torch.from_numpy(f["inputs"][...])
            assert f["masks"].shape == (10, 1, 4, 4) and not f["masks"][...].any()
            expected = ("patch-mean", 2) if task == "superres" else ("luminance", 1)
            assert (f.attrs["transform"], f.attrs["factor"]) == expected
            assert (f["masks"].attrs["transform"], f["masks"].attrs["factor"]) == expected
            assert list(f.attrs["sigmas"]) == [80.0, 0.5]
        assert check(images, inputs).abs().max() <= 1.0, task
        assert not torch.equal(images, inputs)


@pytest.mark.parametrize(("task", "args", "captions"), [
    ("inpaint", ["--mask-kind", "box"], ["source", "masked", "result"]),
    ("colorize", [], ["source", "grayscale", "result"]),
    ("superres", ["--factor", "2"], ["source", "low-res", "result"]),
    ("stroke", [], ["painting", "input", "result"]),
    ("interpolate", ["--seeds", "3,11", "--num", "5"], ["alpha 0", "alpha 0.25", "alpha 0.5", "alpha 0.75",
                                                        "alpha 1"]),
])
def test_edit_grids_caption_their_columns(run_dir: Path, source: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, task: str, args: list[str],
                                          captions: list[str]) -> None:
    """As the training grids caption "samples" and "data", an edit grid has a caption over each column, in an
    18-pixel band above the images: the texts drawn are exactly the captions, and each column's part of the band
    holds dark (text) pixels while the band is white elsewhere."""
    from PIL import ImageDraw

    drawn = []
    real = ImageDraw.ImageDraw.text

    def spy(self: Any, xy: Any, text: str, *a: Any, **k: Any) -> None:
        drawn.append(text)
        real(self, xy, text, *a, **k)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    images = [] if task == "interpolate" else ["--images", source, "--indices", "0:2"]
    result = invoke("edit", task, run_dir, *images, *args, "--sigmas", "80,0.5", "-o", tmp_path / "e.h5")
    assert result.exit_code == 0, result.output
    assert drawn == captions
    with Image.open(tmp_path / "e.png") as grid:
        rgb = grid.convert("L")
        rows = 1 if task == "interpolate" else 2
        assert grid.size == (len(captions) * 65 + 1, 18 + rows * 65 + 1)
        for col in range(len(captions)):
            band = [rgb.getpixel((x, y)) for x in range(1 + 65 * col, 65 * (col + 1)) for y in range(18)]
            assert min(band) < 100, col
        assert {rgb.getpixel((x, 17)) for x in range(grid.size[0])} == {255}  # the band ends above the images


def interpolate_against_sample(run: Path, tmp_path: Path, num: int, sigmas: list[str]) -> torch.Tensor:
    """`ctcore edit interpolate --seeds 3,11` (into tmp_path / interp.h5), asserting that its endpoints equal what
    `ctcore sample --seed 3` and `--seed 11` make with the same `sigmas` options, bit for bit; its images."""
    out = tmp_path / "interp.h5"
    result = invoke("edit", "interpolate", run, "--seeds", "3,11", "--num", num, "-o", out, "--overwrite", *sigmas)
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        images = torch.from_numpy(f["images"][...])
    for seed, image in ((3, images[0]), (11, images[-1])):
        store = tmp_path / f"sample-{seed}.h5"
        result = invoke("sample", run, "--seed", seed, "-n", 1, "-o", store, "--overwrite", *sigmas)
        assert result.exit_code == 0, result.output
        with h5py.File(store) as f:
            assert torch.equal(torch.from_numpy(f["images"][0]), image), (run, seed, sigmas)
    return images


def test_interpolation_endpoints_reproduce_ctcore_sample_bit_for_bit(run_dir: Path, tmp_path: Path) -> None:
    for sigmas in ([], ["--sigmas", "80,0.821"]):
        images = interpolate_against_sample(run_dir, tmp_path, 5, sigmas)
        with h5py.File(tmp_path / "interp.h5") as f:
            assert f["seeds"][...].tolist() == [3, 11] and f["alphas"][...].tolist() == [0, 0.25, 0.5, 0.75, 1]
        assert images.shape == (5, 3, 4, 4)
        assert not torch.equal(images[0], images[-1])


def consistency_functions() -> list[tuple[str, str]]:
    """(objective, parameterization) for every installed objective that trains consistency models, with each value
    its `parameterization` option takes ("" for an objective without one)."""
    import typing

    registry = load_registry()
    found = []
    for name in registry.names("objective"):
        cls = registry.get("objective", name)
        if cls.model != "consistency":
            continue
        hint = typing.get_type_hints(cls.Options).get("parameterization")
        found += [(name, v) for v in typing.get_args(hint)] if hint is not None else [(name, "")]
    return found


def test_every_consistency_function_is_edited_as_it_is_sampled(tmp_path: Path) -> None:
    """For every builtin consistency-type objective and parameterization (cm, edm, ect), `ctcore edit interpolate`
    evaluates the objective's own function: its endpoints equal `ctcore sample` of the same seeds bit for bit, in
    one step and in two (at sigma 0.821, where CM's and EDM's c_skip differ most)."""
    combos = consistency_functions()
    assert ("consistency", "cm") in combos and ("consistency", "edm") in combos and ("consistency", "ect") in combos
    assert {"sct", "scd", "meanflow"} <= {objective for objective, _ in combos}
    diffusion = tmp_path / "diffusion"  # the model scd distils
    assert invoke("run", write_tiny_recipe(tmp_path / "d.toml", diffusion, **DIFFUSION,
                                           training={"total_steps": 2}), "--no-progress").exit_code == 0
    extra = {"sct": SCT, "meanflow": MEANFLOW, "scd": tiny_scd(diffusion)}
    for objective, parameterization in combos:
        options = {"name": objective, **({"parameterization": parameterization} if parameterization else {})}
        run = tmp_path / f"{objective}-{parameterization}"
        overrides = {**extra.get(objective, {}), "objective": options}
        network = {**TINY["network"], "zero_init_output": False, **overrides.pop("network", {})}
        recipe = write_tiny_recipe(tmp_path / f"{run.name}.toml", run, **overrides, network=network)
        result = invoke("run", recipe, "--no-progress")
        assert result.exit_code == 0, result.output
        for sigmas in ([], ["--sigmas", "80,0.821"]):
            interpolate_against_sample(run, tmp_path, 3, sigmas)


def test_stroke_editing_and_png_sources(run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "paintings"
    folder.mkdir()
    Image.new("RGB", (12, 8), (200, 30, 30)).save(folder / "a.png")  # resized to 6x4, then cropped to 4x4
    Image.new("L", (4, 4), 90).save(folder / "b.png")
    out = tmp_path / "stroke.h5"
    result = invoke("edit", "stroke", run_dir, "--images", folder, "-o", out)
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        inputs = f["inputs"][...]
        assert list(f.attrs["sigmas"]) == karras_levels(0.002, 80.0, 7.0, STROKE_LEVELS)
    assert inputs.shape == (2, 3, 4, 4)
    assert (inputs[0].reshape(3, -1).T == [200, 30, 30]).all() and (inputs[1] == 90).all()
    result = invoke("edit", "stroke", run_dir, "--images", folder / "a.png", "--start-sigma", 1.0, "-o",
                    tmp_path / "s1.h5")
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "s1.h5") as f:
        assert list(f.attrs["sigmas"]) == [1.0, karras_levels(0.002, 80.0, 7.0, EDIT_LEVELS)[3]]


@pytest.mark.parametrize(("args", "message"), [
    (["inpaint", "--mask", "{mask5}"], "--mask '{mask5}' is 5x5 pixels but the model's images are 4x4: give a mask "
                                       "of that size (white = keep)"),
    (["colorize", "--images", "{small}"], "--images '{small}' is 6x3 pixels, smaller than the model's 4x4 images: "
                                          "give images at least 4 pixels on their short side"),
    (["colorize", "--images", "{grey}"], "--images '{grey}' holds 1-channel images but the model makes 3-channel "
                                         "ones: give images with 3 channels"),
    (["superres", "--factor", "3"], "--factor 3 does not divide the model's resolution 4: use one of 2, 4"),
    (["inpaint"], "`ctcore edit inpaint` needs one of --mask MASK.png (white = keep) or --mask-kind "
                  "box|half|random-pixels|strokes"),
    (["superres"], "`ctcore edit superres` needs --factor F (F x F patches keep their mean)"),
    (["colorize", "--factor", "2"], "--factor is not an option of `ctcore edit colorize` (it takes --images, "
                                    "--indices, --seed): drop --factor"),
    (["colorize", "--indices", "9:12"], "--indices 9:12: --images '{source}' holds 10 images, so an index lies in "
                                        "0..9"),
    (["interpolate", "--seeds", "1"], '--seeds must be two seeds "A,B" in 0..9223372035854775807, e.g. "0,1", '
                                      "got '1'"),
    (["stroke", "--start-sigma", "100"], "--start-sigma must lie in (sigma_min, sigma_max] = (0.002, 80.0], got "
                                         "100.0"),
    (["colorize", "--labels", "1"], "--labels: checkpoint '{ckpt}' is of an unconditional model (num_classes 0), "
                                    "which takes no class labels; leave out --labels"),
    (["colorize", "{foreign}"], "checkpoint '{foreign}' is not a ctcore checkpoint (format ctcore-checkpoint-1); "
                                "ctcore edit needs a consistency model trained by ctcore run"),
    (["interpolate", "--seeds", "1,2", "--seed", "3"], "--seed is not an option of `ctcore edit interpolate` (it "
                                                       "takes --seeds): drop --seed"),
    (["colorize", "{unknown}"], "checkpoint '{unknown}' needs network 'unet' from the distribution 'ctcore' "
                                "(version {version}), which is not installed or is disabled; install it (pip "
                                "install ctcore) and try again"),
    (["colourise"], "unknown task 'colourise'; did you mean 'colorize'? (available: colorize, inpaint, "
                    "interpolate, stroke, superres)"),
], ids=["mask-size", "too-small", "channels", "factor", "no-mask", "no-factor", "wrong-option", "indices",
        "seeds", "start-sigma", "labels", "foreign-checkpoint", "seed-for-interpolate", "unknown-network",
        "unknown-task"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run_dir: Path, source: Path, tmp_path: Path,
                                                         args: list[str], message: str) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("L", (5, 5), 255).save(inputs / "mask5.png")
    Image.new("RGB", (6, 3)).save(inputs / "small.png")
    write_dataset(inputs / "grey.h5", np.zeros((2, 1, 4, 4), np.uint8), None, {})
    torch.save({"state_dict": {"w": torch.zeros(2)}}, inputs / "foreign.pt")
    ckpt = run_dir / "checkpoints" / LAST_CKPT
    state = torch.load(ckpt, weights_only=True)
    state["provenance"]["components"]["network"]["name"] = "unet"  # e.g. a diffusion network of another package
    torch.save(state, inputs / "unknown.pt")
    names = {"mask5": inputs / "mask5.png", "small": inputs / "small.png", "grey": inputs / "grey.h5",
             "foreign": inputs / "foreign.pt", "unknown": inputs / "unknown.pt", "source": source, "ckpt": ckpt,
             "version": state["provenance"]["components"]["network"]["version"]}
    args = [a.format(**names) for a in args]
    task, rest = args[0], args[1:]
    target = rest.pop(0) if rest and rest[0] in (str(names["foreign"]), str(names["unknown"])) else ckpt
    if task != "interpolate" and "--images" not in rest:
        rest += ["--images", str(source)]
    before = tree_state(tmp_path)
    result = invoke("edit", task, target, *rest, "-o", tmp_path / "out" / "e.h5")
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {message.format(**names)}\n"
    assert result.stdout == "" and "Traceback" not in result.output
    assert tree_state(tmp_path) == before  # no store, grid, lock or folder



BOUND = "more than the 64 megapixels ctcore reads from an image file"


@pytest.mark.parametrize(("option", "size", "problem"), [
    ("--images", (20000, 20000), f"is 20000x20000 pixels (400.0 megapixels), {BOUND}"),
    ("--images", (8001, 8000), f"is 8001x8000 pixels (64.0 megapixels), {BOUND}"),
    ("--images-stroke", (20000, 20000), f"is 20000x20000 pixels (400.0 megapixels), {BOUND}"),
    ("--images-folder", (20000, 20000), f"is 20000x20000 pixels (400.0 megapixels), {BOUND}"),
    ("--mask", (20000, 20000), f"is 20000x20000 pixels (400.0 megapixels), {BOUND}"),
    ("--mask", (8001, 8000), f"is 8001x8000 pixels (64.0 megapixels), {BOUND}"),
    ("--images", "truncated", "cannot be read as an image (OSError: image file is truncated)"),
    ("--mask", "eps", "cannot be read as an image (not an image of a format ctcore reads: PNG, JPEG, WEBP, BMP, GIF, "
                      "TIFF, PPM)"),
], ids=["images-bomb", "images-just-over", "stroke-bomb", "folder-bomb", "mask-bomb", "mask-just-over",
        "images-truncated", "mask-eps"])
def test_an_image_too_large_or_broken_is_one_line_before_it_is_decoded(run_dir: Path, source: Path, tmp_path: Path,
                                                                       option: str, size: Any, problem: str) -> None:
    """A decompression bomb (a 218 KB PNG of 400 megapixels) and an image just over 64 megapixels, refused from
    the header; a truncated PNG; a file Pillow would read as EPS (with Ghostscript): one line, exit 2, nothing
    written."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    big = inputs / "big.png"
    if size == "truncated":
        noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(noise).save(big)
        big.write_bytes(big.read_bytes()[:2000])  # cut inside its image data
    elif size == "eps":
        big.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n")
    else:
        big.write_bytes(bomb_png(*size))
    Image.new("RGB", (4, 4)).save(inputs / "a.png")  # read before big.png, which is refused
    fix = ("give a PNG mask of the model's 4x4 pixels (white = keep)" if option == "--mask" else
           "give a PNG, JPEG or WebP image of at most 64 megapixels")
    args = {"--images": ["inpaint", "--images", big, "--mask-kind", "box"],
            "--images-stroke": ["stroke", "--images", big],
            "--images-folder": ["colorize", "--images", inputs],
            "--mask": ["inpaint", "--images", source, "--mask", big]}[option]
    before = tree_state(tmp_path)
    result = invoke("edit", args[0], run_dir, *args[1:], "-o", tmp_path / "out" / "e.h5")
    shown = "--mask" if option == "--mask" else "--images"
    assert one_line_error(result) == f"{shown} {str(big)!r} {problem}; {fix}"
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("raised", ["error", "warning"])
def test_pillows_own_bomb_check_while_decoding_is_one_error_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 raised: str) -> None:
    """Pillow checks frames it decodes after the header (a GIF frame larger than its screen): its
    DecompressionBombError, and its warning, become the reader's one error."""
    import warnings

    from PIL import ImageFile

    from ctcore.errors import UsageError
    from ctcore.images import read_image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    text = "Image size (200000000 pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS attack."

    def bomb(self: Any) -> None:
        if raised == "error":
            raise Image.DecompressionBombError(text)
        warnings.warn(text, Image.DecompressionBombWarning, stacklevel=1)

    monkeypatch.setattr(ImageFile.ImageFile, "load", bomb)
    with pytest.raises(UsageError) as refused:
        read_image(tmp_path / "a.png", "--mask 'a.png'", UsageError, "give a smaller one", mode="L")
    assert refused.value.message == ("--mask 'a.png' is more than the 64 megapixels ctcore reads from an image file "
                                     "(Image size (200000000 pixels) exceeds limit of 178956970 pixels); give a "
                                     "smaller one")


TOO_MANY = ("ctcore edit takes at most {max} images at once (all are read into memory before it starts): edit them "
            "in parts")


@pytest.mark.parametrize(("source_kind", "indices", "bound", "message"), [
    ("refs", "0:999999999999", None, "--indices 0:999999999999: --images '{src}' holds 10 images, so an index lies in "
                                     "0..9"),
    ("refs", "-5:3", None, "--indices -5:3: --images '{src}' holds 10 images, so an index lies in 0..9"),
    ("huge", "0:", None, "--indices 0: picks 1,000,000,000,000 images; " + TOO_MANY.format(max="1,000,000")),
    ("huge", "7:1000008", None, "--indices 7:1000008 picks 1,000,001 images; " + TOO_MANY.format(max="1,000,000")),
    ("refs", "0,1,2,3", 3, "--indices picks 4 images; " + TOO_MANY.format(max="3")),
    ("folder", None, 2, "--images '{src}' holds more than 2 image files; " + TOO_MANY.format(max="2")),
], ids=["range-beyond-the-file", "negative-start", "all-of-a-trillion", "one-over", "list-over", "folder-over"])
def test_too_many_references_are_refused_before_any_list_is_made(run_dir: Path, source: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, source_kind: str,
                                                                 indices: str | None, bound: int | None,
                                                                 message: str) -> None:
    """--indices ranges are checked against the file before a list is made (0:999999999999 was a MemoryError);
    at most MAX_EDIT_IMAGES references (1,000,000; lowered here for the comma list and the folder): one line,
    exit 2, nothing written. `huge` claims 10^12 images, unwritten (HDF5 allocates chunks lazily)."""
    import ctcore.editing

    if bound is not None:
        monkeypatch.setattr(ctcore.editing, "MAX_EDIT_IMAGES", bound)
    src = source
    if source_kind == "huge":
        src = tmp_path / "huge.h5"
        with h5py.File(src, "w") as f:
            f.create_dataset("images", shape=(10**12, 3, 4, 4), dtype=np.uint8, chunks=(4096, 3, 4, 4))
    elif source_kind == "folder":
        src = tmp_path / "folder"
        src.mkdir()
        for name in "abc":
            Image.new("RGB", (4, 4)).save(src / f"{name}.png")
    before = tree_state(tmp_path)
    args = ["--indices", indices] if indices is not None else []
    result = invoke("edit", "colorize", run_dir, "--images", src, *args, "-o", tmp_path / "out" / "e.h5")
    assert one_line_error(result) == message.format(src=src)
    assert tree_state(tmp_path) == before

def test_an_existing_store_is_kept_unless_overwrite(run_dir: Path, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.h5"
    out.write_bytes(b"keep me")
    args = ["edit", "colorize", run_dir, "--images", source, "--indices", "0,1", "-o", out]
    result = invoke(*args)
    assert result.exit_code == 2 and result.stderr == f"error: {str(out)!r} exists; pass --overwrite to replace " \
                                                      f"it, or choose -o\n"
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["e.h5"]
    assert invoke(*args, "--overwrite").exit_code == 0
    with h5py.File(out) as f:
        assert f["images"].shape == (2, 3, 4, 4)


def test_a_conditional_model_gets_the_source_labels_or_the_given_ones(source: Path, tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "cond.toml", tmp_path / "run", data={"num_classes": 8},
                               training={"total_steps": 2, "checkpoint_every": 2, "sample_every": 2})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    for extra, expected in (([], [3, 4, 5, 6, 7, 0]), (["--labels", "1,2"], [1, 2, 1, 2, 1, 2])):
        out = tmp_path / "c.h5"
        result = invoke("edit", "superres", tmp_path / "run", "--images", source, "--indices", "3:9", "--factor", 4,
                        "-o", out, "--overwrite", *extra)
        assert result.exit_code == 0, result.output
        with h5py.File(out) as f:
            assert f["labels"][...].tolist() == expected


def test_more_images_than_memory_holds_are_refused_before_any_work(run_dir: Path, source: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTCORE_MEMORY_LIMIT", "1000")
    result = invoke("edit", "colorize", run_dir, "--images", source, "-o", tmp_path / "e.h5")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: editing 10 images needs about ")
    assert result.stderr.endswith("choose fewer images (--indices, --num), or a smaller --batch-size\n")
    assert list(tmp_path.iterdir()) == []


def test_a_mask_png_keeps_its_white_pixels(run_dir: Path, source: Path, tmp_path: Path) -> None:
    keep = np.zeros((4, 4), np.uint8)
    keep[:, :2], keep[3, 3] = 255, 200  # white (>= 128) is kept
    Image.fromarray(keep, "L").save(tmp_path / "keep.png")
    out = tmp_path / "m.h5"
    result = invoke("edit", "inpaint", run_dir, "--images", source, "--indices", "0,4", "--mask", tmp_path / "keep.png",
                    "-o", out)
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        masks, images, inputs = (torch.from_numpy(f[k][...]) for k in ("masks", "images", "inputs"))
        assert f.attrs["mask"] == str(tmp_path / "keep.png")
    assert torch.equal(masks, torch.from_numpy(keep >= 128).to(torch.uint8).expand(2, 1, 4, 4))
    known = masks.bool().expand_as(images)
    assert torch.equal(images[known], inputs[known])
