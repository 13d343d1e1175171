"""The GPU campaign script (benchmarks/gpu_campaign.py) and its preparation (benchmarks/prepare_gpu_campaign.py), on
CPU: the smoke campaign end to end with one section made to fail, the plan's arithmetic, and .campaign/ built from
small generated files (never ../shared)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import h5py
import numpy as np
import pytest
from helpers import REPO_ROOT, made_once_per_session

from ctcore.sampling import read_sample_store

BENCHMARKS = REPO_ROOT / "benchmarks"
SECTIONS = ("environment", "data", "tests", "bench", "fid_features", "loader", "runs")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


campaign = _load("gpu_campaign")
prepare = _load("prepare_gpu_campaign")


# --------------------------------------------------------------------------------------- the smoke campaign


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """`gpu_campaign.py --smoke` with the loader section made to raise; its exit code, output and campaign.json.
    Run once per session (half a minute of CPU): pytest-xdist's workers share it."""

    def make(root: Path) -> None:
        started = time.perf_counter()
        run = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_campaign.py"), "--smoke", "--out",
                              str(root / "out"), "--work", str(root / "work"), "--fail", "loader"],
                             capture_output=True, text=True, timeout=300)
        (root / "result.json").write_text(json.dumps({"returncode": run.returncode, "stdout": run.stdout,
                                                      "stderr": run.stderr, "seconds": time.perf_counter() - started}),
                                          encoding="utf-8")

    root = made_once_per_session(tmp_path_factory, "smoke-campaign", make)
    r = json.loads((root / "result.json").read_text(encoding="utf-8"))
    print(f"smoke campaign: {r['seconds']:.1f} s")
    record = json.loads((root / "out" / "campaign.json").read_text(encoding="utf-8"))
    result = SimpleNamespace(returncode=r["returncode"], stdout=r["stdout"], stderr=r["stderr"])
    return SimpleNamespace(result=result, out=root / "out", work=root / "work", record=record, seconds=r["seconds"])


@pytest.mark.slow
def test_smoke_campaign_records_the_failed_section_and_runs_the_others(smoke: SimpleNamespace) -> None:
    assert smoke.result.returncode == 1, smoke.result.stderr[-3000:]
    stdout = smoke.result.stdout
    assert stdout.startswith("GPU campaign plan (smoke;") and "part" in stdout.splitlines()[1]
    assert "failed sections: loader" in stdout
    record = smoke.record
    assert list(record) == ["campaign", *SECTIONS, "out_files"]
    loader = record["loader"]
    assert loader["ok"] is False and set(loader) == {"ok", "error", "seconds", "share_s"}
    assert loader["error"]["type"] == "RuntimeError"
    assert loader["error"]["message"] == "--fail loader: this section raised on purpose"
    assert loader["error"]["traceback"].splitlines()[-1] == f"RuntimeError: {loader['error']['message']}"
    for name in SECTIONS:
        if name != "loader":
            assert record[name]["ok"] is True, record[name].get("error")
        assert record[name]["seconds"] >= 0 and record[name]["share_s"] > 0
    plan = {row["name"]: row["seconds"] for row in record["campaign"]["plan"]}
    assert list(plan) == ["startup", "environment", "data", "tests", "bench: quickstart b32 compile off",
                          "fid_features", "loader", "margin", "run: quickstart", "run: quickstart-ct"]
    assert sum(plan.values()) <= 120 and plan["run: quickstart"] == plan["run: quickstart-ct"]
    assert record["campaign"]["elapsed_s"] < 120 and smoke.seconds < 120


