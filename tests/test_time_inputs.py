"""The networks' second time input (option time_inputs, MeanFlow's u(z, r, t)) and learned log-variance head (option
logvar_head, sCM's adaptive weighting) in mlp, ncsnpp and adm: the JVP along both times equals the central difference,
the second time changes the output, defaults keep the weights and keys they had, and check_network's contract for
both options refuses what breaks it."""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar

import attrs
import pytest
import torch
from test_jvp import NETWORKS, central_difference, network, point
from torch import nn

import ctcore
from ctcore.components import BuildContext
from ctcore.jvp import jvp
from ctcore.testing import check_network
from ctcore.trigflow import LogvarHead

NAMES = ["mlp", "ncsnpp", "adm"]
"""test_jvp's small float64-sized networks: ncsnpp and adm with attention at 4x4 and in the middle."""

SECOND = {"mlp": ["embed_2.0.bias", "embed_2.0.weight", "embed_2.2.bias", "embed_2.2.weight", "fourier_2.freqs"],
          "ncsnpp": ["emb0_2.bias", "emb0_2.weight", "emb1_2.bias", "emb1_2.weight", "fourier_2.freqs"],
          "adm": ["time_embed_2.0.bias", "time_embed_2.0.weight", "time_embed_2.2.bias", "time_embed_2.2.weight"]}
"""The state-dict keys time_inputs = 2 adds (adm's sinusoidal features have no buffer)."""
HEAD = ["logvar_head.freqs", "logvar_head.linear.bias", "logvar_head.linear.weight", "logvar_head.phases"]

BEFORE = {  # test_jvp's NETWORKS at seed 0, recorded at commit f94dfde (before either option) and the same at 4e2822c
    "mlp": (27, "4562813fffb30d0b531560679fbd94a9effbef5fa9c3c215af0c43b201e1bd51",
            "037e8d383ad1979c618f63eeeb087917abb796509b912a97f3122582692de100"),
    "ncsnpp": (157, "ddbeafb97783d8a1433f83e5014d102e2fb0bbe3d43b5986081ab0e1ee835cdc",
               "9ee27a5f7e1bcc6ffc042585f8017012658471606e791cb4dd467235757e6d54"),
    "adm": (144, "ffea1eec177a44b88feb05a8dd886fe3c700e8e098f6b7ff2a2efd9d14d399de",
            "97d1dffbdddffe1d51b2a07c789bd0d395f0c678607978732d1271794b2f0861"),
}
"""(state-dict keys, SHA-256 of the keys and shapes, SHA-256 of the keys and values); the values were drawn with
torch 2.13.0 on AVX512 (torch's CPU normal sampler differs between CPU capabilities)."""
RECORDED_ON = ("2.13.0", "AVX512")


def build(name: str, **options: Any) -> nn.Module:
    """test_jvp's small network `name` at seed 0, float32, as built (no perturbation). The registry is loaded before
    seeding: its first load draws from torch's generator."""
    registry = ctcore.load_registry()
    torch.manual_seed(0)
    return registry.create("network", name, **{**NETWORKS[name], **options})


def digests(net: nn.Module) -> tuple[int, str, str]:
    state = net.state_dict()
    keys, values = hashlib.sha256(), hashlib.sha256()
    for k in sorted(state):
        keys.update(f"{k}:{tuple(state[k].shape)};".encode())
        values.update(k.encode())
        values.update(state[k].contiguous().numpy().tobytes())
    return len(state), keys.hexdigest(), values.hexdigest()


def two_times(c: torch.Tensor, r: list[float]) -> torch.Tensor:
    """A (batch, 2) c_noise: column 0 the usual noise input, column 1 the second time."""
    return torch.stack([c, torch.tensor(r, dtype=c.dtype)], dim=1)


# ------------------------------------------------------------------------------------------ second time input


@pytest.mark.parametrize("name", NAMES)
def test_the_jvp_along_both_time_inputs_equals_the_central_difference(name: str) -> None:
    """With time_inputs 2, dropout 0.3 (train mode) and every weight perturbed, ctcore.jvp's JVP along (v_x, both
    columns of v_c) and along the second column alone = the float64 central difference under the same mask, to
    1e-8 of the larger of its and the output's largest entries (the difference's rounding, about 1e-16 |f| / h, is
    the same along both directions: measured 2e-10 (mlp), 1.4e-9 (adm), 2.8e-9 (ncsnpp)); neither is tiny."""
    net = network(name, time_inputs=2)
    f = lambda x, c: net(x, c, None)  # noqa: E731
    (x, c), (v_x, v_c) = point(name)
    primals = (x, two_times(c, [0.2, -0.4]))
    for tangents in [(v_x, two_times(v_c, [0.9, -0.6])), (torch.zeros_like(x), two_times(0 * v_c, [0.9, -0.6]))]:
        state = torch.get_rng_state()
        value, derivative = jvp(f, primals, tangents)
        reference = central_difference(f, primals, tangents, state)
        scale = reference.abs().max().item()
        assert scale > 1e-2
        torch.testing.assert_close(derivative, reference, rtol=0, atol=1e-8 * max(scale, value.abs().max().item()))


