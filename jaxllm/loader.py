"""Checkpoint → immutable parameter pytree. Safetensors (single or sharded) and GGUF; pickles are refused.

    checkpoint = open_checkpoint(path)      # config, tensor names/shapes/dtypes, a reader, tokenizer files
    params = build_params(checkpoint)       # every name and shape checked against the config, then read
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

from jaxllm import mxfp4
from jaxllm.config import LLMConfig
from jaxllm.errors import CheckpointError, InputError
from jaxllm.model import Layer, Model, Params
from jaxllm.model.experts import FP32_ROUTERS
from jaxllm.tokenizer import Tokenizer, read_tokenizer_files
from jaxllm.weights import (
    BLOCK_FORMATS,
    Blocks,
    Int8,
    check_format,
    quantize_int8,
    reshape_rows,
    stack,
    take_rows,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtype codes we load; bf16 -> fp32 is exact
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older HF checkpoints saved; recomputed from the config
MAX_LISTED = 50  # tensors named per kind of problem in one error


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the HF-name → pytree table: where a tensor goes and the shape HF stores. Tensors that share a
    field (q/k/v, gate/up) are each reshaped to `shape` and stacked along `axis` in table order; `where` says which
    part of the field is theirs. `select` takes rows of a fused HF tensor (Phi-3's qkv_proj, gate_up_proj);
    `permute` reorders the axes of the reshaped tensor into the field's (a layer's experts fused in one tensor)."""

    hf_name: str
    field: str  # Params field, or Layer field for per-layer entries
    hf_shape: tuple[int, ...]
    letters: str  # hf_shape in shape letters, e.g. "N·H, D"
    shape: tuple[int, ...] | None = None  # the (selected) tensor reshaped to this before stacking; None: as stored
    axis: int = 0  # the field's axis the parts are stacked along
    where: tuple[slice, ...] | None = None  # this entry's part of the field; None: the whole field
    select: tuple[int, int] | None = None  # rows [start, stop) of the HF tensor; None: all of it
    expert: int | None = None  # the expert whose part this is: parts stack along `axis` per expert, then experts on axis 0
    permute: tuple[int, ...] | None = None  # after the reshape to `shape`: its axes in the field's order

    @property
    def target(self) -> str:
        """Where it lands, for people: 'qkv_proj[:, 3:4]'."""
        if self.where is None:
            return self.field
        return f"{self.field}[{', '.join(f'{s.start}:{s.stop}' if s != slice(None) else ':' for s in self.where)}]"


def _stacked(field: str, parts: list[tuple[str, tuple[int, ...], str, tuple[int, ...], tuple[int, int] | None]],
             axis: int) -> list[Entry]:
    """Entries for HF tensors stacked into one field along `axis`; parts are (HF name, HF shape, its letters,
    the shape it is reshaped to, the rows selected from a fused tensor or None)."""
    entries, start = [], 0
    for name, hf_shape, letters, shape, select in parts:
        where = (slice(None),) * axis + (slice(start, start + shape[axis]),)
        entries.append(Entry(name, field, hf_shape, letters, shape, axis, where, select))
        start += shape[axis]
    return entries


