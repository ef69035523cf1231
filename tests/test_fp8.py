"""FP8 weights (W8A8, per-channel e4m3 weights, dynamic per-token activations): compressed-tensors
checkpoints in both layouts, their validation, and quantization at load.

Tolerances (tiny random model, 2 layers, 14 FP8 matmuls on the path to the logits):
- weights after load equal the compressed-tensors package's own dequantization exactly;
- logits vs transformers (which dequantizes the weights but keeps activations in f32): relative
  L2 error <= 0.08. e4m3 keeps 3 mantissa bits, so per-token activation rounding alone moves each
  matmul by ~2-4% (measured: 0.044 end to end); a wrong scale, a missed un-permutation or
  unquantized weights give errors of order 1;
- quantization="fp8" at load vs the f32 model: relative error <= 0.1 (weights and activations
  both rounded; measured 0.067), greedy argmax agreement >= 75% (the tiny model's logits are
  nearly flat, so close calls flip; measured 85%).
"""

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from mistral_jax.loading.checkpoint import CheckpointError, open_checkpoint
from mistral_jax.loading.checkpoint.hf import unpermute_rotary
from mistral_jax.loading.weights import load_weights
from mistral_jax.model.projections import Fp8Weight

from helpers.checkpoints import hf_fp8_model_dequantized, make_tiny_fp8_hf_checkpoint
from helpers.models import V3_TOKENIZER, dense_logits, qkv_part


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)




@pytest.fixture(scope="module")
def fp8_hf(tmp_path_factory, tiny_checkpoints):
    """The tiny HF checkpoint quantized and written by the compressed-tensors package."""
    directory = tmp_path_factory.mktemp("fp8") / "hf"
    make_tiny_fp8_hf_checkpoint(directory, tiny_checkpoints[1])
    shutil.copy(V3_TOKENIZER, directory / "tokenizer.model.v3")
    return directory


@pytest.fixture(scope="module")
def fp8_model(fp8_hf):
    return load_weights(open_checkpoint(fp8_hf), jnp.float32, progress=False)


@pytest.fixture(scope="module")
def fp8_logits(fp8_model, tokens):
    return dense_logits(fp8_model, tokens)


def test_fp8_hf_weights_equal_package_dequantization(fp8_hf, fp8_model, tiny_cfg):
    ckpt = open_checkpoint(fp8_hf)
    assert ckpt.quantization == "fp8" and fp8_model.quantization == "fp8"
    hf = hf_fp8_model_dequantized(fp8_hf)  # transformers + compressed-tensors' decompressor
    attn, mlp = fp8_model.layers.attention, fp8_model.layers.feed_forward
    for i, layer in enumerate(hf.model.layers):
        want = {
            "wq": unpermute_rotary(layer.self_attn.q_proj.weight.detach().numpy(), tiny_cfg.n_heads),
            "wk": unpermute_rotary(layer.self_attn.k_proj.weight.detach().numpy(), tiny_cfg.n_kv_heads),
            "wv": layer.self_attn.v_proj.weight.detach().numpy(), "wo": layer.self_attn.o_proj.weight.detach().numpy(),
        }
        want_mlp = {"w1": layer.mlp.gate_proj, "w2": layer.mlp.down_proj, "w3": layer.mlp.up_proj}
        for module, names in ((attn, want), (mlp, {k: v.weight.detach().numpy() for k, v in want_mlp.items()})):
            for name, w in names.items():
                if module is attn and name != "wo":  # q, k and v are parts of one weight, wqkv
                    q, scale = qkv_part(attn, name, i), qkv_part(attn, name + "_scale", i)
                else:
                    q, scale = getattr(module, name).quant[...][i], getattr(module, name).scale[...][i]
                assert q.dtype == jnp.float8_e4m3fn, name
                n = scale.size
                ours = np.asarray(q.reshape(n, -1), np.float32) * np.asarray(scale, np.float32).reshape(n, 1)
                np.testing.assert_array_equal(ours, w, err_msg=f"layer {i} {name}")
    assert fp8_model.tok_embeddings.dtype == jnp.float32 and fp8_model.output.dtype == jnp.float32


def test_fp8_hf_logits_match_transformers(fp8_hf, fp8_logits, tokens):
    hf = hf_fp8_model_dequantized(fp8_hf)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    assert rel_err(fp8_logits, ref) <= 0.08


