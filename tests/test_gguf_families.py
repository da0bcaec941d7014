"""GGUF import of every family jaxllm reads: a random Transformers model written as llama.cpp writes it comes back
with the tensors and config of Transformers' own GGUF loader, and of the model it was written from."""

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from gguf_util import (Q, assert_config_agrees, assert_config_reads_back, bpe_tokenizer_metadata, gguf_tensors,
                       random_model, spm_tokenizer_metadata, write_gguf_file, written_model)
from jaxllm import parity
from jaxllm.gguf_reader import read_gguf
from jaxllm.errors import TokenizerError
from jaxllm.loader import load
from jaxllm.tokenizer import Tokenizer as JaxllmTokenizer

V, D, F, N, K = 272, 96, 64, 3, 1  # odd query heads sharing one KV head; rows of 96 and 64 are Q8_0 blocks
EPS = 2.0 ** -20  # exact in float32, so it survives GGUF's float32 metadata
COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=N, num_key_value_heads=K,
              rms_norm_eps=EPS, max_position_embeddings=256, bos_token_id=259, eos_token_id=260, pad_token_id=261)


def rope_theta(config):  # Gemma 3 keeps one RoPE per layer type; GGUF's freq_base is the global layers'
    return config.rope_parameters.get("full_attention", config.rope_parameters)["rope_theta"]


@dataclass(frozen=True)
class Family:
    config: Callable  # -> a small Transformers config
    arch: str  # GGUF general.architecture
    metadata: Callable = lambda config: {}  # config -> the <arch>.* keys only this family's converter writes
    pre: str = "gpt2"  # tokenizer.ggml.pre


FAMILIES = {  # the keys each of llama.cpp's convert_hf_to_gguf model classes writes beyond the common ones
    "llama": Family(lambda: transformers.LlamaConfig(**COMMON, num_hidden_layers=2, rope_theta=50000.0), "llama",
                    lambda c: {"vocab_size": V, "rope.dimension_count": c.head_dim}),
    # Transformers reads a llama file as Mistral only when general.name is exactly "mistral".
    "mistral": Family(lambda: transformers.MistralConfig(**COMMON, num_hidden_layers=2, head_dim=32), "llama",
                      lambda c: {"vocab_size": V, "rope.dimension_count": c.head_dim}),
    "qwen2": Family(lambda: transformers.Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=True,
                                                     rope_theta=1e6), "qwen2", pre="qwen2"),
    "qwen3": Family(lambda: transformers.Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=128), "qwen3",
                    lambda c: {"attention.key_length": c.head_dim, "attention.value_length": c.head_dim}, "qwen2"),
    "phi3": Family(lambda: transformers.Phi3Config(**COMMON, num_hidden_layers=2), "phi3",
                   lambda c: {"rope.dimension_count": D // N,
                              "rope.scaling.original_context_length": c.original_max_position_embeddings}),
    "gemma2": Family(lambda: transformers.Gemma2Config(**COMMON, num_hidden_layers=2, head_dim=256, sliding_window=64),
                     "gemma2",
                     lambda c: {"attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
                                "attn_logit_softcapping": c.attn_logit_softcapping,
                                "final_logit_softcapping": c.final_logit_softcapping,
                                "attention.sliding_window": c.sliding_window}),
    "gemma3": Family(lambda: transformers.Gemma3TextConfig(**COMMON, num_hidden_layers=6, head_dim=256,
                                                           sliding_window=64), "gemma3",
                     lambda c: {"attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
                                "attention.sliding_window": c.sliding_window}),
}


def family_metadata(family, config):
    """The metadata llama.cpp writes for a model of this config, less the tokenizer's."""
    metadata = {"general.name": "mistral"} if config.model_type == "mistral" else {}
    return metadata | {f"{family.arch}.{key}": value for key, value in {
        "block_count": config.num_hidden_layers, "context_length": config.max_position_embeddings,
        "embedding_length": D, "feed_forward_length": F, "attention.head_count": N, "attention.head_count_kv": K,
        "attention.layer_norm_rms_epsilon": EPS, "rope.freq_base": float(rope_theta(config)),
        **family.metadata(config)}.items()}


def write_family(path, family, model, qtype=Q.F32):
    metadata = family_metadata(family, model.config) | bpe_tokenizer_metadata(V, family.pre)
    return write_gguf_file(path, family.arch, metadata, gguf_tensors(model, family.arch, qtype))


