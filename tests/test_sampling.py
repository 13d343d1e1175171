"""Sampling: the multistep sampler, per-sample seeds, the HDF5 sample store and the `ctcore sample` command."""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_tiny_recipe
from PIL import Image
from typer.testing import CliRunner, Result

import ctcore
from ctcore.cli import app
from ctcore.components import BuildContext, NoiseLevels
from ctcore.consistency import denoise
from ctcore.data import to_uint8
from ctcore.recipe import parse_recipe
from ctcore.registry import load_registry
from ctcore.sampling import generate, multistep_sample, read_sample_store, sample_noise, write_sample_store

SHAPE = (3, 4, 4)
SIGMA_MAX = 80.0
SIGMA_MID = 0.821
LAST_CKPT = "ckpt-000000012.pt"


class Recorder:
    """A denoiser that records every call (x, sigma, labels) and returns `fn` of its inputs."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> None:
        self.fn = fn
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.calls.append((x.clone(), sigma.clone(), None if labels is None else labels.clone()))
        return self.fn(x, sigma, labels)


def scaled(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """A sigma-dependent, elementwise (hence batch-independent) stand-in for a trained denoiser."""
    out = x / torch.sqrt(sigma**2 + 0.25)[:, None, None, None]
    if labels is not None:
        out = out + 0.1 * labels.float()[:, None, None, None]
    return out


# --------------------------------------------------------------------------------------- multistep_sample


def test_one_step_is_the_denoiser_at_sigma_max_times_the_noise() -> None:
    z = torch.randn((1, 5, *SHAPE), generator=torch.Generator().manual_seed(0))
    rec = Recorder(lambda x, s, y: 0.01 * x + 0.001 * s[:, None, None, None])
    out = multistep_sample(rec, z, [SIGMA_MAX], clip=False)
    assert len(rec.calls) == 1
    x_in, sigma, labels = rec.calls[0]
    assert torch.equal(x_in, SIGMA_MAX * z[0])
    assert torch.equal(sigma, torch.full((5,), SIGMA_MAX))
    assert labels is None
    assert torch.equal(out, rec.fn(x_in, sigma, None))
    torch.testing.assert_close(out, 0.8 * z[0] + 0.08)


@pytest.mark.parametrize("sigma_min", [0.002, 0.5])
def test_two_step_renoises_with_sqrt_of_sigma_mid_squared_minus_sigma_min_squared(sigma_min: float) -> None:
    z = torch.randn((2, 6, *SHAPE), generator=torch.Generator().manual_seed(1))
    rec = Recorder(lambda x, s, y: 0.3 * x / s[:, None, None, None])
    out = multistep_sample(rec, z, [SIGMA_MAX, SIGMA_MID], sigma_min=sigma_min, clip=False)
    assert len(rec.calls) == 2
    assert torch.equal(rec.calls[0][0], SIGMA_MAX * z[0])
    x0 = rec.fn(*rec.calls[0])  # the first denoised output
    x_in, sigma, _ = rec.calls[1]
    assert torch.equal(x_in, x0 + math.sqrt(SIGMA_MID**2 - sigma_min**2) * z[1])
    assert torch.equal(sigma, torch.full((6,), SIGMA_MID))
    assert torch.equal(out, rec.fn(*rec.calls[1]))
    # the re-noising really uses sigma_min: sqrt(sigma_mid^2) alone would give another input
    assert not torch.equal(x_in, x0 + SIGMA_MID * z[1])


def test_three_steps_use_one_noise_draw_each_and_pass_labels_every_time() -> None:
    z = torch.randn((3, 4, *SHAPE), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 3, 1, 2])
    rec = Recorder(lambda x, s, y: 0.5 * x / s[:, None, None, None])
    sigmas = [SIGMA_MAX, 2.0, 0.5]
    multistep_sample(rec, z, sigmas, labels, clip=False)
    assert [float(c[1][0]) for c in rec.calls] == sigmas
    assert all(torch.equal(c[2], labels) for c in rec.calls)
    assert torch.equal(rec.calls[0][0], SIGMA_MAX * z[0])
    for k in (1, 2):
        previous_output = rec.fn(*rec.calls[k - 1])
        assert torch.equal(rec.calls[k][0], previous_output + math.sqrt(sigmas[k] ** 2 - 0.002**2) * z[k])


def test_clip_clamps_every_step_to_minus_one_one() -> None:
    z = torch.randn((2, 8, *SHAPE), generator=torch.Generator().manual_seed(3))
    identity = Recorder(lambda x, s, y: x)
    clipped = multistep_sample(identity, z, [SIGMA_MAX, SIGMA_MID], clip=True)
    first = (SIGMA_MAX * z[0]).clamp(-1, 1)
    # the clamped first output is what gets re-noised
    assert torch.equal(identity.calls[1][0], first + math.sqrt(SIGMA_MID**2 - 0.002**2) * z[1])
    assert torch.equal(clipped, identity.calls[1][0].clamp(-1, 1))
    assert float(clipped.abs().max()) == 1.0

    raw = Recorder(lambda x, s, y: x)
    unclipped = multistep_sample(raw, z, [SIGMA_MAX, SIGMA_MID], clip=False)
    assert torch.equal(raw.calls[1][0], SIGMA_MAX * z[0] + math.sqrt(SIGMA_MID**2 - 0.002**2) * z[1])
    assert torch.equal(unclipped, raw.calls[1][0])
    assert float(unclipped.abs().max()) > 1.0


def test_one_noise_draw_per_sigma_is_required() -> None:
    z = torch.zeros((1, 2, *SHAPE))
    with pytest.raises(ValueError, match=r"^need one noise draw per step: 2 sigmas, 1 draws$"):
        multistep_sample(lambda x, s, y: x, z, [SIGMA_MAX, SIGMA_MID])


# ------------------------------------------------------------------------------------ the samplers' plans

LEVELS = NoiseLevels(sigma_min=0.01, sigma_max=20.0, sigma_mid=(0.5,))
OPEN_BOUNDS = {"consistency": (LEVELS.sigma_min, "(sigma_min, sigma_max] = (0.01, 20.0]"),
               "heun": (0.0, "(0, sigma_max] = (0, 20.0]"), "euler": (0.0, "(0, sigma_max] = (0, 20.0]"),
               "scm": (0.0, "(0, sigma_max] = (0, 20.0]"), "meanflow": (0.0, "(0, sigma_max] = (0, 20.0]")}
"""Each builtin sampler's open lower bound of the noise levels it accepts, and how its message states its interval."""


