"""The package list, the one setting pyproject.toml cannot say: every package folder under
mistral_jax/ and pallas_kernels/, found as they come, plus `mistral_jax.configs`, which is the
repo's top-level configs/ folder (pyproject.toml's package-dir maps it and ships its *.json)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["mistral_jax", "mistral_jax.*", "pallas_kernels", "pallas_kernels.*"]),
                "mistral_jax.configs"])
