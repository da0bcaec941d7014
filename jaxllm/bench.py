"""jaxllm against Transformers in one process: prefill latency, decode tokens/s, the memory roofline, compiles.

Both engines run on the same checkpoint with the same thread count: jaxllm on JAX's default device in its first
weight format (fp32 by default), Transformers in fp32 on the CPU with `sdpa` attention (its fastest CPU path). Every
figure is the median of `repeats` timed runs after one warm-up run; JAX results are waited for with
`block_until_ready`, Transformers runs under `torch.no_grad`. Ratios are Transformers time over jaxllm time, so > 1
means jaxllm is faster.

With several weight formats (weights.py), a second table puts them side by side: each format's decode loop, timed in
rounds that alternate the formats (and llama.cpp on the model's GGUF, when llama-cpp-python is installed) so that
they share the machine's moments, with its prefill latency, the bytes it reads per token, its roofline fraction and
the peak memory of loading it in a fresh process.

    figures = bench.run(None, repeats=5, weights=("fp32", "int8", "gguf"))   # a JSON-serialisable dict
    print(bench.table(figures))

The serving section loads a running OpenAI-compatible server with streamed completions, as `vllm bench serve` does
(TTFT, inter-token latency, output tokens/s per concurrency level), or starts several servers in turn and loads each
the same way:

    print(bench.serve_table(bench.serve("http://127.0.0.1:8000", concurrency=(1, 8))))
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.generation import GenerationSettings, bucket, decode, generate, left_pad, prefill
from jaxllm.model import KVCache, Model, compile_counts, forward
from jaxllm.parity import agreement_length, reference_model, torch_and_transformers
from jaxllm.weights import nbytes

# Prose (not random ids) so that greedy decoding behaves like real use; repeated to reach the longest prompt.
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden screw press into a system that could produce books far faster than "
    "scribes. Within fifty years presses were running in more than two hundred European cities, and the price of "
    "books fell so sharply that reading spread from monasteries and universities to merchants and craftsmen. "
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run measures. `max_repeats` caps the caller's repeats (quick runs)."""

    prefill_lengths: tuple[int, ...] = (16, 128, 512)
    decode_prompt: int = 16  # prompt tokens before the decode
    decode_tokens: int = 128  # new tokens in the decode figures
    nocache_tokens: int = 32  # new tokens on the no-cache reference path (each step is a full forward)
    session_lengths: tuple[int, ...] = (5, 9, 14, 21, 30, 44, 60, 77, 99, 120)  # prompt lengths of the session
    session_tokens: int = 16  # new tokens per session prompt
    matrix: tuple[int, int] = (16384, 8192)  # fp32 matrix of the bandwidth probe: 512 MiB, far beyond any cache
    roofline_pairs: int = 11  # jaxllm decode loops timed, each paired with a matvec for the roofline (at least repeats)
    max_repeats: int | None = None


FULL = Settings()
QUICK = Settings(prefill_lengths=(16, 128), decode_tokens=32, nocache_tokens=8, session_lengths=(5, 9, 14, 21, 30),
                 matrix=(8192, 8192), roofline_pairs=3, max_repeats=2)


# ---- timing -------------------------------------------------------------------------------------------------


def _seconds(fn: Callable[..., Any], setup: Callable[[], tuple] = tuple) -> tuple[float, Any]:
    """Wall time of one fn(*setup()) (setup untimed) and its result. fn must wait for its own results."""
    args = setup()
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _median(fn: Callable[..., Any], repeats: int, setup: Callable[[], tuple] = tuple, warmup: bool = True) -> float:
    """Median seconds over `repeats` timed calls, after one untimed warm-up call."""
    if warmup:
        _seconds(fn, setup)
    return statistics.median(_seconds(fn, setup)[0] for _ in range(repeats))


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _ratio(theirs: float, ours: float) -> float:
    return round(theirs / ours, 3)


# ---- the two engines ----------------------------------------------------------------------------------------