@pytest.mark.slow
def test_smoke_campaign_sections_hold_their_figures(smoke: SimpleNamespace) -> None:
    r = smoke.record
    env = r["environment"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True) \
        if shutil.which("git") else None
    assert env["ctcore"]["commit"] == (head.stdout.strip() if head and head.returncode == 0 else None)
    assert env["gpu"] is None and env["cuda_available"] is False
    assert env["python"] == ".".join(map(str, sys.version_info[:3])) and env["packages"]["cattrs"]["version"]
    assert r["data"]["import"]["count"] == 16 and r["data"]["import"]["shape"] == [3, 8, 8]
    tests = r["tests"]["tests"]
    assert tests and all(t["outcome"] == "skipped" for t in tests.values())  # CPU: every GPU test skips
    assert all(nodeid.startswith("tests/test_gpu.py::") for nodeid in tests)
    assert r["tests"]["counts"] == {"skipped": len(tests)} and r["tests"]["returncode"] == 0
    [(label, variant)] = r["bench"]["variants"].items()
    assert label == "quickstart b32 compile off" and variant["ok"] is True
    assert variant["result"]["batch"] == 32 and variant["result"]["compile"] is False
    assert variant["result"]["train_img_per_s"] > 0 and variant["result"]["forward_gflop_per_image"] > 0
    assert variant["reproduce"] == "ctcore bench recipes/quickstart.toml --batch 32 --set training.compile=off --json"
    fid = r["fid_features"]
    assert fid["images"] == fid["target_images"] == 2 and fid["complete"] and fid["features_finite"]
    assert fid["img_per_s"] > 0 and math.isclose(fid["gflop_per_image"], 11.43, abs_tol=0.01)


@pytest.mark.slow
def test_smoke_campaign_runs_are_stopped_by_sigterm_and_leave_stores_grids_and_stats(smoke: SimpleNamespace) -> None:
    runs = smoke.record["runs"]
    assert set(runs["runs"]) == {"quickstart", "quickstart-ct"} and runs["train_s"] == pytest.approx(6.0)
    for label, run in runs["runs"].items():
        assert run["ok"] is True, run.get("error")
        assert run["exit_code"] == 143 and not run["killed_after_sigterm"]  # ctcore run's SIGTERM exit
        assert run["sigterm_at_s"] >= run["train_s"]
        points = run["points"]
        assert points and points[-1]["step"] == run["steps"] > 0
        assert [p["step"] for p in points] == sorted(p["step"] for p in points)
        assert all(0 < p["sliced_wasserstein"] < 2 and p["seconds"] <= run["exit_s"] for p in points)
        assert run["initial_distance"] > 0 and run["nonfinite_steps"] == 0
        for store, first in zip(run["stores"], (0, 16), strict=True):
            assert store["file"] == f"{label}-samples-{first}.h5" and store["seeds"] == [first, first + 15]
            data = read_sample_store(smoke.out / store["file"])
            assert data["images"].shape == (16, 3, 8, 8) and data["seeds"].tolist() == list(range(first, first + 16))
            assert data["attrs"]["step"] == run["steps"]
        with tarfile.open(smoke.out / run["tar"]) as tar:
            names = set(tar.getnames())
        assert {f"{label}/stats.jsonl", f"{label}/final-1step.png", f"{label}/final-2step.png",
                f"{label}/run.log"} <= names
        grids = [g for p in points for g in p["grids"]]
        assert all(f"{label}/samples/{g}" in names for g in grids)
    files = smoke.record["out_files"]
    assert files["within_limits"] and sorted(files["files_mib"]) == sorted(
        ["campaign.json", "quickstart.tar", "quickstart-ct.tar", "quickstart-samples-0.h5",
         "quickstart-samples-16.h5", "quickstart-ct-samples-0.h5", "quickstart-ct-samples-16.h5"])
    assert not list(smoke.out.glob("*.pt")) and list((smoke.work / "runs" / "quickstart" / "checkpoints").glob("*.pt"))


def test_an_existing_campaign_json_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "campaign.json").write_text("{}", encoding="utf-8")
    assert campaign.main(["--out", str(tmp_path), "--smoke"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'campaign.json'} exists; choose another --out or "
                                       "delete it\n")
    assert (tmp_path / "campaign.json").read_text(encoding="utf-8") == "{}"


def test_minutes_over_the_budget_exit_2_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # --smoke sets it; restored after the test
    assert campaign.main(["--out", str(tmp_path / "out"), "--smoke", "--minutes", "5"]) == 2
    assert capsys.readouterr().err == ("error: the plan needs 705 s, more than --budget 120 s: lower --minutes "
                                       "(each run's training) or raise --budget\n")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ parts


