"""Issue 45: the model cards' own commands run unchanged, with `vllm` replaced by `mistral_jax`.

The cards (Mistral-Small-24B-Instruct-2501 and Mistral-Small-Instruct-2409) tell users to run vLLM
snippets word for word: models by Hub id, `--tokenizer_mode mistral --config_format mistral
--load_format mistral`, `tensor_parallel_size`, a `requests` and a `curl` client, and
`snapshot_download(...)` of the Mistral files. Here each snippet runs as the card writes it (the
only edits are named beside them) against a loopback stand-in for the Hub (tests/helpers/hub_standin.py)
that serves two tiny random models under the cards' repo ids, each repo holding both layouts
(params.json + consolidated.safetensors and config.json + model.safetensors), as Mistral's repos
do. Every output must EQUAL the output of the same model loaded from a local folder with the same
settings: sampling at temperature 1 repeats itself, since LLM(seed=0) and `serve --seed 0` are the
defaults (same requests in the same order).

Also: which files each load_format fetches (never both copies of the weights), an interrupted
download resumes, HF_HUB_OFFLINE runs from the cache with no request, a gated / unknown repo and a
missing folder give errors that say what to do, and vLLM's flag spellings.

Everything stays on loopback; servers are subprocesses pointed at the stand-in by
`hub.env(hf_home)`. Time on a 2-core CPU: ~1.5 min with the compiled programs on disk
(~/.cache/mistral_jax), more from an empty cache, most of it the five servers' start-ups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import huggingface_hub
import ml_dtypes
import numpy as np
import pytest
from huggingface_hub import constants
from safetensors.numpy import save_file

from mistral_jax import LLM, SamplingParams
from mistral_jax.config import CheckpointError, ModelConfig

from helpers.checkpoints import hf_model_from_dir, make_tiny_gguf_checkpoint, make_tiny_hf_checkpoint, random_weights
from helpers.hub_standin import HubStandin
from helpers.server import free_port

pytestmark = pytest.mark.slow  # each card's model through the Hub stand-in: ~55 s of CPU

REPO_2409 = "mistralai/Mistral-Small-Instruct-2409"
REPO_2501 = "mistralai/Mistral-Small-24B-Instruct-2501"
GGUF_REPO = "test-org/tiny-gguf"
TOKEN = "hf_card_test_token"
EOS_ID = 2  # </s> of both tokenizers (the v3 SentencePiece model and Tekken)

# ---------------------------------------------------------------------------------------------
# The cards' snippets, as written. Edits: `vllm` -> `mistral_jax`, and those named in comments.

# Mistral-Small-Instruct-2409, "Offline".
CARD_2409_OFFLINE = '''
from mistral_jax import LLM
from mistral_jax.sampling_params import SamplingParams

model_name = "mistralai/Mistral-Small-Instruct-2409"

sampling_params = SamplingParams(max_tokens=8192)

# note that running Mistral-Small on a single GPU requires at least 44 GB of GPU RAM
# If you want to divide the GPU requirement over multiple devices, please add *e.g.* `tensor_parallel=2`
llm = LLM(model=model_name, tokenizer_mode="mistral", config_format="mistral", load_format="mistral")

prompt = "How often does the letter r occur in Mistral?"

messages = [
    {
        "role": "user",
        "content": prompt
    },
]

outputs = llm.chat(messages, sampling_params=sampling_params)

print(outputs[0].outputs[0].text)
'''

# Mistral-Small-24B-Instruct-2501, "Offline".
CARD_2501_OFFLINE = '''
from mistral_jax import LLM
from mistral_jax.sampling_params import SamplingParams
from datetime import datetime, timedelta

model_name = "mistralai/Mistral-Small-24B-Instruct-2501"  # the card's snippet uses model_name without defining it

SYSTEM_PROMPT = "You are a conversational agent that always answers straight to the point, always end your accurate response with an ASCII drawing of a cat."

user_prompt = "Give me 5 non-formal ways to say 'See you later' in French."

messages = [
    {
        "role": "system",
        "content": SYSTEM_PROMPT
    },
    {
        "role": "user",
        "content": user_prompt
    },
]

# note that running this model on GPU requires over 60 GB of GPU RAM
# The card: tensor_parallel_size=8. The tiny stand-in model has 2 kv heads, which 8 does not divide
# (test_card_tensor_parallel_size_8_names_what_fits); 2 splits it over 2 of the suite's 8 CPU devices.
# num_pages=64: added. With tensor parallelism on a CPU every step copies the whole KV page pool
# (XLA:CPU relayouts it), and the CPU default pool is 1 GiB: 1.6 s a token instead of ~50 ms.
llm = LLM(model=model_name, tokenizer_mode="mistral", tensor_parallel_size=2, num_pages=64)

sampling_params = SamplingParams(max_tokens=512)
outputs = llm.chat(messages, sampling_params=sampling_params)

print(outputs[0].outputs[0].text)
'''  # noqa: E501  (the card's snippet as the card writes it)

# Mistral-Small-Instruct-2409, "Download" (mistral-inference's section): HOME is a tmp folder here.
CARD_2409_DOWNLOAD = '''
from huggingface_hub import snapshot_download
from pathlib import Path

mistral_models_path = Path.home().joinpath('mistral_models', '22B-Instruct-Small')
mistral_models_path.mkdir(parents=True, exist_ok=True)

snapshot_download(repo_id="mistralai/Mistral-Small-Instruct-2409", allow_patterns=["params.json", "consolidated.safetensors", "tokenizer.model.v3"], local_dir=mistral_models_path)
'''  # noqa: E501  (the card's snippet as the card writes it)

# Server commands (`vllm serve` -> `python -m mistral_jax.serve`; each test adds `--port <free port>`).
CARD_2501_SERVE = ("vllm serve mistralai/Mistral-Small-24B-Instruct-2501 --tokenizer_mode mistral "
                   "--config_format mistral --load_format mistral --enable-auto-tool-choice")
CARD_2409_SERVE = ("vllm serve mistralai/Mistral-Small-Instruct-2409 --tokenizer_mode mistral --config_format mistral "
                   "--load_format mistral")

# Mistral-Small-24B-Instruct-2501's client; `<your-server>:8000` becomes the test server's address.
CARD_2501_REQUESTS = '''
import requests
import json
from datetime import datetime, timedelta

url = "http://<your-server>:8000/v1/chat/completions"
headers = {"Content-Type": "application/json", "Authorization": "Bearer token"}

model = "mistralai/Mistral-Small-24B-Instruct-2501"

messages = [
    {
        "role": "system",
        "content": "You are a conversational agent that always answers straight to the point, always end your accurate response with an ASCII drawing of a cat."
    },
    {
        "role": "user",
        "content": "Give me 5 non-formal ways to say 'See you later' in French."
    },
]

data = {"model": model, "messages": messages}

response = requests.post(url, headers=headers, data=json.dumps(data))
print(response.json()["choices"][0]["message"]["content"])
'''  # noqa: E501  (the card's snippet as the card writes it)

# Mistral-Small-Instruct-2409's client, run by bash; the card's `http://:8000` becomes the server's address.
CARD_2409_CURL = """curl --location 'http://:8000/v1/chat/completions' \\
--header 'Content-Type: application/json' \\
--header 'Authorization: Bearer token' \\
--data '{
    "model": "mistralai/Mistral-Small-Instruct-2409",
    "messages": [
      {
        "role": "user",
        "content": "How often does the letter r occur in Mistral?"
      }
    ]
  }'"""

