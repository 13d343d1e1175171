"""The `ctcore` command line: run, check, sample, list-components.

Heavy imports (torch, the registry) happen inside commands so `ctcore --help` is instant. Expected failures
print one clear message and exit 1 (runtime) or 2 (recipe and usage errors), never a traceback.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperGroup

MAX_COUNT = 10**9
"""Upper bound of sample counts on the command line: far beyond any real use, and small enough that nothing
derived from it overflows (memory is estimated separately, before anything is allocated)."""
MAX_SEED = 2**63 - 1 - MAX_COUNT
"""Sample j uses seed + j, which the sample store keeps as int64 (and torch.Generator.manual_seed takes below
2**64): seed + num_samples - 1 must fit in int64."""
MAX_BATCH = 2**16
"""16x the largest batch of the shipped recipes (4,096, ImageNet 64): a larger batch is a typo."""
MAX_STEPS = 1000
"""Sampling steps: more than any sigma grid has levels."""
MAX_BENCH_STEPS = 10_000
"""Timed (or warm-up) bench steps: a benchmark needs tens."""
MAX_LABELS = 100_000
"""--labels: at most as many labels as data.num_classes allows classes (ImageNet-21k has 21,841); they cycle over
the samples, so a longer list repeats itself."""
MAX_RESOLUTION = 4096
"""Image side for `data import --resolution`: one 4096 x 4096 RGB image is 48 MiB, and datasets live in memory."""
DEVICE_PATTERN = r"cpu|cuda|auto|cuda:[0-9]+"


class _OneLineUsageErrors(TyperGroup):
    """The ctcore command group: a usage error (unknown command or option, missing argument, a value out of
    range) prints one line, `error: <message> (see `ctcore <command> --help`)`, and exits 2 however the app is
    called (console script, python -m ctcore, typer.testing.CliRunner), instead of click's boxed panel."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        import sys

        args = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(args, prog_name or "ctcore", complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's usage errors (typer >= 0.29 carries its own click)
            code = exc.exit_code
            if type(exc).__name__ == "NoArgsIsHelpError":  # `ctcore`, `ctcore data`: the help, on stdout
                typer.echo(exc.format_message())
            else:
                _print_error(_usage_message(exc, self, args))
        except typer.Abort:
            _print_error("aborted")
            code = 1
        sys.exit(code if isinstance(code, int) else 0)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """The command list with each command's whole first sentence, wrapped (click cuts it at the width)."""
        rows = [(name, command.get_short_help_str(limit=10_000)) for name in self.list_commands(ctx)
                if (command := self.get_command(ctx, name)) is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _usage_message(exc: typer.TyperException, group: TyperGroup, args: list[str]) -> str:
    """click's message on one line, with the help command of the (sub)command it concerns."""
    message = " ".join(exc.format_message().split()).replace(": Value error, ", ": ").removesuffix(".")
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        path = ctx.command_path
    else:  # errors raised before a context exists: follow the subcommand names in the arguments
        names, command = ["ctcore"], group
        for arg in args:
            sub = getattr(command, "commands", {}).get(arg)
            if sub is None and not arg.startswith("-"):
                break
            if sub is not None:
                names.append(arg)
                command = sub
        path = " ".join(names)
    return f"{message} (see `{path} --help`)"


def _print_error(message: str) -> None:
    """`error: <message>` on stderr (under torchrun only rank 0 prints)."""
    import os

    from rich.text import Text

    quiet = os.environ.get("RANK", "0") != "0"
    _console(stderr=True, quiet=quiet).print(Text("error: ", style="bold red") + Text(message))


def _device_option(value: str | None) -> str | None:
    """--device: cpu, cuda, cuda:N or auto."""
    import re

    if value is not None and not re.fullmatch(DEVICE_PATTERN, value):
        raise typer.BadParameter(f"must be cpu, cuda, cuda:N or auto, got {value!r}")
    return value


DeviceOption = Annotated[str | None, typer.Option(
    callback=_device_option, help="cpu, cuda, cuda:N or auto (default: the recipe's run.device).")]
"""--device of every command that runs a network (tests/test_cli_flags.py holds which)."""
RecipeDeviceOption = Annotated[str | None, typer.Option(
    callback=_device_option, help="cpu, cuda or auto: the recipe's run.device for this command.")]
"""--device of the commands that run a recipe: it sets run.device (see _with_device)."""
ProgressOption = Annotated[bool, typer.Option(help="Show the progress bar.")]
"""--progress/--no-progress of every command that runs for more than a few seconds."""
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
"""--json of every command that prints a result: JSON alone on stdout."""


def _print_json(result: Any) -> None:
    """`--json`: the result as JSON on stdout (paths as strings)."""
    typer.echo(json.dumps(result, indent=2, default=str))


APP_HELP = ("Train consistency models (iCT, CT, CD, ECT) and diffusion models (EDM); sample, edit and evaluate "
            "them.")
"""What `ctcore --help` says ctcore is for."""

PLAIN_HELP: dict[str, Any] = {"rich_markup_mode": None, "cls": _OneLineUsageErrors}
"""Give every typer.Typer of the CLI these: click's plain help wraps at 80 columns and shows no type on flags,
where typer's rich panels cut option help short (`sampling.num_sampl…`) and print `<bool>` (tests/test_help.py)."""

app = typer.Typer(
    name="ctcore",
    help=APP_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    **PLAIN_HELP,
)


def _print_version(value: bool) -> None:
    """--version: `ctcore <version>` from the installed package's metadata (the source's own when not installed)."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("ctcore")
    except PackageNotFoundError:
        import ctcore

        number = ctcore.__version__
    typer.echo(f"ctcore {number}")
    raise typer.Exit(0)


@app.callback()
def _main(
    show_version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="Print the version and exit.")] = False,
) -> None:
    """Train consistency models (iCT, CT, CD, ECT) and diffusion models (EDM); sample, edit and evaluate them."""


HDF5_SUFFIXES = (".h5", ".hdf5")
"""Names ctcore accepts for the HDF5 files it writes (sample stores, datasets)."""


def _console(stderr: bool = False, quiet: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True, quiet=quiet)


def _folded(table: Any) -> Any:
    """A rich table whose cells wrap instead of ending in an ellipsis: a run directory or checkpoint path must be
    readable whole (and copyable) at 80 columns."""
    for column in table.columns:
        column.overflow = "fold"
    return table


OUT_OF_MEMORY = ("out of memory (MemoryError): the process reached the memory it may use; free some memory or raise "
                 "its limit (ulimit -v), or ask for less (a smaller batch, fewer samples or images, fewer run.threads)")


def _out_of_memory(exc: RuntimeError) -> bool:
    """Whether torch failed to allocate: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError (which has no
    type of its own: `DefaultCPUAllocator: can't allocate memory`)."""
    return type(exc).__name__ == "OutOfMemoryError" or "DefaultCPUAllocator: can't allocate memory" in str(exc)


@contextlib.contextmanager
def _errors(plugin_exit_code: int = 1) -> Iterator[None]:
    """Turn expected failures into one message on stderr and an exit code (under torchrun, rank 0 prints it).

    An exception of any type raised inside a plugin's code is one line naming the component and its distribution
    (exit `plugin_exit_code`); running out of memory (MemoryError) is one line, exit 1; any other unexpected
    exception is a bug of ctcore and keeps its traceback.
    """
    import os

    from ctcore.errors import CtcoreError

    quiet = os.environ.get("RANK", "0") != "0"
    try:
        yield
    except CtcoreError as exc:
        from rich.text import Text

        _console(stderr=True, quiet=quiet).print(Text("error: ", style="bold red") + Text(exc.render()))
        raise typer.Exit(exc.exit_code) from None
    except typer.Exit:
        raise
    except Exception as exc:
        out_of_memory = isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _out_of_memory(exc))
        try:
            from rich.text import Text

            from ctcore.preflight import plugin_failure

            failure = plugin_failure(exc, exit_code=plugin_exit_code)
            if failure is not None:
                _console(stderr=True, quiet=quiet).print(Text("error: ", style="bold red") + Text(failure.render()))
                raise typer.Exit(failure.exit_code) from None
        except MemoryError:  # the plugin check (it loads the registry) or the printing ran out of memory too
            out_of_memory = True
        if out_of_memory:
            import sys

            if not quiet:
                sys.stderr.write(f"error: {OUT_OF_MEMORY}\n")  # plain text: nothing more to allocate
            raise typer.Exit(1) from None
        if not isinstance(exc, OSError):
            raise
        # a file that cannot be written (a full disk) or read: one line, not a traceback
        reason = (exc.strerror or str(exc) or type(exc).__name__).splitlines()[0]
        where = f": {str(exc.filename)!r}" if exc.filename is not None else ""
        _console(stderr=True, quiet=quiet).print(Text("error: ", style="bold red") + Text(reason + where))
        raise typer.Exit(1) from None


def _print_note(message: str) -> None:
    """`note: <message>` on stderr (under torchrun only rank 0 prints)."""
    import os

    from rich.text import Text

    quiet = os.environ.get("RANK", "0") != "0"
    _console(stderr=True, quiet=quiet).print(Text("note: ", style="yellow") + Text(message))


def _noted(recipe: Any) -> Any:
    """The recipe, after printing its notes (what a --set of a component's name dropped)."""
    for note in recipe.notes:
        _print_note(note)
    return recipe


def _registry():
    from rich.text import Text

    from ctcore.registry import load_registry

    registry = load_registry()
    err = _console(stderr=True)
    for failure in registry.failures:
        err.print(Text("warning: ", style="yellow") + Text(failure.message()))
    return registry


SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="SECTION.KEY=VALUE",
    help="Override one recipe key (repeatable); VALUE is a TOML value, a bare word a string.")]


@app.command()
def run(
    target: Annotated[Path, typer.Argument(
        metavar="RECIPE", help="A recipe (.toml), or with --resume a RUN_DIR (a run directory).")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Run directory (default: run.output_dir).")
    ] = None,
    sets: SetOption = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", metavar="CHECKPOINT",
        help="Start the network from another run's weights (a checkpoint, or a run directory: its newest); "
             "the optimizer, the step, the curriculum (if any) and the random streams start fresh.")] = None,
    init_weights: Annotated[Literal["eval-ema", "student"] | None, typer.Option(
        "--init-weights", help="With --init-from: eval-ema (default) or student.")] = None,
    device: RecipeDeviceOption = None,
) -> None:
    """Train a consistency or diffusion model as a recipe describes; writes a run directory.

    With --resume, --set may extend a run: training.total_steps, the log, checkpoint and sample intervals,
    keep_checkpoints, the [evaluation] settings and [logging]. Under torchrun (`torchrun --nproc-per-node G -m
    ctcore run RECIPE`) every process trains its share of each global batch with DDP; rank 0 writes and prints.
    """
    from ctcore.devices import threads_restored

    with _torchrun_worker(), threads_restored():
        _run(target, resume, output_dir, progress, sets or [], init_from, init_weights, device)


