"""Model configuration: one dataclass, readable from our JSON configs, Mistral `params.json`,
Hugging Face `config.json` and GGUF metadata.

Every reader goes through one validation (`ModelConfig._read`, and `__post_init__` for configs
built in code): a malformed file fails with a CheckpointError that names the file, the key as
the file spells it, the bad value and the fix, never a ZeroDivisionError or KeyError later on.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any


def shipped_configs():
    """The folder of the named configs: the package `mistral_jax.configs`, which is the repo's
    top-level configs/ (a wheel installs it as mistral_jax/configs/, an editable install maps it
    there); from a source tree on PYTHONPATH, not installed, the configs/ beside the package."""
    try:
        return importlib.resources.files("mistral_jax.configs")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "configs"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: its config, its tensors or its files. The message names
    the file (and the field or tensor), says what is wrong, then the fix. A ValueError, so that
    callers that report bad input (the server's engine process) report it as a failed start.
    Defined here, beside the config readers that raise it; checkpoint/ re-exports it."""


def unreadable(path: Path, error: OSError) -> CheckpointError:
    """The error for a checkpoint file that cannot be opened: a broken link (a Hugging Face cache
    whose blob is gone), a directory, a permission."""
    if path.is_symlink() and not path.exists():
        return CheckpointError(f"{path}: a broken symbolic link (to {os.readlink(path)}). "
                               "Fix: re-download the file")
    return CheckpointError(f"{path}: cannot be read ({error.strerror or error}). "
                           "Fix: make it a readable file (check its permissions), or re-download it")


