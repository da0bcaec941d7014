"""Meshes of 8 CPU devices. Run by tests/test_mesh.py in a pytest process of its own (JAX_NUM_CPU_DEVICES=8), so the
rest of the suite keeps one device; not collected by the main session (the file name does not start with test_)."""

import re
import time

import jax
import numpy as np
import pytest

from jaxllm import load, load_model, make_mesh, parity
from jaxllm.errors import InputError
from jaxllm.generation import DECODE_COMPILER_OPTIONS, GenerationSettings, _decode_step, generate, left_pad, prefill
from jaxllm.loader import SHARDING
from jaxllm.model import compile_counts, forward

if jax.device_count() < 8:
    pytest.skip("needs 8 devices: run through tests/test_mesh.py", allow_module_level=True)

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]
# 16 query heads over 8 KV heads: every tp of the meshes above splits whole heads; F and V divide by 8 too.
CONFIG = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return parity.random_checkpoint(CONFIG, tmp_path_factory.mktemp("mesh"), seed=3, scale=0.08)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):  # sliding windows, soft-caps, (1 + w) norms and four norms a block, on a mesh
    config = dict(model_type="gemma2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=16, sliding_window=4,
                  max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return parity.random_checkpoint(config, tmp_path_factory.mktemp("gemma"), seed=4, scale=0.08)


def ids_for(batch, T, vocab=256, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, T))


def test_mesh_has_the_devices_asked_for():
    mesh = make_mesh(dp=2, tp=4)
    assert dict(mesh.shape) == {"dp": 2, "tp": 4} and mesh.devices.size == 8
    assert dict(make_mesh().shape) == {"dp": 8, "tp": 1}
    assert dict(make_mesh(tp=2).shape) == {"dp": 4, "tp": 2}
    assert make_mesh(dp=1, tp=3).devices.size == 3  # a smaller mesh: the first 3 devices


@pytest.mark.parametrize("dp, tp", MESHES)
def test_logits_on_a_mesh_equal_one_device(checkpoint, dp, tp):
    ids, positions = ids_for(8, 12), np.tile(np.arange(12), (8, 1))
    one = np.asarray(forward(load(checkpoint), ids, positions))
    params = load(checkpoint, mesh=make_mesh(dp=dp, tp=tp))
    sharded = forward(params, ids, positions)
    diff = float(np.abs(np.asarray(sharded) - one).max())
    print(f"mesh dp={dp} tp={tp}: max_abs_diff {diff:.3g} (logits reach {np.abs(one).max():.2f})")
    assert diff <= 1e-5
    assert np.abs(one).max() > 1.0


@pytest.mark.parametrize("dp, tp", MESHES)
def test_each_device_holds_its_part_of_every_sharded_weight(checkpoint, dp, tp):
    params = load(checkpoint, mesh=make_mesh(dp=dp, tp=tp))
    fields = {"embed_tokens": params.embed_tokens, "lm_head": params.lm_head,
              **{name: getattr(params.layers[0], name) for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                                                                     "input_layernorm")}}
    total = 0
    for name, array in fields.items():
        spec = SHARDING.get(name, jax.sharding.PartitionSpec())
        expected = tuple(size // tp if axis == "tp" else size for size, axis in
                         zip(array.shape, tuple(spec) + (None,) * (array.ndim - len(spec))))
        assert len(array.addressable_shards) == dp * tp
        for shard in array.addressable_shards:
            assert shard.data.shape == expected, (name, shard.data.shape, expected)
    for leaf in jax.tree.leaves(params):
        total += leaf.addressable_shards[0].data.nbytes
    full = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    print(f"mesh dp={dp} tp={tp}: {total:,} parameter bytes per device of {full:,}")


def elements(shape: str) -> int:
    """The element count of an HLO shape such as f32[2,1,128]{2,1,0}."""
    return int(np.prod([int(n) for n in re.search(r"\[([\d,]*)\]", shape).group(1).split(",")]))


def collectives(params, settings, ids, mask) -> dict[str, list[str]]:
    """The collectives of the compiled decode step, by kind, as the shapes they produce."""
    state = prefill(params, ids, mask, jax.random.key(0), settings)
    hlo = jax.jit(_decode_step, donate_argnames="state", compiler_options=DECODE_COMPILER_OPTIONS).lower(
        params, state, settings).compile().as_text()
    return {kind: re.findall(rf"= (\S+) {kind}(?:-start)?\(", hlo) for kind in ("all-reduce", "all-gather")}