def layer_table(c: LLMConfig, i: int, stacked_experts: bool = False) -> list[Entry]:
    """HF names of layer i and where they go. Matrices stay [out, in] as nn.Linear stores them, with `out` split so
    that the rows a device needs under tensor parallelism are one block (SHARDING below): q/k/v grouped by key/value
    head, qkv_proj [K, G + 2, H, D] (head n = j·G + g of q is qkv_proj[j, g], k and v of head j are qkv_proj[j, G]
    and [j, G + 1]); gate and up side by side for each f, gate_up_proj [F, 2, D] (a device's block of F holds both).
    `stacked_experts`: an MoE layer's experts are stored stacked (expert_table)."""
    D, F, N, K, H, G = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                        c.num_groups)
    p = f"model.layers.{i}."

    def qkv(suffix: str) -> list[Entry]:  # ".weight" [.., D] into qkv_proj, ".bias" [..] into qkv_bias
        field, cols, col_letters = ("qkv_proj", (D,), ", D") if suffix == ".weight" else ("qkv_bias", (), "")
        rows = [(p + "self_attn.q_proj", N * H, "N·H", G), (p + "self_attn.k_proj", K * H, "K·H", 1),
                (p + "self_attn.v_proj", K * H, "K·H", 1)]
        if c.model_type == "phi3":  # Phi-3 stores q, k and v fused: [(N + 2K)·H, D], in that order
            fused, starts = p + "self_attn.qkv_proj" + suffix, [0, N * H, (N + K) * H, (N + 2 * K) * H]
            return _stacked(field, [(fused, ((N + 2 * K) * H, *cols), "(N + 2K)·H" + col_letters, (K, heads, H, *cols),
                                     (starts[j], starts[j + 1])) for j, (_, _, _, heads) in enumerate(rows)], 1)
        return _stacked(field, [(name + suffix, (size, *cols), letters + col_letters, (K, heads, H, *cols), None)
                                for name, size, letters, heads in rows], 1)

    def gate_up(suffix: str) -> list[Entry]:  # ".weight" into gate_up_proj, ".bias" into gate_up_bias
        field, cols, col_letters = ("gate_up_proj", (D,), ", D") if suffix == ".weight" else ("gate_up_bias", (), "")
        if c.model_type == "phi3":  # fused [2F, D]: gate rows, then up rows
            fused = p + "mlp.gate_up_proj" + suffix
            return _stacked(field, [(fused, (2 * F, *cols), "2F" + col_letters, (F, 1, *cols), (j * F, (j + 1) * F))
                                    for j in range(2)], 1)
        return _stacked(field, [(p + f"mlp.{n}_proj" + suffix, (F, *cols), "F" + col_letters, (F, 1, *cols), None)
                                for n in ("gate", "up")], 1)

    attention = latent_table(c, i) if c.kv_lora_rank else [
        *qkv(".weight"), Entry(p + "self_attn.o_proj.weight", "o_proj", (D, N * H), "D, N·H")]
    rows = [Entry(p + "input_layernorm.weight", "input_layernorm", (D,), "D"), *attention,
            Entry(p + "post_attention_layernorm.weight", "post_attention_layernorm", (D,), "D")]
    if c.is_moe(i):
        rows += expert_table(c, i, stacked_experts)
    else:
        rows += [*gate_up(".weight"), Entry(p + "mlp.down_proj.weight", "down_proj", (D, F), "D, F")]
    if c.qk_norm_full:  # OLMoE norms the whole projection
        rows += [Entry(p + "self_attn.q_norm.weight", "q_norm", (N * H,), "N·H"),
                 Entry(p + "self_attn.k_norm.weight", "k_norm", (K * H,), "K·H")]
    elif c.qk_norm:
        rows += [Entry(p + "self_attn.q_norm.weight", "q_norm", (H,), "H"),
                 Entry(p + "self_attn.k_norm.weight", "k_norm", (H,), "H")]
    if c.gemma_norms:
        rows += [Entry(p + "pre_feedforward_layernorm.weight", "pre_feedforward_layernorm", (D,), "D"),
                 Entry(p + "post_feedforward_layernorm.weight", "post_feedforward_layernorm", (D,), "D")]
    if c.attention_bias or c.qkv_bias:
        rows += qkv(".bias")
    if c.attention_bias:
        rows.append(Entry(p + "self_attn.o_proj.bias", "o_bias", (D,), "D"))
    if c.attention_sinks:
        rows.append(Entry(p + "self_attn.sinks", "sinks", (N,), "N"))
    if c.mlp_bias:
        rows += [*gate_up(".bias"), Entry(p + "mlp.down_proj.bias", "down_bias", (D,), "D")]
    return rows


def latent_table(c: LLMConfig, i: int) -> list[Entry]:
    """HF names of layer i's latent attention (DeepSeek; model/latent.py), with C = kv_lora_rank, R = head_dim,
    P = qk_nope_head_dim, U = v_head_dim, Q = q_lora_rank. Per-head projections are split into [N, rows per head, in]
    as HF's view splits their output: q_proj / q_b_proj [N, P + R, *], kv_b_proj [N, P + U, C]."""
    D, N, C, R, P, U, Q = (c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.head_dim, c.qk_nope_head_dim,
                           c.v_head_dim, c.q_lora_rank)
    p = f"model.layers.{i}.self_attn."
    if Q:
        rows = [Entry(p + "q_a_proj.weight", "q_a_proj", (Q, D), "Q, D"),
                Entry(p + "q_a_layernorm.weight", "q_a_layernorm", (Q,), "Q"),
                Entry(p + "q_b_proj.weight", "q_b_proj", (N * (P + R), Q), "N·(P + R), Q", (N, P + R, Q))]
    else:
        rows = [Entry(p + "q_proj.weight", "q_proj", (N * (P + R), D), "N·(P + R), D", (N, P + R, D))]
    return rows + [Entry(p + "kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa", (C + R, D), "C + R, D"),
                   Entry(p + "kv_a_layernorm.weight", "kv_a_layernorm", (C,), "C"),
                   Entry(p + "kv_b_proj.weight", "kv_b_proj", (N * (P + U), C), "N·(P + U), C", (N, P + U, C)),
                   Entry(p + "o_proj.weight", "o_proj", (D, N * U), "D, N·U")]


# Where each family keeps an MoE layer's router, experts and shared expert: (module, router, expert's gate, up and
# down, shared expert or None). The experts are stored one by one as experts.{e}.<name>.weight, or stacked (GGUF) as
# experts.<name>.weight with the experts first.
MOE_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2"), None),
    "qwen2_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), None),
    "olmoe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), None),
    "deepseek_v2": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "deepseek_v3": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
}


def _gpt_oss_experts(p: str, D: int, E: int, F: int) -> list[Entry]:
    """gpt-oss's router (weight and bias) and its experts, each kind fused in one [in, out] tensor (GptOssExperts
    computes x @ gate_up_proj[e]): gate_up_proj [E, D, 2F] with gate and up interleaved (column 2f is gate f,
    2f + 1 up f), so its transpose is experts_gate_up; down_proj [E, F, D] transposes to experts_down."""
    x = p + "mlp.experts."
    return [Entry(p + "mlp.router.weight", "router", (E, D), "E, D"),
            Entry(p + "mlp.router.bias", "router_bias", (E,), "E"),
            Entry(x + "gate_up_proj", "experts_gate_up", (E, D, 2 * F), "E, D, 2F", (E, D, F, 2), permute=(0, 2, 3, 1)),
            Entry(x + "gate_up_proj_bias", "experts_gate_up_bias", (E, 2 * F), "E, 2F", (E, F, 2)),
            Entry(x + "down_proj", "experts_down", (E, F, D), "E, F, D", permute=(0, 2, 1)),
            Entry(x + "down_proj_bias", "experts_down_bias", (E, D), "E, D")]


