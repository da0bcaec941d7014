"""Text generation on the pure forward: prefill, one decode step, and the loop that repeats it.

    state = prefill(params, ids, mask, key, settings)   # the prompt in, the first token out
    state = decode_step(params, state, settings)        # one more token per row
    state = decode(params, state, settings)             # lax.while_loop over decode_step until EOS or the limit

`decode_step` is both the body of the compiled loop and the step of the streaming loop. With `use_cache` the
state carries a KV cache and a step feeds the last token alone; without it, a step runs the full forward over the
prompt and every token so far (the reference path). Shapes are bucketed (powers of two) so new prompt lengths
within a bucket reuse the compiled programs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Collection
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import InputError
from jaxllm.model import KVCache, Model, Params, check_inputs, input_shape, mesh_of, place_batch, program, run, write_rows
from jaxllm.model.ops import row_stable
from jaxllm.pytree import static, struct

Array = jax.Array
MIN_BUCKET = 16
SLACK = 16  # cache slots past prompt + max_new_tokens: a verify step writes up to widths[-1] - 1 of them
UNKNOWN_TOKEN = "\ufffd"  # how generated text shows a token id the tokenizer does not have


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise sample from softmax(logits / temperature), restricted to the top_k
    tokens (0: all) and to the smallest set whose probability reaches top_p (1.0: all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        def number(x) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        if not (number(self.temperature) and self.temperature >= 0 and isinstance(self.top_k, int)
                and not isinstance(self.top_k, bool) and self.top_k >= 0 and number(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"invalid sampling settings {self}: need a finite temperature >= 0, an integer top_k >= 0 "
                             "and a finite 0 < top_p <= 1")


GREEDY = Sampling()


@dataclasses.dataclass(frozen=True)
class Speculation:
    """Prompt-lookup speculation: each step proposes the tokens that followed the latest earlier occurrence of the
    row's last n tokens (n from max_ngram down to min_ngram) in its prompt and output so far, and one forward of the
    target checks them all. A verify step runs the smallest of `widths` that holds every row's last token and
    proposals, or a plain one-token step when no row proposes. A row proposes at most k tokens: k starts at `start`,
    grows to what the next width holds while every proposal is accepted (a long copy), and on a miss shrinks to the
    count accepted but never below what the smallest width holds (fewer proposals would leave its slots idle at the
    same cost). After `patience` proposing steps in a row that accept none of their proposals, the row waits 1, 3,
    7, then 15 steps before it proposes again. (On this CPU, with the row kernel (ops.row_products), a verify step
    of one row over 4 positions costs about 1.25x a plain row-stable step and over 8 about 1.5x; patience 4 made
    1.46-1.54 tokens a step on the bench's grounded prompts against 1.41-1.43 with 2, and cost open-ended text
    1-2 %.)"""

    max_ngram: int = 3
    min_ngram: int = 1
    start: int = 3
    widths: tuple[int, ...] = (4, 8)
    patience: int = 4

    def __post_init__(self):
        if not (1 <= self.min_ngram <= self.max_ngram and 1 <= self.start < max(self.widths, default=0)
                and isinstance(self.patience, int) and self.patience >= 1
                and all(isinstance(w, int) and 2 <= w <= SLACK for w in self.widths)
                and list(self.widths) == sorted(set(self.widths))):
            raise InputError(f"invalid speculation settings {self}: need 1 <= min_ngram <= max_ngram, widths "
                             f"between 2 and {SLACK} in increasing order, 1 <= start < the largest width and "
                             "patience >= 1")

    @property
    def k(self) -> int:
        """The most tokens one verify step checks."""
        return self.widths[-1] - 1


SPECULATE = {"lookup": Speculation(), "draft": Speculation()}  # "draft": proposals from generate's draft model


@struct
class GenerationSettings:
    """How to generate: a pytree whose numbers are traced (a new limit or EOS id compiles nothing new) and whose
    shape-setting fields are static."""

    max_new_tokens: int  # stop after this many new tokens (at most length - P)
    eos_ids: tuple[int, ...] = ()  # a row stops at the first of these it produces; () runs to max_new_tokens
    pad_id: int = 0  # fed to, and reported for, rows that have stopped
    sampling: Sampling = static(default=GREEDY)
    length: int = static(default=0)  # S: prompt slots + new-token slots (+ the most a verify step writes past them)
    use_cache: bool = static(default=True)
    speculation: Speculation | None = static(default=None)
    # decode steps run row-stable (ops.row_stable), so that a speculative run's verified positions are bit for bit
    # those of a plain one; `generate` sets it wherever the model can speculate (see speculation_refused)
    row_stable: bool = static(default=False)

    def check(self, config, prompt_slots: int) -> None:
        """InputError naming the setting that cannot run with this model and a prompt of `prompt_slots` slots."""
        if not 1 <= int(self.max_new_tokens) <= self.length - prompt_slots:
            raise InputError(f"max_new_tokens ({int(self.max_new_tokens)}) must be between 1 and length - prompt "
                             f"slots ({self.length} - {prompt_slots})")
        if self.length > np.iinfo(np.int32).max:  # steps, positions and cache slots run as int32
            raise InputError(f"max_new_tokens ({int(self.max_new_tokens)}) needs {self.length} cache slots (length), "
                             f"more than int32 positions reach ({np.iinfo(np.int32).max})")
        outside = [int(e) for e in self.eos_ids if not 0 <= int(e) < config.vocab_size]
        if outside:
            raise InputError(f"eos id(s) {outside} outside the vocabulary [0, {config.vocab_size})")
        if not 0 <= int(self.pad_id) < config.vocab_size:
            raise InputError(f"pad id {int(self.pad_id)} outside the vocabulary [0, {config.vocab_size})")
        if self.sampling.top_k > config.vocab_size:
            raise InputError(f"top_k ({self.sampling.top_k}) is larger than the vocabulary ({config.vocab_size})")


@struct
class DecodeState:
    """Everything the decode loop carries, by name."""

    step: Array  # [] int32: new tokens made so far
    tokens: Array  # [B, S - P] int32: the new tokens in [:, :step]; a row holds pad_id after its EOS
    done: Array  # [B] bool: the row has produced an EOS
    key: Array  # the PRNG key the next token is sampled with
    prompt: Array  # [B, P] int32, left-padded
    prompt_mask: Array  # [B, P]: 1 for the prompt's real tokens
    cache: KVCache | None  # keys and values of the prompt and every token fed so far; None on the reference path


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]  # the new token ids, up to and including EOS
    text: str | None  # the new tokens decoded (special tokens skipped); None without a tokenizer
    finish_reason: str  # "eos" or "length"


def end_ids(model: Model, eos_ids: Sequence[int] | None = None, name: str = "eos_ids") -> tuple[int, ...]:
    """The ids that end a generation, sorted: `eos_ids` if given (InputError naming `name` unless it is a collection
    of integers: a list, tuple, set or array), else the tokenizer's, else the config's."""
    if eos_ids is None:
        eos_ids = getattr(model.tokenizer, "eos_ids", None) or model.params.config.eos_token_ids
    elif isinstance(eos_ids, str | bytes) or not isinstance(eos_ids, Collection) or not all(
            isinstance(e, int | np.integer) and not isinstance(e, bool) for e in eos_ids):
        raise InputError(f"{name} must be a sequence of integer token ids, found {eos_ids!r:.80}")
    return tuple(sorted({int(e) for e in eos_ids}))


def check_key(key) -> None:
    """InputError unless `key` is a JAX PRNG key: jax.random.key(seed), or the raw uint32 [2] of jax.random.PRNGKey."""
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
    raw = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
    if not (typed or raw):
        hint = f"jax.random.key({key})" if isinstance(key, int | np.integer) else "jax.random.key(seed)"
        raise InputError(f"key must be a JAX PRNG key, found {key!r:.80}; pass {hint}")


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The next power of two >= n (at least `minimum`): the padded length a program is compiled for."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def sample(logits: Array, key: Array, sampling: Sampling) -> Array:
    """logits [B, V] -> token ids [B] (int32), every row under the same settings and key."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    B = logits.shape[0]
    if sampling.top_k == 0 and sampling.top_p >= 1.0:  # nothing to filter: no sort
        return jax.random.categorical(key, logits.astype(jnp.float32) / sampling.temperature, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, jnp.full(B, sampling.temperature, jnp.float32), jnp.full(B, sampling.top_k),
                             jnp.full(B, sampling.top_p, jnp.float32))
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def filter_logits(logits: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """logits [B, V] / temperature [B], with -inf outside each row's top_k [B] tokens (0: all) and outside the
    smallest set whose probability reaches top_p [B] (1.0: all). Ties at a cut are kept."""
    V = logits.shape[-1]
    logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sorted_logits = -jnp.sort(-logits, axis=-1)  # [B, V], descending
    in_top_k = (jnp.arange(V) < top_k[:, None]) | (top_k[:, None] == 0)  # [B, V] over the sorted order
    sorted_logits = jnp.where(in_top_k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass before it is below top_p, so the most likely token always survives.
    # (top_p 1.0 keeps all: an fp32 running sum can reach 1.0 before the last tokens.)
    keep = in_top_k & (((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1))
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_rows(logits: Array, keys: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """logits [B, V] -> token ids [B] (int32), each row under its own settings [B] and PRNG key [B]: greedy where
    temperature is 0. The sort that filtering needs runs only when some row samples."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled() -> Array:
        filtered = filter_logits(logits, temperature, top_k, top_p)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def next_logits(params: Params, cache: KVCache, last: Array, live: Array | None = None,
                window: int | None = None) -> tuple[Array, KVCache]:
    """The decode step's forward, shared by `generate` and the serving engine: each row's last token [B] at the row's
    next position (the count of real tokens in its cache, so left padding and right padding both number from 0),
    written at the row's own next slot -> (logits [B, V] fp32, cache). Rows where `live` [B] is False write a masked
    slot and keep their index; `window` limits attention to the cache's first W slots."""
    positions = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]  # [B, 1]
    if live is not None:  # idle rows at position 0: dynamic and longrope scaling read the batch's largest position
        positions = jnp.where(live[:, None], positions, 0)
    logits, new = run(params, last[:, None], positions, None if live is None else live[:, None], cache, window=window)
    if live is not None:
        new = new.replace(index=jnp.where(live, new.index, cache.index))
    return logits[:, 0].astype(jnp.float32), new


def seed_key(seed: int) -> Array:
    """jax.random.key(seed) for 0 <= seed < 2**32, made from its key data without tracing a program (a warm start
    runs no trace at all); other seeds go through jax.random.key."""
    if not -2**63 <= seed < 2**63:  # jax.random.key reads the seed as an int64
        raise InputError(f"seed must be between -2**63 and 2**63 - 1, found {seed}")
    if not 0 <= seed < 2**32:
        return jax.random.key(seed)
    return jax.random.wrap_key_data(jax.device_put(np.array([0, seed], np.uint32)))


def positions_from_mask(mask: Array) -> Array:
    """Left padding: a row's real tokens are numbered 0, 1, ... whatever their slot (HF's cumsum(mask) - 1)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as ids and mask [B, length] (int32), each right-aligned; the mask is 1 on real tokens."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):], mask[row, length - len(p):] = p, 1
    return ids, mask


# ---- the programs ---------------------------------------------------------------------------------------------


def _advance(state: DecodeState, logits: Array, settings: GenerationSettings) -> DecodeState:
    """Sample the next token from logits [B, V] and record it; rows that have stopped get pad_id."""
    key, sub = jax.random.split(state.key)
    token = jnp.where(state.done, settings.pad_id, sample(logits, sub, settings.sampling))  # [B]
    eos = jnp.asarray(settings.eos_ids or (-1,), jnp.int32)  # -1: no token matches
    return state.replace(step=state.step + 1, tokens=state.tokens.at[:, state.step].set(token),
                         done=state.done | jnp.isin(token, eos), key=key)


def running(state: DecodeState, settings: GenerationSettings) -> Array:
    """[] bool: some row still needs tokens."""
    return (state.step < settings.max_new_tokens) & ~jnp.all(state.done)


def _prefill(params: Params, ids: Array, mask: Array, key: Array, settings: GenerationSettings) -> DecodeState:
    B, P = ids.shape
    state = DecodeState(step=jnp.int32(0), tokens=jnp.full((B, settings.length - P), settings.pad_id, jnp.int32),
                        done=jnp.zeros(B, bool), key=key, prompt=ids, prompt_mask=mask, cache=None)
    if not settings.use_cache:  # nothing to keep: the first decode step reads the prompt
        return state
    cache = KVCache.zeros(params.config, B, settings.length, params.dtype)
    logits, cache = run(params, ids, positions_from_mask(mask), mask, cache, last_only=True)
    return _advance(state.replace(cache=cache), logits[:, -1].astype(jnp.float32), settings)


def _decode_step(params: Params, state: DecodeState, settings: GenerationSettings) -> DecodeState:
    """One more token per row (jitted as `decode_step`; the state's buffers are donated)."""
    P = state.prompt.shape[1]
    if state.cache is None:  # the reference path: the prompt and every new token through the full forward
        ids = jnp.concatenate([state.prompt, state.tokens], axis=1)  # [B, S]
        made = jnp.arange(state.tokens.shape[1]) < state.step
        mask = jnp.concatenate([state.prompt_mask.astype(bool), jnp.broadcast_to(made, state.tokens.shape)], 1)
        logits, cache = run(params, ids, positions_from_mask(mask), mask)
        logits = jax.lax.dynamic_index_in_dim(logits, P + state.step - 1, axis=1, keepdims=False)  # [B, V]
    else:  # the last token alone, at the next position of its row
        last = jax.lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1, keepdims=False)  # [B]
        with row_stable() if settings.row_stable else contextlib.nullcontext():
            logits, cache = next_logits(params, state.cache, last)
    return _advance(state.replace(cache=cache), logits.astype(jnp.float32), settings)


def _decode(params: Params, state: DecodeState, settings: GenerationSettings) -> DecodeState:
    """decode_step until every row has stopped or max_new_tokens are made, in one compiled lax.while_loop (jitted as
    `decode`; the state's buffers are donated)."""
    return jax.lax.while_loop(lambda s: running(s, settings), lambda s: _decode_step(params, s, settings), state)


# ---- speculative decoding: prompt lookup, verified in one forward ------------------------------------------------


@struct
class SpeculativeState:
    """The decode state, with what each row of a speculative loop keeps on its own: rows accept different numbers of
    tokens per step, so each has its own count of tokens made (state.step is the largest)."""

    state: DecodeState
    made: Array  # [B] int32: the row's new tokens so far, in state.tokens[:, :made]
    k: Array  # [B] int32: the most tokens the row proposes next
    wait: Array  # [B] int32: steps before the row proposes again
    misses: Array  # [B] int32: consecutive proposing steps whose proposals were all rejected
    proposed: Array  # [B] int32: tokens proposed, over the whole generation
    accepted: Array  # [B] int32: of those, tokens accepted
    steps: Array  # [B] int32: forward steps (plain or verify) that made the row's tokens
    draft: KVCache | None = None  # the draft model's cache, holding what the target's holds (draft proposer only)


def lookup(history: Array, start: Array, end: Array, spec: Speculation) -> tuple[Array, Array]:
    """Prompt lookup. history [B, L] holds each row's tokens in [start, end) ([B] each). -> (proposals [B, k], count
    [B]): the up to k tokens that followed the latest earlier occurrence of the row's last n tokens, for the largest
    n in max_ngram..min_ngram that occurs; count 0 where none does."""
    B, L = history.shape
    K = spec.k
    slots = jnp.arange(L)
    found, where = jnp.zeros(B, bool), jnp.zeros(B, jnp.int32)  # where: the slot after the chosen occurrence
    for n in range(spec.max_ngram, spec.min_ngram - 1, -1):
        last = jax.vmap(lambda h, e: jax.lax.dynamic_slice(h, (e - n,), (n,)))(history, jnp.maximum(end, n))  # [B, n]
        match = (slots >= start[:, None]) & (slots + n < end[:, None]) & (end - start >= n)[:, None]  # [B, L]
        for i in range(n):  # match[b, j]: history[b, j + i] == last[b, i] for every i
            match &= jnp.roll(history, -i, axis=1) == last[:, i:i + 1]
        latest = jnp.max(jnp.where(match, slots, -1), axis=1)  # [B]
        use = ~found & (latest >= 0)
        found, where = found | use, jnp.where(use, latest + n, where)
    proposals = jax.vmap(lambda h, w: jax.lax.dynamic_slice(jnp.pad(h, (0, K)), (w,), (K,)))(history, where)
    return proposals, jnp.where(found, jnp.minimum(end - where, K), 0)


def verify(logits: Array, proposals: Array, count: Array, sampling: tuple[Array, Array, Array] | None = None,
           keys: Array | None = None) -> tuple[Array, Array]:
    """The target's verdict on each row's proposals: logits [B, W, V] at the row's last token and its W - 1
    proposals [B, W - 1], of which the first count [B] are real. -> (choice [B, W], accepted [B]): the first
    `accepted` proposals are kept and choice[:, accepted] is the target's own next token (choice[:, :accepted]
    repeats the proposals; later entries are not used).

    Greedy (sampling None, or a row's temperature 0): a proposal is kept while it is the target's argmax.
    Sampling, with (temperature, top_k, top_p) [B] each and a PRNG key [B] per row: the speculative-sampling rule
    for a proposer that names one token (q = 1 at it). Proposal x is kept with probability min(1, p(x)/q(x)) = p(x),
    p the target's filtered distribution; at the first rejection the token is drawn from the residual
    max(0, p - q) normalised, which is p without x; after all are kept, from p. Each token then has exactly the
    target's distribution."""
    B, W, V = logits.shape
    real = jnp.arange(W - 1) < count[:, None]  # [B, W - 1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, W]
    agree = (proposals == greedy[:, :W - 1]) & real
    greedy_accepted = jnp.sum(jnp.cumprod(agree, axis=1), axis=1, dtype=jnp.int32)
    if sampling is None:
        return greedy, greedy_accepted
    temperature, top_k, top_p = sampling

    def sampled() -> tuple[Array, Array]:
        filtered = filter_logits(logits.reshape(B * W, V), *(jnp.repeat(x, W) for x in sampling)).reshape(B, W, V)
        p = jax.nn.softmax(filtered, axis=-1)  # [B, W, V]
        p_x = jnp.take_along_axis(p[:, :W - 1], proposals[..., None], axis=-1)[..., 0]  # [B, W - 1]
        coins = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 0), (W - 1,)))(keys)
        accepted = jnp.sum(jnp.cumprod((coins < p_x) & real, axis=1), axis=1, dtype=jnp.int32)  # [B]
        at = jnp.take_along_axis(filtered, accepted[:, None, None], axis=1)[:, 0]  # [B, V]: where the draw is made
        rejected = jnp.pad(proposals, ((0, 0), (0, 1)), constant_values=-1)[jnp.arange(B), accepted]  # -1: none
        at = jnp.where((jnp.arange(V) == rejected[:, None]) & (accepted < count)[:, None], -jnp.inf, at)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, 1), row))(keys, at)
        choice = jnp.where(jnp.arange(W) < accepted[:, None], jnp.pad(proposals, ((0, 0), (0, 1))), drawn[:, None])
        hot = temperature > 0
        return jnp.where(hot[:, None], choice, greedy).astype(jnp.int32), jnp.where(hot, accepted, greedy_accepted)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: (greedy, greedy_accepted))


