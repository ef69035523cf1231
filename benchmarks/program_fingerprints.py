"""Per-program fingerprints of the engine's lowered StableHLO: the check that a refactor changed no
program. Builds small engines (random weights), runs their warm-up with every Program call
intercepted, and lowers each program for the CPU and for CUDA (lowered from this machine, no GPU
needed; the Pallas Triton and Mosaic GPU kernels are serialized into the module). Each module is
printed without debug info, its symbol names replaced by their order of appearance, and hashed.

    python benchmarks/program_fingerprints.py OUT.json      # then diff two outputs

The tp=2 cases split the programs over two CPU devices (XLA_FLAGS, set here unless given).

Same output before and after a change = the same programs, up to names and source locations.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # for the tp=2 cases
import jax  # noqa: E402

# Source locations (file, line) out of every module, the kernels' serialized ones included: a
# moved file or a shifted line is not a different program.
jax.config.update("jax_traceback_in_locations_limit", 0)
jax.config.update("jax_include_full_tracebacks_in_locations", False)

# A shape the Mosaic GPU FP8 kernel takes (n, k multiples of 128) and grouped-query attention.
SMALL = {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 128, "hidden_dim": 512,
         "vocab_size": 32768, "rope_theta": 1e6, "norm_eps": 1e-5, "max_seq_len": 1024}

# (label, config, platform, LLM settings)
CASES = [
    ("tiny bf16 cpu", "tiny", "cpu", dict(attention_impl="reference")),
    ("tiny fp8 cpu", "tiny", "cpu", dict(quantization="fp8", fp8_impl="reference")),
    ("tiny bf16 cuda", "tiny", "cuda", dict(attention_impl="triton")),
    ("tiny fp8-triton cuda", "tiny", "cuda", dict(attention_impl="triton", quantization="fp8", fp8_impl="triton")),
    ("small fp8-mgpu cuda", "small", "cuda", dict(attention_impl="triton", quantization="fp8", fp8_impl="mgpu")),
    ("tiny bf16 cpu tp=2", "tiny", "cpu", dict(attention_impl="reference", tensor_parallel_size=2)),
    ("small fp8-mgpu cuda tp=2", "small", "cuda",
     dict(attention_impl="triton", quantization="fp8", fp8_impl="mgpu", tensor_parallel_size=2)),
    ("small ngram cuda", "small", "cuda",
     dict(attention_impl="triton", speculative_config={"method": "ngram", "num_speculative_tokens": 3})),
]


def _kernel_context():
    """An MLIR context that reads the kernels' serialized modules (Triton and Mosaic GPU)."""
    from jax._src.pallas.triton.lowering import _new_ir_context
    from jax.experimental.mosaic.gpu import dialect as mosaic_gpu_dialect

    ctx = _new_ir_context()
    mosaic_gpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    return ctx


def canonical_text(lowered) -> str:
    """The module's text without debug info, each kernel's serialized module (a Triton kernel's `ir`,
    a Mosaic GPU kernel's `module`, which embed their source file and lines) replaced by the hash
    of its own text without debug info, and symbols (@name) numbered by first appearance."""
    from jax._src.lib.mlir import ir

    module = lowered.compiler_ir("stablehlo")
    kernel_ctx = _kernel_context()

    def visit(op):
        op = op.operation
        if op.name == "stablehlo.custom_call" and "mhlo.backend_config" in op.attributes:
            config = op.attributes["mhlo.backend_config"]
            if type(config).__name__ == "DictAttr":
                entries = {a.name: a.attr for a in config}
                for key in ("ir", "module"):
                    if key in entries:
                        with kernel_ctx:
                            kernel = ir.Module.parse(ir.StringAttr(entries[key]).value_bytes)
                            text = kernel.operation.get_asm(enable_debug_info=False)
                        entries[key] = ir.StringAttr.get(hashlib.sha256(text.encode()).hexdigest(), module.context)
                        entries.pop("kernel_hash", None)  # the serialized module's own hash
                op.attributes["mhlo.backend_config"] = ir.DictAttr.get(entries, module.context)
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    text = module.operation.get_asm(enable_debug_info=False)
    names: dict[str, str] = {}
    return re.sub(r"@[\w.$-]+", lambda m: names.setdefault(m.group(0), f"@s{len(names)}"), text)


def fingerprints(config: str, platform: str, settings: dict) -> dict[str, str]:
    from mistral_jax.engine import programs
    try:  # the package's layout before and after the move
        from mistral_jax.entrypoints.llm import LLM
    except ImportError:
        from mistral_jax.entrypoints.llm import LLM

    found: dict[str, str] = {}
    original = programs.Program.__call__

    def call(self, bucket, *args):
        lowered = self.fn.trace(*args, **self.static).lower(lowering_platforms=(platform,))
        text = canonical_text(lowered)
        short = self.name.rsplit(".", 1)[-1].lstrip("_")
        found[f"{short}[{bucket}]"] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return jax.eval_shape(lambda *a: self.fn(*a, **self.static), *args)

    programs.Program.__call__ = call
    try:
        LLM(load_format="dummy", config=config, dtype="bfloat16", warmup=True, progress=False, max_model_len=512,
            max_num_seqs=8, max_num_batched_tokens=64, num_pages=64, **settings)
    finally:
        programs.Program.__call__ = original
    return dict(sorted(found.items()))


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "params.json").write_text(json.dumps(SMALL))
        result = {"jax": jax.__version__}
        for label, config, platform, settings in CASES:
            result[label] = fingerprints(d if config == "small" else config, platform, settings)
            print(f"{label}: {len(result[label])} programs", file=sys.stderr)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
