"""`ctcore export safetensors` and `ctcore export diffusers`.

An exported .safetensors file holds a checkpoint's weights with its recipe (verbatim) and provenance as metadata,
and every reader of checkpoints takes it and computes what it computes from the checkpoint, bit for bit; damaged
or foreign .safetensors files are one line each. A diffusers ConsistencyModelPipeline folder made from an `adm`
consistency model samples in one step, from the same latents and labels, what ctcore samples (to 1e-4; measured
below 2e-6); what the pipeline cannot compute exactly is refused in one line and nothing is written.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import attrs
import pytest
import torch
from helpers import (
    DIFFUSION,
    ECT,
    finished_tiny_run,
    one_line_error,
    snapshot,
    tiny_cd,
    train_tiny_diffusion,
    write_tiny_recipe,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_convert import PLAIN, SMALL, released_state_dict  # random weights in the released ADM layout
from test_disk_full import FREE, ctcore_with_file_size_limit, linux_only
from typer.testing import CliRunner, Result

import ctcore
from ctcore.build import start_run
from ctcore.checkpoints import load_checkpoint
from ctcore.cli import app
from ctcore.convert import convert_openai_cm
from ctcore.files import file_digest
from ctcore.recipe import read_recipe
from ctcore.sampling import read_sample_store
from ctcore.training import train

LAST = "ckpt-000000012.pt"
AGAIN = "export it again from its checkpoint (ctcore export safetensors CHECKPOINT OUT.safetensors)"
INSTEAD = "export its weights with `ctcore export safetensors` instead"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (checkpoints at steps 6 and 12); tests never write into it."""
    return finished_tiny_run(tmp_path_factory.mktemp("source"), "src")


@pytest.fixture(scope="module")
def exported(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The eval-EMA weights of the source run's newest checkpoint, exported; tests never write into it."""
    out = tmp_path_factory.mktemp("exported") / "tiny.safetensors"
    result = invoke("export", "safetensors", source, out)
    assert result.exit_code == 0, result.output
    return out


IDENTITY = ("checkpoint", "checkpoint_sha256", "seconds")
"""What eval and search-sigmas report of the file itself and of their time, not of its samples."""


def equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ safetensors


@pytest.mark.parametrize("weights", ["eval-ema", "student"])
def test_the_file_holds_the_weights_the_recipe_verbatim_and_the_provenance(source: Path, tmp_path: Path,
                                                                           weights: str) -> None:
    out = tmp_path / "w.safetensors"
    result = invoke("export", "safetensors", source, out, "--weights", weights)
    ckpt = source / "checkpoints" / LAST
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"wrote {out} (the {weights} weights of {ckpt} at step 12: 19 tensors, 8,056 "
                             "parameters; recipe and provenance as metadata)\n")
    state = torch.load(ckpt, weights_only=True)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert sorted(meta) == ["ctcore.format", "ctcore.provenance", "ctcore.recipe", "ctcore.step", "ctcore.weights",
                            "format"]
    assert (meta["format"], meta["ctcore.format"], meta["ctcore.step"], meta["ctcore.weights"]) == (
        "pt", "ctcore-safetensors-1", "12", weights)
    assert meta["ctcore.recipe"] == state["recipe"] == (source / "recipe.toml").read_text(encoding="utf-8")
    assert json.loads(meta["ctcore.provenance"]) == {**state["provenance"], "exported_from": {
        "file": str(ckpt), "sha256": file_digest(ckpt), "weights": weights, "step": 12}}
    assert equal_state(load_file(out), state["eval_ema" if weights == "eval-ema" else "student"])
    assert not equal_state(state["eval_ema"], state["student"])  # the two choices differ


