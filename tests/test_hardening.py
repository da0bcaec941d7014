"""Hostile and broken input: no lost files, no silently wrong numbers, no escapes from the model folder, no pickles,
no hangs, no late failures, and every error named. Each test is built from a real damaged file or a real hostile
template, and each fails on code without the guard it checks."""

import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from gguf_util import TYPES, Q
from safetensors.numpy import load_file, save_file
from test_gguf import write_gguf

import jaxllm
from jaxllm import hub, parity
from jaxllm.cli import main
from jaxllm.config import LLMConfig
from jaxllm.convert import MARKER, convert_gguf, locked
from jaxllm.engine import Engine, Request
from jaxllm.errors import CheckpointError, ConfigError, InputError, TokenizerError
from jaxllm.generation import GenerationSettings, Sampling, generate, prefill
from jaxllm.gguf_reader import read_gguf
from jaxllm.loader import load, load_model, open_checkpoint
from jaxllm.model import Model, forward
from jaxllm.tokenizer import Tokenizer

BASE = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below folder with its bytes: what must survive a refused operation unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return parity.random_checkpoint(BASE, tmp_path_factory.mktemp("ckpt"), scale=0.3)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ---- files lost ----------------------------------------------------------------------------------------------


def test_convert_overwrite_into_the_current_folder_deletes_nothing(tiny_gguf, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    (work / "sub").mkdir()
    (work / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(work)
    monkeypatch.chdir(work)
    assert main(["convert", str(tiny_gguf), ".", "--overwrite"]) == 2
    assert "current folder" in capsys.readouterr().err
    assert snapshot(work) == before
    assert main(["convert", str(tiny_gguf), "..", "--overwrite"]) == 2  # a folder above the current one
    assert snapshot(work) == before


def test_convert_overwrite_into_the_folder_of_the_source_keeps_the_source(tiny_gguf, tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    source = folder / "tiny.gguf"
    shutil.copy(tiny_gguf, source)
    (folder / "other.txt").write_text("keep")
    before = snapshot(tmp_path)
    for target in (folder, tmp_path):  # the folder holding the source, and one above it
        assert main(["convert", str(source), str(target), "--overwrite"]) == 2
        assert "holds its source" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_an_earlier_conversion(tiny_gguf, tmp_path, capsys):
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "keep.txt").write_text("mine")
    assert main(["convert", str(tiny_gguf), str(user_folder)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err  # the command line's flag, not the Python argument
    with pytest.raises(CheckpointError, match="not a folder jaxllm converted"):
        convert_gguf(tiny_gguf, user_folder, overwrite=True, progress=False)
    assert (user_folder / "keep.txt").read_text() == "mine"

    out = convert_gguf(tiny_gguf, tmp_path / "converted", progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", MARKER])
    first = (out / "model.safetensors").stat().st_ino
    convert_gguf(tiny_gguf, out, overwrite=True, progress=False)  # an earlier conversion: replaced atomically
    assert (out / "model.safetensors").stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "mine"]  # no temporaries left beside it
    (out / "added-by-user.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds files jaxllm did not write \(added-by-user.txt\)"):
        convert_gguf(tiny_gguf, out, overwrite=True, progress=False)
    assert (out / "added-by-user.txt").read_text() == "mine"


def test_a_killed_conversion_leaves_nothing_behind_for_long(tiny_gguf, tmp_path):
    """A temporary folder whose owner died (its lock free) is removed by the next run; one whose owner is alive
    (its lock held) is left alone."""
    out = tmp_path / "model"
    dead = tmp_path / ".model.dead0001.partial"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"\x00" * 1024)
    (tmp_path / ".model.dead0001.lock").write_text("")
    orphan = tmp_path / ".model.orphan01.partial"  # killed before its lock file was ever made, or from elsewhere
    orphan.mkdir()
    alive = tmp_path / ".model.alive001.partial"
    alive.mkdir()
    with locked(tmp_path / ".model.alive001.lock"):
        convert_gguf(tiny_gguf, out, progress=False)
        assert alive.exists()
    assert not dead.exists() and not orphan.exists() and not (tmp_path / ".model.dead0001.lock").exists()


@pytest.mark.slow
def test_damaged_default_model_is_converted_again(smollm2_gguf, tmp_path, monkeypatch):
    """The cached default model records each file's size and checksum; a truncated copy is noticed and rebuilt
    from the GGUF beside it, and a killed earlier run's temporary folder is cleaned on the way."""
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    os.symlink(smollm2_gguf, tmp_path / "downloads" / smollm2_gguf.name)
    debris = tmp_path / f".{hub.DEFAULT_MODEL.dirname}.killed01.partial"
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"\x00" * 4096)
    model_dir = hub.default_model_dir()
    assert not debris.exists()
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as file:
        file.truncate(size // 2)
    with pytest.raises(CheckpointError):
        load(model_dir)  # the damage is real
    assert hub.default_model_dir() == model_dir
    assert weights.stat().st_size == size
    with open(weights, "r+b") as file:  # same size, different bytes: found by the checksum
        file.seek(size - 4)
        file.write(b"\xff\xff\xff\xff")
    hub.default_model_dir()
    assert load(model_dir).config.num_hidden_layers == 30


# ---- silently wrong numbers from a config ----------------------------------------------------------------------


@pytest.mark.parametrize("changes, field", [
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(attention_bias="false"), "attention_bias"),
    (dict(mlp_bias=1), "mlp_bias"),
    (dict(rms_norm_eps=True), "rms_norm_eps"),
    (dict(rms_norm_eps=float("inf")), "rms_norm_eps"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(rope_theta=0), "rope_theta"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=0)), "rope_parameters.rope_theta"),
    (dict(rope_parameters=dict(rope_type="linear", factor=float("nan"))), "rope_parameters.factor"),
    (dict(rope_scaling=dict(type="dynamic", factor=-2.0)), "rope_scaling.factor"),
    (dict(rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=0, high_freq_factor=4.0)),
     "rope_parameters.low_freq_factor"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, beta_fast=0)), "rope_parameters.beta_fast"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=0)),
     "rope_parameters.original_max_position_embeddings"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, truncate="yes")), "rope_parameters.truncate"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(max_position_embeddings=1.5), "max_position_embeddings"),
])
def test_invalid_config_values_are_refused_by_file_field_and_value(tmp_path, changes, field):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, **changes}))  # json writes NaN and Infinity as Python reads them back
    with pytest.raises(ConfigError, match=rf"{path}: field '{field}' must be"):
        LLMConfig.from_json(path)


