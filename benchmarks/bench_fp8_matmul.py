"""W8A8 FP8 matmul on the GPU: our Pallas kernels (Triton; Mosaic GPU above 32 rows) vs XLA fp8 and bf16.

Projection shapes of Mistral-Small-2501 and -2409 (w stored [n, k]), m tokens in
{1, 8, 64, 256, 4096}. Time per call: one jitted program loops over several weight copies
(>= 256 MiB in all, so a small weight is not served from L2) for >= 48 calls, median of several
runs, divided by the calls: no host launch or sync in the figure, as inside the model (see
median_time); --cupti adds the device time of each kernel, without the gaps between launches.
Reports TFLOP/s (2mnk / t) and weight TB/s (weight bytes / t: n*k for fp8, 2*n*k for bf16) next
to measured ceilings: copy bandwidth (2 GiB bf16 x*2,
read + write) and XLA's 8192^3 bf16 and fp8 matmuls. Also the kernel's error against the reference.

    python benchmarks/bench_fp8_matmul.py --out fp8.json [--quick] [--sweep] [--models 2501]

--sweep times 18 plan variants per decode shape (7 per prefill shape): restrict it with --ms
and --models to fit a 10-minute device call. --mgpu-sweep times Tiles variants of the Mosaic GPU
kernel (`mgpu` columns, m > GPU_TRITON_MAX_M) instead.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import math
import statistics
import time

import harness
import jax
import jax.numpy as jnp

from pallas_kernels.fp8_matmul import GPU_TRITON_MAX_M, fp8_matmul_reference, fp8_matmul_xla, quantize_weight
from pallas_kernels.fp8_matmul.mgpu import Tiles, fp8_matmul_mgpu
from pallas_kernels.fp8_matmul.triton import fp8_matmul_group_triton, fp8_matmul_triton, plan

# (dim, n_heads, n_kv_heads, head_dim, hidden)
MODELS = {"2501": (5120, 32, 8, 128, 32768), "2409": (6144, 48, 8, 128, 16384)}
MS = (1, 8, 64, 256, 4096)
ROTATE_BYTES = 256 << 20  # > 5x the H100's 50 MiB L2
MAX_SETS = 6  # each set is one more kernel to compile in the timing program


def projections(dim, n_heads, n_kv, head_dim, hidden):
    """[(name, n, k)]: the Linear weights of one layer as stored, [out, in]."""
    return [("qkv", (n_heads + 2 * n_kv) * head_dim, dim),  # the model's joint q/k/v weight (wqkv)
            ("q", n_heads * head_dim, dim), ("kv", n_kv * head_dim, dim),
            ("o", dim, n_heads * head_dim), ("w1/w3", hidden, dim), ("w2", dim, hidden)]


def median_time(fn, arg_sets, *, reps=5, min_calls=48):
    """Seconds per call of fn(x, *rest), measured inside one jitted program: a loop applies fn
    to every arg set in turn (distinct weights, so L2 cannot serve them) for enough rounds to
    make >= min_calls calls, so the program's launch and the host's sync (tens of µs, as long as
    a decode-sized product) are spread thin. Each round nudges x[0, ..., 0] so XLA can neither
    hoist nor merge the calls. Median of `reps` runs."""
    rounds = math.ceil(min_calls / len(arg_sets))

    def program(sets):
        def body(_, carry):
            xs, acc = carry
            xs = [x.at[(0,) * x.ndim].add(jnp.asarray(1e-3, x.dtype)) for x in xs]
            for x, rest in zip(xs, (a[1:] for a in sets)):
                y = fn(x, *rest)
                acc = acc + y[(0,) * y.ndim].astype(jnp.float32)
            return xs, acc

        return jax.lax.fori_loop(0, rounds, body, ([a[0] for a in sets], jnp.float32(0)))[1]

    run = jax.jit(program)
    jax.block_until_ready(run(arg_sets))  # compile + first touch
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run(arg_sets))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / (rounds * len(arg_sets))


def device_times(fn, arg_sets):
    """CUPTI's device time per call of fn(x, *rest), kernel by kernel (Mosaic GPU's profiler):
    one jitted program makes one call per arg set (distinct weights, >= 256 MiB, so L2 serves
    none), launch gaps excluded. Returns (µs of the longest kernel: the product itself, µs of all
    kernels: quantizing x, split-K sums and scales too, kernels per call, the longest's name)."""
    from jax.experimental.mosaic.gpu import profiler

    def program(sets):
        return [fn(*s) for s in sets]

    _, timings = profiler.measure(jax.jit(program), aggregate=False)(arg_sets)
    per_name = {}
    for name, ms in timings:
        per_name[name] = per_name.get(name, 0.0) + ms * 1e3 / len(arg_sets)
    main = max(per_name, key=per_name.get)
    return per_name[main], sum(per_name.values()), len(timings) / len(arg_sets), main


def copy_bandwidth():
    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.bfloat16)  # 2 GiB
    t = median_time(lambda x: x * 2, [(x,)], min_calls=10)
    return 2 * x.nbytes / t


