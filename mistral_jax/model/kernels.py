"""Which kernel runs each hot operation, chosen in one place, once per engine.

    kernels = choose_kernels(platform, attention="auto", fp8="auto")
    kernels.attention     the ragged paged attention's impl, never "auto" (PagedKVCache.impl)
    kernels.fp8           the FP8 matmul's impl, carried by every Fp8Weight (projections.py)
    kernels.input_major   16-bit projections stored [in..., out...] (Transformer.to_input_major)

The model's forward pass picks nothing: a projection's product follows its weight's type
(projections.linear), the attention's its cache's `impl`.

Importing this module imports no JAX (the server's HTTP processes and argument parsing read the
name tables); the tables must equal pallas_kernels' own (tests/test_layers.py checks them).
"""

from __future__ import annotations

import dataclasses

ATTENTION_IMPLS = ("auto", "reference", "triton", "tpu")  # pallas_kernels.ragged_paged_attention.IMPLS
FP8_IMPLS = ("auto", "reference", "xla", "triton", "mgpu", "tpu")  # pallas_kernels.fp8_matmul.IMPLS
QUANTIZATIONS = (None, "fp8")  # fp8: e4m3 projection weights + per-output-channel scales (W8A8)

# The FP8 implementations that are plain jnp: XLA's partitioner splits them over a tp mesh like
# any other op. The others are Pallas calls, which XLA cannot partition: they run once per shard
# (fp8_tp.py).
FP8_JNP_TWINS = ("reference", "xla")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernels one engine runs on its platform (choose_kernels); hashable, so it may be a
    static argument."""

    platform: str  # the devices' platform: "cpu", "gpu"/"cuda", "tpu"
    attention: str  # ragged_paged_attention's impl: "reference", "triton" or "tpu"
    # fp8_matmul's impl. On the GPU "auto" stays "auto": the kernel depends on each product's
    # rows (Triton up to fp8_matmul.GPU_TRITON_MAX_M, wgmma above), so fp8_matmul.default_impl
    # picks it per product; elsewhere it names one implementation for every shape.
    fp8: str

    @property
    def input_major(self) -> bool:
        """Whether 16-bit projections are served stored [in..., out...]: prefers_input_major."""
        return prefers_input_major(self.platform)

    @property
    def fp8_per_shard(self) -> bool:
        """Whether an FP8 product on a tp mesh runs once per shard (a Pallas kernel, or "auto")."""
        return fp8_per_shard(self.fp8)

    def describe_fp8(self) -> str:
        """What `fp8` runs, for logs: "auto" on GPU names both regimes."""
        from pallas_kernels.fp8_matmul import describe_impl

        return describe_impl(self.fp8, self.platform)


def choose_kernels(platform: str | None = None, attention: str = "auto", fp8: str = "auto") -> Kernels:
    """The kernels for `platform` (None: JAX's default backend): "auto" attention resolves to the
    platform's Pallas kernel (the jnp reference on CPU); an explicit name is kept."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={attention!r} is not one of {ATTENTION_IMPLS}")
    if fp8 not in FP8_IMPLS:
        raise ValueError(f"fp8_impl={fp8!r} is not one of {FP8_IMPLS}")
    if platform is None:
        import jax

        platform = jax.default_backend()
    if attention == "auto":
        from pallas_kernels.ragged_paged_attention import default_impl

        attention = default_impl(platform)
    if fp8 == "auto" and platform not in ("gpu", "cuda"):
        # One implementation for every shape there, named now for this platform: left "auto", a
        # product would resolve it against JAX's default backend, which differs from `platform`
        # where programs are made for another one (lowering for TPU on a CPU).
        from pallas_kernels.fp8_matmul import default_impl as fp8_default

        fp8 = fp8_default(platform)
    return Kernels(platform=platform, attention=attention, fp8=fp8)


def fp8_per_shard(impl: str) -> bool:
    """Whether fp8_matmul's `impl` runs once per tp shard (not a jnp twin): see FP8_JNP_TWINS."""
    return impl not in FP8_JNP_TWINS


def prefers_input_major(platform: str | None = None) -> bool:
    """Whether 16-bit projections run faster stored [in..., out...] (x @ w) than as checkpoints
    store them, [out..., in...] (x @ w.T), and as 2-D products: on XLA:CPU, whose dot with
    [out, in] weights at a few rows, or with two output or two contracted dims, runs several
    times slower (docs/performance.md). GPUs and TPUs run the checkpoints' layout (cuBLAS and
    the TPU take either)."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    return platform == "cpu"
