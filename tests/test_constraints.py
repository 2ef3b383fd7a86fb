"""response_format by constrained decoding (qwen.serving.constraints, on llguidance): the real Engine on
a tiny random chat checkpoint must still reply with JSON that parses and validates, and stop."""

import json
import threading
import time
from enum import Enum
from typing import Annotated, Literal, Optional

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

import qwen
from qwen.serving import Engine, RequestError, SamplingParams
from qwen.serving import constraints
from qwen.serving.constraints import grammars, json_processor, response_format_processor
from qwen.tools.tiny_checkpoint import build

IM_END, IM_START, ENDOFTEXT = 151645, 151644, 151643
STOP = [IM_END, IM_START]
SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build(tmp_path_factory.mktemp("constraints") / "chat", chat=True, dtype="float32")
    engine = Engine.from_pretrained(path)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tok(engine):
    return engine.tokenizer


def prompt(tokenizer, text="Reply in JSON."):
    return qwen.make_context(tokenizer, text, system="You are a helpful assistant.")[1]


def run(engine, processors, seed, max_new_tokens):
    """One request; seed None means greedy."""
    params = SamplingParams(
        max_new_tokens=max_new_tokens, logits_processors=processors, stop_token_ids=STOP, seed=seed,
        do_sample=seed is not None,
    )
    return engine.submit(prompt(engine.tokenizer), params).result()


def run_all(engine, make_processors, max_new_tokens, seeds=SEEDS + [None], **options):
    """The requests for every seed (and greedy), submitted together so they share decode steps."""
    streams = []
    for seed in seeds:
        procs = make_processors()
        params = SamplingParams(
            max_new_tokens=max_new_tokens, logits_processors=procs, stop_token_ids=STOP, seed=seed,
            do_sample=seed is not None, **options,
        )
        streams.append((seed, procs, engine.submit(prompt(engine.tokenizer), params)))
    return [(seed, procs, stream.result()) for seed, procs, stream in streams]


def allowed_ids(processor, generated, size):
    logits = torch.zeros(size)
    processor(generated, logits)
    assert not torch.isnan(logits).any()
    assert set(logits.unique().tolist()) <= {0.0, float("-inf")}  # allowed logits are left exactly as they were
    return set(torch.nonzero(logits == 0).flatten().tolist())


# ----------------------------------------------------------------------------- schemas


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=150)
    color: Color
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=3)


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{3}$")
    quantity: int = Field(ge=1, le=99)
    gift: bool


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["open", "shipped", "closed"]
    items: list[Item] = Field(min_length=1, max_length=3)
    note: Optional[str] = Field(default=None, max_length=12)


# The brief's kind of schema, written by hand as a client would send it.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "temperature": {"type": "integer", "minimum": -60, "maximum": 60},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "forecast": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
    },
    "required": ["city", "temperature", "unit", "forecast"],
    "additionalProperties": False,
}


def check_weather(value):
    assert set(value) == {"city", "temperature", "unit", "forecast"}
    assert isinstance(value["city"], str) and 1 <= len(value["city"]) <= 12
    assert type(value["temperature"]) is int and -60 <= value["temperature"] <= 60
    assert value["unit"] in ("celsius", "fahrenheit")
    assert isinstance(value["forecast"], list) and 1 <= len(value["forecast"]) <= 3
    assert all(isinstance(day, str) and len(day) <= 8 for day in value["forecast"])


SCHEMAS = {
    "person": (Person.model_json_schema(), lambda text: Person.model_validate_json(text, strict=True)),
    "order": (Order.model_json_schema(), lambda text: Order.model_validate_json(text, strict=True)),
    "weather": (WEATHER, lambda text: check_weather(json.loads(text))),
}


# ----------------------------------------------------------------------------- generation with the engine


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_replies_validate_and_stop(engine, tok, name):
    """Random weights, four seeds and greedy: every reply is complete JSON that validates."""
    schema, validate = SCHEMAS[name]
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    results = run_all(engine, lambda: [response_format_processor(tok, response_format, STOP)], max_new_tokens=400)
    for seed, (proc,), out in results:
        assert out.finish_reason == "stop", (seed, out.text)
        assert out.token_ids[-1] in STOP and proc.error is None and proc.done
        validate(out.text)  # raises on a reply that does not fit the schema
    assert len({out.text for _, _, out in results}) > 1  # the seeds did sample different replies


def test_json_object_replies_parse_and_stop(engine, tok):
    """json_object: any JSON object. A random model almost never closes a string by itself (no seed did
    within 3000 tokens: 1 token in 110 holds a quote), so a second, ordinary processor makes closing
    tokens likelier, and the chat checkpoints' repetition_penalty 1.1 keeps greedy decoding from
    looping through keys forever; the constraint alone decides what is allowed."""
    closers = torch.tensor(
        [i for i in range(ENDOFTEXT) if any(c in tok.tokenizer.decode_single_token_bytes(i) for c in b'"}]')]
    )

    def prefer_closers(generated, logits):
        logits[closers] += 6.0

    results = run_all(
        engine,
        lambda: [prefer_closers, response_format_processor(tok, {"type": "json_object"}, STOP)],
        max_new_tokens=300,
        seeds=[0, 2, 4, None],
        repetition_penalty=1.1,
    )
    for seed, (_, proc), out in results:
        assert out.finish_reason == "stop", (seed, out.text)
        assert proc.error is None
        assert isinstance(json.loads(out.text), dict)
    assert any(json.loads(out.text) for _, _, out in results)  # not only {}


