"""LLMConfig: the static, hashable description of a decoder-only model, read from an HF `config.json`.

A model family is a set of values here, not a class: each field says what it switches in the one forward
(model.py), and FAMILIES holds what HF's config class of each model_type fills in for fields a config leaves out.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from jaxllm.errors import ConfigError

# model_type -> HF's config-class defaults for the fields a config.json may leave out (Transformers 5's
# configuration_<family>.py; `null` in a config is a value, e.g. Mistral's "sliding_window": null turns it off).
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048),
    "mistral": dict(max_position_embeddings=131072, sliding_window=4096),
    "ministral": dict(max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False, max_window_layers=28),
    "qwen3": dict(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False, max_window_layers=28,
                  head_dim=128),
    "phi3": dict(max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None),
    "gemma2": dict(max_position_embeddings=8192, head_dim=256, tie_word_embeddings=True, sliding_window=4096,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(max_position_embeddings=131072, head_dim=256, tie_word_embeddings=True, sliding_window=4096,
                        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, sliding_window_pattern=6),
    "smollm3": dict(max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=2_000_000.0,
                    use_sliding_window=False, sliding_window=None, no_rope_layer_interval=4),
    # Mixtures of experts (model/experts.py); DeepSeek's attention is latent (model/latent.py).
    "mixtral": dict(max_position_embeddings=131072, sliding_window=None, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
                    num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False,
                      max_window_layers=28, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "qwen3_moe": dict(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False,
                      max_window_layers=28, num_local_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(max_position_embeddings=4096, rms_norm_eps=1e-5, num_experts=64, num_experts_per_tok=8,
                  norm_topk_prob=False),
    # DeepSeek: head_dim is qk_rope_head_dim (HF's config sets it so: RoPE rotates those dims alone).
    "deepseek_v2": dict(max_position_embeddings=2048, first_k_dense_replace=0,
                        kv_lora_rank=512, q_lora_rank=1536, n_group=None, n_routed_experts=64, n_shared_experts=2,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, routed_scaling_factor=1.0, topk_group=None,
                        topk_method="greedy", norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None,
                        moe_intermediate_size=1407),
    "deepseek_v3": dict(moe_intermediate_size=2048, n_shared_experts=1, n_routed_experts=256,
                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
                        rope_interleave=True, num_nextn_predict_layers=1),
    # gpt-oss's default RoPE is YaRN; given as v4's rope_scaling so that a config's own rope_parameters or
    # rope_scaling replaces it whole, as in GptOssConfig.
    "gpt_oss": dict(max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=64, sliding_window=128,
                    num_local_experts=128, num_experts_per_tok=4, attention_bias=True, rope_theta=150000.0,
                    rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                      original_max_position_embeddings=4096),
                    swiglu_alpha=1.702, swiglu_limit=7.0),
    "granitemoe": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, num_local_experts=8, num_experts_per_tok=2,
                       embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0,
                       attention_multiplier=1.0),
}
DEEPSEEK = ("deepseek_v2", "deepseek_v3")  # multi-head latent attention (model/latent.py) and DeepSeek's routers
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
GEMMA = ("gemma2", "gemma3_text")  # (1 + weight) norms, sqrt(D)-scaled embeddings, four norms per block
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
BIAS_FLAGS = ("llama", "qwen3", "gemma2", "gemma3_text", "smollm3", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe")  # families whose q/k/v/o bias follows attention_bias
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")  # the MLP gate's: SwiGLU, Gemma's GeGLU (tanh), exact GeGLU
LAYER_TYPES = ("full_attention", "sliding_attention")
MAX_SIZE = 2**31 - 1  # the largest size, count or position a config may give
FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38  # float32's smallest normal and largest
# Transformers silently defaults these to Llama-7B sizes; a checkpoint without them is broken, not 7B.
REQUIRED_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# The fields that count a config's experts, by the names HF's config classes use (Qwen3-MoE's attribute_map maps
# num_experts to num_local_experts; DeepSeek says n_routed_experts).
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")
# model_type -> (the field its HF config class reads for E, the alias its attribute_map maps onto it, or None).
EXPERT_COUNT = {"mixtral": ("num_local_experts", "num_experts"), "qwen2_moe": ("num_experts", None),
                "qwen3_moe": ("num_local_experts", "num_experts"), "olmoe": ("num_experts", "num_local_experts"),
                "deepseek_v2": ("n_routed_experts", "num_experts"),
                "deepseek_v3": ("n_routed_experts", "num_local_experts"),
                "gpt_oss": ("num_local_experts", "num_experts"), "granitemoe": ("num_local_experts", None)}
MOE_FAMILIES = tuple(EXPERT_COUNT)  # their MLPs are experts (all or some layers)
# Fields of things jaxllm does not run; present with a value other than null/0/false, they are refused by name
# (the mixture-of-experts ones outside MOE_FAMILIES, whose Transformers classes would ignore them).
MOE_FIELDS = dict.fromkeys((*EXPERT_COUNT_FIELDS, "moe_intermediate_size"), "mixture of experts")
UNSUPPORTED_FIELDS = {
    "vision_config": "a multimodal model", "audio_config": "a multimodal model", "text_config": "a multimodal model",
    "use_bidirectional_attention": "bidirectional attention",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, in Transformers' `rope_parameters` vocabulary."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0  # linear, dynamic, llama3, yarn
    original_max_position_embeddings: int | None = None  # llama3, yarn, longrope
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn, longrope: scales cos/sin; derived from the factor when None
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    # longrope (Phi-3): per-frequency divisors [rotary_dim / 2], short while every position of a call is below
    # original_max_position_embeddings, long from there on; `factor` None means max_position / original.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Shapes and hyper-parameters of a decoder-only model. Frozen and hashable: safe as a jit static argument.

    The defaults are Llama's; every other field names the family behaviour it switches on."""

    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    num_key_value_heads: int  # K
    head_dim: int  # H (Qwen3 and Gemma state it; it need not be D / N)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v and o_proj
    qkv_bias: bool = False  # bias on q, k and v alone (Qwen2 always has it)
    mlp_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of these
    rope: RopeConfig = RopeConfig()
    model_type: str = "llama"
    hidden_act: str = "silu"  # the MLP gate's activation: "silu" (SwiGLU) or Gemma's "gelu_pytorch_tanh" (GeGLU)
    rotary_dim: int | None = None  # the leading dims of each head that RoPE rotates (Phi's partial_rotary_factor); None: all H
    # Attention layers of two kinds: a "sliding_attention" layer's query sees only the last `sliding_window` keys
    # (itself included; Mistral, Qwen2's upper layers, Gemma's local layers), a "full_attention" one every earlier key.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # one per layer; () means every layer is full_attention
    local_rope: RopeConfig | None = None  # Gemma 3: the sliding layers' own RoPE (rope_local_base_freq); None: `rope`
    no_rope_layers: tuple[int, ...] = ()  # SmolLM3: 1 where a layer applies RoPE, 0 where it does not; (): all do
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k (q_norm, k_norm) before RoPE
    # Gemma: norms scale by (1 + weight), in fp32 before the cast back; embeddings are multiplied by sqrt(D) in the
    # model dtype; the attention output and the MLP output are normed too (post_attention_layernorm,
    # post_feedforward_layernorm) and pre_feedforward_layernorm is the MLP's input norm.
    gemma_norms: bool = False
    embed_scale: float = 1.0
    query_pre_attn_scalar: float | None = None  # Gemma: scores are scaled by this ** -0.5 instead of head_dim ** -0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: scores become cap * tanh(scores / cap) before the mask
    final_logit_softcapping: float | None = None  # Gemma 2 and 3: logits become cap * tanh(logits / cap)
    # Mixture of experts (model/experts.py): in a layer whose `moe_layers` entry is true, a router picks k of E expert
    # MLPs per token and weights their outputs; gate_up_proj/down_proj then hold the shared expert, if any.
    num_experts: int = 0  # E (0: every layer's MLP is dense)
    num_experts_per_tok: int = 0  # k
    moe_intermediate_size: int = 0  # an expert's F
    shared_expert_intermediate_size: int = 0  # the width of an MoE layer's shared expert MLP (0: none)
    moe_layers: tuple[bool, ...] = ()  # one per layer: its MLP is experts; (): none is
    router: str = "softmax_topk"  # the routing rule, a name in model.experts.ROUTERS
    norm_topk_prob: bool = False  # the k chosen weights are renormalised to sum to 1
    shared_expert_gated: bool = False  # Qwen2-MoE: the shared expert's output times sigmoid(x · shared_expert_gate)
    # OLMoE: q_norm and k_norm over the whole projection (N·H and K·H) before the head split; clip_qkv clamps q, k, v.
    qk_norm_full: bool = False
    clip_qkv: float | None = None
    # DeepSeek's mixture: group-limited routing (E experts in n_group groups, the best topk_group groups kept) and the
    # chosen weights times routed_scaling_factor.
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    # DeepSeek's multi-head latent attention (model/latent.py) when kv_lora_rank > 0: keys and values come from a
    # latent of kv_lora_rank (C) dims per token plus one RoPE key of head_dim (R) dims that every head shares; each
    # head's query and key have qk_nope_head_dim unrotated dims and R rotated ones, its value v_head_dim dims.
    kv_lora_rank: int = 0  # C (0: grouped-query attention)
    q_lora_rank: int = 0  # the query's own latent (q_a_proj, q_b_proj); 0: a plain q_proj
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # RoPE rotates pairs (2i, 2i + 1), as DeepSeek's checkpoints lay q and k out
    latent_scale: float = 0.0  # MLA's score scale: (qk_nope_head_dim + R) ** -0.5, times YaRN's mscale² (HF)
    num_nextn_predict_layers: int = 0  # DeepSeek-V3's multi-token-prediction layers, stored after the last; unused
    # Granite: scores scaled by attention_multiplier instead of head_dim ** -0.5; each sublayer's output times
    # residual_multiplier before its residual add; logits divided by logits_scaling (embed_scale holds its
    # embedding_multiplier).
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # gpt-oss: a learned logit per query head joins each softmax and is dropped after it (self_attn.sinks); the
    # router and the experts carry biases; the experts' SwiGLU is clamped (gate to at most swiglu_limit, up to
    # ±swiglu_limit) and reads gate·sigmoid(swiglu_alpha·gate)·(up + 1).
    attention_sinks: bool = False
    moe_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702

    @property
    def num_groups(self) -> int:
        """G = N // K: query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qk_rope_head_dim(self) -> int:
        """R: MLA's rotated dims per head, HF's head_dim for DeepSeek."""
        return self.head_dim

    @property
    def query_scale(self) -> float:
        if self.attention_multiplier is not None:  # Granite
            return self.attention_multiplier
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_moe(self, i: int) -> bool:
        """Layer i's MLP is a mixture of experts."""
        return bool(self.moe_layers) and self.moe_layers[i]

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "full_attention"

    def layer_rope(self, i: int) -> RopeConfig | None:
        """The RoPE layer i applies: None for SmolLM3's no-RoPE layers, Gemma 3's local RoPE on its sliding layers."""
        if self.no_rope_layers and not self.no_rope_layers[i]:
            return None
        if self.local_rope is not None and self.layer_type(i) == "sliding_attention":
            return self.local_rope
        return self.rope

    @classmethod
    def from_json(cls, path: str | Path) -> "LLMConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:  # json's parser recurses once per level of nesting
            raise ConfigError(f"{path}: JSON nested too deeply to read") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config dict>") -> "LLMConfig":
        """Validate an HF config dict (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`). Every value is
        checked for its JSON type and range; a value that is present but invalid is an error, never a default."""
        model_type = data.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source}: required field 'model_type' is missing (supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        if model_type == "gemma3":
            raise ConfigError(f"{source}: model_type 'gemma3' is Gemma 3's multimodal model; jaxllm runs its text "
                              "model (model_type 'gemma3_text', the config of Gemma-3-1B or the 'text_config' part)")
        if not isinstance(model_type, str) or model_type not in FAMILIES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; jaxllm runs "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        refused = UNSUPPORTED_FIELDS if model_type in MOE_FAMILIES else {**MOE_FIELDS, **UNSUPPORTED_FIELDS}
        for name, what in refused.items():
            if data.get(name) not in (None, 0, False, {}):
                raise ConfigError(f"{source}: field '{name}' = {json.dumps(data[name], default=repr)[:80]} describes "
                                  f"{what}, which jaxllm does not run")
        # E under both of a family's names: HF's classes differ on which wins (Qwen3-MoE's field, the others' alias).
        both = [name for name in EXPERT_COUNT.get(model_type, ()) if name and data.get(name) is not None]
        if len(both) == 2 and data[both[0]] != data[both[1]]:
            raise ConfigError(f"{source}: fields '{both[0]}' ({json.dumps(data[both[0]], default=repr)[:20]}) and "
                              f"'{both[1]}' ({json.dumps(data[both[1]], default=repr)[:20]}) both give the number of "
                              "experts, and disagree")
        fields = _Fields({**FAMILIES[model_type], **data}, source)  # fields the config leaves out: HF's defaults
        data = fields.data
        for name in REQUIRED_SHAPE_FIELDS:
            if data.get(name) is None:
                raise fields.fail(f"required field '{name}' is missing")
        shape = {name: fields.positive_int(name) for name in REQUIRED_SHAPE_FIELDS}
        heads, layers = shape["num_attention_heads"], shape["num_hidden_layers"]
        kv_heads = fields.positive_int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise fields.fail(f"num_attention_heads ({heads}) must be divisible by num_key_value_heads ({kv_heads})")
        if model_type in DEEPSEEK:  # HF's DeepSeek configs set head_dim to qk_rope_head_dim, whatever it said
            data["head_dim"] = fields.positive_int("qk_rope_head_dim")
        if data.get("head_dim") is not None:  # an explicit head_dim wins over hidden_size // heads, as in HF
            head_dim = fields.positive_int("head_dim")
        elif shape["hidden_size"] % heads:
            raise fields.fail(f"hidden_size ({shape['hidden_size']}) is not divisible by num_attention_heads ({heads})")
        else:
            head_dim = shape["hidden_size"] // heads
        if head_dim % 2:
            raise fields.fail(f"head_dim must be even for rotary embeddings, found {head_dim}")
        gemma = model_type in GEMMA
        act_field = "hidden_activation" if gemma else "hidden_act"  # Gemma's modules read hidden_activation alone
        act = data.get(act_field, "silu")
        if act not in ACTIVATIONS:
            raise fields.fail(f"{act_field} {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        # pretraining_tp (SmolLM3-3B has 2) is ignored, as by Transformers 5: it split matmuls, not their result.
        max_pos = fields.positive_int("max_position_embeddings", 2048)
        rope, local_rope, rotary_dim = _rope_configs(fields, model_type, max_pos, head_dim)
        if any(r is not None and r.rope_type == "dynamic" for r in (rope, local_rope)) and rotary_dim <= 2:
            raise fields.fail(f"dynamic RoPE needs head_dim > 2, found {rotary_dim}")  # its base grows as a power of H / (H - 2)
        sliding_window, layer_types, no_rope_layers = _layer_kinds(fields, model_type, layers)
        # Gemma 2 caps scores and logits; Gemma 3's attention ignores attn_logit_softcapping; others ignore both.
        capped = {"gemma2": ("attn_logit_softcapping", "final_logit_softcapping"),
                  "gemma3_text": ("final_logit_softcapping",)}.get(model_type, ())
        softcaps = {name: fields.positive_number(name) if name in capped and data.get(name) is not None else None
                    for name in ("attn_logit_softcapping", "final_logit_softcapping")}
        return cls(
            **shape,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=fields.positive_number("rms_norm_eps", 1e-6),
            max_position_embeddings=max_pos,
            tie_word_embeddings=fields.boolean("tie_word_embeddings", False),
            # Only some families' modules read these flags; the others fix their biases (Qwen2: q, k, v only).
            attention_bias=model_type in BIAS_FLAGS and fields.boolean("attention_bias", False),
            qkv_bias=model_type == "qwen2" or model_type == "qwen2_moe" and fields.boolean("qkv_bias", True),
            mlp_bias=model_type in ("llama", "smollm3") and fields.boolean("mlp_bias", False),
            eos_token_ids=fields.token_ids("eos_token_id"),
            rope=rope,
            model_type=model_type,
            hidden_act=act,
            rotary_dim=None if rotary_dim == head_dim else rotary_dim,
            sliding_window=sliding_window,
            layer_types=layer_types,
            local_rope=local_rope,
            no_rope_layers=no_rope_layers,
            qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe", "olmoe"),
            gemma_norms=gemma,
            embed_scale=math.sqrt(shape["hidden_size"]) if gemma else (
                fields.positive_number("embedding_multiplier") if model_type == "granitemoe" else 1.0),
            query_pre_attn_scalar=fields.positive_number("query_pre_attn_scalar") if gemma else None,
            **softcaps,
            **_experts(fields, model_type, layers),
            **_granite_multipliers(fields, model_type),
            attention_sinks=model_type == "gpt_oss",
            **_latent(fields, model_type, rope, heads, kv_heads),
        )


def _experts(fields: "_Fields", model_type: str, layers: int) -> dict[str, Any]:
    """The mixture-of-experts fields of LLMConfig, as each family's HF config class and decoder layer read them."""
    data = fields.data
    if model_type not in MOE_FAMILIES:
        return {}
    field, alias = EXPERT_COUNT[model_type]
    count = alias if alias is not None and data.get(alias) is not None else field  # the alias wins, as in HF
    if data.get(count) is None:
        raise fields.fail(f"a {model_type} config needs the number of experts ('{field}')")
    E = fields.positive_int(count)
    k = fields.positive_int("num_experts_per_tok")
    if k > E:
        raise fields.fail(f"num_experts_per_tok ({k}) must be at most the number of experts ({E})")
    if model_type in DEEPSEEK:
        return _deepseek_experts(fields, model_type, layers, E)
    # Mixtral and OLMoE size their experts with intermediate_size; the Qwen MoEs with moe_intermediate_size.
    width = fields.positive_int("moe_intermediate_size" if model_type in ("qwen2_moe", "qwen3_moe")
                                else "intermediate_size")
    moe = [True] * layers
    if model_type in ("qwen2_moe", "qwen3_moe"):  # HF: not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
        step = fields.positive_int("decoder_sparse_step", 1)
        only = data.get("mlp_only_layers")
        only = [] if only is None else only
        if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers
                                             for i in only):
            raise fields._refuse("mlp_only_layers", f"a list of layer numbers from 0 to {layers - 1}", only)
        moe = [i not in only and (i + 1) % step == 0 for i in range(layers)]
    shared = fields.positive_int("shared_expert_intermediate_size", None) if model_type == "qwen2_moe" else None
    clip = data.get("clip_qkv") if model_type == "olmoe" else None
    return dict(num_experts=E, num_experts_per_tok=k, moe_intermediate_size=width, moe_layers=tuple(moe),
                # Granite and gpt-oss: softmax over the top k logits; the others pick the top k of a full softmax.
                router="topk_softmax" if model_type in ("gpt_oss", "granitemoe") else "softmax_topk",
                # Mixtral always renormalises; the others when norm_topk_prob says so.
                norm_topk_prob=model_type == "mixtral" or fields.boolean("norm_topk_prob", False),
                shared_expert_intermediate_size=shared or 0, shared_expert_gated=bool(shared),
                qk_norm_full=model_type == "olmoe",
                clip_qkv=None if clip is None else fields.positive_number("clip_qkv"),
                **(dict(moe_bias=True, swiglu_limit=fields.positive_number("swiglu_limit"),
                        swiglu_alpha=fields.positive_number("swiglu_alpha")) if model_type == "gpt_oss" else {}))


def _granite_multipliers(fields: "_Fields", model_type: str) -> dict[str, Any]:
    """Granite's scores, residual branches and logits multipliers (its embedding_multiplier is embed_scale)."""
    if model_type != "granitemoe":
        return {}
    return {name: fields.positive_number(name) for name in ("attention_multiplier", "residual_multiplier",
                                                            "logits_scaling")}


def _deepseek_experts(fields: "_Fields", model_type: str, layers: int, E: int) -> dict[str, Any]:
    """DeepSeek's MoE, as DeepseekV2/V3DecoderLayer and their TopkRouter read it: layers from first_k_dense_replace on
    are experts (the earlier ones a dense MLP of intermediate_size); n_shared_experts ungated experts of
    moe_intermediate_size run as one MLP of their summed width (HF's shared_experts); V2 routes greedily or
    group-limited by topk_method, V3 always group-limited (its topk_method, "noaux_tc", is not read)."""
    data = fields.data
    first, n_shared = (_count(fields, name) for name in ("first_k_dense_replace", "n_shared_experts"))
    width = fields.positive_int("moe_intermediate_size")
    router, grouped = "deepseek_v3", True
    if model_type == "deepseek_v2":
        method = data.get("topk_method")
        if method not in ("greedy", "group_limited_greedy"):  # HF's router has no other branch
            raise fields._refuse("topk_method", '"greedy" or "group_limited_greedy"', method)
        router, grouped = f"deepseek_v2_{method}", method == "group_limited_greedy"
    n_group, topk_group = (fields.positive_int(name) for name in ("n_group", "topk_group")) if grouped else (1, 1)
    if E % n_group or topk_group > n_group:
        raise fields.fail(f"n_group ({n_group}) must divide the {E} experts, and topk_group ({topk_group}) be at most "
                          "n_group")
    if model_type == "deepseek_v3" and E // n_group < 2:  # a group scores as the sum of its two best
        raise fields.fail(f"each of the n_group ({n_group}) groups needs two experts or more; there are {E}")
    return dict(num_experts=E, num_experts_per_tok=fields.positive_int("num_experts_per_tok"),
                moe_intermediate_size=width, moe_layers=tuple(i >= first for i in range(layers)), router=router,
                # V2's router never renormalises (HF's DeepseekV2TopkRouter ignores norm_topk_prob).
                norm_topk_prob=model_type == "deepseek_v3" and fields.boolean("norm_topk_prob", True),
                shared_expert_intermediate_size=width * n_shared,
                routed_scaling_factor=fields.positive_number("routed_scaling_factor", 1.0),
                n_group=n_group, topk_group=topk_group)


def _count(fields: "_Fields", name: str) -> int:
    """A field that may be 0 (or absent: 0)."""
    value = fields.data.get(name)
    return 0 if value in (None, 0) else fields.positive_int(name)


def _latent(fields: "_Fields", model_type: str, rope: RopeConfig, heads: int, kv_heads: int) -> dict[str, Any]:
    """DeepSeek's multi-head latent attention fields, as DeepseekV2/V3Attention reads them."""
    if model_type not in DEEPSEEK:
        return {}
    data = fields.data
    if kv_heads != heads:  # each head's key and value come out of kv_b_proj; HF's repeat_kv would fail
        raise fields.fail(f"num_key_value_heads ({kv_heads}) must equal num_attention_heads ({heads}) in a "
                          f"{model_type} model: latent attention gives every head its own key and value")
    for name, what in (("attention_bias", "biases on the latent attention's projections"),
                       ("mlp_bias", "MLP biases"), ("quantization_config", "a quantized (e.g. FP8) checkpoint")):
        if data.get(name) not in (None, False, {}):
            raise fields.fail(f"field '{name}' = {json.dumps(data[name], default=repr)[:80]} describes {what}, "
                              f"which jaxllm does not run for {model_type}")
    nope = fields.positive_int("qk_nope_head_dim")
    scale = (nope + fields.positive_int("qk_rope_head_dim")) ** -0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:  # HF's yarn_apply_mscale: mscale² on the scores
        mscale = 1.0 if rope.factor <= 1 else 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
        scale = scale * mscale * mscale
    mtp = "num_nextn_predict_layers" if data.get("num_nextn_predict_layers") is not None else "num_mtp_layers"
    return dict(kv_lora_rank=fields.positive_int("kv_lora_rank"), q_lora_rank=_count(fields, "q_lora_rank"),
                qk_nope_head_dim=nope, v_head_dim=fields.positive_int("v_head_dim"), latent_scale=scale,
                # V2 always rotates interleaved pairs (complex multiplication); V3 when rope_interleave says so.
                rope_interleave=model_type == "deepseek_v2" or fields.boolean("rope_interleave", True),
                num_nextn_predict_layers=_count(fields, mtp) if model_type == "deepseek_v3" else 0)


def _layer_kinds(fields: "_Fields", model_type: str, layers: int) -> tuple[int | None, tuple[str, ...], tuple[int, ...]]:
    """(sliding_window, layer_types, no_rope_layers) as each family's HF config class derives them."""
    data = fields.data
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not fields.boolean("use_sliding_window", False):
        window = None  # Qwen keeps sliding_window in its config (Qwen2-MoE saves 0) but applies it only with use_sliding_window
    elif model_type == "granitemoe":  # Granite's attention is always full (HF: "no sliding")
        window = None
    else:
        window = fields.positive_int("sliding_window", None) if data.get("sliding_window") is not None else None
    no_rope = ()
    if model_type == "smollm3":
        interval = fields.positive_int("no_rope_layer_interval", 4)
        no_rope = tuple(_per_layer(fields, "no_rope_layers", layers, (0, 1), "0 or 1")
                        or [int((i + 1) % interval != 0) for i in range(layers)])
        if not fields.boolean("use_sliding_window", False):
            window = None
    if model_type in ("mistral", "phi3", "mixtral", "qwen3_moe", "granitemoe"):  # one window for every layer (ignoring layer_types)
        types = ["sliding_attention" if window is not None else "full_attention"] * layers
    else:
        types = _per_layer(fields, "layer_types", layers, LAYER_TYPES, "an attention type")
        if types is None:
            if model_type in ("qwen2", "qwen3"):
                first = fields.positive_int("max_window_layers", 28) if window is not None else layers
                types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
            elif model_type == "qwen2_moe":  # Qwen2MoeConfig: every other layer below max_window_layers
                first = fields.positive_int("max_window_layers", 28)
                types = ["sliding_attention" if window is not None and (i + 1) % 2 and i < first else "full_attention"
                         for i in range(layers)]
            elif model_type in ("gemma2", "gpt_oss"):
                types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
            elif model_type == "gemma3_text":
                pattern = fields.positive_int("sliding_window_pattern", 6)
                types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
            elif model_type == "smollm3":
                types = ["sliding_attention" if window is not None and not no_rope[i] else "full_attention"
                         for i in range(layers)]
            else:  # ministral
                types = ["sliding_attention" if window is not None else "full_attention"] * layers
    if "sliding_attention" in types and window is None:
        raise fields.fail("field 'layer_types' names sliding_attention layers but 'sliding_window' is null"
                          + (" or use_sliding_window is false" if model_type in ("qwen2", "qwen3", "smollm3", "qwen2_moe",
                                                                                 "qwen3_moe") else ""))
    if "sliding_attention" not in types:
        window = None
    return window, tuple(types) if "sliding_attention" in types else (), no_rope if 0 in no_rope else ()


def _per_layer(fields: "_Fields", name: str, layers: int, allowed: tuple, kind: str) -> list | None:
    """A per-layer list field: None when absent, else exactly `layers` values from `allowed`."""
    value = fields.data.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != layers:
        raise fields._refuse(name, f"a list of {layers} values (one per layer)", value)
    bad = next((v for v in value if isinstance(v, bool) or v not in allowed), None)
    if bad is not None:
        raise fields.fail(f"field '{name}' holds {json.dumps(bad)}; each entry must be {kind}: "
                          f"{', '.join(map(json.dumps, allowed))}")
    return value


_REQUIRED = object()


class _Fields:
    """Typed reads of one config object: each names the source, the field and the value it refuses. A field that
    is absent or null takes the default; one that is present must be valid."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str = ""):
        self.data, self.source, self.prefix = data, source, prefix

    def fail(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {msg}")

    def _get(self, name: str, default: Any, kind: str) -> Any:
        value = self.data.get(name)
        if value is None:
            if default is _REQUIRED:
                raise self.fail(f"field '{self.prefix}{name}' is missing; it must be {kind}")
            return default
        return value

    def _refuse(self, name: str, kind: str, value: Any) -> ConfigError:
        return self.fail(f"field '{self.prefix}{name}' must be {kind}, found {json.dumps(value, default=repr)}")

    def positive_int(self, name: str, default: Any = _REQUIRED) -> int:
        value = self._get(name, default, "a positive integer")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self._refuse(name, "a positive integer", value)
        if value > MAX_SIZE:  # arrays are indexed with int32
            raise self._refuse(name, f"a positive integer up to {MAX_SIZE}", value)
        return value

    def positive_number(self, name: str, default: Any = _REQUIRED, above: float = 0) -> float:
        """A number the float32 arithmetic it feeds can hold: finite, above `above`, and within float32's normal
        range (a RoPE factor of 5e-324 would make every frequency infinite)."""
        kind = (f"a positive number from {FLOAT32_TINY:.4g} to {FLOAT32_MAX:.4g}" if above == 0
                else f"a number greater than {above:g} and at most {FLOAT32_MAX:.4g}")
        value = self._get(name, default, kind)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value <= above or not FLOAT32_TINY <= value <= FLOAT32_MAX):
            raise self._refuse(name, kind, value)
        return float(value)

    def boolean(self, name: str, default: Any = _REQUIRED) -> bool:
        value = self._get(name, default, "true or false")
        if not isinstance(value, bool):
            raise self._refuse(name, "true or false (a JSON boolean)", value)
        return value

    def factors(self, name: str, count: int) -> tuple[float, ...]:
        """A list of `count` positive numbers (longrope's per-frequency factors)."""
        value = self.data.get(name)
        if not isinstance(value, list) or len(value) != count:
            raise self._refuse(name, f"a list of {count} numbers (rotary dims / 2)", value)
        return tuple(_Fields({name: v}, self.source, self.prefix).positive_number(name) for v in value)

    def token_ids(self, name: str) -> tuple[int, ...]:
        value = self.data.get(name)
        values = [] if value is None else value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise self._refuse(name, "a token id or a list of them", value)
        return tuple(values)


def _rope_configs(fields: _Fields, model_type: str, max_pos: int, head_dim: int) -> tuple[RopeConfig, RopeConfig | None, int]:
    """(RoPE of the full layers, of Gemma 3's sliding layers or None, the rotary dims per head), from either format:
    v5 `rope_parameters` (flat, or nested by layer type) and v4 top-level `rope_theta` plus `rope_scaling`."""
    data = fields.data
    key = "rope_parameters" if data.get("rope_parameters") is not None else "rope_scaling"
    params = data.get(key) or {}
    if not isinstance(params, dict):
        raise fields.fail(f"field '{key}' must be an object, found {json.dumps(params, default=repr)}")
    nested = model_type == "gemma3_text" and set(params) & set(LAYER_TYPES)
    full = params.get("full_attention") or {} if nested else params
    if not isinstance(full, dict):
        raise fields.fail(f"field '{key}.full_attention' must be an object, found {json.dumps(full, default=repr)}")
    in_rope = full.get("partial_rotary_factor") is not None
    partial = _Fields(full if in_rope else data, fields.source, f"{key}." if in_rope else "").positive_number(
        "partial_rotary_factor", 1.0)
    rotary_dim = int(head_dim * partial)
    if partial != 1 and model_type != "phi3":  # only Phi-3's RoPE honours it in Transformers
        raise fields.fail(f"partial_rotary_factor {partial!r} is not supported for {model_type} models: they rotate "
                          "the whole head")
    if partial > 1 or rotary_dim % 2 or rotary_dim == 0:
        raise fields.fail(f"partial_rotary_factor {partial!r} gives {rotary_dim} rotary dims of head_dim {head_dim}; "
                          "it must give an even number from 2 to head_dim")
    rope = _rope_config(fields, full, key + ".full_attention" * bool(nested), max_pos, model_type, rotary_dim)
    local = None
    if model_type == "gemma3_text":  # the sliding layers rotate with their own base, unscaled
        local_params = (params.get("sliding_attention") or {}) if nested else {}
        local = _rope_config(fields, {"rope_theta": data.get("rope_local_base_freq"), **local_params},
                             f"{key}.sliding_attention" if nested else "rope_local_base_freq", max_pos, model_type,
                             rotary_dim)
    return rope, local, rotary_dim


def _rope_config(fields: _Fields, params: dict, key: str, max_pos: int, model_type: str, rotary_dim: int) -> RopeConfig:
    """One RoPE from its parameter object (`key` names it in errors); theta falls back to the top-level rope_theta."""
    data = fields.data
    if not isinstance(params, dict):
        raise fields.fail(f"field '{key}' must be an object, found {json.dumps(params, default=repr)}")
    params = {k: v for k, v in params.items() if v is not None}
    params.pop("partial_rotary_factor", None)  # read by _rope_configs
    legacy_type = params.pop("type", None)  # v4's name for rope_type
    rope_type = params.pop("rope_type", legacy_type if legacy_type is not None else "default")
    if model_type == "phi3" and rope_type in ("su", "yarn"):  # Phi3Config's names for longrope in older configs
        rope_type = "longrope"
    allowed = ("default", "longrope") if model_type == "phi3" else ROPE_TYPES[:-1]  # as HF's config classes check
    if not isinstance(rope_type, str) or rope_type not in allowed:
        raise fields.fail(f"rope type {rope_type!r} is not supported for {model_type} (supported: {', '.join(allowed)})")
    rope = _Fields(params, fields.source, f"{key}.")
    # v5 keeps theta inside rope_parameters, v4 at the top level. A base of 1 or less has no wavelengths to scale.
    theta = (rope.positive_number("rope_theta", above=1) if "rope_theta" in params
             else fields.positive_number("rope_theta", 10000.0, above=1))
    params.pop("rope_theta", None)
    unknown = sorted(set(params) - {f.name for f in dataclasses.fields(RopeConfig)})
    if unknown:
        raise fields.fail(f"unknown rope parameter(s) {unknown} for rope type {rope_type!r}")
    needs = {"linear": ["factor"], "dynamic": ["factor"], "yarn": ["factor"],
             "llama3": ["factor", "low_freq_factor", "high_freq_factor"],
             "longrope": ["short_factor", "long_factor"]}.get(rope_type, [])
    for name in needs:
        if name not in params:
            raise fields.fail(f"rope type {rope_type!r} needs '{name}' (in '{key}')")
    values: dict[str, Any] = {}
    for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor",
                 "mscale", "mscale_all_dim"):
        if name in params:
            values[name] = rope.positive_number(name)
    if "truncate" in params:
        values["truncate"] = rope.boolean("truncate")
    for name in ("short_factor", "long_factor"):
        if name in params:
            values[name] = rope.factors(name, rotary_dim // 2)
    if rope_type in ("llama3", "yarn", "longrope"):  # HF falls back to max_position_embeddings
        # Phi-3 keeps the pretraining length at the top level, and HF lets that one win.
        top_first = model_type == "phi3" and "original_max_position_embeddings" in data
        values["original_max_position_embeddings"] = (
            rope.positive_int("original_max_position_embeddings")
            if "original_max_position_embeddings" in params and not top_first
            else fields.positive_int("original_max_position_embeddings", max_pos))
    if rope_type == "longrope" and "factor" not in values:  # HF: the ratio of the two lengths
        values["factor"] = max_pos / values["original_max_position_embeddings"]
    result = RopeConfig(rope_type=rope_type, theta=theta, **values)
    if rope_type == "llama3" and result.high_freq_factor <= result.low_freq_factor:
        raise fields.fail(f"rope parameters: high_freq_factor ({result.high_freq_factor}) must be larger than "
                          f"low_freq_factor ({result.low_freq_factor})")
    return result
