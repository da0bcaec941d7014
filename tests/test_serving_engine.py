"""The continuous-batching engine: requests join and leave a fixed slot table; each one's tokens are what it would get
alone (and what `generate` makes), whatever else runs beside it."""

import threading
import time

import numpy as np
import pytest

import jaxllm
from jaxllm import parity
from jaxllm.engine import ContextLengthError, Engine, EngineStopped, QueueFull, Request
from jaxllm.errors import InputError
from jaxllm.loader import load
from jaxllm.model import compile_counts

SMALL = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 57)), [3] * 17, list(range(100, 190))]


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    d = tmp_path_factory.mktemp("serving")
    return load(parity.random_checkpoint(SMALL, d, seed=7, scale=0.3))


@pytest.fixture(scope="module")
def engine(params):
    e = Engine(params, slots=3, max_context=256, decode_steps=4, prefill_chunk=32, eos_ids=[]).start()
    yield e
    e.stop()


def alone(params, prompt, n):
    return jaxllm.generate(params, prompt, n, eos_ids=[]).tokens


def test_more_requests_than_slots_each_get_generates_tokens(params, engine):
    """Five prompts through three slots: slots are refilled as requests finish, and each request's greedy tokens are
    generate's for that prompt alone."""
    limits = [12, 3, 20, 7, 15]
    requests = [engine.submit(Request(prompt=p, max_tokens=n)) for p, n in zip(PROMPTS, limits)]
    for r in requests:
        assert r.finished.wait(120)
    for r, p, n in zip(requests, PROMPTS, limits):
        assert r.finish_reason == "length" and len(r.tokens) == n
        assert r.tokens == alone(params, p, n), f"prompt {p[:4]}..."
    assert engine.running == 0 and engine.waiting == 0


def test_tokens_do_not_depend_on_the_rest_of_the_batch(params, engine):
    """A request's greedy tokens are the same alone in the table and beside others, sampling or not."""
    (solo,) = engine.generate([PROMPTS[2]], 16, timeout=120)
    crowd = [Request(prompt=PROMPTS[0], max_tokens=16, temperature=1.2, seed=1),
             Request(prompt=PROMPTS[2], max_tokens=16),
             Request(prompt=PROMPTS[4], max_tokens=5, temperature=0.7, top_k=5, seed=2)]
    for r in crowd:
        engine.submit(r)
    for r in crowd:
        assert r.finished.wait(120)
    assert crowd[1].tokens == solo.tokens


def test_seeded_sampling_is_reproducible_in_any_slot(engine):
    first = engine.generate(PROMPTS[:3], 12, temperature=0.9, top_p=0.95, seed=11, timeout=120)
    again = engine.generate(PROMPTS[:3][::-1], 12, temperature=0.9, top_p=0.95, seed=11, timeout=120)[::-1]
    assert [r.tokens for r in first] == [r.tokens for r in again]
    other = engine.generate(PROMPTS[:1], 12, temperature=0.9, top_p=0.95, seed=12, timeout=120)
    assert other[0].tokens != first[0].tokens


def test_per_row_sampling_settings(params, engine):
    """Rows of one batch sample under their own settings: top_k=1 and a tiny top_p are greedy, a high temperature
    is not, and top_k=3 draws only among the three most likely tokens."""
    greedy = alone(params, PROMPTS[0], 12)
    rows = [Request(prompt=PROMPTS[0], max_tokens=12, temperature=1.5, top_k=1, seed=3),
            Request(prompt=PROMPTS[0], max_tokens=12, temperature=1.5, top_p=1e-6, seed=4),
            Request(prompt=PROMPTS[0], max_tokens=12, temperature=5.0, seed=5)]
    for r in rows:
        engine.submit(r)
    for r in rows:
        assert r.finished.wait(120)
    assert rows[0].tokens == greedy and rows[1].tokens == greedy
    assert rows[2].tokens != greedy
    (k3,) = engine.generate([PROMPTS[0]], 1, temperature=5.0, top_k=3, seed=6, timeout=120)
    logits = np.asarray(jaxllm.forward(params, np.asarray([PROMPTS[0]]), np.arange(len(PROMPTS[0]))[None]))[0, -1]
    assert k3.tokens[0] in np.argsort(-logits)[:3]


