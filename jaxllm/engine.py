"""Continuous batching: a fixed table of N decode slots that requests join and leave between steps.

    engine = Engine(model, slots=8, max_context=2048).start()     # compiles, starts the scheduler thread
    request = engine.submit(Request(prompt=ids, max_tokens=64, temperature=0.7, seed=1, on_event=callback))
    engine.cancel(request)                                         # its slot is freed before the next step
    engine.stop()                                                  # drains what runs and waits, then ends

Everything a slot holds is data in one pytree (`Slots`): its cache row and write position, its last token, tokens
made, limit, stop ids, temperature / top-k / top-p and PRNG key (speculating, also its proposal settings and its
prompt-lookup history or its row of the draft model's cache). A new request, setting or limit compiles nothing.
Three jitted programs work on it, the table donated to each:
    prefill_chunk   up to C prompt tokens of one request into slot n (n traced); the last chunk samples the first token
    decode_slots    up to K decode steps over all slots in one lax.while_loop, stopping early when a slot finishes
    release         marks slots free (cancelled requests)
Attention in a decode step reads the cache's first W slots alone, W the power of two (>= 128) that holds every
running row's tokens plus K: a step's cost follows what is filled, not the context reserved (one program per W).
One thread, the scheduler, owns the table: it admits requests first come first served from a bounded queue,
prefills them a chunk at a time between decode calls (so running streams keep producing while a long prompt joins),
decodes, hands each request its tokens, and frees slots on a stop id, the limit, or cancellation.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import InputError, JaxLLMError
from jaxllm.generation import (DECODE_COMPILER_OPTIONS, Sampling, Speculation, adapt, bucket, end_ids, follow, lookup,
                               next_logits, propose, sample_rows, speculation_refused, speculation_settings, to_host,
                               verify_step)
from jaxllm.model import KVCache, Model, Params, program, run
from jaxllm.model.ops import row_kernel_ready, row_stable
from jaxllm.model.cache import token_bytes, write_rows
from jaxllm.pytree import struct

Array = jax.Array
log = logging.getLogger("jaxllm.engine")
MAX_STOP_IDS = 16  # M: stop ids a slot holds (EOS ids and the request's own)
MIN_WINDOW = 128  # the smallest attention window a decode program reads


class QueueFull(JaxLLMError):
    """The engine's waiting queue is full: try again later."""


class ContextLengthError(InputError):
    """The prompt plus max_tokens do not fit in the engine's context."""


class EngineStopped(JaxLLMError):
    """The engine is stopping or stopped and takes no new requests."""


@struct
class Slots:
    """The device-side slot table: row n of every field belongs to the request in slot n."""

    cache: KVCache  # L × [N, K, H, S]; index [N]: the tokens in the row's cache, so its next token's slot
    last: Array  # [N] int32: the token made last, fed by the next step
    made: Array  # [N] int32: tokens made for the request so far
    limit: Array  # [N] int32: the request's max_tokens
    stop: Array  # [N, M] int32: ids that end the request (-1: none)
    temperature: Array  # [N] f32 (0: greedy)
    top_k: Array  # [N] int32 (0: all)
    top_p: Array  # [N] f32
    key: Array  # [N] PRNG keys from each request's seed; its t-th token is drawn with fold_in(key, t)
    done: Array  # [N] bool: nothing to make (free, finished or cancelled)
    # Speculation only, else None:
    k: Array | None = None  # [N] int32: the most tokens the slot proposes next (generation.adapt)
    wait: Array | None = None  # [N] int32: steps before it proposes again
    misses: Array | None = None  # [N] int32: proposing steps in a row that accepted nothing
    history: Array | None = None  # prompt lookup: [N, S + k + 1] int32, the token fed at each cache slot
    draft: KVCache | None = None  # a draft model's: its cache, rows and slots as the target's

    @classmethod
    def empty(cls, params: Params, slots: int, length: int, speculation: Speculation | None = None,
              draft: Params | None = None) -> "Slots":
        N = slots
        cache = KVCache.zeros(params.config, N, length, params.dtype).replace(empty=False)  # rows are read per slot
        spec = {} if speculation is None else {name: jnp.zeros(N, jnp.int32) for name in ("k", "wait", "misses")}
        if speculation is not None and draft is None:
            spec["history"] = jnp.zeros((N, length + speculation.k + 1), jnp.int32)
        elif draft is not None:
            spec["draft"] = KVCache.zeros(draft.config, N, length, draft.dtype).replace(empty=False)
        return cls(cache=cache, last=jnp.zeros(N, jnp.int32), **spec,
                   made=jnp.zeros(N, jnp.int32), limit=jnp.zeros(N, jnp.int32),
                   stop=jnp.full((N, MAX_STOP_IDS), -1, jnp.int32), temperature=jnp.zeros(N, jnp.float32),
                   top_k=jnp.zeros(N, jnp.int32), top_p=jnp.ones(N, jnp.float32),
                   key=jax.random.split(jax.random.key(0), N), done=jnp.ones(N, bool))