@contextlib.contextmanager
def _torchrun_worker() -> Iterator[None]:
    """Around a command that may run under torchrun: leave the process group at the end, then exit at once.

    Ranks that all finished, or all stopped on a signal (exit 0, 130, 143), first meet at a barrier. Everything
    is written by then; exiting without the interpreter's teardown avoids an abort seen there, when gloo
    threads still referenced by freed modules shut down. A single process, or an unexpected exception (whose
    traceback must still print), ends normally.
    """
    import os
    import sys

    from ctcore.distributed import shutdown

    code = None
    try:
        yield
        code = 0
    except typer.Exit as end:
        code = end.exit_code
        raise
    finally:
        if shutdown(wait_for_all=code in (0, 130, 143)) and code is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _run(target: Path, resume: bool, output_dir: Path | None, progress: bool, sets: list[str],
         init_from: Path | None = None, init_weights: str | None = None, device: str | None = None) -> None:
    with _errors():
        sets = _with_device(sets, device)
        from ctcore.build import output_dir_for, resume_run, start_run
        from ctcore.errors import UsageError
        from ctcore.recipe import read_recipe

        if init_from is not None and resume:
            raise UsageError(f"--init-from {str(init_from)!r} starts a new run from another run's weights, and "
                             "--resume continues a run from its own: give one of them")
        if init_weights is not None and init_from is None:
            raise UsageError(f"--init-weights {init_weights} chooses the weights of --init-from "
                             "CHECKPOINT: add --init-from, or leave out --init-weights")
        registry = _registry()
        if resume:
            if target.is_dir() or (not target.exists() and target.suffix != ".toml"):  # a RUN_DIR, maybe mistyped
                if output_dir is not None and output_dir.resolve() != target.resolve():
                    raise UsageError(f"--resume {target} names the run directory; drop --output-dir {output_dir}")
                the_run = resume_run(None, registry, target, sets=sets)
            else:
                recipe = _noted(read_recipe(target, registry, sets))
                the_run = resume_run(recipe, registry, output_dir_for(recipe, output_dir))
        else:
            if target.is_dir():
                raise UsageError(f"{str(target)!r} is a directory: give a recipe file, or add --resume")
            the_run = start_run(_noted(read_recipe(target, registry, sets)), registry, output_dir,
                                init_from=init_from, init_weights=init_weights or "eval-ema")
        try:  # the run holds its directory's lock until it ends
            _train(the_run, resume, progress)
        finally:
            the_run.close()


def _with_device(sets: list[str], device: str | None) -> list[str]:
    """The --set overrides with `--device D` as the last, `run.device=D`, for the commands that read a recipe
    (run.device is auto, cpu or cuda); cuda:N, or --device with a --set of run.device too, is a UsageError."""
    from ctcore.errors import UsageError

    if device is None:
        return sets
    if device.startswith("cuda:"):
        raise UsageError(f"--device {device}: a recipe runs on auto, cpu or cuda (run.device); choose the GPU with "
                         f"CUDA_VISIBLE_DEVICES={device.removeprefix('cuda:')} and --device cuda")
    given = next((s for s in sets if s.split("=", 1)[0].strip() == "run.device"), None)
    if given is not None:
        raise UsageError(f"--device {device} and --set {given} both choose the device: give one of them")
    return [*sets, f"run.device={device}"]


def _train(the_run, resume: bool, progress: bool) -> None:
    """Say what the run does, train it, and report how it ended."""
    from ctcore.checkpoints import checkpoint_dir, list_checkpoints
    from ctcore.training import TrainingStopped, train

    out = _console(quiet=not the_run.world.is_main)
    if the_run.restarted:
        out.print(f"no checkpoint in {checkpoint_dir(the_run.out_dir)} (the run was stopped before its first one): "
                  f"restarting {the_run.out_dir} from step 0 with its recipe.toml; stats.jsonl begins anew")
    elif resume:
        changes = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in the_run.recipe_changes.items())
        changes = f" ({changes})" if changes else ""
        if the_run.step >= the_run.recipe.training.total_steps:
            out.print(f"{the_run.out_dir} already finished at step {the_run.step:,}{changes}; nothing to do (extend "
                      f"it with `ctcore run {the_run.out_dir} --resume --set training.total_steps=...`)")
            return
        out.print(f"resuming {the_run.out_dir} at step {the_run.step:,}{changes}")
        before, after = the_run.extended_num_scales or (0, 0)
        planned = the_run.curriculum.curriculum.num_scales(the_run.step) if the_run.curriculum is not None else 0
        if before != after:
            out.print(f"note: the curriculum's N(k) depends on training.total_steps: at step {the_run.step:,} it "
                      f"was {before} and is now {after}")
        elif planned < before and "training.total_steps" in the_run.recipe_changes:
            out.print(f"note: the curriculum's N(k) depends on training.total_steps: the new plan gives {planned} at "
                      f"step {the_run.step:,}, below the {before} the run reached, so N(k) stays {before} until the "
                      "plan passes it (an extended run never moves its curriculum backwards)")
    else:
        out.print(f"run directory: {the_run.out_dir}  (device {the_run.device}, precision {the_run.precision})")
        init = the_run.provenance.get("init_from")
        if init is not None:
            fresh = "optimizer, step, curriculum" if the_run.curriculum is not None else "optimizer, step"
            out.print(f"initialised from {init['checkpoint']} (its {init['weights']} weights at step "
                      f"{init['step']:,}); {fresh} and random streams start fresh")
    try:
        summary = train(the_run, progress=progress, handle_signals=True)
    except TrainingStopped as stop:
        _console(stderr=True, quiet=not the_run.world.is_main).print(
            f"{stop.signal_name}: stopped after step {stop.step:,} and wrote {stop.checkpoint}. Continue with: "
            f"ctcore run {the_run.out_dir} --resume"
        )
        raise typer.Exit(143 if stop.signal_name == "SIGTERM" else 130) from None
    except Exception as exc:  # raised in a plugin mid-run: one line with the step and the checkpoint to resume
        from ctcore.preflight import plugin_failure

        failure = plugin_failure(exc, the_run.registry, run=the_run)
        if failure is None:
            raise
        raise failure from exc
    except KeyboardInterrupt:
        ckpts = list_checkpoints(the_run.out_dir)
        latest = f"the latest checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        _console(stderr=True, quiet=not the_run.world.is_main).print(
            f"interrupted at step {the_run.step:,}; {latest}. Continue with: "
            f"ctcore run {the_run.out_dir} --resume"
        )
        raise typer.Exit(130) from None
    _print_summary(out, the_run, summary)


def _print_summary(out, the_run, summary: dict) -> None:
    import math

    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"run {the_run.recipe.run.name}", show_header=False)
    table.add_row("steps", f"{summary['start_step']:,} -> {summary['step']:,}")
    table.add_row("time", f"{summary['seconds']:.1f} s")
    skipped = summary.get("skipped_steps") or 0
    if skipped:
        table.add_row("skipped steps", f"{skipped:,} (non-finite loss or gradient)")
    if summary.get("loss") is not None:
        loss = summary["loss"]
        table.add_row("loss (last interval)", f"{loss:.4g}" if math.isfinite(loss) or not skipped
                      else "none: every step of the interval was skipped")
    distance = _distance_row(the_run, summary)
    if distance is not None:
        table.add_row("sliced Wasserstein to data", distance)
    table.add_row("run directory", str(the_run.out_dir))
    table.add_row("samples", str(the_run.out_dir / "samples"))
    out.print(_folded(table))
    for warning in summary.get("warnings", []):
        out.print(Text("warning: ", style="yellow") + Text(warning))


