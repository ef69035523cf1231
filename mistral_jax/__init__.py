"""mistral_jax: a JAX/XLA inference engine for Mistral models.

    from mistral_jax import LLM, SamplingParams
    llm = LLM()  # the embedded demo model; LLM(model="/path/to/Mistral-Small-24B-Instruct-2501")
    print(llm.generate("The capital of France is", SamplingParams(max_tokens=8))[0].outputs[0].text)
"""

import time as _time

IMPORTED_AT = _time.perf_counter()  # `generate --verbose` counts start-up from here

from mistral_jax.runtime.xla_flags import apply_default_xla_flags  # noqa: E402

apply_default_xla_flags()  # before JAX initializes its backend

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import mistral_jax.config` should not pull in tokenizers, checkpoints and the engine.
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from mistral_jax.entrypoints import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from mistral_jax.sample.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'mistral_jax' has no attribute {name!r}")
