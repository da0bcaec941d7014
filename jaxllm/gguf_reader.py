"""Reading a llama.cpp GGUF file as an HF checkpoint: its family, config keys and tensor names, each tensor
dequantized (or kept in its blocks) in HF's layout, and the tokenizer rebuilt from metadata.

GGUF stores the same weights as an HF checkpoint, but under llama.cpp's names, transposed shape notation,
quantized, with llama's Q/K rows permuted for llama.cpp's interleaved RoPE, Gemma's norm weights stored as 1 + w,
and with the tokenizer as metadata. Each of those is undone here, as Transformers' own GGUF loader undoes it
(transformers/modeling_gguf_pytorch_utils.py), so the result loads exactly like a checkpoint converted from
Transformers. Architectures: llama (and Mistral and Mixtral, written as llama), qwen2, qwen3, phi3, gemma2, gemma3
(text), and the mixtures of experts qwen2moe, qwen3moe, olmoe and deepseek2 (DeepSeek-V2 and V3), whose experts
GGUF stores stacked, one tensor per projection (read as such: loader.expert_table's stacked form).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import jax
import numpy as np
from gguf.quants import quant_shape_to_byte_shape
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from jaxllm.errors import CheckpointError, ConfigError, TokenizerError
from jaxllm.tokenizer import named_errors
from jaxllm.weights import Blocks, blocks_from_gguf, reshape_rows

# GGUF tensor name (without .weight/.bias) -> HF parameter name: the one table, shared by every family (each
# family adds or renames a few entries in its Family.names below).
HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}

# What other families add to HF_NAMES or name differently (gguf-py's tensor_mapping.py, which Transformers reads).
QK_NORM_NAMES = {
    "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
    "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
}
GEMMA_NORM_NAMES = {  # four norms a layer; llama.cpp's ffn_norm is the one before the MLP
    "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
    "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
}
PHI3_NAMES = {  # fused as in HF: qkv_proj [(N+2K)*H, D] is Q, K, V stacked; gate_up_proj [2F, D] is gate, up
    "blk.{i}.attn_qkv": "model.layers.{i}.self_attn.qkv_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.gate_up_proj",
}


def expert_names(module: str, gate: str, up: str, down: str) -> dict:
    """An MoE layer's router [E, D] and its experts, which GGUF stores stacked, one tensor per projection with the
    experts first ([E, F, D], [E, F, D], [E, D, F]). Each is named as HF names one expert's tensor, less the expert
    number (loader.expert_table's stacked form)."""
    return {"blk.{i}.ffn_gate_inp": f"model.layers.{{i}}.{module}.gate",
            "blk.{i}.ffn_gate_exps": f"model.layers.{{i}}.{module}.experts.{gate}",
            "blk.{i}.ffn_up_exps": f"model.layers.{{i}}.{module}.experts.{up}",
            "blk.{i}.ffn_down_exps": f"model.layers.{{i}}.{module}.experts.{down}"}


MOE_NAMES = expert_names("mlp", "gate_proj", "up_proj", "down_proj")  # Qwen2/3-MoE, OLMoE, DeepSeek
MIXTRAL_NAMES = expert_names("block_sparse_moe", "w1", "w3", "w2")
SHARED_EXPERT_NAMES = {  # Qwen2-MoE's one shared expert, and the gate [1, D] of its output (stored squeezed: [D])
    "blk.{i}.ffn_gate_shexp": "model.layers.{i}.mlp.shared_expert.gate_proj",
    "blk.{i}.ffn_up_shexp": "model.layers.{i}.mlp.shared_expert.up_proj",
    "blk.{i}.ffn_down_shexp": "model.layers.{i}.mlp.shared_expert.down_proj",
    "blk.{i}.ffn_gate_inp_shexp": "model.layers.{i}.mlp.shared_expert_gate",
}
LATENT_NAMES = {  # DeepSeek: multi-head latent attention, shared experts, V3's router correction bias
    "blk.{i}.attn_q_a": "model.layers.{i}.self_attn.q_a_proj",
    "blk.{i}.attn_q_a_norm": "model.layers.{i}.self_attn.q_a_layernorm",
    "blk.{i}.attn_q_b": "model.layers.{i}.self_attn.q_b_proj",
    "blk.{i}.attn_kv_a_mqa": "model.layers.{i}.self_attn.kv_a_proj_with_mqa",
    "blk.{i}.attn_kv_a_norm": "model.layers.{i}.self_attn.kv_a_layernorm",
    "blk.{i}.attn_kv_b": "model.layers.{i}.self_attn.kv_b_proj",
    # Newer converters split kv_b_proj per head into k_b [N, C, P] (transposed) and v_b [N, U, C]; read_gguf joins them.
    "blk.{i}.attn_k_b": "model.layers.{i}.self_attn.k_b_proj",
    "blk.{i}.attn_v_b": "model.layers.{i}.self_attn.v_b_proj",
    "blk.{i}.ffn_gate_shexp": "model.layers.{i}.mlp.shared_experts.gate_proj",
    "blk.{i}.ffn_up_shexp": "model.layers.{i}.mlp.shared_experts.up_proj",
    "blk.{i}.ffn_down_shexp": "model.layers.{i}.mlp.shared_experts.down_proj",
    "blk.{i}.exp_probs_b": "model.layers.{i}.mlp.gate.e_score_correction",  # .bias: see hf_name
}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # SmolLM2's own tokenizer.json: every digit on its own, then GPT-2's split. llama.cpp writes this as
    # pre="smollm" (regexes "\p{N}" then the GPT-2 one); it is not GPT-2's split alone, which would glue
    # the last space of a whitespace run to the digit after it.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


# tokenizer.ggml.pre -> the pre-tokenizer of the tokenizer.json that llama.cpp's converter fingerprinted.
PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    **dict.fromkeys(["smollm", "starcoder", "refact", "codeshell"], _digits_then_gpt2),
    **dict.fromkeys(["llama-bpe", "llama3", "smaug-bpe", "dbrx"], lambda: _split_then_bytes(_LLAMA3_SPLIT)),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}