def width_index(count: Array, spec: Speculation) -> Array:
    """[] int32: which of (1, *spec.widths) a step runs for proposal counts [B]: the smallest that holds every row's
    last token and proposals (0, the plain one-token step, when no row proposes)."""
    fits = jnp.searchsorted(jnp.asarray(spec.widths) - 1, jnp.max(count)) + 1
    return jnp.where(jnp.max(count) == 0, 0, fits).astype(jnp.int32)


def verify_step(params: Params, cache: KVCache, last: Array, proposals: Array, count: Array, live: Array,
                stop: Array, room: Array, spec: Speculation, sampling: tuple[Array, Array, Array] | None = None,
                keys: Array | None = None, window: int | None = None, width: int | None = None):
    """One forward of the target, row-stable, over each row's last token [B] and its first count [B] proposals
    [B, k] at the row's next positions (the smallest of spec.widths that holds them all, or a plain one-token step
    when no row proposes); rows where live [B] is False write masked slots and make nothing. -> (choice [B, k + 1],
    made [B], accepted [B], stopped [B], cache): the row's new tokens are choice[:, :made], its accepted proposals
    and the target's own token, cut after the first of its stop ids [B, M] (stopped: one was made) and at room [B]
    tokens; the cache keeps the slots of the fed tokens that are kept (the last and the accepted) and forgets the
    rest. `sampling`, `keys`: see `verify`; `window`: see `run`. `width` (static): run that width, which must hold
    every row's proposals (the compiled loop picks it, see `_speculative_decode`); None: pick it here, in a
    lax.switch, whose branches copy the cache on XLA:CPU."""
    B, K = proposals.shape
    positions = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]  # [B, 1]: the row's next position

    def forward(width: int):
        def run_width():
            ids = jnp.concatenate([last[:, None], proposals[:, :width - 1]], axis=1)  # [B, width]
            with row_stable():
                logits, new = run(params, ids, positions + jnp.arange(width), jnp.broadcast_to(live[:, None], ids.shape),
                                  cache, window=window)
            choice, accepted = verify(logits.astype(jnp.float32), proposals[:, :width - 1], count, sampling, keys)
            return jnp.pad(choice, ((0, 0), (0, K + 1 - width)), constant_values=-2), accepted, new  # -2: no id
        return run_width

    if width is None:
        choice, accepted, new = jax.lax.switch(width_index(count, spec), [forward(w) for w in (1, *spec.widths)])
    else:
        choice, accepted, new = forward(width)()
    stops = jnp.any(choice[:, :, None] == stop[:, None, :], axis=-1)  # [B, k + 1]
    first_stop = jnp.min(jnp.where(stops, jnp.arange(K + 1), K + 1), axis=1)
    made = jnp.where(live, jnp.minimum(jnp.minimum(accepted, first_stop) + 1, room), 0)  # [B] new tokens
    index = cache.index + made  # the fed tokens kept: the last and those accepted
    new = new.replace(index=index, mask=new.mask & (jnp.arange(cache.length) < index[:, None]))
    return choice, made, accepted, made > first_stop, new


