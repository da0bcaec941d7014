"""Weight formats: how a matrix is held in memory and how the forward multiplies by it.

    fp32   float32 arrays (the default)
    bf16   bfloat16 parameters and activations; norms' statistics, RoPE angles, softmax and logits in fp32 (model.py)
    int8   Int8: int8 [*out, in] with a float32 scale per output row, and a float32 scale per input channel that
           multiplies the activation instead of the weight; quantized at load time
    gguf   Blocks: a GGUF file's quantized tensors kept in their stored blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K),
           dequantized inside the jitted matmul

A quantized matrix is a small pytree that stands where a float [*out, in] array would: model.ops.linear and
model.embedding dispatch on its type, so the forward reads the same for every format. Matrices keep HF's [out, in]
orientation and multiply as x @ w.T (`matmul`), the form in which XLA:CPU fuses the convert or dequantization of w
into the decode matvec.
"""

from __future__ import annotations

import math
import mmap

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import InputError
from jaxllm.pytree import static, struct

Array = jax.Array
FORMATS = ("fp32", "bf16", "int8", "gguf")
MATVEC_ROWS = 16  # up to this many rows, a quantized matmul runs as one matvec per row (`matmul`)


@struct
class Int8:
    """w ≈ values · scale[:, None] / in_scale[None, :]: int8 values [*out, in], scale [*out] (per output row) and
    in_scale [in] (per input channel, folded into the activation: x · w.T = ((x / in_scale) · values.T) · scale).
    Each row of `values` uses the whole int8 range."""

    values: Array  # [*out, in] int8
    scale: Array  # [*out] float32
    in_scale: Array  # [in] float32
    format = "int8"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def dequantize(self) -> Array:  # [*out, in] f32
        return self.values.astype(jnp.float32) * self.scale[..., None] * (1 / self.in_scale)

    def matmul(self, x: Array, scale_on_weight: bool = False) -> Array:
        """x [M, in] f32 -> [M, out] (out flattened): one dot with the int8 -> f32 convert on the weight operand.
        `scale_on_weight` (row-stable decode, ops.linear): the scale multiplies the weight inside the dot (values ·
        scale, fused into the matvec), so that no multiply follows the product: XLA contracted that one with the
        residual add into an FMA in some shapes only."""
        values = self.values.reshape(-1, self.values.shape[-1])
        if scale_on_weight:
            return matmul(x / self.in_scale, values.astype(jnp.float32) * self.scale.reshape(-1, 1))
        return matmul(x / self.in_scale, values.astype(x.dtype)) * self.scale.reshape(-1)

    def rows(self, ids: Array) -> Array:
        """Rows `ids` (any shape, in range) dequantized: [*ids.shape, in] f32 (an embedding lookup)."""
        scale = jnp.take(self.scale, ids, axis=0)  # [*ids.shape, *out[1:]]
        # Times 1 / in_scale, not divided by it: XLA rewrites a divide by a broadcast into a multiply by its
        # reciprocal only where the broadcast is larger, so a division rounded differently for 1 and for 6 ids.
        return jnp.take(self.values, ids, axis=0).astype(jnp.float32) * scale[..., None] * (1 / self.in_scale)


# GGUF block formats kept as stored: the fields each holds, per row. `block` is the number of weights one `scale`
# entry covers. K-quants group 8 (Q4_K) or 16 (Q6_K) such blocks into a super-block of 256 with f16 super-scales.
BLOCK_FORMATS = {
    "Q8_0": "values int8 [nb, 32], scale f16 [nb]: w = scale · v",
    "Q4_0": "values uint8 [nb, 16] (two 4-bit weights each), scale f16 [nb]: w = scale · (q - 8)",
    "Q4_1": "values uint8 [nb, 16], scale f16 [nb], offset f16 [nb]: w = scale · q + offset",
    "Q4_K": "values uint8 [nb / 2, 32], scale/offset uint8 [nb] (6-bit), super_scale f16 [nb / 8] (d), "
            "super_offset f16 [nb / 8] (-dmin): w = super_scale · scale · q + super_offset · offset",
    "Q6_K": "values uint8 [nb / 2, 64] (low 4 bits), high uint8 [nb / 2, 32] (high 2 bits), scale int8 [nb], "
            "super_scale f16 [nb / 16]: w = super_scale · scale · (q - 32)",
}