def _silu(meta, config: dict) -> dict:
    return {"hidden_act": "silu"}


def _mistral(meta, config: dict) -> dict:
    # GGUF has no window for llama files; Transformers keeps MistralConfig's default (llama.cpp attends to all).
    return {"hidden_act": "silu", "sliding_window": 4096}


def _phi3(meta, config: dict) -> dict:
    # llama.cpp turns Phi-3's sliding window off, and Transformers' loader does not read it: full attention.
    return {"hidden_act": "silu", "sliding_window": None}


def _gemma(meta, config: dict, every: int, layers_27b: int) -> dict:
    """Gemma 2 and 3: every `every`-th layer attends globally, the others within sliding_window (llama.cpp's
    set_swa_pattern, Transformers' layer_types). Queries are scaled by 1/sqrt(head_dim), or by 1/sqrt(D/N) in the
    27B model (llama.cpp's f_attention_scale, which picks the 27B by its layer count); Transformers' loader reads
    neither and keeps its config class's default of 256, the same value except in the 27B."""
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    wide = layers == layers_27b and heads > 0
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": meta("attention.sliding_window", 4096),
        "layer_types": ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)],
        "query_pre_attn_scalar": config["hidden_size"] // heads if wide else config["head_dim"],
    }


def _gemma2(meta, config: dict) -> dict:
    return _gemma(meta, config, every=2, layers_27b=46) | {  # softcaps: llama.cpp's and Gemma2Config's defaults
        "attn_logit_softcapping": meta("attn_logit_softcapping", 50.0, kind=float),
        "final_logit_softcapping": meta("final_logit_softcapping", 30.0, kind=float),
    }


def _gemma3(meta, config: dict) -> dict:
    return _gemma(meta, config, every=6, layers_27b=62) | {
        "attn_logit_softcapping": None,
        "final_logit_softcapping": meta("final_logit_softcapping", None, kind=float),
        "rope_local_base_freq": 10000.0,  # llama.cpp's fixed base for sliding layers; Gemma3TextConfig's default
    }


def _experts(meta, count: str, width: str | None, normalized: bool) -> dict:
    """A mixture of experts' fields: E under the name the family's HF config gives it (`count`), k, and the expert
    width under `width` (None: the family sizes experts with intermediate_size, feed_forward_length here).
    llama.cpp fixes per architecture whether the k weights are renormalised, unless expert_weights_norm says."""
    fields = {count: meta("expert_count"), "num_experts_per_tok": meta("expert_used_count"),
              "norm_topk_prob": meta("expert_weights_norm", normalized, kind=bool)}
    return fields | ({width: meta("expert_feed_forward_length")} if width else {})


def _mixtral(meta, config: dict) -> dict:
    return {"hidden_act": "silu", "sliding_window": None, **_experts(meta, "num_local_experts", None, True)}


def _qwen2_moe(meta, config: dict) -> dict:
    return {"hidden_act": "silu", **_experts(meta, "num_experts", "moe_intermediate_size", False),
            "shared_expert_intermediate_size": meta("expert_shared_feed_forward_length")}


def _qwen3_moe(meta, config: dict) -> dict:  # llama.cpp renormalises; Transformers' GGUF loader sets it too
    return {"hidden_act": "silu", **_experts(meta, "num_experts", "moe_intermediate_size", True)}


def _olmoe(meta, config: dict) -> dict:
    return {"hidden_act": "silu", "clip_qkv": meta("attention.clamp_kqv", None, kind=float),
            **_experts(meta, "num_experts", None, False)}


