"""Sampling: vLLM-style SamplingParams, their per-row device arrays, and one jittable `sample`.

Every per-request setting travels as a [batch] array, so a single compiled step serves any mix
of greedy and sampled rows, penalties and filters without recompiling.

Order (as in vLLM's v1 Sampler, whose logit-bias processor runs right before its penalties):
logit bias -> penalties -> temperature -> top-k -> top-p -> min-p -> draw. Greedy rows
(temperature < 1e-5) take the argmax of the biased, penalized logits (a bias of -100 bans a
token there too). Filters keep ties: top-k keeps every token whose logit equals the k-th
largest, top-p every token tied with the last one of the kept prefix, so the kept set never
depends on how a sort orders equal values.

Randomness: row b at generation step s draws with fold_in(fold_in(fold_in(key(0), seed_hi),
seed_lo), s), so a seeded request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mistral_jax.runtime.sharding import LOGICAL_RULES, current_mesh, mesh_size

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5  # below this, temperature sampling is argmax in all but name
# Bounds of the values that reach the device as float32: each stays finite and nonzero there
# (a temperature or repetition penalty that overflows float32, or rounds to 0, would turn
# logits into inf or NaN). 100 is already far past any useful setting: at temperature 100 the
# draw is nearly uniform, and a penalty of 100 (or 1/100) all but bans (or forces) a token.
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# Stop strings are searched on the host after every token (each one over its own length of
# text) and the longest holds that much text back from a stream: both bounded.
MAX_STOP_STRINGS = 64
MAX_STOP_LENGTH = 1024  # characters per stop string
# logit_bias: OpenAI's range of a bias, and a fixed number of entries per request, so a step's
# bias arrays have one shape ([rows, MAX_LOGIT_BIAS]) whatever the requests ask: no new program.
MAX_LOGIT_BIAS = 300
MAX_LOGIT_BIAS_VALUE = 100.0
INT32_MAX = 2**31 - 1

_HOST_RNG = np.random.default_rng()  # seeds for requests that give none
# A row of no logit bias (SamplingParams.packed_logit_bias): every id -1, every bias 0.0.
_NO_BIAS_ROW = np.concatenate([np.full(MAX_LOGIT_BIAS, -1, np.int32), np.zeros(MAX_LOGIT_BIAS, np.int32)])
_NO_BIAS_ROW.flags.writeable = False


# ---- user-facing parameters -----------------------------------------------------------------


@dataclasses.dataclass
class SamplingParams:
    """Per-request settings, with vLLM's names and defaults.

    Every value is checked here, where it enters: a bad one raises a ValueError naming the
    field, the allowed range and the fix. Ranges (see the constants above):
    n 1; temperature [0, MAX_TEMPERATURE] (0 = greedy); top_p (0, 1]; top_k any integer >= -1
    (0 or -1 = off; a value >= the vocabulary keeps every token, so RequestLimits.check turns it
    off); min_p [0, 1]; repetition_penalty [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY];
    presence_penalty, frequency_penalty [-2, 2]; seed any integer, taken modulo 2**64 (so -1
    draws as 2**64 - 1), or None; stop up to MAX_STOP_STRINGS non-empty strings of at most
    MAX_STOP_LENGTH characters; stop_token_ids integers >= 0 (RequestLimits.check: below the
    vocabulary size); logit_bias None or a mapping of at most MAX_LOGIT_BIAS token ids (ints or
    decimal strings, as JSON keys are; >= 0, no id twice; RequestLimits.check: below the
    vocabulary size) to a bias in [-MAX_LOGIT_BIAS_VALUE, MAX_LOGIT_BIAS_VALUE], stored as
    {int: float} or None (empty), each added to its token's logit before anything else;
    max_tokens >= 1 or None (RequestLimits.check: within the context); logprobs,
    prompt_logprobs None or [0, MAX_LOGPROBS]. Numbers are stored as Python int and float."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[int, float] | None = None  # OpenAI's: {token id: bias added to its logit}
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: Any = None  # a structured.StructuredOutputs: the output must match it

    def __post_init__(self):
        if not _is_int(self.n) or self.n != 1:
            _bad("n", self.n, "1 (one completion per request)",
                 "send the prompt several times with different seeds to get several completions")
        self.n = 1
        self._real("temperature", 0, MAX_TEMPERATURE, f"0 <= temperature <= {MAX_TEMPERATURE:g} (0 = greedy)",
                   "use 0 for greedy decoding or a positive value such as 0.7")
        self._real("top_p", 0, 1, "0 < top_p <= 1", "use 1.0 to turn top-p off", low_open=True)
        if not _is_int(self.top_k) or self.top_k < -1:
            _bad("top_k", self.top_k, "an integer >= 1, or 0 / -1 for off", "use 0 or -1 to turn top-k off")
        self.top_k = int(self.top_k)
        self._real("min_p", 0, 1, "0 <= min_p <= 1", "use 0.0 to turn min-p off")
        self._real("repetition_penalty", MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY,
                   f"{MIN_REPETITION_PENALTY:g} <= repetition_penalty <= {MAX_REPETITION_PENALTY:g}",
                   "use 1.0 for no penalty, values > 1 discourage repeats")
        for name in ("presence_penalty", "frequency_penalty"):
            self._real(name, -2, 2, f"-2 <= {name} <= 2", "use 0.0 for no penalty")
        if self.seed is not None:
            if not _is_int(self.seed):
                _bad("seed", self.seed, "an integer (taken modulo 2**64) or None",
                     "pass an int, or None for a random seed")
            self.seed = int(self.seed)
        self.stop = _as_list("stop", [self.stop] if isinstance(self.stop, str) else self.stop,  # vLLM normalizes alike
                             "a non-empty string or a list of them")
        if not all(isinstance(s, str) and s for s in self.stop):
            _bad("stop", self.stop, "a non-empty string or a list of them", "remove empty or non-string entries")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in self.stop):
            _bad("stop", self.stop, f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters",
                 "send fewer or shorter stop strings")
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids, "a list of token ids >= 0")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            _bad("stop_token_ids", self.stop_token_ids, "a list of token ids >= 0", "pass integer token ids")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self.logit_bias = _checked_logit_bias(self.logit_bias)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "True or False", "pass a bool")
        if self.max_tokens is not None:
            if not _is_int(self.max_tokens) or self.max_tokens < 1:
                _bad("max_tokens", self.max_tokens, "an integer >= 1, or None (up to the context length)",
                     "ask for at least 1 token")
            self.max_tokens = int(self.max_tokens)
        if self.structured_outputs is not None:
            from mistral_jax.sample.structured import StructuredOutputs

            if not isinstance(self.structured_outputs, StructuredOutputs):
                _bad("structured_outputs", self.structured_outputs, "None or a StructuredOutputs",
                     "pass StructuredOutputs(json=schema), (regex=...), (choice=[...]) or (grammar=...)")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                if not _is_int(v) or not 0 <= v <= MAX_LOGPROBS:
                    _bad(name, v, f"None or an integer in [0, {MAX_LOGPROBS}]",
                         f"use 0 for the chosen token only, at most {MAX_LOGPROBS} alternatives")
                setattr(self, name, int(v))

    def _real(self, field: str, lo: float, hi: float, allowed: str, fix: str, low_open: bool = False) -> None:
        """Check a real-valued field against [lo, hi] (or (lo, hi]) and store it as a float."""
        value = getattr(self, field)
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        # Compared as the value itself: NaN fails every comparison, infinities fail the finite
        # bounds, and a huge int is compared exactly (float(10**400) would overflow).
        ok = ok and (lo < value <= hi if low_open else lo <= value <= hi)
        if not ok:
            _bad(field, value, allowed, fix)
        setattr(self, field, float(value))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def packed_logit_bias(self) -> np.ndarray:
        """logit_bias as a row of a batch's bias arrays: [2 * MAX_LOGIT_BIAS] i32, the token ids
        (-1 = padding), then the biases' f32 bits (0 = padding). Built once per dict and kept: a
        step packs every running request's row, and a 300-entry dict made into arrays at every
        step would cost the host tens of microseconds a row. Rebuilt when the field is given a
        new dict (the engine runs checked copies, which nothing changes in place)."""
        bias = self.logit_bias or {}
        cached = self.__dict__.get("_packed_logit_bias")
        if cached is None or cached[0] is not bias:
            row = _NO_BIAS_ROW.copy()
            row[: len(bias)] = np.fromiter(bias.keys(), np.int32, len(bias))  # an id past int32 raises
            row[MAX_LOGIT_BIAS : MAX_LOGIT_BIAS + len(bias)] = np.fromiter(bias.values(), np.float32,
                                                                           len(bias)).view(np.int32)
            cached = self.__dict__["_packed_logit_bias"] = (bias, row)
        return cached[1]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