def test_stop_ids_end_a_request_on_the_stop_token(params, engine):
    greedy = alone(params, PROMPTS[1], 20)
    stop = greedy[4]
    (r,) = engine.generate([PROMPTS[1]], 20, stop_ids=[stop], timeout=120)
    assert r.finish_reason == "stop" and r.tokens == greedy[:greedy.index(stop) + 1]
    (first,) = engine.generate([PROMPTS[1]], 20, stop_ids=[greedy[0]], timeout=120)  # ends at the prefill's token
    assert first.finish_reason == "stop" and first.tokens == greedy[:1]


def test_chunked_prefill_equals_one_chunk(params):
    """A 90-token prompt prefilled 16 tokens at a time (interleaved with decode steps of a running request) makes
    the tokens of a prefill in one chunk."""
    chunked = Engine(params, slots=2, max_context=256, decode_steps=2, prefill_chunk=16, eos_ids=[]).start()
    whole = Engine(params, slots=2, max_context=256, decode_steps=2, prefill_chunk=128, eos_ids=[]).start()
    try:
        running = chunked.submit(Request(prompt=PROMPTS[0], max_tokens=40))
        time.sleep(0.2)
        (long_chunked,) = chunked.generate([PROMPTS[4]], 20, timeout=120)
        (long_whole,) = whole.generate([PROMPTS[4]], 20, timeout=120)
        assert running.finished.wait(120)
    finally:
        chunked.stop(), whole.stop()
    assert long_chunked.tokens == long_whole.tokens == alone(params, PROMPTS[4], 20)
    assert running.tokens == alone(params, PROMPTS[0], 40)


def test_decode_across_window_buckets_equals_generate(params):
    """A request that grows past the attention window it started in (128 slots) moves to the next one and keeps
    generate's tokens; a larger reserved context gives the same tokens."""
    prompt = list(range(1, 120))
    small = Engine(params, slots=2, max_context=256, decode_steps=4, eos_ids=[]).start()
    large = Engine(params, slots=2, max_context=1024, decode_steps=4, eos_ids=[]).start()
    try:
        (a,) = small.generate([prompt], 30, timeout=120)
        (b,) = large.generate([prompt], 30, timeout=120)
    finally:
        small.stop(), large.stop()
    assert a.tokens == b.tokens == alone(params, prompt, 30)


def test_new_requests_settings_and_limits_compile_nothing(engine):
    engine.generate([PROMPTS[0]], 6, timeout=120)  # every program this shape needs is compiled
    before = compile_counts()
    engine.generate([PROMPTS[0][:4], PROMPTS[0]], 5, temperature=0.3, top_k=7, top_p=0.5, seed=99,
                    stop_ids=[1, 2, 3], timeout=120)
    engine.generate([PROMPTS[0]], 9, timeout=120)
    assert compile_counts() == before


def test_cancel_frees_the_slot(params, engine):
    events = []
    r = Request(prompt=PROMPTS[0], max_tokens=200, on_event=lambda req, tokens, reason: events.append(reason))
    engine.submit(r)
    deadline = time.monotonic() + 60
    while len(r.tokens) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.cancel(r)
    assert r.finished.wait(60) and r.finish_reason == "cancelled" and events[-1] == "cancelled"
    assert len(r.tokens) < 200
    assert engine.running == 0
    (after,) = engine.generate([PROMPTS[3]], 10, timeout=120)  # the freed slot serves the next request correctly
    assert after.tokens == alone(params, PROMPTS[3], 10)


def test_full_queue_and_bad_requests_are_refused_by_name(params):
    e = Engine(params, slots=1, max_context=128, decode_steps=2, max_waiting=1, eos_ids=[]).start()
    try:
        first = e.submit(Request(prompt=PROMPTS[0], max_tokens=100))
        deadline = time.monotonic() + 60
        while e.waiting and time.monotonic() < deadline:  # the first takes the slot
            time.sleep(0.01)
        e.submit(Request(prompt=PROMPTS[0], max_tokens=10))  # waits
        with pytest.raises(QueueFull, match="max_waiting=1"):
            e.submit(Request(prompt=PROMPTS[0], max_tokens=10))
        with pytest.raises(ContextLengthError, match=r"prompt \(5 tokens\) plus max_tokens \(124\)"):
            e.submit(Request(prompt=PROMPTS[0], max_tokens=124))
        with pytest.raises(InputError, match="token id 256 at position 1"):
            e.submit(Request(prompt=[1, 256], max_tokens=2))
        with pytest.raises(InputError, match="max_tokens must be a positive integer"):
            e.submit(Request(prompt=[1], max_tokens=0))
        with pytest.raises(InputError, match="temperature"):
            e.submit(Request(prompt=[1], max_tokens=1, temperature=-1))
        e.cancel(first)
    finally:
        e.stop(drain=True, timeout=120)
    assert first.finish_reason == "cancelled"
    with pytest.raises(EngineStopped):
        e.submit(Request(prompt=[1], max_tokens=1))