def _deepseek(meta, config: dict) -> dict:
    """DeepSeek-V2/V3 as llama.cpp's DeepseekV2Model writes them. Newer converters store the attention as the MQA it
    computes (head_count_kv 1, key_length C + R, value_length C) and the per-head sizes as key_length_mla (P + R) and
    value_length_mla (U); older ones key_length and value_length. Group-limited routing is absent from files that
    predate expert_group_count, and llama.cpp then routes over all experts: one group. llama.cpp rotates interleaved
    pairs and drops V3's multi-token-prediction layers."""
    R, heads = meta("rope.dimension_count"), config["num_attention_heads"]
    groups, used = meta("expert_group_count", 1), meta("expert_group_used_count", 1)
    fields = {
        "hidden_act": "silu", "num_key_value_heads": heads, "head_dim": R, "qk_rope_head_dim": R,
        "qk_nope_head_dim": (meta("attention.key_length_mla", None) or meta("attention.key_length")) - R,
        "v_head_dim": meta("attention.value_length_mla", None) or meta("attention.value_length"),
        "kv_lora_rank": meta("attention.kv_lora_rank"), "q_lora_rank": meta("attention.q_lora_rank", None),
        "first_k_dense_replace": meta("leading_dense_block_count", 0), "n_routed_experts": meta("expert_count"),
        "num_experts_per_tok": meta("expert_used_count"), "n_shared_experts": meta("expert_shared_count", 0),
        "moe_intermediate_size": meta("expert_feed_forward_length"),
        "routed_scaling_factor": meta("expert_weights_scale", 1.0, kind=float),
        "norm_topk_prob": meta("expert_weights_norm", False, kind=bool),
        # DeepseekV2Config leaves the groups null unless they limit routing
        "n_group": groups if groups > 1 or config["model_type"] == "deepseek_v3" else None,
        "topk_group": used if groups > 1 or config["model_type"] == "deepseek_v3" else None,
    }
    if config["model_type"] == "deepseek_v3":
        fields |= {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "rope_interleave": True,
                   "num_nextn_predict_layers": 0}
    else:
        fields["topk_method"] = "group_limited_greedy" if groups > 1 else "greedy"
    if (log_mul := meta("rope.scaling.yarn_log_multiplier", None, kind=float)) is not None and "rope_scaling" in config:
        # the converter writes 0.1 · mscale_all_dim; DeepSeek's configs give mscale the same value
        mscale = round(log_mul / 0.1, 6)
        fields["rope_scaling"] = config["rope_scaling"] | {"mscale": mscale, "mscale_all_dim": mscale}
    return fields


@dataclass(frozen=True)
class Family:
    """How Transformers reads one GGUF architecture: its model, tensor names, the transforms that undo llama.cpp's
    changes to the weights, and the config fields its class would otherwise take as defaults."""

    model_type: str  # HF model_type
    architecture: str  # HF model class
    fields: Callable[[Callable, dict], dict]  # (metadata reader, common config) -> this family's own fields
    names: dict = field(default_factory=dict)  # entries that add to or replace HF_NAMES
    head_dim_keys: tuple[str, ...] = ("attention.key_length",)  # metadata that states head_dim, first found wins
    permuted_qk: bool = False  # convert_hf_to_gguf permutes Q/K rows for llama only
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by 1 + w: llama.cpp stores 1 + w, Transformers subtracts 1

    @property
    def hf_names(self) -> dict:
        return HF_NAMES | self.names


# GGUF general.architecture -> family. llama's RoPE spans the whole head, so its rope dimension count is head_dim.
FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", _silu, permuted_qk=True,
                    head_dim_keys=("attention.key_length", "rope.dimension_count")),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _silu),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", _silu, names=QK_NORM_NAMES),
    "phi3": Family("phi3", "Phi3ForCausalLM", _phi3, names=PHI3_NAMES),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", _gemma2, names=GEMMA_NORM_NAMES, norm_offset=1.0),
    "gemma3": Family("gemma3_text", "Gemma3ForCausalLM", _gemma3, names=GEMMA_NORM_NAMES | QK_NORM_NAMES,
                     norm_offset=1.0),
    "qwen2moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", _qwen2_moe, names=MOE_NAMES | SHARED_EXPERT_NAMES),
    "qwen3moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe, names=MOE_NAMES | QK_NORM_NAMES),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", _olmoe, names=MOE_NAMES | QK_NORM_NAMES),  # norms over N·H, K·H
    "deepseek2": Family("deepseek_v2", "DeepseekV2ForCausalLM", _deepseek, names=MOE_NAMES | LATENT_NAMES,
                        head_dim_keys=("rope.dimension_count",)),
}
# llama.cpp writes Mistral as llama. Transformers reads a llama file as Mistral only when general.name is "mistral"
# (it tests membership in the field's list of values), with llama's metadata keys, names and Q/K permutation.
MISTRAL = replace(FAMILIES["llama"], model_type="mistral", architecture="MistralForCausalLM", fields=_mistral)
# Mixtral too is written as llama, with experts (llama.expert_count), Q/K permuted like llama's.
MIXTRAL = replace(FAMILIES["llama"], model_type="mixtral", architecture="MixtralForCausalLM", fields=_mixtral,
                  names=MIXTRAL_NAMES)
