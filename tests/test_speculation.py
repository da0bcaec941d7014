"""Speculative decoding by prompt lookup: the output is token for token the output without it, rows accept different
counts, the cache forgets the rejected slots, and what it cannot run with is refused by name."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import parity
from jaxllm.errors import InputError
from jaxllm.generation import (GenerationSettings, Sampling, Speculation, adapt, bucket, decode, draft_prefill,
                               generate, left_pad, lookup, prefill, seed_key, self_draft, speculative_decode, SLACK)
from jaxllm.loader import load

SMALL = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
MODELS = {"llama": ({}, "fp32"), "llama-int8": ({}, "int8"),
          "mistral-window-4": (dict(model_type="mistral", sliding_window=4), "fp32")}
# Prompts that repeat themselves (lookup finds matches) and one that does not, of three lengths (left padding).
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [40, 41, 42, 40, 41], [100 + i for i in range(23)]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            overrides, weights = MODELS[name]
            path = parity.random_checkpoint({**SMALL, **overrides}, tmp_path_factory.mktemp(name.split("-")[0]), seed=7,
                                            scale=0.3)
            made[name] = load(path, weights=weights)
        return made[name]
    return get


def test_lookup_proposes_what_followed_the_latest_occurrence_of_the_longest_suffix():
    spec = Speculation(max_ngram=3, min_ngram=1, widths=(4, 6))
    history = jnp.array([[0, 0, 1, 2, 3, 9, 1, 2, 3, 4, 1, 2, 3],  # "1 2 3" last followed by 4 (the latest)
                         [0, 7, 8, 9, 7, 5, 5, 5, 5, 5, 5, 5, 7],  # only "7" recurs: followed by 5 at slot 5
                         [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]], jnp.int32)  # no earlier occurrence
    start, end = jnp.array([2, 1, 10]), jnp.array([13, 13, 13])
    proposals, count = lookup(history, start, end, spec)
    assert count.tolist() == [4, 5, 0]  # row 0: the history runs out after 4 tokens; row 1: k = 5
    assert proposals[0, :4].tolist() == [4, 1, 2, 3] and proposals[1].tolist() == [5, 5, 5, 5, 5]
    # a row's tokens end before the history does: nothing past `end` is proposed, nothing before `start` is matched
    proposals, count = lookup(history, jnp.array([6, 1, 10]), jnp.array([10, 13, 13]), spec)
    assert count[0] == 0  # "2 3 4", "3 4", "4" do not occur earlier within [6, 10)


def test_k_grows_width_by_width_on_a_copy_and_rows_that_keep_missing_back_off():
    """adapt, step by step: row 0 accepts everything (k 3 -> 7 -> 11, then stays), row 1 misses every time (k stays
    at the 3 the smallest width holds; after `patience` misses it waits 1, 3, 7, then 15 steps between tries), row 2
    accepts part (k shrinks to what it accepted, not below 3), row 3 proposes nothing (unchanged)."""
    spec = Speculation(widths=(4, 8, 12), patience=2)
    k, wait, misses = jnp.array([3, 3, 11, 5]), jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32)
    ks, waits = [], []
    for _ in range(12):
        count = jnp.where(wait > 0, 0, k).at[3].set(0)  # a waiting row proposes nothing
        accepted = jnp.stack([count[0], 0, jnp.minimum(count[2], 2), 0])
        k, wait, misses = adapt(k, wait, misses, count, accepted, spec)
        ks.append(k.tolist())
        waits.append(int(wait[1]))
    assert [x[0] for x in ks] == [7, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11]
    assert {x[1] for x in ks} == {3} and {x[2] for x in ks} == {3} and {x[3] for x in ks} == {5}
    one = jnp.ones(1, jnp.int32)
    assert adapt(11 * one, 0 * one, 0 * one, 11 * one, 5 * one, spec)[0].tolist() == [5]  # shrinks to the accepted
    # row 1: misses 1, 2 (wait 1), skip, miss 3 (wait 3), skip x3, miss 4 (wait 7), skip...
    assert waits == [0, 1, 0, 3, 2, 1, 0, 7, 6, 5, 4, 3]
    with pytest.raises(InputError, match="patience >= 1"):
        Speculation(patience=0)


def test_open_ended_rows_back_off_to_about_plain_steps(models):
    """A prompt with no repeats and random-model output: the proposals fail and the row backs off, so most of its
    steps propose nothing (plain one-token steps); the output is still the plain one."""
    params = models("llama")
    prompt = [[100 + i for i in range(23)]]
    n = 40
    P = bucket(23)
    settings = GenerationSettings(max_new_tokens=n, eos_ids=(), pad_id=0, length=bucket(P + n + SLACK),
                                  speculation=Speculation(patience=2), row_stable=True)
    ids, mask = left_pad(prompt, P, 0)
    s = speculative_decode(params, prefill(params, ids, mask, seed_key(0), settings), settings)
    plain = runs(params, prompt, n)
    assert np.asarray(s.state.tokens)[:, :n].tolist() == plain
    proposed, steps = int(s.proposed[0]), int(s.steps[0])
    print(f"{proposed} proposed, {int(s.accepted[0])} accepted in {steps} steps")
    assert proposed < 0.5 * 3 * steps  # without the back-off every step would propose at least 3


def runs(model, prompts, n, eos_ids=(), **kw):
    return [r.tokens for r in generate(model, prompts, n, eos_ids=list(eos_ids), **kw)]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_output_equals_the_output_without_speculation(models, name):
    params = models(name)
    plain = runs(params, PROMPTS, 40)
    assert runs(params, PROMPTS, 40, speculate="lookup") == plain
    # an EOS inside an accepted run, and a limit reached in the middle of one
    eos = plain[0][9]
    assert runs(params, PROMPTS, 40, eos_ids=[eos], speculate="lookup") == runs(params, PROMPTS, 40, eos_ids=[eos])
    assert runs(params, PROMPTS, 13, speculate=Speculation(widths=(8,), start=7)) == [p[:13] for p in plain]


def test_the_streaming_step_speculates_and_streams_each_token_once_in_order(models):
    params = models("llama")
    streamed = {row: [] for row in range(len(PROMPTS))}
    eos = runs(params, PROMPTS, 30)[1][6]
    results = generate(params, PROMPTS, 30, eos_ids=[eos], speculate="lookup",
                       callback=lambda row, token: streamed[row].append(token))
    assert [r.tokens for r in results] == list(streamed.values()) == runs(params, PROMPTS, 30, eos_ids=[eos])


def test_a_rejected_slot_is_invisible_to_later_steps(models):
    """Junk proposals written and rolled back leave the next step's logits as a fresh cache gives them: the output
    with proposals that are all wrong (a prompt of distinct tokens, min_ngram 1 finds only stale matches) equals the
    plain output, already asserted above; here the plain step after a rejected verify is checked on its own."""
    params = models("llama")
    prompt = [3, 4, 5, 3, 4, 5, 3, 4, 9, 10]
    assert runs(params, [prompt], 24, speculate="lookup") == runs(params, [prompt], 24)


@pytest.fixture(scope="module")
def drafts(models, tmp_path_factory):
    """A separate one-layer draft of another width, and the target's own first layer (the shallow self-draft)."""
    small = {**SMALL, "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 48}
    return {"other": load(parity.random_checkpoint(small, tmp_path_factory.mktemp("draft"), seed=8, scale=0.3)),
            "self-1": self_draft(models("llama"), 1)}


@pytest.mark.parametrize("which", ["other", "self-1"])
def test_a_draft_models_proposals_leave_the_greedy_output_unchanged(models, drafts, which):
    params, draft = models("llama"), drafts[which]
    plain = runs(params, PROMPTS, 40)
    assert runs(params, PROMPTS, 40, speculate="draft", draft=draft) == plain
    eos = plain[0][9]  # an EOS inside an accepted run, and the limit reached in the middle of one
    assert runs(params, PROMPTS, 40, eos_ids=[eos], draft=draft) == runs(params, PROMPTS, 40, eos_ids=[eos])
    assert runs(params, PROMPTS, 13, draft=draft, speculate=Speculation(widths=(8,), start=7)) == [p[:13] for p in plain]
    streamed = {row: [] for row in range(len(PROMPTS))}
    generate(params, PROMPTS, 30, eos_ids=[eos], draft=draft, callback=lambda row, t: streamed[row].append(t))
    assert list(streamed.values()) == runs(params, PROMPTS, 30, eos_ids=[eos])


def test_the_draft_cache_follows_the_targets_through_accepts_rejects_and_catch_up(models):
    """The target as its own draft: it proposes what the target makes, so nearly every proposal is accepted (a
    draft cache out of step with the target's, a missed catch-up of the last proposal, would propose the wrong
    tokens), and at the end the draft's cache marks exactly the target's slots."""
    params, n = models("llama"), 40
    P = bucket(max(map(len, PROMPTS)))
    settings = GenerationSettings(max_new_tokens=n, eos_ids=(), pad_id=0, length=bucket(P + n + SLACK),
                                  speculation=Speculation(), row_stable=True)
    ids, mask = left_pad(PROMPTS, P, 0)
    s = speculative_decode(params, prefill(params, ids, mask, seed_key(0), settings), settings, params,
                           draft_prefill(params, ids, mask, settings))
    accepted, steps = np.asarray(s.accepted), np.asarray(s.steps)
    assert (accepted >= n - 1 - 8).all() and (steps <= 8).all(), (accepted, steps)  # 39 tokens in a few steps
    assert np.array_equal(np.asarray(s.draft.mask), np.asarray(s.state.cache.mask))
    assert np.array_equal(np.asarray(s.draft.index), np.asarray(s.state.cache.index))


def test_what_speculation_cannot_run_with_is_refused_by_name(models, tmp_path):
    params = models("llama")
    with pytest.raises(InputError, match="speculate must be one of"):
        generate(params, [5, 6], 4, speculate="ngram")
    with pytest.raises(InputError, match="use_cache=False"):
        generate(params, [5, 6], 4, speculate="lookup", use_cache=False)
    with pytest.raises(InputError, match="needs draft="):
        generate(params, [5, 6], 4, speculate="draft")
    with pytest.raises(InputError, match="takes no draft model"):
        generate(params, [5, 6], 4, speculate="lookup", draft=params)
    with pytest.raises(InputError, match=r"draft model's vocabulary \(8\) is not the target's \(256\)"):
        generate(params, [5, 6], 4, draft=load(parity.random_checkpoint(TINY, tmp_path / "tiny", seed=1)))
    with pytest.raises(InputError, match="self-draft takes 1 to 1 of the target's 2 layers, found 2"):
        self_draft(params, 2)
    with pytest.raises(InputError, match="widths between 2 and"):
        Speculation(widths=(4, 64))
    dynamic = load(parity.random_checkpoint({**SMALL, "rope_parameters": dict(rope_type="dynamic", factor=2.0,
                                                                              rope_theta=10000.0)}, tmp_path, seed=1))
    with pytest.raises(InputError, match="dynamic RoPE"):
        generate(dynamic, [5, 6], 4, speculate="lookup")


@pytest.mark.parametrize("weights, kernel", [("fp32", True), ("int8", True), ("bf16", True), ("int8", False)])
def test_a_verify_steps_logits_are_the_plain_steps_bit_for_bit_on_the_default_model(smollm2_dir, weights, kernel,
                                                                                    monkeypatch):
    """The real model, a batch of 3 left-padded rows, compiled as the decode programs are: one forward over 4 and
    6 positions gives at each position the logits of one-token steps, to the last bit, with the row kernel and with
    the XLA path taken where it cannot be built (each row its own GEMV). (Before, batches differed in the last bit:
    YNNPACK's reduce in the softmax, and an fp32 multiply-add contracted in some shapes only.)"""
    import jax

    from jaxllm import load_model
    from jaxllm.generation import DECODE_COMPILER_OPTIONS
    from jaxllm.model import ops, run
    from jaxllm.model.ops import row_stable

    assert ops.row_kernel_ready(), "the row kernel did not build on this machine"
    if not kernel:
        monkeypatch.setattr(ops, "row_kernel_ready", lambda: False)
    model = load_model(smollm2_dir, weights=weights)
    prompts = [model.tokenizer.encode(t) for t in ("The capital of France is", "def add(a, b):",
                                                   "Once upon a time, in a land far away")]
    state = prefill(model.params, *left_pad(prompts, 16, 0), seed_key(0), GenerationSettings(max_new_tokens=8,
                                                                                            length=64))
    feed = jnp.asarray(np.random.default_rng(0).integers(0, model.params.config.vocab_size, (3, 6)), jnp.int32)
    first = jnp.sum(state.cache.mask, axis=-1, dtype=jnp.int32)[:, None]  # [3, 1]: each row's next position

    def forward(params, cache, ids, positions):
        with row_stable():
            return run(params, ids, positions, jnp.ones(ids.shape, bool), cache)

    def compiled(T):
        return jax.jit(forward).lower(model.params, state.cache, feed[:, :T], first + jnp.arange(T)).compile(
            DECODE_COMPILER_OPTIONS)
    step, cache, plain = compiled(1), state.cache, []
    for t in range(6):
        logits, cache = step(model.params, cache, feed[:, t:t + 1], first + t)
        plain.append(np.asarray(logits[:, 0]))
    plain = np.stack(plain, axis=1)  # [3, 6, V]
    for T in (4, 6):
        verified = np.asarray(compiled(T)(model.params, state.cache, feed[:, :T], first + jnp.arange(T))[0])
        assert np.array_equal(verified, plain[:, :T]), f"T={T}: {np.abs(verified - plain[:, :T]).max()}"


@pytest.mark.parametrize("I, O", [(576, 1536), (100, 37), (24, 5)])  # tails past the 32-wide steps, odd O
def test_the_row_kernel_gives_each_row_the_bits_it_gets_alone(I, O):
    """ops.row_products over M rows (1 to 9: blocks of 4 and every remainder) gives each row the bits of the same
    row alone, for fp32, bf16 and int8 weights, and is as close to float64 as a float32 sum is."""
    import jax

    from jaxllm.model import ops
    from jaxllm.weights import Int8

    rng = np.random.default_rng(I + O)
    x = jnp.asarray(rng.standard_normal((9, I)), jnp.float32)
    f32 = jnp.asarray(rng.standard_normal((O, I)), jnp.float32)
    int8 = Int8(jnp.asarray(rng.integers(-127, 128, (O, I)), jnp.int8), jnp.asarray(rng.random(O) + 0.5, jnp.float32),
                jnp.asarray(rng.random(I) + 0.5, jnp.float32))
    product = jax.jit(ops.row_products)
    for w, dense in ((f32, f32), (f32.astype(jnp.bfloat16), f32.astype(jnp.bfloat16)), (int8, int8.dequantize())):
        together = np.asarray(product(x, w))
        assert together.shape == (9, O) and together.dtype == np.float32
        for M in (1, 2, 3, 4, 5, 9):
            for m in range(9 - M + 1):
                assert np.array_equal(np.asarray(product(x[m:m + M], w))[0], together[m]), (M, m)
        exact = np.asarray(x, np.float64) @ np.asarray(dense.astype(jnp.float32), np.float64).T
        assert np.abs(together - exact).max() <= 1e-5 * np.abs(exact).max(), np.abs(together - exact).max()


def test_without_a_compiler_row_stable_decode_warns_and_runs_its_xla_path(tmp_path):
    """A machine with no C++ compiler: row_kernel_ready() is False with a warning that names the kernel, nothing is
    left in the kernel folder, and a speculative run still equals the plain one (each row its own XLA GEMV)."""
    import os
    import subprocess
    import sys

    script = """
import warnings
warnings.simplefilter("always")
import jaxllm
from jaxllm import parity
from jaxllm.model import ops
with warnings.catch_warnings(record=True) as caught:
    assert not ops.row_kernel_ready()
assert any("rows.cc" in str(w.message) for w in caught), [str(w.message) for w in caught]
config = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
params = jaxllm.load(parity.random_checkpoint(config, sys.argv[1], seed=1, scale=0.3))
prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
plain = jaxllm.generate(params, prompt, 12, eos_ids=[]).tokens
assert jaxllm.generate(params, prompt, 12, eos_ids=[], speculate="lookup").tokens == plain
print("fallback ok")
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "JAXLLM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", "import sys\n" + script, str(tmp_path / "model")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "fallback ok" in done.stdout, done.stderr[-3000:]
    kernels = tmp_path / "cache" / "kernels"
    assert not kernels.exists() or not any(kernels.iterdir())


def test_the_default_model_rows_accept_different_counts_and_the_cache_forgets_rejected_slots(smollm2):
    """Chat prompts on the real model: a copy, a code edit and open-ended text, in one batch. The output equals the
    output without speculation; rows accept different counts in fewer steps than tokens; the cache holds exactly the
    prompt and the tokens fed, nothing of the rejected proposals."""
    asks = ["Repeat this sentence exactly: The committee approved the budget for the new library on Tuesday, after "
            "a long debate about parking.",
            "Rename the variable x to total in this code:\ndef f(items):\n    x = 0\n    for i in items:\n"
            "        x += i\n    return x",
            "Write a short poem about the sea."]
    prompts = [smollm2.tokenizer.encode(smollm2.tokenizer.apply_chat_template([{"role": "user", "content": a}]))
               for a in asks]
    n = 32
    plain = [r.tokens for r in generate(smollm2, prompts, n, eos_ids=[])]
    P = bucket(max(map(len, prompts)))
    settings = GenerationSettings(max_new_tokens=n, eos_ids=(), pad_id=0, length=bucket(P + n + SLACK),
                                  speculation=Speculation())
    ids, mask = left_pad(prompts, P, 0)
    s = speculative_decode(smollm2.params, prefill(smollm2.params, ids, mask, seed_key(0), settings), settings)
    assert np.asarray(s.state.tokens)[:, :n].tolist() == plain
    accepted, proposed = np.asarray(s.accepted), np.asarray(s.proposed)
    steps = np.asarray(s.steps)
    print(f"accepted {accepted} of {proposed} proposed, {steps} steps for {n - 1} tokens a row")
    assert len(set(accepted.tolist())) > 1 and accepted.max() >= 8  # the copy accepts a third of its tokens
    assert steps[0] < n - 1 - 8 and (steps <= n - 1).all()  # the copy takes fewer forward steps than tokens
    cache = s.state.cache
    assert np.asarray(cache.mask).sum(axis=1).tolist() == [len(p) + n - 1 for p in prompts]
    index = np.asarray(cache.index)
    assert (index == P + n - 1).all() and not any(np.asarray(cache.mask)[b, index[b]:].any() for b in range(3))


# ---- speculative sampling: the output distribution is the target's ----------------------------------------------

TINY = {**SMALL, "vocab_size": 8}
ALPHA = 1e-3  # the false-alarm rate of the whole two-sample comparison (Bonferroni over its positions)


def sample_batches(params, prompt, n, sampling, speculate, seeds, rows=512):
    """`rows` sampled continuations of `prompt` per seed -> tokens [rows * len(seeds), n], and the proposals
    accepted (speculate only)."""
    P = bucket(len(prompt))
    settings = GenerationSettings(max_new_tokens=n, eos_ids=(), pad_id=0, sampling=sampling,
                                  length=bucket(P + n + SLACK), speculation=speculate, row_stable=True)
    ids, mask = left_pad([prompt] * rows, P, 0)
    out, accepted = [], 0
    for seed in seeds:
        state = prefill(params, ids, mask, seed_key(seed), settings)
        if speculate is None:
            out.append(np.asarray(decode(params, state, settings).tokens)[:, :n])
        else:
            s = speculative_decode(params, state, settings)
            out.append(np.asarray(s.state.tokens)[:, :n])
            accepted += int(np.asarray(s.accepted).sum())
    return np.concatenate(out), accepted


def two_sample_p_values(a, b):
    """Chi-square two-sample tests, one per position t >= 1, on the joint counts of (token t - 1, token t): the
    p-value that a and b [rows, n] come from one distribution. Cells rarer than 5 in both are pooled."""
    from scipy.stats import chi2_contingency

    V = int(max(a.max(), b.max())) + 1
    out = []
    for t in range(1, a.shape[1]):
        counts = np.stack([np.bincount(x[:, t - 1] * V + x[:, t], minlength=V * V) for x in (a, b)])  # [2, V*V]
        rare = counts.max(axis=0) < 5
        table = np.concatenate([counts[:, ~rare], counts[:, rare].sum(axis=1, keepdims=True)], axis=1)
        table = table[:, table.sum(axis=0) > 0]
        out.append(chi2_contingency(table)[1])
    return out


def test_speculative_sampling_draws_from_the_targets_distribution(tmp_path):
    """Many samples from a random model with an 8-token vocabulary, with and without speculation, under one sampling
    setting (temperature and top-k): a chi-square two-sample test per position on (previous token, token) finds no
    difference at a false-alarm rate of 1e-3 overall, while the same test does find the difference between two
    temperatures, and proposals were accepted (the rule was exercised, not bypassed)."""
    params = load(parity.random_checkpoint(TINY, tmp_path, seed=3, scale=0.5))
    greedy = generate(params, [1, 2, 3], 12, eos_ids=[]).tokens
    prompt, n = [1, 2, 3, *greedy, 1, 2, 3, *greedy[:3]], 6  # lookup proposes the likely continuation
    sampling = Sampling(temperature=0.7, top_k=6)
    plain, _ = sample_batches(params, prompt, n, sampling, None, seeds=range(4))
    spec, accepted = sample_batches(params, prompt, n, sampling, Speculation(widths=(4,), start=3), seeds=range(4, 8))
    assert accepted > 0.1 * spec.size  # a fair share of the tokens came from accepted proposals
    p_values = two_sample_p_values(plain, spec)
    print(f"p-values {np.round(p_values, 4)}, accepted {accepted} of {spec.size} tokens")
    assert min(p_values) > ALPHA / len(p_values)
    colder, _ = sample_batches(params, prompt, n, Sampling(temperature=0.5, top_k=6), None, seeds=range(8, 12))
    assert min(two_sample_p_values(plain, colder)) < ALPHA / len(p_values)  # the test sees a real difference
