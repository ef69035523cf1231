"""The front doors: the Python API (llm.py), the command line (generate.py, convert.py, cli.py)
and the OpenAI-compatible HTTP server (serve.py, server/)."""