def test_sampling_the_file_gives_the_checkpoints_samples_bit_for_bit(source: Path, exported: Path,
                                                                     tmp_path: Path) -> None:
    for steps in ("1", "2"):
        stores = []
        for name, checkpoint in (("ckpt", source / "checkpoints" / LAST), ("file", exported)):
            out = tmp_path / f"{name}-{steps}.h5"
            result = invoke("sample", checkpoint, "-n", "6", "--seed", "3", "--steps", steps, "--out", out,
                            "--no-progress")
            assert result.exit_code == 0, result.output
            stores.append(read_sample_store(out))
        assert torch.equal(stores[0]["images"], stores[1]["images"]) and torch.equal(stores[0]["seeds"],
                                                                                     stores[1]["seeds"])
    f, g = ctcore.load_denoiser(source), ctcore.load_denoiser(exported)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])
    assert torch.equal(f(x, sigma), g(x, sigma)) and not torch.equal(f(x, sigma), x)


def test_eval_edit_and_search_sigmas_read_the_file_as_the_checkpoint(source: Path, exported: Path,
                                                                      tmp_path: Path) -> None:
    ckpt = source / "checkpoints" / LAST
    scores = []
    for checkpoint in (ckpt, exported):
        result = invoke("eval", checkpoint, "--metric", "sliced-wasserstein", "--json", "--no-progress")
        assert result.exit_code == 0, result.output
        scores.append({k: v for k, v in json.loads(result.stdout).items() if k not in IDENTITY})
    assert scores[0] == scores[1] and scores[0]["value"] > 0
    edits = []
    for name, checkpoint in (("ckpt", ckpt), ("file", exported)):
        out = tmp_path / f"{name}.h5"
        result = invoke("edit", "interpolate", checkpoint, "-o", out, "--seeds", "3,11", "--num", "4",
                        "--no-progress")
        assert result.exit_code == 0, result.output
        edits.append(read_sample_store(out)["images"])
    assert torch.equal(edits[0], edits[1])
    searches = []
    for name, checkpoint in (("ckpt", ckpt), ("file", exported)):
        result = invoke("search-sigmas", checkpoint, "--steps", "2", "--tolerance", "0.5", "-n", "16", "--json",
                        "--plot", tmp_path / f"{name}.png", "--no-progress")
        assert result.exit_code == 0, result.output
        searches.append({k: v for k, v in json.loads(result.stdout).items() if k not in (*IDENTITY, "plot")})
    assert searches[0] == searches[1] and len(searches[0]["evaluations"]) > 3


def test_init_from_starts_a_run_from_the_files_weights_and_records_it(source: Path, exported: Path,
                                                                      tmp_path: Path, registry) -> None:
    recipe = read_recipe(write_tiny_recipe(tmp_path / "new.toml", tmp_path / "new"), registry)
    run = start_run(recipe, registry, init_from=exported)
    try:
        assert equal_state(run.student.state_dict(), load_checkpoint(source / "checkpoints" / LAST)["eval_ema"])
        run_id = json.loads((source / "provenance.json").read_text(encoding="utf-8"))["run_id"]
        assert run.provenance["init_from"] == {"checkpoint": str(exported), "sha256": file_digest(exported),
                                               "weights": "eval-ema", "step": 12, "run_id": run_id}
    finally:
        run.close()


def test_a_cd_teacher_distils_the_exported_diffusion_model_as_its_checkpoint(tmp_path: Path, registry) -> None:
    edm = train_tiny_diffusion(tmp_path / "edm")
    out = tmp_path / "edm.safetensors"
    assert invoke("export", "safetensors", edm, out).exit_code == 0
    finals = []
    for name, teacher in (("from-ckpt", edm / "checkpoints" / LAST), ("from-file", out)):
        recipe = read_recipe(write_tiny_recipe(tmp_path / f"{name}.toml", tmp_path / name, **tiny_cd(teacher)),
                             registry)
        run = start_run(recipe, registry)
        try:
            train(run, progress=False)
        finally:
            run.close()
        finals.append(load_checkpoint(tmp_path / name / "checkpoints" / LAST)["eval_ema"])
    assert equal_state(finals[0], finals[1])


