"""The forward pass of LLaMA and the families that differ from it in a few switches (config.py), as pure
functions over a parameter pytree. Each switch is an `if` on a config field or on a parameter that only some
families have, next to the line of Transformers it mirrors.

Shape letters (../shared/STYLE.md): B batch, T query positions, S key positions, D hidden, N query heads,
K key/value heads, G = N // K, H head_dim, F intermediate, V vocab, L layers.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.config import LLMConfig, RopeConfig
from jaxllm.errors import InputError
from jaxllm.weights import Blocks, Int8, is_quantized, matmul

Array = jax.Array
# tap(name, value) records an intermediate; the plain forward passes a no-op, the diff ladder a collector.
Tap = Callable[[str, Array], None]


Matrix = Array | Int8 | Blocks  # a float array, or a quantized matrix standing in for one (weights.py)


@flax.struct.dataclass
class Layer:
    """One decoder block. Matrices keep HF's [out, in] orientation, and the projections that read the same input are
    stacked in one array (HF's q/k/v, and gate/up): with one token per step every output is a dot over a contiguous
    row, and one large matvec runs faster on CPU than two or three small ones (a decode step measured 5-10% faster
    side by side). `out` is laid out so that tensor parallelism shards a leading axis and each device's block holds
    whole heads: q, k and v grouped by key/value head, gate and up side by side for each f."""

    input_layernorm: Array  # [D]
    qkv_proj: Matrix  # [K, G + 2, H, D]: for kv head j, HF's q heads j·G .. j·G + G - 1, then k head j, then v head j
    o_proj: Matrix  # [D, N·H]
    post_attention_layernorm: Array  # [D]
    gate_up_proj: Matrix  # [F, 2, D]: gate_up_proj[f] is row f of HF's gate_proj, then of up_proj
    down_proj: Matrix  # [D, F]
    qkv_bias: Array | None = None  # [K, G + 2, H]   (attention_bias, qkv_bias)
    o_bias: Array | None = None  # [D]   (attention_bias)
    gate_up_bias: Array | None = None  # [F, 2]   (mlp_bias)
    down_bias: Array | None = None  # [D]
    q_norm: Array | None = None  # [H]   (qk_norm)
    k_norm: Array | None = None  # [H]
    # Gemma's sandwich: post_attention_layernorm norms the attention output, pre_feedforward_layernorm is the MLP's
    # input norm (Llama's post_attention_layernorm role) and post_feedforward_layernorm norms the MLP output.
    pre_feedforward_layernorm: Array | None = None  # [D]
    post_feedforward_layernorm: Array | None = None  # [D]


@flax.struct.dataclass
class Params:
    """The whole model: arrays are pytree leaves, the config rides along as static data."""

    embed_tokens: Matrix  # [V, D]
    layers: tuple[Layer, ...]  # L of them
    norm: Array  # [D]
    lm_head: Matrix | None  # [V, D]; None when tied to embed_tokens
    config: LLMConfig = flax.struct.field(pytree_node=False)

    @property
    def dtype(self):
        """The activations' dtype: the norms' (bfloat16 with bf16 weights; float32 with fp32, int8 and gguf)."""
        return self.norm.dtype


@dataclasses.dataclass(frozen=True)
class Model:
    """What generation from text needs: the parameter pytree and a tokenizer (None: token ids in and out)."""

    params: Params
    tokenizer: object | None = None


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, after RoPE, in fixed-size buffers of S slots per row, and which slots hold what.

    Each row is written on its own: slot s of row b holds the s-th token fed to that row, `index[b]` is the row's next
    slot to write, and `mask` marks the slots that hold a real token (written, and not padding), so a call's queries
    see exactly the masked-in slots plus their own causal past. Rows of one `generate` batch move together (the same
    index); the rows of a serving engine's slot table each follow their own request. Keys are stored transposed,
    [B, K, H, S], so that a decode step's scores are a plain [G, H] x [H, S] matmul per key/value head with no
    transpose of the cache.
    """

    k: tuple[Array, ...]  # L × [B, K, H, S]
    v: tuple[Array, ...]  # L × [B, K, S, H]
    mask: Array  # [B, S] bool: the slot holds a real token
    index: Array  # [B] int32: each row's next slot to write
    # True until the first write: a call into an empty cache attends over its own keys alone, not over S slots
    # that are all masked out (a prefill of T tokens would otherwise score T x S more keys).
    empty: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def length(self) -> int:
        """S: the number of slots."""
        return self.mask.shape[1]

    @classmethod
    def zeros(cls, config: LLMConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        B, K, S, H = batch, config.num_key_value_heads, length, config.head_dim
        layers = range(config.num_hidden_layers)
        return cls(k=tuple(jnp.zeros((B, K, H, S), dtype) for _ in layers),
                   v=tuple(jnp.zeros((B, K, S, H), dtype) for _ in layers),
                   mask=jnp.zeros((B, S), bool), index=jnp.zeros((B,), jnp.int32), empty=True)


def write_rows(buffer: Array, update: Array, index: Array, axis: int) -> Array:
    """buffer [B, ...] with each row b's `update[b]` written from position index[b] along `axis` (an in-place scatter
    of the update's size, whatever the buffer's length)."""
    def row(b, u, i):
        return jax.lax.dynamic_update_slice_in_dim(b, u, i, axis - 1)

    return jax.vmap(row)(buffer, update.astype(buffer.dtype), index)


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


def _no_tap(name: str, value: Array) -> None:
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


def yarn_attention_factor(rope: RopeConfig) -> float:
    """YaRN's cos/sin scale (HF `_compute_yarn_parameters`): 0.1·ln(factor)+1, or a ratio of mscales when both given."""
    if rope.attention_factor is not None:
        return rope.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return mscale(rope.factor)


def rope_inv_freq(config: LLMConfig, positions: Array, rope: RopeConfig | None = None) -> tuple[Array, float]:
    """Inverse frequencies [R/2] (fp32) and the cos/sin scale, per HF's `ROPE_INIT_FUNCTIONS`; `rope` defaults to
    config.rope, R is config.rotary_dim (the head_dim unless Phi's partial_rotary_factor says less)."""
    rope, dim = rope or config.rope, config.rotary_dim or config.head_dim
    # Same fp32 arithmetic as HF: base ** (arange(0, dim, 2) / dim), so angles round the same way.
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.float32(rope.theta) ** exponents).astype(np.float32)
    if rope.rope_type == "linear":
        return jnp.asarray(inv_freq / np.float32(rope.factor)), 1.0
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.asarray(np.where(medium, smoothed, scaled).astype(np.float32)), 1.0
    if rope.rope_type == "yarn":
        def correction_dim(rotations: float) -> float:
            return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
        extrapolation = 1 - ramp  # 1 keeps the original frequency, 0 interpolates it by `factor`
        pos_freqs = np.float32(rope.theta) ** exponents
        inv = (1 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
        return jnp.asarray(inv.astype(np.float32)), yarn_attention_factor(rope)
    if rope.rope_type == "longrope":
        # Phi-3: every frequency divided by its own factor; the long set once a position of the call reaches the
        # pretraining length (HF's longrope_frequency_update), and cos/sin scaled for the longer context.
        old_len = rope.original_max_position_embeddings
        long = jnp.max(positions) + 1 > old_len
        factors = jnp.where(long, np.asarray(rope.long_factor, np.float32), np.asarray(rope.short_factor, np.float32))
        scale = rope.attention_factor or (
            1.0 if rope.factor <= 1 else math.sqrt(1 + math.log(rope.factor) / math.log(old_len)))
        return 1.0 / (factors * np.float32(rope.theta) ** exponents), scale
    if rope.rope_type == "dynamic":
        # NTK-aware: the base grows once the longest position in the batch passes max_position_embeddings.
        max_pos = config.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        base = rope.theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base ** jnp.asarray(exponents), 1.0
    return jnp.asarray(inv_freq), 1.0


def rope_tables(config: LLMConfig, positions: Array, rope: RopeConfig | None = None) -> tuple[Array, Array]:
    """cos, sin [B, T, R] for the given (possibly non-contiguous) positions [B, T]; angles in fp32."""
    inv_freq, scale = rope_inv_freq(config, positions, rope)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, R]: HF's rotate-half layout repeats the halves
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, heads, H] rotated in HF's rotate-half layout: pairs are (i, i + R/2), not (2i, 2i+1). With R < H
    (partial rotary) the last H - R dims pass through unrotated."""
    R = cos.shape[-1]
    x, rest = x[..., :R], x[..., R:]
    rotated = jnp.concatenate([-x[..., R // 2:], x[..., :R // 2]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    out = x * cos + rotated * sin
    return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest], axis=-1)


def attention(q: Array, k: Array, v: Array, visible: Array, cached: tuple[Array, Array, Array] | None = None,
              scale: float | None = None, softcap: float | None = None) -> Array:
    """Grouped-query attention. q [B, T, N, H], k/v [B, K, T, H] (this call's keys), visible [B, T, T] -> [B, T, N, H].

    `cached` = (keys [B, K, H, S], values [B, K, S, H], visible [B, 1 or T, S]) adds the keys of earlier calls; one
    softmax runs over both sets. Reading the cache as it was before this call's write lets XLA update it in place.
    Scores are q·k times `scale` (default H ** -0.5), then soft-capped to softcap * tanh(scores / softcap) if given.

    Query head n reads key/value head n // G (HF's repeat_kv order). The G query heads that share a key/value head
    are folded into the query rows, so each key/value head is one [T·G, H] x [H, S] matmul and K/V are never
    copied G times (half the time of a 5-axis einsum at T = 512).
    """
    B, T, N, H = q.shape
    K = k.shape[1]
    G = N // K
    q = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    # (keys, values, visible, the keys' H axis): rows of R = T·G are ordered (t, g)
    parts = [(k, v, visible, 3)]  # keys [B, K, T, H]
    if cached is not None:
        parts.insert(0, (*cached, 2))  # keys [B, K, H, S]

    def scores(keys: Array, seen: Array, h_axis: int) -> Array:  # [B, K, T, G, S] in fp32
        s = _batched_dot(q, keys, 3, h_axis)  # BKRH,BKSH->BKRS or BKRH,BKHS->BKRS
        s = s.astype(jnp.float32).reshape(B, K, T, G, -1) * (H**-0.5 if scale is None else scale)
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        # A finite minimum (not -inf) keeps fully masked rows, e.g. left padding, free of NaN, as in HF.
        return jnp.where(seen[:, None, :, None, :], s, jnp.finfo(jnp.float32).min)

    probs = jax.nn.softmax(jnp.concatenate([scores(kk, a, h_axis) for kk, _, a, h_axis in parts], axis=-1), axis=-1)
    probs = probs.astype(v.dtype).reshape(B, K, T * G, -1)  # fp32 softmax, as HF
    out, start = 0, 0
    for _, vv, _, _ in parts:
        out = out + _batched_dot(probs[..., start:start + vv.shape[2]], vv, 3, 2)  # BKRS,BKSH->BKRH
        start += vv.shape[2]
    return out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


def _batched_dot(a: Array, b: Array, a_axis: int, b_axis: int) -> Array:
    """a [B, K, R, X] · b over a's axis a_axis and b's b_axis, batched over B and K: [B, K, R, the rest of b]."""
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((0, 1), (0, 1))))


def _linear(x: Array, w: Matrix, out_dtype=None) -> Array:
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


def _bias(x: Array, b: Array | None) -> Array:
    return x if b is None else x + b


LayerCache = tuple[Array, Array]  # one layer's keys [B, K, H, S] and values [B, K, S, H]


def attention_block(layer: Layer, x: Array, kv: LayerCache | None, ctx: Context) -> tuple[Array, LayerCache | None]:
    """x [B, T, D] (already normed) -> attention output [B, T, D] before the residual add, and the layer's cache
    with this call's keys and values written at slots ctx.index .. ctx.index + T - 1."""
    B, T, _ = x.shape
    config = ctx.config
    N, K, H, G = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.num_groups
    qkv = _bias(_linear(x, layer.qkv_proj), layer.qkv_bias)  # [B, T, K, G + 2, H]: one matmul for all three
    q, k, v = qkv[:, :, :, :G].reshape(B, T, N, H), qkv[:, :, :, G], qkv[:, :, :, G + 1]  # head n = j·G + g
    chex.assert_shape(q, (B, T, N, H))
    chex.assert_shape([k, v], (B, T, K, H))
    ctx.tap("q_proj", q), ctx.tap("k_proj", k), ctx.tap("v_proj", v)
    if layer.q_norm is not None:  # Qwen3, Gemma 3: each head normed over H
        q, k = norm(q, layer.q_norm, config), norm(k, layer.k_norm, config)
        ctx.tap("q_norm", q), ctx.tap("k_norm", k)
    if ctx.cos is not None:  # SmolLM3's no-RoPE layers skip it
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    ctx.tap("q_rope", q), ctx.tap("k_rope", k)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    cached = None
    if ctx.cached_visible is not None:  # the filled part of the cache alone: a step's cost follows what is filled
        W = ctx.window or kv[0].shape[-1]
        cached = (kv[0][..., :W], kv[1][:, :, :W], ctx.cached_visible)  # [B, K, H, W], [B, K, W, H], [B, 1 or T, W]
    out = attention(q, k, v, ctx.visible, cached, config.query_scale, config.attn_logit_softcapping)
    if kv is not None:
        kv = (write_rows(kv[0], k.transpose(0, 1, 3, 2), ctx.index, axis=3), write_rows(kv[1], v, ctx.index, axis=2))
    chex.assert_shape(out, (B, T, N, H))
    ctx.tap("attn", out)
    # Heads merged first: an einsum contracting (N, H) together makes XLA re-lay the weight out on every call.
    out = _bias(_linear(out.reshape(B, T, N * H), layer.o_proj), layer.o_bias)
    ctx.tap("o_proj", out)
    return out, kv


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
               "gelu": functools.partial(jax.nn.gelu, approximate=False)}


