"""Which tokenizer a model path names, per tokenizer_mode, and reading it with errors that name
the file and the fix."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mistral_jax.tokenizer.base import PASS_TOKENIZER, Tokenizer, TokenizerError
from mistral_jax.tokenizer.hf import HFTokenizer
from mistral_jax.tokenizer.mistral import MistralTokenizer

TOKENIZER_MODES = ("auto", "mistral", "hf")  # vLLM's tokenizer_mode values
_MISTRAL_FILES = ("tekken.json", "tokenizer.model.v*")


def load_tokenizer(model_path: str | Path, mode: str = "auto") -> Tokenizer:
    """A .gguf file, a tokenizer file, or a model directory. mode (vLLM's tokenizer_mode): "auto",
    Mistral files (tekken.json, tokenizer.model.v*) win over Hugging Face's tokenizer.json, since
    they carry the exact template; "mistral": only those (mistral-common); "hf": only
    tokenizer.json (or a GGUF file's own tokenizer)."""
    from mistral_jax.config import CheckpointError  # not from .checkpoint: that would import JAX into HTTP processes

    if mode not in TOKENIZER_MODES:
        raise ValueError(f"tokenizer_mode={mode!r} is not one of {TOKENIZER_MODES}")
    file, read = _find_tokenizer(Path(model_path), mode)
    if mode != "auto" and (mode == "mistral") != (read is MistralTokenizer):
        raise TokenizerError(f"{file} is not a {mode} tokenizer file (tokenizer_mode={mode!r}). Fix: pass "
                             f"{'tekken.json or tokenizer.model.v*' if mode == 'mistral' else 'tokenizer.json'}, "
                             "or tokenizer_mode='auto'")
    if file.is_symlink() and not file.exists():  # a Hugging Face cache whose blob is gone
        raise TokenizerError(f"{file}: a broken symbolic link (to {os.readlink(file)}). Fix: re-download it")
    if file.is_dir():
        raise TokenizerError(f"{file}: a directory, not a file. "
                             f"Fix: put the tokenizer file there, or pass {PASS_TOKENIZER}")
    try:
        return read(file)
    except (TokenizerError, CheckpointError):  # ours: they name the file already
        raise
    except OSError as e:
        raise TokenizerError(f"{file}: cannot be read ({e.strerror or e}). "
                             "Fix: make it a readable file (check its permissions), or re-download it") from e
    except Exception as e:  # noqa: BLE001  the libraries' own errors (RuntimeError, KeyError, ...) name no file
        raise TokenizerError(f"{file}: not a valid tokenizer file ({type(e).__name__}: {e}). "
                             f"Fix: re-download it, or pass another with {PASS_TOKENIZER}") from e


def _find_tokenizer(path: Path, mode: str = "auto") -> tuple[Path, Callable[[Path], Tokenizer]]:
    """The tokenizer file that `path` (a file, or a directory to look in) names, and its reader.
    In a directory, mode "auto" takes Mistral's files first, then Hugging Face's (or a GGUF's);
    "mistral" and "hf" take only their own kind."""
    if path.is_file() or path.is_symlink():
        if path.suffix == ".gguf":
            return path, HFTokenizer.from_gguf
        if path.name == "tokenizer.json":
            return path, _from_tokenizer_json
        return path, MistralTokenizer  # tekken*.json, tokenizer.model.v*
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer: {path} does not exist. Fix: pass an existing file or directory")
    found = (_mistral_tokenizer_file(path) if mode != "hf" else None) or (
        _hf_tokenizer_file(path) if mode != "mistral" else None)
    if found is not None:
        return found
    looked = {"auto": f"{', '.join(_MISTRAL_FILES)}, tokenizer.json or a single .gguf file",
              "mistral": "tekken.json or tokenizer.model.v* (tokenizer_mode='mistral')",
              "hf": "tokenizer.json or a single .gguf file (tokenizer_mode='hf')"}[mode]
    other = "" if mode == "auto" else " or another tokenizer_mode"
    raise FileNotFoundError(f"no tokenizer in {path}: looked for {looked}. Fix: add the model's tokenizer "
                            f"file{other}, or pass {PASS_TOKENIZER}")


def _from_tokenizer_json(file: Path) -> Tokenizer:
    return HFTokenizer.from_hf_dir(file.parent)


def _mistral_tokenizer_file(path: Path):
    if (path / "tekken.json").is_file():
        return path / "tekken.json", MistralTokenizer
    sentencepiece = sorted(path.glob("tokenizer.model.v*"))
    if len(sentencepiece) > 1:  # no safe guess: the version decides the prompt format
        raise ValueError(f"several tokenizers in {path}: {[p.name for p in sentencepiece]}. "
                         f"Fix: pass the model's one with {PASS_TOKENIZER}")
    return (sentencepiece[0], MistralTokenizer) if sentencepiece else None


def _hf_tokenizer_file(path: Path):
    if (path / "tokenizer.json").is_file():
        return path / "tokenizer.json", _from_tokenizer_json
    ggufs = sorted(path.glob("*.gguf"))
    return (ggufs[0], HFTokenizer.from_gguf) if len(ggufs) == 1 else None