@struct
class Blocks:
    """A matrix [*out, in] in one of GGUF's block formats (BLOCK_FORMATS), as the file stores it: every field has the
    row axes [*out] first, then its blocks along `in`. The bytes are the file's, but for Q4_K's 6-bit scales and
    mins, unpacked from 12 bytes a super-block of 256 weights into 16 (2.8% more)."""

    values: Array
    scale: Array
    offset: Array | None = None  # Q4_1, Q4_K
    high: Array | None = None  # Q6_K
    super_scale: Array | None = None  # K-quants
    super_offset: Array | None = None  # Q4_K (stored negated: w = ... + super_offset · offset)
    format: str = static(default="Q8_0")

    @property
    def rows_shape(self) -> tuple[int, ...]:
        return self.scale.shape[:-1]

    @property
    def block(self) -> int:
        return 16 if self.format == "Q6_K" else 32

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.rows_shape, self.scale.shape[-1] * self.block)

    def _quants(self) -> Array:
        """The integer weights q [*out, in] as f32, before scale and offset."""
        v = self.values
        if self.format == "Q8_0":
            return v.astype(jnp.float32).reshape(self.shape)
        if self.format == "Q6_K":
            nibbles = jnp.stack([v & 15, v >> 4], axis=-2)  # [*out, n, 2, 64]: the low nibbles come first
            shifts = jnp.asarray([0, 2, 4, 6], jnp.uint8)[:, None]
            high = (self.high[..., None, :] >> shifts) & 3  # [*out, n, 4, 32]: 2 bits for each of 128 weights
            q = nibbles.reshape(*v.shape[:-1], 128) | (high.reshape(*v.shape[:-1], 128) << 4)
            return (q.astype(jnp.float32) - 32).reshape(self.shape)
        # Nibbles split in f32 (floor(v / 16), v - 16·that): XLA:CPU vectorizes it better than shifts and masks
        # (a Q4_1 matvec ran 1.2x faster).
        v = v.astype(jnp.float32)
        high = jnp.floor(v * (1 / 16))
        q = jnp.stack([v - 16 * high, high], axis=-2).reshape(self.shape)  # the low nibbles come first
        return q - 8 if self.format == "Q4_0" else q

    def _scales(self) -> tuple[Array, Array | None]:
        """Each block's scale and offset [*out, nb] in f32 (the offset None where the format has none)."""
        scale = self.scale.astype(jnp.float32)
        offset = None if self.offset is None else self.offset.astype(jnp.float32)
        if self.super_scale is not None:
            per = scale.shape[-1] // self.super_scale.shape[-1]
            scale = scale * jnp.repeat(self.super_scale.astype(jnp.float32), per, axis=-1)
            if offset is not None:
                offset = offset * jnp.repeat(self.super_offset.astype(jnp.float32), per, axis=-1)
        return scale, offset

    def dequantize(self) -> Array:  # [*out, in] f32
        scale, offset = self._scales()
        q = self._quants().reshape(*scale.shape, self.block)
        w = q * scale[..., None] if offset is None else q * scale[..., None] + offset[..., None]
        return w.reshape(self.shape)

    def matmul(self, x: Array) -> Array:
        """x [M, in] f32 -> [M, out] (out flattened): a dot whose weight operand is the dequantization, fused into it
        in decode (every stored byte read once, no f32 copy), dequantized once per call in prefill."""
        I = self.shape[-1]
        ones = 1 + 0 * jnp.resize(self.scale.astype(x.dtype), (I,))  # [I] of 1.0 (to XLA, 0 · a float is not 0)
        return matmul(_input(x, ones), self.dequantize().reshape(-1, I))

    def rows(self, ids: Array) -> Array:
        """Rows `ids` (any shape, in range) dequantized: [*ids.shape, in] f32."""
        return jax.tree_util.tree_map(lambda a: jnp.take(a, ids, axis=0), self).dequantize()


def matmul(x: Array, w: Array, out_dtype=None) -> Array:
    """x [M, in] times w [out, in] -> [M, out], written as x @ w.T. In decode (M = 1) XLA:CPU turns this into one
    loop over w that computes w's elements where it reads them, so a convert from int8, or a dequantization, on the
    weight operand costs no f32 copy of the matrix; the same dot written as dot_general(x, w) over w's axis 1 keeps
    the convert as a separate pass that writes the f32 matrix out first (measured on 40 int8 matrices of 2304 x 576:
    2.7x slower than fp32, against 3.9x faster). The compiled HLO shows it: one kLoop fusion reading s8 (or u8) and producing the dot.
    With a few rows (a decode step over a batch or a server's slots: 1 < M <= MATVEC_ROWS) the same dot is a GEMM
    that XLA:CPU feeds a dequantized f32 copy of w; written as M one-row matvecs it stays fused, one pass over w."""
    M = x.shape[0]
    if 1 < M <= MATVEC_ROWS:
        rows = materialized([x[i:i + 1] for i in range(M)])
        return jnp.concatenate([jnp.matmul(r, w.T, preferred_element_type=out_dtype) for r in rows])
    return jnp.matmul(x, w.T, preferred_element_type=out_dtype)