MISTRAL_FILES_2409 = {"params.json", "consolidated.safetensors", "tokenizer.model.v3", "generation_config.json"}
MISTRAL_FILES_2501 = {"params.json", "consolidated.safetensors", "tekken.json", "generation_config.json"}


# ---------------------------------------------------------------------------------------------
# The two tiny "Mistral-Small-shaped" repos.

# A random model rarely samples EOS (1 in the vocabulary per step), and the 2409 card asks for
# max_tokens=8192 (the server's requests ask for no limit: the rest of the 32k context): on this
# CPU 8192 tiny-model tokens take ~40 s. So the random model is made to end early, legitimately,
# through its weights alone (both layouts, and transformers, compute the same thing):
# - every token embedding gets a large constant EMBED_CONSTANT in dimension 0 (the others are
#   ~N(0, 0.05^2)), so the residual stream is dominated by it at every position and the final
#   RMSNorm's output h has a stable component a = sqrt(dim) * norm.weight[0] (~8) there, the rest
#   of h being small;
# - the output head's dimension-0 column gets a spread of HEAD_SPREAD (logits ~N(0, (8 * 0.25)^2)):
#   the next-token distribution is then the weights', not nearly flat (with the random init's 0.05
#   two different models sampled the same first token from the same seed 3 times in 4);
# - EOS's entry in that column is set so that, for h = a * e0, EOS has probability EOS_PROBABILITY:
#   logit_eos = log(p / (1 - p)) + logsumexp(the other logits). Replies are ~1/p tokens long;
# - [/INST], the last token of every chat prompt, gets -EMBED_CONSTANT instead: the first token of
#   a reply sees h ~ -a * e0, where EOS is the least likely token, so no reply is empty.
# Measured with the cards' prompts, 48 sampling seeds x 3 weight seeds per vocabulary: replies of
# 2 to 101 tokens, 23 to 28 on average; the same first token from two weight seeds 1 time in 10.
EMBED_CONSTANT = 10.0
HEAD_SPREAD = 0.25
EOS_PROBABILITY = 0.05
INST_END_ID = 4  # [/INST] of both tokenizers


