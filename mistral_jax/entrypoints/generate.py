"""Command line: `python -m mistral_jax.generate [--model PATH] [--prompt TEXT | --chat] ...`

Streams the answer to stdout and a timing summary (time to first token, tokens/s) to stderr.
`--prompt` is sent as one user turn through the model's chat template (these are instruct
models); `--raw` sends it as plain text. `--chat` is an interactive multi-turn session.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mistral_jax import IMPORTED_AT
from mistral_jax.engine.args import EngineArgs, add_cli_args, normalize_flags
from mistral_jax.engine.build import join_processes
from mistral_jax.entrypoints.llm import LLM
from mistral_jax.runtime import distributed
from mistral_jax.sample.sampling import SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mistral_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(p, exclude=("seed",))  # --seed here is the request's (below), not the engine's
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help="one request (default: 'What is the capital of France?')")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
    p.add_argument("--raw", action="store_true", help="send --prompt as plain text, without the chat template")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", dest="request_seed", type=int, default=None, help="the request's sampling seed")
    p.add_argument("--verbose", action="store_true", help="print where the start-up time went")
    return p.parse_args(normalize_flags(list(sys.argv[1:] if argv is None else argv)))


def stream_reply(llm: LLM, prompt, params: SamplingParams) -> str:
    """Print one reply as it streams; return its text. Timing goes to stderr."""
    t0 = time.perf_counter()
    first = None
    n = 0
    text = []
    for ev in llm.stream([prompt], params):
        n += 1
        if first is None:
            first = time.perf_counter()
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            text.append(ev.text)
    end = time.perf_counter()
    sys.stdout.write("\n")
    sys.stdout.flush()
    decode = f"{(n - 1) / (end - first):.1f} tokens/s" if n > 1 and end > first else "n/a"
    if distributed.is_main_process():
        print(f"[{n} tokens; first token after {first - t0:.2f}s (prompt + compile); decode {decode}]",
              file=sys.stderr)
    return "".join(text)


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    try:
        engine_args = EngineArgs.from_cli_args(args)  # every setting checked before anything starts
        if join_processes(engine_args):
            if args.chat:
                raise ValueError("--chat reads one terminal, but this run has several processes: use --prompt")
            if not distributed.is_main_process():  # every process computes; process 0 alone shows the text
                sys.stdout = open(os.devnull, "w")
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.request_seed)
        llm = LLM.from_engine_args(engine_args)
    except (ValueError, FileNotFoundError, TypeError, distributed.DistributedInitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if distributed.is_main_process():
        print(f"[model {llm.model_path}: {llm.config.n_layers} layers, loaded in {llm.load_seconds:.1f}s]",
              file=sys.stderr)
        if args.verbose:
            stages = [("imports (jax, flax, ...)", started - IMPORTED_AT), *llm.timings.items()]
            print("[start-up: " + ", ".join(f"{name} {s:.2f}s" for name, s in stages) + "]", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if not args.chat:
        text = args.prompt if args.prompt is not None else "What is the capital of France?"
        if args.raw:
            prompt = text
        else:
            ids = llm.tokenizer.encode_chat(system + [{"role": "user", "content": text}])
            prompt = {"prompt_token_ids": ids}
        try:
            stream_reply(llm, prompt, params)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    messages = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            reply = stream_reply(llm, {"prompt_token_ids": llm.tokenizer.encode_chat(messages)}, params)
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def exit_without_teardown(code: int) -> None:
    """Everything is printed and every compiled program already sits in the persistent cache:
    skip the interpreter's teardown of JAX's backend (0.7 s of a 6-s run on a 2-core CPU)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