def adapt(k: Array, wait: Array, misses: Array, count: Array, accepted: Array,
          spec: Speculation) -> tuple[Array, Array, Array]:
    """Each row's next k, wait and misses [B] after a step that proposed count [B] and accepted `accepted` [B]: when
    all are accepted k grows to what the next width holds, on a miss it shrinks to the count accepted but not below
    what the smallest width holds; after `patience` proposing steps in a row that accept nothing, the row waits 1,
    3, 7, then 15 steps."""
    held = jnp.asarray(spec.widths) - 1  # the proposals each width holds
    proposing = count > 0
    missed = proposing & (accepted == 0)
    misses = jnp.where(proposing, jnp.where(missed, misses + 1, 0), misses)
    grown = held[jnp.minimum(jnp.searchsorted(held, k, side="right"), len(held) - 1)]
    k = jnp.where(proposing, jnp.where(accepted == count, grown, jnp.maximum(accepted, held[0])), k)
    wait = jnp.where(missed & (misses >= spec.patience), (1 << jnp.minimum(misses - spec.patience + 1, 4)) - 1,
                     jnp.maximum(wait - 1, 0))
    return k, wait, misses


def propose(draft: Params, cache: KVCache, last: Array, count: Array, K: int,
            window: int | None = None) -> tuple[Array, KVCache]:
    """The draft model's greedy proposals: from each row's last token [B], count [B] tokens one forward at a time
    (the rows that propose fewer write masked slots) -> (proposals [B, K], the draft's cache with the row's last
    token and its first count - 1 proposals fed). `window`: see `run`."""
    B = last.shape[0]

    def feed(i, carry):
        token, proposals, cache = carry
        logits, cache = next_logits(draft, cache, token, live=i < count, window=window)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return token, proposals.at[:, i].set(token), cache

    _, proposals, cache = jax.lax.fori_loop(0, jnp.max(count), feed, (last, jnp.zeros((B, K), jnp.int32), cache))
    return proposals, cache


