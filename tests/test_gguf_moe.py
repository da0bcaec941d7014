"""GGUF import of the mixture-of-experts families: a random Transformers model written as llama.cpp writes it (each
projection's experts stacked into one tensor, blk.{i}.ffn_{gate,up,down}_exps) comes back with the source model's
tensors, config and logits, and, for the architectures Transformers' GGUF loader reads (qwen2moe, qwen3moe), with its
tensors and config too. DeepSeek-V2/V3 (deepseek2) come in both of llama.cpp's layouts of the latent attention's
kv_b_proj. A quantized file keeps its experts in their blocks (weights="gguf")."""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import gguf_util
from gguf_util import (Q, assert_config_agrees, assert_config_reads_back, bpe_tokenizer_metadata, write_gguf_file,
                       written_model)
from jaxllm import parity
from jaxllm.gguf_reader import read_gguf
from jaxllm.loader import load
from jaxllm.weights import Blocks

V, D, N, K, H = 272, 64, 4, 2, 16  # rows of 64 and 32 are Q8_0 blocks
E, TOP_K, FE, FS = 4, 2, 32, 64  # experts, chosen per token, an expert's width, the shared expert's width
EPS = 2.0 ** -20  # exact in float32, so it survives GGUF's float32 metadata
COMMON = dict(vocab_size=V, hidden_size=D, num_attention_heads=N, num_key_value_heads=K, num_hidden_layers=2,
              num_experts_per_tok=TOP_K, rms_norm_eps=EPS, max_position_embeddings=256, rope_theta=50000.0,
              bos_token_id=259, eos_token_id=260, pad_token_id=261)


@dataclass(frozen=True)
class Family:
    config: Callable  # -> a small Transformers config
    arch: str  # GGUF general.architecture
    metadata: dict  # the <arch>.* keys only this family's converter writes
    module: str = "mlp"  # where the source checkpoint keeps the experts (what the GGUF names map to)
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    split_kv_b: bool = False  # DeepSeek: kv_b_proj written as attn_k_b and attn_v_b, as newer converters do


FAMILIES = {
    "qwen2_moe": Family(lambda: transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=FS, moe_intermediate_size=FE, shared_expert_intermediate_size=FS, num_experts=E),
        "qwen2moe", {"feed_forward_length": FS, "expert_count": E, "expert_used_count": TOP_K,
                     "expert_feed_forward_length": FE, "expert_shared_feed_forward_length": FS}),
    # Real Qwen3-MoE checkpoints renormalise the chosen weights, as llama.cpp always does for qwen3moe.
    "qwen3_moe": Family(lambda: transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=FS, moe_intermediate_size=FE, num_experts=E, head_dim=32, norm_topk_prob=True),
        "qwen3moe", {"feed_forward_length": FS, "expert_count": E, "expert_used_count": TOP_K,
                     "expert_feed_forward_length": FE, "attention.key_length": 32, "attention.value_length": 32}),
    "olmoe": Family(lambda: transformers.OlmoeConfig(**COMMON, intermediate_size=FE, num_experts=E),
                    "olmoe", {"feed_forward_length": FE, "expert_count": E, "expert_used_count": TOP_K}),
    # Mixtral is written as llama, with expert_count; its checkpoints name the experts w1, w3, w2.
    "mixtral": Family(lambda: transformers.MixtralConfig(**COMMON, intermediate_size=FE, num_local_experts=E,
                                                         head_dim=H),
                      "llama", {"feed_forward_length": FE, "expert_count": E, "expert_used_count": TOP_K,
                                "vocab_size": V, "rope.dimension_count": H},
                      "block_sparse_moe", ("w1", "w3", "w2")),
}
# DeepSeek's latent attention: C = 32 latent dims, P = 16 unrotated and R = 8 rotated dims of each head's query and
# key, U = 16 of its value; the first layer is dense. V2 as older converters wrote it (one attn_kv_b, per-head key and
# value lengths, no group routing) with a plain q_proj (q_lora_rank null, as V2-Lite); V3 as newer ones do (kv_b
# split into k_b and v_b, MQA lengths plus *_mla, expert groups, the router's correction bias as exp_probs_b).
C, P, R, U = 32, 16, 8, 16
DEEPSEEK = {**COMMON, "num_key_value_heads": N, "intermediate_size": FS, "moe_intermediate_size": FE,
            "n_routed_experts": E, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": C,
            "qk_nope_head_dim": P, "qk_rope_head_dim": R, "v_head_dim": U}
