"""DeepSeek-V2 and V3: multi-head latent attention (model/latent.py) and DeepSeek's routers (model/experts.py), each
against Transformers' own DeepseekV2ForCausalLM / DeepseekV3ForCausalLM.

Checkpoints are made by Transformers itself (random_checkpoint: every weight redrawn, V3's router correction bias
too, so that it changes which experts are chosen). The first layer is dense where first_k_dense_replace says so; the
variants cover V2's greedy and group-limited routing, a plain q_proj (q_lora_rank null), V3's interleaved and
rotate-half RoPE, and YaRN with mscale_all_dim (which scales the scores as well as cos/sin).
"""

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from family_util import assert_logits_match, checkpoints_fixture, compare_with_padding, random_ids
from jaxllm import parity
from jaxllm.config import LLMConfig
from jaxllm.errors import ConfigError
from jaxllm.generation import generate
from jaxllm.loader import load
from jaxllm.model import KVCache, forward, latent, run
from jaxllm.model import experts as experts_module
from jaxllm.model.cache import token_bytes

CONFIGS = Path(__file__).parent.parent / "configs"
# Ranks and head sizes all differ, so a transposed or swapped axis fails on shape; 4 heads of (8 + 4) / 6.
BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=1,
            kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
            moe_intermediate_size=16, first_k_dense_replace=1, rms_norm_eps=1e-5)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, mscale=1.0,
            mscale_all_dim=0.8)
VARIANTS = {  # name -> config changes
    "v2": dict(model_type="deepseek_v2", n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2,
               routed_scaling_factor=1.5),
    "v2-group": dict(model_type="deepseek_v2", topk_method="group_limited_greedy", n_routed_experts=8, n_group=4,
                     topk_group=2, num_experts_per_tok=3, n_shared_experts=1, q_lora_rank=None),
    "v3": dict(model_type="deepseek_v3", n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
               n_shared_experts=1),
    # Every layer experts; HF's rotate-half RoPE; YaRN's mscale_all_dim scales the scores by mscale².
    "v3-yarn": dict(model_type="deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                    first_k_dense_replace=0, rope_interleave=False, rope_parameters=YARN, norm_topk_prob=False),
}
SCALE = 0.08  # logits reach 1.5-4, as in test_families
TOLERANCE = 1e-5


# name -> (checkpoint path, its params, Transformers' model of it)
checkpoints = checkpoints_fixture(BASE, VARIANTS, SCALE, seed=3,
                                  then=lambda path: (path, load(path), parity.reference_model(path)))


ids_for = functools.partial(random_ids, BASE["vocab_size"])  # (batch, T, seed=0) -> ids


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(checkpoints, name):
    """Every position of a 2 x 13 batch, and of a left-padded one, within 1e-5 of Transformers fp32 eager."""
    _, params, reference = checkpoints(name)
    config = params.config
    assert config.kv_lora_rank == 16 and config.moe_layers[0] == (name == "v3-yarn")
    assert_logits_match(name, *compare_with_padding(params, reference, ids_for(2, 13)), TOLERANCE)


@pytest.mark.parametrize("name", ["v2-group", "v3"])
def test_ladder_finds_no_divergent_rung(checkpoints, name):
    _, params, reference = checkpoints(name)
    result = parity.ladder(params, ids_for(1, 13), reference=reference)
    names = [r["name"] for r in result["rungs"]]
    assert names == parity.rung_names(params.config)
    assert "layers.0.kv_latent" in names and "layers.1.chosen_experts" in names
    assert result["first_divergent"] is None, parity.format_ladder(result)


@pytest.mark.parametrize("name", ["v2", "v3"])
def test_cached_greedy_decode_equals_transformers_generate(checkpoints, name):
    """A 14-token prompt and 24 new tokens: jaxllm's cached decode (absorbed attention over the latent cache) makes
    Transformers' generate(do_sample=False) tokens."""
    _, params, reference = checkpoints(name)
    prompt = ids_for(1, 14, seed=1)[0].tolist()
    ours = generate(params, prompt, 24, eos_ids=()).tokens
    print(f"{name}: {ours}")
    assert ours == parity.reference_greedy(reference, prompt, 24, ())
    assert len(set(ours)) > 2


def test_absorbed_attention_equals_expanded_logits(checkpoints):
    """Logits of the first 4 tokens prefilled into an empty cache (expanded form), then the other 9 in one cached
    call (absorbed form: scores against the cached latents), equal the no-cache forward."""
    _, params, _ = checkpoints("v3-yarn")
    ids = ids_for(2, 13, seed=5)
    positions = np.tile(np.arange(13), (2, 1))
    full = np.asarray(forward(params, ids, positions))
    cache = KVCache.zeros(params.config, 2, 16)
    assert cache.k[0].shape == (2, 1, 16 + 4, 16) and cache.v[0].shape == (2, 1, 16, 0)
    step = jax.jit(run)
    first, cache = step(params, ids[:, :4], positions[:, :4], None, cache)
    rest, _ = step(params, ids[:, 4:], positions[:, 4:], None, cache)
    cached = np.concatenate([np.asarray(first), np.asarray(rest)], axis=1)
    print(f"absorbed vs expanded: max_abs_diff={np.abs(cached - full).max():.3g}")
    assert np.abs(cached - full).max() <= TOLERANCE


def test_absorbed_and_expanded_forms_agree_on_one_layer(checkpoints):
    """The two forms of latent attention on the same queries, cache and new entries."""
    _, params, _ = checkpoints("v2")
    layer, config = params.layers[1], params.config
    rng = np.random.default_rng(0)
    B, T, W, N, C, R, P = 2, 3, 7, 4, 16, 4, 8
    q_pass, q_rot = (jnp.asarray(rng.normal(size=(B, T, N, d)), jnp.float32) for d in (P, R))
    entry = jnp.asarray(rng.normal(size=(B, T, C + R)), jnp.float32)
    cached = (jnp.asarray(rng.normal(size=(B, C + R, W)), jnp.float32), jnp.asarray(rng.random((B, 1, W)) < 0.7))
    visible = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)
    a, b = (jax.jit(form, static_argnums=6)(layer, q_pass, q_rot, entry, visible, cached, config)
            for form in (latent.absorbed, latent.expanded))
    assert a.shape == (B, T, N, config.v_head_dim)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_serving_engine_makes_generates_tokens(checkpoints):
    """The slot table's cache is the latent one too: the engine's chunked prefill and decode give generate's tokens."""
    from jaxllm.engine import Engine

    _, params, _ = checkpoints("v3")
    prompts = [ids_for(1, 11, seed=2)[0].tolist(), ids_for(1, 5, seed=3)[0].tolist()]
    engine = Engine(params, slots=2, max_context=32, decode_steps=4, prefill_chunk=16, eos_ids=[]).start(warmup=False)
    try:
        results = engine.generate(prompts, 10, timeout=300)
    finally:
        engine.stop()
    assert [r.tokens for r in results] == [generate(params, p, 10, eos_ids=()).tokens for p in prompts]
    assert engine.cache_bytes == 2 * 32 * token_bytes(params.config)


