"""The KV cache: fixed-size buffers of S slots per row, written row by row."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import LLMConfig
from jaxllm.model.ops import Array
from jaxllm.pytree import static, struct


@struct
class KVCache:
    """Keys and values of every layer, after RoPE, in fixed-size buffers of S slots per row, and which slots hold what.

    Each row is written on its own: slot s of row b holds the s-th token fed to that row, `index[b]` is the row's next
    slot to write, and `mask` marks the slots that hold a real token (written, and not padding), so a call's queries
    see exactly the masked-in slots plus their own causal past. Rows of one `generate` batch move together (the same
    index); the rows of a serving engine's slot table each follow their own request. Keys are stored transposed,
    [B, K, H, S], so that a decode step's scores are a plain [G, H] x [H, S] matmul per key/value head with no
    transpose of the cache.
    """

    k: tuple[Array, ...]  # L × [B, K, H, S]   (latent attention: L × [B, 1, C + R, S], see key_shape)
    v: tuple[Array, ...]  # L × [B, K, S, H]   (latent attention: L × [B, 1, S, 0])
    mask: Array  # [B, S] bool: the slot holds a real token
    index: Array  # [B] int32: each row's next slot to write
    # True until the first write: a call into an empty cache attends over its own keys alone, not over S slots
    # that are all masked out (a prefill of T tokens would otherwise score T x S more keys).
    empty: bool = static(default=False)

    @property
    def length(self) -> int:
        """S: the number of slots."""
        return self.mask.shape[1]

    @classmethod
    def zeros(cls, config: LLMConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        B, S = batch, length
        K, H, HV = key_shape(config)
        layers = range(config.num_hidden_layers)
        return cls(k=tuple(jnp.zeros((B, K, H, S), dtype) for _ in layers),
                   v=tuple(jnp.zeros((B, K, S, HV), dtype) for _ in layers),
                   mask=jnp.zeros((B, S), bool), index=jnp.zeros((B,), jnp.int32), empty=True)


def key_shape(config: LLMConfig) -> tuple[int, int, int]:
    """(heads, key dims, value dims) of one cached token. Latent attention (DeepSeek, latent.py) caches one "head"
    of C + R dims, its latent and shared RoPE key, and no values (they are read from the latent): a zero-size v
    leaves every slicing and writing of the cache as it is."""
    if config.kv_lora_rank:
        return 1, config.kv_lora_rank + config.head_dim, 0
    return config.num_key_value_heads, config.head_dim, config.head_dim


def token_bytes(config: LLMConfig, dtype=jnp.float32) -> int:
    """The cache's bytes per token of one row, over every layer."""
    K, H, HV = key_shape(config)
    return config.num_hidden_layers * K * (H + HV) * jnp.dtype(dtype).itemsize


def write_rows(buffer: Array, update: Array, index: Array, axis: int) -> Array:
    """buffer [B, ...] with each row b's `update[b]` written from position index[b] along `axis` (an in-place scatter
    of the update's size, whatever the buffer's length)."""
    def row(b, u, i):
        return jax.lax.dynamic_update_slice_in_dim(b, u, i, axis - 1)

    return jax.vmap(row)(buffer, update.astype(buffer.dtype), index)

