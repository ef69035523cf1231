"""One process, several devices (the suite's 8 host CPU devices): meshes from one option, the
logical rules placing every parameter and the KV cache, the Pallas attention kernel under
shard_map, and the per-shard checkpoint reader. Every mesh must give one device's answer."""

import functools
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mistral_jax import LLM, SamplingParams
from mistral_jax.config import ModelConfig
from mistral_jax.loading.checkpoint import base, open_checkpoint
from mistral_jax.loading.weights import load_weights
from mistral_jax.runtime.sharding import parse_mesh

from helpers.checkpoints import make_tiny_fp8_hf_checkpoint, make_tiny_hf_checkpoint, make_tiny_mistral_checkpoint
from helpers.models import qkv_part

# Head counts divisible by 8 (tp up to 8), grouped-query attention (2 q heads per kv head).
CFG = ModelConfig(dim=64, n_layers=2, n_heads=16, n_kv_heads=8, head_dim=8, hidden_dim=128,
                  vocab_size=32768, rope_theta=10000.0, max_seq_len=256)
MESHES = ["tp=2", "tp=4", "tp=8", "dp=2,tp=4"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from helpers.models import V3_TOKENIZER

    root = tmp_path_factory.mktemp("mesh")
    weights = make_tiny_mistral_checkpoint(root / "mistral", CFG, seed=3, dtype="float32")
    make_tiny_hf_checkpoint(root / "hf", weights, CFG, dtype="float32")
    for d in ("mistral", "hf"):
        shutil.copy(V3_TOKENIZER, root / d / "tokenizer.model.v3")
    return root / "mistral", root / "hf", weights


PROMPTS = [{"prompt_token_ids": np.random.default_rng(s).integers(5, 32768, size=n).tolist()}
           for s, n in ((0, 23), (1, 5), (2, 30))]
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)


def run(path, mesh):
    # One prefill step (all prompts, every position's logits) then decode steps: two programs.
    llm = LLM(model=str(path), dtype="float32", progress=False, max_num_batched_tokens=64, mesh=mesh)
    return llm, llm.generate(PROMPTS, PARAMS)


@pytest.fixture(scope="module")
def one_device(ckpts):
    return run(ckpts[0], None)[1]