def test_resume_refuses_an_exported_file_in_checkpoints(source: Path, exported: Path, tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(source, tmp_path / "run"))
    shutil.copyfile(exported, run_dir / "checkpoints" / LAST)
    before = snapshot(run_dir)
    assert one_line_error(invoke("run", run_dir, "--resume", "--no-progress"), 1) == (
        f"checkpoint {str(run_dir / 'checkpoints' / LAST)!r} is an exported .safetensors file: one network's "
        "weights, without the optimizer and RNG states a resume needs; move it out of checkpoints/ to resume from "
        "an earlier checkpoint, or start a new run from its weights with --init-from")
    assert snapshot(run_dir) == before


def _rewritten(exported: Path, out: Path, *, tensors=None, metadata=None) -> Path:
    """The exported file saved again with its tensors and metadata changed by the given functions."""
    with safe_open(str(exported), framework="pt") as f:
        meta = dict(f.metadata())
    state = load_file(exported)
    save_file(tensors(state) if tensors else state, str(out), metadata=metadata(meta) if metadata else meta)
    return out


def _bytes(exported: Path, out: Path, change) -> Path:
    out.write_bytes(change(exported.read_bytes()))
    return out


def _missing_plugin(meta: dict) -> dict:
    prov = json.loads(meta["ctcore.provenance"])
    prov["components"]["network"] = {"name": "unet-x", "distribution": "ctcore-unet", "version": "2.0"}
    return {**meta, "ctcore.provenance": json.dumps(prov),
            "ctcore.recipe": meta["ctcore.recipe"].replace('name = "mlp"', 'name = "unet-x"')}


FC = "inp.weight"
"""A tensor of the tiny recipe's mlp."""

HOSTILE = {
    "truncated": (lambda e, o: _bytes(e, o, lambda b: b[: len(b) - 7]),
                  "is a damaged safetensors file (incomplete metadata, file not fully covered); " + AGAIN),
    "truncated-in-the-header": (lambda e, o: _bytes(e, o, lambda b: b[:200]),
                                "is a truncated safetensors file: its header length says {n} bytes, but only 192 "
                                "follow; " + AGAIN),
    "absurd-header-length": (lambda e, o: _bytes(e, o, lambda b: struct.pack("<Q", 2**62) + b[8:]),
                             "is a damaged safetensors file: its header length says 4,611,686,018,427,387,904 bytes, "
                             "more than the 100,000,000 safetensors allows; " + AGAIN),
    "header-not-json": (lambda e, o: _bytes(e, o, lambda b: struct.pack("<Q", 12) + b"{not json!!}"),
                        "is a damaged safetensors file (invalid JSON in header: key must be a string at line 1 "
                        "column 2); " + AGAIN),
    "no-metadata": (lambda e, o: _rewritten(e, o, metadata=lambda m: {}),
                    "is a safetensors file without ctcore's metadata (no ctcore.format), so its network and recipe are "
                    "unknown; give a .safetensors file that `ctcore export safetensors` wrote, or a ctcore checkpoint"),
    "provenance-not-json": (lambda e, o: _rewritten(e, o, metadata=lambda m: {**m, "ctcore.provenance": "[[["}),
                            "has no ctcore.provenance holding a JSON object; " + AGAIN),
    "step-not-a-number": (lambda e, o: _rewritten(e, o, metadata=lambda m: {**m, "ctcore.step": "-1"}),
                          "has ctcore.step '-1', but a step is a whole number >= 0; " + AGAIN),
    "recipe-names-a-missing-plugin": (lambda e, o: _rewritten(e, o, metadata=_missing_plugin),
                                      "needs network 'unet-x' from the distribution 'ctcore-unet' (version 2.0), "
                                      "which is not installed or is disabled; install it (pip install ctcore-unet) "
                                      "and try again"),
    "missing-tensor": (lambda e, o: _rewritten(e, o, tensors=lambda t: {k: v for k, v in t.items() if k != FC}),
                       f"lacks tensor {FC!r}, which network 'mlp' of its recipe has; " + AGAIN),
    "wrong-shape": (lambda e, o: _rewritten(e, o, tensors=lambda t: {**t, FC: t[FC][:, :-1].contiguous()}),
                    f"has tensor {FC!r} of the wrong shape: network 'mlp' of its recipe expects (32, 48), found "
                    f"(32, 47); " + AGAIN),
    "nan": (lambda e, o: _rewritten(e, o, tensors=lambda t: {**t, FC: t[FC].clone().fill_(math.nan)}),
            f"holds non-finite values in tensor {FC!r}; " + AGAIN),
}
"""Each damaged or foreign file (made from a good export) and the line that `ctcore sample` refuses it with."""


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_damaged_or_foreign_safetensors_file_is_one_line(exported: Path, tmp_path: Path, case: str) -> None:
    make, message = HOSTILE[case]
    bad = make(exported, tmp_path / "bad.safetensors")
    header = int.from_bytes(exported.read_bytes()[:8], "little")
    before = snapshot(tmp_path)
    assert one_line_error(invoke("sample", bad, "-n", "2", "--no-progress"), 1) == (
        f"checkpoint {str(bad)!r} " + message.replace("{n}", f"{header:,}"))
    assert snapshot(tmp_path) == before  # no store, no grid


