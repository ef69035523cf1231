"""End-to-end generation benchmark: random weights of a real Mistral-Small shape, no files.

    python benchmarks/bench_generate.py --engine ours --config mistral-small-2501 --out ours.json
    python benchmarks/bench_generate.py --engine hf   --config mistral-small-2501 --out hf.json
    python benchmarks/bench_generate.py --engine ceilings --out ceil.json
    python benchmarks/bench_generate.py --table ceil.json ours.json hf.json

Each engine runs in its own process so that two copies of a 47 GB model never share the GPU.
Reported: prefill tokens/s (batch 1 at 512 and 4096 tokens, time to first token), decode
tokens/s at batch 1, 8 and 32 (128-token prompts), compile time, and the ceilings they are
measured against: decode = HBM bandwidth / weight bytes (per step), prefill = matmul rate / FLOPs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import harness
import numpy as np

import mistral_jax  # noqa: F401  (applies the engine's XLA flags before JAX starts, ceilings included)

PREFILL_LENS = (512, 4096)
DECODE_BATCHES = (1, 8, 32)
DECODE_PROMPT = 128
DECODE_TOKENS = 64


def _versions() -> dict:
    out = {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    for mod in ("jax", "jaxlib", "flax", "torch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed in this world
            pass
    return out


def _random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, vocab, size=length).tolist() for _ in range(batch)]


# ---- ceilings ---------------------------------------------------------------------------------

def ceilings() -> dict:
    import jax
    import jax.numpy as jnp

    def median_time(f, *args, n=10):
        jax.block_until_ready(f(*args))
        times = []
        for _ in range(n):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.bfloat16)  # 2 GiB, random
    copy = jax.jit(lambda a: a * 2)
    t = median_time(copy, x)
    bw = 2 * x.nbytes / t  # read + write
    del x
    n = 8192
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    t = median_time(mm, a, b)
    return {"device": str(jax.devices()[0].device_kind), "hbm_bytes_per_s": bw,
            "bf16_matmul_flops_per_s": 2 * n**3 / t, "versions": _versions()}


# ---- ours -------------------------------------------------------------------------------------

def random_engine(config: str, dtype: str, quantization: str | None = None, fp8_impl: str = "auto",
                  mesh: str | None = None, **engine_settings):
    """An Engine over random weights of a named config (quantization None or "fp8": e4m3
    projections, per-channel scales; mesh: a --mesh spec such as "tp=2", default one device),
    with a tokenizer that only counts ids.
    Returns (engine, cfg, seconds to build the weights on the device)."""
    import jax

    from mistral_jax.config import ModelConfig
    from mistral_jax.engine.engine import Engine, EngineConfig
    from mistral_jax.entrypoints.llm import resolve_dtype
    from mistral_jax.loading.weights import random_weights
    from mistral_jax.runtime.sharding import parse_mesh
    from mistral_jax.tokenizer import Tokenizer

    class IdsOnly(Tokenizer):
        """Random weights emit random ids: no text to detokenize (the peer does not either)."""

        bos_id, eos_id, stop_token_ids = 1, 2, frozenset()

        def decode(self, ids, skip_special_tokens=True):
            return ""

    cfg = ModelConfig.named(config)
    mesh = parse_mesh(mesh)
    t = time.perf_counter()
    model = random_weights(cfg, resolve_dtype(dtype), mesh, quantization=quantization, fp8_impl=fp8_impl)
    jax.block_until_ready(nnx_state(model))
    init_s = time.perf_counter() - t
    settings = {"max_model_len": cfg.max_seq_len, **engine_settings}
    return Engine(model, IdsOnly(), mesh, EngineConfig(**settings)), cfg, init_s


def bench_ours(config: str, dtype: str, quantization: str | None = None, fp8_impl: str = "auto",
               decode_batches=DECODE_BATCHES, prefill_lens=PREFILL_LENS, mesh: str | None = None) -> dict:
    import jax

    from mistral_jax.sample.sampling import SamplingParams

    # Each prefill in one step (as issue 2's dense engine did), to compare like with like.
    engine, cfg, init_s = random_engine(config, dtype, quantization, fp8_impl, mesh,
                                        max_num_seqs=max(decode_batches, default=1),
                                        max_num_batched_tokens=max(prefill_lens), enable_prefix_caching=False)
    # Bytes a decode step must read: every parameter (fp8 projections are 1 byte each).
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.state))

    def run(prompts, max_tokens):
        """Returns (time to first event, time of last event - first event, events)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(p, params, index=i)
        first = last = None
        for _ in engine.run():
            last = time.perf_counter()
            first = first or last
        return first - t0, last - first

    shape, processes = dict(engine.mesh.shape), jax.process_count()
    name = ("mistral_jax" + (f" {quantization} ({fp8_impl})" if quantization else "")
            + (f" tp={shape['tp']}" if engine.mesh.devices.size > 1 else "")
            + (f" dp={shape['dp']}" if shape["dp"] > 1 else "")
            + (f", {processes} processes" if processes > 1 else ""))
    out = {"engine": name, "config": config, "dtype": dtype, "quantization": quantization,
           "mesh": shape, "processes": processes,
           "init_seconds": init_s, "params": cfg.num_params(), "weight_bytes": weight_bytes,
           "prefill": {}, "decode": {}, "compile_seconds": {}}
    for length in prefill_lens:
        prompts = _random_prompts(1, length, cfg.vocab_size, length)
        cold, _ = run(prompts, 1)
        warm = statistics.median(run(prompts, 1)[0] for _ in range(3))
        out["compile_seconds"][f"prefill_{length}"] = cold - warm
        out["prefill"][str(length)] = {"ttft_s": warm, "tokens_per_s": length / warm}
    for batch in decode_batches:
        prompts = _random_prompts(batch, DECODE_PROMPT, cfg.vocab_size, batch)
        cold = sum(run(prompts, DECODE_TOKENS))  # the first decode step is dispatched before the first event
        warm = [run(prompts, DECODE_TOKENS) for _ in range(2)]
        dt = statistics.median(rest for _, rest in warm)
        per_step = dt / (DECODE_TOKENS - 1)
        out["compile_seconds"][f"decode_b{batch}"] = max(0.0, cold - statistics.median(map(sum, warm)))
        out["decode"][str(batch)] = {"step_ms": per_step * 1e3, "tokens_per_s": batch / per_step}
    out["versions"] = _versions()
    out["device"] = str(jax.devices()[0].device_kind)
    return out


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


