"""Mixture-of-experts families with grouped-query attention (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) through the one
forward, each against Transformers' own model class (its eager experts loop, the reference form).

Checkpoints are made by Transformers itself and every weight redrawn (parity.random_checkpoint), so routers choose
differently per token and every expert, shared expert and gate moves the logits.
"""

import dataclasses
import functools

import numpy as np
import pytest

from family_util import assert_logits_match, checkpoints_fixture, compare_with_padding, random_ids
from jaxllm import parity
from jaxllm.generation import generate
from jaxllm.loader import load

BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=1)
FAMILIES = {  # name -> config changes; E experts, k chosen, F an expert's width
    "mixtral": dict(model_type="mixtral", num_local_experts=5, num_experts_per_tok=2, intermediate_size=24,
                    sliding_window=5),
    # Layer 1 is a dense MLP (mlp_only_layers); the others experts plus a gated shared expert; weights not renormalised.
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=40, mlp_only_layers=[1]),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16,
                      head_dim=12, norm_topk_prob=True),
    # decoder_sparse_step 2: layers 1 and 3 are experts, 0 and 2 dense.
    "qwen3_moe-sparse-step": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=1,
                                  moe_intermediate_size=24, decoder_sparse_step=2, num_hidden_layers=4,
                                  use_sliding_window=True, sliding_window=4),
    "olmoe": dict(model_type="olmoe", num_experts=6, num_experts_per_tok=2, intermediate_size=16, clip_qkv=0.3),
}
GENERATE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
SCALE = 0.08
TOLERANCE = 1e-5


checkpoints = checkpoints_fixture(BASE, FAMILIES, SCALE)  # name -> its checkpoint's path; seed len(name)


ids_for = functools.partial(random_ids, BASE["vocab_size"])  # (batch, T, seed=0) -> ids


def test_configs_read_the_expert_layout(checkpoints):
    qwen2 = load(checkpoints("qwen2_moe")).config
    assert (qwen2.num_experts, qwen2.num_experts_per_tok, qwen2.moe_intermediate_size) == (6, 2, 16)
    assert qwen2.moe_layers == (True, False, True) and qwen2.shared_expert_gated and not qwen2.norm_topk_prob
    assert load(checkpoints("qwen3_moe-sparse-step")).config.moe_layers == (False, True, False, True)
    mixtral = load(checkpoints("mixtral")).config
    assert mixtral.norm_topk_prob and mixtral.moe_intermediate_size == 24  # Mixtral always renormalises
    olmoe = load(checkpoints("olmoe")).config
    assert olmoe.qk_norm_full and olmoe.clip_qkv == 0.3


def test_expert_weights_are_stacked_expert_major(checkpoints):
    from safetensors.numpy import load_file

    path = checkpoints("qwen2_moe")
    params, tensors = load(path), load_file(str(path / "model.safetensors"))
    layer, p = params.layers[2], "model.layers.2.mlp."
    assert layer.experts_gate_up.shape == (6, 16, 2, 48) and layer.experts_down.shape == (6, 48, 16)
    np.testing.assert_array_equal(layer.experts_gate_up[4, :, 0], tensors[p + "experts.4.gate_proj.weight"])
    np.testing.assert_array_equal(layer.experts_gate_up[4, :, 1], tensors[p + "experts.4.up_proj.weight"])
    np.testing.assert_array_equal(layer.experts_down[5], tensors[p + "experts.5.down_proj.weight"])
    np.testing.assert_array_equal(layer.gate_up_proj[:, 0], tensors[p + "shared_expert.gate_proj.weight"])
    assert params.layers[1].router is None and params.layers[1].gate_up_proj.shape == (64, 2, 48)  # the dense layer


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers(checkpoints, name):
    """Every position of a 2 x 13 batch, and of a left-padded one, within 1e-5 of Transformers fp32 with its eager
    experts; and as close to Transformers' float64 run as Transformers' own fp32 run is."""
    path = checkpoints(name)
    params, reference = load(path), parity.reference_model(path)
    assert reference.config._experts_implementation == "eager"
    ids = ids_for(2, 13)
    assert_logits_match(name, *compare_with_padding(params, reference, ids), TOLERANCE, float64=(path, ids))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_ladder_finds_no_divergent_rung(checkpoints, name):
    result = parity.ladder(checkpoints(name), ids_for(1, 13))
    config = load(checkpoints(name)).config
    names = [r["name"] for r in result["rungs"]]
    assert names == parity.rung_names(config)
    moe = next(i for i in range(config.num_hidden_layers) if config.is_moe(i))
    assert f"layers.{moe}.router_logits" in names and f"layers.{moe}.chosen_experts" in names
    assert (f"layers.{moe}.shared_expert" in names) == (config.shared_expert_intermediate_size > 0)
    assert result["first_divergent"] is None, parity.format_ladder(result)