@pytest.mark.parametrize("dp, tp", [(1, 8), (2, 4)])
def test_decode_step_all_reduces_activations_and_gathers_no_weight(checkpoint, dp, tp):
    params = load(checkpoint, mesh=make_mesh(dp=dp, tp=tp))
    ids, mask = left_pad([[5, 6, 7], [8, 9]] * dp, 16, 0)
    found = collectives(params, GenerationSettings(max_new_tokens=4, length=32), ids, mask)
    print(found)
    B, L, D = 2 * dp, CONFIG["num_hidden_layers"], CONFIG["hidden_size"]
    # Per layer one after o_proj and one after down_proj (their inputs are split over heads and F), one after the
    # vocabulary-split embedding lookup: [B/dp, 1, D] each.
    assert found["all-reduce"].count(f"f32[{B // dp},1,{D}]{{2,1,0}}") == 2 * L + 1
    # What is gathered is the argmax of the vocabulary-split logits ([B/dp, tp] values and ids), never a weight.
    weight_sizes = {leaf.addressable_shards[0].data.size for leaf in jax.tree.leaves(params)}
    for shape in found["all-gather"]:
        size = elements(shape)
        assert size <= B * tp and size not in weight_sizes, shape


@pytest.mark.parametrize("dp, tp", [(2, 4), (8, 1), (1, 2)])
def test_greedy_tokens_on_a_mesh_equal_one_device(checkpoint, gemma, dp, tp):
    prompts = [ids_for(1, 9, seed=1)[0].tolist(), ids_for(1, 3, seed=2)[0].tolist(), ids_for(1, 14, seed=3)[0].tolist()]
    for path in (checkpoint, gemma):
        vocab_prompts = [[t % 128 for t in p] for p in prompts]
        one = [r.tokens for r in generate(load(path), vocab_prompts, 16, eos_ids=())]
        params = load(path, mesh=make_mesh(dp=dp, tp=tp))
        assert [r.tokens for r in generate(params, vocab_prompts, 16, eos_ids=())] == one  # a left-padded batch
        assert generate(params, vocab_prompts[2], 16, eos_ids=()).tokens == one[2]  # alone (filled up to dp rows)
        streamed = []  # streaming reports the rows asked for, never the ones that fill the batch up to dp
        generate(params, vocab_prompts[2], 16, eos_ids=(), callback=lambda row, token: streamed.append((row, token)))
        assert streamed == [(0, token) for token in one[2]]