def follow(draft: Params, drafted: KVCache, target: KVCache, last: Array, proposals: Array, count: Array,
           made: Array, window: int | None = None) -> KVCache:
    """The draft's cache after a verify step: it keeps what the target kept (`target`'s index and mask). It has
    not fed its last proposal (or, proposing nothing, the last token [B]): where the target kept that too (made [B]
    > count [B]), it is fed now, in one masked forward."""
    behind = made > count
    missing = jnp.take_along_axis(jnp.concatenate([last[:, None], proposals], axis=1), count[:, None], axis=1)[:, 0]
    drafted = jax.lax.cond(jnp.any(behind), lambda c: next_logits(draft, c, missing, live=behind, window=window)[1],
                           lambda c: c, drafted)
    return drafted.replace(index=target.index, mask=drafted.mask & target.mask)


def _counts(s: SpeculativeState, settings: GenerationSettings, lookup_proposals: bool) -> tuple[Array | None, Array]:
    """What each row proposes next: (proposals [B, k] by prompt lookup, or None for the draft model to make, and
    count [B], 0 for rows that have finished or wait)."""
    spec, st = settings.speculation, s.state
    P = st.prompt.shape[1]
    quiet = st.done | (s.made >= settings.max_new_tokens) | (s.wait > 0)
    if not lookup_proposals:
        return None, jnp.where(quiet, 0, s.k)
    history = jnp.concatenate([st.prompt, st.tokens], axis=1)  # [B, P + N]; left padding: a row's tokens are contiguous
    start, end = P - jnp.sum(st.prompt_mask, axis=1, dtype=jnp.int32), P + s.made
    proposals, count = lookup(history, start, end, spec)
    return proposals, jnp.where(quiet, 0, jnp.minimum(count, s.k))  # [B]


