"""Build a run from a recipe, and the training loop: read it top to bottom.

One step: N(k) from the curriculum -> sigma grid -> pair indices from the noise schedule -> consistency loss
(student at sigma_{i+1}, teacher at sigma_i, same z, same dropout mask) -> optimizer step -> teacher update ->
eval-EMA update. Checkpoints hold everything needed to resume bit-for-bit on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import platform
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

import ctcore
from ctcore.components import KINDS, BuildContext
from ctcore.consistency import consistency_loss, denoise, karras_sigmas
from ctcore.data import ImageData, data_shape, load_data, to_uint8
from ctcore.distributed import SINGLE, World
from ctcore.errors import RunError, UsageError
from ctcore.evaluation import sliced_wasserstein
from ctcore.files import atomic_write
from ctcore.recipe import Recipe, dump_recipe, parse_recipe
from ctcore.registry import Registry

CHECKPOINT_FORMAT = "ctcore-checkpoint-1"


@attrs.define(eq=False)
class Run:
    """Everything a training run holds; `build_run` makes it, `train` advances it."""

    recipe: Recipe
    registry: Registry
    out_dir: Path
    device: torch.device
    data: ImageData
    student: nn.Module
    eval_ema: nn.Module
    teacher: Any
    metric: nn.Module
    noise_schedule: Any
    curriculum: Any
    optimizer: torch.optim.Optimizer
    index_generator: torch.Generator
    """Generator on the training device for batch indices, flips and pair indices."""
    noise_generator: torch.Generator
    """Generator on the training device for the noise z."""
    provenance: dict[str, Any]
    precision: str
    student_forward: nn.Module
    """The student as called in the loss: the student itself, or its torch.compile wrapper."""
    step: int = 0
    sigma_grids: dict[int, torch.Tensor] = attrs.field(factory=dict)
    """Karras grids on the training device by N, made once per curriculum stage (no copy per step)."""
    loss_sum: float = 0.0
    loss_count: int = 0
    initial_distance: float | None = None
    world: World = SINGLE
    """This process among the torchrun processes (a single process by default)."""
    nonfinite_run: int = 0
    """Consecutive skipped (non-finite) steps up to run.step."""
    last_good_step: int = 0
    """run.step after the last step whose update was applied."""

    @property
    def recipe_text(self) -> str:
        return dump_recipe(self.recipe)

    def denoiser(self, network: nn.Module):
        """f(x, sigma, labels) for sampling with `network` (normally the eval EMA)."""
        c = self.recipe.consistency
        return lambda x, s, y: denoise(network, x, s, y, sigma_min=c.sigma_min, sigma_data=c.sigma_data)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError('run.device is "cuda" but no CUDA device is available; use "auto" or "cpu"')
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def output_dir_for(recipe: Recipe, override: str | Path | None = None) -> Path:
    return Path(override or recipe.run.output_dir or Path("runs") / recipe.run.name)


def build_components(recipe: Recipe, registry: Registry, device: str | torch.device = "cpu") -> dict[str, Any]:
    """One instance per kind, built for the data shape and classes the recipe declares (no data is read).

    `device="meta"` builds shapes only: `ctcore check` uses it to validate even a 300M-parameter network
    in no memory and no time.
    """
    context = BuildContext(data_shape=data_shape(recipe.data), num_classes=recipe.data.num_classes,
                           total_steps=recipe.training.total_steps)
    built = {}
    with torch.device(device):
        for kind in KINDS:
            spec = recipe.components[kind]
            cls = registry.get(kind, spec.name)
            try:
                built[kind] = cls(spec.options, context)
            except (ValueError, TypeError) as exc:
                raise UsageError(f"{recipe.source}: cannot build {kind} {spec.name!r}: {exc}") from None
    return built


def fast_optimizer_options(opt_cls: type, device: torch.device) -> dict[str, bool]:
    """On CUDA: the fused kernel where the optimizer has one (Adam), else multi-tensor foreach (RAdam has no
    fused implementation in torch 2.13). On CPU: torch's defaults."""
    if device.type != "cuda":
        return {}
    return {"fused": True} if "fused" in inspect.signature(opt_cls).parameters else {"foreach": True}


