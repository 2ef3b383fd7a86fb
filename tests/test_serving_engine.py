"""qwen.serving.Engine on a real tiny chat checkpoint (fp32, real vocabulary): batching,
cancellation, prefix reuse, limits, sampling, stop handling and streaming."""

import asyncio
import threading
import time

import pytest
import torch

import qwen
from qwen.serving import Engine, EngineBusy, RequestError, SamplingParams
from qwen.serving.text import TextAssembler
from qwen.tools.tiny_checkpoint import build

GREEDY = dict(do_sample=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build(tmp_path_factory.mktemp("engine") / "chat", chat=True, dtype="float32")


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = Engine.from_pretrained(checkpoint, max_running=4, max_waiting=16, prefill_chunk=16)
    yield engine
    engine.shutdown()


def prompt(tokenizer, text):
    return qwen.make_context(tokenizer, text, system="You are a helpful assistant.")[1]


PROMPTS = ["Hello there", "Tell me a story about a dragon and a knight.", "你好", "1 2 3 4 5 6 7 8 9 10 11 12 13 14"]


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_greedy_matches_model_generate(engine):
    tok, model = engine.tokenizer, engine.model
    for text in PROMPTS[:2]:
        ids = prompt(tok, text)
        out = engine.submit(ids, SamplingParams(max_new_tokens=10, repetition_penalty=1.1, **GREEDY)).result()
        ref = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=10, repetition_penalty=1.1, eos_token_id=None,
            top_p=None, top_k=None,
        )
        assert out.token_ids == ref[0, len(ids) :].tolist()
        assert out.finish_reason == "length" and out.completion_tokens == 10 and out.prompt_tokens == len(ids)


def test_batched_greedy_equals_solo(engine):
    tok = engine.tokenizer
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    solo = [engine.submit(prompt(tok, t), params).result().token_ids for t in PROMPTS]
    streams = [engine.submit(prompt(tok, t), params) for t in PROMPTS]  # all four run together
    assert [s.result().token_ids for s in streams] == solo


def test_prompt_longer_than_a_prefill_chunk_gives_the_same_tokens(checkpoint, engine):
    """prefill_chunk=16 splits this prompt into several chunks; one chunk must agree."""
    ids = prompt(engine.tokenizer, " ".join(["word"] * 60))
    params = SamplingParams(max_new_tokens=8, **GREEDY)
    whole = Engine(engine.model, engine.tokenizer, max_running=1, prefill_chunk=4096)
    try:
        assert engine.submit(ids, params).result().token_ids == whole.submit(ids, params).result().token_ids
    finally:
        whole.shutdown()


def test_seeded_sampling_is_reproducible_inside_a_batch(engine):
    tok = engine.tokenizer
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = engine.submit(prompt(tok, PROMPTS[0]), params).result().token_ids
    noise = [engine.submit(prompt(tok, t), SamplingParams(max_new_tokens=12, seed=i)) for i, t in enumerate(PROMPTS[1:])]
    together = engine.submit(prompt(tok, PROMPTS[0]), params)
    assert together.result().token_ids == alone
    for stream in noise:
        stream.result()
    other_seed = engine.submit(prompt(tok, PROMPTS[0]), SamplingParams(max_new_tokens=12, seed=4321)).result()
    assert other_seed.token_ids != alone


def test_cancelling_frees_the_slot_at_once(engine):
    stream = engine.submit(prompt(engine.tokenizer, PROMPTS[1]), SamplingParams(max_new_tokens=500, **GREEDY))
    iterator = iter(stream)
    first = next(iterator)
    assert first.token_ids
    before = engine.stats().get("finished_cancelled_total", 0)
    iterator.close()  # leaving the loop cancels
    wait_until(lambda: engine.stats()["running"] == 0)
    stats = engine.stats()
    assert stats["finished_cancelled_total"] == before + 1
    assert stats["generation_tokens_total"] < 10_000


