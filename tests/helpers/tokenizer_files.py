"""Tokenizer files and tools of the tokenizer and tool-call tests: mistral-common's own files,
Tekken relabelled to the newer prompt and tool-call formats, and two OpenAI tools."""

from __future__ import annotations

import json
from pathlib import Path

import mistral_common
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

DATA = Path(mistral_common.__file__).parent / "data"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}}


def tekken_with_version(src: Path, dst: Path, version: str) -> Path:
    """mistral-common ships Tekken only as v3; relabel it to test newer prompt/tool-call formats.
    Versions above v7 must list their special tokens in the file, including [ARGS] and [CALL_ID]."""
    data = json.loads(src.read_text())
    data["config"]["version"] = version
    if version not in ("v3", "v7"):
        names = [str(t["token_str"]) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
        names += ["[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]"]
        data["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(names)]
    dst.write_text(json.dumps(data))
    return dst


def mistral_tokenizer_files(tmp: Path) -> dict[str, Path]:
    """One file per prompt format: SentencePiece v3 and v7, Tekken v3, v7, v11 and v13 (the
    relabelled ones written into tmp)."""
    tekken = DATA / "tekken_240911.json"
    return {
        "spm_v3": DATA / "mistral_instruct_tokenizer_240323.model.v3",
        "spm_v7": DATA / "mistral_instruct_tokenizer_241114.model.v7",
        "tekken_v3": tekken,
        "tekken_v7": tekken_with_version(tekken, tmp / "tekken_v7.json", "v7"),
        "tekken_v11": tekken_with_version(tekken, tmp / "tekken_v11.json", "v11"),
        "tekken_v13": tekken_with_version(tekken, tmp / "tekken_v13.json", "v13"),
    }
