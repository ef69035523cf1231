"""The canonical tensor stream that every checkpoint format is read into, and its validation.

Canonical names, shapes and layout are Mistral's consolidated ones: Linear weights [out, in],
q/k rows in Mistral's interleaved-rotary order (pairs 2i, 2i+1 rotate together).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

# CheckpointError lives beside the config readers, which raise it too; it is exported from here.
from mistral_jax.config import CheckpointError, ModelConfig, key_name, unreadable


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


# Each canonical tensor's shape in config fields (the layer prefix and ".weight" dropped), so
# that a shape error names the fields that disagree with the weights.
_SHAPE_FIELDS = {
    "tok_embeddings": "(vocab_size, dim)", "output": "(vocab_size, dim)", "norm": "(dim,)",
    "attention_norm": "(dim,)", "ffn_norm": "(dim,)",
    "attention.wq": "(n_heads * head_dim, dim)", "attention.wk": "(n_kv_heads * head_dim, dim)",
    "attention.wv": "(n_kv_heads * head_dim, dim)", "attention.wo": "(dim, n_heads * head_dim)",
    "feed_forward.w1": "(hidden_dim, dim)", "feed_forward.w2": "(dim, hidden_dim)",
    "feed_forward.w3": "(hidden_dim, dim)",
}
_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")


def _shape_formula(name: str, keys: dict) -> str:
    """'(n_kv_heads * head_dim, dim)' for layers.N.attention.wk.weight, in the format's own key
    names (HF: num_key_value_heads, hidden_size); '' for tensors without one (FP8 scales)."""
    formula = _SHAPE_FIELDS.get(_LAYER_INDEX.sub("", name).removesuffix(".weight"), "")
    return re.sub(r"[a-z_]+", lambda m: key_name(keys, m.group()), formula)


def _check(entry: Entry, expected: dict, ckpt: Checkpoint) -> None:
    cfg, config_file = ckpt.config, ckpt.config_file
    if entry.name not in expected:
        hint = " (the config ties the output head to tok_embeddings)" if entry.name == "output.weight" else ""
        layer = _LAYER_INDEX.match(entry.name or "")
        if entry.name == "output.weight":
            fix = (f'the weights hold an output head: set "{key_name(ckpt.config_keys, "tied_embeddings")}" '
                   f"to false in {config_file}")
        elif layer and int(layer.group(1)) >= cfg.n_layers:
            fix = (f'the weights hold more layers than "{key_name(ckpt.config_keys, "n_layers")}" {cfg.n_layers} '
                   f"in {config_file}: set it to the model's value")
        else:
            fix = "load a checkpoint of a supported architecture (Mistral, Llama), or re-download this one"
        raise CheckpointError(
            f"{entry.where()}: unknown tensor, not part of a {cfg.n_layers}-layer model{hint}; expected "
            f"canonical names such as 'tok_embeddings.weight', 'layers.0.attention.wq.weight'. Fix: {fix}"
        )
    if entry.shape != expected[entry.name]:
        if entry.name.endswith("_scale"):
            raise CheckpointError(f"{entry.where()}: shape {entry.shape}, expected {expected[entry.name]} "
                                  "(one scale per output channel) from the config. Fix: re-quantize the checkpoint")
        formula = _shape_formula(entry.name, ckpt.config_keys)
        raise CheckpointError(
            f"{entry.where()}: shape {entry.shape}, expected {expected[entry.name]} = {formula} from {config_file}. "
            f"Fix: the weights and {config_file.name} disagree: set those fields to the model's values, or "
            "re-download the checkpoint"
        )
    if entry.kind == "fp8":
        from mistral_jax.loading.checkpoint.quantization import FP8_DTYPE, is_projection

        if ckpt.quantization != "fp8":
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
        raise CheckpointError(f"{entry.where()}: dtype {entry.dtype}, expected a float dtype (F32, F16 or BF16). "
                              "Fix: re-export the checkpoint in float32, float16 or bfloat16")


class Checkpoint:
    """A checkpoint on disk, read as the canonical tensor stream. Subclasses: one per format."""

    format: str = ""
    quantization: str | None = None  # "fp8": e4m3 projections + *.weight_scale (quantization.py)
    whole: bool = False  # True: read whole into the model's shardings (read(target): Orbax), not entries()

    def __init__(self, path: Path, config: ModelConfig, config_file: Path | None = None,
                 config_keys: dict | None = None):
        self.path = path
        self.config = config
        # Where the config came from, and its keys for each field: errors about the weights'
        # shapes name the fields to check there, as the file spells them.
        self.config_file = config_file or path
        self.config_keys = config_keys or {}

    def __repr__(self):
        return f"<{self.format} checkpoint {self.path}>"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = expected_shapes(self.config)
        if self.quantization == "fp8":
            from mistral_jax.loading.checkpoint.quantization import scale_shapes

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
            _check(entry, expected, self)
            if entry.name in seen:
                raise CheckpointError(f"{entry.where()}: appears twice (also in {seen[entry.name]}). "
                                      "Fix: remove the stale copy (two downloads mixed in one directory?)")
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
            raise CheckpointError(f"{self.path}: {len(missing)} of {len(expected)} tensors missing: {shown}. "
                                  f"Fix: {self._missing_fix(seen, missing)}")
        return plan

    def _missing_fix(self, seen: dict, missing: list[str]) -> str:
        """Fewer layers in the files than the config says: the config is wrong (or files are
        missing); anything else: files are missing or incomplete."""
        layers = {int(m.group(1)) for name in seen if (m := _LAYER_INDEX.match(name))}
        held = max(layers, default=-1) + 1
        if held < self.config.n_layers and all(
                (m := _LAYER_INDEX.match(name)) and int(m.group(1)) >= held for name in missing):
            return (f'the files hold {held} of the {self.config.n_layers} layers that "'
                    f'{key_name(self.config_keys, "n_layers")}" in {self.config_file} says: set it to the '
                    "model's value, or download the missing weight files")
        return "re-download the checkpoint (a weight file is missing or was written incompletely)"

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
# Every safetensors dtype of a fixed whole-byte size, to check each tensor's byte range.
_DTYPE_BYTES = _FLOAT_BYTES | {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
                               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
_HEADER_LIMIT = 100_000_000  # safetensors' own bound on the JSON header
_LFS_POINTER = b"version https://git-lfs"
_REDOWNLOAD = "Fix: re-download it"


def safetensors_header(file: Path) -> tuple[int, dict[str, dict]]:
    """A safetensors file's layout: (where its data starts, tensor name -> {dtype, shape,
    data_offsets}), checked against the file's size first. The format is an 8-byte header size,
    the JSON header, then data that the tensors cover exactly; a file that is empty, cut short,
    padded, a Git LFS pointer or not safetensors at all is a CheckpointError naming the file and
    the sizes (safetensors' own errors name neither). Parsed once per file and version."""
    file = Path(file)
    try:
        stat = file.stat()
    except OSError as e:
        raise unreadable(file, e) from None
    return _safetensors_header(file, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _safetensors_header(file: Path, mtime_ns: int, size: int) -> tuple[int, dict[str, dict]]:
    try:
        with open(file, "rb") as f:
            lfs_pointer = f.read(len(_LFS_POINTER)) == _LFS_POINTER
            f.seek(0)
            head = f.read(8)
            n = int.from_bytes(head, "little")
            raw = f.read(n) if len(head) == 8 and n <= min(size - 8, _HEADER_LIMIT) else b""
    except OSError as e:
        raise unreadable(file, e) from None
    if size == 0:
        raise CheckpointError(f"{file}: empty (0 bytes), expected safetensors weights. {_REDOWNLOAD}")
    if lfs_pointer:
        raise CheckpointError(f"{file}: a Git LFS pointer ({size} bytes), not the weights. Fix: fetch them with "
                              "`git lfs pull` in the repository, or download with `huggingface-cli download`")
    if size < 8:
        raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors file (an 8-byte header size, "
                              f"a JSON header, then the data). {_REDOWNLOAD}")
    if n > _HEADER_LIMIT:
        raise CheckpointError(f"{file}: not a safetensors file: its first 8 bytes {head!r} are no header size "
                              f"(as one, {n} bytes). Fix: re-download it, or remove it from the checkpoint")
    if n > size - 8:
        raise CheckpointError(f"{file}: truncated inside its header: the file is {size} bytes, its header alone "
                              f"says {8 + n}. {_REDOWNLOAD}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        what = "not a safetensors file" if not raw.lstrip().startswith(b"{") else "corrupt"
        raise CheckpointError(f"{file}: {what}: its {n}-byte header is not valid JSON ({e}). {_REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt: its header is not a JSON object. {_REDOWNLOAD}")
    tensors, data_size, data_end = {}, size - 8 - n, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            if not (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                    and isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{file}: corrupt: tensor {name!r} has a malformed header entry "
                                  f"{json.dumps(info)[:200]}. {_REDOWNLOAD}") from None
        if dtype in _DTYPE_BYTES and stop - start != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{file}: corrupt: tensor {name!r} ({dtype} {tuple(shape)}) takes "
                                  f"{math.prod(shape) * _DTYPE_BYTES[dtype]} bytes, its header gives it "
                                  f"{stop - start}. {_REDOWNLOAD}")
        tensors[name] = info
        data_end = max(data_end, stop)
    if data_end > data_size:
        raise CheckpointError(f"{file}: truncated: the file is {size} bytes, its header says {8 + n + data_end} "
                              f"({_bytes(data_end - data_size)} of tensor data missing). {_REDOWNLOAD}")
    if data_end < data_size:
        raise CheckpointError(f"{file}: {_bytes(data_size - data_end)} past its last tensor: the file is {size} "
                              f"bytes, its header says {8 + n + data_end}. {_REDOWNLOAD}")
    return 8 + n, tensors


def _bytes(n: int) -> str:
    return "1 byte" if n == 1 else f"{n} bytes"


def safetensors_entries(
    stack: contextlib.ExitStack,
    file: Path,
    rename: Callable[[str], str | None],
    transform: Callable[[str, np.ndarray], np.ndarray] = lambda name, x: x,
) -> Iterator[Entry]:
    """A safetensors file's tensors. rename: file name -> canonical name (None: skip);
    transform(canonical name, array): a layout change that keeps the shape, applied to whole
    tensors and to the slices that read_slice asks for (so it must act within those slices)."""
    from safetensors import SafetensorError, safe_open

    safetensors_header(file)  # the layout checked first: its errors name the file and the sizes
    try:
        handle = stack.enter_context(safe_open(str(file), framework="numpy"))
    except (SafetensorError, OSError) as e:  # what the layout check does not cover
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}). {_REDOWNLOAD}") from None
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
    """An F8_E4M3 tensor (or its part `index`) of a safetensors file as ml_dtypes'. Memory-mapped:
    a slice of rows touches only those rows' pages."""
    import ml_dtypes

    data_start, tensors = safetensors_header(file)
    info = tensors[source]
    start, _ = info["data_offsets"]
    data = np.memmap(file, np.uint8, mode="r", offset=data_start + start, shape=tuple(info["shape"]))
    return np.array(data[index]).view(ml_dtypes.float8_e4m3fn)


def rename_to_canonical(name: str, global_names: dict[str, str], layer_pattern: re.Pattern[str],
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
