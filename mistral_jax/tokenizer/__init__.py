"""Text <-> token ids: mistral-common for Mistral models, Hugging Face tokenizer.json and GGUF
vocabularies otherwise, chat templates, and incremental detokenization.

- base.py: the `Tokenizer` interface, `TokenizerError`, OpenAI's message roles
- mistral.py: `MistralTokenizer`, mistral-common's tokenizers (prompts always through it)
- hf.py: `HFTokenizer`, a tokenizers.Tokenizer with the model's jinja chat template
- gguf.py: a GGUF file's vocabulary rebuilt as a tokenizers.Tokenizer
- load.py: `load_tokenizer`, which file a model path names per tokenizer_mode
- stream.py: `StreamDecoder`, text from generated ids one token at a time
- tool_prompt.py: tool definitions as prompt text, for chat templates with no place for them

Tool calls (their types, parsing and grammars) are mistral_jax.tool_calls, the layer above.
Importing this package never imports JAX: the server's HTTP processes use it."""

from mistral_jax.tokenizer.base import Tokenizer, TokenizerError, openai_roles
from mistral_jax.tokenizer.hf import GGUFTokenizer, HFTokenizer
from mistral_jax.tokenizer.load import TOKENIZER_MODES, load_tokenizer
from mistral_jax.tokenizer.mistral import MistralTokenizer
from mistral_jax.tokenizer.stream import StreamDecoder

__all__ = ["GGUFTokenizer", "HFTokenizer", "MistralTokenizer", "StreamDecoder", "TOKENIZER_MODES", "Tokenizer",
           "TokenizerError", "load_tokenizer", "openai_roles"]