def mlp(layer: Layer, x: Array, config: LLMConfig, tap: Tap) -> Array:
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU with silu, GeGLU with Gemma's gelu. x [B, T, D] -> [B, T, D]."""
    gate_up = _bias(_linear(x, layer.gate_up_proj), layer.gate_up_bias)  # [B, T, F, 2]
    gate, up = gate_up[..., 0], gate_up[..., 1]  # [B, T, F] each
    tap("gate_proj", gate), tap("up_proj", up)
    out = _bias(_linear(ACTIVATIONS[config.hidden_act](gate) * up, layer.down_proj), layer.down_bias)  # [B, T, D]
    chex.assert_equal_shape([x, out])
    tap("mlp", out)
    return out


def decoder_block(layer: Layer, x: Array, kv: LayerCache | None, ctx: Context) -> tuple[Array, LayerCache | None]:
    """Pre-norm residual block: h = x + attn(norm(x)), out = h + mlp(norm(h)). x [B, T, D] -> [B, T, D].
    Gemma norms both sublayers' outputs too: h = x + norm(attn(norm(x))), out = h + norm(mlp(norm(h)))."""
    config = ctx.config
    normed = norm(x, layer.input_layernorm, config)
    chex.assert_equal_shape([x, normed])
    ctx.tap("input_layernorm", normed)
    attn, kv = attention_block(layer, normed, kv, ctx)
    mlp_norm = layer.post_attention_layernorm  # Llama's name for the MLP's input norm
    if layer.pre_feedforward_layernorm is not None:  # Gemma's, where post_attention_layernorm norms the attention
        attn, mlp_norm = norm(attn, layer.post_attention_layernorm, config), layer.pre_feedforward_layernorm
        ctx.tap("post_attention_layernorm", attn)
    h = x + attn
    ctx.tap("attn_residual", h)
    normed = norm(h, mlp_norm, config)
    ctx.tap("pre_feedforward_layernorm" if layer.pre_feedforward_layernorm is not None else "post_attention_layernorm",
            normed)
    update = mlp(layer, normed, config, ctx.tap)
    if layer.post_feedforward_layernorm is not None:
        update = norm(update, layer.post_feedforward_layernorm, config)
        ctx.tap("post_feedforward_layernorm", update)
    out = h + update
    chex.assert_equal_shape([x, out])
    ctx.tap("block", out)
    return out, kv


