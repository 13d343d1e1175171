"""What `ctcore check` and every run verify before anything real is allocated, and how a plugin's exception is
reported: third-party-style components with one defect each, installed through a fake distribution.

Each defect is one line naming the component and its distribution, exit 2 at `check` and 1 at `run`, no
traceback, and the files of a run that stops are left as they were (stats closed, latest checkpoint intact).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from helpers import one_line_error as one_line_failure
from helpers import snapshot, write_tiny_recipe
from plugin_env import fake_distribution
from typer.testing import CliRunner, Result

from ctcore import preflight as pf
from ctcore.cli import app
from ctcore.errors import UsageError
from ctcore.recipe import read_recipe
from ctcore.registry import load_registry

REPO = Path(__file__).resolve().parents[1]
DIST = "ctcore-hostile 1.0"

PARTS = '''
from typing import ClassVar

import attrs
import torch
from torch import nn

from ctcore.components import NoiseScheduleBase
from ctcore.errors import RunError, UsageError


class _Scaled(nn.Module):
    """x * w + b: trains, keeps the shape."""

    name: ClassVar[str] = "scaled"
    summary: ClassVar[str] = "a well-behaved network"
    noise_conditioning: ClassVar[str] = "fourier"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options, context):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, x, c_noise, labels):
        return x * self.w + self.b + 0 * c_noise[:, None, None, None]


class WrongShape(_Scaled):
    name = "wrong-shape"
    summary = "returns an image twice as large"

    def forward(self, x, c_noise, labels):
        return super().forward(x, c_noise, labels).repeat_interleave(2, -1).repeat_interleave(2, -2)


class Unconditioned(_Scaled):
    name = "unconditioned"
    summary = "declares no noise conditioning"
    noise_conditioning = None


class Slow(_Scaled):
    name = "slow"
    summary = "asks for 10^11 blocks"

    @attrs.frozen
    class Options:
        num_blocks: int = 10**11

    def __init__(self, options, context):
        super().__init__(options, context)
        self.blocks = nn.ModuleList()
        for _ in range(options.num_blocks):
            self.blocks.append(nn.Linear(4, 4))  # HANG


class Huge(_Scaled):
    name = "huge"
    summary = "a trillion parameters"

    @attrs.frozen
    class Options:
        width: int = 10**6

    def __init__(self, options, context):
        super().__init__(options, context)
        self.wide = nn.Linear(options.width, options.width)


class Flaky(_Scaled):
    name = "flaky"
    summary = "divides by zero in its 8th training forward"
    calls = 0

    def forward(self, x, c_noise, labels):
        if x.device.type == "cpu" and torch.is_grad_enabled():
            type(self).calls += 1
            if type(self).calls == 8:
                return 1 / 0  # FORWARD
        return super().forward(x, c_noise, labels)


class Greedy(_Scaled):
    name = "greedy"
    summary = "runs out of device memory in its 8th training forward"
    calls = 0

    def forward(self, x, c_noise, labels):
        if x.device.type == "cpu" and torch.is_grad_enabled() and x.shape[0] > 2:  # not the meta-check's pair
            type(self).calls += 1
            if type(self).calls == 8:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # OOM
        return super().forward(x, c_noise, labels)


class _Metric(nn.Module):
    summary = "a test metric"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options, context):
        super().__init__()


class Scalar(_Metric):
    name = "scalar"

    def forward(self, x, y):
        return ((x - y) ** 2).mean()


class Negative(_Metric):
    name = "negative"

    def forward(self, x, y):
        return -((x - y) ** 2).flatten(1).mean(1)


class NeedsFile(_Metric):
    name = "needs-file"

    def __init__(self, options, context):
        raise RunError("metric 'needs-file' needs its weights: put needs-file.pt next to the recipe")


class Unnormalised(NoiseScheduleBase):
    name = "unnormalised"
    summary = "probabilities that sum to N - 1"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options, context):
        pass

    def probabilities(self, sigmas):
        return torch.ones(sigmas.shape[0] - 1, dtype=torch.float64)


class OldStyle:
    """A schedule written against the protocol before pairs: probabilities and sample, no grid or pairs."""

    name = "old-style"
    summary = "probabilities and sample only"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options, context):
        pass

    def probabilities(self, sigmas):
        return torch.full((sigmas.shape[0] - 1,), 1.0 / (sigmas.shape[0] - 1), dtype=torch.float64)

    def sample(self, sigmas, batch_size, generator):
        return torch.multinomial(self.probabilities(sigmas), batch_size, replacement=True, generator=generator)


class Broken:
    name = "broken"
    summary = "raises KeyError"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options, context):
        self.stages = {}

    def num_scales(self, step):
        return self.stages["stage"]  # KEYERROR


class Grumpy:
    name = "grumpy"
    summary = "the student under stop-gradient; its update fails once, at step 7"
    failed = False

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options, context):
        self.network = None

    def bind(self, student):
        self.network = student

    def decay(self, step, num_scales):
        return 0.0

    def update(self, student, step, num_scales):
        if step == 7 and not type(self).failed:
            type(self).failed = True
            raise RuntimeError("teacher state lost")  # UPDATE

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
'''

HOOKS = '''
from ctcore import hookimpl

from . import parts


@hookimpl
def ctcore_register_networks():
    return [parts.WrongShape, parts.Unconditioned, parts.Slow, parts.Huge, parts.Flaky, parts.Greedy,
            parts._Scaled]


@hookimpl
def ctcore_register_metrics():
    return [parts.Scalar, parts.Negative, parts.NeedsFile]


@hookimpl
def ctcore_register_noise_schedules():
    return [parts.Unnormalised, parts.OldStyle]


@hookimpl
def ctcore_register_curricula():
    return [parts.Broken]


@hookimpl
def ctcore_register_teachers():
    return [parts.Grumpy]
'''


def line_of(marker: str) -> int:
    """The line of the test plugin's parts.py that carries `# MARKER`."""
    return next(i for i, line in enumerate(PARTS.splitlines(), 1) if line.endswith(f"# {marker}"))


