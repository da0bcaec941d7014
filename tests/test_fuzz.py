"""Property-based: generated configs, safetensors headers and GGUF metadata either load with exactly the values the
file holds, or raise a JaxLLMError. No other exception type, no hang (each case runs under a time limit), no crash.
10,500 cases in all from a fixed seed, so CI runs the same cases every time ($JAXLLM_FUZZ_SEED picks others)."""

import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from test_hardening import BASE, small_gguf

from jaxllm import parity
from jaxllm.config import (BIAS_FLAGS, DEEPSEEK, EXPERT_COUNT, FAMILIES, LAYER_TYPES, MOE_FAMILIES, ROPE_TYPES,
                           SUPPORTED_MODEL_TYPES, LLMConfig)
from jaxllm.errors import JaxLLMError
from jaxllm.loader import build_params, load_model, open_checkpoint
from jaxllm.model import rope_inv_freq

CASE_SECONDS = 20
FUZZ_SEED = int(os.environ.get("JAXLLM_FUZZ_SEED", "20261130"))  # another seed explores other cases


@contextlib.contextmanager
def time_limit(seconds: float = CASE_SECONDS):
    """A hang becomes a failure of that case instead of a stuck CI run."""
    def expire(signum, frame):
        raise TimeoutError(f"a generated case ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fuzz(examples: int):
    """`examples` cases from a fixed seed: the same cases on every machine, whatever the checkout's path."""
    def decorate(test):
        return seed(FUZZ_SEED)(settings(max_examples=examples, database=None, deadline=None,
                                        suppress_health_check=list(HealthCheck))(test))
    return decorate


def loads_or_names_its_error(load):
    """load() under the time limit: its result, or None when it raised a JaxLLMError (anything else fails)."""
    with time_limit():
        try:
            loaded = load()
        except JaxLLMError as error:
            event(f"refused: {type(error).__name__}")
            return None
    event("loaded")
    return loaded


# ---- configs ------------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=4)
SIZES = st.integers(-2, 96) | st.sampled_from([0, 1, 2, 4, 8, 32, 64, 2**40]) | JSON
NUMBERS = (st.floats() | st.integers(-3, 10**6) | st.sampled_from([0, 0.0, -1.0, 1e-5, 0.5, 2.0, 8.0, 1e300]) | JSON)
ROPE = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"rope_type": st.sampled_from([*ROPE_TYPES, "su", "mrope", 3, None])},
        optional={**{name: NUMBERS for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast",
                                                "beta_slow", "rope_theta", "attention_factor", "mscale",
                                                "mscale_all_dim", "original_max_position_embeddings", "truncate",
                                                "partial_rotary_factor")},
                  # longrope's per-frequency factors: head_dim 8 takes 4 (2 with partial_rotary_factor 0.5)
                  **{name: st.lists(NUMBERS, min_size=1, max_size=5) | JSON for name in ("short_factor", "long_factor")}}))
COUNTS = st.integers(-1, 9) | st.sampled_from([0, 64, 2**40]) | JSON
PER_LAYER = st.lists(st.sampled_from([*LAYER_TYPES, "chunked_attention", 0, 1, True]), min_size=1, max_size=3) | JSON
FIELDS = {
    **{name: SIZES for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")},
    "rms_norm_eps": NUMBERS, "rope_theta": NUMBERS, "rope_parameters": ROPE, "rope_scaling": ROPE,
    **{name: st.booleans() | JSON for name in ("tie_word_embeddings", "attention_bias", "mlp_bias")},
    "eos_token_id": st.integers(-2, 100) | st.lists(st.integers(-1, 100), max_size=3) | JSON,
    "model_type": st.sampled_from(["llama", *SUPPORTED_MODEL_TYPES, "gemma3", "qwen2_moe", ""]) | JSON,
    "hidden_act": st.sampled_from(["silu", "silu", "gelu", "gelu_new"]) | JSON,
    "hidden_activation": st.sampled_from(["gelu_pytorch_tanh", "silu", "relu"]) | JSON,
    **{name: SIZES for name in ("sliding_window", "max_window_layers", "no_rope_layer_interval",
                                "sliding_window_pattern")},
    **{name: NUMBERS for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                                  "rope_local_base_freq", "partial_rotary_factor")},
    "use_sliding_window": st.booleans() | JSON,
    "layer_types": PER_LAYER, "no_rope_layers": PER_LAYER,
    # Mixtures of experts: the counts by each family's names, the layout and the router's fields.
    **{name: COUNTS for name in ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
                                 "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group",
                                 "decoder_sparse_step")},
    **{name: SIZES for name in ("moe_intermediate_size", "shared_expert_intermediate_size", "kv_lora_rank",
                                "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")},
    "mlp_only_layers": st.lists(st.integers(-2, 3) | JSON, max_size=3) | JSON,
    "norm_topk_prob": st.booleans() | JSON,
    "topk_method": st.sampled_from(["greedy", "group_limited_greedy", "noaux_tc"]) | JSON,
    **{name: NUMBERS for name in ("clip_qkv", "routed_scaling_factor", "swiglu_limit", "embedding_multiplier",
                                  "residual_multiplier", "logits_scaling", "attention_multiplier")},
    "pretraining_tp": st.sampled_from([1, 1, 2, None]) | JSON,
}
LATENT = dict(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
              num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              n_shared_experts=1, first_k_dense_replace=1)