def test_valid_values_of_every_checked_field_still_load(tmp_path):
    config = LLMConfig.from_dict({**BASE, "tie_word_embeddings": True, "attention_bias": False, "rms_norm_eps": 1e-5,
                                  "rope_parameters": dict(rope_type="yarn", factor=4.0, beta_fast=16, beta_slow=2,
                                                          truncate=False, rope_theta=500000)})
    assert config.tie_word_embeddings and config.rope.beta_fast == 16.0 and config.rope.truncate is False
    assert config.rope.theta == 500000.0 and config.rope.original_max_position_embeddings == 32


# ---- silently wrong numbers at run time ------------------------------------------------------------------------


def test_positions_beyond_int32_are_refused_not_wrapped(checkpoint):
    params = load(checkpoint)
    with pytest.raises(InputError, match=r"positions must fit in int32 .* found 2147483648"):
        forward(params, np.array([[1, 2]]), np.array([[0, 2**31]], np.int64))


@pytest.mark.parametrize("prompt, kind", [(b"hello", "bytes"), ({1: 2, 3: 4}, "dict"), (bytearray(b"\x01\x02"), "bytearray"),
                                          ({5, 6}, "set")])
def test_prompts_of_other_types_are_refused(checkpoint, prompt, kind):
    with pytest.raises(InputError, match=rf"(found|must be a string).*{kind}"):
        generate(load(checkpoint), prompt, 2)


@pytest.mark.parametrize("settings", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                      dict(temperature=1.0, top_p=float("nan")), dict(temperature=1.0, top_k=2.5)])
def test_sampling_settings_must_be_finite(settings):
    with pytest.raises(InputError, match="invalid sampling settings"):
        Sampling(**settings)