def test_next_turn_reuses_the_previous_turns_kv(checkpoint, engine):
    """The prefix cache keeps a finished sequence's KV; the next turn prefills only the new tokens
    and gives the logits a fresh prefill gives."""
    tok = engine.tokenizer
    first_ids = prompt(tok, PROMPTS[1])
    first = engine.submit(first_ids, SamplingParams(max_new_tokens=6, **GREEDY)).result()
    history = [(PROMPTS[1], tok.decode(first.token_ids))]
    second_ids = qwen.make_context(tok, "And then?", history=history, system="You are a helpful assistant.")[1]
    reused_prefix = first_ids + first.token_ids[:-1]
    assert second_ids[: len(reused_prefix)] == reused_prefix  # the chat format extends the last turn
    params = SamplingParams(max_new_tokens=6, logprobs=3, **GREEDY)
    reused = engine.submit(second_ids, params).result()
    assert reused.cached_tokens == len(reused_prefix)
    fresh_engine = Engine(engine.model, engine.tokenizer, max_running=1, prefix_slots=0)
    try:
        fresh = fresh_engine.submit(second_ids, params).result()
        again = fresh_engine.submit(second_ids, params).result()
    finally:
        fresh_engine.shutdown()
    assert fresh.cached_tokens == 0 and again.cached_tokens == 0  # prefix_slots=0: no reuse at all
    assert reused.token_ids == fresh.token_ids
    got = torch.tensor([lp.logprob for lp in reused.logprobs])
    want = torch.tensor([lp.logprob for lp in fresh.logprobs])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_stop_string_across_tokens_is_never_emitted(engine):
    tok = engine.tokenizer
    ids = prompt(tok, PROMPTS[0])
    free = engine.submit(ids, SamplingParams(max_new_tokens=12, **GREEDY)).result()
    pieces = [tok.decode([t]) for t in free.token_ids]
    # A stop string that starts inside token 2 and ends inside token 3.
    stop = pieces[2][-2:] + pieces[3][:2]
    assert len(pieces[2]) >= 2 and len(pieces[3]) >= 2
    outputs = list(engine.submit(ids, SamplingParams(max_new_tokens=12, stop=[stop], **GREEDY)))
    text = "".join(o.text for o in outputs)
    assert outputs[-1].finish_reason == "stop"
    assert stop not in text
    assert free.text.startswith(text) and free.text[len(text) :].startswith(stop)


def test_stop_token_id_ends_the_reply_without_its_text(engine):
    ids = prompt(engine.tokenizer, PROMPTS[0])
    first = engine.submit(ids, SamplingParams(max_new_tokens=5, **GREEDY)).result().token_ids[0]
    out = engine.submit(ids, SamplingParams(max_new_tokens=5, stop_token_ids=[first], **GREEDY)).result()
    assert out.finish_reason == "stop" and out.text == "" and out.token_ids == [first]


def test_text_assembler_never_splits_a_character(engine):
    tok = engine.tokenizer
    text = "a😀b中文🫠𓀀x"
    ids = tok.encode(text)
    assembler = TextAssembler(tok.tokenizer.decode_single_token_bytes)
    parts = [assembler.add(t) for t in ids] + [assembler.finish()]
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)
    assert len(ids) > len(text)  # some characters really span several tokens


def test_text_assembler_holds_back_a_possible_stop(engine):
    tok = engine.tokenizer
    assembler = TextAssembler(tok.tokenizer.decode_single_token_bytes, stop=["STOP"])
    released = [assembler.add(t) for t in tok.encode("abc ST")]
    assert "".join(released) == "abc "  # "ST" could start "STOP"
    released = [assembler.add(t) for t in tok.encode("OP more")]
    assert "".join(released) == "" and assembler.stopped


def test_limits_are_clear_errors(engine):
    tok = engine.tokenizer
    with pytest.raises(RequestError, match="exceeds the context"):
        engine.submit(prompt(tok, "hi"), SamplingParams(max_new_tokens=engine.max_context))
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(RequestError, match="token ids"):
        engine.submit([-1, 5], SamplingParams())
    for bad, param in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_new_tokens=0), "max_tokens"),
                       (dict(temperature=float("nan")), "temperature"), (dict(top_k=-2), "top_k")]:
        with pytest.raises(RequestError) as info:
            engine.submit(prompt(tok, "hi"), SamplingParams(**bad))
        assert info.value.param == param