_DECIMAL = re.compile(r"[0-9]+")  # a token id as a JSON key: ASCII digits only


def _checked_logit_bias(bias) -> dict[int, float] | None:
    """SamplingParams.logit_bias -> {token id: bias} (None when empty), or a ValueError naming
    the first bad entry. Keys are ints or decimal strings (JSON object keys are strings); two
    keys naming one id ("5" and 5, "05") are refused rather than one silently winning."""
    if bias is None:
        return None
    allowed = (f"a mapping of at most {MAX_LOGIT_BIAS} token ids (ints or decimal strings) to a bias in "
               f"[-{MAX_LOGIT_BIAS_VALUE:g}, {MAX_LOGIT_BIAS_VALUE:g}]")
    if not isinstance(bias, Mapping):
        _bad("logit_bias", bias, allowed, 'pass e.g. {"1234": -100} to ban token 1234')
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"SamplingParams.logit_bias has {len(bias)} entries: allowed is {allowed}; "
                         f"bias at most {MAX_LOGIT_BIAS} tokens")
    checked: dict[int, float] = {}
    for key, value in bias.items():
        token = _token_id(key)
        if token is None:
            _bad("logit_bias", {key: value}, allowed, "key each bias by a token id >= 0")
        if token in checked:
            _bad("logit_bias", {key: value}, allowed, f"token id {token} is given twice: give it once")
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (ok and -MAX_LOGIT_BIAS_VALUE <= value <= MAX_LOGIT_BIAS_VALUE):  # NaN fails too
            _bad("logit_bias", {key: value}, allowed,
                 f"use -{MAX_LOGIT_BIAS_VALUE:g} to ban a token, {MAX_LOGIT_BIAS_VALUE:g} to force it")
        checked[token] = float(value)
    return checked or None


