"""`ctcore report`: one figure of several runs' curves, a table (or JSON) of their final figures read robustly from
stats.jsonl, and one line with exit 2 for what is no run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import write_tiny_recipe
from PIL import Image
from typer.testing import CliRunner, Result

from ctcore.cli import app
from ctcore.images import PALETTE
from ctcore.reporting import stats_records


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def fake_run(folder: Path, name: str | None, lines: list[Any]) -> Path:
    """A run directory with a recipe.toml naming the run (None: none) and a stats.jsonl of these lines
    (dicts become JSON, str and bytes are written as they are)."""
    folder.mkdir(parents=True)
    if name is not None:
        (folder / "recipe.toml").write_text(f'[run]\nname = "{name}"\n')
    raw = b"".join((json.dumps(x).encode() if isinstance(x, dict) else x.encode() if isinstance(x, str) else x)
                   + b"\n" for x in lines)
    (folder / "stats.jsonl").write_bytes(raw.rstrip(b"\n") if lines and isinstance(lines[-1], str) else raw)
    return folder


def train(step: int, loss: Any, speed: float) -> dict[str, Any]:
    return {"time": 1.0, "step": step, "loss": loss, "num_scales": 11, "lr": 1e-3, "teacher_decay": 0.0,
            "img_per_s": speed}


A = [{"event": "distance", "step": 0, "sliced_wasserstein": 0.6},
     train(100, 2.5, 1000.0), train(200, 1.5, 3000.0),
     {"event": "checkpoint", "step": 200, "path": "x"},
     train(300, 9.0, 9.0),  # logged by a process killed before its checkpoint; the resumed run logs 300 again
     train(300, 1.25, 2000.0),
     b"\xff\xfe not json \x00",  # damaged bytes
     "[1, 2]",  # valid JSON, but no record
     {"event": "fid", "step": 300, "fid": 41.5, "inception_score": 7.25, "num_samples": 10, "steps": 1},
     {"event": "distance", "step": 300, "sliced_wasserstein": 0.05},
     '{"time": 9.0, "step": 400, "loss": 0.'  # cut short by a kill
     ]
B = [train(100, "nan", 500.0), train(200, 3.0, 700.0), train(300, "inf", 600.0)]


def test_report_of_two_runs_prints_their_final_figures_and_draws_one_figure(tmp_path: Path) -> None:
    a, b = fake_run(tmp_path / "a", "ict", A), fake_run(tmp_path / "b", None, B)
    figure = tmp_path / "out" / "figure.png"
    result = invoke("report", a, b, "-o", figure, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"run": "ict", "run_dir": str(a), "step": 300, "loss": 1.25, "sliced_wasserstein": 0.05, "fid": 41.5,
         "inception_score": 7.25, "img_per_s": 2000.0},
        {"run": "b", "run_dir": str(b), "step": 300, "loss": "inf", "sliced_wasserstein": None, "fid": None,
         "inception_score": None, "img_per_s": 600.0}]
    assert result.stderr == f"wrote the figure to {figure}\n"
    with Image.open(figure) as image:
        # five panels (loss, distance, FID, IS, img/s), two a row, under a legend of two lines
        assert image.size == (2 * 480, 16 * 2 + 12 + 3 * 300)
        colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert {PALETTE[0], PALETTE[1]} <= colours

    table = invoke("report", a, b, "-o", tmp_path / "t.webp")
    assert table.exit_code == 0, table.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in table.stdout.splitlines() if line.startswith("│")]
    assert rows == [["ict", "300", "1.25", "0.0500", "41.50", "7.25", "2,000"],
                    ["b", "300", "inf", "-", "-", "-", "600"]]
    assert table.stdout.endswith(f"wrote the figure to {tmp_path / 't.webp'}\n")
    assert (tmp_path / "t.webp").is_file()


def test_runs_sharing_a_name_are_told_apart_by_their_directories(tmp_path: Path) -> None:
    a, b = fake_run(tmp_path / "x" / "r", "same", A[:3]), fake_run(tmp_path / "y" / "r", "same", B)
    result = invoke("report", a, b, "--json")
    assert result.exit_code == 0, result.output
    assert [r["run"] for r in json.loads(result.stdout)] == [str(a), str(b)]
    with Image.open("report.png") as image:  # the default: report.png in the working directory
        assert image.size == (960, 16 * 2 + 12 + 2 * 300)  # loss, distance, img/s


def test_report_of_a_real_run(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "r.toml", tmp_path / "run")
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    result = invoke("report", tmp_path / "run", "--json", "-o", tmp_path / "r.png")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    training = [r for r in logged if "event" not in r]
    speeds = sorted(r["img_per_s"] for r in training)
    assert row == {"run": "tiny", "run_dir": str(tmp_path / "run"), "step": 12, "loss": training[-1]["loss"],
                   "sliced_wasserstein": [r for r in logged if r.get("event") == "distance"][-1]["sliced_wasserstein"],
                   "fid": None, "inception_score": None, "img_per_s": speeds[len(speeds) // 2]}


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "RUN_DIR '{d}' not found; give a run directory that `ctcore run` wrote (it holds stats.jsonl)"),
    ("file", "RUN_DIR '{d}' is not a directory; give a run directory that `ctcore run` wrote (it holds stats.jsonl)"),
    ("empty-dir", "RUN_DIR '{d}' has no stats.jsonl, so it is no run directory (or its run has not logged yet); give "
                  "a directory that `ctcore run` wrote"),
    ("no-records", "'{d}/stats.jsonl' holds no records yet; report the run once it has logged a step"),
    ("twice", "RUN_DIR '{d}' is given twice; name each run once"),
    ("suffix", "--output 'report.txt': give an image file name ending in .png (or .jpg, .webp)"),
])
def test_what_is_no_run_is_one_line_and_exit_2(tmp_path: Path, case: str, message: str) -> None:
    good = fake_run(tmp_path / "good", "good", A)
    d = tmp_path / "bad"
    args: list[object] = [good, d]
    if case == "file":
        d.write_text("")
    elif case == "empty-dir":
        d.mkdir()
    elif case == "no-records":
        fake_run(d, "x", ["", '{"event": "distance"}', '{"step": 1, "loss": '])
    elif case == "twice":
        d = good
        args = [good, tmp_path / "good"]
    elif case == "suffix":
        args = [good, "-o", "report.txt"]
    result = invoke("report", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == ["error: " + message.format(d=d)]
    assert result.stdout == "" and not Path("report.png").exists() and not Path("report.txt").exists()


def test_a_long_run_directory_is_printed_whole_at_80_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Table cells wrap instead of ending in an ellipsis, so a sweep point's directory can be read and copied."""
    monkeypatch.setenv("COLUMNS", "80")
    run = fake_run(tmp_path / "sweep" / "training.lr=1e-3,training.total_steps=60,metric.name=pseudo-huber", None, A)
    result = invoke("report", run, "-o", tmp_path / "r.png")
    assert result.exit_code == 0, result.output
    table = [line for line in result.stdout.splitlines() if line[:1] in "┏┃┡│└"]
    assert not [line for line in table if "…" in line or len(line) > 80], table
    assert run.name in "".join(line.split("│")[1].strip() for line in table if line.startswith("│"))


