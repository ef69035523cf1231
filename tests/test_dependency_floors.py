"""The lower bounds pyproject.toml gives llguidance and mistral-common are versions that work: a
virtual environment on top of this one (--system-site-packages) gets exactly those versions
(pip --no-deps, so nothing else moves), and runs structured outputs through
mistral_jax/sample/structured.py (a JSON schema, a regex, a choice and a Lark grammar, each walked
to completion) on mistral-common's SentencePiece and Tekken tokenizers and on a Hugging Face one,
plus Mistral chat prompts with tools.

Why these floors: llguidance before 1.7 takes a single eos_token where structured.py passes the
list of stop ids (TypeError); mistral-common before 1.11 has no guidance module (Tekken's
llguidance vocabulary) and before 1.10 no SentencePieceTokenizer.special_ids."""

import os
import re
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import re
from importlib.metadata import version
from pathlib import Path

import mistral_common
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mistral_jax.sample.structured import MaskBuffer, Matcher, StructuredOutputs
from mistral_jax.tokenizer import HFTokenizer, MistralTokenizer

DATA = Path(mistral_common.__file__).parent / "data"


def hf_tokenizer():
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(['{"c": "red"}', "yes no 123 abcd"] * 20, trainer)
    return HFTokenizer(raw, 0, 1, None)


SPECS = [
    (StructuredOutputs(choice=["yes", "no"]), lambda t: t in ("yes", "no")),
    (StructuredOutputs(regex="[0-9]{3}"), lambda t: re.fullmatch("[0-9]{3}", t)),
    (StructuredOutputs(json={"type": "object", "properties": {"c": {"enum": ["red", "green"]}},
                             "required": ["c"], "additionalProperties": False}),
     lambda t: t in ('{"c": "red"}', '{"c": "green"}')),
    (StructuredOutputs(grammar='start: "ab" | "cd"'), lambda t: t in ("ab", "cd")),
]


def walk(tokenizer, spec):
    """The smallest allowed id that is not a stop token, step by step, until only stops remain:
    the mask, the matcher's acceptance and its end, as the engine uses them."""
    vocab = tokenizer.vocab_size
    matcher, buffer, ids = Matcher(spec, tokenizer, vocab), MaskBuffer(1, vocab), []
    for _ in range(60):
        bits = buffer.build(1, [(0, matcher)])[0]
        allowed = [i for i in range(vocab) if (int(bits[i // 32]) >> (i % 32)) & 1]
        choices = [i for i in allowed if i not in tokenizer.stop_token_ids]
        if not choices:
            assert matcher.accept(min(tokenizer.stop_token_ids & set(allowed)))
            break
        ids.append(choices[0])
        assert matcher.accept(choices[0]), "the matcher refused a token its own mask allowed"
    assert matcher.stopped, "the grammar did not complete"
    return tokenizer.decode(ids).strip()


tokenizers = {"sentencepiece": MistralTokenizer(DATA / "mistral_instruct_tokenizer_240323.model.v3"),
              "tekken": MistralTokenizer(DATA / "tekken_240911.json"), "hf": hf_tokenizer()}
for name, tokenizer in tokenizers.items():
    for spec, valid in SPECS:
        text = walk(tokenizer, spec)
        assert valid(text), (name, spec, text)

TOOL = {"type": "function", "function": {"name": "get", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
for name in ("sentencepiece", "tekken"):
    tokenizer = tokenizers[name]
    chat = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Let me"}]
    text = tokenizer.decode(tokenizer.encode_chat(chat, tools=[TOOL]), skip_special_tokens=False)
    assert "[AVAILABLE_TOOLS]" in text and text.endswith("Let me"), text
    assert tokenizer.special_id("[TOOL_CALLS]") is not None
print("versions", version("llguidance"), version("mistral-common"))
'''


def floors() -> dict[str, str]:
    """{package: its lower bound} from pyproject.toml's dependencies."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*(;.*)?", dep.strip())
        if m:
            found[m.group(1).lower()] = m.group(2)
    return found


@pytest.mark.slow
def test_structured_outputs_at_the_dependency_floors(tmp_path):
    pins = {name: floors()[name] for name in ("llguidance", "mistral-common")}
    env_dir = tmp_path / "floors"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                              *(f"{name}=={v}" for name, v in pins.items())], capture_output=True, text=True,
                             timeout=300)
    if install.returncode != 0:
        pytest.skip(f"pip could not install the floors {pins} (no index here?): {install.stderr[-500:]}")
    run = subprocess.run([python, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert f"versions {pins['llguidance']} {pins['mistral-common']}" in run.stdout, run.stdout  # the floors ran