# ---- injected bugs: the ladder names the component -------------------------------------------------------


def first_divergent(params, reference, **changes):
    wrong = params.replace(config=dataclasses.replace(params.config, **changes))
    return parity.ladder(wrong, ids_for(1, 13), reference=reference)["first_divergent"]


def bias_in_the_weights(logits, layer, config):
    """DeepSeek-V3's router with the bug of weighting by the biased scores."""
    scores = 1 / (1 + jnp.exp(-jnp.asarray(logits, jnp.float32))) + layer.router_correction_bias
    _, chosen = experts_module.deepseek_v3(logits, layer, config)
    weights = jnp.take_along_axis(scores, chosen, axis=-1)
    return weights / weights.sum(-1, keepdims=True) * config.routed_scaling_factor, chosen


@pytest.mark.parametrize("name, changes, rung", [
    ("v3", dict(router="bias_in_the_weights"), "layers.1.routing_weights"),
    ("v3", dict(norm_topk_prob=False), "layers.1.routing_weights"),  # V3 renormalises the chosen weights
    ("v2", dict(norm_topk_prob=True, router="softmax_topk"), "layers.1.routing_weights"),  # V2 never does
    ("v3", dict(rope_interleave=False), "layers.0.attn"),  # pairs (i, i + R/2) instead of (2i, 2i + 1)
    ("v3-yarn", dict(latent_scale=(8 + 4) ** -0.5), "layers.0.attn"),  # YaRN's mscale² left off the scores
])
def test_deepseek_bugs_are_caught_at_their_rung(checkpoints, monkeypatch, name, changes, rung):
    monkeypatch.setitem(experts_module.ROUTERS, "bias_in_the_weights", bias_in_the_weights)
    _, params, reference = checkpoints(name)
    assert first_divergent(params, reference, **changes) == rung


