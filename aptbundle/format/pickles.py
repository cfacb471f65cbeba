"""The scan engine: CPython's own unpickler, with globals that cannot do anything.

A pickle is checked by loading it with ``pickle.Unpickler`` (the C implementation that
``pickle.load`` and ``torch.load(weights_only=False)`` use), subclassed so that it cannot do
harm: ``find_class`` refuses every global outside the allow-list and returns, for the allowed
ones, an inert stand-in class; ``persistent_load`` returns a stand-in that records the storage
it names. Calling, instantiating (``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``, ``INST``, ``OBJ``),
building (``BUILD``) or filling (``SETITEMS``, ``APPENDS``, ``ADDITEMS``) a stand-in only records
what it was given, and the checks look at that record. So what is checked is, by construction,
what a real load does: the same interpreter walks the same bytes opcode by opcode, marks, memo,
frames, extension codes and all, and every global a real load would import goes through
``find_class`` first. There is no model of the pickle machine here that could disagree with it.

The bytes are fed as a loader feeds them (``Source``): a buffered file with ``read``,
``readinto``, ``readline`` and ``peek``, as the unpickler reads any file (``torch.load`` hands it
the file itself for a legacy file, and a buffer of the record for a zip's ``data.pkl``: the same
bytes in the same order, so the same opcodes). Every read is checked against the bytes left
before it is made, so no declared length allocates more than the pickle holds, and memory stays
bounded by the pickle's own size. Whatever the engine cannot read exactly as a loader would
is refused, never guessed. The same engine reads framework pickles for the layouts
(``read_pickle``), with every global inert and nothing refused, since they only look at values.
Nothing here imports torch.
"""

from __future__ import annotations

import pickle
import re
from typing import Any, Callable

from aptbundle.ground.errors import UnsafeContentError

MAX_PICKLE_BYTES = 1 << 30
MAX_BYTEARRAY = 1 << 20  # bytearray(N) allocates N bytes: a pickle of 32 bytes could ask for GBs
MAX_VISITS = 1_000_000  # objects looked at for machine paths

_DTYPES = ("bfloat16 bits16 bits1x8 bits2x4 bits4x2 bits8 bool complex128 complex32 complex64 "
           "float16 float32 float4_e2m1fn_x2 float64 float8_e4m3fn float8_e4m3fnuz float8_e5m2 "
           "float8_e5m2fnuz float8_e8m0fnu int1 int16 int2 int3 int32 int4 int5 int6 int64 int7 "
           "int8 uint1 uint16 uint2 uint3 uint32 uint4 uint5 uint6 uint64 uint7 uint8 qint32 qint8 "
           "quint2x4 quint4x2 quint8 per_channel_affine per_channel_affine_float_qparams "
           "per_channel_symmetric per_tensor_affine per_tensor_symmetric").split()
_ALLOWED = {
    "_codecs.encode", "builtins.bytearray", "builtins.complex", "builtins.set",
    "collections.Counter", "collections.OrderedDict", "torch.Size", "torch.Tensor", "torch.device",
    "torch.nn.parameter.Parameter", "torch.serialization._get_layout",
    "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
    "torch._tensor._rebuild_from_type_v2",
    *(f"torch._utils._rebuild_{n}" for n in (
        "device_tensor_from_cpu_tensor", "device_tensor_from_numpy", "meta_tensor_no_storage",
        "nested_tensor", "parameter", "parameter_with_state", "qtensor", "sparse_tensor",
        "tensor", "tensor_v2", "tensor_v3", "wrapper_subclass")),
    *(f"torch.{d}" for d in _DTYPES),
}
_STORAGE = re.compile(
    r"^torch\.(cuda\.)?(BFloat16|Bool|Byte|Char|ComplexDouble|ComplexFloat|Double|Float|Half|Int|"
    r"Long|Short|QInt32|QInt8|QUInt2x4|QUInt4x2|QUInt8)Storage$|"
    r"^torch\.(cuda\.)?(sparse\.)?(BFloat16|Bool|Byte|Char|Double|Float|Half|Int|Long|Short)Tensor$"
)
# torch.distributed.checkpoint's `.metadata` pickle: plain dataclasses and enums describing shards
_DCP_ALLOWED = {
    *(f"torch.distributed.checkpoint.metadata.{n}" for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    "torch.distributed.checkpoint.filesystem._StorageInfo", "torch.strided", "torch.sparse_coo",
    "torch.contiguous_format", "torch.channels_last", "torch.preserve_format",
}
# plain paths, as DCP's .metadata and Lightning's hyper-parameters record them: built from strings
_PATHS = {f"pathlib{m}.{c}" for m in ("", "._local") for c in ("Path", "PosixPath", "WindowsPath", "PurePath",
                                                              "PurePosixPath", "PureWindowsPath")}
_REBUILD_TENSOR = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
                   "torch._utils._rebuild_tensor_v3"}
