"""W8A8 FP8 matmul on Hopper above 32 rows: Pallas Mosaic GPU (wgmma + TMA); spec: `reference.py`.

    y [m, n] = (quant(x) [m, k] @ w [n, k].T) * x_scale [m, 1] * w_scale [n]

Why a second GPU kernel: the Triton lowering's fp8 `dot` reaches well under half of Hopper's
fp8 rate, which XLA's fp8 dot (cuBLASLt) comes near (docs/performance.md). That rate needs wgmma
fed by TMA from swizzled shared memory, which only the Mosaic GPU backend emits.

Design
------
* One CTA per SM, persistent: it walks the (m, n) output tiles of the whole product in a band-wise
  snake (`plgpu.planar_snake`) so that neighbouring CTAs share x and w tiles in L2.
* Warp-specialized CTA: one warpgroup issues the TMA copies of x [CTA_M, BK] and w [CTA_N, BK]
  blocks into a ring of `stages` shared-memory slots; `wgs` compute warpgroups each own a
  64 x 128 slice of the CTA tile (side by side along m or n) and run wgmma on every slot
  (`emit_pipeline_warp_specialized`).
* Tiles by regime (`choose_tiles`): 33-64 rows (decode batches), CTA 64 x 256 (two warpgroups
  share the rows, so m pads to 64, not 128); prefill, CTA 192 x 128 (three warpgroups share each
  w tile) where padding m to 192 rows costs <= 5% more rows than to 128; CTA 128 x 128
  otherwise.
* fp8 wgmma may not transpose its operands (only 16-bit ones may be), so its right operand must
  sit in shared memory K-major: w stays [n, k] as the checkpoint stores it and is handed to
  wgmma as a transposed view; x [m, k] is K-major already. BK = 128 fp8 = one 128-byte swizzled
  row.
* Accuracy: Hopper's fp8 wgmma keeps fewer mantissa bits than f32 when it accumulates in place
  (DeepSeek-V3's report): one 128-long K step is already ~1e-4 off (of the largest element),
  and summing all of K in place, as XLA's fp8 dot does, 5e-3 to 1.5e-2 at k = 5-32k. With
  `promote`, each K step's wgmma starts from zero and its sum is added to an f32 total in
  registers, so the error stays that of one step (~2e-4, below bf16 output rounding) at any k.
  The Triton kernel promotes every 32 (<= 9e-6). Promotion costs a second accumulator's
  registers, hence 64 x 128 warpgroup tiles (64 x 256 would spill), and a few percent of the
  rate (docs/performance.md): accuracy first.
* Epilogue per compute warpgroup: both scales apply to the f32 accumulator (the reference's
  order), one cast, then the tile leaves through shared memory in sub-tiles by TMA. The scales
  for the tile are fetched by TMA into shared memory while the K loop runs (a vector loaded in
  a wgmma row/column layout must come from shared memory).
* Split-K: with few output tiles (w2 at 512 tokens: 160 tiles on 132 SMs, so 28 SMs run a
  second wave alone), K is cut into `split_k` ranges that run as separate work items; each
  writes its raw f32 sum to [split_k, M, n] and XLA adds them and applies the scales.
  `choose_split_k` weighs the waves saved against the partials' bytes.
* Stacked weights: the model keeps a projection as one [layers, n, k] array; the kernel takes the
  whole stack and the layer index (a [1] i32 operand) and reads that layer in place (a slice
  handed to a custom call would be copied first, which costs more than the product).
* Shapes: n a multiple of CTA_N, k of BK; m is padded to CTA_M with zero rows (scale 1).

Activation quantization runs before the kernel (`quantize_input`: one Triton kernel that also
pads x's rows).
There is no CPU interpret mode for this kernel: JAX 0.10's Mosaic GPU interpreter handles no
transposed wgmma operand. It is tested on the GPU (`pytest -m gpu`); on CPU, lowering it for
CUDA checks that it builds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fp8_matmul.common import check_stacked, pad_rows, scale_output
from pallas_kernels.fp8_matmul.quantize import quantize_input
from pallas_kernels.fp8_matmul.reference import quantize_unless
from pallas_kernels.gpu_info import num_sms

__all__ = ["Tiles", "choose_split_k", "choose_tiles", "fp8_matmul_mgpu", "supports"]


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Static tiling. A compute warpgroup's accumulator is [tile_m, tile_n] f32; the CTA tile is
    `wgs` of them side by side along `split`."""

    tile_m: int = 64
    tile_n: int = 128
    tile_k: int = 128  # fp8 bytes per row of a block: one 128-byte swizzle
    stages: int = 4  # shared-memory ring depth
    split: str = "m"  # how the compute warpgroups share the CTA tile: "n" or "m"
    wgs: int = 2  # compute warpgroups; 3 leave each 152 registers per thread (2: 232)
    epi_m: int = 64  # epilogue sub-tile (shared memory -> global by TMA)
    epi_n: int = 64
    minor: str = "n"  # the snake's fast axis
    band: int = 8  # the snake's band width, in tiles
    promote: bool = True  # add each K step's wgmma sum into an f32 register total (see below)
    split_k: int | None = None  # K ranges per output tile; None: `choose_split_k`

    @property
    def cta_m(self) -> int:
        return self.tile_m * (self.wgs if self.split == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (self.wgs if self.split == "n" else 1)


# Tiles by regime (module docstring): DECODE_TILES for decode batches above the Triton kernel's
# rows, PREFILL_TILES for long prefills, where three warpgroups share each w tile
# (docs/performance.md).
DECODE_TILES = Tiles(split="n")
DECODE_MAX_M = 64
PREFILL_TILES = Tiles(wgs=3, stages=3)  # 4 stages of 192 + 128 rows exceed shared memory
PREFILL_MAX_PAD = 1.05  # rows padded to 192 over rows padded to 128, at most


def choose_tiles(m: int, n: int, k: int) -> Tiles:
    """The tiling for an (m, n, k) product (see above); the default 128 x 128 CTA otherwise."""
    if m <= DECODE_MAX_M and supports(m, n, k, DECODE_TILES):
        return DECODE_TILES
    rows = lambda t: -(-m // t.cta_m) * t.cta_m  # noqa: E731
    if rows(PREFILL_TILES) <= PREFILL_MAX_PAD * rows(Tiles()) and supports(m, n, k, PREFILL_TILES):
        return PREFILL_TILES
    return Tiles()


def supports(m: int, n: int, k: int, tiles: Tiles | None = None) -> bool:
    """Whether the kernel takes an (m, n, k) product without padding n or k (with `tiles`, or
    with any tiling it would choose: the default's constraints are the loosest)."""
    tiles = tiles or Tiles()
    return n % tiles.cta_n == 0 and k % tiles.tile_k == 0 and m >= 1


# Cost model for choose_split_k, at an H100's rates (as DEFAULT_SMS): one 128 x 128 x 128 CTA
# step at the wgmma rate; the partials' bytes written and read back at HBM bandwidth; one more
# small launch to sum them.
_STEP_US, _HBM_BYTES_PER_US, _SUM_LAUNCH_US = 0.55, 2.5e6, 5.0


def choose_split_k(m: int, n: int, k: int, tiles: Tiles = Tiles(), sms: int = 132) -> int:
    """The split of K (1, 2, 4 or 8) with the least modelled time: full waves of work items
    times their K steps, plus the f32 partials' traffic. Each range keeps >= 8 K steps."""
    mn_tiles = -(-m // tiles.cta_m) * (n // tiles.cta_n)
    k_steps = k // tiles.tile_k

    def cost(split):
        waves = -(-mn_tiles * split // sms)
        partials = 0.0 if split == 1 else split * m * n * 4 * 2 / _HBM_BYTES_PER_US + _SUM_LAUNCH_US
        return waves * (k_steps // split) * _STEP_US + partials

    splits = [s for s in (1, 2, 4, 8) if k_steps % s == 0 and (s == 1 or k_steps // s >= 8)]
    return min(splits, key=cost)


def _swizzled(row_bytes: int, itemsize: int):
    # Shared-memory transforms that wgmma and TMA want: 8-row tiles of one swizzle width.
    swizzle = plgpu.find_swizzle(row_bytes * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _body(layer_g, x_g, xs_g, w_g, ws_g, o_g, *, t: Tiles, split_k: int):
    # layer_g: [1] i32; x_g: [M, k] e4m3 (M a multiple of CTA_M); xs_g: [M] f32;
    # w_g: [layers, n, k] e4m3; ws_g: [layers, n] f32; o_g: [M, n] out dtype, or with
    # split_k > 1 [split_k, M, n] f32 raw partial sums (no scales).
    m, k = x_g.shape
    n = w_g.shape[1]
    m_tiles, n_tiles, k_steps = m // t.cta_m, n // t.cta_n, k // t.tile_k // split_k
    k_len = k // split_k
    layer = layer_g[0]
    w_l, ws_l = w_g.at[layer], ws_g.at[layer]  # this layer's [n, k] and [n], in place
    fp8 = _swizzled(t.tile_k, 1)
    out_dtype = o_g.dtype
    out_t = _swizzled(t.epi_n * jnp.dtype(out_dtype).itemsize, jnp.dtype(out_dtype).itemsize)

    def pipeline(step, context):
        return plgpu.emit_pipeline_warp_specialized(
            step,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[plgpu.BlockSpec((t.cta_m, t.tile_k), lambda kk: (0, kk), transforms=fp8),
                      plgpu.BlockSpec((t.cta_n, t.tile_k), lambda kk: (0, kk), transforms=fp8)],
            wg_axis="wg",
            num_compute_wgs=t.wgs,
            max_concurrent_steps=t.stages,
            compute_context=context,
        )

    def nothing(*args, **kwargs):
        return None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(nothing, nothing).get_allocations(x_g, w_l),
        out_s=plgpu.SMEM((t.wgs, 2, t.epi_m, t.epi_n), out_dtype, transforms=out_t),  # [wg, slot, ...]
        rows_s=plgpu.SMEM((t.wgs, t.tile_m), jnp.float32),  # [wg, tile_m] x scales
        cols_s=plgpu.SMEM((t.wgs, t.tile_n), jnp.float32),  # [wg, tile_n] w scales
        bars=plgpu.Barrier(num_barriers=2 * t.wgs),  # [wg * 2 + (0 rows, 1 cols)]
        collective_axes="wg",
    )
    def scope(allocs, out_s, rows_s, cols_s, bars):
        wg = lax.axis_index("wg")
        if t.split == "m":
            wg_rows, wg_cols = pl.ds(wg * t.tile_m, t.tile_m), slice(None)
        else:
            wg_rows, wg_cols = slice(None), pl.ds(wg * t.tile_n, t.tile_n)

        @plgpu.nd_loop((split_k * m_tiles * n_tiles,), collective_axes="sm")
        def tile_loop(info):
            minor = 1 if t.minor == "n" else 0
            # K range slowest: consecutive work items share x or w tiles in L2.
            part, mn = info.index[0] // (m_tiles * n_tiles), info.index[0] % (m_tiles * n_tiles)
            mi, ni = plgpu.planar_snake(mn, (m_tiles, n_tiles), minor, t.band)
            rows, cols = pl.ds(mi * t.cta_m, t.cta_m), pl.ds(ni * t.cta_n, t.cta_n)
            ks = pl.ds(part * k_len, k_len)

            def mma(_, x_s, w_s, acc):  # one K step: acc += x_s @ w_s.T
                plgpu.wgmma(acc, x_s.at[wg_rows], plgpu.transpose_ref(w_s.at[wg_cols], (1, 0)))
                plgpu.wgmma_wait(0)
                return acc

            def mma_promoted(_, x_s, w_s, total):  # one K step summed alone, then added in f32
                def step(acc):
                    plgpu.wgmma(acc, x_s.at[wg_rows], plgpu.transpose_ref(w_s.at[wg_cols], (1, 0)))
                    return acc[...]

                return total + pl.run_scoped(step, plgpu.ACC((t.tile_m, t.tile_n), jnp.float32))

            def context(run_k_loop):
                if split_k == 1:  # this warpgroup's scales travel while the K loop runs
                    plgpu.copy_gmem_to_smem(xs_g.at[rows].at[wg_rows], rows_s.at[wg], bars.at[2 * wg])
                    plgpu.copy_gmem_to_smem(ws_l.at[cols].at[wg_cols], cols_s.at[wg], bars.at[2 * wg + 1])

                if t.promote:
                    zeros = jnp.zeros((t.tile_m, t.tile_n), jnp.float32)
                    acc = run_k_loop(plgpu.layout_cast(zeros, plgpu.Layout.WGMMA))
                else:
                    def k_loop(acc_ref):
                        run_k_loop(acc_ref)
                        return acc_ref[...]

                    acc = pl.run_scoped(k_loop, plgpu.ACC((t.tile_m, t.tile_n), jnp.float32))
                if split_k == 1:
                    plgpu.barrier_wait(bars.at[2 * wg])
                    plgpu.barrier_wait(bars.at[2 * wg + 1])
                    x_scale = plgpu.layout_cast(rows_s[wg], plgpu.Layout.WGMMA.reduce(1))
                    w_scale = plgpu.layout_cast(cols_s[wg], plgpu.Layout.WGMMA.reduce(0))
                    y = acc * lax.broadcast_in_dim(x_scale, acc.shape, [0])
                    y = (y * lax.broadcast_in_dim(w_scale, acc.shape, [1])).astype(out_dtype)
                    out = o_g.at[rows, cols].at[wg_rows, wg_cols]
                else:
                    y = acc
                    out = o_g.at[part, rows, cols].at[wg_rows, wg_cols]
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores left
                for em in range(t.tile_m // t.epi_m):
                    for en in range(t.tile_n // t.epi_n):
                        slot = (em * (t.tile_n // t.epi_n) + en) % 2
                        sub_m = slice(em * t.epi_m, (em + 1) * t.epi_m)
                        sub_n = slice(en * t.epi_n, (en + 1) * t.epi_n)
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this slot is free
                        out_s[wg, slot] = y[sub_m, sub_n]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_s.at[wg, slot], out.at[sub_m, sub_n])

            pipeline(mma_promoted if t.promote else mma, context)(
                x_g.at[rows, ks], w_l.at[cols, ks], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiles"))
def _fp8_matmul(x, x_scale, w, w_scale, layer, *, out_dtype, tiles: Tiles):
    m, k = x.shape
    n = w.shape[1]
    mp = pl.cdiv(m, tiles.cta_m) * tiles.cta_m
    # Quantized and padded in one Triton launch (XLA: a reduce, a loop fusion, a pad of the scales).
    quantize = functools.partial(quantize_input, rows=mp, impl="mgpu")
    x_q, x_scale = pad_rows(*quantize_unless(x, x_scale, quantize), mp)  # [Mp, k] e4m3, [Mp, 1] f32
    split_k = tiles.split_k or choose_split_k(mp, n, k, tiles, num_sms())
    out_type = (jax.ShapeDtypeStruct((mp, n), out_dtype) if split_k == 1
                else jax.ShapeDtypeStruct((split_k, mp, n), jnp.float32))
    kernel = plgpu.kernel(
        functools.partial(_body, t=tiles, split_k=split_k),
        out_type=out_type,
        grid=(num_sms(),),
        grid_names=("sm",),
        num_threads=tiles.wgs + 1,  # the compute warpgroups and one for TMA
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    y = kernel(jnp.reshape(layer, (1,)).astype(jnp.int32), x_q, x_scale[:, 0],
               w, w_scale.astype(jnp.float32))
    if split_k > 1:  # the partials' sum, then both scales on the f32 total, one cast
        w_scale_l = jax.lax.dynamic_index_in_dim(w_scale, layer, keepdims=False)
        y = scale_output(jnp.sum(y, axis=0), x_scale, w_scale_l, out_dtype)
    return y if mp == m else y[:m]


def fp8_matmul_mgpu(x: jax.Array, w: jax.Array, w_scale: jax.Array, *, layer=None, x_scale=None,
                    out_dtype=jnp.bfloat16, tiles: Tiles | None = None) -> jax.Array:
    """y [m, n] = quant(x [m, k]) @ (w [n, k] e4m3 * w_scale [n]).T by wgmma; or, with `layer`,
    w [layers, n, k] and w_scale [layers, n], layer `layer` read in place. x_scale [m, 1]: x is
    e4m3 already (see fp8_matmul). `tiles` overrides `choose_tiles` (sweeps)."""
    w, w_scale, layer = check_stacked(x, w, w_scale, layer)
    m, k = x.shape
    n = w.shape[1]
    tiles = tiles or choose_tiles(m, n, k)
    if not supports(m, n, k, tiles) or (tiles.split_k and k % (tiles.split_k * tiles.tile_k)):
        raise ValueError(f"fp8_matmul_mgpu needs n a multiple of {tiles.cta_n} and k of {tiles.tile_k} "
                         f"(times split_k={tiles.split_k}); "
                         f"got n={n}, k={k} (use impl='triton' or 'xla' for this shape)")
    return _fp8_matmul(x, x_scale, w, w_scale, layer, out_dtype=jnp.dtype(out_dtype), tiles=tiles)
