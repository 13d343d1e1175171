"""The Inception-v3 of the FID protocol (the TensorFlow 2015-12-05 graph as ported to PyTorch by pytorch-fid).

This is not torchvision's Inception-v3: the TensorFlow graph that FID and the Inception Score were defined
with differs in three places, reproduced here:

* the 3x3 average pools inside the A, C and first E blocks ignore the zero padding (`count_include_pad=False`);
* the last E block (Mixed_7c) pools its fourth branch with a 3x3 *max* pool instead of an average pool;
* the classifier has 1008 outputs (the 2015 graph's label set), not 1000.

Module and parameter names follow torchvision's, so the usual weights file
(`pt_inception-2015-12-05-6726825d.pth`, a plain state dict) loads with `load_state_dict(strict=True)`.

How images reach the network is the FID protocol (`prepare_images`): "tensorflow", the TensorFlow graph the
published FIDs come from (its ResizeBilinear to 299x299 with align_corners=False and half_pixel_centers=False on
pixels in [0, 255], then (x - 128) / 128; what clean-fid's legacy_tensorflow mode reproduces), or "pytorch-fid"
(x / 127.5 - 1, then `F.interpolate(..., mode="bilinear", align_corners=False)`: half-pixel centres). Both are
without antialiasing. The outputs are the 2048-d pool3 features (FID) and the 1008 class logits (Inception Score).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ctcore.errors import RunError, path_not_found

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILENAME}"
WEIGHTS_SHA256 = "6726825d"
"""What the sha256 of the weights file must start with: the hash tag in its name (torch.hub's convention)."""

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008

FID_PROTOCOLS = ("tensorflow", "pytorch-fid")
"""How images are resized and scaled for the FID Inception; "tensorflow" is the published numbers' protocol."""
DEFAULT_FID_PROTOCOL = "tensorflow"
UNRECORDED_FID_PROTOCOL = "pytorch-fid"
"""The protocol of statistics files that record none: ctcore wrote them with pytorch-fid's resize before it
recorded a protocol, and pytorch-fid's own files use it."""


# ------------------------------------------------------------------------------------------- inputs


def _tf_axis_weights(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Source indices (lower, upper) and float32 weights of TensorFlow's legacy bilinear resize along one axis.

    Output index i reads source coordinate s = i * (in_size / out_size), in float32 as TensorFlow computes it (no
    half-pixel offset): lower = floor(s), upper = min(lower + 1, in_size - 1), weight s - lower.
    """
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)  # in / out rounds to the float TF divides to
    s = torch.arange(out_size, dtype=torch.float32) * scale
    lower = s.floor()
    upper = torch.clamp(lower + 1, max=in_size - 1)
    return lower.long().to(device), upper.long().to(device), (s - lower).to(device)


def resize_bilinear_tf(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TensorFlow's ResizeBilinear (align_corners=False, half_pixel_centers=False) of (N, C, H, W) to size x size.

    Float32, in TensorFlow's order: along each row top = a + (b - a) * wx, then between rows
    top + (bottom - top) * wy (separate operations, so no fused multiply-add changes the rounding).
    """
    x = x.float()
    lo, hi, w = _tf_axis_weights(x.shape[-1], size, x.device)
    left, right = x[..., lo], x[..., hi]
    rows = left + (right - left) * w
    lo, hi, w = _tf_axis_weights(x.shape[-2], size, x.device)
    top, bottom = rows[..., lo, :], rows[..., hi, :]
    return top + (bottom - top) * w[:, None]


def prepare_images(images: torch.Tensor, protocol: str = DEFAULT_FID_PROTOCOL) -> torch.Tensor:
    """uint8 RGB images (N, 3, H, W) as the FID Inception takes them under `protocol`.

    "tensorflow": resized to 299x299 on [0, 255] by `resize_bilinear_tf`, then (x - 128) / 128, as the graph does.
    "pytorch-fid": x / 127.5 - 1, at the input size (`FIDInceptionV3.features` resizes with half-pixel centres).
    """
    if protocol == "tensorflow":
        return (resize_bilinear_tf(images.float()) - 128.0) / 128.0
    if protocol == "pytorch-fid":
        return images.float() / 127.5 - 1.0
    raise ValueError(f"unknown FID protocol {protocol!r}; one of: {', '.join(FID_PROTOCOLS)}")


# ------------------------------------------------------------------------------------------- layers


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as in the TF graph), ReLU: keys `conv.*` and `bn.*`."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average over the pixels that exist: TensorFlow's SAME-padded average pool."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max3(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


class BlockA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.branch5x5_2(self.branch5x5_1(x))
        deep = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), wide, deep, self.branch_pool(_avg3(x))], dim=1)


