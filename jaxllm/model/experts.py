"""Mixture of experts: the router (which k of the E experts each token uses, with what weights) and the experts'
computation (given those choices, the output), as separate functions. A family's routing rule is a few lines here
beside the Transformers formula it mirrors; ROUTERS names them for LLMConfig.router.

Tokens are flattened to M = B·T rows. Shape letters as in ops.py: E experts, k chosen per token, F an expert's width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import chex
import jax
import jax.numpy as jnp

from jaxllm.config import LLMConfig
from jaxllm.model.mlp import ACTIVATIONS
from jaxllm.model.ops import Array, Tap, linear

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


ROUTERS: dict[str, Callable[[Array, "Layer", LLMConfig], tuple[Array, Array]]] = {
    "softmax_topk": softmax_topk,
}


def route(layer: "Layer", x: Array, config: LLMConfig) -> tuple[Array, Array, Array]:
    """x [M, D] -> (router logits [M, E], weights [M, k] fp32, chosen experts [M, k] int32). The logits are a
    plain linear in the activations' dtype, as HF's F.linear(hidden_states, gate.weight)."""
    logits = linear(x[None], layer.router)[0]  # [M, E]
    weights, chosen = ROUTERS[config.router](logits, layer, config)
    return logits, weights, chosen.astype(jnp.int32)


# ---- experts: x [M, D], weights [M, k], chosen [M, k] -> [M, D] ---------------------------------------------------

def _swiglu(gate_up: Array, config: LLMConfig) -> Array:
    """[..., F, 2] (gate, up) -> [..., F]: act(gate) * up."""
    return ACTIVATIONS[config.hidden_act](gate_up[..., 0]) * gate_up[..., 1]


def experts_all(layer: "Layer", x: Array, weights: Array, chosen: Array, config: LLMConfig) -> Array:
    """The reference form: every expert on every token, [M, E, D], summed with weights that are zero outside each
    token's k choices. E / k times the work of `experts_chosen`; kept to test it against."""
    M, D = x.shape
    E, F = config.num_experts, config.moe_intermediate_size
    gate_up = linear(x[None], layer.experts_gate_up)[0]  # [M, E, F, 2]
    chex.assert_shape(gate_up, (M, E, F, 2))
    down = layer.experts_down.dequantize() if hasattr(layer.experts_down, "dequantize") else layer.experts_down
    out = jnp.einsum("MEF,EDF->MED", _swiglu(gate_up, config), down.astype(x.dtype))  # [M, E, D]
    dense = jnp.zeros((M, E), jnp.float32).at[jnp.arange(M)[:, None], chosen].add(weights)  # [M, E]
    return jnp.einsum("MED,ME->MD", out, dense.astype(x.dtype))


def experts_chosen(layer: "Layer", x: Array, weights: Array, chosen: Array, config: LLMConfig) -> Array:
    """Only the chosen experts: each of the M·k (token, expert) pairs reads its expert's weights alone."""
    M, D = x.shape
    k, F = config.num_experts_per_tok, config.moe_intermediate_size
    gate_up = jnp.take(layer.experts_gate_up, chosen, axis=0)  # [M, k, F, 2, D]
    h = _swiglu(jnp.einsum("MD,MKFTD->MKFT", x, gate_up.astype(x.dtype)), config)  # [M, k, F]
    down = jnp.take(layer.experts_down, chosen, axis=0)  # [M, k, D, F]
    out = jnp.einsum("MKF,MKDF->MKD", h, down.astype(x.dtype))  # [M, k, D]
    chex.assert_shape(out, (M, k, D))
    return jnp.einsum("MKD,MK->MD", out, weights.astype(x.dtype))


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
    out = experts_chosen(layer, flat, weights, chosen, config).reshape(B, T, D)
    tap("experts", out)
    if layer.gate_up_proj is not None:
        shared = linear(_swiglu(linear(x, layer.gate_up_proj), config), layer.down_proj)  # [B, T, D]
        if layer.shared_expert_gate is not None:
            shared = jax.nn.sigmoid(linear(x, layer.shared_expert_gate)) * shared  # gate [B, T, 1]
        tap("shared_expert", shared)
        out = out + shared
    chex.assert_equal_shape([x, out])
    tap("mlp", out)
    return out
