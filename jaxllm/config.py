"""LLMConfig: the static, hashable description of a LLaMA-family model, read from an HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from jaxllm.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama",)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
MAX_SIZE = 2**31 - 1  # the largest size, count or position a config may give
FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38  # float32's smallest normal and largest
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
        """Validate an HF config dict (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`). Every value is
        checked for its JSON type and range; a value that is present but invalid is an error, never a default."""
        fields = _Fields(data, source)
        model_type = data.get("model_type")
        if model_type is None:
            raise fields.fail(f"required field 'model_type' is missing (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise fields.fail(
                f"model_type {model_type!r} is not supported; jaxllm runs {', '.join(SUPPORTED_MODEL_TYPES)} models "
                "(Mistral, Qwen, Gemma and other families differ in attention or norms and are refused)"
            )
        for name in REQUIRED_SHAPE_FIELDS:
            if data.get(name) is None:
                raise fields.fail(f"required field '{name}' is missing")
        shape = {name: fields.positive_int(name) for name in REQUIRED_SHAPE_FIELDS}
        heads = shape["num_attention_heads"]
        kv_heads = fields.positive_int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise fields.fail(f"num_attention_heads ({heads}) must be divisible by num_key_value_heads ({kv_heads})")
        if data.get("head_dim") is not None:  # an explicit head_dim wins over hidden_size // heads, as in HF
            head_dim = fields.positive_int("head_dim")
        elif shape["hidden_size"] % heads:
            raise fields.fail(f"hidden_size ({shape['hidden_size']}) is not divisible by num_attention_heads ({heads})")
        else:
            head_dim = shape["hidden_size"] // heads
        if head_dim % 2:
            raise fields.fail(f"head_dim must be even for rotary embeddings, found {head_dim}")
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise fields.fail(f"hidden_act {act!r} is not supported; LLaMA's SwiGLU MLP uses 'silu'")
        if data.get("pretraining_tp", 1) not in (1, None) or isinstance(data.get("pretraining_tp"), bool):
            raise fields.fail("pretraining_tp != 1 is not supported (it changes the MLP's numerics)")
        max_pos = fields.positive_int("max_position_embeddings", 2048)
        rope = _rope_config(fields, max_pos)
        if rope.rope_type == "dynamic" and head_dim <= 2:  # its base grows as a power of head_dim / (head_dim - 2)
            raise fields.fail(f"dynamic RoPE needs head_dim > 2, found {head_dim}")
        return cls(
            **shape,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=fields.positive_number("rms_norm_eps", 1e-6),
            max_position_embeddings=max_pos,
            tie_word_embeddings=fields.boolean("tie_word_embeddings", False),
            attention_bias=fields.boolean("attention_bias", False),
            mlp_bias=fields.boolean("mlp_bias", False),
            eos_token_ids=fields.token_ids("eos_token_id"),
            rope=rope,
        )


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

    def token_ids(self, name: str) -> tuple[int, ...]:
        value = self.data.get(name)
        values = [] if value is None else value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise self._refuse(name, "a token id or a list of them", value)
        return tuple(values)


def _rope_config(fields: _Fields, max_pos: int) -> RopeConfig:
    """Both formats: v5 `rope_parameters`, and v4 top-level `rope_theta` plus `rope_scaling` (`type` = `rope_type`)."""
    data = fields.data
    key = "rope_parameters" if data.get("rope_parameters") is not None else "rope_scaling"
    params = data.get(key) or {}
    if not isinstance(params, dict):
        raise fields.fail(f"field '{key}' must be an object, found {json.dumps(params, default=repr)}")
    params = {k: v for k, v in params.items() if v is not None}
    legacy_type = params.pop("type", None)  # v4's name for rope_type
    rope_type = params.pop("rope_type", legacy_type if legacy_type is not None else "default")
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise fields.fail(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    rope = _Fields(params, fields.source, f"{key}.")
    # v5 keeps theta inside rope_parameters, v4 at the top level. A base of 1 or less has no wavelengths to scale.
    theta = (rope.positive_number("rope_theta", above=1) if "rope_theta" in params
             else fields.positive_number("rope_theta", 10000.0, above=1))
    params.pop("rope_theta", None)
    partial = params.pop("partial_rotary_factor", data.get("partial_rotary_factor"))
    if partial not in (1, 1.0, None) or isinstance(partial, bool):
        raise fields.fail(f"partial_rotary_factor {partial!r} is not supported: LLaMA models rotate the whole head")
    unknown = sorted(set(params) - {f.name for f in dataclasses.fields(RopeConfig)})
    if unknown:
        raise fields.fail(f"unknown rope parameter(s) {unknown} for rope type {rope_type!r}")
    needs = {"linear": ["factor"], "dynamic": ["factor"], "yarn": ["factor"],
             "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}.get(rope_type, [])
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
    if rope_type in ("llama3", "yarn"):  # HF falls back to max_position_embeddings for both
        values["original_max_position_embeddings"] = (
            rope.positive_int("original_max_position_embeddings") if "original_max_position_embeddings" in params
            else fields.positive_int("original_max_position_embeddings", max_pos))
    result = RopeConfig(rope_type=rope_type, theta=theta, **values)
    if rope_type == "llama3" and result.high_freq_factor <= result.low_freq_factor:
        raise fields.fail(f"rope parameters: high_freq_factor ({result.high_freq_factor}) must be larger than "
                          f"low_freq_factor ({result.low_freq_factor})")
    return result