class BlockB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a): strided 3x3 | 1x1-3x3-strided 3x3 | strided max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deep = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), deep, F.max_pool2d(x, 3, stride=2)], dim=1)


class BlockC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions (1x7 and 7x1) of width `c7`."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = ConvBN(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = ConvBN(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = ConvBN(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = ConvBN(c7, 192, row[0], padding=row[1])
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        deep = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            deep = layer(deep)
        return torch.cat([self.branch1x1(x), wide, deep, self.branch_pool(_avg3(x))], dim=1)


class BlockD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = self.branch3x3_2(self.branch3x3_1(x))
        long = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([short, long, F.max_pool2d(x, 3, stride=2)], dim=1)


class BlockE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) whose 3x3 branches split into parallel 1x3 and 3x1 convolutions.

    `max_pool`: the pooling branch uses a max pool (Mixed_7c in the FID graph) instead of the padding-free
    average pool (Mixed_7b).
    """

    def __init__(self, cin: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _max3(x) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as the FID protocol defines it; `forward(x)` -> (pool3 features (N, 2048), logits (N, 1008)).

    `x` is (N, 3, H, W) in [-1, 1] at any size; other sizes than 299x299 are resized bilinearly with half-pixel
    centres (the pytorch-fid protocol; `prepare_images` makes the inputs of either protocol). The logits are
    `features @ fc.weight.T`, without the classifier bias, by default: that is what the original Inception
    Score code (openai/improved-gan, the `softmax/logits/MatMul` weights applied to pool_3) and torch-fidelity
    (`logits_unbiased`) feed the softmax. `logits_bias=True` adds `fc.bias` (the graph's own `softmax` output).
    The network is built in eval mode without gradients; load weights with `load_inception`.
    """

    def __init__(self, *, logits_bias: bool = False) -> None:
        super().__init__()
        self.logits_bias = logits_bias
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)
        self.eval().requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """pool3: the 2048-d global average of the last block, for images in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):  # at 299 the interpolation is the identity
            x = F.interpolate(x.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = x.float()
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 147x147
        x = F.max_pool2d(x, 3, stride=2)  # 73x73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71x71
        x = F.max_pool2d(x, 3, stride=2)  # 35x35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # 35 -> 17 (Mixed_6a) -> 8 (Mixed_7a)
        return x.mean(dim=(2, 3))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The 1008 class logits of pool3 features (without the bias unless `logits_bias`)."""
        out = features @ self.fc.weight.T
        return out + self.fc.bias if self.logits_bias else out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        return feats, self.logits(feats)


# ------------------------------------------------------------------------------------------- weights