def end_early(weights: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """`random_weights`' float32 weights changed as described above, in bf16 (the Hub's dtype)."""
    emb, head = weights["tok_embeddings.weight"], weights["output.weight"]
    emb[:, 0] = EMBED_CONSTANT
    emb[INST_END_ID, 0] = -EMBED_CONSTANT
    head[:, 0] = (head[:, 0] * (HEAD_SPREAD / 0.05)).astype(ml_dtypes.bfloat16)  # as stored
    a = np.sqrt(cfg.dim) * float(weights["norm.weight"][0])
    others = np.delete(a * head[:, 0].astype(np.float64), EOS_ID)
    lse = others.max() + np.log(np.exp(others - others.max()).sum())
    head[EOS_ID, 0] = (np.log(EOS_PROBABILITY / (1 - EOS_PROBABILITY)) + lse) / a
    return {name: w.astype(ml_dtypes.bfloat16) for name, w in weights.items()}


def card_config(vocab_size: int) -> ModelConfig:
    # The real models' 32k context (the card's 8192 new tokens + the prompt fit), the tiny shape.
    return dataclasses.replace(ModelConfig.named("tiny"), vocab_size=vocab_size, max_seq_len=32768)


def v7_tekken(path: Path) -> Path:
    """tekken.json as Mistral-Small-2501 ships it: 131072 tokens, version v7 (the V7-Tekken template
    of its card, [SYSTEM_PROMPT]...[/SYSTEM_PROMPT]); mistral-common's bundled tekken_240718.json
    with its version set to v7 (it lists no special tokens, so mistral-common uses its default v7
    set)."""
    import mistral_common

    tekken = json.loads((Path(mistral_common.__file__).parent / "data" / "tekken_240718.json").read_text())
    tekken["config"]["version"] = "v7"
    path.write_text(json.dumps(tekken))
    return path


def make_card_repo(folder: Path, cfg: ModelConfig, seed: int, tokenizer: Path, tokenizer_name: str) -> dict:
    """A Hub repo's files, both layouts of the same bf16 weights: transformers' own save
    (config.json, model.safetensors) and Mistral's (params.json, consolidated.safetensors), plus
    the tokenizer, generation_config.json and a README. Returns the canonical weights."""
    weights = end_early(random_weights(cfg, seed, "float32"), cfg)  # see EMBED_CONSTANT
    make_tiny_hf_checkpoint(folder, weights, cfg, dtype="bfloat16")  # config.json + model.safetensors
    (folder / "params.json").write_text(json.dumps(cfg.to_mistral_params(), indent=2))
    save_file(weights, str(folder / "consolidated.safetensors"))
    # What the real repos carry (no sampling fields: generation_config "auto" changes nothing).
    (folder / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": EOS_ID, "transformers_version": "4.49.0"}))
    shutil.copy(tokenizer, folder / tokenizer_name)
    (folder / "README.md").write_text("# A tiny random stand-in for a Mistral Small repo\n")
    return weights


@pytest.fixture(scope="module")
def card_repos(tmp_path_factory):
    """{repo id: source folder}: the two cards' repos and a GGUF one."""
    from helpers.models import V3_TOKENIZER

    root = tmp_path_factory.mktemp("card_repos")
    repos = {REPO_2409: root / "2409", REPO_2501: root / "2501", GGUF_REPO: root / "gguf"}
    make_card_repo(repos[REPO_2409], card_config(32768), 2409, V3_TOKENIZER, "tokenizer.model.v3")
    make_card_repo(repos[REPO_2501], card_config(131072), 2501, v7_tekken(root / "tekken.json"), "tekken.json")
    repos[GGUF_REPO].mkdir()
    make_tiny_gguf_checkpoint(repos[GGUF_REPO] / "tiny-f32.gguf", ModelConfig.named("tiny"), seed=3)
    (repos[GGUF_REPO] / "README.md").write_text("# tiny gguf\n")
    return repos


@pytest.fixture(scope="module")
def hub(card_repos):
    with HubStandin(card_repos, tokens={TOKEN}) as hub:
        yield hub
        assert hub.unexpected == []


def point(hub, monkeypatch, home: Path) -> None:
    hub.point_huggingface_hub(monkeypatch, home)
    hub.clear_requests()


@pytest.fixture
def hf_home(hub, tmp_path, monkeypatch):
    """huggingface_hub of this process pointed at the stand-in, with an empty cache of its own."""
    home = tmp_path / "hf_home"
    point(hub, monkeypatch, home)
    yield home
    huggingface_hub.close_session()
    assert hub.escaped == [], "huggingface_hub tried to leave loopback"
    assert hub.unexpected == []


def fetched(hub) -> dict[str, set[str]]:
    """{repo id: the files whose bodies were downloaded}."""
    out: dict[str, set[str]] = {}
    for repo, path in hub.downloads():
        out.setdefault(repo, set()).add(path)
    return out


def weights_of(llm) -> list[np.ndarray]:
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(llm.engine.state)]


def release(namespace: dict | None = None) -> None:
    """Drop LLMs (each holds a 1 GiB KV cache on a CPU) before the next is built: a snippet's
    variables (the caller `del`s its own references first)."""
    if namespace is not None:
        namespace.clear()
    gc.collect()


def run_snippet(code: str, **replace: str) -> tuple[str, dict]:
    """exec a card's Python snippet (after the textual replacements given); its printed text and
    its variables."""
    for old, new in replace.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict = {"__name__": "__card__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<model card>", "exec"), namespace)
    return out.getvalue(), namespace