@pytest.mark.parametrize("name", OPEN_BOUNDS)
def test_a_plan_accepts_the_closed_upper_bound_and_refuses_the_open_lower_one(registry, name: str) -> None:
    assert {n for n in registry.names("sampler") if registry.provider("sampler", n).distribution == "ctcore"} \
        == set(OPEN_BOUNDS)  # every builtin sampler is checked here
    cls = registry.get("sampler", name)
    sampler = cls(cls.Options(), BuildContext())
    low, interval = OPEN_BOUNDS[name]
    high = LEVELS.sigma_max
    for accepted in ([high], [high, math.nextafter(low, math.inf)], [math.nextafter(high, 0.0)]):
        assert sampler.plan(None, accepted, LEVELS) == accepted
    for refused in ([low], [high, low], [math.nextafter(low, -math.inf)], [math.nextafter(high, math.inf)],
                    [high, math.nextafter(low, -math.inf)]):
        with pytest.raises(ValueError) as info:
            sampler.plan(None, refused, LEVELS)
        assert str(info.value) == f"sigmas must lie in {interval}, got {refused}"


# ------------------------------------------------------------------------------------- per-sample seeds


@pytest.mark.parametrize("sigmas", [[SIGMA_MAX], [SIGMA_MAX, SIGMA_MID]], ids=["1step", "2step"])
def test_a_subset_of_seeds_regenerates_bit_exactly_at_any_batch_size(sigmas: list[float]) -> None:
    full, full_labels = generate(scaled, SHAPE, list(range(8)), sigmas, batch_size=3)
    subset, subset_labels = generate(scaled, SHAPE, [3, 5], sigmas, batch_size=1)
    assert full.dtype == torch.uint8 and full.shape == (8, *SHAPE)
    assert torch.equal(subset, full[[3, 5]])
    assert torch.equal(generate(scaled, SHAPE, list(range(8)), sigmas, batch_size=256)[0], full)
    assert full_labels.tolist() == [-1] * 8 and subset_labels.tolist() == [-1, -1]
    # different seeds give different images
    flat = full.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))