DEEPSEEK_METADATA = {"feed_forward_length": FS, "expert_feed_forward_length": FE, "expert_count": E,
                     "expert_used_count": TOP_K, "expert_shared_count": 1, "leading_dense_block_count": 1,
                     "vocab_size": V, "attention.kv_lora_rank": C, "rope.dimension_count": R}
FAMILIES |= {
    "deepseek_v2": Family(lambda: transformers.DeepseekV2Config(**DEEPSEEK, q_lora_rank=None,
                                                                routed_scaling_factor=1.5),
                          "deepseek2", DEEPSEEK_METADATA | {
                              "attention.head_count_kv": N, "attention.key_length": P + R,
                              "attention.value_length": U, "expert_weights_scale": 1.5, "expert_gating_func": 1}),
    "deepseek_v3": Family(lambda: transformers.DeepseekV3Config(**DEEPSEEK, q_lora_rank=48, n_group=2, topk_group=1),
                          "deepseek2", DEEPSEEK_METADATA | {
                              "attention.q_lora_rank": 48, "attention.head_count_kv": 1,
                              "attention.key_length": C + R, "attention.value_length": C,
                              "attention.key_length_mla": P + R, "attention.value_length_mla": U,
                              "expert_weights_scale": 2.5, "expert_weights_norm": True, "expert_gating_func": 2,
                              "expert_group_count": 2, "expert_group_used_count": 1},
                          split_kv_b=True),
}
READ_BY_TRANSFORMERS = ("qwen2_moe", "qwen3_moe")  # the MoE architectures Transformers' GGUF loader reads


# Transformers' eager experts loop, the reference form.
random_model = functools.partial(gguf_util.random_model, experts_implementation="eager")


def moe_parts(family):
    """gguf_tensors' `convert` for `family`: experts stacked per projection ([E, F, D] gate and up from
    Transformers' fused gate_up_proj [E, 2F, D], [E, D, F] down) and DeepSeek's kv_b_proj split where the family
    writes it so."""
    def convert(name, weight):
        if family.split_kv_b and name.endswith("kv_b_proj.weight"):  # per head: k_b [N, C, P] transposed, v_b [N, U, C]
            kv_b, layer = weight.reshape(N, P + U, C), name.split(".")[2]
            return {f"blk.{layer}.attn_k_b.weight": kv_b[:, :P].transpose(0, 2, 1),
                    f"blk.{layer}.attn_v_b.weight": kv_b[:, P:]}
        if name.endswith("experts.gate_up_proj"):
            layer = name.split(".")[2]
            return {f"blk.{layer}.ffn_gate_exps.weight": weight[:, :FE],
                    f"blk.{layer}.ffn_up_exps.weight": weight[:, FE:]}
        if name.endswith("experts.down_proj"):
            return {f"blk.{name.split('.')[2]}.ffn_down_exps.weight": weight}
        return None
    return convert


def gguf_tensors(model, family, qtype=Q.F32):
    """The model's state dict as llama.cpp's converter writes it (gguf_util.gguf_tensors), experts stacked."""
    return gguf_util.gguf_tensors(model, family.arch, qtype, moe_parts(family))


