"""Every program the engine compiles on a TPU lowers for TPU v5e, v6e and v7x, from this CPU-only
machine, at Mistral-Small's real shapes (all 40 layers: the weights are abstract), with the
Pallas TPU kernels in the module: the engine did not fall back to the jnp reference.

Lowering runs Mosaic's own checks (block shapes, tiling, ops a generation lacks); VMEM overflow is
checked only by libtpu's compiler on a TPU (issue 40 tracks computing it here). The two cases
between them cover both Mistral-Small shapes, bf16 and FP8 weights and tp 1, 4 and 8; each runs in
a process of its own (tests/helpers/tpu_lowering.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).parent / "helpers" / "tpu_lowering.py"


@pytest.mark.slow
@pytest.mark.parametrize("config, quantization, tp", [
    ("mistral-small-2501", "fp8", "1,8"),
    ("mistral-small-2409", None, "1,4"),
])
def test_every_program_lowers_for_tpu(config, quantization, tp):
    cmd = [sys.executable, str(HELPER), "--config", config, "--tp", tp]
    if quantization:
        cmd += ["--quantization", quantization]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    by_tp = json.loads(run.stdout)
    for size, result in by_tp.items():
        assert "build_error" not in result, result["build_error"]
        assert (result["platform"], result["attention"]) == ("tpu", "tpu")
        assert result["fp8"] == "tpu"
        programs = result["programs"]
        # the warm-up reached every program the engine counts (each token bucket, logprobs, penalty reset)
        assert len(programs) == result["expected_programs"], sorted(programs)
        failed = {f"{name} {gen}": r["error"] for name, gens in programs.items() for gen, r in gens.items()
                  if "error" in r}
        assert not failed, f"tp={size}: {failed}"
        steps = {name: gens for name, gens in programs.items() if name.startswith("step[")}
        assert steps
        # one attention kernel (the layer scan's body is lowered once), and with FP8 weights the four
        # FP8 products of a layer (qkv, o, gate-up, down)
        kernels = 1 + (4 if quantization == "fp8" else 0)
        for name, gens in steps.items():
            assert {gen: r["kernels"] for gen, r in gens.items()} == dict.fromkeys(("v5e", "v6e", "v7x"), kernels), \
                (size, name)