# DeepSeek-V2 and V3 share llama.cpp's deepseek2; V3 scores experts by a sigmoid (expert_gating_func), V2 by a softmax.
DEEPSEEK_V3 = replace(FAMILIES["deepseek2"], model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM")
SIGMOID = int(gguf.ExpertGatingFuncType.SIGMOID)


def gguf_family(reader: GGUFFile, path: Path) -> tuple[str, Family]:
    """The file's architecture (its metadata keys' prefix) and the family Transformers reads it as."""
    arch = _meta(reader, "general.architecture", path, kind=str)
    if arch not in FAMILIES:
        raise ConfigError(f"{path}: GGUF architecture is {arch!r}; jaxllm reads {', '.join(map(repr, FAMILIES))}")
    if arch == "llama" and _meta(reader, "llama.expert_count", path, 0, kind=int) > 0:
        return arch, MIXTRAL
    if arch == "deepseek2" and _meta(reader, "deepseek2.expert_gating_func", path, 1, kind=int) == SIGMOID:
        return arch, DEEPSEEK_V3
    if arch == "llama" and _meta(reader, "general.name", path, None, kind=str) == "mistral":
        return arch, MISTRAL
    return arch, FAMILIES[arch]


# ---- the file: metadata and tensor list, located over a memory map, decoded when read ------------------------------

V = gguf.GGUFValueType
SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
           V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}  # value type -> struct (and numpy) code
FLOAT_TENSORS = {"F16": "e", "F32": "f", "F64": "d", "I8": "b", "I16": "h", "I32": "i", "I64": "q"}