def read_json(path: str | Path) -> dict:
    """A JSON file whose top level is an object. Every way it can fail (unreadable, not text,
    empty, invalid JSON, not an object) is a CheckpointError naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise unreadable(path, e) from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}), so not JSON. "
                              "Fix: re-download it; it is corrupt or another file under this name") from None
    if not text.strip():
        raise CheckpointError(f"{path}: empty, expected a JSON object. Fix: re-download it")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
                              "Fix: correct the file there, or re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the top level is a JSON {_json_type(data)}, expected an object "
                              '({"key": value, ...}). Fix: re-download it')
    return data


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, numbers.Number):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


# What each field means, for messages; its type comes from the dataclass's annotation.
_MEANING = {
    "dim": "the model width", "n_layers": "the number of layers", "n_heads": "the number of query heads",
    "n_kv_heads": "the number of key/value heads", "head_dim": "the size of one attention head",
    "hidden_dim": "the feed-forward width", "vocab_size": "the vocabulary size",
    "rope_theta": "the rotary base frequency", "norm_eps": "the RMSNorm epsilon",
    "tied_embeddings": "whether the output head reuses the embedding", "max_seq_len": "the context length",
}
# The fix for a value out of range: the file's author knows the model's real value; we do not.
_SET_IT = "set it to the model's value, or re-download the file"

# Field -> the key (or keys, the first present wins) that holds it, per format. Keys are quoted
# in messages as the file spells them, so that the user finds the line to fix.
MISTRAL_KEYS: dict[str, str | tuple[str, ...]] = {
    "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
    "head_dim": "head_dim", "hidden_dim": "hidden_dim", "vocab_size": "vocab_size", "rope_theta": "rope_theta",
    "norm_eps": "norm_eps", "tied_embeddings": "tied_embeddings",
    "max_seq_len": ("max_seq_len", "max_position_embeddings"),
}
HF_KEYS: dict[str, str | tuple[str, ...]] = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "hidden_dim": "intermediate_size",
    "vocab_size": "vocab_size", "rope_theta": ("rope_theta", "rope_parameters.rope_theta"),
    "norm_eps": "rms_norm_eps", "tied_embeddings": "tie_word_embeddings", "max_seq_len": "max_position_embeddings",
}


def gguf_keys(arch: str) -> dict[str, str]:
    """GGUF metadata keys (llama.cpp's names, under the architecture). The vocabulary size and
    the tying come from the tensors instead."""
    return {
        "dim": f"{arch}.embedding_length", "n_layers": f"{arch}.block_count",
        "n_heads": f"{arch}.attention.head_count", "n_kv_heads": f"{arch}.attention.head_count_kv",
        "head_dim": f"{arch}.attention.key_length", "hidden_dim": f"{arch}.feed_forward_length",
        "rope_theta": f"{arch}.rope.freq_base", "norm_eps": f"{arch}.attention.layer_norm_rms_epsilon",
        "max_seq_len": f"{arch}.context_length",
    }


def key_name(keys: dict, field: str) -> str:
    """The key a format spells `field` with (its first spelling); the field itself if none."""
    key = keys.get(field, field)
    return key if isinstance(key, str) else key[0]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    dim: int  # model width (embedding size)
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention)
    head_dim: int  # its own setting: Mistral-Small-2501 has dim 5120 but 32 heads x 128
    hidden_dim: int  # SwiGLU inner width
    vocab_size: int
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    tied_embeddings: bool = False  # Llama-family checkpoints (SmolLM2) reuse the embedding as head
    max_seq_len: int = 32768  # the model's context window

    def __post_init__(self):
        # Configs built in code (tests, dataclasses.replace, Orbax's saved dict) get the same
        # checks as files; the readers have checked already, naming the file.
        for field in dataclasses.fields(self):  # normalized too: numpy integers become ints, 64.0 becomes 64
            object.__setattr__(self, field.name, _check_value(field.name, getattr(self, field.name), "ModelConfig",
                                                              field.name))
        _check_consistent(dataclasses.asdict(self), "ModelConfig", {})

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def num_params(self) -> int:
        d, h = self.dim, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.hidden_dim
        layer = attn + mlp + 2 * d
        head = 0 if self.tied_embeddings else self.vocab_size * d
        return self.n_layers * layer + self.vocab_size * d + d + head

    # ---- readers -------------------------------------------------------------------------

    @classmethod
    def _read(cls, source: str | Path, data: dict, keys: dict, defaults: dict) -> ModelConfig:
        """The config that `data` (a file's fields; `keys`: field -> its key or keys there)
        describes. `defaults`: the fields the file may leave out; n_kv_heads (= n_heads) and
        head_dim (= dim / n_heads) may always be left out. Any fault is a CheckpointError naming
        `source` and the key as the file spells it."""
        optional = set(defaults) | {"n_kv_heads", "head_dim"}
        names, values = {}, {}
        for field, options in keys.items():
            options = (options,) if isinstance(options, str) else options
            # A null is absent, as transformers reads it (HF configs write "head_dim": null),
            # except where the field has no default.
            key = next((k for k in options if data.get(k) is not None), None)
            if key is None and field not in optional:
                key = next((k for k in options if k in data), None)
            names[field] = key or options[0]
            if key is not None:
                values[field] = _check_value(field, data[key], source, names[field])
        required = [f for f in keys if f not in values and f not in optional]
        if required:
            listed = ", ".join(f'"{names[f]}" ({_MEANING[f]})' for f in required)
            raise CheckpointError(f"{source}: no {listed}, which this file must have. "
                                  "Fix: add it with the model's value, or re-download the file")
        values.setdefault("n_kv_heads", values["n_heads"])
        if "head_dim" not in values:
            if values["dim"] % values["n_heads"]:
                raise CheckpointError(
                    f'{source}: "{names["dim"]}" is {values["dim"]}, which is not a multiple of "{names["n_heads"]}" '
                    f'{values["n_heads"]}, and there is no "{names["head_dim"]}" to give the size of a head. '
                    f'Fix: add "{names["head_dim"]}", or set both to the model\'s values'
                )
            values["head_dim"] = values["dim"] // values["n_heads"]
        for field, value in defaults.items():
            values.setdefault(field, value)
        _check_consistent(values, source, names)
        return cls(**values)

    @classmethod
    def from_fields(cls, data: dict, source: str | Path = "config") -> ModelConfig:
        """The dataclass's own fields as a dict (our configs/ files, Orbax's saved config)."""
        fields = dataclasses.fields(cls)
        defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        return cls._read(source, data, {f.name: f.name for f in fields}, defaults)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Our own config format: the dataclass fields as JSON (see configs/)."""
        data = read_json(path)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields - {"name", "_comment"}
        if unknown:
            raise CheckpointError(f"{path}: unknown config keys {sorted(unknown)}. Fix: use only {sorted(fields)}")
        return cls.from_fields(data, path)

    @classmethod
    def named(cls, name: str) -> ModelConfig:
        """A config shipped in configs/, e.g. 'mistral-small-2501' or 'tiny'."""
        folder = shipped_configs()
        path = folder / f"{name}.json"
        if not path.is_file():
            known = sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))
            raise FileNotFoundError(f"no config named {name!r} in {folder}; known: {known}")
        with importlib.resources.as_file(path) as file:
            return cls.from_json(file)

    @classmethod
    def from_mistral_params(cls, params: dict, source: str | Path = "params.json") -> ModelConfig:
        """Mistral's `params.json` (consolidated checkpoints); `source` names it in errors."""
        defaults = dict(rope_theta=1e4, tied_embeddings=False, max_seq_len=32768)
        return cls._read(source, params, MISTRAL_KEYS, defaults)

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str | Path = "config.json") -> ModelConfig:
        """A Hugging Face `config.json` of a Mistral or Llama architecture."""
        data = dict(cfg)
        # transformers 5 moved rope_theta into rope_parameters; read it from there when not on top.
        if isinstance(cfg.get("rope_parameters"), dict):
            data["rope_parameters.rope_theta"] = cfg["rope_parameters"].get("rope_theta")
        defaults = dict(rope_theta=1e4, norm_eps=1e-5, tied_embeddings=False, max_seq_len=32768)
        return cls._read(source, data, HF_KEYS, defaults)

    @classmethod
    def from_gguf_metadata(cls, meta: dict, vocab_size: int, tied_embeddings: bool,
                           source: str | Path = "GGUF metadata") -> ModelConfig:
        """A GGUF file's metadata (key -> scalar value). The vocabulary size and the tying come
        from the tensors (token_embd's rows; whether an output.weight exists), which is where
        llama.cpp records them reliably."""
        defaults = dict(vocab_size=vocab_size, tied_embeddings=tied_embeddings, rope_theta=1e4, max_seq_len=32768)
        return cls._read(source, meta, gguf_keys(meta["general.architecture"]), defaults)

    def to_mistral_params(self) -> dict:
        return {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "norm_eps": self.norm_eps,
            "tied_embeddings": self.tied_embeddings,
            "max_seq_len": self.max_seq_len,
        }


