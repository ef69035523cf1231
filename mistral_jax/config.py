"""Model configuration: one dataclass, readable from our JSON configs, Mistral `params.json`
and Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


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
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs whole groups"
            )

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
    def from_json(cls, path: str | Path) -> "ModelConfig":
        """Our own config format: the dataclass fields as JSON (see configs/)."""
        data = json.loads(Path(path).read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields - {"name", "_comment"}
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**{k: v for k, v in data.items() if k in fields})

    @classmethod
    def named(cls, name: str) -> "ModelConfig":
        """A config shipped in configs/, e.g. 'mistral-small-2501' or 'tiny'."""
        path = CONFIG_DIR / f"{name}.json"
        if not path.exists():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise FileNotFoundError(f"no config named {name!r} in {CONFIG_DIR}; known: {known}")
        return cls.from_json(path)

    @classmethod
    def from_mistral_params(cls, params: dict) -> "ModelConfig":
        """Mistral's `params.json` (consolidated checkpoints)."""
        return cls(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads", params["n_heads"]),
            head_dim=params.get("head_dim", params["dim"] // params["n_heads"]),
            hidden_dim=params["hidden_dim"],
            vocab_size=params["vocab_size"],
            rope_theta=float(params.get("rope_theta", 1e4)),
            norm_eps=float(params["norm_eps"]),
            tied_embeddings=bool(params.get("tied_embeddings", False)),
            max_seq_len=int(params.get("max_seq_len", params.get("max_position_embeddings", 32768))),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelConfig":
        """A Hugging Face `config.json` of a Mistral or Llama architecture."""
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads", n_heads),
            head_dim=head_dim,
            hidden_dim=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4))),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=int(cfg.get("max_position_embeddings", 32768)),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict, vocab_size: int, tied_embeddings: bool) -> "ModelConfig":
        """A GGUF file's metadata (key -> scalar value). The vocabulary size and the tying come
        from the tensors (token_embd's rows; whether an output.weight exists), which is where
        llama.cpp records them reliably."""
        arch = meta["general.architecture"]
        dim, n_heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
        return cls(
            dim=dim,
            n_layers=meta[f"{arch}.block_count"],
            n_heads=n_heads,
            n_kv_heads=meta.get(f"{arch}.attention.head_count_kv", n_heads),
            head_dim=meta.get(f"{arch}.attention.key_length", dim // n_heads),
            hidden_dim=meta[f"{arch}.feed_forward_length"],
            vocab_size=vocab_size,
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 1e4)),
            norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
            tied_embeddings=tied_embeddings,
            max_seq_len=int(meta.get(f"{arch}.context_length", 32768)),
        )

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
