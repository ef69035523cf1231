"""hub.py's choices without a network: which layout and which files vLLM's switches pick from a
repo's file list, the combinations refused, and vLLM's two spellings of a flag."""

import pytest

from mistral_jax.config import CheckpointError
from mistral_jax.engine.args import normalize_flags
from mistral_jax.loading import hub

# Mistral-Small-24B-Instruct-2501's repo: both weight layouts, both tokenizer kinds.
BOTH = ["README.md", "params.json", "consolidated.safetensors", "config.json", "generation_config.json",
        "model-00001-of-00010.safetensors", "model-00002-of-00010.safetensors", "model.safetensors.index.json",
        "tekken.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
MISTRAL_ONLY = ["params.json", "consolidated.safetensors", "tokenizer.model.v3"]


@pytest.mark.parametrize("files, load_format, config_format, layout", [
    (BOTH, "mistral", "auto", "mistral"),
    (BOTH, "mistral", "mistral", "mistral"),
    (BOTH, "safetensors", "auto", "hf"),
    (BOTH, "auto", "auto", "hf"),  # vLLM's order: Hugging Face's config first
    (BOTH, "auto", "mistral", "mistral"),
    (BOTH, "auto", "hf", "hf"),
    (MISTRAL_ONLY, "auto", "auto", "mistral"),
    (["model.gguf", "README.md"], "auto", "auto", "gguf"),
    (["model.gguf"], "gguf", "auto", "gguf"),
    (["params.json", "tekken.json"], "dummy", "auto", "mistral"),  # no weights needed
])
def test_layout(files, load_format, config_format, layout):
    assert hub.choose_layout(files, load_format, config_format, "repo") == layout


@pytest.mark.parametrize("files, load_format, config_format, match", [
    (MISTRAL_ONLY, "safetensors", "auto", "model\\*.safetensors"),
    (["config.json", "model.safetensors"], "mistral", "auto", "params.json"),
    (["a.gguf", "b.gguf"], "gguf", "auto", "several .gguf"),
    (["README.md"], "auto", "auto", "no model found"),
])
def test_layout_missing_names_the_files(files, load_format, config_format, match):
    with pytest.raises(CheckpointError, match=match):
        hub.choose_layout(files, load_format, config_format, "repo")


@pytest.mark.parametrize("files, mode, layout, want", [
    (BOTH, "auto", "mistral", ["tekken.json"]),
    (BOTH, "mistral", "hf", ["tekken.json"]),
    (BOTH, "hf", "mistral", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]),
    (MISTRAL_ONLY, "auto", "mistral", ["tokenizer.model.v*"]),
    (["model.gguf"], "auto", "gguf", []),
])
def test_tokenizer_files(files, mode, layout, want):
    assert hub.tokenizer_patterns(files, mode, layout, "repo") == want


def test_tokenizer_mode_the_repo_lacks():
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        hub.tokenizer_patterns(MISTRAL_ONLY, "hf", "mistral", "repo")
    with pytest.raises(CheckpointError, match="GGUF"):
        hub.tokenizer_patterns(["m.gguf"], "mistral", "gguf", "repo")


@pytest.mark.parametrize("kwargs, match", [
    (dict(load_format="mistral", config_format="hf"), "mixes two layouts"),
    (dict(load_format="safetensors", config_format="mistral"), "mixes two layouts"),
    (dict(load_format="gguf", config_format="mistral"), "config_format='auto'"),
    (dict(load_format="pt"), "load_format='pt' is not one of"),
    (dict(tokenizer_mode="slow"), "tokenizer_mode='slow' is not one of"),
])
def test_combinations_refused(kwargs, match):
    args = dict(load_format="auto", config_format="auto", tokenizer_mode="auto") | kwargs
    with pytest.raises(ValueError, match=match):
        hub.check_formats(**args)


def test_repo_ids_and_paths(tmp_path):
    assert hub.is_repo_id("mistralai/Mistral-Small-24B-Instruct-2501")
    assert not hub.is_repo_id("mistral-small-2501")
    assert not hub.is_repo_id("/models/x")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert not hub.is_repo_id(str(tmp_path / "org" / "name"))
    with pytest.raises(CheckpointError, match="not a Hugging Face repo id"):
        hub.resolve_model(str(tmp_path / "missing"))


def test_both_flag_spellings():
    assert normalize_flags(["mistralai/M", "--tokenizer_mode", "mistral", "--load_format=mistral", "--max-model-len",
                            "8", "--tokenizer", "a_b/c_d", "-tp", "2"]) == \
        ["mistralai/M", "--tokenizer-mode", "mistral", "--load-format=mistral", "--max-model-len", "8",
         "--tokenizer", "a_b/c_d", "-tp", "2"]