@pytest.fixture(scope="module", params=list(FAMILIES))
def written(request, tmp_path_factory):
    """(family name, source model, GGUF path)."""
    return written_model(request, tmp_path_factory, FAMILIES, random_model, write_family)


def transformers_tensors(path, model):
    """Transformers' GGUF loader's tensors. It cannot map a file it reads as Mistral (gguf-py has no "mistral"
    architecture), so a Mistral file's names are mapped through Llama's, which are the same."""
    if model.config.model_type == "mistral":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, num_hidden_layers=2, head_dim=32))
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]


def test_tensors_equal_transformers_gguf_loader_and_the_source_model(written):
    _, model, path = written
    ours = dict(read_gguf(path).tensors())
    theirs = transformers_tensors(path, model)
    assert ours.keys() == theirs.keys()
    for name, weight in ours.items():
        assert weight.dtype == np.float32 and np.array_equal(weight, theirs[name].numpy()), name
    tied = model.config.tie_word_embeddings
    source = {n: t.numpy() for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}
    assert ours.keys() == source.keys()
    for name, weight in ours.items():
        assert np.array_equal(weight, source[name]), name


def test_config_agrees_with_transformers_gguf_loader(written):
    _, _, path = written
    assert_config_agrees(path)


def test_config_reads_back_as_the_source_models(written):
    _, model, path = written
    assert_config_reads_back(path, model)


def test_tokenizer_files_are_built(written):
    _, model, path = written
    files = read_gguf(path).tokenizer_files()
    assert files.keys() == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    tokenizer = Tokenizer.from_str(json.dumps(files["tokenizer.json"]))
    assert tokenizer.encode(" the").ids == [258]  # Ġthe, the last merge
    assert files["tokenizer_config.json"]["eos_token"] == "</s>"
    assert files["generation_config.json"]["eos_token_id"] == model.config.eos_token_id


def test_logits_equal_the_source_model_and_transformers_gguf_model(written):
    """jaxllm.load on the GGUF file runs the family's forward: logits at 80 positions (past Gemma's window of 64)
    equal those of the model the file was written from and of Transformers' own GGUF load of the file."""
    name, model, path = written
    ids = np.random.default_rng(0).integers(0, V, (1, 80))
    positions = np.arange(80)[None]
    ours = parity.jax_logits(load(path), ids, positions)
    source = parity.reference_logits(model, ids, positions)
    scale = np.abs(source).max()
    assert parity.compare_logits(source, ours).max_abs_diff <= 1e-5 * max(1.0, scale), name
    if name != "mistral":  # Transformers cannot load the tensors of a file it reads as Mistral (see above)
        theirs = parity.reference_logits(parity.reference_model(path), ids, positions)
        assert parity.compare_logits(theirs, ours).max_abs_diff <= 1e-5 * max(1.0, scale), name


def test_q8_0_weights_equal_transformers_gguf_loader(tmp_path):
    family = FAMILIES["qwen2"]
    model = random_model(family.config())
    path = write_family(tmp_path / "qwen2-q8_0.gguf", family, model, Q.Q8_0)
    checkpoint = read_gguf(path)
    assert checkpoint.stored_type("model.layers.0.self_attn.q_proj.weight") == "Q8_0"
    theirs = transformers_tensors(path, model)
    source = model.state_dict()
    for name, weight in checkpoint.tensors():
        assert np.array_equal(weight, theirs[name].numpy()), name
        np.testing.assert_allclose(weight, source[name].numpy(), rtol=0, atol=np.abs(weight).max() / 127)


def metadata_only(path, arch, general_name=None, **keys):
    """A GGUF with <arch>.* keys and no tensors: enough for a config."""
    metadata = {f"{arch}.{key}": value for key, value in keys.items()}
    return write_gguf_file(path, arch, metadata | ({"general.name": general_name} if general_name else {}), {})


SHAPE = {"block_count": 2, "context_length": 64, "embedding_length": D, "feed_forward_length": F, "vocab_size": V,
         "attention.layer_norm_rms_epsilon": EPS}


@pytest.mark.parametrize("name, model_type", [("mistral", "mistral"), ("Mistral 7B Instruct", "llama")])
def test_llama_file_is_mistral_only_by_the_exact_name_mistral(tmp_path, name, model_type):
    path = metadata_only(tmp_path / "m.gguf", "llama", name, **SHAPE, **{"attention.head_count": N})
    assert read_gguf(path).config["model_type"] == load_gguf_checkpoint(str(path))["config"]["model_type"] == model_type


