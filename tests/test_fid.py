"""FID and Inception Score: the Fréchet distance, the Inception Score, running statistics, the FID Inception and
its weights file (load, errors, download), statistics files, and `evaluate_checkpoint` end to end on CPU.

No real Inception weights are used: the network is checked with random weights saved under the standard keys.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import write_tiny_recipe
from torch import nn

import ctcore
import ctcore.fid
import ctcore.inception as inception_mod
from ctcore.errors import RunError, UsageError
from ctcore.fid import (
    FeatureAccumulator,
    evaluate_checkpoint,
    feature_statistics,
    frechet_distance,
    inception_outputs,
    inception_score,
    load_statistics,
    reference_statistics,
    save_statistics,
)
from ctcore.inception import FIDInceptionV3, download_weights, load_inception, prepare_images, resize_bilinear_tf

# ---------------------------------------------------------------------------------------- Fréchet distance


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((s1 s2)^(1/2)) independently of scipy: the eigenvalues of s1^(1/2) s2 s1^(1/2) (symmetric PSD)."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def random_covariance(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
    return np.cov(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)), rowvar=False)


def test_the_distance_of_a_set_to_itself_is_zero() -> None:
    rng = np.random.default_rng(0)
    mu, sigma = feature_statistics(rng.standard_normal((500, 32)) * 3 + 1)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_diagonal_gaussians_match_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    v1, v2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_full_covariances_match_an_eigendecomposition() -> None:
    rng = np.random.default_rng(2)
    s1, s2 = random_covariance(rng, 24, 200), random_covariance(rng, 24, 200)
    mu1, mu2 = rng.standard_normal(24), rng.standard_normal(24)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_rank_deficient_covariances_give_a_finite_distance() -> None:
    """Fewer samples than dimensions, as with a few hundred samples of 2048-d features."""
    rng = np.random.default_rng(3)
    s = np.cov(rng.standard_normal((4, 12)), rowvar=False)  # rank 3 of 12; s @ s is singular
    mu = rng.standard_normal(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        same = frechet_distance(mu, s, mu, s)
        other = frechet_distance(mu, s, mu + 1, np.eye(12))
    assert np.isfinite(same) and abs(same) < 1e-4
    expected = 12 + np.trace(s) + 12 - 2 * trace_sqrt_product(s, np.eye(12))
    assert other == pytest.approx(expected, rel=1e-5)


def test_a_non_finite_root_retries_with_eps_on_both_diagonals(monkeypatch: pytest.MonkeyPatch) -> None:
    from scipy import linalg

    real_sqrtm, calls = linalg.sqrtm, []

    def flaky(a: np.ndarray, *args, **kwargs) -> np.ndarray:
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(linalg, "sqrtm", flaky)
    rng = np.random.default_rng(4)
    s1, s2 = random_covariance(rng, 8, 50), random_covariance(rng, 8, 50)
    with pytest.warns(RuntimeWarning, match="singular; adding 0.001 to the diagonals"):
        value = frechet_distance(np.zeros(8), s1, np.zeros(8), s2, eps=1e-3)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(8)) @ (s2 + 1e-3 * np.eye(8)))
    assert np.isfinite(value)


def test_a_large_imaginary_component_raises() -> None:
    """A 'covariance' with negative eigenvalues has no real root: (I @ -I)^(1/2) = i I."""
    with pytest.raises(ValueError, match="imaginary component of 1"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))


def test_mismatched_statistics_are_rejected() -> None:
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------- Inception Score


def test_uniform_logits_score_one() -> None:
    mean, std = inception_score(torch.zeros(40, 1008), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_confident_distinct_classes_score_the_number_of_classes_per_split() -> None:
    labels = torch.cat([torch.arange(10), torch.arange(100, 110), torch.arange(500, 510)])
    logits = torch.zeros(30, 1008)
    logits[torch.arange(30), labels] = 60.0
    mean, std = inception_score(logits, splits=3)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-8)
    assert inception_score(logits.numpy(), splits=1)[0] == pytest.approx(30.0, rel=1e-9)


def confident(labels: list[int]) -> torch.Tensor:
    """Logits that put all probability on `labels` (one per sample)."""
    logits = torch.zeros(len(labels), 1008)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = 60.0
    return logits


def score_by_hand(parts: list[list[int]]) -> tuple[float, float]:
    """IS of confident splits from its definition: p(y|x) one-hot, so mean KL(p(y|x) || p(y)) is the entropy of the
    split's label frequencies, and each split scores exp(entropy); mean and population std over the splits."""
    scores = []
    for part in parts:
        freq = np.bincount(part) / len(part)
        freq = freq[freq > 0]
        scores.append(float(np.exp(-(freq * np.log(freq)).sum())))
    return float(np.mean(scores)), float(np.std(scores))


