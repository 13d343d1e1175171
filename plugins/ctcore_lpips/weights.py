"""Finding and reading the two weight files of the LPIPS metric, with errors that say which option to fix.

Both files are read with `torch.load(path, weights_only=True)`: a plain state dict of tensors loads, a pickle
that would run code or build other objects is refused.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ctcore.components import WeightsUnavailable

VGG16_BACKBONE_HINT = (
    "torchvision's ImageNet vgg16 state dict, e.g. vgg16-397923af.pth from "
    "https://download.pytorch.org/models/vgg16-397923af.pth"
)
LPIPS_HEADS_HINT = (
    "the LPIPS v0.1 VGG heads, lpips/weights/v0.1/vgg.pth in richzhang/PerceptualSimilarity; "
    "`pip install --no-deps lpips` also ships the file and it is then found on its own"
)
HEADS_RELATIVE_PATH = ("weights", "v0.1", "vgg.pth")
"""Where the `lpips` package keeps its VGG heads, relative to the package folder."""


def installed_lpips_heads() -> Path | None:
    """The `weights/v0.1/vgg.pth` of an installed `lpips` package, or None.

    `lpips` is never imported (its `__init__` imports torchvision): the folder comes from
    `importlib.util.find_spec`, which locates a top-level package without running it, and failing that from
    the file list of the installed `lpips` distribution. (`importlib.resources.files("lpips")` would import it.)
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        folders = list(spec.submodule_search_locations or [])
        if not folders and spec.origin:
            folders = [str(Path(spec.origin).parent)]
        candidates += [Path(folder).joinpath(*HEADS_RELATIVE_PATH) for folder in folders]
    try:
        files = importlib.metadata.files("lpips") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    wanted = "/".join(("lpips", *HEADS_RELATIVE_PATH))
    candidates += [Path(str(f.locate())) for f in files if str(f).replace("\\", "/").endswith(wanted)]
    return next((path for path in candidates if path.is_file()), None)


def load_state_dict(option: str, path: str | Path, hint: str) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from `path` with weights_only=True; ValueError naming `option` otherwise."""
    where = f"{option}: {str(path)!r}"
    file = Path(path).expanduser()
    relative = "(a relative path is taken from the working directory)"
    if file.is_dir():
        raise ValueError(f"{where} is a directory, not a file {relative}; expected {hint}")
    if not file.is_file():
        from ctcore.errors import path_not_found

        raise WeightsUnavailable(f"{path_not_found(where, file)} {relative}; expected {hint}", option)
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for refused objects, RuntimeError for a corrupt archive, ...
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{where} cannot be read as a PyTorch file of plain tensors (ctcore runs no code from a "
                         f"weights file): {first_line}. Only a state dict of tensors is accepted; expected {hint}"
                         ) from None
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{where} holds a {type(state_dict).__name__}, not a state dict (a mapping of names to "
                         f"tensors); expected {hint}")
    return dict(state_dict)


def take(
    option: str,
    path: str | Path,
    state_dict: Mapping[str, object],
    keys: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    hint: str,
) -> list[torch.Tensor]:
    """The tensors under `keys`, checked for presence, type, shape and finiteness."""
    where = f"{option}: {str(path)!r}"
    missing = [k for k in keys if k not in state_dict]
    if missing:
        found = sorted(map(str, state_dict))
        sample = ", ".join(repr(k) for k in found[:6]) + (", ..." if len(found) > 6 else "")
        raise ValueError(f"{where} lacks the keys {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''} "
                         f"({len(missing)} of {len(keys)} missing; it holds {sample or 'nothing'}); "
                         f"expected {hint}")
    tensors = []
    for key, shape in zip(keys, shapes, strict=True):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{where}: {key} must be a floating-point tensor, got {got}; expected {hint}")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(shape)}; "
                             f"expected {hint}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{where}: {key} holds non-finite values")
        tensors.append(value)
    return tensors
