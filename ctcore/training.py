"""The training loop, read top to bottom: one step, then the loop that logs, samples, evaluates and checkpoints.

One step: the data batch -> the objective's loss (consistency training: N(k) from the curriculum -> sigma grid
-> pair indices from the noise schedule -> student at sigma_{i+1} against teacher at sigma_i, same z, same
dropout mask) -> optimizer step -> the objective's after-step update (the teacher's) -> eval-EMA update.
The loop reads values from the device only where it logs, samples, evaluates, checkpoints or stops, never per step;
a non-finite step is found there and taken back (train_step). Building a run lives in ctcore.build, checkpoints in
ctcore.checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import tomllib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from ctcore.checkpoints import restore, save_checkpoint, training_state
from ctcore.components import TrainingBatch
from ctcore.errors import RunError
from ctcore.evaluation import evaluate_distance
from ctcore.fid import evaluate_fid, load_fid_tools
from ctcore.reporting import RunLog, build_loggers, is_live, logged_distance, plot_fid, progress_bar, progress_line
from ctcore.sampling import NonFiniteOutputs, save_samples

if TYPE_CHECKING:
    from pathlib import Path

    from ctcore.recipe import Recipe
    from ctcore.runstate import Run


# ------------------------------------------------------------------------------------------- the step


def train_step(run: Run) -> tuple[torch.Tensor, bool]:
    """One iteration at step k = run.step; returns the loss (a device tensor) and whether the update was applied.

    The data batch is drawn here, the loss is the objective's (for consistency training: N(k), the sigma grid,
    pair indices, the student against the teacher). Every rank draws the global batch and the objective's
    randomness from the shared generators and keeps its share, so the ranks together compute exactly the
    single-process step. With training.max_nonfinite_steps > 0 a step whose loss or gradient norm is not finite
    changes nothing but the step count and the generators: called alone, the step reads that one flag from the
    device to decide; inside `train` (run.nonfinite_flag set) it reads nothing, applies the update and records the
    flag on the device, and `train` takes back every update since its rollback point and redoes those steps one
    by one, each deciding as above, before anything reads the weights. Nothing else in the step reads a value from
    the device (the optimizers' own step counters live on the host; docs/concepts.md lists what remains).
    With training.micro_batch_size the share's loss and gradient are summed over micro-batches before the one
    update (accumulate_gradients).
    """
    r, t, world = run.recipe, run.recipe.training, run.world
    k = run.step
    x, labels = run.data.batch(t.batch_size, run.index_generator, rank=world.rank, world_size=world.world_size)
    # the compiled teacher pass only while it wraps the teacher's current network (a teacher may replace it)
    wrapped = getattr(run.teacher_forward, "_orig_mod", None)
    teacher = run.teacher_forward if run.teacher is not None and wrapped is run.teacher.network else None
    batch = TrainingBatch(step=k, x=x, labels=labels, batch_size=t.batch_size, share=world.share(t.batch_size),
                          student=run.student_forward, constants=r.consistency,
                          index_generator=run.index_generator, noise_generator=run.noise_generator, teacher=teacher)
    if t.warmup_steps > 0:
        for group in run.optimizer.param_groups:
            group["lr"] = t.lr * min(1.0, (k + 1) / t.warmup_steps)
    if t.micro_batch_size:
        loss = accumulate_gradients(run, batch)
    else:
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
            loss = run.objective.loss(batch)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients arrive averaged over ranks: every rank sees the same norm
        loss = loss.detach()
    grad_norm = None
    if t.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), t.grad_clip)
    elif t.max_nonfinite_steps > 0:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in run.student.parameters() if p.grad is not None])
    run.step = k + 1
    if t.max_nonfinite_steps > 0:
        # the gradient norm is global under DDP, so every rank decides alike; a rank's loss is only its own
        finite = torch.isfinite(grad_norm) if world.distributed else torch.isfinite(grad_norm) & torch.isfinite(loss)
        if run.nonfinite_flag is not None:
            run.nonfinite_flag.logical_or_(~finite)  # read by train() at its next decision point
        elif not bool(finite):
            run.optimizer.zero_grad(set_to_none=True)
            run.nonfinite_run += 1
            return loss, False
    run.optimizer.step()
    run.objective.after_step(k)
    update_ema(run.eval_ema, run.student, t.eval_ema_decay)
    run.nonfinite_run, run.last_good_step = 0, run.step
    return loss, True


def accumulate_gradients(run: Run, batch: TrainingBatch) -> torch.Tensor:
    """training.micro_batch_size > 0: the gradient of the share's mean loss as the sum over its micro-batches of
    micro / share x each micro-batch's mean loss; returns the share's mean loss (a device tensor).

    Every micro-batch starts the objective's generators from where the data draw left them, so it draws the same
    global pairs and noise as the whole step and keeps its own rows of them (`share`): the step equals the whole
    batch's up to the order of floating-point sums. The generators end where the whole step leaves them. Dropout
    masks come from torch's generator afresh for each micro-batch (student and teacher still share them), not the
    values one pass over the share would draw. Under DDP only the last backward all-reduces (no_sync before it).
    """
    micro, rows = run.recipe.training.micro_batch_size, batch.x.shape[0]
    generators = (run.index_generator, run.noise_generator)
    after_data = [g.get_state() for g in generators]  # host copies: no device sync, also on CUDA
    run.optimizer.zero_grad(set_to_none=True)
    total = None
    for start in range(0, rows, micro):
        for g, state in zip(generators, after_data, strict=True):
            g.set_state(state)
        part = slice(start, start + micro)
        first = batch.share.start + start
        piece = attrs.evolve(batch, x=batch.x[part], labels=None if batch.labels is None else batch.labels[part],
                             share=slice(first, first + micro))
        last = start + micro >= rows
        with contextlib.nullcontext() if last or run.ddp is None else run.ddp.no_sync():
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
                loss = run.objective.loss(piece) * (micro / rows)  # objectives return the mean over their rows
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def rollback_point(run: Run) -> dict[str, Any]:
    """A copy on the run's device of everything a checkpoint holds, for ctcore.checkpoints.restore: `train` goes
    back to it when a step it did not check turns out to have been non-finite."""
    state = _copied(training_state(run))
    if run.world.distributed:  # restore takes this rank's own dropout RNG states from `ranks`
        state["rng"]["ranks"] = [{key: state["rng"][key] for key in ("torch", "cuda")}] * run.world.world_size
    return state


def _copied(value: Any) -> Any:
    """`value` with every tensor in it cloned (dicts, lists and tuples rebuilt around them)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _copied(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copied(v) for v in value)
    return value


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(mb)


# ------------------------------------------------------------------------------------ the training loop


def distance_interval(recipe: Recipe) -> int:
    """Steps between the run's distance measurements besides step 0 and the end: evaluation.distance_every, or for
    0 ten points over the run (max(1, total_steps // 10)); 0 when evaluation.distance is "none"."""
    e = recipe.evaluation
    if e.distance == "none":
        return 0
    return e.distance_every or max(1, recipe.training.total_steps // 10)


def ema_moved(decay: float, steps: int) -> float:
    """The fraction of the way from its start that an EMA of this decay has moved after `steps` updates:
    1 - decay^steps."""
    if steps == 0 or decay == 0:
        return float(steps > 0)
    return -math.expm1(steps * math.log(decay))


def ema_warning(decay: float, steps: int, start_step: int) -> str:
    """The summary's warning for an eval EMA that `steps` updates moved less than half of the way (below its
    half-life): its distance and samples show little of the training."""
    half_life = math.log(0.5) / math.log(decay)
    these = f"the {steps:,} steps of this run" if start_step == 0 else \
        f"the {steps:,} steps since the resume at step {start_step:,}"
    return (f"the eval EMA (training.eval_ema_decay = {decay}) has a half-life of {round(half_life):,} steps; after "
            f"{these} it holds {percent(ema_moved(decay, steps))} of their training, so its distance and samples "
            "show little of it: train longer, or lower training.eval_ema_decay for a smoke run")


def percent(fraction: float) -> str:
    """A fraction as a percentage with two significant digits (0.28%, 45%, 0%), or `less than 0.01%`."""
    return f"{100 * fraction:.2g}%" if fraction >= 1e-4 or fraction == 0 else "less than 0.01%"


@contextlib.contextmanager
def flush_denormals(enabled: bool) -> Iterator[None]:
    """Flush denormal floats to zero while training on CPU, then restore the process's previous mode.

    Tiny weight updates from zero-initialised layers produce denormals, which run ~7x slower on x86 CPUs
    during the first hundred steps; flushing them changes no result that matters. torch has no getter for
    the mode, so it is read off a subnormal value.
    """
    was_flushing = torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() == 0.0
    if enabled:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_flushing)


class TrainingStopped(Exception):
    """SIGTERM or SIGINT arrived: the current step finished and a checkpoint was written."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"{signal_name} at step {step}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class TrainingDiverged(RunError):
    """training.max_nonfinite_steps consecutive steps had a non-finite loss or gradient; the last good weights
    were checkpointed."""

    def __init__(self, run: Run, checkpoint: Path, loss: float) -> None:
        t = run.recipe.training
        super().__init__(
            f"training stopped at step {run.step:,}: {run.nonfinite_run} consecutive steps had a non-finite loss or "
            f"gradient (training.max_nonfinite_steps = {t.max_nonfinite_steps}; last loss {loss}); {checkpoint} "
            f"holds the weights of the last good step {run.last_good_step:,}. Look at the `nonfinite` events in "
            f"{run.out_dir / 'stats.jsonl'}; then resume with `ctcore run {run.out_dir} --resume`, or start a new "
            f"run with a lower training.lr or a training.grad_clip"
        )
        self.checkpoint = checkpoint


@contextlib.contextmanager
def stop_on_signals(enabled: bool) -> Iterator[list[str]]:
    """While active, SIGTERM / SIGINT only record their name in the yielded list (the loop checks it after
    each step); the previous handlers come back afterwards. A second Ctrl-C interrupts at once."""
    received: list[str] = []
    if not enabled:
        yield received
        return

    def handler(signum: int, _frame: object) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(run: Run, *, stop_at: int | None = None, progress: bool = True, console=None,
          handle_signals: bool = False) -> dict[str, Any]:
    """Train from run.step to training.total_steps (or `stop_at`), logging, checkpointing and sampling.

    With `handle_signals`, SIGTERM / SIGINT finish the current step, write a checkpoint and raise
    TrainingStopped (under torchrun every rank stops after the same step). Non-finite steps are found where the
    loop next logs, samples, evaluates, checkpoints or stops: the steps since the previous such point are taken back
    and redone one by one, so they end as if each had been checked (docs/recipes.md, max_nonfinite_steps); too many
    consecutive ones raise TrainingDiverged after checkpointing. Only rank 0 writes files and shows progress: a rich bar
    on a terminal, else one plain `progress_line` per log interval. The distance is measured at step 0, every
    `distance_interval` steps and at the end. Returns a summary dict (final step, mean loss of the last interval,
    distances, for a resumed run the last one logged at or before its start, how far the eval EMA moved, warnings,
    run time).
    """
    from rich.console import Console

    from ctcore.distributed import any_rank, mean_over_ranks

    console = console or Console(stderr=True)
    t, world = run.recipe.training, run.world
    end = min(t.total_steps, stop_at) if stop_at is not None else t.total_steps
    if world.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    # rank 0 logs to the recipe's loggers (stats.jsonl first), closed in finally; the other ranks log nowhere
    if world.is_main:
        log = RunLog.start(build_loggers(run.recipe, run.registry), run.out_dir, run.step,
                           tomllib.loads(run.recipe_text))
    else:
        log = RunLog()
    summary: dict[str, Any] = {"start_step": run.step, "warnings": []}
    if run.step > 0 and world.is_main:  # a resumed run compares its end with where it resumed
        summary["resume_distance"] = logged_distance(run.out_dir, run.step)
    started = time.perf_counter()
    finished = False

    def measured(what: str, measure: Any) -> Any:
        """measure() of the eval EMA (a distance, sample grids, FID), or None with a warning in the log, on stderr
        and in the summary when its network outputs are not finite: the run goes on and may recover."""
        try:
            return measure()
        except NonFiniteOutputs as failure:
            message = (f"no {what} at step {run.step:,}: the eval EMA gives {failure.describe()}; training goes on")
            log({"event": "warning", "step": run.step, "about": what, "warning": message})
            summary["warnings"].append(message)
            if world.is_main:
                console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)
            return None

    with flush_denormals(run.device.type == "cpu"):
        try:
            if run.initial_distance is None and run.step == 0:
                run.initial_distance = measured("sliced Wasserstein distance", lambda: evaluate_distance(run))
                if run.initial_distance is not None:
                    log({"event": "distance", "step": 0, "sliced_wasserstein": run.initial_distance})
            e = run.recipe.evaluation
            fid_tools = load_fid_tools(run) if e.fid_every > 0 else None  # fail before training, not mid-run
            distance_every = distance_interval(run.recipe)
            loss_acc = torch.zeros((), device=run.device, dtype=torch.float64)  # summed on device: no sync per step
            acc_count = 0

            def fold_losses() -> None:
                """Move the device-side loss sum into the run (read back only here, at log and checkpoint times)."""
                nonlocal acc_count
                if acc_count:
                    run.loss_sum += float(mean_over_ranks(world, loss_acc))
                    run.loss_count += acc_count
                    loss_acc.zero_()
                    acc_count = 0

            last_time, last_step = time.perf_counter(), run.step
            loop_started, first_step = last_time, run.step  # for the ETA of the plain progress lines
            plain_lines = progress and world.is_main and not is_live(console)
            last_loss = None
            skipped = 0  # steps of this call skipped as non-finite
            # With the non-finite check on, steps are not checked one by one: each applies its update and ORs its
            # flag into run.nonfinite_flag on the device; before anything reads the weights (a log line, samples,
            # FID, a checkpoint, a stop), settle() reads the flag once and, if a step was not finite, goes back to
            # the rollback point and redoes the steps since, each checked alone as before.
            deferred = t.max_nonfinite_steps > 0
            rollback: dict[str, Any] | None = None  # the state the unchecked steps started from (None: none ran)

            def step_once() -> None:
                """One training step: its loss joins the interval's sum, or (a skipped step) a `nonfinite` event is
                logged and after training.max_nonfinite_steps of them in a row the run stops."""
                nonlocal loss_acc, acc_count, skipped
                loss, applied = train_step(run)
                if applied:
                    loss_acc += loss.double()
                    acc_count += 1
                    return
                skipped += 1
                k = run.step
                log({"event": "nonfinite", "step": k, "loss": float(loss),
                     "consecutive": run.nonfinite_run, "last_good_step": run.last_good_step})
                if run.nonfinite_run >= t.max_nonfinite_steps:
                    fold_losses()
                    path = save_checkpoint(run)
                    log({"event": "diverged", "step": k, "path": str(path)})
                    raise TrainingDiverged(run, path, float(loss))

            def settle() -> None:
                """Read the flag of the steps applied since the rollback point (one read); if any was not finite,
                restore that point and redo them one by one, each checked alone (a read per step)."""
                nonlocal rollback, acc_count
                if rollback is None:
                    return
                flag, reached = run.nonfinite_flag, run.step
                if bool(flag):
                    restore(run, rollback["state"])
                    loss_acc.copy_(rollback["loss_acc"])
                    acc_count = rollback["acc_count"]
                    run.nonfinite_flag = None
                    try:
                        while run.step < reached:
                            step_once()
                    finally:
                        run.nonfinite_flag = flag.zero_()
                rollback = None

            with progress_bar(progress and world.is_main, console) as bar, stop_on_signals(handle_signals) as signals:
                task = bar.add_task("training", total=end, completed=run.step, loss="-", scales="-", speed="-")
                run.nonfinite_flag = torch.zeros((), dtype=torch.bool, device=run.device) if deferred else None
                while run.step < end:
                    if deferred and rollback is None:
                        rollback = {"state": rollback_point(run), "loss_acc": loss_acc.clone(), "acc_count": acc_count}
                    try:
                        step_once()
                    except Exception:
                        # after an unchecked non-finite step the weights are spoilt until settle(), and a component
                        # that refuses NaN inputs may raise: go back and redo the steps that completed one by one
                        # (run.step is still k when the step raised before its update: the loop takes it again).
                        # Not under torchrun, where the other ranks may not have raised and would not go back.
                        if rollback is None or world.distributed or not bool(run.nonfinite_flag):
                            raise
                        settle()
                    k = run.step
                    bar.update(task, completed=k)
                    if k % t.log_every == 0 or k == end:
                        settle()
                        fold_losses()
                        last_loss = run.loss_sum / run.loss_count if run.loss_count else float("nan")
                        speed = (k - last_step) * t.batch_size / max(time.perf_counter() - last_time, 1e-9)
                        fields = run.objective.log_fields(k - 1)  # consistency: num_scales, teacher_decay
                        n = fields.get("num_scales")
                        log({"step": k, "loss": last_loss, **fields, "lr": run.optimizer.param_groups[0]["lr"],
                             "img_per_s": speed})
                        bar.update(task, loss=f"{last_loss:.4g}", scales="-" if n is None else str(n),
                                   speed=f"{speed:,.0f}")
                        if plain_lines:
                            eta = (end - k) * (time.perf_counter() - loop_started) / max(k - first_step, 1)
                            console.print(progress_line(k, end, last_loss, n, speed, eta), markup=False,
                                          highlight=False, soft_wrap=True)
                        run.loss_sum, run.loss_count = 0.0, 0
                        last_step = k
                    if k % t.sample_every == 0 or k == end:
                        settle()
                        path = measured("sample grid", lambda: save_samples(run))
                        if path is not None:
                            log({"event": "samples", "step": k, "path": str(path)})
                    if distance_every and k % distance_every == 0 and k < t.total_steps:  # the end's: below
                        settle()
                        distance = measured("sliced Wasserstein distance", lambda: evaluate_distance(run))
                        if distance is not None:
                            log({"event": "distance", "step": k, "sliced_wasserstein": distance})
                    if fid_tools is not None and (k % e.fid_every == 0 or k == t.total_steps):
                        settle()
                        result = measured("FID", lambda: evaluate_fid(run, fid_tools))
                        if result is not None:
                            log({"event": "fid", "step": k, "fid": result["fid"],
                                 "num_samples": e.fid_num_samples, "steps": e.fid_steps,
                                 "inception_score": result["inception_score"],
                                 "fid_protocol": e.fid_protocol, "is_split": e.is_split})
                            if world.is_main:
                                plot_fid(run.out_dir)
                    if k % t.checkpoint_every == 0 or k == end:
                        settle()
                        fold_losses()  # a partial log interval survives a resume
                        path = save_checkpoint(run)
                        log({"event": "checkpoint", "step": k, "path": str(path)})
                    # ranks receive a signal at different moments: all stop after the first step any rank saw it
                    if any_rank(world, bool(signals)):
                        name = signals[0] if signals else "SIGTERM"
                        settle()
                        fold_losses()
                        path = save_checkpoint(run)
                        log({"event": "stopped", "step": k, "signal": name, "path": str(path)})
                        raise TrainingStopped(name, k, path)
                    if k == last_step:  # img/s measures training: restart the clock after logging and file writes
                        last_time = time.perf_counter()
            summary["loss"] = last_loss
            summary["skipped_steps"] = skipped
            if skipped and skipped == run.step - summary["start_step"]:
                summary["warnings"].append(
                    f"every one of the {skipped:,} steps was skipped: each had a non-finite loss or gradient, so the "
                    f"weights are still those of step {run.last_good_step:,}; see the `nonfinite` events in "
                    f"{run.out_dir / 'stats.jsonl'}, and start again with a lower training.lr or a training.grad_clip")
            if run.step >= t.total_steps and run.step > summary["start_step"]:
                final = measured("sliced Wasserstein distance", lambda: evaluate_distance(run))
                summary["final_distance"] = final
                if final is not None:
                    log({"event": "distance", "step": run.step, "sliced_wasserstein": final})
                updates = run.step - summary["start_step"] - skipped  # a skipped step does not update the EMA
                summary["eval_ema_moved"] = ema_moved(t.eval_ema_decay, updates)
                if updates and summary["eval_ema_moved"] < 0.5:  # with none, the warning above says why
                    summary["warnings"].append(ema_warning(t.eval_ema_decay, updates, summary["start_step"]))
            finished = True
        except (TrainingStopped, TrainingDiverged):
            raise
        except Exception as exc:  # e.g. raised inside a plugin: the log says when; checkpoints stay as they were
            with contextlib.suppress(Exception):  # a failing logger may fail again
                log({"event": "error", "step": run.step, "error": f"{type(exc).__name__}: {exc}"[:500]})
            raise
        finally:
            run.nonfinite_flag = None  # train_step called alone checks each step again
            log.close(quiet=not finished)  # an exception on its way out is the better report

    summary.update(step=run.step, initial_distance=run.initial_distance, seconds=time.perf_counter() - started)
    return summary