def test_ordered_splits_cut_the_samples_in_their_order() -> None:
    labels = [0, 0, 0, 0, 1, 1, 1, 2]
    mean, std = inception_score(confident(labels), splits=2)  # the default: "ordered", what ctcore always did
    assert (mean, std) == pytest.approx(score_by_hand([[0, 0, 0, 0], [1, 1, 1, 2]]), rel=1e-9)
    assert inception_score(confident(labels), splits=2, split="ordered") == (mean, std)


def test_shuffled_splits_follow_numpys_permutation_of_the_seed() -> None:
    """torch-fidelity's default: rows reordered by numpy.random.RandomState(2020).permutation(N), then cut."""
    labels = [0, 0, 0, 0, 1, 1, 1, 2]
    order = np.random.RandomState(2020).permutation(8)
    shuffled = [labels[i] for i in order]
    expected = score_by_hand([shuffled[:4], shuffled[4:]])
    assert inception_score(confident(labels), splits=2, split="shuffled") == pytest.approx(expected, rel=1e-9)
    assert expected != pytest.approx(score_by_hand([labels[:4], labels[4:]]))  # the two protocols differ here
    order7 = np.random.RandomState(7).permutation(8)
    other = [labels[i] for i in order7]
    assert inception_score(confident(labels), splits=2, split="shuffled", seed=7) == pytest.approx(
        score_by_hand([other[:4], other[4:]]), rel=1e-9)
    with pytest.raises(ValueError, match="split must be one of ordered, shuffled, got 'random'"):
        inception_score(confident(labels), splits=2, split="random")


def test_more_splits_than_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least"):
        inception_score(torch.zeros(3, 1008), splits=10)


# ---------------------------------------------------------------------------------- running statistics


def test_the_accumulator_matches_numpy_across_batches() -> None:
    rng = np.random.default_rng(5)
    features = rng.standard_normal((23, 16)) @ rng.standard_normal((16, 16)) + 1000.0  # large mean: shifted sums
    logits = rng.standard_normal((23, 1008)).astype(np.float32)
    acc = FeatureAccumulator(16)
    for a, b in ((0, 5), (5, 12), (12, 23)):
        acc.update(torch.from_numpy(features[a:b]), torch.from_numpy(logits[a:b]))
    mu, sigma = acc.statistics()
    assert acc.count == 23 and mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False, ddof=1), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(feature_statistics(features)[1], np.cov(features, rowvar=False))
    assert torch.equal(acc.logits(), torch.from_numpy(logits))
    assert acc.inception_score(splits=1) == inception_score(logits, splits=1)


