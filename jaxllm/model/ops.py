"""What every sublayer shares: the per-call Context, RMSNorm, and nn.Linear over any weight format.

Shape letters (../shared/STYLE.md): B batch, T query positions, S key positions, D hidden, N query heads,
K key/value heads, G = N // K, H head_dim, F intermediate, V vocab, L layers, E experts, k experts chosen per token.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from jaxllm.config import LLMConfig
from jaxllm.weights import Blocks, Int8, is_quantized, matmul


class _LazyChex:
    """`chex`, imported at the first assertion. The assertions run while a program is traced, and a warm start
    loads its programs without tracing them, so it never pays chex's import (0.17 s, most of it absl.testing)."""

    def __getattr__(self, name: str):
        import chex as module

        return getattr(module, name)


chex = _LazyChex()

Array = jax.Array
# tap(name, value) records an intermediate; the plain forward passes a no-op, the diff ladder a collector.
Tap = Callable[[str, Array], None]


Matrix = Array | Int8 | Blocks  # a float array, or a quantized matrix standing in for one (weights.py)


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


def no_tap(name: str, value: Array) -> None:
    pass


def rms_norm(x: Array, weight: Array, eps: float, plus_one: bool = False) -> Array:
    """HF LlamaRMSNorm: statistics in fp32, cast back to the input dtype *before* the weight multiply. With
    `plus_one`, Gemma's: scaled by (1 + weight) in fp32, then cast. In exact_mode() an fp32 x's statistics and
    scaling run in float64 and x·rsqrt rounds to fp32 once: an fp32 mean of squares dominated by one outsized
    value (the default model's first position reaches 22,000) loses the small squares' low bits."""
    x32 = x.astype(jnp.float32)
    if _EXACT.get() and x.dtype == jnp.float32:
        with jax.enable_x64(True):
            x64 = x32.astype(jnp.float64)
            x32 = (x64 * jax.lax.rsqrt(jnp.mean(x64 * x64, axis=-1, keepdims=True) + eps)).astype(jnp.float32)
    else:
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * x32.astype(x.dtype)


def norm(x: Array, weight: Array, config: LLMConfig) -> Array:
    """The model's RMSNorm, over the last axis of x (D, or H for q_norm and k_norm)."""
    return rms_norm(x, weight, config.rms_norm_eps, config.gemma_norms)



def linear(x: Array, w: Matrix, out_dtype=None) -> Array:
    """nn.Linear without bias: x [B, T, in] times w [*out, in] (HF's orientation; `out` may be several axes)
    -> [B, T, *out], einsum BTI,OI->BTO. `out_dtype`: the result's dtype when it should differ from x's (the logits
    are fp32 in every format). Under row_stable(), each of the B·T rows gets the bits it would get alone: by the row
    kernel where it runs, else as its own one-row product (see below)."""
    B, T, I = x.shape
    if _ROW_STABLE.get() and not _EXACT.get():
        rows = x.reshape(B * T, I)
        if _ROW_STABLE.get() == "kernel" and kernel_takes(w):
            out = row_products(rows, w).astype(out_dtype or x.dtype)
        elif not is_quantized(w) and w.dtype == jnp.float32 and B > 1:  # row-stable as it is (see row_stable)
            out = _product(rows, w, out_dtype)
        else:
            out = jnp.concatenate([_product(r, w, out_dtype, row_stable=True) for r in jnp.split(rows, B * T)])
        return out.reshape(B, T, *w.shape[:-1])
    return _product(x, w, out_dtype).reshape(B, T, *w.shape[:-1])


