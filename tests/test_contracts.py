"""Every registered component passes `ctcore.testing`; broken components are caught by it."""

from __future__ import annotations

import importlib
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import attrs
import ctcore_lpips.weights as lpips_weights
import pytest
import torch
from ctcore_lpips.testing import write_random_weights
from ctcore_lpips.weights import LPIPS_HEADS_HINT, VGG16_BACKBONE_HINT
from helpers import train_tiny_diffusion
from plugin_env import EXAMPLE_PLUGIN_DIR
from torch import nn

from ctcore.components import BuildContext, NoiseScheduleBase
from ctcore.registry import Registry, load_registry
from ctcore.testing import (
    SkippedComponentWarning,
    check_all,
    check_component,
    check_component_class,
    check_curriculum,
    check_metric,
    check_network,
    check_noise_schedule,
    check_teacher,
)

ROWS = load_registry().rows()
REDUCED = {
    # the paper-size networks (56M, 296M parameters) check the same code paths at a fraction of the width;
    # their full configurations are built on the meta device in test_ncsnpp.py / test_adm.py
    ("network", "ncsnpp"): {"nf": 16, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,)},
    ("network", "adm"): {"model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
                         "attention_resolutions": (4,), "num_head_channels": 16, "num_groups": 8},
    # LPIPS needs VGG16 and head weights on a real device: random stand-ins with the real files' key names
    ("metric", "lpips"): {"resize": 16, **write_random_weights(tempfile.mkdtemp(prefix="ctcore-lpips-"))},
    # CD distils a diffusion checkpoint: a tiny EDM run's, on images of its shape
    ("teacher", "cd"): {"checkpoint": str(train_tiny_diffusion(Path(tempfile.mkdtemp(prefix="ctcore-cd-")) / "edm")),
                        "data_shape": (3, 4, 4)},
}


@pytest.mark.parametrize(("kind", "name"), [(r["kind"], r["name"]) for r in ROWS],
                         ids=[f"{r['kind']}:{r['name']}" for r in ROWS])
def test_registered_component_meets_its_contract(kind: str, name: str) -> None:
    check_component(kind, load_registry().get(kind, name), **REDUCED.get((kind, name), {}))


def test_builtins_cover_every_kind() -> None:
    assert {r["kind"] for r in ROWS} == {"network", "metric", "noise_schedule", "curriculum", "teacher", "objective",
                                         "sampler", "logger"}


def test_mlp_meets_the_network_contract_with_class_labels() -> None:
    check_network(load_registry().get("network", "mlp"), data_shape=(2, 4), num_classes=5, width=32)


def test_check_all_passes_on_the_builtins() -> None:
    assert check_all(load_registry(), REDUCED) == []  # nothing skipped: lpips has its (random) weights


def test_example_plugin_metric_meets_its_contract(plugin_path: Callable[[Path], Path]) -> None:
    plugin_path(EXAMPLE_PLUGIN_DIR)
    module = importlib.import_module("ctcore_example")
    check_component("metric", module.L1)
    check_metric(module.L1, data_shape=(5,))


# ---------------------------------------------------------------------------------------------------------
# The checks fail on broken components
# ---------------------------------------------------------------------------------------------------------


class GoodMetric(nn.Module):
    name: ClassVar[str] = "good"
    summary: ClassVar[str] = "mean squared difference"

    @attrs.frozen
    class Options:
        scale: float = 1.0

    def __init__(self, options: Any, context: BuildContext) -> None:
        super().__init__()
        self.options = options

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.options.scale * (x - y).flatten(1).square().mean(dim=1)


def test_the_reference_metric_passes() -> None:
    check_component("metric", GoodMetric)


class SummingMetric(GoodMetric):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.sum()


class SignedMetric(GoodMetric):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).flatten(1).mean(dim=1)


class DetachedMetric(GoodMetric):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().forward(x.detach(), y)


