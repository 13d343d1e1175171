"""`ctcore bench` and the GPU fast-path switches that can be checked on CPU (compile, shared dropout mask)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny_recipe_text, write_tiny_recipe
from typer.testing import CliRunner

import ctcore
from ctcore.bench import forward_gflop_per_image, run_bench
from ctcore.build import build_run
from ctcore.cli import app
from ctcore.consistency import shared_rng
from ctcore.recipe import parse_recipe, read_recipe


def _tiny_mlp_flops() -> int:
    """2 x multiply-accumulates of every Linear in the tiny recipe's MLP, for one image."""
    net = TINY["network"]
    dim = 3 * TINY["data"]["resolution"] ** 2
    w, f = net["width"], net["embedding_features"]
    e = 4 * f
    macs = 2 * f * e + e * e  # noise embedding MLP: [sin, cos] (2f) -> e -> e
    macs += dim * w + w * dim  # input and output projections
    macs += net["num_blocks"] * (w * w + e * w + w * w)  # per block: fc1, embedding projection, fc2
    return 2 * macs


def test_forward_flops_match_the_layer_arithmetic(tmp_path: Path) -> None:
    registry = ctcore.load_registry()
    run = run_bench(read_recipe(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "o"), registry), registry,
                    batch=4, steps=1, warmup=0)
    assert run["forward_gflop_per_image"] == pytest.approx(_tiny_mlp_flops() / 1e9, rel=1e-12)
    assert run["train_tflop_per_s"] == pytest.approx(run["train_img_per_s"] * 4 * run["forward_gflop_per_image"] / 1e3)
    assert run["batch"] == 4 and run["parameters"] > 0 and run["peak_gpu_memory_gib"] is None
    assert not (tmp_path / "o").exists()  # the benchmark writes no run directory


def test_bench_cli_prints_a_table_and_json(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "o")
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["bench", str(recipe), "--batch", "4", "--steps", "2",
                                                            "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {"train_img_per_s", "sample_img_per_s", "forward_gflop_per_image", "train_tflop_per_s",
                         "sample_tflop_per_s", "peak_gpu_memory_gib", "batch", "precision"}
    assert data["train_img_per_s"] > 0 and data["sample_img_per_s"] > 0 and data["steps"] == 2
    assert data["compile"] is False  # the tiny recipe's compile = "auto": off on CPU, so no compile report
    assert [data[k] for k in ("eager_train_img_per_s", "graph_breaks", "recompiles", "compile_seconds")] == [None] * 4
    table = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["bench", str(recipe), "--batch", "4", "--steps", "1"])
    assert table.exit_code == 0 and "train img per s" in table.stdout and "n/a" in table.stdout


def test_forward_flops_of_a_network_with_labels() -> None:
    registry = ctcore.load_registry()
    plain = registry.create("network", "mlp", data_shape=(1, 2, 2), width=8, num_blocks=1, embedding_features=2)
    cond = registry.create("network", "mlp", data_shape=(1, 2, 2), width=8, num_blocks=1, embedding_features=2,
                           num_classes=3)
    a = forward_gflop_per_image(plain, (1, 2, 2), 0, torch.device("cpu"))
    b = forward_gflop_per_image(cond, (1, 2, 2), 3, torch.device("cpu"))
    assert a == b > 0  # an embedding lookup is not a matmul: no extra flops


