"""Built-in loggers: `jsonl` (the run's stats.jsonl, always on), `tensorboard` (event files for TensorBoard) and
`wandb` (a Weights & Biases run)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import attrs

from ctcore import hookimpl
from ctcore.components import BuildContext, one_of, requirement
from ctcore.errors import PackageUnavailable
from ctcore.reporting import log_record, open_stats

TENSORBOARD_INSTALL = "pip install 'ctcore[tensorboard]'"
WANDB_INSTALL = "pip install 'ctcore[wandb]'"
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


def scalars(record: dict[str, Any]) -> dict[str, int | float]:
    """The numbers of a record that the tensorboard and wandb loggers write, by tag (`train/<key>`, `eval/<key>`,
    see `SCALARS`); nothing for a record without an integer step."""
    event = record.get("event")
    if not isinstance(record.get("step"), int):
        return {}
    group = "train" if event is None else "eval"
    keys = [k for k in record if k not in ("step", "time")] if event is None else SCALARS.get(event, ())
    return {f"{group}/{key}": value for key in keys
            if isinstance(value := record.get(key), int | float) and not isinstance(value, bool)}


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
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step, walltime=record.get("time"))
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


WANDB_MODES = ("online", "offline", "disabled")
WANDB_RUN_ID = "ctcore-run-id"
"""The file in <run dir>/wandb that keeps the wandb run's id, so that a resumed ctcore run continues that run."""
_WANDB_FORBIDDEN = "/\\#?%:"
"""Characters W&B refuses in project and entity names."""


def _wandb_name(empty: bool):
    """Validator of a W&B project or entity name: at most 128 characters, none of / \\ # ? % : or a control one."""
    return requirement(lambda v: (empty or v != "") and len(v) <= 128 and v.isprintable()
                       and not any(ch in v for ch in _WANDB_FORBIDDEN),
                       f"must be {'empty or ' if empty else ''}a W&B name ({'at most' if empty else '1 to'} 128 "
                       f"printable characters, none of / \\ # ? % :)")


class WandB:
    """A Weights & Biases run named after the ctcore run: the logged scalars against the training step, each sample
    grid as an image, and the resolved recipe as its config, with its files under <run dir>/wandb. A resumed run
    continues the same W&B run. A W&B failure is one warning line, then this logger stops and the run goes on."""

    name: ClassVar[str] = "wandb"
    summary: ClassVar[str] = "Weights & Biases run (files in <run dir>/wandb): scalars, sample grids, the recipe"

    @attrs.frozen
    class Options:
        project: str = attrs.field(default="ctcore", validator=_wandb_name(empty=False))
        """The W&B project the run goes to."""
        entity: str = attrs.field(default="", validator=_wandb_name(empty=True))
        """The W&B user or team that owns the project ("": your default entity)."""
        mode: Literal["online", "offline", "disabled"] = attrs.field(default="online",
                                                                     validator=one_of(*WANDB_MODES))
        """online: stream to W&B; offline: write the run under <run dir>/wandb only, to upload later with `wandb sync`;
        disabled: log nothing. The WANDB_MODE environment variable, when set, overrides it."""
        images: bool = True
        """Also log every sample grid (samples/*.png) as an image."""

    def __init__(self, options: Options, context: BuildContext) -> None:
        try:
            import wandb  # noqa: F401 - only whether it is installed
        except ImportError:
            raise PackageUnavailable(
                "logging.backends: the 'wandb' logger needs the wandb package, which is not installed: "
                f"{WANDB_INSTALL} (or remove 'wandb' from logging.backends)") from None
        self.options = options
        self.run: Any = None

    def start(self, run_dir: Path, step: int, config: dict[str, Any]) -> None:
        mode = os.environ.get("WANDB_MODE") or self.options.mode
        if mode == "disabled":
            return
        try:
            import wandb

            from ctcore.files import atomic_write

            id_file = Path(run_dir) / "wandb" / WANDB_RUN_ID
            # a run that resumes from a checkpoint continues its W&B run; one that starts at step 0 starts a new one
            resumed = step > 0 and id_file.is_file()
            run_id = id_file.read_text(encoding="utf-8").strip() if resumed else None
            # console "off": wandb leaves stdout and stderr alone (the progress bar, ctcore's messages)
            self.run = wandb.init(project=self.options.project, entity=self.options.entity or None,
                                  name=config.get("run", {}).get("name"), id=run_id,
                                  resume="allow" if resumed else None, dir=str(run_dir), mode=mode,
                                  settings=wandb.Settings(console="off"))
            if not resumed:
                with atomic_write(id_file) as tmp:
                    tmp.write_text(self.run.id + "\n", encoding="utf-8")
            self.run.config.update(config, allow_val_change=True)  # a resume may have changed settings
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")  # charts against the training step
        except Exception as exc:  # never stop training for the tracker: say so once and log nowhere
            self._stop(f"starting at step {step:,}", exc)

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        step = record.get("step")
        try:
            values: dict[str, Any] = scalars(record)
            if record.get("event") == "samples" and self.options.images and record.get("path"):
                import wandb

                values["samples"] = wandb.Image(str(record["path"]))
            if values and isinstance(step, int):
                self.run.log({"step": step, **values})
        except Exception as exc:
            self._stop(f"at step {step:,}" if isinstance(step, int) else "logging", exc)

    def close(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish()
            except Exception as exc:
                self._stop("closing", exc, ended=True)

    def _stop(self, when: str, exc: Exception, ended: bool = False) -> None:
        """One warning line on stderr; this logger logs nothing more, and its W&B run ends marked as failed."""
        run, self.run = self.run, None
        text = " ".join(str(exc).split())
        after = "" if ended else " and stops; training goes on, and"
        print(f"warning: the wandb logger failed {when} ({type(exc).__name__}{': ' + text if text else ''})"
              f"{after or ';'} stats.jsonl and the other loggers keep every record", file=sys.stderr)
        if run is not None:
            with contextlib.suppress(Exception):  # already reported
                run.finish(exit_code=1)


@hookimpl
def ctcore_register_loggers() -> list[type]:
    return [Jsonl, TensorBoard, WandB]