MOE_BASE = {  # what a family's valid config adds to BASE: 4 experts, 2 per token
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, clip_qkv=8.0),
    "deepseek_v2": LATENT,
    "deepseek_v3": {**LATENT, "q_lora_rank": 12, "n_group": 2, "topk_group": 1},
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0,
                       residual_multiplier=0.22, logits_scaling=6.0, attention_multiplier=0.125),
}
CONFIGS = st.builds(  # a valid config of some family with some fields replaced by generated values and some dropped
    lambda family, changes, dropped: {k: v for k, v in {**BASE, "head_dim": 8, "model_type": family,
                                                        **MOE_BASE.get(family, {}), **changes}.items()
                                      if k not in dropped},
    st.sampled_from(SUPPORTED_MODEL_TYPES),
    st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: FIELDS[name] for name in names})),
    st.sets(st.sampled_from(sorted(FIELDS)), max_size=1))


def positive_finite(x) -> bool:
    return math.isfinite(x) and x > 0


def check_experts(config: LLMConfig, data: dict) -> None:
    """A loaded config's experts are the ones its file gives (HF's defaults for what it leaves out), laid out over
    its layers as the family's HF decoder layer lays them; a dense family has none."""
    layers = config.num_hidden_layers
    if config.model_type not in MOE_FAMILIES:
        assert config.num_experts == 0 and config.moe_layers == ()
        return
    given = {**FAMILIES[config.model_type], **data}
    field, alias = EXPERT_COUNT[config.model_type]
    assert config.num_experts == (given[alias] if alias and given.get(alias) is not None else given[field])
    assert 1 <= config.num_experts_per_tok <= config.num_experts
    assert config.num_experts_per_tok == given["num_experts_per_tok"]
    assert len(config.moe_layers) == layers and all(isinstance(m, bool) for m in config.moe_layers)
    assert config.moe_intermediate_size > 0 and config.shared_expert_intermediate_size >= 0
    assert isinstance(config.norm_topk_prob, bool)
    if config.model_type in ("qwen2_moe", "qwen3_moe"):
        step, only = given.get("decoder_sparse_step") or 1, given.get("mlp_only_layers") or []
        assert config.moe_layers == tuple(i not in only and (i + 1) % step == 0 for i in range(layers))
        assert isinstance(given.get("mlp_only_layers"), (list, type(None))) and all(0 <= i < layers for i in only)
    elif config.model_type in DEEPSEEK:
        first = given.get("first_k_dense_replace") or 0
        assert config.moe_layers == tuple(i >= first for i in range(layers))
        assert config.shared_expert_intermediate_size == (given.get("n_shared_experts") or 0) * \
            config.moe_intermediate_size
    else:
        assert all(config.moe_layers)
    if config.model_type in ("qwen2_moe", "qwen3_moe", "olmoe") and given.get("norm_topk_prob") is not None:
        assert config.norm_topk_prob is given["norm_topk_prob"]
    if config.model_type == "olmoe" and given.get("clip_qkv") is not None:
        assert config.clip_qkv == given["clip_qkv"] and positive_finite(config.clip_qkv)
    event(f"loaded with {config.num_experts} experts, {sum(config.moe_layers)} of {layers} layers")


