"""Pickles read without being run: the allow-list of globals and the opcode walk.

A pickle is walked opcode by opcode with ``pickletools`` and never executed: every global it
names must be on the allow-list of what ``torch.load(weights_only=True)`` needs to rebuild
tensors and plain containers (plus, for a DCP ``.metadata`` file, the plain metadata classes of
``torch.distributed.checkpoint``). Opcodes that build arbitrary objects are refused. Nothing
here imports torch.
"""

from __future__ import annotations

import pickletools
import re

from aptbundle.ground.errors import UnsafeContentError

MAX_PICKLE_BYTES = 1 << 30

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
_CODE_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4"}
_STR_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
            "SHORT_BINSTRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def global_allowed(name: str, dcp: bool = False, extra: frozenset[str] = frozenset()) -> bool:
    """True for a global that ``torch.load(weights_only=True)`` may use (and, for DCP metadata,
    its plain metadata classes; ``extra``: what the file's trust policy adds)."""
    return name in _ALLOWED or bool(_STORAGE.match(name)) or (dcp and name in _DCP_ALLOWED) or name in _PATHS \
        or name in extra


class MalformedPickle(UnsafeContentError):
    """Bytes that do not parse as a pickle (every opcode before the fault was checked)."""


class _Global(str):
    """A global named by the pickle (told apart from a plain string on the modelled stack)."""


_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}
# bytes per element of torch's storage classes, for the storages a torch.save pickle declares
_STORAGE_BYTES = {"Float": 4, "Double": 8, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
                  "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "QInt8": 1,
                  "QUInt8": 1, "QInt32": 4, "QUInt4x2": 1, "QUInt2x4": 1, "Untyped": 1}


def _storage_bytes(cls: str, numel: int) -> int | None:
    """Bytes of a declared storage, or None for a class whose element size is not known here."""
    name = cls.rsplit(".", 1)[-1]
    if not name.endswith("Storage"):
        return None
    per = _STORAGE_BYTES.get(name[:-len("Storage")])
    return None if per is None or numel < 0 else per * numel


