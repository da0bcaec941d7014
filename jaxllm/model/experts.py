"""Mixture of experts: the router (which k of the E experts each token uses, with what weights) and the experts'
computation (given those choices, the output), as separate functions. A family's routing rule is a few lines here
beside the Transformers formula it mirrors; ROUTERS names them for LLMConfig.router.

Tokens are flattened to M = B·T rows. Shape letters as in ops.py: E experts, k chosen per token, F an expert's width.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.config import LLMConfig
from jaxllm.model.mlp import ACTIVATIONS
from jaxllm.model.ops import Array, Tap, bias, chex, linear
from jaxllm.weights import Int8, dense

if TYPE_CHECKING:
    from jaxllm.model import Layer


# ---- routers: logits [M, E] -> (weights [M, k] fp32, chosen [M, k] int32) ----------------------------------------

def softmax_topk(logits: Array, layer: "Layer", config: LLMConfig) -> tuple[Array, Array]:
    """Mixtral, Qwen2/3-MoE, OLMoE: softmax over all E in fp32, the top k, renormalised to sum to 1 with
    norm_topk_prob (Mixtral always)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, chosen = jax.lax.top_k(probs, config.num_experts_per_tok)
    if config.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, chosen


def topk_softmax(logits: Array, layer: "Layer", config: LLMConfig) -> tuple[Array, Array]:
    """Granite, gpt-oss: the top k logits, then a softmax over those k alone (HF's router_logits.topk, then
    softmax(top_k_logits)), in fp32."""
    top, chosen = jax.lax.top_k(logits.astype(jnp.float32), config.num_experts_per_tok)
    return jax.nn.softmax(top, axis=-1), chosen


def deepseek_v2_greedy(logits: Array, layer: "Layer", config: LLMConfig) -> tuple[Array, Array]:
    """DeepSeek-V2, topk_method "greedy" (HF DeepseekV2TopkRouter): softmax over all E in fp32, the top k, times
    routed_scaling_factor; never renormalised (HF's V2 router does not read norm_topk_prob)."""
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, chosen = jax.lax.top_k(scores, config.num_experts_per_tok)
    return weights * config.routed_scaling_factor, chosen