def _speculative_step(params: Params, s: SpeculativeState, settings: GenerationSettings,
                      draft: Params | None = None, width: int | None = None) -> SpeculativeState:
    """One forward for every row: its last token and its proposals (none: a plain one-token step), the longest
    agreeing prefix accepted plus the target's own next token, and the cache rolled back past the rejected slots.
    The proposals come from prompt lookup, or from `draft` (a model with the target's vocabulary, its cache in s).
    `width`: see `verify_step`."""
    spec, st = settings.speculation, s.state
    B = st.prompt.shape[0]
    finished = st.done | (s.made >= settings.max_new_tokens)
    last = jnp.take_along_axis(st.tokens, jnp.maximum(s.made - 1, 0)[:, None], axis=1)  # [B, 1]
    proposals, count = _counts(s, settings, draft is None)
    if draft is not None:
        proposals, drafted = propose(draft, s.draft, last[:, 0], count, spec.k)
    cache = st.cache
    key, draw = jax.random.split(st.key)
    hot = settings.sampling.temperature > 0
    sampling = tuple(jnp.full(B, x) for x in dataclasses.astuple(settings.sampling)) if hot else None
    choice, made, accepted, stopped, new = verify_step(
        params, cache, last[:, 0], proposals, count, ~finished, jnp.asarray([settings.eos_ids or (-1,)] * B, jnp.int32),
        settings.max_new_tokens - s.made, spec, sampling, jax.random.split(draw, B) if hot else None, width=width)
    written = jnp.where(jnp.arange(spec.k + 1) < made[:, None], choice, settings.pad_id)  # [B, k + 1]
    tokens = write_rows(st.tokens, written, s.made, axis=1)
    if draft is not None:
        drafted = follow(draft, drafted, new, last[:, 0], proposals, count, made)
    total = s.made + made
    state = st.replace(step=jnp.max(total), tokens=tokens, cache=new, key=key if hot else st.key,
                       done=st.done | stopped)
    return SpeculativeState(state, total, *adapt(s.k, s.wait, s.misses, count, accepted, spec),
                            proposed=s.proposed + count,
                            accepted=s.accepted + jnp.minimum(accepted, jnp.maximum(made - 1, 0)),
                            steps=s.steps + ~finished, draft=None if draft is None else drafted)


