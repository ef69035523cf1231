"""What the GPU kernels' static plans need to know about the device and its lowering, in one place."""

from __future__ import annotations

import math

import jax
import numpy as np

DEFAULT_SMS = 132  # H100 SXM: the plan used in interpret mode and when the device does not say


def num_sms() -> int:
    """Streaming multiprocessors of the first device (DEFAULT_SMS where it reports none)."""
    try:
        return int(getattr(jax.devices()[0], "core_count", 0) or 0) or DEFAULT_SMS
    except Exception:  # pragma: no cover
        return DEFAULT_SMS


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def triton_offsets_overflow(shape, dtype) -> bool:
    """Whether Pallas's Triton lowering addresses an array of this shape and dtype with 32-bit
    element offsets that pass 2**31.

    The lowering (jax/_src/pallas/triton/lowering.py, `_compute_offsets_from_indices`) uses
    64-bit offsets only for arrays over 2**32 bytes; below that, offsets are i32 and Triton's
    `addptr` sign-extends them. An array of 1-byte elements between 2 and 4 GiB therefore has
    elements whose offset wraps negative: the kernel reads before the buffer (CUDA's illegal
    address). 2-byte and wider dtypes cannot: at most 2**31 elements fit in 2**32 bytes.
    Mistral-Small-2501's FP8 w1, w3 and w2 stacks split over tp=2 are 3.36 GB per GPU."""
    elements = math.prod(shape)
    return elements > 2**31 and elements * np.dtype(dtype).itemsize <= 2**32
