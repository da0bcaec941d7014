"""The real default model (SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF) against Transformers fp32."""

import numpy as np
import pytest

from jaxllm import parity
from jaxllm.generation import Sampling, generate
from jaxllm.model import compile_counts

PROMPTS = {
    "france": "The capital of France is",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "long": ("The history of astronomy is long and rich. Early civilizations watched the sky to keep calendars, "
             "to navigate, and to predict the seasons. ") * 11 + "In the seventeenth century,",
}


@pytest.fixture(scope="module")
def reference64(smollm2_dir):
    return parity.reference_model(smollm2_dir, "float64")


def test_default_model_names_paris(smollm2):
    result = generate(smollm2, "The capital of France is", max_new_tokens=20)
    assert "Paris" in result.text
    assert result.tokens[0] == smollm2.tokenizer.encode(" Paris")[0]


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_full_logits_match_transformers_with_noise_floor(smollm2, smollm2_reference, reference64, name):
    ids = smollm2.tokenizer.encode(PROMPTS[name])
    if name == "long":
        assert len(ids) > 256
    positions = np.arange(len(ids))[None]
    ours = parity.jax_logits(smollm2.params, [ids], positions)
    fp32 = parity.reference_logits(smollm2_reference, [ids], positions)
    fp64 = parity.reference_logits(reference64, [ids], positions)
    diff = parity.compare_logits(fp32, ours)
    noise = parity.compare_logits(fp64, fp32).max_abs_diff
    to_fp64 = parity.compare_logits(fp64, ours).max_abs_diff
    print(f"{name}: T={len(ids)} max_abs_diff={diff.max_abs_diff:.3g} noise_floor={noise:.3g} "
          f"jaxllm_vs_fp64={to_fp64:.3g} max|logit|={np.abs(fp64).max():.1f}")
    assert ours.shape == (1, len(ids), smollm2.params.config.vocab_size)
    assert diff.max_abs_diff <= parity.REAL_MODEL_TOLERANCE
    assert diff.argmax_agreement == 1.0


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_twenty_greedy_tokens_equal_transformers(smollm2, smollm2_reference, name):
    ids = smollm2.tokenizer.encode(PROMPTS[name])
    expected = parity.reference_greedy(smollm2_reference, ids, 20, sorted(smollm2.tokenizer.eos_ids))
    assert generate(smollm2, ids, 20, use_cache=False).tokens == expected
    assert generate(smollm2, ids, 20).tokens == expected


def test_no_cache_generation_compiles_one_program_for_twenty_tokens(smollm2):
    before = compile_counts()["decode"]
    generate(smollm2, "Once upon a time", 20, use_cache=False)
    generate(smollm2, "Once upon a time, far", 20, use_cache=False)  # same buffer bucket: no new program
    assert compile_counts()["decode"] - before <= 1


@pytest.mark.slow
def test_cached_decode_equals_no_cache_and_transformers_for_64_tokens(smollm2, smollm2_reference):
    prompts = [PROMPTS["france"], "Write a short poem about the sea.", "List three prime numbers:"]
    eos = sorted(smollm2.tokenizer.eos_ids)
    batched = generate(smollm2, prompts, 64)
    for prompt, in_batch in zip(prompts, batched):
        ids = smollm2.tokenizer.encode(prompt)
        alone = generate(smollm2, ids, 64)
        assert alone.tokens == generate(smollm2, ids, 64, use_cache=False).tokens
        assert alone.tokens == parity.reference_greedy(smollm2_reference, ids, 64, eos)
        assert in_batch.tokens == alone.tokens  # left padding changes nothing


def test_streaming_callback_sees_every_token_in_order(smollm2):
    seen = []
    result = generate(smollm2, ["Hello", "The capital of France is"], 12, callback=lambda row, t: seen.append((row, t)))
    for row, r in enumerate(result):
        assert [t for rr, t in seen if rr == row] == r.tokens


def test_sampling_is_reproducible_with_a_key_and_top_k_one_is_greedy(smollm2):
    import jax

    settings = Sampling(temperature=0.9, top_k=50, top_p=0.95)
    a = generate(smollm2, "Tell me a story", 24, sampling=settings, key=jax.random.key(7)).tokens
    b = generate(smollm2, "Tell me a story", 24, sampling=settings, key=jax.random.key(7)).tokens
    c = generate(smollm2, "Tell me a story", 24, sampling=settings, key=jax.random.key(8)).tokens
    assert a == b and a != c
    greedy = generate(smollm2, "Tell me a story", 24).tokens
    assert generate(smollm2, "Tell me a story", 24, sampling=Sampling(temperature=0.9, top_k=1), key=jax.random.key(3)).tokens == greedy