def _granite_experts(p: str, D: int, E: int, F: int) -> list[Entry]:
    """Granite's router and experts as its checkpoints name them (Transformers 5 renames them on load):
    input_linear [E, 2F, D] holds each expert's gate rows then its up rows (HF's .chunk(2)), output_linear [E, D, F]
    is experts_down as it is."""
    p += "block_sparse_moe."
    return [Entry(p + "router.layer.weight", "router", (E, D), "E, D"),
            Entry(p + "input_linear.weight", "experts_gate_up", (E, 2 * F, D), "E, 2F, D", (E, 2, F, D),
                  permute=(0, 2, 1, 3)),
            Entry(p + "output_linear.weight", "experts_down", (E, D, F), "E, D, F")]


# Families that keep each kind of a layer's expert weights fused in one tensor: layer prefix, D, E, F -> entries.
FUSED_EXPERTS: dict[str, Callable[[str, int, int, int], list[Entry]]] = {
    "gpt_oss": _gpt_oss_experts, "granitemoe": _granite_experts,
}


def expert_table(c: LLMConfig, i: int, stacked: bool = False) -> list[Entry]:
    """HF names of MoE layer i: the router [E, D], each expert's gate and up [F, D] stacked into experts_gate_up
    [E, F, 2, D] (expert e's gate rows at [e, :, 0], up rows at [e, :, 1]) and its down [D, F] into experts_down
    [E, D, F]; the shared expert (if any) into gate_up_proj / down_proj like a dense MLP, and its gate [1, D].
    `stacked`: each projection's experts are one tensor, [E, F, D] for gate and up, [E, D, F] for down."""
    D, E, F = c.hidden_size, c.num_experts, c.moe_intermediate_size
    if c.model_type in FUSED_EXPERTS:
        return FUSED_EXPERTS[c.model_type](f"model.layers.{i}.", D, E, F)
    module, router, (gate, up, down), shared = MOE_NAMES[c.model_type]
    p = f"model.layers.{i}.{module}."
    rows = [Entry(p + f"{router}.weight", "router", (E, D), "E, D")]
    if stacked:
        rows += _stacked("experts_gate_up", [(f"{p}experts.{name}.weight", (E, F, D), "E, F, D", (E, F, 1, D), None)
                                             for name in (gate, up)], 2)
        rows.append(Entry(f"{p}experts.{down}.weight", "experts_down", (E, D, F), "E, D, F"))
    for e in range(0 if stacked else E):
        x = f"{p}experts.{e}."
        rows += [Entry(x + f"{name}.weight", "experts_gate_up", (F, D), "F, D", (1, F, 1, D), 2,
                       (slice(e, e + 1), slice(None), slice(j, j + 1)), expert=e) for j, name in enumerate((gate, up))]
        rows.append(Entry(x + f"{down}.weight", "experts_down", (D, F), "D, F", (1, D, F), 0, (slice(e, e + 1),)))
    if shared is not None:
        Fs = c.shared_expert_intermediate_size
        rows += _stacked("gate_up_proj", [(p + f"{shared}.{n}_proj.weight", (Fs, D), "F, D", (Fs, 1, D), None)
                                          for n in ("gate", "up")], 1)
        rows.append(Entry(p + f"{shared}.down_proj.weight", "down_proj", (D, Fs), "D, F"))
    if c.shared_expert_gated:
        rows.append(Entry(p + "shared_expert_gate.weight", "shared_expert_gate", (1, D), "1, D"))
    if c.router == "deepseek_v3":  # a buffer beside the router weight, added to the scores for choosing
        rows.append(Entry(p + f"{router}.e_score_correction_bias", "router_correction_bias", (E,), "E"))
    return rows


def model_table(c: LLMConfig) -> list[Entry]:
    """HF names outside the layers. A tied model has no lm_head: logits use embed_tokens transposed."""
    rows = [
        Entry("model.embed_tokens.weight", "embed_tokens", (c.vocab_size, c.hidden_size), "V, D"),
        Entry("model.norm.weight", "norm", (c.hidden_size,), "D"),
    ]
    if not c.tie_word_embeddings:
        rows.append(Entry("lm_head.weight", "lm_head", (c.vocab_size, c.hidden_size), "V, D"))
    return rows


# ---- placement on a device mesh ------------------------------------------------------------------------------

