"""MXFP4 (OCP microscaling 4-bit floats), as gpt-oss checkpoints store their experts (`quantization_config`
quant_method "mxfp4"): each matrix X as X_blocks [..., out, G, 16] uint8, two FP4 (E2M1) codes a byte with the low
nibble first, and X_scales [..., out, G] uint8, one power of two (biased by 127) for each block of 32 values along
`in` (G = in / 32). jaxllm reads them dequantized to fp32, as Transformers does without its MXFP4 kernels
(integrations/mxfp4.py, convert_moe_packed_tensors).
"""

from __future__ import annotations

import numpy as np

# E2M1 code -> value: sign bit 3, then 2 exponent bits and 1 mantissa bit (Transformers' FP4_VALUES).
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
SCALE_BIAS = 127
SUFFIXES = ("_blocks", "_scales")


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks [..., out, G, 16] uint8, scales [..., out, G] uint8 -> the matrix [..., out, G·32] in fp32 (exact:
    every value is a small float times a power of two). Transformers' result is this with its last two axes swapped,
    the [in, out] layout of GptOssExperts' parameters."""
    blocks = np.asarray(blocks, np.uint8)
    if blocks.shape[:-1] != np.shape(scales):
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(np.shape(scales))}")
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)  # [..., G, 16, 2]: low first
    exponents = np.asarray(scales, np.int32)[..., None, None] - SCALE_BIAS
    return np.ldexp(values, exponents).reshape(*blocks.shape[:-2], -1)