def _distance_row(the_run, summary: dict) -> str | None:
    """The summary's distance row: from step 0 (untrained, or initial after --init-from) or, for a resumed run, from
    the distance logged at the resume, to the end; better or worse by their ratio, or no verdict when the eval EMA
    has moved less than half of the way over the steps trained (see training.ema_warning)."""
    from ctcore.training import percent

    last = summary.get("final_distance")
    if last is None:
        return None
    start_step, moved = summary["start_step"], summary.get("eval_ema_moved", 1.0)
    if start_step == 0:
        first, digits = summary.get("initial_distance"), 1
        if first is None:
            return None
        start = "initial" if "init_from" in the_run.provenance else "untrained"
        text = f"{start} {first:.4f} -> trained {last:.4f}"
    else:
        logged, digits = summary.get("resume_distance"), 2
        if logged is None:
            return (f"{last:.4f} (no distance was logged at or before the resume at step {start_step:,} to compare "
                    "with)")
        at, first = logged
        where = f"at resume (step {at:,})" if at == start_step else f"at step {at:,} (resumed at {start_step:,})"
        text = f"{where} {first:.4f} -> now {last:.4f}"
    if moved < 0.5:
        since = " since the resume" if start_step else ""
        return f"{text} (no verdict: the eval EMA holds {percent(moved)} of the training{since}, see the warning)"
    if last <= first:
        return f"{text} ({first / max(last, 1e-12):.{digits}f}x better)"
    return f"{text} ({last / max(first, 1e-12):.{digits}f}x worse)"


@app.command()
def check(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="The recipe to validate.")],
    build: Annotated[bool, typer.Option(help="Also build every component for the declared data shape.")] = True,
    sets: SetOption = None,
    device_memory: Annotated[str | None, typer.Option(
        "--device-memory", metavar="SIZE", help="Then say whether training fits a device of SIZE (24GiB, 24GB, 80G "
        "= 80GiB, 24000MiB, or bytes) and, if not, which training.micro_batch_size does; exit 1 when it does not "
        "fit. Estimated for run.device: --set run.device=cuda for a GPU.")] = None,
) -> None:
    """Validate a recipe, build its components for the data shape, and print it resolved with every default
    filled in."""
    with _errors(plugin_exit_code=2):
        from ctcore.errors import UsageError
        from ctcore.recipe import dump_recipe, read_recipe

        limit = _parse_size(device_memory, "--device-memory") if device_memory is not None else None
        if limit is not None and not build:
            raise UsageError("--device-memory needs the memory estimate, which building the components makes: "
                             "drop --no-build")
        registry = _registry()
        recipe = _noted(read_recipe(recipe_path, registry, sets or []))
        summary, report = _built_summary(recipe, registry) if build else ("components not built (--no-build)", None)
        typer.echo(dump_recipe(recipe), nl=False)  # only a recipe that passed every check is printed
        _console(stderr=True).print(f"ok: {recipe_path} is valid; {summary}")
        if limit is not None:
            from ctcore.preflight import device_fit

            line, fits = device_fit(recipe, report.memory, report.on_cpu, limit)
            typer.echo(line, err=True)
            if not fits:
                raise typer.Exit(1)


def _parse_size(text: str, option: str) -> int:
    """'24GiB', '24GB', '80G' (binary: GiB), '24000MiB', '1.5TiB' or a whole number of bytes -> bytes; anything
    else, or 0, is one UsageError naming `option`."""
    import re
    from decimal import Decimal

    from ctcore.errors import UsageError

    units = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
             "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
    found = re.fullmatch(r"\s*([0-9]{1,16}(?:\.[0-9]{1,6})?)\s*([A-Za-z]{0,3})\s*", text)
    unit = found.group(2).lower() if found else ""
    if found is None or unit not in units or ("." in found.group(1) and units[unit] == 1):
        raise UsageError(f"{option} must be a size like 24GiB, 24GB, 80G (GiB) or 24000MiB, or a whole number of "
                         f"bytes, got {text!r}")
    size = int(Decimal(found.group(1)) * units[unit])
    if size < 1:
        raise UsageError(f"{option} must be more than 0 bytes, got {text!r}")
    return size


def _built_summary(recipe, registry) -> tuple[str, Any]:
    """Build and check every component (and run.init_from's weights, the data file) as a run would; what
    `ctcore check` reports of them (parameters, data and memory), and the preflight report with the memory
    estimate. Problems raise UsageError, one line."""
    from ctcore.build import recipe_warm_start
    from ctcore.data import check_data_file, data_shape
    from ctcore.errors import RunError, UsageError, near_path
    from ctcore.files import human_bytes
    from ctcore.preflight import preflight
    from ctcore.reporting import build_loggers

    try:  # run.init_from names a readable checkpoint: a problem of this recipe, as its teacher's checkpoint
        warm_start = recipe_warm_start(recipe, registry)
    except RunError as exc:
        raise UsageError(f"{recipe.source}: {exc}") from None
    build_loggers(recipe, registry)  # e.g. the tensorboard logger without its package
    report = preflight(recipe, registry)  # every component on the meta device, checked and measured
    if warm_start is not None:  # and its weights fit the recipe's network
        try:
            warm_start.load_into(report.built["network"], recipe, load=False)
        except RunError as exc:
            raise UsageError(f"{recipe.source}: {exc}") from None
    d = recipe.data
    if d.source == "synthetic":
        data_note = f"synthetic data, {d.num_images:,} images of shape {data_shape(d)}"
    elif not Path(d.path).is_file():
        guess = near_path(d.path)  # a mistyped data.path
        data_note = (f"data file {d.path!r} does not exist yet{f' (did you mean {guess!r}?)' if guess else ''}: "
                     f"create it before training (an HDF5 file "
                     f"with uint8 `images` shaped (N, {', '.join(map(str, data_shape(d)))})"
                     f"{' and `labels`' if d.num_classes else ''})")
    else:  # the file's structure, shape, classes, size in memory and labels, reading labels only
        info = check_data_file(d)
        data_note = f"data {d.path!r}: {info['count']:,} images of shape {info['shape']}"
    m = report.memory
    return (f"network {recipe.components['network'].name} has {report.parameters:,} parameters; {data_note}; "
            f"training needs about {human_bytes(m.peak(report.on_cpu))} in one process "
            f"({m.parts(m.names(report.on_cpu))})"), report