def _lp_close(a, b):
    """Logprob dicts {token: logprob}: same tokens, values within f32 tolerance."""
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.slow
def test_mesh_gives_one_devices_tokens_and_logits(ckpts, one_device, mesh):
    """The paged engine on each mesh gives the same greedy
    tokens, the same logprobs of every generated token and of every prompt token."""
    llm, outs = run(ckpts[0], mesh)
    assert llm.mesh.devices.size == np.prod([int(p.split("=")[1]) for p in mesh.split(",")])
    for got, want in zip(outs, one_device):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            _lp_close(a, b)
        for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
            _lp_close(a, b)
    # The parameters and the cache really are split: tp devices each hold 1/tp of the heads.
    # On a CPU the engine serves the 16-bit projections stored [layers, in..., out...]
    # (projections.prefers_input_major): their shardings moved with their dims.
    tp = llm.mesh.shape["tp"]
    state = llm.engine.state
    wqkv = state["layers"]["attention"]["wqkv"][...]  # [layers, embed, kv_heads, g + 2, head_dim]
    assert tuple(wqkv.sharding.spec)[:3] == (None, None, "tp")
    assert {s.data.shape for s in wqkv.addressable_shards} == {(2, 64, 8 // tp, 4, 8)}
    w2 = state["layers"]["feed_forward"]["w2"][...]  # [layers, mlp, embed]
    assert {s.data.shape for s in w2.addressable_shards} == {(2, 128 // tp, 64)}
    emb = state["tok_embeddings"][...]
    assert {s.data.shape for s in emb.addressable_shards} == {(32768 // tp, 64)}
    assert {s.data.shape[3] for s in llm.engine.k_pages.addressable_shards} == {8 // tp}  # kv heads


@pytest.mark.slow
def test_no_recompilation_after_warmup_on_a_mesh(ckpts):
    from test_engine import LOWERINGS

    llm = LLM(model=str(ckpts[0]), dtype="float32", progress=False, mesh="dp=2,tp=4")
    mix = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
           SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1, max_tokens=5, ignore_eos=True,
                          repetition_penalty=1.2, logprobs=2)]

    def workload(seed):
        rng = np.random.default_rng(seed)
        return [{"prompt_token_ids": rng.integers(5, 32768, size=n).tolist()} for n in rng.permutation([20, 30])]

    llm.generate(workload(0), mix)
    before = LOWERINGS.count
    llm.generate(workload(1), mix[::-1])
    assert LOWERINGS.count == before


@pytest.mark.slow
def test_prefix_cache_on_a_mesh(ckpts):
    # A repeated 50-token prompt on tp=4: the second request reuses the pages of the first
    # (their kv heads split over the devices) and generates the same tokens and logprobs.
    llm = LLM(model=str(ckpts[0]), dtype="float32", progress=False, mesh="tp=4", block_size=8)
    prompt = {"prompt_token_ids": np.random.default_rng(9).integers(5, 32768, size=50).tolist()}
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    first, second = llm.generate([prompt], greedy)[0], llm.generate([prompt], greedy)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 48  # 6 full pages of 8
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    for a, b in zip(second.outputs[0].logprobs, first.outputs[0].logprobs):
        _lp_close(a, b)


def test_hf_checkpoint_on_a_mesh_equals_one_device(ckpts, one_device):
    """The HF q/k rotary un-permutation acts within each head: per-shard reads stay right."""
    _, outs = run(ckpts[1], "tp=8")
    for got, want in zip(outs, one_device):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        _lp_close(got.outputs[0].logprobs[0], want.outputs[0].logprobs[0])


def _count_reads(monkeypatch):
    """Bytes that safetensors hands back, per call."""
    reads = []
    real = base.read_safetensors_slice

    def counted(handle, source, index=()):
        out = real(handle, source, index)
        reads.append((source, out.nbytes))
        return out

    monkeypatch.setattr(base, "read_safetensors_slice", counted)
    return reads


@pytest.mark.parametrize("layout", [0, 1])
def test_sliced_loader_reads_only_the_shards(ckpts, monkeypatch, layout):
    """tp=4: each tp-split tensor is read as 4 slices of 1/4 (never whole), replicated ones
    (norms) once per device; the loaded weights equal the canonical ones."""
    reads = _count_reads(monkeypatch)
    model = load_weights(open_checkpoint(ckpts[layout]), jnp.float32, parse_mesh("tp=4"), progress=False)
    weights = ckpts[2]
    wq_name = "layers.1.attention.wq.weight" if layout == 0 else "model.layers.1.self_attn.q_proj.weight"
    wq_reads = [n for s, n in reads if s == wq_name]
    assert wq_reads == [weights["layers.1.attention.wq.weight"].nbytes // 4] * 4
    emb_name = "tok_embeddings.weight" if layout == 0 else "model.embed_tokens.weight"
    assert [n for s, n in reads if s == emb_name] == [weights["tok_embeddings.weight"].nbytes // 4] * 4
    for layer, name in ((1, "wq"), (0, "wk"), (1, "wv")):
        np.testing.assert_array_equal(np.asarray(qkv_part(model.layers.attention, name, layer)).reshape(-1, 64),
                                      weights[f"layers.{layer}.attention.{name}.weight"])
    np.testing.assert_array_equal(np.asarray(model.layers.feed_forward.w2[...][0]),
                                  weights["layers.0.feed_forward.w2.weight"])
    np.testing.assert_array_equal(np.asarray(model.output[...]), weights["output.weight"])


@pytest.mark.slow
def test_gguf_on_a_mesh_reads_only_the_shards(monkeypatch):
    """The demo GGUF model (quantized Q4_1 / Q8_0 blocks) on tp=3 (9 heads, 3 kv heads): each
    split tensor is read as 3 parts of a third, rows or whole blocks of columns, never whole;
    the loaded weights equal a one-device load (which the mesh tests above turn into the same
    tokens)."""
    from mistral_jax.loading.checkpoint import gguf
    from mistral_jax.loading.default_model import default_model_path

    one = load_weights(open_checkpoint(default_model_path()), jnp.float32, progress=False)
    reads, real = [], gguf.read_tensor

    def counted(tensor, shape, index=()):
        out = real(tensor, shape, index)
        reads.append((tensor.name, out.size, int(np.prod(shape))))
        return out

    monkeypatch.setattr(gguf, "read_tensor", counted)
    three = load_weights(open_checkpoint(default_model_path()), jnp.float32, parse_mesh("tp=3"), progress=False)
    for name in ("token_embd.weight", "blk.3.attn_q.weight", "blk.3.attn_output.weight", "blk.3.ffn_down.weight",
                 "blk.3.ffn_up.weight", "blk.3.attn_k.weight"):
        sizes = [(got, whole) for n, got, whole in reads if n == name]
        assert len(sizes) == 3 and all(3 * got == whole for got, whole in sizes), (name, sizes)
    for a, b in zip(jax.tree.leaves(nnx.state(one)), jax.tree.leaves(nnx.state(three))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fp8_checkpoint_sliced_on_a_mesh(ckpts, tmp_path):
    """FP8 weights (raw bytes, memory-mapped per slice) and their scales load per shard to the
    one-device values; the forward on tp=4 (per-shard products, fp8_tp.py) matches one device."""
    from helpers.models import dense_logits

    make_tiny_fp8_hf_checkpoint(tmp_path / "fp8", ckpts[1])
    one = load_weights(open_checkpoint(tmp_path / "fp8"), jnp.float32, progress=False)
    mesh = parse_mesh("tp=4")
    sharded = load_weights(open_checkpoint(tmp_path / "fp8"), jnp.float32, mesh, progress=False)
    for a, b in zip(jax.tree.leaves(nnx.state(one)), jax.tree.leaves(nnx.state(sharded))):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    assert sharded.layers.attention.wqkv.quant[...].dtype == jnp.float8_e4m3fn
    # [layers, kv_heads, g + 2, head_dim]: 2 of the 8 kv heads on each device, with their q heads
    assert {s.data.shape for s in sharded.layers.attention.wqkv.scale[...].addressable_shards} == {(2, 2, 4, 8)}
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 9)).astype(np.int32)
    from mistral_jax.runtime.sharding import use_mesh

    with use_mesh(mesh):
        got = dense_logits(sharded, tokens)
    np.testing.assert_allclose(got, dense_logits(one, tokens), rtol=2e-4, atol=2e-4)


def test_quantize_at_load_on_a_mesh(ckpts):
    one = load_weights(open_checkpoint(ckpts[0]), jnp.float32, progress=False, quantization="fp8")
    sharded = load_weights(open_checkpoint(ckpts[0]), jnp.float32, parse_mesh("tp=2"), progress=False,
                           quantization="fp8")
    for a, b in zip(jax.tree.leaves(nnx.state(one)), jax.tree.leaves(nnx.state(sharded))):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


@pytest.mark.parametrize("kernel,mesh_spec", [("triton", "tp=4"), ("tpu", "dp=2,tp=4")])
@pytest.mark.slow
def test_fp8_kernels_run_per_tp_shard(ckpts, monkeypatch, kernel, mesh_spec):
    """FP8 on a mesh: the Pallas kernel (interpret mode) runs once per tp shard on that shard's
    rows (wqkv, w1, w3) or columns (wo, w2, which take the row max across shards and add
    the partial products), reading the layer from the stack; logits match one device's
    reference."""
    from mistral_jax.model import fp8_tp
    from mistral_jax.runtime.sharding import use_mesh

    from helpers.models import dense_logits

    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, size=(2, 9)).astype(np.int32)
    want = dense_logits(load_weights(open_checkpoint(ckpts[0]), jnp.float32, progress=False,
                                     quantization="fp8", fp8_impl="reference"), tokens)
    mesh = parse_mesh(mesh_spec)
    sharded = load_weights(open_checkpoint(ckpts[0]), jnp.float32, mesh, progress=False, quantization="fp8",
                           fp8_impl=kernel)
    plain, plain_group, calls = fp8_tp.fp8_matmul, fp8_tp.fp8_matmul_group, []

    def interpreted(x, w, w_scale, *, layer=None, x_scale=None, impl="auto", out_dtype=jnp.bfloat16):
        calls.append((impl, (w.shape,), x_scale is not None))
        return plain(x, w, w_scale, layer=layer, x_scale=x_scale, impl=impl, out_dtype=out_dtype, interpret=True)

    def interpreted_group(x, ws, w_scales, *, layer=None, impl="auto", out_dtype=jnp.bfloat16):
        calls.append((impl, tuple(w.shape for w in ws), False))
        return plain_group(x, ws, w_scales, layer=layer, impl=impl, out_dtype=out_dtype, interpret=True)

    monkeypatch.setattr(fp8_tp, "fp8_matmul", interpreted)
    monkeypatch.setattr(fp8_tp, "fp8_matmul_group", interpreted_group)
    with use_mesh(mesh):
        got = dense_logits(sharded, tokens)
    # [layers, n, k] per device: wqkv 8 kv heads x (2 + 2) x 8 = 256 rows / 4; w1, w3 128 rows / 4;
    # wo, w2 128 columns / 4. Column-parallel w1, w3 go to the kernel together; qkv alone; row-
    # parallel wo, w2 alone, with x quantized by the row max across shards.
    qkv, mlp, row = (2, 64, 64), (2, 32, 64), (2, 64, 32)
    assert sorted(shapes for _, shapes, _ in calls) == sorted([(qkv,), (mlp, mlp), (row,), (row,)])
    assert {impl for impl, _, _ in calls} == {kernel}
    assert all(pre == (shapes == (row,)) for _, shapes, pre in calls)  # only row-parallel ones
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stacked,scheduled", [(False, False), (True, False), (True, True)])
def test_triton_kernel_under_shard_map_matches_reference(stacked, scheduled):
    """The Pallas Triton kernel (interpret mode) per tp=2 shard of the heads equals the
    unsharded reference; the call sits inside jit as in the engine. `scheduled`: the launch
    tables built once outside the shards (PagedKVCache.prepare) and handed to every shard."""
    from pallas_kernels.ragged_paged_attention import attention_schedule, ragged_paged_attention
    from tests.test_ragged_paged_attention import make_batch

    rng = np.random.default_rng(5)
    q, kp, vp, *rest = map(jnp.asarray, make_batch(rng, [(1, 5), (3, 9), (6, 6)], page_size=4, n_heads=4,
                                                   n_kv=2, head_dim=8, max_seqs=4))
    layer = None
    if stacked:  # the engine's layout: every layer's pool in one array, a traced layer index
        kp, vp, layer = jnp.stack([vp, kp]), jnp.stack([kp, vp]), jnp.int32(1)
    mesh = parse_mesh("tp=2")
    ref = ragged_paged_attention(q, kp, vp, *rest, layer=layer, impl="reference")

    def fn(q, kp, vp, *rest):
        schedule = attention_schedule("triton", q.shape[0], q.shape[1], kp, *rest) if scheduled else None
        return ragged_paged_attention(q, kp, vp, *rest, layer=layer, impl="triton", interpret=True, mesh=mesh,
                                      schedule=schedule)

    out = jax.jit(fn)(q, kp, vp, *rest)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, match", [
    ("pp=2", "unknown axis 'pp'"),
    ("tp=0", "tp=0 is invalid"),
    ("tp=-2", "tp=-2 is invalid"),
    ("tp=two", "needs an integer size"),
    ("tp=2,tp=2", "given twice"),
    ("dp=4,tp=4", r"needs 16 devices, but 8 cpu device\(s\) are present"),
])
def test_bad_mesh_specs_fail_clearly(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mesh(spec)


def test_parse_mesh_shapes():
    assert parse_mesh(None).devices.size == 1
    assert dict(parse_mesh("tp=4").shape) == {"dp": 1, "tp": 4}
    assert dict(parse_mesh("dp=2, tp=4").shape) == {"dp": 2, "tp": 4}


def test_impossible_tp_fails_before_loading(ckpts, tiny_checkpoints, monkeypatch):
    """tp=16 cannot split 8 kv heads (before the devices are even counted, nothing is read);
    the tiny model's 4 heads / 2 kv heads refuse tp=4 and name the tps that fit."""
    monkeypatch.setattr(base.Checkpoint, "entries", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match=r"n_kv_heads=2 .*not divisible by 4.*Use tp in \[1, 2\]"):
        LLM(model=str(tiny_checkpoints[0]), dtype="float32", progress=False, mesh="tp=4")
    from mistral_jax.runtime.sharding import check_mesh, make_mesh

    fake = type("M", (), {"shape": {"dp": 1, "tp": 16}})()  # 16 devices are not needed to check
    with pytest.raises(ValueError, match=r"n_kv_heads=8 not divisible by 16"):
        check_mesh(CFG, fake)
    with pytest.raises(ValueError, match="not divisible by 3"):
        LLM(model=str(ckpts[0]), dtype="float32", progress=False, mesh="tp=3")
    assert make_mesh(tp=8).devices.size == 8


def test_cli_mesh_option():
    from mistral_jax.entrypoints.generate import parse_args

    assert parse_args(["--mesh", "dp=2,tp=4"]).mesh == "dp=2,tp=4"


def test_cache_sized_per_device_under_tp(ckpts, monkeypatch):
    """A device's memory budget holds tp times the pages: each device keeps 1/tp of the kv heads."""
    from mistral_jax.engine.engine import Engine

    monkeypatch.setattr(Engine, "device_memory", lambda self: {"bytes_limit": 1 << 30, "bytes_in_use": 0})
    pages = {m: LLM(model=str(ckpts[0]), dtype="float32", progress=False, mesh=m).engine.num_pages
             for m in (None, "tp=4")}
    assert abs(pages["tp=4"] - 4 * pages[None]) <= 4


def _hlo_computations(hlo: str) -> dict[str, list[str]]:
    """Optimized HLO text -> {computation name ("ENTRY" for the entry): its lines}."""
    out, name = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = "ENTRY" if line.startswith("ENTRY") else line.split(" ")[0]
            out[name] = []
        elif name:
            out[name].append(line)
    return out


def test_sampling_keeps_the_vocabulary_sharded():
    # Logits split over tp=8: greedy picks, logprobs and their top-k run per shard plus small
    # merges; no step gathers a [rows, vocab] array unconditionally. (Only top-k / top-p
    # filters, inside their own branch, sort the whole vocabulary: sharding.py says so.)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mistral_jax.runtime.sharding import use_mesh
    from mistral_jax.sample.sampling import SamplingArrays, sample, top_k_over_vocab

    mesh, vocab, rows = parse_mesh("tp=8"), 32768, 4
    rng = np.random.default_rng(0)
    split = NamedSharding(mesh, P(None, "tp"))
    logits = np.round(rng.normal(size=(rows, vocab)), 1).astype(np.float32)  # many ties
    arrays = SamplingArrays.from_params([SamplingParams(temperature=0)] * rows)
    zeros = (jnp.zeros((rows, vocab), jnp.int32), jnp.zeros((rows, vocab), bool))
    step = jnp.zeros(rows, jnp.int32)
    fn = jax.jit(lambda lg, a, s, c, m: sample(lg, a, s, c, m, num_logprobs=5))
    args = (jax.device_put(logits, split), arrays, step, *(jax.device_put(z, split) for z in zeros))
    with use_mesh(mesh):
        hlo = fn.lower(*args).compile().as_text()
        sharded = fn(*args)
        top_sharded = jax.jit(lambda x: top_k_over_vocab(x, 7))(jax.device_put(logits, split))
        chunked = jax.jit(lambda x: top_k_over_vocab(x, 7, chunk=1024))  # GPUs' chunks: 4 per shard
        chunked_hlo = chunked.lower(jax.device_put(logits, split)).compile().as_text()
        top_chunked = chunked(jax.device_put(logits, split))
    for text in (hlo, chunked_hlo):  # no gather of rows x vocab elements, whatever its shape
        entry = _hlo_computations(text)["ENTRY"]
        gathers = [ln for ln in entry if "all-gather(" in ln
                   and math.prod(map(int, re.search(r"\[([\d,]+)\]", ln.split("all-gather(")[0]).group(1).split(",")))
                   >= rows * vocab]
        assert not gathers, gathers[:2]
    plain = jax.jit(lambda lg, a, s, c, m: sample(lg, a, s, c, m, num_logprobs=5))(logits, arrays, step, *zeros)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    top_plain = jax.lax.top_k(logits, 7)
    np.testing.assert_array_equal(np.asarray(top_sharded[0]), np.asarray(top_plain[0]))
    np.testing.assert_array_equal(np.asarray(top_sharded[1]), np.asarray(top_plain[1]))
    np.testing.assert_array_equal(np.asarray(top_chunked[0]), np.asarray(top_plain[0]))
    np.testing.assert_array_equal(np.asarray(top_chunked[1]), np.asarray(top_plain[1]))


@pytest.mark.parametrize("split", ["out", "in", "group"])
def test_fp8_triton_per_shard_byte_pairs(monkeypatch, split):
    """The FP8 Triton kernel per tp=2 shard (interpret mode) on an odd stack of layers with shard
    widths that are not powers of two, reading each shard's stack as uint16 byte pairs (the path
    of 2-4 GiB stacks per GPU, issue 22; forced here at small sizes): every layer equals the
    unsharded reference product."""
    import pallas_kernels.fp8_matmul.triton as triton_kernel
    from mistral_jax.model import fp8_tp
    from pallas_kernels.fp8_matmul import fp8_matmul_reference, quantize_weight

    paired = []
    monkeypatch.setattr(triton_kernel, "triton_offsets_overflow", lambda shape, dtype: paired.append(shape) or True)
    for name in ("fp8_matmul", "fp8_matmul_group"):
        monkeypatch.setattr(fp8_tp, name, functools.partial(getattr(fp8_tp, name), interpret=True))
    rng = np.random.default_rng(3)
    layers, m, k, ns = 3, 5, 160, (96, 48)  # per shard: 80 columns, 48 and 24 rows
    mesh = parse_mesh("tp=2")
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    stacks = []
    for n in ns:
        w, s = quantize_weight(jnp.asarray(rng.normal(size=(layers * n, k)) * 0.05, jnp.float32))
        stacks.append((w.reshape(layers, n, k), s.reshape(layers, n)))
    for layer in (2, 1, 0):
        if split == "group":
            got = fp8_tp.fp8_linear_group_tp(x, [w for w, _ in stacks], [s for _, s in stacks], jnp.int32(layer),
                                             mesh=mesh, impl="triton", out_dtype=jnp.float32)
        else:
            got = [fp8_tp.fp8_linear_tp(x, *stacks[0], jnp.int32(layer), split=split, mesh=mesh, impl="triton",
                                        out_dtype=jnp.float32)]
        for y, (w, s) in zip(got, stacks):
            want = fp8_matmul_reference(x, w[layer], s[layer], out_dtype=jnp.float32)
            np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    shard = {"out": [(layers, 48, k)], "in": [(layers, 96, 80)], "group": [(layers, 48, k), (layers, 24, k)]}[split]
    assert set(paired) == set(shard)  # the kernel saw each shard's own stack
