"""Static content checks: refuse files that would run code or read out of bounds if loaded.

A pickled file (``torch.save`` zip or a bare pickle) is walked opcode by opcode with
``pickletools`` and never executed: every global it names must be on the allow-list of what
``torch.load(weights_only=True)`` needs to rebuild tensors and plain containers. A safetensors
file's header is checked (size cap, JSON without duplicate keys, known dtypes, offsets in range
and not overlapping) before any weight is read. Neither check imports torch.
"""

from __future__ import annotations

import json
import pickletools
import re
import struct
import zipfile
from pathlib import Path
from typing import IO

from aptbundle.errors import UnsafeContentError

MAX_PICKLE_BYTES = 1 << 30
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

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
_CODE_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4"}
_STR_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
            "SHORT_BINSTRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


# torch.distributed.checkpoint's `.metadata` pickle: plain dataclasses and enums describing shards
_DCP_ALLOWED = {
    *(f"torch.distributed.checkpoint.metadata.{n}" for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    "torch.distributed.checkpoint.filesystem._StorageInfo", "torch.strided", "torch.sparse_coo",
    "torch.contiguous_format", "torch.channels_last", "torch.preserve_format",
}


def global_allowed(name: str, dcp: bool = False) -> bool:
    """True for a global that ``torch.load(weights_only=True)`` may use (plus, for a DCP
    ``.metadata`` file, the plain metadata classes of ``torch.distributed.checkpoint``)."""
    return name in _ALLOWED or bool(_STORAGE.match(name)) or (dcp and name in _DCP_ALLOWED)


def scan_pickle_stream(stream: IO[bytes], shown: str, dcp: bool = False) -> list[str]:
    """Walk one pickle without executing it; return the globals it names.

    Raises ``UnsafeContentError`` for a global outside the allow-list, an opcode that builds
    arbitrary objects, or a pickle that cannot be parsed.
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
                stack.append(None)
                continue
            if n in _STR_OPS:
                stack.append(arg)
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


def scan_torch_file(path: Path, shown: str) -> list[str]:
    """Scan a ``torch.save`` file (zip format or a bare pickle) without importing torch."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise UnsafeContentError(f"{shown}: not a readable torch zip file ({e})") from None
        names: list[str] = []
        with zf:
            pkls = [i for i in zf.infolist() if i.filename.endswith(".pkl")]
            if not pkls:
                raise UnsafeContentError(f"{shown}: zip file without data.pkl; expected a torch.save file")
            for info in pkls:
                if info.file_size > MAX_PICKLE_BYTES:
                    raise UnsafeContentError(f"{shown}: {info.filename} is {info.file_size} bytes, over the limit")
                with zf.open(info) as stream:
                    names += scan_pickle_stream(stream, f"{shown}:{info.filename}")
        return names
    if head[:1] == b"\x80" and shown.endswith("/.metadata"):
        with open(path, "rb") as f:
            return scan_pickle_stream(f, shown, dcp=True)
    if head[:1] == b"\x80":
        with open(path, "rb") as f:
            # a legacy torch.save holds several pickles in a row; torch refuses those with
            # weights_only for anything but tensors, and so do we after the header pickles
            names = []
            for _ in range(3):
                names += scan_pickle_stream(f, shown)
            return names
    raise UnsafeContentError(f"{shown}: not a torch.save file (starts with {head!r}); expected a zip or a pickle")


_ST_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2,
             "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
             "F64": 8, "C64": 8, "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75}


def _pairs_no_dup(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise UnsafeContentError(f"duplicate key {k!r}")
        d[k] = v
    return d


def check_safetensors(path: Path, shown: str) -> dict:
    """Validate a safetensors header against the file size; return the parsed header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UnsafeContentError(f"{shown}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_SAFETENSORS_HEADER or n > size - 8:
            raise UnsafeContentError(
                f"{shown}: header claims {n} bytes; expected at most {min(MAX_SAFETENSORS_HEADER, size - 8)}"
            )
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_pairs_no_dup)
    except UnsafeContentError as e:
        raise UnsafeContentError(f"{shown}: safetensors header has a {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UnsafeContentError(f"{shown}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise UnsafeContentError(f"{shown}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise UnsafeContentError(f"{shown}: __metadata__ must map strings to strings")
            continue
        where = f"{shown}: tensor {key!r}"
        if not isinstance(info, dict):
            raise UnsafeContentError(f"{where}: expected an object with dtype, shape, data_offsets")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_SIZES:
            raise UnsafeContentError(f"{where}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise UnsafeContentError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise UnsafeContentError(f"{where}: data_offsets {offs!r} is not [begin, end]")
        b, e = offs
        if not 0 <= b <= e <= data_len:
            raise UnsafeContentError(f"{where}: data_offsets [{b}, {e}] outside the {data_len}-byte data section")
        count = 1
        for d in shape:
            count *= d
        if e - b != count * _ST_SIZES[dtype]:
            raise UnsafeContentError(f"{where}: holds {e - b} bytes; shape {shape} of {dtype} needs {count * _ST_SIZES[dtype]}")
        spans.append((b, e, key))
    spans.sort()
    for (b1, e1, k1), (b2, e2, k2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise UnsafeContentError(f"{shown}: tensors {k1!r} and {k2!r} overlap in the data section")
    return header


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt", ".pickle")


def needs_scan(rel: str) -> bool:
    """True for files whose loading could run code or read out of bounds."""
    return rel.endswith(PICKLE_SUFFIXES) or rel.endswith(".safetensors") or rel.endswith("/.metadata")


def scan_file(path: Path, shown: str) -> None:
    """Raise ``UnsafeContentError`` if ``path`` is a pickle or safetensors file that is unsafe."""
    if shown.endswith(".safetensors"):
        check_safetensors(path, shown)
    elif needs_scan(shown):
        with open(path, "rb") as f:
            head = f.read(2)
        # a .bin or .ckpt may be anything; the other names must hold a pickle (else: refused)
        if head.startswith(b"PK") or head[:1] == b"\x80" or not shown.endswith((".bin", ".ckpt")):
            scan_torch_file(path, shown)


def unsafe_problems(root: Path, paths) -> list:
    """One ``Problem`` per file under ``root`` (of ``paths``) that ``scan_file`` refuses.

    Only files whose names need a scan and that exist are read; the rest is for ``verify``.
    """
    from aptbundle.run import Problem

    problems = []
    for rel in paths:
        if needs_scan(rel) and (root / rel).is_file():
            try:
                scan_file(root / rel, rel)
            except UnsafeContentError as e:
                problems.append(Problem(rel, "unsafe", "only tensors and plain data", str(e)))
    return problems