# How every parameter lies on a mesh of axes ("dp", "tp"): tensor parallelism over whole query and key/value heads
# (qkv_proj's K axis; o_proj's N·H columns, which run head by head in the same order), over the MLP's F, and over
# the vocabulary; every other field (norms, o/down biases) is replicated. Data parallelism splits the batch (inputs
# and KV cache, generate.py); parameters are the same on every dp row.
SHARDING = {
    "embed_tokens": P("tp", None), "lm_head": P("tp", None),  # [V, D]
    "qkv_proj": P("tp", None, None, None), "qkv_bias": P("tp", None, None),  # [K, G + 2, H, D], [K, G + 2, H]
    "o_proj": P(None, "tp"),  # [D, N·H]
    "gate_up_proj": P("tp", None, None), "gate_up_bias": P("tp", None),  # [F, 2, D], [F, 2]
    "down_proj": P(None, "tp"),  # [D, F]
    # Experts split whole over tp, E / tp a device (model.experts.sharded_experts); the router is replicated.
    "experts_gate_up": P("tp", None, None, None), "experts_down": P("tp", None, None),  # [E, F, 2, D], [E, D, F]
    "experts_gate_up_bias": P("tp", None, None), "experts_down_bias": P("tp", None),  # [E, F, 2], [E, D]
}


