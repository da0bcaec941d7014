"""The forward pass of LLaMA and the families that differ from it in a few switches (config.py), as pure
functions over a parameter pytree: the parameters, one decoder block, the top-level forward and its jitted entry
points here; each kind of sublayer in its own module (attention.py: grouped-query attention; latent.py: DeepSeek's
latent attention; mlp.py: the dense MLP; experts.py: mixtures of experts; rope.py; cache.py; ops.py: norms, linear
layers and the context every block shares). Each switch is an `if` on a
config field or on a parameter that only some families have, next to the line of Transformers it mirrors.

Shape letters (../shared/STYLE.md): B batch, T query positions, S key positions, D hidden, N query heads,
K key/value heads, G = N // K, H head_dim, F intermediate, V vocab, L layers, E experts, k experts chosen per token.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.config import LLMConfig
from jaxllm.errors import InputError
# Re-exported: the names callers import from jaxllm.model.
from jaxllm.model.attention import LayerCache, attention_block, attention_masks
from jaxllm.model.cache import KVCache, write_rows
from jaxllm.model.experts import experts_mlp
from jaxllm.model.latent import latent_attention_block
from jaxllm.model.mlp import ACTIVATIONS, gated_mlp
from jaxllm.model.ops import Array, Context, Matrix, Tap, chex, exact_mode, is_row_stable, linear, no_tap, norm
from jaxllm.model.programs import compile_counts, program
from jaxllm.model.rope import rope_inv_freq, rope_tables
from jaxllm.pytree import static, struct
from jaxllm.weights import is_quantized, materialized


@struct(kw_only=True)  # keyword-only: fields in forward order, optional ones among them
class Layer:
    """One decoder block. Matrices keep HF's [out, in] orientation, and the projections that read the same input are
    stacked in one array (HF's q/k/v, and gate/up): with one token per step every output is a dot over a contiguous
    row, and one large matvec runs faster on CPU than two or three small ones (a decode step measured 5-10% faster
    side by side). `out` is laid out so that tensor parallelism shards a leading axis and each device's block holds
    whole heads: q, k and v grouped by key/value head, gate and up side by side for each f."""

    input_layernorm: Array  # [D]
    # None in a latent-attention layer (DeepSeek), whose projections are the latent ones below.
    qkv_proj: Matrix | None = None  # [K, G + 2, H, D]: for kv head j, HF's q heads j·G .. j·G + G - 1, then k head j, then v head j
    o_proj: Matrix  # [D, N·H]   (latent attention: [D, N·v_head_dim])
    post_attention_layernorm: Array  # [D]
    # The dense MLP; in an experts layer, the shared expert (Qwen2-MoE, DeepSeek) or None.
    gate_up_proj: Matrix | None = None  # [F, 2, D]: gate_up_proj[f] is row f of HF's gate_proj, then of up_proj
    down_proj: Matrix | None = None  # [D, F]
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
    # Mixture of experts (model/experts.py), F here an expert's width (moe_intermediate_size). Expert-major, each
    # expert's rows one contiguous block: a token reads only its k experts' blocks, and E splits over devices.
    router: Array | None = None  # [E, D]: HF's gate (router) weight
    experts_gate_up: Matrix | None = None  # [E, F, 2, D]: for expert e, rows f of its gate_proj and up_proj
    experts_down: Matrix | None = None  # [E, D, F]
    shared_expert_gate: Array | None = None  # [1, D]   (Qwen2-MoE)
    router_correction_bias: Array | None = None  # [E]: DeepSeek-V3's e_score_correction_bias, for choosing alone
    # Multi-head latent attention (model/latent.py; DeepSeek), with C = kv_lora_rank, R = qk_rope_head_dim (head_dim),
    # Q = q_lora_rank, Hq = qk_nope_head_dim + R, Hk = qk_nope_head_dim, Hv = v_head_dim.
    q_proj: Matrix | None = None  # [N, Hq, D]   (q_lora_rank 0)
    q_a_proj: Matrix | None = None  # [Q, D]
    q_a_layernorm: Array | None = None  # [Q]
    q_b_proj: Matrix | None = None  # [N, Hq, Q]
    kv_a_proj_with_mqa: Matrix | None = None  # [C + R, D]: the latent, then the RoPE key every head shares
    kv_a_layernorm: Array | None = None  # [C]
    kv_b_proj: Matrix | None = None  # [N, Hk + Hv, C]: head n's key (unrotated part), then its value
    router_bias: Array | None = None  # [E]   (gpt-oss: moe_bias)
    experts_gate_up_bias: Array | None = None  # [E, F, 2]
    experts_down_bias: Array | None = None  # [E, D]
    sinks: Array | None = None  # [N]: gpt-oss's per-head logit that joins each softmax (attention_sinks)


@struct
class Params:
    """The whole model: arrays are pytree leaves, the config rides along as static data."""

    embed_tokens: Matrix  # [V, D]
    layers: tuple[Layer, ...]  # L of them
    norm: Array  # [D]
    lm_head: Matrix | None  # [V, D]; None when tied to embed_tokens
    config: LLMConfig = static()

    @property
    def dtype(self):
        """The activations' dtype: the norms' (bfloat16 with bf16 weights; float32 with fp32, int8 and gguf)."""
        return self.norm.dtype


@dataclasses.dataclass(frozen=True)
class Model:
    """What generation from text needs: the parameter pytree and a tokenizer (None: token ids in and out)."""

    params: Params
    tokenizer: object | None = None


def decoder_block(layer: Layer, x: Array, kv: LayerCache | None, ctx: Context) -> tuple[Array, LayerCache | None]:
    """Pre-norm residual block: h = x + attn(norm(x)), out = h + mlp(norm(h)). x [B, T, D] -> [B, T, D].
    Gemma norms both sublayers' outputs too: h = x + norm(attn(norm(x))), out = h + norm(mlp(norm(h)))."""
    config = ctx.config
    normed = norm(x, layer.input_layernorm, config)
    chex.assert_equal_shape([x, normed])
    ctx.tap("input_layernorm", normed)
    # DeepSeek's layers attend through a latent (latent.py); the others with grouped-query attention.
    attend = latent_attention_block if layer.kv_a_proj_with_mqa is not None else attention_block
    attn, kv = attend(layer, normed, kv, ctx)
    mlp_norm = layer.post_attention_layernorm  # Llama's name for the MLP's input norm
    if layer.pre_feedforward_layernorm is not None:  # Gemma's, where post_attention_layernorm norms the attention
        attn, mlp_norm = norm(attn, layer.post_attention_layernorm, config), layer.pre_feedforward_layernorm
        ctx.tap("post_attention_layernorm", attn)
    residual = config.residual_multiplier  # Granite scales each branch before its residual add
    h = x + (attn if residual == 1.0 else attn * residual)
    ctx.tap("attn_residual", h)
    normed = norm(h, mlp_norm, config)
    ctx.tap("pre_feedforward_layernorm" if layer.pre_feedforward_layernorm is not None else "post_attention_layernorm",
            normed)
    update = experts_mlp(layer, normed, config, ctx.tap) if layer.router is not None else gated_mlp(
        layer, normed, config, ctx.tap)
    if layer.post_feedforward_layernorm is not None:
        update = norm(update, layer.post_feedforward_layernorm, config)
        ctx.tap("post_feedforward_layernorm", update)
    out = h + (update if residual == 1.0 else update * residual)
    chex.assert_equal_shape([x, out])
    ctx.tap("block", out)
    return out, kv


def run(params: Params, ids: Array, positions: Array, mask: Array | None = None, cache: KVCache | None = None,
        *, tap: Tap = no_tap, last_only: bool = False, last: Array | None = None,
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
    if is_row_stable():  # a buffer: int8's dequantizing multiply fused into the residual add was contracted into an FMA
        (x,) = materialized([x])  # in some shapes only
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
    logits = linear(x, lm_head, jnp.float32)
    if config.final_logit_softcapping is not None:  # Gemma 2 and 3
        tap("lm_head", logits)
        logits = jnp.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    if config.logits_scaling != 1.0:  # Granite: HF's logits / logits_scaling
        logits = logits / config.logits_scaling
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


# ---- jitted entry points ---------------------------------------------------------------------------------------

def _logits(params, ids, positions, mask):
    return run(params, ids, positions, mask)[0]


def _intermediates(params, ids, positions, mask):
    acts: dict[str, Array] = {}
    logits, _ = run(params, ids, positions, mask, tap=acts.__setitem__)
    return logits, acts


_forward = program(_logits, "forward")
_forward_with_intermediates = program(_intermediates, "forward_with_intermediates")


# ---- exact mode: forward(..., exact=True), what the parity harness runs ------------------------------------------
# The same forward, traced under ops.exact_mode(): every fp32 projection accumulates in float64 (ops.exact_dot) and
# every RMSNorm takes its statistics in float64; the values between ops stay fp32.


def _exact_logits(params, ids, positions, mask):
    with exact_mode():
        return _logits(params, ids, positions, mask)


def _exact_intermediates(params, ids, positions, mask):
    with exact_mode():
        return _intermediates(params, ids, positions, mask)


_forward_exact = program(_exact_logits, "forward_exact")
_forward_with_intermediates_exact = program(_exact_intermediates, "forward_with_intermediates_exact")


def input_shape(name: str, value) -> tuple[int, ...]:
    """The shape of an array or nested lists; InputError naming `name` when the lists are ragged."""
    try:
        return np.shape(value)
    except ValueError:  # numpy refuses rows of different lengths
        raise InputError(f"{name} must be a rectangular array, found rows of different lengths: "
                         f"{value!r:.80}") from None


def check_inputs(config: LLMConfig, ids, positions, attention_mask=None) -> None:
    """Clear errors for bad input before it reaches XLA. Values are checked only when concrete (not under jit)."""
    ids_shape, pos_shape = input_shape("ids", ids), input_shape("positions", positions)
    if len(ids_shape) != 2:
        raise InputError(f"ids must be [B, T], found shape {ids_shape}")
    if 0 in ids_shape:  # no row or no token: attention's reshapes would divide by the empty axis
        raise InputError(f"ids of shape {ids_shape} are empty: need at least one row and one token")
    if pos_shape != ids_shape:
        raise InputError(f"positions must have the shape of ids {ids_shape}, found {pos_shape}")
    if attention_mask is not None and input_shape("attention_mask", attention_mask) != ids_shape:
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
        # device_put, not jnp.asarray (which traces a small program for a NumPy array)
        return tuple(None if a is None else a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a))
                     for a in arrays)
    return tuple(None if a is None else jax.device_put(a if isinstance(a, jax.Array) else np.asarray(a), NamedSharding(
        mesh, P("dp") if np.shape(a)[0] % mesh.shape["dp"] == 0 else P())) for a in arrays)