def test_kv_cache_is_split_by_batch_and_kv_head(checkpoint):
    params = load(checkpoint, mesh=make_mesh(dp=2, tp=4))
    ids, mask = left_pad([[5, 6, 7], [8, 9]], 16, 0)
    state = prefill(params, ids, mask, jax.random.key(0), GenerationSettings(max_new_tokens=4, length=32))
    B, K, H, S = 2, CONFIG["num_key_value_heads"], CONFIG["hidden_size"] // CONFIG["num_attention_heads"], 32
    for keys in state.cache.k:  # [B, K, H, S]
        assert keys.sharding.spec == jax.sharding.PartitionSpec("dp", "tp")
        assert {shard.data.shape for shard in keys.addressable_shards} == {(B // 2, K // 4, H, S)}


def test_decode_loop_compiles_once_per_bucket_on_a_mesh(checkpoint):
    params = load(checkpoint, mesh=make_mesh(dp=2, tp=4))
    generate(params, [[1, 2, 3]], 8, eos_ids=())
    before = compile_counts()
    start = time.perf_counter()
    for prompt in ([4, 5], [6, 7, 8, 9, 10], [11] * 12):  # the same buckets: 16 prompt slots, 32 in all
        generate(params, [prompt, [3]], 8, eos_ids=())
    after = compile_counts()
    assert after["prefill"] == before["prefill"] and after["decode"] == before["decode"]
    print(f"3 generations on a (2, 4) mesh without a compile: {time.perf_counter() - start:.2f} s")


def test_real_model_on_tp_3(smollm2_dir):
    one = load_model(smollm2_dir)
    ids = one.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    positions = np.arange(len(ids))[None]
    reference = np.asarray(forward(one.params, [ids], positions))
    for dp, tp in [(2, 3)]:  # dp splits the two prompts, tp the 9 query and 3 KV heads
        mesh = make_mesh(dp=dp, tp=tp)
        start = time.perf_counter()
        model = load_model(smollm2_dir, mesh=mesh)
        loaded = time.perf_counter() - start
        diff = float(np.abs(np.asarray(forward(model.params, [ids], positions)) - reference).max())
        start = time.perf_counter()
        tokens = [r.tokens for r in generate(model, ["The capital of France is", "Water boils at"], 12)]
        first = time.perf_counter() - start
        print(f"SmolLM2 on dp={dp} tp={tp}: max_abs_diff {diff:.3g} (logits reach {np.abs(reference).max():.1f}), "
              f"load {loaded:.2f} s, first generate (compiles) {first:.2f} s")
        assert diff <= parity.REAL_MODEL_TOLERANCE
        assert tokens == [r.tokens for r in generate(one, ["The capital of France is", "Water boils at"], 12)]


def test_bad_meshes_are_refused_naming_the_numbers(smollm2_dir):
    with pytest.raises(InputError, match=r"dp=4 x tp=4 = 16 devices needs more than the 8 available"):
        make_mesh(dp=4, tp=4)
    with pytest.raises(InputError, match=r"mesh tp must be a positive integer, found 0"):
        make_mesh(tp=0)
    with pytest.raises(InputError, match=r"tp=2 must divide num_attention_heads \(9\) and num_key_value_heads \(3\)"
                                         r".*tp can be 1, 3"):
        load(smollm2_dir, mesh=make_mesh(dp=1, tp=2))


@pytest.mark.parametrize("weights", ["int8", "gguf"])
def test_quantized_weights_on_a_mesh_equal_one_device(checkpoint, tmp_path, weights):
    """A quantized matrix's parts (values, scales; a GGUF block's fields) split with the rows, or the blocks along
    `in`, as the matrix would be; logits and greedy tokens equal one device's in the same format."""
    from gguf_util import write_gguf
    from jaxllm.weights import Blocks, Int8

    path, vocab = (checkpoint, 256) if weights == "int8" else (write_gguf(tmp_path / "blocks.gguf"), 512)
    ids, positions = ids_for(4, 9, vocab), np.tile(np.arange(9), (4, 1))
    one = load(path, weights)
    params = load(path, weights, mesh=make_mesh(dp=2, tp=2))
    sharded = [w for layer in params.layers for w in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj,
                                                      layer.down_proj) if isinstance(w, Int8 | Blocks)]
    assert sharded and all("tp" in tuple(w.values.sharding.spec) for w in sharded)
    expected = np.asarray(forward(one, ids, positions))
    diff = float(np.abs(np.asarray(forward(params, ids, positions)) - expected).max())
    print(f"{weights} on dp=2 x tp=2: max_abs_diff {diff:.3g} (logits reach {np.abs(expected).max():.2f})")
    assert diff <= 1e-5 * max(1.0, float(np.abs(expected).max()))
    prompts = ids[:, :5].tolist()
    assert ([r.tokens for r in generate(params, prompts, 8, eos_ids=())]
            == [r.tokens for r in generate(one, prompts, 8, eos_ids=())])


@pytest.mark.parametrize("dp, tp", [(1, 8), (2, 4)])
def test_row_stable_decode_gathers_no_weight(checkpoint, dp, tp):
    """The decode that generate and the engine run where a model can speculate (row-stable): the row kernel's custom
    call has no partitioning rule, so on a mesh XLA would gather every matrix whole for it at every step; there the
    per-row products run instead, split by the mesh. Nothing gathered is as large as the smallest matrix."""
    from jaxllm.model import ops

    assert ops.row_kernel_ready(), "the row kernel did not build: this check would test nothing"
    params = load(checkpoint, mesh=make_mesh(dp=dp, tp=tp))
    ids, mask = left_pad([[5, 6, 7], [8, 9]] * dp, 16, 0)
    found = collectives(params, GenerationSettings(max_new_tokens=4, length=32, row_stable=True), ids, mask)
    print(found)
    smallest = min(leaf.size for leaf in jax.tree.leaves(params) if leaf.ndim == 2)
    for shape in found["all-gather"]:
        size = elements(shape)
        assert size < smallest, shape


@pytest.mark.parametrize("dp, tp", [(2, 4)])
def test_serving_engine_on_a_mesh_equals_one_device(checkpoint, dp, tp):
    """`jaxllm serve --mesh`: the engine's slots decode over sharded parameters and make one device's tokens."""
    from jaxllm.engine import Engine

    prompts = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 57))]
    one = load(checkpoint)
    engine = Engine(load(checkpoint, mesh=make_mesh(dp=dp, tp=tp)), slots=4, max_context=128, decode_steps=4,
                    eos_ids=[]).start()
    try:
        got = [r.tokens for r in engine.generate(prompts, 10, timeout=300)]
    finally:
        engine.stop()
    assert got == [generate(one, p, 10, eos_ids=[]).tokens for p in prompts]