def _token_id(key) -> int | None:
    """A logit_bias key as a token id >= 0: an int, or a string of ASCII digits; else None."""
    if _is_int(key):
        return int(key) if key >= 0 else None
    if isinstance(key, str) and _DECIMAL.fullmatch(key):
        try:
            return int(key)
        except ValueError:  # past Python's 4300 digits: no vocabulary's id
            return None
    return None


def _as_list(field: str, value, allowed: str) -> list:
    """None -> [], any other iterable (not a string or bytes) -> a list of its items."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        _bad(field, value, allowed, "pass a list")
    try:
        return list(value)
    except TypeError:
        _bad(field, value, allowed, "pass a list")


def _bad(field: str, value, allowed: str, fix: str):
    raise ValueError(f"SamplingParams.{field}={show(value)} is invalid: allowed is {allowed}; {fix}")


def show(value, limit: int = 80) -> str:
    """A bad value as an error message quotes it: a huge integer by its size (a client's
    4000-digit number is not echoed whole, and one past Python's 4300 digits has no repr at
    all), anything else as its repr, cut to `limit` characters."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)).bit_length() > 128:
        return f"{'-' if value < 0 else ''}~10**{round(math.log10(abs(int(value))))}"
    try:
        text = repr(value)
    except ValueError:  # e.g. a list holding such an integer
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- device-side arrays ---------------------------------------------------------------------


