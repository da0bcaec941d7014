"""experts_chosen (only the chosen experts) against experts_all (every expert on every token, the reference form),
for each way it runs and each weight format, at decode and prefill sizes; and what the compiled decode reads."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import LLMConfig
from jaxllm.generation import DECODE_COMPILER_OPTIONS
from jaxllm.model import Layer
from jaxllm.model.experts import EXPERT_METHODS, PAIRS_PER_EXPERT, experts_all, experts_chosen, route
from jaxllm.weights import Blocks, quantize_int8

D, F, E, K = 64, 32, 8, 2  # hidden, an expert's width, experts, chosen per token
CONFIG = LLMConfig.from_dict(dict(model_type="mixtral", vocab_size=32, hidden_size=D, intermediate_size=F,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  num_local_experts=E, num_experts_per_tok=K))
TOLERANCE = 1e-5  # relative to the output's largest magnitude: fp32 rounding
BF16_TOLERANCE = 2e-2  # the two forms round their bf16 intermediates at different points
TOKENS = {"decode": 1, "decode-batch": 8, "prefill": 300}  # M = B·T; 8·K pairs run as pairs, 300·K as tiles


def q8_0(w: np.ndarray) -> Blocks:
    """w [*out, in] as GGUF Q8_0 blocks of 32: int8 values, an f16 scale per block."""
    blocks = w.reshape(*w.shape[:-1], -1, 32)
    scale = np.abs(blocks).max(axis=-1) / 127
    values = np.rint(blocks / scale[..., None]).astype(np.int8)
    return Blocks(values=jnp.asarray(values), scale=jnp.asarray(scale.astype(np.float16)), format="Q8_0")


def expert_layer(weights: str, seed: int = 0, biases: bool = False) -> Layer:
    rng = np.random.default_rng(seed)
    gate_up = rng.standard_normal((E, F, 2, D), np.float32) * 0.2  # [E, F, 2, D]
    down = rng.standard_normal((E, D, F), np.float32) * 0.2  # [E, D, F]
    if weights == "int8":
        gate_up, down = (jax.tree_util.tree_map(jnp.asarray, quantize_int8(w)) for w in (gate_up, down))
    elif weights == "gguf":
        gate_up, down = q8_0(gate_up), q8_0(down)
    else:
        dtype = jnp.bfloat16 if weights == "bf16" else jnp.float32
        gate_up, down = jnp.asarray(gate_up, dtype), jnp.asarray(down, dtype)
    extra = {}
    if biases:  # gpt-oss's per-expert biases
        extra = dict(experts_gate_up_bias=jnp.asarray(rng.standard_normal((E, F, 2), np.float32)),
                     experts_down_bias=jnp.asarray(rng.standard_normal((E, D), np.float32)))
    return Layer(input_layernorm=None, o_proj=None, post_attention_layernorm=None,
                 router=jnp.asarray(rng.standard_normal((E, D), np.float32)), experts_gate_up=gate_up,
                 experts_down=down, **extra)


def routed(layer: Layer, M: int, dtype=jnp.float32, seed: int = 1):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((M, D), np.float32), dtype)  # [M, D]
    _, weights, chosen = route(layer, x, CONFIG)
    return x, weights, chosen


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


CASES = [("pairs", "decode"), ("pairs", "decode-batch"), ("tiles", "decode-batch"), ("tiles", "prefill"),
         ("ragged", "prefill")]  # (method, tokens)


@pytest.mark.parametrize("method, tokens", CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("weights", ["fp32", "int8", "gguf"])
def test_chosen_experts_match_every_expert_weighted(weights, method, tokens):
    layer = expert_layer(weights)
    x, w, chosen = routed(layer, TOKENS[tokens])
    out = jax.jit(lambda *a: experts_chosen(*a, CONFIG, method))(layer, x, w, chosen)  # [M, D]
    assert relative_error(out, experts_all(layer, x, w, chosen, CONFIG)) <= TOLERANCE


@pytest.mark.parametrize("method, tokens", [("pairs", "decode"), ("tiles", "prefill"), ("ragged", "prefill")])
def test_bf16_experts_match_within_bf16_rounding(method, tokens):
    layer = expert_layer("bf16")
    x, w, chosen = routed(layer, TOKENS[tokens], jnp.bfloat16)
    out = jax.jit(lambda *a: experts_chosen(*a, CONFIG, method))(layer, x, w, chosen)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, experts_all(layer, x, w, chosen, CONFIG)) <= BF16_TOLERANCE


@pytest.mark.parametrize("method", EXPERT_METHODS)
def test_expert_biases_join_each_chosen_expert(method):
    layer = expert_layer("fp32", biases=True)
    x, w, chosen = routed(layer, TOKENS["prefill"])
    out = jax.jit(lambda *a: experts_chosen(*a, CONFIG, method))(layer, x, w, chosen)
    assert relative_error(out, experts_all(layer, x, w, chosen, CONFIG)) <= TOLERANCE


def test_one_expert_taking_every_token_fills_many_tiles():
    """The tiles' static count holds in the worst case: every pair on one expert (several tiles of it), and the
    others empty."""
    layer = expert_layer("fp32")
    x, w, _ = routed(layer, TOKENS["prefill"])
    chosen = jnp.stack([jnp.full(len(x), 3), jnp.arange(len(x)) % 2 * 7], axis=1).astype(jnp.int32)  # [M, K]
    out = jax.jit(lambda *a: experts_chosen(*a, CONFIG, "tiles"))(layer, x, w, chosen)
    assert relative_error(out, experts_all(layer, x, w, chosen, CONFIG)) <= TOLERANCE


def test_decode_and_prefill_pick_pairs_and_tiles_on_cpu():
    layer = expert_layer("fp32")
    most = PAIRS_PER_EXPERT * E // K  # tokens
    for M, loop in ((most, "pairs"), (most + 1, "tiles")):
        x, w, chosen = routed(layer, M)
        hlo = jax.jit(lambda *a: experts_chosen(*a, CONFIG)).lower(layer, x, w, chosen).as_text()
        # The tiles sort the pairs by expert; the pairs do not.
        assert ("sort" in hlo) == (loop == "tiles"), (M, loop)


@pytest.mark.parametrize("weights", ["fp32", "int8", "bf16"])
def test_decode_reads_the_chosen_experts_without_copying_the_stack(weights):
    """A one-token decode of an experts layer writes no f32 buffer the size of the expert stack [E, F, 2, D] or
    [E, D, F] (the reference form and a gather of every expert would), and with int8 or bf16 weights none of even
    one expert's matrix [F, 2, D] or [D, F]: each chosen expert's convert fuses into its matvec."""
    layer = expert_layer(weights)
    x, w, chosen = routed(layer, 1, jnp.bfloat16 if weights == "bf16" else jnp.float32)
    step = jax.jit(lambda *a: experts_chosen(*a, CONFIG))
    hlo = step.lower(layer, x, w, chosen).compile(DECODE_COMPILER_OPTIONS).as_text()
    # Buffers are what the computations outside fusions produce (a fusion's own intermediates are never written out).
    unfused = "\n".join(c for c in hlo.split("\n\n") if not c.lstrip().startswith("%fused"))
    # Parameters, tuples, their elements and bitcasts alias buffers that exist already.
    written = r"= f32\[([\d,]+)\]\{[\d,]*\} (?!parameter|get-tuple-element|bitcast|tuple)\w"
    buffers = {tuple(int(n) for n in s.split(",")) for s in re.findall(written, unfused)}
    stacks = {(E, F, 2, D), (E, 2 * F, D), (E * F * 2, D), (E, D, F), (E * D, F)}
    assert buffers and not buffers & stacks, buffers & stacks
    if weights != "fp32":
        one = {(F, 2, D), (1, F, 2, D), (2 * F, D), (D, F), (1, D, F)}
        assert not buffers & one, buffers & one


def test_moe_bench_prints_the_ratio_to_dense(capsys):
    from jaxllm import cli

    assert cli.main(["bench", "--moe", "--quick", "--repeats", "1", "-w", "fp32"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("weights"))
    assert header.split()[:2] == ["weights", "model"] and header.count("vs dense") == 2
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("fp32")}
    assert set(rows) == {"moe", "dense"} and float(rows["dense"][-3]) == 1.0