@app.command()
def sweep(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="The recipe every point starts from.")],
    sets: Annotated[list[str], typer.Option(
        "--set", metavar="SECTION.KEY=V1,V2", help="A key and its comma-separated values (repeatable; commas inside "
        "[...] and quotes do not split).")],
    output_dir: Annotated[Path | None, typer.Option(
        "--output-dir", "-o", help="Sweep directory (default: the recipe's run directory).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the ctcore run command of each point.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    device: RecipeDeviceOption = None,
) -> None:
    """Train the grid of --set values, one run after another, each in <sweep dir>/<key=value,...>.

    Started again, a sweep skips finished points, resumes an interrupted one and starts the rest.
    """
    import shlex

    from ctcore.devices import threads_restored

    with _errors(), threads_restored():
        from ctcore.build import holds_a_run, output_dir_for, resume_run, start_run
        from ctcore.checkpoints import list_checkpoints
        from ctcore.errors import RecipeError, RunError, UsageError
        from ctcore.preflight import preflight
        from ctcore.recipe import point_name, read_recipe, sweep_grid

        registry = _registry()
        grid = sweep_grid(sets)
        device_set = _with_device(grid[0], device)[len(grid[0]):]  # every point sets the same keys
        names = [point_name(point) for point in grid]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise UsageError(f"sweep points {grid[names.index(name)]} and {grid[i]} would share the run directory "
                                 f"{name!r}; give values that differ in letters, digits or ._+=,-")
            if len(name.encode()) > 255:
                raise UsageError(f"the sweep point's directory name {name[:60]}... is longer than 255 bytes; sweep "
                                 "fewer keys or shorter values")
        recipes, problems = [], []
        for point in grid:  # every point is checked before any trains
            try:
                recipes.append(read_recipe(recipe_path, registry, [*point, *device_set]))
                preflight(recipes[-1], registry)
            except RecipeError as exc:
                problems += [p for p in exc.problems if p not in problems]
            except UsageError as exc:
                message = f"--set {' --set '.join(point)}: {exc.message}"
                problems += [message] if message not in problems else []
        if problems:
            raise RecipeError(str(recipe_path), problems)
        for note in dict.fromkeys(n for recipe in recipes for n in recipe.notes):  # each distinct note once
            _print_note(note)
        top = output_dir or output_dir_for(recipes[0])
        if list_checkpoints(top) or (top / "recipe.toml").is_file():
            raise RunError(f"{str(top)!r} holds a run, not a sweep; choose another sweep directory with --output-dir")
        if dry_run:
            for point, name in zip(grid, names, strict=True):
                typer.echo(shlex.join(["ctcore", "run", str(recipe_path), *(a for s in point for a in ("--set", s)),
                                       "-o", str(top / name), *(["--device", device] if device else [])]))
            return
        out = _console()
        statuses = ["not started"] * len(grid)
        try:
            for i, (recipe, name) in enumerate(zip(recipes, names, strict=True), start=1):
                run_dir = top / name
                out.print(f"sweep point {i}/{len(grid)}: {run_dir}")
                statuses[i - 1] = "failed"  # until it ends otherwise
                resume = holds_a_run(run_dir)
                the_run = resume_run(recipe, registry, run_dir) if resume else start_run(recipe, registry, run_dir)
                done = resume and the_run.step >= the_run.recipe.training.total_steps
                try:
                    _train(the_run, resume, progress)
                except typer.Exit as stop:
                    statuses[i - 1] = "stopped"
                    _console(stderr=True).print(f"the sweep stopped at point {i}/{len(grid)}; run the same ctcore "
                                                "sweep command again to continue it")
                    raise stop from None
                finally:
                    the_run.close()
                statuses[i - 1] = "already finished" if done else "trained"
        finally:
            if any(s != "not started" for s in statuses):
                out.print(_folded(_sweep_table(top, grid, names, statuses)))
        out.print(f"sweep of {len(grid)} runs finished in {top}")


def _sweep_table(top: Path, grid: list[list[str]], names: list[str], statuses: list[str]) -> Any:
    """The sweep's closing table: a row per point with its value of each --set key (as given), how it ended, and
    its last sliced Wasserstein distance and loss and median img/s from its stats.jsonl ("-" where missing)."""
    from rich.table import Table
    from rich.text import Text

    from ctcore.reporting import final_figures

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    table = Table(title=f"{len(grid)} sweep points", caption="sliced W and loss: the last logged; img/s: the median")
    for key in (s.partition("=")[0] for s in grid[0]):
        table.add_column(key, justify="left")
    for col in ("status", "sliced W", "loss", "img/s"):
        table.add_column(col, justify="left" if col == "status" else "right")
    for point, name, status in zip(grid, names, statuses, strict=True):
        row = final_figures(top / name) or {}
        cells = [*(s.partition("=")[2] for s in point), status, fmt(row.get("sliced_wasserstein"), ".4f"),
                 fmt(row.get("loss"), ".4g"), fmt(row.get("img_per_s"), ",.0f")]
        table.add_row(*(Text(c) for c in cells))
    return table


SamplerOption = Annotated[str | None, typer.Option(
    metavar="NAME", help="Another installed sampler for the checkpoint's kind of model, e.g. heun or euler for "
                         "a diffusion model (default: its recipe's [sampler]).")]


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Argument(
        metavar="CHECKPOINT", help="A checkpoint file, or a RUN_DIR (its latest checkpoint).")],
    num_samples: Annotated[int | None, typer.Option(
        "--num-samples", "-n", min=1, max=MAX_COUNT, help="Default: the recipe's sampling.num_samples.")] = None,
    steps: Annotated[int | None, typer.Option(
        min=1, max=MAX_STEPS, help="Consistency sampling: 1 (the default) one-step, 2+ through the recipe's "
                                   "sampling.sigma_mid; heun / euler: levels of the Karras grid (default 18).")] = None,
    sigmas: Annotated[str | None, typer.Option(help='Explicit sigmas, e.g. "80,0.821" (overrides --steps).')] = None,
    sampler: SamplerOption = None,
    seed: Annotated[int | None, typer.Option(
        min=0, max=MAX_SEED, help="Sample j uses seed + j (default: sampling.seed).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HDF5 sample store (default: in the run).")] = None,
    grid: Annotated[Path | None, typer.Option(
        help="Image grid, .png, .jpg or .webp (default: the store's path with .png).")] = None,
    weights: Annotated[Literal["eval-ema", "student"], typer.Option(
        help="eval-ema (default) or student.")] = "eval-ema",
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="Samples per forward pass.")] = 256,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing sample store.")] = False,
    labels: Annotated[str | None, typer.Option(
        help='Class-conditional models: these class labels, cycled over the samples, e.g. "0,3,7".')] = None,
    class_balanced: Annotated[bool, typer.Option(
        "--class-balanced", help="Class-conditional models: sample j has class j mod num_classes.")] = False,
    device: DeviceOption = None,
    progress: ProgressOption = True,
    as_json: JsonOption = False,
) -> None:
    """Generate samples from a checkpoint into an HDF5 store (uint8 images, seeds, labels) and an image grid."""
    from ctcore.devices import threads_restored

    with _errors(), threads_restored():
        from ctcore.files import check_suffix
        from ctcore.images import check_image_path
        from ctcore.sampling import sample_from_checkpoint

        check_image_path(grid)
        check_suffix(out, "--out", HDF5_SUFFIXES, "an HDF5")
        sigma_list = _parse_sigmas(sigmas)
        label_list = _parse_labels(labels)
        result = sample_from_checkpoint(
            checkpoint, _registry(), num_samples=num_samples, steps=steps, sigmas=sigma_list, seed=seed,
            out=out,
            grid=grid, weights=weights, batch_size=batch_size, overwrite=overwrite,
            labels=label_list, class_balanced=class_balanced, sampler=sampler, device=device, progress=progress,
        )
        if as_json:
            _print_json(result)
            return
        _console().print(f"wrote {result['num_samples']:,} samples ({result['plan']}) to {result['store']} "
                         f"and a grid to {result['grid']}")


@app.command()
def edit(
    task: Annotated[str, typer.Argument(metavar="TASK", help="inpaint, colorize, superres, stroke or interpolate.")],
    checkpoint: Annotated[Path, typer.Argument(
        metavar="CHECKPOINT", help="A checkpoint file, or a RUN_DIR (its latest checkpoint).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="OUT.h5", help="The edit store to write.")],
    images: Annotated[Path | None, typer.Option(
        "--images", metavar="SOURCE",
        help="A ctcore HDF5 dataset, an image file or a folder of images (fitted to the model's size).")] = None,
    indices: Annotated[str | None, typer.Option(
        help='HDF5 SOURCE: which images, "0:64" (the default) or "3,5,8".')] = None,
    mask: Annotated[Path | None, typer.Option(
        metavar="MASK.png", help="inpaint: the pixels to keep (white), at the model's resolution.")] = None,
    mask_kind: Annotated[Literal["box", "half", "random-pixels", "strokes"] | None, typer.Option(
        "--mask-kind", help="inpaint: a generated mask instead of --mask.")] = None,
    factor: Annotated[int | None, typer.Option(
        min=1, max=MAX_RESOLUTION, help="superres: keep the mean of every F x F patch.")] = None,
    start_sigma: Annotated[float | None, typer.Option(
        "--start-sigma", help="stroke: the noise level the painting starts from (default 2.24 for sigma_max 80).")
    ] = None,
    seeds: Annotated[str | None, typer.Option(
        metavar="A,B", help="interpolate: the two seeds whose noises are interpolated.")] = None,
    num: Annotated[int, typer.Option(min=2, max=MAX_STEPS, help="interpolate: images from A to B.")] = 8,
    sigmas: Annotated[str | None, typer.Option(
        help='The schedule, e.g. "80,2.24" (default: docs/editing.md; interpolate: one step).')] = None,
    seed: Annotated[int | None, typer.Option(
        min=0, max=MAX_SEED, help="Image j uses the noise of seed + j (default: sampling.seed).")] = None,
    labels: Annotated[str | None, typer.Option(
        help="Class-conditional models: these labels, cycled (default: the SOURCE's, else drawn per seed).")
    ] = None,
    grid: Annotated[Path | None, typer.Option(
        help="reference | degraded | result per row, .png, .jpg or .webp (default: OUT with .png).")] = None,
    weights: Annotated[Literal["eval-ema", "student"], typer.Option(
        help="eval-ema (default) or student.")] = "eval-ema",
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="Images per forward pass.")] = 256,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.h5.")] = False,
    device: DeviceOption = None,
    progress: ProgressOption = True,
    as_json: JsonOption = False,
) -> None:
    """Edit images zero-shot with a consistency model (inpaint, colorize, superres, stroke) or interpolate
    between two seeds' noises; writes an HDF5 store and a grid (docs/editing.md)."""
    from ctcore.devices import threads_restored

    with _errors(), threads_restored():
        import re

        from ctcore.editing import edit_from_checkpoint
        from ctcore.errors import UsageError
        from ctcore.files import check_suffix
        from ctcore.images import check_image_path

        check_image_path(grid)
        check_suffix(out, "-o", HDF5_SUFFIXES, "an HDF5")
        pair = None
        if seeds is not None:
            parts = [p.strip() for p in seeds.split(",", 2)]  # split no further than a third part
            if len(parts) != 2 or not all(re.fullmatch(r"[0-9]{1,19}", p) and int(p) <= MAX_SEED for p in parts):
                raise UsageError(f'--seeds must be two seeds "A,B" in 0..{MAX_SEED}, e.g. "0,1", got {seeds!r}')
            pair = (int(parts[0]), int(parts[1]))
        result = edit_from_checkpoint(
            task, checkpoint, _registry(), out=out, grid=grid, images=images, indices=indices, mask=mask,
            mask_kind=mask_kind, factor=factor, start_sigma=start_sigma, seeds=pair, num=num,
            sigmas=_parse_sigmas(sigmas), seed=seed, labels=_parse_labels(labels), weights=weights,
            batch_size=batch_size, overwrite=overwrite, device=device, progress=progress)
        if as_json:
            _print_json(result)
            return
        _console().print(f"wrote {result['count']:,} {task} results ({result['plan']}) to {result['store']} and a "
                         f"grid to {result['grid']}")


