"""Read NVlabs/edm network pickles as data: nothing in the file is imported or run.

EDM's network pickles (its training loop's network-snapshot-*.pkl and the released edm-*.pkl) are plain
`pickle.dump`s of `dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)` (NVlabs/edm
training/training_loop.py). Every EDM class is wrapped by `torch_utils.persistence.persistent_class`, so each object
pickles as a call of `torch_utils.persistence._reconstruct_persistent_obj(meta)`, meta holding the class name, the
object's `__dict__` and the whole source of the class's module, which a normal `pickle.load` executes
(NVlabs/edm torch_utils/persistence.py). Tensors pickle through torch's own reduce: `_rebuild_tensor_v2` of a
storage that `torch.storage._load_from_bytes` reads from `torch.save` bytes in torch's legacy format.

`read_edm_pickle` reads such a file with an unpickler that knows an explicit list of globals and builds plain
records from them: each persistence record (and each torch.nn container) becomes a `PersistentObject`; module
sources are only hashed. Any other global, opcode or shape of data is refused before it is used, with one
`RunError` line naming the file and the fix. Declared sizes are checked against the bytes the file really has
before anything that size is allocated, and nesting is bounded.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import pickletools
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from ctcore.errors import RunError, path_not_found
from ctcore.files import file_digest

FIX = "give a network pickle from NVlabs/edm (network-snapshot-*.pkl or a released edm-*.pkl)"
PERSISTENCE_VERSION = 6  # NVlabs/edm torch_utils/persistence.py: `_version = 6`
MAX_DEPTH = 100  # an EDM network pickle nests about 20 levels (dict, record, state, _modules, ... a parameter)
CONTAINERS = ("ModuleDict", "ModuleList", "Sequential")  # torch.nn containers EDM's networks may hold


@attrs.frozen(eq=False)
class PersistentObject:
    """One persistence record of an EDM pickle (or a torch.nn container) read as data, never instantiated.

    `state` is the object's `__dict__` without `_init_args` / `_init_kwargs`: for a module `_parameters`,
    `_buffers` (names -> tensor or None), `_modules` (names -> PersistentObject or None), `training`, ... and its
    attributes; EasyDicts and OrderedDicts read as dicts, numpy scalars as Python numbers. Compared by identity."""

    class_name: str
    module_sha256: str | None
    init_args: tuple
    init_kwargs: dict[str, Any]
    state: dict[str, Any]


@attrs.frozen(eq=False)
class EdmPickle:
    """An EDM network pickle read as data: the network (`ema`), the other top-level entries, provenance."""

    path: Path
    sha256: str
    ema: PersistentObject
    extra: dict[str, Any]
    module_sources: dict[str, str]


def module_tensors(obj: PersistentObject) -> dict[str, torch.Tensor]:
    """The tensors `nn.Module.state_dict()` would hold: parameters and persistent buffers of `obj` and its
    submodules under dotted names ("model.enc.32x32_conv.weight"), in state_dict order; None entries skipped."""
    out: dict[str, torch.Tensor] = {}
    _collect(obj, "", out)
    return out


def _collect(obj: PersistentObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = obj.state
    transient = state.get("_non_persistent_buffers_set") or ()
    for name, t in (state.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = t.detach()
    for name, t in (state.get("_buffers") or {}).items():
        if t is not None and name not in transient:
            out[prefix + name] = t.detach()
    for name, sub in (state.get("_modules") or {}).items():
        if sub is not None:
            _collect(sub, f"{prefix}{name}.", out)


def child(obj: PersistentObject, name: str) -> PersistentObject:
    """The submodule `name` of `obj` (dotted names go down several levels: "model.enc"); RunError if absent."""
    here = obj
    for part in name.split("."):
        modules = here.state.get("_modules") or {}
        sub = modules.get(part)
        if sub is None:
            have = ", ".join(k for k, v in modules.items() if v is not None) or "none"
            raise RunError(f"the {here.class_name} in the EDM pickle has no submodule {part!r} (it has: {have}); "
                           f"{FIX}")
        here = sub
    return here


# ---------------------------------------------------------------------------------------------------------------
# What the file may ask for: stand-ins that build data


class _Refused(Exception):
    """A file the reader will not read; the message follows the file's name (`'x.pkl' <message>; <FIX>`)."""