@dataclass(frozen=True)
class Field:
    """One metadata value, decoded only when read: a vocabulary's strings (and its merges) stay bytes in the file
    until the tokenizer is built, rather than ~200k Python objects held from the moment the file is opened."""

    file: GGUFFile = field(repr=False)
    offset: int  # where the value starts
    type: gguf.GGUFValueType
    count: int  # an array's length; 1 for a single value

    def contents(self):
        """The value as Python: int, float, bool, str or a list of them (as gguf-py's ReaderField.contents)."""
        return self.file.value(self.offset, self.type)[0]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the file lists it (as gguf-py's ReaderTensor): dimensions innermost first, and `data` a view of its
    bytes in the memory map, typed for float and integer tensors, uint8 [..., row bytes] for block formats."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    data_offset: int
    data: np.ndarray = field(repr=False)


class GGUFFile:
    """A GGUF file (version 2 or 3, either byte order) over a memory map: opening it locates every metadata value and
    lists the tensors; a value is decoded when read (Field.contents), a tensor's bytes are read when its data is."""

    def __init__(self, path: Path):
        self.data = np.memmap(path, mode="r")  # [file bytes] uint8
        self.buffer, self.order = memoryview(self.data), "<"
        if bytes(self.buffer[:4]) != b"GGUF":
            raise ValueError("GGUF magic invalid")
        if self.scalar(4, "I") & 0xFFFF == 0:  # a version written in the other byte order
            self.order = ">"
        if (version := self.scalar(4, "I")) not in (2, 3):
            raise ValueError(f"GGUF version {version}; readable: 2, 3")
        tensor_count, field_count = self.scalar(8, "Q"), self.scalar(16, "Q")
        offset, self.fields = 24, {}
        for _ in range(field_count):
            key, offset = self.string(offset)
            if key in self.fields:
                raise ValueError(f"metadata key {key!r} stored twice")
            kind = V(self.scalar(offset, "I"))
            self.fields[key] = Field(self, offset + 4, kind, self.scalar(offset + 8, "Q") if kind == V.ARRAY else 1)
            offset = self.value(offset + 4, kind, decode=False)[1]
        listed = []
        for _ in range(tensor_count):  # name, dimensions (innermost first), type, offset from the data's start
            name, offset = self.string(offset)
            n_dims = self.scalar(offset, "I")
            dims = struct.unpack_from(f"{self.order}{n_dims}Q", self.buffer, offset + 4)
            offset += 4 + 8 * n_dims
            kind = gguf.GGMLQuantizationType(self.scalar(offset, "I"))
            listed.append((name, dims, kind, self.scalar(offset + 4, "Q")))
            offset += 12
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        if (aligned := self.fields.get("general.alignment")) is not None:
            alignment = aligned.contents()
            if aligned.type != V.UINT32 or alignment <= 0 or alignment & (alignment - 1):
                raise ValueError(f"general.alignment must be a power of two (uint32), found {alignment!r}")
        start = -(-offset // alignment) * alignment
        self.tensors = [self._tensor(name, dims, kind, start + at) for name, dims, kind, at in listed]

    def scalar(self, offset: int, code: str):
        return struct.unpack_from(self.order + code, self.buffer, offset)[0]

    def string(self, offset: int, decode: bool = True) -> tuple[str | None, int]:
        """The string at `offset` (a uint64 length, then UTF-8 bytes), and where the next value starts."""
        end = offset + 8 + self.scalar(offset, "Q")
        if end > len(self.buffer):
            raise ValueError(f"the string at byte {offset} runs past the end of the file")
        return (str(self.buffer[offset + 8:end], "utf-8") if decode else None), end

    def value(self, offset: int, kind: gguf.GGUFValueType, decode: bool = True) -> tuple:
        """The value of type `kind` at `offset` (None unless `decode`), and where the next value starts."""
        if kind in SCALARS:
            return self.scalar(offset, SCALARS[kind]) if decode else None, offset + struct.calcsize(SCALARS[kind])
        if kind == V.STRING:
            return self.string(offset, decode)
        if kind != V.ARRAY:
            raise ValueError(f"value type {kind} at byte {offset}")
        item, count, offset = V(self.scalar(offset, "I")), self.scalar(offset + 4, "Q"), offset + 12
        if item in SCALARS:  # numbers: one read for the whole array
            end = offset + struct.calcsize(SCALARS[item]) * count
            if end > len(self.buffer):
                raise ValueError(f"the array at byte {offset} runs past the end of the file")
            numbers = np.frombuffer(self.buffer, self.order + SCALARS[item], count, offset) if decode else None
            return None if numbers is None else numbers.tolist(), end
        items = []
        for _ in range(count):  # strings (or arrays), each with its own length
            value, offset = self.value(offset, item, decode)
            if decode:
                items.append(value)
        return items if decode else None, offset

    def _tensor(self, name: str, dims: tuple[int, ...], kind: gguf.GGMLQuantizationType, offset: int) -> TensorInfo:
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        n_bytes = math.prod(dims) * block_bytes // block
        if offset + n_bytes > len(self.buffer):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        rows = tuple(reversed(dims))
        if kind.name in FLOAT_TENSORS:
            data = np.frombuffer(self.buffer, self.order + FLOAT_TENSORS[kind.name], math.prod(dims), offset)
        else:
            data, rows = np.frombuffer(self.buffer, np.uint8, n_bytes, offset), quant_shape_to_byte_shape(rows, kind)
        return TensorInfo(name, kind, dims, n_bytes, offset, data.reshape(rows))


@dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file read as an HF checkpoint; tensors are dequantized only when read."""

    path: Path
    config: dict  # HF config.json
    family: Family
    shapes: dict[str, tuple[int, ...]]  # HF name -> HF shape [out, in], in file order
    reader: GGUFFile = field(repr=False)
    by_name: dict = field(repr=False)  # HF name -> the reader's tensor

    def read(self, name: str) -> np.ndarray:
        """One tensor by HF name: float32, in HF orientation."""
        tensor = self.by_name[name]
        if isinstance(tensor, SplitKV):  # DeepSeek's kv_b_proj as the converter split it: k_b [N, C, P], v_b [N, U, C]
            k_b, v_b = (self._read(t, name, _hf_shape(name, t)) for t in (tensor.k_b, tensor.v_b))
            return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(self.shapes[name])  # [N, P + U, C]
        return self._read(tensor, name, self.shapes[name])

    def _read(self, tensor, name: str, shape: tuple[int, ...]) -> np.ndarray:
        weight = _hf_weight(tensor, name, shape, self.family, self.config, self.path)
        self._release(tensor)
        return weight

    def _release(self, tensor) -> None:
        """Drop the file pages of a tensor already copied out of the reader's memory map: a map keeps every page it
        touched resident until it is closed, which would add the whole file to a load's peak memory."""
        mapped = getattr(self.reader.data, "_mmap", None)
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            begin = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, begin, tensor.data_offset + tensor.n_bytes - begin)

    def read_blocks(self, name: str) -> Blocks:
        """One matrix by HF name in its stored block format (weights.BLOCK_FORMATS), rows in HF order: the file's
        bytes, split into the format's fields. Stacked experts keep their leading axis: rows [E, out]."""
        tensor, shape = self.by_name[name], self.shapes[name]
        if isinstance(tensor, SplitKV):
            raise CheckpointError(f"{self.path}: {name} is stored as two tensors, k_b transposed; it reads as floats")
        try:
            blocks = reshape_rows(blocks_from_gguf(tensor.data, tensor.tensor_type.name,
                                                   (math.prod(shape[:-1]), shape[-1])), shape[:-1])
        except (ValueError, TypeError, IndexError) as error:  # data of the wrong size for its shape and type
            raise CheckpointError(f"{self.path}: tensor {tensor.name!r} cannot be read ({type(error).__name__}: "
                                  f"{error})") from error
        self._release(tensor)
        return jax.tree_util.tree_map(lambda rows: _unpermuted(rows, name, self.family, self.config), blocks)

    @property
    def stacked_experts(self) -> bool:
        """Its MoE layers hold each projection's experts in one tensor (llama.cpp's ffn_*_exps), not one per expert."""
        return any(t.name.endswith("_exps.weight") for t in self.reader.tensors)

    def stored_type(self, name: str) -> str:
        """The GGUF type a tensor is stored in (Q4_1, Q8_0, F32, ...)."""
        tensor = self.by_name[name]
        if isinstance(tensor, SplitKV):
            return ", ".join(f"{t.tensor_type.name} ({t.name})" for t in (tensor.k_b, tensor.v_b))
        return tensor.tensor_type.name

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, float32 array in HF orientation), one tensor at a time, in file order."""
        for name in self.shapes:
            yield name, self.read(name)

    def tokenizer_files(self) -> dict[str, dict]:
        """tokenizer.json, tokenizer_config.json and generation_config.json, built from the metadata."""
        return tokenizer_files(self.reader, self.path, self.config)


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a GGUF's metadata and tensor list; raise ConfigError/CheckpointError on anything jaxllm cannot read."""
    path = Path(path)
    try:
        reader = GGUFFile(path)
    except Exception as error:  # the reader raises bare ValueError/struct.error/IndexError on bad bytes
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from error
    config = hf_config(reader, path)
    _, family = gguf_family(reader, path)
    by_name = {hf_name(t.name, family, path): t for t in reader.tensors}
    if len(by_name) != len(reader.tensors):
        names = [t.name for t in reader.tensors]
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"{path}: tensor name(s) stored more than once: {', '.join(repeated)}")
    by_name = _joined_kv_b(by_name)
    shapes = {name: _hf_shape(name, t) for name, t in by_name.items()}
    return GGUFCheckpoint(path, config, family, shapes, reader, by_name)


