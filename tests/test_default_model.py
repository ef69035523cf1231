"""The embedded default model (SmolLM2-135M-Instruct, GGUF): same greedy tokens as transformers
reading the same file, the Paris answer, and the CLI as a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral_jax import LLM, SamplingParams
from mistral_jax.loading.default_model import default_model_path

pytestmark = pytest.mark.slow  # the default model, transformers' copy of it and CLI subprocesses

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def llm():
    return LLM(progress=False)  # no model: the default


@pytest.fixture(scope="module")
def hf_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(default_model_path())
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tok


def test_greedy_identical_to_transformers_on_same_gguf(llm, hf_and_tokenizer):
    hf, tok = hf_and_tokenizer
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist(), prompt


def test_chat_answers_paris(llm, hf_and_tokenizer):
    _, tok = hf_and_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=40))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # the model ends its turn by itself
    ref = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert out.prompt_token_ids == list(ref)


def run_cli(*args, stdin=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "mistral_jax.generate", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("extra", [[], ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']])
def test_cli_prompt_streams_paris(extra):
    r = run_cli("--prompt", "What is the capital of France?", "--max-tokens", "30", *extra)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tokens/s" in r.stderr


def test_cli_chat_multi_turn():
    r = run_cli("--chat", "--max-tokens", "20", "--system", "You are a helpful assistant.",
                stdin="What is the capital of France?\nAnd of Italy?\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Rome" in r.stdout
    assert r.stderr.count("tokens/s") == 2


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "-1"], "temperature"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--top-p", "1.5"], "top_p"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--speculative-config", '{"method": "medusa", "num_speculative_tokens": 2}'], "method='medusa'"),
])
def test_cli_bad_input_is_a_clear_error(args, needle):
    r = run_cli(*args, "--prompt", "hi")
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
