"""Checkpoint files -> model weights: Hub downloads, the format readers (Mistral, Hugging Face,
compressed-tensors FP8, GGUF, Orbax), random weights of a real shape, the embedded default model."""