_NUMPY_DTYPE = {"numpy.dtype"}
_NUMPY_ARRAY = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"}
_PLAIN_DTYPE = re.compile(r"[<>|=]?([biufc]\d{1,2}|bool|u?int(8|16|32|64)|float(16|32|64)|complex(64|128))")
# bytes per element of torch's storage classes, for the storages a torch.save pickle declares
_STORAGE_BYTES = {"Float": 4, "Double": 8, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
                  "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "QInt8": 1,
                  "QUInt8": 1, "QInt32": 4, "QUInt4x2": 1, "QUInt2x4": 1, "Untyped": 1}

MACHINE_PATH = re.compile(r"^(/(home|Users|root|tmp|mnt|data|scratch|work|workspace|srv|opt|var|media|nfs|lustre|"
                          r"gpfs|fsx|content|kaggle|private)/|[A-Za-z]:[\\/][^\\/]+[\\/])")


def global_allowed(name: str, dcp: bool = False, extra: frozenset[str] = frozenset()) -> bool:
    """True for a global that ``torch.load(weights_only=True)`` may use (and, for DCP metadata,
    its plain metadata classes; ``extra``: what the file's trust policy adds)."""
    return name in _ALLOWED or bool(_STORAGE.match(name)) or (dcp and name in _DCP_ALLOWED) or name in _PATHS \
        or name in extra


class MalformedPickle(UnsafeContentError):
    """Bytes that CPython's unpickler cannot load (every global before the fault was checked)."""


class Source:
    """A pickle's bytes as a loader reads them: ``read``, ``readinto``, ``readline`` and ``peek``
    of a ``Stream``, at most ``limit`` bytes, every read checked against what is left before it
    is made."""

    def __init__(self, stream, limit: int, shown: str):
        self.stream, self.limit, self.shown, self.taken = stream, limit, shown, 0

    def _left(self, n: int) -> None:
        left = min(self.limit, self.stream.size - self.stream.tell() + self.taken) - self.taken
        if n > left:
            raise MalformedPickle(f"{self.shown}: the pickle declares {n} bytes where {max(left, 0)} are left;"
                                  " the file is damaged or crafted. Do not load it")

    def read(self, n: int = -1) -> bytes:
        n = self.limit - self.taken if n is None or n < 0 else n
        self._left(n)
        b = self.stream.read(n)
        self.taken += len(b)
        return b

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        b = self.read(len(view))
        view[:len(b)] = b
        return len(b)

    def readline(self) -> bytes:
        b = self.stream.readline()
        self._left(len(b))
        self.taken += len(b)
        return b

    def peek(self, n: int = 1) -> bytes:
        """Up to ``n`` next bytes, not consumed: the unpickler reads ahead with it in large
        stretches, as it does from any buffered file (what ``torch.load`` hands it for a legacy
        file), instead of one call per opcode."""
        left = min(self.limit, self.stream.size - self.stream.tell() + self.taken) - self.taken
        return self.stream.peek(max(0, min(n, left)))


