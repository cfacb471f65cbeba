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
_CODE_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4"}
_STR_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
            "SHORT_BINSTRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def global_allowed(name: str, dcp: bool = False) -> bool:
    """True for a global that ``torch.load(weights_only=True)`` may use (and, for DCP metadata,
    its plain metadata classes)."""
    return name in _ALLOWED or bool(_STORAGE.match(name)) or (dcp and name in _DCP_ALLOWED)


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


def scan_pickle(stream, shown: str, dcp: bool = False, storages: dict[str, int] | None = None) -> list[str]:
    """Walk one pickle of ``stream`` up to its STOP opcode without executing it.

    Returns the globals it names. Raises ``UnsafeContentError`` for a global outside the
    allow-list, an opcode that builds arbitrary objects, or a pickle that cannot be parsed.
    ``stream`` needs ``read`` and ``readline``; it is left just after the STOP opcode. With
    ``storages``, the storages a ``torch.save`` pickle declares (``('storage', class, key,
    location, numel)``) are recorded there as key -> bytes.
    """
    names: list[str] = []
    memo: dict[int, object] = {}
    stack: list[object] = []  # only the recent values that matter for STACK_GLOBAL
    try:
        for op, arg, pos in pickletools.genops(stream):
            n = op.name
            if n in _CODE_OPS:
                raise UnsafeContentError(
                    f"{shown}: pickle opcode {n} at byte {pos} builds arbitrary objects;"
                    " expected only tensors and plain data. Do not load this file; get it from a trusted source"
                )
            if n == "GLOBAL":
                name = str(arg).replace(" ", ".")
            elif n == "STACK_GLOBAL":
                mod, qual = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
                if not (isinstance(mod, str) and isinstance(qual, str)):
                    raise UnsafeContentError(
                        f"{shown}: pickle names a global at byte {pos} that cannot be read statically;"
                        " expected a plain torch.save file. Do not load it"
                    )
                name = f"{mod}.{qual}"
            else:
                name = None
            if name is not None:
                if not global_allowed(name, dcp):
                    raise UnsafeContentError(
                        f"{shown}: pickle references global {name!r}, which could run code when"
                        " loaded; expected only tensors and plain data. Do not load this file"
                    )
                names.append(name)
                stack.append(_Global(name))
                continue
            if n in _STR_OPS or n in _INT_OPS:
                stack.append(arg)
            elif n == "TUPLE" and storages is not None and len(stack) >= 5:
                tag, cls, key, _loc, numel = stack[-5:]
                if tag == "storage" and isinstance(cls, _Global) and isinstance(key, str) and type(numel) is int:
                    size = _storage_bytes(cls, numel)
                    if size is not None:
                        storages[key] = size
                stack.append(None)
            elif n in _GET_OPS:
                stack.append(memo.get(arg))
            elif n in _PUT_OPS:
                memo[arg] = stack[-1] if stack else None
            elif n == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            else:
                stack.append(None)
            if len(stack) > 64:
                del stack[:-8]
    except UnsafeContentError:
        raise
    except Exception as e:  # a malformed pickle: pickletools raises ValueError and friends
        raise UnsafeContentError(f"{shown}: not a readable pickle ({e}); the file is damaged or not a checkpoint") from None
    return names
