"""Weight formats (jaxllm/weights.py): bf16, int8 and GGUF blocks kept as stored, on the real default model and on a
GGUF holding every block type, checked against fp32 jaxllm, Transformers and gguf's own dequantization."""

import dataclasses
import math

import gguf
import jax
import numpy as np
import pytest

from gguf_util import Q, write_gguf
from jaxllm import cli, load, load_model, parity
from jaxllm.gguf_reader import read_gguf
from jaxllm.errors import InputError
from jaxllm.generation import generate, left_pad, positions_from_mask
from jaxllm.loader import MATRICES
from jaxllm.weights import BLOCK_FORMATS, Blocks, Int8, format_of, is_quantized, nbytes

# Measured on the default model (README, "Weights") and asserted with margin: KL(fp32 ‖ format) over the 165
# positions of parity.QUALITY_PROMPTS, and top-1 agreement with fp32.
QUALITY = {"int8": {"kl_mean": 0.004, "top1": 0.96}, "bf16": {"kl_mean": 0.004, "top1": 0.96}}
GGUF_TOLERANCE = 2e-4  # the bound for logits kept in GGUF blocks against fp32


def matrices(params):
    """(name, matrix) for every matrix field of a Params."""
    out = [("embed_tokens", params.embed_tokens)] + ([("lm_head", params.lm_head)] if params.lm_head is not None else [])
    return out + [(f"layers.{i}.{f}", getattr(layer, f)) for i, layer in enumerate(params.layers)
                  for f in MATRICES if getattr(layer, f, None) is not None]


@pytest.fixture(scope="module")
def batch(smollm2):
    rows = [smollm2.tokenizer.encode(p) for p in parity.QUALITY_PROMPTS]
    ids, mask = left_pad(rows, max(map(len, rows)), 0)
    return rows, ids, mask, np.asarray(positions_from_mask(mask))


@pytest.fixture(scope="module")
def fp32_logits(smollm2, batch):
    _, ids, mask, positions = batch
    return parity.jax_logits(smollm2.params, ids, positions, mask, exact=False)


@pytest.fixture(scope="module")
def formats():
    """The default model in every format but fp32 (the session's smollm2 fixture): loaded once."""
    return {w: load_model(None, w) for w in ("bf16", "int8", "gguf")}


# ---- the real model ----------------------------------------------------------------------------------------------


def test_gguf_format_keeps_the_files_blocks_and_bytes(formats, smollm2_gguf):
    params = formats["gguf"].params
    stored = read_gguf(smollm2_gguf)
    kinds = {name: format_of(w) for name, w in matrices(params)}
    assert set(kinds.values()) == {"Q4_1", "Q8_0"} and kinds["embed_tokens"] == "Q8_0"
    # Memory is the file's tensor bytes: every block, scale and offset as stored, nothing added.
    assert nbytes(params) == sum(int(t.data.nbytes) for t in stored.reader.tensors)
    layer = params.layers[0]
    assert isinstance(layer.qkv_proj, Blocks) and layer.qkv_proj.shape == (3, 5, 64, 576)
    assert layer.qkv_proj.values.dtype == np.uint8 and layer.qkv_proj.scale.dtype == np.float16


def test_gguf_format_logits_equal_fp32_within_2e4(formats, batch, fp32_logits):
    _, ids, mask, positions = batch
    ours = parity.jax_logits(formats["gguf"].params, ids, positions, mask, exact=False)
    q = parity.logit_quality(fp32_logits, ours, mask)
    print(f"gguf vs fp32, prefill path: {q}")
    assert q["max_abs_diff"] <= GGUF_TOLERANCE and q["top1_agreement"] == 1.0


@pytest.mark.parametrize("weights", ["gguf", "int8"])
def test_one_token_path_matches_the_batched_path(formats, smollm2, weights):
    """A call with one token (decode's shape: the matvec that reads the narrow type inside the dot) gives the logits
    of the many-token path's dequantized dot, and for gguf those of fp32."""
    params = formats[weights].params
    ids, positions = np.array([[504], [3575], [28]]), np.array([[0], [7], [300]])
    one = [np.asarray(parity.jax_logits(params, ids[i:i + 1], positions[i:i + 1], exact=False)) for i in range(3)]
    many = parity.jax_logits(params, ids, positions, exact=False)  # three rows: the dot of dequantized weights
    diff = max(float(np.abs(one[i][0] - many[i]).max()) for i in range(3))
    print(f"{weights}: one-token vs batched path {diff:.3g}")
    assert diff <= GGUF_TOLERANCE
    if weights == "gguf":
        fp32 = parity.jax_logits(smollm2.params, ids, positions, exact=False)
        assert float(np.abs(fp32 - many).max()) <= GGUF_TOLERANCE


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_quality_against_fp32_and_transformers(formats, batch, fp32_logits, smollm2_reference, weights):
    _, ids, mask, positions = batch
    ours = parity.jax_logits(formats[weights].params, ids, positions, mask, exact=False)
    reference = parity.reference_logits(smollm2_reference, ids, positions, mask)
    for name, logits in (("jaxllm fp32", fp32_logits), ("transformers fp32", reference)):
        q = parity.logit_quality(logits, ours, mask)
        print(f"{weights} vs {name}: {q}")
        assert q["positions"] == int(mask.sum()) > 150
        assert q["kl_mean"] <= QUALITY[weights]["kl_mean"] and q["top1_agreement"] >= QUALITY[weights]["top1"]