DAMAGED_LINES = {
    "nested-100000-deep": b'{"step": 250, "loss": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nested-object": b'{"a": ' * 100_000,
    "nul": b"\x00",
    "nuls-in-a-record": b'{"step": 250, "loss": 0.5\x00\x00}',
    "invalid-utf8": b'{"step": 250, "loss": 0.5, "note": "\xff\xfe\xc3"}',
    "utf16-bom": b"\xff\xfe{\x00",
    "5000-digit-loss": b'{"step": 250, "loss": ' + b"9" * 5000 + b"}",
    "400-digit-loss": b'{"step": 250, "loss": ' + b"9" * 400 + b', "img_per_s": 1e999}',
    "400-digit-step": b'{"step": ' + b"9" * 400 + b', "loss": 0.5}',
    "int64-overflow-step": b'{"step": 9223372036854775808, "loss": 0.5}',
    "negative-step": b'{"step": -1, "loss": 0.5}',
    "bool-step": b'{"step": true, "loss": 0.5}',
    "non-object": b"[250, 0.5]",
    "string": b'"step"',
    "fid-of-a-string": b'{"event": "fid", "step": 250, "fid": "forty", "inception_score": [1]}',
}


def test_damaged_stats_lines_of_any_kind_are_skipped_and_the_rest_reported(tmp_path: Path) -> None:
    """Each kind of damaged line between good records: exit 0 and exactly the good records' figures. The one
    readable records among them (step 250: a 400-digit loss, beyond the float range, is no figure, an infinite
    img/s is left out of the median; an FID that is a string is no figure) are kept."""
    lines: list[Any] = [train(100, 2.5, 1000.0)]
    for damaged in DAMAGED_LINES.values():
        lines += [damaged, train(200, 1.5, 3000.0)]
    lines += [{"event": "fid", "step": 300, "fid": 41.5, "inception_score": 7.25}, train(300, 1.25, 2000.0)]
    run = fake_run(tmp_path / "run", "damaged", lines)
    kept = [r["step"] for r in stats_records(run / "stats.jsonl")]
    readable = ("400-digit-loss", "fid-of-a-string")  # records with a valid step whose figures are damaged
    assert kept == [100, *(s for name in DAMAGED_LINES for s in ([250] if name in readable else []) + [200]), 300, 300]
    result = invoke("report", run, "--json", "-o", tmp_path / "r.png")
    assert "Traceback" not in result.output
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"run": "damaged", "run_dir": str(run), "step": 300, "loss": 1.25, "sliced_wasserstein": None, "fid": 41.5,
         "inception_score": 7.25, "img_per_s": 2000.0}]
    assert (tmp_path / "r.png").is_file()


