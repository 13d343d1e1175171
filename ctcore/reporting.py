"""What a run reports: stats.jsonl records, the progress bar (or plain progress lines) and the FID plot
(rank 0 only writes)."""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path
from typing import Any


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
    """The records of stats.jsonl; a line cut short by a killed run is skipped."""
    rows = []
    for line in (out_dir / "stats.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def log_record(stats, record: dict[str, Any]) -> None:
    """Append one JSON line to stats.jsonl (rank 0 only: other ranks pass None)."""
    if stats is None:
        return
    # strict JSON: a non-finite number is written as the string "nan" / "inf" / "-inf"
    record = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    stats.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
    stats.flush()


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


def progress_line(step: int, end: int, loss: float, num_scales: int, img_per_s: float, eta_seconds: float) -> str:
    """One plain progress line, e.g. `step 400/4000  loss 3.412  N(k) 81  15,120 img/s  ETA 0:00:54`."""
    return (f"step {step}/{end}  loss {loss:.4g}  N(k) {num_scales}  {img_per_s:,.0f} img/s  "
            f"ETA {_duration(eta_seconds)}")


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


def plot_fid(out_dir: Path) -> Path:
    """fid.png: FID over training from every `fid` event in stats.jsonl (so resumed runs show their history)."""
    from ctcore.images import save_line_plot

    rows = read_stats(out_dir)
    points = sorted((r["step"], r["fid"]) for r in rows if r.get("event") == "fid")
    return save_line_plot([p[0] for p in points], [p[1] for p in points], out_dir / "fid.png", "FID (eval EMA)")
