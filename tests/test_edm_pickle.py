"""ctcore.edm_pickle reads NVlabs/edm network pickles as data: what it reads back (tensors, init kwargs, module
hashes), and hostile or damaged files, each one RunError line with nothing run and nothing written."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import random
import struct
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from edm_pickles import (
    NETWORKS_SRC,
    EasyDict,
    Node,
    Record,
    edm_extra,
    edm_pickle_bytes,
    network_node,
    write_edm_pickle,
)
from helpers import snapshot

from ctcore.edm_pickle import FIX, PersistentObject, child, module_tensors, read_edm_pickle
from ctcore.errors import RunError
from ctcore.files import file_digest

SHA_NETWORKS = hashlib.sha256(NETWORKS_SRC.encode()).hexdigest()


def _model_state() -> dict[str, torch.Tensor]:
    """A tiny SongUNet-like flat state dict in EDM's names and state_dict order, several dtypes."""
    g = torch.Generator().manual_seed(0)
    return {
        "map_layer0.weight": torch.randn(8, 4, generator=g),
        "map_layer0.bias": torch.randn(8, generator=g),
        "enc.8x8_conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "enc.8x8_conv.bias": torch.randn(4, generator=g),
        "enc.4x4_down.norm0.weight": torch.randn(4, generator=g).half(),
        "enc.4x4_down.conv0.weight": torch.randn(4, 4, 3, 3, generator=g).to(torch.bfloat16),
        "enc.4x4_down.conv0.resample_filter": torch.full((1, 1, 2, 2), 0.25, dtype=torch.float64),
        "dec.8x8_aux_norm.weight": torch.randn(4, generator=g),
        "dec.8x8_aux_conv.weight": torch.randn(3, 4, 3, 3, generator=g).transpose(0, 1),  # not contiguous
    }


def _network(**precond_kwargs) -> Node:
    kwargs = dict(img_resolution=8, img_channels=3, model_type="SongUNet",
                  augment_kwargs=EasyDict(p=0.12, xflip=1e8), channel_mult=[1, 2], init_weight=np.sqrt(0.2),
                  **precond_kwargs)
    return network_node("VPPrecond", kwargs, "SongUNet", dict(model_channels=4, channel_mult=[1, 2]),
                        _model_state(), dict(img_resolution=8, sigma_min=0.002, M=1000, beta_d=np.float32(19.9)),
                        model_attrs=dict(label_dropout=0, skip=np.sqrt(0.5), dtype=np.dtype("float32")))


def _message(path: Path) -> str:
    with pytest.raises(RunError) as info:
        read_edm_pickle(path)
    message = info.value.message
    assert "\n" not in message and message.startswith(repr(str(path))) and message.endswith(f"; {FIX}")
    return message


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_a_network_pickle_reads_back_its_tensors_kwargs_and_module_hashes(tmp_path: Path, protocol: int) -> None:
    path = write_edm_pickle(tmp_path / "net.pkl", _network(), edm_extra(), protocol=protocol)
    net = read_edm_pickle(path)

    assert net.path == path and net.sha256 == file_digest(path)
    ema = net.ema
    assert (ema.class_name, ema.module_sha256, ema.init_args) == ("VPPrecond", SHA_NETWORKS, ())
    assert ema.init_kwargs == dict(img_resolution=8, img_channels=3, model_type="SongUNet",
                                   augment_kwargs=dict(p=0.12, xflip=1e8), channel_mult=[1, 2],
                                   init_weight=float(np.sqrt(0.2)))
    assert type(ema.init_kwargs["augment_kwargs"]) is dict and type(ema.init_kwargs["init_weight"]) is float
    assert ema.state["sigma_min"] == 0.002 and ema.state["M"] == 1000 and ema.state["training"] is False
    assert type(ema.state["beta_d"]) is float and ema.state["beta_d"] == float(np.float32(19.9))
    model = child(ema, "model")
    assert (model.class_name, model.init_kwargs, model.state["label_dropout"]) == (
        "SongUNet", dict(model_channels=4, channel_mult=[1, 2]), 0)
    assert type(model.state["skip"]) is float and model.state["skip"] == float(np.sqrt(0.5))
    assert model.state["dtype"] == "float32"
    enc = child(ema, "model.enc")
    assert (enc.class_name, enc.module_sha256, enc.init_kwargs) == ("torch.nn.ModuleDict", None, {})
    assert child(enc, "4x4_down").class_name == "UNetBlock"

    want = _model_state()
    got = module_tensors(model)
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
        assert type(got[name]) is torch.Tensor and not got[name].requires_grad
    assert list(module_tensors(ema)) == [f"model.{k}" for k in want]

    assert net.module_sources == {
        **dict.fromkeys(["VPPrecond", "SongUNet", "Linear", "Conv2d", "UNetBlock", "GroupNorm"], SHA_NETWORKS),
        "EDMLoss": hashlib.sha256(edm_extra()["loss_fn"].module_src.encode()).hexdigest(),
        "AugmentPipe": hashlib.sha256(edm_extra()["augment_pipe"].module_src.encode()).hexdigest()}
    assert list(net.extra) == ["loss_fn", "augment_pipe", "dataset_kwargs"]
    loss = net.extra["loss_fn"]
    assert isinstance(loss, PersistentObject) and loss.state == dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    assert net.extra["dataset_kwargs"]["resolution"] == 32