def test_the_accumulator_needs_two_samples() -> None:
    acc = FeatureAccumulator(4)
    acc.update(torch.ones(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        acc.statistics()


# ------------------------------------------------------------------------------------- the Inception network


def randomised_inception(seed: int = 0) -> FIDInceptionV3:
    """Random weights that keep activations O(1) through the ~100 layers (He-normal convs, BN near identity)."""
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.8, 1.2)
            m.bias.data.uniform_(-0.1, 0.1)
    nn.init.normal_(model.fc.weight, std=0.05)
    nn.init.normal_(model.fc.bias, std=0.5)
    return model


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / inception_mod.WEIGHTS_FILENAME
    torch.save(randomised_inception().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(weights_file: Path) -> FIDInceptionV3:
    return load_inception(weights_file)


def test_standard_keys_load_strictly_and_give_features_and_logits(weights_file: Path,
                                                                   inception: FIDInceptionV3) -> None:
    saved = torch.load(weights_file, weights_only=True)
    loaded = inception.state_dict()
    assert list(loaded) == list(saved) and len(saved) == 566
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch_pool.bn.running_var",
                "Mixed_6e.branch7x7dbl_5.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.bias", "fc.weight", "fc.bias"):
        assert key in saved
    assert saved["fc.weight"].shape == (1008, 2048)
    assert not inception.training and not any(p.requires_grad for p in inception.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    features, logits = inception(x)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all() and features.std() > 1e-3
    # logits are pool3 @ fc.weight.T without the bias (the Inception Score convention)
    torch.testing.assert_close(logits, features @ inception.fc.weight.T)


# ------------------------------------------------------------------------------------ the FID protocols


def test_the_tensorflow_resize_of_2x2_to_3x3_by_hand() -> None:
    """Source coordinate i * 2/3 (no half-pixel offset): 0, 2/3, 4/3; the last reads the edge pixel (upper index
    clamped to 1). Rows first: top = a + (b - a) w; then between the rows."""
    a, b, c, d = 10.0, 40.0, 100.0, 250.0
    got = resize_bilinear_tf(torch.tensor([[[[a, b], [c, d]]]]), 3)[0, 0]
    w = 2 / 3
    top = [a, a + (b - a) * w, b]
    bottom = [c, c + (d - c) * w, d]
    middle = [t + (u - t) * w for t, u in zip(top, bottom, strict=True)]
    torch.testing.assert_close(got, torch.tensor([top, middle, bottom]), rtol=1e-6, atol=0)
    # and bit for bit as TensorFlow's float32 kernel: scale = 2 / 3 in float32, s = i * scale, w = s - floor(s)
    f32 = np.float32
    w32 = f32(1) * (f32(2) / f32(3)) - f32(0)
    top32 = [f32(a), f32(a) + (f32(b) - f32(a)) * w32, f32(b)]
    bottom32 = [f32(c), f32(c) + (f32(d) - f32(c)) * w32, f32(d)]
    middle32 = [t + (u - t) * w32 for t, u in zip(top32, bottom32, strict=True)]
    assert got.numpy().tolist() == np.array([top32, middle32, bottom32], dtype=np.float32).tolist()
    # pytorch-fid's half-pixel centres read coordinates -1/6 (clamped to 0), 1/2, 7/6: another image
    half = F.interpolate(torch.tensor([[[[a, b], [c, d]]]]), size=(3, 3), mode="bilinear", align_corners=False)[0, 0]
    assert half[0].tolist() == pytest.approx([a, (a + b) / 2, b]) and half[0, 1] != pytest.approx(got[0, 1])


def test_the_tensorflow_resize_of_32_to_299_at_spot_values() -> None:
    """A row of 32 values k^2 (varying along one axis, constant along the other), read at i * 32 / 299."""
    v = torch.arange(32, dtype=torch.float32) ** 2
    wide = resize_bilinear_tf(v.expand(1, 1, 32, 32).contiguous())[0, 0]
    tall = resize_bilinear_tf(v[:, None].expand(1, 1, 32, 32).contiguous())[0, 0]
    assert wide.shape == tall.shape == (299, 299)
    for i in (0, 1, 150, 280, 298):
        s = i * 32 / 299
        f = int(s)
        expected = f**2 + ((min(f + 1, 31)) ** 2 - f**2) * (s - f)
        assert float(wide[7, i]) == pytest.approx(expected, rel=1e-6, abs=1e-5)
        assert float(tall[i, 7]) == pytest.approx(expected, rel=1e-6, abs=1e-5)
    assert float(wide[0, 150]) == pytest.approx(256 + 33 * (150 * 32 / 299 - 16), rel=1e-6)  # 257.766
    assert float(wide[0, 298]) == 961.0  # 31.89 reads pixel 31 alone (the upper index is clamped)
    half = F.interpolate(v.expand(1, 1, 32, 32).contiguous(), size=(299, 299), mode="bilinear", align_corners=False)
    assert float(half[0, 0, 0, 150]) == pytest.approx(225 + 31 * (150.5 * 32 / 299 - 0.5 - 15), rel=1e-6)  # 243.8
    same = torch.rand(1, 3, 299, 299) * 255
    assert torch.equal(resize_bilinear_tf(same), same)  # at 299 the resize is the identity


def test_each_protocol_feeds_the_network_its_own_inputs(inception: FIDInceptionV3) -> None:
    """pytorch-fid: x / 127.5 - 1 resized with half-pixel centres inside the network, exactly as before protocols
    existed; tensorflow: the TF resize on [0, 255], then (x - 128) / 128."""
    images = torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    f_torch, l_torch = inception_outputs(inception, images, protocol="pytorch-fid")
    f_old, l_old = inception(images.float() / 127.5 - 1.0)
    assert torch.equal(f_torch, f_old) and torch.equal(l_torch, l_old)
    f_tf, _ = inception_outputs(inception, images)  # the default
    assert torch.equal(f_tf, inception((resize_bilinear_tf(images.float()) - 128) / 128)[0])
    assert not torch.allclose(f_tf, f_torch, rtol=1e-3)
    assert torch.equal(prepare_images(images, "pytorch-fid"), images.float() / 127.5 - 1.0)
    with pytest.raises(ValueError, match="unknown FID protocol 'clean'; one of: tensorflow, pytorch-fid"):
        prepare_images(images, "clean")


def test_statistics_files_record_their_protocol(dataset: Path, inception: FIDInceptionV3, tmp_path: Path) -> None:
    stats = reference_statistics(dataset, inception, batch_size=6, device="cpu", progress=False,
                                 protocol="pytorch-fid")
    assert stats["fid_protocol"] == "pytorch-fid"
    path = save_statistics(tmp_path / "ref.npz", stats)
    with np.load(path, allow_pickle=False) as f:  # a plain string array: no pickle needed
        assert sorted(f.keys()) == ["fid_protocol", "mu", "num_images", "sigma"] and str(f["fid_protocol"]) \
            == "pytorch-fid"
    assert load_statistics(path)["fid_protocol"] == "pytorch-fid"
    np.savez(tmp_path / "foreign.npz", mu=stats["mu"], sigma=stats["sigma"])
    assert load_statistics(tmp_path / "foreign.npz")["fid_protocol"] is None
    with pytest.raises(ValueError, match="unknown FID protocol 'clean'"):
        save_statistics(tmp_path / "x.npz", {**stats, "fid_protocol": "clean"})


def test_grey_images_are_repeated_to_rgb(inception: FIDInceptionV3) -> None:
    grey = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)
    f_grey, _ = inception_outputs(inception, grey)
    f_rgb, _ = inception_outputs(inception, grey.expand(-1, 3, -1, -1).contiguous())
    torch.testing.assert_close(f_grey, f_rgb)


def test_old_files_without_batch_counters_still_load(tmp_path: Path) -> None:
    state = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    assert isinstance(load_inception(tmp_path / "old.pth"), FIDInceptionV3)


def test_a_missing_weights_file_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(RunError) as info:
        load_inception(tmp_path / "nowhere.pth")
    msg = info.value.message
    assert "nowhere.pth" in msg and inception_mod.FID_WEIGHTS_URL in msg and "--inception" in msg
    with pytest.raises(RunError) as info:
        load_inception(None, cache_dir=tmp_path / "cache")
    msg = info.value.message
    expected = str(tmp_path / "cache" / "pt_inception-2015-12-05-6726825d.pth")
    assert expected in msg and inception_mod.FID_WEIGHTS_URL in msg
    assert "--inception PATH" in msg and "--download-inception" in msg and "curl -L -o" in msg


def test_the_cache_folder_follows_ctcore_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTCORE_CACHE", str(tmp_path / "c"))
    with pytest.raises(RunError, match=str(tmp_path / "c" / inception_mod.WEIGHTS_FILENAME)):
        load_inception(None)
    monkeypatch.delenv("CTCORE_CACHE")
    assert inception_mod.cache_dir_path() == Path.home() / ".cache" / "ctcore"


class NotWeights:
    """Any pickled object: `weights_only=True` refuses to build it."""


@pytest.mark.parametrize("kind", ["garbage", "truncated", "pickled-object"])
def test_a_corrupt_weights_file_is_one_clear_error(tmp_path: Path, weights_file: Path, kind: str) -> None:
    bad = tmp_path / "bad.pth"
    if kind == "garbage":
        bad.write_bytes(b"not a checkpoint at all" * 10)
    elif kind == "truncated":
        bad.write_bytes(weights_file.read_bytes()[: 1 << 20])
    else:
        torch.save({"x": NotWeights()}, bad)
    with pytest.raises(RunError) as info:
        load_inception(bad)
    msg = info.value.message
    assert "corrupt or not a PyTorch state dict" in msg and str(bad) in msg and inception_mod.FID_WEIGHTS_URL in msg


def test_wrong_keys_or_shapes_name_the_problem(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(RunError, match=r"missing: Conv2d_1a_3x3.conv.weight, .* and \d+ more; unexpected: conv.weight"):
        load_inception(tmp_path / "other.pth")
    state = FIDInceptionV3().state_dict()
    state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / "imagenet1000.pth")
    with pytest.raises(RunError, match=r"wrong shape: fc.weight \(1000, 2048\) \(expected \(1008, 2048\)\)"):
        load_inception(tmp_path / "imagenet1000.pth")


# ------------------------------------------------------------------------------------------------ download


def test_download_checks_the_sha256(file_server: tuple[str, Path], tmp_path: Path) -> None:
    url, folder = file_server
    payload = bytes(range(256)) * 4096
    (folder / "w.pth").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "cache" / "w.pth"
    assert download_weights(dest, url=f"{url}/w.pth", sha256=digest[:8]) == dest
    assert dest.read_bytes() == payload
    assert download_weights(tmp_path / "full.pth", url=f"{url}/w.pth", sha256=digest).is_file()

    wrong = tmp_path / "wrong" / "w.pth"
    with pytest.raises(RunError, match=f"has sha256 {digest}, but 6726825d... was expected"):
        download_weights(wrong, url=f"{url}/w.pth")
    assert list(wrong.parent.iterdir()) == []  # nothing saved, no partial file
    with pytest.raises(RunError, match=r"could not download .*\(HTTPError: HTTP Error 404"):
        download_weights(tmp_path / "x.pth", url=f"{url}/absent.pth")


def test_load_inception_downloads_into_the_cache_only_when_asked(
    file_server: tuple[str, Path], weights_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, folder = file_server
    (folder / weights_file.name).write_bytes(weights_file.read_bytes())
    monkeypatch.setattr(inception_mod, "FID_WEIGHTS_URL", f"{url}/{weights_file.name}")
    monkeypatch.setattr(inception_mod, "WEIGHTS_SHA256", hashlib.sha256(weights_file.read_bytes()).hexdigest())
    cache = tmp_path / "cache"
    with pytest.raises(RunError, match="not found in the cache"):
        load_inception(None, cache_dir=cache)
    model = load_inception(None, download=True, cache_dir=cache)
    assert (cache / inception_mod.WEIGHTS_FILENAME).read_bytes() == weights_file.read_bytes()
    assert torch.equal(model.fc.bias, torch.load(weights_file, weights_only=True)["fc.bias"])


# ------------------------------------------------------------------------------------------ statistics files


def test_statistics_round_trip_and_plain_numpy_files_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    mu, sigma = feature_statistics(rng.standard_normal((40, 8)))
    path = save_statistics(tmp_path / "ref.npz", {"mu": mu, "sigma": sigma, "num_images": 40})
    back = load_statistics(path)
    assert np.array_equal(back["mu"], mu) and np.array_equal(back["sigma"], sigma) and back["num_images"] == 40
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]
    np.savez(tmp_path / "pytorch-fid.npz", mu=mu.astype(np.float32), sigma=sigma)
    other = load_statistics(tmp_path / "pytorch-fid.npz")
    assert other["num_images"] is None and other["mu"].dtype == np.float64
    np.testing.assert_allclose(other["mu"], mu, rtol=1e-6)


@pytest.mark.parametrize(("content", "message"), [
    (None, "not found; compute them with `ctcore eval-ref-stats"),
    (b"garbage", "cannot be read as .npz"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8)}, r"has no `mu` and `sigma` arrays \(found: arr_0\)"),
    ({"mu": np.zeros(3), "sigma": np.zeros((3, 4))}, r"`mu` must be \(D,\) and `sigma` \(D, D\)"),
    ({"mu": np.full(2, np.nan), "sigma": np.eye(2)}, "NaN or infinite"),
])
def test_bad_statistics_files_are_one_clear_error(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "ref.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.savez(path, **content)
    with pytest.raises(RunError, match=message):
        load_statistics(path)


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run (MLP on 3x4x4 synthetic images, 4 steps); its last checkpoint."""
    from ctcore.build import start_run
    from ctcore.checkpoints import list_checkpoints
    from ctcore.recipe import read_recipe
    from ctcore.registry import load_registry
    from ctcore.training import train

    root = tmp_path_factory.mktemp("fid-run")
    registry = load_registry()
    recipe = read_recipe(write_tiny_recipe(
        root / "tiny.toml", root / "run",
        training={"total_steps": 4, "checkpoint_every": 4, "sample_every": 4, "log_every": 2},
        evaluation={"distance": "none"},
    ), registry)
    run = start_run(recipe, registry)
    train(run, progress=False)
    return list_checkpoints(run.out_dir)[-1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fid-data") / "data.h5"
    images = torch.randint(0, 256, (6, 3, 4, 4), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images.numpy())
    return path


def test_reference_statistics_of_a_dataset_in_chunks(dataset: Path, inception: FIDInceptionV3,
                                                      tmp_path: Path) -> None:
    stats = reference_statistics(dataset, inception, batch_size=4, device="cpu", progress=False)
    assert stats["num_images"] == 6 and stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    with h5py.File(dataset) as f:
        images = torch.from_numpy(f["images"][...])
    features, _ = inception_outputs(inception, images)
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(stats["mu"], mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], sigma, rtol=1e-5, atol=1e-7)
    back = load_statistics(save_statistics(tmp_path / "ref.npz", stats))
    assert back["num_images"] == 6 and np.array_equal(back["sigma"], stats["sigma"])


class RecordingDistance:
    """Stands in for `ctcore.fid.frechet_distance` in pipeline tests: records what it is given, returns a sentinel.

    scipy's sqrtm of a 2048 x 2048 product takes 15-20 s on two CPU cores; the distance itself is tested above.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, ...]] = []

    def __call__(self, mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
        self.calls.append((mu1, sigma1, mu2, sigma2))
        return 12.5


def test_evaluate_checkpoint_end_to_end(checkpoint: Path, dataset: Path, inception: FIDInceptionV3,
                                        weights_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctcore.fid
    from ctcore.registry import load_registry
    from ctcore.sampling import read_sample_store, sample_from_checkpoint

    distance = RecordingDistance()
    monkeypatch.setattr(ctcore.fid, "frechet_distance", distance)
    registry = load_registry()
    ref = save_statistics(tmp_path / "ref.npz",
                          reference_statistics(dataset, inception, batch_size=6, device="cpu", progress=False))
    result = evaluate_checkpoint(checkpoint, registry, inception=weights_file, num_samples=6, steps=1, batch_size=4,
                                 ref_stats=ref, device="cpu", seed=3, progress=False)
    assert result["num_samples"] == 6 and result["steps"] == 1 and result["sigmas"] == [80.0]
    assert result["fid"] == 12.5 and len(distance.calls) == 1
    assert np.isfinite(result["inception_score"]) and result["inception_score"] >= 1.0
    assert np.isfinite(result["inception_score_std"])

    # statistics of the same images as `ctcore sample --seed 3` stores (eval-EMA weights, per-sample seeds,
    # batches of 4 + 2 here against one batch of 6 there)
    store = sample_from_checkpoint(checkpoint, registry, num_samples=6, steps=1, seed=3, out=tmp_path / "s.h5",
                                   device="cpu")["store"]
    images = read_sample_store(store)["images"]
    assert images.float().std() > 0  # not a constant image set
    features, logits = inception_outputs(inception, images)
    mu, sigma = feature_statistics(features)
    got_mu, got_sigma, ref_mu, ref_sigma = distance.calls[0]
    np.testing.assert_allclose(got_mu, mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_sigma, sigma, rtol=1e-4, atol=1e-6)
    ref_stats = load_statistics(ref)
    assert np.array_equal(ref_mu, ref_stats["mu"]) and np.array_equal(ref_sigma, ref_stats["sigma"])
    assert result["inception_score_splits"] == 1 and result["inception_score"] > 1.0
    assert result["inception_score"] == pytest.approx(inception_score(logits, splits=1)[0], rel=1e-5)
    assert "fewer than the 2048 feature dimensions" in result["notes"][0]


def test_two_steps_go_through_the_recipe_sigma_mid(checkpoint: Path, inception: FIDInceptionV3,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import ctcore.fid
    from ctcore.registry import load_registry

    monkeypatch.setattr(ctcore.fid, "frechet_distance", RecordingDistance())
    ref = {"mu": np.zeros(2048), "sigma": np.eye(2048)}
    result = evaluate_checkpoint(checkpoint, load_registry(), inception=inception, num_samples=2, steps=2,
                                 ref_stats=ref, device="cpu", progress=False)
    assert result["steps"] == 2 and result["sigmas"] == [80.0, 0.821] and result["fid"] == 12.5


def test_evaluate_checkpoint_rejects_bad_requests_before_sampling(checkpoint: Path, inception: FIDInceptionV3,
                                                                  tmp_path: Path) -> None:
    from ctcore.registry import load_registry

    registry = load_registry()
    ref64 = {"mu": np.zeros(64), "sigma": np.eye(64)}
    with pytest.raises(RunError, match="64-d features"):
        evaluate_checkpoint(checkpoint, registry, inception=inception, num_samples=4, ref_stats=ref64)
    ref = {"mu": np.zeros(2048), "sigma": np.eye(2048)}
    with pytest.raises(UsageError, match="at least 2"):
        evaluate_checkpoint(checkpoint, registry, inception=inception, num_samples=1, ref_stats=ref)
    with pytest.raises(UsageError, match="--steps 3: 3 steps need 2 intermediate sigmas"):
        evaluate_checkpoint(checkpoint, registry, inception=inception, num_samples=4, steps=3, ref_stats=ref)
    with pytest.raises(RunError, match="not found; compute them"):
        evaluate_checkpoint(checkpoint, registry, inception=inception, num_samples=4, ref_stats=tmp_path / "x.npz")
    with pytest.raises(RunError, match="Inception weights file"):
        evaluate_checkpoint(checkpoint, registry, inception=tmp_path / "none.pth", num_samples=4, ref_stats=ref)
    # -n 10^12: the seeds and logits are refused before a list of a trillion seeds is made
    with pytest.raises(UsageError, match=r"^evaluating 1,000,000,000,000 samples needs about 7.2 PiB of memory on "
                                         r"cpu \(logits 7.2 PiB, seeds 36.4 TiB, batch .*\) but .*; choose a smaller "
                                         r"--num-samples or --batch-size$"):
        evaluate_checkpoint(checkpoint, registry, inception=inception, num_samples=10**12, ref_stats=ref,
                            device="cpu")


# ------------------------------------------------------------------------------- FID during training


def test_training_logs_fid_every_n_steps_and_plots_it(tmp_path: Path, weights_file: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from helpers import write_tiny_recipe
    from PIL import Image

    from ctcore.build import start_run
    from ctcore.checkpoints import list_checkpoints
    from ctcore.training import train

    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048), fid_protocol="tensorflow")  # the recipe's default protocol
    calls: list[int] = []

    def distance(mu1, sigma1, mu2, sigma2, eps=1e-6):  # the real one takes ~20 s at 2048-d on 2 cores
        calls.append(mu1.shape[0])
        return 10.0 / len(calls)

    monkeypatch.setattr(ctcore.fid, "frechet_distance", distance)
    registry = ctcore.load_registry()
    recipe = ctcore.read_recipe(write_tiny_recipe(
        tmp_path / "r.toml", tmp_path / "run",
        evaluation={"fid_every": 6, "fid_num_samples": 2, "fid_batch_size": 2, "fid_steps": 2,
                    "inception": str(weights_file), "fid_reference": str(ref)}), registry)
    run = start_run(recipe, registry)
    train(run, progress=False)
    rows = [json.loads(line) for line in (run.out_dir / "stats.jsonl").read_text().splitlines()]
    fids = [r for r in rows if r.get("event") == "fid"]
    assert [(r["step"], r["fid"], r["num_samples"], r["steps"]) for r in fids] == [(6, 10.0, 2, 2), (12, 5.0, 2, 2)]
    assert all(np.isfinite(r["inception_score"]) for r in fids) and calls == [2048, 2048]
    assert all(r["fid_protocol"] == "tensorflow" and r["is_split"] == "ordered" for r in fids)
    with Image.open(run.out_dir / "fid.png") as im:
        assert im.format == "PNG"

    missing = ctcore.read_recipe(write_tiny_recipe(
        tmp_path / "m.toml", tmp_path / "missing",
        evaluation={"fid_every": 6, "inception": str(tmp_path / "nope.pth"), "fid_reference": str(ref)}), registry)
    run = start_run(missing, registry)
    with pytest.raises(RunError):
        train(run, progress=False)
    assert list_checkpoints(run.out_dir) == []  # it stops before training, not mid-run


def test_fid_options_are_cross_checked() -> None:
    from helpers import tiny_recipe_text

    from ctcore.recipe import parse_recipe

    with pytest.raises(ctcore.RecipeError) as info:
        parse_recipe(tiny_recipe_text("out", evaluation={"fid_every": 10, "fid_steps": 3}), ctcore.load_registry())
    assert info.value.problems == [
        "evaluation.inception: required when fid_every > 0 (the Inception-v3 FID weights file)",
        "evaluation.fid_reference: required when fid_every > 0 (reference statistics (.npz from `ctcore "
        "eval-ref-stats`))",
        "evaluation.fid_steps: sampler 'consistency' cannot make a 3-step plan: 3 steps need 2 intermediate sigmas "
        "but the recipe's sampling.sigma_mid has [0.821]",
    ]


@pytest.mark.slow
def test_the_whole_pipeline_with_the_real_frechet_distance(checkpoint: Path, dataset: Path, inception: FIDInceptionV3,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctcore eval` with a random-weight Inception, reference statistics from the dataset and the real Fréchet
    distance, taken on the first 256 of the 2048 features (the leading 256-d marginals of both Gaussians): the 2048-d
    statistics that reach it are checked in test_evaluate_checkpoint_end_to_end, and a 2048-d sqrtm of these singular
    covariances takes about 20 CPU-s, twice (the eps retry). The value matches an independent eigendecomposition."""
    import json

    from typer.testing import CliRunner

    from ctcore.cli import app

    real, given = frechet_distance, []

    def leading_256(mu1, sigma1, mu2, sigma2, eps=1e-6):
        given.append((mu1, sigma1, mu2, sigma2))
        return real(mu1[:256], sigma1[:256, :256], mu2[:256], sigma2[:256, :256], eps)

    monkeypatch.setattr(ctcore.fid, "frechet_distance", leading_256)
    ref = save_statistics(tmp_path / "ref.npz",
                          reference_statistics(dataset, inception, batch_size=6, device="cpu", progress=False))
    weights = tmp_path / inception_mod.WEIGHTS_FILENAME
    torch.save(inception.state_dict(), weights)
    result = CliRunner().invoke(app, ["eval", str(checkpoint), "--ref", str(ref), "--inception", str(weights),
                                      "-n", "4", "--batch-size", "4", "--device", "cpu", "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert np.isfinite(out["fid"]) and out["fid"] > 0 and out["num_samples"] == 4
    assert np.isfinite(out["inception_score"]) and out["inception_score"] >= 1.0
    [(mu1, s1, mu2, s2)] = given
    assert (mu1.shape, s1.shape, mu2.shape, s2.shape) == ((2048,), (2048, 2048), (2048,), (2048, 2048))
    assert np.array_equal(mu2, load_statistics(ref)["mu"])
    mu1, s1, mu2, s2 = mu1[:256], s1[:256, :256], mu2[:256], s2[:256, :256]
    assert np.linalg.matrix_rank(s1) == 3 and np.linalg.matrix_rank(s2) == 5  # 4 and 6 images: singular, as at 2048-d
    eps = 1e-6 * np.eye(256)  # a singular covariance product: frechet_distance takes the root again with eps added
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1 + eps, s2 + eps)
    assert out["fid"] == pytest.approx(expected, rel=0, abs=1e-9)  # measured: 8e-13 apart (the root term: 0.1)