def test_bf16_computes_in_bf16_with_fp32_logits(formats, batch):
    params = formats["bf16"].params
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {np.dtype("bfloat16")}
    _, ids, mask, positions = batch
    assert parity.jax_logits(params, ids[:1], positions[:1], exact=False).dtype == np.float32


def test_int8_matrices_and_their_bytes(formats):
    params = formats["int8"].params
    kept = [name for name, w in matrices(params) if not is_quantized(w)]
    # The matrices whose inputs carry outlier activations stay fp32: a few down_proj on this model.
    assert 0 < len(kept) <= 8 and all(name.endswith("down_proj") for name in kept), kept
    for name, w in matrices(params):
        if isinstance(w, Int8):
            rows, cols = math.prod(w.shape[:-1]), w.shape[-1]
            assert w.values.dtype == np.int8 and nbytes(w) == rows * cols + 4 * rows + 4 * cols, name
            assert int(np.abs(np.asarray(w.values)).max()) == 127, name  # each row uses the whole range
    assert nbytes(params) < 0.3 * nbytes(load(None))


@pytest.mark.parametrize("weights", ["bf16", "int8", "gguf"])
def test_greedy_decode_is_deterministic_and_batches_equal_prompts_alone(formats, weights):
    model = formats[weights]
    prompts = ["The capital of France is", "def add(a, b):", "Water boils at"]
    alone = [generate(model, p, 12).tokens for p in prompts]
    assert generate(model, prompts[1], 12).tokens == alone[1]
    if weights == "bf16":
        # A batch runs its rows through other GEMM shapes than a prompt alone, and bf16 rounds them 0.3-0.55 apart
        # in the logits (measured); "def add(a, b):" has its top two tokens 0.018 apart alone, so its first greedy
        # token can flip with the CPU's kernels. bf16 is held to determinism and to logits within 1.0 of alone's.
        ids, mask = left_pad([model.tokenizer.encode(p) for p in prompts], 16, 0)
        positions = positions_from_mask(mask)
        batched = np.asarray(parity.jax_logits(model.params, ids, positions, mask, exact=False))
        for row in range(len(prompts)):
            one = parity.jax_logits(model.params, ids[row:row + 1], positions[row:row + 1], mask[row:row + 1],
                                    exact=False)
            real = mask[row].astype(bool)
            assert float(np.abs(np.asarray(one)[0][real] - batched[row][real]).max()) <= 1.0
        return
    assert [r.tokens for r in generate(model, prompts, 12)] == alone
    if weights == "int8":  # the uncached forward runs the same quantized matmuls for gguf
        assert generate(model, prompts[0], 12, use_cache=False).tokens == alone[0]


def test_every_format_names_paris(formats):
    for weights, model in formats.items():
        assert "Paris" in generate(model, "The capital of France is", 8).text, weights


def test_inspect_prints_each_matrix_format_and_bytes(capsys):
    assert cli.main(["inspect", "--weights", "gguf"]) == 0
    out = capsys.readouterr().out
    assert "weights gguf:" in out and "matrices not quantized: none" in out
    assert "layers.0.qkv_proj                  Q4_1 [3, 5, 64, 576] 345,600 B" in out
    assert "= values uint8 [3, 5, 64, 18, 16], scale float16 [3, 5, 64, 18], offset float16 [3, 5, 64, 18]" in out
    assert "embed_tokens                       Q8_0 [49152, 576] 30,081,024 B" in out


def test_bad_weight_format_and_gguf_without_a_gguf_file(smollm2_dir):
    with pytest.raises(InputError, match="weights must be one of fp32, bf16, int8, gguf; found 'int4'"):
        load(smollm2_dir, "int4")
    with pytest.raises(InputError, match="not a .gguf file"):
        load(smollm2_dir, "gguf")


# ---- a GGUF holding every block type -------------------------------------------------------------------------------

# write_gguf's own mix puts different types in one stacked field (q Q4_K, k Q4_0, v Q4_1): such a field is read as
# fp32. UNIFORM keeps q/k/v and gate/up of one type per layer, so that every block type lands in a stacked field too.
UNIFORM = {"token_embd": Q.Q4_0, "output": Q.Q6_K,
           **{f"blk.0.{n}": Q.Q4_K for n in ("attn_q", "attn_k", "attn_v", "ffn_down")},
           **{f"blk.0.{n}": Q.Q6_K for n in ("ffn_gate", "ffn_up", "attn_output")},
           **{f"blk.1.{n}": Q.Q8_0 for n in ("attn_q", "attn_k", "attn_v")},
           **{f"blk.1.{n}": Q.Q4_1 for n in ("ffn_gate", "ffn_up", "attn_output")}, "blk.1.ffn_down": Q.Q4_0}