class Storage:
    """A storage a torch.save pickle names by persistent id: its key, class and element count.
    Fixed once made (a ``BUILD`` on it fails, as it cannot change what the checks rely on)."""

    __slots__ = ("key", "cls", "numel")

    def __init__(self, key: str, cls: str, numel: int):
        for k, v in (("key", key), ("cls", cls), ("numel", numel)):
            object.__setattr__(self, k, v)

    def __setattr__(self, name, value):
        raise AttributeError("a storage record is fixed")

    @property
    def nbytes(self) -> int | None:
        name = self.cls.rsplit(".", 1)[-1]
        per = _STORAGE_BYTES.get(name[:-len("Storage")]) if name.endswith("Storage") else None
        return None if per is None or self.numel < 0 else per * self.numel


class _SetState:
    """``__setstate__`` of a stand-in: on an instance, records the state (``BUILD``); on the class
    itself, refuses, since a real load would set attributes on a class for the whole process."""

    def __get__(self, obj, owner):
        if obj is None:
            def on_class(_state):
                raise UnsafeContentError(f"{owner._shown}: pickle sets attributes on the class {owner._global!r},"
                                         " which would change it for the whole process; expected only data."
                                         " Do not load this file")
            return on_class
        return obj._build


class Inert:
    """What a global becomes: a class that records what it is built with and does nothing else."""

    _global = ""
    _shown = ""
    _check: Callable[["Inert"], None] = staticmethod(lambda obj: None)
    __setstate__ = _SetState()

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.values = args, kwargs, None, {}, []
        cls._check(obj)
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def _build(self, state) -> None:
        self.state = state
        type(self)._check(self)

    def __setitem__(self, key, value) -> None:
        self.items[key] = value

    def append(self, value) -> None:
        self.values.append(value)

    def extend(self, values) -> None:
        self.values.extend(values)

    def add(self, value) -> None:
        self.values.append(value)

    def fields(self) -> dict:
        """What the object holds, as a plain dict: its state (or the dict part of a
        ``(state, slots)`` pair), then its items."""
        state = self.state[0] if isinstance(self.state, tuple) and len(self.state) == 2 else self.state
        out = dict(state) if isinstance(state, dict) else {}
        if isinstance(self.state, tuple) and len(self.state) == 2 and isinstance(self.state[1], dict):
            out.update(self.state[1])
        out.update(self.items)
        return out

    def __reduce__(self):
        raise TypeError("an inert stand-in is never pickled")


class _Unpickler(pickle.Unpickler):
    def __init__(self, source: Source, resolve: Callable[[str, str], type], persistent: Callable[[Any], Any]):
        super().__init__(source)
        self._resolve, self._persistent = resolve, persistent

    def find_class(self, module, name):
        return self._resolve(module, name)

    def persistent_load(self, pid):
        return self._persistent(pid)


def load(source: Source, shown: str, resolve: Callable[[str, str], type],
         persistent: Callable[[Any], Any] | None = None) -> Any:
    """Load one pickle from ``source`` with CPython's unpickler; ``UnsafeContentError`` as the
    hooks raise it, ``MalformedPickle`` for anything else the unpickler refuses."""
    up = _Unpickler(source, resolve, persistent or (lambda pid: pid))
    try:
        return up.load()
    except UnsafeContentError:
        raise
    except RecursionError:
        raise MalformedPickle(f"{shown}: nests deeper than a pickle can be checked; the file is damaged or"
                              " crafted. Do not load it") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, TypeError, MemoryError...
        raise MalformedPickle(f"{shown}: not a readable pickle ({type(e).__name__}: {str(e)[:120]}); the file is"
                              " damaged or not a checkpoint") from None


