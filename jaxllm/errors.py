"""The exceptions jaxllm raises on bad input. Messages name the file, field or tensor, what was expected and what was found."""


class JaxLLMError(Exception):
    """Base class: every error jaxllm raises on purpose."""


class ConfigError(JaxLLMError, ValueError):
    """A config.json (or GGUF metadata) that is missing a field, has a bad value, or describes an unsupported model."""


class CheckpointError(JaxLLMError, ValueError):
    """Weights that are missing, unexpected, mis-shaped, or in a format we refuse to read (pickles)."""


class TokenizerError(JaxLLMError, ValueError):
    """A tokenizer file that is missing or malformed, or a token id outside the vocabulary."""


class ModelNotFoundError(JaxLLMError, FileNotFoundError):
    """A model name or path that cannot be resolved to files on disk (and could not be downloaded)."""


class InputError(JaxLLMError, ValueError):
    """Inputs to the forward or to generation with a wrong shape, dtype or value (a token id outside the vocabulary)."""