@pytest.mark.parametrize("family", GENERATE)
def test_cached_greedy_decode_equals_transformers_generate(checkpoints, family):
    path = checkpoints(family)
    params, reference = load(path), parity.reference_model(path)
    prompt = ids_for(1, 14, seed=1)[0].tolist()
    ours = generate(params, prompt, 24, eos_ids=()).tokens
    assert ours == parity.reference_greedy(reference, prompt, 24, ())
    if params.config.sliding_window is not None:
        assert len(set(ours)) > 2, "a constant continuation would not exercise the window"


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_left_padded_batch_equals_each_prompt_alone(checkpoints, family):
    """Routing is per token: a row's experts do not depend on its neighbours or on padding."""
    params = load(checkpoints(family))
    prompts = [ids_for(1, 14, seed=2)[0].tolist(), ids_for(1, 3, seed=3)[0].tolist(), ids_for(1, 9, seed=4)[0].tolist()]
    batch = generate(params, prompts, 16, eos_ids=())
    for prompt, result in zip(prompts, batch):
        assert result.tokens == generate(params, prompt, 16, eos_ids=()).tokens


# ---- injected bugs: the ladder names the component -------------------------------------------------------------


@pytest.mark.parametrize("family, changes, rung", [
    ("qwen2_moe", dict(norm_topk_prob=True), "layers.0.routing_weights"),  # a renormalisation Qwen2-MoE does not do
    ("mixtral", dict(norm_topk_prob=False), "layers.0.routing_weights"),  # Mixtral's renormalisation dropped
    ("qwen2_moe", dict(shared_expert_gated=False), "layers.0.mlp"),  # the shared expert's sigmoid gate ignored
    ("olmoe", dict(clip_qkv=None), "layers.0.v_proj"),  # clip_qkv dropped: v is clamped first
])
def test_ladder_names_the_rung_of_an_injected_bug(checkpoints, family, changes, rung):
    path = checkpoints(family)
    params = load(path)
    wrong = params.replace(config=dataclasses.replace(params.config, **changes))
    if changes.get("shared_expert_gated") is False:
        wrong = wrong.replace(layers=tuple(layer.replace(shared_expert_gate=None) for layer in wrong.layers))
    result = parity.ladder(wrong, ids_for(1, 13), reference=parity.reference_model(path))
    assert result["first_divergent"] == rung, parity.format_ladder(result)


def test_inspect_shows_the_expert_fields_and_map(checkpoints, capsys):
    from jaxllm.cli import main

    assert main(["inspect", "--model", str(checkpoints("qwen2_moe"))]) == 0
    out = capsys.readouterr().out
    family = out[out.index("family qwen2_moe"):out.index("tensors (")]
    for line in ("num_experts                6", "num_experts_per_tok        2", "moe_intermediate_size      16",
                 "moe_layers                 (True, False, True)", "shared_expert_intermediate_size 40"):
        assert line in family, family
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in out and "-> layers[0].experts_gate_up[3:4, :, 1:2]" in out