def speculative_start(state: DecodeState, settings: GenerationSettings,
                      draft_cache: KVCache | None = None) -> SpeculativeState:
    """The speculative loop's state after prefill: every row at state.step tokens, proposing `start` at first."""
    B = state.done.shape[0]
    zeros = [jnp.zeros(B, jnp.int32) for _ in range(5)]  # five buffers: the streaming step donates each
    return SpeculativeState(state, jnp.full(B, state.step, jnp.int32), jnp.full(B, settings.speculation.start,
                                                                                jnp.int32), *zeros, draft=draft_cache)


def speculating(done, made, settings: GenerationSettings):
    """Some row still needs tokens: done, made [B] (traced arrays, or the host's numpy ones)."""
    return (~done & (made < settings.max_new_tokens)).any()


def _speculative_decode(params: Params, state: DecodeState, settings: GenerationSettings, draft: Params | None = None,
                        draft_cache: KVCache | None = None) -> SpeculativeState:
    """_speculative_step until every row has stopped, in one compiled program (jitted as `speculative_decode`): a
    lax.while_loop whose body runs one inner while_loop per width (1, *widths), each taking the steps that need its
    width, so that the cache is updated in place (a lax.switch over the widths copied it: 9 % of a step)."""
    widths = (1, *settings.speculation.widths)

    def at_width(i: int):
        def needs_it(s):
            return speculating(s.state.done, s.made, settings) & (
                width_index(_counts(s, settings, draft is None)[1], settings.speculation) == i)
        return lambda s: jax.lax.while_loop(needs_it, lambda s: _speculative_step(params, s, settings, draft, widths[i]), s)

    def each_width(s):
        for i in range(len(widths)):
            s = at_width(i)(s)
        return s

    return jax.lax.while_loop(lambda s: speculating(s.state.done, s.made, settings), each_width,
                              speculative_start(state, settings, draft_cache))


def _draft_prefill(draft: Params, ids: Array, mask: Array, settings: GenerationSettings) -> KVCache:
    """The draft model's cache after the prompt (ids, mask [B, P]), in the target's slot layout."""
    cache = KVCache.zeros(draft.config, ids.shape[0], settings.length, draft.dtype)
    return run(draft, ids, positions_from_mask(mask), mask, cache, last_only=True)[1]


