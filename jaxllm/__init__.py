"""jaxllm: a LLaMA-family inference engine as pure JAX functions."""
