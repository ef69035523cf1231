"""Mistral's consolidated format: params.json + consolidated*.safetensors, already canonical."""

from __future__ import annotations

from pathlib import Path

from mistral_jax.config import MISTRAL_KEYS, ModelConfig, read_json
from mistral_jax.loading.checkpoint.base import Checkpoint, CheckpointError, safetensors_entries, safetensors_header

# consolidated.safetensors, consolidated.00.safetensors, consolidated-00001-of-00002.safetensors
WEIGHT_GLOB = "consolidated*.safetensors"


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(WEIGHT_GLOB))


class MistralCheckpoint(Checkpoint):
    format = "mistral"

    def __init__(self, directory: Path):
        params_path = directory / "params.json"
        config = ModelConfig.from_mistral_params(read_json(params_path), source=params_path)
        super().__init__(directory, config, params_path, MISTRAL_KEYS)
        self.files = weight_files(directory)
        if not self.files:
            raise CheckpointError(
                f"{directory}: has params.json but no weights: looked for consolidated.safetensors, "
                "consolidated.NN.safetensors or consolidated-0000N-of-0000M.safetensors"
            )
        # params.json has no quantization entry we rely on: FP8 is recognized from the tensors
        # themselves (any `*.weight_scale`), read from the headers only (which checks each file's
        # layout: a damaged file fails here, naming itself, before anything else is loaded).
        if any(name.endswith(".weight_scale") for file in self.files for name in safetensors_header(file)[1]):
            self.quantization = "fp8"

    def _entries(self, stack):
        for file in self.files:
            # No known extras in consolidated files: every name must be a model tensor.
            yield from safetensors_entries(stack, file, rename=lambda name: name)