def test_export_safetensors_never_overwrites_by_accident(source: Path, exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep")
    assert one_line_error(invoke("export", "safetensors", source, out)) == (
        f"{str(out)!r} exists; pass --overwrite to replace it, or choose another OUT.safetensors")
    assert out.read_bytes() == b"keep"
    assert invoke("export", "safetensors", source, out, "--overwrite").exit_code == 0
    assert equal_state(load_file(out), load_file(exported))
    copy = Path(shutil.copyfile(exported, tmp_path / "copy.safetensors"))
    assert one_line_error(invoke("export", "safetensors", copy, copy, "--overwrite")) == (
        f"OUT.safetensors {str(copy)!r} is the same file as CHECKPOINT {str(copy)!r}: writing it would destroy what "
        "this command reads, with or without --overwrite; choose another OUT.safetensors")
    assert one_line_error(invoke("export", "safetensors", source, tmp_path / "w.pt")) == (
        f"OUT.safetensors {str(tmp_path / 'w.pt')!r}: give a .safetensors file name ending in .safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.safetensors", "w.safetensors"]


# ------------------------------------------------------------------------------------------ diffusers


@pytest.fixture(scope="module")
def adm(tmp_path_factory: pytest.TempPathFactory, registry) -> dict[str, Path]:
    """ctcore checkpoints of random `adm` consistency models converted from the released layout: `small` (AdaGN,
    residual resampling, attention at 8 px, 10 classes) and `plain` (no AdaGN, conv resampling, attention at 16 px,
    unconditional), both 32 channels, 2 levels, 16 x 16; tests never write into them."""
    root = tmp_path_factory.mktemp("adm")
    out = {}
    for cfg in (SMALL, PLAIN):
        torch.save(released_state_dict(cfg), root / f"{cfg.name}-released.pt")
        convert_openai_cm(root / f"{cfg.name}-released.pt", root / f"{cfg.name}.pt", registry,
                          configs={cfg.name: cfg})
        out[cfg.name] = root / f"{cfg.name}.pt"
    return out


@pytest.mark.parametrize("cfg", [SMALL, PLAIN], ids=["adagn-updown-classes", "plain-unconditional"])
def test_the_pipeline_samples_what_ctcore_samples_in_one_and_two_steps(adm: dict[str, Path], tmp_path: Path,
                                                                       cfg) -> None:
    from diffusers import ConsistencyModelPipeline

    out = tmp_path / "pipe"
    result = invoke("export", "diffusers", adm[cfg.name], out)
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "ctcore_export.json", "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors"]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in ("sigma_min", "sigma_max", "sigma_data", "rho", "clip_denoised")} == {
        "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "rho": 7.0, "clip_denoised": True}
    record = json.loads((out / "ctcore_export.json").read_text())
    assert (record["checkpoint"], record["sha256"], record["weights"]) == (
        str(adm[cfg.name]), file_digest(adm[cfg.name]), "eval-ema")
    pipe = ConsistencyModelPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(4, *cfg.data_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 7, 9]) if cfg.num_classes else None
    theirs = pipe(batch_size=4, class_labels=labels, num_inference_steps=1, latents=z, output_type="pt").images
    f = ctcore.load_denoiser(adm[cfg.name])
    ours = (f(80.0 * z, 80.0, labels).clamp(-1, 1) + 1) / 2  # ctcore sample's one step, as the pipeline scales it
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() < 1e-4  # measured 8.9e-7 (small) and 1.7e-6 (plain)
    assert ((ours > 0) & (ours < 1)).float().mean() > 0.75  # most pixels not clipped: the comparison means something
    # two steps through index 22 of the scheduler's 40-point grid (sigma 1.3824, the converted ImageNet-64 model's
    # sampling.sigma_mid), re-noised with the noise the pipeline draws from its generator: CM Algorithm 1 as ctcore's
    two = pipe(batch_size=4, class_labels=labels, num_inference_steps=None, timesteps=[22, 0], latents=z,
               generator=torch.Generator().manual_seed(5), output_type="pt").images
    sigma = float(pipe.scheduler.sigmas[1])
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    x = f(80.0 * z, 80.0, labels).clamp(-1, 1)
    x = f(x + math.sqrt(sigma**2 - 0.002**2) * noise, sigma, labels).clamp(-1, 1)
    assert abs(sigma - 1.382368) < 1e-6 and (two - (x + 1) / 2).abs().max() < 1e-4  # measured 1.7e-6 (small)
    x = torch.randn(2, *cfg.data_shape, generator=torch.Generator().manual_seed(1))  # the raw networks, other sigmas
    for sigma in (0.05, 1.0, 20.0):
        t = torch.full((2,), 250 * math.log(sigma))
        raw = f.network(x, t.float(), labels[:2] if labels is not None else None)
        assert (pipe.unet(x, t, class_labels=labels[:2] if labels is not None else None).sample - raw).abs().max() \
            < 1e-4 * raw.abs().max()


