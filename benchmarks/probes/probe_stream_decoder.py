"""Probe: the host's cost of incremental detokenization per generated token (StreamDecoder.step),
and of one tokenizer decode by window length, for the bundled v3 SentencePiece and Tekken
tokenizers (issue 19: the host's share of a step grows with its rows).

    python benchmarks/probes/probe_stream_decoder.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import pathlib
import time


def main():
    import mistral_common

    from mistral_jax.tokenizer import StreamDecoder, load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    data = pathlib.Path(mistral_common.__file__).parent / "data"
    toks = {n: load_tokenizer(data / n) for n in ("mistral_instruct_tokenizer_240323.model.v3", "tekken_240911.json")}
    text = "The quick brown fox jumps over the lazy dog, naïve café 東京 " * 40
    for _ in range(args.rounds):
        for name, tok in toks.items():
            ids = tok.encode(text, add_bos=False)[:400]
            decodes = []
            for n in (1, 3, 8, 16, 24):
                t = time.perf_counter()
                for _ in range(1000):
                    tok.decode(ids[:n])
                decodes.append(f"{n}: {(time.perf_counter() - t) * 1e3:.1f}")
            t, steps = time.perf_counter(), 0
            for _ in range(5):
                dec = StreamDecoder(tok, prompt_ids=ids[:6])
                for i in ids:
                    dec.step(i)
                    steps += 1
            step_us = (time.perf_counter() - t) / steps * 1e6
            print(f"{name}: StreamDecoder.step {step_us:.1f} us a token; decode(n ids) us: {', '.join(decodes)}")


if __name__ == "__main__":
    main()
