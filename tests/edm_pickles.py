"""Write pickles shaped like NVlabs/edm's network pickles without EDM's code, for tests of `ctcore.edm_pickle`.

An EDM network pickle is `pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))`
(NVlabs/edm training/training_loop.py). Each EDM object pickles as `torch_utils.persistence.
_reconstruct_persistent_obj(meta)`, meta = dict(type='class', version=6, module_src=<its module's source>,
class_name=..., state=<its __dict__>) (NVlabs/edm torch_utils/persistence.py); a module's __dict__ is torch 1.12's
(`_parameters`, `_buffers`, `_modules` OrderedDicts, the hook dicts, `training`) plus its attributes and the
recorded `_init_args` / `_init_kwargs`. torch.nn containers (SongUNet's `enc` / `dec` ModuleDicts) are real
torch.nn.ModuleDict objects pickled by torch; tensors and parameters are pickled by torch's own reduce.

Here `_reconstruct_persistent_obj` and `EasyDict` are stand-ins registered under EDM's module names only while a
file is written; nothing is left in sys.modules afterwards.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PERSISTENCE_VERSION = 6  # NVlabs/edm torch_utils/persistence.py: `_version = 6`
NETWORKS_SRC = "# stand-in for the source of NVlabs/edm training/networks.py (tests/edm_pickles.py)\n"
LOSS_SRC = "# stand-in for the source of NVlabs/edm training/loss.py (tests/edm_pickles.py)\n"
AUGMENT_SRC = "# stand-in for the source of NVlabs/edm training/augment.py (tests/edm_pickles.py)\n"
CONTAINERS = {"torch.nn.ModuleDict": torch.nn.ModuleDict, "torch.nn.ModuleList": torch.nn.ModuleList,
              "torch.nn.Sequential": torch.nn.Sequential}
BUFFER_NAMES = ("resample_filter", "freqs")  # EDM's buffers (Conv2d, FourierEmbedding); every other tensor a parameter


class EasyDict(dict):
    """Pickles as `dnnlib.util.EasyDict` (a dict subclass, NVlabs/edm dnnlib/util.py)."""


EasyDict.__module__ = "dnnlib.util"


def _reconstruct_persistent_obj(meta: dict) -> Any:
    raise AssertionError("a stand-in for pickling; never called")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


@dataclass
class Node:
    """One object of the pickle: an EDM persistent class (`module=True`: an nn.Module, with parameters, buffers and
    submodules; False: a plain class such as EDMLoss), or a torch.nn container named by its class
    ("torch.nn.ModuleDict") whose children are its entries. Tensors become Parameters / buffers; other values in
    params or buffers are pickled as they are (for forged files)."""

    class_name: str
    init_kwargs: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    buffers: dict = field(default_factory=dict)
    children: dict = field(default_factory=dict)
    module: bool = True
    module_src: str = NETWORKS_SRC
    init_args: tuple = ()
    non_persistent: frozenset = frozenset()
    meta: dict = field(default_factory=dict)  # replaces entries of the persistence meta (forged records)


class Record:
    """A persistence record to pickle: reduces to `_reconstruct_persistent_obj(meta)` like EDM's objects."""

    def __init__(self, meta: dict) -> None:
        self.meta = meta


def _module_state(node: Node) -> dict:
    """An nn.Module's __dict__ as torch 1.12 (EDM's environment) holds it, after `.eval().requires_grad_(False)`."""

    def param(v: Any) -> Any:
        return torch.nn.Parameter(v.detach().clone(), requires_grad=False) if isinstance(v, torch.Tensor) else v

    def buffer(v: Any) -> Any:
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    return {
        "training": False,
        "_parameters": OrderedDict((k, param(v)) for k, v in node.params.items()),
        "_buffers": OrderedDict((k, buffer(v)) for k, v in node.buffers.items()),
        "_non_persistent_buffers_set": set(node.non_persistent),
        "_backward_hooks": OrderedDict(),
        "_is_full_backward_hook": None,
        "_forward_hooks": OrderedDict(),
        "_forward_pre_hooks": OrderedDict(),
        "_state_dict_hooks": OrderedDict(),
        "_load_state_dict_pre_hooks": OrderedDict(),
        "_load_state_dict_post_hooks": OrderedDict(),
        "_modules": OrderedDict((k, _build(v)) for k, v in node.children.items()),
    }


def _build(value: Any) -> Any:
    """A Node as the object to pickle (a record or a real torch container); anything else as it is."""
    if not isinstance(value, Node):
        return value
    if value.class_name in CONTAINERS:
        container = CONTAINERS[value.class_name].__new__(CONTAINERS[value.class_name])
        container.__dict__.update(_module_state(value))
        return container
    state = _module_state(value) if value.module else {}
    state.update(value.attrs)
    state.update(_init_args=tuple(value.init_args), _init_kwargs=dict(value.init_kwargs))
    meta = dict(type="class", version=PERSISTENCE_VERSION, module_src=value.module_src, class_name=value.class_name,
                state=state)
    meta.update(value.meta)
    return Record(meta)


