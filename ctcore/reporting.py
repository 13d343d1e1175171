"""What a run reports: stats.jsonl records, the progress bar (or plain progress lines) and the FID plot
(rank 0 only writes)."""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ctcore.recipe import Recipe
    from ctcore.registry import Registry


def open_stats(out_dir: Path):
    """stats.jsonl for appending; a line cut short by a killed run is ended first, so the next one stays whole."""
    path = out_dir / "stats.jsonl"
    stats = open(path, "a+b")  # noqa: SIM115 - the caller closes it
    if stats.tell() > 0:
        stats.seek(-1, 2)
        if stats.read(1) != b"\n":
            stats.write(b"\n")
    stats.close()
    return open(path, "a", encoding="utf-8")


def read_stats(out_dir: Path) -> list[dict[str, Any]]:
    """The records of a run directory's stats.jsonl (see `stats_records`: cut or damaged lines are skipped)."""
    return stats_records(out_dir / "stats.jsonl")


def log_record(stats, record: dict[str, Any]) -> None:
    """Append one JSON line to stats.jsonl (rank 0 only: other ranks pass None)."""
    if stats is None:
        return
    # strict JSON: a non-finite number is written as the string "nan" / "inf" / "-inf"
    record = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    stats.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
    stats.flush()


def build_loggers(recipe: Recipe, registry: Registry) -> list[Any]:
    """One instance per logger of logging.backends (jsonl first), built with its options; writes nothing.

    A logger that cannot work here (its package is missing) raises UsageError: `check`, and a run before it
    claims its directory, build them first so that such a recipe is refused before anything is written."""
    from ctcore.components import LOGGER, BuildContext
    from ctcore.data import data_shape
    from ctcore.errors import CtcoreError, UsageError

    context = BuildContext(data_shape=data_shape(recipe.data), num_classes=recipe.data.num_classes,
                           total_steps=recipe.training.total_steps)
    built = []
    for name in recipe.logging.backends:
        cls = registry.get(LOGGER, name)
        options = recipe.loggers.get(name) or cls.Options()
        try:
            built.append(cls(options, context))
        except CtcoreError as exc:
            raise UsageError(f"{recipe.source}: {exc.message}") from None
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{recipe.source}: cannot build logger {name!r}: {exc}") from None
    return built