def test_fp8_impls_agree(fp8_hf, fp8_logits, tokens):
    reference = load_weights(open_checkpoint(fp8_hf), jnp.float32, progress=False, fp8_impl="reference")
    assert rel_err(dense_logits(reference, tokens), fp8_logits) <= 1e-5


def test_fp8_mistral_layout(tmp_path, fp8_hf, fp8_logits, tokens, tiny_cfg):
    """The same FP8 tensors under canonical names in consolidated.safetensors load to the same model."""
    tensors = {}
    for name, array in open_checkpoint(fp8_hf).tensors(progress=False):
        fp8 = array.dtype == ml_dtypes.float8_e4m3fn  # torch reads e4m3 bytes, numpy has no float8
        t = torch.from_numpy(np.array(array.view(np.uint8) if fp8 else array))
        tensors[name] = t.view(torch.float8_e4m3fn) if fp8 else t
    (tmp_path / "params.json").write_text(json.dumps(tiny_cfg.to_mistral_params()))
    save_torch(tensors, str(tmp_path / "consolidated.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "mistral" and ckpt.quantization == "fp8"
    model = load_weights(ckpt, jnp.float32, progress=False)
    np.testing.assert_array_equal(dense_logits(model, tokens), fp8_logits)


# ---- validation -------------------------------------------------------------------------------


def _copy(src, dst, edit_config=None, edit_tensors=None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_torch(str(src / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_torch(tensors, str(dst / "model.safetensors"))
    return dst


def _weights(group):
    return group["config_groups"]["group_0"]["weights"]


def _acts(group):
    return group["config_groups"]["group_0"]["input_activations"]


@pytest.mark.parametrize("edit, message", [
    (lambda q: _acts(q).update(dynamic=False), "input_activations.dynamic is False"),
    (lambda q: _weights(q).update(strategy="block"), "weights.strategy is 'block'"),
    (lambda q: _weights(q).update(strategy="group", group_size=32), "weights.strategy is 'group'"),
    (lambda q: _weights(q).update(type="int"), "weights.type is 'int'"),
    (lambda q: q.update(quant_method="fp8"), "quant_method is 'fp8'"),
])
def test_unsupported_quantization_config(tmp_path, fp8_hf, edit, message):
    bad = _copy(fp8_hf, tmp_path / "bad", edit_config=edit)
    with pytest.raises(CheckpointError, match="config.json") as e:
        open_checkpoint(bad)
    assert message in str(e.value) and "FP8_DYNAMIC" in str(e.value)


def test_missing_weight_scale(tmp_path, fp8_hf):
    bad = _copy(fp8_hf, tmp_path / "bad", edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    with pytest.raises(CheckpointError, match=r"layers.1.feed_forward.w3.weight needs layers.1.feed_forward.w3"
                                              r".weight_scale \[out, 1\]; re-export"):
        list(open_checkpoint(bad).tensors(progress=False))


def test_wrong_scale_shape(tmp_path, fp8_hf):
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    bad = _copy(fp8_hf, tmp_path / "bad", edit_tensors=lambda t: t.update({name: t[name][:, 0].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' \(layers.0.attention.wk.weight_scale\): shape "
                                              r"\(48,\), expected \(48, 1\) \(one scale per output channel\)"):
        list(open_checkpoint(bad).tensors(progress=False))


def test_fp8_tensor_without_quantization_config(tmp_path, fp8_hf):
    bad = _copy(fp8_hf, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    del config["quantization_config"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="dtype F8_E4M3, but the checkpoint declares no FP8 quantization"):
        list(open_checkpoint(bad).tensors(progress=False))


# ---- quantization at load -----------------------------------------------------------------------


def test_quantize_at_load_close_to_f32(tiny_checkpoints, tokens):
    ckpt = open_checkpoint(tiny_checkpoints[0])
    full = dense_logits(load_weights(ckpt, jnp.float32, progress=False), tokens)
    fp8 = dense_logits(load_weights(ckpt, jnp.float32, progress=False, quantization="fp8"), tokens)
    assert rel_err(fp8, full) <= 0.1
    assert (fp8.argmax(-1) == full.argmax(-1)).mean() >= 0.75


def test_fused_quantization_only_where_no_kernel_pads_rows():
    # The model hands FP8 projections x quantized by the kernel that also ran the norm (or silu),
    # unless a kernel would then copy x into padded rows: the wgmma kernel pads m to its tile
    # (192 rows at 4,096 tokens; 64 at 33-64), where quantizing inside the product pads for free.
    from mistral_jax.model.projections import _fused_impl
    from pallas_kernels.fp8_matmul import pads_rows

    def stacked(n, k, impl):  # an Fp8Weight [layers, n, k] of shapes only (its arrays are never read)
        return nnx.eval_shape(lambda: Fp8Weight(jnp.zeros((2, n, k), jnp.float8_e4m3fn), jnp.ones((2, n), jnp.float32),
                                                ("layers", "mlp", "embed"), impl))

    def fuses(x, impl, *shapes):
        return _fused_impl(x, [stacked(n, k, impl) for n, k in shapes]) == (impl if shapes else None)

    w1, w2 = (32768, 5120), (5120, 32768)
    x = lambda tokens: jnp.zeros((1, tokens, 8), jnp.bfloat16)  # noqa: E731 (only its shape counts)
    assert pads_rows(4096, 32768, 5120, "mgpu") and not pads_rows(512, 32768, 5120, "mgpu")
    assert pads_rows(40, 5120, 32768, "mgpu") and not pads_rows(64, 5120, 32768, "mgpu")
    assert not pads_rows(4096, 32768, 5120, "triton") and not pads_rows(4096, 32768, 5120, "xla")
    assert not fuses(x(4096), "mgpu", w1, w1) and fuses(x(512), "mgpu", w1, w1)
    assert not fuses(x(40), "mgpu", w2) and fuses(x(40), "triton", w2)
    assert fuses(x(4096), "xla", w1)  # the jnp twins pad nothing
    dense = nnx.eval_shape(lambda: nnx.Param(jnp.zeros((2, 5120, 8), jnp.bfloat16)))
    assert _fused_impl(x(8), [stacked(*w1, "xla"), dense]) is None  # a 16-bit projection among them


@pytest.mark.parametrize("kernel", ["triton", "tpu"])
def test_model_kernels_read_stacked_weights(tiny_checkpoints, tokens, monkeypatch, kernel):
    # The layer scan hands each FP8 projection's whole [layers, n, k] stack and the layer index
    # to the kernel (no per-layer slice to copy); the kernel, run in interpret mode here, must
    # give the logits of the jnp reference, which slices the layer itself. q, k, v are one
    # weight (wqkv); the Triton kernel takes w1, w3 in one launch, the TPU kernel one at a time.
    import pallas_kernels.fp8_matmul as fm

    model = load_weights(open_checkpoint(tiny_checkpoints[0]), jnp.float32, progress=False,
                         quantization="fp8", fp8_impl="reference")
    ref = dense_logits(model, tokens)
    plain, plain_group, plain_quantize, seen = fm.fp8_matmul, fm.fp8_matmul_group, fm.quantize_input, []

    def interpreted(x, w, w_scale, *, layer=None, x_scale=None, impl="auto", out_dtype=jnp.bfloat16, interpret=False):
        seen.append((impl, w.ndim, layer is not None, 1, x_scale is not None))
        return plain(x, w, w_scale, layer=layer, x_scale=x_scale, impl=impl, out_dtype=out_dtype, interpret=True)

    def interpreted_group(x, ws, w_scales, *, layer=None, x_scale=None, impl="auto", out_dtype=jnp.bfloat16,
                          interpret=False):
        if impl == "triton":
            seen.append((impl, ws[0].ndim, layer is not None, len(ws), x_scale is not None))
            return plain_group(x, ws, w_scales, layer=layer, x_scale=x_scale, impl=impl, out_dtype=out_dtype,
                               interpret=True)
        return tuple(interpreted(x, w, s, layer=layer, x_scale=x_scale, impl=impl, out_dtype=out_dtype)
                     for w, s in zip(ws, w_scales))

    def interpreted_quantize(x, *, norm=None, eps=0.0, gate=None, layer=None, impl="auto", interpret=False):
        seen.append(("quantize", "norm" if norm is not None else "gate" if gate is not None else None))
        if norm is not None:  # the layer norms come whole, the kernel reading the layer's row
            assert norm.ndim == 2 and layer is not None, (norm.shape, layer)
        return plain_quantize(x, norm=norm, eps=eps, gate=gate, layer=layer, impl=impl, interpret=True)

    plain_swiglu = fm.fp8_swiglu

    def interpreted_swiglu(x, w1, w3, s1, s3, *, layer=None, x_scale=None, impl="auto", out_dtype=jnp.bfloat16,
                           interpret=False):
        seen.append(("swiglu", impl, w1.ndim, layer is not None, x_scale is not None))
        return plain_swiglu(x, w1, w3, s1, s3, layer=layer, x_scale=x_scale, impl=impl, out_dtype=out_dtype,
                            interpret=True)

    monkeypatch.setattr(fm, "fp8_swiglu", interpreted_swiglu)
    monkeypatch.setattr(fm, "fp8_matmul", interpreted)
    monkeypatch.setattr(fm, "fp8_matmul_group", interpreted_group)
    monkeypatch.setattr(fm, "quantize_input", interpreted_quantize)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Fp8Weight):
            module.impl = kernel
    out = dense_logits(model, tokens)
    # Per layer: the norm fused into qkv's quantization, then the qkv product; o alone,
    # quantizing its own x; the norm fused again for w1, w3, whose products give silu(w1 x) *
    # w3 x quantized for w2 (fp8_swiglu: on Triton one launch with the products; on the TPU's
    # kernel the products one at a time, then silu fused into the quantizer), then w2.
    swiglu = [s for s in seen if s[0] == "swiglu"]
    layers = len(swiglu)
    assert layers >= 1 and all(s[1:] == (kernel, 3, True, True) for s in swiglu), swiglu
    products = [1, 1, 1] if kernel == "triton" else [1, 1, 1, 1, 1]
    quantized = [True, False, True] if kernel == "triton" else [True, False, True, True, True]
    fused = {"norm": 2, "gate": 0 if kernel == "triton" else 1}
    per_layer = [s for s in seen if s[0] not in ("quantize", "swiglu")][: len(products)]
    assert [s[3] for s in per_layer] == products and [s[4] for s in per_layer] == quantized, seen
    assert all(s[:3] == (kernel, 3, True) for s in seen if s[0] not in ("quantize", "swiglu")), seen[:3]
    assert {f: sum(s == ("quantize", f) for s in seen) for f in fused} == {f: n * layers for f, n in fused.items()}
    assert rel_err(out, ref) < 1e-5


@pytest.mark.slow
def test_llm_fp8_engine_runs(tiny_checkpoints, capsys):
    from mistral_jax import LLM, SamplingParams

    rng = np.random.default_rng(7)
    prompts = [{"prompt_token_ids": rng.integers(5, 32768, size=n).tolist()} for n in (5, 17, 40)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model=str(tiny_checkpoints[0]), dtype="float32", quantization="fp8", block_size=8)
    assert llm.quantization == "fp8" and "weights fp8" in capsys.readouterr().err
    outs = llm.generate(prompts, [greedy, SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=0,
                                                         ignore_eos=True), greedy])
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8, 8]
    again = llm.generate(prompts[2:], greedy)  # a prefix cache hit (40 tokens = 5 full pages), same tokens
    assert again[0].outputs[0].token_ids == outs[2].outputs[0].token_ids and again[0].num_cached_tokens > 0


def test_invalid_quantization(tiny_checkpoints):
    from mistral_jax import LLM

    with pytest.raises(ValueError, match=r"quantization='int8' is not supported; use None .* or 'fp8'"):
        LLM(model=str(tiny_checkpoints[0]), quantization="int8", progress=False)


def test_cli_fp8_options(monkeypatch, capsys):
    # --quantization fp8 --fp8-impl reach LLM; an unknown impl is refused by the parser.
    from mistral_jax.entrypoints import generate as cli

    seen = {}

    def fake_start(engine_args, progress=True):
        seen.update(vars(engine_args))
        raise ValueError("stopped before loading")

    monkeypatch.setattr(cli.LLM, "from_engine_args", staticmethod(fake_start))
    assert cli.main(["--quantization", "fp8", "--fp8-impl", "triton", "--prompt", "hi"]) == 2
    assert seen["quantization"] == "fp8" and seen["fp8_impl"] == "triton"
    assert "stopped before loading" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--fp8-impl", "cuda"])
    assert "invalid choice: 'cuda'" in capsys.readouterr().err
