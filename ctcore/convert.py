"""Import OpenAI's released consistency models (openai/consistency_models, ADM U-Net state dicts) as ctcore
checkpoints, and `load_denoiser`: the network of any ctcore checkpoint as a callable f(x, sigma, labels).

The released files are `state_dict()`s of the CM repository's UNetModel; ctcore's `adm` network is the same
computation under other key names (`released_name` maps them). The released models use c_noise =
1000 * 0.25 * ln(sigma + 1e-44), c_in = 1 / sqrt(sigma^2 + sigma_data^2) and the CM boundary-condition
c_skip / c_out with sigma_min 0.002 and sigma_data 0.5: exactly `ctcore.consistency.denoise` with the `adm`
positional convention (1e-44 vanishes in sigma + 1e-44 for every sigma above 1e-37, in float32 and float64), so a
converted checkpoint carries a recipe with those consistency settings and needs no extra option.

A converted checkpoint holds the released weights as eval EMA, student and teacher, step 0, and no optimizer or
RNG state: `ctcore sample`, `ctcore eval` and `ctcore run --init-from` use it; `ctcore run --resume` refuses it.
"""

from __future__ import annotations

import platform
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from ctcore.files import file_digest

CONFIG_NAMES = ("imagenet64", "lsun256")


@attrs.frozen
class ReleasedConfig:
    """One released architecture: the `adm` options, image shape and classes, and the recipe's sampling.sigma_mid."""

    name: str
    network: dict[str, Any]
    data_shape: tuple[int, int, int]
    num_classes: int
    sigma_mid: tuple[float, ...]
    summary: str