@pytest.mark.parametrize("name", NAMES)
def test_the_second_time_input_changes_the_output_and_batch_shaped_c_noise_means_zero(name: str) -> None:
    """(Weights perturbed, eval mode.) A second time of 0.5 moves the output by over 1 % of its size from a second
    time of 0; a (batch,) c_noise gives bit for bit the output of a zero second column."""
    net = network(name, time_inputs=2).eval()
    (x, c), _ = point(name)
    zero = net(x, two_times(c, [0.0, 0.0]), None)
    assert torch.equal(net(x, c, None), zero)
    moved = net(x, two_times(c, [0.5, 0.5]), None)
    assert (moved - zero).abs().max() > 1e-2 * zero.abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_a_c_noise_of_another_shape_is_one_line_naming_the_shapes(name: str) -> None:
    """(batch, 2) without time_inputs 2, (batch, 3), (batch, 1, 2) and, but for adm, a 0-d c_noise: ValueError
    naming the network, the shapes it takes and the shape it got."""
    x = torch.zeros(2, *NETWORKS[name]["data_shape"])
    one, two = build(name), build(name, time_inputs=2)
    either = "(batch,) or (batch, 2)"
    cases = [(one, torch.zeros(2, 2), "(batch,)"), (two, torch.zeros(2, 3), either),
             (two, torch.zeros(2, 1, 2), either)]
    if name != "adm":  # adm takes a 0-d c_noise as the value of every sample, as it always did
        cases.append((two, torch.zeros(()), either))
    for net, c_noise, shapes in cases:
        with pytest.raises(ValueError) as info:
            net(x, c_noise, None)
        assert str(info.value) == f"network {name!r} takes c_noise of shape {shapes}, got {tuple(c_noise.shape)}"


@pytest.mark.parametrize("name", NAMES)
def test_defaults_keep_the_state_dict_keys_and_initial_weights_of_before(name: str) -> None:
    """At the defaults (and with both options given at their defaults) a network has the keys, shapes and, on the
    recording platform, the initial weights recorded before the options existed; with both options on, the
    extra modules are built last: every key of the default network holds the same tensor, and the others are
    exactly the second embedding's and the head's."""
    count, keys, values = BEFORE[name]
    here = (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability())
    for net in (build(name), build(name, time_inputs=1, logvar_head=False)):
        got = digests(net)
        assert got[:2] == (count, keys)
        if here == RECORDED_ON:
            assert got[2] == values
    default = build(name).state_dict()
    full = build(name, time_inputs=2, logvar_head=True).state_dict()
    assert sorted(set(full) - set(default)) == sorted(SECOND[name] + HEAD)
    assert all(torch.equal(full[k], v) for k, v in default.items())


# ------------------------------------------------------------------------------------------ log-variance head


@pytest.mark.parametrize("name", NAMES)
def test_the_logvar_head_starts_at_zero_trains_and_is_in_the_state_dict_only_when_asked(name: str) -> None:
    """logvar(c) is (batch,) and 0 at the start; one Adam step on sCM's exp(-logvar) d + logvar with d != 1 moves
    it; its keys are the state dict's only with logvar_head; without, logvar is one line naming the option."""
    net = build(name, logvar_head=True)
    c = torch.tensor([-1.0, 0.2, 0.7])
    logvar = net.logvar(c)
    assert logvar.shape == (3,) and torch.equal(logvar, torch.zeros(3))
    optimizer = torch.optim.Adam(net.logvar_head.parameters(), lr=1e-2)
    d = torch.tensor([0.1, 2.0, 5.0])
    (torch.exp(-logvar) * d + logvar).mean().backward()
    optimizer.step()
    after = net.logvar(c)
    assert torch.isfinite(after).all() and (after - logvar).abs().min() > 1e-3
    assert sorted(k for k in net.state_dict() if k.startswith("logvar")) == HEAD
    plain = build(name)
    assert not [k for k in plain.state_dict() if k.startswith("logvar")]
    with pytest.raises(ValueError) as info:
        plain.logvar(c)
    assert str(info.value) == f"network {name!r} has no log-variance head: set its option logvar_head = true"