def run(params: Params, ids: Array, positions: Array, mask: Array | None = None, cache: KVCache | None = None,
        *, tap: Tap = _no_tap, last_only: bool = False, last: Array | None = None,
        window: int | None = None) -> tuple[Array, KVCache | None]:
    """The forward pass, un-jitted: ids [B, T], positions [B, T] -> (logits [B, T, V], updated cache or None).

    `mask` [B, T] marks this call's real tokens (None: all). Query t sees this call's tokens t' <= t that are real
    and, with a cache, every slot the cache marks real (in a sliding layer, within its window); this call's tokens
    go into each row's slots cache.index[b] onwards; `window` W (static) limits what attention reads of the cache to
    slots [0, W), which must hold every filled slot.
    `last_only` computes logits [B, 1, V] for the last position alone: a prefill needs no more, and the LM head is
    a fifth of a 135M model's work; `last` [B] (with last_only) names each row's position to take instead of T - 1.
    """
    config = params.config
    B, T = ids.shape
    D, V = config.hidden_size, config.vocab_size
    x = embed(params, ids)
    chex.assert_shape(x, (B, T, D))
    tap("embed", x)
    real = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)  # [B, T]
    index = None if cache is None else cache.index
    layers = range(config.num_hidden_layers)  # dict.fromkeys: each kind once, in layer order (a set's order varies)
    masks = {kind: attention_masks(config, kind, real, None if cache is None or cache.empty else cache, window)
             for kind in dict.fromkeys(config.layer_type(i) for i in layers)}
    tables = {rope: rope_tables(config, positions, rope)  # one pair per RoPE the layers use (Gemma 3 has two)
              for rope in dict.fromkeys(config.layer_rope(i) for i in layers) if rope is not None}
    chex.assert_shape([t for pair in tables.values() for t in pair], (B, T, config.rotary_dim or config.head_dim))
    new_k, new_v = [], []
    for i, layer in enumerate(params.layers):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        cos, sin = tables.get(config.layer_rope(i), (None, None))
        layer_ctx = Context(config, cos, sin, *masks[config.layer_type(i)], index=index,
                            tap=lambda name, value, i=i: tap(f"layers.{i}.{name}", value), window=window)
        x, kv = decoder_block(layer, x, kv, layer_ctx)
        if kv is not None:
            new_k.append(kv[0]), new_v.append(kv[1])
    if last_only:
        x = x[:, -1:] if last is None else jnp.take_along_axis(x, last[:, None, None], axis=1)  # [B, 1, D]
        T = 1
    x = norm(x, params.norm, config)
    tap("norm", x)
    lm_head = params.embed_tokens if params.lm_head is None else params.lm_head  # [V, D]
    logits = _linear(x, lm_head, jnp.float32)
    if config.final_logit_softcapping is not None:  # Gemma 2 and 3
        tap("lm_head", logits)
        logits = jnp.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    chex.assert_shape(logits, (B, T, V))
    tap("logits", logits)
    if cache is not None:
        cache = KVCache(k=tuple(new_k), v=tuple(new_v), index=cache.index + ids.shape[1],
                        mask=write_rows(cache.mask, real, cache.index, axis=1))
    return logits, cache


