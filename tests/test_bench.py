"""`ctcore bench` and the GPU fast-path switches that can be checked on CPU (compile, shared dropout mask)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, write_tiny_recipe
from typer.testing import CliRunner

import ctcore
from ctcore.bench import forward_gflop_per_image, run_bench
from ctcore.cli import app
from ctcore.consistency import shared_rng
from ctcore.recipe import read_recipe


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
def test_the_shared_dropout_mask_holds_under_torch_compile() -> None:
    """Inductor draws dropout masks from the global generator, so restoring its state replays the mask."""
    registry = ctcore.load_registry()
    net = registry.create("network", "mlp", data_shape=(1, 4, 4), width=16, num_blocks=1, embedding_features=4,
                          dropout=0.5, zero_init_output=False).train()
    compiled = torch.compile(net)
    x, c = torch.randn(8, 1, 4, 4), torch.zeros(8)
    with shared_rng(torch.device("cpu")):
        student = compiled(x, c, None)
    teacher = compiled(x, c, None)
    following = compiled(x, c, None)
    assert torch.equal(student, teacher)
    assert not torch.equal(teacher, following)  # the mask is replayed once, not frozen
    assert not torch.equal(student, net.eval()(x, c, None))  # dropout really is active in the compiled graph


def test_flops_count_fused_attention_like_its_matmuls() -> None:
    """The flop counter misses CPU flash attention; bench counts attention the same for both ADM kernels."""
    registry = ctcore.load_registry()
    small = {"data_shape": (3, 16, 16), "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
             "attention_resolutions": (8,), "num_head_channels": 16, "num_groups": 8}
    counts = {att: forward_gflop_per_image(registry.create("network", "adm", attention=att, **small).eval(),
                                           (3, 16, 16), 0, torch.device("cpu")) for att in ("math", "sdpa")}
    assert counts["sdpa"] == counts["math"] > 0