class RunLog:
    """A run's loggers (rank 0): each record, stamped with the time, goes to every one of them; other ranks get
    a RunLog without loggers, which logs nowhere."""

    def __init__(self, loggers: list[Any] | None = None) -> None:
        self.loggers = list(loggers or [])

    @classmethod
    def start(cls, loggers: list[Any], run_dir: Path, step: int, config: dict[str, Any]) -> RunLog:
        """Start every logger in order; when one fails, those already started are closed again."""
        log = cls()
        try:
            for logger in loggers:
                logger.start(run_dir, step, config)
                log.loggers.append(logger)
        except BaseException:
            log.close(quiet=True)
            raise
        return log

    def __call__(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        for logger in self.loggers:
            logger.log(record)

    def close(self, quiet: bool = False) -> None:
        """Close every logger, each even when one before it fails; the first failure is raised unless `quiet`
        (set while another exception is on its way out, which is the better report)."""
        failure = None
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:
                failure = failure or exc
        self.loggers = []
        if failure is not None and not quiet:
            raise failure


def is_live(console) -> bool:
    """Whether a rich console can redraw a bar in place (a terminal or a notebook), unlike a log file."""
    return bool(console.is_terminal or console.is_jupyter)


def progress_bar(enabled: bool, console):
    """The training progress bar (rich): step, loss, N(k), img/s and ETA. Shown only where it can redraw
    itself; elsewhere (a log, a SLURM file) the loop prints a `progress_line` at each log interval instead."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("N(k) {task.fields[scales]}"),
        TextColumn("{task.fields[speed]} img/s"), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not (enabled and is_live(console)), transient=False,
    )


def _duration(seconds: float) -> str:
    """H:MM:SS, as rich's bar shows the time remaining."""
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


def progress_line(step: int, end: int, loss: float, num_scales: int | None, img_per_s: float,
                  eta_seconds: float) -> str:
    """One plain progress line, e.g. `step 400/4000  loss 3.412  N(k) 81  15,120 img/s  ETA 0:00:54` (no N(k)
    for an objective without a curriculum)."""
    scales = "" if num_scales is None else f"N(k) {num_scales}  "
    return f"step {step}/{end}  loss {loss:.4g}  {scales}{img_per_s:,.0f} img/s  ETA {_duration(eta_seconds)}"


class LineProgress:
    """The part of rich's Progress that ctcore's bars use, for where stderr cannot redraw a bar: one plain
    line per task, `description done/total  ETA h:mm:ss`, every `interval` seconds and when the task completes."""

    def __init__(self, console, interval: float = 30.0) -> None:
        self.console, self.interval = console, interval
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_fields: Any) -> int:
        now = time.perf_counter()
        self.tasks.append({"description": description, "total": total, "completed": completed, "start": now,
                           "printed": now, "done": False})
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, **_fields: Any) -> None:
        task, now = self.tasks[task_id], time.perf_counter()
        task["total"] = total if total is not None else task["total"]
        task["completed"] = completed if completed is not None else task["completed"] + (advance or 0)
        done, total = task["completed"], task["total"]
        finished = total is not None and done >= total
        if task["done"] or not (finished or now - task["printed"] >= self.interval):
            return
        task["printed"], task["done"] = now, finished
        line = f"{task['description']} {done:,.0f}" + (f"/{total:,.0f}" if total is not None else "")
        if total is not None and done > 0:
            line += f"  ETA {_duration((total - done) * (now - task['start']) / done)}"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def stderr_progress(enabled: bool, description: str, total: int):
    """(bar, task) of one counted task on stderr, for the commands that sample or score (`eval`, `sample`, `edit`,
    `eval-ref-stats`): a rich bar where stderr can redraw it, else a plain `LineProgress` line every 30 s and at the
    end (logs, SLURM files); nothing when not `enabled`. Advance it with `bar.advance(task, n)` inside `with bar:`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if enabled and not is_live(console):
        bar = LineProgress(console)
    else:
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                       TimeRemainingColumn(), console=console, disable=not enabled, transient=False)
    return bar, bar.add_task(description, total=total)


def plot_fid(out_dir: Path) -> Path:
    """fid.png: FID over training from every `fid` event in stats.jsonl (so resumed runs show their history)."""
    from ctcore.images import save_line_plot

    rows = read_stats(out_dir)
    points = sorted((r["step"], fid) for r in rows if r.get("event") == "fid"
                    and (fid := _number(r.get("fid"))) is not None and math.isfinite(fid))
    return save_line_plot([p[0] for p in points], [p[1] for p in points], out_dir / "fid.png", "FID (eval EMA)")


# ------------------------------------------------------------------------------------------- ctcore report

REPORT_SERIES: tuple[tuple[str, str | None, str], ...] = (
    ("loss", None, "loss (mean of each log interval)"),
    ("sliced_wasserstein", "distance", "sliced Wasserstein distance to the data"),
    ("fid", "fid", "FID (eval EMA)"),
    ("inception_score", "fid", "Inception Score (eval EMA)"),
    ("img_per_s", None, "training speed (img/s)"),
)
"""(record key, the records' `event` (None: training records), panel title) of every curve `ctcore report` draws."""

CHART_STYLES: dict[str, dict[str, Any]] = {
    "loss": {"log_y": True},  # a diffusion loss is some 10^4 times a consistency loss, and both fall by decades
    "sliced_wasserstein": {"log_y": True, "markers": True},  # a point per `distance` event
    "fid": {"markers": True},
    "inception_score": {"markers": True},
    "img_per_s": {"y_format": "count"},
}
"""How each REPORT_SERIES key is charted: `ctcore.images.Panel` options."""


def _number(value: Any) -> float | None:
    """A logged number as a float: "nan" / "inf" / "-inf" are how stats.jsonl writes non-finite ones."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range (JSON allows 4,300 digits) is no logged figure
            return None
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


MAX_LOGGED_STEP = 2**63 - 1
"""A record's step is a count a checkpoint stores as int64; a larger one (or a negative one) is a damaged record."""


def stats_records(path: Path) -> list[dict[str, Any]]:
    """Every whole record of a stats.jsonl: a line cut short by a kill, damaged bytes, JSON nested too deeply to
    read, a number of more digits than Python reads, a non-object or a record without a valid step is skipped."""
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # ValueError: also invalid UTF-8 and over-long integers
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= MAX_LOGGED_STEP:
            rows.append(row)
    return rows


def logged_distance(out_dir: Path, step: int) -> tuple[int, float] | None:
    """(step, distance) of the last finite `distance` record at or before `step` in a run's stats.jsonl, or None
    (none there, or no stats.jsonl): what a resumed run's summary compares its end with."""
    path = Path(out_dir) / "stats.jsonl"
    if not path.is_file():
        return None
    found = None
    for row in stats_records(path):
        value = _number(row.get("sliced_wasserstein"))
        if (row.get("event") == "distance" and row["step"] <= step and value is not None and math.isfinite(value)
                and (found is None or row["step"] >= found[0])):
            found = (row["step"], value)
    return found


def run_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Each REPORT_SERIES key's (step, value) points, by step; a step logged twice (a resumed run logs again the
    steps after its last checkpoint) keeps its last value."""
    from ctcore.errors import UsageError, path_not_found

    run_dir = Path(run_dir)
    fix = "give a run directory that `ctcore run` wrote (it holds stats.jsonl)"
    if not run_dir.exists():
        raise UsageError(path_not_found(f"RUN_DIR {str(run_dir)!r}", run_dir, fix))
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {str(run_dir)!r} is not a directory; {fix}")
    stats = run_dir / "stats.jsonl"
    if not stats.is_file():
        raise UsageError(f"RUN_DIR {str(run_dir)!r} has no stats.jsonl, so it is no run directory (or its run has "
                         "not logged yet); give a directory that `ctcore run` wrote")
    records = stats_records(stats)
    if not records:
        raise UsageError(f"{str(stats)!r} holds no records yet; report the run once it has logged a step")
    return _curves(records)


def _curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, dict[int, float]] = {key: {} for key, _, _ in REPORT_SERIES}
    for row in records:
        for key, event, _ in REPORT_SERIES:
            value = _number(row.get(key))
            if row.get("event") == event and value is not None:
                curves[key][row["step"]] = value
    return {key: sorted(points.items()) for key, points in curves.items()}


def run_name(run_dir: Path) -> str:
    """The run's run.name from its recipe.toml, or the directory's name when that cannot be read."""
    import tomllib

    try:
        name = tomllib.loads((Path(run_dir) / "recipe.toml").read_text(encoding="utf-8"))["run"]["name"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):  # ValueError: bad UTF-8 or TOML
        name = None
    return name if isinstance(name, str) and name else Path(run_dir).resolve().name


def _final_row(name: str, run_dir: Path, curves: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    speeds = sorted(v for _, v in curves["img_per_s"] if math.isfinite(v))
    steps = [s for points in curves.values() for s, _ in points]

    def last(key: str) -> float | None:
        return curves[key][-1][1] if curves[key] else None

    return {"run": name, "run_dir": str(run_dir), "step": max(steps) if steps else 0, "loss": last("loss"),
            "sliced_wasserstein": last("sliced_wasserstein"), "fid": last("fid"),
            "inception_score": last("inception_score"),
            "img_per_s": speeds[len(speeds) // 2] if speeds else None}


def objective_kind(run_dir: Path, registry: Registry | None = None) -> str | None:
    """The kind of model a run trains: its objective's `model` ("consistency", "diffusion") by the objective its
    recipe.toml names (DEFAULT_OBJECTIVE when it names none); the objective's name when no installed plugin
    provides it (or no registry is given); None when recipe.toml cannot be read."""
    import tomllib

    from ctcore.components import DEFAULT_OBJECTIVE

    try:
        recipe = tomllib.loads((Path(run_dir) / "recipe.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: bad UTF-8 or TOML
        return None
    section = recipe.get("objective", {})
    name = section.get("name", DEFAULT_OBJECTIVE) if isinstance(section, dict) else None
    if not isinstance(name, str) or not name:
        return None
    if registry is not None and name in registry.names("objective"):
        return str(getattr(registry.get("objective", name), "model", name))
    return name


def report_panels(curves: list[dict[str, list[tuple[int, float]]]], kinds: list[str | None]) -> list[Any]:
    """The charts of `ctcore report` (`ctcore.images.Panel`, one series per run): every REPORT_SERIES key some run
    logged, styled as CHART_STYLES says; the loss once per kind of model (`objective_kind`) when the runs train
    several, so that a diffusion loss does not flatten a consistency loss 10^4 times smaller."""
    from ctcore.images import Panel

    panels = []
    groups = list(dict.fromkeys(kinds))
    for key, _, title in REPORT_SERIES:
        series = [c[key] for c in curves]
        if not any(series):
            continue
        if key != "loss" or len(groups) == 1:
            panels.append(Panel(title, series, **CHART_STYLES[key]))
            continue
        for kind in groups:
            mine = [points if k == kind else [] for points, k in zip(series, kinds, strict=True)]
            if any(mine):
                runs = f"the {kind} runs" if kind is not None else "the runs without a readable recipe.toml"
                panels.append(Panel(f"loss of {runs} (mean of each log interval)", mine, **CHART_STYLES[key]))
    return panels


def final_figures(run_dir: Path) -> dict[str, Any] | None:
    """A run's last step, loss, distance, FID and IS and its median img/s, as `ctcore report`'s table has them
    (a sweep's closing table); None when its stats.jsonl is missing, unreadable or holds no record."""
    try:
        records = stats_records(Path(run_dir) / "stats.jsonl")
    except OSError:
        return None
    return _final_row(run_name(run_dir), run_dir, _curves(records)) if records else None


REPORT_INPUTS = ("stats.jsonl", "recipe.toml")
"""The files of a run directory `ctcore report` reads."""


def run_report(run_dirs: list[Path], figure: Path, registry: Registry | None = None) -> list[dict[str, Any]]:
    """`ctcore report`: one figure of every run's curves against steps (`report_panels`; `registry` tells the kind
    of model each run's objective trains), and one row of final figures per run (the last logged loss, distance,
    FID and Inception Score, the median img/s). Legends name runs by run.name, or by their directory where two
    runs share a name."""
    from ctcore.errors import UsageError
    from ctcore.files import refuse_writing_inputs
    from ctcore.images import check_image_path, save_curves

    check_image_path(figure, "--output")
    seen: set[Path] = set()
    for run_dir in run_dirs:
        if Path(run_dir).resolve() in seen:
            raise UsageError(f"RUN_DIR {str(run_dir)!r} is given twice; name each run once")
        seen.add(Path(run_dir).resolve())
    refuse_writing_inputs([("--output", figure)], [("the run's", Path(d) / name) for d in run_dirs
                                                    for name in REPORT_INPUTS])
    curves = [run_curves(d) for d in run_dirs]
    names = [run_name(d) for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    save_curves(report_panels(curves, [objective_kind(d, registry) for d in run_dirs]), names, figure)
    return [_final_row(n, d, c) for n, d, c in zip(names, run_dirs, curves, strict=True)]