# ------------------------------------------------------------------------------------------ check_network


class TimeNetwork(nn.Module):
    """A stand-in that keeps the contract: one linear layer of [x, c], plus a linear embedding of the second time."""

    name: ClassVar[str] = "time"
    summary: ClassVar[str] = "one linear layer, a second time input and a log-variance head"
    noise_conditioning: ClassVar[str] = "fourier"

    @attrs.frozen
    class Options:
        time_inputs: int = 1
        logvar_head: bool = False

    def __init__(self, options: Any, context: BuildContext) -> None:
        super().__init__()
        self.dim = math.prod(context.data_shape)
        self.fc = nn.Linear(self.dim + 1, self.dim)
        self.time_inputs = options.time_inputs
        if options.time_inputs == 2:
            self.second = nn.Linear(1, self.dim + 1)
        self.logvar_head = LogvarHead() if options.logvar_head else None

    def split(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if c.ndim == 1:
            return c, torch.zeros_like(c)
        if self.time_inputs != 2 or c.ndim != 2 or c.shape[1] != 2:
            raise ValueError(f"network 'time' takes c_noise of shape (batch,) or (batch, 2), got {tuple(c.shape)}")
        return c[:, 0], c[:, 1]

    def embed(self, r: torch.Tensor) -> torch.Tensor:
        return self.second(r[:, None])

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        c, r = self.split(c_noise)
        h = torch.cat([x.flatten(1), c[:, None]], dim=1)
        if self.time_inputs == 2:
            h = h + self.embed(r)
        return self.fc(h).view(x.shape)

    def logvar(self, c: torch.Tensor) -> torch.Tensor:
        if self.logvar_head is None:
            raise ValueError("network 'time' has no log-variance head: set its option logvar_head = true")
        return self.logvar_head(c)


class IgnoresTheSecondColumn(TimeNetwork):
    def split(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, r = super().split(c)
        return c, torch.zeros_like(r)


class DetachesTheSecondEmbedding(TimeNetwork):
    def embed(self, r: torch.Tensor) -> torch.Tensor:
        return super().embed(r).detach()


class ReadsOneColumnAsBoth(TimeNetwork):
    """A (batch,) c_noise taken as both times: not what a zero second column gives."""

    def split(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (c, c) if c.ndim == 1 else super().split(c)


class TakesAnyWidth(TimeNetwork):
    def split(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (c, torch.zeros_like(c)) if c.ndim == 1 else (c[:, 0], c[:, 1])


class LogvarPerChannel(TimeNetwork):
    def logvar(self, c: torch.Tensor) -> torch.Tensor:
        return super().logvar(c)[:, None]


class LogvarDetached(TimeNetwork):
    def logvar(self, c: torch.Tensor) -> torch.Tensor:
        return super().logvar(c).detach()


class LogvarZeroWithoutHead(TimeNetwork):
    def logvar(self, c: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(c) if self.logvar_head is None else super().logvar(c)


TWO = "with time_inputs=2, forward(x, c_noise of shape (batch, 2), labels)"


BROKEN = [
    (IgnoresTheSecondColumn, f"{TWO}: the second column must change the output, but it gives that of a zero one"),
    (DetachesTheSecondEmbedding, f"{TWO}: no gradient reaches the second input's embedding ['second.weight', "
                                 "'second.bias']"),
    (ReadsOneColumnAsBoth, "with time_inputs=2, a c_noise of shape (batch,) must mean a second time input of 0: it "
                           "must give exactly the output of (batch, 2) with a zero second column"),
    (TakesAnyWidth, "with time_inputs=2, a c_noise of shape (batch, 3) must raise ValueError"),
    (LogvarPerChannel, "with logvar_head=true, logvar(c) must have shape (batch,) = (3,), got (3, 1)"),
    (LogvarDetached, "with logvar_head=true, no gradient of logvar(c) reaches the head's parameters "
                     "['logvar_head.linear.weight', 'logvar_head.linear.bias']"),
    (LogvarZeroWithoutHead, "with logvar_head=false, logvar(c) must raise ValueError naming the option logvar_head"),
]
"""Stand-ins that break one rule of the two options, and check_network's line for each."""


@pytest.mark.parametrize(("cls", "problem"), BROKEN, ids=[cls.__name__ for cls, _ in BROKEN])
def test_check_network_refuses_a_broken_second_time_input_or_logvar_head(cls: type, problem: str) -> None:
    check_network(TimeNetwork)  # the stand-in they break keeps the contract
    with pytest.raises(AssertionError) as info:
        check_network(cls)
    assert str(info.value) == f"{cls.__qualname__}: {problem}"