def test_the_loader_section_measures_the_imported_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # bench_loader, as when the script runs
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["images"] = np.random.default_rng(0).integers(0, 256, (40, 3, 8, 8), dtype=np.uint8)
    result = campaign.section_loader(SimpleNamespace(dataset=tmp_path / "d.h5", sizes=campaign.SMOKE))
    assert result["source"] == str(tmp_path / "d.h5") and result["images"] == 40 and result["device"] == "cpu"
    assert [(x["batch"], x["flip"], x["shape"]) for x in result["results"]] == [(32, True, [3, 8, 8]),
                                                                                (32, False, [3, 8, 8])]
    assert all(x["images_per_s"] > 0 for x in result["results"])


FLOPS = {"recipes/ict_cifar10.toml": {"gflop": 42.49, "passes": 4, "batch": 1024},
         "recipes/ct_l2_cifar10.toml": {"gflop": 42.49, "passes": 4, "batch": 512},
         "recipes/ict_imagenet64.toml": {"gflop": 219.3, "passes": 4, "batch": 4096}, "inception": 11.43}


def test_the_plan_gives_the_runs_what_the_budget_leaves() -> None:
    parts, train_s = campaign.make_plan(campaign.REAL, FLOPS, None, 480.0)
    shares = {p.name: p.seconds for p in parts}
    assert math.isclose(sum(shares.values()), 480.0)
    assert shares["run: ict-cifar10"] == shares["run: ct-l2-cifar10"] and train_s == pytest.approx(49.2, abs=1)
    # 12 bench images x 512 x 4 passes x 42.49 GFLOP at 145 TFLOP/s, the sampling, a 12 s start, x1.15
    assert shares["bench: ict_cifar10 b512 compile off"] == pytest.approx(1.15 * (12 + 6144 * 5 * 42.49 / 145e3))
    assert shares["fid_features"] == pytest.approx(1.15 * (50_000 * 11.43 / 25e3 + 3))
    parts, train_s = campaign.make_plan(campaign.REAL, FLOPS, 3.0, 900.0, ["runs", "data"])
    assert [p.name for p in parts] == ["startup", "data", "margin", "run: ict-cifar10", "run: ct-l2-cifar10"]
    assert train_s == 180.0


def test_a_plan_over_the_budget_is_refused() -> None:
    with pytest.raises(campaign.PlanError) as exc:
        campaign.make_plan(campaign.REAL, FLOPS, 3.0, 480.0)
    assert str(exc.value) == ("the plan needs 742 s, more than --budget 480 s: lower --minutes (each run's "
                              "training) or raise --budget")  # 2 x (180 - 49) s over
    with pytest.raises(campaign.PlanError) as exc:
        campaign.make_plan(campaign.REAL, FLOPS, None, 400.0)
    assert str(exc.value) == ("--budget 400 leaves 9 s of training per run, under the 30 s minimum: raise "
                              "--budget or leave sections out with --only")


def test_flops_are_counted_on_the_meta_device(registry) -> None:
    ict = campaign.network_flops(REPO_ROOT / "recipes" / "ict_cifar10.toml", registry)
    assert ict == {"gflop": pytest.approx(42.488, abs=1e-3), "passes": 4, "batch": 1024}
    assert campaign.inception_gflop() == pytest.approx(11.426, abs=1e-3)


def _bench(compile_seconds: float) -> SimpleNamespace:
    def variant(setting: str, ips: float, wall: float, extra: dict) -> dict:
        return {"ok": True, "recipe": "recipes/ict_cifar10.toml", "sets": [f"training.compile={setting}"],
                "batch": 512, "wall_s": wall, "result": {"train_img_per_s": ips, **extra}}

    variants = {"off": variant("off", 850.0, 30.0, {}),
                "on": variant("on", 1460.0, 140.0, {"compile_seconds": compile_seconds})}
    return SimpleNamespace(record={"bench": {"variants": variants}}, sizes=campaign.REAL)