class Scan:
    """One file's scan: the policy (which globals, DCP's classes, the trust policy's extras), the
    storages its pickles declare, the globals they name and the machine paths they record."""

    def __init__(self, shown: str, *, dcp: bool = False, extra: frozenset[str] = frozenset(),
                 paths: list[str] | None = None):
        self.shown, self.dcp, self.extra = shown, dcp, extra
        self.paths = paths
        self.names: list[str] = []
        self.storages: dict[str, int] = {}  # storage key -> bytes, as the pickles declare them
        self._classes: dict[str, type] = {}

    def resolve(self, module, name) -> type:
        if not (isinstance(module, str) and isinstance(name, str)):
            raise UnsafeContentError(f"{self.shown}: pickle names a global that is not a pair of strings;"
                                     " expected a plain torch.save file. Do not load it")
        full = f"{module}.{name}"
        if not global_allowed(full, self.dcp, self.extra):
            raise UnsafeContentError(f"{self.shown}: pickle references global {full[:200]!r}, which could run code"
                                     " when loaded; expected only tensors and plain data. Do not load this file")
        self.names.append(full)
        return self._stand_in(full)

    def inert(self, module, name) -> type:
        """``find_class`` for reading values only: every global a stand-in, none refused."""
        return self._stand_in(f"{module}.{name}")

    def _stand_in(self, full: str) -> type:
        cls = self._classes.get(full)
        if cls is None:
            cls = type(full.rsplit(".", 1)[-1], (Inert,), {"_global": full, "_shown": self.shown,
                                                           "_check": staticmethod(self._checker(full))})
            self._classes[full] = cls
        return cls

    def persistent(self, pid):
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str) \
                and isinstance(pid[1], type) and issubclass(pid[1], Inert) and type(pid[4]) is int:
            st = Storage(pid[2], pid[1]._global, pid[4])
            if st.nbytes is not None:
                self.storages[st.key] = st.nbytes
            return st
        return pid  # what torch would reject on load: nothing to build

    def _checker(self, full: str) -> Callable[[Inert], None]:
        shown = self.shown
        if full in _PATHS:
            def check(obj: Inert) -> None:
                if obj.kwargs or obj.state is not None or not all(type(a) is str for a in obj.args):
                    raise UnsafeContentError(f"{shown}: pickle builds a path from something other than strings;"
                                             " expected a plain path. Do not load this file")
                joined = "/".join(obj.args).replace("//", "/")  # PosixPath('/', 'home', ...)
                self._path(joined)
            return check
        if full == "builtins.bytearray":
            def check(obj: Inert) -> None:
                if any(type(a) is int and a > MAX_BYTEARRAY for a in obj.args):
                    raise UnsafeContentError(f"{shown}: pickle asks for a bytearray of {obj.args[0]} bytes;"
                                             " expected data, not an allocation. Do not load this file")
            return check
        if full in _REBUILD_TENSOR:
            return lambda obj: _check_view(obj.args, shown)
        if full == "datetime.timedelta":
            def check(obj: Inert) -> None:
                if obj.kwargs or obj.state is not None or len(obj.args) > 3 or not all(
                        type(a) in (int, float) and abs(a) < 1e12 for a in obj.args):
                    raise UnsafeContentError(f"{shown}: pickle builds a timedelta from something other than a few"
                                             " numbers; expected Composer's timestamps. Do not load this file")
            return check
        if full == "torch.torch_version.TorchVersion":
            def check(obj: Inert) -> None:
                if obj.kwargs or obj.state is not None or len(obj.args) != 1 or type(obj.args[0]) is not str:
                    raise UnsafeContentError(f"{shown}: pickle builds a TorchVersion from something other than one"
                                             " string. Do not load this file")
            return check
        if full in _NUMPY_DTYPE:
            def check(obj: Inert) -> None:
                plain = isinstance(obj.args[0], str) and _PLAIN_DTYPE.fullmatch(obj.args[0]) if obj.args else True
                # numpy's dtype state: (version, byte order, subarray, names, fields, ...): none of them
                st = obj.state
                if not plain or (st is not None and not (isinstance(st, tuple) and len(st) >= 5
                                                         and st[2] is None and st[3] is None and st[4] is None)):
                    raise UnsafeContentError(f"{shown}: pickle builds a numpy dtype that is not a plain numeric one"
                                             " (an object or structured array unpickles what it holds when loaded);"
                                             " expected an RNG state. Do not load this file")
            return check
        if full in _NUMPY_ARRAY:
            def check(obj: Inert) -> None:
                st = obj.state  # (version, shape, dtype, fortran, raw bytes): an object array holds a list
                if st is not None and not (isinstance(st, tuple) and len(st) == 5
                                           and isinstance(st[4], (bytes, Inert))):
                    raise UnsafeContentError(f"{shown}: pickle builds a numpy array from something other than raw"
                                             " bytes (an object array); expected an RNG state. Do not load this file")
            return check
        return lambda obj: None

    def _path(self, s: str) -> None:
        if self.paths is not None and len(self.paths) < 8 and MACHINE_PATH.match(s) and s not in self.paths:
            self.paths.append(s)

    def collect_paths(self, root: Any) -> None:
        """Append the strings in what a pickle built that look like absolute machine paths."""
        if self.paths is None:
            return
        todo, seen, visits = [root], set(), 0
        while todo and visits < MAX_VISITS and len(self.paths) < 8:
            v = todo.pop()
            visits += 1
            if isinstance(v, str):
                self._path(v)
            elif id(v) in seen:
                continue
            elif isinstance(v, dict):
                seen.add(id(v))
                todo.extend(v.keys())
                todo.extend(v.values())
            elif isinstance(v, (list, tuple, set, frozenset)):
                seen.add(id(v))
                todo.extend(v)
            elif isinstance(v, Inert):
                seen.add(id(v))
                todo.extend((v.args, v.kwargs, v.state, v.items, v.values))

    def load(self, source: Source) -> Any:
        """Load one pickle of this file from ``source``; what it built (stand-ins and plain data)."""
        built = load(source, self.shown, self.resolve, self.persistent)
        self.collect_paths(built)
        return built


