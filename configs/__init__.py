"""Model shapes by name (`ModelConfig.named("mistral-small-2501")`, `--load-format dummy --config
NAME`): one JSON file per config. This folder installs as the package `mistral_jax.configs`
(pyproject.toml's package-dir), so wheels carry it; it holds no code."""