class ShapeBoundMetric(GoodMetric):
    def __init__(self, options: Any, context: BuildContext) -> None:
        super().__init__(options, context)
        self.dim = context.data_shape[0] * context.data_shape[1]  # fails when data_shape is None


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (SummingMetric, r"shape \(batch,\) = \(3,\), got \(\)"),
        (SignedMetric, "non-negative"),
        (DetachedMetric, "differentiable"),
        (ShapeBoundMetric, "fails with data_shape=None: TypeError"),
    ],
)
def test_check_metric_rejects(cls: type, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_metric(cls)


def test_check_component_class_rejects_a_class_without_name() -> None:
    class Nameless(GoodMetric):
        name = None

    with pytest.raises(AssertionError, match=r"Nameless: needs a class attribute `name`"):
        check_component_class("metric", Nameless)


def _metric_with(**attributes: Any) -> type:
    return type("Broken", (GoodMetric,), attributes)


@attrs.define
class MutableOptions:
    scale: float = 1.0


@attrs.frozen
class OptionsWithoutDefault:
    scale: float


@attrs.frozen
class OptionsWithContextKey:
    total_steps: int = 10


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (_metric_with(name="Pseudo_Huber"), "kebab-case"),
        (_metric_with(summary=""), "summary"),
        (_metric_with(summary="line one\nline two"), "one line"),
        (_metric_with(Options=None), "attrs class `Options`"),
        (_metric_with(Options=MutableOptions), "must be frozen"),
        (_metric_with(Options=OptionsWithoutDefault), r"no default: \['scale'\]"),
        (_metric_with(Options=OptionsWithContextKey), r"\['total_steps'\] are reserved"),
    ],
)
def test_check_component_class_rejects(cls: type, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_component_class("metric", cls)


class DecreasingCurriculum:
    name: ClassVar[str] = "decreasing"
    summary: ClassVar[str] = "fewer points as training goes on"

    @attrs.frozen
    class Options:
        start: int = 100

    def __init__(self, options: Any, context: BuildContext) -> None:
        self.options, self.total_steps = options, context.total_steps

    def num_scales(self, step: int) -> int:
        return max(1, self.options.start - step // 10)


def test_check_curriculum_rejects_a_decreasing_curriculum() -> None:
    with pytest.raises(AssertionError, match="non-decreasing"):
        check_curriculum(DecreasingCurriculum)


def test_check_curriculum_rejects_too_few_scales() -> None:
    with pytest.raises(AssertionError, match=">= 2"):
        check_curriculum(DecreasingCurriculum, start=1)


class SkewedSchedule(NoiseScheduleBase):
    name: ClassVar[str] = "skewed"
    summary: ClassVar[str] = "more weight on high noise"

    @attrs.frozen
    class Options:
        total: float = 1.0

    def __init__(self, options: Any, context: BuildContext) -> None:
        self.options = options

    def probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        w = torch.arange(1, sigmas.shape[0], dtype=torch.float64)
        return self.options.total * w / w.sum()


class OffByOneSchedule(SkewedSchedule):
    def sample(self, sigmas: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, sigmas.shape[0], (batch_size,), generator=generator)


class GlobalRngSchedule(SkewedSchedule):
    def sample(self, sigmas: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, sigmas.shape[0] - 1, (batch_size,))


class UniformSamplingSchedule(SkewedSchedule):
    def sample(self, sigmas: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, sigmas.shape[0] - 1, (batch_size,), generator=generator)


def test_the_reference_noise_schedule_passes() -> None:
    check_component("noise_schedule", SkewedSchedule)


@pytest.mark.parametrize(
    ("cls", "options", "match"),
    [
        (SkewedSchedule, {"total": 0.5}, "sums to 0.5"),
        (OffByOneSchedule, {}, r"must lie in \[0, 0\]"),
        (GlobalRngSchedule, {}, "same seed"),
        (UniformSamplingSchedule, {}, "do not follow"),
    ],
)
def test_check_noise_schedule_rejects(cls: type, options: dict[str, Any], match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_noise_schedule(cls, **options)


class TinyNetwork(nn.Module):
    name: ClassVar[str] = "tiny"
    summary: ClassVar[str] = "one linear layer"
    noise_conditioning: ClassVar[str] = "fourier"

    @attrs.frozen
    class Options:
        dropout: float = 0.0

    def __init__(self, options: Any, context: BuildContext) -> None:
        super().__init__()
        self.dim = int(torch.tensor(context.data_shape).prod())
        self.fc = nn.Linear(self.dim + 1, self.dim)
        self.dropout = nn.Dropout(options.dropout)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = torch.cat([x.flatten(1), c_noise[:, None]], dim=1)
        return self.fc(self.dropout(h)).view(x.shape)


def test_the_reference_network_passes() -> None:
    check_component("network", TinyNetwork)


class FlatNetwork(TinyNetwork):
    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return super().forward(x, c_noise, labels).flatten(1)


class UnusedParameterNetwork(TinyNetwork):
    def __init__(self, options: Any, context: BuildContext) -> None:
        super().__init__(options, context)
        self.forgotten = nn.Linear(2, 2)


class PrivateRngNetwork(TinyNetwork):
    """Draws dropout masks from its own generator, so restoring torch's RNG state cannot share them."""

    def __init__(self, options: Any, context: BuildContext) -> None:
        super().__init__(options, context)
        self.generator = torch.Generator().manual_seed(0)
        self.p = options.dropout

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = torch.cat([x.flatten(1), c_noise[:, None]], dim=1)
        if self.training and self.p > 0:
            h = h * (torch.rand(h.shape, generator=self.generator) >= self.p) / (1 - self.p)
        return self.fc(h).view(x.shape)


class IgnoredDropoutNetwork(TinyNetwork):
    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.fc(torch.cat([x.flatten(1), c_noise[:, None]], dim=1)).view(x.shape)


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (_metric_with(noise_conditioning="log"), "noise_conditioning"),
        (FlatNetwork, r"shape of x \(3, 3, 8, 8\), got \(3, 192\)"),
        (UnusedParameterNetwork, r"no gradient reaches parameters \['forgotten.weight', 'forgotten.bias'\]"),
        (PrivateRngNetwork, "same RNG state"),
        (IgnoredDropoutNetwork, "no effect"),
    ],
)
def test_check_network_rejects(cls: type, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_component("network", cls)


class CopyTeacher:
    name: ClassVar[str] = "copy"
    summary: ClassVar[str] = "a frozen copy of the student, refreshed every step"

    @attrs.frozen
    class Options:
        freeze: bool = True

    def __init__(self, options: Any, context: BuildContext) -> None:
        self.options = options
        self.network: nn.Module | None = None

    def bind(self, student: nn.Module) -> None:
        self.network = type(student)()
        self.network.load_state_dict(student.state_dict())
        self.network.requires_grad_(not self.options.freeze)

    def decay(self, step: int, num_scales: int) -> float:
        return 0.0

    def update(self, student: nn.Module, step: int, num_scales: int) -> None:
        self.network.load_state_dict(student.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return self.network.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state)


def test_the_reference_teacher_passes() -> None:
    check_component("teacher", CopyTeacher)


class StaleTeacher(CopyTeacher):
    def update(self, student: nn.Module, step: int, num_scales: int) -> None:
        pass


class ForgetfulTeacher(CopyTeacher):
    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FullDecayTeacher(CopyTeacher):
    def decay(self, step: int, num_scales: int) -> float:
        return 1.0


class StudentFreezingTeacher(CopyTeacher):
    def bind(self, student: nn.Module) -> None:
        self.network = student.requires_grad_(False)


class StudentStateTeacher(CopyTeacher):
    def bind(self, student: nn.Module) -> None:
        self.network = student

    def update(self, student: nn.Module, step: int, num_scales: int) -> None:
        self.network = student


@pytest.mark.parametrize(
    ("cls", "options", "match"),
    [
        (CopyTeacher, {"freeze": False}, "must not require grad"),
        (StaleTeacher, {}, "with decay 0 the teacher must equal the student"),
        (ForgetfulTeacher, {}, "loses state"),
        (FullDecayTeacher, {}, r"in \[0, 1\)"),
        (StudentFreezingTeacher, {}, "student's own parameters"),
        (StudentStateTeacher, {}, "must be empty when the teacher is the student"),
    ],
)
def test_check_teacher_rejects(cls: type, options: dict[str, Any], match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_teacher(cls, **options)


class EvalModeTeacher(CopyTeacher):
    def bind(self, student: nn.Module) -> None:
        super().bind(student)
        self.network.eval()  # dropout off: the teacher would no longer replay the student's mask


class EvalAfterUpdateTeacher(CopyTeacher):
    def update(self, student: nn.Module, step: int, num_scales: int) -> None:
        super().update(student, step, num_scales)
        self.network.fc2.eval()


@pytest.mark.parametrize(("cls", "after", "modules"), [
    (EvalModeTeacher, "bind(student)", "the network itself, fc1, fc2"),
    (EvalAfterUpdateTeacher, "update()", "fc2"),
])
def test_check_teacher_refuses_a_teacher_network_out_of_the_students_train_mode(cls: type, after: str,
                                                                                 modules: str) -> None:
    """The run builder puts the teacher in train mode after bind, so only the contract check sees a teacher that
    switches its own network to eval mode (a third-party teacher, or a builtin's bind gone wrong)."""
    with pytest.raises(AssertionError) as info:
        check_teacher(cls)
    assert str(info.value) == (f"{cls.__name__}: after {after} the teacher network must be in train mode like the "
                               f"student (dropout active, its mask the student's), but it has modules in eval mode: "
                               f"{modules}")


def test_check_all_reports_every_broken_component() -> None:
    registry = load_registry()
    registry._classes["metric"]["summing"] = SummingMetric  # a broken component sneaked past registration
    registry._providers[("metric", "summing")] = registry.provider("metric", "l2")
    expected = r"1 component\(s\) break the contract:\nmetric 'summing' from ctcore: AssertionError"
    with pytest.raises(AssertionError, match=expected):
        check_all(registry, REDUCED)


# ---------------------------------------------------------------------------------------------------------
# Components whose weights are absent are skipped by check_all, with the way to provide them
# ---------------------------------------------------------------------------------------------------------


def _lpips_only() -> Registry:
    stock = load_registry()
    registry = Registry()
    registry.add("metric", stock.get("metric", "lpips"), stock.provider("metric", "lpips"))
    return registry


def test_check_all_skips_a_component_whose_weights_are_absent(tmp_path: Path) -> None:
    backbone = (f"backbone_weights: no VGG16 weights given; set [metric] backbone_weights = \"/path/vgg16.pth\" "
                f"({VGG16_BACKBONE_HINT})")
    how = "; to check it, pass options={('metric', 'lpips'): {'backbone_weights': PATH}} to check_all"
    with pytest.warns(SkippedComponentWarning) as caught:
        skipped = check_all(_lpips_only())  # a stock install: neither weights file is given
    assert skipped == [f"skipped metric 'lpips' from ctcore: {backbone}{how}"]
    assert [str(w.message) for w in caught] == skipped

    absent = tmp_path / "vgg16.pth"  # a path to a file that is not there is absent weights too
    with pytest.warns(SkippedComponentWarning):
        skipped = check_all(_lpips_only(), {("metric", "lpips"): {"backbone_weights": str(absent)}})
    assert skipped == [f"skipped metric 'lpips' from ctcore: backbone_weights: {str(absent)!r} not found (a "
                       f"relative path is taken from the working directory); expected {VGG16_BACKBONE_HINT}{how}"]

    with pytest.raises(AssertionError, match=re.escape(
            "1 component(s) break the contract:\nmetric 'lpips' from ctcore: WeightsUnavailable: " + backbone)):
        check_all(_lpips_only(), require_weights=True)


def test_check_all_skips_lpips_without_heads_and_checks_it_with_both_files(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    monkeypatch.setattr(lpips_weights.importlib.util, "find_spec", lambda name: None)  # no lpips package
    monkeypatch.setattr(lpips_weights.importlib.metadata, "files", lambda name: [])
    files = write_random_weights(tmp_path)
    with pytest.warns(SkippedComponentWarning, match="heads_weights: no LPIPS heads given"):
        skipped = check_all(_lpips_only(), {("metric", "lpips"): {"resize": 16,
                                                                  "backbone_weights": files["backbone_weights"]}})
    assert skipped == [
        "skipped metric 'lpips' from ctcore: heads_weights: no LPIPS heads given and no installed lpips package "
        f"ships weights/v0.1/vgg.pth; set [metric] heads_weights = \"/path/vgg.pth\" ({LPIPS_HEADS_HINT}); to "
        "check it, pass options={('metric', 'lpips'): {'heads_weights': PATH}} to check_all"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped once both files are given
        assert check_all(_lpips_only(), {("metric", "lpips"): {"resize": 16, **files}}) == []


def test_check_all_skips_a_logger_whose_package_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    stock = load_registry()
    registry = Registry()
    registry.add("logger", stock.get("logger", "tensorboard"), stock.provider("logger", "tensorboard"))
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError: a stock install
    missing = ("logging.backends: the 'tensorboard' logger needs the tensorboard package, which is not installed: "
               "pip install 'ctcore[tensorboard]' (or remove 'tensorboard' from logging.backends)")
    with pytest.warns(SkippedComponentWarning):
        assert check_all(registry) == [f"skipped logger 'tensorboard' from ctcore: {missing}"]
    with pytest.raises(AssertionError, match=re.escape(
            "1 component(s) break the contract:\nlogger 'tensorboard' from ctcore: PackageUnavailable: " + missing)):
        check_all(registry, require_packages=True)