def _best_groups(group_scores: Array, config: LLMConfig) -> Array:
    """group_scores [M, n_group] -> [M, E]: the experts of each token's topk_group best groups (HF's score_mask;
    group g holds experts g·E/n_group .. (g + 1)·E/n_group - 1)."""
    M, groups = group_scores.shape
    _, best = jax.lax.top_k(group_scores, config.topk_group)  # [M, topk_group]
    kept = jnp.zeros((M, groups), bool).at[jnp.arange(M)[:, None], best].set(True)
    return jnp.repeat(kept, config.num_experts // groups, axis=-1)


def deepseek_v2_group_limited_greedy(logits: Array, layer: "Layer", config: LLMConfig) -> tuple[Array, Array]:
    """DeepSeek-V2, topk_method "group_limited_greedy": softmax scores in fp32; a group scores as its best expert;
    outside the topk_group best groups scores become 0 (HF's masked_fill(~score_mask, 0.0)); the top k of what
    is left, times routed_scaling_factor."""
    M, E = logits.shape
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    group_scores = jnp.max(scores.reshape(M, config.n_group, E // config.n_group), axis=-1)  # [M, n_group]
    scores = jnp.where(_best_groups(group_scores, config), scores, 0.0)
    weights, chosen = jax.lax.top_k(scores, config.num_experts_per_tok)
    return weights * config.routed_scaling_factor, chosen


def deepseek_v3(logits: Array, layer: "Layer", config: LLMConfig) -> tuple[Array, Array]:
    """DeepSeek-V3 (HF DeepseekV3TopkRouter): sigmoid scores in fp32. Choosing adds e_score_correction_bias (the
    load balancer's), groups score as the sum of their two best, experts outside the topk_group best groups are
    out (-inf), and the top k are chosen; the weights are the chosen experts' scores *without* the bias,
    renormalised with norm_topk_prob (HF adds 1e-20 to the sum), times routed_scaling_factor."""
    M, E = logits.shape
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    for_choice = scores + layer.router_correction_bias.astype(jnp.float32)  # [M, E]
    top_two, _ = jax.lax.top_k(for_choice.reshape(M, config.n_group, E // config.n_group), 2)
    for_choice = jnp.where(_best_groups(jnp.sum(top_two, axis=-1), config), for_choice, -jnp.inf)
    _, chosen = jax.lax.top_k(for_choice, config.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, chosen, axis=-1)  # [M, k]
    if config.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * config.routed_scaling_factor, chosen


ROUTERS: dict[str, Callable[[Array, "Layer", LLMConfig], tuple[Array, Array]]] = {
    "softmax_topk": softmax_topk,
    "topk_softmax": topk_softmax,
    "deepseek_v2_greedy": deepseek_v2_greedy,
    "deepseek_v2_group_limited_greedy": deepseek_v2_group_limited_greedy,
    "deepseek_v3": deepseek_v3,
}


FP32_ROUTERS = ("deepseek_v2_greedy", "deepseek_v2_group_limited_greedy", "deepseek_v3")  # logits from fp32 x


def route(layer: "Layer", x: Array, config: LLMConfig) -> tuple[Array, Array, Array]:
    """x [M, D] -> (router logits [M, E], weights [M, k] fp32, chosen experts [M, k] int32). The logits are a
    plain linear in the activations' dtype, as HF's F.linear(hidden_states, gate.weight) (gpt-oss adds a bias)."""
    if config.router in FP32_ROUTERS:  # HF keeps their gate.weight in fp32 and casts the activations up to it
        x = x.astype(jnp.float32)
    logits = bias(linear(x[None], layer.router)[0], layer.router_bias)  # [M, E]
    weights, chosen = ROUTERS[config.router](logits, layer, config)
    return logits, weights, chosen.astype(jnp.int32)


# ---- experts: x [M, D], weights [M, k], chosen [M, k] -> [M, D] ---------------------------------------------------

def _swiglu(gate_up: Array, config: LLMConfig) -> Array:
    """[..., F, 2] (gate, up) -> [..., F]: act(gate) * up."""
    return ACTIVATIONS[config.hidden_act](gate_up[..., 0]) * gate_up[..., 1]


def expert_activation(gate_up: Array, config: LLMConfig) -> Array:
    """An expert's [..., F, 2] (gate, up) -> [..., F]: the SwiGLU, or with swiglu_limit gpt-oss's clamped one
    (HF GptOssExperts._apply_gate: gate clamped above, up both sides, gate·sigmoid(alpha·gate)·(up + 1))."""
    if config.swiglu_limit is None:
        return _swiglu(gate_up, config)
    limit = config.swiglu_limit
    gate, up = jnp.minimum(gate_up[..., 0], limit), jnp.clip(gate_up[..., 1], -limit, limit)
    return gate * jax.nn.sigmoid(gate * config.swiglu_alpha) * (up + 1)


def experts_all(layer: "Layer", x: Array, weights: Array, chosen: Array, config: LLMConfig) -> Array:
    """The reference form: every expert on every token, [M, E, D], summed with weights that are zero outside each
    token's k choices. E / k times the work of `experts_chosen`; kept to test it against."""
    M, D = x.shape
    E, F = config.num_experts, config.moe_intermediate_size
    gate_up = bias(linear(x[None], layer.experts_gate_up)[0], layer.experts_gate_up_bias)  # [M, E, F, 2]
    chex.assert_shape(gate_up, (M, E, F, 2))
    down = dense(layer.experts_down).astype(x.dtype)  # [E, D, F]
    out = jnp.einsum("MEF,EDF->MED", expert_activation(gate_up, config), down)  # [M, E, D]
    out = bias(out, layer.experts_down_bias)  # gpt-oss: each expert's down bias, weighted with its output
    every = jnp.zeros((M, E), jnp.float32).at[jnp.arange(M)[:, None], chosen].add(weights)  # [M, E]
    return jnp.einsum("MED,ME->MD", out, every.astype(x.dtype))


# How experts_chosen runs on CPU, by the number of (token, expert) pairs P = M·k; medians of one layer's experts
# (E 32, F 512, D 1024, k 2) on a loaded 2-core machine. While an expert gets at most PAIRS_PER_EXPERT pairs on
# average (decode), each pair is one matvec on its expert under lax.map: the expert's dynamic slice and an int8 or
# bf16 convert fuse into the matvec loop, so a step reads the k chosen experts' bytes once and writes no copy of them
# (one token: 0.6 ms fp32, 0.4 ms int8; a gather of the chosen experts' weights then einsum, 18 ms; every expert,
# 37 ms or more). Beyond (prefill), the pairs sorted by expert fill tiles of rows that share one expert, one GEMM
# each (256 tokens: tiles 85-120 ms, pairs 315 ms; at 64 tokens fp32 is even, 100 against 110 ms, and int8 pairs
# win, 43 against 154 ms). On GPU and TPU jax.lax.ragged_dot groups the rows natively; on CPU it lowers to a masked
# product of every row with every expert (256 tokens: 1-2.4 s), so CPU takes it only when asked.
PAIRS_PER_EXPERT = 4
EXPERT_METHODS = ("pairs", "tiles", "ragged")


def _expert(w, e: Array):
    """Expert e (a traced int32 scalar) of a stack [E, *out, in], as a matrix [*out, in] of the stack's format: a
    float array's slice; an Int8's values and scales sliced (its in_scale [in] is one for the whole stack); Blocks'
    every field sliced."""
    take = lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False)  # noqa: E731
    if isinstance(w, Int8):
        return w.replace(values=take(w.values), scale=take(w.scale))
    return jax.tree_util.tree_map(take, w)


def _expert_mlp(layer: "Layer", x: Array, e: Array, config: LLMConfig) -> Array:
    """Expert e's MLP on rows x [m, D] -> [m, D]: `linear` on the expert's slices, so each weight format multiplies
    as it does in a dense layer (a one-row matvec with the convert fused; a GEMM on a dequantized expert)."""
    h = linear(x[None], _expert(layer.experts_gate_up, e))[0]  # [m, F, 2]
    if layer.experts_gate_up_bias is not None:  # gpt-oss
        h = h + _expert(layer.experts_gate_up_bias, e).astype(h.dtype)
    out = linear(expert_activation(h, config)[None], _expert(layer.experts_down, e))[0]  # [m, D]
    if layer.experts_down_bias is not None:
        out = out + _expert(layer.experts_down_bias, e).astype(out.dtype)
    return out


def _pairs(layer: "Layer", x: Array, chosen: Array, config: LLMConfig) -> Array:
    """x [M, D], chosen [M, k] -> each pair's expert output [M, k, D], one pair at a time (a loop, not M·k unrolled
    copies: the same speed measured, and each layer's program M·k times smaller)."""
    M, D = x.shape
    k = chosen.shape[1]
    rows = jnp.repeat(x, k, axis=0)[:, None]  # [M·k, 1, D]: pair p is token p // k's choice p % k
    out = jax.lax.map(lambda pair: _expert_mlp(layer, pair[0], pair[1], config), (rows, chosen.reshape(-1)))
    return out.reshape(M, k, D)


def tile_rows(pairs: int, experts: int) -> int:
    """Rows per tile: about the pairs an expert gets on average, so its last tile's padding stays small, but at
    least 32 (smaller GEMMs ran slower per row than the padding they save) and at most 128."""
    return min(128, max(32, 1 << max(0, (pairs // experts - 1).bit_length())))


def _tiles(layer: "Layer", x: Array, chosen: Array, config: LLMConfig) -> Array:
    """x [M, D], chosen [M, k] -> [M, k, D] in tiles of m rows: the P = M·k pairs sorted by expert, each expert's run
    padded to a multiple of m, so that tile t holds pairs of one expert alone. At most ceil(P / m) + E tiles are
    needed whatever the choices (a static count); tiles past the last pair are skipped."""
    M, D = x.shape
    E, k = config.num_experts, chosen.shape[1]
    P = M * k
    m = tile_rows(P, E)
    tiles = -(-P // m) + E
    flat = chosen.reshape(-1)  # [P]
    order = jnp.argsort(flat, stable=True)  # [P]: pairs by expert
    counts = jnp.bincount(flat, length=E)  # [E]
    padded = (counts + m - 1) // m * m  # [E]: each expert's rows, whole tiles
    ends = jnp.cumsum(padded)  # [E]
    by_expert = flat[order]
    slot = ends[by_expert] - padded[by_expert] + jnp.arange(P) - (jnp.cumsum(counts) - counts)[by_expert]  # [P]
    pair_at = jnp.full((tiles * m,), P, jnp.int32).at[slot].set(order.astype(jnp.int32))  # [tiles·m]; P: padding
    tile_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(tiles) * m, side="right"), E - 1)  # [tiles]
    busy = jnp.arange(tiles) * m < ends[-1]  # [tiles]
    rows = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[jnp.minimum(pair_at // k, M)]  # [tiles·m, D]

    def tile(t):
        block, e, busy = t  # [m, D], expert, any pairs in it
        return jax.lax.cond(busy, lambda: _expert_mlp(layer, block, e, config), lambda: jnp.zeros_like(block))

    out = jax.lax.map(tile, (rows.reshape(tiles, m, D), tile_expert, busy)).reshape(tiles * m, D)
    slot_of_pair = jnp.zeros((P,), jnp.int32).at[order].set(slot.astype(jnp.int32))  # [P]
    return out[slot_of_pair].reshape(M, k, D)  # a gather back, not a scatter-add: every pair has one slot


def _ragged(layer: "Layer", x: Array, chosen: Array, config: LLMConfig) -> Array:
    """x [M, D], chosen [M, k] -> [M, k, D] with jax.lax.ragged_dot: the pairs sorted by expert, each expert's group
    of rows times its matrix. A quantized stack is dequantized whole first (XLA on GPU fuses that into the operand)."""
    M, D = x.shape
    E, k, F = config.num_experts, chosen.shape[1], config.moe_intermediate_size
    flat = chosen.reshape(-1)  # [P]
    order = jnp.argsort(flat, stable=True)  # [P]
    by_expert, sizes = flat[order], jnp.bincount(flat, length=E).astype(jnp.int32)
    # Contract the rows' D with each expert's last axis: the stacks keep HF's [out, in], no transposed copy.
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    gate_up = dense(layer.experts_gate_up).astype(x.dtype).reshape(E, 2 * F, D)
    h = jax.lax.ragged_dot_general(x[order // k], gate_up, sizes, dims).reshape(M * k, F, 2)  # [P, F, 2]
    if layer.experts_gate_up_bias is not None:
        h = h + layer.experts_gate_up_bias[by_expert].astype(h.dtype)
    out = jax.lax.ragged_dot_general(expert_activation(h, config), dense(layer.experts_down).astype(x.dtype),
                                     sizes, dims)  # [P, D]
    if layer.experts_down_bias is not None:
        out = out + layer.experts_down_bias[by_expert].astype(out.dtype)
    return jnp.zeros_like(out).at[order].set(out).reshape(M, k, D)


def experts_chosen(layer: "Layer", x: Array, weights: Array, chosen: Array, config: LLMConfig,
                   method: str | None = None) -> Array:
    """Only the chosen experts: x [M, D], weights and chosen [M, k] -> [M, D], each (token, expert) pair computed
    with its expert's weights alone. `method` (EXPERT_METHODS): "pairs" (one matvec per pair), "tiles" (GEMMs on
    tiles of pairs sorted by expert), "ragged" (jax.lax.ragged_dot); None picks ragged on GPU and TPU, on CPU pairs
    up to PAIRS_PER_EXPERT·E pairs and tiles beyond (chosen at trace time: shapes and backend are static)."""
    M, D = x.shape
    k = config.num_experts_per_tok
    if method is None:
        few = M * k <= PAIRS_PER_EXPERT * config.num_experts
        method = "ragged" if jax.default_backend() != "cpu" else "pairs" if few else "tiles"
    run = {"pairs": _pairs, "tiles": _tiles, "ragged": _ragged}[method]
    out = run(layer, x, chosen, config)  # [M, k, D]
    chex.assert_shape(out, (M, k, D))
    return jnp.einsum("MKD,MK->MD", out, weights.astype(out.dtype)).astype(x.dtype)


EXPERT_FIELDS = ("experts_gate_up", "experts_down", "experts_gate_up_bias", "experts_down_bias")  # [E, ...] each


def experts_mesh(layer: "Layer", config: LLMConfig):
    """The mesh whose tp axis splits the experts (loader.SHARDING: E / tp a device, when tp divides E), or None on one
    device. Read from the weights' abstract sharding at trace time."""
    leaf = jax.tree_util.tree_leaves(layer.experts_down)[0]
    mesh = getattr(jax.typeof(leaf).sharding, "mesh", None)
    tp = dict(getattr(mesh, "shape", None) or {}).get("tp", 1)
    return mesh if tp > 1 and config.num_experts % tp == 0 else None


def sharded_experts(layer: "Layer", x: Array, weights: Array, chosen: Array, config: LLMConfig, mesh) -> Array:
    """experts_chosen with the experts split over the mesh's tp axis: each device computes the (token, expert) pairs
    of its own E / tp experts (the others weigh 0 there) and one psum over tp sums the devices' parts: one reduction
    of [M, D] per layer. Rows split over dp as the batch is (when dp divides them)."""
    tp, dp = mesh.shape["tp"], mesh.shape["dp"]
    local = config.num_experts // tp
    rows = P("dp") if x.shape[0] % dp == 0 else P()

    def spec(path, leaf) -> P:  # the expert fields split along E; Int8's per-input-channel scale and the rest whole
        return P("tp") if path[0].name in EXPERT_FIELDS and getattr(path[-1], "name", None) != "in_scale" else P()

    def run(layer, x, weights, chosen):
        first = jax.lax.axis_index("tp") * local
        mine = (chosen >= first) & (chosen < first + local)
        out = experts_chosen(layer, x, jnp.where(mine, weights, 0), jnp.clip(chosen - first, 0, local - 1),
                             dataclasses.replace(config, num_experts=local))
        return jax.lax.psum(out, "tp")

    specs = jax.tree_util.tree_map_with_path(spec, layer)
    return jax.shard_map(run, mesh=mesh, in_specs=(specs, rows, rows, rows), out_specs=rows)(layer, x, weights, chosen)


def experts_mlp(layer: "Layer", x: Array, config: LLMConfig, tap: Tap) -> Array:
    """A mixture-of-experts MLP: x [B, T, D] -> [B, T, D], the routed experts' weighted sum plus the shared
    expert's output (Qwen2-MoE gates it by sigmoid(x · shared_expert_gate))."""
    B, T, D = x.shape
    E, k = config.num_experts, config.num_experts_per_tok
    flat = x.reshape(B * T, D)
    logits, weights, chosen = route(layer, flat, config)
    chex.assert_shape(logits, (B * T, E))
    chex.assert_shape([weights, chosen], (B * T, k))
    tap("router_logits", logits.reshape(B, T, E))
    tap("chosen_experts", chosen.reshape(B, T, k)), tap("routing_weights", weights.reshape(B, T, k))
    mesh = experts_mesh(layer, config)
    out = (experts_chosen(layer, flat, weights, chosen, config) if mesh is None
           else sharded_experts(layer, flat, weights, chosen, config, mesh)).reshape(B, T, D)
    tap("experts", out)
    if layer.gate_up_proj is not None:
        shared = linear(_swiglu(linear(x, layer.gate_up_proj), config), layer.down_proj)  # [B, T, D]
        tap("shared_expert", shared)
        if layer.shared_expert_gate is not None:
            shared = jax.nn.sigmoid(linear(x, layer.shared_expert_gate)) * shared  # gate [B, T, 1]
        out = out + shared
    chex.assert_equal_shape([x, out])
    tap("mlp", out)
    return out