@flax.struct.dataclass
class SamplingArrays:
    """SamplingParams of a batch as [batch] arrays (a pytree: pass it through jit as data)."""

    temperature: jax.Array  # [batch] f32, 1.0 on greedy rows (never divided by 0)
    top_k: jax.Array  # [batch] i32, 0 = off
    top_p: jax.Array  # [batch] f32, 1.0 = off
    min_p: jax.Array  # [batch] f32, 0.0 = off
    repetition_penalty: jax.Array  # [batch] f32
    presence_penalty: jax.Array  # [batch] f32
    frequency_penalty: jax.Array  # [batch] f32
    greedy: jax.Array  # [batch] bool
    seed: jax.Array  # [batch, 2] u32: (high, low) 32 bits of the 64-bit seed
    # [batch, ceil(vocab / 32)] i32 bitmask of the tokens a grammar allows (bit t % 32 of word
    # t // 32; -1 = every token: unconstrained rows). None: no request in this program constrains.
    allowed: jax.Array | None = None
    # logit_bias, MAX_LOGIT_BIAS entries a row: bias_ids [batch, MAX_LOGIT_BIAS] i32 token ids
    # (-1 = padding), bias_values [batch, MAX_LOGIT_BIAS] f32 (0.0 on padding). None: no row has a
    # bias (the engine's step always has them, all padding then: step_inputs.py).
    bias_ids: jax.Array | None = None
    bias_values: jax.Array | None = None

    @classmethod
    def from_params(cls, params: list[SamplingParams], pad_to: int | None = None,
                    allowed: jax.Array | None = None) -> SamplingArrays:
        """One row per request, then greedy padding rows up to pad_to. Unseeded rows get a fresh
        random seed here, on the host. allowed: the rows' grammar bitmask (structured.py).
        NumPy arrays: the engine moves them to the device with the step's other inputs in one
        transfer (one transfer per field costs the host milliseconds per step: step_inputs.py)."""
        batch = len(params) if pad_to is None else pad_to
        if batch < len(params):
            raise ValueError(f"pad_to={pad_to} is smaller than the {len(params)} requests: "
                             f"pass pad_to >= {len(params)}")
        pad = [SamplingParams(temperature=0.0, seed=0)] * (batch - len(params))
        rows = list(params) + pad
        greedy = np.array([p.greedy for p in rows])
        # Greedy rows get neutral filters: a batch of only greedy rows then skips the sort.
        col = lambda f, dtype, neutral: np.array([neutral if p.greedy else f(p) for p in rows], dtype)
        seeds = [int(_HOST_RNG.integers(2**64, dtype=np.uint64) if p.seed is None else p.seed) % 2**64
                 for p in rows]
        bias_ids, bias_values = _bias_rows(rows)
        return cls(
            temperature=col(lambda p: p.temperature, np.float32, 1.0),
            # Any top_k >= the vocabulary keeps every token: capped so it always fits int32.
            top_k=col(lambda p: min(max(p.top_k, 0), INT32_MAX), np.int32, 0),
            top_p=col(lambda p: p.top_p, np.float32, 1.0),
            min_p=col(lambda p: p.min_p, np.float32, 0.0),
            repetition_penalty=np.array([p.repetition_penalty for p in rows], np.float32),
            presence_penalty=np.array([p.presence_penalty for p in rows], np.float32),
            frequency_penalty=np.array([p.frequency_penalty for p in rows], np.float32),
            greedy=greedy,
            seed=np.array([(s >> 32, s & 0xFFFFFFFF) for s in seeds], np.uint32).reshape(batch, 2),
            allowed=allowed,
            bias_ids=bias_ids,
            bias_values=bias_values,
        )


