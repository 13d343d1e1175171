"""What a run reports: stats.jsonl records, the progress bar and the FID plot (rank 0 only writes)."""

from __future__ import annotations

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


def progress_bar(enabled: bool, console):
    """The training progress bar (rich): step, loss, N(k), img/s and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("N(k) {task.fields[scales]}"),
        TextColumn("{task.fields[speed]} img/s"), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=False,
    )


def plot_fid(out_dir: Path) -> Path:
    """fid.png: FID over training from every `fid` event in stats.jsonl (so resumed runs show their history)."""
    from ctcore.images import save_line_plot

    rows = read_stats(out_dir)
    points = sorted((r["step"], r["fid"]) for r in rows if r.get("event") == "fid")
    return save_line_plot([p[0] for p in points], [p[1] for p in points], out_dir / "fid.png", "FID (eval EMA)")