def _prompt_ids(tokenizer, length: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_TEXT)
    ids = tokenizer.encode(PROMPT_TEXT * (length // len(ids) + 1))
    return ids[:length]


def _no_eos(prompt_slots: int, new_tokens: int) -> GenerationSettings:
    """Greedy, EOS disabled (no eos ids: every row runs to new_tokens), the cache generate would allocate."""
    return GenerationSettings(max_new_tokens=new_tokens, length=bucket(prompt_slots + new_tokens))


def _prefill_inputs(prompt: list[int]):
    """ids, mask [1, P], left-padded to the bucket, as generate builds them."""
    return left_pad([prompt], bucket(len(prompt)), pad_id=0)


def _run_prefill(params, ids, mask, settings):
    return jax.block_until_ready(prefill(params, ids, mask, jax.random.key(0), settings))


def _run_decode(params, state, settings):
    return jax.block_until_ready(decode(params, state, settings))


def _prefilled(params, ids, mask, settings):
    """A setup for the decode loop: the prefill done (untimed), as generate would."""
    return lambda: (params, _run_prefill(params, ids, mask, settings), settings)


# ---- the figures --------------------------------------------------------------------------------------------


def _compile_times(params, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """Prefill: first call minus a warm call. Decode loop: first call (and first minus warm). Starts from empty jit
    caches, so the figures are real compiles even when this process has run the programs before."""
    jax.clear_caches()
    ids, mask = _prefill_inputs(prompt)
    settings = _no_eos(ids.shape[1], new_tokens)
    before = compile_counts()
    prefill_first, _ = _seconds(_run_prefill, lambda: (params, ids, mask, settings))
    prefill_warm, _ = _seconds(_run_prefill, lambda: (params, ids, mask, settings))
    setup = _prefilled(params, ids, mask, settings)
    loop_first, _ = _seconds(_run_decode, setup)
    loop_warm, _ = _seconds(_run_decode, setup)
    after = compile_counts()
    return {
        "prefill_bucket": int(ids.shape[1]),
        "cache_slots": settings.length,
        "prefill_first_call_s": round(prefill_first, 3),
        "prefill_warm_call_s": round(prefill_warm, 3),
        "prefill_compile_s": round(prefill_first - prefill_warm, 3),
        "decode_loop_first_call_s": round(loop_first, 3),
        "decode_loop_warm_call_s": round(loop_warm, 3),
        "decode_loop_compile_s": round(loop_first - loop_warm, 3),
        "programs_compiled": {name: after[name] - before.get(name, 0) for name in after},
    }


def _prefill_figures(params, reference, tokenizer, lengths, new_tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Per prompt length: jaxllm's cached-path prefill program (last-slot logits, cache written) against
    Transformers' prefill (cache filled, logits_to_keep=1), and jaxllm's no-cache forward against Transformers'
    forward (use_cache=False), both with logits at every position."""
    torch, _ = torch_and_transformers()
    rows = []
    for length in lengths:
        prompt = _prompt_ids(tokenizer, length)
        ids, mask = _prefill_inputs(prompt)
        settings = _no_eos(ids.shape[1], new_tokens)  # the cache generate would allocate for `new_tokens` more
        prefill_s = _median(_run_prefill, repeats, lambda: (params, ids, mask, settings))
        plain_ids = jnp.asarray([prompt], jnp.int32)
        positions = jnp.arange(length, dtype=jnp.int32)[None]
        forward_s = _median(lambda: jax.block_until_ready(forward(params, plain_ids, positions)), repeats)
        torch_ids = torch.tensor([prompt])
        with torch.no_grad():
            reference_s = _median(lambda: reference(input_ids=torch_ids, use_cache=False).logits, repeats)
            # What Transformers' generate runs as its prefill: a DynamicCache filled, logits for the last position.
            reference_prefill_s = _median(lambda: reference(input_ids=torch_ids, use_cache=True, logits_to_keep=1).logits,
                                          repeats)
        rows.append({
            "tokens": length,
            "bucket": int(ids.shape[1]),
            "cache_slots": settings.length,
            "jaxllm_prefill_ms": _ms(prefill_s),
            "jaxllm_forward_ms": _ms(forward_s),
            "transformers_forward_ms": _ms(reference_s),
            "transformers_prefill_ms": _ms(reference_prefill_s),
            "ratio_vs_prefill": _ratio(reference_prefill_s, prefill_s),
            "ratio_vs_forward": _ratio(reference_s, forward_s),
        })
    return rows


def _paired_decode(setup: Callable[[], tuple], shape: tuple[int, int], pairs: int) -> tuple[list[float], list[float]]:
    """Seconds of `pairs` decode loops, each paired with the bandwidth probe (_bandwidth_probe: three matvecs over a
    matrix far beyond any cache) timed right after it. This machine's memory is shared and the bandwidth it gives
    drifts by tens of percent within minutes (seen here: from 30 to 55 GB/s between runs), so the roofline compares
    each decode loop with the bandwidth of its own moment."""
    probe = _bandwidth_probe(shape)
    _seconds(_run_decode, setup)  # warm-up
    loops, matvecs = [], []
    for _ in range(pairs):
        loops.append(_seconds(_run_decode, setup)[0])
        matvecs.append(probe())
    return loops, matvecs


def _bandwidth_probe(shape: tuple[int, int]) -> Callable[[], float]:
    """A function returning the median seconds of three jitted fp32 matrix-vector products over a `shape` matrix
    (made, and the product compiled and warmed, here). The matrix lies far beyond any cache, so every byte is read
    once per call: matrix bytes / seconds is the memory bandwidth of that moment."""
    matrix = jax.block_until_ready(jax.random.normal(jax.random.key(1), shape, jnp.float32))
    vector = jax.block_until_ready(jnp.ones(shape[1], jnp.float32))
    matvec = jax.jit(lambda a, x: a @ x)

    def run_matvec():
        return jax.block_until_ready(matvec(matrix, vector))

    _seconds(run_matvec)  # warm-up
    return lambda: statistics.median(_seconds(run_matvec)[0] for _ in range(3))


def _roofline_fractions(weight_bytes: int, step_s: list[float], matvec_s: list[float],
                        matrix_bytes: int) -> list[float]:
    """Each decode step's fraction of the roofline: the bandwidth it achieves reading every weight once
    (weight bytes / step) over the bandwidth of the matvec timed right after it (matrix bytes / matvec)."""
    return [(weight_bytes / step) / (matrix_bytes / matvec) for step, matvec in zip(step_s, matvec_s)]


def _decode_figures(model: Model, reference, prompt: list[int], new_tokens: int, nocache_tokens: int,
                    repeats: int, matrix: tuple[int, int], pairs: int) -> dict[str, Any]:
    """Greedy decode of `new_tokens` after `prompt`, EOS disabled in both engines so both make every token.

    Decode-only rates count decode steps: the first new token comes from the prefill's logits, so N tokens take
    N - 1 steps. jaxllm's is the compiled while_loop alone, the median of `pairs` runs each paired with a matvec
    for the roofline; Transformers' is generate(N) minus generate(1). End-to-end rates are N / (prefill + decode)."""
    torch, _ = torch_and_transformers()
    params = model.params
    ids, mask = _prefill_inputs(prompt)
    settings = _no_eos(ids.shape[1], new_tokens)
    slots = settings.length
    steps = new_tokens - 1
    setup = _prefilled(params, ids, mask, settings)
    paired_loop_s, paired_matvec_s = _paired_decode(setup, matrix, pairs)
    loop_s = statistics.median(paired_loop_s)
    state = _run_decode(*setup())
    if int(state.step) != new_tokens:
        raise RuntimeError(f"the decode loop stopped after {int(state.step)} of {new_tokens} tokens with EOS disabled")
    ours = np.asarray(state.tokens)[0, :new_tokens].tolist()

    generate_s = _median(lambda: generate(model, prompt, new_tokens, eos_ids=[]), repeats)
    nocache_s = _median(lambda: generate(model, prompt, nocache_tokens, use_cache=False, eos_ids=[]), repeats)

    torch_ids = torch.tensor([prompt])
    pad = reference.generation_config.pad_token_id
    pad = pad if pad is not None else 0

    def reference_generate(n: int):
        # min_new_tokens masks EOS until n tokens exist, so exactly n are made, as with jaxllm's eos_ids=[].
        return reference.generate(torch_ids, attention_mask=torch.ones_like(torch_ids), do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)

    with torch.no_grad():
        reference_s = _median(lambda: reference_generate(new_tokens), repeats)
        reference_first_s = _median(lambda: reference_generate(1), repeats)
        theirs = reference_generate(new_tokens)[0, len(prompt):].tolist()
    if len(theirs) != new_tokens:
        raise RuntimeError(f"Transformers generated {len(theirs)} tokens, expected {new_tokens}")
    reference_decode_s = max(reference_s - reference_first_s, 1e-9)
    agree = agreement_length(ours, theirs)
    figures = {
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "decode_steps": steps,
        "cache_slots": slots,
        "jaxllm_decode_loop_s": round(loop_s, 4),
        "jaxllm_decode_tokens_per_s": round(steps / loop_s, 3),
        "jaxllm_decode_ms_per_token": _ms(loop_s / steps),
        "jaxllm_generate_s": round(generate_s, 4),
        "jaxllm_generate_tokens_per_s": round(new_tokens / generate_s, 3),
        "transformers_generate_s": round(reference_s, 4),
        "transformers_generate_tokens_per_s": round(new_tokens / reference_s, 3),
        "transformers_first_token_s": round(reference_first_s, 4),
        "transformers_decode_tokens_per_s": round(steps / reference_decode_s, 3),
        "transformers_decode_ms_per_token": _ms(reference_decode_s / steps),
        "ratio_decode": _ratio(reference_decode_s, loop_s),
        "ratio_generate": _ratio(reference_s, generate_s),
        "greedy_tokens_agree": agree,  # leading new tokens identical in the two engines
        "nocache_new_tokens": nocache_tokens,
        "jaxllm_nocache_s": round(nocache_s, 4),
        "jaxllm_nocache_tokens_per_s": round(nocache_tokens / nocache_s, 3),
        "matrix": list(matrix),
        "matrix_bytes": math.prod(matrix) * 4,  # fp32
        "paired_loop_s": paired_loop_s,  # seconds of each timed decode loop and of the matvec right after it
        "paired_matvec_s": paired_matvec_s,
    }
    return figures


def _roofline(params, decode: dict[str, Any]) -> dict[str, Any]:
    """Decode against the memory roofline. A step reads every weight once (the tied embedding once: it is one leaf),
    so weight bytes / bandwidth bounds its time from below. Each of the decode figures' paired loops is compared with
    the matvec timed right after it, and the fraction is the median of the pairs' fractions. The KV cache read per
    step is reported alongside, not counted in the bound."""
    weight_bytes = nbytes(params)
    cache = jax.eval_shape(lambda: KVCache.zeros(params.config, 1, decode["cache_slots"], params.dtype))
    cache_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(cache))
    step_s = [loop / decode["decode_steps"] for loop in decode["paired_loop_s"]]
    matvec_s, matrix_bytes = decode["paired_matvec_s"], decode["matrix_bytes"]
    fractions = _roofline_fractions(weight_bytes, step_s, matvec_s, matrix_bytes)
    bytes_per_s = matrix_bytes / statistics.median(matvec_s)
    return {
        "matrix": decode["matrix"],
        "pairs": len(step_s),
        "weight_bytes": weight_bytes,
        "kv_cache_bytes": cache_bytes,
        "matvec_ms": _ms(statistics.median(matvec_s)),
        "bandwidth_gb_per_s": round(bytes_per_s / 1e9, 3),
        "bandwidth_range_gb_per_s": [round(matrix_bytes / max(matvec_s) / 1e9, 3),
                                     round(matrix_bytes / min(matvec_s) / 1e9, 3)],
        "roofline_ms_per_token": _ms(weight_bytes / bytes_per_s),
        "roofline_tokens_per_s": round(bytes_per_s / weight_bytes, 3),
        "jaxllm_fraction": round(statistics.median(fractions), 3),
        "jaxllm_fraction_range": [round(min(fractions), 3), round(max(fractions), 3)],
        "jaxllm_effective_gb_per_s": round(weight_bytes / statistics.median(step_s) / 1e9, 3),
        # Transformers' decode is not in the pairs: against the pairs' median bandwidth.
        "transformers_fraction": round(decode["transformers_decode_tokens_per_s"] * weight_bytes / bytes_per_s, 3),
    }


def _same_bucket_length(n: int) -> int:
    """Another prompt length padded to the same bucket as n."""
    return n + 1 if bucket(n + 1) == bucket(n) else n - 1


def _session(model: Model, tokenizer, lengths, new_tokens: int) -> dict[str, Any]:
    """Compilations for a session of prompts of varied lengths: first one prompt per bucket the session needs
    (the warm-up), then the session itself, whose lengths all fall in compiled buckets: 0 new programs."""
    def counted(prompts):
        before = compile_counts()
        for p in prompts:
            generate(model, p, new_tokens)
        after = compile_counts()
        return {name: after[name] - before[name] for name in after}

    buckets = sorted({bucket(n) for n in lengths})
    warmup_lengths = [next(_same_bucket_length(n) for n in lengths if bucket(n) == b) for b in buckets]
    warmup = counted([_prompt_ids(tokenizer, n) for n in warmup_lengths])
    start = time.perf_counter()
    session = counted([_prompt_ids(tokenizer, n) for n in lengths])
    return {
        "prompt_lengths": list(lengths),
        "new_tokens": new_tokens,
        "buckets": buckets,
        "warmup_lengths": warmup_lengths,
        "warmup_compiles": warmup,
        "session_compiles": session,
        "session_s": round(time.perf_counter() - start, 3),
    }


def run(model: str | None = None, repeats: int = 5, quick: bool = False, settings: Settings | None = None,
        weights: tuple[str, ...] = ("fp32",)) -> dict[str, Any]:
    """Run every benchmark on `model` (the default model when None) in jaxllm's first weight format, and the side by
    side of all `weights` formats when there are several or the one is not fp32; returns JSON-serialisable figures.

    `settings` overrides the FULL / QUICK presets. Clears JAX's caches (to time the compiles of the prefill and
    decode-loop programs), so this process recompiles its programs afterwards. Sets torch's thread count to
    os.cpu_count() while it runs; jax keeps XLA's default CPU thread pool.
    """
    torch, transformers = torch_and_transformers()
    from jaxllm.loader import load_model, resolve

    settings = settings or (QUICK if quick else FULL)
    repeats = max(1, min(repeats, settings.max_repeats or repeats))
    threads = os.cpu_count() or 1
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        load_average_start = os.getloadavg()[0]
        path = resolve(model)
        models = {w: load_model(model, w) for w in weights}
        jax_model = models[weights[0]]
        reference = reference_model(path, attention="sdpa")
        tokenizer = jax_model.tokenizer
        decode_prompt = _prompt_ids(tokenizer, settings.decode_prompt)
        figures: dict[str, Any] = {"environment": {
            "model": str(path),
            "weights": weights[0],
            "repeats": repeats,
            "quick": bool(quick),
            "cpu_count": threads,
            "torch_threads": torch.get_num_threads(),
            "transformers_attention": reference.config._attn_implementation,
            "jax": jax.__version__,
            "jax_device": str(jax.devices()[0].device_kind),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "processor": platform.processor() or platform.machine(),
        }}
        figures["compile"] = _compile_times(jax_model.params, decode_prompt, settings.decode_tokens)
        figures["decode"] = _decode_figures(jax_model, reference, decode_prompt, settings.decode_tokens,
                                            settings.nocache_tokens, repeats, settings.matrix,
                                            max(repeats, settings.roofline_pairs))
        figures["prefill"] = _prefill_figures(jax_model.params, reference, tokenizer, settings.prefill_lengths,
                                              settings.decode_tokens, repeats)
        figures["roofline"] = _roofline(jax_model.params, figures["decode"])
        figures["session"] = _session(jax_model, tokenizer, settings.session_lengths, settings.session_tokens)
        if weights != ("fp32",):
            figures["formats"] = _formats(model, models, decode_prompt, settings, repeats, threads)
        figures["environment"]["load_average"] = [round(load_average_start, 2), round(os.getloadavg()[0], 2)]
        return figures
    finally:
        torch.set_num_threads(previous_threads)


# ---- weight formats side by side, and llama.cpp ---------------------------------------------------------------


def llama_cpp_gguf(model: str | None):
    """(llama_cpp module, the GGUF it would run) or (None, why not): llama.cpp reads GGUF files only."""
    try:
        import llama_cpp
    except ImportError:
        return None, "llama-cpp-python is not installed (README, 'Weights': how to build it)"
    from jaxllm.loader import resolve

    path = resolve(model, gguf=True)
    if path.suffix != ".gguf":
        return None, f"{path} is not a GGUF file"
    return llama_cpp, path


def _llama_cpp(module, path, threads: int, prompt: list[int], new_tokens: int):
    """A function that runs llama.cpp's create_completion of n tokens, greedy, from the prompt's ids and returns how
    many it made."""
    llm = module.Llama(model_path=str(path), n_ctx=bucket(len(prompt) + new_tokens), n_threads=threads,
                       n_threads_batch=threads, verbose=False, seed=0)

    def complete(n: int) -> int:
        out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                    repeat_penalty=1.0)
        return int(out["usage"]["completion_tokens"])

    return complete


def _peak_load_memory(model: str | None, weights: str) -> dict[str, Any]:
    """Load in a fresh process: its resident memory once jax is up (the baseline) and its peak (VmHWM: the high-water
    mark of this process image; getrusage's ru_maxrss would carry the parent's over the exec) after the load."""
    code = (
        "import json, sys, jax, jax.numpy as jnp, jaxllm\n"
        "from jaxllm.weights import nbytes\n"
        "jnp.ones(1).block_until_ready()\n"
        "status = lambda key: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key))) * 1024\n"
        "base = status('VmRSS:')\n"
        "params = jaxllm.load(None if sys.argv[1] == '-' else sys.argv[1], sys.argv[2])\n"
        "print(json.dumps({'baseline_bytes': base, 'peak_bytes': status('VmHWM:'), 'param_bytes': nbytes(params)}))\n")
    out = subprocess.run([sys.executable, "-c", code, "-" if model is None else str(model), weights],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures["peak_over_baseline_bytes"] = figures["peak_bytes"] - figures["baseline_bytes"]
    figures["peak_over_params"] = round(figures["peak_over_baseline_bytes"] / figures["param_bytes"], 3)
    return figures


def _formats(model, models: dict[str, Model], prompt: list[int], settings: Settings, repeats: int,
             threads: int) -> dict[str, Any]:
    """Each format's decode loop (greedy, EOS off) in rounds that alternate the formats, each loop paired with a
    matvec for the roofline, and llama.cpp's completion of the same tokens in the same rounds; then each format's
    prefill latency, compile times and load memory."""
    new_tokens, steps = settings.decode_tokens, settings.decode_tokens - 1
    ids, mask = _prefill_inputs(prompt)
    gen = _no_eos(ids.shape[1], new_tokens)
    setups = {w: _prefilled(m.params, ids, mask, gen) for w, m in models.items()}
    compiles = {w: _compile_times(m.params, prompt, new_tokens) for w, m in models.items()}
    module, gguf = llama_cpp_gguf(model)
    llama = _llama_cpp(module, gguf, threads, prompt, new_tokens) if module is not None else None
    probe = _bandwidth_probe(settings.matrix)
    for setup in setups.values():  # warm-ups
        _seconds(_run_decode, setup)
    if llama is not None:
        llama(new_tokens), llama(1)
    loops: dict[str, list[float]] = {w: [] for w in models}
    matvecs: dict[str, list[float]] = {w: [] for w in models}
    llama_n, llama_1, llama_made = [], [], new_tokens
    outputs = {}
    for _ in range(max(repeats, settings.roofline_pairs)):
        for w, setup in setups.items():
            seconds, state = _seconds(_run_decode, setup)
            loops[w].append(seconds)
            outputs[w] = np.asarray(state.tokens)[0, :new_tokens].tolist()
            matvecs[w].append(probe())
        if llama is not None:
            seconds, llama_made = _seconds(llama, lambda: (new_tokens,))
            llama_n.append(seconds)
            llama_1.append(_seconds(llama, lambda: (1,))[0])
    matrix_bytes = math.prod(settings.matrix) * 4
    rows = {}
    for w, m in models.items():
        weight_bytes = nbytes(m.params)
        step_s = [loop / steps for loop in loops[w]]
        fractions = _roofline_fractions(weight_bytes, step_s, matvecs[w], matrix_bytes)
        prefill = {}
        for length in settings.prefill_lengths:
            p_ids, p_mask = _prefill_inputs(_prompt_ids(m.tokenizer, length))
            p_settings = _no_eos(p_ids.shape[1], new_tokens)
            prefill[str(length)] = _ms(_median(_run_prefill, repeats, lambda: (m.params, p_ids, p_mask, p_settings)))
        rows[w] = {
            "decode_tokens_per_s": round(steps / statistics.median(loops[w]), 3),
            "decode_tokens_per_s_range": [round(steps / max(loops[w]), 3), round(steps / min(loops[w]), 3)],
            "decode_ms_per_token": _ms(statistics.median(step_s)),
            "weight_bytes_per_token": weight_bytes,
            "roofline_fraction": round(statistics.median(fractions), 3),
            "bandwidth_gb_per_s": round(matrix_bytes / statistics.median(matvecs[w]) / 1e9, 3),
            "prefill_ms": prefill,
            "prefill_compile_s": compiles[w]["prefill_compile_s"],
            "decode_loop_compile_s": compiles[w]["decode_loop_compile_s"],
            "greedy_agree_with_first": agreement_length(outputs[w], outputs[next(iter(models))]),
            "load_memory": _peak_load_memory(model, w),
        }
    first = next(iter(models))
    for w in rows:
        rows[w]["decode_vs_first"] = round(rows[w]["decode_tokens_per_s"] / rows[first]["decode_tokens_per_s"], 3)
    out: dict[str, Any] = {"first": first, "rounds": len(loops[first]), "new_tokens": new_tokens, "formats": rows}
    if llama is None:
        out["llama_cpp"] = {"skipped": gguf}
    else:
        llama_decode = (llama_made - 1) / max(statistics.median(llama_n) - statistics.median(llama_1), 1e-9)
        out["llama_cpp"] = {
            "gguf": str(gguf), "version": module.__version__, "threads": threads, "tokens_made": llama_made,
            "completion_s": round(statistics.median(llama_n), 4), "first_token_s": round(statistics.median(llama_1), 4),
            "decode_tokens_per_s": round(llama_decode, 3),
            "jaxllm_over_llama_cpp": {w: round(r["decode_tokens_per_s"] / llama_decode, 3) for w, r in rows.items()},
        }
    return out


# ---- the report ---------------------------------------------------------------------------------------------


def _rows(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def table(figures: dict[str, Any]) -> str:
    """The figures as a plain-text report. Ratios are Transformers time / jaxllm time (> 1: jaxllm faster)."""
    env, comp, dec, roof, ses = (figures[k] for k in ("environment", "compile", "decode", "roofline", "session"))
    out = [
        f"model        {env['model']} (weights {env['weights']})",
        f"engines      jaxllm (jax {env['jax']}, {env['jax_device']}) vs Transformers {env['transformers']} "
        f"(torch {env['torch']}, attention {env['transformers_attention']})",
        f"threads      {env['torch_threads']} torch threads on {env['cpu_count']} CPUs; jax on XLA's default CPU thread pool; "
        f"load average {env['load_average'][0]} at start, {env['load_average'][1]} at end",
        f"method       median of {env['repeats']} timed runs after a warm-up; ratio = Transformers / jaxllm "
        f"(> 1: jaxllm faster)",
        "",
        "Prefill / forward latency (ms). Prefill: the cache filled and last-position logits (jaxllm's program at the",
        "bucket with a cache of S slots; Transformers with logits_to_keep=1). Forward: logits at every position.",
    ]
    out += _rows(["tokens", "bucket", "S", "jaxllm prefill", "HF prefill", "ratio", "jaxllm forward", "HF forward",
                  "ratio"],
                 [[r["tokens"], r["bucket"], r["cache_slots"], r["jaxllm_prefill_ms"], r["transformers_prefill_ms"],
                   r["ratio_vs_prefill"], r["jaxllm_forward_ms"], r["transformers_forward_ms"], r["ratio_vs_forward"]]
                  for r in figures["prefill"]])
    out += [
        "",
        f"Decode: {dec['new_tokens']} new tokens after a {dec['prompt_tokens']}-token prompt, greedy, EOS disabled "
        f"({dec['decode_steps']} decode steps; cache of {dec['cache_slots']} slots)",
    ]
    out += _rows(["path", "seconds", "tokens/s", "ms/token"], [
        ["jaxllm decode loop (steps only)", dec["jaxllm_decode_loop_s"], dec["jaxllm_decode_tokens_per_s"],
         dec["jaxllm_decode_ms_per_token"]],
        ["HF generate(N) - generate(1)", round(dec["transformers_generate_s"] - dec["transformers_first_token_s"], 4),
         dec["transformers_decode_tokens_per_s"], dec["transformers_decode_ms_per_token"]],
        ["jaxllm generate (end to end)", dec["jaxllm_generate_s"], dec["jaxllm_generate_tokens_per_s"],
         _ms(dec["jaxllm_generate_s"] / dec["new_tokens"])],
        ["HF generate (end to end)", dec["transformers_generate_s"], dec["transformers_generate_tokens_per_s"],
         _ms(dec["transformers_generate_s"] / dec["new_tokens"])],
        [f"jaxllm no-cache ({dec['nocache_new_tokens']} tokens)", dec["jaxllm_nocache_s"],
         dec["jaxllm_nocache_tokens_per_s"], _ms(dec["jaxllm_nocache_s"] / dec["nocache_new_tokens"])],
    ])
    out += [
        f"ratio decode {dec['ratio_decode']}, end to end {dec['ratio_generate']}; greedy tokens agree for the first "
        f"{dec['greedy_tokens_agree']} of {dec['new_tokens']}",
        "",
        "Memory roofline for decode",
        f"  weights read per token   {roof['weight_bytes'] / 1e6:,.1f} MB (tied embedding counted once); "
        f"KV cache {roof['kv_cache_bytes'] / 1e6:,.1f} MB (not counted)",
        f"  method                   the {roof['pairs']} decode loops above, each paired with a matvec timed right "
        f"after it; medians",
        f"  bandwidth                {roof['bandwidth_gb_per_s']} GB/s (jitted fp32 matvec, {roof['matrix'][0]}x"
        f"{roof['matrix'][1]}, {roof['matvec_ms']} ms; pairs ranged {roof['bandwidth_range_gb_per_s'][0]}-"
        f"{roof['bandwidth_range_gb_per_s'][1]} GB/s)",
        f"  roofline                 {roof['roofline_tokens_per_s']} tokens/s ({roof['roofline_ms_per_token']} "
        f"ms/token)",
        f"  jaxllm decode            {roof['jaxllm_fraction']:.1%} of roofline (median of the pairs' fractions, which "
        f"ranged {roof['jaxllm_fraction_range'][0]:.1%}-{roof['jaxllm_fraction_range'][1]:.1%}; "
        f"{roof['jaxllm_effective_gb_per_s']} GB/s effective)",
        f"  Transformers decode      {roof['transformers_fraction']:.1%} of roofline (not in the pairs: against their "
        f"median bandwidth)",
        "",
        f"Compiles (prefill bucket {comp['prefill_bucket']}, cache {comp['cache_slots']} slots)",
        f"  prefill                  {comp['prefill_compile_s']} s (first call {comp['prefill_first_call_s']} s "
        f"- warm call {comp['prefill_warm_call_s']} s)",
        f"  decode loop              first call {comp['decode_loop_first_call_s']} s "
        f"(compile ~{comp['decode_loop_compile_s']} s over a warm call of {comp['decode_loop_warm_call_s']} s)",
        f"  programs compiled        {_counts(comp['programs_compiled'])}",
        f"  session                  {len(ses['prompt_lengths'])} prompts of {ses['prompt_lengths']} tokens, "
        f"{ses['new_tokens']} new each; buckets {ses['buckets']}",
        f"    warm-up (lengths {ses['warmup_lengths']}): {_counts(ses['warmup_compiles'])}",
        f"    session ({ses['session_s']} s): {_counts(ses['session_compiles'])}",
    ]
    if "formats" in figures:
        out += ["", *formats_table(figures["formats"])]
    return "\n".join(out)


def formats_table(f: dict[str, Any]) -> list[str]:
    """The weight formats side by side (and llama.cpp), as lines."""
    rows = f["formats"]
    lengths = list(next(iter(rows.values()))["prefill_ms"])
    out = [f"Weight formats side by side: decode of {f['new_tokens']} tokens in {f['rounds']} rounds alternating the "
           f"formats{' and llama.cpp' if 'gguf' in f['llama_cpp'] else ''}; medians"]
    header = ["format", "decode tok/s", "range", f"vs {f['first']}", "MB/token", "roofline",
              *[f"prefill {n} ms" for n in lengths], "compile s (prefill, loop)", "load peak MB (x params)",
              f"greedy = {f['first']}"]
    table_rows = []
    for w, r in rows.items():
        memory = r["load_memory"]
        table_rows.append([
            w, r["decode_tokens_per_s"], f"{r['decode_tokens_per_s_range'][0]:.1f}-{r['decode_tokens_per_s_range'][1]:.1f}",
            r["decode_vs_first"], round(r["weight_bytes_per_token"] / 1e6, 1), f"{r['roofline_fraction']:.1%}",
            *[r["prefill_ms"][n] for n in lengths], f"{r['prefill_compile_s']}, {r['decode_loop_compile_s']}",
            f"{memory['peak_over_baseline_bytes'] / 1e6:.0f} ({memory['peak_over_params']})" if "error" not in memory
            else memory["error"], r["greedy_agree_with_first"]])
    out += _rows(header, table_rows)
    llama = f["llama_cpp"]
    if "gguf" in llama:
        out += [f"llama.cpp {llama['version']} on {llama['gguf']} ({llama['threads']} threads, create_completion, "
                f"greedy): {llama['decode_tokens_per_s']} tok/s decode ({llama['tokens_made']} tokens made)",
                "jaxllm / llama.cpp decode: " + ", ".join(f"{w} {x}" for w, x in llama["jaxllm_over_llama_cpp"].items())]
    else:
        out.append(f"llama.cpp: not run ({llama['skipped']})")
    out.append("load peak: resident memory a fresh process adds while loading, over its baseline once jax is up "
               "(x: over the loaded parameter bytes)")
    return out


# ---- serving ----------------------------------------------------------------------------------------------------
# A load generator for OpenAI-compatible servers, measured as `vllm bench serve` measures them: N streamed completions
# per concurrency level, each request's time to first token (TTFT), the gaps between its streamed chunks (ITL), its
# time per output token after the first (TPOT) and its end-to-end latency; per level the output tokens/s and
# requests/s over the level's wall time.

# Common English words, each one token in the usual BPE vocabularies (with its leading space), so that a prompt of n
# words is about n tokens; the server's usage.prompt_tokens gives the exact count.
PROMPT_WORDS = (
    "the of and to in is was for on that with as by at from his her they this had not are but one have all were "
    "when there can an your which their said each she do how will up other about out many then them these so some "
    "would make like him into time has look two more write go see number no way could people my than first water "
    "been call who oil its now find long down day did get come made may part over new sound take only little work "
    "know place year live me back give most very after thing our just name good sentence man think say great where "
    "help through much before line right too mean old any same tell boy follow came want show also around form three "
    "small set put end does another well large must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play spell air away animal house point page letter "
    "mother answer found study still learn should world high every near add food between own below country plant last "
    "school father keep tree never start city earth eye light thought head under story saw left few while along might "
    "close something seem next hard open example begin life always those both paper together got group often run"
).split()


def serve_prompts(n: int, prompt_tokens: int, seed: int = 0) -> list[str]:
    """n distinct prompts of about `prompt_tokens` tokens each: words drawn from PROMPT_WORDS (each prompt its own
    draw, so that no two are alike), one token left for the BOS a tokenizer may add."""
    import random

    draw = random.Random(seed)
    words = max(1, prompt_tokens - 1)
    return [" ".join(draw.choice(PROMPT_WORDS) for _ in range(words)).capitalize() for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One streamed completion: its timings (seconds from the request's start) and token counts, or its error."""

    error: str | None = None
    ttft: float | None = None  # to the first chunk that carries text
    e2e: float | None = None  # to the end of the stream
    gaps: tuple[float, ...] = ()  # between successive chunks that carry text
    output_tokens: int = 0
    prompt_tokens: int | None = None
    from_usage: bool = False  # output_tokens from the final usage chunk (else: chunks with text counted)


async def _stream_completion(client, url: str, body: dict[str, Any], headers: dict[str, str]) -> Outcome:
    """POST one streamed completion and time its server-sent events: `data: {json}` lines, `data: [DONE]` last."""
    import httpx

    start = time.perf_counter()
    ttft, last, gaps, chunks, usage = None, start, [], 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Outcome(error=f"HTTP {response.status_code}: {' '.join(text.split())[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    return Outcome(error=f"error in the stream: {json.dumps(chunk['error'])[:200]}")
                usage = chunk.get("usage") or usage
                if any(choice.get("text") for choice in chunk.get("choices") or ()):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - start
                    else:
                        gaps.append(now - last)
                    last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return Outcome(error=f"{type(error).__name__}: {error}"[:200])
    e2e = time.perf_counter() - start
    if ttft is None:
        return Outcome(error="the stream ended without text")
    from_usage = bool(usage and usage.get("completion_tokens"))
    return Outcome(ttft=ttft, e2e=e2e, gaps=tuple(gaps),
                   output_tokens=int(usage["completion_tokens"]) if from_usage else chunks,
                   prompt_tokens=int(usage["prompt_tokens"]) if usage and usage.get("prompt_tokens") else None,
                   from_usage=from_usage)


async def _bounded(request, timeout: float) -> Outcome:
    """The request, or a timeout Outcome once `timeout` seconds have passed (the stream is then cancelled)."""
    try:
        return await asyncio.wait_for(request, timeout)
    except asyncio.TimeoutError:
        return Outcome(error=f"no complete answer within {timeout:g} s")


async def _level(client, url: str, bodies: list[dict[str, Any]], headers: dict[str, str], concurrency: int,
                 rate: float | None, timeout: float, seed: int) -> tuple[list[Outcome], float]:
    """Every body sent with at most `concurrency` in flight; with a rate, arrivals are a Poisson process (exponential
    gaps of mean 1 / rate, drawn from `seed`), as vLLM's --request-rate. Returns the outcomes and the wall time."""
    import random

    draw = random.Random(seed)
    slots = asyncio.Semaphore(concurrency)

    async def one(body):
        async with slots:
            return await _bounded(_stream_completion(client, url, body, headers), timeout)

    start = time.perf_counter()
    tasks = []
    for i, body in enumerate(bodies):
        if i and rate is not None and rate != math.inf:
            await asyncio.sleep(draw.expovariate(rate))
        tasks.append(asyncio.ensure_future(one(body)))
    outcomes = await asyncio.gather(*tasks)
    return list(outcomes), time.perf_counter() - start


def _percentile_ms(seconds: list[float], q: float) -> float | None:
    """The q-th percentile in ms, interpolated linearly (numpy's default, as vLLM's); None for no values."""
    return _ms(float(np.percentile(seconds, q))) if seconds else None


def _level_figures(outcomes: list[Outcome], wall: float, concurrency: int, rate: float | None) -> dict[str, Any]:
    """A level's figures from its outcomes (latencies in ms); the failed ones are counted, not timed."""
    done = [o for o in outcomes if o.error is None]
    ttft = [o.ttft for o in done]
    gaps = [g for o in done for g in o.gaps]  # every request's gaps pooled, as vLLM's ITL
    tpot = [(o.e2e - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]
    e2e = [o.e2e for o in done]
    output_tokens = sum(o.output_tokens for o in done)
    prompts = [o.prompt_tokens for o in done if o.prompt_tokens is not None]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error is not None:
            errors[o.error] = errors.get(o.error, 0) + 1
    return {
        "concurrency": concurrency,
        "rate": rate,
        "requests": len(outcomes),
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors": dict(list(errors.items())[:5]),  # the first few distinct messages, with their counts
        "wall_s": round(wall, 4),
        "output_tokens": output_tokens,
        "output_tokens_from_usage": sum(o.from_usage for o in done),  # requests; the others counted text chunks
        "prompt_tokens_mean": round(statistics.mean(prompts), 1) if prompts else None,
        "ttft_ms_p50": _percentile_ms(ttft, 50), "ttft_ms_p99": _percentile_ms(ttft, 99),
        "ttft_ms_mean": _ms(statistics.mean(ttft)) if ttft else None,
        "itl_ms_p50": _percentile_ms(gaps, 50), "itl_ms_p99": _percentile_ms(gaps, 99),
        "tpot_ms_p50": _percentile_ms(tpot, 50),
        "e2e_ms_p50": _percentile_ms(e2e, 50), "e2e_ms_p99": _percentile_ms(e2e, 99),
        "output_tokens_per_s": round(output_tokens / wall, 3),
        "requests_per_s": round(len(done) / wall, 3),
    }


async def _serve(url: str, model: str | None, requests: int, concurrency: tuple[int, ...], rate: float | None,
                 prompt_tokens: int, output_tokens: int, api_key: str | None, timeout: float, ignore_eos: bool,
                 extra_body: dict[str, Any] | None) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # The pool holds every level's connections; the per-request bound is _bounded's, so httpx's own is only a backstop.
    limits = httpx.Limits(max_connections=max(concurrency), max_keepalive_connections=max(concurrency))
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        if model is None:  # as vLLM: the first model the server lists (None when it lists none)
            try:
                listed = (await client.get(f"{url}/v1/models", headers=headers)).json().get("data") or []
                model = listed[0]["id"] if listed else None
            except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
                model = None
        prompts = serve_prompts(requests + 1, prompt_tokens)

        def body(prompt: str) -> dict[str, Any]:
            b = {"prompt": prompt, "max_tokens": output_tokens, "temperature": 0.0, "stream": True,
                 "stream_options": {"include_usage": True}}
            if model is not None:
                b["model"] = model
            if ignore_eos:
                b["ignore_eos"] = True  # vLLM's extension: every request makes max_tokens tokens
            return {**b, **(extra_body or {})}

        # One request first, untimed, as vLLM's initial test run: a server that cannot answer fails here, and one that
        # compiles on its first request does so outside the figures.
        first = await _bounded(_stream_completion(client, url, body(prompts[-1]), headers), timeout)
        if first.error is not None:
            raise ConnectionError(f"{url}/v1/completions: the first (untimed) request failed: {first.error}")
        levels = []
        for i, c in enumerate(concurrency):
            outcomes, wall = await _level(client, url, [body(p) for p in prompts[:requests]], headers, c, rate,
                                          timeout, seed=i)
            levels.append(_level_figures(outcomes, wall, c, rate))
    return {"url": url, "model": model, "levels": levels}


def serve(url: str, model: str | None = None, requests: int = 16, concurrency: tuple[int, ...] = (1, 2, 4, 8),
          rate: float | None = None, prompt_tokens: int = 32, output_tokens: int = 64, api_key: str | None = None,
          timeout: float = 120.0, label: str | None = None, ignore_eos: bool = True,
          extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the OpenAI-compatible server at `url` with streamed completions, as `vllm bench serve`; returns figures.

    For each concurrency level, `requests` prompts of about `prompt_tokens` tokens are POSTed to /v1/completions
    (stream, usage included, greedy, max_tokens = `output_tokens`, vLLM's ignore_eos unless `ignore_eos` is False;
    `extra_body` is merged into each body), at most `concurrency` in flight and, with a `rate`, arriving as a
    Poisson process of that many requests/s (level i's gaps drawn from random.Random(i)). Output tokens are the final
    usage chunk's completion_tokens, or the chunks with text where a server sends no usage. Each request is bounded
    by `timeout` seconds (a timeout is a failure), so a level lasts at most ceil(requests / concurrency) x timeout
    plus its arrival gaps. One untimed request runs first; if it fails, ConnectionError."""
    figures = asyncio.run(_serve(url.rstrip("/"), model, requests, tuple(concurrency), rate, prompt_tokens,
                                 output_tokens, api_key, timeout, ignore_eos, extra_body))
    figures["label"] = label or url
    figures["settings"] = {"requests": requests, "concurrency": list(concurrency), "rate": rate,
                           "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "timeout_s": timeout}
    return figures


@dataclasses.dataclass(frozen=True)
class Server:
    """A server the side by side starts: `command` with "{port}" where its port goes, answering `ready_path` with 200
    once it can serve; `ignore_eos` and `extra_body` as serve's (servers that reject unknown fields)."""

    label: str
    command: tuple[str, ...]
    ready_path: str = "/health"
    ignore_eos: bool = True
    extra_body: dict[str, Any] | None = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(process: subprocess.Popen, url: str, timeout: float) -> str | None:
    """None once GET url answers 200, else why not: the process exited, or `timeout` seconds passed."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"the server exited with status {process.returncode} before it was ready"
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return f"not ready after {timeout:g} s"


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it may have children), SIGKILL if it has not exited 20 s later."""
    import signal

    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def _log_tail(log, lines: int = 8) -> str:
    log.flush()
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").strip().splitlines()[-lines:])


def compare(servers: list[Server], start_timeout: float = 600.0, **load) -> dict[str, Any]:
    """Each server in turn: started on a free 127.0.0.1 port (its own process group, output kept), waited for
    (at most `start_timeout` s), loaded with serve(**load), stopped. A server that does not come up, or whose first
    request fails, is reported as skipped with the reason and the tail of its output."""
    import tempfile

    runs = []
    for server in servers:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [part.replace("{port}", str(port)) for part in server.command]
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
            started = time.perf_counter()
            try:
                why = _wait_ready(process, url + server.ready_path, start_timeout)
                if why is not None:
                    runs.append({"label": server.label, "command": command, "skipped": why, "log": _log_tail(log)})
                    continue
                ready_s = round(time.perf_counter() - started, 1)
                try:
                    figures = serve(url, label=server.label, ignore_eos=server.ignore_eos,
                                    extra_body=server.extra_body, **load)
                except ConnectionError as error:
                    runs.append({"label": server.label, "command": command, "skipped": str(error),
                                 "log": _log_tail(log)})
                    continue
                runs.append({**figures, "command": command, "ready_s": ready_s})
            finally:
                _stop(process)
    return {"runs": runs}


def llama_cpp_python_path(given: str | None = None) -> str | None:
    """A Python that has llama-cpp-python: `given`, $JAXLLM_LLAMA_CPP_PYTHON, this one, or the build's usual home (a
    venv of its own beside the checkout: it builds llama.cpp from source); None when there is none."""
    import importlib.util

    python = given or os.environ.get("JAXLLM_LLAMA_CPP_PYTHON")
    if python is None and importlib.util.find_spec("llama_cpp") is not None:
        python = sys.executable
    beside = Path(__file__).resolve().parents[2] / "llamacpp-venv" / "bin" / "python"
    return python or (str(beside) if beside.exists() else None)


def serving_servers(names: tuple[str, ...], model: str | None = None, weights: tuple[str, ...] = ("fp32",),
                    slots: int = 8, output_tokens: int = 64,
                    llama_cpp_python: str | None = None) -> tuple[list[Server], dict[str, str]]:
    """The servers side by side, from `names` (jaxllm, llama-cpp-python, transformers), and the reasons those that
    cannot run here are skipped. All run the same model: jaxllm in each of `weights`, llama-cpp-python on its GGUF,
    `transformers serve --continuous-batching` on the HF-format directory; each with the machine's threads."""
    import importlib.util
    import shutil

    from jaxllm.errors import InputError
    from jaxllm.loader import open_checkpoint, resolve

    threads = str(os.cpu_count() or 1)
    servers, skipped = [], {}
    for name in names:
        if name == "jaxllm":
            servers += [Server(f"jaxllm {w}", (sys.executable, "-m", "jaxllm", "serve", *(["--model", model] if model
                               else []), "--weights", w, "--port", "{port}", "--slots", str(slots))) for w in weights]
        elif name == "llama-cpp-python":
            python = llama_cpp_python_path(llama_cpp_python)
            if python is None:
                skipped[name] = ("no Python with llama-cpp-python[server]: give --llama-cpp-python PATH (or "
                                 "$JAXLLM_LLAMA_CPP_PYTHON)")
                continue
            # One request at a time, each to its end (interrupt_requests false): llama-cpp-python's server runs one
            # sequence and would otherwise cut a stream short when the next request arrives. It ignores ignore_eos
            # (and stream_options: no usage chunk, so its tokens are the chunks counted); a logit bias that bans the
            # model's EOS ids makes every request run to max_tokens instead.
            checkpoint = open_checkpoint(model, gguf=True)
            if checkpoint.path.suffix != ".gguf":
                skipped[name] = f"{checkpoint.path} is not a GGUF file (llama.cpp reads GGUF only)"
                continue
            ban_eos = {str(e): -100 for e in checkpoint.config.eos_token_ids}
            servers.append(Server("llama-cpp-python", (python, "-m", "llama_cpp.server", "--model",
                                  str(checkpoint.path), "--host", "127.0.0.1", "--port", "{port}",
                                  "--n_threads", threads, "--interrupt_requests", "false", "--n_ctx", "2048"),
                                  ready_path="/v1/models", ignore_eos=False, extra_body={"logit_bias": ban_eos}))
        elif name == "transformers":
            cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
            missing = [m for m in ("transformers", "fastapi", "uvicorn", "openai")
                       if importlib.util.find_spec(m) is None]
            if cli is None or missing:
                skipped[name] = f"`transformers serve` needs {', '.join(missing) or 'the transformers command'}: " \
                                f"pip install 'transformers[serving]'"
                continue
            # It rejects unknown fields (ignore_eos): a generation config of its own, without EOS ids, makes every
            # request run to max_tokens instead.
            servers.append(Server("transformers", (cli, "serve", "--continuous-batching", "--device", "cpu",
                                  "--host", "127.0.0.1", "--port", "{port}", str(resolve(model))), ignore_eos=False,
                                  extra_body={"generation_config": json.dumps(
                                      {"max_new_tokens": output_tokens, "do_sample": False})}))
        else:
            raise InputError(f"unknown server {name!r}: expected jaxllm, llama-cpp-python or transformers")
    return servers, skipped


# ---- startup: a whole `jaxllm generate` process against llama-cpp-python doing the same job -------------------

# The job `jaxllm generate PROMPT -n N` does, as llama-cpp-python does it: load the GGUF, N greedy tokens, print.
LLAMA_CPP_GENERATE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=int(sys.argv[4]), n_threads_batch=int(sys.argv[4]),
                      verbose=False, seed=0)
out = llm.create_completion(sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0.0, top_k=1, repeat_penalty=1.0)
print(sys.argv[2] + out["choices"][0]["text"])
"""


def _timed_process(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Wall seconds of one process, its output, and the phases of a `jaxllm generate --timings` line."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed: {done.stderr.strip()[-500:]}")
    out = {"wall_s": wall, "text": done.stdout.strip()}
    line = next((x for x in done.stderr.splitlines() if x.startswith("timings: ")), None)
    if line is not None:
        phases, total = line[len("timings: "):].split("; total ")
        out["phases_s"] = {name: float(value) for name, value in
                           (p.rsplit(" ", 2)[:2] for p in phases.split(", "))}
        out["phases_s"]["before the command"] = wall - float(total.split(" ")[0])
    return out


def startup(model: str | None = None, weights: str = "fp32", repeats: int = 5, prompt: str = "The capital of France is",
            new_tokens: int = 8, llama_cpp_python: str | None = None) -> dict[str, Any]:
    """Wall seconds of a whole `jaxllm generate PROMPT -n N` process: warm (its programs stored by an earlier run)
    and cold (JAXLLM_COMPILE_CACHE=0: every program traced and compiled), each with the command's --timings
    breakdown; alternated run by run with llama-cpp-python doing the same job on the model's GGUF (a fresh process:
    load, N greedy tokens) when a Python with it is found. Medians and ranges over `repeats` rounds."""
    from jaxllm.hub import COMPILE_CACHE_ENV
    from jaxllm.loader import resolve

    command = [sys.executable, "-m", "jaxllm", "generate", prompt, "-n", str(new_tokens), "--weights", weights,
               "--timings", *(["--model", model] if model else [])]
    env = dict(os.environ)
    jobs = {"jaxllm warm": (command, {**env, COMPILE_CACHE_ENV: "1"}),
            "jaxllm cold": (command, {**env, COMPILE_CACHE_ENV: "0"})}
    python, skipped = llama_cpp_python_path(llama_cpp_python), None
    gguf = resolve(model, gguf=True)
    if python is None or gguf.suffix != ".gguf":
        skipped = "no Python with llama-cpp-python" if python is None else f"{gguf} is not a GGUF file"
    else:
        threads = str(os.cpu_count() or 1)
        jobs["llama-cpp-python"] = ([python, "-c", LLAMA_CPP_GENERATE, str(gguf), prompt, str(new_tokens), threads],
                                    env)
    _timed_process(*jobs["jaxllm warm"])  # stores the programs (and warms the page cache for everyone)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            runs[name].append(_timed_process(*job))
    rows = {}
    for name, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        rows[name] = {"wall_s": round(statistics.median(walls), 3), "min_s": round(min(walls), 3),
                      "max_s": round(max(walls), 3), "text": rs[0]["text"]}
        if "phases_s" in rs[0]:
            rows[name]["phases_s"] = {k: round(statistics.median(r["phases_s"][k] for r in rs), 3)
                                      for k in rs[0]["phases_s"]}
    out = {"prompt": prompt, "new_tokens": new_tokens, "weights": weights, "repeats": repeats, "jobs": rows,
           "load_average": os.getloadavg()}
    if "llama-cpp-python" in rows:
        out["warm_over_llama_cpp"] = round(rows["jaxllm warm"]["wall_s"] / rows["llama-cpp-python"]["wall_s"], 2)
    else:
        out["llama_cpp_skipped"] = skipped
    return out


def startup_table(f: dict[str, Any]) -> str:
    phases = ["before the command", "imports", "load", "first token", "the rest"]
    lines = [f"Startup: a whole `jaxllm generate {f['prompt']!r} -n {f['new_tokens']}` process (weights {f['weights']}),"
             f" median of {f['repeats']} alternating rounds [min-max]; load average {f['load_average'][0]:.2f}",
             ""]
    rows = [[name, f"{r['wall_s']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}]",
             *(f"{r['phases_s'][p]:.2f}" if "phases_s" in r else "" for p in phases)] for name, r in f["jobs"].items()]
    lines += _rows(["job", "wall s", *phases], rows)
    if "warm_over_llama_cpp" in f:
        lines.append(f"jaxllm warm / llama-cpp-python: {f['warm_over_llama_cpp']}x")
    else:
        lines.append(f"llama-cpp-python skipped: {f['llama_cpp_skipped']}")
    return "\n".join(lines)


def serve_table(figures: dict[str, Any]) -> str:
    """serve's figures, or compare's (a row per server and level), as a plain-text table."""
    runs = figures.get("runs", [figures])
    settings = next((r["settings"] for r in runs if "settings" in r), None)
    out = []
    if settings:
        arrivals = "" if settings["rate"] is None else f", Poisson arrivals at {settings['rate']} requests/s"
        out.append(f"Streamed completions: {settings['requests']} requests per level, prompts of ~"
                   f"{settings['prompt_tokens']} tokens, {settings['output_tokens']} output tokens, greedy{arrivals}; "
                   f"latencies in ms, out tok/s = output tokens / the level's wall time")
    rows = []
    for run in runs:
        for level in run.get("levels", ()):
            rows.append([run["label"], level["concurrency"], f"{level['completed']}/{level['requests']}",
                         level["ttft_ms_p50"], level["ttft_ms_p99"], level["itl_ms_p50"], level["itl_ms_p99"],
                         level["tpot_ms_p50"], level["e2e_ms_p50"], level["output_tokens_per_s"],
                         level["requests_per_s"], level["output_tokens"],
                         f"{level['output_tokens_from_usage']}/{level['completed']}"])
    out += _rows(["server", "conc.", "done", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "TPOT p50", "e2e p50",
                  "out tok/s", "req/s", "out tokens", "from usage"], rows)
    for run in runs:
        for level in run.get("levels", ()):
            for error, n in level["errors"].items():
                out.append(f"{run['label']} at concurrency {level['concurrency']}: {n} failed: {error}")
        if "skipped" in run:
            out.append(f"{run['label']}: skipped ({run['skipped']})")
    for name, why in figures.get("skipped", {}).items():
        out.append(f"{name}: skipped ({why})")
    return "\n".join(out)


# ---- the engine in-process: decode cost per step, and a long prompt joining running streams --------------------


def engine_steps(models: dict[str, Model], contexts: tuple[int, ...] = (512, 8192), slots: int = 8,
                 prompt_tokens: int = 100, steps: int = 48, rounds: int = 3) -> dict[str, Any]:
    """Decode ms per step with every slot busy on a ~prompt_tokens context, for each weight format and reserved
    --max-context, the engines measured in alternating rounds. A round fills every slot, then times the token
    deliveries from the moment all slots decode until the first request ends (prefill excluded)."""
    from jaxllm.engine import Engine, Request

    prompts = [list(np.random.default_rng(row).integers(100, 1000, prompt_tokens)) for row in range(slots)]
    engines = {(w, S): Engine(m, slots=slots, max_context=S, eos_ids=[]).start() for w, m in models.items()
               for S in contexts}
    times: dict[tuple[str, int], list[float]] = {key: [] for key in engines}
    try:
        for _ in range(rounds):
            for key, engine in engines.items():
                stamps: list[tuple[float, int]] = []
                record = lambda r, tokens, reason: stamps.append((time.perf_counter(), len(tokens)))  # noqa: E731
                requests = [engine.submit(Request(prompt=p, max_tokens=steps, on_event=record)) for p in prompts]
                for r in requests:
                    r.finished.wait(600)
                started = max(r.first_token_at for r in requests)
                ended = min(t for t, _ in stamps[-slots:])  # the last deliveries: each slot's final burst
                made = sum(n for t, n in stamps if started < t <= ended)
                times[key].append((ended - started) / max(made / slots, 1))
    finally:
        for engine in engines.values():
            engine.stop()
    rows = [{"weights": w, "max_context": S, "slots": slots, "ms_per_step": _ms(statistics.median(times[w, S])),
             "ms_per_step_range": [_ms(min(times[w, S])), _ms(max(times[w, S]))],
             "tokens_per_s": round(slots / statistics.median(times[w, S]), 1),
             "cache_bytes": engines[w, S].cache_bytes} for w, S in engines]
    first = rows[0]["ms_per_step"]
    for row in rows:
        row["vs_first"] = round(row["ms_per_step"] / first, 3)
    return {"prompt_tokens": prompt_tokens, "rounds": rounds, "rows": rows}


def prefill_join(model: Model, chunks: tuple[int, ...] = (256, 2048), long_prompt: int = 2000, streams: int = 3,
                 decode_steps: int = 4) -> dict[str, Any]:
    """While `streams` requests decode, a `long_prompt`-token prompt joins: the running streams' gaps between tokens
    over the join (a burst's first token waited since the stream's previous delivery, the rest none), with the long
    prompt prefilled `chunk` tokens at a time between decode calls (the largest chunk: in one piece)."""
    from jaxllm.engine import Engine, Request

    rng = np.random.default_rng(0)
    long_ids = rng.integers(100, 1000, long_prompt).tolist()
    out = []
    for chunk in chunks:
        engine = Engine(model, slots=streams + 1, max_context=long_prompt + 256, decode_steps=decode_steps,
                        prefill_chunk=chunk, eos_ids=[]).start()
        try:
            engine.generate([long_ids], 2)  # the long prompt's later-chunk programs compiled outside the figures
            stamps: dict[int, list[tuple[float, int]]] = {i: [] for i in range(streams)}

            def record(i):
                return lambda r, tokens, reason: stamps[i].append((time.perf_counter(), len(tokens)))

            running = [engine.submit(Request(prompt=rng.integers(100, 1000, 60).tolist(), max_tokens=200,
                                             on_event=record(i))) for i in range(streams)]
            while any(r.first_token_at is None for r in running):
                time.sleep(0.01)
            time.sleep(1.0)
            joined = engine.submit(Request(prompt=long_ids, max_tokens=4))
            joined.finished.wait(600)
            start, end = joined.submitted_at, joined.first_token_at
            for r in running:
                engine.cancel(r)
        finally:
            engine.stop()
        gaps = []
        for deliveries in stamps.values():
            for (t0, _), (t1, n) in zip(deliveries, deliveries[1:]):
                if t1 >= start and t0 <= end:
                    gaps += [t1 - t0] + [0.0] * (n - 1)
        out.append({"prefill_chunk": chunk, "join_s": round(end - start, 3), "tokens_during_join": len(gaps),
                    "gap_p50_ms": _ms(float(np.percentile(gaps, 50))), "gap_p99_ms": _ms(float(np.percentile(gaps, 99))),
                    "gap_max_ms": _ms(max(gaps))})
    return {"long_prompt": long_prompt, "streams": streams, "decode_steps": decode_steps, "rows": out}


def engine_table(steps: dict[str, Any] | None, join: dict[str, Any] | None) -> str:
    out = []
    if steps:
        out.append(f"engine decode, every slot busy on a ~{steps['prompt_tokens']}-token context "
                   f"(medians of {steps['rounds']} alternating rounds):")
        out += _rows(["weights", "max-context", "slots", "ms/step", "range", "tok/s", "vs first", "KV cache"],
                     [[r["weights"], r["max_context"], r["slots"], r["ms_per_step"], r["ms_per_step_range"],
                       r["tokens_per_s"], r["vs_first"], f"{r['cache_bytes'] / 2**20:,.0f} MiB"] for r in steps["rows"]])
    if join:
        out.append(f"a {join['long_prompt']}-token prompt joins {join['streams']} running streams "
                   f"(decode calls of {join['decode_steps']} steps); the streams' gaps between tokens during the join:")
        out += _rows(["prefill chunk", "join s", "tokens", "gap p50 ms", "gap p99 ms", "gap max ms"],
                     [[r["prefill_chunk"], r["join_s"], r["tokens_during_join"], r["gap_p50_ms"], r["gap_p99_ms"],
                       r["gap_max_ms"]] for r in join["rows"]])
    return "\n".join(out)


# ---- mixture of experts against dense ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoeSizes:
    """The pair of random models `moe` builds: one with E experts of width F, k chosen per token, and a dense one of
    the same active parameters (intermediate k·F), both with the same attention, embeddings and head."""

    hidden: int = 768
    expert_width: int = 384  # F
    experts: int = 32  # E
    chosen: int = 2  # k
    layers: int = 4
    heads: int = 12
    kv_heads: int = 4
    vocab: int = 4096
    prompt: int = 16  # prompt tokens before the decode
    new_tokens: int = 64
    prefill: int = 256  # tokens of the prefill figure
    rounds: int = 5  # alternating rounds; medians reported


MOE_QUICK = MoeSizes(hidden=64, expert_width=32, experts=8, layers=1, heads=4, kv_heads=2, vocab=256, prompt=8,
                     new_tokens=4, prefill=64, rounds=2)  # a smoke run; its prefill still runs as tiles


def moe_configs(s: MoeSizes) -> dict[str, Any]:
    """HF config dicts: "moe" (Mixtral, E experts of width F, top k) and "dense" (Mistral, intermediate k·F)."""
    from jaxllm.config import LLMConfig

    base = dict(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                num_key_value_heads=s.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False)
    return {"moe": LLMConfig.from_dict(dict(base, model_type="mixtral", intermediate_size=s.expert_width,
                                            num_local_experts=s.experts, num_experts_per_tok=s.chosen)),
            "dense": LLMConfig.from_dict(dict(base, model_type="mistral", intermediate_size=s.chosen * s.expert_width))}


def random_params(config, weights: str = "fp32", seed: int = 0):
    """Params of `config` with random weights N(0, 0.02²) (norms 1), read through loader.build_params from an
    in-memory checkpoint, so each format is made (int8 quantized, outliers kept fp32) as a real load makes it."""
    import zlib

    from jaxllm.loader import Checkpoint, build_params, layer_table, model_table

    entries = model_table(config) + [e for i in range(config.num_hidden_layers) for e in layer_table(config, i)]
    tensors = {e.hf_name: (e.hf_shape, "F32") for e in entries}

    def read(name: str) -> np.ndarray:
        shape = tensors[name][0]
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)

    checkpoint = Checkpoint(path=Path(f"<random {config.model_type}>"), config=config, tensors=tensors, read=read,
                            tokenizer_files=dict)
    return build_params(checkpoint, weights)


def moe(sizes: MoeSizes = MoeSizes(), weights: tuple[str, ...] = ("fp32", "int8")) -> dict[str, Any]:
    """Decode tokens/s and prefill ms of a random mixture-of-experts model and of a dense model with the same active
    parameters, per weight format: greedy decode of `new_tokens` after a `prompt`-token prompt (the compiled loop,
    prefill untimed) and one `prefill`-token prefill, the models timed in alternating rounds."""
    configs = moe_configs(sizes)
    models = {(w, name): random_params(c, w) for w in weights for name, c in configs.items()}
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, sizes.vocab, sizes.prompt).tolist()
    long_prompt = rng.integers(3, sizes.vocab, sizes.prefill).tolist()
    ids, mask = _prefill_inputs(prompt)
    long_ids, long_mask = _prefill_inputs(long_prompt)
    decode_settings = _no_eos(ids.shape[1], sizes.new_tokens)
    prefill_settings = _no_eos(long_ids.shape[1], 1)
    decode_s: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    prefill_s: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    for params in models.values():  # compiled outside the figures
        _run_decode(params, _run_prefill(params, ids, mask, decode_settings), decode_settings)
        _run_prefill(params, long_ids, long_mask, prefill_settings)
    for _ in range(sizes.rounds):
        for key, params in models.items():
            decode_s[key].append(_seconds(_run_decode, _prefilled(params, ids, mask, decode_settings))[0])
            long_inputs = (params, long_ids, long_mask, prefill_settings)
            prefill_s[key].append(_seconds(_run_prefill, lambda: long_inputs)[0])
    rows = []
    for w in weights:
        tokens_per_s = {name: sizes.new_tokens / statistics.median(decode_s[w, name]) for name in configs}
        prefill_ms = {name: _ms(statistics.median(prefill_s[w, name])) for name in configs}
        for name in configs:
            params = models[w, name]
            first = params.layers[0]
            mlp = (first.experts_gate_up, first.experts_down) if name == "moe" else (first.gate_up_proj, first.down_proj)
            mlp_bytes = sum(nbytes(m) for m in mlp)
            rows.append({"weights": w, "model": name, "bytes": nbytes(params), "mlp_bytes_per_layer": mlp_bytes,
                         "active_mlp_bytes_per_layer": mlp_bytes * sizes.chosen // sizes.experts if name == "moe"
                         else mlp_bytes,
                         "decode_tokens_per_s": round(tokens_per_s[name], 1),
                         "decode_vs_dense": round(tokens_per_s[name] / tokens_per_s["dense"], 3),
                         "prefill_ms": prefill_ms[name],
                         "prefill_vs_dense": round(prefill_ms["dense"] / prefill_ms[name], 3)})
    return {"sizes": dataclasses.asdict(sizes), "rows": rows}


def moe_table(figures: dict[str, Any]) -> str:
    s = figures["sizes"]
    out = [f"{s['experts']} experts of width {s['expert_width']}, top {s['chosen']}, against dense of width "
           f"{s['chosen'] * s['expert_width']} (hidden {s['hidden']}, {s['layers']} layers): decode of "
           f"{s['new_tokens']} tokens after {s['prompt']}, prefill of {s['prefill']}, medians of {s['rounds']} "
           f"alternating rounds; vs dense > 1 means faster than dense"]
    out += _rows(["weights", "model", "weights MiB", "MLP MiB/layer (active)", "decode tok/s", "vs dense",
                  "prefill ms", "vs dense"],
                 [[r["weights"], r["model"], f"{r['bytes'] / 2**20:,.1f}",
                   f"{r['mlp_bytes_per_layer'] / 2**20:,.1f} ({r['active_mlp_bytes_per_layer'] / 2**20:,.1f})",
                   r["decode_tokens_per_s"], r["decode_vs_dense"], r["prefill_ms"], r["prefill_vs_dense"]]
                  for r in figures["rows"]])
    return "\n".join(out)


# ---- speculative decoding: prompt lookup against plain decode --------------------------------------------------

GROUNDED = [  # input-grounded: the answer copies from the prompt
    "Summarise this paragraph in two sentences: The city council met on Monday to discuss the new bicycle lanes. "
    "Residents complained that the lanes removed parking spaces, while cyclists said the lanes made the roads safer. "
    "The council decided to keep the lanes for six months and then review the accident figures.",
    "Extract every date from this text as a list: The contract was signed on 12 March 2021, amended on 3 June 2022, "
    "and will expire on 31 December 2025 unless renewed before 1 October 2025.",
    "Rewrite this email more politely: Send me the report now. You were supposed to finish it yesterday and I am "
    "still waiting. Do it today.",
    "Rename the function add to sum_two in this code and return the whole code:\ndef add(a, b):\n    return a + b\n\n"
    "print(add(1, 2))\nprint(add(3, 4))",
]
OPEN_ENDED = ["Write a short story about a dragon who learns to cook.",
              "What are three good habits for staying healthy?"]
LLAMA_CPP_LOOKUP = """
import json, sys, time, llama_cpp
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
path, threads, new_tokens, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompts = json.loads(sys.stdin.read())
out = {}
for name, draft in (("plain", None), ("lookup", LlamaPromptLookupDecoding(num_pred_tokens=10))):
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False,
                          seed=0, draft_model=draft)
    first = next(iter(prompts.values()))[0]
    llm.create_completion(first, max_tokens=4, temperature=0.0, top_k=1, repeat_penalty=1.0)  # warm up
    runs = []
    for _ in range(repeats):
        per_kind = {}
        for kind, ps in prompts.items():
            tokens = seconds = 0
            for p in ps:
                start = time.perf_counter()
                r = llm.create_completion(p, max_tokens=new_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0)
                seconds += time.perf_counter() - start
                tokens += r["usage"]["completion_tokens"]
            per_kind[kind] = tokens / seconds
        runs.append(per_kind)
    out[name] = runs
print(json.dumps(out))
"""


def _speculation_run(model: Model, prompts: list[list[int]], new_tokens: int, mode: str, P: int) -> dict[str, Any]:
    """Each prompt alone, left-padded to P slots, decode timed after its prefill: tokens made, seconds, forward steps,
    proposals, summed and per prompt."""
    from jaxllm.generation import SLACK, Speculation, end_ids, seed_key, speculative_decode

    eos = end_ids(model)
    totals = {"tokens": 0, "seconds": 0.0, "steps": 0, "proposed": 0, "accepted": 0, "outputs": [], "each": []}
    for ids in prompts:
        settings = GenerationSettings(max_new_tokens=new_tokens, eos_ids=eos, pad_id=eos[0] if eos else 0,
                                      length=bucket(P + new_tokens + SLACK), row_stable=mode != "plain, fast",
                                      speculation=Speculation() if mode == "lookup" else None)
        x, mask = left_pad([ids], P, settings.pad_id)
        state = jax.block_until_ready(prefill(model.params, x, mask, seed_key(0), settings))
        start = time.perf_counter()
        if mode == "lookup":
            s = jax.block_until_ready(speculative_decode(model.params, state, settings))
            made, steps, state = int(s.made[0]), int(s.steps[0]), s.state
            totals["proposed"] += int(s.proposed[0])
            totals["accepted"] += int(s.accepted[0])
        else:
            state = jax.block_until_ready(decode(model.params, state, settings))
            made = int(state.step)
            steps = made - 1
        seconds = time.perf_counter() - start
        totals["seconds"] += seconds
        totals["tokens"] += made - 1  # the first token is the prefill's
        totals["steps"] += steps
        totals["each"].append({"tokens": made - 1, "seconds": seconds, "steps": steps})
        totals["outputs"].append(np.asarray(state.tokens)[0, :made].tolist())
    return totals


def speculation(model: str | None = None, weights: tuple[str, ...] = ("fp32", "int8"), new_tokens: int = 96,
                repeats: int = 3, kinds: dict[str, list[str]] | None = None,
                llama_cpp_python: str | None = None) -> dict[str, Any]:
    """Prompt lookup against plain greedy decode on chat-formatted prompts, per kind (input-grounded, open-ended):
    decode tokens/s summed over the prompts (each alone, prefill excluded), acceptance and tokens per forward step,
    for each weight format, side by side in rounds; "plain" is the row-stable decode that `generate` runs and
    speculation matches bit for bit, "plain, fast" the decode before it. llama-cpp-python's
    LlamaPromptLookupDecoding runs the same prompts on the model's GGUF when a Python with it is found."""
    from jaxllm import load_model
    from jaxllm.loader import resolve

    kinds = kinds or {"input-grounded": GROUNDED, "open-ended": OPEN_ENDED}
    modes = ("plain, fast", "plain", "lookup")
    out: dict[str, Any] = {"new_tokens": new_tokens, "repeats": repeats, "formats": {}}
    for w in weights:
        m = load_model(model, weights=w)
        chats = {kind: [m.tokenizer.encode(m.tokenizer.apply_chat_template([{"role": "user", "content": t}]))
                        for t in texts] for kind, texts in kinds.items()}
        P = bucket(max(len(ids) for prompts in chats.values() for ids in prompts))  # one program a mode
        for mode in modes:  # untimed first: each mode's program compiled
            _speculation_run(m, next(iter(chats.values()))[:1], new_tokens, mode, P)
        figures = {}
        for kind, prompts in chats.items():
            rounds = {mode: [_speculation_run(m, prompts, new_tokens, mode, P)] for mode in modes}
            for _ in range(repeats - 1):
                for mode in modes:
                    rounds[mode].append(_speculation_run(m, prompts, new_tokens, mode, P))
            rates = {mode: [r["tokens"] / r["seconds"] for r in rs] for mode, rs in rounds.items()}
            spec = rounds["lookup"][0]
            figures[kind] = {
                "tok_s": {mode: round(statistics.median(r), 2) for mode, r in rates.items()},
                "range": {mode: [round(min(r), 2), round(max(r), 2)] for mode, r in rates.items()},
                "lookup_over_plain": round(statistics.median(rates["lookup"]) / statistics.median(rates["plain"]), 2),
                "lookup_over_fast": round(statistics.median(rates["lookup"]) / statistics.median(rates["plain, fast"]),
                                          2),
                "acceptance": round(spec["accepted"] / max(spec["proposed"], 1), 3),
                "tokens_per_step": _tokens_per_step(spec),
                "identical": spec["outputs"] == rounds["plain"][0]["outputs"],
                "identical_to_fast": spec["outputs"] == rounds["plain, fast"][0]["outputs"],
                "prompts": [_per_prompt(text, [r["each"][i] for r in rounds["plain"]],
                                        [r["each"][i] for r in rounds["lookup"]])
                            for i, text in enumerate(kinds[kind])]}
        out["formats"][w] = figures
    python = llama_cpp_python_path(llama_cpp_python)
    gguf = resolve(model, gguf=True)
    if python is None or gguf.suffix != ".gguf":
        out["llama_cpp_skipped"] = "no Python with llama-cpp-python" if python is None else f"{gguf} is not a GGUF"
    else:
        m = load_model(model, weights=weights[0])
        texts = {kind: [m.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in ts]
                 for kind, ts in kinds.items()}
        done = subprocess.run([python, "-c", LLAMA_CPP_LOOKUP, str(gguf), str(os.cpu_count() or 1), str(new_tokens),
                               str(repeats)], input=json.dumps(texts), capture_output=True, text=True, timeout=1800,
                              check=False)
        if done.returncode != 0:
            how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
            out["llama_cpp_skipped"] = f"llama-cpp-python failed ({how}): {done.stderr.strip()[-300:]}"
        else:
            runs = json.loads(done.stdout)
            out["llama_cpp"] = {kind: {mode: round(statistics.median(r[kind] for r in runs[mode]), 2)
                                       for mode in runs} for kind in kinds}
    out["load_average"] = os.getloadavg()
    return out


def _per_prompt(text: str, plain_runs: list[dict[str, Any]], lookup_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One prompt's figures from its plain and lookup runs (one per round): where speculation helps and where not."""
    plain, lookup = (statistics.median(r["tokens"] / r["seconds"] for r in rs) for rs in (plain_runs, lookup_runs))
    first = lookup_runs[0]
    return {"prompt": text, "tokens": first["tokens"], "tokens_per_step": _tokens_per_step(first),
            # None: no decode tokens (the prefill's token ended the answer)
            "lookup_over_plain": round(lookup / plain, 2) if plain > 0 else None}


def _tokens_per_step(run: dict[str, Any]) -> float:
    """Tokens made per forward step (plain or verify) of a run's figures."""
    return round(run["tokens"] / max(run["steps"], 1), 2)


def speculation_table(f: dict[str, Any]) -> str:
    lines = [f"Prompt lookup against plain greedy decode: {f['new_tokens']} new tokens at most per prompt, decode "
             f"tokens/s summed over the prompts, median of {f['repeats']} rounds; load average "
             f"{f['load_average'][0]:.2f}", ""]
    rows = []
    for w, kinds in f["formats"].items():
        for kind, r in kinds.items():
            rows.append([w, kind, r["acceptance"], r["tokens_per_step"], r["tok_s"]["plain, fast"], r["tok_s"]["plain"],
                         r["tok_s"]["lookup"], f"{r['lookup_over_plain']}x", f"{r['lookup_over_fast']}x",
                         "yes" if r["identical"] else "NO"])
    lines += _rows(["weights", "prompts", "acceptance", "tokens/step", "plain, fast tok/s", "plain tok/s",
                    "lookup tok/s", "lookup/plain", "lookup/fast", "identical"], rows)
    lines += ["", "Per prompt (its own tokens/s, median of the rounds):"]
    lines += _rows(["weights", "prompt", "new tokens", "tokens/step", "lookup/plain"],
                   [[w, " ".join(p["prompt"].split())[:48], p["tokens"], p["tokens_per_step"],
                     "-" if p["lookup_over_plain"] is None else f"{p['lookup_over_plain']}x"]
                    for w, kinds in f["formats"].items() for r in kinds.values() for p in r.get("prompts", [])])
    if "llama_cpp" in f:
        lines.append("")
        lines += _rows(["llama-cpp-python (GGUF)", "plain tok/s", "lookup tok/s", "lookup/plain"],
                       [[kind, r["plain"], r["lookup"], f"{r['lookup'] / r['plain']:.2f}x"]
                        for kind, r in f["llama_cpp"].items()])
    else:
        lines.append(f"llama-cpp-python skipped: {f['llama_cpp_skipped']}")
    return "\n".join(lines)
