"""Malformed checkpoints fail with an error that names the file, the field (or tensor), the bad
value and the fix: a CheckpointError (or TokenizerError, FileNotFoundError), each one the server's
engine process reports as a failed start, never a ZeroDivisionError, KeyError, JSONDecodeError,
SafetensorError or struct.error from deep inside the loader.

Each case copies a tiny checkpoint (Mistral, Hugging Face or GGUF) to tmp_path, breaks one
thing, and loads it as a user does, with LLM(model=...)."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mistral_jax.entrypoints.llm import LLM
from mistral_jax.loading.checkpoint import CheckpointError, open_checkpoint
from mistral_jax.tokenizer import TokenizerError

from helpers.checkpoints import make_tiny_gguf_checkpoint

# What mistral_jax/server/engine_process.py reports as a failed start (anything else is a traceback).
SERVER_REPORTS = (ValueError, FileNotFoundError, TypeError)


@pytest.fixture(scope="module")
def sources(tiny_checkpoints, tiny_cfg, tmp_path_factory):
    """Pristine tiny checkpoints: (mistral_dir, hf_dir, gguf_file, tokenizer file)."""
    mistral_dir, hf_dir, _ = tiny_checkpoints
    gguf_file = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    make_tiny_gguf_checkpoint(gguf_file, tiny_cfg, seed=0)
    return mistral_dir, hf_dir, gguf_file, mistral_dir / "tokenizer.model.v3"


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def load_error(model: Path, error=CheckpointError, **kwargs) -> str:
    """The message of the error LLM(model=...) raises: exactly `error`, which the server reports."""
    with pytest.raises(SERVER_REPORTS) as e:
        LLM(model=str(model), progress=False, num_pages=16, max_num_seqs=2, **kwargs)
    assert type(e.value) is error, f"{type(e.value).__name__}: {e.value}"
    return str(e.value)


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in: {message}"
    assert "Fix: " in message, f"no fix in: {message}"


def edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data, indent=2))


# ---- params.json (Mistral) ---------------------------------------------------------------------

def _set(key, value):
    return lambda d: d.update({key: value})


def _drop(*keys):
    return lambda d: [d.pop(k) for k in keys]


def _all(*edits):
    return lambda d: [e(d) for e in edits]


PARAMS_CASES = {
    # edit of params.json -> what the message must say
    "dim string": (_set("dim", "64"), ['"dim" is the string "64", expected an integer (the model width)',
                                       'write it without quotes: "dim": 64']),
    "n_heads 0": (_set("n_heads", 0), ['"n_heads" is 0, expected a positive integer (the number of query heads)',
                                      "set it to the model's value"]),
    "n_heads 0 no head_dim": (_all(_drop("head_dim"), _set("n_heads", 0)), ['"n_heads" is 0, expected a positive']),
    "n_kv_heads 0": (_set("n_kv_heads", 0), ['"n_kv_heads" is 0, expected a positive integer']),
    "n_kv_heads not dividing": (_set("n_kv_heads", 3), ['"n_heads" is 4, which is not a multiple of "n_kv_heads" 3']),
    "n_kv_heads above n_heads": (_set("n_kv_heads", 8), ['"n_heads" is 4, which is not a multiple of "n_kv_heads" 8']),
    "dim not divisible, no head_dim": (
        _all(_drop("head_dim"), _set("n_heads", 5), _set("n_kv_heads", 5)),
        ['"dim" is 64, which is not a multiple of "n_heads" 5, and there is no "head_dim"', 'add "head_dim"']),
    "head_dim odd": (_set("head_dim", 23), ['"head_dim" is 23, expected an even number']),
    "vocab_size 0": (_set("vocab_size", 0), ['"vocab_size" is 0, expected a positive integer (the vocabulary size)']),
    "vocab_size negative": (_set("vocab_size", -5), ['"vocab_size" is -5, expected a positive integer']),
    "n_layers bool": (_set("n_layers", True), ['"n_layers" is true (a JSON boolean), expected an integer']),
    "hidden_dim fraction": (_set("hidden_dim", 160.5), ['"hidden_dim" is 160.5, expected a whole number']),
    "hidden_dim list": (_set("hidden_dim", [160]), ['"hidden_dim" is [160] (a JSON array), expected an integer']),
    "dim null": (_set("dim", None), ['"dim" is null, expected an integer']),
    "norm_eps negative": (_set("norm_eps", -1e-5), ['"norm_eps" is -1e-05, expected a positive number (the RMSNorm']),
    "norm_eps string": (_set("norm_eps", "1e-5"), ['"norm_eps" is the string "1e-5", expected a number',
                                                  'write it without quotes: "norm_eps": 1e-5']),
    "rope_theta 0": (_set("rope_theta", 0), ['"rope_theta" is 0, expected a positive number']),
    "rope_theta NaN": (_set("rope_theta", float("nan")), ['"rope_theta" is nan, expected a positive number']),
    "max_seq_len 0": (_set("max_seq_len", 0), ['"max_seq_len" is 0, expected a positive integer (the context length)']),
    "tied_embeddings string": (_set("tied_embeddings", "false"), ['"tied_embeddings" is the string "false"',
                                                                 'write it without quotes: "tied_embeddings": false']),
    "missing vocab_size": (_drop("vocab_size"), ['no "vocab_size" (the vocabulary size)', "add it"]),
    "missing two": (_drop("dim", "hidden_dim"), ['no "dim" (the model width), "hidden_dim" (the feed-forward width)']),
}


@pytest.mark.parametrize("case", PARAMS_CASES)
def test_params_json_field(tmp_path, sources, case):
    edit, expected = PARAMS_CASES[case]
    model = copy(sources[0], tmp_path)
    edit_json(model / "params.json", edit)
    assert_names(load_error(model), f"{model / 'params.json'}: ", *expected)


# Whole-file faults of a JSON config: (bytes of the file, what the message must say).
JSON_FILE_CASES = {
    "invalid JSON": (b'{\n  "dim": 64\n  "n_layers": 2\n}',
                     ["invalid JSON at line 3, column 3: Expecting ',' delimiter", "correct the file there"]),
    "cut short": (b'{\n  "dim": 64,\n  "n_la', ["invalid JSON at line 3, column"]),
    "empty": (b"", ["empty, expected a JSON object"]),
    "whitespace": (b"\n  \n", ["empty, expected a JSON object"]),
    "array": (b"[64, 2, 4]", ["the top level is a JSON array, expected an object"]),
    "string": (b'"dim"', ["the top level is a JSON string, expected an object"]),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00", ["not UTF-8 text (byte 0 is 0x89)"]),
}


@pytest.mark.parametrize("case", JSON_FILE_CASES)
@pytest.mark.parametrize("layout, config_file", [(0, "params.json"), (1, "config.json")])
def test_config_file_unreadable_json(tmp_path, sources, layout, config_file, case):
    content, expected = JSON_FILE_CASES[case]
    model = copy(sources[layout], tmp_path)
    (model / config_file).write_bytes(content)
    assert_names(load_error(model), f"{model / config_file}: ", *expected)


def test_config_file_broken_link(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    (model / "params.json").unlink()
    (model / "params.json").symlink_to(tmp_path / "blobs" / "gone")  # a Hugging Face cache's blob removed
    assert_names(load_error(model), f"{model / 'params.json'}: a broken symbolic link", "re-download")


# ---- config.json (Hugging Face): messages use its own key names ---------------------------------

HF_CASES = {
    "num_attention_heads 0": (_set("num_attention_heads", 0), ['"num_attention_heads" is 0, expected a positive']),
    "hidden_size string": (_set("hidden_size", "64"), ['"hidden_size" is the string "64", expected an integer',
                                                       'write it without quotes: "hidden_size": 64']),
    "kv heads not dividing": (_set("num_key_value_heads", 3),
                              ['"num_attention_heads" is 4, which is not a multiple of "num_key_value_heads" 3']),
    "hidden_size not divisible": (_all(_set("head_dim", None), _set("num_attention_heads", 5),
                                       _set("num_key_value_heads", 5)),
                                  ['"hidden_size" is 64, which is not a multiple of "num_attention_heads" 5, '
                                   'and there is no "head_dim"']),
    "missing intermediate_size": (_drop("intermediate_size"), ['no "intermediate_size" (the feed-forward width)']),
    "rms_norm_eps negative": (_set("rms_norm_eps", -1.0), ['"rms_norm_eps" is -1.0, expected a positive number']),
    "vocab_size 0": (_set("vocab_size", 0), ['"vocab_size" is 0, expected a positive integer']),
    "model_type": (_set("model_type", "qwen2"), ['"model_type" is \'qwen2\', expected one of']),
    "quantization_config": (_set("quantization_config", "fp8"), ["quantization_config is malformed"]),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_config_json_field(tmp_path, sources, case):
    edit, expected = HF_CASES[case]
    model = copy(sources[1], tmp_path)
    edit_json(model / "config.json", edit)
    assert_names(load_error(model), f"{model / 'config.json'}: ", *expected)


def test_config_built_in_code_is_checked(tiny_cfg):
    import dataclasses

    with pytest.raises(CheckpointError, match='ModelConfig: "n_heads" is 0, expected a positive integer'):
        dataclasses.replace(tiny_cfg, n_heads=0)
    with pytest.raises(CheckpointError, match='"n_heads" is 4, which is not a multiple of "n_kv_heads" 3'):
        dataclasses.replace(tiny_cfg, n_kv_heads=3)
    # Integral values of other types are normalized, not refused.
    cfg = dataclasses.replace(tiny_cfg, dim=np.int64(64), n_layers=2.0)
    assert type(cfg.dim) is int and type(cfg.n_layers) is int and cfg == tiny_cfg


def test_dummy_load_format_names_params_json(tmp_path, tiny_cfg):
    (tmp_path / "params.json").write_text(json.dumps(tiny_cfg.to_mistral_params() | {"n_heads": 0}))
    msg = load_error(tmp_path, load_format="dummy")
    assert_names(msg, f"{tmp_path / 'params.json'}: \"n_heads\" is 0")


def test_orbax_marker(tmp_path, tiny_cfg):
    (tmp_path / "weights").mkdir()
    marker = tmp_path / "mistral_jax.json"
    marker.write_text(json.dumps({"format": "mistral_jax-orbax", "version": 2,
                                  "config": tiny_cfg.to_mistral_params() | {"dim": "64"}}))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_names(str(e.value), f'{marker}: "dim" is the string "64"')
    marker.write_text('{"format": "mistral_jax-orbax",')
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_names(str(e.value), f"{marker}: invalid JSON at line 1")


# ---- safetensors files -------------------------------------------------------------------------


def _header_size(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


# name -> (the broken file's bytes from the good file's, what the message must say about it).
# Sizes in the messages are computed from the good file: header size n, file size N.
SAFETENSORS_CASES = {
    "empty": (lambda d: b"", lambda n, N: ["empty (0 bytes)"]),
    "4 bytes": (lambda d: d[:4], lambda n, N: ["4 bytes, too short for a safetensors file"]),
    "cut in header": (lambda d: d[:8 + _header_size(d) // 2],
                      lambda n, N: [f"truncated inside its header: the file is {8 + n // 2} bytes, "
                                    f"its header alone says {8 + n}"]),
    "cut after header": (lambda d: d[:8 + _header_size(d)],
                         lambda n, N: [f"truncated: the file is {8 + n} bytes, its header says {N} "
                                       f"({N - 8 - n} bytes of tensor data missing)"]),
    "cut in data": (lambda d: d[:len(d) // 2],
                    lambda n, N: [f"truncated: the file is {N // 2} bytes, its header says {N}"]),
    "1 byte short": (lambda d: d[:-1], lambda n, N: [f"truncated: the file is {N - 1} bytes, its header says {N} "
                                                     "(1 byte of tensor data missing)"]),
    "trailing bytes": (lambda d: d + bytes(10), lambda n, N: [f"10 bytes past its last tensor: the file is {N + 10}"]),
    "garbage": (lambda d: np.random.default_rng(0).bytes(4096),
                lambda n, N: ["not a safetensors file: its first 8 bytes"]),
    "garbage header": (lambda d: (16).to_bytes(8, "little") + b"\xff" * 16 + d[8 + _header_size(d):],
                       lambda n, N: ["not a safetensors file: its 16-byte header is not valid JSON"]),
    "corrupt header": (lambda d: (16).to_bytes(8, "little") + b'{"a": [1, 2, 3' + b" " * 2,
                       lambda n, N: ["corrupt: its 16-byte header is not valid JSON"]),
    "Git LFS pointer": (lambda d: b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 17173656\n",
                        lambda n, N: ["a Git LFS pointer (", "git lfs pull"]),
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
@pytest.mark.parametrize("layout, weights", [(0, "consolidated.safetensors"), (1, "model.safetensors")])
def test_safetensors_file(tmp_path, sources, layout, weights, case):
    breaks, expected = SAFETENSORS_CASES[case]
    model = copy(sources[layout], tmp_path)
    good = (model / weights).read_bytes()
    (model / weights).write_bytes(breaks(good))
    msg = load_error(model)
    assert_names(msg, f"{model / weights}: ", *expected(_header_size(good), len(good)))


def test_safetensors_tensor_bytes_disagree_with_its_shape(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    file = model / "consolidated.safetensors"
    data = file.read_bytes()
    n = _header_size(data)
    header = json.loads(data[8:8 + n])
    header["norm.weight"]["shape"] = [32]  # 64 floats' bytes for 32
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    raw = raw.ljust(n)  # safetensors pads its header with spaces too
    file.write_bytes(data[:8] + raw + data[8 + n:])
    assert_names(load_error(model), f"{file}: corrupt: tensor 'norm.weight' (F32 (32,)) takes 128 bytes, "
                                    "its header gives it 256")


def test_safetensors_broken_link(tmp_path, sources):
    model = copy(sources[1], tmp_path)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(tmp_path / "blobs" / "gone")
    assert_names(load_error(model), f"{model / 'model.safetensors'}: a broken symbolic link")


def test_hf_index(tmp_path, sources):
    model = copy(sources[1], tmp_path)
    index = model / "model.safetensors.index.json"
    index.write_text('{"metadata": {}, "weight_map": ')
    assert_names(load_error(model), f"{index}: invalid JSON at line 1")
    index.write_text('{"metadata": {}}')
    assert_names(load_error(model), f'{index}: no "weight_map"')
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    assert_names(load_error(model), f"{index} lists model-00002-of-00002.safetensors, which does not exist")


# ---- tensors against the config ----------------------------------------------------------------


def _rewrite(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_wrong_shape_names_the_fields(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    _rewrite(model / "consolidated.safetensors",
             lambda t: t.update({"layers.1.attention.wk.weight": np.zeros((64, 64), np.float32)}))
    assert_names(load_error(model),
                 f"{model / 'consolidated.safetensors'}: tensor 'layers.1.attention.wk.weight': shape (64, 64), "
                 f"expected (48, 64) = (n_kv_heads * head_dim, dim) from {model / 'params.json'}",
                 "the weights and params.json disagree")


def test_hf_wrong_shape_names_hf_fields(tmp_path, sources):
    model = copy(sources[1], tmp_path)
    _rewrite(model / "model.safetensors",
             lambda t: t.update({"model.layers.0.mlp.down_proj.weight": np.zeros((64, 128), np.float32)}))
    assert_names(load_error(model),
                 f"{model / 'model.safetensors'}: tensor 'model.layers.0.mlp.down_proj.weight' "
                 f"(layers.0.feed_forward.w2.weight): shape (64, 128), expected (64, 160) = "
                 f"(hidden_size, intermediate_size) from {model / 'config.json'}")


def test_config_disagreeing_with_weights(tmp_path, sources):
    # A valid config, but not this model's: the first tensor whose shape it gets wrong says which fields.
    model = copy(sources[0], tmp_path)
    edit_json(model / "params.json", _set("hidden_dim", 128))
    assert_names(load_error(model), "shape (160, 64), expected (128, 64) = (hidden_dim, dim)")


def test_missing_tensor(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    _rewrite(model / "consolidated.safetensors", lambda t: t.pop("layers.0.feed_forward.w3.weight"))
    assert_names(load_error(model), f"{model}: 1 of 21 tensors missing: layers.0.feed_forward.w3.weight",
                 "re-download the checkpoint")


def test_fewer_layers_than_the_config(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    _rewrite(model / "consolidated.safetensors",
             lambda t: [t.pop(name) for name in list(t) if name.startswith("layers.1.")])
    assert_names(load_error(model), "9 of 21 tensors missing",
                 f'the files hold 1 of the 2 layers that "n_layers" in {model / "params.json"} says')


def test_more_layers_than_the_config(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    edit_json(model / "params.json", _set("n_layers", 1))
    assert_names(load_error(model), "tensor 'layers.1.", "unknown tensor, not part of a 1-layer model",
                 f'the weights hold more layers than "n_layers" 1 in {model / "params.json"}')


def test_integer_dtype(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    _rewrite(model / "consolidated.safetensors", lambda t: t.update({"norm.weight": np.ones(64, np.int32)}))
    assert_names(load_error(model), f"{model / 'consolidated.safetensors'}: tensor 'norm.weight': dtype I32, "
                                    "expected a float dtype", "re-export the checkpoint")


# ---- GGUF --------------------------------------------------------------------------------------


def _gguf_set_u32(data: bytes, key: str, value: int) -> bytes:
    """The file with metadata `key` (a u32) set to `value`, in place."""
    field = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", 4)
    at = data.index(field) + len(field)
    return data[:at] + struct.pack("<I", value) + data[at + 4:]


GGUF_CASES = {
    "empty": (lambda d: b"", lambda N: ["empty (0 bytes), expected a GGUF file"]),
    "garbage": (lambda d: np.random.default_rng(0).bytes(4096), lambda N: ["not a GGUF file: it starts with"]),
    "magic only": (lambda d: d[:4], lambda N: ["truncated or corrupt GGUF header: reading byte 4 of 4 failed"]),
    "cut in counts": (lambda d: d[:20], lambda N: ["truncated or corrupt GGUF header: reading byte 4 of 20"]),
    "cut in metadata": (lambda d: d[:200], lambda N: ["truncated or corrupt GGUF header", "of 200 failed"]),
    "cut in tensor infos": (lambda d: d[:1200], lambda N: ["truncated or corrupt GGUF header", "of 1200 failed"]),
    "cut in data": (lambda d: d[:len(d) // 2],
                    lambda N: [f"truncated: the file is {N // 2} bytes, its header says tensor"]),
    "1 byte short": (lambda d: d[:-1], lambda N: [f"truncated: the file is {N - 1} bytes, its header says tensor "
                                                  f"'blk.1.ffn_up.weight' ends at byte {N}"]),
    "version": (lambda d: d[:4] + struct.pack("<I", 7) + d[8:], lambda N: ["GGUF version 7; versions 2 and 3"]),
    "head_count 0": (lambda d: _gguf_set_u32(d, "llama.attention.head_count", 0),
                     lambda N: ['"llama.attention.head_count" is 0, expected a positive integer']),
    "head_count_kv not dividing": (lambda d: _gguf_set_u32(d, "llama.attention.head_count_kv", 3),
                                   lambda N: ['"llama.attention.head_count" is 4, which is not a multiple of '
                                              '"llama.attention.head_count_kv" 3']),
    "key_length wrong": (lambda d: _gguf_set_u32(d, "llama.attention.key_length", 16),
                         lambda N: ["tensor 'blk.0.attn_q.weight' (layers.0.attention.wq.weight): shape (96, 64), "
                                    "expected (64, 64) = (llama.attention.head_count * llama.attention.key_length, "
                                    "llama.embedding_length)"]),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_file(tmp_path, sources, case):
    breaks, expected = GGUF_CASES[case]
    _, _, gguf_file, tokenizer = sources
    good = gguf_file.read_bytes()
    model = tmp_path / "tiny.gguf"
    model.write_bytes(breaks(good))
    # The tiny GGUF carries no tokenizer: the v3 file stands in, so that only the weights can fail.
    assert_names(load_error(model, tokenizer=str(tokenizer)), f"{model}: ", *expected(len(good)))


# ---- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_garbage(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    (model / "tokenizer.model.v3").write_bytes(np.random.default_rng(0).bytes(500))
    msg = load_error(model, TokenizerError)
    assert_names(msg, f"{model / 'tokenizer.model.v3'}: not a valid tokenizer file", "tokenizer=PATH")


def test_tokenizer_empty_tekken(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    (model / "tekken.json").write_text("{")  # tekken.json wins over tokenizer.model.v3
    assert_names(load_error(model, TokenizerError), f"{model / 'tekken.json'}: not a valid tokenizer file")


def test_tokenizer_json_garbage(tmp_path, sources):
    model = copy(sources[1], tmp_path)
    (model / "tokenizer.model.v3").unlink()
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    assert_names(load_error(model, TokenizerError), f"{model / 'tokenizer.json'}: not a valid tokenizer file")


def test_tokenizer_broken_link(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    (model / "tokenizer.model.v3").unlink()
    (model / "tokenizer.model.v3").symlink_to(tmp_path / "blobs" / "gone")
    assert_names(load_error(model, TokenizerError), f"{model / 'tokenizer.model.v3'}: a broken symbolic link")


def test_tokenizer_unreadable(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    (model / "tokenizer.model.v3").unlink()
    (model / "tokenizer.model.v3").mkdir()  # not a file (tests run as root: a permission denial cannot be made)
    assert_names(load_error(model, TokenizerError), f"{model / 'tokenizer.model.v3'}: a directory, not a file")


def test_tokenizer_missing(tmp_path, sources):
    model = copy(sources[0], tmp_path)
    (model / "tokenizer.model.v3").unlink()
    assert_names(load_error(model, FileNotFoundError), f"no tokenizer in {model}: looked for tekken.json",
                 "pass tokenizer=PATH")
    assert_names(load_error(sources[0], FileNotFoundError, tokenizer=str(tmp_path / "nope.model")),
                 f"no tokenizer: {tmp_path / 'nope.model'} does not exist")


def test_tokenizer_config_json(tmp_path, sources):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    model = copy(sources[1], tmp_path)
    (model / "tokenizer.model.v3").unlink()  # so that Hugging Face's tokenizer files are read
    Tokenizer(WordLevel({"<s>": 0, "</s>": 1, "a": 2}, unk_token="a")).save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text('{"eos_token": "</s>",, }')
    assert_names(load_error(model), f"{model / 'tokenizer_config.json'}: invalid JSON at line 1, column 22")
