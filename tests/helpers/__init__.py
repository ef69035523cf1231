"""Helpers shared by the test modules (fixtures stay in tests/conftest.py):

    helpers.models       V3_TOKENIZER, dense_logits, qkv_part
    helpers.checkpoints  tiny random checkpoints on disk (Mistral, Hugging Face, GGUF, FP8)
    helpers.server       `python -m mistral_jax.serve` in a subprocess, and its processes
    helpers.hub_standin  a loopback stand-in for the Hugging Face Hub
    helpers.fp8_tp       the two-GPU FP8 tests' model, prompts and greedy run

Import them as `from helpers.checkpoints import ...`: pytest puts tests/ on sys.path (the
rootdir conftest's folder), never `from conftest import ...`.
"""