def _bias_rows(rows: list[SamplingParams]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The rows' logit_bias as (ids [batch, MAX_LOGIT_BIAS] i32, -1 = padding; values [batch,
    MAX_LOGIT_BIAS] f32, 0.0 on padding), or (None, None) when no row has one. Both are views of
    one array: padding rows broadcast, then each biased row's packed_logit_bias copied in."""
    if not any(p.logit_bias for p in rows):
        return None, None
    packed = np.empty((len(rows), 2 * MAX_LOGIT_BIAS), np.int32)  # [batch, 2 * MAX_LOGIT_BIAS]
    packed[:] = _NO_BIAS_ROW
    for r, p in enumerate(rows):
        if p.logit_bias:
            packed[r] = p.packed_logit_bias()
    return packed[:, :MAX_LOGIT_BIAS], packed[:, MAX_LOGIT_BIAS:].view(np.float32)


@flax.struct.dataclass
class SampleResult:
    tokens: jax.Array  # [batch] i32
    logprob: jax.Array  # [batch] f32: the chosen token under log_softmax(raw logits)
    top_ids: jax.Array | None = None  # [batch, num_logprobs] i32, raw distribution
    top_logprobs: jax.Array | None = None  # [batch, num_logprobs] f32


# ---- penalty state --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("vocab",))
def init_penalty_state(prompt_ids: jax.Array, prompt_lens: jax.Array, vocab: int):
    """prompt_ids: [batch, seq] right-padded, prompt_lens: [batch].
    Returns (output_counts [batch, vocab] i32, all zero; seen_mask [batch, vocab] bool, the prompt)."""
    batch, seq = prompt_ids.shape
    valid = jnp.arange(seq)[None, :] < prompt_lens[:, None]  # [batch, seq]
    ids = jnp.where(valid, prompt_ids, vocab)  # padding -> out of range, dropped by the scatter
    rows = jnp.arange(batch)[:, None]
    seen = jnp.zeros((batch, vocab), bool).at[rows, ids].set(True, mode="drop")
    return jnp.zeros((batch, vocab), jnp.int32), seen


def update_penalty_state(output_counts: jax.Array, seen_mask: jax.Array, tokens: jax.Array):
    """Record one generated token per row. tokens: [batch] i32."""
    rows = jnp.arange(tokens.shape[0])
    return output_counts.at[rows, tokens].add(1), seen_mask.at[rows, tokens].set(True)


# ---- sampling -------------------------------------------------------------------------------


def apply_logit_bias(logits, ids, values):
    """OpenAI's logit_bias: each row's biases added to its logits. logits: [batch, vocab] f32;
    ids: [batch, n] i32 token ids, -1 = padding; values: [batch, n] f32 -> [batch, vocab] f32.
    Padding is dropped by the scatter, not added as 0.0: a row without a bias keeps its logits
    bit for bit (-0.0 + 0.0 would be +0.0)."""
    vocab = logits.shape[-1]
    rows = jnp.arange(logits.shape[0])[:, None]  # [batch, 1]
    ids = jnp.where(ids < 0, vocab, ids)  # padding -> out of range
    return logits.at[rows, ids].add(values, mode="drop")


def apply_penalties(logits, arrays: SamplingArrays, output_counts, seen_mask):
    """vLLM/HF semantics. logits: [batch, vocab] f32 -> [batch, vocab] f32.
    Repetition (prompt + output tokens): positive logits / penalty, negative ones * penalty.
    Frequency and presence (output tokens only, as in OpenAI): subtract penalty * count, penalty * [count > 0]."""
    rep = arrays.repetition_penalty[:, None]
    logits = jnp.where(seen_mask, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - arrays.frequency_penalty[:, None] * output_counts.astype(jnp.float32)
    return logits - arrays.presence_penalty[:, None] * (output_counts > 0).astype(jnp.float32)


def keep_mask(scaled, top_k, top_p, min_p):
    """Which tokens survive top-k, then top-p, then min-p. scaled: [batch, vocab] temperature-scaled
    logits; top_k [batch] i32 (0 = off), top_p, min_p [batch] f32. Returns [batch, vocab] bool."""
    need_sort = jnp.any((top_k > 0) | (top_p < 1))
    threshold = jax.lax.cond(need_sort, _sorted_threshold, lambda s, *_: jnp.full(s.shape[:1], -jnp.inf, s.dtype),
                             scaled, top_k, top_p)  # [batch]
    # min-p: p / p_max >= min_p, with the ratio taken in logit space (renormalizing changes nothing).
    ratio = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
    return (scaled >= threshold[:, None]) & (ratio >= min_p[:, None])


def _sorted_threshold(scaled, top_k, top_p):
    """The smallest logit that top-k and top-p keep, per row. scaled: [batch, vocab] -> [batch]."""
    vocab = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)  # [batch, vocab], largest first
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [batch, 1]; ties with it are kept
    # top-p over the top-k-renormalized distribution: keep sorted position i while the mass
    # before it is < top_p, i.e. the shortest prefix whose mass reaches top_p (at least 1 token).
    probs = jax.nn.softmax(jnp.where(desc >= kth, desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1), 1)
    last = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    # top_p == 1 keeps everything: no trust in a rounded cumsum reaching exactly 1.
    last = jnp.where(top_p[:, None] < 1, last, -jnp.inf)
    return jnp.maximum(kth, last)[:, 0]


