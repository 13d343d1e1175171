"""FID and Inception Score: Inception statistics, reference statistics files, and the evaluation of a checkpoint.

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to the 2048-d pool3 features of
the FID Inception (`ctcore.inception`) on generated samples and on data. Samples are drawn batch by batch with
per-sample seeds (as `ctcore sample` draws them), quantised to uint8 like stored images, and reduced on the fly
to running sums, so 50,000 samples never sit in memory. Reference statistics use the common `.npz` layout
(`mu`, `sigma`), so files written by pytorch-fid, clean-fid, EDM's fid.py or the guided-diffusion evaluator load too;
a file that records no FID protocol (EDM's, pytorch-fid's) has it declared by the caller (`load_statistics`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ctcore.distributed import SINGLE, World
from ctcore.errors import RunError, UsageError
from ctcore.inception import (
    DEFAULT_FID_PROTOCOL,
    FEATURE_DIM,
    FID_PROTOCOLS,
    NUM_LOGITS,
    UNRECORDED_FID_PROTOCOL,
    FIDInceptionV3,
    load_inception,
    prepare_images,
)

if TYPE_CHECKING:
    from ctcore.runstate import Run

# ------------------------------------------------------------------------------------------ the metrics


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    The matrix square root is scipy's `sqrtm` of sigma1 @ sigma2. When that product is singular (scipy warns)
    or the root is not finite, `eps` is added to the diagonal of both covariances and the root taken again.
    A root whose diagonal has an imaginary part above 1e-3 (the tolerance of the TTUR / pytorch-fid /
    guided-diffusion implementations) means the inputs are not valid covariances: ValueError. Otherwise the
    real part is used.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")

    def root(a: np.ndarray) -> tuple[np.ndarray, bool]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = linalg.sqrtm(a)
        singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
        return r, singular or not np.isfinite(r).all()

    covmean, bad = root(s1 @ s2)
    if bad:
        warnings.warn(f"Fréchet distance: the covariance product is singular; adding {eps} to the diagonals",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(d) * eps
        covmean, _ = root((s1 + offset) @ (s2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("Fréchet distance: the square root of the covariance product is not finite")
    if np.iscomplexobj(covmean):
        worst = float(np.abs(np.diagonal(covmean).imag).max())
        if worst > 1e-3:
            raise ValueError(f"Fréchet distance: the square root of the covariance product has an imaginary "
                             f"component of {worst:.3g} on its diagonal (are both sigmas covariance matrices?)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


IS_SPLITS = ("ordered", "shuffled")
"""How samples are cut into Inception Score splits: in sample order (ctcore's default, the original code's), or
after a seeded shuffle (torch-fidelity's default: numpy.random.RandomState(2020).permutation(N))."""
TORCH_FIDELITY_SEED = 2020


def inception_score(logits: Any, splits: int = 10, split: str = "ordered",
                    seed: int = TORCH_FIDELITY_SEED) -> tuple[float, float]:
    """Inception Score (mean, std over `splits` consecutive chunks) from Inception logits (N, C), in float64.

    All columns enter the softmax (the 1008 of the FID Inception), as in the original code (openai/improved-gan:
    pool_3 times the `softmax/logits/MatMul` weights, no bias, softmax over 1008) and in torch-fidelity
    (`logits_unbiased`): the 2015 graph's 8 extra outputs are part of its classifier, and keeping only the first
    1000 would renormalise the probabilities away from the code the published scores came from. Chunk k holds rows
    [k N / splits, (k + 1) N / splits) of the logits in their order (`split` "ordered") or after the rows are put in
    the order numpy.random.RandomState(seed).permutation(N) gives ("shuffled", torch-fidelity's default with its
    seed 2020); each chunk scores exp(mean KL(p(y|x) || p(y))). The std is the population std.
    """
    x = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits)
    x = x.detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"logits must be (N, classes), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"inception score: need at least `splits` = {splits} samples, got {n}")
    if split not in IS_SPLITS:
        raise ValueError(f"inception score: split must be one of {', '.join(IS_SPLITS)}, got {split!r}")
    if split == "shuffled":
        x = x[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    log_p = torch.log_softmax(x, dim=1)
    scores = []
    for k in range(splits):
        part = log_p[k * n // splits:(k + 1) * n // splits]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof 1, like np.cov) of features (N, D), in float64."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features (N >= 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class FeatureAccumulator:
    """Running mean and covariance of features, batch by batch, without keeping the features.

    Sums are float64 and shifted by the mean of the first batch (the shifted-data algorithm), so the usual
    cancellation of sum(x x^T) - n mu mu^T stays harmless. Logits, when given, are kept (float32, CPU) for the
    Inception Score: 50,000 x 1008 is ~200 MB, against 50,000 x 2048 x 8 bytes for the features themselves.
    """

    def __init__(self, dim: int = FEATURE_DIM, *, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.device = torch.device(device)
        self.count = 0
        self._shift: torch.Tensor | None = None
        self._sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        self._logits: list[torch.Tensor] = []

    def update(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got {tuple(features.shape)}")
        f = features.detach().to(self.device, torch.float64)
        if self._shift is None:
            self._shift = f.mean(dim=0)
        f = f - self._shift
        self._sum += f.sum(dim=0)
        self._outer += f.T @ f
        self.count += f.shape[0]
        if logits is not None:
            self._logits.append(logits.detach().to("cpu", torch.float32))

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) as float64 numpy arrays; sigma with ddof 1 like np.cov."""
        if self.count < 2 or self._shift is None:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        n = self.count
        mean = self._sum / n
        sigma = (self._outer - n * torch.outer(mean, mean)) / (n - 1)
        sigma = (sigma + sigma.T) / 2  # exactly symmetric
        return (mean + self._shift).cpu().numpy(), sigma.cpu().numpy()

    def logits(self) -> torch.Tensor:
        """All logits given so far, (N, classes) float32."""
        if not self._logits:
            raise ValueError("no logits were accumulated")
        return torch.cat(self._logits)

    def inception_score(self, splits: int = 10, split: str = "ordered",
                        seed: int = TORCH_FIDELITY_SEED) -> tuple[float, float]:
        return inception_score(self.logits(), splits, split, seed)


# ------------------------------------------------------------------------------------- feature extraction


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """Inception in true float32 on CUDA (no TF32 convolutions or matmuls), restoring the flags after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


@torch.no_grad()
def inception_outputs(inception: FIDInceptionV3, images: torch.Tensor, device: torch.device | str = "cpu",
                      protocol: str = DEFAULT_FID_PROTOCOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool3 features and logits of uint8 images (N, C, H, W), C = 3 or 1 (grey, repeated to RGB), resized and
    scaled as the FID `protocol` says ("tensorflow" or "pytorch-fid", see `ctcore.inception.prepare_images`)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, 3 or 1, H, W), got {images.dtype} {tuple(images.shape)}")
    x = images.to(device)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    with _full_fp32():
        return inception(prepare_images(x, protocol))


def _progress(enabled: bool, description: str, total: int):
    """A rich bar on stderr where it can redraw itself, else a plain line every 30 s (logs, SLURM files)."""
    from ctcore.reporting import stderr_progress

    return stderr_progress(enabled, description, total)


def _as_inception(inception: FIDInceptionV3 | str | Path | None) -> FIDInceptionV3:
    return inception if isinstance(inception, FIDInceptionV3) else load_inception(inception)


def _channels_ok(channels: int, where: str) -> None:
    if channels not in (1, 3):
        raise RunError(f"{where}: FID needs RGB (3-channel) or grey (1-channel) images, got {channels} channels")


# ------------------------------------------------------------------------------------ reference statistics


def reference_statistics(dataset_h5: str | Path, inception: FIDInceptionV3 | str | Path | None, *,
                         batch_size: int = 250, device: str | torch.device | None = None,
                         progress: bool = True, protocol: str = DEFAULT_FID_PROTOCOL) -> dict[str, Any]:
    """Inception statistics of every image of an HDF5 dataset (uint8 `images` (N, C, H, W)), read in chunks,
    under the FID `protocol`.

    Returns {"mu", "sigma", "num_images", "source", "fid_protocol"}; write it with `save_statistics`.
    """
    import h5py

    from ctcore.data import check_complete, hdf5_summary
    from ctcore.devices import resolve_device

    info = hdf5_summary(dataset_h5)  # validates the file with the same messages as training
    check_complete(dataset_h5, info)  # read in chunks, not all at once: a file claiming 10^9 images is refused here
    where = f"dataset file {str(dataset_h5)!r}"
    _channels_ok(info["shape"][0], where)
    if info["count"] < 2:
        raise RunError(f"{where} holds {info['count']} image(s); reference statistics need at least 2")
    dev = resolve_device(str(device) if device is not None else "auto")
    model = _as_inception(inception).to(dev)
    acc = FeatureAccumulator(device=dev if dev.type == "cuda" else "cpu")
    bar, task = _progress(progress, "reference statistics", info["count"])
    with bar, h5py.File(dataset_h5, "r") as f:
        images = f["images"]
        for start in range(0, info["count"], batch_size):
            chunk = torch.from_numpy(images[start:start + batch_size])
            features, _ = inception_outputs(model, chunk, dev, protocol)
            acc.update(features)
            bar.advance(task, chunk.shape[0])
    mu, sigma = acc.statistics()
    return {"mu": mu, "sigma": sigma, "num_images": acc.count, "source": str(dataset_h5), "fid_protocol": protocol}


STATISTICS_FORMATS = ("ctcore", "edm")
"""Layouts `save_statistics` writes: "ctcore" (`mu`, `sigma`, `num_images`, `fid_protocol`) or "edm", exactly the
two float64 arrays `mu` (D,) and `sigma` (D, D) of an uncompressed np.savez, as NVlabs/edm fid.py's `ref` command
writes them and its `calc` reads them (`dict(np.load(f))`, then `ref['mu']`, `ref['sigma']`). An "edm" file records
no protocol: its features are the TensorFlow graph's ("tensorflow"; EDM's Inception is StyleGAN's TorchScript port
of the 2015-12-05 graph, whose bilinear resize to 299 reads source coordinate i * size / 299 as TensorFlow's
ResizeBilinear does), which a reader declares (`--ref-protocol tensorflow`)."""
EDM_FID_PROTOCOL = "tensorflow"
"""The protocol of EDM's reference statistics, the only one an "edm" file is written under."""


def save_statistics(path: str | Path, stats: Mapping[str, Any], format: str = "ctcore") -> Path:
    """Write `mu` and `sigma` (plus `num_images` and `fid_protocol` when known) to an uncompressed .npz,
    atomically; the protocol is a plain string array, so numpy reads it without pickle. `format` "edm" writes
    `mu` and `sigma` alone (`STATISTICS_FORMATS`)."""
    path = Path(path)
    if format not in STATISTICS_FORMATS:
        raise ValueError(f"unknown statistics format {format!r}; one of: {', '.join(STATISTICS_FORMATS)}")
    mu, sigma = np.asarray(stats["mu"], dtype=np.float64), np.asarray(stats["sigma"], dtype=np.float64)
    _check_statistics(mu, sigma, f"statistics for {str(path)!r}")
    arrays = {"mu": mu, "sigma": sigma}
    if format == "edm":
        if stats.get("fid_protocol", EDM_FID_PROTOCOL) != EDM_FID_PROTOCOL:
            raise ValueError(f"EDM's statistics are made under the {EDM_FID_PROTOCOL} FID protocol; statistics made "
                             f"under {stats['fid_protocol']!r} would compare wrongly with its files")
    elif stats.get("num_images") is not None:
        arrays["num_images"] = np.asarray(int(stats["num_images"]), dtype=np.int64)
    if format == "ctcore" and stats.get("fid_protocol") is not None:
        if stats["fid_protocol"] not in FID_PROTOCOLS:
            raise ValueError(f"unknown FID protocol {stats['fid_protocol']!r}; one of: {', '.join(FID_PROTOCOLS)}")
        arrays["fid_protocol"] = np.asarray(stats["fid_protocol"])
    from ctcore.files import atomic_write

    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy appends no ".npz" to the name
        np.savez(f, **arrays)
    return path


MAKE_STATISTICS = "compute them with `ctcore eval-ref-stats DATASET.h5 OUT.npz --inception PATH`"
"""How to make reference statistics, for messages about a missing or unusable --ref file."""


def missing_statistics(path: str | Path) -> str:
    """The message for reference statistics `path` that do not exist (`load_statistics`, and `ctcore eval`'s list
    of what FID lacks)."""
    from ctcore.errors import path_not_found

    return path_not_found(f"reference statistics {str(path)!r}", path, f"{MAKE_STATISTICS}, or give an .npz with "
                          "`mu` and `sigma` from pytorch-fid or clean-fid")


REF_PROTOCOL_OPTION = "--ref-protocol {}"
"""How the commands declare the protocol of a --ref file that records none (`load_statistics`' `declared_by`)."""


def load_statistics(path: str | Path, declared: str | None = None,
                    declared_by: str = REF_PROTOCOL_OPTION) -> dict[str, Any]:
    """Read `mu` and `sigma` from an .npz (ours, pytorch-fid's, clean-fid's, EDM's, guided-diffusion's reference
    batches), and the FID protocol it records (`fid_protocol`; `declared`, or None, when the file records none).

    `declared` is the protocol of a file that records none (EDM's files: "tensorflow"); a file that records another
    one is refused, naming the declaration (`declared_by`, formatted with the protocol) to drop.
    """
    if declared is not None and declared not in FID_PROTOCOLS:
        raise ValueError(f"unknown FID protocol {declared!r}; one of: {', '.join(FID_PROTOCOLS)}")
    path = Path(path)
    where = f"reference statistics {str(path)!r}"
    make = MAKE_STATISTICS
    if not path.is_file():
        raise RunError(missing_statistics(path))
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if "mu" not in keys or "sigma" not in keys:
                raise RunError(f"{where} has no `mu` and `sigma` arrays (found: {', '.join(keys) or 'nothing'}); "
                               f"{make}")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            count = int(f["num_images"]) if "num_images" in keys else None
            protocol = str(f["fid_protocol"]) if "fid_protocol" in keys else None
    except RunError:
        raise
    except Exception as exc:  # zipfile, pickle and value errors of a truncated or foreign file
        raise RunError(f"{where} cannot be read as .npz ({type(exc).__name__}: {exc}); {make}") from None
    _check_statistics(mu, sigma, where)
    if protocol is not None and protocol not in FID_PROTOCOLS:
        raise RunError(f"{where} records the FID protocol {protocol!r}, which ctcore does not know (it knows "
                       f"{', '.join(FID_PROTOCOLS)}); {make}")
    if declared is not None and protocol is not None and declared != protocol:
        declaration = declared_by.format(declared)
        raise RunError(f"{where} record the {protocol} FID protocol, but {declaration} declares another; "
                       f"{declaration} is for files that record none (such as EDM's): drop it")
    return {"mu": mu, "sigma": sigma, "num_images": count, "source": str(path),
            "fid_protocol": protocol if protocol is not None else declared}


def check_protocol(ref: Mapping[str, Any], protocol: str, switch: str, declare: str = REF_PROTOCOL_OPTION) -> None:
    """Refuse reference statistics made under another FID protocol than `protocol`: their features differ.

    A file that records no protocol, and had none declared (`load_statistics`), counts as "pytorch-fid"
    (`UNRECORDED_FID_PROTOCOL`). `switch` is how the user selects a protocol, and `declare` how they declare a
    file's, each formatted with one (e.g. "--fid-protocol {}", "--ref-protocol {}"), for the message.
    """
    source = ref.get("source")
    where = f"reference statistics {source!r}" if source else "reference statistics"
    made = ref.get("fid_protocol")
    if made == protocol or (made is None and protocol == UNRECORDED_FID_PROTOCOL):
        return
    if made is None:
        raise RunError(f"{where} record no FID protocol, so they are taken as {UNRECORDED_FID_PROTOCOL} (how "
                       f"ctcore made them before it recorded one, and how pytorch-fid makes its own), but this FID "
                       f"uses the {protocol} protocol: if they were made under it (EDM's published files were made "
                       f"under tensorflow), declare it with {declare.format(protocol)}; otherwise recompute them with "
                       f"`ctcore eval-ref-stats DATASET.h5 OUT.npz --fid-protocol {protocol}`, or choose "
                       f"{switch.format(UNRECORDED_FID_PROTOCOL)}")
    raise RunError(f"{where} were made under the {made} FID protocol, but this FID uses the {protocol} protocol "
                   f"(another resize to 299x299: the features differ): recompute them with `ctcore eval-ref-stats "
                   f"DATASET.h5 OUT.npz --fid-protocol {protocol}`, or choose {switch.format(made)}")


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise RunError(f"{where}: `mu` must be (D,) and `sigma` (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise RunError(f"{where}: `mu` or `sigma` holds NaN or infinite values")


# ------------------------------------------------------------------------------------ checkpoint evaluation


def evaluate_checkpoint(
    checkpoint: str | Path,
    registry,
    *,
    inception: FIDInceptionV3 | str | Path | None,
    num_samples: int = 50_000,
    steps: int | None = None,
    batch_size: int = 256,
    ref_stats: str | Path | Mapping[str, Any],
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    sigmas: Sequence[float] | None = None,
    weights: str = "eval-ema",
    is_splits: int = 10,
    fid_protocol: str = DEFAULT_FID_PROTOCOL,
    is_split: str = "ordered",
    is_split_seed: int = TORCH_FIDELITY_SEED,
    sampler: str | None = None,
    ref_protocol: str | None = None,
) -> dict[str, Any]:
    """FID and Inception Score of `num_samples` samples of a checkpoint (or a run directory's latest one).

    The network is rebuilt through the registry with the eval-EMA weights; sample j uses seed + j, so the
    images are exactly those `ctcore sample --seed SEED` writes. With consistency sampling `steps` 1 samples at
    sigma_max, 2 also at the recipe's sampling.sigma_mid (or pass `sigmas`); `sampler` names another installed
    sampler for the checkpoint's kind of model (default: its recipe's). `inception` is a loaded FIDInceptionV3
    (moved to the device) or a weights path; `ref_stats` an .npz path or a mapping with `mu`, `sigma` and optionally
    `fid_protocol`; `ref_protocol` declares the protocol of a file that records none (`load_statistics`).
    Statistics made under another `fid_protocol` are refused (`check_protocol`); `is_split` and
    `is_split_seed` choose the Inception Score's splits (`inception_score`).
    Returns {"fid", "inception_score", "inception_score_std", "num_samples", "steps", "sigmas", ...}; "notes"
    lists caveats (fewer samples than feature dimensions). Under torchrun every process samples its share of
    the seeds and all return the same result.
    """
    info, _, sigmas, fid_of = fid_evaluator(
        checkpoint, registry, inception=inception, num_samples=num_samples, steps=steps, batch_size=batch_size,
        ref_stats=ref_stats, device=device, seed=seed, sigmas=sigmas, weights=weights, is_splits=is_splits,
        fid_protocol=fid_protocol, is_split=is_split, is_split_seed=is_split_seed, sampler=sampler,
        ref_protocol=ref_protocol)
    result = fid_of(sigmas, progress)
    return {**result, "steps": len(sigmas), "sigmas": sigmas, **info}


def fid_evaluator(
    checkpoint: str | Path, registry, *, inception: FIDInceptionV3 | str | Path | None, num_samples: int = 50_000,
    steps: int | None = None, batch_size: int = 256, ref_stats: str | Path | Mapping[str, Any],
    device: str | None = None, seed: int = 0, sigmas: Sequence[float] | None = None, weights: str = "eval-ema",
    is_splits: int = 10, fid_protocol: str = DEFAULT_FID_PROTOCOL, is_split: str = "ordered",
    is_split_seed: int = TORCH_FIDELITY_SEED, sampler: str | None = None, ref_protocol: str | None = None,
) -> tuple[dict[str, Any], Any, list[float], Any]:
    """(facts of the evaluation, the checkpoint's recipe, the sigmas asked for, fid_of(sigmas, progress)) with every
    check of `evaluate_checkpoint` done and the network, Inception and statistics loaded once; fid_of returns
    `fid_of_denoiser`'s result for samples seed .. seed + num_samples - 1, the same seeds for any sigmas."""
    from ctcore.distributed import setup
    from ctcore.sampling import (
        NonFiniteOutputs,
        load_sampling_network,
        load_sampling_plan,
        nonfinite_error,
        recipe_model_function,
    )

    if num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2 (FID needs a covariance), got {num_samples}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if fid_protocol not in FID_PROTOCOLS:
        raise UsageError(f"--fid-protocol must be one of {', '.join(FID_PROTOCOLS)}, got {fid_protocol!r}")
    if ref_protocol is not None and ref_protocol not in FID_PROTOCOLS:
        raise UsageError(f"--ref-protocol must be one of {', '.join(FID_PROTOCOLS)}, got {ref_protocol!r}")
    if is_split not in IS_SPLITS:
        raise UsageError(f"--is-split must be one of {', '.join(IS_SPLITS)}, got {is_split!r}")
    if isinstance(ref_stats, Mapping):  # the caller's own statistics: checked when they name a protocol
        made = ref_stats.get("fid_protocol", fid_protocol)
        ref = {"mu": np.asarray(ref_stats["mu"], np.float64), "sigma": np.asarray(ref_stats["sigma"], np.float64),
               "fid_protocol": ref_protocol if made is None else made}
        _check_statistics(ref["mu"], ref["sigma"], "reference statistics")
    else:
        ref = load_statistics(ref_stats, ref_protocol)
    if ref["mu"].shape[0] != FEATURE_DIM:
        raise RunError(f"reference statistics have {ref['mu'].shape[0]}-d features, but FID uses the "
                       f"{FEATURE_DIM}-d pool3 features of the FID Inception; recompute them with "
                       f"ctcore eval-ref-stats")
    model = _as_inception(inception)
    checkpoint, state, recipe, sigmas, sampler = load_sampling_plan(checkpoint, registry, steps=steps, sigmas=sigmas,
                                                                    weights=weights, sampler=sampler)
    check_protocol(ref, fid_protocol, "--fid-protocol {}")  # after the checkpoint's own checks, before sampling
    shape = tuple(state["provenance"]["data_shape"])
    num_classes = state["provenance"]["num_classes"]
    _channels_ok(shape[0], f"checkpoint {str(checkpoint)!r}")
    from ctcore.devices import resolve_device
    from ctcore.preflight import PYTHON_INT_BYTES, require_buffers

    # the seeds and every logit stay on the host (twice, when joined), plus one batch at 299 x 299 on the device
    # (the resized images and the resize's rows and neighbours)
    draws = sampler.noise_draws(sigmas)
    batch = min(batch_size, num_samples) * (math.prod(shape) * 4 * (draws + 3) + 3 * 299 * 299 * 4 * 4)
    require_buffers({"host_logits": num_samples * NUM_LOGITS * 4 * 2, "host_seeds": num_samples * PYTHON_INT_BYTES,
                     "batch": batch}, resolve_device(device or recipe.run.device),
                    f"evaluating {num_samples:,} samples", "choose a smaller --num-samples or --batch-size")
    network, dev = load_sampling_network(checkpoint, state, recipe, registry, weights=weights, device=device)
    world, dev = setup(dev)  # under torchrun: this rank's GPU
    network, model = network.to(dev), model.to(dev)
    c = recipe.consistency
    denoiser = recipe_model_function(recipe, registry, network)

    def fid_of(plan: Sequence[float], progress: bool = False) -> dict[str, Any]:
        try:
            return fid_of_denoiser(denoiser, shape, [float(v) for v in plan], inception=model, ref=ref,
                                   sampler=sampler, levels=recipe.levels,
                                   num_samples=num_samples, num_classes=num_classes, sigma_min=c.sigma_min,
                                   clip=recipe.sampling.clip, seed=seed, batch_size=batch_size, device=dev,
                                   progress=progress, is_splits=is_splits, world=world, protocol=fid_protocol,
                                   is_split=is_split, is_split_seed=is_split_seed)
        except NonFiniteOutputs as failure:
            raise nonfinite_error(failure, checkpoint) from None

    from ctcore.sampling import file_digest

    info = {"seed": seed, "weights": weights, "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_digest(checkpoint), "step": int(state["step"]), "sampler": sampler.name,
            "network_evaluations": sampler.evaluations(sigmas), "noise_draws": sampler.noise_draws(sigmas)}
    return info, recipe, sigmas, fid_of


def sample_features(denoiser: Any, shape: Sequence[int], sigmas: Sequence[float], *, inception: FIDInceptionV3,
                    num_samples: int, num_classes: int = 0, sigma_min: float = 0.002, clip: bool = True, seed: int = 0,
                    batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = False,
                    world: World = SINGLE, protocol: str = DEFAULT_FID_PROTOCOL, sampler: Any = None,
                    levels: Any = None) -> FeatureAccumulator:
    """Inception features and logits of samples seed .. seed + num_samples - 1, accumulated batch by batch,
    under the FID `protocol`.

    Under torchrun (`world`) each rank samples its contiguous share of the seeds and the features are gathered,
    so every rank ends with the statistics of all samples.
    """
    from ctcore.distributed import gather_rows
    from ctcore.sampling import NonFiniteOutputs, generate, raise_nonfinite_together

    dev = torch.device(device)
    acc = FeatureAccumulator(device=dev if dev.type == "cuda" else "cpu")
    seeds = list(range(seed, seed + num_samples))[world.share(num_samples)]
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # this rank's features, gathered at the end
    bar, task = _progress(progress and world.is_main, f"FID {len(sigmas)}-step", len(seeds))
    failure = None
    with bar:
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start:start + batch_size]
            try:
                images, _ = generate(denoiser, shape, chunk, sigmas, sampler=sampler, levels=levels,
                                     num_classes=num_classes, sigma_min=sigma_min,
                                     clip=clip, batch_size=len(chunk), device=dev)
            except NonFiniteOutputs as exc:
                failure = exc
                break
            features, logits = inception_outputs(inception, images, dev, protocol)
            if world.distributed:
                kept.append((features.float(), logits.float()))
            else:
                acc.update(features, logits)
            bar.advance(task, len(chunk))
    raise_nonfinite_together(world, failure)  # all ranks stop together, before any of them gathers
    if world.distributed:
        empty = torch.zeros((0, FEATURE_DIM), device=dev), torch.zeros((0, NUM_LOGITS), device=dev)
        features, logits = (torch.cat(parts) for parts in zip(*kept, strict=True)) if kept else empty
        features, logits = gather_rows(world, features, num_samples), gather_rows(world, logits, num_samples)
        for start in range(0, num_samples, 4096):
            acc.update(features[start:start + 4096], logits[start:start + 4096])
    return acc


def fid_of_denoiser(denoiser: Any, shape: Sequence[int], sigmas: Sequence[float], *, inception: FIDInceptionV3,
                    ref: Mapping[str, Any], num_samples: int, num_classes: int = 0, sigma_min: float = 0.002,
                    clip: bool = True, seed: int = 0, batch_size: int = 256, device: torch.device | str = "cpu",
                    progress: bool = False, is_splits: int = 10, world: World = SINGLE,
                    protocol: str = DEFAULT_FID_PROTOCOL, is_split: str = "ordered",
                    is_split_seed: int = TORCH_FIDELITY_SEED, sampler: Any = None,
                    levels: Any = None) -> dict[str, Any]:
    """FID and IS of `num_samples` samples of a model function made with `sampler` (consistency sampling without
    one) (features from `sample_features` under the
    FID `protocol`; IS splits as `inception_score` cuts them).

    Shared by `ctcore eval` and the training loop's periodic evaluation; samples go through uint8 exactly
    as `ctcore sample` writes them (sample j uses seed + j). Under torchrun every rank returns the same result.
    """
    started = time.perf_counter()
    acc = sample_features(denoiser, shape, sigmas, inception=inception, num_samples=num_samples,
                          num_classes=num_classes, sigma_min=sigma_min, clip=clip, seed=seed, batch_size=batch_size,
                          device=device, progress=progress, world=world, protocol=protocol, sampler=sampler,
                          levels=levels)
    mu, sigma = acc.statistics()
    notes = []
    if num_samples < FEATURE_DIM:
        notes.append(f"{num_samples:,} samples are fewer than the {FEATURE_DIM} feature dimensions: the covariance "
                     f"is singular and the FID strongly biased; published FIDs use 50,000 samples")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the singular-product retry, explained by the note
        fid = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    # the standard 10 splits; one split when that would leave fewer than 2 samples per split
    splits = is_splits if num_samples >= 2 * is_splits else 1
    is_mean, is_std = acc.inception_score(splits, is_split, is_split_seed)
    return {"fid": fid, "fid_protocol": protocol, "inception_score": is_mean, "inception_score_std": is_std,
            "inception_score_splits": splits, "inception_score_split": is_split,
            "inception_score_split_seed": is_split_seed if is_split == "shuffled" else None,
            "num_samples": num_samples, "seconds": time.perf_counter() - started, "notes": notes}


# ------------------------------------------------------------------------------ FID during training


def load_fid_tools(run: Run) -> tuple[FIDInceptionV3, dict[str, Any]]:
    """The Inception network (on the run's device) and reference statistics named by [evaluation], which must have
    been made under its fid_protocol."""
    e = run.recipe.evaluation
    declare = 'evaluation.fid_reference_protocol = "{}"'
    declared = None if e.fid_reference_protocol == "recorded" else e.fid_reference_protocol
    ref = load_statistics(e.fid_reference, declared, declare)
    check_protocol(ref, e.fid_protocol, 'evaluation.fid_protocol = "{}"', declare)
    return load_inception(e.inception).to(run.device).eval(), ref


def evaluate_fid(run: Run, tools: tuple[FIDInceptionV3, dict[str, Any]]) -> dict[str, Any]:
    """FID / IS of the eval EMA as `ctcore eval` computes them (same seeds as the sample grids)."""
    inception, ref = tools
    e, c, s = run.recipe.evaluation, run.recipe.consistency, run.recipe.sampling
    sigmas = run.sampler.plan(e.fid_steps, None, run.recipe.levels)
    return fid_of_denoiser(run.denoiser(run.eval_ema), run.data.shape, sigmas, inception=inception, ref=ref,
                           sampler=run.sampler, levels=run.recipe.levels,
                           num_samples=e.fid_num_samples, num_classes=run.data.num_classes, sigma_min=c.sigma_min,
                           clip=s.clip, seed=s.seed, batch_size=e.fid_batch_size, device=run.device,
                           world=run.world, protocol=e.fid_protocol, is_split=e.is_split,
                           is_split_seed=e.is_split_seed)