def test_json_object_cut_by_length_stays_in_grammar(engine, tok):
    """Without help the random model rambles inside a string until max_new_tokens: the reply is a
    truncated object and every token was one the grammar allowed."""
    proc = response_format_processor(tok, {"type": "json_object"}, STOP)
    out = run(engine, [proc], seed=0, max_new_tokens=40)
    assert out.finish_reason == "length" and len(out.token_ids) == 40
    assert out.text.startswith("{") and proc.error is None and not proc.done


def test_processor_composes_with_penalties_and_top_p(engine, tok):
    schema, validate = SCHEMAS["weather"]
    for seed in (5, 6):
        proc = json_processor(tok, schema, STOP)
        params = SamplingParams(
            max_new_tokens=300, logits_processors=[proc], stop_token_ids=STOP, seed=seed, top_p=0.9, top_k=50,
            temperature=0.8, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5,
        )
        out = engine.submit(prompt(tok), params).result()
        assert out.finish_reason == "stop"
        validate(out.text)


def test_one_processor_follows_a_new_history(engine, tok):
    """Reused for a second request (a generated list that is not an extension of the last one), the
    processor starts over instead of carrying the first reply's state."""
    proc = json_processor(tok, WEATHER, STOP)
    first = run(engine, [proc], seed=1, max_new_tokens=300)
    second = run(engine, [proc], seed=2, max_new_tokens=300)
    for out in (first, second):
        assert out.finish_reason == "stop"
        check_weather(json.loads(out.text))
    assert first.text != second.text


# ----------------------------------------------------------------------------- the mask itself


def test_mask_allows_only_what_the_grammar_allows(engine, tok):
    size = engine.model.config.vocab_size
    assert size == 151936 > len(tok) == 151851
    proc = json_processor(tok, {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, STOP)
    first = allowed_ids(proc, [], size)
    assert first and all(tok.decode([i]).startswith("{") for i in first)
    assert all(i < ENDOFTEXT for i in first)  # no special token, none of the embedding's padding ids
    # Half way: no stop token yet.
    partial = tok.encode('{"n": 12')
    middle = allowed_ids(proc, partial, size)
    assert not middle & set(STOP) and tok.encode("3")[0] in middle and tok.encode("}")[0] in middle
    # Complete: the stop tokens and nothing else (<|endoftext|> is not one of this request's).
    done = partial + tok.encode("}")
    assert allowed_ids(proc, done, size) == set(STOP)
    assert proc.done and proc.error is None


def test_stop_tokens_join_the_grammar_where_it_may_end(tok):
    """A top-level number may end after any digit, or go on: both are allowed."""
    proc = json_processor(tok, {"type": "integer"}, [IM_END])
    allowed = allowed_ids(proc, tok.encode("12"), 151936)
    assert IM_END in allowed and IM_START not in allowed and tok.encode("3")[0] in allowed


def test_whitespace_between_tokens_is_bounded(tok):
    """Compact, json.dumps and indented output are allowed; an endless run of blanks is not."""
    value = {"a": [1, {"b": None}], "c": "x"}
    for text in (json.dumps(value), json.dumps(value, separators=(",", ":")), json.dumps(value, indent=2),
                 json.dumps(value, indent="\t")):
        proc = json_processor(tok, None, STOP)
        assert allowed_ids(proc, tok.encode(text), 151936) == set(STOP), text
        assert proc.error is None
    proc = json_processor(tok, None, STOP)
    allowed_ids(proc, tok.encode('{"a":' + " " * 40 + "1}"), 151936)
    assert proc.error is not None


def test_a_rejected_token_ends_the_reply(tok):
    """A token outside the grammar (forced by something else) cannot be taken back: the processor
    records the error and allows only the stop tokens, rather than raising inside the engine."""
    proc = json_processor(tok, None, STOP)
    assert allowed_ids(proc, tok.encode("hello"), 151936) == set(STOP)
    assert proc.error and not proc.done
    # The same processor handed a fresh history recovers.
    assert allowed_ids(proc, [], 151936) and proc.error is None


def test_mask_on_shorter_logits(tok):
    """Logits as long as the tokenizer (no padding rows) are masked the same way."""
    proc = json_processor(tok, {"type": "boolean"}, STOP)
    allowed = allowed_ids(proc, [], len(tok))
    assert allowed and all("true".startswith(tok.decode([i])) or "false".startswith(tok.decode([i])) for i in allowed)


# ----------------------------------------------------------------------------- response_format


def test_response_format_kinds(tok):
    assert response_format_processor(tok, None, STOP) is None
    assert response_format_processor(tok, {"type": "text"}, STOP) is None
    assert isinstance(response_format_processor(tok, {"type": "json_object"}, STOP), constraints.JsonProcessor)
    # As a pydantic model_dump() of the request gives it, with the unused fields None.
    assert isinstance(response_format_processor(tok, {"type": "json_object", "json_schema": None}, STOP),
                      constraints.JsonProcessor)
    spec = {"name": "weather", "description": "today's weather", "schema": WEATHER, "strict": None}
    assert response_format_processor(tok, {"type": "json_schema", "json_schema": spec}, STOP) is not None
    # No schema: any JSON object.
    proc = response_format_processor(tok, {"type": "json_schema", "json_schema": {"name": "anything"}}, STOP)
    assert allowed_ids(proc, tok.encode('{"x": [true]}'), 151936) == set(STOP)


def test_strict_false_ignores_keywords_the_grammar_cannot_enforce(tok):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(RequestError, match="uniqueItems"):
        response_format_processor(tok, {"type": "json_schema", "json_schema": {"name": "s", "schema": schema,
                                                                                "strict": True}}, STOP)
    for strict in (False, None):
        spec = {"name": "s", "schema": schema}
        if strict is not None:
            spec["strict"] = strict
        assert response_format_processor(tok, {"type": "json_schema", "json_schema": spec}, STOP) is not None


def _schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}