# ---- Hugging Face transformers peer -----------------------------------------------------------

def random_hf_model(config: str, torch_dtype):
    """transformers' Mistral with random weights of a named shape, built on the GPU in torch_dtype
    (an f32 copy of a 24B model would not fit). Returns (model, seconds to build)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from mistral_jax.config import ModelConfig

    cfg = ModelConfig.named(config)
    hc = MistralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                       rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len)
    hc._attn_implementation = "eager"
    torch.set_default_dtype(torch_dtype)
    t = time.perf_counter()
    with torch.device("cuda"):
        model = MistralForCausalLM(hc).eval()
    torch.cuda.synchronize()
    return model, time.perf_counter() - t


def bench_hf(config: str, dtype: str) -> dict:
    import torch

    from mistral_jax.config import ModelConfig

    cfg = ModelConfig.named(config)
    torch_dtype = torch.bfloat16 if dtype in ("bfloat16", "auto") else torch.float32
    model, init_s = random_hf_model(config, torch_dtype)

    def sync_time(f):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    out = {"engine": "transformers (eager)", "config": config, "dtype": str(torch_dtype), "init_seconds": init_s,
           "prefill": {}, "decode": {}}
    with torch.inference_mode():
        for length in PREFILL_LENS:
            ids = torch.tensor(_random_prompts(1, length, cfg.vocab_size, length), device="cuda")
            sync_time(lambda ids=ids: model(ids, logits_to_keep=1))
            warm = statistics.median(sync_time(lambda ids=ids: model(ids, logits_to_keep=1)) for _ in range(3))
            out["prefill"][str(length)] = {"ttft_s": warm, "tokens_per_s": length / warm}
        for batch in DECODE_BATCHES:
            ids = torch.tensor(_random_prompts(batch, DECODE_PROMPT, cfg.vocab_size, batch), device="cuda")

            def gen(n, ids=ids):
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

            sync_time(lambda: gen(4))
            # decode time per step: difference of two lengths cancels the prefill
            t_long = sync_time(lambda: gen(DECODE_TOKENS))
            t_short = sync_time(lambda: gen(8))
            per_step = (t_long - t_short) / (DECODE_TOKENS - 8)
            out["decode"][str(batch)] = {"step_ms": per_step * 1e3, "tokens_per_s": batch / per_step}
    out["versions"] = _versions()
    out["device"] = torch.cuda.get_device_name()
    return out


# ---- table ------------------------------------------------------------------------------------

def table(paths: list[str]) -> str:
    """Each engine's figures next to its own ceiling: decode = HBM bandwidth / the weight bytes a
    step reads (its `weight_bytes`, else 2 bytes per parameter); prefill = matmul rate / FLOPs,
    the rate being the measured bf16 one, doubled for fp8 (Hopper's fp8 tensor-core rate is twice
    its bf16 rate)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    ceil = next((r for r in runs if "hbm_bytes_per_s" in r), None)
    engines = [r for r in runs if "engine" in r]
    params = next((r["params"] for r in engines if "params" in r), None)
    lines = []
    if ceil:
        lines.append(f"Device: {ceil['device']}; versions: {json.dumps(ceil['versions'])}")
        lines.append(f"Measured ceilings: HBM copy {ceil['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
                     f"bf16 matmul {ceil['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")

    def ceiling(r, measure, n):
        if not (ceil and params):
            return None
        if measure == "prefill":
            rate = ceil["bf16_matmul_flops_per_s"] * (2 if r.get("quantization") == "fp8" else 1)
            return rate / (2 * params)  # 2 FLOPs per parameter per token
        return n * ceil["hbm_bytes_per_s"] / r.get("weight_bytes", 2 * params)

    def cell(r, measure, n):
        v = r[measure].get(str(n))
        if v is None:
            return "-"
        c = ceiling(r, measure, n)
        pct = f", {100 * v['tokens_per_s'] / c:.0f}% of {c:,.0f}" if c else ""
        step = f" ({v['step_ms']:.1f} ms)" if "step_ms" in v else ""
        return f"{v['tokens_per_s']:,.1f}{step}{pct}"

    lengths = sorted({int(n) for r in engines for n in r["prefill"]})
    batches = sorted({int(n) for r in engines for n in r["decode"]})
    lines.append("")
    lines.append("| measure | " + " | ".join(r["engine"] for r in engines) + " |")
    lines.append("|---|" + "---|" * len(engines))
    for length in lengths:
        lines.append(f"| prefill 1x{length} tokens/s | "
                     + " | ".join(cell(r, "prefill", length) for r in engines) + " |")
    for batch in batches:
        lines.append(f"| decode batch {batch} tokens/s (step) | "
                     + " | ".join(cell(r, "decode", batch) for r in engines) + " |")
    lines.append("")
    lines.append("Each cell: tokens/s, then % of that engine's own ceiling (see bench_generate.table).")
    for r in engines:
        if "compile_seconds" in r:
            lines.append(f"Compile seconds ({r['engine']}, cold minus warm): " +
                         ", ".join(f"{k} {v:.1f}" for k, v in r["compile_seconds"].items()))
        if "weight_bytes" in r:
            lines.append(f"{r['engine']}: weight bytes per decode step {r['weight_bytes'] / 1e9:.1f} GB")
    return "\n".join(lines)


