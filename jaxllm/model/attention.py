"""Grouped-query attention: the block (projections, q/k norms, RoPE, the cache write), the attention itself and
the masks of who sees whom."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxllm.config import LLMConfig
from jaxllm.model.cache import KVCache, write_rows
from jaxllm.model.ops import Array, Context, bias, chex, is_row_stable, linear, norm
from jaxllm.weights import materialized
from jaxllm.model.rope import apply_rope


def attention(q: Array, k: Array, v: Array, visible: Array, cached: tuple[Array, Array, Array] | None = None,
              scale: float | None = None, softcap: float | None = None, sinks: Array | None = None) -> Array:
    """Grouped-query attention. q [B, T, N, H], k/v [B, K, T, H] (this call's keys), visible [B, T, T] -> [B, T, N, H].

    `cached` = (keys [B, K, H, S], values [B, K, S, H], visible [B, 1 or T, S]) adds the keys of earlier calls; one
    softmax runs over both sets. Reading the cache as it was before this call's write lets XLA update it in place.
    Scores are q·k times `scale` (default H ** -0.5), then soft-capped to softcap * tanh(scores / softcap) if given.
    `sinks` [N] (gpt-oss): head n's sink logit joins its softmax as one more key and is dropped after it, so a query
    may give part of its attention to nothing.

    Query head n reads key/value head n // G (HF's repeat_kv order). The G query heads that share a key/value head
    are folded into the query rows, so each key/value head is one [T·G, H] x [H, S] matmul and K/V are never
    copied G times (half the time of a 5-axis einsum at T = 512).
    """
    B, T, N, H = q.shape
    K = (cached[0] if k is None else k).shape[1]
    G = N // K
    q = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    # (keys, values, visible, the keys' H axis): rows of R = T·G are ordered (t, g)
    parts = [] if k is None else [(k, v, visible, 3)]  # keys [B, K, T, H]; None: the cache's alone
    if cached is not None:
        parts.insert(0, (*cached, 2))  # keys [B, K, H, S]

    def scores(keys: Array, seen: Array, h_axis: int) -> Array:  # [B, K, T, G, S] in fp32
        s = _batched_dot(q, keys, 3, h_axis)  # BKRH,BKSH->BKRS or BKRH,BKHS->BKRS
        s = s.astype(jnp.float32).reshape(B, K, T, G, -1) * (H**-0.5 if scale is None else scale)
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        # A finite minimum (not -inf) keeps fully masked rows, e.g. left padding, free of NaN, as in HF.
        return jnp.where(seen[:, None, :, None, :], s, jnp.finfo(jnp.float32).min)

    logits = jnp.concatenate([scores(kk, a, h_axis) for kk, _, a, h_axis in parts], axis=-1)  # [B, K, T, G, S]
    if sinks is None:
        probs = jax.nn.softmax(logits, axis=-1)
    else:  # HF's eager_attention_forward: cat([scores, sinks]), softmax, probs[..., :-1]; head n = j·G + g
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, K, 1, G, 1), (B, K, T, G, 1))
        probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
    probs = probs.astype(parts[0][1].dtype).reshape(B, K, T * G, -1)  # fp32 softmax, as HF
    out, start = 0, 0
    for _, vv, _, _ in parts:
        out = out + _batched_dot(probs[..., start:start + vv.shape[2]], vv, 3, 2)  # BKRS,BKSH->BKRH
        start += vv.shape[2]
    return out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


def _batched_dot(a: Array, b: Array, a_axis: int, b_axis: int) -> Array:
    """a [B, K, R, X] · b over a's axis a_axis and b's b_axis, batched over B and K: [B, K, R, the rest of b]."""
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((0, 1), (0, 1))))


if TYPE_CHECKING:
    from jaxllm.model import Layer

LayerCache = tuple[Array, Array]  # one layer's keys [B, K, H, S] and values [B, K, S, H]


def attention_block(layer: Layer, x: Array, kv: LayerCache | None, ctx: Context) -> tuple[Array, LayerCache | None]:
    """x [B, T, D] (already normed) -> attention output [B, T, D] before the residual add, and the layer's cache
    with this call's keys and values written at slots ctx.index .. ctx.index + T - 1."""
    B, T, _ = x.shape
    config = ctx.config
    N, K, H, G = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.num_groups
    qkv = bias(linear(x, layer.qkv_proj), layer.qkv_bias)  # [B, T, K, G + 2, H]: one matmul for all three
    q, k, v = qkv[:, :, :, :G].reshape(B, T, N, H), qkv[:, :, :, G], qkv[:, :, :, G + 1]  # head n = j·G + g
    chex.assert_shape(q, (B, T, N, H))
    chex.assert_shape([k, v], (B, T, K, H))
    if config.clip_qkv is not None:  # OLMoE clamps v here and q, k after their norms (in place: HF's taps see it)
        v = jnp.clip(v, -config.clip_qkv, config.clip_qkv)
    ctx.tap("q_proj", q), ctx.tap("k_proj", k), ctx.tap("v_proj", v)
    if config.qk_norm_full:  # OLMoE: the whole projection normed (N·H and K·H), before the head split
        q = norm(q.reshape(B, T, N * H), layer.q_norm, config).reshape(B, T, N, H)
        k = norm(k.reshape(B, T, K * H), layer.k_norm, config).reshape(B, T, K, H)
    elif layer.q_norm is not None:  # Qwen3, Gemma 3: each head normed over H
        q, k = norm(q, layer.q_norm, config), norm(k, layer.k_norm, config)
    if config.clip_qkv is not None:
        q, k = jnp.clip(q, -config.clip_qkv, config.clip_qkv), jnp.clip(k, -config.clip_qkv, config.clip_qkv)
    if layer.q_norm is not None:
        ctx.tap("q_norm", q), ctx.tap("k_norm", k)
    if ctx.cos is not None:  # SmolLM3's no-RoPE layers skip it
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    ctx.tap("q_rope", q), ctx.tap("k_rope", k)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    W = None if kv is None else ctx.window or kv[0].shape[-1]  # the filled part of the cache: a step's cost follows it
    if ctx.cached_visible is not None and is_row_stable():
        # Written first, then each query alone over the cache's first W slots, its own key among them: every query
        # runs the same ops on the same slots as a one-token step at its position (ops.row_stable).
        q, k, v = materialized([q, k, v])
        kv = (write_rows(kv[0], k.transpose(0, 1, 3, 2), ctx.index, axis=3), write_rows(kv[1], v, ctx.index, axis=2))
        out = jnp.concatenate([attention(q[:, t:t + 1], None, None, None, (kv[0][..., :W], kv[1][:, :, :W],
                                                                          ctx.cached_visible[:, t:t + 1]),
                                         config.query_scale, config.attn_logit_softcapping, layer.sinks)
                               for t in range(T)], axis=1)
    else:
        cached = None if ctx.cached_visible is None else (kv[0][..., :W], kv[1][:, :, :W], ctx.cached_visible)
        out = attention(q, k, v, ctx.visible, cached, config.query_scale, config.attn_logit_softcapping, layer.sinks)
        if kv is not None:
            kv = (write_rows(kv[0], k.transpose(0, 1, 3, 2), ctx.index, axis=3),
                  write_rows(kv[1], v, ctx.index, axis=2))
    chex.assert_shape(out, (B, T, N, H))
    ctx.tap("attn", out)
    # Heads merged first: an einsum contracting (N, H) together makes XLA re-lay the weight out on every call.
    out = bias(linear(out.reshape(B, T, N * H), layer.o_proj), layer.o_bias)
    ctx.tap("o_proj", out)
    return out, kv


def attention_masks(config: LLMConfig, kind: str, real: Array, cache: KVCache | None,
                    window: int | None = None) -> tuple[Array, Array | None]:
    """Who sees whom in a layer of this kind: (visible [B, T, T] over this call's keys, [B, 1 or T, W] over the
    cache's first W slots (all S when `window` is None), or None without a non-empty cache). Causal and padding-free;
    a sliding_attention layer's query also sees only keys whose slot is within the last `sliding_window` slots up to
    its own (HF's `kv_idx > q_idx - sliding_window`). Slots, not positions: in a row the real tokens sit in
    consecutive slots."""
    B, T = real.shape
    visible = jnp.tril(jnp.ones((T, T), bool))  # [T, T]
    W = None if cache is None else window or cache.length
    cached = None if cache is None else cache.mask[:, None, :W]  # [B, 1, W]
    query_slots = None if cache is None else cache.index[:, None] + jnp.arange(T)  # [B, T]
    if cached is not None and is_row_stable():  # keys are written before attention: its own and earlier ones seen
        relative = jnp.arange(W) - cache.index[:, None]  # [B, W]: slot s holds this call's key s - index
        key_real = jnp.take_along_axis(real, jnp.clip(relative, 0, T - 1), axis=1) & (relative >= 0) & (relative < T)
        cached = cached | (key_real[:, None, :] & (relative[:, None, :] <= jnp.arange(T)[:, None]))  # [B, T, W]
    if kind == "sliding_attention":
        SW = config.sliding_window
        visible = visible & ~jnp.tril(jnp.ones((T, T), bool), -SW)  # t' > t - SW
        if cached is not None:
            cached = cached & (jnp.arange(W) > query_slots[..., None] - SW)  # [B, T, W]
    return visible[None] & real[:, None, :], cached