# ---------------------------------------------------------------------------------------------
# Servers, as the cards start them.

def serve_argv(card_command: str) -> list[str]:
    words = shlex.split(card_command)
    assert words[:2] == ["vllm", "serve"]
    return [sys.executable, "-m", "mistral_jax.serve", *words[2:]]


class CardServer:
    """`python -m mistral_jax.serve ...` on a free loopback port, its huggingface_hub pointed at the
    stand-in; stopped by SIGTERM (then killed) in `stop`."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", **env))

    def wait_ready(self, seconds: float = 420) -> CardServer:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}): {self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the server did not start in {seconds} s: {self.output()[-3000:]}")

    def wait_exit(self, seconds: float = 300) -> int:
        try:
            return self.proc.wait(seconds)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"the server is still running after {seconds} s: {self.output()[-3000:]}") from e

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int | None:
        """SIGTERM, then kill after 60 s; the exit code. `output()` still reads the log after."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@contextlib.contextmanager
def card_server(argv: list[str], env: dict[str, str]):
    """A server for the block; it must stop cleanly (exit 0 on SIGTERM)."""
    server = CardServer(argv, env)
    try:
        yield server.wait_ready()
    except BaseException:
        server.stop()
        raise
    finally:
        code = server.stop()
        output = server.output()
        server.log.close()
    assert code == 0, f"the server exited {code} on SIGTERM: {output[-3000:]}"


def reference_argv(card_command: str, local_folder: Path, repo_id: str) -> list[str]:
    """The card's command on the local source folder, named as the repo (--served-model-name), and
    spelled with dashes (--tokenizer-mode ...): vLLM takes both spellings, and this one must give
    the same outputs as the card's underscores."""
    argv = serve_argv(card_command)
    assert argv[3] == repo_id
    argv[3] = str(local_folder)
    argv = [a.replace("_", "-") if a.startswith("--") else a for a in argv]
    assert "--tokenizer-mode" in argv
    return [*argv, "--served-model-name", repo_id]


def models_listed(server: CardServer) -> list[str]:
    response = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer token"})
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


# ---------------------------------------------------------------------------------------------
# The cards' snippets.

def test_card_2409_offline_snippet_and_its_snapshot_download(hub, hf_home, card_repos, monkeypatch, tmp_path):
    # By Hub id: fetches the Mistral layout only.
    printed, ns = run_snippet(CARD_2409_OFFLINE)
    out = ns["outputs"][0].outputs[0]
    release(ns)
    print(f"\n[2409 offline snippet printed]\n{printed}")
    assert fetched(hub) == {REPO_2409: MISTRAL_FILES_2409}
    assert out.finish_reason == "stop" and 2 <= len(out.token_ids) < 1000  # EOS came (see EMBED_CONSTANT)
    assert printed == out.text + "\n"

    # The same snippet on the local folder: the same output.
    local, ns = run_snippet(CARD_2409_OFFLINE, **{f'"{REPO_2409}"': repr(str(card_repos[REPO_2409]))})
    release(ns)
    assert printed == local

    # mistral-inference's download section, then that folder passed as a path.
    point(hub, monkeypatch, tmp_path / "hf_home_2")  # an empty cache: a real download, not a copy
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _, ns = run_snippet(CARD_2409_DOWNLOAD)
    folder = ns["mistral_models_path"]
    assert folder == tmp_path / "home" / "mistral_models" / "22B-Instruct-Small"
    assert fetched(hub) == {REPO_2409: {"params.json", "consolidated.safetensors", "tokenizer.model.v3"}}
    assert sorted(p.name for p in folder.iterdir() if p.name != ".cache") == sorted(
        ["params.json", "consolidated.safetensors", "tokenizer.model.v3"])
    from_folder, ns = run_snippet(CARD_2409_OFFLINE, **{f'"{REPO_2409}"': repr(str(folder))})
    release(ns)
    assert from_folder == printed


