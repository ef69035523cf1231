"""Pallas kernels, each beside a plain-jnp reference of the same function, one folder per family
behind one dispatcher function (the family package's __init__):

    fp8_matmul/              W8A8 FP8 matmul: fp8_matmul, fp8_matmul_group, fp8_swiglu, quantize_input
    ragged_paged_attention/  ragged_paged_attention over a paged KV cache, write_kv_pages
    activations.py           RMSNorm and silu_mul in jnp (the model's and the fused quantizer's)
    gpu_info.py              what the GPU kernels' static plans need to know about the device

The bottom layer: nothing here imports mistral_jax. Imports run downwards only (dispatcher ->
kernels -> a family's reference and common -> activations, gpu_info); tests/test_kernel_imports.py
checks both.
"""