@fuzz(6000)
@given(CONFIGS)
def test_generated_configs_load_as_written_or_raise_a_config_error(data):
    config = loads_or_names_its_error(lambda: LLMConfig.from_dict(json.loads(json.dumps(data))))
    if config is None:
        return
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(config, name) == data[name] and not isinstance(data[name], bool)
    assert config.num_key_value_heads == (data.get("num_key_value_heads") or data["num_attention_heads"])
    assert config.num_attention_heads % config.num_key_value_heads == 0 and config.head_dim % 2 == 0
    assert config.model_type == data["model_type"]
    event(f"loaded as {config.model_type}")
    family_reads = {"attention_bias": config.model_type in BIAS_FLAGS, "mlp_bias": config.model_type in ("llama", "smollm3")}
    given = {**FAMILIES[config.model_type], **data}  # HF's defaults for what the file leaves out (gpt-oss: biases)
    for name in ("attention_bias", "mlp_bias"):  # a JSON boolean, read as written by the families whose modules read it
        assert getattr(config, name) is (family_reads[name] and (given.get(name) or False))
    if data.get("tie_word_embeddings") is not None:
        assert config.tie_word_embeddings is data["tie_word_embeddings"]
    kinds = config.layer_types or ("full_attention",) * config.num_hidden_layers
    assert len(kinds) == config.num_hidden_layers and set(kinds) <= set(LAYER_TYPES)
    assert ("sliding_attention" in kinds) == (config.sliding_window is not None)
    assert not config.no_rope_layers or len(config.no_rope_layers) == config.num_hidden_layers
    assert positive_finite(config.rms_norm_eps) and positive_finite(config.rope.theta)
    check_experts(config, data)
    rope = config.rope
    for value in (rope.factor, rope.low_freq_factor, rope.high_freq_factor, rope.beta_fast, rope.beta_slow):
        assert positive_finite(value)
    # No late failure: the RoPE frequencies this config asks for are finite, beyond max positions too (for a
    # head_dim whose tensors could exist: a larger one fails the checkpoint's shape check before any forward).
    if config.head_dim <= 4096:
        positions = np.array([[0, 1, config.max_position_embeddings + 3]])
        for rope in (config.rope, config.local_rope or config.rope):
            with time_limit():
                inv_freq, scale = rope_inv_freq(config, positions, rope)
            assert np.isfinite(np.asarray(inv_freq)).all() and math.isfinite(scale)


# ---- safetensors headers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A new path per generated case, in one folder; a case's files go when the next case begins (they are
    memory-mapped while loaded, so none is rewritten in place)."""
    folder, numbers, made = tmp_path_factory.mktemp("cases"), itertools.count(), []

    def new(suffix: str = "") -> Path:
        while made:
            old = made.pop()
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        made.append(folder / f"case{next(numbers)}{suffix}")
        return made[-1]

    return new


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A valid safetensors checkpoint's config and file bytes, split into header and data."""
    folder = parity.random_checkpoint(BASE, tmp_path_factory.mktemp("fuzz"), scale=0.3)
    blob = (folder / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return (folder / "config.json").read_text(), json.loads(blob[8:8 + length]), blob[8 + length:]


ENTRY_EDITS = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "X"]) | JSON,
    "shape": st.lists(st.integers(-2, 70), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-4, 70_000), min_size=2, max_size=2) | JSON,
})
# An edit replaces fields of one entry, deletes it (None), or swaps its data with the next tensor of its shape
# ("swap": the file stays valid, and the loader must read the bytes the header now points at).
HEADER_EDITS = st.dictionaries(st.integers(0, 40), ENTRY_EDITS | st.none() | st.just("swap") | st.just("swap"),
                               max_size=2)


@fuzz(2500)
@given(edits=HEADER_EDITS, cut=st.sampled_from([None] * 4) | st.integers(0, 80_000),
       extra=st.just({}) | st.dictionaries(st.text(max_size=12), JSON, max_size=2),
       length_delta=st.sampled_from([0] * 8 + [-1, 1, 2**40]))
