"""Bad input gets a clear error naming the culprit: config fields, tensors with both shapes, pickles, token ids."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxllm import parity
from jaxllm.config import REQUIRED_SHAPE_FIELDS, LLMConfig
from jaxllm.errors import CheckpointError, ConfigError, InputError
from jaxllm.loader import load
from jaxllm.model import forward

CONFIGS = Path(__file__).parent.parent / "configs"
BASE = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def write_config(tmp_path, **changes):
    data = {k: v for k, v in {**BASE, **changes}.items() if v is not ...}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return parity.random_checkpoint(BASE, tmp_path_factory.mktemp("ckpt"), scale=0.3)


def test_shipped_configs_parse():
    tiny = LLMConfig.from_json(CONFIGS / "tinyllama-1.1b.json")
    assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.num_attention_heads, tiny.num_key_value_heads) == (22, 2048, 32, 4)
    assert (tiny.intermediate_size, tiny.vocab_size, tiny.tie_word_embeddings, tiny.rope.theta) == (5632, 32000, False, 1e4)
    smol = LLMConfig.from_json(CONFIGS / "smollm2-135m.json")
    assert (smol.num_hidden_layers, smol.hidden_size, smol.num_attention_heads, smol.num_key_value_heads) == (30, 576, 9, 3)
    assert (smol.head_dim, smol.tie_word_embeddings, smol.rope.theta, smol.vocab_size) == (64, True, 1e5, 49152)
    assert smol.num_groups == 3  # G = N // K
    llama = LLMConfig.from_json(CONFIGS / "llama-3.2-1b.json")
    assert llama.rope.rope_type == "llama3" and llama.rope.factor == 32.0 and llama.tie_word_embeddings
    assert llama.rope.original_max_position_embeddings == 8192 and llama.eos_token_ids == (128001,)


def test_optional_fields_take_hf_defaults(tmp_path):
    c = LLMConfig.from_json(write_config(tmp_path, num_key_value_heads=...))
    assert c.num_key_value_heads == 4 and c.head_dim == 8 and c.rms_norm_eps == 1e-6
    assert c.rope.rope_type == "default" and c.rope.theta == 10000.0 and not c.tie_word_embeddings
    assert LLMConfig.from_json(write_config(tmp_path, eos_token_id=[2, 7])).eos_token_ids == (2, 7)


@pytest.mark.parametrize("field", REQUIRED_SHAPE_FIELDS)
def test_missing_shape_field_is_named(tmp_path, field):
    path = write_config(tmp_path, **{field: ...})
    with pytest.raises(ConfigError, match=rf"{path}.*'{field}' is missing"):
        LLMConfig.from_json(path)


@pytest.mark.parametrize("value", [0, -3, 2.5, "32", True])
def test_non_positive_or_non_integer_shape_field_is_named(tmp_path, value):
    with pytest.raises(ConfigError, match=r"'hidden_size' must be a positive integer"):
        LLMConfig.from_json(write_config(tmp_path, hidden_size=value))


@pytest.mark.parametrize("changes, message", [
    (dict(num_key_value_heads=3), r"num_attention_heads \(4\) must be divisible by num_key_value_heads \(3\)"),
    (dict(model_type="jamba"), r"model_type 'jamba' is not supported; jaxllm runs llama, mistral"),
    (dict(model_type="gemma3"), r"model_type 'gemma3' is Gemma 3's multimodal model"),
    (dict(model_type=...), r"required field 'model_type' is missing"),
    (dict(hidden_act="gelu_new"), r"hidden_act 'gelu_new' is not supported"),
    (dict(model_type="gemma2", hidden_activation="relu"), r"hidden_activation 'relu' is not supported"),
    (dict(model_type="qwen3", num_experts=8), r"field 'num_experts' = 8 describes mixture of experts"),
    (dict(model_type="mistral", num_local_experts=8), r"'num_local_experts' = 8 describes mixture of experts"),
    (dict(vision_config={"hidden_size": 8}), r"'vision_config' = .* describes a multimodal model"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True), r"describes bidirectional attention"),
    (dict(model_type="qwen2", rope_scaling=dict(type="mrope", mrope_section=[1, 1, 2])), r"rope type 'mrope' is not"),
    (dict(model_type="ministral", sliding_window=4, layer_types=["chunked_attention", "full_attention"]),
     r"'layer_types' holds \"chunked_attention\"; each entry must be an attention type"),
    (dict(model_type="ministral", layer_types=["full_attention"]), r"'layer_types' must be a list of 2 values"),
    (dict(model_type="ministral", sliding_window=None, layer_types=["sliding_attention"] * 2),
     r"names sliding_attention layers but 'sliding_window' is null"),
    (dict(model_type="smollm3", no_rope_layers=[1, 2]), r"'no_rope_layers' holds 2; each entry must be 0 or 1"),
    (dict(model_type="gemma2", attn_logit_softcapping=-1.0), r"'attn_logit_softcapping' must be a positive number"),
    (dict(model_type="phi3", partial_rotary_factor=0.2), r"partial_rotary_factor 0.2 gives 1 rotary dims"),
    (dict(partial_rotary_factor=0.5), r"partial_rotary_factor 0.5 is not supported for llama models"),
    (dict(model_type="phi3", rope_scaling=dict(type="longrope", short_factor=[1.0] * 4, long_factor=[1.0])),
     r"'rope_scaling.long_factor' must be a list of 4 numbers"),
    (dict(rope_scaling=dict(type="longrope", factor=2.0)), r"rope type 'longrope' is not supported"),
    (dict(rope_parameters=dict(rope_type="linear")), r"rope type 'linear' needs 'factor'"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, warp=1)), r"unknown rope parameter\(s\) \['warp'\]"),
    (dict(hidden_size=30, head_dim=...), r"hidden_size \(30\) is not divisible by num_attention_heads \(4\)"),
    (dict(eos_token_id="</s>"), r"'eos_token_id' must be a token id"),
])
def test_invalid_config_is_explained(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        LLMConfig.from_json(write_config(tmp_path, **changes))


def test_unreadable_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        LLMConfig.from_json(tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"nowhere.json: config file not found"):
        LLMConfig.from_json(tmp_path / "nowhere.json")


def rewrite_tensors(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(checkpoint, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)  # HF buffer: ignored
        t["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)

    with pytest.raises(CheckpointError) as err:
        load(rewrite_tensors(checkpoint, tmp_path / "bad", edit))
    message = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight (expected [48, 32])" in message
    assert "model.layers.0.self_attn.extra.weight [2, 2]" in message
    assert "model.layers.0.self_attn.k_proj.weight: expected [16, 32], found [32, 32]" in message
    assert "inv_freq" not in message


def test_untied_checkpoint_without_lm_head_is_refused(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=r"missing tensors:\n  lm_head.weight \(expected \[64, 32\]\)"):
        load(rewrite_tensors(checkpoint, tmp_path / "nohead", lambda t: t.pop("lm_head.weight")))


def test_non_float_tensor_is_refused(checkpoint, tmp_path):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)

    with pytest.raises(CheckpointError, match=r"tensor model.norm.weight has dtype I32"):
        load(rewrite_tensors(checkpoint, tmp_path / "int", edit))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    # Not even a valid pickle: if the loader tried to unpickle it, the error would be a different one.
    (tmp_path / name).write_bytes(b"\x80\x04 this would run code if unpickled")
    with pytest.raises(CheckpointError, match=rf"{name}: refusing to load a pickle checkpoint: unpickling can execute"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match=r"refusing to load a pickle checkpoint"):
        load(tmp_path / name)


def test_directory_without_weights_is_explained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(CheckpointError, match=r"no model.safetensors, sharded index or .gguf file found"):
        load(tmp_path)


def test_sharded_index_with_absent_shard_is_explained(checkpoint, tmp_path):
    d = rewrite_tensors(checkpoint, tmp_path / "idx", lambda t: None)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    names = load_file(d / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names} | {"lm_head.weight": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"shard file\(s\) listed but not found: model-00002-of-00002.safetensors"):
        load(d)


def test_out_of_vocabulary_token_id_is_named(checkpoint):
    params = load(checkpoint)
    with pytest.raises(InputError, match=r"token id 64 at \[0, 2\] is outside the vocabulary \[0, 64\)"):
        forward(params, np.array([[1, 2, 64]]), np.arange(3)[None])
    with pytest.raises(InputError, match=r"token id -1"):
        forward(params, np.array([[-1, 2]]), np.arange(2)[None])


def test_malformed_inputs_are_explained(checkpoint):
    params = load(checkpoint)
    with pytest.raises(InputError, match=r"positions must have the shape of ids \(1, 3\), found \(1, 2\)"):
        forward(params, np.array([[1, 2, 3]]), np.arange(2)[None])
    with pytest.raises(InputError, match=r"ids must be \[B, T\], found shape \(3,\)"):
        forward(params, np.array([1, 2, 3]), np.arange(3))
    with pytest.raises(InputError, match=r"ids must be integers, found dtype float"):
        forward(params, np.array([[1.0, 2.0]]), np.arange(2)[None])


def test_generate_names_an_out_of_vocabulary_prompt_token(checkpoint):
    from jaxllm.generation import generate

    params = load(checkpoint)
    with pytest.raises(InputError, match=r"token id 64 at position 2 is outside the vocabulary \[0, 64\)"):
        generate(params, [1, 2, 64], 3)
    with pytest.raises(InputError, match=r"token id 70 at prompt 1, position 0 is outside"):
        generate(params, [[1, 2], [70]], 3)


def test_generate_rejects_bad_arguments_by_name(checkpoint):
    from jaxllm.generation import Sampling, generate

    params = load(checkpoint)
    with pytest.raises(InputError, match=r"max_new_tokens must be a positive integer, found 2.5"):
        generate(params, [1, 2], 2.5)
    with pytest.raises(InputError, match=r"max_new_tokens must be a positive integer, found 0"):
        generate(params, [1, 2], 0)
    with pytest.raises(InputError, match=r"top_k \(100\) is larger than the vocabulary \(64\)"):
        generate(params, [1, 2], 3, sampling=Sampling(temperature=1.0, top_k=100))
    with pytest.raises(InputError, match=r"eos id\(s\) \[99\] outside the vocabulary"):
        generate(params, [1, 2], 3, eos_ids=[99])
    with pytest.raises(InputError, match=r"no prompt given"):
        generate(params, [], 3)
    with pytest.raises(InputError, match=r"prompt 0 holds no tokens"):
        generate(params, [[]], 3)
    with pytest.raises(InputError, match=r"a text prompt needs a tokenizer"):
        generate(params, "hello", 3)
    with pytest.raises(InputError, match=r"prompt 1 must be a string or a sequence of integer token ids, found float"):
        generate(params, [[1, 2], 3.5], 3)


def test_generate_accepts_arrays_and_sets_as_users_hold_them(checkpoint):
    from jaxllm.generation import generate

    params = load(checkpoint)
    expected = generate(params, [3, 4, 5], 6, eos_ids=[2]).tokens
    assert generate(params, np.array([3, 4, 5]), 6, eos_ids={2}).tokens == expected
    assert generate(params, (3, 4, 5), 6, eos_ids=frozenset([2])).tokens == expected


def test_forward_accepts_a_plain_list_attention_mask(checkpoint):
    params = load(checkpoint)
    ids, positions = [[1, 2, 3]], [[0, 1, 2]]
    with_mask, without = forward(params, ids, positions, [[1, 1, 1]]), forward(params, ids, positions)
    assert np.abs(np.asarray(with_mask) - np.asarray(without)).max() < 1e-5