@pytest.fixture(scope="module", params=["mixed", "uniform"])
def block_file(request, tmp_path_factory):
    from gguf_util import TYPES

    types = TYPES if request.param == "mixed" else UNIFORM
    return write_gguf(tmp_path_factory.mktemp("blocks") / f"{request.param}.gguf", types=types)


def test_blocks_dequantize_as_gguf_does(block_file):
    """Every matrix kept in blocks, dequantized by jaxllm inside JAX, equals gguf.quants.dequantize of the file's
    tensors (through the fp32 load, which also puts llama's Q/K rows back in HF order); its bytes are the file's."""
    quantized, fp32 = load(block_file, "gguf"), load(block_file)
    stored = {t.name: t for t in gguf.GGUFReader(block_file).tensors}
    kept = set()
    for (name, w), (_, expected) in zip(matrices(quantized), matrices(fp32)):
        if isinstance(w, Blocks):
            kept.add(w.format)
            np.testing.assert_allclose(np.asarray(w.dequantize()), np.asarray(expected), rtol=1e-6, atol=0, err_msg=name)
        else:
            assert w.dtype == np.float32
    assert kept <= set(BLOCK_FORMATS)
    if block_file.stem == "uniform":
        assert kept == set(BLOCK_FORMATS)
        # The file's bytes, but for Q4_K's 6-bit scales and mins: 12 bytes a super-block of 256 unpacked into 16.
        super_blocks = sum(t.n_elements // 256 for t in stored.values() if t.tensor_type == Q.Q4_K)
        assert nbytes(quantized) == sum(int(t.data.nbytes) for t in stored.values()) + 4 * super_blocks
    # Spot check one tensor straight against gguf: token_embd, unpermuted rows need no care there.
    embd = stored["token_embd.weight"]
    reference = gguf.quants.dequantize(embd.data, embd.tensor_type).reshape(quantized.embed_tokens.shape)
    np.testing.assert_allclose(np.asarray(quantized.embed_tokens.dequantize() if is_quantized(quantized.embed_tokens)
                                          else quantized.embed_tokens), reference, rtol=1e-6, atol=0)


def test_blocks_logits_and_greedy_equal_fp32(block_file):
    quantized, fp32 = load(block_file, "gguf"), load(block_file)
    ids = np.random.default_rng(1).integers(0, 512, (2, 9))
    positions = np.tile(np.arange(9), (2, 1))
    a, b = (parity.jax_logits(p, ids, positions, exact=False) for p in (quantized, fp32))
    scale = max(1.0, float(np.abs(b).max()))
    assert float(np.abs(a - b).max()) <= 1e-5 * scale
    # the matvec path
    a1, b1 = (parity.jax_logits(p, ids[:1, :1], positions[:1, :1], exact=False) for p in (quantized, fp32))
    assert float(np.abs(a1 - b1).max()) <= 1e-5 * scale
    prompt = ids[0].tolist()
    assert generate(quantized, prompt, 10, eos_ids=[]).tokens == generate(fp32, prompt, 10, eos_ids=[]).tokens


def test_inspect_lists_the_block_formats(block_file, capsys):
    assert cli.main(["inspect", "--model", str(block_file), "--weights", "gguf"]) == 0
    out = capsys.readouterr().out
    for kind in BLOCK_FORMATS if block_file.stem == "uniform" else ("Q6_K", "Q8_0"):
        assert f" {kind} [" in out
    if block_file.stem == "mixed":  # q/k/v of three types: the stacked field is fp32, and named as such
        assert "matrices not quantized: layers.0.qkv_proj" in out


def test_int8_on_a_gguf_quantizes_the_dequantized_weights(block_file):
    params = load(block_file, "int8")
    assert all(isinstance(w, Int8) or w.dtype == np.float32 for _, w in matrices(params))
    assert dataclasses.is_dataclass(params.layers[0].qkv_proj)


@pytest.mark.parametrize("weights", ["int8", "gguf"])
def test_decode_over_several_rows_writes_no_f32_copy_of_a_matrix(formats, weights):
    """A decode step over 8 rows (a server's slots) multiplies each quantized matrix with its dequantization fused
    into the matvecs: no buffer the compiled program writes holds a matrix as f32 (the int8 matrices whose input
    carries outliers are parameters in fp32 from the start)."""
    import re

    from jaxllm.generation import DECODE_COMPILER_OPTIONS, next_logits
    from jaxllm.model import KVCache

    params = formats[weights].params
    cache = KVCache.zeros(params.config, 8, 256).replace(empty=False)
    step = jax.jit(lambda p, c, last: next_logits(p, c, last))
    hlo = step.lower(params, cache, np.zeros(8, np.int32)).compile(DECODE_COMPILER_OPTIONS).as_text()
    shapes = {",".join(map(str, m.shape)) for _, m in matrices(params) if is_quantized(m)}
    # Buffers are what the computations outside fusions produce (a fusion's own intermediates are never written out).
    unfused = [c for c in hlo.split("\n\n") if not c.lstrip().startswith("%fused")]
    buffers = set(re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} (?!parameter)\w", "\n".join(unfused)))
    assert shapes and buffers and not shapes & buffers, shapes & buffers
