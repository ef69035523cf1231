"""The canonical tensor stream that every checkpoint format is read into, and its validation.

Canonical names, shapes and layout are Mistral's consolidated ones: Linear weights [out, in],
q/k rows in Mistral's interleaved-rotary order (pairs 2i, 2i+1 rotate together).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from ..config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into this model's canonical tensors."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape, for a model of config `cfg`."""
    d, q, kv, h = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention_norm.weight": (d,),
            p + "attention.wq.weight": (q, d),
            p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d),
            p + "attention.wo.weight": (d, q),
            p + "ffn_norm.weight": (d,),
            p + "feed_forward.w1.weight": (h, d),
            p + "feed_forward.w2.weight": (d, h),
            p + "feed_forward.w3.weight": (h, d),
        }
    return shapes


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of a file, described from the file's header alone: nothing is read until `read()`."""

    file: Path
    source: str  # its name in the file
    name: str | None  # canonical name (unknown names pass through as-is); None: a known extra, skipped
    shape: tuple[int, ...]  # canonical layout
    dtype: str  # the file's dtype name, e.g. "BF16", "Q4_1"
    kind: str  # "float" (readable), "fp8" or "other" (rejected)
    nbytes: int
    read: Callable[[], np.ndarray]  # the tensor in canonical layout
    # read_slice(index): only the part `index` (a tuple of slices of the canonical shape) is read
    # from the file; None where the format cannot (then the whole tensor is read once and cut).
    read_slice: Callable[[tuple[slice, ...]], np.ndarray] | None = None

    def where(self) -> str:
        renamed = f" ({self.name})" if self.name and self.name != self.source else ""
        return f"{self.file}: tensor {self.source!r}{renamed}"


def _check(entry: Entry, expected: dict, cfg: ModelConfig, quantization: str | None) -> None:
    if entry.name not in expected:
        hint = " (the config ties the output head to tok_embeddings)" if entry.name == "output.weight" else ""
        raise CheckpointError(
            f"{entry.where()}: unknown tensor, not part of a {cfg.n_layers}-layer model{hint}; expected "
            f"canonical names such as 'tok_embeddings.weight', 'layers.0.attention.wq.weight'"
        )
    if entry.shape != expected[entry.name]:
        what = " (one scale per output channel)" if entry.name.endswith("_scale") else ""
        raise CheckpointError(
            f"{entry.where()}: shape {entry.shape}, expected {expected[entry.name]}{what} from the config"
        )
    if entry.kind == "fp8":
        from .quantization import FP8_DTYPE, is_projection

        if quantization != "fp8":
            raise CheckpointError(
                f"{entry.where()}: dtype {entry.dtype}, but the checkpoint declares no FP8 quantization "
                "(HF: config.json quantization_config; Mistral: *.weight_scale tensors); expected F32, F16 or BF16"
            )
        if not (is_projection(entry.name) and entry.name.endswith(".weight")):
            raise CheckpointError(f"{entry.where()}: dtype {entry.dtype}; only layer projections may be FP8 "
                                  "(embeddings, norms, the output head and scales are 16/32-bit)")
        if entry.dtype != FP8_DTYPE:
            raise CheckpointError(f"{entry.where()}: dtype {entry.dtype}, expected {FP8_DTYPE} (float8_e4m3fn)")
        return
    if entry.kind != "float":
        raise CheckpointError(f"{entry.where()}: dtype {entry.dtype}, expected a float dtype (F32, F16 or BF16)")