def test_module_tensors_follow_state_dict(tmp_path: Path) -> None:
    """Parameters, then persistent buffers, then submodules; None entries and non-persistent buffers skipped;
    views keep their offset and strides; ModuleList / Sequential read like ModuleDict."""
    base = torch.arange(10.0)
    block = Node("UNetBlock", params={"weight": torch.ones(2), "bias": None},
                 buffers={"resample_filter": None, "running": torch.zeros(3), "cache": torch.ones(1)},
                 non_persistent=frozenset({"cache"}), attrs={"view": base[2:8:2]},
                 children={"skip": None, "list": Node("torch.nn.ModuleList", children={"0": Node(
                     "Linear", params={"weight": torch.eye(2)}), "1": Node("torch.nn.Sequential")})})
    ema = Node("EDMPrecond", children={"model": block}, init_args=(3, "x"))
    net = read_edm_pickle(write_edm_pickle(tmp_path / "n.pkl", ema))

    tensors = module_tensors(net.ema)
    assert list(tensors) == ["model.weight", "model.running", "model.list.0.weight"]
    assert torch.equal(tensors["model.list.0.weight"], torch.eye(2))
    model = child(net.ema, "model")
    assert net.ema.init_args == (3, "x") and torch.equal(model.state["view"], torch.tensor([2.0, 4.0, 6.0]))
    assert model.state["_parameters"]["bias"] is None and model.state["_modules"]["skip"] is None
    assert child(model, "list").class_name == "torch.nn.ModuleList"
    assert child(model, "list.1").class_name == "torch.nn.Sequential"
    for name, have in (("nope", "model"), ("model.skip", "list")):
        with pytest.raises(RunError) as info:
            child(net.ema, name)
        owner = "EDMPrecond" if name == "nope" else "UNetBlock"
        part = name.split(".")[-1]
        assert info.value.message == (f"the {owner} in the EDM pickle has no submodule {part!r} (it has: {have}); "
                                       f"{FIX}")


def test_the_writer_pickles_what_edm_pickles(tmp_path: Path) -> None:
    """At protocol 2 each global is one GLOBAL opcode: exactly the names an EDM snapshot asks for (numpy 2's
    spelling of the scalar rebuild; EDM's numpy 1 writes numpy.core.multiarray)."""
    import pickletools

    data = edm_pickle_bytes(_network(), edm_extra(), protocol=2)
    names = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert names == {"torch_utils.persistence _reconstruct_persistent_obj", "torch._utils _rebuild_tensor_v2",
                     "torch._utils _rebuild_parameter", "torch.storage _load_from_bytes", "collections OrderedDict",
                     "torch.nn.modules.container ModuleDict", "dnnlib.util EasyDict", "numpy dtype",
                     "numpy._core.multiarray scalar", "__builtin__ set", "_codecs encode"}
    assert not any(m.split(".")[0] in ("torch_utils", "dnnlib") for m in sys.modules)


