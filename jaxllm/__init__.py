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

import importlib

# Each public name and the module it lives in, imported on first use (PEP 562): `import jaxllm` costs nothing until a
# name is used, and the command line imports only what its command needs (never the serving engine for generate).
_NAMES = {
    "jaxllm.config": ["LLMConfig"],
    "jaxllm.engine": ["ContextLengthError", "Engine", "QueueFull", "Request"],
    "jaxllm.errors": ["CheckpointError", "ConfigError", "InputError", "JaxLLMError", "ModelNotFoundError",
                      "TokenizerError"],
    "jaxllm.generation": ["DecodeState", "GenerationResult", "GenerationSettings", "Sampling", "Speculation", "decode",
                          "decode_step", "generate", "left_pad", "prefill", "self_draft", "speculative_decode"],
    "jaxllm.loader": ["Checkpoint", "distributed", "load", "load_model", "make_mesh", "open_checkpoint"],
    "jaxllm.model": ["KVCache", "Model", "Params", "compile_counts", "forward", "forward_with_intermediates"],
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__():
    return sorted([*globals(), *_MODULE_OF])


__all__ = [
    "LLMConfig", "Params", "KVCache", "Model", "Sampling", "GenerationSettings", "DecodeState", "GenerationResult",
    "Checkpoint", "open_checkpoint", "load", "load_model", "make_mesh", "distributed", "forward", "forward_with_intermediates",
    "prefill", "decode_step", "decode", "generate", "left_pad", "compile_counts", "Speculation", "speculative_decode",
    "self_draft",
    "Engine", "Request", "QueueFull",
    "ContextLengthError",
    "JaxLLMError", "ConfigError", "CheckpointError", "TokenizerError", "InputError", "ModelNotFoundError",
]
