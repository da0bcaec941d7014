"""Core engine: every LLaMA variant matches Transformers' LlamaForCausalLM in fp32 (max_abs_diff ≤ 1e-4).

Checkpoints are made by Transformers itself (LlamaConfig → seeded LlamaForCausalLM → save_pretrained) with every
weight redrawn, so biases and norms carry signal instead of sitting at their zero/one initial values.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import parity
from jaxllm.generation import generate
from jaxllm.loader import load
from jaxllm.model import compile_counts, forward

SMALL = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)

VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "untied": dict(tie_word_embeddings=False),
    "attention_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "explicit_head_dim": dict(head_dim=24),  # 4 heads × 24 ≠ hidden 64
    "rope_linear": dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)),
    "rope_dynamic": dict(max_position_embeddings=16,  # the prompt below (T=24) runs past it
                         rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)),
    "rope_llama3": dict(rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=16, rope_theta=500000.0)),
    "rope_yarn": dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                           rope_theta=10000.0)),
}


def make_checkpoint(tmp_path_factory, name, overrides=None, **save):
    d = tmp_path_factory.mktemp(name)
    return parity.random_checkpoint({**SMALL, **(overrides or {})}, d, seed=len(name), scale=0.3, **save)


def ids_for(batch=1, T=24, vocab=256, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, T))


def check_parity(path, ids, positions=None, weights="fp32"):
    result = parity.compare(load(path, weights), parity.reference_model(path), ids, positions)
    print(f"{path.name}: max_abs_diff={result.max_abs_diff:.3g} argmax_agreement={result.argmax_agreement:.3f}")
    assert np.abs(result.reference).max() > 1.0, "reference logits too small to make the comparison meaningful"
    assert result.max_abs_diff <= parity.TOLERANCE
    assert result.argmax_agreement == 1.0
    return result


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_transformers(tmp_path_factory, variant):
    check_parity(make_checkpoint(tmp_path_factory, variant, VARIANTS[variant]), ids_for())


def test_bf16_stored_weights_match_transformers(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory, "bf16", dtype="bfloat16")
    params = load(path)
    assert params.embed_tokens.dtype == jnp.float32  # bf16 -> fp32 upcast is exact
    check_parity(path, ids_for())


def test_sharded_checkpoint_matches_transformers(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory, "sharded", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 2
    check_parity(path, ids_for())


def test_batch_of_two_matches_transformers(tmp_path_factory):
    check_parity(make_checkpoint(tmp_path_factory, "batch"), ids_for(batch=2))


def test_explicit_non_contiguous_positions_are_honoured(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory, "positions")
    positions = np.array([[0, 1, 2, 5, 9, 10, 11, 20, 30, 31, 40, 63]])
    ids = ids_for(T=12)
    check_parity(path, ids, positions)
    contiguous = np.asarray(forward(load(path), ids, np.arange(12)[None]))
    assert np.abs(contiguous - np.asarray(forward(load(path), ids, positions))).max() > 1e-2


def test_dynamic_rope_changes_beyond_max_positions(tmp_path_factory):
    """Past max_position_embeddings the NTK base grows: logits must differ from plain RoPE there (and only there)."""
    dynamic = load(make_checkpoint(tmp_path_factory, "dyn", VARIANTS["rope_dynamic"]))
    plain = dynamic.replace(config=dataclasses.replace(
        dynamic.config, rope=dataclasses.replace(dynamic.config.rope, rope_type="default")))
    short, long = ids_for(T=16), ids_for(T=24)
    pos = lambda T: np.arange(T)[None]
    # Within max positions the base is unchanged (only the fp32 pow is evaluated at run time instead of load time).
    assert np.abs(np.asarray(forward(dynamic, short, pos(16))) - np.asarray(forward(plain, short, pos(16)))).max() < 1e-5
    assert np.abs(np.asarray(forward(dynamic, long, pos(24))) - np.asarray(forward(plain, long, pos(24)))).max() > 1e-3


def test_v4_and_v5_rope_formats_load_the_same(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory, "v4v5", VARIANTS["rope_llama3"])
    v5 = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    scaling = dict(v5["rope_parameters"])
    v4["rope_theta"] = scaling.pop("rope_theta")
    scaling["type"] = scaling.pop("rope_type")  # the v4 alias
    v4["rope_scaling"] = scaling
    (path / "config.json").write_text(json.dumps(v4))
    check_parity(path, ids_for())


def test_params_pytree_is_keyed_by_layer_and_immutable(tmp_path_factory):
    params = load(make_checkpoint(tmp_path_factory, "tree", VARIANTS["gqa"]))
    c = params.config
    assert len(params.layers) == c.num_hidden_layers
    K, G, H = c.num_key_value_heads, c.num_groups, c.head_dim
    assert params.layers[1].qkv_proj.shape == (K, G + 2, H, c.hidden_size)  # [K, G + 2, H, D]
    assert params.layers[1].gate_up_proj.shape == (c.intermediate_size, 2, c.hidden_size)  # [F, 2, D]
    assert params.lm_head.shape == (c.vocab_size, c.hidden_size)  # [V, D]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.layers[0].qkv_proj = None
    assert isinstance(params.layers, tuple)
    hash(c)  # the config is static data: hashable, not a pytree leaf
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(params))


def test_bf16_weights_set_parameter_dtype(tmp_path_factory):
    params = load(make_checkpoint(tmp_path_factory, "dtype"), weights="bf16")
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    logits = forward(params, ids_for(T=8), np.arange(8)[None])
    assert logits.shape == (1, 8, 256) and bool(jnp.isfinite(logits).all())


def test_tied_checkpoint_with_stored_lm_head_loads(tmp_path_factory):
    """Some tied checkpoints also store lm_head.weight; HF ignores it and so do we."""
    from safetensors.numpy import load_file, save_file

    path = make_checkpoint(tmp_path_factory, "tied_stored", VARIANTS["tied"])
    tensors = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert load(path).lm_head is None
    check_parity(path, ids_for())


def test_forward_compiles_once_per_shape(tmp_path_factory):
    params = load(make_checkpoint(tmp_path_factory, "compile"))
    before = compile_counts()["forward"]
    for seed in range(3):
        forward(params, ids_for(T=10, seed=seed), np.arange(10)[None] + seed)
    assert compile_counts()["forward"] - before == 1


@pytest.mark.slow
def test_tinyllama_full_size_random_weights_match_transformers(tmp_path_factory):
    """The seed's own target: TinyLlama-1.1B's architecture at full size, weights initialised by Transformers."""
    path = parity.random_checkpoint("configs/tinyllama-1.1b.json", tmp_path_factory.mktemp("tinyllama"), seed=0)
    params = load(path)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 1_100_048_384
    result = parity.compare(params, parity.reference_model(path), ids_for(T=12, vocab=32000))
    print(f"tinyllama-1.1b: max_abs_diff={result.max_abs_diff:.3g} max|logit|={np.abs(result.reference).max():.2f}")
    assert np.abs(result.reference).max() > 1.0, "reference logits too small to make the comparison meaningful"
    assert result.max_abs_diff <= parity.TOLERANCE and result.argmax_agreement == 1.0


def test_prefill_decode_step_and_decode_compose_to_generate(tmp_path_factory):
    """The public generation API: the cache knows its positions (mask and write index), a decode_step writes one
    slot, and prefill + decode_step + decode make exactly generate's tokens, for a left-padded batch."""
    import jaxllm
    from jaxllm.errors import InputError

    params = load(make_checkpoint(tmp_path_factory, "api"))
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    settings = jaxllm.GenerationSettings(max_new_tokens=9, length=32)
    ids, mask = jaxllm.left_pad(prompts, 16, pad_id=0)
    state = jaxllm.prefill(params, ids, mask, jax.random.key(0), settings)
    assert int(state.step) == 1 and np.asarray(state.cache.index).tolist() == [16, 16]
    np.testing.assert_array_equal(np.asarray(state.cache.mask)[:, :16], mask.astype(bool))
    assert not np.asarray(state.cache.mask)[:, 16:].any()
    state = jaxllm.decode_step(params, state, settings)
    assert int(state.step) == 2 and np.asarray(state.cache.index).tolist() == [17, 17] and np.asarray(state.cache.mask)[:, 16].all()
    state = jaxllm.decode(params, state, settings)
    assert int(state.step) == 9
    expected = [r.tokens for r in generate(params, prompts, 9, eos_ids=[])]
    assert np.asarray(state.tokens)[:, :9].tolist() == expected
    with pytest.raises(InputError, match=r"max_new_tokens \(17\) must be between 1 and length - prompt slots"):
        jaxllm.prefill(params, ids, mask, jax.random.key(0), settings.replace(max_new_tokens=17))


def test_compile_counts_list_every_program_before_its_first_trace():
    import subprocess
    import sys

    code = "import jaxllm; print(sorted(jaxllm.compile_counts().items()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == str(sorted({"forward": 0, "forward_with_intermediates": 0, "forward_exact": 0,
                                      "forward_with_intermediates_exact": 0, "prefill": 0, "decode_step": 0,
                                      "decode": 0, "speculative_decode": 0, "speculative_step": 0, "draft_prefill": 0,
                                      "engine_prefill": 0, "engine_decode": 0, "engine_release": 0}.items()))