def write_family(path, family, model, qtype=Q.F32):
    config = model.config
    metadata = {f"{family.arch}.{key}": value for key, value in {
        "block_count": config.num_hidden_layers, "context_length": config.max_position_embeddings,
        "embedding_length": D, "attention.head_count": N, "attention.head_count_kv": K,
        "attention.layer_norm_rms_epsilon": EPS, "rope.freq_base": 50000.0, **family.metadata}.items()}
    metadata |= bpe_tokenizer_metadata(V, "qwen2" if family.arch.startswith("qwen") else "gpt2")
    return write_gguf_file(path, family.arch, metadata, gguf_tensors(model, family, qtype))


def source_tensor(state: dict, name: str, family: Family) -> np.ndarray:
    """The source model's tensor that our HF name (the checkpoint's, e.g. Mixtral's block_sparse_moe.gate) holds;
    Transformers' model keeps the experts in `mlp`, gate and up fused: a stacked expert name (model.layers.{i}.
    <module>.experts.<gate|up|down>.weight) is its gate_up_proj's half or its down_proj."""
    name = name.replace(f".{family.module}.", ".mlp.")
    prefix, _, projection = name.removesuffix(".weight").rpartition(".experts.")
    if not prefix:
        return state[name].numpy()
    fused = prefix + ".experts."
    gate, up, down = family.experts
    if projection == down:
        return state[fused + "down_proj"].numpy()
    gate_up = state[fused + "gate_up_proj"].numpy()
    return gate_up[:, :FE] if projection == gate else gate_up[:, FE:]


@pytest.fixture(scope="module", params=list(FAMILIES))
def written(request, tmp_path_factory):
    """(family name, source model, GGUF path)."""
    return written_model(request, tmp_path_factory, FAMILIES, random_model, write_family)


def test_tensors_equal_the_source_model(written):
    name, model, path = written
    family, state = FAMILIES[name], model.state_dict()
    ours = dict(read_gguf(path).tensors())
    assert len(ours) == len(state) + sum(n.endswith("gate_up_proj") for n in state)  # gate_up_proj is two tensors
    for hf_name, weight in ours.items():
        assert weight.dtype == np.float32 and np.array_equal(weight, source_tensor(state, hf_name, family)), hf_name
    layer = f"model.layers.1.{family.module}.experts."
    assert [ours[f"{layer}{p}.weight"].shape for p in family.experts] == [(E, FE, D), (E, FE, D), (E, D, FE)]


@pytest.mark.parametrize("name", READ_BY_TRANSFORMERS)
def test_tensors_equal_transformers_gguf_loader(tmp_path, name):
    """Transformers' loader fuses gate and up into gate_up_proj [E, 2F, D]; ours keeps GGUF's two tensors."""
    family = FAMILIES[name]
    model = random_model(family.config())
    path = write_family(tmp_path / f"{name}.gguf", family, model)
    ours = dict(read_gguf(path).tensors())
    theirs = {n: t.numpy() for n, t in load_gguf_checkpoint(str(path), return_tensors=True,
                                                             model_to_load=model)["tensors"].items()}
    for i in range(model.config.num_hidden_layers):
        x = f"model.layers.{i}.mlp.experts."
        gate_up = np.concatenate([ours.pop(x + "gate_proj.weight"), ours.pop(x + "up_proj.weight")], axis=1)
        ours[x + "gate_up_proj"], ours[x + "down_proj"] = gate_up, ours.pop(x + "down_proj.weight")
    assert ours.keys() == theirs.keys()
    for hf_name, weight in ours.items():
        assert np.array_equal(weight, theirs[hf_name]), hf_name


# Fields Transformers' GGUF loader does not read for these architectures (it keeps its config class's defaults,
# which are the wrong size for any model but the original): the expert widths, from expert_feed_forward_length and
# expert_shared_feed_forward_length.
NOT_READ_BY_TRANSFORMERS = {"moe_intermediate_size", "shared_expert_intermediate_size"}


