"""EngineArgs (mistral_jax/engine/args.py) is the one list of engine settings: the CLI flags of
generate and serve, LLM's keyword arguments and the README's settings table derive from it, and
these tests fail when one of them drifts. Each setting is checked once, where EngineArgs is built,
with a message that names the setting, the value and the fix."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_jax.engine.args import (
    DISTRIBUTED_TIMEOUT_S,
    DTYPE_NAMES,
    QUANTIZATIONS,
    README_BEGIN,
    README_END,
    EngineArgs,
    add_cli_args,
    flags,
    settings_table,
)

REPO = Path(__file__).resolve().parent.parent
FIELDS = [f.name for f in dataclasses.fields(EngineArgs)]


def engine_parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_cli_args(p, **kwargs)
    return p


# ---- one list: the README, the flags and LLM follow it ------------------------------------------

def test_readme_table_is_engine_args():
    readme = (REPO / "README.md").read_text()
    table = readme.split(README_BEGIN + "\n", 1)[1].split(README_END, 1)[0]
    assert table == settings_table(), "README's settings table drifted: paste `python -m mistral_jax.engine.args`"
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]]
    assert rows == FIELDS


def test_every_setting_has_a_flag_with_its_default():
    parser = engine_parser()
    dests = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert sorted(dests) == sorted(FIELDS)
    for field in dataclasses.fields(EngineArgs):
        spelled = flags(field)  # (a yes/no setting also has its --no- flag)
        assert dests[field.name].option_strings[:len(spelled)] == spelled, field.name
    # No flag given: every setting keeps EngineArgs' default.
    assert EngineArgs.from_cli_args(parser.parse_args([])) == EngineArgs()


def test_generate_and_serve_take_every_flag():
    from mistral_jax.entrypoints import generate, serve

    assert set(FIELDS) - {"seed"} <= set(vars(generate.parse_args([])))  # generate's --seed: the request's
    assert set(FIELDS) <= set(vars(serve.parse_args([])))


def test_llm_takes_every_setting(monkeypatch):
    from mistral_jax.entrypoints import llm as llm_module

    given = dict(model="m", dtype="float32", quantization="fp8", mesh="tp=1", tensor_parallel_size=1,
                 max_model_len=64, load_format="mistral", config_format="mistral", tokenizer_mode="mistral",
                 revision="r", download_dir="d", generation_config="vllm", config="c", tokenizer="t", block_size=8,
                 num_pages=9, gpu_memory_utilization=0.5, max_num_seqs=3, max_num_batched_tokens=32,
                 enable_prefix_caching=False, attention_impl="reference", fp8_impl="xla", warmup=False,
                 speculative_config={"method": "ngram", "num_speculative_tokens": 2}, seed=5,
                 coordinator_address="h:1", num_processes=2, process_id=1, distributed=True, distributed_timeout=7.0)
    assert sorted(given) == sorted(FIELDS)  # a new setting: add it here too
    seen = []

    def fake_build(args, progress=True):
        seen.append(args)
        raise RuntimeError("stopped before building")

    monkeypatch.setattr(llm_module, "build", fake_build)
    with pytest.raises(RuntimeError, match="stopped before building"):
        llm_module.LLM(**given)
    assert seen == [EngineArgs(**given)]
    assert all(getattr(seen[0], k) == v for k, v in given.items() if k != "speculative_config")


def test_unknown_setting_names_the_nearest():
    from mistral_jax import LLM

    with pytest.raises(TypeError, match=r"'tensor_parallel' is not an engine setting: did you mean "
                                        r"'tensor_parallel_size'\?"):
        LLM(tensor_parallel=2)
    with pytest.raises(TypeError, match="'max_num_sequences' .* did you mean 'max_num_seqs'"):
        EngineArgs.from_kwargs(max_num_sequences=4)


def test_flag_spellings():
    parser = engine_parser()
    from mistral_jax.engine.args import normalize_flags

    args = EngineArgs.from_cli_args(parser.parse_args(normalize_flags(
        ["--tokenizer_mode", "mistral", "-tp", "2", "--no-enable-prefix-caching", "--max_num_seqs=4", "--warmup",
         "--distributed", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])))
    assert (args.tokenizer_mode, args.tensor_parallel_size, args.enable_prefix_caching, args.max_num_seqs) == \
        ("mistral", 2, False, 4)
    assert args.warmup is True and args.distributed is True
    assert args.speculative_config.num_speculative_tokens == 3  # parsed once, here


def test_generate_seed_is_the_requests():
    from mistral_jax.entrypoints.generate import parse_args

    ns = parse_args(["--seed", "7"])
    assert ns.request_seed == 7 and EngineArgs.from_cli_args(ns).seed == 0


# ---- checked once, where it is built ------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(attention_impl="cuda"), "attention_impl='cuda' is not one of"),
    (dict(fp8_impl="cuda"), "fp8_impl='cuda' is not one of"),
    (dict(quantization="int8"), r"quantization='int8' is not supported; use None .* or 'fp8'"),
    (dict(dtype="int8"), r"dtype='int8' is not supported; use one of 'auto'"),
    (dict(load_format="pt"), "load_format='pt' is not one of"),
    (dict(load_format="mistral", config_format="hf"), "mixes two layouts"),
    (dict(load_format="dummy"), "load_format='dummy' needs config="),
    (dict(tensor_parallel_size=0), r"tensor_parallel_size=0: give an integer >= 1"),
    (dict(max_model_len=1), r"max_model_len=1 is invalid: use None \(the model's context\) or an integer >= 2"),
    (dict(block_size=0), r"block_size=0 is invalid: use an integer in \[1, 1024\]"),
    (dict(max_num_seqs=0), "max_num_seqs=0 is invalid"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens=0 is invalid"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization=1.5 is invalid: use a fraction in \(0, 1\]"),
    (dict(num_pages=1), "num_pages=1 is invalid"),
    (dict(seed=-1), "seed=-1 is invalid"),
    (dict(distributed_timeout=0), "distributed_timeout=0 is invalid"),
    (dict(speculative_config='{"method": "ngram", '), "not valid JSON"),
])
def test_bad_settings_fail_when_built(settings, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**settings)


def test_cli_reports_a_bad_setting_before_loading(capsys):
    from mistral_jax.entrypoints import generate, serve

    assert generate.main(["--block-size", "0", "--prompt", "hi"]) == 2
    assert "block_size=0 is invalid" in capsys.readouterr().err
    assert serve.main(["--max-num-seqs", "0", "--port", "0"]) == 2  # before the port or the engine process
    assert "max_num_seqs=0 is invalid" in capsys.readouterr().err


def test_engine_args_import_no_jax():
    # The server's HTTP processes parse flags and check settings without JAX.
    code = ("import sys; import mistral_jax.engine.args as a; a.EngineArgs(speculative_config="
            "'{\"method\": \"ngram\", \"num_speculative_tokens\": 2}'); "
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_tables_agree_with_the_jax_modules():
    from mistral_jax.engine.build import DTYPES
    from mistral_jax.model.transformer import QUANTIZATIONS as MODEL_QUANTIZATIONS
    from mistral_jax.runtime.distributed import DEFAULT_TIMEOUT_S

    assert QUANTIZATIONS == MODEL_QUANTIZATIONS
    assert DISTRIBUTED_TIMEOUT_S == DEFAULT_TIMEOUT_S
    assert sorted(DTYPES) == sorted(DTYPE_NAMES)
