"""The package's layers: no module imports upwards.

mistral_jax's top folders, lowest first. A module may import from its own layer and the layers
below it, never from a layer above (module-level and function-level imports alike, and those
under `if TYPE_CHECKING:`: a type from above is a dependency on it too).

    layer  folders              what they are
    -----  -------------------  -------------------------------------------------------------
      0    config, gguf_file,   ModelConfig; the GGUF container reader; the mesh, processes,
           runtime              XLA flags
      1    tokenizer            text <-> token ids (Mistral, Hugging Face, GGUF tokenizers)
      2    tool_calls           tool-call formats, parsers and grammars
      3    model                the transformer and its kernels' names
      4    loading              the Hub, checkpoint formats, weights onto the mesh
      5    cache                the KV cache and its page allocator
      6    sample               sampling and structured outputs
      7    engine               scheduler, step programs, the engine
      8    entrypoints          LLM, generate, serve, convert, the CLI and the server

The top-level modules (the `python -m mistral_jax.generate|serve|convert` shims,
sampling_params.py and __init__.py) may import anything; nothing inside a layer imports them.
pallas_kernels/ is below all of it: it imports nothing from mistral_jax.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mistral_jax"

LAYERS = [
    ("config", "gguf_file", "runtime"),
    ("tokenizer",),
    ("tool_calls",),
    ("model",),
    ("loading",),
    ("cache",),
    ("sample",),
    ("engine",),
    ("entrypoints",),
]
RANK = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}
TOP_LEVEL = {"__init__", "generate", "serve", "convert", "sampling_params"}  # above every layer
TOP = len(LAYERS)


def eager_names(init: Path) -> set[str]:
    """What mistral_jax/__init__.py defines as it runs (IMPORTED_AT, __version__...): any module
    may import those, since importing any module of the package runs __init__.py first. Its lazy
    names (LLM, SamplingParams: its __getattr__) count as the top layer."""
    names = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names - {"__all__"}


EAGER = eager_names(PACKAGE / "__init__.py")


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved; for
    `from X import name`, X.name (name may be a submodule) as well as X."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*parts, *([base] if base else [])])
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return out


def layer_of(module: str) -> tuple[str, int] | None:
    """The layer of a mistral_jax module (by its folder, or its top-level file); None outside."""
    parts = module.split(".")
    if parts[0] != "mistral_jax":
        return None
    if len(parts) == 1:
        return "__init__", TOP
    head = parts[1]
    if head in EAGER:
        return "__init__", 0
    if head in RANK:
        return head, RANK[head]
    if head in TOP_LEVEL:
        return head, TOP
    return "__init__", TOP  # `from mistral_jax import LLM`: an attribute of the package's __init__


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_folder_has_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    files = {p.stem for p in PACKAGE.glob("*.py")}
    assert folders | (files - TOP_LEVEL) == set(RANK), (
        "every top folder (and top-level module) of mistral_jax/ has a place in LAYERS or TOP_LEVEL")


def test_no_module_imports_upwards():
    violations = []
    for path in modules("mistral_jax"):
        module = module_name(path, PACKAGE)
        own, rank = layer_of(module)
        if own in TOP_LEVEL:
            continue
        for line, target in imports(path, module):
            theirs = layer_of(target)
            if theirs is not None and theirs[1] > rank:
                violations.append(f"{path.relative_to(ROOT)}:{line} ({own}, layer {rank}) imports {target} "
                                  f"({theirs[0]}, layer {theirs[1]})")
    assert not violations, "imports from a higher layer:\n" + "\n".join(sorted(set(violations)))


def test_pallas_kernels_imports_nothing_from_mistral_jax():
    found = [f"{path.relative_to(ROOT)}:{line} imports {target}"
             for path in modules("pallas_kernels")
             for line, target in imports(path, module_name(path, ROOT / "pallas_kernels"))
             if target.split(".")[0] == "mistral_jax"]
    assert not found, "\n".join(found)


def test_kernel_names_match_the_kernels():
    """model/kernels.py spells the implementations' names without importing the kernels (so
    `--help` needs no JAX); they are the kernels' own lists."""
    pytest.importorskip("jax")
    from mistral_jax.model import kernels
    from pallas_kernels import fp8_matmul, ragged_paged_attention

    assert tuple(kernels.ATTENTION_IMPLS) == tuple(ragged_paged_attention.IMPLS)
    assert tuple(kernels.FP8_IMPLS) == tuple(fp8_matmul.IMPLS)


def test_the_import_parser_resolves_relative_imports(tmp_path):
    pkg = tmp_path / "mistral_jax" / "engine"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("from . import y\nfrom ..entrypoints import llm\nimport mistral_jax.cache.paged\n"
                              "def f():\n    from mistral_jax import LLM\n")
    found = imports(pkg / "x.py", "mistral_jax.engine.x")
    assert [t for _, t in found] == ["mistral_jax.engine.y", "mistral_jax.entrypoints.llm",
                                     "mistral_jax.cache.paged", "mistral_jax.LLM"]
    assert [layer_of(t) for _, t in found] == [("engine", 7), ("entrypoints", 8), ("cache", 5), ("__init__", 9)]
    assert "IMPORTED_AT" in EAGER and layer_of("mistral_jax.IMPORTED_AT") == ("__init__", 0)