def test_numpy_1_scalars_read_like_numpy_2_scalars(tmp_path: Path) -> None:
    data = edm_pickle_bytes(_network(), protocol=2)
    old = data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
    assert old != data
    path = tmp_path / "numpy1.pkl"
    path.write_bytes(old)
    assert read_edm_pickle(path).ema.init_kwargs["init_weight"] == float(np.sqrt(0.2))


class _ImportTrap:
    """A meta path finder that records (and fails) every import of EDM's packages."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch_utils", "dnnlib", "training"):
            self.asked.append(name)
            raise ImportError(f"trapped {name}")
        return None


def test_reading_imports_no_edm_module(tmp_path: Path) -> None:
    path = write_edm_pickle(tmp_path / "net.pkl", _network(), edm_extra())
    trap = _ImportTrap()
    sys.meta_path.insert(0, trap)
    try:
        import ctcore.edm_pickle as reader

        reader.read_edm_pickle(path)
    finally:
        sys.meta_path.remove(trap)
    assert trap.asked == []
    assert not any(m.split(".")[0] in ("torch_utils", "dnnlib") for m in sys.modules)


class _Payload:
    """Pickles as a call of `func(*args)`: what a hostile pickle asks the loader to run."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, tuple[_Payload, str]]:
    code = f"open({str(marker)!r}, 'w').write('ran')"
    return {"os.system": (_Payload(os.system, f"touch '{marker}'"), f"{os.system.__module__}.system"),
            "exec": (_Payload(builtins.exec, code), "builtins.exec"),
            "eval": (_Payload(builtins.eval, code), "builtins.eval")}


@pytest.mark.parametrize("payload", ["os.system", "exec", "eval"])
@pytest.mark.parametrize("where", ["top level", "network attribute", "init kwarg", "parameter"])
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path: Path, payload: str, where: str) -> None:
    marker = tmp_path / "marker"
    evil, global_name = _payloads(marker)[payload]
    pickle.loads(pickle.dumps(evil))  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()

    net = _network()
    extra = {}
    if where == "top level":
        extra = {"augment_pipe": evil}
    elif where == "network attribute":
        child_node = net.children["model"].children["enc"].children["4x4_down"]
        child_node.attrs["skip_scale"] = evil
    elif where == "init kwarg":
        net.init_kwargs["augment_kwargs"]["p"] = evil
    else:
        net.children["model"].children["map_layer0"].params["weight"] = evil
    path = write_edm_pickle(tmp_path / "evil.pkl", net, extra)
    before = snapshot(tmp_path)
    assert _message(path) == (f"{str(path)!r} asks for {global_name}, which is not part of an EDM network pickle "
                              f"and could run code (nothing was run); {FIX}")
    assert not marker.exists() and snapshot(tmp_path) == before


def test_module_source_is_hashed_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    src = f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(3)\n"
    exec(compile(src.split("\n")[0], "src", "exec"))  # the source is live: running it writes the marker
    assert marker.exists()
    marker.unlink()

    net = _network()
    net.module_src = src
    path = write_edm_pickle(tmp_path / "net.pkl", net)
    read = read_edm_pickle(path)
    assert read.ema.module_sha256 == hashlib.sha256(src.encode()).hexdigest() == read.module_sources["VPPrecond"]
    assert not marker.exists()


