"""`ctcore eval`: the sliced Wasserstein distance of a checkpoint without any weights file (the number the training
loop logs), and the command's FID side: the advice when Inception weights are absent, the protocol and split options
it records, and the refusals of statistics made under another FID protocol."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import NO_REF, cache_lacks_the_weights, tree_state, write_tiny_recipe
from typer.testing import CliRunner

import ctcore
import ctcore.fid
import ctcore.inception
from ctcore.build import start_run
from ctcore.checkpoints import list_checkpoints
from ctcore.cli import app
from ctcore.errors import RunError
from ctcore.evaluation import sliced_wasserstein
from ctcore.fid import save_statistics
from ctcore.inception import FIDInceptionV3
from ctcore.sampling import file_digest
from ctcore.training import train


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def trained(root: Path, **overrides) -> tuple[Path, list[dict]]:
    """A finished tiny run (12 steps) and the rows of its stats.jsonl."""
    registry = ctcore.load_registry()
    recipe = ctcore.read_recipe(write_tiny_recipe(root / "r.toml", root / "run", **overrides), registry)
    run = start_run(recipe, registry)
    try:
        train(run, progress=False)
    finally:
        run.close()
    rows = [json.loads(line) for line in (run.out_dir / "stats.jsonl").read_text().splitlines()]
    return run.out_dir, rows


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    return trained(tmp_path_factory.mktemp("eval-run"))


# ------------------------------------------------------------------------------------- sliced Wasserstein


@pytest.mark.parametrize(("a", "b"), [(0.25, -1.5), (3.0, 3.5), (-2.0, -2.0)])
def test_the_distance_of_two_point_masses_in_1d_is_their_gap(a: float, b: float) -> None:
    """In 1-D every unit direction is +1 or -1, so each projection's W1 is |a - b| and so is their mean."""
    for projections, seed in ((1, 0), (16, 3), (256, 0)):
        assert sliced_wasserstein(torch.full((5, 1), a), torch.full((5, 1), b), projections, seed) == abs(a - b)


@pytest.mark.parametrize(("a", "b", "expected"), [
    ([0.0, 2.0], [1.0, 1.0], 1.0),  # sorted: |0 - 1| and |2 - 1|
    ([0.0, 2.0], [3.0, 1.0], 1.0),  # pairs (0, 1) and (2, 3) once sorted; 2 as listed
    ([0.0, 2.0], [2.0, 0.0], 0.0),  # the same set in another order
    ([4.0, -1.0, 0.5], [0.5, 4.0, -1.0], 0.0),
])
def test_the_1d_distance_pairs_the_sorted_points(a: list[float], b: list[float], expected: float) -> None:
    pa, pb = torch.tensor(a)[:, None], torch.tensor(b)[:, None]
    assert sliced_wasserstein(pa, pb, 32) == expected
    assert sliced_wasserstein(pb, pa, 32) == expected