def _gumbel_noise(seed, step, vocab: int):
    """One row's noise at one step. seed: [2] u32, step: [] i32 -> [vocab] f32."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed[0]), seed[1])
    return jax.random.gumbel(jax.random.fold_in(key, step), (vocab,), jnp.float32)


def _draw(penalized, arrays: SamplingArrays, step):
    """Temperature, filters, then Gumbel-max (an exact categorical draw). -> [batch] i32."""
    scaled = penalized / arrays.temperature[:, None]
    keep = keep_mask(scaled, arrays.top_k, arrays.top_p, arrays.min_p)
    noise = jax.vmap(_gumbel_noise, in_axes=(0, 0, None))(arrays.seed, step, scaled.shape[-1])
    sampled = argmax_rows(jnp.where(keep, scaled, -jnp.inf) + noise)
    return jnp.where(arrays.greedy, argmax_rows(penalized), sampled)


def argmax_rows(x):
    """jnp.argmax over the last axis of x [rows, vocab] -> [rows] i32 (the first maximum; the
    first NaN where a row has one). On XLA:CPU as a max, then the first index holding it: its
    one-pass argmax (a reduction of value-index pairs) is not vectorized and runs several times
    slower, in every sampling step (docs/performance.md, "CPU")."""
    if jax.default_backend() != "cpu":
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    top = jnp.max(x, axis=-1, keepdims=True)  # NaN if the row has one
    hit = (x == top) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


# top_k_over_vocab's chunk (vocabulary entries) on GPUs: XLA:GPU sorts a whole row for lax.top_k
# over a 131k vocabulary; the top k of each chunk, then of those candidates, is the same result
# for a fraction of the work. XLA:CPU's top_k is already a partial sort: chunks there cost more,
# so not on CPUs (docs/performance.md, "XLA on GPUs: flags").
TOP_K_CHUNK = {"gpu": 1024}


def top_k_over_vocab(x, k: int, chunk: int | None = None):
    """lax.top_k over the last axis of x [rows, vocab] -> (values [rows, k], ids [rows, k] i32).
    On a tp mesh each device takes the top k of its own part of the vocabulary (under
    shard_map: nothing gathers the [rows, vocab] logits), then the tp * k candidates are merged.
    With chunk (default TOP_K_CHUNK for this backend) a part is taken in chunks the same way.
    Same result as lax.top_k, ties included (candidates stay in vocabulary order)."""
    rows, vocab = x.shape
    chunk = TOP_K_CHUNK.get(jax.default_backend()) if chunk is None else chunk
    mesh = current_mesh()
    shards = mesh_size(mesh, "tp")
    if shards == 1 or vocab % shards:
        return _top_k_in_chunks(x, k, chunk)
    size = vocab // shards

    def local(part):  # part [rows or rows / dp, size]: this device's top k, ids made global
        values, ids = _top_k_in_chunks(part, min(k, size), chunk)
        return values, ids + jax.lax.axis_index("tp") * size

    batch = LOGICAL_RULES["batch"]
    row_axis = batch if batch is not None and rows % mesh.shape[batch] == 0 else None
    values, ids = jax.shard_map(local, mesh=mesh, in_specs=P(row_axis, "tp"), out_specs=(P(row_axis, "tp"),) * 2,
                                check_vma=False)(x)  # [rows, tp * k] candidates, shard by shard
    values, pick = jax.lax.top_k(values, k)
    return values, jnp.take_along_axis(ids, pick, axis=-1)


def _top_k_in_chunks(x, k: int, chunk: int | None):
    """lax.top_k of x [rows, vocab] as the top k of each chunk, then of the candidates."""
    rows, vocab = x.shape
    chunks = _vocab_chunks(vocab, k, chunk)
    if chunks == 1:
        values, ids = jax.lax.top_k(x, k)
        return values, ids.astype(jnp.int32)
    size = vocab // chunks
    values, ids = jax.lax.top_k(x.reshape(rows, chunks, size), k)  # [rows, chunks, k]
    ids = ids + (jnp.arange(chunks, dtype=ids.dtype) * size)[None, :, None]
    values, pick = jax.lax.top_k(values.reshape(rows, -1), k)
    return values, jnp.take_along_axis(ids.reshape(rows, -1), pick, axis=-1).astype(jnp.int32)


def _vocab_chunks(vocab: int, k: int, chunk: int | None) -> int:
    """How many equal chunks _top_k_in_chunks splits a vocabulary into: doubled from 1 while the
    chunks stay at least `chunk` (None: no splitting) and 2k entries long."""
    n = 1
    while chunk and vocab % (2 * n) == 0 and vocab // (2 * n) >= max(chunk, 2 * k):
        n *= 2
    return n


def allowed_tokens(bits, vocab: int):
    """A bitmask [batch, ceil(vocab / 32)] i32 -> [batch, vocab] bool."""
    ids = jnp.arange(vocab)
    return ((bits[:, ids // 32] >> (ids % 32)) & 1).astype(bool)


def sample(logits, arrays: SamplingArrays, step, output_counts, seen_mask, num_logprobs: int = 0) -> SampleResult:
    """Pick one token per row. Jittable; num_logprobs must be static.

    logits: [batch, vocab] any float dtype; step: [batch] i32 tokens generated so far per row;
    output_counts: [batch, vocab] i32 generated-token counts; seen_mask: [batch, vocab] bool
    prompt or generated tokens.

    Logprobs (the chosen token's and the top ones) are of the raw model distribution, before
    logit bias, penalties, temperature and filters: vLLM's default (logprobs_mode raw_logprobs);
    OpenAI does not document which it returns. So a token forced by a bias of +100 may show a
    low logprob, as a token favoured by a penalty does. (Prompt logprobs are raw too: they are
    not sampled, step_programs._prompt_logprobs.)
    """
    logits = logits.astype(jnp.float32)
    # vLLM's Sampler applies logit bias (with its other non-argmax-invariant logits processors)
    # right before the penalties: the same order here, and greedy rows take the argmax after it.
    biased = logits if arrays.bias_ids is None else apply_logit_bias(logits, arrays.bias_ids, arrays.bias_values)
    penalized = apply_penalties(biased, arrays, output_counts, seen_mask)
    if arrays.allowed is not None:  # a grammar's tokens only (structured outputs)
        penalized = jnp.where(allowed_tokens(arrays.allowed, logits.shape[-1]), penalized, -jnp.inf)
    greedy_only = lambda p, a, s: argmax_rows(p)
    tokens = jax.lax.cond(jnp.all(arrays.greedy), greedy_only, _draw, penalized, arrays, step)
    raw = jax.nn.log_softmax(logits, axis=-1)  # [batch, vocab]
    logprob = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    if num_logprobs == 0:
        return SampleResult(tokens, logprob)
    top_logprobs, top_ids = top_k_over_vocab(raw, num_logprobs)
    return SampleResult(tokens, logprob, top_ids, top_logprobs)
