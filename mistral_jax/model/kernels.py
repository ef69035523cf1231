"""Which kernel runs each hot operation (attention, FP8 matmul): the names a user may ask for.

Importing this module imports no JAX (the server's HTTP processes and argument parsing read these
names); the tables must equal pallas_kernels' own (tests/test_layers.py checks them).
"""

from __future__ import annotations

ATTENTION_IMPLS = ("auto", "reference", "triton", "tpu")  # pallas_kernels.ragged_paged_attention.IMPLS
FP8_IMPLS = ("auto", "reference", "xla", "triton", "mgpu", "tpu")  # pallas_kernels.fp8_matmul.IMPLS