@pytest.fixture
def clear_jax_caches_after():
    yield
    # A product bug: init_pages' jaxpr, traced under a tp=2 mesh (its sharding constraint reads the
    # mesh from a context variable), is reused by JAX's trace cache for a later one-device LLM of the
    # same config and page count, which then fails ("incompatible devices for jitted computation").
    import jax

    jax.clear_caches()


def test_card_2501_offline_snippet(hub, hf_home, card_repos, clear_jax_caches_after):
    printed, ns = run_snippet(CARD_2501_OFFLINE)
    out, prompt_ids = ns["outputs"][0].outputs[0], ns["outputs"][0].prompt_token_ids
    assert ns["llm"].mesh.shape["tp"] == 2 and ns["llm"].mesh.devices.size == 2
    release(ns)
    print(f"\n[2501 offline snippet printed]\n{printed}")
    # tokenizer_mode mistral, load_format auto: the Hugging Face weights (vLLM's order for "auto"),
    # Tekken for the tokenizer; the Mistral copy of the weights is never fetched.
    assert fetched(hub) == {REPO_2501: {"config.json", "model.safetensors", "tekken.json", "generation_config.json"}}
    # The V7-Tekken template of the card: <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]
    assert prompt_ids[:2] == [1, 17] and 18 in prompt_ids and prompt_ids[-1] == 4
    assert out.finish_reason == "stop" and 2 <= len(out.token_ids) < 512
    assert printed == out.text + "\n"

    local, ns = run_snippet(CARD_2501_OFFLINE, **{f'"{REPO_2501}"': repr(str(card_repos[REPO_2501]))})
    release(ns)
    assert printed == local


def test_card_2501_server_and_requests_snippet(hub, card_repos, tmp_path):
    env = hub.env(tmp_path / "server_home")
    hub.clear_requests()
    # The card's command; added: --port (a free one). The defaults fit a CPU (its KV cache is
    # capped at 1 GiB there), and it warms up, as on a GPU.
    with card_server(serve_argv(CARD_2501_SERVE), env) as server:
        assert models_listed(server) == [REPO_2501]  # --served-model-name defaults to the model as given
        printed, ns = run_snippet(CARD_2501_REQUESTS, **{"http://<your-server>:8000": server.url})
        reply = ns["response"].json()
    print(f"\n[2501 requests snippet printed]\n{printed}")
    assert fetched(hub) == {REPO_2501: MISTRAL_FILES_2501}
    assert reply["model"] == REPO_2501 and reply["choices"][0]["finish_reason"] == "stop"
    assert printed == reply["choices"][0]["message"]["content"] + "\n" and reply["usage"]["completion_tokens"] >= 2

    with card_server(reference_argv(CARD_2501_SERVE, card_repos[REPO_2501], REPO_2501), {}) as server:
        assert models_listed(server) == [REPO_2501]
        local, ns = run_snippet(CARD_2501_REQUESTS, **{"http://<your-server>:8000": server.url})
        local_reply = ns["response"].json()
    assert printed == local
    assert reply["usage"] == local_reply["usage"]


def test_card_2409_server_and_curl(hub, card_repos, tmp_path):
    env = hub.env(tmp_path / "server_home")
    hub.clear_requests()

    def curl(server) -> dict:
        command = CARD_2409_CURL.replace("http://:8000", server.url)
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    # The card's command; added: --port (a free one).
    with card_server(serve_argv(CARD_2409_SERVE), env) as server:
        assert models_listed(server) == [REPO_2409]
        reply = curl(server)
    print(f"\n[2409 curl printed]\n{json.dumps(reply, ensure_ascii=False)}")
    assert fetched(hub) == {REPO_2409: MISTRAL_FILES_2409}
    assert reply["model"] == REPO_2409 and reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] >= 2 and isinstance(reply["choices"][0]["message"]["content"], str)

    # The reference server also requires the card's key ("Bearer token"): MISTRAL_JAX_API_KEY.
    with card_server(reference_argv(CARD_2409_SERVE, card_repos[REPO_2409], REPO_2409),
                     {"MISTRAL_JAX_API_KEY": "token"}) as server:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert models_listed(server) == [REPO_2409]
        local = curl(server)
    drop = ("id", "created")
    assert {k: v for k, v in reply.items() if k not in drop} == {k: v for k, v in local.items() if k not in drop}


