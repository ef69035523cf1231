"""Probe: how far apart are FP8 models that differ only in f32 summation order? The GPU engine
test's tiny model with FP8 projections through the Triton kernel, XLA's fp8 dot and the jnp
reference: dense logits (relative error, argmax agreement) and the engine's 24 greedy tokens
(agreement, first divergence), at default and highest matmul precision. The reference run twice
shows the engine itself is deterministic. First (any backend): the reference model's logits when
the embeddings are nudged by 1e-7..1e-3, FP8 against f32 projections.

    PYTHONPATH=.:benchmarks python benchmarks/probes/probe_fp8_chaos.py
"""
import sys

import jax
import numpy as np

sys.path.insert(0, "tests")
from test_engine_gpu import CFG, prompts, run

from mistral_jax.loading.weights import random_weights
from mistral_jax.runtime.sharding import make_mesh

from helpers.models import dense_logits


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)

toks = np.random.default_rng(0).integers(5, CFG.vocab_size, size=(2, 64))
for q in (None, "fp8"):
    m = random_weights(CFG, np.float32, make_mesh(), seed=3, quantization=q, fp8_impl="reference")
    base, emb = dense_logits(m, toks), m.tok_embeddings.value
    for eps in (1e-7, 1e-5, 1e-3):
        m.tok_embeddings.value = emb * (1 + eps * jax.random.normal(jax.random.key(1), emb.shape))
        nudged = dense_logits(m, toks)
        print(q or "f32", "embeddings nudged by", eps, "-> logits rel err", f"{rel(nudged, base):.3g}",
              "argmax agree", float((nudged.argmax(-1) == base.argmax(-1)).mean()), flush=True)
    m.tok_embeddings.value = emb

impls = ("triton", "xla", "reference") if jax.default_backend() == "gpu" else ("reference",)
models = {i: random_weights(CFG, np.float32, make_mesh(), seed=3, quantization="fp8", fp8_impl=i) for i in impls}
batch = prompts(12, 3)
for prec in ("default", "highest"):
    with jax.default_matmul_precision(prec):
        logits = {i: dense_logits(models[i], toks) for i in impls}
        ref = logits["reference"]
        srt = np.sort(ref, -1)
        print(prec, "median top1-top2 logit gap", float(np.median(srt[..., -1] - srt[..., -2])),
              "logit std", float(ref.std()), flush=True)
        for i in impls:
            print(prec, i, "logits rel err", f"{rel(logits[i], ref):.3g}",
                  "argmax agree", float((logits[i].argmax(-1) == ref.argmax(-1)).mean()), flush=True)
        outs = {i: run(models[i], "reference", batch, max_num_batched_tokens=128, num_pages=400) for i in impls}
        outs["reference2"] = run(models["reference"], "reference", batch, max_num_batched_tokens=128, num_pages=400)
        for i, o in outs.items():
            first_div = [next((t for t, (a, b) in enumerate(zip(g, w)) if a != b), None)
                         for g, w in zip(o, outs["reference"])]
            print(prec, i, "engine agree", np.mean([g == w for g, w in zip(o, outs["reference"])]),
                  "first divergence", first_div, flush=True)
