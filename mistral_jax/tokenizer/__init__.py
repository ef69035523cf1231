"""Text <-> token ids: mistral-common for Mistral models, Hugging Face tokenizer.json and GGUF
vocabularies otherwise, chat templates, and incremental detokenization."""