@pytest.mark.parametrize("name", READ_BY_TRANSFORMERS)
def test_config_agrees_with_transformers_gguf_loader(tmp_path, name):
    family = FAMILIES[name]
    path = write_gguf_file(tmp_path / f"{name}.gguf", family.arch, {f"{family.arch}.{key}": value for key, value in {
        "block_count": 2, "context_length": 256, "embedding_length": D, "attention.head_count": N,
        "attention.head_count_kv": K, "attention.layer_norm_rms_epsilon": EPS, "vocab_size": V,
        **family.metadata}.items()}, {})
    assert_config_agrees(path, ignore=NOT_READ_BY_TRANSFORMERS)


def test_config_reads_back_as_the_source_models(written):
    _, model, path = written
    # llama.cpp's DeepSeek files hold no multi-token-prediction layers
    assert_config_reads_back(path, model, ignore={"num_nextn_predict_layers"})


def test_logits_equal_the_source_model(written):
    """jaxllm.load on the GGUF file runs the family's experts: logits at 24 positions equal the source model's."""
    name, model, path = written
    ids = np.random.default_rng(0).integers(0, V, (1, 24))
    positions = np.arange(24)[None]
    ours = parity.jax_logits(load(path), ids, positions)
    source = parity.reference_logits(model, ids, positions)
    assert parity.compare_logits(source, ours).max_abs_diff <= 1e-5 * max(1.0, np.abs(source).max()), name


@pytest.mark.parametrize("name", ["qwen2_moe"])  # with a shared expert, whose matrices are Blocks too
def test_q8_0_experts_stay_in_their_blocks_and_match_the_fp32_read(tmp_path, name):
    """weights="gguf" keeps the stacked experts as Blocks [E, F, 2, D] and [E, D, F], expert-major; the logits equal
    those of the same file read in fp32."""
    family = FAMILIES[name]
    path = write_family(tmp_path / f"{name}-q8_0.gguf", family, random_model(family.config()), Q.Q8_0)
    quantized, fp32 = load(path, weights="gguf"), load(path)
    layer = quantized.layers[0]
    assert isinstance(layer.experts_gate_up, Blocks) and isinstance(layer.experts_down, Blocks)
    assert layer.experts_gate_up.format == layer.experts_down.format == "Q8_0"
    assert layer.experts_gate_up.shape == (E, FE, 2, D) and layer.experts_down.shape == (E, D, FE)
    np.testing.assert_array_equal(layer.experts_gate_up.dequantize(), fp32.layers[0].experts_gate_up)
    ids = np.random.default_rng(1).integers(0, V, (1, 24))  # above weights.MATVEC_ROWS: one dot, quick to compile
    positions = np.arange(24)[None]
    diff = parity.compare_logits(parity.jax_logits(fp32, ids, positions, exact=False),
                                 parity.jax_logits(quantized, ids, positions, exact=False)).max_abs_diff
    assert diff <= 1e-4, diff


def test_deepseek_yarn_reads_mscale_from_the_log_multiplier(tmp_path):
    """DeepSeek-V3's YaRN: llama.cpp writes 0.1 · mscale_all_dim as rope.scaling.yarn_log_multiplier."""
    keys = DEEPSEEK_METADATA | FAMILIES["deepseek_v3"].metadata | {
        "block_count": 2, "context_length": 4096, "embedding_length": D, "attention.head_count": N,
        "attention.layer_norm_rms_epsilon": EPS, "rope.scaling.type": "yarn", "rope.scaling.factor": 40.0,
        "rope.scaling.original_context_length": 128, "rope.scaling.yarn_log_multiplier": 0.1}
    path = write_gguf_file(tmp_path / "v3.gguf", "deepseek2", {f"deepseek2.{k}": v for k, v in keys.items()}, {})
    config = read_gguf(path).config
    assert config["model_type"] == "deepseek_v3" and config["num_key_value_heads"] == N
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 128,
                                      "mscale": 1.0, "mscale_all_dim": 1.0}
    assert (config["qk_nope_head_dim"], config["v_head_dim"], config["n_group"]) == (P, U, 2)
