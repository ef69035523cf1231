"""Compiled programs kept across restarts (programs.py): a restart loads every engine program
without tracing or lowering it, and gives the same outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.engine import programs

# One start of the engine in a fresh process: warm-up, then a request with logprobs and prompt
# logprobs. Prints the lowerings counted (JAX's jaxpr -> MLIR events), what the programs loaded
# and compiled, and the outputs.
START = r"""
import json, jax
lowerings = []
jax.monitoring.register_event_duration_secs_listener(
    lambda e, d, **k: lowerings.append(e) if e == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)
from mistral_jax import LLM, SamplingParams
llm = LLM(load_format="dummy", config="tiny", max_model_len=256, max_num_batched_tokens=64, warmup=True, progress=False)
warm = len(lowerings)
out = llm.generate([{"prompt_token_ids": [5, 9, 200, 7, 31, 8]}],
                   SamplingParams(temperature=0, max_tokens=6, logprobs=2, prompt_logprobs=2))[0]
e = llm.engine
r = e.runner
progs = [r.step_program, r.prompt_lp_program, r.top_lp_program, r.reset_row_program]
print(json.dumps({"warmup_lowerings": warm, "lowerings": len(lowerings), "programs": llm.warmup_programs,
                  "loaded": sum(p.loaded for p in progs), "compiled": sum(p.compiled for p in progs),
                  "tokens": out.outputs[0].token_ids, "logprobs": repr(out.outputs[0].logprobs),
                  "prompt_logprobs": repr(out.prompt_logprobs)}))
"""


def _start(cache: Path) -> dict:
    env = dict(os.environ, MISTRAL_JAX_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", START], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_restart_loads_every_program_and_gives_the_same_outputs(tmp_path):
    cold = _start(tmp_path)
    assert cold["compiled"] == cold["programs"] > 0 and cold["loaded"] == 0
    assert len(list((tmp_path / "mistral_jax_programs").glob("*.bin"))) == cold["programs"]
    warm = _start(tmp_path)
    assert warm["loaded"] == warm["programs"] and warm["compiled"] == 0
    # Nothing of the engine's programs is traced or lowered again (what is left: weight init).
    assert warm["warmup_lowerings"] <= 3 < cold["warmup_lowerings"], (cold, warm)
    assert [warm[k] for k in ("tokens", "logprobs", "prompt_logprobs")] == \
           [cold[k] for k in ("tokens", "logprobs", "prompt_logprobs")]
    # JAX's own cache may hold these programs (an older version of ours, or our files deleted):
    # an executable JAX's cache loaded re-serializes without its kernels on XLA:CPU, so what is
    # stored must be compiled afresh (this start, then the next, which loads it).
    for f in (tmp_path / "mistral_jax_programs").glob("*.bin"):
        f.unlink()
    _start(tmp_path)
    again = _start(tmp_path)
    assert again["loaded"] == again["programs"]
    assert again["tokens"] == cold["tokens"] and again["prompt_logprobs"] == cold["prompt_logprobs"]


def _affine(x, w, *, scale):
    return (x @ w) * scale


_affine_jit = jax.jit(_affine, static_argnames=("scale",))


def test_keys_follow_shapes_and_static_arguments(tmp_path):
    x, w = np.ones((4, 8), np.float32), np.arange(64, dtype=np.float32).reshape(8, 8)
    devices = jax.devices()[:1]
    a = programs.Program(_affine_jit, devices, directory=tmp_path, scale=2.0)
    b = programs.Program(_affine_jit, devices, directory=tmp_path, scale=3.0)
    np.testing.assert_allclose(a("x4", x, w), (x @ w) * 2)
    np.testing.assert_allclose(b("x4", x, w), (x @ w) * 3)  # another static value: its own program
    np.testing.assert_allclose(a("x2", x[:2], w), (x[:2] @ w) * 2)
    assert len(list(tmp_path.glob("*.bin"))) == 3
    assert a._key((x, w)) != a._key((x[:2], w)) != a._key((x.astype(jnp.bfloat16), w))


def test_a_damaged_file_is_compiled_again(tmp_path, caplog):
    x, w = np.ones((4, 8), np.float32), np.eye(8, dtype=np.float32)
    devices = jax.devices()[:1]
    programs.Program(_affine_jit, devices, directory=tmp_path, scale=5.0)("b", x, w)
    (stored,) = tmp_path.glob("*.bin")
    stored.write_bytes(b"not an executable")
    programs._shared.clear()  # as in a new process
    programs.clear()
    p = programs.Program(_affine_jit, devices, directory=tmp_path, scale=5.0)
    np.testing.assert_allclose(p("b", x, w), x * 5)
    assert (p.loaded, p.compiled) == (0, 1) and "could not load" in caplog.text
    programs._shared.clear()
    programs.clear()
    q = programs.Program(_affine_jit, devices, directory=tmp_path, scale=5.0)
    np.testing.assert_allclose(q("b", x, w), x * 5)
    assert (q.loaded, q.compiled) == (1, 0)  # replaced by a good one


def test_a_static_argument_without_a_stable_text_is_not_stored(tmp_path):
    class Opaque:  # repr names its address: the same object could not be found after a restart
        pass

    f = jax.jit(lambda x, *, tag: x + 1, static_argnames=("tag",))
    p = programs.Program(f, jax.devices()[:1], directory=tmp_path, tag=Opaque())
    np.testing.assert_allclose(p(0, np.zeros(3, np.float32)), np.ones(3))
    assert p.compiled == 1 and not list(tmp_path.glob("*.bin"))


def test_the_directory_keeps_the_most_recently_used_within_its_size(tmp_path):
    for i, age in enumerate((300, 100, 200)):
        f = tmp_path / f"{i}.bin"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (f.stat().st_atime, f.stat().st_mtime - age))
    programs._prune(tmp_path, 2500)
    assert sorted(f.name for f in tmp_path.glob("*.bin")) == ["1.bin", "2.bin"]  # the oldest went