def _parse_labels(labels: str | None) -> list[int] | None:
    """'0,3,7' -> [0, 3, 7]; None stays None. Their range is checked against the checkpoint's classes."""
    import re

    from ctcore.errors import UsageError

    if labels is None:
        return None
    if labels.count(",") >= MAX_LABELS:  # before any list is made
        raise UsageError(f"--labels takes at most {MAX_LABELS:,} class labels (as many as a recipe's data.num_classes "
                         f"allows; they cycle over the samples), got {labels.count(',') + 1:,}")
    values = [s.strip() for s in labels.split(",")]
    if not all(re.fullmatch(r"-?[0-9]{1,18}", v) for v in values):
        raise UsageError(f'--labels must be comma-separated class numbers like "0,3,7", got {labels!r}')
    return [int(v) for v in values]


def _parse_sigmas(sigmas: str | None) -> list[float] | None:
    """'80,0.821' -> [80.0, 0.821]: 1 to MAX_STEPS finite numbers; None stays None. Their range is checked
    against the checkpoint's recipe when it is loaded."""
    import math
    import re

    from ctcore.errors import UsageError

    if sigmas is None:
        return None
    example = 'comma-separated numbers like "80,0.821"'
    count = sum(1 for s in re.finditer(r"[^,]*", sigmas) if s.group().strip())  # counted before any list is made
    if not 1 <= count <= MAX_STEPS:
        raise UsageError(f"--sigmas must be 1 to {MAX_STEPS} {example} (no plan samples more steps), got {count} "
                         "values")
    try:
        values = [float(s) for s in sigmas.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--sigmas must be {example}, got {sigmas!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"--sigmas must be finite numbers, got {sigmas!r}")
    return values


InceptionOption = Annotated[
    Path | None,
    typer.Option("--inception", help="FID Inception weights pt_inception-2015-12-05-6726825d.pth "
                 "(default: the cache, ~/.cache/ctcore or $CTCORE_CACHE)."),
]
DownloadOption = Annotated[
    bool, typer.Option("--download-inception", help="Fetch the Inception weights into the cache when missing.")
]


FidProtocolOption = Annotated[
    Literal["tensorflow", "pytorch-fid"], typer.Option(
        "--fid-protocol", help="Resize to 299x299 as the TensorFlow FID graph (published numbers) or pytorch-fid.")
]
RefProtocolOption = Annotated[
    Literal["tensorflow", "pytorch-fid"] | None, typer.Option(
        "--ref-protocol", help="The FID protocol of a --ref file that records none (EDM's: tensorflow); default: "
        "pytorch-fid for such a file. A file that records another is refused.")
]
MAX_NUMPY_SEED = 2**32 - 1
"""numpy.random.RandomState seeds (the Inception Score's shuffle) are 32-bit."""


@app.command("eval")
def eval_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(
        metavar="CHECKPOINT", help="A checkpoint file, or a RUN_DIR (its latest checkpoint).")],
    metric: Annotated[Literal["fid", "sliced-wasserstein"], typer.Option(
        help="fid: FID and Inception Score (Inception weights, --ref); sliced-wasserstein: distance to the "
             "recipe's training data, no weights file.")] = "fid",
    ref: Annotated[Path | None, typer.Option("--ref", help="FID: reference statistics .npz with mu and sigma "
                                             "(ctcore eval-ref-stats, EDM, pytorch-fid, clean-fid).")] = None,
    ref_protocol: RefProtocolOption = None,
    inception: InceptionOption = None,
    download_inception: DownloadOption = False,
    num_samples: Annotated[int | None, typer.Option(
        "--num-samples", "-n", min=2, max=MAX_COUNT,
        help="FID: 50,000 (at least 2); sliced-wasserstein: the recipe's evaluation.num_samples.")] = None,
    steps: Annotated[int | None, typer.Option(
        min=1, max=MAX_STEPS, help="As in ctcore sample (consistency sampling: 1, the default, is one-step).")] = None,
    sigmas: Annotated[str | None, typer.Option(help='Explicit sigmas, e.g. "80,0.821" (overrides --steps).')] = None,
    sampler: SamplerOption = None,
    seed: Annotated[int | None, typer.Option(
        min=0, max=MAX_SEED, help="Sample j uses seed + j, as in ctcore sample (FID: 0; sliced-wasserstein: "
                                  "10,000,000, the training loop's).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, max=MAX_BATCH, help="FID: 256; sliced-wasserstein: the training loop's.")] = None,
    device: Annotated[str | None, typer.Option(
        callback=_device_option, help="cpu, cuda, cuda:N or auto (default: the recipe's run.device).")] = None,
    fid_protocol: FidProtocolOption = "tensorflow",
    is_split: Annotated[Literal["ordered", "shuffled"], typer.Option(
        "--is-split", help="Inception Score splits: in seed order, or shuffled first (torch-fidelity).")] = "ordered",
    is_split_seed: Annotated[int, typer.Option(
        "--is-split-seed", min=0, max=MAX_NUMPY_SEED, help="The shuffle's seed (torch-fidelity: 2020).")] = 2020,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """FID and Inception Score of a checkpoint's eval-EMA samples against reference statistics, or (--metric
    sliced-wasserstein) their distance to the training data.

    Under torchrun (`torchrun --nproc-per-node G -m ctcore eval ...`) each process samples its share; rank 0 prints.
    """
    import os

    from ctcore.devices import threads_restored

    with _torchrun_worker(), _errors(), threads_restored():
        sigma_list = _parse_sigmas(sigmas)
        if metric == "sliced-wasserstein":
            _eval_distance(checkpoint, ref, inception, download_inception, num_samples, steps, sigma_list, seed,
                           batch_size, device, as_json, sampler, progress, ref_protocol)
            return
        from ctcore.errors import RunError
        from ctcore.fid import evaluate_checkpoint
        from ctcore.inception import load_inception

        instead = (f"or score the checkpoint without any weights file: ctcore eval {checkpoint} --metric "
                   "sliced-wasserstein")
        _require_fid_inputs("ctcore eval --metric fid", [("checkpoint", checkpoint, "")], ref, inception,
                            download_inception, instead)
        registry = _registry()
        try:
            model = load_inception(inception, download=download_inception, progress=progress)
        except RunError as exc:
            raise RunError(f"{exc.message}\n{instead}") from None
        seed = 0 if seed is None else seed
        result = evaluate_checkpoint(
            checkpoint, registry, inception=model, num_samples=50_000 if num_samples is None else num_samples,
            steps=steps, sigmas=sigma_list, batch_size=256 if batch_size is None else batch_size, ref_stats=ref,
            device=device, seed=seed,
            progress=progress, fid_protocol=fid_protocol, is_split=is_split, is_split_seed=is_split_seed,
            sampler=sampler, ref_protocol=ref_protocol,
        )
        if os.environ.get("RANK", "0") != "0":
            return
        if as_json:
            typer.echo(json.dumps({"metric": "fid", "value": result["fid"], **result}, indent=2))
            return
        from rich.table import Table
        from rich.text import Text

        split = ("shuffled (seed " + str(result["inception_score_split_seed"]) + ")"
                 if result["inception_score_split"] == "shuffled" else "ordered")
        table = Table(title=f"ctcore eval {checkpoint}", show_header=False)
        table.add_row("FID", f"{result['fid']:.3f} ({result['fid_protocol']} protocol)")
        table.add_row("Inception Score", f"{result['inception_score']:.3f} ± {result['inception_score_std']:.3f} "
                      f"({result['inception_score_splits']} {split} splits)")
        table.add_row("samples", f"{result['num_samples']:,} (seeds {seed}..{seed + result['num_samples'] - 1})")
        table.add_row("sampling", _plan_text(result))
        table.add_row("checkpoint", f"{result['checkpoint']} (step {result['step']:,})")
        table.add_row("reference", str(ref))
        table.add_row("time", f"{result['seconds']:.1f} s")
        _console().print(_folded(table))
        for note in result["notes"]:
            _console(stderr=True).print(Text("note: ", style="yellow") + Text(note))


NO_REF = ("--metric fid needs --ref STATS.npz, reference statistics of the training data (make them with `ctcore "
          "eval-ref-stats DATASET.h5 OUT.npz`); --metric sliced-wasserstein needs no file")
"""The message for FID without --ref (eval, search-sigmas)."""


def _require_fid_inputs(command: str, files: list[tuple[str, Path, str]], ref: Path | None | bool,
                        inception: Path | None, download: bool, instead: str | None = None) -> None:
    """Every input an FID command lacks, in one message, before anything loads: each of `files` (what it is, its
    path, the fix) that does not exist, --ref (not given, or not found; `ref=False`: the command takes none) and
    the Inception weights (not at --inception, or not in the cache without --download-inception). One missing
    input is its own message, several are `<command> is missing N inputs:` and one indented entry each; `instead`
    (a command that needs no weights file) follows when the weights are missing and every file exists. Exit 2
    when --ref is not given, else 1."""
    from ctcore.errors import RunError, UsageError, path_not_found
    from ctcore.fid import missing_statistics
    from ctcore.inception import missing_weights

    problems = [path_not_found(f"{what} {str(path)!r}", path, fix) for what, path, fix in files if not path.exists()]
    files_exist = not problems
    if ref is None:
        problems.append(NO_REF)
    elif ref is not False and not Path(ref).is_file():
        problems.append(missing_statistics(ref))
    weights = missing_weights(inception, download=download)
    if weights is not None:
        problems.append(weights)
    if not problems:
        return
    message = problems[0] if len(problems) == 1 else "\n".join(
        [f"{command} is missing {len(problems)} inputs:", *("  " + p.replace("\n", "\n    ") for p in problems)])
    if weights is not None and files_exist and instead is not None:
        message += "\n" + instead
    raise (UsageError if ref is None else RunError)(message)


def _plan_text(result: dict[str, Any], levels: bool = True) -> str:
    """How an evaluation sampled, as `ctcore sample` prints it (`1-step [80.0]`, `18-level heun (35 ...) [...]`)."""
    from ctcore.sampling import plan_text

    return plan_text(result["sampler"], result["sigmas"], result["network_evaluations"], result["noise_draws"],
                     levels=levels)


def _eval_distance(checkpoint: Path, ref: Path | None, inception: Path | None, download_inception: bool,
                   num_samples: int | None, steps: int | None, sigmas: list[float] | None, seed: int | None,
                   batch_size: int | None, device: str | None, as_json: bool, sampler: str | None = None,
                   progress: bool = False, ref_protocol: str | None = None) -> None:
    """`ctcore eval --metric sliced-wasserstein`: one line (or --json) with the distance to the training data."""
    import os

    from ctcore.errors import UsageError
    from ctcore.evaluation import evaluate_checkpoint_distance

    for given, name in ((ref, "--ref"), (ref_protocol, "--ref-protocol"), (inception, "--inception"),
                        (download_inception or None, "--download-inception")):
        if given is not None:
            raise UsageError(f"{name} is for --metric fid; --metric sliced-wasserstein compares the samples with "
                             f"the recipe's training data and needs no file: drop {name}")
    r = evaluate_checkpoint_distance(checkpoint, _registry(), num_samples=num_samples, steps=steps, sigmas=sigmas,
                                     seed=seed, batch_size=batch_size, device=device, sampler=sampler,
                                     progress=progress)
    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    _console().print(f"sliced Wasserstein distance to the training data: {r['value']:.4f} ({r['num_samples']:,} "
                     f"{_plan_text(r, levels=False)} samples, seeds {r['seed']}..{r['seed'] + r['num_samples'] - 1}, "
                     f"{r['num_projections']} projections; {r['checkpoint']} at step {r['step']:,})")


@app.command("eval-ref-stats")
def eval_ref_stats(
    dataset: Annotated[Path, typer.Argument(metavar="DATASET.h5", help="HDF5 file with uint8 `images` (N, C, H, W).")],
    out: Annotated[Path, typer.Argument(metavar="OUT.npz", help="Where to write mu and sigma.")],
    inception: InceptionOption = None,
    download_inception: DownloadOption = False,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="Images per forward pass.")] = 250,
    device: Annotated[str, typer.Option(callback=_device_option, help="cpu, cuda, cuda:N or auto.")] = "auto",
    fid_protocol: FidProtocolOption = "tensorflow",
    format: Annotated[Literal["ctcore", "edm"], typer.Option(
        "--format", help="ctcore: mu, sigma, num_images and fid_protocol; edm: mu and sigma only, as EDM's fid.py "
        "writes and reads them (tensorflow protocol only).")] = "ctcore",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.npz.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Inception statistics (mu, sigma) of every image of a dataset, for ctcore eval --ref; the file records the
    FID protocol, and eval refuses to compare it with features made under another."""
    with _errors():
        from ctcore.errors import UsageError
        from ctcore.fid import EDM_FID_PROTOCOL, reference_statistics, save_statistics
        from ctcore.files import check_suffix, output_lock, refuse_writing_inputs
        from ctcore.inception import load_inception

        check_suffix(out, "OUT.npz", (".npz",), "a statistics")
        if format == "edm" and fid_protocol != EDM_FID_PROTOCOL:
            raise UsageError(f"--format edm writes statistics to compare with EDM's, which are made under the "
                             f"{EDM_FID_PROTOCOL} FID protocol, not {fid_protocol}: drop --fid-protocol, or drop "
                             f"--format edm")
        refuse_writing_inputs([("OUT.npz", out)], [("DATASET.h5", dataset), ("--inception", inception)])
        if out.exists() and not overwrite:
            raise UsageError(f"{str(out)!r} exists; pass --overwrite to replace it")
        _require_fid_inputs("ctcore eval-ref-stats", [
            ("dataset file", dataset, f"create one with: ctcore data import SOURCE {dataset}")], False, inception,
            download_inception)
        model = load_inception(inception, download=download_inception, progress=progress)
        with output_lock(out, "statistics file", "ctcore eval-ref-stats"):
            if out.exists() and not overwrite:  # checked again by its one writer
                raise UsageError(f"{str(out)!r} exists; pass --overwrite to replace it")
            stats = reference_statistics(dataset, model, batch_size=batch_size, device=device, progress=progress,
                                         protocol=fid_protocol)
            save_statistics(out, stats, format)
        if as_json:
            _print_json({"out": out, "dataset": dataset, "num_images": stats["num_images"],
                         "fid_protocol": fid_protocol, **({"format": format} if format != "ctcore" else {})})
            return
        edm = f"; EDM's format, which records no protocol: read it with --ref-protocol {fid_protocol}"
        _console().print(f"wrote the Inception statistics of {stats['num_images']:,} images of {dataset} to {out} "
                         f"(FID protocol {fid_protocol}{edm if format == 'edm' else ''})")


@app.command("search-sigmas")
def search_sigmas(
    checkpoint: Annotated[Path, typer.Argument(
        metavar="CHECKPOINT", help="A checkpoint file, or a RUN_DIR (its latest checkpoint).")],
    steps: Annotated[int, typer.Option(
        min=2, max=3, help="2: search sigma_mid[0]; 3: then sigma_mid[1] below it.")],
    metric: Annotated[Literal["sliced-wasserstein", "fid"], typer.Option(
        help="sliced-wasserstein: distance to the recipe's training data, no weights file; fid: Inception "
             "weights and --ref.")] = "sliced-wasserstein",
    num_samples: Annotated[int | None, typer.Option(
        "--num-samples", "-n", min=1, max=MAX_COUNT,
        help="Samples per evaluation (sliced-wasserstein: evaluation.num_samples; fid: 10,000, at least 2).")] = None,
    seed: Annotated[int | None, typer.Option(
        min=0, max=MAX_SEED, help="Sample j uses seed + j in every evaluation (default: as ctcore eval).")] = None,
    tolerance: Annotated[float, typer.Option(
        min=0.01, max=1.0, help="Stop a coordinate when its bracket is this wide in log sigma (0.01 to 1; 0.05: "
                                "13 evaluations on (0.002, 80)).")] = 0.05,
    plot: Annotated[Path | None, typer.Option(
        help="The plot, .png, .jpg or .webp (default: search-sigmas-<N>step.png in the run's samples/).")] = None,
    ref: Annotated[Path | None, typer.Option("--ref", help="FID: reference statistics .npz with mu and sigma "
                                             "(ctcore eval-ref-stats, EDM).")] = None,
    ref_protocol: RefProtocolOption = None,
    inception: InceptionOption = None,
    download_inception: DownloadOption = False,
    fid_protocol: FidProtocolOption = "tensorflow",
    batch_size: Annotated[int | None, typer.Option(
        min=1, max=MAX_BATCH, help="FID: 256; sliced-wasserstein: the training loop's.")] = None,
    device: Annotated[str | None, typer.Option(
        callback=_device_option, help="cpu, cuda, cuda:N or auto (default: the recipe's run.device).")] = None,
    progress: Annotated[bool, typer.Option(help="Print a line per evaluation on stderr.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Find the intermediate sigmas of a consistency model's multistep sampling by golden-section search on a
    distance, one at a time, with the same seeds in every evaluation; prints every evaluation, the best and the
    sigma_mid line to paste into the recipe's [sampling], and plots distance against sigma."""
    from ctcore.devices import threads_restored

    with _errors(), threads_restored():
        from ctcore.errors import RunError, UsageError
        from ctcore.files import refuse_writing_inputs
        from ctcore.images import check_image_path
        from ctcore.sampling import checkpoint_inputs
        from ctcore.sigma_search import run_search, save_search_plot

        check_image_path(plot, "--plot")
        refuse_writing_inputs([("--plot", plot)], [*checkpoint_inputs(checkpoint), ("--ref", ref),
                                                   ("--inception", inception)])
        model = None
        if metric == "fid":
            instead = (f"or search without any weights file: ctcore search-sigmas {checkpoint} --steps {steps} "
                       "--metric sliced-wasserstein")
            _require_fid_inputs("ctcore search-sigmas --metric fid", [("checkpoint", checkpoint, "")], ref, inception,
                                download_inception, instead)
            from ctcore.inception import load_inception

            try:
                model = load_inception(inception, download=download_inception, progress=progress)
            except RunError as exc:
                raise RunError(f"{exc.message}\n{instead}") from None
        else:
            for given, name in ((ref, "--ref"), (ref_protocol, "--ref-protocol"), (inception, "--inception"),
                                (download_inception or None, "--download-inception")):
                if given is not None:
                    raise UsageError(f"{name} is for --metric fid; --metric sliced-wasserstein compares the samples "
                                     f"with the recipe's training data and needs no file: drop {name}")
        err = _console(stderr=True)

        def report(row: dict[str, Any]) -> None:
            if progress:
                err.print(f"evaluation {row['index']}/{row['total']}: sigma_mid[{row['coordinate'] - 1}] = "
                          f"{row['sigma']:g} (sigmas {row['sigmas']}) -> {metric} {row['value']:.5g}",
                          markup=False)

        r = run_search(checkpoint, _registry(), steps=steps, metric=metric, num_samples=num_samples, seed=seed,
                       tolerance=tolerance, device=device, batch_size=batch_size, ref=ref, inception=model,
                       fid_protocol=fid_protocol, ref_protocol=ref_protocol, report=report)
        ckpt = Path(r["checkpoint"])
        folder = ckpt.parent.parent / "samples" if ckpt.parent.name == "checkpoints" else ckpt.parent
        plot = plot if plot is not None else folder / f"search-sigmas-{steps}step.png"
        save_search_plot(r, plot, metric)
        r["plot"] = str(plot)
        if as_json:
            typer.echo(json.dumps(r, indent=2))
            return
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"ctcore search-sigmas {checkpoint} ({r['num_samples']:,} samples, seeds from "
                            f"{r['seed']:,}, tolerance {tolerance:g} in log sigma)")
        for col in ("#", "coordinate", "sigmas", metric):
            table.add_column(col, justify="left" if col == "sigmas" else "right")
        for i, e in enumerate(r["evaluations"], start=1):
            table.add_row(str(i), f"sigma_mid[{e['coordinate'] - 1}]", Text(str(e["sigmas"])), f"{e['value']:.5g}")
        out = _console()
        out.print(_folded(table))
        best = [r["sigma_max"], *r["sigma_mid"]]
        line = f"best: sigmas {best}, {metric} {r['value']:.5g}"
        if r["recipe_value"] is not None:
            line += f" (the recipe's sigma_mid {r['recipe_sigma_mid']}: {r['recipe_value']:.5g})"
        out.print(line, markup=False)
        out.print(f"wrote the plot to {plot}", markup=False)
        typer.echo(r["paste"])