def test_sample_j_uses_only_the_noise_of_its_own_seed() -> None:
    images, _ = generate(scaled, SHAPE, [11, 7], [SIGMA_MAX, SIGMA_MID], batch_size=2)
    for row, seed in enumerate([11, 7]):
        z, label = sample_noise(seed, SHAPE, 2, 0)
        assert label == -1
        expected = multistep_sample(scaled, z[:, None], [SIGMA_MAX, SIGMA_MID])
        assert torch.equal(images[row], to_uint8(expected)[0])


def test_unconditional_generation_passes_no_labels_and_reports_progress() -> None:
    rec = Recorder(scaled)
    done: list[int] = []
    generate(rec, SHAPE, list(range(8)), [SIGMA_MAX], batch_size=3, progress=done.append)
    assert done == [3, 3, 2]
    assert [c[0].shape[0] for c in rec.calls] == [3, 3, 2]
    assert all(c[2] is None for c in rec.calls)


def test_class_labels_are_drawn_per_seed_and_reproducible() -> None:
    rec = Recorder(scaled)
    images, labels = generate(rec, SHAPE, list(range(8)), [SIGMA_MAX, SIGMA_MID], num_classes=10, batch_size=3)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [sample_noise(s, SHAPE, 2, 10)[1] for s in range(8)]
    assert all(0 <= v < 10 for v in labels.tolist()) and len(set(labels.tolist())) > 1
    # the denoiser saw exactly these labels, batch by batch, at every step
    seen = torch.cat([c[2] for c in rec.calls[0::2]])
    assert torch.equal(seen, labels)
    again_images, again_labels = generate(scaled, SHAPE, [5, 3], [SIGMA_MAX, SIGMA_MID], num_classes=10, batch_size=1)
    assert again_labels.tolist() == [labels[5].item(), labels[3].item()]
    assert torch.equal(again_images, images[[5, 3]])


# ------------------------------------------------------------------------------------------ sample store


def _store_data(n: int = 5) -> tuple[torch.Tensor, list[int], torch.Tensor, dict]:
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    attrs = {"recipe": '[run]\nname = "x"\n', "sigmas": [SIGMA_MAX, SIGMA_MID], "step": 12,
             "checkpoint_sha256": "ab" * 32, "weights": "eval-ema"}
    return images, list(range(10, 10 + n)), torch.arange(n) % 3, attrs


def test_sample_store_roundtrip(tmp_path: Path) -> None:
    images, seeds, labels, attrs = _store_data()
    path = write_sample_store(tmp_path / "nested" / "store.h5", images, seeds, labels, attrs)
    assert path == tmp_path / "nested" / "store.h5"
    back = read_sample_store(path)
    assert back["images"].dtype == torch.uint8 and torch.equal(back["images"], images)
    assert back["seeds"].dtype == torch.int64 and back["seeds"].tolist() == seeds
    assert back["labels"].dtype == torch.int64 and back["labels"].tolist() == labels.tolist()
    assert {k: back["attrs"][k] for k in attrs} == attrs
    assert back["attrs"]["layout"] == "NCHW"
    assert isinstance(back["attrs"]["created"], str) and back["attrs"]["created"][:2] == "20"
    # nothing but the store itself is left in its folder
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.h5"]


