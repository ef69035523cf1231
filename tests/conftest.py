"""Shared fixtures: tiny random checkpoints in both layouts, and small helpers."""

import os
import shutil
from pathlib import Path

import pytest


CPU_DEVICES = 8  # host devices of the CPU suite: meshes up to dp x tp = 8 (issue 5's tests)


def pytest_configure(config):
    # The CPU suite pins JAX to the CPU; `pytest -m gpu` (run on the device) keeps the GPU.
    if config.getoption("markexpr", "") != "gpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax  # before any backend starts: the device count is fixed at backend init

        jax.config.update("jax_num_cpu_devices", CPU_DEVICES)


def _v3_tokenizer() -> Path:
    import mistral_common  # imported lazily: the GPU image has no mistral-common

    return Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"


def __getattr__(name):  # `from conftest import V3_TOKENIZER` stays lazy
    if name == "V3_TOKENIZER":
        return _v3_tokenizer()
    raise AttributeError(name)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each module. Every XLA:CPU program keeps its code
    mapped, and the whole suite in one process passed Linux's 65,530 memory maps per process
    (20,900 after 13 speculative-decoding tests; the suite then aborted inside a compile)."""
    yield
    import gc

    import jax

    from mistral_jax.engine import programs

    jax.clear_caches()
    programs.clear()
    gc.collect()


@pytest.fixture(scope="session")
def gpu_only():
    """For the `pytest -m gpu` suites: skip where JAX has no GPU backend."""
    import jax

    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")


@pytest.fixture(scope="session")
def tiny_cfg():
    from mistral_jax.config import ModelConfig

    return ModelConfig.named("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_cfg):
    """The same random f32 weights saved as a Mistral and as a Hugging Face checkpoint, each with
    the v3 tokenizer beside it. Returns (mistral_dir, hf_dir, canonical weights)."""
    from checkpoint_fixtures import make_tiny_hf_checkpoint, make_tiny_mistral_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    mistral_dir, hf_dir = root / "mistral", root / "hf"
    weights = make_tiny_mistral_checkpoint(mistral_dir, tiny_cfg, seed=0, dtype="float32")
    make_tiny_hf_checkpoint(hf_dir, weights, tiny_cfg, dtype="float32")
    for d in (mistral_dir, hf_dir):
        shutil.copy(_v3_tokenizer(), d / "tokenizer.model.v3")
    return mistral_dir, hf_dir, weights


@pytest.fixture(scope="session")
def tokens(tiny_cfg):
    """[3, 37] random token ids of the tiny config, for logits comparisons."""
    import numpy as np

    return np.random.default_rng(1).integers(0, tiny_cfg.vocab_size, size=(3, 37)).astype(np.int32)


def dense_logits(model, tokens, to_numpy=True):
    """One full forward of `model` over tokens [batch, seq] with a dense cache: logits as NumPy
    (or as the array, to_numpy=False, e.g. inside jit)."""
    import jax.numpy as jnp
    import numpy as np

    from mistral_jax.cache.kv_cache import DenseKVCache

    b, t = tokens.shape
    cache = DenseKVCache.init(model.cfg, b, max(64, t), model.dtype)
    logits, _ = model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(t), (b, t)), cache)
    return np.asarray(logits) if to_numpy else logits


def qkv_part(attention, name: str, layer: int):
    """The checkpoint's wq, wk or wv (or its `_scale`) of one layer out of the model's joint
    attention.wqkv [layers, kv_heads, g + 2, head_dim, ...]: [heads, head_dim, ...]."""
    w = (attention.wqkv_scale if name.endswith("_scale") else attention.wqkv)[...][layer]
    g = w.shape[1] - 2
    part = {"wq": w[:, :g], "wk": w[:, g], "wv": w[:, g + 1]}[name.removesuffix("_scale")]
    return part.reshape(-1, *w.shape[2:])