def test_cli_refuses_nan_temperature_with_one_line(smollm2_dir, capsys):
    assert main(["generate", "Hi", "--model", str(smollm2_dir), "-n", "2", "--temperature", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid sampling settings" in err


# ---- escapes from the model folder ------------------------------------------------------------------------------


def sharded(checkpoint: Path, folder: Path, shard_names: list[str]) -> Path:
    """A copy of checkpoint whose index points at the given shard paths (written where they stay inside)."""
    folder.mkdir()
    (folder / "config.json").write_text((checkpoint / "config.json").read_text())
    tensors = load_file(checkpoint / "model.safetensors")
    names = sorted(tensors)
    weight_map = {name: shard_names[i % len(shard_names)] for i, name in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_shard_paths_outside_the_folder_are_refused(checkpoint, tmp_path, escape):
    save_file(load_file(checkpoint / "model.safetensors"), tmp_path / "outside.safetensors")
    folder = sharded(checkpoint, tmp_path / "model", ["model-1.safetensors", escape])
    with pytest.raises(CheckpointError, match=r"shard path\(s\) outside the model folder: " + escape.replace(".", r"\.")):
        load(folder)


def test_a_fifo_shard_is_refused_without_hanging(checkpoint, tmp_path):
    folder = sharded(checkpoint, tmp_path / "model", ["pipe.safetensors"])
    os.mkfifo(folder / "pipe.safetensors")
    code = f"from jaxllm import load; load({str(folder)!r})"  # a process of its own: a regression would hang
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "CheckpointError" in result.stderr and "not regular files: pipe.safetensors" in result.stderr


def test_tensor_names_repeated_across_shards_are_listed(checkpoint, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoint / "config.json").read_text())
    tensors = load_file(checkpoint / "model.safetensors")
    save_file(tensors, folder / "a.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"] * 2}, folder / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"more than one file: model.norm.weight in a.safetensors, b.safetensors"):
        load(folder)


# ---- damaged files get named errors -----------------------------------------------------------------------------