def _check_view(args: tuple, shown: str) -> None:
    """A tensor view must lie inside the storage it names, and not repeat it through stride 0."""
    if len(args) < 4 or not isinstance(args[0], Storage):
        return
    offset, size, stride = args[1], args[2], args[3]
    if not (type(offset) is int and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(type(d) is int and d >= 0 for d in size + stride) and len(size) == len(stride)):
        return
    if any(d == 0 for d in size):
        return
    last = offset + sum((d - 1) * st for d, st in zip(size, stride))  # the furthest element it reads
    numel = 1
    for d in size:
        numel *= d
    backed = args[0].numel
    if last >= backed or (0 in stride and numel > backed):
        raise UnsafeContentError(
            f"{shown}: a tensor of shape {list(size)[:8]} (strides {list(stride)[:8]}) reaches past its storage"
            f" of {backed} elements, or repeats them {numel} times over; a checkpoint never holds one. Do not"
            " load this file")


def scan_pickle(stream, shown: str, dcp: bool = False, storages: dict[str, int] | None = None,
                extra: frozenset[str] = frozenset(), paths: list[str] | None = None,
                limit: int = MAX_PICKLE_BYTES) -> list[str]:
    """Check one pickle read from ``stream`` (at most ``limit`` bytes) as CPython loads it.

    Returns the globals it names. Raises ``UnsafeContentError`` for a global outside the
    allow-list, a class changed by ``BUILD``, an allocation the data does not back (a huge
    bytearray, a tensor view past its storage), a path built from something other than strings,
    or a pickle the unpickler refuses. The stream is left where the unpickler stopped reading.
    With ``storages``, the storages a ``torch.save`` pickle declares are recorded there as key ->
    bytes; ``extra`` are globals the file's trust policy adds; strings that look like absolute
    machine paths are appended to ``paths``.
    """
    scan = Scan(shown, dcp=dcp, extra=extra, paths=paths)
    scan.load(Source(stream, limit, shown))
    if storages is not None:
        storages.update(scan.storages)
    return scan.names


def read_pickle(stream, shown: str, limit: int = MAX_PICKLE_BYTES,
                persistent: Callable[[Any], Any] | None = None) -> Any:
    """What a framework's pickle holds, for reading values out of it (``layouts``): every global
    is an inert stand-in (nothing refused, nothing run), storages are ``Storage`` records."""
    scan = Scan(shown)
    return load(Source(stream, limit, shown), shown, scan.inert, persistent or scan.persistent)