def test_a_failed_write_leaves_the_old_store_and_no_temporary_file(tmp_path: Path) -> None:
    images, seeds, labels, attrs = _store_data()
    path = write_sample_store(tmp_path / "store.h5", images, seeds, labels, attrs)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_sample_store(path, images[:2], seeds[:2], labels[:2], {"unstorable": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.h5"]


# ------------------------------------------------------------------------------------ `ctcore sample`


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_usage_error(result: Result, code: int, message: str) -> None:
    """A handled failure: the exit code, exactly one error message on stderr, no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stderr == f"error: {message}\n"
    assert result.stdout == ""
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (checkpoints at steps 6 and 12); tests copy it before writing into it."""
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    recipe = write_tiny_recipe(root / "tiny.toml", run_dir)
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["ckpt-000000006.pt", LAST_CKPT]
    return run_dir


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def stores(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.h5"))


def test_sample_writes_a_store_and_a_grid_in_the_run(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / LAST_CKPT
    result = invoke("sample", ckpt, "-n", "4")
    store = run_dir / "samples" / "ckpt-000000012-1step-4.h5"
    grid = run_dir / "samples" / "ckpt-000000012-1step-4.png"
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote 4 samples (1-step [80.0]) to {store} and a grid to {grid}\n"
    assert stores(run_dir / "samples") == [store.name]

    s = read_sample_store(store)
    assert s["images"].shape == (4, *SHAPE) and s["images"].dtype == torch.uint8
    assert s["seeds"].tolist() == [0, 1, 2, 3]
    assert s["labels"].tolist() == [-1, -1, -1, -1]
    a = s["attrs"]
    assert a["recipe"] == (run_dir / "recipe.toml").read_text(encoding="utf-8")
    assert a["checkpoint"] == str(ckpt)
    assert a["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert a["step"] == 12
    assert a["sigmas"] == [SIGMA_MAX]
    assert a["weights"] == "eval-ema"
    assert a["ctcore_version"] == ctcore.__version__

    with Image.open(grid) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        pixels = np.asarray(img)
    # a 2x2 grid of 4x4 images upscaled 16x with 1-pixel gaps; pixel (1, 1) is image 0's top-left pixel
    assert pixels.shape == (131, 131, 3)
    assert pixels[1, 1].tolist() == s["images"][0, :, 0, 0].tolist()
    assert pixels[66, 66].tolist() == s["images"][3, :, 0, 0].tolist()


def test_steps_2_goes_through_the_recipe_sigma_mid(run_dir: Path) -> None:
    result = invoke("sample", run_dir / "checkpoints" / LAST_CKPT, "-n", "4", "--steps", "2")
    assert result.exit_code == 0, result.output
    store = run_dir / "samples" / "ckpt-000000012-2step-4.h5"
    assert result.stdout.startswith(f"wrote 4 samples (2-step [80.0, 0.821]) to {store} ")
    assert read_sample_store(store)["attrs"]["sigmas"] == [SIGMA_MAX, SIGMA_MID]


def test_explicit_sigmas_are_used_as_given(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "custom.h5"
    result = invoke("sample", run_dir, "-n", "3", "--sigmas", "80,1.5", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote 3 samples (2-step [80.0, 1.5]) to {out} and a grid to {tmp_path / 'custom.png'}\n"
    assert read_sample_store(out)["attrs"]["sigmas"] == [SIGMA_MAX, 1.5]
    assert (tmp_path / "custom.png").is_file()
    assert stores(run_dir / "samples") == []


def test_an_existing_store_is_kept_unless_overwrite(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / LAST_CKPT
    assert invoke("sample", ckpt, "-n", "4").exit_code == 0
    store = run_dir / "samples" / "ckpt-000000012-1step-4.h5"
    before = store.read_bytes()
    result = invoke("sample", ckpt, "-n", "4", "--seed", "7")
    assert_usage_error(result, 2, f"{str(store)!r} exists; pass --overwrite to replace it, or choose --out")
    assert store.read_bytes() == before

    result = invoke("sample", ckpt, "-n", "4", "--seed", "7", "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_sample_store(store)["seeds"].tolist() == [7, 8, 9, 10]


def test_more_steps_than_the_recipe_has_sigmas_suggests_sigmas(run_dir: Path) -> None:
    result = invoke("sample", run_dir / "checkpoints" / LAST_CKPT, "-n", "4", "--steps", "3")
    assert_usage_error(
        result, 2,
        "--steps 3: 3 steps need 2 intermediate sigmas but the recipe's sampling.sigma_mid has [0.821]; "
        "pass --sigmas explicitly, e.g. --sigmas 80,0.821",
    )
    assert stores(run_dir / "samples") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sigmas", "80,abc"], "--sigmas must be comma-separated numbers like \"80,0.821\", got '80,abc'"),
        (["--sigmas", "100"], "sigmas must lie in (sigma_min, sigma_max] = (0.002, 80.0], got [100.0]"),
        (["--sigmas", "80,0.001"], "sigmas must lie in (sigma_min, sigma_max] = (0.002, 80.0], got [80.0, 0.001]"),
        (["--weights", "teacher"], "Invalid value for '--weights': 'teacher' is not one of 'eval-ema', 'student' "
                                   "(see `ctcore sample --help`)"),
        (["--sigmas", "0.821,80"], "sigmas must decrease (e.g. 80,0.821), got [0.821, 80.0]"),
    ],
    ids=["not-numbers", "above-sigma-max", "below-sigma-min", "bad-weights", "increasing"],
)
def test_bad_sampling_options_exit_2(run_dir: Path, args: list[str], message: str) -> None:
    result = invoke("sample", run_dir, "-n", "2", *args)
    assert_usage_error(result, 2, message)
    assert stores(run_dir / "samples") == []


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_steps_below_one_are_rejected(run_dir: Path, tmp_path: Path, steps: str) -> None:
    result = invoke("sample", run_dir, "-n", "2", "--steps", steps, "--out", tmp_path / "s.h5")
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "s.h5").exists()


def test_a_subset_of_seeds_reproduces_the_same_images(run_dir: Path, tmp_path: Path) -> None:
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    assert invoke("sample", run_dir, "--seed", "0", "-n", "4", "--steps", "2", "-o", full).exit_code == 0
    result = invoke("sample", run_dir, "--seed", "2", "-n", "2", "--steps", "2", "--batch-size", "1", "-o", part)
    assert result.exit_code == 0, result.output
    a, b = read_sample_store(full), read_sample_store(part)
    assert b["seeds"].tolist() == [2, 3]
    assert torch.equal(b["images"], a["images"][2:4])
    assert not torch.equal(a["images"][0], a["images"][1])


def test_a_run_directory_means_its_latest_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    from_dir, from_file = tmp_path / "dir.h5", tmp_path / "file.h5"
    latest = run_dir / "checkpoints" / LAST_CKPT
    assert invoke("sample", run_dir, "-n", "4", "-o", from_dir).exit_code == 0
    assert invoke("sample", latest, "-n", "4", "-o", from_file).exit_code == 0
    a, b = read_sample_store(from_dir), read_sample_store(from_file)
    assert a["attrs"]["checkpoint"] == str(latest)
    assert a["attrs"]["step"] == 12
    assert a["attrs"]["checkpoint_sha256"] == hashlib.sha256(latest.read_bytes()).hexdigest()
    assert torch.equal(a["images"], b["images"])
    # the earlier checkpoint is a different model
    early = tmp_path / "early.h5"
    assert invoke("sample", run_dir / "checkpoints" / "ckpt-000000006.pt", "-n", "4", "-o", early).exit_code == 0
    assert read_sample_store(early)["attrs"]["step"] == 6


def test_a_directory_without_checkpoints_exits_1(tmp_path: Path) -> None:
    result = invoke("sample", tmp_path)
    assert_usage_error(result, 1, f"{str(tmp_path)!r} holds no checkpoint (checkpoints/ckpt-*.pt)")
    missing = tmp_path / "missing.pt"
    assert_usage_error(invoke("sample", missing), 1, f"checkpoint {str(missing)!r} not found")


def _expected_images(ckpt: Path, key: str, seeds: list[int], sigmas: list[float]) -> torch.Tensor:
    """An independent reconstruction of what `ctcore sample` should write for the given weights."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    registry = load_registry()
    recipe = parse_recipe(state["recipe"], registry)
    spec, c = recipe.components["network"], recipe.consistency
    prov = state["provenance"]
    net = registry.get("network", spec.name)(
        spec.options, BuildContext(tuple(prov["data_shape"]), prov["num_classes"], recipe.training.total_steps)
    )
    net.load_state_dict(state[key])
    net.eval()
    images, _ = generate(lambda x, s, y: denoise(net, x, s, y, sigma_min=c.sigma_min, sigma_data=c.sigma_data),
                         tuple(prov["data_shape"]), seeds, sigmas, sigma_min=c.sigma_min)
    return images


def test_student_weights_are_sampled_on_request(run_dir: Path, tmp_path: Path) -> None:
    ckpt = run_dir / "checkpoints" / LAST_CKPT
    ema, student = tmp_path / "ema.h5", tmp_path / "student.h5"
    assert invoke("sample", ckpt, "-n", "16", "-o", ema).exit_code == 0
    result = invoke("sample", ckpt, "-n", "16", "--weights", "student", "-o", student)
    assert result.exit_code == 0, result.output
    e, s = read_sample_store(ema), read_sample_store(student)
    assert s["attrs"]["weights"] == "student" and e["attrs"]["weights"] == "eval-ema"
    assert not torch.equal(s["images"], e["images"])
    seeds = list(range(16))
    assert torch.equal(s["images"], _expected_images(ckpt, "student", seeds, [SIGMA_MAX]))
    assert torch.equal(e["images"], _expected_images(ckpt, "eval_ema", seeds, [SIGMA_MAX]))


def test_sample_defaults_come_from_the_recipe_sampling_section(run_dir: Path) -> None:
    result = invoke("sample", run_dir)  # the tiny recipe has sampling.num_samples = 4, seed = 0
    assert result.exit_code == 0, result.output
    s = read_sample_store(run_dir / "samples" / "ckpt-000000012-1step-4.h5")
    assert s["seeds"].tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------------- class labels chosen by the user


def test_given_class_labels_are_cycled_and_leave_the_noise_as_drawn() -> None:
    drawn, given = Recorder(scaled), Recorder(scaled)
    _, default = generate(drawn, SHAPE, list(range(7)), [SIGMA_MAX], num_classes=10, batch_size=3)
    _, labels = generate(given, SHAPE, list(range(7)), [SIGMA_MAX], num_classes=10, batch_size=3,
                         class_labels=[0, 3, 7])
    assert labels.tolist() == [0, 3, 7, 0, 3, 7, 0]  # across batches of 3: sample j has class_labels[j % 3]
    assert torch.cat([c[2] for c in given.calls]).tolist() == labels.tolist()
    assert default.tolist() != labels.tolist()
    for a, b in zip(drawn.calls, given.calls, strict=True):  # the same noise, only the labels differ
        assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="class_labels need a conditional model"):
        generate(scaled, SHAPE, [0], [SIGMA_MAX], class_labels=[1])


@pytest.fixture(scope="module")
def conditional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny class-conditional run (8 classes: the synthetic glyph shapes)."""
    root = tmp_path_factory.mktemp("conditional")
    recipe = write_tiny_recipe(root / "cond.toml", root / "run", data={"num_classes": 8})
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.mark.parametrize(("args", "labels", "choice"), [
    ([], None, "drawn from each seed"),
    (["--labels", "0,3, 7"], [0, 3, 7, 0, 3, 7, 0, 3, 7, 0], "cycled: 0,3,7"),
    (["--class-balanced"], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1], "class-balanced: sample j has class j mod 8"),
], ids=["default", "labels", "class-balanced"])
def test_conditional_samples_store_their_labels_and_caption_them_on_the_grid(
        conditional: Path, tmp_path: Path, args: list[str], labels: list[int] | None, choice: str) -> None:
    store, grid = tmp_path / "s.h5", tmp_path / "s.png"
    result = invoke("sample", conditional, "-n", "10", "--seed", "3", "--out", store, *args)
    assert result.exit_code == 0, result.output
    s = read_sample_store(store)
    expected = labels or [sample_noise(seed, SHAPE, 1, 8)[1] for seed in range(3, 13)]  # default: as before
    assert s["labels"].tolist() == expected and s["attrs"]["label_choice"] == choice
    # 10 images of 4x4 shown at 64x64 in 4 columns, each with a caption line (13 px) of dark text beneath
    image = np.asarray(Image.open(grid).convert("L"))
    assert image.shape == (3 * (64 + 13 + 1) + 1, 4 * 65 + 1)
    caption = image[1 + 64 : 1 + 64 + 13, 1 : 1 + 64]  # under the first image
    assert caption.min() < 100 and (caption == 255).mean() > 0.5


def test_labels_given_as_drawn_reproduce_the_default_samples_exactly(conditional: Path, tmp_path: Path) -> None:
    """Choosing labels changes only the labels: given the ones drawn by default, the images are the same."""
    assert invoke("sample", conditional, "-n", "6", "--out", tmp_path / "d.h5").exit_code == 0
    default = read_sample_store(tmp_path / "d.h5")
    given = ",".join(map(str, default["labels"].tolist()))
    assert invoke("sample", conditional, "-n", "6", "--out", tmp_path / "g.h5", "--labels", given).exit_code == 0
    again = read_sample_store(tmp_path / "g.h5")
    assert torch.equal(again["images"], default["images"]) and torch.equal(again["labels"], default["labels"])
    assert invoke("sample", conditional, "-n", "6", "--out", tmp_path / "o.h5", "--labels", "5").exit_code == 0
    assert not torch.equal(read_sample_store(tmp_path / "o.h5")["images"], default["images"])  # labels matter


def test_unconditional_samples_have_no_captions_and_no_label_choice(run_dir: Path, tmp_path: Path) -> None:
    result = invoke("sample", run_dir, "-n", "4", "--out", tmp_path / "s.h5")
    assert result.exit_code == 0, result.output
    assert "label_choice" not in read_sample_store(tmp_path / "s.h5")["attrs"]
    assert Image.open(tmp_path / "s.png").size == (2 * 65 + 1, 2 * 65 + 1)  # the grid as before


@pytest.mark.parametrize(("which", "args", "message"), [
    ("conditional", ["--labels", "8"], "--labels 8: checkpoint '{ckpt}' has 8 classes, so a label lies in 0..7"),
    ("conditional", ["--labels=-1"], "--labels -1: checkpoint '{ckpt}' has 8 classes, so a label lies in 0..7"),
    ("conditional", ["--labels", "1.5"], "--labels must be comma-separated class numbers like \"0,3,7\", got '1.5'"),
    ("conditional", ["--labels", "0,,3"], "--labels must be comma-separated class numbers like \"0,3,7\", got '0,,3'"),
    ("conditional", ["--labels", "cat"], "--labels must be comma-separated class numbers like \"0,3,7\", got 'cat'"),
    ("conditional", ["--labels", "1", "--class-balanced"],
     "--labels and --class-balanced both choose the class labels: give one of them"),
    ("unconditional", ["--labels", "0"], "--labels: checkpoint '{ckpt}' is of an unconditional model (num_classes "
                                         "0), which takes no class labels; leave out --labels"),
    ("unconditional", ["--class-balanced"], "--class-balanced: checkpoint '{ckpt}' is of an unconditional model "
                                            "(num_classes 0), which takes no class labels; leave out --class-balanced"),
], ids=["above", "negative", "fraction", "empty-item", "word", "both", "unconditional", "unconditional-balanced"])
def test_invalid_labels_are_one_line_exit_2_and_write_nothing(conditional: Path, run_dir: Path, tmp_path: Path,
                                                              which: str, args: list[str], message: str) -> None:
    source = conditional if which == "conditional" else run_dir
    before = stores(source / "samples")
    result = invoke("sample", source, "-n", "4", "--out", tmp_path / "out" / "s.h5", *args)
    assert_usage_error(result, 2, message.format(ckpt=source / "checkpoints" / LAST_CKPT))
    assert not (tmp_path / "out").exists() and stores(source / "samples") == before