def test_an_adm_run_trained_here_exports_its_student_weights(tmp_path: Path) -> None:
    from diffusers import ConsistencyModelPipeline

    recipe = write_tiny_recipe(tmp_path / "adm.toml", tmp_path / "adm", data={"resolution": 16}, network={
        "name": "adm", "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
        "num_head_channels": 16, "use_scale_shift_norm": False, "dropout": 0.0},
        training={"total_steps": 4, "checkpoint_every": 4, "sample_every": 4})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    result = invoke("export", "diffusers", tmp_path / "adm", tmp_path / "pipe", "--weights", "student")
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"wrote {tmp_path / 'pipe'} (ConsistencyModelPipeline: a UNet2DModel of 761,443 "
                             f"parameters from the student weights of {tmp_path / 'adm' / 'checkpoints'}/"
                             "ckpt-000000004.pt at step 4, CMStochasticIterativeScheduler with sigma_min 0.002, "
                             "sigma_max 80, sigma_data 0.5)\n")
    pipe = ConsistencyModelPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    theirs = pipe(batch_size=4, num_inference_steps=1, latents=z, output_type="pt").images
    f = ctcore.load_denoiser(tmp_path / "adm", weights="student")
    x = f(80.0 * z, 80.0)
    assert (theirs - (x.clamp(-1, 1) + 1) / 2).abs().max() < 1e-4  # measured 3e-8
    c_skip = 0.5**2 / ((80.0 - 0.002) ** 2 + 0.5**2)
    assert (x - c_skip * 80.0 * z).abs().max() > 1e-3  # four steps made the network's output more than zero


