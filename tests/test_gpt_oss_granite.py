"""gpt-oss and Granite-MoE through the one forward, against Transformers' GptOssForCausalLM and
GraniteMoeForCausalLM (fp32, eager attention, eager expert loop).

gpt-oss: attention sinks, q/k/v/o biases, sliding and full layers alternating, YaRN (truncate false), a biased
router that softmaxes its top k logits, experts with biases and a clamped SwiGLU. Granite: embedding, attention,
residual and logits multipliers, the same top-k-then-softmax router, experts fused gate-then-up.
Checkpoints are made by Transformers itself with every weight redrawn (sinks and biases included); the SwiGLU limit
is set low enough that the clamp bites, and the window is smaller than the sequences.
"""

import dataclasses
import functools
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from family_util import assert_logits_match, checkpoints_fixture, compare_with_padding, random_ids
from jaxllm import mxfp4, parity
from jaxllm.generation import generate
from jaxllm.loader import load
from jaxllm.model import experts

BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=1)
FAMILIES = {
    # hidden_size 64: MXFP4 packs 32 values of `in` a block (D for gate_up, F for down).
    "gpt_oss": dict(model_type="gpt_oss", num_local_experts=5, num_experts_per_tok=2, head_dim=12, sliding_window=5,
                    swiglu_limit=0.6, hidden_size=64),
    "granitemoe": dict(model_type="granitemoe", num_local_experts=5, num_experts_per_tok=2, embedding_multiplier=3.0,
                       attention_multiplier=0.2, residual_multiplier=0.7, logits_scaling=0.5,
                       attention_bias=True),
}
SCALE = 0.08  # logits reach 1.5-4
TOLERANCE = 1e-5


checkpoints = checkpoints_fixture(BASE, FAMILIES, SCALE, seed=3)  # name -> its checkpoint's path


@pytest.fixture(scope="module")
def references(checkpoints):
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = parity.reference_model(checkpoints(name))
        return made[name]
    return get


ids_for = functools.partial(random_ids, BASE["vocab_size"])  # (batch, T, seed=0) -> ids


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers(checkpoints, references, name):
    """Every position of a 2 x 13 batch, and of the same batch with row 1 left-padded, within 1e-5."""
    params, reference = load(checkpoints(name)), references(name)
    assert_logits_match(name, *compare_with_padding(params, reference, ids_for(2, 13)), TOLERANCE)


def test_gpt_oss_checkpoint_fills_every_family_field(checkpoints):
    params = load(checkpoints("gpt_oss"))
    config, layer = params.config, params.layers[0]
    assert config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (config.rope.rope_type, config.rope.truncate, config.router) == ("yarn", False, "topk_softmax")
    E, F, D, N = 5, BASE["intermediate_size"], 64, BASE["num_attention_heads"]
    assert layer.experts_gate_up.shape == (E, F, 2, D) and layer.experts_gate_up_bias.shape == (E, F, 2)
    assert layer.experts_down.shape == (E, D, F) and layer.experts_down_bias.shape == (E, D)
    assert layer.router_bias.shape == (E,) and layer.sinks.shape == (N,) and layer.o_bias.shape == (D,)
    assert np.abs(np.asarray(layer.sinks)).min() > 0  # drawn, not left at an initial value


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_chosen_experts_equal_every_expert_weighted(checkpoints, name):
    """experts_chosen (the forward's) and experts_all (the reference form) agree, biases and clamp included."""
    params = load(checkpoints(name))
    config, layer = params.config, params.layers[1]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, config.hidden_size)), jnp.float32)
    _, weights, chosen = experts.route(layer, x, config)
    np.testing.assert_allclose(experts.experts_chosen(layer, x, weights, chosen, config),
                               experts.experts_all(layer, x, weights, chosen, config), atol=1e-6)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_ladder_finds_no_divergent_rung(checkpoints, references, name):
    params = load(checkpoints(name))
    result = parity.ladder(params, ids_for(1, 13), reference=references(name))
    assert [r["name"] for r in result["rungs"]] == parity.rung_names(params.config)
    assert result["first_divergent"] is None, parity.format_ladder(result)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cached_greedy_decode_equals_transformers_generate(checkpoints, references, name):
    """A 14-token prompt (longer than gpt-oss's window of 5) and 24 new tokens from the KV cache."""
    params = load(checkpoints(name))
    prompt = ids_for(1, 14, seed=1)[0].tolist()
    ours = generate(params, prompt, 24, eos_ids=()).tokens
    assert ours == parity.reference_greedy(references(name), prompt, 24, ())
    assert len(set(ours)) > 2, "a constant continuation would not exercise the cache"