def make_mesh(dp: int | None = None, tp: int | None = None) -> Mesh:
    """A Mesh of dp x tp devices, axes ("dp", "tp"): all devices by default (every process's, when running under
    jax.distributed), dp taking what tp leaves; a smaller mesh uses the first dp x tp devices."""
    devices = jax.devices()
    for name, value in (("dp", dp), ("tp", tp)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"mesh {name} must be a positive integer, found {value!r}")
    tp = tp or (max(len(devices) // dp, 1) if dp else 1)
    dp = dp or max(len(devices) // tp, 1)
    if dp * tp > len(devices) or dp * tp == 0:
        raise InputError(f"a mesh of dp={dp} x tp={tp} = {dp * tp} devices needs more than the {len(devices)} "
                         f"available ({devices[0].platform})")
    return Mesh(np.array(devices[:dp * tp]).reshape(dp, tp), ("dp", "tp"))


def distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join this process to the others (one per host, or several on one machine) so that jax.devices() lists
    every process's devices and make_mesh spans them all; each process then runs the same code. On CPU the
    processes exchange data through gloo. Call it before anything else touches JAX's devices."""
    if not 0 <= process_id < num_processes:
        raise InputError(f"process id {process_id} must be between 0 and num_processes - 1 ({num_processes - 1})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used by CPU devices only
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def check_mesh(config: LLMConfig, mesh: Mesh) -> None:
    """InputError unless tensor parallelism splits whole heads: tp must divide the query and the key/value heads.
    (Key/value heads are not replicated to reach a larger tp: a model with 3 of them, like SmolLM2, runs on tp 1 or
    3 and spends further devices on dp, which its size makes the useful split anyway.)"""
    tp, N, K = mesh.shape["tp"], config.num_attention_heads, config.num_key_value_heads
    if N % tp or K % tp:
        valid = [t for t in range(1, K + 1) if K % t == 0 and N % t == 0]
        raise InputError(f"tp={tp} must divide num_attention_heads ({N}) and num_key_value_heads ({K}): each device "
                         f"holds whole heads; tp can be {', '.join(map(str, valid))}")


def sharding(mesh: Mesh, field: str, shape: tuple[int, ...], spec: P | None = None) -> NamedSharding:
    """Where a parameter field of this shape goes on the mesh (`spec`: instead of the field's rule). An axis that tp
    does not divide (a vocabulary of 32000 on tp=3, F on an odd tp) is replicated instead."""
    spec = SHARDING.get(field, P()) if spec is None else spec
    if any(axis == "tp" and size % mesh.shape["tp"] for axis, size in zip(spec, shape)):
        spec = P()
    return NamedSharding(mesh, spec)


def _place(value, dtype, field: str, mesh: Mesh | None):
    """A host array (or a quantized matrix's arrays) onto the device, or straight onto its shards: each device
    receives only its own slice. A quantized matrix's parts follow the field's rule: values and scales split along
    the rows as the matrix is, Blocks' block axis as its `in` axis, Int8's in_scale as its `in` axis."""
    if isinstance(value, Int8 | Blocks):
        rows = value.scale.ndim - (1 if isinstance(value, Blocks) else 0)  # the row axes [*out]
        spec = tuple(SHARDING.get(field, P())) + (None,) * (rows + 1)
        specs = {"in_scale": P(spec[rows])} if isinstance(value, Int8) else {}
        return jax.tree_util.tree_map_with_path(lambda path, a: _place_array(
            a, a.dtype, field, mesh, specs.get(path[0].name, P(*spec[:min(a.ndim, rows + 1)]))), value)
    return _place_array(value, dtype, field, mesh)


def _place_array(array: np.ndarray, dtype, field: str, mesh: Mesh | None, spec: P | None = None) -> jax.Array:
    if mesh is None:
        return jnp.asarray(array, dtype=dtype)
    dtype = jnp.dtype(dtype)
    return jax.make_array_from_callback(array.shape, sharding(mesh, field, array.shape, spec),
                                        lambda index: np.asarray(array[index], dtype=dtype))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint, either format: what loading, `jaxllm inspect` and the bench read. Nothing is read
    beyond headers and metadata until `read` or `tokenizer_files` is called."""

    path: Path  # the directory or the .gguf file
    config: LLMConfig
    tensors: dict[str, tuple[tuple[int, ...], str]]  # HF name -> (HF shape, stored dtype), in file order
    read: Callable[[str], Any] = dataclasses.field(repr=False)  # HF name -> array in HF orientation
    tokenizer_files: Callable[[], dict[str, dict]] = dataclasses.field(repr=False)  # parsed, as tokenizer.py names them
    # GGUF: HF name -> the matrix in its stored block format (weights.Blocks, numpy), for tensors stored in one of
    # weights.BLOCK_FORMATS; None for other checkpoints.
    read_blocks: Callable[[str], Blocks] | None = dataclasses.field(repr=False, default=None)
    stacked_experts: bool = False  # GGUF: each MoE projection's experts in one tensor (loader.expert_table)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, (shape, _) in self.tensors.items()}


MATRICES = ("embed_tokens", "lm_head", "qkv_proj", "o_proj", "gate_up_proj", "down_proj", "experts_gate_up",
            "experts_down")  # quantized by "int8"/"gguf"


def build_params(checkpoint: Checkpoint, weights: str = "fp32", mesh: Mesh | None = None) -> Params:
    """Check every tensor's name and shape against the config (all problems in one error), then read them one by one,
    each onto the device or, with a mesh, onto its shards (SHARDING), in the weight format `weights` (weights.py):
    "fp32", "bf16", "int8" (every matrix quantized as it is read) or "gguf" (a GGUF's block-quantized matrices kept
    as stored; a stacked field whose parts are stored in different formats, or a format not in BLOCK_FORMATS, is
    read as fp32)."""
    config, shapes = checkpoint.config, checkpoint.shapes
    check_format(weights)
    if weights == "gguf" and checkpoint.read_blocks is None:
        raise InputError(f"{checkpoint.path}: weights='gguf' keeps a GGUF file's quantized blocks; this checkpoint is "
                         f"not a .gguf file (use 'int8' to quantize it, or load the .gguf)")
    dtype = jnp.bfloat16 if weights == "bf16" else jnp.float32
    if mesh is not None:
        check_mesh(config, mesh)
    stored_layers = {int(parts[2]) for parts in (n.split(".") for n in shapes)
                     if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit()}
    if sum(i < config.num_hidden_layers for i in stored_layers) < config.num_hidden_layers:  # whole layers absent
        raise CheckpointError(f"{checkpoint.path}: the config has {config.num_hidden_layers} layers, the checkpoint "
                              f"holds tensors of {len(stored_layers)} (numbered {_ranges(stored_layers)})")
    tables = [layer_table(config, i, checkpoint.stacked_experts) for i in range(config.num_hidden_layers)]
    expected = {e.hf_name: e for e in model_table(config)} | {e.hf_name: e for t in tables for e in t}
    missing = [f"{n} (expected {list(e.hf_shape)})" for n, e in expected.items() if n not in shapes]
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()  # tied: a stored copy is ignored, as in HF
    # DeepSeek-V3's multi-token-prediction layers follow the last one; Transformers ignores them, and so do we.
    mtp = tuple(f"model.layers.{config.num_hidden_layers + j}." for j in range(config.num_nextn_predict_layers))
    unexpected = [f"{n} {list(s)}" for n, s in shapes.items() if n not in expected and n not in tolerated
                  and not n.endswith(IGNORED_SUFFIXES) and not n.startswith(mtp)]
    misshaped = [f"{n}: expected {list(e.hf_shape)}, found {list(shapes[n])}"
                 for n, e in expected.items() if n in shapes and tuple(shapes[n]) != e.hf_shape]
    if missing or unexpected or misshaped:
        parts = [f"{label}:\n  " + "\n  ".join(items[:MAX_LISTED] + [f"... and {len(items) - MAX_LISTED} more"] * (len(items) > MAX_LISTED))
                 for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                      ("mis-shaped tensors", misshaped)) if items]
        raise CheckpointError(f"{checkpoint.path}: checkpoint does not match its config\n" + "\n".join(parts))

    read_floats = functools.lru_cache(maxsize=1)(  # a fused tensor once
        lambda name: finite(np.asarray(checkpoint.read(name)), name, checkpoint.path))
    read_blocks = functools.lru_cache(maxsize=1)(
        lambda name: finite(checkpoint.read_blocks(name), name, checkpoint.path)) if weights == "gguf" else None

    # DeepSeek's routers run in fp32 on fp32 weights (HF's _keep_in_fp32_modules_strict), whatever `weights` says.
    fp32_fields = ("router", "router_correction_bias") if config.router in FP32_ROUTERS else ()

    def fields(table: list[Entry], wide: bool = False) -> dict[str, Any]:
        """The fields of this table's tensors, placed; `wide`: in fp32 whatever `weights` says."""
        by_field: dict[str, list[Entry]] = {}
        for e in table:  # stacked tensors arrive in table order, i.e. in the order of their parts
            by_field.setdefault(e.field, []).append(e)
        out = {}
        for field, entries in by_field.items():
            stored = {checkpoint.tensors[e.hf_name][1] for e in entries}
            blocks = (read_blocks is not None and not wide and field in MATRICES and len(stored) == 1
                      and stored <= set(BLOCK_FORMATS) and all(e.permute is None for e in entries))
            parts = []
            for e in entries:
                tensor = read_blocks(e.hf_name) if blocks else read_floats(e.hf_name)
                tensor = tensor if e.select is None else take_rows(tensor, *e.select)
                parts.append(tensor if e.shape is None else reshape_rows(tensor, e.shape[:-1]) if blocks
                             else tensor.reshape(e.shape))
                if e.permute is not None:
                    parts[-1] = np.ascontiguousarray(parts[-1].transpose(e.permute))
            if entries[0].expert is not None:  # each expert's parts along `axis`, then the experts along axis 0
                experts: dict[int, list] = {}
                for e, part in zip(entries, parts):
                    experts.setdefault(e.expert, []).append(part)
                parts = [group[0] if len(group) == 1 else stack(group, entries[0].axis) for group in experts.values()]
                entries = [dataclasses.replace(entries[0], axis=0)]
            # Stacked and converted on the host: no XLA program to compile (or look up) per tensor shape.
            value = parts[0] if len(parts) == 1 else stack(parts, entries[0].axis)
            if weights == "int8" and field in MATRICES and not wide:
                value = quantize_int8(value)
            out[field] = _place(value, jnp.float32 if field in fp32_fields else dtype, field, mesh)
        return out

    top = fields(model_table(config))
    params = Params(layers=(), lm_head=top.pop("lm_head", None), config=config, **top)
    calibration = Calibration(params, mesh) if weights == "int8" else None
    layers = []
    for i, table in enumerate(tables):
        layer = Layer(**fields(table))
        read_floats.cache_clear()  # the last tensor read is not kept through the calibration
        if calibration is not None and (wide := calibration.layer(i, layer)):  # outlier inputs: read again in fp32
            layer = layer.replace(**fields([e for e in table if e.field in wide], wide=True))
        layers.append(layer)
    params = params.replace(layers=tuple(layers))
    if calibration is not None and calibration.head():
        head = "lm_head" if params.lm_head is not None else "embed_tokens"
        params = params.replace(**fields([e for e in model_table(config) if e.field == head], wide=True))
    return params


def finite(tensor, name: str, path: Path):
    """`tensor` as read (an array, or Blocks: their float fields are the scales, the quants are integers), unless it
    holds a NaN or an infinity: then a CheckpointError naming the tensor and the first one's index. One such weight
    makes every logit NaN, and greedy generation emits token 0 over and over. One pass over each host array as it is
    read: about 50 ms for the default model's 134.5 M fp32 values, 9 ms for the scales of its GGUF blocks."""
    for key, array in jax.tree_util.tree_flatten_with_path(tensor)[0]:
        if np.issubdtype(array.dtype, np.floating) and not _all_finite(array):
            bad = np.argwhere(~np.isfinite(array))  # [n, ndim]
            where = f"{jax.tree_util.keystr(key)}[{', '.join(map(str, bad[0]))}]"
            raise CheckpointError(f"{path}: tensor {name} holds {len(bad)} non-finite value(s): "
                                  f"{array[tuple(bad[0])]} at {where}")
    return tensor


def _all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity in a float array. float16 (GGUF's block scales) by its bits, exponent below all ones:
    numpy's isfinite on float16 runs 8x slower than this."""
    if array.dtype == np.float16:
        return array.size == 0 or int((array.view(np.uint16) & 0x7FFF).max()) < 0x7C00
    return bool(np.isfinite(array).all())


class Calibration:
    """Which matrices of an int8 model stay fp32: those whose input activations have outliers, max |x| above
    weights.OUTLIER_RATIO times mean |x| over weights.CALIBRATION_TOKENS pseudo-random tokens (a fixed seed), run
    through the int8 model. LLMs concentrate huge activations in a few channels (often of some layers' down_proj
    input, from the first token on); a per-row int8 scale cannot serve both those and the rest, so these matrices stay
    fp32. On the default model that is 6 of 121 matrices, and they carried most of the KL.

    The tokens go through the model a layer at a time as the layers are loaded (`layer`, then `head`), so that the
    calibration's memory is not added to the whole model's. Without a mesh each layer runs with its int8 matrices
    dequantized on the host (weights.dequantize_int8): in the program, XLA:CPU writes each as an f32 temporary whose
    freed memory stays with the worker thread that ran it (30 MB on the default model)."""

    def __init__(self, params: Params, mesh: Mesh | None):
        from jaxllm.model import ACTIVATIONS, Context, attention_masks, decoder_block, embed, norm, rope_tables
        from jaxllm.weights import CALIBRATION_TOKENS, dequantize_int8

        config = self.config = params.config
        ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, CALIBRATION_TOKENS)).astype(np.int32)
        positions, real = np.arange(CALIBRATION_TOKENS, dtype=np.int32)[None], np.ones(ids.shape, bool)
        mlp_input = "pre_feedforward_layernorm" if config.gemma_norms else "post_attention_layernorm"

        # One decoder block at a time, each compiled once per (layer kind, RoPE): a whole-model program with every
        # intermediate as an output took 750 MB to compile, five times the int8 parameters. With the block, the
        # ratio of the output matrix's input were this the last layer: no second program for it.
        @functools.partial(jax.jit, static_argnums=(3, 4))
        def block(layer, x, final_norm, kind, rope):  # -> the block's output [1, T, D], each matrix's input's ratio
            taps = {}
            cos, sin = rope_tables(config, positions, rope) if rope is not None else (None, None)
            x, _ = decoder_block(layer, x, None, Context(config, cos, sin, *attention_masks(config, kind, real, None),
                                                         index=None, tap=taps.__setitem__))
            inputs = {"qkv_proj": taps["input_layernorm"], "o_proj": taps["attn"], "head": norm(x, final_norm, config)}
            if "gate_proj" in taps:  # a dense MLP (an experts layer's matrices stay int8: no per-expert calibration)
                inputs |= {"gate_up_proj": taps[mlp_input],
                           "down_proj": ACTIVATIONS[config.hidden_act](taps["gate_proj"]) * taps["up_proj"]}
            return x, {field: _outlier_ratio(a) for field, a in inputs.items()}

        self.block, self.final_norm, self.host = block, params.norm, mesh is None
        if self.host:  # the tokens' rows of embed_tokens, as model.embed gives them: [1, T, D]
            table = params.embed_tokens
            rows = table.replace(values=np.asarray(table.values)[ids], scale=np.asarray(table.scale)[ids])
            self.x = dequantize_int8(rows)
            self.x *= np.float32(config.embed_scale)
        else:  # on a mesh the parameters' shards need not all be in this process
            self.x = jax.jit(embed)(params, ids)

    def layer(self, i: int, layer: Layer) -> list[str]:
        """Layer i's matrices (fields) whose inputs have outliers; the tokens move on through the layer."""
        from jaxllm.weights import OUTLIER_RATIO, dequantize_int8

        _release_freed_memory()  # what reading and quantizing the layer freed, before the calibration adds to it
        if self.host:
            layer = jax.tree_util.tree_map(lambda w: dequantize_int8(w) if isinstance(w, Int8) else w, layer,
                                           is_leaf=lambda w: isinstance(w, Int8))
        kind, rope = self.config.layer_type(i), self.config.layer_rope(i)
        self.x, ratios = self.block(layer, self.x, self.final_norm, kind, rope)
        self.head_ratio = ratios.pop("head")
        return [field for field, ratio in ratios.items() if float(ratio) > OUTLIER_RATIO]

    def head(self) -> bool:
        """Whether the output matrix's input (the last layer's output, normed) has outliers; after the last `layer`."""
        from jaxllm.weights import OUTLIER_RATIO

        return float(self.head_ratio) > OUTLIER_RATIO


def _outlier_ratio(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x)) / jnp.maximum(jnp.mean(jnp.abs(x)), 1e-30)


def _release_freed_memory() -> None:
    """Give the heap's freed memory back to the system (glibc's malloc_trim; nothing elsewhere). glibc keeps what a
    compile freed: 40 MB for the calibration's block."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _ranges(numbers: set[int]) -> str:
    """{0, 1, 2, 5} -> '0-2, 5'."""
    runs, out = sorted(numbers), []
    for n in runs:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in out) or "none"


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those its sharded index names (each a regular file inside
    the directory), or every *.safetensors file. A directory whose weights are only pickles is refused."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = set(weight_map.values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        outside = sorted(str(n) for n in names if not isinstance(n, str) or not _inside(n))
        if outside:
            raise CheckpointError(f"{index}: shard path(s) outside the model folder: {', '.join(outside)}")
        files = sorted(directory / n for n in names)
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index}: shard file(s) listed but not found: {', '.join(absent)}")
    else:
        files = sorted(directory.glob("*.safetensors"))
    irregular = [f.name for f in files if not f.is_file()]  # a FIFO or a device would hang or never end
    if irregular:
        raise CheckpointError(f"{directory}: not regular files: {', '.join(irregular)}")
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_refusal(directory / pickles[0])
    raise CheckpointError(f"{directory}: no model.safetensors, sharded index or .gguf file found")


def _inside(relative: str) -> bool:
    """A path written in an index stays inside its folder: relative, and no '..' that climbs out."""
    path = os.path.normpath(relative)
    return not os.path.isabs(relative) and path != ".." and not path.startswith(".." + os.sep) and path != "."


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: refusing to load a pickle checkpoint: unpickling can execute arbitrary code. "
        "Convert it to safetensors first (for example with Transformers: save_pretrained(..., safe_serialization=True))."
    )


SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "U8": "u1"}  # U8: MXFP4's blocks and scales


def _data_offsets(file: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (start, stop, where the data begins) from a safetensors header (already validated by safe_open)."""
    with _named_errors(file), open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {name: (*entry["data_offsets"], 8 + size) for name, entry in header.items() if name != "__metadata__"}


def _open_safetensors(directory: Path) -> Checkpoint:
    config = LLMConfig.from_json(directory / "config.json")
    quantization = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    mxfp4_packed = isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4"
    tensors, stored_in = {}, {}  # stored_in: name -> files
    for f in safetensors_files(directory):
        with _named_errors(f):
            h = safe_open(f, framework="numpy")
            for name in h.keys():
                sl = h.get_slice(name)
                packed = mxfp4_packed and sl.get_dtype() == "U8" and name.endswith(mxfp4.SUFFIXES)
                if sl.get_dtype() not in FLOAT_DTYPES and not packed:
                    raise CheckpointError(f"{f}: tensor {name} has dtype {sl.get_dtype()}; expected one of {FLOAT_DTYPES}")
                stored_in.setdefault(name, []).append(f)
                tensors[name] = (tuple(sl.get_shape()), sl.get_dtype())
    repeated = {name: files for name, files in stored_in.items() if len(files) > 1}
    if repeated:
        raise CheckpointError(f"{directory}: tensor(s) stored in more than one file: " +
                              "; ".join(f"{name} in {', '.join(f.name for f in files)}" for name, files in repeated.items()))
    # Each MXFP4 pair X_blocks [..., out, G, 16] and X_scales [..., out, G] is listed as the fp32 tensor X that
    # Transformers' model holds, [..., in, out] with in = G·32, and read dequantized (jaxllm/mxfp4.py).
    packed = {name.removesuffix("_blocks") for name, (_, dtype) in tensors.items()
              if dtype == "U8" and name.endswith("_blocks") and name.removesuffix("_blocks") + "_scales" in tensors}
    listed = {name: entry for name, entry in tensors.items()
              if name.removesuffix("_blocks").removesuffix("_scales") not in packed}
    for name in sorted(packed):
        *rows, out, G, nbytes = tensors[name + "_blocks"][0]
        listed[name] = ((*rows, G * nbytes * 2, out), "MXFP4")

    offsets: dict[Path, dict] = {}

    def read(name: str) -> np.ndarray:
        """The tensor as numpy (BF16 widened to float32, exactly), read with plain file reads: a memory map would
        keep every page it touched resident until the file is closed, adding the whole file to a load's peak."""
        if name in packed:
            return mxfp4.dequantize(read(name + "_blocks"), read(name + "_scales")).swapaxes(-1, -2)
        file = stored_in[name][0]
        if file not in offsets:
            offsets[file] = _data_offsets(file)
        start, stop, data = offsets[file][name]
        shape, dtype = tensors[name]
        stored = np.dtype("<u2") if dtype == "BF16" else np.dtype(SAFETENSORS_DTYPES[dtype])
        with _named_errors(file), open(file, "rb") as f:
            f.seek(data + start)
            array = np.fromfile(f, stored, (stop - start) // stored.itemsize)
        if array.size != math.prod(shape):
            raise CheckpointError(f"{file}: tensor {name} holds {array.size} values, its shape {list(shape)} needs "
                                  f"{math.prod(shape)} (the file is truncated or damaged)")
        if dtype == "BF16":  # numpy has no bfloat16: its 16 bits are the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.reshape(shape)

    return Checkpoint(directory, config, listed, read=read, tokenizer_files=lambda: read_tokenizer_files(directory))


@contextlib.contextmanager
def _named_errors(file: Path):
    """The safetensors library's errors (SafetensorError, OSError, ...) on a damaged file, as a CheckpointError
    that names the file."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(error).__name__}: {error})") from error


def _open_gguf(path: Path) -> Checkpoint:
    """A .gguf file, read once: dequantized to fp32 and re-oriented to HF's layout tensor by tensor (jaxllm.gguf_reader)."""
    from jaxllm.gguf_reader import read_gguf

    gguf = read_gguf(path)
    config = LLMConfig.from_dict(gguf.config, source=str(path))
    tensors = {name: (shape, gguf.stored_type(name)) for name, shape in gguf.shapes.items()}
    return Checkpoint(path, config, tensors, read=gguf.read,
                      tokenizer_files=lambda: {"config.json": gguf.config, **gguf.tokenizer_files()},
                      read_blocks=gguf.read_blocks, stacked_experts=gguf.stacked_experts)


def open_checkpoint(model: str | Path | None = None, gguf: bool = False) -> Checkpoint:
    """Open a checkpoint: a directory with config.json and safetensors, a .gguf file, the name of the default model
    ("smollm2-135m", also when None), or a Hub repo id (needs network access). `gguf`: the default model as its GGUF
    file rather than the folder converted from it."""
    path = resolve(model, gguf)
    return _open_gguf(path) if path.suffix == ".gguf" else _open_safetensors(path)


def load(model: str | Path | None = None, weights: str = "fp32", mesh: Mesh | None = None) -> Params:
    """Load a checkpoint into a Params pytree; `model` as for open_checkpoint, `weights` one of "fp32" (the default),
    "bf16", "int8" or "gguf" (a .gguf's quantized blocks kept as stored; the default model's GGUF for the default
    model), see weights.py. With a `mesh` (make_mesh), every tensor is placed straight onto its shards while it is
    read."""
    return build_params(open_checkpoint(model, weights == "gguf"), weights, mesh)


def load_model(model: str | Path | None = None, weights: str = "fp32", mesh: Mesh | None = None) -> Model:
    """Parameters and tokenizer together, for generation from text (same arguments as `load`)."""
    checkpoint = open_checkpoint(model, weights == "gguf")
    tokenizer = Tokenizer.from_files(checkpoint.tokenizer_files(), checkpoint.path)
    return Model(build_params(checkpoint, weights, mesh), tokenizer)


def resolve(model: str | Path | None, gguf: bool = False) -> Path:
    """A local path for `model`; refuses pickles before anything is read. `gguf`: the default model as its GGUF."""
    path = Path(model) if model is not None else None
    if path is not None and path.suffix in PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    if path is not None and path.is_file() and path.suffix == ".safetensors":
        return path.parent
    from jaxllm.hub import default_gguf, is_default_model, resolve_model

    if gguf and is_default_model(model):
        return default_gguf()
    return Path(resolve_model(None if model is None else str(model)))