# ---------------------------------------------------------------------------------------------
# Which files each format fetches.

@pytest.fixture(scope="module")
def reference_weights(card_repos):
    """Each card repo's weights as loaded from its local folder's Mistral layout."""
    cache = {}

    def get(repo):
        if repo not in cache:
            llm = LLM(model=str(card_repos[repo]), load_format="mistral", progress=False)
            cache[repo] = weights_of(llm)
            del llm
            release()
        return cache[repo]

    return get


TOKENIZER_FILE = {REPO_2409: "tokenizer.model.v3", REPO_2501: "tekken.json"}


@pytest.mark.parametrize("repo, kwargs, layout", [
    (REPO_2409, dict(tokenizer_mode="mistral", config_format="mistral", load_format="mistral"), "mistral"),
    (REPO_2501, dict(tokenizer_mode="mistral", load_format="mistral"), "mistral"),
    (REPO_2501, dict(load_format="safetensors"), "hf"),
    (REPO_2409, dict(tokenizer_mode="mistral", load_format="safetensors"), "hf"),
    (REPO_2409, dict(), "hf"),  # all "auto": the Hugging Face layout, as vLLM picks it
    (REPO_2501, dict(load_format="dummy"), "dummy"),
], ids=["2409-mistral", "2501-mistral", "2501-safetensors", "2409-safetensors-mistral-tok", "2409-auto",
        "2501-dummy"])
def test_files_fetched_per_load_format(hub, hf_home, reference_weights, repo, kwargs, layout):
    llm = LLM(model=repo, progress=False, **kwargs)
    files = {"mistral": {"params.json", "consolidated.safetensors"}, "hf": {"config.json", "model.safetensors"},
             "dummy": {"config.json"}}[layout]  # dummy: the config and tokenizer only, no weights
    assert fetched(hub) == {repo: files | {TOKENIZER_FILE[repo], "generation_config.json"}}
    assert Path(llm.model_path).is_relative_to(hf_home)
    if layout != "dummy":  # both layouts of the repo hold the same weights, read back alike
        got = weights_of(llm)
        want = reference_weights(repo)
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    del llm
    release()


def test_gguf_repo_fetches_its_one_file(hub, hf_home):
    from helpers.models import V3_TOKENIZER

    llm = LLM(model=GGUF_REPO, tokenizer=str(V3_TOKENIZER), progress=False)  # the file carries no tokenizer
    assert fetched(hub) == {GGUF_REPO: {"tiny-f32.gguf"}}
    assert llm.model_path.endswith("tiny-f32.gguf")
    del llm
    release()


def test_hf_layout_is_transformers_own(hub, hf_home):
    """The repos' config.json + model.safetensors, as fetched, load in transformers and compute what
    we compute from the same files."""
    import torch

    llm = LLM(model=REPO_2501, load_format="safetensors", tokenizer_mode="mistral", progress=False)
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "How often does the letter r occur in Mistral?"}])
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    ours = np.array([lp[t] for lp, t in zip(out.prompt_logprobs[1:], ids[1:])])
    model = hf_model_from_dir(llm.model_path)
    del llm
    release()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    theirs = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# Resume, offline, gated, unknown.

CHAT_2409 = [{"role": "user", "content": "How often does the letter r occur in Mistral?"}]
FORMATS_2409 = dict(tokenizer_mode="mistral", config_format="mistral", load_format="mistral")


def chat_output(model: str, **kwargs):
    llm = LLM(model=model, progress=False, **kwargs)
    out = llm.chat(CHAT_2409, SamplingParams(max_tokens=64))[0].outputs[0]
    del llm
    release()
    return out.text, out.token_ids


