"""XLA flags the engine sets before JAX starts its backend (the user's own XLA_FLAGS win).

--xla_gpu_enable_triton_gemm=false: on an H100 (JAX 0.11.2) XLA's Triton GEMM path ran the
decode-shaped products of Mistral-Small-2501 at 0.98 TB/s of weights; cuBLAS ran them at
2.19 TB/s (batch-1 decode 47.9 -> 21.5 ms per step) and prefill 1.6x faster
(benchmarks/NOTES.md). The flag only concerns GPUs; CPU and TPU ignore it.

--xla_disable_hlo_passes=dot-merger: XLA's DotMerger joins dots that share an operand (a layer's
k and v projections of the same x) by concatenating their weights, at run time, in every step:
on an H200 that copy (input_concatenate_fusion, 40 per step) cost 1.34 ms of a 14.4 ms bf16
batch-1 decode step. Without the pass: 14.39 -> 13.67 ms at batch 1, 21.38 -> 19.93 ms at
batch 32 (probe_mesh_trace.py, 2026-12-03). FP8 projections are Pallas kernels, not dots.

--xla_gpu_enable_cub_radix_sort=false: XLA:GPU sorts large arrays (the sampler's top-k / top-p
sort at 32 rows x 131k entries) with CUB's radix sort, a custom call that a CUDA graph cannot
hold; the conditional around it (the sampler's "all rows greedy?" branch) then ran as a host
thunk that waited for the device to reach it in every step, so the host could no longer prepare
the next step while the device ran this one. On an H200 (Mistral-Small-2501, JAX 0.11.2, same
call, probes/probe_step_flags.py): batch-32 greedy decode 18.4 -> 14.2 ms per step (bf16) and
13.4 -> 9.3 ms (FP8), batch 32 with top_p 0.9 19.2 -> 15.0 ms; batch 1 unchanged. XLA's own
sort kernels run instead (only in steps that sort at all).

XLA_PYTHON_CLIENT_MEM_FRACTION=0.90: JAX's GPU allocator takes 75% of device memory by default,
so `gpu_memory_utilization` (a fraction of what the allocator may hold) left an H100 serving
Mistral-Small-2501 with 7.9 GB of KV cache instead of ~17 GB. 0.95 was too much: the CUDA
driver then ran out of memory instantiating CUDA graphs (H100, 2026-11-23). The user's own
setting wins.
"""

import os

DEFAULT_FLAGS = {"--xla_gpu_enable_triton_gemm": "false", "--xla_disable_hlo_passes": "dot-merger",
                 "--xla_gpu_enable_cub_radix_sort": "false"}


DEFAULT_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90"}


def apply_default_xla_flags() -> None:
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f"{k}={v}" for k, v in DEFAULT_FLAGS.items() if k not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