@pytest.fixture
def hostile(tmp_path: Path, plugin_path) -> Path:
    site = fake_distribution(tmp_path, "ctcore-hostile", {"hostile": "ctcore_hostile"},
                             {"ctcore_hostile.__init__": HOOKS, "ctcore_hostile.parts": PARTS}, version="1.0")
    return plugin_path(site)


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner(env=env).invoke(app, [str(a) for a in args])


def recipe_with(tmp_path: Path, **sections) -> Path:
    return write_tiny_recipe(tmp_path / "r.toml", tmp_path / "out", **sections)


# ------------------------------------------------------------------------- contracts refused at check and run

REFUSED = {
    "wrong-shape": ({"network": {"name": "wrong-shape"}},
                    f"network 'wrong-shape' (from distribution '{DIST}'): returns shape (2, 3, 8, 8) for input "
                    "(2, 3, 4, 4); its output must have the input's shape"),
    "unconditioned": ({"network": {"name": "unconditioned"}},
                      f"network 'unconditioned' (from distribution '{DIST}'): declares no noise_conditioning; its "
                      "class must declare noise_conditioning = 'fourier' or 'positional' (how it wants c_noise "
                      "scaled)"),
    "scalar-metric": ({"metric": {"name": "scalar"}},
                      f"metric 'scalar' (from distribution '{DIST}'): returns shape () for inputs of shape "
                      "(2, 3, 4, 4); it must return one value per sample, shape (2,)"),
    "negative-metric": ({"metric": {"name": "negative"}},
                        f"metric 'negative' (from distribution '{DIST}'): on 3 random CPU images of shape (3, 4, 4): "
                        "d(x, y) must be non-negative, got ["),
    "unnormalised-schedule": ({"noise_schedule": {"name": "unnormalised"}},
                              f"noise_schedule 'unnormalised' (from distribution '{DIST}'): probabilities() of a "
                              "3-point grid sums to 2.0, not 1 within 1e-9 (normalise in float64) (the recipe's "
                              "grid: sigma_min 0.002, sigma_max 80.0, rho 7.0)"),
    "old-style-schedule": ({"noise_schedule": {"name": "old-style"}},
                           f"noise_schedule 'old-style' (from distribution '{DIST}'): needs methods pairs(draw) and "
                           "log_fields(step) and a class attribute grid: subclass ctcore.components.NoiseScheduleBase "
                           "for a grid schedule (see docs/plugins.md) (the recipe's grid: sigma_min 0.002, sigma_max "
                           "80.0, rho 7.0)"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_broken_contract_is_refused_at_check_and_before_a_run_allocates(case: str, tmp_path: Path,
                                                                           hostile: Path) -> None:
    sections, message = REFUSED[case]
    recipe = recipe_with(tmp_path, **sections)
    line = one_line_failure(invoke("check", recipe), 2)
    assert line.startswith(f"{recipe}: {message}"), line
    if case != "negative-metric":
        assert line == f"{recipe}: {message}"
    run = one_line_failure(invoke("run", recipe, "--no-progress"), 2)  # the same refusal, before any file
    assert run == line
    assert not (tmp_path / "out").exists()


def test_a_network_whose_construction_never_ends_is_stopped_by_the_watchdog(tmp_path: Path, hostile: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pf, "BUILD_TIME_LIMIT_S", 0.3)
    recipe = recipe_with(tmp_path, network={"name": "slow"})
    started = time.perf_counter()
    line = one_line_failure(invoke("check", recipe), 2)
    assert time.perf_counter() - started < 5
    assert line == (f"{recipe}: building network 'slow' (from distribution '{DIST}') on the meta device did not "
                    f"finish within 0.3 s (stopped in ctcore_hostile/parts.py:{line_of('HANG')}, __init__); its "
                    "options ask for too much, or it hangs: change [network] in the recipe or fix the plugin")
    assert one_line_failure(invoke("run", recipe, "--no-progress"), 2) == line
    assert not (tmp_path / "out").exists()
    # an alarm inside torch's context managers (nn.init's no_grad, the device mode) leaves no trace behind
    assert torch.is_grad_enabled() and torch._C._len_torch_function_stack() == 0


def test_the_watchdog_is_a_no_op_off_the_main_thread_and_restores_an_outer_timer() -> None:
    import signal
    import threading

    done = []
    worker = threading.Thread(target=lambda: done.append(pf.time_limit(0.01, str).__enter__() is None))
    worker.start()
    worker.join()
    assert done == [True]
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        with pf.time_limit(5, str):
            pass
        assert 99 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_a_network_too_large_for_any_device_is_refused_at_check_without_allocating(tmp_path: Path,
                                                                                 hostile: Path) -> None:
    recipe = recipe_with(tmp_path, network={"name": "huge"})
    line = one_line_failure(invoke("check", recipe), 2)
    assert line.startswith(f"{recipe}: the run would need about 32.7 TiB in each process even with "
                           "training.batch_size split over 1,024 processes (rollback copy 14.6 TiB, optimizer moments "
                           "7.3 TiB, weights 3.6 TiB), more than any device or machine holds (ctcore refuses more "
                           "than 1.0 TiB); lower the [network] size options"), line


# ---------------------------------------------------------------------------------- exceptions in plugins


def test_an_exception_in_a_plugin_at_check_names_the_component_and_exits_2(tmp_path: Path, hostile: Path) -> None:
    recipe = recipe_with(tmp_path, curriculum={"name": "broken"})
    expected = (f"curriculum 'broken' from distribution '{DIST}' raised KeyError: 'stage' (in "
                f"ctcore_hostile/parts.py:{line_of('KEYERROR')}, num_scales); fix or update the plugin")
    assert one_line_failure(invoke("check", recipe), 2) == expected
    assert one_line_failure(invoke("run", recipe, "--no-progress"), 1) == expected
    assert not (tmp_path / "out").exists()


def test_running_out_of_device_memory_mid_run_says_which_micro_batch_to_resume_with(tmp_path: Path,
                                                                                    hostile: Path) -> None:
    """A network that runs out of memory mid-run: one line naming the micro-batch that halves the pass, and the
    run resumes with it (training.micro_batch_size is a memory knob a resumed run may change) to its end."""
    recipe = recipe_with(tmp_path, network={"name": "greedy"})
    out = tmp_path / "out"
    line = one_line_failure(invoke("run", recipe, "--no-progress"), 1)
    ckpt = out / "checkpoints" / "ckpt-000000006.pt"
    assert line == (
        f"network 'greedy' from distribution '{DIST}' ran out of memory OutOfMemoryError: CUDA out of memory. Tried to "
        f"allocate 2.00 GiB (in ctcore_hostile/parts.py:{line_of('OOM')}, forward); the run stopped at step 7, its "
        f"latest checkpoint is {ckpt}: it needs more memory than the device has; continue in smaller passes (the same "
        f"steps) with ctcore run {out} --resume --set training.micro_batch_size=4, or start again with a smaller "
        "network")
    result = invoke("run", out, "--resume", "--set", "training.micro_batch_size=4", "--no-progress")
    assert result.exit_code == 0, result.output
    from ctcore.checkpoints import list_checkpoints, load_checkpoint

    assert load_checkpoint(list_checkpoints(out)[-1])["step"] == 12
    assert "micro_batch_size = 4" in (out / "recipe.toml").read_text(encoding="utf-8")


def test_a_ctcore_error_raised_by_a_plugin_passes_through_as_it_is(tmp_path: Path, hostile: Path) -> None:
    recipe = recipe_with(tmp_path, metric={"name": "needs-file"})
    line = one_line_failure(invoke("check", recipe), 1)
    assert line == "metric 'needs-file' needs its weights: put needs-file.pt next to the recipe"


@pytest.mark.parametrize(("sections", "step", "blame"), [
    ({"network": {"name": "flaky"}}, 7,
     f"network 'flaky' from distribution '{DIST}' raised ZeroDivisionError: division by zero (in "
     f"ctcore_hostile/parts.py:{line_of('FORWARD')}, forward)"),
    ({"teacher": {"name": "grumpy"}}, 8,
     f"teacher 'grumpy' from distribution '{DIST}' raised RuntimeError: teacher state lost (in "
     f"ctcore_hostile/parts.py:{line_of('UPDATE')}, update)"),
], ids=["network-forward", "teacher-update"])
def test_an_exception_in_a_plugin_mid_run_is_one_line_and_the_run_resumes_from_its_checkpoint(
        sections: dict, step: int, blame: str, tmp_path: Path, hostile: Path) -> None:
    recipe = recipe_with(tmp_path, **sections)
    out = tmp_path / "out"
    line = one_line_failure(invoke("run", recipe, "--no-progress"), 1)
    ckpt = out / "checkpoints" / "ckpt-000000006.pt"
    assert line == (f"{blame}; the run stopped at step {step}, its latest checkpoint is {ckpt}: fix or update the "
                    f"plugin, then ctcore run {out} --resume")
    rows = [json.loads(s) for s in (out / "stats.jsonl").read_text().splitlines()]  # closed, every line whole
    assert rows[-1]["event"] == "error" and rows[-1]["step"] == step
    from ctcore.checkpoints import list_checkpoints, load_checkpoint

    assert list_checkpoints(out) == [ckpt] and load_checkpoint(ckpt)["step"] == 6
    assert not list((out / "checkpoints").glob(".*.tmp"))
    before = {k: v for k, v in snapshot(out).items() if k != "stats.jsonl"}
    # the plugin misbehaves only once: resuming from the intact checkpoint finishes the run, appending only
    result = invoke("run", out, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    after = snapshot(out)
    assert {k: after.get(k) for k in before} == before
    assert load_checkpoint(list_checkpoints(out)[-1])["step"] == 12


def test_an_exception_outside_plugin_code_keeps_its_traceback(tmp_path: Path, hostile: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import ctcore.training

    def broken(*_a, **_k):
        raise ZeroDivisionError("a bug of ctcore")

    monkeypatch.setattr(ctcore.training, "evaluate_distance", broken)
    result = invoke("run", recipe_with(tmp_path), "--no-progress")
    assert isinstance(result.exception, ZeroDivisionError)
    try:
        raise ZeroDivisionError("here")
    except ZeroDivisionError as exc:
        assert pf.find_plugin(exc, load_registry()) is None


# --------------------------------------------------------------------------------------------- memory


def test_the_estimate_of_the_paper_recipes_counts_every_parameter(registry_recipes: dict) -> None:
    for name, (recipe, params, buffers) in registry_recipes.items():
        m = pf.preflight(recipe, load_registry()).memory
        assert m.parameters == params, name
        assert (m.weights, m.eval_ema, m.gradients, m.optimizer) == (4 * params + buffers, 4 * params + buffers,
                                                                     4 * params, 8 * params), name
        assert m.teacher == (4 * params + buffers if recipe.components["teacher"].name == "ema" else 0), name
        assert m.batch == recipe.training.batch_size and m.per_image > 0, name


@pytest.fixture(scope="module")
def registry_recipes() -> dict:
    registry = load_registry()
    out = {}
    for name, params in (("quickstart", 791_744), ("ict_cifar10", 56_395_523), ("ict_imagenet64", 295_899_267),
                         ("ct_cifar10", 56_395_523)):
        recipe = read_recipe(REPO / "recipes" / f"{name}.toml", registry)
        net = pf.build_components(recipe, registry, "meta", kinds=("network",))["network"]
        out[name] = (recipe, params, sum(b.numel() * b.element_size() for b in net.buffers()))
    return out


def test_the_quickstart_estimate_in_bytes() -> None:
    registry = load_registry()
    m = pf.preflight(read_recipe(REPO / "recipes" / "quickstart.toml", registry), registry,
                     device=torch.device("cpu")).memory
    assert m.data == 20_000 * (3 * 8 * 8 + 8)  # uint8 images and int64 labels on the device
    assert m.host_staging == 20_000 * (16 * 192 + 16)
    assert m.weights == 4 * 791_744 + 256  # and the Fourier frequencies (64 float32)
    # what the non-finite check copies while steps run: weights and eval EMA, two moments (no teacher copy)
    assert m.rollback == 2 * m.weights + 2 * 4 * 791_744 == m.weights + m.eval_ema + m.teacher + m.optimizer
    unchecked = pf.preflight(read_recipe(REPO / "recipes" / "quickstart.toml", registry,
                                         sets=["training.max_nonfinite_steps=0"]), registry).memory
    assert unchecked.rollback == 0
    assert m.activations == unchecked.activations == 256 * 30_756  # 30.0 KiB per image (the README's figure)


def test_a_run_that_does_not_fit_is_refused_before_any_data_is_allocated(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import ctcore.build

    loaded = []
    monkeypatch.setattr(ctcore.build, "load_data", lambda *a: loaded.append(a))
    recipe = recipe_with(tmp_path)
    line = one_line_failure(invoke("run", recipe, "--no-progress", env={pf.MEMORY_LIMIT_ENV: "100000"}), 1)
    # 256 images of (3, 4, 4): 16 bytes of generator temporaries per pixel value; 8,048 parameters: 62.9 KiB of moments
    assert line == (f"{recipe}: the run needs about 325.7 KiB of memory on cpu (data loading 196.0 KiB, rollback "
                    "copy 125.8 KiB, evaluation on the host 69.0 KiB) but CTCORE_MEMORY_LIMIT allows 97.7 KiB; "
                    "lower data.num_images, or set CTCORE_MEMORY_LIMIT=<bytes> if that figure is wrong")
    assert loaded == [] and not (tmp_path / "out").exists()
    line = one_line_failure(invoke("run", recipe, env={pf.MEMORY_LIMIT_ENV: "lots"}), 2)
    assert line == ("CTCORE_MEMORY_LIMIT must be a whole number of bytes (e.g. 8000000000), got 'lots'; "
                    "fix it or unset it")


def test_check_prints_the_estimate_in_its_ok_line(tmp_path: Path) -> None:
    recipe = recipe_with(tmp_path)
    result = invoke("check", recipe)
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"ok: {recipe} is valid; network mlp has 8,048 parameters; synthetic data, 256 images of shape (3, 4, 4); "
        "training needs about 325.7 KiB in one process (data loading 196.0 KiB, rollback copy 125.8 KiB, evaluation "
        "on the host 69.0 KiB)\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    recipe = write_tiny_recipe(root / "r.toml", root / "out", training={"total_steps": 2, "checkpoint_every": 2})
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 0, result.output
    return root / "out"


def test_sample_refuses_buffers_that_cannot_fit_before_allocating_them(trained: Path) -> None:
    line = one_line_failure(invoke("sample", trained, "-n", 1_000_000, env={pf.MEMORY_LIMIT_ENV: "10000000"}), 2)
    assert line == ("making 1,000,000 samples needs about 198.6 MiB of memory on cpu (images 137.3 MiB, seeds and "
                    "labels 61.0 MiB, batch 192.0 KiB) but CTCORE_MEMORY_LIMIT allows 9.5 MiB; choose a smaller "
                    "--num-samples, or a smaller --batch-size; several smaller stores (--seed) make the same samples")
    line = one_line_failure(invoke("sample", trained, "-n", 10**9), 2)  # the largest -n the command line takes
    assert re.fullmatch(r"making 1,000,000,000 samples needs about 19\d\.\d GiB of memory on cpu .*", line), line
    assert list((trained / "samples").glob("*.h5")) == []


def test_bench_refuses_a_batch_that_cannot_fit_before_allocating_it(tmp_path: Path) -> None:
    recipe = recipe_with(tmp_path)
    line = one_line_failure(invoke("bench", recipe, "--batch", 60_000, env={pf.MEMORY_LIMIT_ENV: "1000000"}), 2)
    assert re.fullmatch(r"bench --batch 60,000 needs about [\d.]+ MiB of memory on cpu \(training [\d.]+ MiB, "
                        r"images [\d.]+ MiB\) but CTCORE_MEMORY_LIMIT allows 976.6 KiB; choose a smaller --batch",
                        line), line


def test_human_bytes_reaches_the_sizes_a_recipe_can_ask_for() -> None:
    from ctcore.files import human_bytes

    assert [human_bytes(n) for n in (512, 3 * 2**50, 2**70)] == ["512 B", "3.0 PiB", "1024.0 EiB"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_watchdog_keeps_firing_when_python_swallows_its_alarm() -> None:
    """An alarm that lands in a weakref callback or finalizer is swallowed by Python ("Exception ignored in");
    seen in the full suite, where it let a 10^11-block constructor run until memory ran out."""
    import weakref

    class Obj:
        pass

    def busy_callback(_ref: object) -> None:  # the first alarm lands in here and is swallowed
        started = time.monotonic()
        while time.monotonic() - started < 0.3:
            pass

    started = time.monotonic()
    with pytest.raises(UsageError, match=r"^did not finish within 0.1 s"), pf.time_limit(0.1, lambda m: m):
        obj = Obj()
        ref = weakref.ref(obj, busy_callback)  # noqa: F841 - kept alive so that its callback runs
        del obj
        while time.monotonic() - started < 5:  # without the re-armed alarm the block runs on to here
            pass
    assert time.monotonic() - started < 1.0
