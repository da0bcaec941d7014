"""The dense gated MLP (SwiGLU, GeGLU)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax

from jaxllm.config import LLMConfig
from jaxllm.model.ops import Array, Tap, bias, chex, linear

if TYPE_CHECKING:
    from jaxllm.model import Layer

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
               "gelu": functools.partial(jax.nn.gelu, approximate=False)}


def gated_mlp(layer: Layer, x: Array, config: LLMConfig, tap: Tap) -> Array:
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU with silu, GeGLU with Gemma's gelu. x [B, T, D] -> [B, T, D]."""
    gate_up = bias(linear(x, layer.gate_up_proj), layer.gate_up_bias)  # [B, T, F, 2]
    gate, up = gate_up[..., 0], gate_up[..., 1]  # [B, T, F] each
    tap("gate_proj", gate), tap("up_proj", up)
    out = bias(linear(ACTIVATIONS[config.hidden_act](gate) * up, layer.down_proj), layer.down_bias)  # [B, T, D]
    chex.assert_equal_shape([x, out])
    tap("mlp", out)
    return out

