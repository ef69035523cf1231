"""Checkpoints of every supported format, read as one canonical tensor stream.

    ckpt = open_checkpoint(path)          # a Mistral or Hugging Face directory, or a .gguf file
    ckpt.config                           # ModelConfig
    for name, array in ckpt.tensors():    # canonical names (base.py), one tensor at a time
        ...
"""

from __future__ import annotations

from pathlib import Path

from mistral_jax.loading.checkpoint import hf, mistral
from mistral_jax.loading.checkpoint.base import Checkpoint, CheckpointError, expected_shapes
from mistral_jax.loading.checkpoint.gguf import GGUFCheckpoint
from mistral_jax.loading.checkpoint.hf import HFCheckpoint
from mistral_jax.loading.checkpoint.mistral import MistralCheckpoint
from mistral_jax.loading.checkpoint.orbax import OrbaxCheckpoint, is_orbax_dir

__all__ = ["open_checkpoint", "Checkpoint", "CheckpointError", "expected_shapes",
           "MistralCheckpoint", "HFCheckpoint", "GGUFCheckpoint", "OrbaxCheckpoint"]

LOOKED_FOR = (
    "params.json + consolidated*.safetensors (Mistral), "
    f"config.json + model.safetensors or model-0000N-of-0000M.safetensors with {hf.INDEX} (Hugging Face), "
    "a .gguf file, or an Orbax checkpoint (mistral_jax.json + weights/, from python -m mistral_jax.convert)"
)


def open_checkpoint(path: str | Path, layout: str | None = None) -> Checkpoint:
    """Detect the format of `path` and open it (reads headers and config, no weights). layout:
    "mistral", "hf" or "gguf" reads a folder as that layout (one holding several: vLLM's
    config_format / load_format chose, hub.py); None detects it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (expected a checkpoint: {LOOKED_FOR})")
    if layout is not None and path.is_dir():
        if layout == "mistral":
            return MistralCheckpoint(path)
        if layout == "hf":
            return HFCheckpoint(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise CheckpointError(f"{path}: load_format='gguf' needs one .gguf file here, found {len(ggufs)}: "
                                  "pass the file's path")
        return GGUFCheckpoint(ggufs[0])
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFCheckpoint(path)
        raise CheckpointError(f"{path}: not a checkpoint; expected a directory with {LOOKED_FOR}")
    if is_orbax_dir(path):  # first: a converted directory also holds the source's tokenizer files
        return OrbaxCheckpoint(path)
    # A broken link counts as present: reading it then says so, rather than "no checkpoint found".
    has_params, has_config = (_present(path / "params.json"), _present(path / "config.json"))
    # Mistral's repositories often ship both layouts; the consolidated one needs no conversion.
    if has_params and (mistral.weight_files(path) or not has_config):
        return MistralCheckpoint(path)  # raises, naming the missing weights, if there are none
    if has_config:
        return HFCheckpoint(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFCheckpoint(ggufs[0])
    if ggufs:
        raise CheckpointError(f"{path}: several .gguf files {[p.name for p in ggufs]}; pass the one to load")
    found = sorted(p.name for p in path.iterdir())
    raise CheckpointError(f"{path}: no checkpoint found; looked for {LOOKED_FOR}. Found: {found or 'nothing'}")


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()