def _printable(text: str, limit: int = 120) -> str:
    """`text` for a one-line message: as it is when printable and short, else its repr, cut to `limit`."""
    shown = text if text.isprintable() else repr(text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _describe(value: Any) -> str:
    """'a list', 'None', 'a SongUNet record', ... for messages; never calls the value's repr."""
    if value is None:
        return "None"
    if isinstance(value, PersistentObject):
        return f"a {value.class_name}" + (" record" if value.module_sha256 else "")
    if isinstance(value, _RawRecord):
        return "a persistence record"
    if isinstance(value, torch.Tensor):
        return "a tensor"
    if isinstance(value, _EasyDict):
        return "an EasyDict"
    if isinstance(value, _Container):
        return f"a {value.class_name}"
    return f"a {type(value).__name__}"


class _Buildable:
    """Stand-ins that the pickle's BUILD opcode may give a state (everything else refuses BUILD)."""

    def __setstate__(self, state: Any) -> None:
        raise _Refused(f"sets the state of {_describe(self)}, which no EDM network pickle does")


class _RawRecord:
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` returns here: the meta, unexamined."""

    def __init__(self, meta: Any) -> None:
        self.meta = meta


def _persistent_record(*args: Any) -> _RawRecord:
    if len(args) != 1:
        raise _Refused("calls torch_utils.persistence._reconstruct_persistent_obj with other than one meta")
    return _RawRecord(args[0])


class _Container(_Buildable):
    """A torch.nn container (ModuleDict, ...) as pickled by torch: created empty, then given its __dict__."""

    class_name = "torch.nn.Module"
    state: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> _Container:
        if args or kwargs:
            raise _Refused(f"creates a {cls.class_name} with arguments, which torch's pickling never does")
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        if self.state is not None or not isinstance(state, dict):
            raise _Refused(f"gives a {self.class_name} {_describe(state)} as its state; torch pickles one dict")
        self.state = state


_CONTAINER_TYPES: dict[str, type[_Container]] = {
    name: type(f"_{name}", (_Container,), {"class_name": f"torch.nn.{name}"}) for name in CONTAINERS
}


class _EasyDict(dict, _Buildable):
    """dnnlib.util.EasyDict (a dict subclass) read as a plain dict."""

    def __setstate__(self, state: Any) -> None:
        if state:
            raise _Refused("gives a dnnlib.util.EasyDict attributes, which EDM's EasyDict never has")


class _Marker:
    """A builtin that may appear only as an argument of copyreg._reconstructor (`object`, `dict`)."""

    def __init__(self, name: str) -> None:
        self.name = name


_OBJECT, _DICT = _Marker("object"), _Marker("dict")
_NEW_ALLOWED = (_Container, _EasyDict, collections.OrderedDict, set, frozenset)  # what NEWOBJ may create


def _reconstructor(*args: Any) -> Any:
    """copyreg._reconstructor(cls, base, state), as protocols 0 and 1 write it, for the allowed classes only."""
    if len(args) == 3:
        cls, base, state = args
        if isinstance(cls, type) and issubclass(cls, _Container) and base is _OBJECT and state is None:
            return cls()
        if cls is _EasyDict and base is _DICT and isinstance(state, dict):
            return _EasyDict(state)
    raise _Refused("calls copyreg._reconstructor for something other than a torch.nn container or an EasyDict")


def _latin1_bytes(*args: Any) -> bytes:
    """_codecs.encode(text, 'latin1'): how protocols 0 to 2 write bytes."""
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin1")
    raise _Refused("calls _codecs.encode other than to write bytes (text, 'latin1')")


def _empty_bytes(*args: Any) -> bytes:
    """bytes(): how protocols 0 to 2 write b''."""
    if args:
        raise _Refused("calls bytes with arguments, which pickle never writes")
    return b""


# numpy dtype codes a scalar attribute may have -> struct format (NVlabs/edm stores np.sqrt(0.5) as an attribute)
_NUMPY_CODES = {"b1": "?", "i1": "b", "i2": "h", "i4": "i", "i8": "q", "u1": "B", "u2": "H", "u4": "I", "u8": "Q",
                "f2": "e", "f4": "f", "f8": "d"}
_NUMPY_NAMES = {"b1": "bool", "f2": "float16", "f4": "float32", "f8": "float64"}


class _NumpyDtype(_Buildable):
    """numpy.dtype(code, align, copy) followed by BUILD (version, byte order, ...): simple numeric codes only."""

    def __init__(self, *args: Any) -> None:
        code = args[0] if args else None
        if not isinstance(code, str) or code not in _NUMPY_CODES or len(args) > 3:
            raise _Refused(f"asks for the numpy dtype {_printable(str(code))}, which is no plain number type")
        self.code, self.order = code, "<"

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|")):
            raise _Refused(f"gives the numpy dtype {self.code} a state that is no plain byte order")
        self.order = "<" if state[1] == "|" else state[1]

    @property
    def name(self) -> str:
        return _NUMPY_NAMES.get(self.code, ("int" if self.code[0] == "i" else "uint") + str(8 * int(self.code[1])))


def _numpy_scalar(*args: Any) -> bool | int | float:
    """numpy.core.multiarray.scalar(dtype, raw bytes) as the Python number it holds."""
    if len(args) == 2 and isinstance(args[0], _NumpyDtype) and isinstance(args[1], bytes):
        dtype, raw = args
        fmt = dtype.order + _NUMPY_CODES[dtype.code]
        if len(raw) == struct.calcsize(fmt):
            return struct.unpack(fmt, raw)[0]
    raise _Refused("holds a numpy scalar that is no plain number")


def _plain_int(value: Any) -> bool:
    return type(value) is int


def _rebuild_tensor(*args: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]), checked:
    the view must lie inside its storage and hold no more elements than it."""
    if len(args) not in (6, 7):
        raise _Refused("rebuilds a tensor with other arguments than torch writes")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    metadata = args[6] if len(args) == 7 else None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _Refused(f"rebuilds a tensor from {_describe(storage)} instead of a storage")
    if not (_plain_int(offset) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) <= 64 and all(_plain_int(s) and s >= 0 for s in size + stride)):
        raise _Refused("rebuilds a tensor whose offset, size or stride are no plain non-negative integers")
    if type(requires_grad) is not bool or not isinstance(hooks, dict) or hooks or metadata:
        raise _Refused("rebuilds a tensor with autograd hooks or metadata, which EDM's tensors never have")
    numel, have = math.prod(size), storage._size()
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if numel and (numel > have - offset or last >= have):
        raise _Refused(f"has a tensor of size {list(size)} that reaches past its storage of {have:,} elements")
    return torch.empty((0,), dtype=storage.dtype).set_(storage._untyped_storage, offset, size, stride)


def _rebuild_parameter(*args: Any) -> torch.nn.Parameter:
    """torch._utils._rebuild_parameter(data, requires_grad, hooks[, state]): a Parameter without autograd; a
    parameter's Python attributes (`_rebuild_parameter_with_state`) are dropped."""
    if len(args) not in (3, 4) or not isinstance(args[0], torch.Tensor) or type(args[1]) is not bool:
        raise _Refused("rebuilds a parameter with other arguments than torch writes")
    if not isinstance(args[2], dict) or args[2]:
        raise _Refused("rebuilds a parameter with autograd hooks, which EDM's parameters never have")
    return torch.nn.Parameter(args[0], requires_grad=False)


# torch.save's legacy storage types -> element size (torch/serialization.py, legacy format: what a storage
# pickles as, NVlabs/edm's torch 1.12 and torch 2.x alike)
_STORAGE_TYPES = {"FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
                  "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1}


def _storage_from_bytes(*args: Any) -> torch.storage.TypedStorage:
    """torch.storage._load_from_bytes(data): the legacy `torch.save` bytes of one storage. Its declared element
    count is checked against the bytes that follow before `torch.load(weights_only=True)` allocates anything."""
    if len(args) != 1 or not isinstance(args[0], bytes):
        raise _Refused("loads a tensor storage from something other than bytes")
    data = args[0]
    numel, elsize = _storage_header(data)
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's refusals come in many types; each is one line here
        raise _Refused(f"holds a tensor storage torch cannot read ({type(exc).__name__}: "
                       f"{_printable(str(exc).strip().splitlines()[0] if str(exc).strip() else '')})") from None
    if not isinstance(storage, torch.storage.TypedStorage) or storage._size() != numel:
        raise _Refused("holds a tensor storage that reads back as something else than it declares")
    return storage


class _StorageType:
    def __init__(self, name: str, elsize: int) -> None:
        self.name, self.elsize = name, elsize


class _StorageId:
    def __init__(self, pid: Any) -> None:
        self.pid = pid


def _storage_header(data: bytes) -> tuple[int, int]:
    """(element count, element size) of the one storage in legacy `torch.save` bytes: magic number, protocol,
    system info, the storage's persistent id, its key list, then int64 count and count * size bytes."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    f = _BoundedFile(io.BytesIO(data), len(data))
    try:
        magic, protocol, info, main, keys = (_StorageUnpickler(f).load() for _ in range(5))
        count = struct.unpack("<q", f.read(8))[0]
    except _Truncated:
        raise _Refused("holds a tensor storage whose torch.save bytes end too early; the file is damaged") from None
    except _Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged header fails in many ways; all mean "not a storage"
        raise _Refused(f"holds a tensor storage whose torch.save header is damaged ({type(exc).__name__})") from None
    if (type(magic) is not int or magic != MAGIC_NUMBER or type(protocol) is not int or protocol != PROTOCOL_VERSION
            or not isinstance(info, dict) or info.get("little_endian") is not True):
        raise _Refused("holds a tensor storage that is not in torch.save's little-endian legacy format")
    pid = main.pid if isinstance(main, _StorageId) else None
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str) and isinstance(pid[3], str) and _plain_int(pid[4]) and pid[4] >= 0
            and pid[5] is None and keys == [pid[2]]):
        raise _Refused("holds a tensor storage that is not one plain storage in torch.save's legacy format")
    numel, elsize = pid[4], pid[1].elsize
    have = len(data) - f.pos
    if count != numel or numel * elsize != have:
        raise _Refused(f"holds a tensor storage that declares {numel:,} elements of {elsize} bytes but has "
                       f"{have:,} bytes of data; the file is damaged or forged")
    return numel, elsize


# ---------------------------------------------------------------------------------------------------------------
# The unpickler


class _Truncated(_Refused):
    def __init__(self) -> None:
        super().__init__("is truncated or damaged: its data runs past the end of the file; copy or download it "
                         "again")


class _BoundedFile:
    """The file as the unpickler sees it: a read that asks for more bytes than remain is refused before it
    happens, so a forged length never allocates more than the file holds."""

    def __init__(self, f: Any, size: int) -> None:
        self._f, self._size, self.pos = f, size, 0

    def read(self, n: int = -1) -> bytes:
        remaining = self._size - self.pos
        if n is None or n < 0:
            n = remaining
        if n > remaining:
            raise _Truncated()
        data = self._f.read(n)
        self.pos += len(data)
        if len(data) != n:
            raise _Truncated()
        return data

    def readline(self) -> bytes:
        line = self._f.readline()
        self.pos += len(line)
        if not line.endswith(b"\n"):
            raise _Truncated()
        return line


class _Dispatch(dict):
    def __missing__(self, key: int) -> Callable[[Any], None]:
        raise pickle.UnpicklingError(f"unknown pickle opcode 0x{key:02x}")


def _refusal(opcode: bytes) -> Callable[[Any], None]:
    name = pickletools.code2op[opcode.decode("latin1")].name

    def refuse(self: Any) -> None:
        raise _Refused(f"uses the pickle opcode {name}, which no EDM network pickle has")

    return refuse


def _load_newobj(self: Any) -> None:
    """NEWOBJ (cls.__new__(cls, *args)) only for the containers torch and EasyDict pickle that way."""
    args = self.stack.pop()
    cls = self.stack.pop()
    if not (isinstance(cls, type) and issubclass(cls, _NEW_ALLOWED)):
        raise _Refused(f"creates an object of {_describe(cls)} by NEWOBJ, which no EDM network pickle does")
    self.append(cls.__new__(cls, *args))


def _load_build(self: Any) -> None:
    """BUILD (set an object's state) only on the stand-ins that take one: torch containers, numpy dtypes."""
    state = self.stack.pop()
    inst = self.stack[-1]
    if not isinstance(inst, _Buildable):
        raise _Refused(f"sets the state of {_describe(inst)}, which no EDM network pickle does")
    inst.__setstate__(state)


class _Restricted(pickle._Unpickler):
    """Python's own unpickler (it reads each declared length before allocating it, unlike the C one) without the
    opcodes EDM never writes: no instances by INST/OBJ/NEWOBJ_EX, no extension registry, no out-of-band or
    bytearray buffers (BYTEARRAY8 allocates before it reads); NEWOBJ and BUILD only on stand-ins."""

    dispatch = _Dispatch(pickle._Unpickler.dispatch)
    for _code in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4, pickle.BYTEARRAY8,
                  pickle.NEXT_BUFFER, pickle.READONLY_BUFFER, pickle.NEWOBJ_EX):
        dispatch[_code[0]] = _refusal(_code)
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.BUILD[0]] = _load_build
    del _code

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("uses a persistent id, which no EDM network pickle has (is it a torch.save file?)")


def _allowed(table: dict[tuple[str, str], Any], module: str, name: str) -> Any:
    try:
        return table[(module, name)]
    except (KeyError, TypeError):
        raise _Refused(f"asks for {_printable(module)}.{_printable(name)}, which is not part of an EDM network pickle "
                       "and could run code (nothing was run)") from None


_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy 1 (EDM's environment)
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    **{("torch.nn.modules.container", name): cls for name, cls in _CONTAINER_TYPES.items()},
}
for _builtins in ("builtins", "__builtin__"):  # protocols 0 to 2 name builtins the Python 2 way
    _GLOBALS.update({(_builtins, "set"): set, (_builtins, "frozenset"): frozenset, (_builtins, "bytes"): _empty_bytes,
                     (_builtins, "object"): _OBJECT, (_builtins, "dict"): _DICT})
for _copyreg in ("copyreg", "copy_reg"):
    _GLOBALS[(_copyreg, "_reconstructor")] = _reconstructor
del _builtins, _copyreg


class _NetworkUnpickler(_Restricted):
    """The unpickler of an EDM network pickle: the globals in `_GLOBALS`, each a stand-in that builds data."""

    def find_class(self, module: str, name: str) -> Any:
        return _allowed(_GLOBALS, module, name)


class _StorageUnpickler(_Restricted):
    """The unpickler of a storage's legacy torch.save header: storage types and one storage id, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(name, _STORAGE_TYPES[name])
        return _allowed({}, module, name)

    def persistent_load(self, pid: Any) -> Any:
        return _StorageId(pid)


# ---------------------------------------------------------------------------------------------------------------
# From what was unpickled to records


class _ToData:
    """Turns the unpickled objects into plain data and `PersistentObject`s: bounded depth, no cycles, shared
    objects converted once."""

    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}
        self.active: set[int] = set()
        self.module_sources: dict[str, str] = {}

    def convert(self, obj: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise _Refused(f"nests data more than {MAX_DEPTH} levels deep, which no EDM network pickle does")
        if obj is None or type(obj) in (str, bytes, int, float, bool, complex) or isinstance(obj, torch.Tensor):
            return obj
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        if key in self.active:
            raise _Refused("holds data that contains itself, which no EDM network pickle does")
        self.active.add(key)
        try:
            result = self._convert(obj, depth)
        finally:
            self.active.discard(key)
        self.memo[key] = result
        return result

    def _convert(self, obj: Any, depth: int) -> Any:
        if isinstance(obj, dict):  # dict, OrderedDict, EasyDict
            out = {}
            for k, v in obj.items():
                k = self.convert(k, depth + 1)
                try:
                    hash(k)
                except TypeError:
                    raise _Refused(f"has a dict key that is {_describe(k)}") from None
                out[k] = self.convert(v, depth + 1)
            return out
        if type(obj) in (list, tuple, set, frozenset):
            return type(obj)(self.convert(v, depth + 1) for v in obj)
        if isinstance(obj, _RawRecord):
            return self._record(obj.meta, depth)
        if isinstance(obj, _Container):
            if obj.state is None:
                raise _Refused(f"holds a {obj.class_name} without its state")
            state = self._state(obj.class_name, obj.state, depth)
            return PersistentObject(obj.class_name, None, (), {}, state)
        if isinstance(obj, _NumpyDtype):
            return obj.name
        raise _Refused(f"holds {_describe(obj)} where an EDM network pickle holds data")

    def _record(self, meta: Any, depth: int) -> PersistentObject:
        """A persistence record: meta = {type, version, module_src, class_name, state} (NVlabs/edm
        torch_utils/persistence.py, persistent_class.__reduce__)."""
        if type(meta) is not dict:
            raise _Refused(f"holds a persistence record whose meta is {_describe(meta)}, not a dict")
        missing = [k for k in ("type", "version", "module_src", "class_name", "state") if k not in meta]
        if missing:
            raise _Refused(f"holds a persistence record without {', '.join(missing)}")
        name = meta["class_name"]
        if type(name) is not str:
            raise _Refused(f"holds a persistence record whose class_name is {_describe(name)}, not text")
        if not name.isidentifier():
            raise _Refused(f"holds a persistence record whose class_name {_printable(name)!r} is no class name")
        kind, version, src = meta["type"], meta["version"], meta["module_src"]
        if type(kind) is not str or kind != "class":
            shown = repr(_printable(kind)) if type(kind) is str else _describe(kind)
            raise _Refused(f"holds a persistence record of {name} of type {shown}; EDM's torch_utils.persistence "
                           "writes 'class'")
        if not _plain_int(version) or version != PERSISTENCE_VERSION:
            shown = str(version) if _plain_int(version) else _describe(version)
            raise _Refused(f"holds a persistence record of {name} of version {_printable(shown)}; EDM's "
                           f"torch_utils.persistence writes version {PERSISTENCE_VERSION}")
        if type(src) is not str:
            raise _Refused(f"holds a persistence record of {name} whose module_src is {_describe(src)}, not text")
        sha = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()
        if self.module_sources.setdefault(name, sha) != sha:
            raise _Refused(f"holds two persistence records of {name} with different module sources")
        raw_state = meta["state"]
        state = self._state(name, {} if raw_state is None else raw_state, depth)
        args, kwargs = state.pop("_init_args", None), state.pop("_init_kwargs", None)
        if not (args is None or type(args) in (tuple, list)) or not (kwargs is None or type(kwargs) is dict):
            raise _Refused(f"holds a persistence record of {name} whose init args are no tuple and dict")
        if kwargs is not None and not all(type(k) is str for k in kwargs):
            raise _Refused(f"holds a persistence record of {name} whose init kwargs have non-text names")
        return PersistentObject(name, sha, tuple(args or ()), dict(kwargs or {}), state)

    def _state(self, name: str, raw: Any, depth: int) -> dict[str, Any]:
        """An object's __dict__ as data, checked where module_tensors and child read it."""
        if not isinstance(raw, dict):
            raise _Refused(f"gives {name} {_describe(raw)} as its state, not a dict")
        state = dict(self.convert(raw, depth + 1))
        if not all(type(k) is str for k in state):
            raise _Refused(f"gives {name} a state with non-text names")
        for key, kind, what in (("_parameters", torch.Tensor, "a tensor"), ("_buffers", torch.Tensor, "a tensor"),
                                ("_modules", PersistentObject, "a module")):
            entries = state.get(key)
            if entries is None:
                continue
            if not isinstance(entries, dict):
                raise _Refused(f"gives {name} {_describe(entries)} as {key}, not a dict")
            for k, v in entries.items():
                if type(k) is not str or not (v is None or isinstance(v, kind)):
                    shown = _printable(k) if type(k) is str else _describe(k)
                    raise _Refused(f"gives {name}.{key}[{shown}] {_describe(v)}, not {what}")
        transient = state.get("_non_persistent_buffers_set")
        if transient is not None and not (type(transient) in (set, frozenset)
                                          and all(type(k) is str for k in transient)):
            raise _Refused(f"gives {name} {_describe(transient)} as _non_persistent_buffers_set, not a set of names")
        return state


# ---------------------------------------------------------------------------------------------------------------
# The reader


_DICT_PICKLE_STARTS = (pickle.PROTO, pickle.EMPTY_DICT, pickle.MARK)  # protocols 2 to 5, 1, 0


def read_edm_pickle(path: str | Path) -> EdmPickle:
    """Read an EDM network pickle as data (nothing in it is imported or run); every defect is one RunError line
    naming the file and the fix."""
    from torch.serialization import MAGIC_NUMBER

    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        if not path.exists():
            raise RunError(path_not_found(name, path, FIX))
        raise RunError(f"{name} is not a file; {FIX}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            if not head:
                raise _Refused("is empty")
            if head == b"PK\x03\x04":
                raise _Refused("is a torch checkpoint (a torch.save zip archive, like EDM's training-state-*.pt), "
                               "not a network pickle")
            if head[:1] not in _DICT_PICKLE_STARTS:
                raise _Refused(f"is not a pickle of a dict (it starts with the bytes {head.hex()})")
            f.seek(0)
            bounded = _BoundedFile(f, size)
            raw = _NetworkUnpickler(bounded).load()
            trailing = size - bounded.pos
        if type(raw) is int and raw == MAGIC_NUMBER:
            raise _Refused("is a torch checkpoint in torch.save's legacy format, not a network pickle")
        if trailing:
            raise _Refused(f"has {trailing:,} bytes after the end of its pickle; the file is damaged")
        if type(raw) is not dict:
            raise _Refused(f"holds {_describe(raw)}, not EDM's dict of 'ema', 'loss_fn', 'augment_pipe' and "
                           "'dataset_kwargs'")
        if "ema" not in raw:
            keys = ", ".join(_printable(k, 40) if type(k) is str else _describe(k) for k in list(raw)[:10])
            raise _Refused(f"has no 'ema' entry (it has: {keys or 'nothing'})")
        if not all(type(k) is str for k in raw):
            raise _Refused("has a top-level key that is not text")
        to_data = _ToData()
        data = to_data.convert(raw, 0)
        ema = data.pop("ema")
        if not isinstance(ema, PersistentObject) or ema.module_sha256 is None:
            raise _Refused(f"holds {_describe(ema)} as 'ema', not a network saved by EDM's torch_utils.persistence")
        sha256 = file_digest(path)
    except _Refused as exc:
        raise RunError(f"{name} {exc}; {FIX}") from None
    except OSError as exc:
        raise RunError(f"{name} cannot be read ({exc.strerror or type(exc).__name__}); {FIX}") from None
    except RecursionError:
        raise RunError(f"{name} nests data too deeply to read; {FIX}") from None
    except MemoryError:
        raise RunError(f"{name} does not fit in memory; {FIX}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in many ways; each is one line here
        detail = str(exc).strip().splitlines()
        raise RunError(f"{name} is not a readable pickle ({type(exc).__name__}: "
                       f"{_printable(detail[0] if detail else 'no detail')}); {FIX}") from None
    return EdmPickle(path=path, sha256=sha256, ema=ema, extra=data,
                     module_sources=dict(to_data.module_sources))