def test_the_runs_compile_only_when_it_trains_more_images_in_their_time() -> None:
    # 100 s of training after 15 s of start: eager 85 s x 850 img/s against compiled (85 - compile) s x 1460
    choice, why = campaign.choose_compile(_bench(50.0), "recipes/ict_cifar10.toml", 100.0)
    assert choice == "off" and "compiled 51,100 images (after 50 s of compiling) against eager 72,250" in why
    choice, _ = campaign.choose_compile(_bench(20.0), "recipes/ict_cifar10.toml", 100.0)
    assert choice == "on"  # 65 s x 1460 = 94,900 > 72,250
    no_bench = SimpleNamespace(record={}, sizes=campaign.REAL)
    assert campaign.choose_compile(no_bench, "recipes/ict_cifar10.toml", 100.0)[0] is None


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_gpu" name="test_a" time="0.51"/>
<testcase classname="tests.test_gpu" name="test_b[compiled]" time="12.0"><failure message="assert 1 == 2">x</failure>
</testcase>
<testcase classname="tests.test_gpu" name="test_c" time="0.0"><skipped message="needs CUDA"/></testcase>
</testsuite></testsuites>"""


def test_pytest_results_are_read_from_junit_xml_or_verbose_lines(tmp_path: Path) -> None:
    (tmp_path / "j.xml").write_text(JUNIT, encoding="utf-8")
    assert campaign.parse_junit(tmp_path / "j.xml") == {
        "tests/test_gpu.py::test_a": {"outcome": "passed", "seconds": 0.51, "message": None},
        "tests/test_gpu.py::test_b[compiled]": {"outcome": "failed", "seconds": 12.0, "message": "assert 1 == 2"},
        "tests/test_gpu.py::test_c": {"outcome": "skipped", "seconds": 0.0, "message": "needs CUDA"},
    }
    stdout = ("tests/test_gpu.py::test_a PASSED [ 33%]\ntests/test_gpu.py::test_b[compiled] FAILED [ 66%]\n"
              "collected 3 items\n")
    assert campaign.parse_verbose(stdout) == {
        "tests/test_gpu.py::test_a": {"outcome": "passed", "seconds": None, "message": None},
        "tests/test_gpu.py::test_b[compiled]": {"outcome": "failed", "seconds": None, "message": None},
    }


def test_a_subprocess_past_its_share_is_killed_and_reported() -> None:
    started = time.perf_counter()
    result = campaign.run_command([sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(30)"], 1.0)
    assert time.perf_counter() - started < 10
    assert result["timed_out"] and result["stdout"] == "hi\n"
    with pytest.raises(campaign.CommandFailed, match=r"^sleeper ran past its share of 1 s and was killed$"):
        campaign.require_ok(result, "sleeper", 1.0)


# ------------------------------------------------------------------------------------------- preparation


def _wheel(folder: Path, name: str, version: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    path.write_bytes(f"{name} {version}".encode())
    return path


def _archive(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        (path.parent / "a.txt").write_text("image", encoding="utf-8")
        tar.add(path.parent / "a.txt", arcname="train/cat/a.txt")
    return path


WANTED = {"cattrs": "26.2.1", "typing-extensions": "4.16.0"}


def test_prepare_fills_the_campaign_folder_and_names_the_device_command(tmp_path: Path) -> None:
    repo, house = tmp_path / "repo", tmp_path / "house"
    repo.mkdir()
    _wheel(house, "cattrs", "26.2.1")
    _wheel(house, "cattrs", "25.1.0")  # another version: not taken
    _wheel(house, "typing_extensions", "4.16.0")
    stale = _wheel(repo / ".campaign" / "wheels", "cattrs", "24.1.0")  # left from an earlier preparation
    archive = _archive(tmp_path / "images.tar.gz")
    r = prepare.prepare(repo, archive, house, WANTED)
    assert sorted(p.name for p in (repo / ".campaign" / "wheels").iterdir()) == [
        "cattrs-26.2.1-py3-none-any.whl", "typing_extensions-4.16.0-py3-none-any.whl"]
    assert not stale.exists()
    assert (repo / ".campaign" / "cifar10-jpeg.tar.gz").read_bytes() == archive.read_bytes()
    commit = json.loads((repo / ".campaign" / "commit.json").read_text(encoding="utf-8"))
    assert commit["commit"] is None and r["commit"] == commit  # not a git checkout
    assert r["carry"] == [".campaign"] and r["tree_mib"] == 0
    assert r["carried_mib"] == pytest.approx(sum(p.stat().st_size for p in (repo / ".campaign").rglob("*")
                                                 if p.is_file()) / 2**20)
    assert r["command"] == (
        "set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        "--target /tmp/site .campaign/wheels/*.whl && export PYTHONPATH=/tmp/site || exit; python3 -m pip install "
        "-q --no-index --no-deps --no-build-isolation -e . || exit; PYTHONUNBUFFERED=1 python3 "
        "benchmarks/gpu_campaign.py --out $OUT 2>&1 | tee $OUT/campaign.log")
    assert len(r["command"]) <= 2000  # the device tool's limit on a command


def test_prepare_refuses_a_missing_wheel_a_bad_archive_and_too_much_to_carry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, house = tmp_path / "repo", tmp_path / "house"
    repo.mkdir()
    _wheel(house, "cattrs", "26.2.1")
    archive = _archive(tmp_path / "images.tar.gz")
    with pytest.raises(SystemExit) as exc:
        prepare.prepare(repo, archive, house, WANTED)
    assert str(exc.value) == (f"error: no wheel in {house} for typing-extensions==4.16.0 (Python 3.12, manylinux "
                              "x86_64); download it by hand into that folder, or install another version here")
    _wheel(house, "typing_extensions", "4.16.0")
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(SystemExit) as exc:
        prepare.prepare(repo, tmp_path / "bad.tar.gz", house, WANTED)
    assert str(exc.value).startswith(f"error: {tmp_path / 'bad.tar.gz'}: not a readable tar archive (")
    with pytest.raises(SystemExit) as exc:
        prepare.prepare(repo, tmp_path / "nope.tar.gz", house, WANTED)
    assert str(exc.value).startswith(f"error: {tmp_path / 'nope.tar.gz'}: no such archive; pass --archive PATH")
    monkeypatch.setattr(prepare, "TRAVEL_LIMIT_MIB", 1e-6)
    with pytest.raises(SystemExit) as exc:
        prepare.prepare(repo, archive, house, WANTED)
    assert "MiB the device tool carries" in str(exc.value) and str(exc.value).startswith("error: ")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_prepare_in_a_git_checkout_needs_the_folder_ignored_and_records_the_commit(tmp_path: Path) -> None:
    repo, house = tmp_path / "repo", tmp_path / "house"
    repo.mkdir()
    for args in (["init", "-q"], ["config", "user.email", "t@t"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    (repo / "code.py").write_text("x = 1\n", encoding="utf-8")
    subprocess.run(["git", "add", "code.py"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "c"], cwd=repo, check=True)
    for name, version in WANTED.items():
        _wheel(house, name.replace("-", "_"), version)
    archive = _archive(tmp_path / "images.tar.gz")
    with pytest.raises(SystemExit) as exc:
        prepare.prepare(repo, archive, house, WANTED)
    assert str(exc.value) == (f"error: {repo / '.campaign'} is not ignored by git; add `.campaign/` to .gitignore "
                              "(else it travels twice: once as untracked files, once carried)")
    (repo / ".gitignore").write_text(".campaign/\n", encoding="utf-8")
    r = prepare.prepare(repo, archive, house, WANTED)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert r["commit"]["commit"] == head and r["commit"]["modified_files"] == 0
    assert r["tree_mib"] == pytest.approx((len("x = 1\n") + len(".campaign/\n")) / 2**20)


def test_the_carried_wheels_are_ctcores_requirements_without_the_gpu_machines_own_builds() -> None:
    import importlib.metadata as md

    wanted = prepare.carried_distributions()
    assert {"cattrs", "typer", "pydantic", "pydantic-core", "attrs", "pluggy", "rich", "setuptools"} <= set(wanted)
    assert not {"torch", "numpy", "scipy", "h5py", "pillow", "ctcore"} & set(wanted)
    assert all(md.version(name) == version for name, version in wanted.items())