def scaling(paths: list[str]) -> str:
    """Runs of one config on meshes of several tp sizes: tokens/s, the speed-up over tp=1 and
    the scaling efficiency (speed-up / tp; 100% = each added device worth a whole one)."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths),
                  key=lambda r: (r.get("processes", 1), r.get("mesh", {}).get("tp", 1)))
    base = next((r for r in runs if r.get("mesh", {}).get("tp", 1) == 1), None)
    measures = [("prefill", n) for n in sorted({int(n) for r in runs for n in r["prefill"]})]
    measures += [("decode", n) for n in sorted({int(n) for r in runs for n in r["decode"]})]
    lines = ["| run | " + " | ".join(f"{m} {'1x' if m == 'prefill' else 'batch '}{n} tok/s" for m, n in measures)
             + " |",
             "|---|" + "---|" * len(measures)]
    for r in runs:
        tp, cells = r.get("mesh", {}).get("tp", 1), []
        for m, n in measures:
            v = r[m].get(str(n), {}).get("tokens_per_s")
            b = base[m].get(str(n), {}).get("tokens_per_s") if base else None
            cell = "-" if v is None else f"{v:,.1f}"
            if v is not None and b and tp > 1:
                cell += f" ({v / b:.2f}x, {100 * v / b / tp:.0f}%)"
            cells.append(cell)
        lines.append(f"| {r['engine']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: tokens/s (speed-up over tp=1, scaling efficiency = speed-up / tp).")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=("ours", "hf", "ceilings"))
    p.add_argument("--config", default="mistral-small-2501")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out")
    p.add_argument("--table", nargs="*")
    p.add_argument("--quantization", default="bf16", choices=("bf16", "fp8"), help="ours: projection weights")
    p.add_argument("--fp8-impl", default="auto", help="ours: pallas_kernels.fp8_matmul impl")
    p.add_argument("--decode-batches", default=",".join(map(str, DECODE_BATCHES)))
    p.add_argument("--prefill-lens", default=",".join(map(str, PREFILL_LENS)))
    p.add_argument("--mesh", default=None, help="ours: a mesh such as tp=2 (several processes: the "
                   "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment)")
    p.add_argument("--scaling", action="store_true", help="with --table: tokens/s against tp=1, per tp")
    args = p.parse_args()
    if args.table:
        print(scaling(args.table) if args.scaling else table(args.table))
        return 0
    from mistral_jax.runtime import distributed

    distributed.initialize()  # a no-op unless the environment names a multi-process run
    fn = {"ours": lambda: bench_ours(
        args.config, args.dtype, None if args.quantization == "bf16" else args.quantization, args.fp8_impl,
        tuple(int(b) for b in args.decode_batches.split(",") if b),
        tuple(int(n) for n in args.prefill_lens.split(",") if n),
        args.mesh), "hf": lambda: bench_hf(args.config, args.dtype),
          "ceilings": ceilings}[args.engine]
    result = fn()
    if distributed.is_main_process():  # every process measured the same steps; one reports
        print(json.dumps(result, indent=1))
        if args.out:
            harness.write_result(args.out, "ceilings" if args.engine == "ceilings" else f"generate_{args.engine}",
                                 result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