class _EdmPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Record):
            return _reconstruct_persistent_obj, (obj.meta,)
        return NotImplemented


@contextmanager
def _edm_module_names() -> Iterator[None]:
    """torch_utils.persistence and dnnlib.util in sys.modules (holding the stand-ins) while pickling, so pickle
    writes their names; whatever was there before is put back."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    fakes = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
             "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    saved = {name: sys.modules[name] for name in fakes if name in sys.modules}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name in fakes:
            del sys.modules[name]
        sys.modules.update(saved)


def edm_pickle_bytes(ema: Any, extra: Mapping[str, Any] | None = None, *, protocol: int = 4) -> bytes:
    """The bytes of an EDM-style network pickle: dict(ema=..., **extra), Nodes pickled as EDM's objects.
    EDM's Python writes protocol 4 (pickle.DEFAULT_PROTOCOL of Python 3.8 to 3.13)."""
    data = {"ema": _build(ema), **{k: _build(v) for k, v in (extra or {}).items()}}
    buf = io.BytesIO()
    with _edm_module_names():
        _EdmPickler(buf, protocol=protocol).dump(data)
    return buf.getvalue()


def write_edm_pickle(path: str | Path, ema: Any, extra: Mapping[str, Any] | None = None, *,
                     protocol: int = 4) -> Path:
    """Write an EDM-style network pickle to `path` (see `edm_pickle_bytes`); returns the path."""
    path = Path(path)
    path.write_bytes(edm_pickle_bytes(ema, extra, protocol=protocol))
    return path


def edm_extra() -> dict[str, Any]:
    """The other top-level entries of an EDM snapshot: an EDMLoss and an AugmentPipe record (plain persistent
    classes, their attributes as EDM's __init__ sets them) and dataset_kwargs; the values are illustrative."""
    loss = Node("EDMLoss", init_kwargs={}, attrs=dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5), module=False,
                module_src=LOSS_SRC)
    augment = Node("AugmentPipe", init_kwargs=dict(p=0.12, xflip=1e8, yflip=1, scale=1),
                   attrs=dict(p=0.12, xflip=1e8, yflip=1.0, scale=1.0), module=False, module_src=AUGMENT_SRC)
    dataset = dict(class_name="training.dataset.ImageFolderDataset", path="datasets/cifar10-32x32.zip",
                   use_labels=False, xflip=False, cache=True, resolution=32, max_size=50000)
    return dict(loss_fn=loss, augment_pipe=augment, dataset_kwargs=dataset)


def _guess_class(path: tuple[str, ...], tensors: Mapping[str, Any], has_children: bool) -> str:
    """EDM's class for a module known only by its place and tensors (NVlabs/edm training/networks.py): enc / dec
    are ModuleDicts, modules with submodules UNetBlocks, leaves Conv2d / Linear / GroupNorm by their weight's rank."""
    if len(path) == 1 and path[0] in ("enc", "dec"):
        return "torch.nn.ModuleDict"
    if has_children:
        return "UNetBlock"
    weight = tensors.get("weight")
    if isinstance(weight, torch.Tensor):
        return {4: "Conv2d", 2: "Linear", 1: "GroupNorm"}.get(weight.ndim, "Module")
    if "resample_filter" in tensors:
        return "Conv2d"
    return "FourierEmbedding" if "freqs" in tensors else "Module"


def _tree(path: tuple[str, ...], flat: Mapping[str, Any], classes: Mapping[str, str]) -> Node:
    tensors: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        head, _, rest = name.partition(".")
        if rest:
            groups.setdefault(head, {})[rest] = value
        else:
            tensors[name] = value
    dotted = ".".join(path)
    cls = classes.get(dotted) or _guess_class(path, tensors, bool(groups))
    return Node(cls, params={k: v for k, v in tensors.items() if k not in BUFFER_NAMES},
                buffers={k: v for k, v in tensors.items() if k in BUFFER_NAMES},
                children={k: _tree((*path, k), sub, classes) for k, sub in groups.items()})


def network_node(precond_class: str, precond_kwargs: dict, model_class: str, model_kwargs: dict,
                 model_state: Mapping[str, torch.Tensor], precond_attrs: dict, *, model_attrs: dict | None = None,
                 classes: Mapping[str, str] | None = None) -> Node:
    """An EDM network as a Node: the preconditioner `precond_class` (its init kwargs and attributes) holding the
    model as child 'model'. `model_state` is the model's flat state dict in EDM's names
    ("enc.32x32_block0.conv0.weight"): turned into the nested tree, `enc` / `dec` as ModuleDicts, other classes
    guessed from the tensors unless `classes` names them by dotted path ("enc.32x32_block0": "UNetBlock")."""
    model = _tree((), model_state, classes or {})
    model.class_name, model.init_kwargs, model.attrs = model_class, dict(model_kwargs), dict(model_attrs or {})
    return Node(precond_class, init_kwargs=dict(precond_kwargs), attrs=dict(precond_attrs), children={"model": model})
