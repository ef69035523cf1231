"""Shared fixtures: tiny random checkpoints in both layouts. Shared helpers (not fixtures) live in
tests/helpers/ (`from helpers.models import dense_logits`), never `from conftest import`."""

import os
import shutil

import pytest

CPU_DEVICES = 8  # host devices of the CPU suite: meshes up to dp x tp = 8 (issue 5's tests)


def pytest_configure(config):
    # The CPU suite pins JAX to the CPU; `pytest -m gpu` (run on the device) keeps the GPU.
    if config.getoption("markexpr", "") != "gpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax  # before any backend starts: the device count is fixed at backend init

        jax.config.update("jax_num_cpu_devices", CPU_DEVICES)


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where a -m expression names them (`-m gpu`): `-m "not slow"` (the quick
    tier) replaces pyproject's `-m 'not gpu'` and still means the CPU tests only."""
    if "gpu" in (config.getoption("markexpr", "") or ""):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


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
    from helpers.checkpoints import make_tiny_hf_checkpoint, make_tiny_mistral_checkpoint
    from helpers.models import v3_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    mistral_dir, hf_dir = root / "mistral", root / "hf"
    weights = make_tiny_mistral_checkpoint(mistral_dir, tiny_cfg, seed=0, dtype="float32")
    make_tiny_hf_checkpoint(hf_dir, weights, tiny_cfg, dtype="float32")
    for d in (mistral_dir, hf_dir):
        shutil.copy(v3_tokenizer(), d / "tokenizer.model.v3")
    return mistral_dir, hf_dir, weights


@pytest.fixture(scope="session")
def tokens(tiny_cfg):
    """[3, 37] random token ids of the tiny config, for logits comparisons."""
    import numpy as np

    return np.random.default_rng(1).integers(0, tiny_cfg.vocab_size, size=(3, 37)).astype(np.int32)


@pytest.fixture(scope="session")
def mistral_files(tmp_path_factory):
    """mistral-common's tokenizer files (SentencePiece and Tekken, several versions), by name."""
    from helpers.tokenizer_files import mistral_tokenizer_files

    return mistral_tokenizer_files(tmp_path_factory.mktemp("tekken"))


@pytest.fixture(scope="session")
def mistral_pairs(mistral_files):
    """Ours and mistral-common's own tokenizer, loaded independently, per tokenizer file (shared by
    the tokenizer and tool-call tests: loading them is the slowest part of both)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MCTokenizer

    from mistral_jax.tokenizer import load_tokenizer

    return {name: (load_tokenizer(path), MCTokenizer.from_file(str(path))) for name, path in mistral_files.items()}
