"""FP8 on a tp=2 mesh of two GPUs (`pytest -m gpu`, run on nvidia-h200-x2): issue 22.

Mistral-Small-2501's real shapes with random weights: split over tp=2, its FP8 w1, w3 and w2
stacks are 3.36 GB per GPU, the 2-4 GiB range where Pallas's Triton lowering addressed the last
layers with i32 offsets that wrapped negative (CUDA's illegal address in the first steps). Each
FP8 implementation on tp=2 is judged against the same FP8 model on one GPU: prefill logits at
512 and 4,096 tokens, greedy decode at batch 1 and 64 over 32 steps; bf16 on tp=2 in the same
run; and one run with one process per GPU (jax.distributed).
Run with XLA_PYTHON_CLIENT_PREALLOCATE=false (the two-process test starts two more JAX clients).
"""

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mistral_jax.loading.weights import random_weights
from mistral_jax.runtime.sharding import make_mesh, parse_mesh, use_mesh

from helpers.fp8_tp import CFG, DTYPE, SEED, STEPS, greedy, prompts
from helpers.models import dense_logits

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_only")]

# FP8 tolerance, as in test_engine_gpu.py: per-token activation quantization makes an FP8 model
# chaotic (a 1e-7 change flips an e4m3 rounding somewhere, and that grows layer by layer), and tp=2
# sums its row-parallel partial products in another order than one GPU; a random model's logits
# are flat (the best of 131k tokens a fraction of a std above the next), so greedy picks may part.
# The one-GPU model therefore scores tp=2's picks, teacher-forced: each within GAP_TOL of a
# row's logit std below its best (a random token sits ~4.4 std below), most of them its own pick.
# A wrong layer, row or scale is O(1) off.
LOGITS_REL_TOL = 0.1
GAP_TOL = 0.5
EXACT_MIN = 0.8


def gaps(ref_logits, picks):
    """(best logit - logit of each pick) / the row's std, under ref_logits [..., vocab]."""
    chosen = np.take_along_axis(ref_logits, np.asarray(picks)[..., None], -1)[..., 0]
    return (ref_logits.max(-1) - chosen) / ref_logits.std(-1)


def scored(model, mesh, batch, tokens):
    """gaps() of generated tokens under `model`, teacher-forced on prompt + tokens (prompts of one
    length: one forward)."""
    n = len(batch[0])
    logits = logits_on(model, mesh, [prompt + toks[:-1] for prompt, toks in zip(batch, tokens)])[:, n - 1:]
    return gaps(logits, tokens).reshape(-1)


@pytest.fixture(scope="module")
def meshes():
    if len(jax.devices()) < 2:
        pytest.skip("needs two GPUs")
    return make_mesh(devices=jax.devices()[:1]), parse_mesh("tp=2")


def build(impl: str, mesh):
    quant = dict(quantization=None) if impl == "bf16" else dict(quantization="fp8", fp8_impl=impl)
    return random_weights(CFG, DTYPE, mesh, seed=SEED, **quant)


def logits_on(model, mesh, tokens):
    """One jitted dense forward: logits [batch, seq, vocab] of tokens [batch, seq] (an eager call
    of the model re-traces its layer scan each time: seconds per call at this size)."""
    graphdef, state = nnx.split(model)
    with use_mesh(mesh):
        return np.asarray(_forward(graphdef, state, jnp.asarray(tokens, jnp.int32)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return jnp.asarray(dense_logits(nnx.merge(graphdef, state), tokens, to_numpy=False), jnp.float32)


@pytest.mark.parametrize("impl", ["auto", "triton", "mgpu", "bf16"])
def test_tp2_matches_one_gpu(meshes, impl):
    one_mesh, two_mesh = meshes
    one, two = build(impl, one_mesh), build(impl, two_mesh)
    w2 = lambda m: np.asarray(getattr(m.layers.feed_forward.w2, "quant", m.layers.feed_forward.w2)[...][-1, :4, :16]  # noqa: E731
                              .astype(np.float32))
    np.testing.assert_array_equal(w2(one), w2(two))  # the same weights, the last layer's too
    report, checks = {}, []
    for length in (512, 4096):  # prefill-sized products (m = 512, 4096)
        tokens = prompts(1, length, length)
        a, b = logits_on(one, one_mesh, tokens), logits_on(two, two_mesh, tokens)
        g = gaps(a, b.argmax(-1))
        report[f"prefill_{length}"] = r = dict(rel=float(np.linalg.norm(b - a) / np.linalg.norm(a)),
                                               argmax=float(np.mean(a.argmax(-1) == b.argmax(-1))),
                                               max_gap=float(g.max()), finite=bool(np.isfinite(b).all()))
        checks.append((f"prefill_{length}", r["finite"] and r["rel"] < LOGITS_REL_TOL and r["max_gap"] < GAP_TOL))
    picks = []
    for name, batch in (("b1", prompts(1, 512, 1)), ("b64", prompts(64, 128, 2))):
        (t1, _), (t2, _) = greedy(one, one_mesh, batch), greedy(two, two_mesh, batch)
        assert all(len(t) == STEPS for t in t1 + t2)
        g = scored(one, one_mesh, batch, t2)
        picks.append(g)
        report[f"decode_{name}"] = r = dict(
            identical=float(np.mean([a == b for a, b in zip(t1, t2)])),
            first_divergence=[next((s for s in range(STEPS) if a[s] != b[s]), None) for a, b in zip(t1, t2)][:8],
            max_gap=float(g.max()), exact=float(np.mean(g == 0)))
        checks.append((f"decode_{name}", r["max_gap"] < GAP_TOL))
    # The share of the one-GPU model's own picks, over all 2,080 decode picks: 32 picks of one
    # request alone measure the flatness of its logits more than the kernels (seen: 25 of 32 with
    # the wgmma kernel, every miss within 0.05 std of the best).
    report["decode_exact"] = exact = float(np.mean(np.concatenate(picks) == 0))
    checks.append(("decode_exact", exact >= EXACT_MIN))
    print(f"\n{impl}: {json.dumps(report)}")
    assert all(ok for _, ok in checks), [name for name, ok in checks if not ok]


def test_one_process_per_gpu_matches_one_gpu(meshes, tmp_path):
    """tp=2 over two processes (one GPU each, jax.distributed): its greedy tokens scored by one GPU's
    model, and the same tokens as one process with tp=2."""
    one_mesh, two_mesh = meshes
    batches = {"b1": prompts(1, 512, 1), "b64": prompts(64, 128, 2)}
    two = build("auto", two_mesh)
    want = {k: greedy(two, two_mesh, b)[0] for k, b in batches.items()}
    del two
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = Path(__file__).parent
    out = tmp_path / "tokens.json"
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(here / "fp8_tp_worker.py"), "auto", str(out)],
                              env=dict(env, JAX_PROCESS_ID=str(i), CUDA_VISIBLE_DEVICES=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=420)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = json.loads(out.read_text())
    assert got["processes"] == 2
    one = build("auto", one_mesh)
    g = np.concatenate([scored(one, one_mesh, batches[k], got[k]) for k in batches])
    same = {k: float(np.mean([a == b for a, b in zip(want[k], got[k])])) for k in want}
    print(f"\ntwo processes: identical to one process tp=2 {same}; under one GPU's model max gap "
          f"{g.max():.3f}, exact {np.mean(g == 0):.2f}")
    assert g.max() < GAP_TOL and np.mean(g == 0) >= EXACT_MIN