@struct
class Admission:
    """What a request brings to its slot, as traced values."""

    slot: Array  # [] int32
    limit: Array  # [] int32
    stop: Array  # [M] int32
    temperature: Array  # [] f32
    top_k: Array  # [] int32
    top_p: Array  # [] f32
    seed: Array  # [] uint32


# ---- the programs ----------------------------------------------------------------------------------------------


def _sample_next(logits: Array, slots: Slots) -> Array:
    """Each row's next token from logits [N, V], drawn with its own key and settings."""
    return sample_rows(logits, _row_keys(slots), slots.temperature, slots.top_k, slots.top_p)


def _row_keys(slots: Slots) -> Array:
    """Each row's key for its next draw [N]: its request's key folded with the tokens it has made."""
    return jax.vmap(jax.random.fold_in)(slots.key, slots.made)


def _chunk_into_row(params: Params, full: KVCache, ids: Array, offset: Array, real: Array, slot: Array,
                    window: int) -> tuple[Array, KVCache]:
    """The forward of a prompt chunk ids [1, C] (its first `real` real) at cache slots offset .. offset + C - 1 of
    row `slot` of `full`, attending over the row's first `window` slots -> (logits [1, 1, V] at the last real
    token, `full` with the chunk written into the row). The first chunk (window == C) starts the row afresh."""
    C = ids.shape[1]
    row = lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0)  # noqa: E731  [1, ...]
    view = KVCache(k=tuple(row(k)[..., :window] for k in full.k), v=tuple(row(v)[:, :, :window] for v in full.v),
                   mask=row(full.mask)[:, :window], index=offset[None], empty=window == C)
    if window == C:  # the first chunk: nothing earlier to read, and no stale keys from the slot's last request
        view = view.replace(mask=jnp.zeros_like(view.mask))
    mask = (jnp.arange(C) < real)[None]  # [1, C]
    positions = (offset + jnp.arange(C, dtype=jnp.int32))[None]  # [1, C]: the prompt numbered from 0
    logits, view = run(params, ids, positions, mask, view, last_only=True, last=real[None] - 1)

    def put(buffer: Array, update: Array, axis: int) -> Array:  # the chunk's C slots of the view into the slot's row
        chunk = jax.lax.dynamic_slice_in_dim(update, offset, C, axis)
        start = [slot] + [0] * (buffer.ndim - 1)
        start[axis] = offset
        return jax.lax.dynamic_update_slice(buffer, chunk.astype(buffer.dtype), start)

    mask_row = put(full.mask, view.mask, 1)
    if window == C:  # a new request: slots past its first chunk still mark the previous request's tokens
        mask_row = jax.lax.dynamic_update_slice(mask_row, (jnp.arange(full.length) < C)[None] & mask_row[slot][None],
                                                (slot, 0))
    return logits, full.replace(k=tuple(put(b, u, 3) for b, u in zip(full.k, view.k)),
                                v=tuple(put(b, u, 2) for b, u in zip(full.v, view.v)), mask=mask_row,
                                index=full.index.at[slot].set(offset + real))


