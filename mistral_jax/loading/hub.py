"""Models by Hugging Face Hub id, and vLLM's format switches, resolved to one local folder.

`resolve_model("mistralai/Mistral-Small-24B-Instruct-2501", load_format="mistral", ...)` returns
the folder to load and the layout to read it as. A local path is used as it is; anything else
shaped `owner/name` is a Hub repo, fetched by `huggingface_hub` (its cache, `HF_TOKEN`,
`HF_HUB_OFFLINE`, `HF_ENDPOINT`, resumable downloads and progress bars): only the files the
chosen layout needs. Mistral's repos hold two copies of the weights (the Mistral-format
`consolidated.safetensors` and Hugging Face shards, ~47 GB each for 2501); one is fetched, never
both.

vLLM's switches, with vLLM's meaning:
- `config_format`: "mistral" (params.json), "hf" (config.json), "auto" (config.json if the model
  has one, else params.json).
- `load_format`: "mistral" (consolidated*.safetensors), "safetensors" (Hugging Face shards),
  "gguf" (one .gguf file), "dummy" (random weights of the config's shape), "auto" (the layout
  `config_format` names; with both "auto": Hugging Face's if present, then Mistral's, then GGUF).
- `tokenizer_mode`: "mistral" (mistral-common: tekken.json or tokenizer.model.v*), "hf"
  (tokenizer.json and the model's jinja template), "auto" (Mistral's files when the model has
  them: they carry the exact chat template; else Hugging Face's).
A combination we cannot honour (config_format="hf" with load_format="mistral", a tokenizer mode
whose files the model lacks) is an error that says so."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

from mistral_jax.config import CheckpointError

LOAD_FORMATS = ("auto", "mistral", "safetensors", "gguf", "dummy")
CONFIG_FORMATS = ("auto", "mistral", "hf")
TOKENIZER_MODES = ("auto", "mistral", "hf")

# Each layout's files (fnmatch patterns, as huggingface_hub's allow_patterns). Never mutated.
LAYOUT_FILES = {
    "mistral": {"config": ["params.json"], "weights": ["consolidated*.safetensors"]},
    "hf": {"config": ["config.json"], "weights": ["model*.safetensors", "model.safetensors.index.json"]},
    "gguf": {"config": [], "weights": ["*.gguf"]},
}
TOKENIZER_FILES = {
    "mistral": ["tekken.json", "tokenizer.model.v*"],
    "hf": ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"],
}
ALWAYS = ["generation_config.json"]  # small, and --generation-config auto reads it

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local folder (or a .gguf file)
    layout: str | None  # "mistral", "hf", "gguf", or None: detect from the files (open_checkpoint)
    tokenizer_mode: str  # as asked; load_tokenizer applies it
    repo_id: str | None = None  # where it came from, if the Hub


def is_repo_id(spec: str) -> bool:
    """`owner/name` that is no local path (vLLM and transformers decide the same way)."""
    return bool(_REPO_ID.fullmatch(spec)) and not Path(spec).expanduser().exists()


def check_formats(load_format: str, config_format: str, tokenizer_mode: str) -> None:
    for name, value, allowed in (("load_format", load_format, LOAD_FORMATS),
                                 ("config_format", config_format, CONFIG_FORMATS),
                                 ("tokenizer_mode", tokenizer_mode, TOKENIZER_MODES)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {allowed}")
    pairs = {("mistral", "hf"): "Mistral-format weights (consolidated*.safetensors) go with params.json",
             ("safetensors", "mistral"): "Hugging Face shards go with config.json"}
    if (why := pairs.get((load_format, config_format))) is not None:
        raise ValueError(f"load_format={load_format!r} with config_format={config_format!r} mixes two layouts: {why}. "
                         f"Use config_format='auto' or the matching one")
    if load_format == "gguf" and config_format != "auto":
        raise ValueError(f"load_format='gguf' reads its config from the .gguf file: leave config_format='auto' "
                         f"(got {config_format!r})")


def choose_layout(files: list[str], load_format: str, config_format: str, where: str) -> str | None:
    """The layout to read among a model's files (top-level names). None: the weights are not read
    (load_format dummy) and the config decides alone."""
    def has(kind: str, layout: str) -> bool:
        return any(fnmatch.fnmatch(f, p) for f in files for p in LAYOUT_FILES[layout][kind])

    wanted = {"mistral": "mistral", "safetensors": "hf", "gguf": "gguf"}.get(load_format)
    if wanted is None and config_format != "auto":
        wanted = config_format
    if wanted is None:  # both auto: vLLM's order (Hugging Face's config first), then GGUF
        wanted = next((lay for lay in ("hf", "mistral", "gguf")
                       if (has("config", lay) or lay == "gguf") and (has("weights", lay) or load_format == "dummy")),
                      None)
        if wanted is None:
            raise CheckpointError(f"{where}: no model found among its files {sorted(files)[:20]}: expected "
                                  "params.json + consolidated*.safetensors, config.json + model*.safetensors, "
                                  "or one .gguf")
    missing = list(LAYOUT_FILES[wanted]["config"]) if not has("config", wanted) else []  # a copy: += below
    if load_format != "dummy" and not has("weights", wanted):
        missing += LAYOUT_FILES[wanted]["weights"][:1]
    if missing:
        asked = f"load_format={load_format!r}, config_format={config_format!r}"
        raise CheckpointError(f"{where} has no {' / '.join(missing)}, which {asked} reads. Its files: "
                              f"{sorted(files)[:20]}. Fix: pick the format it has (load_format='auto')")
    if wanted == "gguf":
        ggufs = [f for f in files if f.endswith(".gguf")]
        if len(ggufs) > 1:
            raise CheckpointError(f"{where} holds several .gguf files {sorted(ggufs)}: download the one you want "
                                  "(huggingface_hub.hf_hub_download(repo_id, filename)) and pass its path")
    return wanted


def tokenizer_patterns(files: list[str], tokenizer_mode: str, layout: str | None, where: str) -> list[str]:
    present = lambda mode: [p for p in TOKENIZER_FILES[mode] if any(fnmatch.fnmatch(f, p) for f in files)]  # noqa: E731
    if layout == "gguf":
        if tokenizer_mode == "mistral":
            raise CheckpointError("tokenizer_mode='mistral' needs tekken.json or tokenizer.model.v*, and a GGUF model "
                                  "carries its own tokenizer: use tokenizer_mode='auto' (or pass tokenizer=PATH)")
        return []
    mode = tokenizer_mode if tokenizer_mode != "auto" else ("mistral" if present("mistral") else "hf")
    found = present(mode)
    if mode == "mistral" and "tekken.json" in found:
        found = ["tekken.json"]  # a repo with both: Tekken is the newer tokenizer
    needed = "tekken.json or tokenizer.model.v*" if mode == "mistral" else "tokenizer.json"
    if not found or (mode == "hf" and "tokenizer.json" not in found):
        raise CheckpointError(f"{where} has no {needed} for tokenizer_mode={tokenizer_mode!r}. Its files: "
                              f"{sorted(files)[:20]}. Fix: use the tokenizer mode it has, or pass tokenizer=PATH")
    return found


def resolve_model(model: str, *, load_format: str = "auto", config_format: str = "auto", tokenizer_mode: str = "auto",
                  revision: str | None = None, download_dir: str | None = None, weights: bool = True) -> ResolvedModel:
    """A local path or a Hub repo id -> the local folder to load, fetching what it needs.
    weights=False: the config and tokenizer only (load_format dummy, or a tokenizer repo)."""
    check_formats(load_format, config_format, tokenizer_mode)
    if not is_repo_id(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise CheckpointError(f"{model}: no such file or directory, and not a Hugging Face repo id (owner/name). "
                                  "Fix: give a checkpoint folder, a .gguf file, or a repo id such as "
                                  "mistralai/Mistral-Small-24B-Instruct-2501")
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to a Hub repo id, and {model} is a local path")
        layout = None
        if path.is_dir() and (load_format not in ("auto", "dummy") or config_format != "auto"):
            layout = choose_layout([p.name for p in path.iterdir()], load_format, config_format, str(path))
        return ResolvedModel(path, layout, tokenizer_mode)
    files, folder = _repo_files(model, revision, download_dir)
    where = f"the Hub repo {model}" + (f" (revision {revision})" if revision else "")
    layout = choose_layout(files, "dummy" if not weights else load_format, config_format, where)
    patterns = ALWAYS + tokenizer_patterns(files, tokenizer_mode, layout, where)
    if layout is not None:
        patterns += LAYOUT_FILES[layout]["config"] + (LAYOUT_FILES[layout]["weights"] if weights else [])
    if layout == "gguf":
        patterns = ALWAYS + [f for f in files if f.endswith(".gguf")]
    path = folder if folder is not None else _download(model, revision, download_dir, patterns)
    if layout == "gguf":
        path = path / next(f for f in files if f.endswith(".gguf"))
    return ResolvedModel(Path(path), layout, tokenizer_mode, model)


def _hub_error(e: Exception, repo_id: str, revision: str | None) -> CheckpointError:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"https://huggingface.co/{repo_id}"
    if isinstance(e, GatedRepoError):
        return CheckpointError(
            f"{repo_id} is a gated repo: accept its license at {page} with your account, then set HF_TOKEN to an "
            f"access token of that account (https://huggingface.co/settings/tokens), or run `hf auth login`")
    if isinstance(e, RevisionNotFoundError):
        return CheckpointError(f"{repo_id} has no revision {revision!r} on the Hub: "
                               "give a branch, tag or commit it has")
    if isinstance(e, RepositoryNotFoundError):
        return CheckpointError(
            f"{repo_id}: no such repo on the Hub, or it is private (then set HF_TOKEN to a token that can read it). "
            f"If you meant a local folder, it does not exist")
    if isinstance(e, LocalEntryNotFoundError):
        return CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache and downloading is off (HF_HUB_OFFLINE=1) or failed "
            f"({e}). Fix: download it once online, or point HF_HOME / download_dir at the cache that holds it")
    return CheckpointError(f"{repo_id}: the Hub could not be reached or refused ({type(e).__name__}: {e}). Fix: check "
                           "the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _repo_files(repo_id: str, revision: str | None, download_dir: str | None) -> tuple[list[str], Path | None]:
    """The repo's top-level files, listed on the Hub; offline, those of the cached snapshot (and
    its folder: what an earlier run fetched is all there is)."""
    import huggingface_hub

    if _offline():
        folder = _cached_snapshot(repo_id, revision, download_dir)
        return [p.name for p in folder.iterdir()], folder
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception as e:  # noqa: BLE001  huggingface_hub's and the network's: each named with its fix
        raise _hub_error(e, repo_id, revision) from e
    return [f for f in files if "/" not in f], None


def _cached_snapshot(repo_id: str, revision: str | None, download_dir: str | None) -> Path:
    """The cache's snapshot folder of a revision (a branch or tag through refs/, or a commit).
    Not snapshot_download(local_files_only=True): it refuses a snapshot that lacks any of the
    repo's files, and a snapshot here holds one layout of two by design."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(download_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    revision = revision or "main"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    folder = repo / "snapshots" / commit
    if not folder.is_dir():
        raise CheckpointError(
            f"{repo_id} (revision {revision}) is not in the local Hugging Face cache ({repo}) and downloading is off "
            "(HF_HUB_OFFLINE=1). Fix: download it once online, or point HF_HOME / download_dir at the cache that "
            "holds it")
    return folder


def _download(repo_id: str, revision: str | None, download_dir: str | None, patterns: list[str]) -> Path:
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                                      allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, repo_id, revision) from e
