"""jaxllm: a LLaMA-family inference engine as pure JAX functions.

    params = jaxllm.load("smollm2-135m")             # immutable pytree; params.layers[3].qkv_proj is [K, G+2, H, D]
    logits = jaxllm.forward(params, ids, positions)  # [B, T, V], jitted
    model = jaxllm.load_model("smollm2-135m")        # params + tokenizer
    jaxllm.generate(model, "The capital of France is").text

    settings = jaxllm.GenerationSettings(max_new_tokens=8, length=32)
    state = jaxllm.prefill(params, ids, mask, jax.random.key(0), settings)   # ids, mask [B, P] left-padded
    state = jaxllm.decode_step(params, state, settings)                      # one token more per row
    state = jaxllm.decode(params, state, settings)                           # the rest, in one compiled loop

    mesh = jaxllm.make_mesh(dp=2, tp=4)              # 8 devices; load(..., mesh=mesh) shards as it reads
    params = jaxllm.load("smollm2-135m", weights="int8")   # or "bf16", or "gguf": a GGUF's blocks kept as stored

    engine = jaxllm.Engine(model, slots=8, max_context=2048).start()       # continuous batching (`jaxllm serve`)
    engine.generate([ids_a, ids_b], max_tokens=32)                          # or submit(Request(...)) from any thread
"""

from jaxllm.config import LLMConfig
from jaxllm.engine import ContextLengthError, Engine, QueueFull, Request
from jaxllm.errors import CheckpointError, ConfigError, InputError, JaxLLMError, ModelNotFoundError, TokenizerError
from jaxllm.generation import (DecodeState, GenerationResult, GenerationSettings, Sampling, decode, decode_step,
                               generate, left_pad, prefill)
from jaxllm.loader import Checkpoint, distributed, load, load_model, make_mesh, open_checkpoint
from jaxllm.model import KVCache, Model, Params, compile_counts, forward, forward_with_intermediates

__all__ = [
    "LLMConfig", "Params", "KVCache", "Model", "Sampling", "GenerationSettings", "DecodeState", "GenerationResult",
    "Checkpoint", "open_checkpoint", "load", "load_model", "make_mesh", "distributed", "forward", "forward_with_intermediates",
    "prefill", "decode_step", "decode", "generate", "left_pad", "compile_counts", "Engine", "Request", "QueueFull",
    "ContextLengthError",
    "JaxLLMError", "ConfigError", "CheckpointError", "TokenizerError", "InputError", "ModelNotFoundError",
]