def test_a_full_queue_is_engine_busy(checkpoint, engine):
    small = Engine(engine.model, engine.tokenizer, max_running=1, max_waiting=1)
    try:
        ids = prompt(engine.tokenizer, "hi")
        long = SamplingParams(max_new_tokens=200, **GREEDY)
        running = small.submit(ids, long)
        wait_until(lambda: small.stats()["running"] == 1)
        waiting = small.submit(ids, long)
        with pytest.raises(EngineBusy):
            small.submit(ids, long)
        waiting.cancel()  # a cancelled waiter frees its place in the queue at once
        waiting = small.submit(ids, long)
        running.cancel()
        waiting.cancel()
        wait_until(lambda: small.stats()["running"] == 0 and small.stats()["waiting"] == 0)
    finally:
        small.shutdown()


def test_streams_work_from_threads_and_event_loops(engine):
    tok = engine.tokenizer
    params = SamplingParams(max_new_tokens=8, **GREEDY)
    expected = engine.submit(prompt(tok, PROMPTS[2]), params).result()
    results = []
    threads = [threading.Thread(target=lambda: results.append(engine.submit(prompt(tok, PROMPTS[2]), params).result()))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.token_ids for r in results] == [expected.token_ids] * 3

    async def main():
        streams = [engine.submit(prompt(tok, PROMPTS[2]), params) for _ in range(3)]
        return await asyncio.gather(*(s.async_result() for s in streams))

    assert [r.text for r in asyncio.run(main())] == [expected.text] * 3


def test_int8_cache_engine_matches_model_generate(checkpoint, tmp_path):
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, use_cache_quantization=True).eval()
    engine = Engine(model, qwen.QWenTokenizer.from_pretrained(checkpoint), max_running=2, prefill_chunk=4096)
    try:
        ids = prompt(engine.tokenizer, PROMPTS[1])
        out = engine.submit(ids, SamplingParams(max_new_tokens=8, **GREEDY)).result()
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, eos_token_id=None,
                             repetition_penalty=None, top_p=None, top_k=None)
        assert out.token_ids == ref[0, len(ids) :].tolist()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("slots", [[1, 2], [3, 0]], ids=["consecutive", "scattered"])
def test_int8_cache_hands_the_kernels_its_stored_rows(slots):
    """What the CUDA kernels read from the engine's int8 cache ({"int8_raw": True}) is what the torch
    path dequantizes: the same rows, lengths and (scale, zero); views of the buffers when the rows'
    slots are consecutive."""
    from qwen.cache_kernels import pv_torch, qk_torch
    from qwen.serving.kv import SlotKVCache

    config = qwen.QWenConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, kv_channels=16,
                             use_cache_quantization=True)
    generator = torch.Generator().manual_seed(0)
    chunks = [[torch.randn(2, 4, n, 16, generator=generator) for _ in range(2)] for n in (5, 1)]
    outputs = {}
    for raw in (False, True):
        cache = SlotKVCache(config, 4, 64, torch.float32, "cpu", initial=8)
        for (keys, values), start in zip(chunks, (0, 5)):
            cache.select(slots, [start, start], [1.0, 1.0])
            outputs[raw] = cache.update(keys, values, 0, {"int8_raw": True} if raw else None)
    (key_q, *key_params), (value_q, *value_params) = outputs[True]
    keys, values = outputs[False]
    assert key_q.dtype == torch.uint8 and key_q.shape == keys.shape == (2, 4, 6, 16)
    assert key_params[0].shape == (2, 4, 6, 1)
    assert (key_q.untyped_storage().data_ptr() == cache.keys[0].untyped_storage().data_ptr()) == (slots == [1, 2])
    query, probs = torch.randn(2, 4, 1, 16), torch.softmax(torch.randn(2, 4, 1, 6), -1)
    assert torch.equal(qk_torch(query, key_q, *key_params), query @ keys.mT)
    assert torch.equal(pv_torch(probs, value_q, *value_params), probs @ values)