def test_stop_drains_running_and_waiting_requests(params):
    e = Engine(params, slots=1, max_context=128, decode_steps=2, eos_ids=[]).start()
    requests = [e.submit(Request(prompt=p, max_tokens=8)) for p in PROMPTS[:3]]
    e.stop(drain=True, timeout=120)
    assert [r.finish_reason for r in requests] == ["length"] * 3
    assert [r.tokens for r in requests] == [alone(params, p, 8) for p in PROMPTS[:3]]


def test_callbacks_see_every_token_once_from_the_engine_thread(engine):
    seen, threads = [], set()

    def on_event(req, tokens, reason):
        seen.extend(tokens)
        threads.add(threading.current_thread().name)

    r = engine.submit(Request(prompt=PROMPTS[2], max_tokens=11, on_event=on_event))
    assert r.finished.wait(120)
    assert seen == r.tokens and len(seen) == 11 and threads == {"jaxllm-engine"}


@pytest.mark.slow
def test_real_model_engine_equals_generate(smollm2):
    """SmolLM2 through four slots: each chat prompt's greedy tokens equal generate's for it alone."""
    tok = smollm2.tokenizer
    texts = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Explain gravity to a child in one sentence."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
               for t in texts]
    e = Engine(smollm2, slots=4, max_context=256, decode_steps=8).start()
    try:
        got = e.generate(prompts, 24, timeout=300)
    finally:
        e.stop()
    for r, p in zip(got, prompts):
        ref = jaxllm.generate(smollm2, p, 24)
        assert r.tokens == ref.tokens, tok.decode(ref.tokens)


def test_a_request_is_submitted_once_and_free_slots_take_requests_without_a_queue(params):
    e = Engine(params, slots=2, max_context=128, decode_steps=2, max_waiting=0, eos_ids=[]).start()
    try:
        first, second = e.submit(Request(prompt=PROMPTS[0], max_tokens=30)), e.submit(Request(prompt=PROMPTS[1], max_tokens=3))
        with pytest.raises(InputError, match="submitted already"):
            e.submit(first)
        assert second.finished.wait(60)
        assert second.tokens == alone(params, PROMPTS[1], 3)
        e.cancel(first)
    finally:
        e.stop()


def test_top_p_of_one_keeps_every_token():
    """An fp32 running sum reaches 1.0 before the end of a large vocabulary: top_p=1.0 must still cut nothing."""
    import jax.numpy as jnp

    from jaxllm.generation import filter_logits

    logits = 3 * jnp.asarray(np.random.default_rng(0).standard_normal((2, 151_936)), jnp.float32)
    kept = filter_logits(logits, jnp.ones(2), jnp.zeros(2, jnp.int32), jnp.ones(2))
    assert bool(jnp.all(jnp.isfinite(kept)))


def test_idle_slots_do_not_scale_a_requests_rope(tmp_path_factory):
    """Dynamic RoPE scales by the longest position in the step: a slot whose long request has finished must not
    change the next short request's tokens."""
    d = tmp_path_factory.mktemp("dynamic")
    config = {**SMALL, "max_position_embeddings": 64,
              "rope_parameters": dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)}
    dynamic = load(parity.random_checkpoint(config, d, seed=3, scale=0.3))
    e = Engine(dynamic, slots=2, max_context=256, decode_steps=4, eos_ids=[]).start()
    try:
        holder = e.submit(Request(prompt=[1, 2], max_tokens=200))  # slot 0, so that the long request takes slot 1
        e.generate([list(range(1, 100))], 20, timeout=120)  # leaves slot 1 at position ~120, past 64
        e.cancel(holder)
        assert holder.finished.wait(60)
        (short,) = e.generate([PROMPTS[0]], 12, timeout=120)  # slot 0, beside the idle slot 1
    finally:
        e.stop()
    assert short.tokens == alone(dynamic, PROMPTS[0], 12)