def _karras_index(i: int, steps: int = 40, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> float:
    """The CM repository's multistep sigma for index `i` of a `steps`-point Karras grid (0 is sigma_max)."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return round((hi + i / (steps - 1) * (lo - hi)) ** rho, 6)


CONFIGS: dict[str, ReleasedConfig] = {
    "imagenet64": ReleasedConfig(
        "imagenet64",
        {"model_channels": 192, "channel_mult": [1, 2, 3, 4], "num_res_blocks": 3, "attention_resolutions": [32, 16, 8],
         "num_head_channels": 64, "resblock_updown": True, "use_scale_shift_norm": True, "dropout": 0.0},
        (3, 64, 64), 1000, (_karras_index(22),),
        "class-conditional ImageNet 64x64 (cd_imagenet64_l2.pt, cd_imagenet64_lpips.pt, ct_imagenet64.pt)"),
    "lsun256": ReleasedConfig(
        "lsun256",
        {"model_channels": 256, "channel_mult": [1, 1, 2, 2, 4, 4], "num_res_blocks": 2,
         "attention_resolutions": [32, 16, 8], "num_head_channels": 64, "resblock_updown": True,
         "use_scale_shift_norm": False, "dropout": 0.0},
        (3, 256, 256), 0, (_karras_index(17),),
        "unconditional LSUN 256x256 (cd_bedroom256_*.pt, ct_bedroom256.pt, cd_cat256_*.pt, ct_cat256.pt)"),
}
"""The released architectures (the flags of the CM repository's scripts/launch.sh; channel_mult from its
create_model defaults per image size). sigma_mid: its two-step CD-LPIPS setting (ts 0,22,39 and 0,17,39 of 40)."""

_RESBLOCK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1", "norm2": "out_layers.0",
             "conv2": "out_layers.3", "skip": "skip_connection", "proj": "proj_out"}
"""ctcore layer names inside a residual or attention block -> the released names (norm and qkv are the same)."""


def released_name(key: str) -> str:
    """The released (CM UNetModel) name of a ctcore `adm` state-dict key."""
    fixed = {"label_embed.weight": "label_emb.weight", "input_conv.weight": "input_blocks.0.0.weight",
             "input_conv.bias": "input_blocks.0.0.bias", "out_norm.weight": "out.0.weight",
             "out_norm.bias": "out.0.bias", "out_conv.weight": "out.2.weight", "out_conv.bias": "out.2.bias"}
    if key in fixed or key.startswith("time_embed."):
        return fixed.get(key, key)
    m = re.fullmatch(r"(encoder|middle|decoder)\.(?:(\d+)\.)?(\d+)\.(\w+)\.(\w+)", key)
    if m is None:
        raise ValueError(f"not an adm state-dict key: {key!r}")
    part, stage, layer, name, leaf = m.groups()
    if part == "encoder":
        prefix = f"input_blocks.{int(stage) + 1}"
        name = "op" if name == "conv" else name  # a strided-conv Downsample
    else:
        prefix = "middle_block" if part == "middle" else f"output_blocks.{stage}"
    return f"{prefix}.{layer}.{_RESBLOCK.get(name, name)}.{leaf}"


def _toml_value(v: Any) -> str:
    """TOML for the plain values a configuration holds (booleans, numbers, lists of numbers)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _recipe_text(config: ReleasedConfig) -> str:
    """The recipe a converted checkpoint carries: the released network and parameterisation; the rest iCT-style
    settings for fine-tuning (--init-from), not how OpenAI trained the model."""
    c, h, _ = config.data_shape
    network = "\n".join(f"{k} = {_toml_value(v)}" for k, v in config.network.items())
    return f"""[run]
name = "openai-cm-{config.name}"

[data]
source = "hdf5"
path = "data/{config.name}-train.h5"
channels = {c}
resolution = {h}
num_classes = {config.num_classes}

[network]
name = "adm"
{network}

[metric]
name = "pseudo-huber"

[noise_schedule]
name = "lognormal"

[curriculum]
name = "exponential"

[teacher]
name = "no-ema"

[consistency]
sigma_min = 0.002
sigma_max = 80.0
sigma_data = 0.5

[sampling]
sigma_mid = {_toml_value(list(config.sigma_mid))}
"""


def _expected(config: ReleasedConfig, registry) -> tuple[dict[str, torch.Size], dict[str, str], Any]:
    """Released key -> shape for a configuration (its `adm` built on the meta device), ctcore key -> released
    key, and the parsed recipe."""
    from ctcore.components import BuildContext
    from ctcore.recipe import parse_recipe

    recipe = parse_recipe(_recipe_text(config), registry, source=f"openai-cm {config.name} (built-in recipe)")
    spec = recipe.components["network"]
    with torch.device("meta"):
        net = registry.get("network", spec.name)(spec.options, BuildContext(config.data_shape, config.num_classes))
    names = {k: released_name(k) for k in net.state_dict()}
    return {names[k]: v.shape for k, v in net.state_dict().items()}, names, recipe


def _first_mismatch(found: Mapping[str, Any], want: Mapping[str, torch.Size]) -> tuple[int, str] | None:
    """(how many keys matched before it, the first defect) of `found` against released key -> shape, or None."""
    for i, (key, shape) in enumerate(want.items()):
        if key not in found:
            return i, f"key {key!r} is missing"
        value = found[key]
        if not isinstance(value, torch.Tensor):
            return i, f"key {key!r} holds a {type(value).__name__}, not a tensor"
        if value.shape != shape:
            return i, f"key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(shape)}"
        if not value.is_floating_point():
            return i, f"key {key!r} has dtype {value.dtype}, not a floating-point dtype"
    extra = [k for k in found if k not in want]
    return (len(want), f"key {extra[0]!r} is not in the model") if extra else None


def _read_state_dict(source: Path) -> dict[str, Any]:
    """The source file as a dict (names -> values), read with weights_only=True; anything else is one RunError."""
    from ctcore.checkpoints import CHECKPOINT_FORMAT
    from ctcore.errors import RunError, path_not_found

    fix = "give a released OpenAI consistency-model file (e.g. cd_imagenet64_lpips.pt from openai/consistency_models)"
    if not source.is_file():
        if not source.exists():
            raise RunError(path_not_found(repr(str(source)), source, fix))
        raise RunError(f"{str(source)!r} is not a file; {fix}")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's refusals come in many types; each is one line here
        reason = [ln.strip() for ln in str(exc).split("WeightsUnpickler error:", 1)[-1].splitlines() if ln.strip()]
        raise RunError(f"{str(source)!r} is not a loadable PyTorch state dict ({type(exc).__name__}: "
                       f"{(reason[0] if reason else 'no detail')[:200]}); {fix}") from None
    if isinstance(state, Mapping) and state.get("format") == CHECKPOINT_FORMAT:
        raise RunError(f"{str(source)!r} is already a ctcore checkpoint: use it as it is (ctcore sample, eval, "
                       "run --init-from)")
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise RunError(f"{str(source)!r} holds a {type(state).__name__}, not a state dict (names -> tensors); {fix}")
    return dict(state)


def convert_openai_cm(source: str | Path, out: str | Path, registry, *, config: str | None = None,
                      overwrite: bool = False, configs: Mapping[str, ReleasedConfig] = CONFIGS) -> dict[str, Any]:
    """Write a ctcore checkpoint holding a released OpenAI consistency model; returns what was written.

    `config` names one of `configs`; None infers it from the tensor shapes. A file that fits none is one RunError
    naming its first mismatching key (against the closest configuration); nothing is written then. fp16 tensors
    become fp32. `out` is written atomically and never replaced without `overwrite`.
    """
    from ctcore.checkpoints import first_nonfinite
    from ctcore.errors import RunError, UsageError
    from ctcore.files import refuse_writing_inputs

    source, out = Path(source), Path(out)
    if config is not None and config not in configs:
        raise UsageError(f"--config must be one of {', '.join(configs)}, got {config!r}")
    refuse_writing_inputs([("OUT.pt", out)], [("SOURCE", source)])
    if out.exists() and not overwrite:
        raise UsageError(f"{str(out)!r} exists; pass --overwrite to replace it, or choose another OUT.pt")
    found = _read_state_dict(source)
    candidates = [configs[config]] if config is not None else list(configs.values())
    best: tuple[int, str, str] | None = None
    chosen = None
    for cand in candidates:
        want, names, recipe = _expected(cand, registry)
        defect = _first_mismatch(found, want)
        if defect is None:
            chosen = cand, want, names, recipe
            break
        if best is None or defect[0] > best[0]:
            best = (defect[0], cand.name, defect[1])
    if chosen is None:
        assert best is not None
        which = (f"the {best[1]} configuration" if config is not None else
                 f"any released configuration ({', '.join(configs)}; closest: {best[1]})")
        raise RunError(f"{str(source)!r} does not match {which}: {best[2]}; give a released OpenAI consistency-model "
                       "file of that architecture" + ("" if config is None else ", or leave out --config"))
    cand, want, released, recipe = chosen
    weights = {ours: found[theirs].to(torch.float32).contiguous() for ours, theirs in released.items()}
    bad = first_nonfinite({f"{theirs!r}": weights[ours] for ours, theirs in released.items()})
    if bad is not None:
        raise RunError(f"{str(source)!r} holds non-finite values in key {bad}; give an undamaged copy of the file")
    dtypes = sorted({str(found[k].dtype).removeprefix("torch.") for k in want})
    digest = file_digest(source)
    write_converted(out, recipe, registry, weights, cand.data_shape, cand.num_classes, overwrite=overwrite,
                    converted_from={"format": "openai-cm", "file": str(source), "sha256": digest,
                                    "config": cand.name, "dtypes": dtypes})
    return {"out": out, "config": cand.name, "sha256": digest, "tensors": len(weights), "dtypes": dtypes,
            "parameters": sum(v.numel() for v in weights.values())}


def write_converted(out: Path, recipe: Any, registry, weights: dict[str, torch.Tensor], data_shape: tuple[int, ...],
                    num_classes: int, *, converted_from: dict[str, Any], overwrite: bool) -> None:
    """Write a converted model as a ctcore checkpoint: `weights` as eval EMA, student and teacher (stored once),
    step 0, no optimizer or RNG state, the recipe and a provenance whose `converted_from` names the source.
    Atomic, one writer at a time, and never over an existing file without `overwrite`."""
    import ctcore
    from ctcore.checkpoints import CHECKPOINT_FORMAT
    from ctcore.components import KINDS
    from ctcore.errors import UsageError
    from ctcore.files import atomic_write, output_lock
    from ctcore.recipe import dump_recipe

    components = {}
    for kind in (k for k in KINDS if k in recipe.components):
        name = recipe.components[kind].name
        p = registry.provider(kind, name)
        components[kind] = {"name": name, "distribution": p.distribution, "version": p.version}
    provenance = {
        "ctcore": ctcore.__version__, "torch": str(torch.__version__), "python": platform.python_version(),
        "platform": platform.platform(), "components": components, "loggers": {},
        "data_shape": list(data_shape), "num_classes": num_classes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(sys.argv), "converted_from": converted_from,
    }
    state = {"format": CHECKPOINT_FORMAT, "step": 0, "student": weights, "eval_ema": weights, "teacher": weights,
             "recipe": dump_recipe(recipe), "provenance": provenance}
    with output_lock(out, "checkpoint", "ctcore convert"):  # one writer; a killed one's temporary file removed
        if out.exists() and not overwrite:
            raise UsageError(f"{str(out)!r} exists; pass --overwrite to replace it, or choose another OUT.pt")
        with atomic_write(out) as tmp:
            torch.save(state, tmp)


Denoiser = Callable[..., torch.Tensor]
"""f(x, sigma, labels=None) -> tensor shaped like x."""


def load_denoiser(checkpoint: str | Path, weights: str = "eval-ema", *, device: str | None = None) -> Denoiser:
    """f(x, sigma, labels=None) on a ctcore checkpoint's network, in eval mode without gradients: its recipe's
    objective's model function, exactly as `ctcore sample` evaluates it: the consistency function f(x, sigma) of
    a consistency model, the denoiser D(x, sigma) of a diffusion model (EDM preconditioning).

    `checkpoint` is a checkpoint file or a run directory (its latest); `weights` "eval-ema" or "student";
    `sigma` a number or one value per sample. Bad files raise one RunError, as `ctcore sample` does. The
    returned function carries `network`, `recipe` and `model` ("consistency" or "diffusion").
    """
    from ctcore.errors import UsageError
    from ctcore.registry import load_registry
    from ctcore.sampling import load_sampling_network, load_sampling_plan, recipe_objective

    if weights not in ("eval-ema", "student"):
        raise UsageError(f"weights must be 'eval-ema' or 'student', got {weights!r}")
    registry = load_registry()
    path, state, recipe, _, _ = load_sampling_plan(checkpoint, registry, weights=weights)
    network, dev = load_sampling_network(path, state, recipe, registry, weights=weights, device=device)
    objective = recipe_objective(recipe, registry)
    constants = recipe.consistency

    @torch.no_grad()
    def f(x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(dev)
        sig = torch.as_tensor(sigma, dtype=torch.float64).to(dev).reshape(-1).expand(x.shape[0])
        return objective.denoise(network, x, sig, None if labels is None else labels.to(dev), constants)

    f.network, f.recipe, f.model = network, recipe, type(objective).model  # type: ignore[attr-defined]
    return f