@pytest.mark.slow
def test_student_and_teacher_share_the_dropout_mask_under_torch_compile(tmp_path: Path) -> None:
    """A run's two compiled passes of an MLP with two dropout layers of 0.5 (inductor, which draws its masks from
    seeds it takes from the global generator): the teacher's no-grad graph, a graph of its own, draws the student's
    mask when the generator's state is restored (shared_rng), as the eager passes do; the next draw is another mask.
    With the no-ema teacher (the student's weights) and an EMA teacher (a copy, equal at step 0). Inductor builds 19
    C++ kernels for it: 24 CPU-s with an empty inductor cache (the smallest NCSN++: 41 kernels, 60 CPU-s)."""
    registry = ctcore.load_registry()
    network = {"name": "mlp", "width": 16, "num_blocks": 2, "embedding_features": 8, "dropout": 0.5,
               "zero_init_output": False}  # a zero output layer would hide the dropout from the output
    x, c = torch.randn(8, 3, 4, 4), torch.full((8,), -0.5)

    def passes(student: torch.nn.Module, target: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        with shared_rng(torch.device("cpu")):  # as consistency_loss runs them
            s = student(x, c, None)
        with torch.no_grad():
            return s.detach(), target(x, c, None), target(x, c, None)

    for teacher in ("no-ema", "ema"):  # one test: the EMA teacher's graphs reuse the first one's kernels
        text = tiny_recipe_text(tmp_path / teacher, network=network, teacher={"name": teacher},
                                training={"compile": "on"})
        run = build_run(parse_recipe(text, registry), registry)
        assert run.teacher_forward is not None and run.teacher_forward is not run.student_forward
        eager = passes(run.student, run.teacher.network)
        compiled = passes(run.student_forward, run.teacher_forward)
        for student, same_mask, next_mask in (eager, compiled):
            assert (student - same_mask).abs().max() < 1e-5  # measured: 0 eager, 5e-7 compiled (outputs about 2)
            assert (same_mask - next_mask).abs().max() > 0.1  # dropout is active, and its mask is not frozen


def test_flops_count_fused_attention_like_its_matmuls() -> None:
    """The flop counter misses CPU flash attention; bench counts attention the same for both ADM kernels."""
    registry = ctcore.load_registry()
    small = {"data_shape": (3, 16, 16), "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
             "attention_resolutions": (8,), "num_head_channels": 16, "num_groups": 8}
    counts = {att: forward_gflop_per_image(registry.create("network", "adm", attention=att, **small).eval(),
                                           (3, 16, 16), 0, torch.device("cpu")) for att in ("math", "sdpa")}
    assert counts["sdpa"] == counts["math"] > 0


# ---------------------------------------------------------------------------------------- bench --profile


def test_bench_profile_writes_a_new_chrome_trace_each_time_and_lists_the_top_ops(tmp_path: Path) -> None:
    """`--profile DIR` (missing: created) traces 3 training steps and one sampling batch into a new
    DIR/bench-<recipe>-<time>-<pid>.pt.trace.json, a Chrome trace; the 15 operators with the most self CPU time
    come sorted in --json and as a table; a second call adds a trace and leaves the first byte for byte."""
    import re

    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "o")
    folder = tmp_path / "traces" / "cpu"
    args = ["bench", str(recipe), "--batch", "4", "--steps", "1", "--warmup", "0", "--profile", str(folder)]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    profiled = json.loads(result.stdout)["profile"]
    [trace] = folder.iterdir()
    assert re.fullmatch(r"bench-r-\d{8}-\d{6}-\d+\.pt\.trace\.json", trace.name) and profiled["trace"] == str(trace)
    events = json.loads(trace.read_text())["traceEvents"]
    names = [e.get("name") for e in events if e.get("ph") == "X"]
    assert (names.count("ctcore::train_step"), names.count("ctcore::sample")) == (3, 1)
    assert "aten::addmm" in names and "aten::mm" in names  # the MLP's forward and backward matmuls
    assert (profiled["steps"], profiled["sample_batches"], profiled["sorted_by"]) == (3, 1, "self CPU time")
    rows = profiled["top_ops"]
    assert len(rows) == 15 and not any(r["op"].startswith("ctcore::") for r in rows)  # operators, no annotation
    assert sum(r["op"].startswith("aten::") for r in rows) >= 10  # a loaded machine may rank a profiler op too
    assert [r["self_cpu_ms"] for r in rows] == sorted((r["self_cpu_ms"] for r in rows), reverse=True)
    assert all(r["self_device_ms"] is None and r["calls"] >= 1 for r in rows)
    assert 0 < sum(r["self_percent"] for r in rows) <= 100
    first = trace.read_bytes()
    table = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "15 operators with the most self CPU time (3 training steps, 1 sampling batch)" in table.stdout
    [second] = [p for p in folder.iterdir() if p != trace]
    assert table.stdout.endswith(f"trace: {second}\n") and trace.read_bytes() == first


@pytest.mark.parametrize(("make", "given", "message"), [
    (lambda root: (root / "t").write_text("mine"), "t",
     "--profile '{root}/t' is a file; give a folder for the trace (it is created if missing)"),
    (lambda root: (root / "t").write_text("mine"), "t/sub/dir",
     "--profile '{root}/t/sub/dir': '{root}/t' is a file, not a folder; give another folder for the trace"),
], ids=["a-file", "under-a-file"])
def test_bench_profile_refuses_a_path_that_cannot_be_a_folder_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: object, given: str, message: str) -> None:
    from helpers import one_line_error, snapshot

    import ctcore.bench

    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "o")
    make(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(ctcore.bench, "run_bench", lambda *a, **k: pytest.fail("benchmarked"))
    result = CliRunner().invoke(app, ["bench", str(recipe), "--profile", str(tmp_path / given)])
    assert one_line_error(result) == message.format(root=tmp_path)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.toml", "t"]


def test_bench_profile_refuses_a_folder_it_cannot_write_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The nearest existing folder must be writable (os.access, made to say no here: root may write anywhere)."""
    from helpers import one_line_error

    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: Path(path) != locked and access(path, mode, **k))
    result = CliRunner().invoke(app, ["bench", str(write_tiny_recipe(tmp_path / "r.toml", tmp_path / "o")),
                                      "--profile", str(locked / "new")])
    assert one_line_error(result) == (f"--profile '{locked}/new': cannot write in '{locked}' (permission denied); "
                                      "give another folder for the trace")
    assert list(locked.iterdir()) == []


def test_the_profiler_records_cuda_kernels_only_on_a_cuda_device() -> None:
    from torch.profiler import ProfilerActivity

    from ctcore.bench import profiler_activities

    assert profiler_activities(torch.device("cpu")) == [ProfilerActivity.CPU]
    assert profiler_activities(torch.device("cuda", 1)) == [ProfilerActivity.CPU, ProfilerActivity.CUDA]


def test_a_trace_name_taken_in_the_same_second_gets_the_next_number(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from ctcore.bench import profile_trace_path

    monkeypatch.setattr(time, "strftime", lambda _format: "20260101-120000")
    first = profile_trace_path(tmp_path / "t", Path("recipes/my recipe.toml"))
    assert first == tmp_path / "t" / f"bench-my_recipe-20260101-120000-{os.getpid()}.pt.trace.json"
    assert not (tmp_path / "t").exists()  # nothing is made before the trace is written
    (tmp_path / "t").mkdir()
    first.write_text("{}")
    assert profile_trace_path(tmp_path / "t", Path("my recipe.toml")).name == first.name.replace(".pt", "-2.pt", 1)
