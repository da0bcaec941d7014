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
