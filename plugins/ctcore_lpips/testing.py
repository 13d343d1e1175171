"""Random stand-ins for the two weight files, in the real files' layouts, for tests of code that builds `lpips`.

`ctcore.testing.check_component("metric", LPIPS, ...)` builds the metric on the CPU, which needs weight files;
`write_random_weights(folder)` writes a random VGG16 trunk under torchvision's keys and random non-negative heads
under lpips' keys and returns the options that point at them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import TAP_CHANNELS, head_keys, vgg16_features


def write_random_weights(folder: str | Path, seed: int = 0) -> dict[str, str]:
    """Write `vgg16.pth` and `vgg.pth` into `folder`; returns {"backbone_weights": ..., "heads_weights": ...}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = vgg16_features()
    gen = torch.Generator().manual_seed(seed)
    backbone = {f"features.{k}": v.clone() for k, v in trunk.state_dict().items()}
    backbone["classifier.6.weight"] = torch.randn(10, 4, generator=gen)  # the real file has a classifier: ignored
    heads = {key: torch.rand(1, c, 1, 1, generator=gen) for key, c in zip(head_keys(), TAP_CHANNELS, strict=True)}
    paths = {"backbone_weights": folder / "vgg16.pth", "heads_weights": folder / "vgg.pth"}
    torch.save(backbone, paths["backbone_weights"])
    torch.save(heads, paths["heads_weights"])
    return {option: str(path) for option, path in paths.items()}
