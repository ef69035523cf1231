"""`python -m mistral_jax.serve [--model PATH] [--host 127.0.0.1] [--port 8000] ...`: the
OpenAI-compatible server (mistral_jax/server/), with every engine flag of `generate`.

With no --model it serves the embedded default model. Programs compile before the port opens
(--warmup, the default on an accelerator), so no request waits on a compile. SIGTERM stops
accepting, lets running requests finish (uvicorn's graceful shutdown) and exits 0."""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile


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
    p.add_argument("--api-server-count", type=int, default=None,
                   help="HTTP processes in front of the one engine process (each parses, tokenizes and streams "
                        "its share of the connections; more keep time to first token down under bursts of "
                        "many requests). Default: one per 4 CPU cores, at most 4")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.api_server_count is None:
        # One HTTP process takes a burst of requests one at a time (~1 ms each on an H200's host): 64
        # at once added ~22 ms to the time to first token over the engine's own; 4 processes, none.
        args.api_server_count = max(1, min(4, len(os.sched_getaffinity(0)) // 4))
    if args.api_server_count < 1:
        print(f"error: --api-server-count {args.api_server_count}: give 1 or more", file=sys.stderr)
        return 2
    from .distributed import kwargs_from_args
    from .engine_args import llm_kwargs
    from .server.bridge import EngineClient, EngineStartError, start_engine

    # The port first: a taken one is an error now, not after the model has loaded. Bound, not yet
    # listening: until the server runs, a client is refused rather than left waiting.
    try:
        sockets = [_bind(args.host, args.port, shared=args.api_server_count > 1)]
        port = sockets[0].getsockname()[1]  # --port 0: the one the kernel chose, for every process
        sockets += [_bind(args.host, port, shared=True) for _ in range(1, args.api_server_count)]
    except OSError as e:
        print(f"error: cannot bind {args.host}:{args.port} ({e.strerror}): pick another --port or --host",
              file=sys.stderr)
        return 2
    # The engine runs in its own process (server/engine_process.py): its host work and the HTTP
    # processes' work do not share a GIL. It loads the model and warms up before the port opens.
    process, pipes = start_engine(llm_kwargs(args), kwargs_from_args(args), args.api_server_count)
    metrics_dir = None
    if args.api_server_count > 1:  # every HTTP process's counters, summed on /metrics (not the engine's)
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mistral-jax-metrics-")
    try:
        try:
            bridge = EngineClient(pipes[0], process)
        except EngineStartError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        ctx = multiprocessing.get_context("spawn")
        for front in range(1, args.api_server_count):
            companion = ctx.Process(target=front_main, name=f"mistral-jax-api-{front}",
                                    args=(args, front, pipes[front], sockets[front]))
            companion.start()
            bridge.companions.append(companion)
        for end in (e for pair in pipes[1:] for e in pair):
            end.close()
        print(f"[serving {args.served_model_name or bridge.info.model_path} on http://{args.host}:{args.port}/v1"
              f"{f' ({args.api_server_count} HTTP processes)' if args.api_server_count > 1 else ''}]",
              file=sys.stderr, flush=True)
        return _serve(args, bridge, sockets[0])
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def front_main(args, front: int, pipes, sock) -> None:
    """Another HTTP process (--api-server-count): the same app on its own socket of the shared
    port, talking to the engine over its own pipes. It exits when the engine does."""
    from .server.bridge import EngineClient, EngineStartError

    try:
        bridge = EngineClient(pipes, front=front)
    except EngineStartError:
        sys.exit(2)  # the first HTTP process reports why
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the first, which passes SIGTERM on
    sys.exit(_serve(args, bridge, sock))


def _serve(args, bridge, sock) -> int:
    """Run one HTTP process's server until SIGTERM (or the engine goes away); 0 when it drained."""
    import uvicorn

    from .server.app import create_app
    from .tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(bridge.info.tokenizer_source)
        app = create_app(bridge, tokenizer, args.served_model_name, args.api_key)
    except BaseException:
        bridge.shutdown()
        raise
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                    timeout_graceful_shutdown=args.timeout_graceful_shutdown))

    def stop(*_):  # stop accepting, let running requests finish, exit 0
        server.should_exit = True
        for companion in bridge.companions:
            if companion.pid is not None and companion.is_alive():
                os.kill(companion.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, stop)
    if bridge.process is None:
        bridge.on_stop = stop  # an HTTP process without its engine has nothing to serve
    # What is loaded by now (JAX, the tokenizer, the app) lives as long as the process: out of the
    # cyclic GC's full passes, each of which walked all of it with the event loop stopped (a CPU
    # profile under load: one pass of 160 ms; 3.8 ms with this).
    gc.freeze()
    try:
        server.run(sockets=[sock])
    finally:
        bridge.shutdown()  # idempotent after the app's own shutdown; covers a failed start
    return 0


def _bind(host: str, port: int, shared: bool) -> socket.socket:
    """A TCP socket bound to host:port. shared: each HTTP process binds its own with SO_REUSEPORT,
    and the kernel spreads new connections over them (one shared socket would let whichever
    process wakes first accept a whole burst of connections)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


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
