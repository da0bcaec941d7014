"""GGUF files for tests, written as llama.cpp writes them: metadata keys, tensor names and encodings."""

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType


def write_gguf_file(path, arch, metadata, tensors):
    """A GGUF file. `metadata`: key -> value (bool, int as uint32, float as float32, str, or a list of one of them);
    `tensors`: GGUF name -> array in HF orientation [out, in], stored as its dtype (F32, F16, I32...), or
    (encoded bytes, quantization type)."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, tensor in tensors.items():
        data, qtype = tensor if isinstance(tensor, tuple) else (tensor, None)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def byte_symbols():
    """GPT-2's printable stand-ins for the 256 bytes, in byte order: byte-level BPE's base vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def bpe_tokenizer_metadata(vocab_size, pre="gpt2"):
    """A byte-level BPE tokenizer of `vocab_size` tokens as tokenizer.ggml.* metadata: the 256 bytes, three merges
    ("Ġthe"), then control tokens <s> (BOS), </s> (EOS), <pad> and fillers."""
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = byte_symbols() + [merge.replace(" ", "") for merge in merges] + ["<s>", "</s>", "<pad>"]
    control = len(tokens) - 3
    tokens += [f"<|extra_{i}|>" for i in range(vocab_size - len(tokens))]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * control + [3] * (vocab_size - control),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": control,
        "tokenizer.ggml.eos_token_id": control + 1,
        "tokenizer.ggml.padding_token_id": control + 2,
    }


# llama.cpp's token types (llama_token_type), as its SentencePiece converter writes them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def spm_tokenizer_metadata(add_bos=None):
    """A SentencePiece BPE vocabulary as llama.cpp writes it (model "llama"): <unk>, <s>, </s>, the 256 byte pieces
    <0x00>..<0xFF>, "▁word" pieces scored best first, the single characters they are made of, a piece of two real
    spaces (as Gemma files store one), then control <|user|> and <pad> and user-defined <think>. `add_bos`: the
    tokenizer.ggml.add_bos_token flag, or None to leave it out."""
    pieces = ["▁t", "he", "▁the", "▁h", "▁he", "ll", "▁hell", "▁hello", "▁w", "or", "▁wor", "ld", "▁world",
              "▁1", "23", "  "]
    chars = ["▁", "e", "t", "h", "l", "o", "w", "r", "d", "1", "2", "3", "0", "!"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, *chars,
              "<|user|>", "<pad>", "<think>"]
    types = [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256, *[NORMAL] * (len(pieces) + len(chars)),
             CONTROL, CONTROL, USER_DEFINED]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces) + len(chars))] + [0.0] * 3
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": tokens.index("<pad>"),
    }
    return metadata | ({} if add_bos is None else {"tokenizer.ggml.add_bos_token": add_bos})


# --- a 2-layer llama with random weights, one tensor of each type the importer promises ---------------------------

D, F, V, N, K = 256, 512, 512, 4, 2  # K-quants need rows that are a multiple of 256
TYPES = {  # every type the importer promises, each on a tensor whose layout matters
    "token_embd": Q.Q8_0,
    "output": Q.Q6_K,
    "blk.0.attn_q": Q.Q4_K,
    "blk.0.attn_k": Q.Q4_0,
    "blk.0.attn_v": Q.Q4_1,
    "blk.0.attn_output": Q.F16,
    "blk.0.ffn_gate": Q.BF16,
    "blk.0.ffn_up": Q.Q8_0,
    "blk.0.ffn_down": Q.Q6_K,
    "blk.1.attn_q": Q.Q6_K,
    "blk.1.attn_k": Q.Q4_K,
}


