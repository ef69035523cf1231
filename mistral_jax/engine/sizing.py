"""Which slices a model fits, before any device is touched: per chip, the weights (as the
sharding rules split them), a step's temporaries and the KV pages left, by the function that sizes
the engine's cache (cache_size.num_pages), fed the numbers a chip of each kind would report.

    fit(cfg, chip="v6e", tp=4, quantization="fp8")     one slice
    smallest_fit(cfg, quantization=None)                the smallest slice of each chip that fits
    tpu_sizing_table()                                  the README's table (tests/test_sizing.py)

The engine's own start on a TPU names the smallest slice that fits when the cache has no room
(Engine._size_cache)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from mistral_jax.cache.paged import page_bytes
from mistral_jax.config import ModelConfig
from mistral_jax.engine import cache_size

GiB = 2**30
# HBM per chip (Google Cloud's TPU pages); device kinds as JAX names them.
TPU_HBM = {"v5e": 16 * GiB, "v6e": 32 * GiB, "v5p": 95 * GiB, "v7x": 192 * GiB}
TPU_KINDS = {"TPU v5 lite": "v5e", "TPU v6 lite": "v6e", "TPU v5p": "v5p", "TPU v5": "v5p", "TPU7x": "v7x"}
# A TPU keeps part of its HBM for the runtime and program buffers: the allocator's bytes_limit is
# below the card's size. A conservative share, as a GPU's cuda context is on its side.
USABLE = 0.94
TP_SIZES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Fit:
    chip: str
    tp: int
    weights: int  # bytes per chip
    activations: int  # a step's temporaries, bytes per chip (cache_size.activation_bytes)
    kv_tokens: int  # tokens the KV pool holds (0: none fits)
    max_model_len: int

    @property
    def fits(self) -> bool:
        """Room for at least one sequence of the full context."""
        return self.kv_tokens >= self.max_model_len


def weights_per_chip(cfg: ModelConfig, dtype=jnp.bfloat16, quantization: str | None = None, tp: int = 1) -> int:
    """Bytes of one chip's share of the weights: each parameter of the abstract model (nothing
    allocated) divided over the mesh axes its logical axes name (LOGICAL_RULES), replicated
    ones whole."""
    import jax
    from flax import nnx

    from mistral_jax.loading.weights import abstract_model
    from mistral_jax.runtime.sharding import logical_spec

    _, state = nnx.split(abstract_model(cfg, dtype, quantization=quantization))
    sizes = {"tp": tp, "dp": 1}
    total = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value = var.get_value()
        split = math.prod(sizes.get(a, 1) for a in logical_spec(var.get_metadata()["logical_axes"]) if a)
        total += math.ceil(value.size * jnp.dtype(value.dtype).itemsize / split)
    return total


def fit(cfg: ModelConfig, chip: str, tp: int, dtype=jnp.bfloat16, quantization: str | None = None, *,
        max_model_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
        page_size: int = 16, memory_utilization: float = 0.9, kv_dtype=None) -> Fit:
    """What one slice of `tp` chips of kind `chip` holds: cache_size.num_pages with the chip's
    bytes_limit and the weights in use, as the engine would size it there."""
    max_model_len = max_model_len or cfg.max_seq_len
    weights = weights_per_chip(cfg, dtype, quantization, tp)
    activations = cache_size.activation_bytes(cfg, max_num_batched_tokens, max_num_seqs)
    stats = {"bytes_limit": int(TPU_HBM[chip] * USABLE), "bytes_in_use": weights}
    try:
        pages = cache_size.num_pages(page_bytes(cfg, page_size, kv_dtype or dtype), stats=stats,
                                     gpu_memory_utilization=memory_utilization, activations=activations, tp=tp,
                                     max_num_seqs=max_num_seqs, max_pages_per_seq=-(-max_model_len // page_size))
    except ValueError:  # no room at all
        pages = 0
    return Fit(chip, tp, weights, activations, max(0, pages - 1) * page_size, max_model_len)


def smallest_fit(cfg: ModelConfig, dtype=jnp.bfloat16, quantization: str | None = None, chips=None,
                 **settings) -> dict[str, Fit | None]:
    """Per chip kind, the smallest tp (of TP_SIZES, dividing the model's heads) that holds one
    full-context sequence; None where none does."""
    out = {}
    for chip in chips or TPU_HBM:
        out[chip] = next((f for tp in TP_SIZES if _divides(cfg, tp)
                          for f in [fit(cfg, chip, tp, dtype, quantization, **settings)] if f.fits), None)
    return out


def fit_hint(cfg: ModelConfig, dtype, quantization: str | None, **settings) -> str:
    """A sentence naming the smallest slice of each TPU kind that fits, for an error message."""
    found = smallest_fit(cfg, dtype, quantization, **settings)
    named = [f"{chip}-{f.tp}" for chip, f in found.items() if f is not None]
    return (f"slices that fit this model and settings: {', '.join(named)} (chip-tp)" if named
            else "no TPU slice of up to 8 chips fits this model and settings")


def tpu_sizing_table() -> str:
    """The README's table: Mistral-Small 2409 and 2501, bf16 and FP8 weights, per chip kind and
    tp: weights per chip and the KV tokens left at the default serving settings."""
    rows = ["| model | weights | chip (HBM) | " + " | ".join(f"tp={tp}" for tp in TP_SIZES) + " |",
            "|---|---|---|" + "---|" * len(TP_SIZES)]
    for name in ("mistral-small-2409", "mistral-small-2501"):
        cfg = ModelConfig.named(name)
        for quant in (None, "fp8"):
            for chip, hbm in TPU_HBM.items():
                cells = []
                for tp in TP_SIZES:
                    f = fit(cfg, chip, tp, quantization=quant)
                    cells.append(f"{f.weights / GiB:.1f} GiB, {f.kv_tokens // 1000}k tok" if f.fits
                                 else f"no ({f.weights / GiB:.1f} GiB)")
                rows.append(f"| {name} | {quant or 'bf16'} | {chip} ({hbm // GiB} GiB) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _divides(cfg: ModelConfig, tp: int) -> bool:
    return all(n % tp == 0 for n in (cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size))


if __name__ == "__main__":  # the README's table
    print(tpu_sizing_table())