def test_logits_processors_steer_every_step(engine):
    """A request's processors (and the engine's own) see the generated ids and edit the logits."""
    text = engine.tokenizer.encode("Action: search")
    seen = []

    def force(generated, logits):
        seen.append(list(generated))
        if len(generated) < len(text):
            logits.fill_(float("-inf"))
            logits[text[len(generated)]] = 0.0

    out = engine.submit(prompt(engine.tokenizer, "hi"), SamplingParams(max_new_tokens=len(text) + 2, logits_processors=[force])).result()
    assert out.text.startswith("Action: search")
    assert seen[: len(text)] == [text[:i] for i in range(len(text))]


def test_a_failing_processor_ends_only_its_own_request(engine):
    def broken(generated, logits):
        if len(generated) == 2:
            raise RuntimeError("grammar exploded")

    ids = prompt(engine.tokenizer, PROMPTS[0])
    healthy = engine.submit(ids, SamplingParams(max_new_tokens=8, **GREEDY))
    failing = engine.submit(ids, SamplingParams(max_new_tokens=8, logits_processors=[broken], **GREEDY))
    with pytest.raises(RuntimeError, match="grammar exploded"):
        failing.result()
    assert healthy.result().completion_tokens == 8
    wait_until(lambda: engine.stats()["running"] == 0)


def test_prompt_logprobs_score_every_prompt_token(engine):
    """Scoring (lm-eval's loglikelihood): each prompt token's log-probability given what precedes
    it, across prefill chunk boundaries (prefill_chunk=16 here), equals a plain forward's."""
    ids = prompt(engine.tokenizer, " ".join(["word"] * 20))
    assert len(ids) > 32
    out = engine.submit(ids, SamplingParams(max_new_tokens=1, prompt_logprobs=2, **GREEDY)).result()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    with torch.no_grad():
        expected = engine.model(torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    want = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert [lp.token_id for lp in out.prompt_logprobs[1:]] == ids[1:]
    assert all(len(lp.top) == 2 for lp in out.prompt_logprobs[1:])


@pytest.mark.parametrize("quantization", ["int8", "int4:32"])
def test_engine_loads_quantized_weights(checkpoint, quantization):
    """Engine.from_pretrained(dtype=, quantization=) serves the quantized model; its greedy reply is
    what model.generate gives on that same model (fp32: in 16 bits the two attention paths round
    differently, which flips near-ties of a random model)."""
    from qwen.quantization import Int4Linear, Int8Linear

    engine = Engine.from_pretrained(checkpoint, dtype="float32", quantization=quantization, max_running=2)
    try:
        model = engine.model
        kind = Int8Linear if quantization == "int8" else Int4Linear
        assert model.dtype == torch.float32 and isinstance(model.transformer.h[0].attn.c_attn, kind)
        ids = prompt(engine.tokenizer, PROMPTS[1])
        out = engine.submit(ids, SamplingParams(max_new_tokens=8, **GREEDY)).result()
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, eos_token_id=None,
                             top_p=None, top_k=None)
        assert out.token_ids == ref[0, len(ids):].tolist()
    finally:
        engine.shutdown()


def test_a_request_cancelled_while_waiting_still_ends_its_stream(checkpoint):
    """A reader that cancels a request still queued behind a busy engine gets its final
    "cancelled" output at once, instead of waiting for a slot (or forever)."""
    engine = Engine.from_pretrained(checkpoint, max_running=1)
    try:
        ids = prompt(engine.tokenizer, PROMPTS[1])
        busy = engine.submit(ids, SamplingParams(max_new_tokens=400, **GREEDY))
        next(iter(busy))  # running
        waiting = engine.submit(ids, SamplingParams(max_new_tokens=4, **GREEDY))
        assert engine.stats()["waiting"] == 1
        waiting.cancel()
        outputs = []
        reader = threading.Thread(target=lambda: outputs.extend(waiting), daemon=True)
        reader.start()
        reader.join(timeout=10)
        assert not reader.is_alive() and [o.finish_reason for o in outputs] == ["cancelled"]
        assert outputs[0].token_ids == [] and engine.stats()["waiting"] == 0
        busy.cancel()
    finally:
        engine.shutdown()