def build_run(recipe: Recipe, registry: Registry, out_dir: str | Path | None = None,
              data: ImageData | None = None, world: World = SINGLE, device: torch.device | None = None) -> Run:
    """Instantiate every component of a recipe (data, networks, teacher, optimizer); writes nothing.

    `data` replaces the recipe's data (the benchmark trains on random images of the declared shape). With a
    distributed `world` (and its rank's `device`), the student is wrapped in DistributedDataParallel.
    """
    device = device or resolve_device(recipe.run.device)
    if recipe.training.batch_size % world.world_size:
        raise UsageError(f"{recipe.source}: training.batch_size {recipe.training.batch_size} is the global batch "
                         f"and must split evenly over {world.world_size} processes; change one of them")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls and convs on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(recipe.run.seed)
    built = build_components(recipe, registry)
    data = data if data is not None else load_data(recipe.data, recipe.run.seed, device)
    student = built["network"].to(device)
    student.train()
    eval_ema = copy.deepcopy(student).eval().requires_grad_(False)
    teacher = built["teacher"]
    teacher.bind(student)
    teacher.network.train()  # the teacher runs with dropout active, sharing the student's mask
    t = recipe.training
    opt_cls = torch.optim.RAdam if t.optimizer == "radam" else torch.optim.Adam
    optimizer = opt_cls(student.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
                        **fast_optimizer_options(opt_cls, device))
    precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    forward: nn.Module = student
    if world.distributed:
        # buffers are deterministic (none are trained), so they need no broadcast before each forward
        forward = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
        # identical weights everywhere (seeded above), but each rank its own dropout masks (CPU and CUDA)
        torch.manual_seed(rank_seed(recipe.run.seed, world.rank))
    compiled = torch.compile(forward) if compile_enabled(t.compile, device) else forward
    index_gen = torch.Generator(device=device).manual_seed(recipe.run.seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(recipe.run.seed + 2)
    provenance = make_provenance(recipe, registry, device, data)
    return Run(recipe=recipe, registry=registry, out_dir=output_dir_for(recipe, out_dir), device=device, data=data,
               student=student, eval_ema=eval_ema, teacher=teacher, metric=built["metric"].to(device),
               noise_schedule=built["noise_schedule"], curriculum=built["curriculum"], optimizer=optimizer,
               index_generator=index_gen, noise_generator=noise_gen, provenance=provenance, precision=precision,
               student_forward=compiled, world=world)


def compile_enabled(setting: str, device: torch.device) -> bool:
    """training.compile resolved: "auto" compiles on CUDA, where it pays (NCSN++ on an H100, bf16, batch 512:
    about 850 img/s eager vs 1460 compiled, the issue's reference figures), and not on CPU, where compiling
    costs more than short runs gain."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's dropout generator: distinct per rank, so ranks never share masks."""
    return seed + 1_000_003 * (rank + 1)


def make_provenance(recipe: Recipe, registry: Registry, device: torch.device, data: ImageData) -> dict[str, Any]:
    """Versions and the distribution that provided each component, so a checkpoint names what it needs."""
    components = {}
    for kind in KINDS:
        name = recipe.components[kind].name
        p = registry.provider(kind, name)
        components[kind] = {"name": name, "distribution": p.distribution, "version": p.version}
    return {
        "ctcore": ctcore.__version__,
        "torch": str(torch.__version__),  # TorchVersion is not a plain str and would not load weights_only
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "components": components,
        "data_shape": list(data.shape),
        "num_classes": data.num_classes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }


# ------------------------------------------------------------------------------------------- the step


def train_step(run: Run) -> tuple[torch.Tensor, bool]:
    """One iteration at step k = run.step; returns the loss (a device tensor) and whether the update was applied.

    Every rank draws the global batch, pairs and noise from the shared generators and keeps its share, so the
    ranks together compute exactly the single-process step. With training.max_nonfinite_steps > 0 a step whose
    loss or gradient norm is not finite changes nothing but the step count and the generators (one scalar is
    read from the device for that check; nothing else synchronizes).
    """
    r, t, world = run.recipe, run.recipe.training, run.world
    k = run.step
    num_scales = run.curriculum.num_scales(k)
    sigmas = run.sigma_grids.get(num_scales)
    if sigmas is None:
        c = r.consistency
        sigmas = karras_sigmas(num_scales, c.sigma_min, c.sigma_max, c.rho).to(run.device)
        run.sigma_grids.clear()  # N(k) never decreases: one grid, not one per N (up to 10^6 of them for CT)
        run.sigma_grids[num_scales] = sigmas
    x, labels = run.data.batch(t.batch_size, run.index_generator, rank=world.rank, world_size=world.world_size)
    share = world.share(t.batch_size)
    pair = run.noise_schedule.sample(sigmas, t.batch_size, run.index_generator).to(run.device)[share]
    z = torch.randn((t.batch_size, *x.shape[1:]), generator=run.noise_generator, device=run.device)[share]
    if t.warmup_steps > 0:
        for group in run.optimizer.param_groups:
            group["lr"] = t.lr * min(1.0, (k + 1) / t.warmup_steps)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
        teacher = run.student_forward if run.teacher.network is run.student else run.teacher.network
        loss, _ = consistency_loss(
            run.student_forward, teacher, run.metric, x, labels, sigmas, pair, z,
            weighting=r.consistency.weighting, sigma_min=r.consistency.sigma_min,
            sigma_data=r.consistency.sigma_data,
        )
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
        if not bool(finite):
            run.optimizer.zero_grad(set_to_none=True)
            run.nonfinite_run += 1
            return loss, False
    run.optimizer.step()
    run.teacher.update(run.student, k, num_scales)
    update_ema(run.eval_ema, run.student, t.eval_ema_decay)
    run.nonfinite_run, run.last_good_step = 0, run.step
    return loss, True


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(mb)


# ------------------------------------------------------------------------------------ the training loop


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
    TrainingStopped (under torchrun every rank stops after the same step). Too many consecutive non-finite
    steps raise TrainingDiverged after checkpointing. Only rank 0 writes files and shows progress. Returns a
    summary dict (final step, mean loss of the last interval, distances, run time).
    """
    from rich.console import Console

    from ctcore.distributed import any_rank, mean_over_ranks

    console = console or Console(stderr=True)
    t, world = run.recipe.training, run.world
    end = min(t.total_steps, stop_at) if stop_at is not None else t.total_steps
    if world.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    # closed in finally; ranks other than 0 log nowhere
    stats = open_stats(run.out_dir) if world.is_main else None
    summary: dict[str, Any] = {"start_step": run.step}
    started = time.perf_counter()
    with flush_denormals(run.device.type == "cpu"):
        try:
            if run.initial_distance is None and run.step == 0:
                run.initial_distance = evaluate_distance(run)
                if run.initial_distance is not None:
                    _log(stats, {"event": "distance", "step": 0, "sliced_wasserstein": run.initial_distance})
            e = run.recipe.evaluation
            fid_tools = load_fid_tools(run) if e.fid_every > 0 else None  # fail before training, not mid-run
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
            last_loss = None
            with _progress(progress and world.is_main, console) as bar, stop_on_signals(handle_signals) as signals:
                task = bar.add_task("training", total=end, completed=run.step, loss="-", scales="-", speed="-")
                while run.step < end:
                    loss, applied = train_step(run)
                    k = run.step
                    if applied:
                        loss_acc += loss.double()
                        acc_count += 1
                    else:
                        _log(stats, {"event": "nonfinite", "step": k, "loss": float(loss),
                                     "consecutive": run.nonfinite_run, "last_good_step": run.last_good_step})
                        if run.nonfinite_run >= t.max_nonfinite_steps:
                            fold_losses()
                            path = save_checkpoint(run)
                            _log(stats, {"event": "diverged", "step": k, "path": str(path)})
                            raise TrainingDiverged(run, path, float(loss))
                    bar.update(task, completed=k)
                    if k % t.log_every == 0 or k == end:
                        fold_losses()
                        last_loss = run.loss_sum / run.loss_count if run.loss_count else float("nan")
                        speed = (k - last_step) * t.batch_size / max(time.perf_counter() - last_time, 1e-9)
                        n = run.curriculum.num_scales(k - 1)
                        _log(stats, {"step": k, "loss": last_loss, "num_scales": n,
                                     "lr": run.optimizer.param_groups[0]["lr"],
                                     "teacher_decay": run.teacher.decay(k - 1, n), "img_per_s": speed})
                        bar.update(task, loss=f"{last_loss:.4g}", scales=str(n), speed=f"{speed:,.0f}")
                        run.loss_sum, run.loss_count = 0.0, 0
                        last_step = k
                    if k % t.sample_every == 0 or k == end:
                        path = save_samples(run)
                        _log(stats, {"event": "samples", "step": k, "path": str(path)})
                    if fid_tools is not None and (k % e.fid_every == 0 or k == t.total_steps):
                        result = evaluate_fid(run, fid_tools)
                        _log(stats, {"event": "fid", "step": k, "fid": result["fid"], "num_samples": e.fid_num_samples,
                                     "steps": e.fid_steps, "inception_score": result["inception_score"]})
                        if world.is_main:
                            plot_fid(run.out_dir)
                    if k % t.checkpoint_every == 0 or k == end:
                        fold_losses()  # a partial log interval survives a resume
                        path = save_checkpoint(run)
                        _log(stats, {"event": "checkpoint", "step": k, "path": str(path)})
                    # ranks receive a signal at different moments: all stop after the first step any rank saw it
                    if any_rank(world, bool(signals)):
                        name = signals[0] if signals else "SIGTERM"
                        fold_losses()
                        path = save_checkpoint(run)
                        _log(stats, {"event": "stopped", "step": k, "signal": name, "path": str(path)})
                        raise TrainingStopped(name, k, path)
                    if k == last_step:  # img/s measures training: restart the clock after logging and file writes
                        last_time = time.perf_counter()
            summary["loss"] = last_loss
            if run.step >= t.total_steps and run.step > summary["start_step"]:
                final = evaluate_distance(run)
                summary["final_distance"] = final
                if final is not None:
                    _log(stats, {"event": "distance", "step": run.step, "sliced_wasserstein": final})
        finally:
            if stats is not None:
                stats.close()

    summary.update(step=run.step, initial_distance=run.initial_distance, seconds=time.perf_counter() - started)
    return summary


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


def _log(stats, record: dict[str, Any]) -> None:
    """Append one JSON line to stats.jsonl (rank 0 only: other ranks pass None)."""
    if stats is None:
        return
    # strict JSON: a non-finite number is written as the string "nan" / "inf" / "-inf"
    record = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    stats.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
    stats.flush()


def _progress(enabled: bool, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("N(k) {task.fields[scales]}"),
        TextColumn("{task.fields[speed]} img/s"), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=False,
    )


# ------------------------------------------------------------------------------ samples and distances


def sampling_plans(recipe: Recipe) -> dict[str, list[float]]:
    """Name -> sigma list: always one-step, plus multistep when sampling.sigma_mid is set."""
    sigma_max = recipe.consistency.sigma_max
    plans = {"1step": [sigma_max]}
    if recipe.sampling.sigma_mid:
        plans[f"{1 + len(recipe.sampling.sigma_mid)}step"] = [sigma_max, *recipe.sampling.sigma_mid]
    return plans


def sample_with(run: Run, network: nn.Module, sigmas: list[float], seeds: list[int]) -> torch.Tensor:
    """uint8 samples for `seeds` (on CPU); under torchrun each rank makes its share and all ranks get all."""
    from ctcore.distributed import gather_rows
    from ctcore.sampling import generate

    mine = seeds[run.world.share(len(seeds))]
    images = torch.zeros((0, *run.data.shape), dtype=torch.uint8)
    if mine:
        images, _ = generate(run.denoiser(network), run.data.shape, mine, sigmas, num_classes=run.data.num_classes,
                             sigma_min=run.recipe.consistency.sigma_min, clip=run.recipe.sampling.clip,
                             device=run.device, batch_size=max(64, min(1024, run.recipe.training.batch_size)))
    return gather_rows(run.world, images, len(seeds))


def save_samples(run: Run) -> Path:
    """A PNG per sampling plan: eval-EMA samples (fixed seeds) next to training images."""
    from ctcore.images import save_side_by_side

    s = run.recipe.sampling
    seeds = list(range(s.seed, s.seed + s.num_samples))
    data = to_uint8(run.data.batch(s.num_samples, torch.Generator().manual_seed(s.seed))[0])
    path = None
    for plan, sigmas in sampling_plans(run.recipe).items():
        images = sample_with(run, run.eval_ema, sigmas, seeds)
        path = run.out_dir / "samples" / f"step-{run.step:07d}-{plan}.png"
        if run.world.is_main:
            save_side_by_side(images, data, path, title=f"step {run.step}, {plan}")
    return path


def evaluate_distance(run: Run) -> float | None:
    """Sliced Wasserstein distance between one-step eval-EMA samples and training data (None if disabled)."""
    e = run.recipe.evaluation
    if e.distance == "none":
        return None
    seeds = list(range(10_000_000, 10_000_000 + e.num_samples))
    samples = sample_with(run, run.eval_ema, [run.recipe.consistency.sigma_max], seeds)
    data = to_uint8(run.data.batch(e.num_samples, torch.Generator().manual_seed(12345))[0])
    return sliced_wasserstein(samples.float() / 127.5 - 1, data.float() / 127.5 - 1, e.num_projections)


def load_fid_tools(run: Run) -> tuple[nn.Module, dict[str, Any]]:
    """The Inception network (on the run's device) and reference statistics named by [evaluation]."""
    from ctcore.fid import load_statistics
    from ctcore.inception import load_inception

    e = run.recipe.evaluation
    return load_inception(e.inception).to(run.device).eval(), load_statistics(e.fid_reference)


def evaluate_fid(run: Run, tools: tuple[nn.Module, dict[str, Any]]) -> dict[str, Any]:
    """FID / IS of the eval EMA as `ctcore eval` computes them (same seeds as the sample grids)."""
    from ctcore.fid import fid_of_denoiser

    inception, ref = tools
    e, c, s = run.recipe.evaluation, run.recipe.consistency, run.recipe.sampling
    sigmas = [c.sigma_max, *s.sigma_mid[: e.fid_steps - 1]]
    return fid_of_denoiser(run.denoiser(run.eval_ema), run.data.shape, sigmas, inception=inception, ref=ref,
                           num_samples=e.fid_num_samples, num_classes=run.data.num_classes, sigma_min=c.sigma_min,
                           clip=s.clip, seed=s.seed, batch_size=e.fid_batch_size, device=run.device,
                           world=run.world)


def plot_fid(out_dir: Path) -> Path:
    """fid.png: FID over training from every `fid` event in stats.jsonl (so resumed runs show their history)."""
    from ctcore.images import save_line_plot

    rows = read_stats(out_dir)
    points = sorted((r["step"], r["fid"]) for r in rows if r.get("event") == "fid")
    return save_line_plot([p[0] for p in points], [p[1] for p in points], out_dir / "fid.png", "FID (eval EMA)")


# ----------------------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoints of a run directory, oldest first."""
    return sorted(checkpoint_dir(out_dir).glob("ckpt-*.pt"))


def save_checkpoint(run: Run) -> Path:
    """Write checkpoints/ckpt-<step>.pt atomically (temporary file, fsync, rename); keep the last K.

    Under torchrun every rank must call this (their dropout RNG states are gathered); rank 0 writes.
    """
    from ctcore.distributed import gather_objects

    dropout_rng = {"torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}
    per_rank = gather_objects(run.world, dropout_rng) if run.world.distributed else None
    folder = checkpoint_dir(run.out_dir)
    path = folder / f"ckpt-{run.step:09d}.pt"
    if not run.world.is_main:
        return path
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": run.step,
        "student": run.student.state_dict(),
        "eval_ema": run.eval_ema.state_dict(),
        "teacher": run.teacher.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": {
            **dropout_rng,
            "index": run.index_generator.get_state(),
            "noise": run.noise_generator.get_state(),
            "ranks": per_rank,  # torchrun: each rank's dropout RNG states, in rank order (None otherwise)
        },
        "loss_sum": run.loss_sum,
        "loss_count": run.loss_count,
        "initial_distance": run.initial_distance,
        "last_good_step": run.last_good_step,
        "nonfinite_run": run.nonfinite_run,
        "world_size": run.world.world_size,
        "recipe": run.recipe_text,
        "provenance": run.provenance,
    }
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    for old in list_checkpoints(run.out_dir)[: -run.recipe.training.keep_checkpoints]:
        old.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True); a corrupt or foreign file gives one clear RunError."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "error" in ln.lower() and ":" in ln), lines[0] if lines else "")
        raise RunError(
            f"checkpoint {str(path)!r} is corrupt or not a ctcore checkpoint ({type(exc).__name__}: "
            f"{detail[:200]}); use an earlier file in its checkpoints/ folder"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"checkpoint {str(path)!r} is not a ctcore checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def check_plugins(state: dict[str, Any], registry: Registry, path: Path) -> None:
    """Every component a checkpoint was trained with must be installed; name the missing distribution."""
    for kind, info in state["provenance"]["components"].items():
        if info["name"] not in registry.names(kind):
            raise RunError(
                f"checkpoint {str(path)!r} needs {kind} {info['name']!r} from the distribution "
                f"{info['distribution']!r} (version {info['version']}), which is not installed or is disabled; "
                f"install it (pip install {info['distribution']}) and try again"
            )


def recipe_from_checkpoint(state: dict[str, Any], registry: Registry, path: Path) -> Recipe:
    check_plugins(state, registry, path)
    return parse_recipe(state["recipe"], registry, source=f"{path} (embedded recipe)")


def restore(run: Run, state: dict[str, Any]) -> None:
    """Put a run exactly where the checkpoint left it: weights, optimizer, step, every RNG state."""
    run.student.load_state_dict(state["student"])
    run.eval_ema.load_state_dict(state["eval_ema"])
    run.teacher.load_state_dict(state["teacher"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.step = int(state["step"])
    rng, world = state["rng"], run.world
    dropout_rng = rng  # the global generators (dropout): this rank's own under torchrun
    if world.distributed:
        same_world = rng.get("ranks") is not None and len(rng["ranks"]) == world.world_size
        dropout_rng = rng["ranks"][world.rank] if same_world else None
    if dropout_rng is None:  # another number of processes wrote it: fresh per-rank dropout streams (CPU and CUDA)
        torch.manual_seed(rank_seed(run.recipe.run.seed + run.step, world.rank))
    else:
        torch.set_rng_state(dropout_rng["torch"])
        if dropout_rng.get("cuda") is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state(dropout_rng["cuda"], run.device)
    run.index_generator.set_state(rng["index"])
    run.noise_generator.set_state(rng["noise"])
    run.loss_sum = float(state["loss_sum"])
    run.loss_count = int(state["loss_count"])
    run.initial_distance = state["initial_distance"]
    run.last_good_step = int(state.get("last_good_step", run.step))
    run.nonfinite_run = int(state.get("nonfinite_run", 0))


# ------------------------------------------------------------------------------- starting and resuming


def start_run(recipe: Recipe, registry: Registry, out_dir: str | Path | None = None) -> Run:
    """A fresh run in an empty (or new) directory; refuses to touch a directory that holds a run.

    Under torchrun, joins the process group first; every rank checks the directory before rank 0 writes.
    """
    from ctcore.distributed import barrier, setup

    world, device = setup(resolve_device(recipe.run.device))
    target = output_dir_for(recipe, out_dir)
    if target.exists() and not target.is_dir():
        raise RunError(f"output directory {str(target)!r} is a file; choose another directory with --output-dir")
    if target.exists() and any(target.iterdir()):
        hint = ("pass --resume to continue it, or " if list_checkpoints(target) else "")
        raise RunError(
            f"output directory {str(target)!r} is not empty (it holds an earlier run); {hint}choose another "
            "directory with --output-dir (or run.output_dir), or delete it"
        )
    barrier(world)  # no rank may find the directory already written by rank 0
    run = build_run(recipe, registry, target, world=world, device=device)
    if world.is_main:
        target.mkdir(parents=True, exist_ok=True)
        (target / "recipe.toml").write_text(run.recipe_text, encoding="utf-8")
        (target / "provenance.json").write_text(json.dumps(run.provenance, indent=2) + "\n", encoding="utf-8")
    return run


def recipe_differences(old: Recipe, new: Recipe) -> list[str]:
    """`  section.key: old -> new` for every setting that differs between two recipes."""
    def flat(recipe: Recipe) -> dict[str, Any]:
        out = {}
        for line in dump_recipe(recipe).splitlines()[1:]:
            if line.startswith("["):
                section = line.strip("[]")
            elif " = " in line and not line.startswith("#"):
                key, value = line.split(" = ", 1)
                out[f"{section}.{key}"] = value
        return out

    a, b = flat(old), flat(new)
    return [f"  {k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in dict.fromkeys([*a, *b])
            if a.get(k) != b.get(k)]


def resume_run(recipe: Recipe | None, registry: Registry, out_dir: str | Path) -> Run:
    """Continue the run in `out_dir` from its latest checkpoint; a given recipe must match the stored one."""
    out_dir = Path(out_dir)
    ckpts = list_checkpoints(out_dir)
    if not ckpts:
        raise RunError(f"nothing to resume: {str(checkpoint_dir(out_dir))!r} holds no checkpoint (ckpt-*.pt)")
    try:
        state = load_checkpoint(ckpts[-1])
    except RunError as exc:
        earlier = f" to resume from {ckpts[-2].name}" if len(ckpts) > 1 else ""
        raise RunError(f"{exc.message.split('; use an earlier')[0]}; move it out of checkpoints/{earlier}") from None
    stored = recipe_from_checkpoint(state, registry, ckpts[-1])
    if recipe is not None:
        changed = recipe_differences(stored, recipe)
        if changed:
            raise UsageError(
                f"{recipe.source} differs from the recipe of the run in {str(out_dir)!r}, so it cannot resume it:\n"
                + "\n".join(changed) + "\nresume with the run directory instead of a recipe, or start a new run"
            )
    from ctcore.distributed import setup

    world, device = setup(resolve_device(stored.run.device))
    if world.is_main:  # a checkpoint that was being written when the run was killed: its partial temporary file
        for debris in checkpoint_dir(out_dir).glob(".ckpt-*.tmp"):
            debris.unlink(missing_ok=True)
    run = build_run(attrs.evolve(stored, source=str(out_dir / "recipe.toml")), registry, out_dir,
                    world=world, device=device)
    restore(run, state)
    return run