def test_generated_safetensors_headers_load_as_stored_or_raise_a_checkpoint_error(stored, scratch, edits, cut, extra,
                                                                                   length_delta):
    config, header, data = stored
    header = json.loads(json.dumps(header))
    names = sorted(k for k in header if k != "__metadata__")
    for index, edit in edits.items():
        name = names[index % len(names)]
        if name not in header:
            continue
        if edit is None:
            del header[name]
        elif edit == "swap":
            same = [n for n in names if n != name and n in header and header[n]["shape"] == header[name]["shape"]]
            if same:
                header[name]["data_offsets"], header[same[0]]["data_offsets"] = (header[same[0]]["data_offsets"],
                                                                                  header[name]["data_offsets"])
        else:
            header[name].update(edit)
    header.update(extra)
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", max(len(raw) + length_delta, 0)) + raw + data
    blob = blob if cut is None else blob[:cut]
    folder = scratch()
    folder.mkdir()
    (folder / "config.json").write_text(config)
    (folder / "model.safetensors").write_bytes(blob)

    def load():
        checkpoint = open_checkpoint(folder)
        return checkpoint, build_params(checkpoint)

    loaded = loads_or_names_its_error(load)
    if loaded is None:
        return
    checkpoint, params = loaded
    start = 8 + len(raw)
    for name, (shape, dtype) in checkpoint.tensors.items():  # every tensor is the bytes its header points at
        begin, end = header[name]["data_offsets"]
        expected = np.frombuffer(blob[start + begin:start + end], {"F32": "<f4", "F16": "<f2", "F64": "<f8"}.get(dtype, "u1"))
        if dtype in ("F32", "F16", "F64"):
            np.testing.assert_array_equal(np.asarray(checkpoint.read(name)), expected.reshape(shape))
    assert params.embed_tokens.shape == (BASE["vocab_size"], BASE["hidden_size"])


# ---- GGUF metadata ------------------------------------------------------------------------------------------

T = gguf.GGUFValueType
GGUF_VALUES = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 2, 8, 16, 32]), st.just(T.UINT32)),
    st.tuples(st.integers(-2**31, 2**31 - 1), st.just(T.INT32)),
    st.tuples(st.floats(width=32), st.just(T.FLOAT32)),
    st.tuples(st.text(max_size=6), st.just(T.STRING)),
    st.tuples(st.booleans(), st.just(T.BOOL)),
    st.tuples(st.lists(st.integers(0, 100), min_size=1, max_size=3), st.just(T.ARRAY), st.just(T.UINT32)),
)
GGUF_KEYS = ["general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
             "llama.feed_forward_length", "llama.vocab_size", "llama.attention.head_count",
             "llama.attention.head_count_kv", "llama.attention.key_length", "llama.rope.dimension_count",
             "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base", "llama.rope.scaling.type",
             "llama.rope.scaling.factor", "tokenizer.ggml.model", "tokenizer.ggml.eos_token_id"]
TOKENIZER = {"tokenizer.ggml.model": ("gpt2", T.STRING), "tokenizer.ggml.tokens": ([chr(97 + i) for i in range(26)] + ["ab"], T.ARRAY, T.STRING),
             "tokenizer.ggml.merges": (["a b"], T.ARRAY, T.STRING)}


@fuzz(2000)
@given(metadata=st.just({}) | st.dictionaries(st.sampled_from(GGUF_KEYS), GGUF_VALUES | st.none(), max_size=2),
       with_tokenizer=st.booleans())
def test_generated_gguf_metadata_loads_as_written_or_raises_a_named_error(scratch, metadata, with_tokenizer):
    path = small_gguf(scratch(".gguf"), {**(TOKENIZER if with_tokenizer else {}), **metadata})

    def load():
        return load_model(path) if with_tokenizer else build_params(open_checkpoint(path))

    loaded = loads_or_names_its_error(load)
    if loaded is None:
        return
    config = (loaded.params if with_tokenizer else loaded).config
    fields = gguf.GGUFReader(path).fields
    assert config.hidden_size == fields["llama.embedding_length"].contents()
    assert config.num_attention_heads == fields["llama.attention.head_count"].contents()
    assert config.num_hidden_layers == fields["llama.block_count"].contents()
    assert config.rms_norm_eps == pytest.approx(fields["llama.attention.layer_norm_rms_epsilon"].contents())
    assert positive_finite(config.rope.theta)
