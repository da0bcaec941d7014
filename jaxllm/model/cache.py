"""The KV cache: fixed-size buffers of S slots per row, written row by row."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm.config import LLMConfig
from jaxllm.model.ops import Array


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