def embed(params: Params, ids: Array) -> Array:
    """ids [B, T] -> [B, T, D]: the embedding rows, times Gemma's sqrt(D) (rounded to the model dtype first, as HF's
    embed_scale is)."""
    x = embedding(params.embed_tokens, ids)
    return x if params.config.embed_scale == 1.0 else x * jnp.asarray(params.config.embed_scale, x.dtype)


def embedding(table: Matrix, ids: Array) -> Array:
    """Rows of the embedding table [V, D] for ids [B, T] -> [B, T, D]. An id outside [0, V) gives a row of NaN (so NaN
    logits) rather than being clamped silently to a real token."""
    if not is_quantized(table):
        return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)
    V = table.shape[0]
    rows = table.rows(jnp.clip(ids, 0, V - 1))
    return jnp.where(((ids >= 0) & (ids < V))[..., None], rows, jnp.nan)


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
    if kind == "sliding_attention":
        SW = config.sliding_window
        visible = visible & ~jnp.tril(jnp.ones((T, T), bool), -SW)  # t' > t - SW
        if cached is not None:
            query_slots = cache.index[:, None] + jnp.arange(T)  # [B, T]
            cached = cached & (jnp.arange(W) > query_slots[..., None] - SW)  # [B, T, W]
    return visible[None] & real[:, None, :], cached


