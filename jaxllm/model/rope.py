"""Rotary position embeddings: the inverse frequencies of every RoPE type Transformers builds, the cos/sin tables,
and the rotation in HF's rotate-half layout."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxllm.config import LLMConfig, RopeConfig
from jaxllm.model.ops import Array


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