def materialized(rows: list[Array]) -> list[Array]:
    """The arrays as buffers written before the matvecs read them. XLA:CPU otherwise fuses their producers (the
    attention output's combine, the RMSNorm) into each row's matvec, whose loop recomputes them for every output
    element: a decode step over 8 slots of the default model in int8 ran 1.7x slower than as a GEMM. A conditional
    is a fusion boundary (jax.lax.optimization_barrier left them fused). Its predicate is true whatever the rows
    hold, NaN included, but XLA cannot prove it, so it keeps the conditional (with a constant predicate, or two
    identical branches, it removes it); the other branch never runs."""
    first = rows[0].ravel()[0]
    return jax.lax.cond(jnp.isnan(first) | ~jnp.isnan(first), lambda: rows, lambda: [r + 1 for r in rows])


def _input(x: Array, ones: Array) -> Array:
    """x [M, in] as an operand XLA does not fuse into a quantized matvec. XLA:CPU fuses cheap producers (the RMSNorm's
    multiplies, the attention output's reshapes, SwiGLU's product) into the loop that computes the matvec, where they
    run again for every output row. It did not fuse a divide by an array (a divide by a scalar it did fuse), so
    dividing by `ones` [in] (1.0 each, computed at run time so that XLA cannot fold it away) stops the fusion there:
    a GGUF decode step of the default model went from 27.2 to 20.9 ms. (Int8 divides by its in_scale anyway;
    jax.lax.optimization_barrier left the producers fused.)"""
    return x / ones


def is_quantized(w) -> bool:
    return isinstance(w, Int8 | Blocks)


def dense(w) -> Array:
    """A matrix as a float array: a quantized one dequantized whole, a float one as it is."""
    return w.dequantize() if is_quantized(w) else w


def format_of(w) -> str:
    """'int8', 'Q4_1', ..., or the dtype of a plain array ('float32', 'bfloat16')."""
    return w.format if is_quantized(w) else str(w.dtype)


def nbytes(w) -> int:
    return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(w))


def check_format(weights: str) -> str:
    if weights not in FORMATS:
        raise InputError(f"weights must be one of {', '.join(FORMATS)}; found {weights!r}")
    return weights


# ---- quantizing at load time (numpy, on the host) --------------------------------------------------------------


# int8 scaling, chosen by measurement on the default model (README, "Weights"): each input channel i is first scaled by
# in_scale[i] = c / max_o |w[o, i]| ** COLUMN_ALPHA (c: their mean, so in_scale is ~1), which shrinks the columns
# whose large weights would otherwise set their rows' scales; then every row is quantized to ±127. Against per-row
# scales alone this halved the KL from the fp32 logits. Then the few matrices whose input carries outlier activations
# (max |x| over mean |x| above OUTLIER_RATIO on CALIBRATION_TOKENS pseudo-random tokens, loader.py) stay fp32.
COLUMN_ALPHA = 0.25
QUANTIZE_ROWS = 1024  # rows quantized at a time, in one float32 buffer
OUTLIER_RATIO = 256.0
CALIBRATION_TOKENS = 64


def quantize_int8(w: np.ndarray, in_scale: np.ndarray | None = None) -> Int8:
    """w [*out, in] float -> Int8 (numpy leaves): w · in_scale quantized per output row, round to nearest, each row's
    largest magnitude to ±127. `in_scale` [in] defaults to COLUMN_ALPHA's column scaling."""
    rows = np.asarray(w).reshape(-1, w.shape[-1])  # [out, in]
    chunks = [slice(start, start + QUANTIZE_ROWS) for start in range(0, rows.shape[0], QUANTIZE_ROWS)]
    if in_scale is None:  # max |w| of each column as max(max w, -min w): no |w| copy
        column = np.max([np.maximum(rows[c].max(axis=0), -rows[c].min(axis=0)) for c in chunks], axis=0)
        column = column.astype(np.float32) ** COLUMN_ALPHA
        column = np.where(column > 0, column, 1.0)
        in_scale = np.mean(column) / column
    in_scale = np.asarray(in_scale, np.float32)
    values, scale = host_array(rows.shape, np.int8), np.empty(rows.shape[0], np.float32)
    buffer = host_array((min(QUANTIZE_ROWS, rows.shape[0]), rows.shape[1]), np.float32)  # [QUANTIZE_ROWS, in]
    for c in chunks:  # a block of rows at a time, computed in place: one float buffer however large the matrix
        scaled = np.multiply(rows[c], in_scale, out=buffer[:len(rows[c])], dtype=np.float32)
        row_scale = np.maximum(scaled.max(axis=-1), -scaled.min(axis=-1)) / 127.0
        scale[c] = np.where(row_scale > 0, row_scale, 1.0)
        scaled /= scale[c][:, None]
        values[c] = np.clip(np.rint(scaled, out=scaled), -127, 127, out=scaled)
    return Int8(values=values.reshape(w.shape), scale=scale.reshape(w.shape[:-1]), in_scale=in_scale)