# ---- injected bugs: the ladder names the component -------------------------------------------------------


def first_divergent(params, references, name, config_changes=None, layer_changes=None):
    if config_changes:
        params = params.replace(config=dataclasses.replace(params.config, **config_changes))
    if layer_changes:
        params = params.replace(layers=tuple(layer.replace(**layer_changes) for layer in params.layers))
    return parity.ladder(params, ids_for(1, 13), reference=references(name))["first_divergent"]


@pytest.mark.parametrize("config_changes, layer_changes, rung", [
    (None, dict(sinks=None), "layers.0.attn"),  # no sink in the softmax
    (dict(swiglu_limit=1e9), None, "layers.0.experts"),  # an unclamped SwiGLU
    (None, dict(router_bias=None), "layers.0.router_logits"),
])
def test_gpt_oss_bugs_are_caught_at_their_rung(checkpoints, references, config_changes, layer_changes, rung):
    params = load(checkpoints("gpt_oss"))
    assert first_divergent(params, references, "gpt_oss", config_changes, layer_changes) == rung


@pytest.mark.parametrize("config_changes, rung", [
    (dict(embed_scale=1.0), "embed"),
    (dict(attention_multiplier=None), "layers.0.attn"),  # head_dim ** -0.5 instead
    (dict(residual_multiplier=1.0), "layers.0.attn_residual"),
])
def test_granite_multiplier_dropped_is_caught_at_its_rung(checkpoints, references, config_changes, rung):
    params = load(checkpoints("granitemoe"))
    assert first_divergent(params, references, "granitemoe", config_changes) == rung


# ---- MXFP4: gpt-oss's published experts ------------------------------------------------------------------


def test_mxfp4_dequantization_equals_transformers():
    torch = pytest.importorskip("torch")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 8, 2, 16), dtype=np.uint8)  # [E, out, G, 16]: every FP4 code
    scales = rng.integers(100, 150, (3, 8, 2), dtype=np.uint8)  # 2 ** (scale - 127)
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    assert np.array_equal(mxfp4.dequantize(blocks, scales).swapaxes(-1, -2), theirs.numpy())  # [E, in, out]


def test_mxfp4_checkpoint_matches_transformers(checkpoints, tmp_path):
    """The gpt-oss checkpoint with its experts replaced by random MXFP4 blocks and scales, as published gpt-oss
    checkpoints store them; Transformers dequantizes them to fp32 (no Triton kernels here), and so does jaxllm."""
    path = shutil.copytree(checkpoints("gpt_oss"), tmp_path / "mxfp4")
    tensors, rng = load_file(path / "model.safetensors"), np.random.default_rng(1)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, I, O = tensors.pop(name).shape  # [E, in, out]
        tensors[name + "_blocks"] = rng.integers(0, 256, (E, O, I // 32, 16), dtype=np.uint8)
        tensors[name + "_scales"] = rng.integers(118, 123, (E, O, I // 32), dtype=np.uint8)  # values up to ~0.1
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    result = parity.compare(load(path), parity.reference_model(path), ids_for(2, 13))
    print(f"gpt_oss mxfp4: max_abs_diff={result.max_abs_diff:.3g}, logits reach {np.abs(result.reference).max():.1f}")
    assert result.max_abs_diff <= TOLERANCE and result.argmax_agreement == 1.0
