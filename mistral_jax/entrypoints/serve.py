"""`python -m mistral_jax.serve [--model PATH] [--host 127.0.0.1] [--port 8000] ...`: the
OpenAI-compatible server (mistral_jax/server/), with every engine flag of `generate`.

With no --model it serves the embedded default model. Programs compile before the port opens
(--warmup is the default on every backend: a server is a long-running process, and a burst must
not wait on compiles), so no request waits on a compile.

Exit codes, for supervisors: SIGTERM stops accepting, lets running requests finish within
--timeout-graceful-shutdown, stops the engine (killed if it does not stop within 5 s more) and
exits 0. If the engine process dies, or an HTTP process does, running streams end with an error
event and the server exits 1 within seconds (a supervisor or Kubernetes restarts it). A port
another server holds, or bad settings, exit 2 at once."""

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
    from mistral_jax.engine.args import add_cli_args, normalize_flags

    p = argparse.ArgumentParser(prog="python -m mistral_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as vLLM's `serve MODEL` (the same as --model)")
    add_cli_args(p)  # every engine setting; --seed among them (the engine's, vLLM's meaning)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the model as given, e.g. its Hub repo id)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's flag: tool_choice 'auto' lets the model decide to call tools. Always on here "
                        "(tool calls are parsed in the model's own format); accepted for vLLM's command lines")
    p.add_argument("--tool-call-parser", default=None,
                   help="vLLM's flag: the tool-call format. 'mistral' for Mistral tokenizers (tekken.json, "
                        "tokenizer.model.v*), 'hermes' for others (<tool_call> blocks); the model's tokenizer decides, "
                        "and a parser that does not match it is an error")
    p.add_argument("--api-key", default=os.environ.get("MISTRAL_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $MISTRAL_JAX_API_KEY, or none)")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without the API key (for a Prometheus scraper that sends none)")
    p.add_argument("--timeout-graceful-shutdown", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    p.add_argument("--api-server-count", type=int, default=None,
                   help="HTTP processes in front of the one engine process (each parses, tokenizes and streams "
                        "its share of the connections; more keep time to first token down under bursts of "
                        "many requests). Default: one per 4 CPU cores, at most 4")
    args = p.parse_args(normalize_flags(list(sys.argv[1:] if argv is None else argv)))
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            p.error(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    if args.served_model_name is None:  # as given: a Hub id stays a Hub id (vLLM's default)
        args.served_model_name = args.model if args.model is not None else DEFAULT_SERVED_NAME
    if args.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
        p.error(f"--tool-call-parser {args.tool_call_parser!r}: this server parses {TOOL_CALL_PARSERS} "
                "(the model's tokenizer decides which)")
    return args


TOOL_CALL_PARSERS = ("mistral", "hermes")
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"  # the embedded demo model's name, not its file's path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.warmup is None:
        args.warmup = True  # every backend, a CPU too; --no-warmup starts faster
    if args.api_server_count is None:
        # One HTTP process parses a burst of requests one at a time, which adds to each one's time
        # to first token; a few processes share the burst.
        args.api_server_count = max(1, min(4, len(os.sched_getaffinity(0)) // 4))
    if args.api_server_count < 1:
        print(f"error: --api-server-count {args.api_server_count}: give 1 or more", file=sys.stderr)
        return 2
    from mistral_jax.engine.args import EngineArgs
    from mistral_jax.entrypoints.server.bridge import EngineClient, EngineStartError, start_engine

    try:  # every setting checked here, before the port is taken and the engine process starts
        engine_args = EngineArgs.from_cli_args(args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

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
    # Bound is not owned: two sockets that both allow address reuse bind one port while neither
    # listens yet (a second server started while the first loads), and SO_REUSEPORT sockets of
    # one user share a port (the kernel would split the traffic between two servers). A lock per
    # port, held for this process's life, makes the second server fail here, whatever the layout.
    try:
        port_lock = _claim_port(port)
    except PortTaken as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The engine runs in its own process (server/engine_process.py): its host work and the HTTP
    # processes' work do not share a GIL. It loads the model and warms up before the port opens.
    process, pipes = start_engine(engine_args, args.api_server_count)
    metrics_dir = None
    if args.api_server_count > 1:  # every HTTP process's counters, summed on /metrics (not the engine's)
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mistral-jax-metrics-")
    try:
        try:
            bridge = EngineClient(pipes[0], process)
        except EngineStartError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
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
        if process.is_alive():  # however we got here: never left behind (nor waited on at exit)
            process.kill()
            process.join(5)
        port_lock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def front_main(args, front: int, pipes, sock) -> None:
    """Another HTTP process (--api-server-count): the same app on its own socket of the shared
    port, talking to the engine over its own pipes. It exits when the engine does."""
    from mistral_jax.entrypoints.server import name_process
    from mistral_jax.entrypoints.server.bridge import EngineClient, EngineStartError

    name_process(f"mj-http-{front}")
    try:
        bridge = EngineClient(pipes, front=front)
    except EngineStartError:
        sys.exit(2)  # the first HTTP process reports why
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the first, which passes SIGTERM on
    sys.exit(_serve(args, bridge, sock))


def _serve(args, bridge, sock) -> int:
    """Run one HTTP process's server until SIGTERM (0, drained) or until the engine or another
    HTTP process dies (1: the running streams end with an error event first)."""
    import uvicorn

    from mistral_jax.entrypoints.server.app import create_app
    from mistral_jax.tokenizer import MistralTokenizer, load_tokenizer

    try:
        tokenizer = load_tokenizer(bridge.info.tokenizer_source, bridge.info.tokenizer_mode)
        model_format = "mistral" if isinstance(tokenizer, MistralTokenizer) else "hermes"
        if args.tool_call_parser not in (None, model_format):
            print(f"error: --tool-call-parser {args.tool_call_parser} does not match this model, whose tool calls "
                  f"are in the {model_format} format: pass --tool-call-parser {model_format} or leave it out",
                  file=sys.stderr)
            bridge.shutdown()
            return 2
        app = create_app(bridge, tokenizer, args.served_model_name, args.api_key,
                         public_metrics=args.public_metrics)
    except BaseException:
        bridge.shutdown()
        raise
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.timeout_graceful_shutdown)
    server = _Server(config)
    failure: list[str] = []

    def stop(*_):  # stop accepting, let running requests finish, exit 0
        server.should_exit = True
        for companion in bridge.companions:
            if companion.pid is not None and companion.is_alive():
                os.kill(companion.pid, signal.SIGTERM)

    def fail(why: str) -> None:  # the engine or an HTTP process died: end every stream, exit 1
        if not failure and not server.should_exit:
            failure.append(why)
            print(f"error: {why}; the server exits (code 1) so that its supervisor can restart it",
                  file=sys.stderr, flush=True)
            config.timeout_graceful_shutdown = min(args.timeout_graceful_shutdown, 5.0)  # their streams have ended
            stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, stop)
    bridge.on_stop = fail

    def watch_companions(loop):  # front 0: another HTTP process that dies takes its clients with it
        for companion in bridge.companions:
            def ended(c=companion):
                loop.remove_reader(c.sentinel)
                c.join(1)
                fail(f"HTTP process {c.name} exited (code {c.exitcode})")
            loop.add_reader(companion.sentinel, ended)

    app.state.on_startup.append(watch_companions)

    # What is loaded by now (JAX, the tokenizer, the app) lives as long as the process: out of the
    # cyclic GC's full passes, each of which walked all of it with the event loop stopped (a pass
    # of a hundred milliseconds and more under load, a few without).
    gc.freeze()
    try:
        server.run(sockets=[sock])
    finally:
        bridge.shutdown()  # idempotent after the app's own shutdown; covers a failed start
    return 1 if failure else 0


class PortTaken(RuntimeError):
    pass


def _claim_port(port: int):
    """An exclusive lock on a file named by the port, held (the returned file open) for this
    process's life; the kernel drops it when the process ends, however it ends."""
    import fcntl

    folder = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(folder, f"mistral-jax-port-{port}.lock")
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise PortTaken(f"port {port} is already served by another mistral_jax server (pid {holder}; "
                        f"lock {path}): stop it or pick another --port") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


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