# ---- validation ----------------------------------------------------------------------------

_TYPES = {f.name: f.type for f in dataclasses.fields(ModelConfig)}  # "int", "float", "bool"
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _check_value(field: str, value: Any, source, key: str) -> Any:
    """`value` of `field` (read from `key` of `source`) in the field's type, or a CheckpointError
    naming them: integers positive, floats positive and finite, booleans true or false."""
    kind, meaning = _TYPES[field], _MEANING[field]
    where = f'{source}: "{key}" is {_shown(value)}'
    if isinstance(value, str):
        literal = {"int": _is_int_text, "float": _is_float_text, "bool": lambda s: s in ("true", "false")}[kind]
        unquoted = f'write it without quotes: "{key}": {value.strip()}' if literal(value.strip()) else _SET_IT
        raise CheckpointError(f"{where}, expected {_EXPECTED[kind]} ({meaning}). Fix: {unquoted}")
    if kind == "bool":
        if not isinstance(value, bool):
            raise CheckpointError(f"{where}, expected true or false ({meaning}). Fix: {_SET_IT}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckpointError(f"{where}, expected {_EXPECTED[kind]} ({meaning}). Fix: {_SET_IT}")
    if kind == "int":
        if not isinstance(value, numbers.Integral) and not float(value).is_integer():
            raise CheckpointError(f"{where}, expected a whole number ({meaning}). Fix: {_SET_IT}")
        if value < 1:
            raise CheckpointError(f"{where}, expected a positive integer ({meaning}). Fix: {_SET_IT}")
        return int(value)
    if not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{where}, expected a positive number ({meaning}). Fix: {_SET_IT}")
    return float(value)


def _shown(value: Any) -> str:
    """A value as the file writes it: JSON for JSON types, with its type where that is the fault."""
    if isinstance(value, str):
        return f"the string {json.dumps(value)}"
    if value is None:
        return "null"
    if isinstance(value, (bool, list, dict)):
        text = json.dumps(value)
        return f"{text[:60]}{'...' if len(text) > 60 else ''} (a JSON {_json_type(value)})"
    return repr(value)


def _is_int_text(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _is_float_text(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_consistent(values: dict, source, names: dict) -> None:
    """The fields together: whole groups of query heads per key/value head, pairs for rotary."""
    def key(field):
        return names.get(field, field)

    n_heads, n_kv_heads = values["n_heads"], values["n_kv_heads"]
    if n_heads % n_kv_heads:
        raise CheckpointError(
            f'{source}: "{key("n_heads")}" is {n_heads}, which is not a multiple of "{key("n_kv_heads")}" {n_kv_heads} '
            "(grouped-query attention shares each key/value head among a whole group of query heads). "
            "Fix: set both to the model's values, or re-download the file"
        )
    if values["head_dim"] % 2:
        raise CheckpointError(
            f'{source}: "{key("head_dim")}" is {values["head_dim"]}, expected an even number (rotary '
            f"embeddings turn pairs of values). Fix: {_SET_IT}"
        )