@app.command()
def bench(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="The recipe whose network to benchmark.")],
    batch: Annotated[int | None, typer.Option(
        min=1, max=MAX_BATCH, help="Batch size (default: training.batch_size).")] = None,
    steps: Annotated[int, typer.Option(min=1, max=MAX_BENCH_STEPS, help="Timed steps of each kind.")] = 10,
    warmup: Annotated[int, typer.Option(
        min=0, max=MAX_BENCH_STEPS, help="Untimed steps first (compilation, autotuning).")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    device: RecipeDeviceOption = None,
    sets: SetOption = None,
    profile: Annotated[Path | None, typer.Option(
        "--profile", metavar="DIR", help="Then trace 3 training steps and one sampling batch with torch.profiler into "
        "a new DIR/bench-<recipe>-<time>-<pid>.pt.trace.json (DIR is created if missing; no trace is replaced), "
        "and print the 15 operators with the most self time.")] = None,
) -> None:
    """Time the recipe's real training step and one network evaluation per image (one-step sampling) on random
    data of its shape. With training.compile (e.g. --set training.compile=on) the step runs eagerly, then
    compiled, and the report adds the compile time, graph breaks and recompiles torch.compile counted."""
    from ctcore.devices import threads_restored

    with _errors(), threads_restored():
        from ctcore.bench import profile_trace_path, run_bench
        from ctcore.recipe import read_recipe

        trace = profile_trace_path(profile, recipe_path) if profile is not None else None
        registry = _registry()
        recipe = read_recipe(recipe_path, registry, _with_device(sets or [], device))
        result = run_bench(recipe, registry, batch=batch, steps=steps, warmup=warmup, profile=trace)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        profiled = result.pop("profile", None)
        from rich.table import Table

        def fmt(v: object) -> str:
            if v is None:
                return "n/a"
            if isinstance(v, list):  # graph-break and recompile reasons
                return "; ".join(map(str, v)) or "none"
            if isinstance(v, float):
                return f"{v:,.0f}" if v >= 1000 else f"{v:.4g}"
            return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

        from rich.text import Text

        table = Table(title=f"ctcore bench {recipe_path}", show_header=False)
        for key, value in result.items():
            table.add_row(key.replace("_", " "), Text(fmt(value)))  # Text: a reason's brackets are no markup
        _console().print(_folded(table))
        if profiled is not None:
            _console().print(_folded(_top_ops_table(profiled)))
            typer.echo(f"trace: {profiled['trace']}")


