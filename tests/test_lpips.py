"""The `lpips` metric plugin, on random weights saved in the real files' layouts (no download).

The backbone file uses torchvision's vgg16 keys (`features.N.weight`), the heads file lpips' v0.1 keys
(`lin{l}.model.1.weight`, non-negative). Small images and `resize = 32` keep the VGG16 cheap; one test checks
that the default upsamples to 224 x 224 and stops the forward pass at the first convolution.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ctcore.components import BuildContext
from ctcore.testing import check_component

try:
    import ctcore_lpips
except ModuleNotFoundError:  # not registered/installed yet: import it from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    import ctcore_lpips

from ctcore_lpips import LPIPS, TAP_CHANNELS, VGG16_CONV_INDICES, head_keys, vgg16_features
from ctcore_lpips.testing import write_random_weights

SHAPE = (3, 32, 32)


class NotATensor:
    """A picklable object that torch.load(weights_only=True) must refuse."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Random VGG16 trunk weights under torchvision's keys (a classifier key too, as in the real file) and random
    non-negative heads under lpips' keys."""
    files = write_random_weights(tmp_path_factory.mktemp("lpips-weights"))
    backbone = torch.load(files["backbone_weights"], weights_only=True)
    assert {f"features.{i}.{k}" for i in VGG16_CONV_INDICES for k in ("weight", "bias")} < set(backbone)
    heads = torch.load(files["heads_weights"], weights_only=True)
    assert set(heads) == {f"lin{i}.model.1.weight" for i in range(5)}
    assert all(h.shape == (1, c, 1, 1) and (h >= 0).all() for h, c in zip(heads.values(), TAP_CHANNELS, strict=True))
    return files


def build(weight_files: dict[str, str], data_shape=SHAPE, **options) -> LPIPS:
    return LPIPS(LPIPS.Options(**{**weight_files, "resize": 32, **options}), BuildContext(data_shape=data_shape))


def images(batch: int = 2, shape=SHAPE, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("resize", [32, 0])
def test_passes_the_metric_contract(weight_files, resize: int) -> None:
    check_component("metric", LPIPS, data_shape=SHAPE, resize=resize, **weight_files)


@pytest.mark.parametrize("pooling", ["max", "average"])
def test_values_shape_identity_and_gradients(weight_files, pooling: str) -> None:
    metric = build(weight_files, pooling=pooling)
    x = images(4).requires_grad_(True)
    y = images(4, seed=2)
    d = metric(x, y)
    assert d.shape == (4,) and d.dtype == torch.float32
    assert (d > 0).all() and torch.isfinite(d).all()
    d.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad != 0).any()
    assert all(not p.requires_grad and p.grad is None for p in metric.parameters())
    with torch.no_grad():
        same = metric(y, y.clone())
    assert torch.equal(same, torch.zeros(4))


def test_the_weights_loaded_are_the_files(weight_files) -> None:
    metric = build(weight_files)
    backbone = torch.load(weight_files["backbone_weights"], weights_only=True)
    heads = torch.load(weight_files["heads_weights"], weights_only=True)
    for i in VGG16_CONV_INDICES:
        assert torch.equal(metric.features[i].weight, backbone[f"features.{i}.weight"])
        assert torch.equal(metric.features[i].bias, backbone[f"features.{i}.bias"])
    for head, key in zip(metric.heads, head_keys(), strict=True):
        assert torch.equal(head, heads[key].flatten())
    assert metric.weight_files == weight_files


def test_a_bare_features_state_dict_is_taken_too(weight_files, tmp_path: Path) -> None:
    backbone = torch.load(weight_files["backbone_weights"], weights_only=True)
    torch.save({k.removeprefix("features."): v for k, v in backbone.items()}, tmp_path / "features.pth")
    metric = build({**weight_files, "backbone_weights": str(tmp_path / "features.pth")})
    assert torch.equal(metric.features[28].weight, backbone["features.28.weight"])