def _prefill_chunk(params: Params, slots: Slots, ids: Array, offset: Array, real: Array, admission: Admission,
                   window: int, final: bool, speculation: Speculation | None = None,
                   draft: Params | None = None) -> tuple[Slots, Array]:
    """Prompt tokens ids [1, C] (the first `real` of them real) into slot `admission.slot` at cache slots offset ..
    offset + C - 1, attending over the slot's first `window` cache slots (its earlier chunks); into the draft
    model's cache too when there is one. The final chunk sets the slot's request fields and samples its first
    token. Returns (slots, the first token [] or -1)."""
    slot = admission.slot
    row = lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0)  # noqa: E731  [1, ...]
    logits, cache = _chunk_into_row(params, slots.cache, ids, offset, real, slot, window)
    if draft is not None:
        slots = slots.replace(draft=_chunk_into_row(draft, slots.draft, ids, offset, real, slot, window)[1])
    slots = slots.replace(cache=cache)
    if slots.history is not None:  # the prompt's ids at their cache slots, for prompt lookup
        slots = slots.replace(history=jax.lax.dynamic_update_slice(slots.history, ids, (slot, offset)))
    if not final:
        return slots, jnp.int32(-1)
    at = lambda a, value: a.at[slot].set(value)  # noqa: E731
    slots = slots.replace(limit=at(slots.limit, admission.limit), stop=at(slots.stop, admission.stop),
                          temperature=at(slots.temperature, admission.temperature),
                          top_k=at(slots.top_k, admission.top_k), top_p=at(slots.top_p, admission.top_p),
                          key=at(slots.key, jax.random.key(admission.seed)), made=at(slots.made, 0))
    one = jax.tree_util.tree_map(row, slots.replace(cache=None, draft=None))  # this slot's fields, [1, ...]
    token = _sample_next(logits[:, 0].astype(jnp.float32), one)[0]
    done = jnp.isin(token, admission.stop) | (admission.limit <= 1)
    slots = slots.replace(last=at(slots.last, token), made=at(slots.made, 1), done=at(slots.done, done))
    if speculation is not None:
        slots = slots.replace(k=at(slots.k, speculation.start), wait=at(slots.wait, 0), misses=at(slots.misses, 0))
    return slots, token


def _decode_slots(params: Params, slots: Slots, steps: int, window: int, speculation: Speculation | None = None,
                  draft: Params | None = None) -> tuple[Slots, Array, Array]:
    """Up to `steps` decode steps over every slot, in one lax.while_loop that ends after the step in which some
    slot finishes (so the host can refill it) or when none is left running. Returns (slots, tokens [N, steps · t]:
    each slot's tokens in order, -1 after them, the steps run []). A plain step makes t = 1 token a slot; with
    `speculation`, a step proposes by prompt lookup over the slot's own tokens (or by the `draft` model, from its
    cache) and verifies in one forward (generation.verify_step), so it makes up to t = k + 1."""
    N = slots.last.shape[0]
    per_step = 1 if speculation is None else speculation.k + 1
    # Row-stable where the model can speculate and the row kernel runs (the CPU), as generate's decode: a plain
    # engine then answers, bit for bit, what a speculating one (whose verify steps are row-stable) does, and the
    # kernel takes the N slots' rows in one pass over each matrix. Elsewhere row-stable bf16 and int8 products run
    # row by row, N passes over each matrix a step: the plain engine keeps its batched products there, and agrees
    # with a speculating one except where a near-tie flips.
    stable = row_stable if speculation_refused(params) is None and row_kernel_ready() else contextlib.nullcontext

    def plain(slots, live):
        with stable():
            logits, cache = next_logits(params, slots.cache, slots.last, live, window)
        # Rows that make no token draw greedily: a finished request's temperature must not keep the sort running.
        token = jnp.where(live, _sample_next(logits, slots.replace(temperature=jnp.where(live, slots.temperature, 0))),
                          -1)  # [N]
        stopped = live & jnp.any(token[:, None] == slots.stop, axis=-1)
        made = live.astype(jnp.int32)
        return slots.replace(cache=cache, last=jnp.where(live, token, slots.last)), token[:, None], made, stopped

    def speculative(slots, live):
        index = slots.cache.index  # [N]: the slot the last token is fed at
        proposing = live & (slots.wait == 0)
        if draft is None:
            history = write_rows(slots.history, slots.last[:, None], index, axis=1)
            proposals, count = lookup(history[:, :window], jnp.zeros(N, jnp.int32), index + 1, speculation)
            count = jnp.where(proposing, jnp.minimum(count, slots.k), 0)
        else:
            count = jnp.where(proposing, slots.k, 0)
            proposals, drafted = propose(draft, slots.draft, slots.last, count, speculation.k, window)
        keys = _row_keys(slots)
        sampling = (jnp.where(live, slots.temperature, 0), slots.top_k, slots.top_p)
        choice, made, accepted, stopped, cache = verify_step(params, slots.cache, slots.last, proposals, count, live,
                                                             slots.stop, slots.limit - slots.made, speculation,
                                                             sampling, keys, window)
        if draft is None:  # the accepted proposals after the last token
            slots = slots.replace(history=write_rows(history, choice[:, :-1], index + 1, axis=1))
        else:
            slots = slots.replace(draft=follow(draft, drafted, cache, slots.last, proposals, count, made, window))
        last = jnp.take_along_axis(choice, jnp.maximum(made - 1, 0)[:, None], axis=1)[:, 0]
        k, wait, misses = adapt(slots.k, slots.wait, slots.misses, count, accepted, speculation)
        slots = slots.replace(cache=cache, last=jnp.where(live, last, slots.last), k=k, wait=wait, misses=misses)
        return slots, jnp.where(jnp.arange(per_step) < made[:, None], choice, -1), made, stopped

    def step(carry):
        slots, out, at, i, _ = carry
        live = ~slots.done
        slots, tokens, made, stopped = (plain if speculation is None else speculative)(slots, live)
        out = write_rows(out, tokens, at, axis=1)
        finished = live & (stopped | (slots.made + made >= slots.limit))
        slots = slots.replace(made=slots.made + made, done=slots.done | finished)
        return slots, out, at + made, i + 1, jnp.any(finished)

    def more(carry):
        slots, _, _, i, finished = carry
        return (i < steps) & ~finished & ~jnp.all(slots.done)

    start = (slots, jnp.full((N, steps * per_step), -1, jnp.int32), jnp.zeros(N, jnp.int32), jnp.int32(0),
             jnp.bool_(False))
    slots, out, _, steps_run, _ = jax.lax.while_loop(more, step, start)
    return slots, out, steps_run