def test_interrupted_download_resumes(hub, hf_home, card_repos, monkeypatch):
    # huggingface_hub resumes at a multiple of its chunk size (10 MiB) within the same call: with
    # 64 KiB chunks a cut at 300 kB resumes past 0 (tests/helpers/hub_standin.py).
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub.cut_after("consolidated.safetensors", 300_000, repo_id=REPO_2409)

    got = chat_output(REPO_2409, **FORMATS_2409)

    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/consolidated.safetensors")]
    assert len(gets) == 2, gets
    assert gets[0].range is None
    resumed = re.fullmatch(r"bytes=(\d+)-", gets[1].range or "")
    assert resumed and 0 < int(resumed.group(1)) <= 300_000, gets[1]
    assert fetched(hub) == {REPO_2409: MISTRAL_FILES_2409}
    assert got == chat_output(str(card_repos[REPO_2409]), **FORMATS_2409)


def go_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: the constant is what counts


def test_offline_runs_from_the_cache(hub, hf_home, monkeypatch):
    online = chat_output(REPO_2501, tokenizer_mode="mistral", load_format="mistral")
    assert fetched(hub) == {REPO_2501: MISTRAL_FILES_2501}

    go_offline(monkeypatch)
    hub.clear_requests()
    try:
        assert chat_output(REPO_2501, tokenizer_mode="mistral", load_format="mistral") == online
    finally:
        assert hub.requests == []


def test_offline_without_the_model_in_the_cache(hub, hf_home, monkeypatch):
    go_offline(monkeypatch)
    # A repo that was never downloaded: the error says the cache lacks it and downloading is off.
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE") as never:
        LLM(model=REPO_2409, **FORMATS_2409)
    assert REPO_2409 in str(never.value) and "cache" in str(never.value)
    assert hub.requests == []


def test_gated_repo_says_how_to_get_in(hub, hf_home, monkeypatch):
    monkeypatch.setattr(hub, "gated", {REPO_2409})  # as on huggingface.co: the 2409 repo is gated
    for token in (None, "hf_not_granted"):
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        with pytest.raises(CheckpointError) as refused:
            LLM(model=REPO_2409, **FORMATS_2409)
        message = str(refused.value)
        assert "HF_TOKEN" in message and REPO_2409 in message, message
        assert f"https://huggingface.co/{REPO_2409}" in message, message
        assert "gated" in message
    assert hub.downloads() == []  # refused at the HEAD: no file body left the stand-in

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    llm = LLM(model=REPO_2409, progress=False, **FORMATS_2409)
    assert fetched(hub) == {REPO_2409: MISTRAL_FILES_2409}
    del llm
    release()


def test_unknown_repo_and_missing_folder(hub, hf_home, tmp_path):
    with pytest.raises(CheckpointError, match="no such repo on the Hub, or it is private") as unknown:
        LLM(model="mistralai/Mistral-Small-No-Such-Model")
    assert "mistralai/Mistral-Small-No-Such-Model" in str(unknown.value)
    assert hub.downloads() == []

    missing = tmp_path / "models" / "Mistral-Small-24B-Instruct-2501"
    with pytest.raises(CheckpointError, match="no such file or directory") as error:
        LLM(model=str(missing))
    assert str(missing) in str(error.value)


# ---------------------------------------------------------------------------------------------
# vLLM's flags.

def test_flag_spellings_and_tp():
    from mistral_jax.engine.args import EngineArgs
    from mistral_jax.entrypoints.serve import parse_args

    card = parse_args(serve_argv(CARD_2501_SERVE)[3:])
    dashed = parse_args([REPO_2501, "--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format",
                         "mistral", "--enable-auto-tool-choice"])
    assert vars(card) == vars(dashed)
    assert (card.model, card.served_model_name) == (REPO_2501, REPO_2501)
    assert (card.tokenizer_mode, card.config_format, card.load_format) == ("mistral", "mistral", "mistral")
    assert card.seed == 0 and card.tool_call_parser is None

    # The 2409 card's own hint, "please add *e.g.* `--tensor_parallel=2`", is an abbreviation argparse takes.
    spellings = (["-tp", "2"], ["--tensor-parallel-size", "2"], ["--tensor_parallel_size=2"], ["--tensor_parallel=2"])
    parsed = [vars(parse_args([REPO_2501, *flag])) for flag in spellings]
    assert all(p == parsed[0] for p in parsed)
    assert EngineArgs.from_cli_args(parse_args([REPO_2501, "-tp", "2"])).tensor_parallel_size == 2


def test_format_and_device_errors(hub, hf_home):
    with pytest.raises(ValueError, match="mixes two layouts") as mixed:
        LLM(model=REPO_2409, config_format="hf", load_format="mistral")
    assert "params.json" in str(mixed.value)
    with pytest.raises(ValueError, match=r"needs 16 devices, but 8 cpu device") as too_many:
        LLM(model=REPO_2501, tensor_parallel_size=16)
    assert "at most 8" in str(too_many.value)
    assert hub.requests == []  # both refused before anything was fetched


