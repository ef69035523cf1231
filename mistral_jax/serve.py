"""`python -m mistral_jax.serve`: the command's name for entrypoints/serve.py."""

import sys

from mistral_jax.entrypoints.serve import main

if __name__ == "__main__":
    sys.exit(main())