def _top_ops_table(profiled: dict[str, Any]) -> Any:
    """bench --profile: the operators with the most self time, one row each."""
    from rich.table import Table
    from rich.text import Text

    on_device = profiled["top_ops"] and profiled["top_ops"][0]["self_device_ms"] is not None
    table = Table(title=f"{len(profiled['top_ops'])} operators with the most {profiled['sorted_by']} "
                        f"({profiled['steps']} training steps, {profiled['sample_batches']} sampling batch)")
    for column in ("operator", "calls", "self CPU ms", *(["self device ms"] if on_device else []), "% of self time"):
        table.add_column(column, justify="left" if column == "operator" else "right")
    for row in profiled["top_ops"]:
        device_cell = [f"{row['self_device_ms']:.3f}"] if on_device else []
        table.add_row(Text(row["op"]), f"{row['calls']:,}", f"{row['self_cpu_ms']:.3f}", *device_cell,
                      f"{row['self_percent']:.1f}")
    return table


@app.command("list-components")
def list_components(
    kind: Annotated[str | None, typer.Option(help="Only this kind (network, metric, ..., logger).")] = None,
    options: Annotated[bool, typer.Option("--options", help="Show each component's options and defaults.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List installed components: kind, name, summary and the distribution that provides them."""
    with _errors():
        from ctcore.components import ALL_KINDS
        from ctcore.errors import UsageError, unknown_name_message

        if kind is not None and kind not in ALL_KINDS:
            raise UsageError(unknown_name_message("component kind", kind, list(ALL_KINDS)))
        rows = [r for r in _registry().rows() if kind is None or r["kind"] == kind]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        if options:
            typer.echo(_options_text(rows))
            return
        from rich.table import Table
        from rich.text import Text

        table = Table(title="ctcore components")
        for col in ("kind", "name", "summary", "provided by"):
            table.add_column(col)
        for r in rows:
            cells = [r["kind"], r["name"], r["summary"], f"{r['distribution']} {r['version']}"]
            table.add_row(*(Text(c) for c in cells))
        _console().print(_folded(table))


def _options_text(rows: list[dict[str, Any]]) -> str:
    """list-components --options: one block per component, one option a line as a recipe writes it, wrapped to
    the terminal (a table column cannot hold 20 options at 80 columns)."""
    import shutil
    import textwrap

    from ctcore.recipe import _toml_value

    width = max(40, shutil.get_terminal_size().columns)

    def shown(value: Any) -> str:
        if value is None:
            return "(computed when omitted; ctcore check shows it)"
        try:
            return _toml_value(value)
        except TypeError:  # a plugin's default TOML cannot write
            return repr(value)

    def wrap(text: str, indent: str) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "    ",
                             break_long_words=False, break_on_hyphens=False)

    blocks = []
    for r in rows:
        lines = wrap(f"[{r['kind']}] name = {_toml_value(r['name'])}  ({r['distribution']} {r['version']})", "")
        lines += wrap(r["summary"], "  ")
        for key, value in r["options"].items():
            lines += wrap(f"{key} = {shown(value)}" + (f"  # {r['ranges'][key]}" if key in r["ranges"] else ""), "  ")
        if not r["options"]:
            lines.append("  (no options)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR", help="Run directories (each holds the stats.jsonl its run wrote).")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The figure: .png, .jpg or .webp.")] = Path("report.png"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the table of final figures as JSON.")] = False,
) -> None:
    """Plot loss, distance (FID, IS when logged) and img/s against steps for one or more runs, and print a table
    of their final figures."""
    with _errors():
        from ctcore.reporting import run_report

        rows = run_report(run_dirs, output, _registry())
        if as_json:
            typer.echo(json.dumps([_finite(r) for r in rows], indent=2))
            _console(stderr=True).print(f"wrote the figure to {output}")
            return
        from rich.table import Table
        from rich.text import Text

        def fmt(v: float | None, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        table = Table(title="ctcore report")
        columns = ["run", "step", "loss", "sliced W", "FID", "IS", "img/s"]
        has_is = any(r["inception_score"] is not None for r in rows)
        for col in columns if has_is else [c for c in columns if c != "IS"]:
            table.add_column(col, justify="left" if col == "run" else "right")
        for r in rows:
            cells = [r["run"], f"{r['step']:,}", fmt(r["loss"], ".4g"), fmt(r["sliced_wasserstein"], ".4f"),
                     fmt(r["fid"], ".2f"), fmt(r["inception_score"], ".2f"), fmt(r["img_per_s"], ",.0f")]
            table.add_row(*(Text(c) for i, c in enumerate(cells) if has_is or i != 5))
        _console().print(_folded(table))
        _console().print(f"wrote the figure to {output}")


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: a non-finite number as the string "nan" / "inf" / "-inf", as stats.jsonl writes it."""
    import math

    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


data_app = typer.Typer(
    help="Import, inspect and download training datasets (HDF5: uint8 images (N, C, H, W), labels, attrs).",
    no_args_is_help=True,
    **PLAIN_HELP,
)
app.add_typer(data_app, name="data")


@data_app.command("import")
def data_import(
    source: Annotated[Path, typer.Argument(
        metavar="SOURCE",
        help="cifar-10-python.tar.gz (or its folder); an image folder, .zip or .tar(.gz) with one subfolder per "
             "class, optionally under train/ and test/; or downsampled ImageNet .npz batches (a file or folder).")],
    out: Annotated[Path, typer.Argument(metavar="OUT.h5", help="The dataset file to write.")],
    split: Annotated[str, typer.Option(help="train or test (val for ImageNet .npz folders).")] = "train",
    resolution: Annotated[int | None, typer.Option(
        min=1, max=MAX_RESOLUTION,
        help="Resize the short side to this and center-crop square (default: keep a shared size).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT.h5 if it exists.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Convert a dataset into ctcore's training format (what data.path in a recipe points at)."""
    with _errors():
        from ctcore.files import check_suffix
        from ctcore.importers import import_dataset

        check_suffix(out, "OUT.h5", HDF5_SUFFIXES, "an HDF5")
        r = import_dataset(source, out, split=split, resolution=resolution, overwrite=overwrite, progress=progress)
        if as_json:
            _print_json(r)
            return
        _console().print(f"wrote {r['count']:,} images of shape {tuple(r['shape'])} in {r['num_classes']} classes "
                         f"({r['format']}, split {r['split']}) to {r['out']} in {r['seconds']:.1f} s")


@data_app.command("info")
def data_info(
    file: Annotated[Path, typer.Argument(metavar="DATASET.h5", help="A dataset file (HDF5).")],
    grid: Annotated[Path | None, typer.Option(
        help="Also write a grid of examples here (.png, .jpg or .webp): 64, or for a labelled file one row of 8 "
             "per class.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Count, image shape, classes with per-class counts, and where the data came from."""
    with _errors():
        from ctcore.images import check_image_path
        from ctcore.importers import dataset_info

        check_image_path(grid)
        info = dataset_info(file, grid)
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"dataset {file}", show_header=False)
        table.add_row("images", f"{info['count']:,} of shape {tuple(info['shape'])}")
        if info["classes"]:
            table.add_row("classes", Text(", ".join(f"{c['label']} {c['name']} ({c['count']:,})"
                                                    for c in info["classes"])))
        else:
            table.add_row("classes", "no labels")
        for key, value in info["attrs"].items():
            if key != "class_names":
                table.add_row(key, Text(str(value)))
        if info["grid"]:
            rows, shown = info["grid_rows"], sum(1 for c in info["classes"] if c["count"])
            note = "" if rows is None else " (one row per class)" if len(rows) == shown else (
                f" (one row per class, for the first {len(rows)} of {shown} classes)")
            table.add_row("grid", info["grid"] + note)
        _console().print(_folded(table))


@data_app.command("download")
def data_download(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The dataset: cifar10.")],
    dest: Annotated[Path, typer.Option(help="Folder to save the archive in.")] = Path("data"),
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Download a dataset's official archive and verify its SHA-256; then run `ctcore data import` on it."""
    with _errors():
        from ctcore.importers import DOWNLOADS, download, import_command

        path = download(name, dest, progress=progress)
        if as_json:  # the file's sha256 was verified against this one
            _print_json({"name": name, "path": path, "sha256": DOWNLOADS[name][1], "next": import_command(name, path)})
            return
        _console().print(f"{path} is in place (sha256 verified). Next: {import_command(name, path)}")


convert_app = typer.Typer(
    help="Import models trained elsewhere as ctcore checkpoints (for ctcore sample, edit, eval and run "
         "--init-from).",
    no_args_is_help=True,
    **PLAIN_HELP,
)
app.add_typer(convert_app, name="convert")


@convert_app.command("openai-cm")
def convert_openai_cm(
    source: Annotated[Path, typer.Argument(
        metavar="SOURCE", help="A released OpenAI consistency model (openai/consistency_models), e.g. "
                                  "cd_imagenet64_lpips.pt.")],
    out: Annotated[Path, typer.Argument(metavar="OUT.pt", help="The ctcore checkpoint to write.")],
    config: Annotated[Literal["imagenet64", "lsun256"] | None, typer.Option(
        help="The released architecture (default: inferred from the tensor shapes).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT.pt if it exists.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Convert a released OpenAI consistency model into a ctcore checkpoint (its weights as eval EMA)."""
    with _errors():
        from ctcore.convert import convert_openai_cm as convert

        r = convert(source, out, _registry(), config=config, overwrite=overwrite)
        if as_json:
            _print_json({"source": source, **r})
            return
        _console().print(f"wrote {r['out']} ({r['config']}, {r['parameters']:,} parameters from "
                         f"{'/'.join(r['dtypes'])} {source}, sha256 {r['sha256'][:12]}...)")


@convert_app.command("edm")
def convert_edm(
    source: Annotated[Path, typer.Argument(
        metavar="SOURCE", help="An NVlabs/edm network pickle: a released edm-*.pkl or a training run's "
                                   "network-snapshot-*.pkl. Read as data: nothing in it runs.")],
    out: Annotated[Path, typer.Argument(metavar="OUT.pt", help="The ctcore checkpoint to write.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT.pt if it exists.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Convert an EDM network pickle into a ctcore diffusion checkpoint (its EMA weights, its preconditioning)."""
    with _errors():
        from ctcore.convert_edm import convert_edm as convert

        r = convert(source, out, _registry(), overwrite=overwrite)
        if as_json:
            _print_json({"source": source, **r})
            return
        _console().print(f"wrote {r['out']} ({r['preconditioning']}({r['network']}) as {r['ctcore_network']}, "
                         f"{r['parameters']:,} parameters from {'/'.join(r['dtypes'])} {source}, sha256 "
                         f"{r['sha256'][:12]}...)")


export_app = typer.Typer(
    help="Write ctcore models for use elsewhere: safetensors weights with their recipe, or a diffusers pipeline.",
    no_args_is_help=True,
    **PLAIN_HELP,
)
app.add_typer(export_app, name="export")

ExportWeightsOption = Annotated[Literal["eval-ema", "student"], typer.Option(
    help="eval-ema (default) or student.")]


@export_app.command("safetensors")
def export_safetensors(
    checkpoint: Annotated[Path, typer.Argument(
        metavar="CHECKPOINT", help="A checkpoint file, or a RUN_DIR (its latest checkpoint).")],
    out: Annotated[Path, typer.Argument(metavar="OUT.safetensors", help="The .safetensors file to write.")],
    weights: ExportWeightsOption = "eval-ema",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT.safetensors if it exists.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Write a checkpoint's network weights as a .safetensors file with its recipe and provenance as metadata
    (ctcore's commands read it like a checkpoint)."""
    with _errors():
        from ctcore.export import export_safetensors as export

        r = export(checkpoint, out, _registry(), weights=weights, overwrite=overwrite)
        if as_json:
            _print_json(r)
            return
        _console().print(f"wrote {r['out']} (the {r['weights']} weights of {r['checkpoint']} at step {r['step']:,}: "
                         f"{r['tensors']:,} tensors, {r['parameters']:,} parameters; recipe and provenance as "
                         "metadata)")


@export_app.command("diffusers")
def export_diffusers(
    checkpoint: Annotated[Path, typer.Argument(
        metavar="CHECKPOINT", help="A checkpoint file, or a RUN_DIR (its latest checkpoint).")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="The pipeline folder to write.")],
    weights: ExportWeightsOption = "eval-ema",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace OUT_DIR if it is an earlier diffusers pipeline folder.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Write a consistency model as a diffusers ConsistencyModelPipeline folder (UNet2DModel and
    CMStochasticIterativeScheduler) that ConsistencyModelPipeline.from_pretrained loads."""
    with _errors():
        from ctcore.export import export_diffusers as export

        r = export(checkpoint, out_dir, _registry(), weights=weights, overwrite=overwrite)
        if as_json:
            _print_json(r)
            return
        _console().print(f"wrote {r['out_dir']} (ConsistencyModelPipeline: a UNet2DModel of {r['parameters']:,} "
                         f"parameters from the {r['weights']} weights of {r['checkpoint']} at step {r['step']:,}, "
                         f"CMStochasticIterativeScheduler with sigma_min {r['sigma_min']:g}, sigma_max "
                         f"{r['sigma_max']:g}, sigma_data {r['sigma_data']:g})")


def main() -> None:
    """Console-script entry point (and python -m ctcore): the app's group prints usage errors in one line."""
    app()
