"""What every sublayer shares: the per-call Context, RMSNorm, and nn.Linear over any weight format.

Shape letters (../shared/STYLE.md): B batch, T query positions, S key positions, D hidden, N query heads,
K key/value heads, G = N // K, H head_dim, F intermediate, V vocab, L layers, E experts, k experts chosen per token.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxllm.config import LLMConfig
from jaxllm.weights import Blocks, Int8, is_quantized, matmul

Array = jax.Array
# tap(name, value) records an intermediate; the plain forward passes a no-op, the diff ladder a collector.
Tap = Callable[[str, Array], None]


Matrix = Array | Int8 | Blocks  # a float array, or a quantized matrix standing in for one (weights.py)


@dataclasses.dataclass(frozen=True)
class Context:
    """What every block of one forward call shares: the config, RoPE tables, who sees whom, where the cache is
    written, and the tap that records intermediates."""

    config: LLMConfig
    cos: Array | None  # [B, T, R] for R = rotary_dim; None in a layer without RoPE
    sin: Array | None  # [B, T, R]
    visible: Array  # [B, T, T]: query t sees this call's key t'
    cached_visible: Array | None  # [B, 1 or T, W]: query t sees cache slot s; None without a cache or with an empty one
    index: Array | None  # [B] int32: each row's cache slot of this call's first token
    tap: Tap
    window: int | None = None  # W: attention reads cache slots [0, W) alone (None: all S)


def no_tap(name: str, value: Array) -> None:
    pass


def rms_norm(x: Array, weight: Array, eps: float, plus_one: bool = False) -> Array:
    """HF LlamaRMSNorm: statistics in fp32, cast back to the input dtype *before* the weight multiply. With
    `plus_one`, Gemma's: scaled by (1 + weight) in fp32, then cast."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * x32.astype(x.dtype)


def norm(x: Array, weight: Array, config: LLMConfig) -> Array:
    """The model's RMSNorm, over the last axis of x (D, or H for q_norm and k_norm)."""
    return rms_norm(x, weight, config.rms_norm_eps, config.gemma_norms)



def linear(x: Array, w: Matrix, out_dtype=None) -> Array:
    """nn.Linear without bias: x [B, T, in] times w [*out, in] (HF's orientation; `out` may be several axes)
    -> [B, T, *out], einsum BTI,OI->BTO. An fp32 w runs the dot_general it lowers to (jnp.einsum's own bookkeeping
    takes a fifth of the time to trace a forward); a bf16 or quantized w runs weights.matmul, whose x @ w.T form fuses
    w's convert or dequantization into the decode matvec. `out_dtype`: the result's dtype when it should differ from
    x's (the logits are fp32 in every format)."""
    B, T, I = x.shape
    if is_quantized(w):
        return w.matmul(x.reshape(B * T, I)).reshape(B, T, *w.shape[:-1])
    if w.dtype == jnp.bfloat16:  # XLA:CPU has no fast bf16 dot: the f32 convert on w fuses into the matvec, as int8's
        out = matmul(x.reshape(B * T, I).astype(jnp.float32), w.reshape(-1, I).astype(jnp.float32))
        return out.astype(out_dtype or x.dtype).reshape(B, T, *w.shape[:-1])
    # As a 2-D [out, in] matrix (a free reshape): with several `out` axes XLA:CPU's dot ran 2.5x slower in decode.
    out = jax.lax.dot_general(x, w.reshape(-1, I), (((2,), (1,)), ((), ())), preferred_element_type=out_dtype)
    return out.reshape(B, T, *w.shape[:-1])


def bias(x: Array, b: Array | None) -> Array:
    return x if b is None else x + b