def test_a_recipe_toml_nested_too_deeply_names_the_run_by_its_directory(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "deep", None, [train(100, 2.5, 1000.0)])
    (run / "recipe.toml").write_text("[run]\nname = " + "[" * 100_000 + "\n")
    result = invoke("report", run, "--json", "-o", tmp_path / "r.png")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["run"] == "deep"


def test_the_fid_plot_skips_damaged_fid_records(tmp_path: Path) -> None:
    """fid.png (drawn during training) from the readable finite FIDs alone: a string, a list, "nan", a 400-digit
    number and a deeply nested line are skipped."""
    from ctcore.reporting import plot_fid

    fid = {"event": "fid", "step": 100, "fid": 50.0}
    run = fake_run(tmp_path / "run", "fid", [fid, {**fid, "step": 200, "fid": "forty"}, {**fid, "fid": [1]},
                                             {**fid, "step": 300, "fid": "nan"},
                                             b'{"event": "fid", "step": 400, "fid": ' + b"9" * 400 + b"}",
                                             DAMAGED_LINES["nested-100000-deep"], {**fid, "step": 500, "fid": 40.0}])
    assert plot_fid(run) == run / "fid.png"
    with Image.open(run / "fid.png") as image:
        assert image.size == (480, 300)


# ------------------------------------------------------------------------------------------------ the figure


def charted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[Any], list[str]]]:
    """The (panels, names) each `save_curves` call gets from `ctcore report`; the figure is still drawn."""
    import ctcore.images

    calls = []
    real = ctcore.images.save_curves

    def spy(panels: list[Any], names: list[str], path: Path, xlabel: str = "step") -> Path:
        calls.append((panels, names))
        return real(panels, names, path, xlabel)

    monkeypatch.setattr(ctcore.images, "save_curves", spy)
    return calls


def kind_run(folder: Path, name: str, objective: str | None, lines: list[Any]) -> Path:
    """A fake run whose recipe.toml names `objective` ([objective] left out when None: the default one)."""
    run = fake_run(folder, name, lines)
    if objective is not None:
        (run / "recipe.toml").write_text(f'[run]\nname = "{name}"\n\n[objective]\nname = "{objective}"\n')
    return run


