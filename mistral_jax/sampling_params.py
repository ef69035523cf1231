"""vLLM's module path for SamplingParams (`from vllm.sampling_params import SamplingParams` in the
model cards' snippets), so they run with `vllm` replaced by `mistral_jax`."""

from mistral_jax.sample.sampling import SamplingParams

__all__ = ["SamplingParams"]
