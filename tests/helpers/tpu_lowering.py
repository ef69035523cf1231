"""Lower every program an engine compiles on a TPU, from a machine without one. Run in a process
of its own (it sets the CPU device count for the tp meshes and replaces two functions):

    python tests/helpers/tpu_lowering.py --config mistral-small-2501 --quantization fp8 --tp 1,8

prints one JSON object: per tp, per program ("step[256]": the step at 256 tokens), per TPU
generation, the Mosaic kernels in the lowered module or the error.

How: build() makes the engine for platform "tpu" (a TPU's kernels, token buckets and weight
layout) on CPU devices, with abstract weights (shapes and shardings, nothing allocated: the full
Mistral-Small depth costs no memory), and its warm-up runs with every Program call intercepted.
The call's function is traced with the call's arguments and lowered for TPU, once per generation,
inside an abstract mesh of the engine mesh's shape whose AbstractDevice names the chip (Mosaic's
lowering rules ask which generation they target), with the model's own mesh context (shard_map of
the kernels, sharding constraints) set to that abstract mesh; the call returns the traced
result's shapes, and the warm-up goes on. Lowering runs Mosaic's checks (block shapes and tiling,
ops a generation lacks); what only libtpu's compiler checks (VMEM overflow among them) it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# JAX's device kinds of the TPU generations we support.
GENERATIONS = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite", "v7x": "TPU7x"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="a shipped config's name, or params.json's fields as JSON")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--tp", default="1", help="comma-separated tensor-parallel sizes, one engine each")
    ap.add_argument("--generations", default=",".join(GENERATIONS))
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--speculative-config", default=None)
    args = ap.parse_args()
    sizes = [int(t) for t in args.tp.split(",")]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(sizes)}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's mistral_jax
    intercept(args.generations.split(","))
    print(json.dumps({str(tp): lower_engine(args, tp) for tp in sizes}))


_found: dict[str, dict] = {}  # the engine being lowered: program -> generation -> result


def intercept(generations: list[str]) -> None:
    """Dummy weights become abstract; each Program call lowers for TPU instead of compiling."""
    import jax
    from flax import nnx
    from jax.sharding import AbstractDevice, AbstractMesh

    from mistral_jax.engine import programs
    from mistral_jax.loading import weights
    from mistral_jax.runtime.sharding import current_mesh, use_mesh

    def abstract_weights(cfg, dtype, mesh, seed=0, quantization=None, fp8_impl="auto"):
        """random_weights' model, its arrays ShapeDtypeStructs in their shardings."""
        graphdef, state = nnx.split(weights.abstract_model(cfg, dtype, quantization=quantization, fp8_impl=fp8_impl))
        state = jax.tree.map(
            lambda v: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                     sharding=weights.param_sharding(mesh, v))),
            state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return nnx.merge(graphdef, state)

    def call(self, bucket, *args):
        name = f"{self.name.rsplit('.', 1)[-1].lstrip('_')}[{bucket}]"
        mesh = current_mesh()  # the runner calls every program inside its mesh's context
        out = None
        for gen in generations:
            device = AbstractDevice(device_kind=GENERATIONS[gen], num_cores=1, platform="tpu")
            amesh = AbstractMesh(tuple(mesh.shape.values()), tuple(mesh.shape), abstract_device=device)
            try:
                with jax.sharding.use_abstract_mesh(amesh), use_mesh(amesh):
                    traced = self.fn.trace(*args, **self.static)
                    text = traced.lower(lowering_platforms=("tpu",)).as_text()
                out = traced.out_info
                _found.setdefault(name, {})[gen] = {"kernels": text.count("@tpu_custom_call")}
            except Exception as e:  # noqa: BLE001  reported: the test names it
                _found.setdefault(name, {})[gen] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
        return out if out is not None else jax.eval_shape(lambda *a: self.fn(*a, **self.static), *args)

    weights.random_weights = abstract_weights
    programs.Program.__call__ = call


def lower_engine(args, tp: int) -> dict:
    from mistral_jax.engine.args import EngineArgs
    from mistral_jax.engine.build import build

    config = args.config
    if config.startswith("{"):
        config = tempfile.mkdtemp()
        (Path(config) / "params.json").write_text(args.config)
    _found.clear()
    engine_args = EngineArgs(load_format="dummy", config=config, dtype="bfloat16", quantization=args.quantization,
                             tensor_parallel_size=tp, max_model_len=args.max_model_len,
                             max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                             num_pages=32, warmup=True, speculative_config=args.speculative_config)
    try:
        engine = build(engine_args, progress=False, platform="tpu").engine
    except Exception as e:  # noqa: BLE001  the engine could not be made for TPU at all
        return {"build_error": f"{type(e).__name__}: {e}", "programs": dict(_found)}
    return {"programs": dict(_found), "expected_programs": engine.programs(), "attention": engine.attention_impl,
            "fp8": engine.kernels.fp8, "platform": engine.kernels.platform}


if __name__ == "__main__":
    main()