@pytest.mark.parametrize("value, asked", [
    (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
    (__import__("collections").Counter(a=1), "collections.Counter"),
    (torch.device("cpu"), "torch.device"),
    (np.zeros(2), f"{np.ndarray.__reduce__(np.zeros(1))[0].__module__}._reconstruct"),
])
def test_a_global_outside_the_list_is_refused(tmp_path: Path, value, asked: str) -> None:
    net = _network()
    net.attrs["extra"] = value
    path = write_edm_pickle(tmp_path / "net.pkl", net)
    assert _message(path) == (f"{str(path)!r} asks for {asked}, which is not part of an EDM network pickle and "
                              f"could run code (nothing was run); {FIX}")


def test_a_truncated_file_is_one_line_at_every_cut(tmp_path: Path) -> None:
    for protocol in (0, 2, 4):
        data = edm_pickle_bytes(_network(), edm_extra(), protocol=protocol)
        n = len(data)
        for cut in sorted({1, 2, 3, 11, 40, n // 5, n // 3, n // 2, 2 * n // 3, n - 40, n - 2, n - 1}):
            path = tmp_path / f"cut{protocol}-{cut}.pkl"
            path.write_bytes(data[:cut])
            assert _message(path) == (f"{str(path)!r} is truncated or damaged: its data runs past the end of the "
                                      f"file; copy or download it again; {FIX}"), (protocol, cut)


def test_files_that_are_no_network_pickle(tmp_path: Path) -> None:
    cases: dict[str, tuple[bytes, str]] = {}
    cases["empty.pkl"] = (b"", "is empty")
    buf = io.BytesIO()
    torch.save({"net": torch.zeros(2)}, buf)
    assert zipfile.is_zipfile(io.BytesIO(buf.getvalue()))
    cases["training-state.pt"] = (buf.getvalue(), "is a torch checkpoint (a torch.save zip archive, like EDM's "
                                  "training-state-*.pt), not a network pickle")
    buf = io.BytesIO()
    torch.save({"net": torch.zeros(2)}, buf, _use_new_zipfile_serialization=False)
    cases["legacy.pt"] = (buf.getvalue(), "is a torch checkpoint in torch.save's legacy format, not a network pickle")
    cases["image.png"] = (b"\x89PNG\r\n\x1a\n" + bytes(100), "is not a pickle of a dict (it starts with the "
                          "bytes 89504e47)")
    cases["list.pkl"] = (pickle.dumps([1, 2]), "holds a list, not EDM's dict of 'ema', 'loss_fn', 'augment_pipe' "
                         "and 'dataset_kwargs'")
    cases["noema.pkl"] = (pickle.dumps({"net": 1, "G_ema": 2}), "has no 'ema' entry (it has: net, G_ema)")
    cases["emadict.pkl"] = (pickle.dumps({"ema": {"a": 1}}), "holds a dict as 'ema', not a network saved by EDM's "
                            "torch_utils.persistence")
    cases["container.pkl"] = (edm_pickle_bytes(Node("torch.nn.ModuleDict")), "holds a torch.nn.ModuleDict as "
                              "'ema', not a network saved by EDM's torch_utils.persistence")
    cases["trailing.pkl"] = (edm_pickle_bytes(_network()) + b"xy", "has 2 bytes after the end of its pickle; the "
                             "file is damaged")
    cases["ext.pkl"] = (b"\x80\x02\x82\x01.", "uses the pickle opcode EXT1, which no EDM network pickle has")
    cases["persid.pkl"] = (b"\x80\x02X\x01\x00\x00\x00aQ.", "uses a persistent id, which no EDM network pickle has "
                           "(is it a torch.save file?)")
    for name, (data, says) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert _message(path) == f"{str(path)!r} {says}; {FIX}", name
    folder = tmp_path / "folder.pkl"
    folder.mkdir()
    assert _message(folder) == f"{str(folder)!r} is not a file; {FIX}"
    assert _message(tmp_path / "absent") == f"{str(tmp_path / 'absent')!r} not found; {FIX}"


def test_random_bytes_are_one_line(tmp_path: Path) -> None:
    """Whatever the bytes, RunError with one line naming the file and the fix, never another exception."""
    rng = random.Random(0)
    header = edm_pickle_bytes(_network())[:200]
    for i in range(40):
        data = rng.randbytes(rng.randrange(1, 3000))
        if i % 2:  # a real pickle's start followed by noise reaches deeper into the reader
            data = header[: rng.randrange(2, 200)] + data
        path = tmp_path / f"r{i}.pkl"
        path.write_bytes(data)
        _message(path)


def _forged_storage(numel: int) -> bytes:
    """torch.save's legacy bytes of one float32 storage that declares `numel` elements and holds 3."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    class Forger(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj == "the storage" else None

    f = io.BytesIO()
    for value in (MAGIC_NUMBER, PROTOCOL_VERSION, dict(protocol_version=PROTOCOL_VERSION, little_endian=True,
                                                        type_sizes=dict(short=2, int=4, long=4))):
        pickle.dump(value, f, protocol=2)
    Forger(f, protocol=2).dump("the storage")
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", numel) + bytes(12))
    return f.getvalue()


def _forged_tensor(numel: int) -> _Payload:
    storage = _Payload(torch.storage._load_from_bytes, _forged_storage(numel))
    return _Payload(torch._utils._rebuild_tensor_v2, storage, 0, (3,), (1,), False, OrderedDict())


def test_a_storage_declaring_more_elements_than_it_holds_is_refused_before_allocating(tmp_path: Path) -> None:
    net = _network()
    net.children["model"].children["map_layer0"].params["weight"] = _forged_tensor(3)  # the forger's files load
    assert torch.equal(module_tensors(read_edm_pickle(write_edm_pickle(tmp_path / "ok.pkl", net)).ema)[
        "model.map_layer0.weight"], torch.zeros(3))
    net.children["model"].children["map_layer0"].params["weight"] = _forged_tensor(10**12)
    path = write_edm_pickle(tmp_path / "huge.pkl", net)
    start = time.perf_counter()
    assert _message(path) == (f"{str(path)!r} holds a tensor storage that declares 1,000,000,000,000 elements of 4 "
                              f"bytes but has 12 bytes of data; the file is damaged or forged; {FIX}")
    assert time.perf_counter() - start < 1


def test_forged_lengths_and_views_are_refused(tmp_path: Path) -> None:
    """A bytes value declaring 2^62 bytes, a tensor view reaching past its storage or larger than it, a BUILD
    on a tensor: one line each, nothing allocated."""
    prefix = b"\x80\x04}\x8c\x03ema\x8e"  # {'ema': BYTES8 ...
    cases = {
        "bytes8.pkl": (prefix + struct.pack("<Q", 1 << 62) + b"abc", "is truncated or damaged: its data runs past "
                       "the end of the file; copy or download it again"),
        "frame.pkl": (b"\x80\x04\x95" + struct.pack("<Q", 1 << 62) + b"}.", "is truncated or damaged: its data "
                      "runs past the end of the file; copy or download it again"),
    }
    views = {"past.pkl": ((4,), (1,), 0, "has a tensor of size [4] that reaches past its storage of 3 elements"),
             "offset.pkl": ((3,), (1,), 1, "has a tensor of size [3] that reaches past its storage of 3 elements"),
             "broadcast.pkl": ((1000, 1000), (0, 1), 0, "has a tensor of size [1000, 1000] that reaches past its "
                               "storage of 3 elements")}
    for name, (size, stride, offset, says) in views.items():
        net = _network()
        storage = _Payload(torch.storage._load_from_bytes, _forged_storage(3))
        net.attrs["t"] = _Payload(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False, OrderedDict())
        cases[name] = (edm_pickle_bytes(net), says)
    for name, (data, says) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert _message(path) == f"{str(path)!r} {says}; {FIX}", name


class _Built(_Payload):
    """Pickles as func(*args) followed by BUILD with `state`."""

    def __init__(self, state, func, *args) -> None:
        super().__init__(func, *args)
        self.state = state

    def __reduce__(self):
        return self.func, self.args, self.state


def test_build_and_newobj_only_on_stand_ins(tmp_path: Path) -> None:
    storage = _Payload(torch.storage._load_from_bytes, _forged_storage(3))
    cases = {
        "build.pkl": (_Built((None, 1, None), torch._utils._rebuild_tensor_v2, storage, 0, (3,), (1,), False,
                             OrderedDict()), "sets the state of a tensor, which no EDM network pickle does"),
        "reconstructor.pkl": (_Payload(__import__("copyreg")._reconstructor, OrderedDict, object, None),
                              "calls copyreg._reconstructor for something other than a torch.nn container or an "
                              "EasyDict"),
    }
    for name, (value, says) in cases.items():
        net = _network()
        net.attrs["x"] = value
        path = tmp_path / name
        path.write_bytes(edm_pickle_bytes(net))
        assert _message(path) == f"{str(path)!r} {says}; {FIX}", name


def test_records_of_another_kind_are_refused(tmp_path: Path) -> None:
    cases = {
        "version.pkl": (Node("VPPrecond", meta={"version": 5}), "holds a persistence record of VPPrecond of "
                        "version 5; EDM's torch_utils.persistence writes version 6"),
        "type.pkl": (Node("VPPrecond", meta={"type": "module"}), "holds a persistence record of VPPrecond of type "
                     "'module'; EDM's torch_utils.persistence writes 'class'"),
        "meta.pkl": (Record({"type": "class", "version": 6}), "holds a persistence record without module_src, "
                     "class_name, state"),
        "name.pkl": (Node("VPPrecond", meta={"class_name": "os.system"}), "holds a persistence record whose "
                     "class_name 'os.system' is no class name"),
        "src.pkl": (Node("VPPrecond", children={"model": Node("VPPrecond", module_src="# other\n")}),
                    "holds two persistence records of VPPrecond with different module sources"),
        "params.pkl": (Node("VPPrecond", params={"w": "text"}), "gives VPPrecond._parameters[w] a str, not a tensor"),
        "state.pkl": (Node("VPPrecond", meta={"state": [1]}), "gives VPPrecond a list as its state, not a dict"),
    }
    for name, (ema, says) in cases.items():
        path = tmp_path / name
        path.write_bytes(edm_pickle_bytes(ema))
        assert _message(path) == f"{str(path)!r} {says}; {FIX}", name


def _dict_with_ema(ema_opcodes: bytes) -> bytes:
    return b"\x80\x02}X\x03\x00\x00\x00ema" + ema_opcodes + b"s."


def test_deep_nesting_cycles_and_shared_data_are_bounded(tmp_path: Path) -> None:
    depth = 100_000
    doubling = b"]q\x000" + b"".join(  # 90 levels of (x, x): 2^90 paths through 91 objects
        b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86" + b"q" + bytes([i + 1]) + b"0" for i in range(90)) + b"h\x5a"
    cases = {
        "deep.pkl": (_dict_with_ema(b"]" * depth + b"a" * (depth - 1)), "nests data more than 100 levels deep, "
                     "which no EDM network pickle does"),
        "cycle.pkl": (_dict_with_ema(b"]q\x01h\x01a"), "holds data that contains itself, which no EDM network "
                      "pickle does"),
        "shared.pkl": (_dict_with_ema(doubling), "holds a tuple as 'ema', not a network saved by EDM's "
                       "torch_utils.persistence"),
    }
    net = _network()
    deep = []
    for _ in range(300):
        deep = [deep]
    net.children["model"].attrs["nested"] = deep
    cases["deep-attr.pkl"] = (edm_pickle_bytes(net), "nests data more than 100 levels deep, which no EDM network "
                              "pickle does")
    for name, (data, says) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        start = time.perf_counter()
        assert _message(path) == f"{str(path)!r} {says}; {FIX}", name
        assert time.perf_counter() - start < 2, name
