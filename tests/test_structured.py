"""Structured outputs (issue 18): every constrained output parses and validates (jsonschema, not
our code, is the judge), on the default model, which cannot do it unconstrained, and on both
Mistral tokenizers (SentencePiece v3, Tekken) with non-ASCII schemas; the bitmask against
llguidance's own NumPy reference; constrained rows leave unconstrained ones unchanged; bad
constraints fail with a message that names them."""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from mistral_jax import LLM, SamplingParams
from mistral_jax.sample.sampling import allowed_tokens
from mistral_jax.sample.structured import StructuredOutputs

S = {"type": "string", "maxLength": 12}
INT = {"type": "integer", "minimum": -999, "maximum": 999}  # bounded: a small model may repeat digits forever
N = {"type": "number", "minimum": -99, "maximum": 99}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": N,
     "y": N}, "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"],
     "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "circle"},
                                      "r": {"type": "number", "minimum": 0, "maximum": 10}},
     "required": ["kind", "r"], "additionalProperties": False},
    {"anyOf": [INT, {"type": "object", "properties": {"v": S}, "required": ["v"],
                                      "additionalProperties": False}]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
     "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"maybe": {"type": ["string", "null"], "maxLength": 8}}, "required": ["maybe"],
     "additionalProperties": False},
    {"type": "object", "$defs": {"item": {"type": "object", "properties": {"id": INT},
     "required": ["id"], "additionalProperties": False}}, "properties": {"items": {"type": "array",
     "items": {"$ref": "#/$defs/item"}, "maxItems": 3}}, "required": ["items"], "additionalProperties": False},
    {"type": "integer", "minimum": 10, "maximum": 99},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"city": {"enum": ["Zürich", "São Paulo", "東京", "Αθήνα"]},
     "température": N}, "required": ["city", "température"], "additionalProperties": False},
    {"type": "object", "properties": {"a": INT, "b": INT}, "required": ["a"],
     "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["score"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 3, "maxItems": 3},
    {"type": "object", "properties": {"user": {"type": "object",
                                               "properties": {"name": S, "admin": {"type": "boolean"}},
     "required": ["name", "admin"], "additionalProperties": False}, "ids": {"type": "array",
     "items": INT, "maxItems": 2}}, "required": ["user", "ids"], "additionalProperties": False},
    {"type": "object", "properties": {"emoji": {"type": "string", "pattern": "^[😀🎉]{1,3}$"}},
     "required": ["emoji"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}},
     "required": ["n"], "additionalProperties": False},
    {"type": "boolean"},
    {"type": "null"},
]


@pytest.fixture(scope="module")
def demo():
    return LLM(max_model_len=1024, progress=False)


def check_outputs(outs, schemas):
    for out, schema in zip(outs, schemas):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.slow