def _ncsnpp(root: Path) -> Path:
    recipe = write_tiny_recipe(root / "ncsnpp.toml", root / "ncsnpp", network={
        "name": "ncsnpp", "nf": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        training={"total_steps": 1, "checkpoint_every": 1, "sample_every": 1})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    return root / "ncsnpp"


def _converted_adm(root: Path, **options) -> Path:
    """A converted random `adm` of SMALL's configuration with other network options."""
    cfg = attrs.evolve(SMALL, name="other", network={**SMALL.network, **options})
    torch.save(released_state_dict(cfg), root / "other-released.pt")
    convert_openai_cm(root / "other-released.pt", root / "other.pt", ctcore.load_registry(), configs={"other": cfg})
    return root / "other.pt"


def _adm(root: Path, **options) -> Path:
    """A tiny `adm` trained one step with other network options."""
    recipe = write_tiny_recipe(root / "adm.toml", root / "adm", network={
        "name": "adm", "model_channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [],
        "num_head_channels": 8, "num_groups": 8, "dropout": 0.0, **options},
        training={"total_steps": 1, "checkpoint_every": 1, "sample_every": 1})
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    return root / "adm"


def _trained(root: Path, **overrides) -> Path:
    recipe = write_tiny_recipe(root / "r.toml", root / "run", **overrides)
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    return root / "run"


REFUSED = {
    "ncsnpp": (_ncsnpp, "ckpt-000000001.pt",
               "network 'ncsnpp' has no exact diffusers UNet2DModel: NCSN++ embeds c_noise = 0.25 ln sigma, but the "
               "consistency scheduler gives UNet2DModel the timestep 1000 * 0.25 ln sigma, which its positional "
               "embedding takes as it is and its Fourier embedding through a log, dividing its output by it, and "
               "UNet2DModel has no block for the residual input pyramid (progressive_input 'residual'); " + INSTEAD),
    "adm-edm-noise-embedding": (lambda root: _converted_adm(root, noise_embedding="edm"), None,
                                "network 'adm' has no exact diffusers UNet2DModel: noise_embedding is 'edm' (EDM's "
                                "frequencies, of c_noise = 0.25 ln sigma), but UNet2DModel's positional embedding is "
                                "ADM's, of the timestep 1000 * 0.25 ln sigma the consistency scheduler passes; only "
                                "noise_embedding 'adm' maps; " + INSTEAD),
    "adm-wide-first-level": (lambda root: _converted_adm(root, channel_mult=[2, 2]), None,
                             "network 'adm' has no exact diffusers UNet2DModel: channel_mult[0] is 2, but "
                             "UNet2DModel's time features are as wide as its first level, so it must be 1 (adm's are "
                             "model_channels wide); " + INSTEAD),
    "adm-time-inputs": (lambda root: _adm(root, time_inputs=2), "ckpt-000000001.pt",
                        "network 'adm' has no exact diffusers UNet2DModel: time_inputs is 2, but UNet2DModel takes "
                        "one timestep; only time_inputs 1 maps; " + INSTEAD),
    "adm-logvar-head": (lambda root: _adm(root, logvar_head=True), "ckpt-000000001.pt",
                        "network 'adm' has no exact diffusers UNet2DModel: logvar_head is true, but UNet2DModel has "
                        "no log-variance head (a training-time weight, not part of sampling); only logvar_head false "
                        "maps; " + INSTEAD),
    "mlp": (_trained, LAST, "network 'mlp' has no diffusers equivalent (it defines no to_diffusers); " + INSTEAD),
    "diffusion": (lambda root: _trained(root, **DIFFUSION), LAST,
                  "it holds a diffusion model (objective 'edm'), and ConsistencyModelPipeline samples consistency "
                  "models; distil it into a consistency model first (README: Distillation and tuning), or export its "
                  "weights with `ctcore export safetensors`"),
    "ect-parameterization": (lambda root: _trained(root, **ECT), LAST,
                             "objective 'consistency' evaluates c_skip and c_out shifted by sigma_min 0, but its "
                             "sampling re-noises with consistency.sigma_min 0.002, and CMStochasticIterativeScheduler "
                             "has one sigma_min for both; " + INSTEAD),
}
"""Models a ConsistencyModelPipeline cannot compute exactly: how to make one, its checkpoint's name, the reason."""


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_diffusers_cannot_compute_exactly_is_refused_in_one_line(tmp_path: Path, case: str) -> None:
    make, name, reason = REFUSED[case]
    made = make(tmp_path)
    checkpoint = made / "checkpoints" / name if name else made
    before = snapshot(tmp_path)
    assert one_line_error(invoke("export", "diffusers", made, tmp_path / "out"), 1) == (
        f"cannot export checkpoint {str(checkpoint)!r} to diffusers: {reason}")
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()  # nothing written, nothing left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_diffusers_replaces_only_an_earlier_pipeline_and_never_its_input(adm: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "pipe"
    assert invoke("export", "diffusers", adm["plain"], out).exit_code == 0
    before = snapshot(out)
    assert one_line_error(invoke("export", "diffusers", adm["small"], out)) == (
        f"{str(out)!r} exists; pass --overwrite to replace it, or choose another OUT_DIR")
    assert snapshot(out) == before
    result = invoke("export", "diffusers", adm["small"], out, "--overwrite", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"] == str(adm["small"])
    assert json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] == 10  # small's, not plain's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary folder or lock left
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert one_line_error(invoke("export", "diffusers", adm["small"], other, "--overwrite")) == (
        f"OUT_DIR {str(other)!r} is not a diffusers pipeline folder (it has no model_index.json), and --overwrite "
        "replaces only such a folder; choose another OUT_DIR")
    assert snapshot(other) == {"notes.txt": snapshot(other)["notes.txt"]}
    inside = Path(shutil.copyfile(adm["small"], out / "small.pt"))
    assert one_line_error(invoke("export", "diffusers", inside, out, "--overwrite")) == (
        f"OUT_DIR {str(out)!r} holds CHECKPOINT {str(inside)!r}: replacing it would destroy what this command "
        "reads, with or without --overwrite; choose another OUT_DIR")
    assert inside.is_file()


@pytest.mark.slow
@linux_only
def test_a_full_disk_keeps_the_previous_exports_and_says_so_in_one_line(source: Path, exported: Path,
                                                                        adm: dict[str, Path], tmp_path: Path) -> None:
    out = Path(shutil.copyfile(exported, tmp_path / "w.safetensors"))
    pipe = tmp_path / "pipe"
    assert invoke("export", "diffusers", adm["plain"], pipe).exit_code == 0
    before = snapshot(tmp_path)
    limit = 20_000  # a file may grow to 20 kB: the JSON files fit, the weights do not
    run = ctcore_with_file_size_limit(limit, "export", "safetensors", source, out, "--overwrite")
    assert run.returncode == 1 and run.stdout == "", run.stderr
    assert re.fullmatch(rf"error: could not write {re.escape(repr(str(out)))}: File too large {FREE}; the previous "
                        r"file is unchanged\n", run.stderr), run.stderr
    run = ctcore_with_file_size_limit(limit, "export", "diffusers", adm["small"], pipe, "--overwrite")
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    assert run.returncode == 1 and run.stdout == "", run.stderr
    assert re.fullmatch(rf"error: could not write {re.escape(repr(str(weights)))}: File too large {FREE}; the "
                        r"previous file is unchanged\n", run.stderr), run.stderr
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "w.safetensors"]  # no temporary file or folder