def cache_dir_path(override: str | Path | None = None) -> Path:
    """Where downloaded files live: `override`, else $CTCORE_CACHE, else ~/.cache/ctcore."""
    if override is not None:
        return Path(override)
    env = os.environ.get("CTCORE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ctcore"


def _missing_message(where: Path, *, given: bool) -> str:
    """Where the weights were looked for, and the three ways to provide them."""
    head = (path_not_found(f"Inception weights file {str(where)!r} (--inception)", where) if given
            else f"Inception weights for FID not found in the cache: {str(where)!r}")
    other = ("or point --inception at an existing copy" if given
             else "or pass --inception PATH to use a copy elsewhere, or let ctcore fetch it with "
                  "--download-inception; $CTCORE_CACHE moves the cache folder")
    return (
        f"{head}. Download {FID_WEIGHTS_URL} (pytorch-fid's port of the TensorFlow FID Inception, ~96 MB) and "
        f"save it there:\n  mkdir -p '{where.parent}' && curl -L -o '{where}' {FID_WEIGHTS_URL}\n{other}"
    )


def download_weights(dest: str | Path, *, url: str | None = None, sha256: str | None = None,
                     timeout: float = 60.0, progress: bool = False) -> Path:
    """Fetch `url` (default: the pytorch-fid release) into `dest` atomically, checking its sha256.

    `sha256` is the full hex digest or a prefix of it (default `WEIGHTS_SHA256`, the tag in the file name).
    A failed or mismatching download leaves nothing behind and raises RunError.
    """
    import http.client

    from ctcore import __version__

    url = FID_WEIGHTS_URL if url is None else url
    expected = (WEIGHTS_SHA256 if sha256 is None else sha256).lower()
    from ctcore.files import atomic_write

    dest = Path(dest)
    digest = hashlib.sha256()
    with atomic_write(dest) as tmp:  # kept only if the download completes and its checksum matches
        try:
            request = urllib.request.Request(url, headers={"User-Agent": f"ctcore/{__version__}"})
            with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out, \
                    _download_bar(progress, dest.name, response.headers.get("Content-Length")) as advance:
                while block := response.read(1 << 20):
                    digest.update(block)
                    out.write(block)
                    advance(len(block))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise RunError(
                f"could not download the Inception weights from {url} ({type(exc).__name__}: {exc}); "
                f"download the file by hand and save it as {str(dest)!r}, or pass --inception PATH"
            ) from None
        got = digest.hexdigest()
        if not got.startswith(expected):
            raise RunError(
                f"the file downloaded from {url} has sha256 {got}, but {expected}... was expected: the "
                f"download is corrupt or the address serves another file; nothing was saved to {str(dest)!r}"
            )
    return dest


@contextlib.contextmanager
def _download_bar(enabled: bool, name: str, length: str | None) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr (nothing when disabled); yields `advance(nbytes)`."""
    from rich.console import Console
    from rich.progress import DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn(f"downloading {name}"), DownloadColumn(), TransferSpeedColumn(),
                  console=Console(stderr=True), disable=not enabled) as bar:
        task = bar.add_task(name, total=int(length) if length and length.isdigit() else None)
        yield lambda n: bar.advance(task, n)


def missing_weights(path: str | Path | None = None, *, download: bool = False,
                    cache_dir: str | Path | None = None) -> str | None:
    """What `load_inception` would say of weights that are not where it looks (the file at `path`, else the
    cache's, unless `download` fetches that one), without reading them; None when nothing is missing."""
    if path is None:
        where = cache_dir_path(cache_dir) / WEIGHTS_FILENAME
        return None if download or where.is_file() else _missing_message(where, given=False)
    return None if Path(path).is_file() else _missing_message(Path(path), given=True)


def load_inception(path: str | Path | None = None, *, download: bool = False,
                   cache_dir: str | Path | None = None, progress: bool = True) -> FIDInceptionV3:
    """The FID Inception with weights from `path`, or from the cache (fetched there first with `download`, with a
    progress bar when `progress`).

    The file is read with `torch.load(weights_only=True)` (no code runs) and must hold the standard state dict
    of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`. Problems give one RunError that names the fix.
    """
    problem = missing_weights(path, download=download, cache_dir=cache_dir)
    if problem is not None:
        raise RunError(problem)
    where = cache_dir_path(cache_dir) / WEIGHTS_FILENAME if path is None else Path(path)
    if not where.is_file():
        download_weights(where, progress=progress)
    model = FIDInceptionV3()
    model.load_state_dict(_read_state_dict(where, model), strict=True)
    return model


def _read_state_dict(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Read and check a state dict against `model`: every key present, no stray key, every shape equal."""
    fix = f"download it again from {FID_WEIGHTS_URL}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated, foreign or pickled-code files
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise RunError(
            f"Inception weights {str(path)!r} are corrupt or not a PyTorch state dict ({type(exc).__name__}: "
            f"{first[:200]}); {fix}. (clean-fid's TorchScript inception-2015-12-05.pt is another format.)"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"Inception weights {str(path)!r} do not hold a state dict of tensors; {fix}")
    expected = model.state_dict()
    state = dict(state)
    for key in expected:  # files saved before BatchNorm counted its batches lack these buffers
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise RunError(
            f"Inception weights {str(path)!r} do not fit the FID Inception-v3 ({'; '.join(parts)}); it needs "
            f"pytorch-fid's {WEIGHTS_FILENAME} (torchvision key names, 1008 classes): {fix}"
        )
    return state