def test_default_model_follows_every_schema(demo):
    assert len(SCHEMAS) >= 20
    prompts = [f"Give an example of JSON for this schema: {json.dumps(s, ensure_ascii=False)}" for s in SCHEMAS]
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=120, structured_outputs=StructuredOutputs(json=s))
              for i, s in enumerate(SCHEMAS)]
    check_outputs(demo.generate(prompts, params), SCHEMAS)
    # The same model unconstrained fails most of them (what the constraint buys).
    free = demo.generate(prompts,
                         [SamplingParams(temperature=0.7, seed=i, max_tokens=120) for i in range(len(SCHEMAS))])
    valid = 0
    for out, schema in zip(free, SCHEMAS):
        try:
            jsonschema.validate(json.loads(out.outputs[0].text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid < len(SCHEMAS) // 2


@pytest.mark.slow
def test_regex_choice_grammar_and_json_object(demo):
    specs = [StructuredOutputs(regex=r"[A-Z][a-z]{2,8} is [0-9]{2}"),
             StructuredOutputs(choice=["Paris", "Rome", "Oslo"]),
             StructuredOutputs(grammar='start: "The answer is " ("yes" | "no") "."'),
             StructuredOutputs(json_object=True)]
    prompts = ["Answer:"] * 3 + ["Describe Paris as a JSON object with keys name and country."]
    outs = demo.generate(prompts, [SamplingParams(temperature=0.9 if i < 3 else 0, seed=i, max_tokens=100,
                                                  structured_outputs=s) for i, s in enumerate(specs)])
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    texts = [o.outputs[0].text for o in outs]
    assert re.fullmatch(r"[A-Z][a-z]{2,8} is [0-9]{2}", texts[0])
    assert texts[1] in ("Paris", "Rome", "Oslo")
    assert texts[2] in ("The answer is yes.", "The answer is no.")
    assert isinstance(json.loads(texts[3]), dict)


@pytest.mark.slow
def test_constrained_rows_leave_the_others_unchanged(demo):
    prompts = ["What is the capital of France?", "Name a colour:", "Count to five:"]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    alone = [o.outputs[0].text for o in demo.generate(prompts, greedy)]
    mixed = demo.generate(prompts + ["JSON please:"] * 3,
                          [greedy] * 3 + [SamplingParams(temperature=0.8, seed=i, max_tokens=80,
                                                         structured_outputs=StructuredOutputs(json=SCHEMAS[0]))
                                          for i in range(3)])
    assert [o.outputs[0].text for o in mixed[:3]] == alone
    check_outputs(mixed[3:], [SCHEMAS[0]] * 3)


@pytest.mark.parametrize("vocab", [32768, 131072])
@pytest.mark.slow
def test_mistral_tokenizers_non_ascii(tmp_path, vocab):
    """Random weights of a small shape with mistral-common's v3 (SentencePiece) or Tekken
    tokenizer: the grammar alone makes the output valid, non-ASCII included."""
    params = {"dim": 64, "n_layers": 1, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
              "norm_eps": 1e-5, "vocab_size": vocab, "rope_theta": 1e6, "max_seq_len": 256}
    (tmp_path / "params.json").write_text(json.dumps(params))
    llm = LLM(load_format="dummy", config=str(tmp_path), max_model_len=256, progress=False)
    schemas = [SCHEMAS[13], SCHEMAS[18],
               {"type": "object", "properties": {"mot": {"enum": ["éléphant", "ñandú", "Straße"]},
                                                 "数": {"type": "integer", "maximum": 9}},
                "required": ["mot", "数"], "additionalProperties": False}]
    outs = llm.generate([{"prompt_token_ids": [1, 100 + i]} for i in range(len(schemas))],
                        [SamplingParams(temperature=1.0, seed=i, max_tokens=100,
                                        structured_outputs=StructuredOutputs(json=s))
                         for i, s in enumerate(schemas)])
    check_outputs(outs, schemas)
    out = llm.generate([{"prompt_token_ids": [1, 7]}], SamplingParams(
        temperature=1.0, seed=0, max_tokens=20, structured_outputs=StructuredOutputs(choice=["naïve", "日本"])))
    assert out[0].outputs[0].text in ("naïve", "日本")


def test_bitmask_matches_llguidance_numpy_reference():
    import llguidance.numpy as lnp

    rng = np.random.default_rng(0)
    for rows, vocab in [(1, 32), (3, 33), (4, 1000), (2, 131072)]:
        bits = rng.integers(-2**31, 2**31, size=lnp.get_bitmask_shape(rows, vocab), dtype=np.int64).astype(np.int32)
        logits = rng.standard_normal((rows, vocab)).astype(np.float32)
        ref = logits.copy()
        lnp.apply_token_bitmask_inplace(ref, bits)
        allowed = np.asarray(jax.jit(allowed_tokens, static_argnums=1)(jnp.asarray(bits), vocab))
        ours = np.where(allowed, logits, -np.inf)
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("spec, words", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "properties/a/type"),
    (dict(json={"type": "object", "required": "a"}), "required"),
    (dict(regex="[a-"), "regex"),
    (dict(grammar="start: (("), "grammar"),
])
@pytest.mark.slow
def test_invalid_constraints_are_named(demo, spec, words):
    good = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputs(choice=["a"]))
    with pytest.raises(ValueError, match=re.escape(words)):
        demo.generate(["x", "y"], [good, SamplingParams(max_tokens=4, structured_outputs=StructuredOutputs(**spec))])
    assert not demo.engine.has_unfinished_requests()  # the good one was not queued either


@pytest.mark.parametrize("kwargs, words", [
    (dict(), "exactly one"), (dict(regex="a", choice=["a"]), "exactly one"), (dict(choice=[]), "choice"),
    (dict(choice=["a", 3]), "choice"), (dict(regex=""), "regex"),
])
def test_bad_specs(kwargs, words):
    with pytest.raises(ValueError, match=words):
        StructuredOutputs(**kwargs)
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})
