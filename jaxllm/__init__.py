"""jaxllm: a LLaMA-family inference engine as pure JAX functions.

    params = jaxllm.load("smollm2-135m")             # immutable pytree; params.layers[3].qkv_proj is [(N+2K)·H, D]
    logits = jaxllm.forward(params, ids, positions)  # [B, T, V], jitted
    model = jaxllm.load_model("smollm2-135m")        # params + tokenizer
    jaxllm.generate(model, "The capital of France is").text
"""

from jaxllm.config import LLMConfig
from jaxllm.errors import CheckpointError, ConfigError, InputError, JaxLLMError, ModelNotFoundError, TokenizerError
from jaxllm.generate import GenerationResult, Model, Sampling, generate
from jaxllm.loader import load, load_model
from jaxllm.model import KVCache, Params, forward, forward_with_intermediates

__all__ = [
    "LLMConfig", "Params", "KVCache", "Model", "Sampling", "GenerationResult",
    "load", "load_model", "forward", "forward_with_intermediates", "generate",
    "JaxLLMError", "ConfigError", "CheckpointError", "TokenizerError", "InputError", "ModelNotFoundError",
]