def kquant_bytes(rng, rows, cols, qtype):
    """Random K-quant blocks with sane float16 scales (random bytes there could be inf or NaN)."""
    block_bytes, block = gguf.GGML_QUANT_SIZES[qtype][1], gguf.GGML_QUANT_SIZES[qtype][0]
    data = rng.integers(0, 256, size=(rows, cols // block, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        data[..., 0:4] = scales.reshape(rows, cols // block, 4)  # d, dmin
    else:  # Q6_K ends with d
        data[..., 208:210] = scales[..., :2]
    return data.reshape(rows, -1)


def encode(rng, shape, qtype):
    values = rng.standard_normal(shape).astype(np.float32) * 0.05
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q6_K):
        return kquant_bytes(rng, *shape, qtype)
    return gguf.quants.quantize(values, qtype)


def tensor_shapes(layers=2):
    shapes = {"token_embd": (V, D), "output": (V, D), "output_norm": (D,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm": (D,), f"blk.{i}.ffn_norm": (D,), f"blk.{i}.attn_q": (N * 64, D),
                   f"blk.{i}.attn_k": (K * 64, D), f"blk.{i}.attn_v": (K * 64, D), f"blk.{i}.attn_output": (D, N * 64),
                   f"blk.{i}.ffn_gate": (F, D), f"blk.{i}.ffn_up": (F, D), f"blk.{i}.ffn_down": (D, F)}
    return shapes


def write_gguf(path, arch="llama", types=TYPES, odd_tensor=None):
    """A 2-layer llama GGUF with random weights; odd_tensor=(name, array) is appended as-is."""
    rng = np.random.default_rng(0)
    metadata = {f"{arch}.{key}": value for key, value in [
        ("block_count", 2), ("context_length", 128), ("embedding_length", D), ("feed_forward_length", F),
        ("vocab_size", V), ("attention.head_count", N), ("attention.head_count_kv", K), ("rope.dimension_count", 64),
        ("rope.freq_base", 50000.0), ("attention.layer_norm_rms_epsilon", 1e-6)]}
    tensors = {}
    for name, shape in tensor_shapes().items():
        qtype = types.get(name, Q.F32)
        tensors[f"{name}.weight"] = (encode(rng, shape, qtype), qtype if qtype not in (Q.F32, Q.F16) else None)
    if odd_tensor is not None:
        tensors[odd_tensor[0]] = odd_tensor[1]
    return write_gguf_file(path, arch, metadata, tensors)


# --- a random Transformers model, and its tensors as llama.cpp's converter writes them -----------------------------

def random_model(config, **from_config):
    """A seeded random model with random norm weights and biases, not the 1s and 0s they start as. Norm weights are
    multiples of 1/128 below 1/2 in size, so Gemma's stored 1 + w is exact in float32 and w comes back as it was.
    MoE routers (mlp.gate) get a wider spread, so choices are distinct and clear of ties, and DeepSeek-V3's router
    correction bias is drawn too (it changes which experts are chosen). `from_config`: more arguments of
    AutoModelForCausalLM.from_config (experts_implementation="eager")."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, **from_config).float().eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.copy_(torch.randint(-64, 64, tensor.shape) / 128 + (0 if "gemma" in config.model_type else 1))
            elif name.endswith(".bias"):
                tensor.copy_(torch.randn(tensor.shape) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                tensor.mul_(8)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape) * 0.5)
    return model


def llama_cpp_permute(weight, heads):
    """convert_hf_to_gguf's LlamaModel.permute: each head's rows from HF's halves to interleaved RoPE pairs."""
    rows = weight.shape[0]  # [N*H, D]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model, arch, qtype=Q.F32, convert=None):
    """The model's state dict as llama.cpp's converter writes it for GGUF architecture `arch`: gguf-py's names (a
    tied lm_head left out), a llama file's q_proj and k_proj rows permuted, Gemma's norm weights stored as 1 + w
    (its RMSNorm scales by 1 + w), axes of size 1 squeezed out, matrices in `qtype` where their rows are whole
    blocks (vectors and other rows stay as they were, as llama.cpp does). `convert(name, weight)`: a family's own
    tensors for a source tensor, {GGUF name: array}, or None where gguf-py's name map applies."""
    config = model.config
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config.num_hidden_layers)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weight = tensor.numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            weight = llama_cpp_permute(weight, heads)
        if "gemma" in arch and name.endswith("norm.weight"):
            weight = weight + np.float32(1)
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")  # the converter's rename
        parts = convert(name, weight) if convert is not None else None
        if parts is None:
            stem, suffix = name.rsplit(".", 1)
            parts = {f"{names.get_name(stem)}.{suffix}": weight.squeeze()}
        for key, weight in parts.items():
            weight = np.ascontiguousarray(weight)
            blocks = weight.ndim > 1 and qtype != Q.F32 and weight.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0
            tensors[key] = (gguf.quants.quantize(weight, qtype), qtype) if blocks else weight
    return tensors


def written_model(request, tmp_path_factory, families, make_model, write_family):
    """For a fixture parametrized by family name: (the name, a random source model of families[name] (make_model of
    its config()), the GGUF file write_family(path, family, model) wrote of it)."""
    family = families[request.param]
    model = make_model(family.config())
    path = write_family(tmp_path_factory.mktemp(request.param) / f"{request.param}.gguf", family, model)
    return request.param, model, path


def assert_config_agrees(path, ignore=frozenset()):
    """Our config of the GGUF file equals Transformers' GGUF loader's on the keys both have, Transformers' has no other
    key than GGUF's general.name, and, read by the config class, the fields Transformers leaves at their defaults agree
    as well (but those in `ignore`)."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from jaxllm.gguf_reader import read_gguf

    ours, theirs = read_gguf(path).config, load_gguf_checkpoint(str(path))["config"]
    shared = ours.keys() & theirs.keys()
    assert {key: ours[key] for key in shared} == {key: theirs[key] for key in shared}
    assert theirs.keys() - ours.keys() <= {"_model_name_or_path"}  # GGUF's general.name
    ours, theirs = (transformers.AutoConfig.for_model(**config).to_dict() for config in (ours, theirs))
    for key in theirs.keys() - {"architectures", "_model_name_or_path"} - set(ignore):
        assert ours[key] == theirs[key], key


def assert_config_reads_back(path, model, ignore=frozenset()):
    """Our config of the GGUF file written from `model`, read by the config class, is the model's (model type,
    architecture and every field but those in `ignore`)."""
    import transformers

    from jaxllm.gguf_reader import read_gguf

    ours = read_gguf(path).config
    assert ours["model_type"] == model.config.model_type
    assert ours["architectures"] == [type(model).__name__]
    ours, source = transformers.AutoConfig.for_model(**ours).to_dict(), model.config.to_dict()
    for key in source.keys() - {"architectures", "dtype", "transformers_version"} - set(ignore):
        assert ours[key] == source[key], key
