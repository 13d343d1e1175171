"""Built-in loggers: `jsonl` (the run's stats.jsonl, always on) and `tensorboard` (event files for TensorBoard)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs

from ctcore import hookimpl
from ctcore.components import BuildContext
from ctcore.errors import PackageUnavailable
from ctcore.reporting import log_record, open_stats

TENSORBOARD_INSTALL = "pip install 'ctcore[tensorboard]'"
FLUSH_SECS = 30
"""Pending TensorBoard events are written to disk at least this often (and when the run ends)."""


class Jsonl:
    """stats.jsonl in the run directory: one JSON object per line, non-finite floats as "nan" / "inf" strings."""

    name: ClassVar[str] = "jsonl"
    summary: ClassVar[str] = "stats.jsonl in the run directory, one JSON record per line (always on)"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options
        self.file = None

    def start(self, run_dir: Path, step: int, config: dict[str, Any]) -> None:
        self.file = open_stats(Path(run_dir))

    def log(self, record: dict[str, Any]) -> None:
        log_record(self.file, record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


SCALARS: dict[str | None, tuple[str, ...]] = {
    "distance": ("sliced_wasserstein",),
    "fid": ("fid", "inception_score"),
}
"""The record keys written as scalars, by the record's `event`, as eval/<key>. A training record (no event) has
every number but its step and time written as train/<key>: loss, lr, img_per_s and the objective's own fields
(num_scales and teacher_decay for consistency training)."""


class TensorBoard:
    """TensorBoard event files under <run dir>/tensorboard/: the logged scalars and each sample grid as an image."""

    name: ClassVar[str] = "tensorboard"
    summary: ClassVar[str] = "TensorBoard event files in <run dir>/tensorboard: scalars and sample grids"

    @attrs.frozen
    class Options:
        images: bool = True
        """Also write every sample grid (samples/*.png) as an image."""

    def __init__(self, options: Options, context: BuildContext) -> None:
        try:
            import tensorboard  # noqa: F401 - only whether it is installed; the writer is imported at start
        except ImportError:
            raise PackageUnavailable(
                "logging.backends: the 'tensorboard' logger needs the tensorboard package, which is not installed: "
                f"{TENSORBOARD_INSTALL} (or remove 'tensorboard' from logging.backends)") from None
        self.options = options
        self.writer = None

    def start(self, run_dir: Path, step: int, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events an earlier process logged after the step this run (re)starts from are dropped, as the
        # run logs those steps again (a restarted run, step 0, drops them all)
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=step + 1 if step else 0,
                                    flush_secs=FLUSH_SECS)

    def log(self, record: dict[str, Any]) -> None:
        event, step = record.get("event"), record.get("step")
        if not isinstance(step, int):
            return
        group = "train" if event is None else "eval"
        keys = [k for k in record if k not in ("step", "time")] if event is None else SCALARS.get(event, ())
        for key in keys:
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{key}", value, step, walltime=record.get("time"))
        if event == "samples" and self.options.images and record.get("path"):
            import numpy as np
            from PIL import Image

            with Image.open(record["path"]) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image("samples", pixels, step, walltime=record.get("time"), dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@hookimpl
def ctcore_register_loggers() -> list[type]:
    return [Jsonl, TensorBoard]