def _release(slots: Slots, free: Array) -> Slots:
    """Slots where free [N] is True stop making tokens."""
    return slots.replace(done=slots.done | free)


_prefill_program = program(_prefill_chunk, "engine_prefill", static_argnames=("window", "final", "speculation"),
                           donate_argnames="slots")
_decode_program = program(_decode_slots, "engine_decode", static_argnames=("steps", "window", "speculation"),
                          donate_argnames="slots", compiler_options=DECODE_COMPILER_OPTIONS)
_release_program = program(_release, "engine_release", donate_argnames="slots")


# ---- requests and the scheduler ---------------------------------------------------------------------------------

Callback = Callable[["Request", list, "str | None"], None]
_ids = itertools.count(1)


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and, once submitted, its progress. `on_event(request, new_tokens, finish_reason)` is
    called on the engine's thread with each batch of new token ids, finish_reason None until the last call, then
    "stop" (a stop id was made; it is the last token), "length" (max_tokens made), "cancelled" or "error"."""

    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: a random one
    stop_ids: Sequence[int] | None = None  # None: the engine's EOS ids; () runs to max_tokens
    on_event: Callback | None = None
    # Filled in by the engine:
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the slot's cache so far
    cancelled: bool = False
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)


class Engine:
    """A slot table on the device and the scheduler thread that owns it. `slots` N requests decode together;
    `max_context` S bounds prompt + max_tokens; `decode_steps` K steps run per decode call; a prompt is prefilled
    `prefill_chunk` tokens at a time between decode calls; at most `max_waiting` requests wait for a slot.
    `speculate="lookup"` (or a Speculation) proposes each slot's next tokens by prompt lookup over its own prompt and
    output and verifies them in one forward: greedy slots make the tokens they make without it, sampling slots
    draw from the same distribution (generation.verify). `draft=` a model with the target's vocabulary (or
    generation.self_draft(model, n)) proposes instead, greedily, with a cache of its own in the same slots."""

    def __init__(self, model: Model | Params, slots: int = 8, max_context: int = 2048, decode_steps: int = 8,
                 prefill_chunk: int = 256, max_waiting: int = 64, eos_ids: Sequence[int] | None = None,
                 speculate: str | Speculation | None = None, draft: Model | Params | None = None):
        model = model if isinstance(model, Model) else Model(model)
        config = model.params.config
        draft = draft if isinstance(draft, Model | None) else Model(draft)
        spec = speculation_settings(speculate, model.params, True, draft)
        for name, value, low in (("slots", slots, 1), ("max_context", max_context, 2), ("decode_steps", decode_steps, 1),
                                 ("prefill_chunk", prefill_chunk, 16), ("max_waiting", max_waiting, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, found {value!r}")
        if max_context > config.max_position_embeddings and config.rope.rope_type != "dynamic":
            raise InputError(f"max_context ({max_context}) exceeds the model's max_position_embeddings "
                             f"({config.max_position_embeddings})")
        self.model, self.params = model, model.params
        self.slots, self.max_context, self.decode_steps, self.max_waiting = slots, max_context, decode_steps, max_waiting
        self.prefill_chunk = bucket(prefill_chunk)
        self.eos_ids = end_ids(model, eos_ids)
        self.speculation, self.draft = spec, None if draft is None else draft.params
        # Cache slots: a whole number of chunks (a prompt's last, padded chunk stays inside its row), and room for
        # the k proposals a verify step writes past a row's last token.
        self.length = -(-(max_context + (spec.k if spec else 0)) // self.prefill_chunk) * self.prefill_chunk
        self._table: Slots | None = None
        self._running: list[Request | None] = [None] * slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._admitting: list[Request] = []  # in a slot, prompt not yet fully prefilled
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self.error: BaseException | None = None
        self.decode_forwards = 0  # decode steps run (each one forward over every slot): tokens per step = made / it

    # ---- the client side (any thread) ----

    @property
    def running(self) -> int:
        """Requests in slots (decoding, or being prefilled)."""
        return sum(r is not None for r in self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def cache_bytes(self) -> int:
        """The KV cache's memory: every slot reserves max_context positions (rounded up to whole prefill chunks), in
        the target's cache and in the draft model's."""
        models = [self.params] + ([self.draft] if self.draft is not None else [])
        return sum(self.slots * self.length * token_bytes(p.config, p.dtype) for p in models)

    def start(self, warmup: bool = True) -> "Engine":
        """Allocate the slot table, compile the programs a short request needs, start the scheduler thread."""
        if self._thread is not None:
            return self
        self._table = Slots.empty(self.params, self.slots, self.length, self.speculation, self.draft)
        if warmup:
            self._warmup()
        self._thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: Request) -> Request:
        """Queue a request (thread-safe). Raises InputError for a value out of range, ContextLengthError when the
        prompt and max_tokens do not fit, QueueFull when max_waiting requests already wait."""
        self._check(request)
        with self._wake:
            if self._stopping or self._thread is None:
                raise EngineStopped("the engine is not running (start() it, or it is stopping)")
            free = sum(r is None for r in self._running)  # those waiting for the scheduler to admit them
            if len(self._waiting) >= self.max_waiting + free:
                raise QueueFull(f"{len(self._waiting) - free} requests are waiting for a slot "
                                f"(max_waiting={self.max_waiting})")
            request.submitted_at = time.perf_counter()
            self._waiting.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (thread-safe, idempotent): its slot is freed before the next step."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with `drain`, finish those running and waiting first, else cancel them. Then end
        the scheduler thread."""
        with self._wake:
            self._stopping, self._drain = True, drain
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, timeout: float | None = None,
                 **settings) -> list[Request]:
        """Submit every prompt, wait for all: the finished requests (tokens, finish_reason), in order."""
        requests = [self.submit(Request(prompt=p, max_tokens=max_tokens, **settings)) for p in prompts]
        for r in requests:
            if not r.finished.wait(timeout):
                raise TimeoutError(f"request {r.id} did not finish in {timeout} s")
        return requests

    def _check(self, r: Request) -> None:
        if r.submitted_at:
            raise InputError(f"request {r.id} was submitted already; make a new Request")
        vocab = self.params.config.vocab_size
        prompt = list(r.prompt) if isinstance(r.prompt, Sequence | np.ndarray) else None
        if not prompt or any(isinstance(t, bool) or not isinstance(t, int | np.integer) for t in prompt):
            raise InputError(f"prompt must be a non-empty sequence of integer token ids, found {r.prompt!r:.80}")
        bad = next((i for i, t in enumerate(prompt) if not 0 <= t < vocab), None)
        if bad is not None:
            raise InputError(f"token id {prompt[bad]} at position {bad} is outside the vocabulary [0, {vocab})")
        r.prompt = [int(t) for t in prompt]
        if isinstance(r.max_tokens, bool) or not isinstance(r.max_tokens, int | np.integer) or r.max_tokens < 1:
            raise InputError(f"max_tokens must be a positive integer, found {r.max_tokens!r}")
        if len(prompt) + r.max_tokens > self.max_context:
            raise ContextLengthError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({r.max_tokens}) exceed the "
                                     f"context of {self.max_context} tokens")
        Sampling(r.temperature, r.top_k, r.top_p)  # names a bad setting
        if r.top_k > vocab:
            raise InputError(f"top_k ({r.top_k}) is larger than the vocabulary ({vocab})")
        stop = self.eos_ids if r.stop_ids is None else end_ids(self.model, r.stop_ids, "stop_ids")
        if len(stop) > MAX_STOP_IDS or any(not 0 <= t < vocab for t in stop):
            raise InputError(f"stop ids must be at most {MAX_STOP_IDS} ids in [0, {vocab}), found {sorted(stop)}")
        r.stop_ids = tuple(sorted(stop))
        if r.seed is None:
            r.seed = int.from_bytes(os.urandom(4), "little")
        if isinstance(r.seed, bool) or not isinstance(r.seed, int | np.integer):
            raise InputError(f"seed must be an integer, found {r.seed!r}")
        r.seed = int(r.seed) % 2**32

    # ---- the scheduler (its own thread) ----

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._waiting or self.running or self._stopping):
                        self._wake.wait()
                    if self._stopping and not self._drain:
                        for r in [*self._waiting, *filter(None, self._running)]:
                            r.cancelled = True
                    if self._stopping and not (self._waiting or self.running):
                        return
                self._reap_cancelled()
                self._admit()
                self._prefill()
                self._decode()
        except BaseException as error:  # noqa: BLE001  every request learns of it; the thread ends
            self.error = error
            log.exception("the engine's scheduler failed")
            with self._wake:
                self._stopping = True
                self._table = None  # handed to the call that failed: nothing more runs on it
                pending = [*self._waiting, *filter(None, self._running)]
                self._waiting.clear()
            for r in pending:
                self._finish(r, "error")

    def _reap_cancelled(self) -> None:
        with self._wake:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        free = np.zeros(self.slots, bool)
        for r in filter(None, list(self._running)):
            if r.cancelled:
                free[r.slot] = True
                gone.append(r)
        if free.any():
            self._table = _release_program(self._table, jnp.asarray(free))
        for r in gone:
            self._finish(r, "cancelled")

    def _admit(self) -> None:
        """First come first served: waiting requests into free slots."""
        with self._wake:
            for n in range(self.slots):
                if self._running[n] is None and self._waiting:
                    r = self._waiting.popleft()
                    r.slot, self._running[n] = n, r
                    self._admitting.append(r)

    def _prefill(self) -> None:
        """Prefill up to one chunk's worth of prompt tokens, oldest admission first: one call per chunk, so a long
        prompt joins over several loop turns while the running slots decode in between."""
        budget = self.prefill_chunk
        while self._admitting and budget > 0:
            r = self._admitting[0]
            offset, left = r.prefilled, len(r.prompt) - r.prefilled
            n = min(left, self.prefill_chunk)
            C = bucket(n)
            ids = np.zeros((1, C), np.int32)
            ids[0, :n] = r.prompt[offset:offset + n]
            final = n == left
            stop = np.full(MAX_STOP_IDS, -1, np.int32)
            stop[:len(r.stop_ids)] = r.stop_ids
            admission = Admission(slot=np.int32(r.slot), limit=np.int32(r.max_tokens), stop=stop,
                                  temperature=np.float32(r.temperature), top_k=np.int32(r.top_k),
                                  top_p=np.float32(r.top_p), seed=np.uint32(r.seed))
            window = C if offset == 0 else min(bucket(offset + C), self.length)
            self._table, token = _prefill_program(self.params, self._table, ids, np.int32(offset), np.int32(n),
                                                  admission, window=window, final=final, speculation=self.speculation,
                                                  draft=self.draft)
            r.prefilled += n
            budget -= C
            if final:
                self._admitting.pop(0)
                token = int(token)
                r.first_token_at = time.perf_counter()
                self._emit(r, [token])

    def _decode(self) -> None:
        live = [r for r in self._running if r is not None and r.finish_reason is None and r not in self._admitting]
        if not live:
            return
        # Every running row's cache holds prompt + made - 1 tokens; K more steps, each writing up to `per_step`
        # slots, must fit in the window.
        per_step = 1 if self.speculation is None else self.speculation.k + 1
        longest = max(len(r.prompt) + len(r.tokens) - 1 for r in live) + self.decode_steps * per_step
        window = min(bucket(longest, MIN_WINDOW), self.length)  # one of _warmup's windows
        self._table, out, steps = _decode_program(self.params, self._table, steps=self.decode_steps, window=window,
                                                  speculation=self.speculation, draft=self.draft)
        out = to_host(out)
        self.decode_forwards += int(steps)
        for r in live:
            self._emit(r, [int(t) for t in out[r.slot] if t >= 0])

    def _emit(self, r: Request, tokens: list[int]) -> None:
        """Hand a request its new tokens; free its slot when they end it."""
        r.tokens.extend(tokens)
        reason = None
        if r.tokens and r.tokens[-1] in r.stop_ids:
            reason = "stop"
        elif len(r.tokens) >= r.max_tokens:
            reason = "length"
        if reason is None:
            self._call(r, tokens, None)
        else:
            self._finish(r, reason, tokens)

    def _finish(self, r: Request, reason: str, tokens: list[int] | None = None) -> None:
        with self._wake:
            if r.slot is not None and self._running[r.slot] is r:
                self._running[r.slot] = None
            if r in self._admitting:  # its slot is marked done until the final chunk: nothing to release
                self._admitting.remove(r)
        r.finish_reason = reason
        self._call(r, tokens or [], reason)
        r.finished.set()

    @staticmethod
    def _call(r: Request, tokens: list[int], reason: str | None) -> None:
        if r.on_event is None:
            return
        try:
            r.on_event(r, tokens, reason)
        except Exception:  # noqa: BLE001  a client's callback never stops the engine
            log.exception("on_event of request %s failed", r.id)

    def _warmup(self) -> None:
        """Compile, by running them on a free slot, the programs that requests will need: the first chunk's prefill at
        every length bucket, and the decode loop at every attention window (a stream crossing into a window
        compiled on the spot would stall for the compile). Later chunks of long prompts compile on first use."""
        table = self._table
        admission = Admission(slot=np.int32(0), limit=np.int32(1), stop=np.full(MAX_STOP_IDS, -1, np.int32),
                              temperature=np.float32(0), top_k=np.int32(0), top_p=np.float32(1), seed=np.uint32(0))
        for C in _doubling(bucket(1), min(self.prefill_chunk, bucket(self.max_context))):
            table, _ = _prefill_program(self.params, table, np.zeros((1, C), np.int32), np.int32(0), np.int32(1),
                                        admission, window=C, final=True, speculation=self.speculation,
                                        draft=self.draft)
        table = _release_program(table, jnp.ones(self.slots, bool))
        for window in _doubling(min(MIN_WINDOW, self.length), self.length):
            table, _, _ = _decode_program(self.params, table, steps=self.decode_steps, window=window,
                                          speculation=self.speculation, draft=self.draft)
        self._table = jax.block_until_ready(table)


def _doubling(first: int, last: int) -> list[int]:
    """first, 2·first, ... up to the last power of two below `last`, then `last`."""
    out = [first]
    while out[-1] * 2 < last:
        out.append(out[-1] * 2)
    return out + [last] if last > first else out
