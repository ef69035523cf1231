"""pallas_kernels is the bottom layer, and each kernel family in it is a tree, not a circle:

(a) no module of pallas_kernels imports mistral_jax;
(b) the import graph among pallas_kernels' modules has no cycle;
(c) no module of a family (pallas_kernels/<family>/) reaches its family's dispatcher (the
    package's __init__): kernels import the shared helpers below them (common, reference,
    gpu_info, activations), the dispatcher imports the kernels.

The graph comes from each module's source (ast), every import statement counted, those inside
functions too (a lazy import closes a circle as surely as one at the top). `from X import Y`
where X is a package is an edge to X's __init__ (executing it is what the import does), and
also to X.Y when that is a module of the package.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pallas_kernels"


def module_sources(root: Path = ROOT, package: str = PACKAGE) -> dict[str, tuple[str, bool]]:
    """{dotted module name: (source, is_package)} of every .py file under root/package."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = (path.read_text(), rel.name == "__init__")
    return out


def imports_of(name: str, source: str, is_package: bool) -> set[str]:
    """The absolute module names that `source` (module `name`) imports, anywhere in it."""
    found = set()
    here = name if is_package else name.rpartition(".")[0]  # the package relative imports start from
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                if node.level - 1 >= len(base_parts):
                    raise AssertionError(f"{name}: relative import beyond the top-level package")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """{module: the modules of `sources` it imports} (names that are not modules, e.g. the
    functions of `from X import f`, drop out here)."""
    return {name: {t for t in imports_of(name, src, is_pkg) if t in sources and t != name}
            for name, (src, is_pkg) in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """{module reachable from start: the module it was reached from} (start itself excluded)."""
    seen, todo = {}, [start]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen and nxt != start:
                seen[nxt] = node
                todo.append(nxt)
    return seen


def path_to(parents: dict[str, str], start: str, end: str) -> list[str]:
    path = [end]
    while path[-1] != start:
        path.append(parents[path[-1]])
    return path[::-1]


SOURCES = module_sources()
GRAPH = import_graph(SOURCES)
FAMILIES = sorted(name for name, (_, is_pkg) in SOURCES.items() if is_pkg and name != PACKAGE)


def test_the_families_are_found():
    # Guards the checks below against passing vacuously (a moved root, a renamed package).
    assert {"pallas_kernels.fp8_matmul", "pallas_kernels.ragged_paged_attention"} <= set(FAMILIES)
    assert GRAPH["pallas_kernels.fp8_matmul.triton"] >= {"pallas_kernels.fp8_matmul.common",
                                                         "pallas_kernels.gpu_info"}


def test_no_module_imports_mistral_jax():
    bad = {name: sorted(t for t in imports_of(name, src, is_pkg) if t.split(".")[0] == "mistral_jax")
           for name, (src, is_pkg) in SOURCES.items()}
    assert not {k: v for k, v in bad.items() if v}


def test_the_import_graph_has_no_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_do_not_import_their_dispatcher(family):
    members = [name for name in SOURCES if name.startswith(family + ".")]
    assert members, family
    for name in members:
        parents = reachable(GRAPH, name)
        assert family not in parents, f"{name} reaches {family}: " + " -> ".join(path_to(parents, name, family))


def test_the_checks_see_circles(tmp_path):
    # The analysis itself: relative imports resolve, `from package import name` is an edge to the
    # package, lazy imports count, and the circle a dispatcher's helper once made is found.
    pkg = tmp_path / "kern" / "fam"
    pkg.mkdir(parents=True)
    (tmp_path / "kern" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("def run():\n    from .kernel import k\n    return k\nHELPER = 1\n")
    (pkg / "kernel.py").write_text("from kern.fam import HELPER\nfrom ..util import u\n")
    (tmp_path / "kern" / "util.py").write_text("def u():\n    import mistral_jax.engine\n")
    sources = module_sources(tmp_path, "kern")
    graph = import_graph(sources)
    assert graph == {"kern": set(), "kern.fam": {"kern.fam.kernel"}, "kern.fam.kernel": {"kern.fam", "kern.util"},
                     "kern.util": set()}
    assert find_cycle(graph) in (["kern.fam", "kern.fam.kernel", "kern.fam"],
                                 ["kern.fam.kernel", "kern.fam", "kern.fam.kernel"])
    assert "mistral_jax.engine" in imports_of("kern.util", *sources["kern.util"])


def test_public_names_import_from_the_family_packages():
    from pallas_kernels import fp8_matmul as fm
    from pallas_kernels import ragged_paged_attention as rpa

    for module in (fm, rpa):
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, (module.__name__, missing)
    for name in ("fp8_matmul", "fp8_matmul_group", "fp8_swiglu", "quantize_input", "quantize_rows",
                 "quantize_weight", "fp8_matmul_reference", "fp8_matmul_xla", "pads_rows", "IMPLS",
                 "default_impl", "describe_impl", "GPU_TRITON_MAX_M", "E4M3_MAX"):
        assert name in fm.__all__, name
    for name in ("ragged_paged_attention", "ragged_paged_attention_reference", "attention_schedule",
                 "write_kv_pages", "MASK_VALUE", "IMPLS", "default_impl"):
        assert name in rpa.__all__, name


def test_importing_every_kernel_module_loads_no_mistral_jax():
    """At run time too (an import the ast cannot see, e.g. through importlib): importing every
    module of pallas_kernels, in a fresh interpreter, leaves no mistral_jax in sys.modules."""
    import pallas_kernels

    mods = [m.name for m in pkgutil.walk_packages(pallas_kernels.__path__, prefix="pallas_kernels.")]
    assert set(mods) == set(SOURCES) - {PACKAGE}
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except ImportError as e:\n        assert 'mistral_jax' not in str(e), (m, e)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] == 'mistral_jax']\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