def blocks_from_gguf(data: np.ndarray, kind: str, shape: tuple[int, int]) -> Blocks:
    """A GGUF tensor's raw bytes [out, row bytes] (uint8, as gguf.GGUFReader gives them) in format `kind`, split into
    the fields of a Blocks with rows leading (numpy leaves, the file's bytes)."""
    out, n_in = shape
    block_weights = 256 if kind.endswith("_K") else 32
    raw = np.ascontiguousarray(data).reshape(out, n_in // block_weights, -1)  # [out, blocks, bytes per block]

    def take(start: int, size: int, dtype) -> np.ndarray:  # bytes [start, start + size) of every block
        return np.ascontiguousarray(raw[..., start:start + size]).view(dtype)

    if kind == "Q8_0":
        return Blocks(values=take(2, 32, np.int8), scale=take(0, 2, np.float16)[..., 0], format=kind)
    if kind in ("Q4_0", "Q4_1"):
        start = 2 if kind == "Q4_0" else 4
        return Blocks(values=take(start, 16, np.uint8), scale=take(0, 2, np.float16)[..., 0], format=kind,
                      offset=take(2, 2, np.float16)[..., 0] if kind == "Q4_1" else None)
    if kind == "Q4_K":  # d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks, 128 bytes of nibbles
        packed = take(4, 12, np.uint8).reshape(out, -1, 3, 4)
        d, m, md = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
        sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)  # [out, n, 8]
        mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
        return Blocks(values=take(16, 128, np.uint8).reshape(out, -1, 32), scale=sc.reshape(out, -1),
                      offset=mn.reshape(out, -1), super_scale=take(0, 2, np.float16)[..., 0],
                      super_offset=-take(2, 2, np.float16)[..., 0], format=kind)
    if kind == "Q6_K":  # 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d
        return Blocks(values=take(0, 128, np.uint8).reshape(out, -1, 64), high=take(128, 64, np.uint8).reshape(out, -1, 32),
                      scale=take(192, 16, np.int8).reshape(out, -1), super_scale=take(208, 2, np.float16)[..., 0],
                      format=kind)
    raise ValueError(f"no block layout for {kind}")


def dequantize_int8(w: Int8) -> np.ndarray:
    """An Int8 matrix as float32 [*out, in] on the host (numpy, into one host_array): values · scale / in_scale, as
    Int8.dequantize computes it in JAX."""
    values, scale, in_scale = (np.asarray(a) for a in (w.values, w.scale, w.in_scale))
    out = np.multiply(values, scale[..., None], out=host_array(values.shape, np.float32), dtype=np.float32)
    return np.divide(out, in_scale, out=out)


def host_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised numpy array in an anonymous memory map of its own, given back to the system when it is
    freed, for int8's quantization and calibration. glibc keeps freed heap memory once a freed block has raised its
    threshold for using a map: on the default model that kept ~60 MB of an int8 load's temporaries resident."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if size == 0:
        return np.empty(shape, dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # as numpy asks for its large arrays: 2 MB pages, fewer page faults
        memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, dtype).reshape(shape)


def stack(parts: list, axis: int):
    """Concatenate matrices (arrays, or Blocks of one format) along a row axis: every field alike."""
    return jax.tree_util.tree_map(lambda *leaves: np.concatenate(leaves, axis=axis), *parts)


def reshape_rows(w, rows: tuple[int, ...]):
    """A matrix with its row axes reshaped to `rows` (the trailing, per-row axes unchanged)."""
    if not is_quantized(w):
        return w.reshape(*rows, w.shape[-1])
    n = len(w.rows_shape)
    return jax.tree_util.tree_map(lambda a: a.reshape(*rows, *a.shape[n:]), w)


def take_rows(w, start: int, stop: int):
    return jax.tree_util.tree_map(lambda a: a[start:stop], w) if is_quantized(w) else w[start:stop]


def describe(w) -> str:
    """'Q4_1 [576, 576] 207,360 B' for `inspect`."""
    return f"{format_of(w)} {list(w.shape)} {nbytes(w):,} B"