# ---- jitted entry points ---------------------------------------------------------------------------------------

_TRACES: collections.Counter[str] = collections.Counter()


def program(fn: Callable, name: str | None = None, **jit_kwargs) -> Callable:
    """jax.jit(fn, **jit_kwargs), counted: every trace of the program adds one to compile_counts()[name].
    (A trace precedes every compile in this process; the persistent compilation cache may then load the result.)"""
    name = name or fn.__name__
    _TRACES[name] += 0  # listed from the start, at 0 until its first trace

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        _TRACES[name] += 1
        return fn(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)


def compile_counts() -> dict[str, int]:
    """How many times each jitted entry point has been traced (so compiled) in this process, by name."""
    return dict(_TRACES)


def _logits(params, ids, positions, mask):
    return run(params, ids, positions, mask)[0]


def _intermediates(params, ids, positions, mask):
    acts: dict[str, Array] = {}
    logits, _ = run(params, ids, positions, mask, tap=acts.__setitem__)
    return logits, acts


_forward = program(_logits, "forward")
_forward_with_intermediates = program(_intermediates, "forward_with_intermediates")


def check_inputs(config: LLMConfig, ids, positions, attention_mask=None) -> None:
    """Clear errors for bad input before it reaches XLA. Values are checked only when concrete (not under jit)."""
    ids_shape, pos_shape = np.shape(ids), np.shape(positions)
    if len(ids_shape) != 2:
        raise InputError(f"ids must be [B, T], found shape {ids_shape}")
    if pos_shape != ids_shape:
        raise InputError(f"positions must have the shape of ids {ids_shape}, found {pos_shape}")
    if attention_mask is not None and np.shape(attention_mask) != ids_shape:
        raise InputError(f"attention_mask must have the shape of ids {ids_shape}, found {np.shape(attention_mask)}")
    for name, value in (("ids", ids), ("positions", positions)):
        dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        if not jnp.issubdtype(dtype, jnp.integer):
            raise InputError(f"{name} must be integers, found dtype {dtype}")
    if isinstance(ids, jax.core.Tracer) or isinstance(positions, jax.core.Tracer):
        return
    ids_np, pos_np = np.asarray(ids), np.asarray(positions)
    bad = (ids_np < 0) | (ids_np >= config.vocab_size)
    if bad.any():
        b, t = map(int, np.argwhere(bad)[0])
        raise InputError(f"token id {int(ids_np[b, t])} at [{b}, {t}] is outside the vocabulary [0, {config.vocab_size})")
    if (pos_np < 0).any():
        raise InputError(f"positions must be non-negative, found {int(pos_np.min())}")
    if (pos_np > np.iinfo(np.int32).max).any():  # they run as int32: larger ones would wrap to small positions
        raise InputError(f"positions must fit in int32 (at most {np.iinfo(np.int32).max}), found {int(pos_np.max())}")


