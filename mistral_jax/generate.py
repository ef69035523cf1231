"""`python -m mistral_jax.generate`: the command's name for entrypoints/generate.py."""

from mistral_jax.entrypoints.generate import exit_without_teardown, main

if __name__ == "__main__":
    exit_without_teardown(main())