@pytest.mark.parametrize(
    "response_format, message",
    [
        ("json_object", "must be an object"),
        ({"format": "json"}, "response_format.type"),
        ({"type": "json"}, "response_format.type"),
        ({"type": "json_schema"}, "needs a 'json_schema' object"),
        ({"type": "json_schema", "json_schema": "{}"}, "needs a 'json_schema' object"),
        ({"type": "json_schema", "json_schema": {"schema": WEATHER}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "has space", "schema": WEATHER}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "x" * 65, "schema": WEATHER}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": "yes"}}, "strict"),
        ({"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "description": 3}}, "description"),
        ({"type": "json_schema", "json_schema": {"name": "w", "schema": [WEATHER]}}, "JSON Schema object"),
        ({"type": "json_schema", "json_schema": {"name": "w", "schema": "{}"}}, "JSON Schema object"),
        (_schema_format({"type": "objectx"}), "invalid JSON schema.*objectx"),
        (_schema_format({"type": "integer", "minimum": 5, "maximum": 2}), "invalid JSON schema"),
        (_schema_format({"$ref": "#/$defs/missing"}), "invalid JSON schema.*missing"),
        (_schema_format({"type": "string", "pattern": "(("}), "invalid JSON schema"),
        (_schema_format({"type": "string", "format": "no-such-format"}), "invalid JSON schema"),
        (_schema_format({"type": "object", "required": 5}), "invalid JSON schema"),
    ],
)
def test_malformed_response_format_is_a_request_error(tok, response_format, message):
    with pytest.raises(RequestError, match=message) as info:
        response_format_processor(tok, response_format, STOP)
    assert info.value.param == "response_format"
    assert "<state>" not in str(info.value)


def test_json_processor_needs_stop_tokens(tok):
    with pytest.raises(ValueError, match="stop token"):
        json_processor(tok, None, [])


# ----------------------------------------------------------------------------- caches


def test_vocabulary_built_once_per_tokenizer_across_threads(tok):
    found = []
    threads = [threading.Thread(target=lambda: found.append(grammars(tok).lltokenizer)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 4 and all(t is found[0] for t in found)
    assert grammars(tok) is grammars(tok)
    assert found[0].vocab_size == len(tok)


def test_compiled_schemas_are_cached_per_schema(tok):
    cache = grammars(tok)
    old_limit = cache.max_schemas
    try:
        cache.max_schemas = 2
        schemas = [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                   for i in range(3)]
        for schema in schemas:
            json_processor(tok, schema, STOP)
        assert len(cache._compiled) == 2  # the oldest was dropped
        keys = list(cache._compiled)
        # Equal schemas share one entry whatever their key order; the second use is a copy, not a compile.
        json_processor(tok, dict(reversed(list(schemas[2].items()))), STOP)
        assert list(cache._compiled) == keys
        a, b = json_processor(tok, schemas[2], STOP), json_processor(tok, schemas[2], STOP)
        allowed_ids(a, tok.encode('{"k2": 1'), 151936)
        assert allowed_ids(b, [], 151936) == allowed_ids(json_processor(tok, schemas[2], STOP), [], 151936)
    finally:
        cache.max_schemas = old_limit


def test_per_token_overhead_is_small(tok):
    """The mask for Qwen's 151,936 logits costs about a millisecond a token on a slow CPU; this only
    guards against an accidental slowdown of an order of magnitude."""
    proc = json_processor(tok, WEATHER, STOP)
    text = tok.encode(json.dumps({"city": "Paris", "temperature": 21, "unit": "celsius", "forecast": ["sun", "rain"]}))
    logits = torch.randn(151936)
    start = time.perf_counter()
    for n in range(len(text) + 1):
        proc(text[:n], logits.clone())
    per_token = (time.perf_counter() - start) / (len(text) + 1)
    assert per_token < 0.05, f"{per_token * 1000:.1f} ms per token"