def _product(x: Array, w: Matrix, out_dtype=None, row_stable: bool = False) -> Array:
    """x [..., I] · w [*out, I] -> [..., O]. An fp32 w runs the dot_general it lowers to (jnp.einsum's own bookkeeping
    takes a fifth of the time to trace a forward); a bf16 or quantized w runs weights.matmul, whose x @ w.T form fuses
    w's convert or dequantization into the decode matvec. `row_stable`: an int8 matrix's scale goes on the weight
    side (Int8.matmul's scale_on_weight)."""
    *lead, I = x.shape
    rows = x.reshape(-1, I)  # [M, I]
    if isinstance(w, Int8):
        out = w.matmul(rows, scale_on_weight=row_stable)
    elif is_quantized(w):
        out = w.matmul(rows)
    elif w.dtype == jnp.bfloat16:  # XLA:CPU has no fast bf16 dot: the f32 convert on w fuses into the matvec, as int8's
        out = matmul(rows.astype(jnp.float32), w.reshape(-1, I).astype(jnp.float32)).astype(out_dtype or x.dtype)
    elif _EXACT.get() and x.dtype == w.dtype == jnp.float32:
        out = exact_dot(rows, w.reshape(-1, I), out_dtype)
    else:  # As a 2-D [out, in] matrix (a free reshape): with several `out` axes XLA:CPU's dot ran 2.5x slower in decode.
        return jax.lax.dot_general(x, w.reshape(-1, I), (((x.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=out_dtype)
    return out.reshape(*lead, -1)


# ---- exact mode: forward(..., exact=True) ----------------------------------------------------------------------
# A trace-time setting, as jax.default_matmul_precision is: `linear` and `rms_norm` read it while a program is traced,
# and only the exact programs (model/__init__.py) trace under it, so a compiled program never changes with it.
_EXACT = contextvars.ContextVar("jaxllm_exact", default=False)
EXACT_TILE = 1 << 23  # elements of w widened to float64 at a time (64 MiB): an LM head goes in row tiles


# ---- row-stable mode: each row's result does not depend on how many rows a call has -----------------------------
# A speculative verify step runs k + 1 positions where a plain decode step runs one, and XLA:CPU computes the two
# shapes differently: a GEMV at one row against a GEMM at more for fp32, a divide rewritten into a reciprocal multiply
# at more rows, and fusions that contract a multiply and an add into one FMA only in some shapes. Traced under
# row_stable(), the projections of fp32, bf16 and int8 matrices run the row kernel (row_products, below); elsewhere
# (GGUF blocks, no compiler, not a CPU) each row is its own one-row product, the GEMV a one-token step runs (an fp32
# matrix over a batch, B > 1, is one dot: YNNPACK's GEMM gave every row the same bits at 2 to 72 rows, where its
# GEMV differs), at the cost of one pass over each matrix per row. The embedding is a buffer, and attention runs one
# query at a time over the cache (attention.py); the decode programs keep YNNPACK to dots
# (generation.DECODE_COMPILER_OPTIONS). A verify step's logits at each position are then bit for bit the plain
# step's.
_ROW_STABLE = contextvars.ContextVar("jaxllm_row_stable", default=False)


@contextlib.contextmanager
def row_stable():
    """Within: `linear` runs row by row (by the row kernel where it is built, see row_products) and cached attention
    query by query (see above)."""
    token = _ROW_STABLE.set("kernel" if row_kernel_ready() else True)
    try:
        yield
    finally:
        _ROW_STABLE.reset(token)


def is_row_stable() -> bool:
    return bool(_ROW_STABLE.get())


# The row kernel (rows.cc, an XLA FFI custom call): x [M, I] times w [O, I] in one pass over w, every row of x summed
# by the same code whatever M is, so a verify step of k + 1 positions reads each matrix once, as a plain step does,
# and gets its bits. Built on first use with the machine's C++ compiler into cache_dir()/kernels (-march=native: the
# file's name carries the source, compiler, flags, JAX version and CPU); without a compiler, or with
# JAXLLM_ROW_KERNEL=0, row-stable decode runs each row as its own XLA GEMV instead (the same answers, a verify step
# k + 1 times a plain step's weight reads). CPU only: other backends take that path too, as do GGUF blocks and
# matrices on a mesh (kernel_takes).
ROWS_SOURCE = Path(__file__).with_name("rows.cc")
ROWS_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


_ROWS_LOCK = threading.Lock()  # kept programs are prefetched on a thread of their own (programs.prefetch_recent)


def row_kernel_ready() -> bool:
    """Whether row-stable decode uses the row kernel in this process (built and registered at the first call)."""
    with _ROWS_LOCK:
        return _row_kernel_ready()


@functools.cache
def _row_kernel_ready() -> bool:
    if jax.default_backend() != "cpu" or os.environ.get("JAXLLM_ROW_KERNEL", "1") == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build_row_kernel()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        warnings.warn(f"row-stable decode runs without its kernel: building {ROWS_SOURCE.name} failed ({detail})")
        return False
    jax.ffi.register_ffi_target("jaxllm_row_products", jax.ffi.pycapsule(library.JaxllmRowProducts), platform="cpu")
    return True


def _build_row_kernel() -> Path:
    from jaxllm.hub import COMPILE_CACHE_ENV, cache_dir

    compiler = os.environ.get("CXX", "c++")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "") \
        if Path("/proc/cpuinfo").exists() else ""
    key = "\0".join([ROWS_SOURCE.read_text(), compiler, version, *ROWS_FLAGS, jax.__version__, platform.machine(), cpu])
    # With compiled things not kept ($JAXLLM_COMPILE_CACHE=0), built into a folder of this process's own, removed at exit.
    folder = cache_dir() / "kernels" if os.environ.get(COMPILE_CACHE_ENV, "1") != "0" else Path(_temporary_folder())
    path = folder / f"rows-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            subprocess.run([compiler, *ROWS_FLAGS, "-I", jax.ffi.include_dir(), str(ROWS_SOURCE), "-o", str(partial)],
                           capture_output=True, text=True, check=True)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return path


def _temporary_folder() -> str:
    folder = tempfile.mkdtemp(prefix="jaxllm-kernels-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def kernel_takes(w: Matrix) -> bool:
    """Whether row_products computes with this matrix: an fp32 or bf16 array, or Int8 (GGUF blocks are not), that
    lies on one device. The custom call has no partitioning rule, so on a mesh XLA would gather a sharded matrix
    whole for it at every step: there the per-row XLA products run, which the mesh splits."""
    if not (isinstance(w, Int8) or (not is_quantized(w) and w.dtype in (jnp.float32, jnp.bfloat16))):
        return False
    mesh = jax.typeof(w.values if isinstance(w, Int8) else w).sharding.mesh
    return mesh.empty or mesh.size == 1


def row_products(x: Array, w: Array | Int8) -> Array:
    """x [M, I] times w [*out, I] (fp32, bf16 or int8) -> [M, O] f32 by the row kernel (see above)."""
    if not row_kernel_ready():
        raise RuntimeError("the row kernel is not built in this process (see ops.row_kernel_ready)")
    M, I = x.shape
    if isinstance(w, Int8):
        values, scale, in_scale = w.values.reshape(-1, I), w.scale.reshape(-1), w.in_scale
    else:
        values, scale, in_scale = w.reshape(-1, I), jnp.zeros(0, jnp.float32), jnp.zeros(0, jnp.float32)
    call = jax.ffi.ffi_call("jaxllm_row_products", jax.ShapeDtypeStruct((M, values.shape[0]), jnp.float32))
    return call(x.astype(jnp.float32), values, scale, in_scale)


@contextlib.contextmanager
def exact_mode():
    """Within: `linear` on an fp32 matrix runs exact_dot, and `rms_norm` takes its statistics in float64; every
    value between ops stays fp32. Not on a TPU, which has no float64 (its fp32 programs run as they are)."""
    token = _EXACT.set(jax.default_backend() != "tpu")
    try:
        yield
    finally:
        _EXACT.reset(token)


def exact_dot(x: Array, w: Array, out_dtype=None) -> Array:
    """x [M, I] · w [O, I] -> [M, O] (fp32), accumulated in float64 and rounded once: each output is the fp32 value
    nearest the exact sum of products. An fp32 dot rounds at every addition, by an amount that depends on its order:
    XLA:CPU's YNNPACK dot sums each output's I products in one run (2-5x the error of torch's blocked GEMM), and
    no fp32 order (blocked, pairwise) stays below torch's everywhere. w is widened in tiles of at most EXACT_TILE
    elements, so an LM head never has a float64 copy whole."""
    O, I = w.shape
    rows = max(1, EXACT_TILE // I)
    with jax.enable_x64(True):
        x64 = x.astype(jnp.float64)
        parts = [jax.lax.dot_general(x64, w[r:r + rows].astype(jnp.float64), (((1,), (1,)), ((), ())))
                 .astype(out_dtype or x.dtype) for r in range(0, O, rows)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def bias(x: Array, b: Array | None) -> Array:
    return x if b is None else x + b

