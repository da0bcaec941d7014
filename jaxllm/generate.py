"""Text generation on the pure forward: a KV-cached prefill + decode loop (default) and the no-cache reference path.

Shapes are bucketed (powers of two) so new prompt lengths within a bucket reuse the compiled programs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import InputError
from jaxllm.model import KVCache, Params, run

Array = jax.Array
MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise sample from softmax(logits / temperature), restricted to the top_k
    tokens (0: all) and to the smallest set whose probability reaches top_p (1.0: all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InputError(f"invalid sampling settings {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


GREEDY = Sampling()


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]  # the new token ids, up to and including EOS
    text: str | None  # the new tokens decoded (special tokens skipped); None without a tokenizer
    finish_reason: str  # "eos" or "length"


@dataclasses.dataclass(frozen=True)
class Model:
    """What generation needs: the parameter pytree and, for text in and out, a tokenizer."""

    params: Params
    tokenizer: object | None = None


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The next power of two >= n (at least `minimum`): the padded length a program is compiled for."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def sample(logits: Array, key: Array, sampling: Sampling) -> Array:
    """logits [B, V] -> token ids [B] (int32)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass before it is below top_p, so the most likely token always survives.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def positions_from_mask(mask: Array) -> Array:
    """Left padding: a row's real tokens are numbered 0, 1, ... whatever their slot (HF's cumsum(mask) - 1)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


# ---- the cached path: one prefill program, one decode-loop program -------------------------------------------


def _kv_mask(prompt_mask: Array, S: int) -> Array:
    """[B, S] over the cache slots: the prompt's mask, then every generated slot counts as a real token."""
    return jnp.concatenate([prompt_mask, jnp.ones((prompt_mask.shape[0], S - prompt_mask.shape[1]), prompt_mask.dtype)], 1)


@functools.partial(jax.jit, donate_argnames="cache")
def _prefill(params: Params, ids: Array, mask: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """ids, mask [B, P] (left-padded) -> logits of the last slot [B, V] and the cache with slots 0..P-1 filled."""
    kv_mask = _kv_mask(mask, cache.length)
    logits, cache = run(params, ids, positions_from_mask(mask), kv_mask, cache, offset=0, last_only=True)
    return logits[:, -1].astype(jnp.float32), cache


def _decode_step(params: Params, token: Array, position: Array, kv_mask: Array, cache: KVCache, slot: Array):
    """One token per row: token, position [B] at cache slot `slot` -> logits [B, V] and the updated cache."""
    logits, cache = run(params, token[:, None], position[:, None], kv_mask, cache, offset=slot)
    return logits[:, 0].astype(jnp.float32), cache


# XLA CPU options for the decode programs, each measured on the profile of a decode step: region analysis lets copy
# insertion prove that the cache's in-place update follows every read of it (without it XLA copied all L cache
# buffers on every step); the concurrency-optimized scheduler orders the small ops of a step better.
DECODE_COMPILER_OPTIONS = {
    "xla_cpu_copy_insertion_use_region_analysis": True,
    "xla_cpu_enable_concurrency_optimized_scheduler": True,
}
_decode_step_jit = jax.jit(_decode_step, donate_argnames="cache", compiler_options=DECODE_COMPILER_OPTIONS)


@functools.partial(jax.jit, static_argnames="sampling", donate_argnames="cache",
                   compiler_options=DECODE_COMPILER_OPTIONS)
def _decode_loop(params: Params, logits: Array, prompt_mask: Array, cache: KVCache, max_new: Array,
                 eos_ids: Array, pad_id: Array, key: Array, sampling: Sampling) -> tuple[Array, Array, KVCache]:
    """The whole decode inside one program (lax.while_loop), stopping early once every row has produced EOS.

    logits [B, V] from the prefill; prompt_mask [B, P]. Returns new tokens [B, S] (first max_new valid) and the
    number of steps taken, and the cache (returned so that the donated buffers are updated in place).
    Finished rows are fed `pad_id`, and their outputs are masked out.
    """
    B, P = prompt_mask.shape
    S = cache.length
    kv_mask = _kv_mask(prompt_mask, S)
    last_position = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32) - 1  # [B]

    def emit(state, logits):
        out, done, key, step = state[0], state[1], state[2], state[3]
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad_id, sample(logits, sub, sampling))
        return out.at[:, step].set(token), done | jnp.isin(token, eos_ids), key, token

    out, done, key, token = emit((jnp.zeros((B, S), jnp.int32), jnp.zeros(B, bool), key, 0), logits)

    def cond(state):
        step, done = state[0], state[2]
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, out, done, key, token, cache = state
        logits, cache = _decode_step(params, token, last_position + step, kv_mask, cache, P + step - 1)
        out, done, key, token = emit((out, done, key, step), logits)
        return step + 1, out, done, key, token, cache

    step, out, _, _, _, cache = jax.lax.while_loop(cond, body, (jnp.int32(1), out, done, key, token, cache))
    return out, step, cache