# XLA CPU options for the decode programs, each measured on the profile of a decode step: region analysis lets copy
# insertion prove that the cache's in-place update follows every read of it (without it XLA copies all L cache
# buffers on every step); the concurrency-optimized scheduler orders the small ops of a step better. Loop-invariant
# code motion would hoist every quantized weight's convert to f32 out of the decode loop, so that each step reads
# f32 copies made once before it (4 bytes a weight instead of 1, or of 0.6 for GGUF blocks). Reductions stay XLA's
# own (YNNPACK takes dots only): YNNPACK's reduce sums in an order that changed with the shape and the program
# around it (a softmax over the same scores, one query of a verify step against a plain step's, differed in the
# last bit for batches of 2 or more; a [32, O] projection written as a reduction against a [1, O] one), which
# breaks the row-stable steps speculation needs (ops.row_stable).
DECODE_COMPILER_OPTIONS = {
    "xla_cpu_copy_insertion_use_region_analysis": True,
    "xla_cpu_enable_concurrency_optimized_scheduler": True,
    "xla_disable_hlo_passes": "while-loop-invariant-code-motion",
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
_prefill_program = program(_prefill, "prefill")
decode_step = program(_decode_step, "decode_step", donate_argnames="state", compiler_options=DECODE_COMPILER_OPTIONS)
decode = program(_decode, "decode", donate_argnames="state", compiler_options=DECODE_COMPILER_OPTIONS)
speculative_decode = program(_speculative_decode, "speculative_decode", donate_argnames=("state", "draft_cache"),
                             compiler_options=DECODE_COMPILER_OPTIONS)
draft_prefill = program(_draft_prefill, "draft_prefill")
speculative_step = program(_speculative_step, "speculative_step", donate_argnames="s",
                           compiler_options=DECODE_COMPILER_OPTIONS)


def prefill(params: Params, ids, mask, key: Array, settings: GenerationSettings) -> DecodeState:
    """The prompt in: ids, mask [B, P] (left-padded, see `left_pad`) -> the decode state. With a cache, the prompt's
    keys and values fill slots 0..P-1 and the first token is sampled (step 1); without one, step 0."""
    settings.check(params.config, input_shape("ids", ids)[1])
    check_inputs(params.config, ids, np.zeros(np.shape(ids), np.int32), mask)
    check_key(key)
    return _prefill_program(params, *place_batch(params, ids, mask), key, settings)


# ---- the Python API -----------------------------------------------------------------------------------------


def _is_token_ids(value) -> bool:
    """A flat sequence of integers (a list, tuple or 1-D array): one prompt as ids. Bytes are not token ids."""
    if isinstance(value, np.ndarray | jax.Array):
        return value.ndim == 1 and np.issubdtype(value.dtype, np.integer)
    return isinstance(value, list | tuple) and all(isinstance(t, int | np.integer) and not isinstance(t, bool)
                                                   for t in value)


def _as_batch(model: Model, prompts) -> tuple[list[list[int]], bool]:
    """One prompt or a list of them; each a string (needs a tokenizer) or token ids. Every id is checked against
    the vocabulary here, before padding, so an error names the prompt and position the user gave."""
    single = isinstance(prompts, str) or (_is_token_ids(prompts) and len(prompts) > 0)
    if not single and not isinstance(prompts, list | tuple | np.ndarray | jax.Array):
        raise InputError(f"prompts must be a string, a sequence of token ids, or a list of those; found "
                         f"{type(prompts).__name__}")
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


def _stream(params: Params, state: DecodeState, settings: GenerationSettings,
            callback: Callable[[int, int], None], rows: int) -> DecodeState:
    """decode_step from Python, handing each of the first `rows` rows' new token to callback(row, token) as soon as
    it exists (rows after them only fill the batch up to a multiple of dp)."""
    reported, done = 0, np.zeros(state.done.shape, bool)  # done: rows that had stopped before the token reported
    while True:
        if int(to_host(state.step)) > reported:  # prefill and each step make at most one token per row
            tokens = to_host(state.tokens)[:, reported]
            for row in np.flatnonzero(~done[:rows]):
                callback(int(row), int(tokens[row]))
            reported += 1
        done = to_host(state.done)
        if int(to_host(state.step)) >= settings.max_new_tokens or done.all():  # `running`, on the host
            return state
        state = decode_step(params, state, settings)


def speculation_refused(params: Params) -> str | None:
    """Why this model cannot speculate (None: it can): the models whose decode is not made row-stable yet."""
    config = params.config
    return ("latent attention" if config.kv_lora_rank else
            "mixture-of-experts layers (their rows are not made row-stable yet)" if config.num_experts else
            f"{config.rope.rope_type} RoPE (it scales by the largest position in a call)"
            if config.rope.rope_type in ("dynamic", "longrope") else None)


def speculation_settings(speculate, params: Params, use_cache: bool, draft: Model | None) -> Speculation | None:
    """The Speculation `speculate` names (None, "lookup", "draft" or a Speculation) and the draft model it uses, or
    InputError naming what it cannot run with."""
    if speculate is None and draft is None:
        return None
    if isinstance(speculate, Speculation):  # the settings given, with a draft model or by lookup
        spec = speculate
    elif speculate is None:  # a draft model alone
        spec = Speculation()
    elif not isinstance(speculate, str) or speculate not in SPECULATE:
        raise InputError(f"speculate must be one of {sorted(SPECULATE)} or a Speculation, found {speculate!r:.80}")
    elif speculate == "draft" and draft is None:
        raise InputError("speculate='draft' needs draft=<a model>")
    elif speculate != "draft" and draft is not None:
        raise InputError(f"speculate={speculate!r} takes no draft model; pass speculate='draft'")
    else:
        spec = SPECULATE[speculate]
    why = ("use_cache=False (verification reads the cache)" if not use_cache else speculation_refused(params))
    if why:
        raise InputError(f"speculate={speculate!r} cannot run with {why}")
    if draft is not None:
        if draft.params.config.vocab_size != params.config.vocab_size:
            raise InputError(f"the draft model's vocabulary ({draft.params.config.vocab_size}) is not the target's "
                             f"({params.config.vocab_size}): a draft must share the target's tokenizer")
        if mesh_of(draft.params) != mesh_of(params):
            raise InputError(f"the draft model's mesh ({mesh_of(draft.params)}) is not the target's "
                             f"({mesh_of(params)}): load the draft with the target's mesh")
    return spec


def self_draft(model: Model | Params, layers: int) -> Model:
    """The shallow self-draft: the target's first `layers` decoder layers, then its own final norm and head. It
    needs no second checkpoint (its arrays are the target's, not copies) and proposes for `generate(...,
    draft=self_draft(model, n))`."""
    model = model if isinstance(model, Model) else Model(model)
    config = model.params.config
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers < config.num_hidden_layers:
        raise InputError(f"a self-draft takes 1 to {config.num_hidden_layers - 1} of the target's "
                         f"{config.num_hidden_layers} layers, found {layers!r}")
    cut = {name: getattr(config, name)[:layers] for name in ("layer_types", "no_rope_layers", "moe_layers")
           if getattr(config, name)}
    config = dataclasses.replace(config, num_hidden_layers=layers, **cut)
    return Model(model.params.replace(layers=model.params.layers[:layers], config=config), model.tokenizer)


def _stream_speculative(params: Params, s: SpeculativeState, settings: GenerationSettings,
                        callback: Callable[[int, int], None], rows: int, draft: Params | None) -> DecodeState:
    """speculative_step from Python, handing each of the first `rows` rows' new tokens to callback(row, token) in
    order as soon as a step has made them (one step makes up to widths[-1] tokens a row)."""
    reported = np.zeros(rows, np.int64)
    while True:
        made, tokens = to_host(s.made)[:rows], None  # a row's made stops growing at its EOS or its limit
        for row in np.flatnonzero(made > reported):
            tokens = to_host(s.state.tokens) if tokens is None else tokens
            for t in tokens[row, reported[row]:made[row]]:
                callback(int(row), int(t))
        reported = np.maximum(reported, made)
        if not speculating(to_host(s.state.done), to_host(s.made), settings):
            return s.state
        s = speculative_step(params, s, settings, draft)


def generate(model: Model | Params, prompts, max_new_tokens: int = 20, *, use_cache: bool = True,
             sampling: Sampling = GREEDY, key: Array | None = None, eos_ids: Sequence[int] | None = None,
             callback: Callable[[int, int], None] | None = None, speculate: str | Speculation | None = None,
             draft: Model | Params | None = None):
    """Generate up to `max_new_tokens` per prompt, stopping each at its own EOS.

    `prompts`: a string or a list of token ids, or a list of those (a batch, left-padded). Returns a
    GenerationResult, or a list of them for a batch. `callback(row, token_id)` streams tokens as they are made
    (a Python loop over the jitted decode_step); without it the decode runs as one compiled loop.
    `use_cache=False` runs the full forward over the whole sequence every step (the reference path).
    `speculate="lookup"` (or a Speculation) proposes tokens by prompt lookup and checks them in one forward: greedy,
    the output is token for token the output without it; sampling, each token has the distribution it has without
    it (the speculative-sampling rule, see `verify`). `draft=` a model with the target's vocabulary (or
    `self_draft(model, n)`, the target's first n layers) proposes instead, greedily, with its own cache.
    """
    model = model if isinstance(model, Model) else Model(model)
    params, config, tokenizer = model.params, model.params.config, model.tokenizer
    draft = draft if isinstance(draft, Model | None) else Model(draft)
    spec = speculation_settings(speculate, params, use_cache, draft)
    prompts_ids, single = _as_batch(model, prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, found {max_new_tokens!r}")
    eos_ids = end_ids(model, eos_ids)
    longest = max(map(len, prompts_ids))
    if longest + max_new_tokens > config.max_position_embeddings and config.rope.rope_type != "dynamic":
        raise InputError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({config.max_position_embeddings})")
    P = bucket(longest)
    mesh = mesh_of(params)  # data parallelism splits the batch: fill it up to a multiple of dp (copies of a row)
    filler = prompts_ids[-1:] * (-len(prompts_ids) % mesh.shape["dp"] if mesh is not None else 0)
    settings = GenerationSettings(max_new_tokens=int(max_new_tokens), eos_ids=eos_ids,
                                  pad_id=eos_ids[0] if eos_ids else 0, sampling=sampling,
                                  length=bucket(P + max_new_tokens + SLACK), use_cache=use_cache, speculation=spec,
                                  row_stable=speculation_refused(params) is None)
    ids, mask = left_pad(prompts_ids + filler, P, settings.pad_id)
    state = prefill(params, ids, mask, seed_key(0) if key is None else key, settings)
    if spec is not None:
        drafted = None if draft is None else draft_prefill(draft.params, *place_batch(params, ids, mask), settings)
        d = None if draft is None else draft.params
        state = (speculative_decode(params, state, settings, d, drafted).state if callback is None else
                 _stream_speculative(params, speculative_start(state, settings, drafted), settings, callback,
                                     len(prompts_ids), d))
    elif callback is None:
        state = decode(params, state, settings)
    else:
        state = _stream(params, state, settings, callback, len(prompts_ids))
    out = to_host(state.tokens)[:, :max_new_tokens]
    results = [_result(p, row, set(eos_ids), tokenizer) for p, row in zip(prompts_ids, out)]
    return results[0] if single else results


def to_host(x: Array) -> np.ndarray:
    """The whole array on the host, in every process: also when its shards lie on other processes' devices."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _result(prompt: list[int], row: np.ndarray, eos_ids: set[int], tokenizer) -> GenerationResult:
    tokens = []
    for t in map(int, row):
        tokens.append(t)
        if t in eos_ids:
            break
    reason = "eos" if tokens and tokens[-1] in eos_ids else "length"
    # A model's vocabulary can be larger than its tokenizer's: such a token is shown as U+FFFD, not an error.
    text = tokenizer.decode(tokens, skip_special_tokens=True, unknown=UNKNOWN_TOKEN) if tokenizer is not None else None
    return GenerationResult(prompt_ids=prompt, tokens=tokens, text=text, finish_reason=reason)