def mesh_of(params: Params) -> Mesh | None:
    """The mesh the parameters lie on (jaxllm.load(..., mesh=...)), or None on a single device."""
    sharding = getattr(jax.tree_util.tree_leaves(params.embed_tokens)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def place_batch(params: Params, *arrays):
    """Inputs [B, ...] as device arrays; on a mesh, split over its dp axis when dp divides B (else replicated), so
    that data parallelism runs each dp row on its own part of the batch and of the KV cache."""
    mesh = mesh_of(params)
    if mesh is None:
        return tuple(None if a is None else jnp.asarray(a) for a in arrays)
    return tuple(None if a is None else jax.device_put(a if isinstance(a, jax.Array) else np.asarray(a), NamedSharding(
        mesh, P("dp") if np.shape(a)[0] % mesh.shape["dp"] == 0 else P())) for a in arrays)


def _checked(params: Params, ids, positions, attention_mask) -> tuple:
    """check_inputs, then everything as arrays, ready for a jitted entry point."""
    check_inputs(params.config, ids, positions, attention_mask)
    return params, *place_batch(params, ids, positions, attention_mask)


def forward(params: Params, ids: Array, positions: Array, attention_mask: Array | None = None) -> Array:
    """Jitted forward: ids [B, T] int, positions [B, T] int, optional attention_mask [B, T] (1 = real token)
    -> logits [B, T, V]. Positions are honoured as given (RoPE), the causal mask goes by index."""
    return _forward(*_checked(params, ids, positions, attention_mask))


def forward_with_intermediates(params: Params, ids: Array, positions: Array, attention_mask: Array | None = None):
    """The same forward, also returning every tapped intermediate by name (a dict: jit returns its keys sorted)."""
    return _forward_with_intermediates(*_checked(params, ids, positions, attention_mask))