def test_kv_memory_follows_use_not_the_context_limit(checkpoint):
    """The slots start small and grow when a sequence needs more (up to max_context), keeping
    their contents: a request that outgrows them mid-decode gives the tokens it gives in a cache
    allocated in full from the start."""
    replies = []
    for grown in (False, True):
        engine = Engine.from_pretrained(checkpoint, max_running=2, max_context=2048, prefill_chunk=64)
        try:
            cache = engine.cache
            assert cache.allocated == 256 and cache.capacity == 2048
            small = cache.bytes()
            if grown:
                cache._grow(2048)
            ids = prompt(engine.tokenizer, " ".join(f"w{i}" for i in range(60)))
            assert len(ids) < 256 < len(ids) + 200
            replies.append(engine.submit(ids, SamplingParams(max_new_tokens=200, **GREEDY)).result().token_ids)
            assert cache.allocated == (2048 if grown else 512) and cache.bytes() == small * cache.allocated // 256
        finally:
            engine.shutdown()
    assert replies[0] == replies[1] and len(replies[0]) == 200


def test_a_burst_of_short_prompts_is_prefilled_in_one_forward(checkpoint):
    """Prompts that arrive together share one padded prefill forward (within prefill_chunk tokens)
    and still give exactly their solo tokens; one too long to share goes on its own."""
    engine = Engine.from_pretrained(checkpoint, max_running=4, prefill_chunk=256, prefix_slots=0)  # full prefills
    try:
        tok = engine.tokenizer
        params = SamplingParams(max_new_tokens=6, **GREEDY)
        ids = [prompt(tok, t) for t in PROMPTS]
        assert len({len(i) for i in ids}) > 1 and 4 * max(len(i) for i in ids) <= 256  # padding is exercised
        solo = [engine.submit(i, params).result().token_ids for i in ids]
        before = engine.counters["prefill_forwards_total"]
        with engine._lock:  # the worker admits all four in the same step
            streams = [engine.submit(i, params) for i in ids]
        assert [s.result().token_ids for s in streams] == solo
        assert engine.counters["prefill_forwards_total"] == before + 1

        long = prompt(tok, " ".join(["word"] * 150))  # 2 x its length exceeds the budget
        assert 2 * len(long) > 256 >= len(long)
        expected = engine.submit(long, params).result().token_ids
        before = engine.counters["prefill_forwards_total"]
        with engine._lock:
            streams = [engine.submit(long, params), engine.submit(ids[0], params)]
        assert [s.result().token_ids for s in streams] == [expected, solo[0]]
        assert engine.counters["prefill_forwards_total"] == before + 2
    finally:
        engine.shutdown()


def test_int8_cache_prefills_only_equal_chunks_together(checkpoint):
    """The int8 cache quantizes each written chunk as one group: padding would change it, so only
    prompts of the same length share a forward, and all give model.generate's tokens."""
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, use_cache_quantization=True).eval()
    engine = Engine(model, qwen.QWenTokenizer.from_pretrained(checkpoint), max_running=4, prefill_chunk=256, prefix_slots=0)
    try:
        ids = [prompt(engine.tokenizer, t) for t in (PROMPTS[0], PROMPTS[0], PROMPTS[1])]
        params = SamplingParams(max_new_tokens=6, **GREEDY)
        with engine._lock:
            streams = [engine.submit(i, params) for i in ids]
        outs = [s.result().token_ids for s in streams]
        assert engine.counters["prefill_forwards_total"] == 2
        for i, out in zip(ids, outs):
            ref = model.generate(torch.tensor([i]), do_sample=False, max_new_tokens=6, eos_token_id=None,
                                 repetition_penalty=None, top_p=None, top_k=None)
            assert out == ref[0, len(i):].tolist()
    finally:
        engine.shutdown()


def test_releasing_the_openmp_pool_keeps_torch_working():
    """The engine frees its creating thread's libgomp pool (see release_openmp_pool): torch's wheels
    on Linux bundle libgomp, so it is there to ask; parallel work afterwards (this thread's pool
    rebuilt) gives the same result as before."""
    from pathlib import Path

    from qwen.serving.engine import release_openmp_pool

    a, b = torch.randn(512, 384, generator=torch.Generator().manual_seed(0)), torch.randn(384, 256)
    before = a @ b
    has_libgomp = any(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
    assert release_openmp_pool() is has_libgomp
    assert torch.equal(a @ b, before)
    assert release_openmp_pool() is has_libgomp  # again, with the pool just rebuilt
