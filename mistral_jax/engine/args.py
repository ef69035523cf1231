"""The engine's command-line flags (vLLM's names), shared by every front door that builds an LLM
(`generate`, `serve`): declared once, turned into LLM's keyword arguments once."""

from __future__ import annotations

import argparse

from mistral_jax.runtime import distributed
from mistral_jax.loading import hub


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a Hugging Face Hub repo id (e.g. mistralai/Mistral-Small-24B-Instruct-2501), a checkpoint "
                        "directory or a .gguf file (default: the embedded SmolLM2-135M-Instruct demo)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU/TPU, f32 on CPU), bfloat16, float32")
    p.add_argument("--quantization", default=None, choices=("fp8",),
                   help="fp8: quantize the projections at load (e4m3 per-channel weights, per-token activations)")
    p.add_argument("--mesh", default=None,
                   help="devices to split the model over, e.g. tp=4 or dp=2,tp=4 (default: one device)")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=None,
                   help="vLLM's name for --mesh tp=N")
    p.add_argument("--max-model-len", type=int, default=None, help="context length to serve (default: the model's)")
    p.add_argument("--load-format", default="auto", choices=hub.LOAD_FORMATS,
                   help="the weights to read (vLLM's): mistral (consolidated*.safetensors), safetensors (Hugging Face "
                        "shards), gguf, auto (the layout --config-format names, else Hugging Face's, Mistral's, GGUF); "
                        "dummy: random weights of the shape --config names (benchmarks without a checkpoint)")
    p.add_argument("--config-format", default="auto", choices=hub.CONFIG_FORMATS,
                   help="mistral (params.json), hf (config.json), auto (config.json if present, else params.json)")
    p.add_argument("--tokenizer-mode", default="auto", choices=hub.TOKENIZER_MODES,
                   help="mistral (mistral-common: tekken.json / tokenizer.model.v*), hf (tokenizer.json), auto "
                        "(Mistral's files when the model has them)")
    p.add_argument("--revision", default=None, help="a Hub repo's branch, tag or commit (default: main)")
    p.add_argument("--download-dir", default=None,
                   help="where Hub downloads go (default: huggingface_hub's cache, $HF_HOME)")
    p.add_argument("--generation-config", default="auto",
                   help="auto: the model's generation_config.json sampling fields are the requests' defaults; "
                        "vllm: none; or a folder holding generation_config.json")
    p.add_argument("--config", default=None,
                   help="with --load-format dummy: a config in configs/ (e.g. mistral-small-2501) or a directory "
                        "holding params.json or config.json")
    p.add_argument("--tokenizer", default=None, help="a tokenizer file or directory (default: the model's)")
    serve = p.add_argument_group("engine (vLLM's names)")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV cache page")
    serve.add_argument("--num-pages", type=int, default=None, help="KV cache pages (default: from memory)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="fraction of device memory for weights + KV cache")
    serve.add_argument("--max-num-seqs", type=int, default=256, help="sequences per step")
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="tokens per step; longer prompts are prefilled in chunks")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV pages of repeated prompt prefixes")
    serve.add_argument("--attention-impl", default="auto", choices=("auto", "reference", "triton", "tpu"),
                       help="ragged paged attention: the Pallas kernel of the backend (auto) or the jnp reference")
    serve.add_argument("--fp8-impl", default="auto", choices=("auto", "reference", "xla", "triton", "mgpu", "tpu"),
                       help="FP8 matmul (with --quantization fp8 or an FP8 checkpoint): auto picks by backend "
                            "and tokens per step (GPU: the Triton kernel for small decode steps, the Mosaic GPU wgmma kernel "
                            "for larger ones and prefill; the log names the thresholds)")
    serve.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                       help="compile every program the settings allow before the first request "
                            "(default: on with an accelerator, off on a CPU; serve: always on)")
    serve.add_argument("--speculative-config", default=None,
                       help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                            "(same output, more tokens per step where the text repeats its context)")
    distributed.add_cli_flags(p)


def llm_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...)'s keyword arguments from add_engine_args' flags."""
    return dict(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, block_size=args.block_size,
                num_pages=args.num_pages, gpu_memory_utilization=args.gpu_memory_utilization,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=args.enable_prefix_caching, attention_impl=args.attention_impl,
                quantization=args.quantization, fp8_impl=args.fp8_impl, mesh=args.mesh, warmup=args.warmup,
                load_format=args.load_format, config=args.config, tokenizer=args.tokenizer,
                speculative_config=args.speculative_config, tokenizer_mode=args.tokenizer_mode,
                config_format=args.config_format, tensor_parallel_size=args.tensor_parallel_size,
                download_dir=args.download_dir, revision=args.revision, generation_config=args.generation_config)


def normalize_flags(argv: list[str]) -> list[str]:
    """vLLM accepts --flag_name and --flag-name alike (its model cards write --tokenizer_mode): the
    underscores of a long flag's name become dashes (never those of its value)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out