class _Storage:
    """A storage a torch.save pickle refers to by persistent id: its key and its element count."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


_REBUILD_TENSOR = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
                   "torch._utils._rebuild_tensor_v3"}
MAX_BYTEARRAY = 1 << 20  # bytearray(N) allocates N bytes: a pickle of 32 bytes could ask for GBs


def _check_reduce(fn: object, args: object, shown: str, pos: int) -> None:
    """What a permitted callable is asked to build must be backed by bytes that exist."""
    if not isinstance(fn, _Global) or not isinstance(args, tuple):
        return
    if fn in _PATHS and not all(type(a) is str for a in args):
        raise UnsafeContentError(f"{shown}: pickle builds a path from something other than strings at byte {pos};"
                                 " expected a plain path. Do not load this file")
    if fn == "builtins.bytearray" and any(type(a) is int and a > MAX_BYTEARRAY for a in args):
        raise UnsafeContentError(f"{shown}: pickle asks for a bytearray of {args[0]} bytes at byte {pos};"
                                 " expected data, not an allocation. Do not load this file")
    if fn in _REBUILD_TENSOR and len(args) >= 4 and isinstance(args[0], _Storage):
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
                f"{shown}: a tensor of shape {list(size)} (strides {list(stride)}) at byte {pos} reaches past"
                f" its storage of {backed} elements, or repeats them {numel} times over; a checkpoint never"
                " holds one. Do not load this file")


MACHINE_PATH = re.compile(r"^(/(home|Users|root|tmp|mnt|data|scratch|work|workspace|srv|opt|var|media|nfs|lustre|"
                          r"gpfs|fsx|content|kaggle|private)/|[A-Za-z]:[\\/][^\\/]+[\\/])")


def scan_pickle(stream, shown: str, dcp: bool = False, storages: dict[str, int] | None = None,
                extra: frozenset[str] = frozenset(), paths: list[str] | None = None) -> list[str]:
    """Walk one pickle of ``stream`` up to its STOP opcode without executing it.

    Returns the globals it names. Raises ``UnsafeContentError`` for a global outside the
    allow-list, an opcode that builds arbitrary objects, BUILD on a class (it would change the
    class for the whole process), an allocation the data does not back (a huge bytearray, a
    tensor view past its storage), or a pickle that cannot be parsed. The pickle's stack is
    modelled, so every value a check looks at is the one the opcode would really get.
    ``stream`` needs ``read`` and ``readline``; it is left just after the STOP opcode. With
    ``storages``, the storages a ``torch.save`` pickle declares (``('storage', class, key,
    location, numel)``) are recorded there as key -> bytes. ``extra`` are globals the file's
    trust policy adds (``trust``); strings that look like absolute paths of a machine (a home
    folder, a drive letter) are appended to ``paths``.
    """
    names: list[str] = []
    memo: dict[int, object] = {}
    stack: list[object] = []
    marks: list[int] = []
    declared: dict[str, int] = {} if storages is None else storages
    try:
        for op, arg, pos in pickletools.genops(stream):
            n = op.name
            if n in _CODE_OPS:
                raise UnsafeContentError(
                    f"{shown}: pickle opcode {n} at byte {pos} builds arbitrary objects;"
                    " expected only tensors and plain data. Do not load this file; get it from a trusted source"
                )
            if n == "MARK":
                marks.append(len(stack))
                continue
            if n in _PUT_OPS or n == "MEMOIZE":
                memo[arg if n != "MEMOIZE" else len(memo)] = stack[-1] if stack else None
                continue
            before = op.stack_before
            sliced: list = []
            if pickletools.markobject in before:
                if not marks:
                    raise ValueError("a mark is missing")
                at = marks.pop()
                sliced, stack[at:] = stack[at:], []
                k = before.index(pickletools.markobject)
            else:
                k = len(before)
            if len(stack) < k:
                raise ValueError(f"stack underflow at {n}")
            consumed, stack[len(stack) - k:] = stack[len(stack) - k:], []
            value: object = None
            if n in ("GLOBAL", "STACK_GLOBAL"):
                if n == "GLOBAL":
                    name = str(arg).replace(" ", ".")
                else:
                    mod, qual = consumed
                    if not (isinstance(mod, str) and isinstance(qual, str)):
                        raise UnsafeContentError(
                            f"{shown}: pickle names a global at byte {pos} that cannot be read statically;"
                            " expected a plain torch.save file. Do not load it")
                    name = f"{mod}.{qual}"
                if not global_allowed(name, dcp, extra):
                    raise UnsafeContentError(
                        f"{shown}: pickle references global {name!r}, which could run code when"
                        " loaded; expected only tensors and plain data. Do not load this file")
                names.append(name)
                value = _Global(name)
            elif n in _STR_OPS or n in _INT_OPS or n in ("BINFLOAT", "FLOAT"):
                value = arg
                if paths is not None and n in _STR_OPS and isinstance(arg, str) and MACHINE_PATH.match(arg) \
                        and len(paths) < 8:
                    paths.append(arg)
            elif n in _GET_OPS:
                value = memo.get(arg)
            elif n == "TUPLE":
                value = tuple(sliced)
            elif n in ("TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
                value = tuple(consumed)
            elif n in ("BINPERSID", "PERSID"):
                pid = consumed[0] if consumed else None
                if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str) \
                        and isinstance(pid[1], _Global) and type(pid[4]) is int:
                    size = _storage_bytes(pid[1], pid[4])
                    if size is not None:
                        declared[pid[2]] = size
                    value = _Storage(pid[2], pid[4])
            elif n == "REDUCE":
                _check_reduce(consumed[0], consumed[1], shown, pos)
                if paths is not None and consumed[0] in _PATHS and isinstance(consumed[1], tuple) and consumed[1]:
                    joined = "/".join(consumed[1]).replace("//", "/")  # PosixPath(('/', 'home', ...))
                    if MACHINE_PATH.match(joined) and joined not in paths and len(paths) < 8:
                        paths.append(joined)
            elif n == "BUILD" and isinstance(consumed[0], _Global):
                raise UnsafeContentError(
                    f"{shown}: pickle sets attributes on the class {consumed[0]!r} at byte {pos}, which would"
                    " change it for the whole process; expected only data. Do not load this file")
            elif n in ("BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "DUP"):
                value = consumed[0]  # the object built upon stays what it was
            stack.extend([value] * len(op.stack_after))
    except UnsafeContentError:
        raise
    except Exception as e:  # a malformed pickle: pickletools raises ValueError and friends
        raise MalformedPickle(f"{shown}: not a readable pickle ({e}); the file is damaged or not a checkpoint") from None
    return names
