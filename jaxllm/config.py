"""LLMConfig: the static, hashable description of a LLaMA-family model, read from an HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxllm.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama",)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# Transformers silently defaults these to Llama-7B sizes; a checkpoint without them is broken, not 7B.
REQUIRED_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, in Transformers' `rope_parameters` vocabulary."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0  # linear, dynamic, llama3, yarn
    original_max_position_embeddings: int | None = None  # llama3, yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: scales cos/sin; derived from factor/mscale when None
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Shapes and hyper-parameters of a decoder-only LLaMA model. Frozen and hashable: safe as a jit static argument."""

    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    num_key_value_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of these
    rope: RopeConfig = RopeConfig()

    @property
    def num_groups(self) -> int:
        """G = N // K: query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_json(cls, path: str | Path) -> "LLMConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config dict>") -> "LLMConfig":
        """Validate an HF config dict (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""

        def fail(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        def positive_int(name: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise fail(f"field '{name}' must be a positive integer, found {value!r}")
            return value

        model_type = data.get("model_type")
        if model_type is None:
            raise fail(f"required field 'model_type' is missing (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise fail(
                f"model_type {model_type!r} is not supported; jaxllm runs {', '.join(SUPPORTED_MODEL_TYPES)} models "
                "(Mistral, Qwen, Gemma and other families differ in attention or norms and are refused)"
            )
        for name in REQUIRED_SHAPE_FIELDS:
            if data.get(name) is None:
                raise fail(f"required field '{name}' is missing")
        shape = {name: positive_int(name, data[name]) for name in REQUIRED_SHAPE_FIELDS}
        heads = shape["num_attention_heads"]
        kv_heads = positive_int("num_key_value_heads", data.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise fail(f"num_attention_heads ({heads}) must be divisible by num_key_value_heads ({kv_heads})")
        if data.get("head_dim") is not None:  # an explicit head_dim wins over hidden_size // heads, as in HF
            head_dim = positive_int("head_dim", data["head_dim"])
        elif shape["hidden_size"] % heads:
            raise fail(f"hidden_size ({shape['hidden_size']}) is not divisible by num_attention_heads ({heads})")
        else:
            head_dim = shape["hidden_size"] // heads
        if head_dim % 2:
            raise fail(f"head_dim must be even for rotary embeddings, found {head_dim}")
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise fail(f"hidden_act {act!r} is not supported; LLaMA's SwiGLU MLP uses 'silu'")
        if data.get("pretraining_tp", 1) not in (1, None):
            raise fail("pretraining_tp != 1 is not supported (it changes the MLP's numerics)")
        eps = data.get("rms_norm_eps", 1e-6)
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise fail(f"field 'rms_norm_eps' must be a positive number, found {eps!r}")
        max_pos = positive_int("max_position_embeddings", data.get("max_position_embeddings", 2048))
        return cls(
            **shape,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(eps),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            attention_bias=bool(data.get("attention_bias", False)),
            mlp_bias=bool(data.get("mlp_bias", False)),
            eos_token_ids=_token_ids(data.get("eos_token_id"), "eos_token_id", fail),
            rope=_rope_config(data, max_pos, fail),
        )


def _token_ids(value: Any, name: str, fail) -> tuple[int, ...]:
    values = [] if value is None else value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise fail(f"field '{name}' must be a token id or a list of them, found {value!r}")
    return tuple(values)


def _rope_config(data: dict[str, Any], max_pos: int, fail) -> RopeConfig:
    """Both formats: v5 `rope_parameters`, and v4 top-level `rope_theta` plus `rope_scaling` (`type` = `rope_type`)."""
    params = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
    if not isinstance(params, dict):
        raise fail(f"rope parameters must be an object, found {params!r}")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise fail(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    theta = params.pop("rope_theta", None) or data.get("rope_theta", 10000.0)
    if params.pop("partial_rotary_factor", data.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
        raise fail("partial_rotary_factor != 1 is not supported by LLaMA models")
    known = {f.name for f in dataclasses.fields(RopeConfig)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise fail(f"unknown rope parameter(s) {unknown} for rope type {rope_type!r}")
    needs = {"linear": ["factor"], "dynamic": ["factor"], "yarn": ["factor"],
             "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}.get(rope_type, [])
    for name in needs:
        if params.get(name) is None:
            raise fail(f"rope type {rope_type!r} needs '{name}'")
    if rope_type in ("llama3", "yarn"):  # HF falls back to max_position_embeddings for both
        params.setdefault("original_max_position_embeddings", data.get("original_max_position_embeddings", max_pos))
    params = {k: v for k, v in params.items() if v is not None}
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise fail(f"rope_theta must be a positive number, found {theta!r}")
    rope = RopeConfig(rope_type=rope_type, theta=float(theta), **params)
    if rope.factor <= 0 or (rope_type == "llama3" and rope.high_freq_factor <= rope.low_freq_factor):
        raise fail(f"invalid rope parameters {params!r}")
    return rope