def test_a_zero_correction_bias_changes_the_chosen_experts(checkpoints):
    """The random bias matters: without it some token chooses other experts (so the tests above exercise it)."""
    _, params, reference = checkpoints("v3")
    layers = tuple(layer.replace(router_correction_bias=jnp.zeros_like(layer.router_correction_bias))
                   if layer.router_correction_bias is not None else layer for layer in params.layers)
    result = parity.ladder(params.replace(layers=layers), ids_for(1, 13), reference=reference)
    assert result["first_divergent"] == "layers.1.chosen_experts"


# ---- configuration and checkpoint ------------------------------------------------------------------------


def test_cache_holds_the_latent_not_per_head_keys_and_values():
    """DeepSeek-V2-Lite: 512 + 64 numbers per token and layer instead of 16 heads of 128 + 64 (keys) and 128 (values);
    its YaRN (factor 40, mscale_all_dim 0.707) scales the scores by mscale²."""
    config = LLMConfig.from_json(CONFIGS / "deepseek-v2-lite.json")
    assert config.latent_scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)
    latent_bytes = token_bytes(config, jnp.bfloat16)
    per_head_bytes = 27 * 16 * ((128 + 64) + 128) * 2
    print(f"DeepSeek-V2-Lite, bf16, per token: latent cache {latent_bytes} B, per-head K/V {per_head_bytes} B "
          f"({per_head_bytes / latent_bytes:.1f}x)")
    assert latent_bytes == 27 * (512 + 64) * 2 == 31104
    assert per_head_bytes == 276480


def test_deepseek_v3_defaults_and_refusals():
    small = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4)
    config = LLMConfig.from_dict(dict(model_type="deepseek_v3", **small))
    assert (config.router, config.n_group, config.topk_group, config.num_experts, config.num_experts_per_tok) == (
        "deepseek_v3", 8, 4, 256, 8)
    assert config.moe_layers == (False, False, False, True) and config.norm_topk_prob
    assert config.routed_scaling_factor == 2.5 and config.rope_interleave and config.num_nextn_predict_layers == 1
    assert config.head_dim == 64 and config.latent_scale == 192 ** -0.5
    assert config.shared_expert_intermediate_size == 2048 and not config.shared_expert_gated
    v2 = LLMConfig.from_dict(dict(model_type="deepseek_v2", num_experts_per_tok=6, **small))
    assert v2.router == "deepseek_v2_greedy" and not v2.norm_topk_prob and v2.shared_expert_intermediate_size == 2814
    fp8 = dict(quant_method="fp8", fmt="e4m3", weight_block_size=[128, 128])
    for bad, field in ((dict(quantization_config=fp8), "quantization_config"),
                       (dict(num_key_value_heads=2), "num_key_value_heads"),
                       (dict(attention_bias=True), "attention_bias")):
        with pytest.raises(ConfigError, match=field):
            LLMConfig.from_dict(dict(model_type="deepseek_v3", **{**small, **bad}))
    with pytest.raises(ConfigError, match="topk_method"):
        LLMConfig.from_dict(dict(model_type="deepseek_v2", num_experts_per_tok=6, topk_method="noaux_tc", **small))


def test_multi_token_prediction_layers_are_ignored(checkpoints, tmp_path):
    """DeepSeek-V3 stores its next-token-prediction layer after the last (model.layers.61 of 0-60); Transformers skips
    it, and so does the loader."""
    import shutil

    path, params, _ = checkpoints("v3")
    copy = shutil.copytree(path, tmp_path / "mtp")
    (file,) = copy.glob("*.safetensors")
    tensors = safetensors.numpy.load_file(file)
    tensors[f"model.layers.{params.config.num_hidden_layers}.eh_proj.weight"] = np.zeros((48, 96), np.float32)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    ids = ids_for(1, 5)
    np.testing.assert_array_equal(forward(load(copy), ids, np.arange(5)[None]), forward(params, ids, np.arange(5)[None]))
