"""What every maintained benchmark shares: where it runs and how it writes its result.

Each benchmark writes one JSON per run through `write_result`: the benchmark's own figures plus
`benchmark` (its name) and `env` (date, commit, Python, JAX, devices, host CPUs). `--out` may name
a file or a folder; in a folder the file is named `<date>_<device>_<benchmark>.json`, the naming of
benchmarks/results/. The benchmarks import this module by its plain name (they run as scripts,
`python benchmarks/bench_x.py`, so benchmarks/ is on sys.path)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit() -> str | None:
    """The repository's commit (with `+dirty` when the tree has changes), or None outside git."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def environment(jax_info: bool = True) -> dict:
    """Date, commit, Python, host CPUs and (with jax_info, which imports JAX) JAX's version and devices."""
    env = {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "python": platform.python_version(),
           "machine": platform.machine(), "cpu_count": os.cpu_count()}
    if jax_info:
        import jax

        devices = jax.devices()
        env.update(jax=jax.__version__, backend=devices[0].platform, device=devices[0].device_kind,
                   device_count=len(devices), process_count=jax.process_count())
    return env


def device_tag(env: dict) -> str:
    """A short name for the device in result names: cpu, h100, h200, h200x2, ..."""
    if env.get("backend", "cpu") == "cpu":
        return "cpu"
    kind = str(env.get("device", "gpu")).lower()
    tag = next((t for t in ("h200", "h100", "a100", "l4", "tpu") if t in kind), kind.split()[-1])
    n = env.get("device_count", 1)
    return tag if n == 1 else f"{tag}x{n}"


def write_result(out: str | os.PathLike | None, benchmark: str, result: dict, jax_info: bool = True) -> Path | None:
    """Add `benchmark` and `env` to result and write it as JSON to out (a file, or a folder to name
    the file in); print the path. Returns it (None, writing nothing, when out is None)."""
    if out is None:
        return None
    result = {"benchmark": benchmark, "env": result.get("env") or environment(jax_info), **result}
    text = json.dumps(result, indent=1)
    path = Path(out)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"{result['env']['date']}_{device_tag(result['env'])}_{benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path
