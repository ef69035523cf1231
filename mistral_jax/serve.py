"""`python -m mistral_jax.serve [--model PATH] [--host 127.0.0.1] [--port 8000] ...`: the
OpenAI-compatible server (mistral_jax/server/), with every engine flag of `generate`.

With no --model it serves the embedded default model. Programs compile before the port opens
(--warmup, the default on an accelerator), so no request waits on a compile. SIGTERM stops
accepting, lets running requests finish (uvicorn's graceful shutdown) and exits 0."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from .engine_args import add_engine_args

    p = argparse.ArgumentParser(prog="python -m mistral_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    p.add_argument("--api-key", default=os.environ.get("MISTRAL_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MISTRAL_JAX_API_KEY, or none)")
    p.add_argument("--timeout-graceful-shutdown", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn

    from .distributed import kwargs_from_args
    from .engine_args import llm_kwargs
    from .server.app import create_app
    from .server.bridge import EngineClient, EngineStartError
    from .tokenizer import load_tokenizer

    # The engine runs in its own process (server/engine_process.py): its host work and this
    # process's HTTP work do not share a GIL. It loads the model and warms up before the port opens.
    try:
        bridge = EngineClient(llm_kwargs(args), kwargs_from_args(args))
    except EngineStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(bridge.info.tokenizer_source)
        app = create_app(bridge, tokenizer, args.served_model_name, args.api_key)
    except BaseException:
        bridge.shutdown()
        raise
    print(f"[serving {args.served_model_name or bridge.info.model_path} on http://{args.host}:{args.port}/v1]",
          file=sys.stderr, flush=True)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                    timeout_graceful_shutdown=args.timeout_graceful_shutdown))
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop accepting, let running requests finish, exit 0
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    # What is loaded by now (JAX, the tokenizer, the app) lives as long as the process: out of the
    # cyclic GC's full passes, each of which walked all of it with the event loop stopped (a CPU
    # profile under load: one pass of 160 ms; 3.8 ms with this).
    gc.freeze()
    try:
        server.run()
    finally:
        bridge.shutdown()  # idempotent after the app's own shutdown; covers a failed start (port taken)
    return 0


class _Server:
    """uvicorn's Server without its signal capture, which re-raises SIGTERM after the graceful
    shutdown (the process would then die of the signal instead of exiting 0)."""

    def __new__(cls, config):
        import contextlib

        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        return Server(config)


if __name__ == "__main__":
    sys.exit(main())