def _checked(params: Params, ids, positions, attention_mask) -> tuple:
    """check_inputs, then everything as arrays, ready for a jitted entry point."""
    check_inputs(params.config, ids, positions, attention_mask)
    return params, *place_batch(params, ids, positions, attention_mask)


def forward(params: Params, ids: Array, positions: Array, attention_mask: Array | None = None, *,
            exact: bool = False) -> Array:
    """Jitted forward: ids [B, T] int, positions [B, T] int, optional attention_mask [B, T] (1 = real token)
    -> logits [B, T, V]. Positions are honoured as given (RoPE), the causal mask goes by index.

    `exact=True` runs the forward the parity harness uses: every fp32 projection accumulates in float64 and rounds
    once (ops.exact_dot), so that the fp32 logits are no further from Transformers' float64 run than Transformers'
    own fp32 ones (XLA:CPU's fp32 dot is 2-2.5x further); generation always runs the fast programs."""
    args = _checked(params, ids, positions, attention_mask)
    return (_forward_exact if exact else _forward)(*args)


def forward_with_intermediates(params: Params, ids: Array, positions: Array, attention_mask: Array | None = None, *,
                               exact: bool = False):
    """The same forward, also returning every tapped intermediate by name (a dict: jit returns its keys sorted)."""
    args = _checked(params, ids, positions, attention_mask)
    return (_forward_with_intermediates_exact if exact else _forward_with_intermediates)(*args)

