"""FP8 checkpoints: llm-compressor's compressed-tensors "FP8 dynamic" scheme, validated up front.

What we run (W8A8, as vLLM does): projection weights in float8_e4m3fn [out, in] with one scale
per output channel (`<name>.weight_scale` [out, 1]), activations quantized per token at run time.
Anything else (static activation scales, block/group/tensor strategies, int8, other bit widths)
is refused here, naming the setting, before any tensor is read.
"""

from __future__ import annotations

from mistral_jax.loading.checkpoint.base import CheckpointError

FP8_DTYPE = "F8_E4M3"  # safetensors' name of float8_e4m3fn
PROJECTIONS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_FIX = ("re-quantize with llm-compressor's FP8_DYNAMIC scheme (channel-wise e4m3 weights, dynamic "
        "per-token activations), or load the 16-bit checkpoint with quantization=\"fp8\"")


def is_projection(name: str) -> bool:
    """layers.N.attention.wq.weight (or .weight_scale) -> True; embeddings, norms, head -> False."""
    parts = name.split(".")
    return len(parts) == 5 and f"{parts[2]}.{parts[3]}" in PROJECTIONS


def _expect(where: str, what: str, value, wanted) -> None:
    if value not in wanted:
        raise CheckpointError(f"{where}: {what} is {value!r}; supported: {wanted}. Fix: {_FIX}")


def parse_compressed_tensors(qcfg: dict, where: str) -> str:
    """A config.json `quantization_config` -> "fp8", or a CheckpointError naming what is unsupported."""
    _expect(where, "quantization_config.quant_method", qcfg.get("quant_method"), ("compressed-tensors",))
    _expect(where, "quantization_config.format", qcfg.get("format"), ("float-quantized", "naive-quantized"))
    groups = qcfg.get("config_groups") or {}
    if not groups:
        raise CheckpointError(f"{where}: quantization_config has no config_groups. Fix: {_FIX}")
    for group_name, group in groups.items():
        g = f"quantization_config.config_groups.{group_name}"
        _expect(where, f"{g}.targets", sorted(group.get("targets") or []), (["Linear"],))
        weights = group.get("weights") or {}
        _expect(where, f"{g}.weights.type", weights.get("type"), ("float",))
        _expect(where, f"{g}.weights.num_bits", weights.get("num_bits"), (8,))
        _expect(where, f"{g}.weights.strategy", weights.get("strategy"), ("channel",))
        _expect(where, f"{g}.weights.symmetric", weights.get("symmetric", True), (True,))
        _expect(where, f"{g}.weights.dynamic", weights.get("dynamic", False), (False,))
        acts = group.get("input_activations")
        if acts is None:
            raise CheckpointError(f"{where}: {g}.input_activations is missing (weight-only FP8); we run "
                                  f"dynamic per-token FP8 activations. Fix: {_FIX}")
        _expect(where, f"{g}.input_activations.dynamic", acts.get("dynamic"), (True,))
        _expect(where, f"{g}.input_activations.strategy", acts.get("strategy"), ("token",))
        _expect(where, f"{g}.input_activations.type", acts.get("type", "float"), ("float",))
        _expect(where, f"{g}.input_activations.num_bits", acts.get("num_bits", 8), (8,))
    if qcfg.get("kv_cache_scheme"):
        raise CheckpointError(f"{where}: quantization_config.kv_cache_scheme is set; an FP8 KV cache is "
                              "not supported. Fix: export without kv_cache_scheme")
    ignored = [name for name in qcfg.get("ignore") or [] if name != "lm_head"]
    if ignored:
        raise CheckpointError(f"{where}: quantization_config.ignore lists {ignored[:5]}; only 'lm_head' may "
                              f"stay unquantized (every layer projection must be FP8). Fix: {_FIX}")
    return "fp8"


def scale_shapes(weight_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every projection's `<name>.weight_scale`: [out, 1], one scale per output channel."""
    return {name + "_scale": (shape[0], 1) for name, shape in weight_shapes.items() if is_projection(name)}