# ---- the no-cache reference path (Day 27): the full forward over a fixed-size buffer each step ------------------


@functools.partial(jax.jit, static_argnames="sampling", donate_argnames=("buffer", "mask"))
def _nocache_step(params: Params, buffer: Array, mask: Array, index: Array, key: Array, sampling: Sampling):
    """buffer, mask [B, S]; tokens live in slots < index. The causal mask hides the unused tail, so one program
    serves every step. Writes the next token at slot `index` and returns it [B]."""
    logits, _ = run(params, buffer, positions_from_mask(mask), mask)
    token = sample(jax.lax.dynamic_index_in_dim(logits, index - 1, axis=1, keepdims=False), key, sampling)
    buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, index))
    mask = jax.lax.dynamic_update_slice(mask, jnp.ones_like(mask[:, :1]), (0, index))
    return buffer, mask, token


def compile_counts() -> dict[str, int]:
    """How many programs each jitted entry point has compiled in this process."""
    fns = {"prefill": _prefill, "decode_loop": _decode_loop, "decode_step": _decode_step_jit, "nocache_step": _nocache_step}
    return {name: fn._cache_size() for name, fn in fns.items()}


# ---- the Python API -----------------------------------------------------------------------------------------


def _is_token_ids(value) -> bool:
    """A flat sequence of integers (a list, tuple or 1-D array): one prompt as ids."""
    if isinstance(value, np.ndarray | jax.Array):
        return value.ndim == 1 and np.issubdtype(value.dtype, np.integer)
    return isinstance(value, Sequence) and not isinstance(value, str) and all(
        isinstance(t, int | np.integer) and not isinstance(t, bool) for t in value)


def _as_batch(model: Model, prompts) -> tuple[list[list[int]], bool]:
    """One prompt or a list of them; each a string (needs a tokenizer) or token ids. Every id is checked against
    the vocabulary here, before padding, so an error names the prompt and position the user gave."""
    single = isinstance(prompts, str) or (_is_token_ids(prompts) and len(prompts) > 0)
    batch = [prompts] if single else list(prompts)
    if not batch:
        raise InputError("no prompt given")
    vocab = model.params.config.vocab_size
    ids = []
    for row, p in enumerate(batch):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise InputError("a text prompt needs a tokenizer; load the model with jaxllm.load_model or pass token ids")
            p = model.tokenizer.encode(p)
        if not _is_token_ids(p):
            raise InputError(f"prompt {row} must be a string or a sequence of integer token ids, found {type(p).__name__}")
        p = [int(t) for t in p]
        if not p:
            raise InputError(f"prompt {row} holds no tokens")
        bad = next((i for i, t in enumerate(p) if not 0 <= t < vocab), None)
        if bad is not None:
            where = f"prompt {row}, " if not single else ""
            raise InputError(f"token id {p[bad]} at {where}position {bad} is outside the vocabulary [0, {vocab})")
        ids.append(p)
    return ids, single


def _left_pad(prompts: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):], mask[row, length - len(p):] = p, 1
    return ids, mask