def damaged_copies(checkpoint: Path, tmp_path: Path) -> dict[str, Path]:
    data = (checkpoint / "model.safetensors").read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4  # runs past the next tensor's start
    bad_offsets = json.dumps(header).encode()
    variants = {
        "truncated": data[: len(data) // 2],
        "garbage header": struct.pack("<Q", 40) + b"{this is not json at all, not a header}",
        "huge header length": struct.pack("<Q", 2**60) + data[8:],
        "overlapping offsets": struct.pack("<Q", len(bad_offsets)) + bad_offsets + data[8 + header_length:],
        "empty": b"",
    }
    folders = {}
    for label, content in variants.items():
        folder = tmp_path / label.replace(" ", "-")
        folder.mkdir()
        (folder / "config.json").write_text((checkpoint / "config.json").read_text())
        (folder / "model.safetensors").write_bytes(content)
        folders[label] = folder
    return folders


def test_damaged_safetensors_name_the_file(checkpoint, tmp_path, capsys):
    for label, folder in damaged_copies(checkpoint, tmp_path).items():
        with pytest.raises(CheckpointError, match=rf"{folder / 'model.safetensors'}: not a readable safetensors file"):
            load(folder)
        assert main(["inspect", "--model", str(folder)]) == 2, label
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "model.safetensors" in err, label


def small_gguf(path: Path, metadata: dict | None = None, layers: int = 1) -> Path:
    """A small float32 llama GGUF (D 16, 2 heads of 8, 1 KV head) with random weights. `metadata` adds or replaces
    keys: key -> (value, GGUFValueType) or (value, ARRAY, item type); None drops the key."""
    import gguf

    T = gguf.GGUFValueType
    D, F, V, N, K, H = 16, 32, 64, 2, 1, 8
    base = {"general.architecture": ("llama", T.STRING), "llama.block_count": (layers, T.UINT32),
            "llama.context_length": (64, T.UINT32), "llama.embedding_length": (D, T.UINT32),
            "llama.feed_forward_length": (F, T.UINT32), "llama.vocab_size": (V, T.UINT32),
            "llama.attention.head_count": (N, T.UINT32), "llama.attention.head_count_kv": (K, T.UINT32),
            "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32), "llama.rope.freq_base": (10000.0, T.FLOAT32)}
    writer = gguf.GGUFWriter(path, "llama")
    writer.kv_data[0].clear()  # general.architecture comes from `base`, so a test can replace it too
    for key, value in {**base, **(metadata or {})}.items():
        if value is not None:
            writer.add_key_value(key, value[0], value[1], sub_type=value[2] if len(value) > 2 else None)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (V, D), "output_norm": (D,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm": (D,), f"blk.{i}.ffn_norm": (D,), f"blk.{i}.attn_q": (N * H, D),
                   f"blk.{i}.attn_k": (K * H, D), f"blk.{i}.attn_v": (K * H, D), f"blk.{i}.attn_output": (D, N * H),
                   f"blk.{i}.ffn_gate": (F, D), f"blk.{i}.ffn_up": (F, D), f"blk.{i}.ffn_down": (D, F)}
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("metadata, error, message", [
    ({"llama.attention.head_count": (0, "UINT32")}, ConfigError,
     r"'llama.attention.head_count' must be a positive integer, found 0"),
    ({"llama.attention.head_count": ("four", "STRING")}, ConfigError,
     r"'llama.attention.head_count' must be int, found str"),
    ({"llama.embedding_length": (1.5, "FLOAT32")}, ConfigError, r"'llama.embedding_length' must be int, found float"),
    ({"llama.attention.layer_norm_rms_epsilon": ("tiny", "STRING")}, ConfigError, r"must be float, found str"),
    ({"general.architecture": (7, "UINT32")}, ConfigError, r"'general.architecture' must be str"),
])
def test_gguf_metadata_of_the_wrong_type_is_named(tmp_path, metadata, error, message):
    import gguf

    kinds = {key: (value, getattr(gguf.GGUFValueType, kind)) for key, (value, kind) in metadata.items()}
    with pytest.raises(error, match=message):
        LLMConfig.from_dict(read_gguf(small_gguf(tmp_path / "odd.gguf", kinds)).config)


def test_gguf_without_tokenizer_names_the_file_not_a_temporary_folder(tiny_gguf):
    with pytest.raises(TokenizerError, match=rf"{tiny_gguf}: no tokenizer.json \(the checkpoint carries no tokenizer\)"):
        load_model(tiny_gguf)
    assert open_checkpoint(tiny_gguf).config.num_hidden_layers == 2  # the weights alone still load


def test_gguf_tokenizer_metadata_of_the_wrong_shape_is_named(tmp_path):
    import gguf

    T = gguf.GGUFValueType
    path = small_gguf(tmp_path / "tok.gguf", {
        "tokenizer.ggml.model": ("gpt2", T.STRING),
        "tokenizer.ggml.tokens": (["a", "b", "ab"], T.ARRAY, T.STRING),
        "tokenizer.ggml.merges": (["a b"], T.ARRAY, T.STRING),
        "tokenizer.ggml.eos_token_id": (7, T.UINT32),  # not one of the 3 tokens
    })
    with pytest.raises(TokenizerError, match=r"tok.gguf: malformed tokenizer metadata .*eos_token_id 7 is not one of"):
        load_model(path)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f["tokenizer_config.json"].update(eos_token=5), "a special token must be text"),
    (lambda f: f["generation_config.json"].update(eos_token_id="</s>"), "eos_token_id must be a token id"),
    (lambda f: f.update({"tokenizer.json": {"model": {"type": "BPE", "vocab": 3}}}), "tokenizer.json cannot be read"),
    (lambda f: f.update({"tokenizer_config.json": ["not", "an", "object"]}), "must be a JSON object"),
])
def test_malformed_tokenizer_files_are_named(smollm2_dir, edit, message):
    from jaxllm.tokenizer import read_tokenizer_files

    files = read_tokenizer_files(smollm2_dir)
    files["tokenizer.json"] = json.loads(files["tokenizer.json"])
    files.setdefault("generation_config.json", {})
    edit(files)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_files(files, "the-source")


def test_a_catastrophic_pre_tokenizer_regex_is_a_tokenizer_error(smollm2_dir):
    """A Rust panic (pyo3's PanicException is a BaseException) from the tokenizers library becomes a TokenizerError."""
    from jaxllm.tokenizer import read_tokenizer_files

    files = read_tokenizer_files(smollm2_dir)
    tokenizer = json.loads(files["tokenizer.json"])
    tokenizer["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a|aa)*(b|bb)*(c|cc)*\\1\\2\\3" * 30},
                                  "behavior": "Isolated", "invert": False}
    files["tokenizer.json"] = json.dumps(tokenizer)
    with pytest.raises(TokenizerError):
        Tokenizer.from_files(files, "the-source").encode("a" * 40 + "b" * 40 + "c" * 40 + "d" * 5000)


# ---- the parity harness never hands a pickle to torch ----------------------------------------------------------


class Payload:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, proof: Path):
        self.proof = proof

    def __reduce__(self):
        return (Path.write_text, (self.proof, "unpickled"))