def test_a_plain_engine_decodes_row_stable_as_generate_does(params):
    """Where a model can speculate, the plain engine's decode step is row-stable, as generate's is: the row kernel
    takes every slot's row (one pass over each matrix), and its tokens are, bit for bit, those a speculating engine
    verifies. Without it the two engines could part at a near-tie."""
    import functools

    import jax

    from jaxllm import engine as serving
    from jaxllm.model import ops

    assert ops.row_kernel_ready(), "the row kernel did not build on this machine"
    table = serving.Slots.empty(params, 3, 64)
    traced = str(jax.make_jaxpr(functools.partial(serving._decode_slots, steps=2, window=64))(params, table))
    assert "jaxllm_row_products" in traced


# ---- speculation per slot ----------------------------------------------------------------------------------------

REPEATING = [[5, 6, 7, 8, 9] * 4, [40, 41, 42, 40, 41], list(range(60, 95)) + list(range(60, 70))]


@pytest.mark.parametrize("proposer, fewer", [("lookup", 1.3), ("draft", 5.0)])
def test_a_speculating_engine_makes_generates_tokens_in_fewer_steps(params, proposer, fewer):
    """Prompt lookup per slot, or a draft model with its own cache in the same slots (the target itself, so that
    a draft cache that fell out of step would show as rejected proposals): more requests than slots, prompts
    prefilled in several chunks (the lookup history and the draft's cache span them), rows that accept different
    counts, a stop id inside an accepted run and a limit reached in the middle of one; every request gets
    generate's tokens, and the slots make `fewer` times more tokens than decode steps run."""
    plain = [alone(params, p, 40) for p in REPEATING]
    how = dict(speculate="lookup") if proposer == "lookup" else dict(draft=params)
    spec = Engine(params, slots=2, max_context=256, decode_steps=4, prefill_chunk=16, eos_ids=[], **how).start()
    try:
        done = spec.generate(REPEATING, 40, timeout=300)
        made, forwards = sum(len(r.tokens) - 1 for r in done), spec.decode_forwards  # the first is the prefill's
        stop = plain[0][9]
        stopped = spec.generate(REPEATING[:1], 40, stop_ids=[stop], timeout=300)[0]
        short = spec.generate(REPEATING, 13, timeout=300)
        # a greedy slot beside a sampling one: each with its own rule
        hot = spec.submit(Request(prompt=REPEATING[1], max_tokens=30, temperature=0.8, seed=5))
        (cold,) = spec.generate(REPEATING[2:], 40, timeout=300)
        assert hot.finished.wait(300)
    finally:
        spec.stop()
    assert [r.tokens for r in done] == plain
    print(f"{made} tokens in {forwards} decode steps")
    assert made > fewer * forwards
    assert stopped.tokens == plain[0][:plain[0].index(stop) + 1] and stopped.finish_reason == "stop"
    assert [r.tokens for r in short] == [p[:13] for p in plain]
    assert cold.tokens == plain[2] and len(hot.tokens) == 30


def test_speculation_the_engine_cannot_run_is_refused_by_name(params, tmp_path):
    with pytest.raises(InputError, match="speculate must be one of"):
        Engine(params, speculate="guess")
    with pytest.raises(InputError, match="speculate='draft' needs draft=<a model>"):
        Engine(params, speculate="draft")
    other = load(parity.random_checkpoint({**SMALL, "vocab_size": 128}, tmp_path / "other", seed=2))
    with pytest.raises(InputError, match=r"the draft model's vocabulary \(128\) is not the target's \(256\)"):
        Engine(params, draft=other)
    dynamic = load(parity.random_checkpoint({**SMALL, "rope_parameters": dict(rope_type="dynamic", factor=2.0,
                                                                              rope_theta=10000.0)}, tmp_path, seed=1))
    with pytest.raises(InputError, match="dynamic RoPE"):
        Engine(dynamic, speculate="lookup")