def test_a_shift_by_v_is_the_mean_of_u_dot_v_over_the_unit_directions() -> None:
    """Shifting every point by v moves each projection on u by u.v and keeps its order: W1 = |u.v| per direction,
    averaged over the seeded unit directions (about |v| E|u_1| for many of them)."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(64, 2, 3, 3, generator=g, dtype=torch.float64)  # flattened: D = 18
    v = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    dirs = torch.randn(18, 200, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u = dirs / dirs.norm(dim=0, keepdim=True)
    expected = float((v.flatten() @ u).abs().mean())
    assert sliced_wasserstein(a, a + v, 200, seed=4) == pytest.approx(expected, rel=1e-12, abs=0)
    assert sliced_wasserstein(a + v, a, 200, seed=4) == pytest.approx(expected, rel=1e-12, abs=0)
    # E|u_1| for u uniform on the sphere in D = 18 dimensions: Gamma(9) / (sqrt(pi) Gamma(9.5))
    mean_abs = math.exp(math.lgamma(9) - math.lgamma(9.5)) / math.sqrt(math.pi)
    assert expected == pytest.approx(float(v.norm()) * mean_abs, rel=0.1)


def test_equal_sets_are_at_distance_zero_and_extra_samples_are_ignored() -> None:
    x = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    assert sliced_wasserstein(x, x.clone(), 64) == 0.0
    assert sliced_wasserstein(x, x.flip(0), 64) == 0.0  # the same set in another order
    assert sliced_wasserstein(x, torch.cat([x, x + 5]), 64) == 0.0  # equal counts: b's first 40 only


def test_the_distance_of_a_checkpoint_is_the_one_training_logged(finished: tuple[Path, list[dict]]) -> None:
    run_dir, rows = finished
    logged = [r["sliced_wasserstein"] for r in rows if r.get("event") == "distance"]
    assert len(logged) == 2 and logged[0] != logged[1]  # untrained at step 0, trained at step 12
    ckpt = list_checkpoints(run_dir)[-1]
    result = invoke("eval", run_dir, "--metric", "sliced-wasserstein", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["value"] == logged[1]  # the same samples, data and projections: the same number, exactly
    assert {k: out[k] for k in ("metric", "checkpoint", "checkpoint_sha256", "step", "num_samples", "seed",
                                "data_seed", "num_projections", "steps", "sigmas", "weights", "data")} == {
        "metric": "sliced-wasserstein", "checkpoint": str(ckpt), "checkpoint_sha256": file_digest(ckpt), "step": 12,
        "num_samples": 32, "seed": 10_000_000, "data_seed": 12345, "num_projections": 16, "steps": 1,
        "sigmas": [80.0], "weights": "eval-ema", "data": "synthetic (256 images, run.seed 0)"}

    plain = invoke("eval", ckpt, "--metric", "sliced-wasserstein")
    assert plain.exit_code == 0, plain.output
    assert plain.stdout == (f"sliced Wasserstein distance to the training data: {logged[1]:.4f} (32 1-step samples, "
                            f"seeds 10000000..10000031, 16 projections; {ckpt} at step 12)\n")


def test_the_distance_takes_other_seeds_counts_and_steps(finished: tuple[Path, list[dict]]) -> None:
    run_dir, rows = finished
    out = json.loads(invoke("eval", run_dir, "--metric", "sliced-wasserstein", "--json", "-n", "8", "--seed", "5",
                            "--steps", "2").stdout)
    assert (out["num_samples"], out["seed"], out["steps"], out["sigmas"]) == (8, 5, 2, [80.0, 0.821])
    assert np.isfinite(out["value"]) and out["value"] > 0
    assert out["value"] not in [r["sliced_wasserstein"] for r in rows if r.get("event") == "distance"]


def test_the_distance_reads_the_recipes_hdf5_file(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (40, 3, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    data = tmp_path / "d.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("images", data=images.numpy())
    run_dir, rows = trained(tmp_path, data={"source": "hdf5", "path": str(data), "resolution": 4},
                            training={"total_steps": 4, "checkpoint_every": 4, "sample_every": 4})
    out = json.loads(invoke("eval", run_dir, "--metric", "sliced-wasserstein", "--json").stdout)
    assert out["data"] == str(data)
    assert out["value"] == [r["sliced_wasserstein"] for r in rows if r.get("event") == "distance"][-1]


@pytest.mark.parametrize(("extra", "message"), [
    (["--ref", "r.npz"], "--ref is for --metric fid; --metric sliced-wasserstein compares the samples with the "
                         "recipe's training data and needs no file: drop --ref"),
    (["--inception", "w.pth"], "--inception is for --metric fid; --metric sliced-wasserstein compares the samples "
                               "with the recipe's training data and needs no file: drop --inception"),
    (["--ref-protocol", "tensorflow"], "--ref-protocol is for --metric fid; --metric sliced-wasserstein compares "
                                       "the samples with the recipe's training data and needs no file: drop "
                                       "--ref-protocol"),
    (["-n", "100001"], "--num-samples for the sliced Wasserstein distance must be 1 to 100,000 (the range of "
                       "evaluation.num_samples), got 100,001"),
])
def test_distance_requests_that_cannot_work_are_one_line_and_exit_2(finished: tuple[Path, list[dict]],
                                                                    extra: list[str], message: str) -> None:
    result = invoke("eval", finished[0], "--metric", "sliced-wasserstein", *extra)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"error: {message}\n"


# ------------------------------------------------------------------------------------------- FID side


def test_without_weights_fid_says_so_and_suggests_the_distance(finished: tuple[Path, list[dict]],
                                                               tmp_path: Path) -> None:
    run_dir = finished[0]
    missing = tmp_path / "nowhere.pth"
    (tmp_path / "r.npz").write_bytes(b"")  # present: the weights are all that is missing (never read)
    result = invoke("eval", run_dir, "--ref", tmp_path / "r.npz", "--inception", missing)
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"error: Inception weights file {str(missing)!r} (--inception) not found.")
    assert lines[-1] == (f"or score the checkpoint without any weights file: ctcore eval {run_dir} --metric "
                         f"sliced-wasserstein")
    no_ref = invoke("eval", run_dir, "--inception", tmp_path / "r.npz")  # weights present: only --ref is missing
    assert no_ref.exit_code == 2 and no_ref.stderr == (
        "error: --metric fid needs --ref STATS.npz, reference statistics of the training data (make them with "
        "`ctcore eval-ref-stats DATASET.h5 OUT.npz`); --metric sliced-wasserstein needs no file\n")


def test_fid_lists_every_missing_input_at_once(finished: tuple[Path, list[dict]], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CTCORE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    before = tree_state(tmp_path)
    result = invoke("eval", "runs/quickstrat")  # no checkpoint, no --ref, no weights: all three, exit 2
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == ("error: ctcore eval --metric fid is missing 3 inputs:\n"
                             "  checkpoint 'runs/quickstrat' not found (did you mean 'runs/quickstart'?)\n"
                             f"  {NO_REF}\n" + cache_lacks_the_weights(tmp_path / "cache"))
    run_dir = finished[0]
    result = invoke("eval", run_dir, "--ref", "refs/cifar10.npz")  # the checkpoint exists: the distance is offered
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        "error: ctcore eval --metric fid is missing 2 inputs:\n"
        "  reference statistics 'refs/cifar10.npz' not found; compute them with `ctcore eval-ref-stats DATASET.h5 "
        "OUT.npz --inception PATH`, or give an .npz with `mu` and `sigma` from pytorch-fid or clean-fid\n"
        + cache_lacks_the_weights(tmp_path / "cache")
        + f"or score the checkpoint without any weights file: ctcore eval {run_dir} --metric sliced-wasserstein\n")
    result = invoke("eval-ref-stats", "data/cifar10-train.h5", "out.npz")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == ("error: ctcore eval-ref-stats is missing 2 inputs:\n"
                             "  dataset file 'data/cifar10-train.h5' not found; create one with: ctcore data import "
                             "SOURCE data/cifar10-train.h5\n" + cache_lacks_the_weights(tmp_path / "cache"))
    assert tree_state(tmp_path) == before


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> FIDInceptionV3:
    """An Inception on the meta device in place of the weights: the refusals come before any feature."""
    with torch.device("meta"):
        model = FIDInceptionV3()
    monkeypatch.setattr(ctcore.inception, "load_inception", lambda *args, **kwargs: model)
    monkeypatch.setattr(ctcore.inception, "missing_weights", lambda *args, **kwargs: None)
    return model


def _ref(path: Path, protocol: str | None) -> Path:
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "fid_protocol": protocol}
    return save_statistics(path, stats)


def test_statistics_of_another_protocol_are_refused_in_one_line(finished: tuple[Path, list[dict]], tmp_path: Path,
                                                                stand_in: FIDInceptionV3) -> None:
    run_dir = finished[0]
    torch_ref = _ref(tmp_path / "torch.npz", "pytorch-fid")
    result = invoke("eval", run_dir, "--ref", torch_ref, "-n", "2", "--no-progress")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"error: reference statistics {str(torch_ref)!r} were made under the pytorch-fid FID protocol, but this FID "
        f"uses the tensorflow protocol (another resize to 299x299: the features differ): recompute them with "
        f"`ctcore eval-ref-stats DATASET.h5 OUT.npz --fid-protocol tensorflow`, or choose --fid-protocol "
        f"pytorch-fid\n")
    tf_ref = _ref(tmp_path / "tf.npz", "tensorflow")
    result = invoke("eval", run_dir, "--ref", tf_ref, "-n", "2", "--fid-protocol", "pytorch-fid", "--no-progress")
    assert result.exit_code == 1 and "made under the tensorflow FID protocol, but this FID uses the pytorch-fid" \
        in result.stderr and result.stderr.endswith("or choose --fid-protocol tensorflow\n")

    old = _ref(tmp_path / "old.npz", None)  # as ctcore wrote them before recording the protocol
    assert "fid_protocol" not in np.load(old)
    result = invoke("eval", run_dir, "--ref", old, "-n", "2", "--no-progress")
    assert result.exit_code == 1 and result.stderr == (
        f"error: reference statistics {str(old)!r} record no FID protocol, so they are taken as pytorch-fid (how "
        f"ctcore made them before it recorded one, and how pytorch-fid makes its own), but this FID uses the "
        f"tensorflow protocol: if they were made under it (EDM's published files were made under tensorflow), "
        f"declare it with --ref-protocol tensorflow; otherwise recompute them with `ctcore eval-ref-stats DATASET.h5 "
        f"OUT.npz --fid-protocol tensorflow`, or choose --fid-protocol pytorch-fid\n")

    np.savez(tmp_path / "clean.npz", mu=np.zeros(2048), sigma=np.eye(2048), fid_protocol="clean")
    result = invoke("eval", run_dir, "--ref", tmp_path / "clean.npz", "-n", "2", "--no-progress")
    assert result.exit_code == 1 and result.stderr.startswith(
        f"error: reference statistics {str(tmp_path / 'clean.npz')!r} records the FID protocol 'clean', which "
        f"ctcore does not know (it knows tensorflow, pytorch-fid)")


def _edm_ref(path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Statistics as NVlabs/edm fid.py's `ref` command writes them: np.savez with float64 `mu` and `sigma` only."""
    mu = np.linspace(-1.0, 1.0, 2048)
    sigma = np.diag(np.linspace(0.5, 2.0, 2048))
    np.savez(path, mu=mu, sigma=sigma)
    return path, mu, sigma