class Checkpoint:
    """A checkpoint on disk, read as the canonical tensor stream. Subclasses: one per format."""

    format: str = ""
    quantization: str | None = None  # "fp8": e4m3 projections + *.weight_scale (quantization.py)

    def __init__(self, path: Path, config: ModelConfig):
        self.path = path
        self.config = config

    def __repr__(self):
        return f"<{self.format} checkpoint {self.path}>"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = expected_shapes(self.config)
        if self.quantization == "fp8":
            from .quantization import scale_shapes

            shapes |= scale_shapes(shapes)
        return shapes

    def _entries(self, stack: contextlib.ExitStack) -> Iterator[Entry]:
        """The file's tensors; file handles go on `stack` so they live as long as the stream."""
        raise NotImplementedError

    def _plan(self, entries: list[Entry]) -> list[Entry]:
        """The entries to read, after checking every name, shape and dtype from the headers: a bad
        checkpoint fails before anything is read, not halfway through loading a model."""
        expected, seen, plan = self.expected_shapes(), {}, []
        for entry in entries:
            if entry.name is None:
                continue
            _check(entry, expected, self.config, self.quantization)
            if entry.name in seen:
                raise CheckpointError(f"{entry.where()}: appears twice (also in {seen[entry.name]})")
            seen[entry.name] = entry.file
            plan.append(entry)
        missing = [name for name in expected if name not in seen]
        scales = [name for name in missing if name.endswith("_scale")]
        if scales:
            raise CheckpointError(
                f"{self.path}: FP8 checkpoint without per-channel scales for {len(scales)} weights, e.g. "
                f"{scales[0].removesuffix('_scale')} needs {scales[0]} [out, 1]; re-export with llm-compressor's "
                "FP8_DYNAMIC scheme (or load the 16-bit checkpoint with quantization=\"fp8\")"
            )
        if missing:
            shown = ", ".join(missing[:20]) + (f" ... and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise CheckpointError(f"{self.path}: {len(missing)} of {len(expected)} tensors missing: {shown}")
        return plan

    def entries(self, progress: bool = True) -> Iterator[Entry]:
        """The validated entries, one at a time, files open meanwhile; the progress bar advances
        as the caller moves on from each (it reads the whole tensor or only its slices)."""
        with contextlib.ExitStack() as stack:
            plan = self._plan(list(self._entries(stack)))
            bar = stack.enter_context(
                tqdm(total=sum(e.nbytes for e in plan), unit="B", unit_scale=True, file=sys.stderr,
                     desc=f"loading {self.path.name}", disable=not progress)
            )
            for entry in plan:
                yield entry
                bar.update(entry.nbytes)

    def tensors(self, progress: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """Canonical (name, array) pairs, one tensor at a time: host memory holds about one tensor.
        Arrays keep the file's float dtype (quantized GGUF types come dequantized, as f32)."""
        for entry in self.entries(progress):
            yield entry.name, entry.read()


# ---- safetensors (the Mistral and Hugging Face formats) -----------------------------------

_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def safetensors_entries(
    stack: contextlib.ExitStack,
    file: Path,
    rename: Callable[[str], str | None],
    transform: Callable[[str, np.ndarray], np.ndarray] = lambda name, x: x,
) -> Iterator[Entry]:
    """A safetensors file's tensors. rename: file name -> canonical name (None: skip);
    transform(canonical name, array): a layout change that keeps the shape, applied to whole
    tensors and to the slices that read_slice asks for (so it must act within those slices)."""
    from safetensors import safe_open

    handle = stack.enter_context(safe_open(str(file), framework="numpy"))
    for source in handle.keys():
        info = handle.get_slice(source)
        dtype, shape = info.get_dtype(), tuple(info.get_shape())
        name = rename(source)
        kind = "float" if dtype in _FLOAT_BYTES else "fp8" if dtype.startswith("F8") else "other"
        # numpy has no float8: safetensors' numpy reader refuses it, so FP8 comes from raw bytes.
        if kind == "fp8":
            get = lambda source, index=(): _read_fp8(file, source, index)
        else:
            get = lambda source, index=(): read_safetensors_slice(handle, source, index)
        yield Entry(
            file, source, name, shape, dtype, kind,
            nbytes=math.prod(shape) * _FLOAT_BYTES.get(dtype, 1),
            read=lambda source=source, name=name, get=get: transform(name, get(source)),
            read_slice=lambda index, source=source, name=name, get=get: transform(name, get(source, index)),
        )


def read_safetensors_slice(handle, source: str, index: tuple[slice, ...] = ()) -> np.ndarray:
    """Tensor `source`, or only its part `index`: safetensors reads just those bytes."""
    return handle.get_slice(source)[index] if index else handle.get_tensor(source)


def _read_fp8(file: Path, source: str, index: tuple[slice, ...] = ()) -> np.ndarray:
    """An F8_E4M3 tensor (or its part `index`) of a safetensors file (u64 header size, JSON
    header, data) as ml_dtypes'. Memory-mapped: a slice of rows touches only those rows' pages."""
    import json

    import ml_dtypes

    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_size))[source]
    start, _ = info["data_offsets"]
    data = np.memmap(file, np.uint8, mode="r", offset=8 + header_size + start, shape=tuple(info["shape"]))
    return np.array(data[index]).view(ml_dtypes.float8_e4m3fn)


def rename_to_canonical(name: str, global_names: dict[str, str], layer_pattern: "re.Pattern[str]",
                        layer_names: dict[str, str]) -> str:
    """A format's tensor name -> canonical name, from its table of global names and a layer regex
    (group 1: layer index, group 2: per-layer suffix). Unknown names come back unchanged, so that
    validation reports them under their own name."""
    if name.endswith(".weight_scale"):  # an FP8 weight's scale: named after its weight
        return rename_to_canonical(name.removesuffix("_scale"), global_names, layer_pattern, layer_names) + "_scale"
    if name in global_names:
        return global_names[name]
    m = layer_pattern.match(name)
    if m and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}.weight"
    return name