def test_consistency_and_diffusion_losses_get_a_log_scale_panel_each(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A consistency loss (3e-2 down to 7.5e-4) and a diffusion loss (40 down to 1) on separate log-scale panels,
    with 1, 2, 5 ticks per decade and the steps as 5k ... 40k; a loss of nan, 0, -1 or inf is left out of the
    chart (and of its scale) but stays in the table."""
    from ctcore.images import panel_layout

    ict_loss = [(1000 * k, 3e-2 / k) for k in range(1, 41)]
    edm_loss = [(1000 * k, 40 / k) for k in range(1, 41)]
    bad = [(41_000, "nan"), (42_000, 0.0), (43_000, -1.0), (44_000, "inf")]
    distance = [(0, 0.6), (20_000, 0.1), (40_000, 0.02)]
    ict = kind_run(tmp_path / "ict", "ict", None, [
        *({"event": "distance", "step": s, "sliced_wasserstein": v} for s, v in distance),
        *(train(s, v, 5000.0) for s, v in ict_loss + bad)])
    edm = kind_run(tmp_path / "edm", "edm", "edm", [train(s, v, 4000.0) for s, v in edm_loss])
    calls = charted(monkeypatch)
    result = invoke("report", ict, edm, "-o", tmp_path / "r.png", "--json")
    assert result.exit_code == 0, result.output
    assert [r["loss"] for r in json.loads(result.stdout)] == ["inf", 1.0]
    [(panels, names)] = calls
    assert names == ["ict", "edm"]
    assert [p.title for p in panels] == ["loss of the consistency runs (mean of each log interval)",
                                         "loss of the diffusion runs (mean of each log interval)",
                                         "sliced Wasserstein distance to the data", "training speed (img/s)"]
    nan, inf = float("nan"), float("inf")
    logged_ict = [*ict_loss, (41_000, nan), (42_000, 0.0), (43_000, -1.0), (44_000, inf)]
    assert repr(panels[0].series) == repr([logged_ict, []]) and panels[1].series == [[], edm_loss]
    assert [(p.log_y, p.markers) for p in panels] == [(True, False), (True, False), (True, True), (False, False)]
    consistency, diffusion = panel_layout(panels[0]), panel_layout(panels[1])
    assert consistency.series == [ict_loss, []]  # nan, 0, -1 and inf left out
    assert consistency.y is not None and (consistency.y.lo, consistency.y.hi, consistency.y.log) == (7.5e-4, 3e-2, True)
    assert [label for _, label in consistency.y.ticks] == ["0.001", "0.002", "0.005", "0.01", "0.02"]
    assert diffusion.y is not None and (diffusion.y.lo, diffusion.y.hi) == (1.0, 40.0)
    assert [label for _, label in diffusion.y.ticks] == ["1", "2", "5", "10", "20"]
    assert consistency.x is not None and not consistency.x.log
    assert [label for _, label in consistency.x.ticks] == ["5k", "10k", "15k", "20k", "25k", "30k", "35k", "40k"]
    with Image.open(tmp_path / "r.png") as image:
        assert image.size == (2 * 480, 16 * 2 + 12 + 2 * 300)

    calls.clear()  # runs of one kind: one loss panel
    other = kind_run(tmp_path / "ct", "ct", "consistency", [train(s, v, 5000.0) for s, v in ict_loss])
    assert invoke("report", ict, other, "-o", tmp_path / "r.png").exit_code == 0
    assert [p.title for p in calls[0][0]][0] == "loss (mean of each log interval)"
    assert repr(calls[0][0][0].series) == repr([logged_ict, ict_loss]) and calls[0][0][0].log_y


@pytest.mark.parametrize("count", [1, 2, 12])
def test_the_distance_curve_has_a_marker_at_each_of_its_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               count: int) -> None:
    """However many `distance` events a run logged, the chart's data are exactly those events, on a log scale,
    each drawn as a marker (a disc: the four pixels 2 px left, right, above and below its centre are the run's
    colour, which a line 2 px wide through the point would not all colour); a single point sits in the middle."""
    from ctcore.images import PANEL_SIZE, chart_pixel, panel_layout

    events = [(1000 * k, 0.5 / (k + 1)) for k in range(count)]
    run = fake_run(tmp_path / "run", "r", [*({"event": "distance", "step": s, "sliced_wasserstein": v}
                                             for s, v in events), train(100, 1.0, 10.0)])
    calls = charted(monkeypatch)
    assert invoke("report", run, "-o", tmp_path / "r.png").exit_code == 0
    [(panels, _)] = calls
    [chart] = [(i, p) for i, p in enumerate(panels) if p.title == "sliced Wasserstein distance to the data"]
    index, panel = chart
    assert panel.series == [events] and panel.markers and panel.log_y
    layout = panel_layout(panel)
    origin = (PANEL_SIZE[0] * (index % 2), 16 + 12 + PANEL_SIZE[1] * (index // 2))
    with Image.open(tmp_path / "r.png") as image:
        rgb = image.convert("RGB")
        for x, y in events:
            px, py = chart_pixel(layout, x, y, origin)
            assert all(rgb.getpixel((round(px) + dx, round(py) + dy)) == PALETTE[0]
                       for dx, dy in ((-2, 0), (2, 0), (0, -2), (0, 2))), (x, y)
    if count == 1:
        px, py = chart_pixel(layout, *events[0])
        assert (round(px), round(py)) == (64 + 6 + 194, 28 + 6 + 112)  # the middle of the 388 x 224 plot area


@pytest.mark.parametrize(("lo", "hi", "log", "number_format", "along_x", "labels"), [
    (1e-4, 3e-2, True, "number", False, ["1e-4", "2e-4", "5e-4", "1e-3", "2e-3", "5e-3", "1e-2", "2e-2"]),
    (1e-8, 1e4, True, "number", False, ["1e-8", "1e-6", "1e-4", "1e-2", "1e0", "1e2", "1e4"]),
    (0.3, 0.5, True, "number", False, ["0.3", "0.4", "0.5"]),
    (0.03, 0.034, True, "number", False, ["0.03", "0.031", "0.032", "0.033", "0.034"]),  # no 2 in 1 ... 9 x 10^e
    (0.6, 0.6, True, "number", False, ["0.2", "0.5", "1"]),  # one value: a range around it
    (0.002, 80, True, "number", True, ["0.01", "0.1", "1", "10"]),
    (0, 400_000, False, "count", True, ["0", "100k", "200k", "300k", "400k"]),
    (100, 1_500_000, False, "count", True, ["200k", "400k", "600k", "800k", "1M", "1.2M", "1.4M"]),
    (0, 12, False, "count", True, ["0", "2", "4", "6", "8", "10", "12"]),
    (500, 500, False, "count", True, ["300", "400", "500", "600", "700"]),
    (0, 0, False, "count", True, ["0", "1"]),  # no negative step
    (1000, 25_000, False, "count", False, ["5k", "10k", "15k", "20k", "25k"]),
    (1_000_000, 1_000_007, False, "count", True, ["1M", "1.000002M", "1.000004M", "1.000006M"]),
    (0, 400_000, False, "count", 100, ["0", "200k", "400k"]),  # a narrow chart: fewer ticks, no overlap
    (1e-4, 1e-2, True, "number", -40, ["1e-4", "1e-3", "1e-2"]),  # a low one (40 px)
])
def test_axis_ticks_are_readable(lo: float, hi: float, log: bool, number_format: str, along_x: bool | int,
                                 labels: list[str]) -> None:
    """2 to 8 ticks inside the range, labels in one style per axis (decades, then 1, 2, 5 per decade on a log
    axis; 10k for thousands of steps), and no two labels overlapping at the chart's size (or at a length in pixels:
    positive along x, negative along y)."""
    from ctcore.images import MAX_TICKS, axis_for, plot_area, text_width

    length = plot_area()[0 if along_x else 1]
    if along_x not in (True, False):
        length, along_x = abs(along_x), along_x > 0
    axis = axis_for(lo, hi, log, number_format, length, along_x)
    assert [label for _, label in axis.ticks] == labels
    assert 2 <= len(axis.ticks) <= MAX_TICKS and all(axis.lo <= v <= axis.hi for v, _ in axis.ticks)
    at = [axis.fraction(v) * length for v, _ in axis.ticks]
    for a, b, la, lb in zip(at, at[1:], labels, labels[1:], strict=False):
        assert b - a >= ((text_width(la) + text_width(lb)) / 2 if along_x else 11), (la, lb)


def test_a_chart_with_nothing_to_draw_on_its_log_scale_is_drawn_empty(tmp_path: Path) -> None:
    """Losses that are all nan, inf, 0 or negative: no axis, no point, and the figure is still written."""
    from ctcore.images import Panel, panel_layout, save_curves

    panel = Panel("loss", [[(1, float("nan")), (2, 0.0), (3, -1.0), (4, float("inf"))]], log_y=True)
    assert panel_layout(panel).x is None and panel_layout(panel).series == [[]]
    save_curves([panel], ["r"], tmp_path / "r.png")
    with Image.open(tmp_path / "r.png") as image:
        assert image.size == (480, 16 + 12 + 300)
