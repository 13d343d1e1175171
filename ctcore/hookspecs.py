"""Hook specifications: one registration hook per component kind.

Each hook takes no arguments and returns a list of component classes; pluggy calls every implementation and
collects the lists. Order never matters and a name provided twice is an error naming both providers. Hooks
may gain optional arguments later; none is ever removed. These docstrings are the plugin reference.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("ctcore")


@hookspec
def ctcore_register_networks() -> list[type]:
    """Return network classes (`torch.nn.Module` subclasses).

    Contract: class attributes `name`, `summary`, `noise_conditioning` ("fourier": c_noise = 0.25 ln sigma,
    or "positional": c_noise = 1000 * 0.25 ln sigma; an instance may set its own from its options) and a frozen
    attrs `Options`; constructed as `cls(options, context)` with `context.data_shape` and `context.num_classes`;
    `forward(x, c_noise, labels)` returns the raw output F_theta, shaped like `x`. The core applies c_in, c_skip
    and c_out.
    """


@hookspec
def ctcore_register_metrics() -> list[type]:
    """Return metric classes (`torch.nn.Module` subclasses): the distance d(x, y) of the consistency loss.

    Contract: `forward(x, y)` returns one non-negative value per sample (shape `(batch,)`), zero when x == y,
    differentiable in x. `context.data_shape` may be None: derive sizes from the inputs then.
    """


@hookspec
def ctcore_register_noise_schedules() -> list[type]:
    """Return noise-schedule classes: which pair of noise levels (sigma_lo < sigma_hi) each example trains on.

    Contract (`ctcore.components.NoiseSchedule`): class attribute `grid` (True: adjacent points of the curriculum's
    Karras grid, the recipe has a [curriculum]; False: continuous pairs, no curriculum); `pairs(draw)` returns
    (sigma_lo, sigma_hi), float64 of shape (draw.batch_size,) with 0 <= sigma_lo < sigma_hi (0: the target is x),
    drawn only from the `ctcore.components.PairDraw`'s generators; `log_fields(step)` a dict ({} for none). A grid
    schedule subclasses `ctcore.components.NoiseScheduleBase` and implements `probabilities(sigmas)`, N-1
    non-negative values summing to 1 for an increasing grid of N sigmas; the base gives `sample`, `pairs` and
    `log_fields`.
    """


@hookspec
def ctcore_register_curricula() -> list[type]:
    """Return curriculum classes: N(k), the number of sigma-grid points at training step k.

    Contract: `num_scales(step)` is an int >= 2, non-decreasing in step; `context.total_steps` is K.
    """


@hookspec
def ctcore_register_teachers() -> list[type]:
    """Return teacher-update rules: how the target network theta^- is made and updated, and where it is evaluated.

    Contract (`ctcore.components.Teacher`): `bind(student)` sets `self.network`; `decay(step, num_scales)` is
    mu(k) (0 for theta^- = theta; num_scales is 0 without a curriculum); `update(student, step, num_scales)` runs
    after each optimizer step; `state_dict()` / `load_state_dict()` hold what a checkpoint must keep (nothing when
    the teacher is the student). Optional: `teacher_input(x, z, sigma_lo, sigma_hi, labels)`, the point where
    theta^- is evaluated at sigma_lo, shaped like x (default x + sigma_lo z; cd: one ODE step of a diffusion model
    from x + sigma_hi z) and `network_passes` (forward passes per image of another model it holds, for bench). The
    teacher runs in train mode under no_grad, with the student's dropout mask.
    """


@hookspec
def ctcore_register_objectives() -> list[type]:
    """Return training-objective classes: the loss of a step and the model function it trains.

    Contract (`ctcore.components.Objective`): class attributes `model` ("consistency" or "diffusion"), `uses`
    (the component kinds among metric, noise_schedule, curriculum, teacher it trains with; the recipe has exactly
    those sections) and `default_sampler`; `bind(student, parts)` once; `loss(batch)` a finite scalar that is
    differentiable in the student, drawing its randomness only from the batch's generators (global batch, then
    `batch.share`); `after_step(step)`; `log_fields(step)`; `denoise(network, x, sigma, labels, constants)` shaped
    like x.
    """


@hookspec
def ctcore_register_samplers() -> list[type]:
    """Return sampler classes: how a trained model turns noise into images.

    Contract (`ctcore.components.Sampler`): class attribute `model` (the kind of model it samples); `plan(steps,
    sigmas, levels)` a decreasing list of noise levels in (0, sigma_max] or a ValueError saying what to change;
    `preview_plans(levels)`; `noise_draws(sigmas)` >= 1; `evaluations(sigmas)`; `sample(denoiser, noise, sigmas,
    labels, levels, clip)` images shaped like noise[0], using no randomness but `noise`.
    """


@hookspec
def ctcore_register_loggers() -> list[type]:
    """Return logger classes: tracking backends selected by `[logging] backends = [...]` (rank 0 only).

    Contract: the constructor writes nothing (a missing package raises `ctcore.errors.UsageError` saying how to
    install it); `start(run_dir, step, config)` opens the backend, `log(record)` receives every stats.jsonl record
    (a dict with `time` and `step`; `event` names the kind of non-training records) without changing it, and
    `close()` runs once when the run ends, however it ends.
    """
