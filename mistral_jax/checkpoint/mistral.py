"""Mistral's consolidated format: params.json + consolidated*.safetensors, already canonical."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from .base import Checkpoint, CheckpointError, safetensors_entries

# consolidated.safetensors, consolidated.00.safetensors, consolidated-00001-of-00002.safetensors
WEIGHT_GLOB = "consolidated*.safetensors"


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(WEIGHT_GLOB))


def _tensor_names(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="numpy") as handle:
        return list(handle.keys())


class MistralCheckpoint(Checkpoint):
    format = "mistral"

    def __init__(self, directory: Path):
        params_path = directory / "params.json"
        try:
            config = ModelConfig.from_mistral_params(json.loads(params_path.read_text()))
        except KeyError as e:
            raise CheckpointError(f"{params_path}: missing key {e}") from None
        super().__init__(directory, config)
        self.files = weight_files(directory)
        if not self.files:
            raise CheckpointError(
                f"{directory}: has params.json but no weights: looked for consolidated.safetensors, "
                "consolidated.NN.safetensors or consolidated-0000N-of-0000M.safetensors"
            )
        # params.json has no quantization entry we rely on: FP8 is recognized from the tensors
        # themselves (any `*.weight_scale`), read from the headers only.
        if any(name.endswith(".weight_scale") for file in self.files for name in _tensor_names(file)):
            self.quantization = "fp8"

    def _entries(self, stack):
        for file in self.files:
            # No known extras in consolidated files: every name must be a model tensor.
            yield from safetensors_entries(stack, file, rename=lambda name: name)