def generate(model: Model | Params, prompts, max_new_tokens: int = 20, *, use_cache: bool = True,
             sampling: Sampling = GREEDY, key: Array | None = None, eos_ids: Sequence[int] | None = None,
             callback: Callable[[int, int], None] | None = None):
    """Generate up to `max_new_tokens` per prompt, stopping each at its own EOS.

    `prompts`: a string or a list of token ids, or a list of those (a batch, left-padded). Returns a
    GenerationResult, or a list of them for a batch. `callback(row, token_id)` streams tokens as they are made
    (a Python loop over one jitted decode step); without it the cached decode runs as one compiled loop.
    `use_cache=False` runs the full forward over the whole sequence every step (the reference path).
    """
    model = model if isinstance(model, Model) else Model(model)
    params, config, tokenizer = model.params, model.params.config, model.tokenizer
    prompts_ids, single = _as_batch(model, prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, found {max_new_tokens!r}")
    if sampling.top_k > config.vocab_size:
        raise InputError(f"top_k ({sampling.top_k}) is larger than the vocabulary ({config.vocab_size})")
    if eos_ids is None:
        eos_ids = getattr(tokenizer, "eos_ids", None) or config.eos_token_ids
    eos_ids = sorted({int(e) for e in eos_ids})
    outside = [e for e in eos_ids if not 0 <= e < config.vocab_size]
    if outside:
        raise InputError(f"eos id(s) {outside} outside the vocabulary [0, {config.vocab_size})")
    pad_id = eos_ids[0] if eos_ids else 0
    longest = max(map(len, prompts_ids))
    if longest + max_new_tokens > config.max_position_embeddings and config.rope.rope_type != "dynamic":
        raise InputError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({config.max_position_embeddings})")
    key = jax.random.key(0) if key is None else key
    P = bucket(longest) if use_cache else longest
    S = bucket(P + max_new_tokens)
    ids, mask = _left_pad(prompts_ids, P, pad_id)
    eos = jnp.asarray(eos_ids or [-1], jnp.int32)  # -1: no token matches, decoding runs to max_new_tokens

    if use_cache:
        cache = KVCache.zeros(config, len(prompts_ids), S, params.embed_tokens.dtype)
        logits, cache = _prefill(params, jnp.asarray(ids), jnp.asarray(mask), cache)
        if callback is None:
            out, _, _ = _decode_loop(params, logits, jnp.asarray(mask), cache, jnp.int32(max_new_tokens), eos,
                                  jnp.int32(pad_id), key, sampling)
            out = np.asarray(out)[:, :max_new_tokens]
        else:
            out = _stream_cached(params, logits, mask, cache, max_new_tokens, eos, pad_id, key, sampling, callback)
    else:
        out = _stream_nocache(params, ids, mask, S, max_new_tokens, eos, pad_id, key, sampling, callback)
    results = [_result(p, row, set(eos_ids), tokenizer) for p, row in zip(prompts_ids, out)]
    return results[0] if single else results


def _stream_cached(params, logits, mask, cache, max_new, eos, pad_id, key, sampling, callback) -> np.ndarray:
    B, P = mask.shape
    kv_mask = _kv_mask(jnp.asarray(mask), cache.length)
    last_position = mask.sum(-1).astype(np.int32) - 1
    out, done = np.full((B, max_new), pad_id, np.int32), np.zeros(B, bool)
    for step in range(max_new):
        if step:
            logits, cache = _decode_step_jit(params, jnp.asarray(out[:, step - 1]), jnp.asarray(last_position + step),
                                             kv_mask, cache, jnp.int32(P + step - 1))
        key, sub = jax.random.split(key)
        out[:, step], done = _emit(np.asarray(sample(logits, sub, sampling)), done, eos, pad_id, callback)
        if done.all():
            break
    return out


def _stream_nocache(params, ids, mask, S, max_new, eos, pad_id, key, sampling, callback) -> np.ndarray:
    B, P = ids.shape
    buffer = jnp.asarray(np.pad(ids, ((0, 0), (0, S - P))))
    mask_buf = jnp.asarray(np.pad(mask, ((0, 0), (0, S - P))))
    out, done = np.full((B, max_new), pad_id, np.int32), np.zeros(B, bool)
    for step in range(max_new):
        key, sub = jax.random.split(key)
        buffer, mask_buf, token = _nocache_step(params, buffer, mask_buf, jnp.int32(P + step), sub, sampling)
        out[:, step], done = _emit(np.asarray(token), done, eos, pad_id, callback)
        if done.all():
            break
    return out


def _emit(tokens: np.ndarray, done: np.ndarray, eos: Array, pad_id: int, callback) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.where(done, pad_id, tokens)
    if callback is not None:
        for row in np.flatnonzero(~done):
            callback(int(row), int(tokens[row]))
    return tokens, done | np.isin(tokens, np.asarray(eos))


def _result(prompt: list[int], row: np.ndarray, eos_ids: set[int], tokenizer) -> GenerationResult:
    tokens = []
    for t in map(int, row):
        tokens.append(t)
        if t in eos_ids:
            break
    reason = "eos" if tokens and tokens[-1] in eos_ids else "length"
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    return GenerationResult(prompt_ids=prompt, tokens=tokens, text=text, finish_reason=reason)
