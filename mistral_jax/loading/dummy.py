"""`--load-format dummy` (vLLM's name): random weights of a real shape, for benchmarks with no
checkpoint files. The shape comes from a config shipped in configs/ (`--config
mistral-small-2501`) or a directory holding only `params.json` or `config.json`; the tokenizer
from that directory, or else the one mistral-common bundles for the vocabulary (SentencePiece
v3 for 32,768 tokens, Tekken for 131,072)."""

from __future__ import annotations

from pathlib import Path

from mistral_jax.config import ModelConfig, read_json

BUNDLED_TOKENIZERS = {32768: "mistral_instruct_tokenizer_240323.model.v3", 131072: "tekken_240911.json"}


def dummy_config(spec: str) -> ModelConfig:
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "params.json").is_file():
            return ModelConfig.from_mistral_params(read_json(path / "params.json"), source=path / "params.json")
        if (path / "config.json").is_file():
            return ModelConfig.from_hf_config(read_json(path / "config.json"), source=path / "config.json")
        raise FileNotFoundError(f"{path} holds neither params.json nor config.json: a dummy model needs its shape")
    return ModelConfig.named(spec)  # its error names the configs there are


def dummy_tokenizer(spec: str, cfg: ModelConfig) -> str:
    """The tokenizer for a dummy model: spec's directory's own, or mistral-common's for the vocabulary."""
    from mistral_jax.tokenizer import load_tokenizer

    path = Path(spec).expanduser()
    if path.is_dir():
        try:
            load_tokenizer(path)
            return str(path)
        except FileNotFoundError:
            pass
    if cfg.vocab_size in BUNDLED_TOKENIZERS:
        import mistral_common

        return str(Path(mistral_common.__file__).parent / "data" / BUNDLED_TOKENIZERS[cfg.vocab_size])
    raise FileNotFoundError(f"no tokenizer for a dummy model of {cfg.vocab_size} tokens: pass --tokenizer PATH")
