"""What the GPU kernels' static plans need to know about the device, in one place."""

from __future__ import annotations

import jax

DEFAULT_SMS = 132  # H100 SXM: the plan used in interpret mode and when the device does not say


def num_sms() -> int:
    """Streaming multiprocessors of the first device (DEFAULT_SMS where it reports none)."""
    try:
        return int(getattr(jax.devices()[0], "core_count", 0) or 0) or DEFAULT_SMS
    except Exception:  # pragma: no cover
        return DEFAULT_SMS


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