def test_parity_harness_loads_safetensors_only(checkpoint, tmp_path):
    import pickle

    beside = tmp_path / "beside"
    shutil.copytree(checkpoint, beside)
    proof = tmp_path / "proof.txt"
    (beside / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(proof)))
    model = parity.reference_model(beside)  # safetensors are there: the pickle beside them is never opened
    assert model is not None and not proof.exists()

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "config.json").write_text((checkpoint / "config.json").read_text())
    (alone / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(proof)))
    with pytest.raises(CheckpointError, match="refusing to load a pickle checkpoint"):
        parity.reference_model(alone)
    assert not proof.exists()


# ---- untrusted chat templates run within limits ----------------------------------------------------------------


HOSTILE_TEMPLATES = {
    "nested loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "huge power": "{{ 3 ** 300000000 }}",
    "huge repeat": "{{ 'x' * 10 ** 10 }}",
    "huge width": "{{ 'x' | center(10 ** 10) }}",
    "huge method width": "{{ 'x'.ljust(10 ** 10) }}",
    "huge output": "{% for i in range(99999) %}{{ 'all work and no play ' * 40 }}{% endfor %}",
    "doubling": "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_hostile_chat_template_is_stopped(smollm2_dir, tmp_path, name):
    folder = tmp_path / "tok"
    shutil.copytree(smollm2_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = HOSTILE_TEMPLATES[name]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_dir(folder)
    start = time.monotonic()
    with pytest.raises(TokenizerError, match="chat template exceeded its limits"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 10


def test_real_chat_template_still_renders_within_the_limits(smollm2_dir):
    text = Tokenizer.from_dir(smollm2_dir).apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "hi" in text


# ---- late failures ----------------------------------------------------------------------------------------------


def test_tokens_the_tokenizer_lacks_are_shown_not_fatal(smollm2, tmp_path):
    """A model whose vocabulary is larger than its tokenizer's: generation returns its tokens, with U+FFFD where
    the tokenizer has no entry, instead of failing after all the work."""
    V = smollm2.tokenizer.vocab_size + 8
    path = parity.random_checkpoint(dict(BASE, vocab_size=V, hidden_size=16, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32), tmp_path / "big", scale=0.3)
    params = load(path)
    # Only hidden dimension 0 reaches the LM head, and only the last two tokens read it, with opposite signs:
    # whatever the input, one of the two ids past the tokenizer's end wins.
    norm = np.zeros(params.norm.shape, np.float32)
    norm[0] = 1.0
    head = np.zeros(params.lm_head.shape, np.float32)
    head[V - 1, 0], head[V - 2, 0] = 100.0, -100.0
    params = params.replace(norm=jax.numpy.asarray(norm), lm_head=jax.numpy.asarray(head))
    result = generate(Model(params, smollm2.tokenizer), "Hello", 3, eos_ids=[])
    assert all(t >= smollm2.tokenizer.vocab_size for t in result.tokens)
    assert result.text == "\ufffd" * 3


def test_an_empty_rope_type_is_refused_not_read_as_default():
    with pytest.raises(ConfigError, match="rope type '' is not supported"):
        LLMConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "", "factor": 2.0}})


# ---- the last hostile inputs: non-finite weights, deep JSON, zero heads, empty or ragged ids, odd arguments --------


@pytest.mark.parametrize("stored, weights, value", [("float32", "fp32", np.nan), ("float32", "bf16", np.inf),
                                                    ("float32", "int8", np.nan), ("float16", "fp32", -np.inf)])
def test_non_finite_weights_are_named_at_load(checkpoint, tmp_path, stored, weights, value):
    """A NaN or infinity in one weight would make every logit NaN, and greedy decoding emit token 0 forever."""
    tensors = {name: t.astype(stored) for name, t in load_file(checkpoint / "model.safetensors").items()}
    tensors["model.layers.1.mlp.down_proj.weight"][5, 7] = value
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(checkpoint / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: tensor model.layers.1.mlp.down_proj.weight holds 1 "
                                              rf"non-finite value\(s\): -?(nan|inf) at \[5, 7\]"):
        load(tmp_path, weights)


