"""A GGUF file's header, parsed in one pass and once per process; its tensors memory-mapped.

The `gguf` package's reader builds a NumPy view per metadata part: for the demo model's
49k-token vocabulary and 48k merges that is ~200k objects, 2.5 s here and 15 s on a 2-core
CPU, and the weights and the tokenizer each opened the file. This reads the same layout
(llama.cpp's gguf.md: magic, version, counts, key/values, tensor infos, aligned data) with
struct and NumPy: strings one slice each, numeric arrays as one buffer. Types and block sizes
come from the `gguf` package, and so does dequantization (checkpoint/gguf.py); the test
compares everything with the package's reader."""

from __future__ import annotations

import dataclasses
import functools
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mistral_jax.config import CheckpointError, unreadable

# GGUF value types -> struct format (scalars) / NumPy dtype (arrays)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_FLOAT_ITEMS = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}


@dataclasses.dataclass
class GGUFTensor:
    """One tensor, as gguf.ReaderTensor has it: shape is ggml's ne (innermost first); data is
    a memory-mapped view, typed for float and integer types, the raw bytes [rows, row bytes]
    for quantized ones."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    data: np.ndarray


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            if size == 0:
                raise CheckpointError(f"{self.path}: empty (0 bytes), expected a GGUF file. Fix: re-download it")
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise unreadable(self.path, e) from None
        buf = memoryview(self._map)
        if bytes(buf[:4]) != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file: it starts with {bytes(buf[:8])!r}, not b'GGUF'. "
                                  "Fix: re-download it, or pass a .gguf file written by llama.cpp")
        self._buf, self._off = buf, 4
        try:
            self._parse(size)
        except (struct.error, UnicodeDecodeError, ValueError, KeyError, IndexError, OverflowError) as e:
            if isinstance(e, CheckpointError):
                raise
            # A field read past the end, or bytes that are no GGUF field: the header is cut or damaged.
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF header: reading byte {self._off} of "
                                  f"{size} failed ({e}). Fix: re-download it") from None
        finally:
            del self._buf

    def _parse(self, size: int) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.version, n_tensors, n_kv = self._unpack("<IQQ")
        if self.version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {self.version}; versions 2 and 3 are supported. "
                                  "Fix: convert the model again with a recent llama.cpp, or re-download it")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (kind,) = self._unpack("<I")
            self.metadata[key] = self._value(kind)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            kind, offset = self._unpack("<IQ")
            infos.append((name, dims, kind, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-self._off // align) * align
        data = np.frombuffer(self._map, np.uint8)
        self.tensors: list[GGUFTensor] = []
        for name, dims, kind, offset in infos:
            try:
                qtype = GGMLQuantizationType(kind)
                block, block_bytes = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has GGML type {kind}, which the gguf package "
                                      "does not know. Fix: upgrade gguf (pip install -U gguf), or re-download the "
                                      "file if it is corrupt") from None
            n = int(np.prod(dims)) if dims else 1
            n_bytes = n * block_bytes // block
            end = start + offset + n_bytes
            if end > size:  # a memory-mapped view would silently come out short
                raise CheckpointError(f"{self.path}: truncated: the file is {size} bytes, its header says tensor "
                                      f"{name!r} ends at byte {end}. Fix: re-download it")
            raw = data[start + offset: end]
            shape = tuple(reversed(dims))
            if qtype.name in _FLOAT_ITEMS:
                view = raw.view(_FLOAT_ITEMS[qtype.name]).reshape(shape)
            else:  # quantized (and BF16): rows of bytes, as the gguf package gives them
                view = raw.reshape(*shape[:-1], shape[-1] // block * block_bytes)
            self.tensors.append(GGUFTensor(name, qtype, tuple(int(d) for d in dims), n_bytes, view))

    # ---- the header, field by field --------------------------------------------------------

    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self._buf, self._off)
        self._off += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._buf, self._off)
        start = self._off + 8
        if start + n > len(self._buf):  # a slice would silently come out short
            raise struct.error(f"a string of {n} bytes at byte {start} runs past the end")
        self._off = start + n
        return str(self._buf[start:start + n], "utf-8")

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            return self._unpack(_SCALAR[kind])[0]
        item, count = self._unpack("<IQ")
        if item == _STRING:
            return [self._string() for _ in range(count)]
        if item == _ARRAY:
            return [self._value(_ARRAY) for _ in range(count)]
        values = np.frombuffer(self._buf, _NUMPY[item], count, self._off)
        self._off += values.nbytes
        return values.tolist()


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | Path) -> GGUFFile:
    """The parsed file, shared by everything that reads it in this process (weights, tokenizer)
    until it changes on disk."""
    path = Path(path).resolve()
    stat = path.stat()
    return _open(str(path), stat.st_mtime_ns, stat.st_size)