@pytest.mark.parametrize("arch, layers, hidden, heads, head_dim, scalar", [
    ("gemma2", 46, 4608, 32, 128, 144),  # Gemma-2-27B: queries scaled by 1/sqrt(D/N), as llama.cpp does
    ("gemma2", 42, 3584, 16, 256, 256),  # Gemma-2-9B: by 1/sqrt(head_dim)
    ("gemma3", 62, 5376, 32, 128, 168),  # Gemma-3-27B
])
def test_gemma_query_scale_follows_llama_cpp(tmp_path, arch, layers, hidden, heads, head_dim, scalar):
    path = metadata_only(tmp_path / "g.gguf", arch, **{
        **SHAPE, "block_count": layers, "embedding_length": hidden, "attention.head_count": heads,
        "attention.key_length": head_dim, "attention.sliding_window": 4096})
    assert read_gguf(path).config["query_pre_attn_scalar"] == scalar


# --- SentencePiece vocabularies (tokenizer.ggml.model "llama"): Llama-2, Mistral, Phi-3, Gemma -----------------------

SPM_FAMILIES = ["llama", "mistral", "phi3", "gemma2", "gemma3"]
ROUND_TRIP = ["hello world", "the hello  world", "trailing  ", "digits 1230 and 321!", "héllo wörld",
              "emoji 😀🎉 and 🇫🇷 flags", "tabs\tand\nnewlines"]
# Text where the families differ: a leading space (kept by Phi-3 and Gemma, one dropped by Llama's decoder), raw "▁",
# special and user-defined tokens within text (Phi-3 puts "▁" after each, Llama only at the start).
SPM_TEXTS = ROUND_TRIP + [" the", "  leading spaces", "▁the raw", "<s>hello</s> the", "<|user|>hi<think>the  world",
                          "<pad><unk>!", ""]


def spm_tokenizers(folder, name, add_bos=None):
    """(ours, Transformers') tokenizers of a GGUF file of family `name` with the SentencePiece vocabulary (and no
    tensors: the tokenizer needs none)."""
    family = FAMILIES[name]
    metadata = family_metadata(family, family.config()) | spm_tokenizer_metadata(add_bos)
    path = write_gguf_file(folder / f"{name}.gguf", family.arch, metadata, {})
    ours = JaxllmTokenizer.from_files(read_gguf(path).tokenizer_files(), path)
    return ours, transformers.AutoTokenizer.from_pretrained(folder, gguf_file=path.name)


@pytest.fixture(scope="module", params=SPM_FAMILIES)
def spm(request, tmp_path_factory):
    return spm_tokenizers(tmp_path_factory.mktemp(f"spm-{request.param}"), request.param)


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_ids_and_text_equal_transformers_gguf_tokenizer(spm, text):
    ours, theirs = spm
    ids = theirs(text)["input_ids"]
    assert ours.encode(text) == ids
    assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sentencepiece_decodes_back_the_text_with_bytes_for_unknown_characters(spm, text):
    ours, _ = spm
    ids = ours.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text
    if not text.isascii():  # é, ö and emoji are not pieces of the vocabulary: each byte is a <0x..> token
        assert any(3 <= i < 3 + 256 for i in ids)


@pytest.mark.parametrize("add_bos", [None, True, False])
@pytest.mark.parametrize("name", SPM_FAMILIES)
def test_sentencepiece_bos_follows_add_bos_token_as_in_transformers(tmp_path, name, add_bos):
    """Without the flag, BOS is added, as Transformers and llama.cpp do for SentencePiece vocabularies."""
    ours, theirs = spm_tokenizers(tmp_path, name, add_bos)
    assert ours.encode("hello") == theirs("hello")["input_ids"]
    assert (ours.encode("hello")[0] == 1) == (add_bos is not False)  # <s>
    assert ours.encode("hello", add_special_tokens=False)[0] != 1


def test_unknown_tokenizer_model_is_named(tmp_path):
    family = FAMILIES["llama"]
    metadata = family_metadata(family, family.config()) | spm_tokenizer_metadata() | {"tokenizer.ggml.model": "t5"}
    path = write_gguf_file(tmp_path / "t5.gguf", family.arch, metadata, {})
    with pytest.raises(TokenizerError, match=f"{path}: tokenizer.ggml.model is 't5'; jaxllm builds"):
        read_gguf(path).tokenizer_files()
