"""The OpenAI-compatible HTTP server: `python -m mistral_jax.serve`.

- protocol.py: the request and response bodies (pydantic, OpenAI's shapes) and error objects;
- bridge.py: the async bridge: one thread runs the engine loop, HTTP handlers submit requests
  and read their events, so requests from every client share the running batch;
- app.py: the FastAPI routes.
"""
