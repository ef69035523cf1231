"""How many KV pages the engine takes: what the device has left after the weights and a step's
temporaries, or a fixed budget on a CPU, or what the caller asked for."""

from __future__ import annotations

CPU_CACHE_BYTES = 1 << 30  # KV cache on a CPU host when neither num_pages nor a device limit says


def activation_bytes(cfg, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """A generous bound on one step's temporaries (activations, logits, sampling), and the
    logits each step returns (for the top logprobs), held until it is read: two steps' worth."""
    c, t, s = cfg, max_num_batched_tokens, max_num_seqs
    per_token = (8 * c.dim + 3 * c.hidden_dim + 4 * c.n_heads * c.head_dim) * 4
    return t * per_token + (6 + 2) * s * c.vocab_size * 4 + (256 << 20)


def num_pages(per_page: int, *, stats: dict | None, gpu_memory_utilization: float, activations: int, tp: int,
              max_num_seqs: int, max_pages_per_seq: int) -> int:
    """Pages for a cache sized from memory. per_page: a page's bytes over the whole mesh (target
    and draft models); stats: the first device's memory statistics, None on a CPU."""
    if stats is None:  # CPU: enough for max_num_seqs full sequences, within a fixed budget
        want = max_num_seqs * max_pages_per_seq + 1
        return max(2, min(want, CPU_CACHE_BYTES // per_page))
    budget = gpu_memory_utilization * stats["bytes_limit"] - stats.get("bytes_in_use", 0) - activations
    # The budget is one device's; each device holds its 1/tp of every page's kv heads.
    pages = int(budget // (per_page / tp))
    if pages < 2:
        raise ValueError(
            f"no room for a KV cache: gpu_memory_utilization={gpu_memory_utilization} of "
            f"{stats['bytes_limit'] / 2**30:.1f} GiB leaves {budget / 2**30:.2f} GiB after the weights "
            f"({stats.get('bytes_in_use', 0) / 2**30:.1f} GiB) and step buffers: raise "
            "gpu_memory_utilization, lower max_num_batched_tokens / max_num_seqs, or use a smaller dtype")
    return pages