def test_card_tensor_parallel_size_8_names_what_fits(hub, hf_home):
    """The 2501 card's own tensor_parallel_size=8 on the tiny stand-in (2 kv heads): refused with
    the sizes that fit."""
    with pytest.raises(ValueError, match=r"n_kv_heads=2 not divisible by 8.*tp in \[1, 2\]"):
        LLM(model=REPO_2501, tokenizer_mode="mistral", tensor_parallel_size=8)


def test_one_device_llm_after_a_tensor_parallel_one(card_repos):
    """The 2501 card's snippet (tensor_parallel_size) and then a one-device LLM, in one process."""
    import jax

    folder = str(card_repos[REPO_2409])
    try:
        first = LLM(model=folder, tensor_parallel_size=2, num_pages=32, progress=False)
        del first
        release()
        second = LLM(model=folder, num_pages=32, progress=False)
        assert second.mesh.devices.size == 1
    finally:
        jax.clear_caches()


def test_tool_call_parser_must_match_the_tokenizer(hub, tmp_path):
    # The 2409 card's command with a parser for another tokenizer family; added: --port, and
    # --no-warmup (the check runs once the engine is up; warming it up first only costs time).
    server = CardServer([*serve_argv(CARD_2409_SERVE), "--tool-call-parser", "hermes", "--no-warmup"],
                        hub.env(tmp_path / "server_home"))
    try:
        code = server.wait_exit()
        output = server.output()
    finally:
        server.stop()
        server.log.close()
    assert code == 2, output[-3000:]
    assert "--tool-call-parser mistral" in output, output[-3000:]


def test_vllm_module_path_of_sampling_params():
    """The cards import `from vllm.sampling_params import SamplingParams`; the same path here."""
    from mistral_jax.sampling_params import SamplingParams as VllmPath

    assert VllmPath is SamplingParams


def test_revision_and_download_dir(hub, hf_home, card_repos, tmp_path):
    """vLLM's revision (a commit here) and download_dir (the cache's folder) reach huggingface_hub;
    a revision the repo lacks is an error naming it."""
    sha = huggingface_hub.model_info(REPO_2409).sha
    hub.clear_requests()
    folder = tmp_path / "downloads"
    got = chat_output(REPO_2409, revision=sha, download_dir=str(folder), **FORMATS_2409)
    assert got == chat_output(str(card_repos[REPO_2409]), **FORMATS_2409)
    assert any(folder in p.parents for p in folder.rglob("consolidated.safetensors"))
    assert not (hf_home / "hub").exists() or not list((hf_home / "hub").rglob("consolidated.safetensors"))
    with pytest.raises(CheckpointError, match="no revision 'v9.9'"):
        LLM(model=REPO_2409, revision="v9.9", **FORMATS_2409)


def test_generation_config_sets_the_defaults(card_repos, tmp_path):
    """generation_config="auto" (vLLM's default): the model's generation_config.json sampling
    fields are the defaults of requests that leave them unset; "vllm" ignores them."""
    folder = tmp_path / "model"
    shutil.copytree(card_repos[REPO_2409], folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5, "top_k": 7}))
    llm = LLM(model=str(folder), progress=False, **FORMATS_2409)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens, defaults.top_k) == (0.0, 5, 7)
    by_default = llm.generate(["Bonjour"])[0].outputs[0]  # no sampling_params: the model's defaults
    greedy = llm.generate(["Bonjour"], SamplingParams(temperature=0.0, max_tokens=5, top_k=7))[0].outputs[0]
    assert by_default.token_ids == greedy.token_ids and len(by_default.token_ids) <= 5
    del llm
    release()
    plain = LLM(model=str(folder), progress=False, generation_config="vllm", **FORMATS_2409)
    assert plain.get_default_sampling_params() == SamplingParams()
    del plain
    release()

    # The server applies the same defaults to the fields a request leaves unset.
    from mistral_jax.entrypoints.server.app import _sampling
    from mistral_jax.entrypoints.server.protocol import ChatCompletionRequest

    defaults = {"temperature": 0.0, "max_tokens": 5, "top_k": 7}
    unset = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    params = _sampling(unset, max_tokens=None, logprobs=None, defaults=defaults)
    assert (params.temperature, params.max_tokens, params.top_k) == (0.0, 5, 7)
    given = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.9, max_tokens=3)
    params = _sampling(given, max_tokens=given.max_tokens, logprobs=None, defaults=defaults)
    assert (params.temperature, params.max_tokens, params.top_k) == (0.9, 3, 7)