def square_matmul_tflops(dtype, size=8192):
    """XLA's dot at size^3 (the issue's premise: fp8 739 vs bf16 665 TFLOP/s on an H100)."""
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (size, size), jnp.bfloat16)
    if dtype == "bf16":
        t = median_time(lambda a, b: a @ b, [(a, b)], min_calls=10)
    else:
        a, b = a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn)
        t = median_time(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                         preferred_element_type=jnp.bfloat16), [(a, b)], min_calls=10)
    return 2 * size**3 / t / 1e12


def make_sets(m, n, k):
    """Rotating (x [m, k] bf16, w [n, k] e4m3, w_scale [n], w_bf16 [n, k]) input sets."""
    n_sets = max(2, min(MAX_SETS, math.ceil(ROTATE_BYTES / (3 * n * k))))
    sets = []
    for i in range(n_sets):
        kx, kw = jax.random.split(jax.random.key(i))
        w_bf16 = (jax.random.normal(kw, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
        w, w_scale = quantize_weight(w_bf16)
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        sets.append((x, w, w_scale, w_bf16))
    return sets


def kernel_error(x, w, w_scale, kernel=fp8_matmul_triton, **tuning):
    """max |kernel - reference| / max |reference| (f32 out; e4m3 products are exact, so
    only the summation order differs: expect < 1e-5)."""
    out = kernel(x, w, w_scale, out_dtype=jnp.float32, **tuning)
    ref = fp8_matmul_reference(x, w, w_scale, out_dtype=jnp.float32)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))


def sweep_variants(m):
    """`plan` overrides worth timing for one m (the default plan is always timed first)."""
    if m <= 256:
        return [dict(block_n=bn, block_k=bk, split_k=sk)
                for bn, bk, sk in itertools.product((32, 64, 128), (128, 256, 512), (None, 1))]
    return [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=wp, num_stages=st)
            for bm, bn, bk, wp, st in [(128, 128, 128, 8, 3), (128, 128, 128, 4, 4),
                                       (128, 256, 128, 8, 3), (64, 128, 128, 4, 4),
                                       (128, 128, 256, 8, 3), (256, 128, 128, 8, 3),
                                       (128, 64, 256, 4, 4)]]