# ---- experts split over tp --------------------------------------------------------------------------------------

# 8 experts, top 2, a gated shared expert and one dense layer: every tp of MESHES splits the experts whole.
MOE_CONFIG = dict(model_type="qwen2_moe", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256, rms_norm_eps=1e-5,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                  mlp_only_layers=[1])


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return parity.random_checkpoint(MOE_CONFIG, tmp_path_factory.mktemp("moe"), seed=5, scale=0.08)


@pytest.mark.parametrize("dp, tp", [(1, 8), (2, 4)])
def test_experts_on_a_mesh_equal_one_device(moe, dp, tp):
    """Logits of a prefill and greedy tokens equal one device's; each device holds E / tp experts, so its parameter
    bytes shrink with tp."""
    ids, positions = ids_for(8, 12), np.tile(np.arange(12), (8, 1))
    one_params = load(moe)
    one = np.asarray(forward(one_params, ids, positions))
    params = load(moe, mesh=make_mesh(dp=dp, tp=tp))
    diff = float(np.abs(np.asarray(forward(params, ids, positions)) - one).max())
    experts = params.layers[0].experts_gate_up
    assert {shard.data.shape for shard in experts.addressable_shards} == {(8 // tp, 64, 2, 128)}
    per_device = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(params))
    full = sum(leaf.nbytes for leaf in jax.tree.leaves(one_params))
    print(f"experts on dp={dp} tp={tp}: max_abs_diff {diff:.3g} (logits reach {np.abs(one).max():.2f}), "
          f"{per_device:,} parameter bytes per device of {full:,}")
    assert diff <= 1e-5 and np.abs(one).max() > 1.0
    if tp > 1:
        assert per_device < full
    prompts = [ids_for(1, 9, seed=1)[0].tolist(), ids_for(1, 3, seed=2)[0].tolist()]
    assert ([r.tokens for r in generate(params, prompts, 8, eos_ids=())]
            == [r.tokens for r in generate(one_params, prompts, 8, eos_ids=())])


def test_experts_decode_step_reduces_once_per_moe_layer_and_gathers_no_expert(moe):
    params = load(moe, mesh=make_mesh(dp=2, tp=4))
    ids, mask = left_pad([[5, 6, 7], [8, 9]] * 2, 16, 0)
    found = collectives(params, GenerationSettings(max_new_tokens=4, length=32), ids, mask)
    print(found)
    # No more reductions of [B/dp, 1, D] than a dense model's 2 per layer + 1 (tests above): the experts' psum and the
    # shared expert's down_proj (split over F) reduce together, once per MoE layer. Measured: 4 in all.
    rows = [s for s in found["all-reduce"] if re.fullmatch(r"f32\[2,(1,)?128\]\{.*\}", s)]
    assert len(rows) <= 2 * MOE_CONFIG["num_hidden_layers"] + 1 and len(rows) == len(found["all-reduce"]), found
    expert_sizes = {leaf.addressable_shards[0].data.size for leaf in jax.tree.leaves(params.layers[0].experts_gate_up)}
    for shape in found["all-gather"]:
        size = elements(shape)
        assert size not in expert_sizes and size <= 64 * 128, shape


@pytest.mark.parametrize("dp, tp", [(2, 4)])
def test_speculation_on_a_mesh_leaves_the_greedy_output_unchanged(checkpoint, dp, tp):
    """Prompt lookup and a self-draft on a mesh: the same tokens as the plain decode on that mesh, for a batch whose
    rows accept different counts (two repeat themselves, one does not) and one that dp pads with filler rows."""
    from jaxllm.generation import self_draft

    params = load(checkpoint, mesh=make_mesh(dp=dp, tp=tp))
    prompts = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [40, 41, 42, 40, 41], [100 + i for i in range(23)]]
    plain = [r.tokens for r in generate(params, prompts, 24, eos_ids=[])]
    assert [r.tokens for r in generate(params, prompts, 24, eos_ids=[], speculate="lookup")] == plain
    assert [r.tokens for r in generate(params, prompts, 24, eos_ids=[], draft=self_draft(params, 1))] == plain