_REQUIRED = object()


def _meta(reader: GGUFFile, key: str, path: Path, default=_REQUIRED, kind: type | tuple = object):
    """A metadata value of the expected Python type (int, float, str, bool, list), or `default` when absent."""
    field_ = reader.fields.get(key)
    if field_ is None:
        if default is _REQUIRED:
            raise ConfigError(f"{path}: GGUF metadata has no {key!r}")
        return default
    try:
        value = field_.contents()
    except Exception as error:  # the reader's own parsing of a damaged field
        raise ConfigError(f"{path}: GGUF metadata {key!r} cannot be read ({type(error).__name__}: {error})") from error
    expected = kind if isinstance(kind, tuple) else (kind,)
    accepted = expected + ((int,) if float in expected else ())  # a whole number is a valid float
    if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in expected):
        raise ConfigError(f"{path}: GGUF metadata {key!r} must be {' or '.join(k.__name__ for k in expected)}, "
                          f"found {type(value).__name__} {value!r:.80}")
    return value


def hf_config(reader: GGUFFile, path: Path) -> dict:
    """The HF config.json this GGUF's metadata describes: what Transformers' GGUF loader reads
    (integrations/ggml.py GGUF_CONFIG_MAPPING), plus the fields it leaves at its config class's defaults."""
    arch, family = gguf_family(reader, path)
    tensor_names = {t.name for t in reader.tensors}
    for name, what in [("rope_freqs.weight", "Llama-3.1 RoPE scaling"), ("rope_factors_long.weight", "Phi-3 LongRoPE")]:
        if name in tensor_names:  # Transformers' loader drops these tensors, and with them the scaling
            raise ConfigError(f"{path}: has {name.split('.')[0]} ({what}), which jaxllm does not restore")

    def meta(key, default=_REQUIRED, kind=int):
        return _meta(reader, f"{arch}.{key}", path, default, kind)

    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    kv_heads = meta("attention.head_count_kv", heads)
    for key, count in (("attention.head_count", heads), ("attention.head_count_kv", kv_heads)):
        if count < 1:  # reading the Q/K rows (unpermute_rope) and head_dim divide by them
            raise ConfigError(f"{path}: GGUF metadata '{arch}.{key}' must be a positive integer, found {count}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    # LLMConfig refuses a zero or negative embedding_length by name, so no default is computed from it here.
    head_dim = next((meta(key) for key in family.head_dim_keys if f"{arch}.{key}" in reader.fields),
                    hidden // heads if hidden > 0 else None)
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": meta("vocab_size", tokens.count if tokens else None),
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", kind=float),
        "max_position_embeddings": meta("context_length"),
        "rope_theta": meta("rope.freq_base", 10000.0, kind=float),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": not tensor_names.isdisjoint({"blk.0.attn_q.bias", "blk.0.attn_qkv.bias"}),
        "mlp_bias": False,
    }
    if config["vocab_size"] is None:
        raise ConfigError(f"{path}: GGUF metadata has neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens'")
    rope_dims = meta("rope.dimension_count", None)
    if rope_dims is not None and head_dim and rope_dims != head_dim:  # Phi-4-mini rotates 3/4 of each head
        config["partial_rotary_factor"] = rope_dims / head_dim
    for hf_key, gguf_key in [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")]:
        if (value := _meta(reader, f"tokenizer.ggml.{gguf_key}", path, None, int)) is not None:
            config[hf_key] = value
    scaling = meta("rope.scaling.type", "none", kind=str)
    if scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": meta("rope.scaling.factor", kind=float)}
        if (original := meta("rope.scaling.original_context_length", None)) is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config | family.fields(meta, config)


def hf_name(gguf_name: str, family: Family, path: Path) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    layer = parts[1] if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit() else None
    key = f"blk.{{i}}.{parts[2]}" if layer is not None else stem
    names = family.hf_names
    if key not in names or suffix not in ("weight", "bias"):
        raise CheckpointError(f"{path}: tensor {gguf_name!r} has no HF {family.model_type} counterpart")
    # DeepSeek-V3's router buffer e_score_correction_bias, which the converter renames e_score_correction.bias
    return f"{names[key].format(i=layer)}.{suffix}".replace("e_score_correction.bias", "e_score_correction_bias")


@dataclass(frozen=True)
class SplitKV:
    """DeepSeek's kv_b_proj as newer converters store it: two reader tensors, k_b [N, C, P] and v_b [N, U, C]."""

    k_b: TensorInfo
    v_b: TensorInfo


def _joined_kv_b(by_name: dict) -> dict:
    """DeepSeek's kv_b_proj [N·(P + U), C] where newer converters split it per head into k_b [N, C, P] (transposed,
    for llama.cpp's absorbed MLA) and v_b [N, U, C]: one entry holding both tensors, under kv_b_proj's name."""
    joined = {}
    for name, tensor in by_name.items():
        k_b = name.replace("self_attn.v_b_proj.", "self_attn.k_b_proj.")
        if k_b != name and k_b in by_name:
            continue
        v_b = name.replace("self_attn.k_b_proj.", "self_attn.v_b_proj.")
        if v_b != name and v_b in by_name:
            joined[name.replace("self_attn.k_b_proj.", "self_attn.kv_b_proj.")] = SplitKV(tensor, by_name[v_b])
        else:
            joined[name] = tensor
    return joined


def _hf_shape(name: str, tensor) -> tuple[int, ...]:
    """A tensor's HF shape. GGUF lists dimensions innermost first ([in, out] there is [out, in] here), and llama.cpp's
    converter squeezes out axes of size 1, which Qwen2-MoE's shared_expert_gate [1, D] has."""
    if isinstance(tensor, SplitKV):  # k_b [N, C, P] and v_b [N, U, C] of kv_b_proj [N·(P + U), C]
        (N, C, P), (_, U, _) = (_hf_shape(name, t) for t in (tensor.k_b, tensor.v_b))
        return (N * (P + U), C)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return (1, *shape) if name.endswith("shared_expert_gate.weight") and len(shape) == 1 else shape


def _hf_weight(tensor, name: str, shape: tuple[int, ...], family: Family, config: dict, path: Path) -> np.ndarray:
    try:
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weight = np.asarray(weight, dtype=np.float32).reshape(shape)
    except NotImplementedError as error:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which jaxllm cannot dequantize"
        ) from error
    except (ValueError, TypeError, IndexError) as error:  # data of the wrong size for its shape and type
        raise CheckpointError(f"{path}: tensor {tensor.name!r} cannot be read ({type(error).__name__}: {error})") from error
    if family.norm_offset and name.endswith("norm.weight"):
        return weight - np.float32(family.norm_offset)  # float32, as Transformers' `weights - 1`
    return _unpermuted(weight, name, family, config)


def _unpermuted(rows: np.ndarray, name: str, family: Family, config: dict) -> np.ndarray:
    """A tensor whose leading axis is HF's rows ([out, ...]: a matrix, or a block format's fields), with llama's
    Q/K rows put back in HF order."""
    if family.permuted_qk and name.endswith("q_proj.weight"):
        return unpermute_rope(rows, config["num_attention_heads"])
    if family.permuted_qk and name.endswith("k_proj.weight"):
        return unpermute_rope(rows, config["num_key_value_heads"])
    return rows


def unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's `permute`: llama.cpp rotates interleaved pairs (x0,x1),(x2,x3)...;
    HF rotates halves (x_i, x_{i+H/2}). Rows of each head go from [H/2, 2] order back to [2, H/2] (any trailing axes
    ride along)."""
    rows, rest = weight.shape[0], weight.shape[1:]  # [N*H, ...]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def tokenizer_files(reader: GGUFFile, path: Path, config: dict) -> dict[str, dict]:
    """The three tokenizer-side JSON files of an HF checkpoint, rebuilt from tokenizer.ggml.* metadata
    (none when the file carries no tokenizer)."""
    with named_errors(f"{path}: malformed tokenizer metadata"):  # of the wrong shape, or refused by tokenizers
        return _tokenizer_files(reader, path, config)


def _listed_merges(meta, default=_REQUIRED) -> list[tuple[str, str]] | None:
    merges = meta("tokenizer.ggml.merges", default, kind=list)
    return None if merges is None else [tuple(merge.split(" ", 1)) for merge in merges]


def _byte_level_bpe(meta, tokens: list[str], path: Path) -> Tokenizer:
    """Llama-3, Qwen, SmolLM: byte-level BPE with the merges the file lists."""
    pre = meta("tokenizer.ggml.pre", "gpt2", kind=str)
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"{path}: tokenizer.ggml.pre is {pre!r}; known: {sorted(PRE_TOKENIZERS)}")
    merges = _listed_merges(meta)
    # The original tokenizer.json has no unk token and no byte fallback: bytes missing from the vocabulary drop.
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def sentencepiece_merges(tokens: list[str], ranks: list[float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce a SentencePiece vocabulary: every split of a token into two tokens, ordered by the
    token's rank, best first (Transformers' generate_merges, tokenization_utils_base.py, with vocab_scores)."""
    ids = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, rank in dict(zip(tokens, ranks)).items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        merges += [(left, right, rank) for left, right in sorted(splits, key=lambda s: (ids[s[0]], ids[s[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: ties keep vocabulary order
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_bpe(meta, tokens: list[str], path: Path) -> Tokenizer:
    """Llama-2, Mistral, Phi-3, Gemma: SentencePiece BPE with byte fallback, built as Transformers builds it from
    a GGUF file (integrations/gguf/gguf_tokenizer_mapping.py: sentencepiece_tokenizer, phi3_tokenizer and
    gemma_tokenizer, over the pipelines of LlamaTokenizer and GemmaTokenizer)."""
    arch = meta("general.architecture", kind=str)
    gemma = arch in ("gemma", "gemma2", "gemma3")
    if gemma:  # a token of spaces only is stored as spaces, but looked up as the "▁" that replaces them
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    merges = _listed_merges(meta, None)
    if merges is None:  # as llama.cpp writes SentencePiece: merges follow from the scores (Gemma: from the order)
        ranks = [-i for i in range(len(tokens))] if gemma else meta("tokenizer.ggml.scores", kind=list)
        merges = sentencepiece_merges(tokens, ranks)
    unk = meta("tokenizer.ggml.unknown_token_id", None, kind=int)
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges, fuse_unk=True,
                                     byte_fallback=True, unk_token=tokens[unk] if unk is not None else None))
    pieces = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:  # GemmaTokenizer: spaces become "▁", and no space is put before the text
        tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tokenizer.decoder = decoders.Sequence(pieces)
        return tokenizer
    if arch == "phi3":  # "▁" before each stretch of text between special tokens, not only before the first
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:  # LlamaTokenizer (legacy=False): "▁" before the text only where it starts the input
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([*pieces, decoders.Strip(" ", left=1)])
    return tokenizer


# tokenizer.ggml.model -> the builder of its tokenizer.json (model, normalizer, pre-tokenizer, decoder).
TOKENIZER_MODELS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def _tokenizer_files(reader: GGUFFile, path: Path, config: dict) -> dict[str, dict]:
    if "tokenizer.ggml.model" not in reader.fields:
        return {}

    def meta(key, default=_REQUIRED, kind=object):
        return _meta(reader, key, path, default, kind)

    model = meta("tokenizer.ggml.model", kind=str)
    if model not in TOKENIZER_MODELS:
        raise TokenizerError(f"{path}: tokenizer.ggml.model is {model!r}; jaxllm builds {sorted(TOKENIZER_MODELS)}")
    tokens = meta("tokenizer.ggml.tokens", kind=list)
    types = meta("tokenizer.ggml.token_type", [1] * len(tokens), kind=list)
    if not all(isinstance(t, str) for t in tokens) or len(types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.tokens must be {len(types)} strings, one per token_type entry")
    tokenizer = TOKENIZER_MODELS[model](meta, tokens, path)

    def token(key):
        token_id = meta(f"tokenizer.ggml.{key}", None, kind=int)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise IndexError(f"tokenizer.ggml.{key} {token_id} is not one of the {len(tokens)} tokens")
        return None if token_id is None else tokens[token_id]

    bos, eos, unk, pad = (token(f"{name}_token_id") for name in ("bos", "eos", "unknown", "padding"))
    # Control tokens (<|im_end|>) and the named special ones are matched whole in text, as are the user-defined ones
    # (<think>) that the model's vocabulary spells as the file does, as in Transformers and llama.cpp.
    named = {bos, eos, unk, pad}
    user_defined = [AddedToken(t, special=False, normalized=False) for t, token_type in zip(tokens, types)
                    if token_type == USER_DEFINED and tokenizer.token_to_id(t) is not None]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, token_type in zip(tokens, types) if token_type == CONTROL or t in named])
    tokenizer.add_tokens(user_defined)

    # Transformers adds BOS to a SentencePiece vocabulary whose file does not say, as llama.cpp does.
    add_bos = meta("tokenizer.ggml.add_bos_token", model == "llama", kind=bool) and bos is not None
    add_eos = meta("tokenizer.ggml.add_eos_token", False, kind=bool) and eos is not None
    if add_bos or add_eos:  # BOS/EOS are added by the tokenizer's post-processor, as in HF's own tokenizer.json files
        single = [bos] * add_bos + ["$A"] + [eos] * add_eos
        pair = single + [s if s != "$A" else "$B" for s in single]
        specials = [(t, tokenizer.token_to_id(t)) for t in {bos, eos} & set(single)]
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if (template := meta("tokenizer.chat_template", None, kind=str)) is not None:
        tokenizer_config["chat_template"] = template
    generation_config = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
    return {
        "tokenizer.json": json.loads(tokenizer.to_str()),
        "tokenizer_config.json": tokenizer_config,
        "generation_config.json": generation_config,
    }