def mgpu_variants():
    """Tiles worth timing for the Mosaic GPU kernel at prefill m. Earlier sweeps
    (results/2026-11-23_h100_fp8_mgpu/mgpu_sweep_* at commit 752ad83, results/2026-11-24_h100_fp8_decode/) ruled out
    64x256 per warpgroup with promotion (registers), tile_k 256 at 3+ stages, 6 stages, 64x128
    epilogue tiles or 3 compute warpgroups at 4 stages (shared memory), 5 stages and 64-wide n
    tiles (slower), promotion overlapped with the next wgmma (2.5x slower); the snake's band and
    axis moved times by < 5%; split-K: results/2026-11-23_h100_fp8_mgpu/split_k/ (752ad83). These separate
    promotion's cost from the tile size (measured: promotion 3-11%, the tile 10-13%) and time
    three compute warpgroups at 3 stages (now choose_tiles' prefill tiles)."""
    return [Tiles(), Tiles(promote=False), Tiles(wgs=3, stages=3), Tiles(wgs=3, stages=3, promote=False),
            Tiles(tile_n=256, stages=3, promote=False)]


def parse_tiles(specs):
    """['', 'wgs=3,stages=3', 'split=n'] -> [Tiles(), Tiles(wgs=3, stages=3), Tiles(split='n')]."""
    if specs is None:
        return None

    def value(v):
        return int(v) if v.lstrip("-").isdigit() else {"True": True, "False": False}.get(v, v)

    return [Tiles(**{k: value(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}) for spec in specs]


def parse_plans(specs):
    """['block_n=16,split_k=1', ''] -> [dict(block_n=16, split_k=1), {}]: `plan` overrides."""
    if specs is None:
        return None
    return [{k: int(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)} for spec in specs]


def sweep_plans(into, fn, fn_sets, plans, *, m, n, k, flops, wbytes, cupti):
    """Time fn(x, ..., **tuning) for every `plan` override in `plans` into into["sweep"]."""
    into["sweep"] = []
    for tuning in plans:
        entry = dict(tuning=tuning, plan=plan(m, n, k, **tuning))
        try:
            timed(entry, "", functools.partial(fn, **tuning), fn_sets, wbytes, reps=3, flops=flops, cupti=cupti)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        into["sweep"].append(entry)
    ok = [e for e in into["sweep"] if "_us" in e]
    if ok:
        into["sweep_best"] = min(ok, key=lambda e: e["_us"])


def mgpu_key(tiles):
    if tiles is None:
        return "mgpu"
    t = tiles
    return (f"mgpu[{t.tile_m}x{t.tile_n}x{t.tile_k} s{t.stages} {t.split}{t.wgs} b{t.band} {t.minor} "
            f"p{t.promote:d} k{t.split_k}]")


def timed(into, key, fn, fn_sets, weight_bytes, *, flops, cupti, reps=5):
    """Time fn over fn_sets into `into` under key: µs per call, TFLOP/s, weight TB/s; with cupti
    also the device time of the same calls, the product's kernel alone and all kernels."""
    t = median_time(fn, fn_sets, reps=reps)
    into[key + "_us"] = t * 1e6
    into[key + "_tflops"] = flops / t / 1e12
    into[key + "_wTBs"] = weight_bytes / t / 1e12
    if cupti:
        try:
            kernel_us, device_us, kernels, main = device_times(fn, fn_sets)
        except Exception as e:  # keep the wall-clock figures
            into[key + "_cupti_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("    cupti:", into[key + "_cupti_error"], flush=True)
            return
        into.update({key + "_kernel_us": kernel_us, key + "_kernel_wTBs": weight_bytes / kernel_us / 1e6,
                     key + "_device_us": device_us, key + "_kernels": kernels, key + "_kernel": main[:80]})


def bench_shape(model, name, m, n, k, *, sweep, mgpu_sweep=False, triton=True, cupti=False, mgpu_tiles=None):
    sets = make_sets(m, n, k)
    fp8_sets = [s[:3] for s in sets]
    row = dict(model=model, proj=name, m=m, n=n, k=k, n_sets=len(sets), plan=plan(m, n, k))
    flops, wbytes = 2 * m * n * k, n * k

    record = functools.partial(timed, row, flops=flops, cupti=cupti)

    try:
        if triton:
            row["triton_err"] = kernel_error(*fp8_sets[0])
            record("triton", fp8_matmul_triton, fp8_sets, wbytes)
    except Exception as e:  # keep the other columns if the kernel fails to build
        row["triton_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if mgpu_tiles is None:  # None: the kernel's own choice (choose_tiles)
        mgpu_tiles = (mgpu_variants() if mgpu_sweep else [None]) if m > GPU_TRITON_MAX_M else []
    for tiles in mgpu_tiles:
        key = mgpu_key(tiles)
        try:
            row[key + "_err"] = kernel_error(*fp8_sets[0], kernel=fp8_matmul_mgpu, tiles=tiles)
            record(key, functools.partial(fp8_matmul_mgpu, tiles=tiles), fp8_sets, wbytes, reps=3)
        except Exception as e:
            row[key + "_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print(f"  {key}: " + ", ".join(f"{c}={row[key + c]:.4g}" if isinstance(row.get(key + c), float)
                                      else str(row.get(key + c, ""))[:400] for c in ("_us", "_tflops", "_err", "_error")
                                      if key + c in row), flush=True)
    record("xla_fp8", fp8_matmul_xla, fp8_sets, wbytes)
    bf16_sets = [(s[0], s[3]) for s in sets]
    record("xla_bf16", lambda x, w: x @ w.T, bf16_sets, 2 * wbytes)

    if sweep:  # True: sweep_variants(m); a list: those `plan` overrides
        sweep_plans(row, fp8_matmul_triton, fp8_sets, sweep_variants(m) if sweep is True else sweep,
                    m=m, n=n, k=k, flops=flops, wbytes=wbytes, cupti=cupti)
    return row


def bench_quantize(ms, ks=(4096, 5120, 32768)):
    """x's per-row quantization alone, by CUPTI device time per call: XLA's quantize_rows (its
    kernels) against the Triton quantizer (one launch), at every m and row width k."""
    from pallas_kernels.fp8_matmul import quantize_rows
    from pallas_kernels.fp8_matmul.quantize_rows_triton import quantize_rows_triton

    rows = []
    for m, k in itertools.product(ms, ks):
        sets = [(jax.random.normal(jax.random.key(i), (m, k), jnp.bfloat16),) for i in range(MAX_SETS)]
        row = dict(m=m, k=k)
        for key, fn in (("xla", quantize_rows), ("triton", quantize_rows_triton)):
            kernel_us, device_us, kernels, _ = device_times(fn, sets)
            row.update({key + "_device_us": device_us, key + "_kernels": kernels})
        rows.append(row)
        print(f"  quantize m={m} k={k}: XLA {row['xla_device_us']:.1f} µs in {row['xla_kernels']:g} kernels, "
              f"Triton {row['triton_device_us']:.1f} µs in {row['triton_kernels']:g}", flush=True)
    return rows


def groups(dim, n_heads, n_kv, head_dim, hidden):
    """[(name, [n...], k)]: the projections of one x that the model runs in one launch."""
    return [("q+k+v", [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim), ("w1+w3", [hidden, hidden], dim)]


def bench_group(model, name, m, ns, k, *, cupti=False, plans=None):
    """Several weights of one x: one grouped launch of our kernel against one launch per weight
    (ours, XLA fp8, XLA bf16). The markdown's triton columns are the grouped launch."""
    sets = [make_sets(m, n, k) for n in ns]  # per weight, rotating copies
    n_sets = min(len(s) for s in sets)
    x_sets = [sets[0][i][0] for i in range(n_sets)]
    grouped = [(x_sets[i], tuple(s[i][1] for s in sets), tuple(s[i][2] for s in sets)) for i in range(n_sets)]
    bf16 = [(x_sets[i], tuple(s[i][3] for s in sets)) for i in range(n_sets)]
    n, flops, wbytes = sum(ns), 2 * m * sum(ns) * k, sum(ns) * k
    row = dict(model=model, proj=name, m=m, n=n, k=k, ns=ns, n_sets=n_sets, plan=plan(m, n, k))

    def each(matmul):  # one product per weight; every output feeds the timing loop's sum
        return lambda x, ws, ss: sum(matmul(x, w, s)[0, 0].astype(jnp.float32) for w, s in zip(ws, ss))[None, None]

    record = functools.partial(timed, row, flops=flops, cupti=cupti)

    def one_launch(x, ws, ss, **tuning):
        return sum(y[0, 0].astype(jnp.float32) for y in fp8_matmul_group_triton(x, ws, ss, **tuning))[None, None]

    record("triton", one_launch, grouped, wbytes)
    if plans:
        sweep_plans(row, one_launch, grouped, plans, m=m, n=n, k=k, flops=flops, wbytes=wbytes, cupti=cupti)
    record("triton_separate", each(fp8_matmul_triton), grouped, wbytes)
    if m > GPU_TRITON_MAX_M:  # one launch per weight, each with the kernel's own tile choice
        record("mgpu_separate", each(fp8_matmul_mgpu), grouped, wbytes)
    record("xla_fp8", each(fp8_matmul_xla), grouped, wbytes)
    record("xla_bf16", lambda x, ws: sum((x @ w.T)[0, 0].astype(jnp.float32) for w in ws)[None, None], bf16,
           2 * wbytes)
    return row


def markdown(rows):
    head = ("| model | proj | m | n x k | triton µs | TFLOP/s | wTB/s | mgpu µs | TFLOP/s | xla fp8 µs | wTB/s "
            "| TFLOP/s | xla bf16 µs | wTB/s | TFLOP/s | err | mgpu err |")
    lines = [head, "|" + "---|" * 17]
    f = lambda r, key, fmt: format(r[key], fmt) if key in r else "-"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['proj']} | {r['m']} | {r['n']}x{r['k']} "
            f"| {f(r, 'triton_us', '.1f')} | {f(r, 'triton_tflops', '.0f')} "
            f"| {f(r, 'triton_wTBs', '.2f')} | {f(r, 'mgpu_us', '.1f')} | {f(r, 'mgpu_tflops', '.0f')} "
            f"| {f(r, 'xla_fp8_us', '.1f')} | {f(r, 'xla_fp8_wTBs', '.2f')} | {f(r, 'xla_fp8_tflops', '.0f')} "
            f"| {f(r, 'xla_bf16_us', '.1f')} | {f(r, 'xla_bf16_wTBs', '.2f')} | {f(r, 'xla_bf16_tflops', '.0f')} "
            f"| {f(r, 'triton_err', '.1e')} | {f(r, 'mgpu_err', '.1e')} |")
    return "\n".join(lines)


def cupti_line(row):
    """Device time by CUPTI per column: the product's kernel (µs, weight TB/s), all kernels."""
    keys = [key[:-len("_kernel_us")] for key in row if key.endswith("_kernel_us")]
    return "    device: " + "; ".join(
        f"{key} {row[key + '_kernel_us']:.1f} µs ({row[key + '_kernel_wTBs']:.2f} TB/s), "
        f"all {row[key + '_device_us']:.1f} µs in {row[key + '_kernels']:g} kernels" for key in keys)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_fp8_matmul.json", help="JSON results file")
    ap.add_argument("--models", default="2501,2409", help="comma list of " + ",".join(MODELS))
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma list of m (tokens)")
    ap.add_argument("--projs", default=None, help="comma list of projections (qkv,q,kv,o,w1/w3,w2); default all")
    ap.add_argument("--quick", action="store_true", help="2501 only, m in 1, 64, 4096")
    ap.add_argument("--sweep", action="store_true", help="also time several plan variants")
    ap.add_argument("--mgpu-sweep", action="store_true", help="time Tiles variants of the Mosaic GPU kernel")
    ap.add_argument("--mgpu-tiles", nargs="+", default=None, metavar="K=V,...",
                    help="time exactly these Tiles of the Mosaic GPU kernel at every m, e.g. '' 'wgs=3,stages=3' "
                    "('' is the default Tiles())")
    ap.add_argument("--plans", nargs="+", default=None, metavar="K=V,...",
                    help="sweep exactly these `plan` overrides of the Triton kernel (single and grouped "
                    "launches), e.g. 'block_n=16,split_k=1' ''")
    ap.add_argument("--quantize", action="store_true", help="also time x's quantization alone (XLA vs Triton)")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernel (prefill sweeps)")
    ap.add_argument("--cupti", action="store_true", help="also the device time of each call by CUPTI: the "
                    "product's kernel alone (*_kernel_us, *_kernel_wTBs) and all its kernels (*_device_us)")
    ap.add_argument("--groups", action="store_true", help="also time q+k+v and w1+w3 in one launch "
                    "(triton columns; triton_separate_us in the JSON: one launch per weight)")
    args = ap.parse_args(argv)
    models = ["2501"] if args.quick else args.models.split(",")
    ms = [1, 64, 4096] if args.quick else [int(v) for v in args.ms.split(",")]

    dev = jax.devices()[0]
    res = dict(device=str(dev.device_kind), jax=jax.__version__,
               date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               rows=[])
    res["copy_bw_TBs"] = copy_bandwidth() / 1e12
    res["bf16_8192_tflops"] = square_matmul_tflops("bf16")
    res["xla_fp8_8192_tflops"] = square_matmul_tflops("fp8")
    print(f"device {dev.device_kind}  jax {jax.__version__}  copy {res['copy_bw_TBs']:.2f} TB/s"
          f"  XLA 8192^3: bf16 {res['bf16_8192_tflops']:.0f}, fp8 {res['xla_fp8_8192_tflops']:.0f} TFLOP/s",
          flush=True)

    if args.quantize:
        res["quantize"] = bench_quantize(ms)
        harness.write_result(args.out, "fp8_matmul", res)
    plans = parse_plans(args.plans)
    for model in models:
        for name, n, k in projections(*MODELS[model]):
            if args.projs and name not in args.projs.split(","):
                continue
            for m in ms:
                row = bench_shape(model, name, m, n, k, sweep=plans or args.sweep, mgpu_sweep=args.mgpu_sweep,
                                  triton=not args.no_triton, cupti=args.cupti,
                                  mgpu_tiles=parse_tiles(args.mgpu_tiles))
                res["rows"].append(row)
                print(markdown([row]).splitlines()[-1], flush=True)
                if args.cupti:
                    print(cupti_line(row), flush=True)
                    for entry in row.get("sweep", []):
                        print(f"      {entry['tuning']}: " + (cupti_line(entry) if "_kernel_us" in entry
                                                              else entry.get("error", "")), flush=True)
                harness.write_result(args.out, "fp8_matmul", res)  # partial results survive a crash
        if args.groups:
            for name, ns, k in groups(*MODELS[model]):
                for m in ms:
                    row = bench_group(model, name, m, ns, k, cupti=args.cupti, plans=plans)
                    res["rows"].append(row)
                    print(markdown([row]).splitlines()[-1], f"(separate launches: {row['triton_separate_us']:.1f} µs"
                          + (f", mgpu {row['mgpu_separate_us']:.1f} µs)" if "mgpu_separate_us" in row else ")"),
                          flush=True)
                    if args.cupti:
                        print(cupti_line(row), flush=True)
                        for entry in row.get("sweep", []):
                            print(f"      {entry['tuning']}: " + (cupti_line(entry) if "_kernel_us" in entry
                                                                  else entry.get("error", "")), flush=True)
                    harness.write_result(args.out, "fp8_matmul", res)
    print()
    print(markdown(res["rows"]))


if __name__ == "__main__":
    main()