def damaged_gguf(source: Path, tmp_path: Path, tensor: str, data: bytes) -> Path:
    """A copy of a GGUF file whose tensor `tensor` starts with the bytes `data` instead."""
    import gguf

    offset = next(t.data_offset for t in gguf.GGUFReader(source).tensors if t.name == tensor)
    damaged = bytearray(source.read_bytes())
    damaged[offset:offset + len(data)] = data
    path = tmp_path / "damaged.gguf"
    path.write_bytes(damaged)
    return path


F16_INF, F16_NAN = np.float16(np.inf).tobytes(), np.float16(np.nan).tobytes()


@pytest.fixture(scope="module")
def q4_1_gguf(tmp_path_factory):
    """The tiny GGUF with layer 0's q, k and v all in Q4_1 (the default model's format), so that weights="gguf" keeps
    them as blocks (a stacked field of mixed formats is dequantized)."""
    formats = TYPES | {"blk.0.attn_q": Q.Q4_1, "blk.0.attn_k": Q.Q4_1, "blk.0.attn_v": Q.Q4_1}
    return write_gguf(tmp_path_factory.mktemp("gguf") / "q4_1.gguf", types=formats)


@pytest.mark.parametrize("tensor, data, weights, hf_name, where", [
    ("blk.0.attn_norm.weight", np.float32(np.inf).tobytes(), "fp32", "model.layers.0.input_layernorm.weight", "[0]"),
    ("blk.0.attn_norm.weight", np.float32(np.nan).tobytes(), "gguf", "model.layers.0.input_layernorm.weight", "[0]"),
    ("blk.0.attn_v.weight", F16_INF, "gguf", "model.layers.0.self_attn.v_proj.weight", ".scale[0, 0]"),  # Q4_1 d
    ("blk.0.attn_v.weight", b"\0\0" + F16_NAN, "gguf", "model.layers.0.self_attn.v_proj.weight", ".offset[0, 0]"),
    ("blk.0.attn_v.weight", F16_INF, "fp32", "model.layers.0.self_attn.v_proj.weight", "[0, "),  # dequantized
    ("token_embd.weight", F16_NAN, "gguf", "model.embed_tokens.weight", ".scale[0, 0]"),  # Q8_0
    ("token_embd.weight", F16_NAN, "int8", "model.embed_tokens.weight", "[0, "),
], ids=["F32 inf, fp32", "F32 nan, gguf", "Q4_1 scale inf, gguf", "Q4_1 offset nan, gguf", "Q4_1 scale inf, fp32",
        "Q8_0 scale nan, gguf", "Q8_0 scale nan, int8"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # gguf's dequantize of inf · 0
def test_non_finite_gguf_tensors_are_named_at_load(q4_1_gguf, tmp_path, tensor, data, weights, hf_name, where):
    """An infinity or NaN in a float tensor, or in the f16 scale or offset of a quantized block, whether the blocks
    are kept (weights="gguf": their scales are checked) or dequantized."""
    path = damaged_gguf(q4_1_gguf, tmp_path, tensor, data)
    with pytest.raises(CheckpointError, match=rf"{path}: tensor {hf_name} holds \d+ non-finite value") as error:
        load(path, weights)
    assert where in str(error.value)


@pytest.mark.parametrize("name, error", [("config.json", ConfigError), ("tokenizer_config.json", TokenizerError)])
def test_json_nested_too_deeply_is_named(checkpoint, tmp_path, name, error):
    """json.loads recurses once per level: 100,000 levels raised a bare RecursionError."""
    for file in checkpoint.iterdir():
        shutil.copy(file, tmp_path)
    (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(error, match=rf"{tmp_path / name}: .*(nested too deeply|recursion)"):
        load_model(tmp_path)


def test_gguf_with_zero_key_value_heads_is_named(tmp_path):
    """head_count_kv 0 divided by zero where the K rows are un-permuted (convert) instead of naming the key."""
    import gguf

    path = small_gguf(tmp_path / "kv0.gguf", {"llama.attention.head_count_kv": (0, gguf.GGUFValueType.UINT32)})
    message = rf"{path}: GGUF metadata 'llama.attention.head_count_kv' must be a positive integer, found 0"
    with pytest.raises(ConfigError, match=message):
        load(path)
    with pytest.raises(ConfigError, match=message):
        convert_gguf(path, tmp_path / "converted", progress=False)
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize("shape", [(1, 0), (0, 4)])
def test_empty_ids_are_refused_by_shape(checkpoint, shape):
    params = load(checkpoint)
    with pytest.raises(InputError, match=rf"ids of shape \({shape[0]}, {shape[1]}\) are empty"):
        forward(params, np.zeros(shape, np.int32), np.zeros(shape, np.int32))
    settings = GenerationSettings(max_new_tokens=2, length=32)
    with pytest.raises(InputError, match=rf"ids of shape \({shape[0]}, {shape[1]}\) are empty"):
        prefill(params, np.zeros(shape, np.int32), np.ones(shape, np.int32), jax.random.key(0), settings)


def test_ragged_ids_are_refused_by_name(checkpoint):
    """Rows of different lengths are a batch of prompts to generate (left-padded), but not ids for the forward."""
    params = load(checkpoint)
    with pytest.raises(InputError, match=r"ids must be a rectangular array, found rows of different lengths: "
                                         r"\[\[1, 2\], \[3\]\]"):
        forward(params, [[1, 2], [3]], [[0, 1], [0]])
    settings = GenerationSettings(max_new_tokens=2, length=32)
    with pytest.raises(InputError, match=r"ids must be a rectangular array"):
        prefill(params, [[1, 2], [3]], [[1, 1], [1]], jax.random.key(0), settings)
    with pytest.raises(InputError, match=r"positions must be a rectangular array"):
        forward(params, [[1, 2], [3, 4]], [[0, 1], [0]])
    assert len(generate(params, [[1, 2], [3]], 2)) == 2


def dynamic_rope(params):
    """The same weights under dynamic-NTK RoPE, which lets a generation run past max_position_embeddings."""
    config = LLMConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    assert config.rope.rope_type == "dynamic"
    return params.replace(config=config)


@pytest.mark.parametrize("arguments, message", [
    (dict(eos_ids="abc"), r"eos_ids must be a sequence of integer token ids, found 'abc'"),
    (dict(eos_ids=5), r"eos_ids must be a sequence of integer token ids, found 5"),
    (dict(key=42), r"key must be a JAX PRNG key, found 42; pass jax.random.key\(42\)"),
    (dict(key=np.uint32([0, 42])), r"key must be a JAX PRNG key, found array\(\[ 0, 42\]"),
    (dict(max_new_tokens=2**31), r"max_new_tokens \(2147483648\) needs 4294967296 cache slots"),
])
def test_generate_arguments_are_refused_by_name(checkpoint, arguments, message):
    params = dynamic_rope(load(checkpoint))
    arguments = {"max_new_tokens": 2} | arguments
    with pytest.raises(InputError, match=message):
        generate(params, [1, 2, 3], **arguments)


def test_engine_request_arguments_are_refused_by_name(checkpoint):
    params = load(checkpoint)
    with pytest.raises(InputError, match=r"eos_ids must be a sequence of integer token ids, found 'abc'"):
        Engine(params, slots=1, max_context=32, prefill_chunk=16, eos_ids="abc")
    engine = Engine(params, slots=1, max_context=32, prefill_chunk=16)  # refused before it needs to run
    for request, message in [
        (Request(prompt=[1, 2], max_tokens=2, stop_ids="abc"), r"stop_ids .* found 'abc'"),
        (Request(prompt=[[1, 2], [3]], max_tokens=2), r"prompt must be .* found \[\[1, 2\], \[3\]\]"),
        (Request(prompt=[1, 2], max_tokens=2**31), r"max_tokens \(2147483648\)"),
        (Request(prompt=[1, 2], max_tokens=2, seed="42"), r"seed must be an integer, found '42'"),
    ]:
        with pytest.raises(InputError, match=message):
            engine.submit(request)


def test_cli_refuses_a_seed_beyond_int64_with_one_line(smollm2_dir, capsys):
    """The command line's --seed becomes the PRNG key: jax.random.key raised a bare OverflowError past int64."""
    assert main(["generate", "Hi", "--model", str(smollm2_dir), "-n", "2", "--seed", str(2**64)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"seed must be between -2**63 and 2**63 - 1, found {2**64}" in err


def test_the_generation_module_is_importable_beside_the_function():
    """jaxllm/generate.py became jaxllm/generation.py: the module by its name, the function as before."""
    module = importlib.import_module("jaxllm.generation")
    assert isinstance(module, types.ModuleType) and module.__name__ == "jaxllm.generation"
    assert callable(jaxllm.generate) and not isinstance(jaxllm.generate, types.ModuleType)
    assert jaxllm.generate is module.generate