def test_an_edm_reference_file_is_used_under_the_protocol_declared_for_it(
        finished: tuple[Path, list[dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EDM's files record no protocol; --ref-protocol tensorflow declares theirs, and its mu and sigma are the
    reference the distance gets."""
    from test_fid import RecordingDistance, randomised_inception

    weights = tmp_path / "w.pth"
    torch.save(randomised_inception().state_dict(), weights)
    edm, mu, sigma = _edm_ref(tmp_path / "cifar10-32x32.npz")
    distance = RecordingDistance()
    monkeypatch.setattr(ctcore.fid, "frechet_distance", distance)
    result = invoke("eval", finished[0], "--ref", edm, "--ref-protocol", "tensorflow", "--inception", weights,
                    "-n", "2", "--no-progress", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["fid"], out["fid_protocol"]) == (12.5, "tensorflow")
    [(_, _, ref_mu, ref_sigma)] = distance.calls
    assert np.array_equal(ref_mu, mu) and np.array_equal(ref_sigma, sigma)


def test_a_declared_protocol_never_overrides_one_the_file_records(finished: tuple[Path, list[dict]], tmp_path: Path,
                                                                  stand_in: FIDInceptionV3) -> None:
    tf_ref = _ref(tmp_path / "tf.npz", "tensorflow")
    result = invoke("eval", finished[0], "--ref", tf_ref, "--ref-protocol", "pytorch-fid", "--fid-protocol",
                    "pytorch-fid", "-n", "2", "--no-progress")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"error: reference statistics {str(tf_ref)!r} record the tensorflow FID protocol, but --ref-protocol "
        f"pytorch-fid declares another; --ref-protocol pytorch-fid is for files that record none (such as EDM's): "
        f"drop it\n")
    edm = _edm_ref(tmp_path / "edm.npz")[0]  # declared pytorch-fid, compared under tensorflow: the usual refusal
    result = invoke("eval", finished[0], "--ref", edm, "--ref-protocol", "pytorch-fid", "-n", "2", "--no-progress")
    assert result.exit_code == 1 and result.stderr.startswith(
        f"error: reference statistics {str(edm)!r} were made under the pytorch-fid FID protocol, but this FID uses "
        f"the tensorflow protocol")


def test_the_recipe_declares_the_protocol_of_its_fid_reference(tmp_path: Path) -> None:
    """evaluation.fid_reference_protocol does for training what --ref-protocol does for eval."""
    from ctcore.fid import load_fid_tools

    weights = tmp_path / "w.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    edm = _edm_ref(tmp_path / "edm.npz")[0]
    registry = ctcore.load_registry()

    def tools(ref: Path, declared: str | None) -> tuple[FIDInceptionV3, dict]:
        extra = {} if declared is None else {"fid_reference_protocol": declared}
        recipe = ctcore.read_recipe(write_tiny_recipe(
            tmp_path / "r.toml", tmp_path / f"run-{ref.stem}-{declared}",
            evaluation={"fid_every": 6, "inception": str(weights), "fid_reference": str(ref), **extra}), registry)
        run = start_run(recipe, registry)
        try:
            return load_fid_tools(run)
        finally:
            run.close()

    assert tools(edm, "tensorflow")[1]["fid_protocol"] == "tensorflow"
    with pytest.raises(RunError) as info:
        tools(edm, None)
    assert "declare it with evaluation.fid_reference_protocol = \"tensorflow\"; otherwise" in info.value.message
    with pytest.raises(RunError) as info:
        tools(_ref(tmp_path / "torch.npz", "pytorch-fid"), "tensorflow")
    assert info.value.message == (
        f"reference statistics {str(tmp_path / 'torch.npz')!r} record the pytorch-fid FID protocol, but "
        f"evaluation.fid_reference_protocol = \"tensorflow\" declares another; evaluation.fid_reference_protocol = "
        f"\"tensorflow\" is for files that record none (such as EDM's): drop it")


def test_fid_results_record_the_protocol_and_the_split(finished: tuple[Path, list[dict]], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Old statistics (no protocol) still serve under --fid-protocol pytorch-fid; the JSON says what was done."""
    from test_fid import RecordingDistance, randomised_inception

    weights = tmp_path / "w.pth"
    torch.save(randomised_inception().state_dict(), weights)
    monkeypatch.setattr(ctcore.fid, "frechet_distance", RecordingDistance())
    result = invoke("eval", finished[0], "--ref", _ref(tmp_path / "old.npz", None), "--inception", weights, "-n", "2",
                    "--fid-protocol", "pytorch-fid", "--is-split", "shuffled", "--is-split-seed", "7",
                    "--no-progress", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["metric"], out["value"], out["fid"], out["fid_protocol"]) == ("fid", 12.5, 12.5, "pytorch-fid")
    assert (out["inception_score_split"], out["inception_score_split_seed"], out["step"]) == ("shuffled", 7, 12)


def test_training_refuses_a_reference_of_another_protocol_before_it_starts(tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    ref = _ref(tmp_path / "ref.npz", "tensorflow")
    registry = ctcore.load_registry()
    recipe = ctcore.read_recipe(write_tiny_recipe(
        tmp_path / "r.toml", tmp_path / "run",
        evaluation={"fid_every": 6, "inception": str(weights), "fid_reference": str(ref),
                    "fid_protocol": "pytorch-fid", "distance": "none"}), registry)
    run = start_run(recipe, registry)
    with pytest.raises(RunError) as info:
        train(run, progress=False)
    run.close()
    assert info.value.message.endswith('or choose evaluation.fid_protocol = "tensorflow"')
    assert "made under the tensorflow FID protocol, but this FID uses the pytorch-fid protocol" in info.value.message
    assert list_checkpoints(run.out_dir) == []


def test_eval_ref_stats_records_the_protocol_it_used(tmp_path: Path) -> None:
    from test_fid import randomised_inception

    weights = tmp_path / "w.pth"
    torch.save(randomised_inception().state_dict(), weights)
    data = tmp_path / "d.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("images", data=np.random.default_rng(0).integers(0, 256, (3, 3, 4, 4), dtype=np.uint8))
    outputs = {}
    for protocol in ("tensorflow", "pytorch-fid"):
        out = tmp_path / f"{protocol}.npz"
        extra = [] if protocol == "tensorflow" else ["--fid-protocol", protocol]  # tensorflow is the default
        extra += ["--json"] if extra else []  # the pytorch-fid one as JSON
        result = invoke("eval-ref-stats", data, out, "--inception", weights, "--device", "cpu", "--no-progress",
                        *extra)
        assert (result.exit_code, result.stderr) == (0, ""), result.output
        assert result.stdout == (f"wrote the Inception statistics of 3 images of {data} to {out} (FID protocol "
                                 f"{protocol})\n" if not extra else json.dumps(
                                     {"out": str(out), "dataset": str(data), "num_images": 3, "fid_protocol": protocol},
                                     indent=2) + "\n")
        with np.load(out, allow_pickle=False) as f:
            assert str(f["fid_protocol"]) == protocol
            outputs[protocol] = f["mu"]
    assert not np.allclose(outputs["tensorflow"], outputs["pytorch-fid"], rtol=1e-3)


def test_eval_ref_stats_writes_edm_format_that_edm_fid_reads(tmp_path: Path) -> None:
    """--format edm: exactly EDM's two float64 arrays, loaded as NVlabs/edm fid.py loads a reference
    (`dict(np.load(f))` of an open file), equal to the statistics ctcore's own format holds."""
    from test_fid import randomised_inception

    weights = tmp_path / "w.pth"
    torch.save(randomised_inception().state_dict(), weights)
    data = tmp_path / "d.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("images", data=np.random.default_rng(1).integers(0, 256, (3, 3, 4, 4), dtype=np.uint8))
    common = [data, "--inception", weights, "--device", "cpu", "--no-progress"]
    edm_out, own_out = tmp_path / "edm.npz", tmp_path / "own.npz"
    result = invoke("eval-ref-stats", *common[:1], edm_out, *common[1:], "--format", "edm")
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert result.stdout == (f"wrote the Inception statistics of 3 images of {data} to {edm_out} (FID protocol "
                             f"tensorflow; EDM's format, which records no protocol: read it with --ref-protocol "
                             f"tensorflow)\n")
    assert invoke("eval-ref-stats", *common[:1], own_out, *common[1:]).exit_code == 0
    with open(edm_out, "rb") as f:
        ref = dict(np.load(f))
    assert sorted(ref) == ["mu", "sigma"]
    assert (ref["mu"].dtype, ref["mu"].shape, ref["sigma"].dtype, ref["sigma"].shape) == (
        np.float64, (2048,), np.float64, (2048, 2048))
    with np.load(own_out) as own:
        assert np.array_equal(ref["mu"], own["mu"]) and np.array_equal(ref["sigma"], own["sigma"])
    assert ctcore.fid.load_statistics(edm_out, "tensorflow")["fid_protocol"] == "tensorflow"
    refused = tmp_path / "torch.npz"
    result = invoke("eval-ref-stats", *common[:1], refused, *common[1:], "--format", "edm", "--fid-protocol",
                    "pytorch-fid")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == ("error: --format edm writes statistics to compare with EDM's, which are made under the "
                             "tensorflow FID protocol, not pytorch-fid: drop --fid-protocol, or drop --format edm\n")
    assert not refused.exists()
