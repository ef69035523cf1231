"""The package as a user installs it: a wheel (not the editable checkout) in a fresh virtual
environment, run from a folder outside the source tree.

The venv is made without pip and without the system site-packages; a .pth line then adds the
system site-packages folder to sys.path, so JAX and the other dependencies come from there with
no network, while that folder's own .pth files are not run. One of them is the editable install's
finder for this checkout, which would otherwise answer for any mistral_jax module the wheel lacks
(and hide exactly the packaging bug this tests for). The wheel is built, offline, from a copy of
what it is made of, so the checkout gets no build/ folder.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def test_every_package_folder_is_a_package():
    """setup.py finds the packages by their __init__.py: a folder of modules without one would be
    missing from the wheel (the editable checkout would still import it)."""
    missing = sorted(str(d.relative_to(ROOT)) for top in ("mistral_jax", "pallas_kernels")
                     for d in [ROOT / top, *(ROOT / top).rglob("*")]
                     if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
                     and not (d / "__init__.py").is_file())
    assert not missing, f"add an __init__.py to {missing}"
    assert SETUPTOOLS["package-dir"] == {"mistral_jax.configs": "configs"}
    assert (ROOT / "configs" / "__init__.py").is_file() and list((ROOT / "configs").glob("*.json"))


def test_named_configs_come_from_the_package():
    from mistral_jax.config import ModelConfig, shipped_configs

    names = sorted(p.name.removesuffix(".json") for p in shipped_configs().iterdir() if p.name.endswith(".json"))
    assert names == sorted(p.stem for p in (ROOT / "configs").glob("*.json"))
    assert ModelConfig.named("tiny").dim == 64
    with pytest.raises(FileNotFoundError, match="known: .*mistral-small-2501"):
        ModelConfig.named("no-such-config")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A venv holding only the freshly built wheel; returns (its python, a work folder outside the tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("mistral_jax", "pallas_kernels", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(dist), str(src)], cwd=tmp)
    (wheel,) = dist.glob("mistral_jax_engine-*.whl")

    env_dir = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=tmp)
    python = env_dir / "bin" / "python"
    # the host's pip installs into the venv; the venv does not see the system packages yet, so pip
    # neither skips the wheel as installed nor touches the checkout's editable install
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)], cwd=tmp)
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp).strip())
    (site / "_system_site_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    work = tmp / "work"
    work.mkdir()
    return python, work


def run(cmd, cwd, timeout=300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["JAX_PLATFORMS"] = "cpu"
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.slow
def test_every_module_imports_from_the_venv(venv):
    python, work = venv
    out = run([python, "-c", """
import importlib, pkgutil, sys
import mistral_jax, pallas_kernels
for pkg in (mistral_jax, pallas_kernels):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
ours = {n: m.__file__ for n, m in sys.modules.items() if n.split(".")[0] in ("mistral_jax", "pallas_kernels")}
outside = {n: f for n, f in ours.items() if f and not f.startswith(sys.prefix)}
assert not outside, outside
from mistral_jax.config import ModelConfig, shipped_configs
ModelConfig.named("mistral-small-2501")
print(len(ours), mistral_jax.__file__, shipped_configs())
"""], cwd=work)
    count, init, configs = out.split()
    assert int(count) > 40
    assert not init.startswith(str(ROOT)) and Path(configs).parent == Path(init).parent


@pytest.mark.slow
def test_generate_runs_the_default_model(venv):
    python, work = venv
    out = run([python, "-m", "mistral_jax.generate", "--prompt", "Say hi.", "--max-tokens", "3", "--no-warmup"],
              cwd=work)
    assert out.strip()


@pytest.mark.slow
def test_serve_help_with_a_named_dummy_config(venv):
    python, work = venv
    out = run([python, "-m", "mistral_jax.serve", "--load-format", "dummy", "--config", "mistral-small-2501", "--help"],
              cwd=work)
    assert "--load-format" in out
