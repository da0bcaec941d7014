"""Multi-head latent attention (MLA): DeepSeek-V2 and V3, as HF's DeepseekV2Attention / DeepseekV3Attention.

Every token's keys and values come out of one latent of C = kv_lora_rank dims (kv_a_proj_with_mqa, then
kv_a_layernorm) and one RoPE key of R = qk_rope_head_dim dims that all heads share. The cache keeps exactly those
C + R numbers per token and layer, not per-head keys and values. Two ways to attend over them give the same result:

- expanded (HF's): kv_b_proj up-projects each latent to every head's key (P unrotated dims, joined by the shared
  rotated key) and value (U dims), then plain attention. Cheap when the queries are many and the keys are new.
- absorbed (DeepSeek's own inference code, llama.cpp): the key half of kv_b_proj is folded into the query
  (q_pass · W_UK is a query in latent space), scores are taken against the latents themselves, and the value half
  W_UV is applied after the softmax-weighted sum of latents. Nothing per head is ever built for the S cached keys,
  so a decode step reads C + R numbers per cached token. Used whenever there is a cache to read.

Shape letters (../shared/STYLE.md) plus: C kv_lora_rank, R qk_rope_head_dim (config.head_dim), P qk_nope_head_dim
(the unrotated, "pass" dims of each head's query and key), U v_head_dim, Q q_lora_rank; X = C + R or P + R.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxllm.config import LLMConfig
from jaxllm.model.cache import write_rows
from jaxllm.model.ops import Array, Context, chex, linear, rms_norm
from jaxllm.model.rope import apply_rope
from jaxllm.weights import dense

if TYPE_CHECKING:
    from jaxllm.model import Layer
    from jaxllm.model.attention import LayerCache

# HF builds q_a_layernorm and kv_a_layernorm as DeepseekV*RMSNorm(rank) with its default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def rotate(x: Array, ctx: Context, config: LLMConfig) -> Array:
    """RoPE on x [B, T, heads, R]. DeepSeek's checkpoints pair dims (2i, 2i + 1): V2 rotates them as complex numbers,
    V3 (rope_interleave) as even/odd slices. The result is laid out [rotated evens, rotated odds] (HF V3's layout;
    V2 keeps the pairs interleaved): q and k are laid out alike, so every score is the same."""
    if not config.rope_interleave:
        return apply_rope(x, ctx.cos, ctx.sin)
    half = x.shape[-1] // 2
    cos, sin = (t[:, :, None, :half].astype(x.dtype) for t in (ctx.cos, ctx.sin))  # the tables repeat their halves
    even, odd = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([even * cos - odd * sin, odd * cos + even * sin], axis=-1)


def latent_attention_block(layer: Layer, x: Array, kv: LayerCache | None, ctx: Context) -> tuple[Array, LayerCache | None]:
    """x [B, T, D] (already normed) -> the attention output [B, T, D] before the residual add, and the layer's cache
    (keys [B, 1, C + R, S]: each slot's latent then its rotated shared key; values [B, 1, S, 0], unused) with this
    call's tokens written at slots ctx.index .. ctx.index + T - 1."""
    B, T, _ = x.shape
    config = ctx.config
    N, C, R, P, U = (config.num_attention_heads, config.kv_lora_rank, config.head_dim, config.qk_nope_head_dim,
                     config.v_head_dim)
    if layer.q_proj is not None:
        q = linear(x, layer.q_proj)  # [B, T, N, P + R]
    else:  # the query's own low-rank bottleneck, normed in the middle
        q = linear(rms_norm(linear(x, layer.q_a_proj), layer.q_a_layernorm, LATENT_NORM_EPS), layer.q_b_proj)
    chex.assert_shape(q, (B, T, N, P + R))
    ctx.tap("q", q)
    compressed = linear(x, layer.kv_a_proj_with_mqa)  # [B, T, C + R]
    latent = rms_norm(compressed[..., :C], layer.kv_a_layernorm, LATENT_NORM_EPS)  # [B, T, C]
    ctx.tap("kv_latent", latent)
    q_pass, q_rot = q[..., :P], rotate(q[..., P:], ctx, config)  # [B, T, N, P], [B, T, N, R]
    k_rot = rotate(compressed[:, :, None, C:], ctx, config)[:, :, 0]  # [B, T, R]
    entry = jnp.concatenate([latent, k_rot], axis=-1)  # [B, T, C + R]: all the cache keeps of a token
    cached = None
    if ctx.cached_visible is not None:  # the filled part of the cache alone, as it was before this call's write
        W = ctx.window or kv[0].shape[-1]
        cached = (kv[0][:, 0, :, :W], ctx.cached_visible)  # [B, C + R, W], [B, 1 or T, W]
    out = (absorbed if cached is not None else expanded)(layer, q_pass, q_rot, entry, ctx.visible, cached, config)
    chex.assert_shape(out, (B, T, N, U))
    if kv is not None:
        kv = (write_rows(kv[0], entry.transpose(0, 2, 1)[:, None], ctx.index, axis=3), kv[1])
    ctx.tap("attn", out)
    out = linear(out.reshape(B, T, N * U), layer.o_proj)
    ctx.tap("o_proj", out)
    return out, kv


def _softmax(scores: list[Array], seen: list[Array], scale: float) -> list[Array]:
    """One fp32 softmax (as HF's eager attention) over the keys of several parts: scores [B, N, T, S_i] times
    `scale`, masked where seen [B, 1 or T, S_i] is false; the probabilities split back into the parts."""
    # A finite minimum (not -inf) keeps fully masked rows, e.g. left padding, free of NaN, as in HF.
    masked = [jnp.where(a[:, None], s.astype(jnp.float32) * scale, jnp.finfo(jnp.float32).min)
              for s, a in zip(scores, seen)]
    probs = jax.nn.softmax(jnp.concatenate(masked, axis=-1), axis=-1)
    splits = [sum(s.shape[-1] for s in scores[:i + 1]) for i in range(len(scores) - 1)]
    return jnp.split(probs, splits, axis=-1)


def expanded(layer: Layer, q_pass: Array, q_rot: Array, entry: Array, visible: Array,
             cached: tuple[Array, Array] | None, config: LLMConfig) -> Array:
    """HF's form: every latent up-projected to per-head keys and values, then attention. q_pass [B, T, N, P],
    q_rot [B, T, N, R], this call's entries [B, T, C + R] with visible [B, T, T], the cache's [B, C + R, W] with
    its visibility [B, 1 or T, W] -> [B, T, N, U]."""
    C, P = config.kv_lora_rank, config.qk_nope_head_dim
    query = jnp.concatenate([q_pass, q_rot], axis=-1)  # [B, T, N, P + R]: HF's query_states
    parts = [(entry, visible)] if cached is None else [(cached[0].transpose(0, 2, 1), cached[1]), (entry, visible)]
    keys, values = [], []
    for e, _ in parts:  # e [B, S, C + R]
        kv = linear(e[..., :C], layer.kv_b_proj)  # [B, S, N, P + U]
        k_rot = jnp.broadcast_to(e[:, :, None, C:], (*kv.shape[:3], e.shape[-1] - C))  # the shared key, every head
        keys.append(jnp.concatenate([kv[..., :P], k_rot], axis=-1)), values.append(kv[..., P:])
    probs = _softmax([jnp.einsum("BTNX,BSNX->BNTS", query, k) for k in keys], [a for _, a in parts],
                     config.latent_scale)
    return sum(jnp.einsum("BNTS,BSNU->BTNU", p.astype(v.dtype), v) for p, v in zip(probs, values))


def absorbed(layer: Layer, q_pass: Array, q_rot: Array, entry: Array, visible: Array,
             cached: tuple[Array, Array] | None, config: LLMConfig) -> Array:
    """The same attention over the latents themselves: q · k_n = (q_pass · W_UK[n]) · latent + q_rot · k_rot, and
    Σ p · v_n = W_UV[n] · (Σ p · latent). Arguments and result as `expanded`."""
    C, P = config.kv_lora_rank, config.qk_nope_head_dim
    w = dense(layer.kv_b_proj).astype(q_pass.dtype)  # [N, P + U, C]
    q_latent = jnp.einsum("BTNP,NPC->BTNC", q_pass, w[:, :P])  # the query's key half, in latent space
    query = jnp.concatenate([q_latent, q_rot], axis=-1)  # [B, T, N, C + R]: scores against whole entries at once
    scores, seen = [jnp.einsum("BTNX,BSX->BNTS", query, entry)], [visible]
    if cached is not None:  # the cache's keys stored [B, C + R, W]: read without a transpose
        scores.insert(0, jnp.einsum("BTNX,BXS->BNTS", query, cached[0])), seen.insert(0, cached[1])
    probs = _softmax(scores, seen, config.latent_scale)
    out = jnp.einsum("BNTS,BSC->BTNC", probs[-1].astype(entry.dtype), entry[..., :C])  # [B, T, N, C]
    if cached is not None:
        out = out + jnp.einsum("BNTS,BCS->BTNC", probs[0].astype(entry.dtype), cached[0][:, :C])
    return jnp.einsum("BTNC,NUC->BTNU", out, w[:, P:])  # the value half, after the sum
