"""The diff ladder names the first component that diverges: none on the correct model, the right rung for each
bug injected into the JAX side of the real default model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm.model.attention as attention_lib
from jaxllm import parity
from jaxllm.loader import layer_table

PROMPT = "The capital of France is Paris, and"


@pytest.fixture(scope="module")
def ids(smollm2):
    return [smollm2.tokenizer.encode(PROMPT)]


@pytest.fixture
def fresh_jit():
    """Bugs are injected by replacing a model function: drop compiled programs so the forward is traced anew."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def first_divergent(params, ids, reference):
    return parity.ladder(params, ids, reference=reference)["first_divergent"]


def test_correct_model_has_no_divergent_rung(smollm2, smollm2_reference, ids):
    result = parity.ladder(smollm2.params, ids, reference=smollm2_reference)
    print(parity.format_ladder(result))
    names = [r["name"] for r in result["rungs"]]
    assert names == parity.rung_names(smollm2.params.config) and names[0] == "embed" and names[-1] == "logits"
    assert result["first_divergent"] is None
    assert result["rungs"][-1]["max_abs_diff"] <= parity.REAL_MODEL_TOLERANCE


def test_wrong_rms_norm_epsilon_is_caught_at_the_first_norm(smollm2, smollm2_reference, ids):
    config = dataclasses.replace(smollm2.params.config, rms_norm_eps=1e-3)
    assert first_divergent(smollm2.params.replace(config=config), ids, smollm2_reference) == "layers.0.input_layernorm"


def interleaved_rope(x, cos, sin):
    """The GPT-J / llama.cpp layout: pairs (2i, 2i+1) instead of HF's (i, i + H/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, :, None, :half].astype(x.dtype), sin[:, :, None, :half].astype(x.dtype)
    return jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)


def test_interleaved_rope_is_caught_at_q_rope(smollm2, smollm2_reference, ids, monkeypatch, fresh_jit):
    monkeypatch.setattr(attention_lib, "apply_rope", interleaved_rope)
    assert first_divergent(smollm2.params, ids, smollm2_reference) == "layers.0.q_rope"


def tiled_kv_attention(q, k, v, allowed, cached=None, scale=None, softcap=None, sinks=None):
    """GQA with K/V heads repeated in the wrong order: query head n reads kv head n % K (HF uses n // G)."""
    B, T, N, H = q.shape
    G = N // k.shape[1]
    k, v = jnp.tile(k, (1, G, 1, 1)), jnp.tile(v, (1, G, 1, 1))  # [B, N, S, H]
    scores = jnp.einsum("BTNH,BNSH->BNTS", q, k) * H**-0.5
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("BNTS,BNSH->BTNH", jax.nn.softmax(scores, axis=-1), v)


def test_kv_heads_in_wrong_order_are_caught_at_attention(smollm2, smollm2_reference, ids, monkeypatch, fresh_jit):
    monkeypatch.setattr(attention_lib, "attention", tiled_kv_attention)
    assert first_divergent(smollm2.params, ids, smollm2_reference) == "layers.0.attn"


@pytest.mark.parametrize("layer, tensor, rung", [(17, "mlp.up_proj.weight", "up_proj"), (5, "self_attn.o_proj.weight", "o_proj"),
                                                 (29, "mlp.down_proj.weight", "mlp"), (11, "self_attn.v_proj.weight", "v_proj")])
def test_corrupted_weight_is_caught_in_its_layer(smollm2, smollm2_reference, ids, layer, tensor, rung):
    """Noise on one HF tensor, placed through the loader's table (stacked fields take it in their part only)."""
    entry = next(e for e in layer_table(smollm2.params.config, layer) if e.hf_name.endswith(tensor))
    layers = list(smollm2.params.layers)
    weight = getattr(layers[layer], entry.field)
    where = entry.where or (slice(None),)
    noise = 0.05 * jax.random.normal(jax.random.key(layer), weight[where].shape, weight.dtype)
    layers[layer] = layers[layer].replace(**{entry.field: weight.at[where].add(noise)})
    params = smollm2.params.replace(layers=tuple(layers))
    assert first_divergent(params, ids, smollm2_reference) == f"layers.{layer}.{rung}"