def test_matches_the_lpips_formula_written_out(weight_files) -> None:
    """The textbook LPIPS steps (ScalingLayer, torchvision-style trunk, normalize_tensor, 1x1 conv, spatial mean)
    on the same random weights give the same numbers."""
    metric = build(weight_files)
    trunk = vgg16_features()
    trunk.load_state_dict({k.removeprefix("features."): v for k, v in
                           torch.load(weight_files["backbone_weights"], weights_only=True).items()
                           if k.startswith("features.")})
    heads = torch.load(weight_files["heads_weights"], weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(img):
        h, out = (img - shift) / scale, []
        for i, layer in enumerate(trunk):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                out.append(h / (torch.sqrt((h**2).sum(dim=1, keepdim=True)) + 1e-10))
        return out

    x, y = images(3), images(3, seed=5)
    with torch.no_grad():
        expected = sum(torch.nn.functional.conv2d((a - b) ** 2, heads[k]).mean(dim=(2, 3)).flatten()
                       for a, b, k in zip(feats(x), feats(y), head_keys(), strict=True))
        got = metric(x, y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_default_resize_upsamples_to_224_bilinearly(weight_files) -> None:
    metric = build(weight_files, resize=224)
    seen = []

    class Stop(Exception):
        pass

    def grab(_module, args):
        seen.append(args[0].detach().clone())
        raise Stop

    metric.features[0].register_forward_pre_hook(grab)
    x = images(2)
    with pytest.raises(Stop):
        metric(x, x)
    assert seen[0].shape == (2, 3, 224, 224)
    up = torch.nn.functional.interpolate(x, size=224, mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen[0], (up - metric.shift) / metric.scale)
    assert LPIPS.Options().resize == 224


def test_mode_switches_are_ignored_and_nothing_is_random(weight_files) -> None:
    metric = build(weight_files)
    metric.train()
    assert not metric.training and not any(m.training for m in metric.modules())
    x, y = images(2), images(2, seed=3)
    torch.manual_seed(0)
    first = metric(x, y)
    torch.manual_seed(1)
    assert torch.equal(first, metric(x, y))


def test_runs_under_bf16_autocast_with_float32_distances(weight_files) -> None:
    metric = build(weight_files)
    x = images(2).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = metric(x, images(2, seed=4))
        same = metric(x.detach(), x.detach().clone())
    assert d.dtype == torch.float32 and torch.isfinite(d).all() and (d > 0).all()
    assert torch.equal(same, torch.zeros(2))
    d.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).any()


def test_greyscale_is_compared_as_rgb(weight_files) -> None:
    metric = build(weight_files, data_shape=(1, 32, 32))
    g = images(2, (1, 32, 32))
    torch.testing.assert_close(metric(g, g.flip(-1)), metric(g.expand(-1, 3, -1, -1), g.flip(-1).expand(-1, 3, -1, -1)))


# ------------------------------------------------------------------------------------- bad options / files


def test_meta_device_build_needs_no_files() -> None:
    with torch.device("meta"):
        metric = LPIPS(LPIPS.Options(), BuildContext(data_shape=SHAPE))
        also = LPIPS(LPIPS.Options(backbone_weights="/no/such/file.pth", heads_weights="/nor/this.pth"),
                     BuildContext(data_shape=SHAPE))
    assert metric.features[0].weight.device.type == "meta" and also.weight_files == {}


def test_empty_backbone_option_names_the_option_and_the_fix(weight_files) -> None:
    with pytest.raises(ValueError, match=r'^backbone_weights: no VGG16 weights given; set \[metric\] backbone_weights'):
        build({**weight_files, "backbone_weights": ""})


def test_missing_files_name_the_option(weight_files, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^backbone_weights: '.*nope\.pth' not found"):
        build({**weight_files, "backbone_weights": str(tmp_path / "nope.pth")})
    with pytest.raises(ValueError, match=r"^heads_weights: '.*nope\.pth' not found"):
        build({**weight_files, "heads_weights": str(tmp_path / "nope.pth")})


def test_empty_heads_option_without_an_installed_lpips(weight_files, monkeypatch) -> None:
    monkeypatch.setattr(ctcore_lpips, "installed_lpips_heads", lambda: None)
    with pytest.raises(ValueError, match=r"^heads_weights: no LPIPS heads given .* set \[metric\] heads_weights"):
        build({**weight_files, "heads_weights": ""})


def test_empty_heads_option_finds_an_installed_lpips_without_importing_it(weight_files, tmp_path, monkeypatch):
    package = tmp_path / "site" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('lpips must not be imported: it imports torchvision')\n")
    heads = Path(weight_files["heads_weights"])
    (package / "weights" / "v0.1" / "vgg.pth").write_bytes(heads.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    metric = build({**weight_files, "heads_weights": ""})
    assert metric.weight_files["heads_weights"] == str(package / "weights" / "v0.1" / "vgg.pth")
    assert getattr(sys.modules.get("lpips"), "__file__", None) != str(package / "__init__.py")  # never imported


def test_wrong_keys_are_a_clear_error(weight_files, tmp_path: Path) -> None:
    renamed = {f"conv{k}": v for k, v in torch.load(weight_files["backbone_weights"], weights_only=True).items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"^backbone_weights: .*lacks the keys features\.0\.weight.*torchvision"):
        build({**weight_files, "backbone_weights": str(tmp_path / "renamed.pth")})
    # the heads file given as the backbone, and the other way round
    with pytest.raises(ValueError, match=r"^backbone_weights: .*lacks the keys features\.0\.weight"):
        build({**weight_files, "backbone_weights": weight_files["heads_weights"]})
    with pytest.raises(ValueError, match=r"^heads_weights: .*lacks the keys lin0\.model\.1\.weight"):
        build({**weight_files, "heads_weights": weight_files["backbone_weights"]})


def test_wrong_shapes_and_negative_heads_are_refused(weight_files, tmp_path: Path) -> None:
    backbone = torch.load(weight_files["backbone_weights"], weights_only=True)
    backbone["features.28.weight"] = torch.zeros(512, 512, 1, 1)
    torch.save(backbone, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"features\.28\.weight has shape \(512, 512, 1, 1\), expected"):
        build({**weight_files, "backbone_weights": str(tmp_path / "bad.pth")})
    heads = torch.load(weight_files["heads_weights"], weights_only=True)
    heads["lin2.model.1.weight"] = -heads["lin2.model.1.weight"]
    torch.save(heads, tmp_path / "neg.pth")
    with pytest.raises(ValueError, match=r"^heads_weights: .*lin2\.model\.1\.weight has negative entries"):
        build({**weight_files, "heads_weights": str(tmp_path / "neg.pth")})


def test_files_load_with_weights_only(weight_files, tmp_path: Path, monkeypatch) -> None:
    backbone = torch.load(weight_files["backbone_weights"], weights_only=True)
    torch.save({**backbone, "extra": NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match=r"^backbone_weights: .*cannot be read as a PyTorch file of plain tensors "
                                         r"\(ctcore runs no code from a weights file\)"):
        build({**weight_files, "backbone_weights": str(tmp_path / "pickled.pth")})
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"^heads_weights: .*holds a list, not a state dict"):
        build({**weight_files, "heads_weights": str(tmp_path / "list.pth")})

    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    build(weight_files)
    assert len(calls) == 2 and all(kw.get("weights_only") is True for kw in calls)


def test_option_validation() -> None:
    with pytest.raises(ValueError, match=r"^resize: must be 0 \(no resizing\) or >= 16"):
        LPIPS.Options(resize=8)
    with pytest.raises(ValueError, match=r"^pooling: must be one of 'max', 'average'"):
        LPIPS.Options(pooling="min")
    with torch.device("meta"), pytest.raises(ValueError, match="4 channels"):
        LPIPS(LPIPS.Options(), BuildContext(data_shape=(4, 32, 32)))


def test_small_images_without_resizing_are_a_clear_error(weight_files) -> None:
    metric = build(weight_files, data_shape=(3, 8, 8), resize=0)
    with pytest.raises(ValueError, match=r"at least 16 x 16 pixels.*set \[metric\] resize"):
        metric(images(1, (3, 8, 8)), images(1, (3, 8, 8)))


def test_registers_through_the_hook() -> None:
    assert ctcore_lpips.ctcore_register_metrics() == [LPIPS]
