"""A thin layer over `tokenizers`: encode with BOS as the checkpoint says, decode, stream, and chat templates."""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from jaxllm.errors import TokenizerError


# The files of a checkpoint that describe its tokenizer; config.json supplies EOS ids when the others do not.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json")


def read_tokenizer_files(directory: str | os.PathLike) -> dict[str, dict | str]:
    """The tokenizer files present in a checkpoint directory, parsed; tokenizer.json as its text, which the
    tokenizers library parses itself (parsing it here as well doubles the time of loading a tokenizer)."""
    files = {}
    for name in TOKENIZER_FILES:
        path = Path(directory) / name
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
                files[name] = text if name == "tokenizer.json" else json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise TokenizerError(f"{path}: not valid JSON ({error})") from error
    return files


def _token_text(value) -> str | None:
    # tokenizer_config.json writes special tokens either as text or as a serialized AddedToken.
    return value.get("content") if isinstance(value, dict) else value


def _ids(value) -> frozenset[int]:
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else value)


class Tokenizer:
    """Text <-> token ids for one checkpoint directory."""

    def __init__(self, backend: Backend, tokenizer_config: dict, eos_ids: frozenset[int]):
        self.backend = backend
        self.config = tokenizer_config
        self.eos_ids = eos_ids
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            name: _token_text(tokenizer_config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if tokenizer_config.get(name) is not None
        }
        bos = self.special_tokens.get("bos_token")
        self.bos_id = backend.token_to_id(bos) if bos is not None else None
        # Transformers' rule: tokenizer.json's post-processor adds BOS, unless tokenizer_config asks for it
        # and the post-processor does not; then we add it, once.
        post_processor_adds_bos = self.bos_id is not None and backend.encode("").ids[:1] == [self.bos_id]
        self.prepend_bos = bool(tokenizer_config.get("add_bos_token")) and self.bos_id is not None and (
            not post_processor_adds_bos
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json, and the EOS ids from generation_config.json or config.json."""
        return cls.from_files(read_tokenizer_files(path), path)

    @classmethod
    def from_files(cls, files: dict[str, dict | str], source: str | os.PathLike) -> Tokenizer:
        """Build from parsed tokenizer files (names as in TOKENIZER_FILES; tokenizer.json may also be its JSON
        text); `source` names them in errors."""
        if "tokenizer.json" not in files:
            raise TokenizerError(f"{source}: no tokenizer.json (the checkpoint carries no tokenizer)")
        content = files["tokenizer.json"]
        try:
            backend = Backend.from_str(content if isinstance(content, str) else json.dumps(content))
        except Exception as error:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{source}: tokenizer.json cannot be read ({error})") from error
        tokenizer_config = files.get("tokenizer_config.json", {})
        eos_ids = _ids(files.get("generation_config.json", {}).get("eos_token_id"))
        eos_ids = eos_ids or _ids(files.get("config.json", {}).get("eos_token_id"))
        eos = _token_text(tokenizer_config.get("eos_token"))
        if not eos_ids and eos is not None and backend.token_to_id(eos) is not None:
            eos_ids = frozenset([backend.token_to_id(eos)])
        return cls(backend, tokenizer_config, eos_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text, special tokens in the text included, with BOS as the checkpoint adds it.

        `add_special_tokens=False` adds no BOS: for text that already carries it, such as a rendered chat
        template (Transformers' apply_chat_template(tokenize=True) encodes the same way)."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return [self.bos_id, *ids] if add_special_tokens and self.prepend_bos else ids

    def check_ids(self, ids: list[int]):
        """TokenizerError naming the first id outside the vocabulary."""
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        self.check_ids(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the checkpoint's Jinja chat template the way Transformers does."""
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: Transformers uses "default"
            template = {t["name"]: t["template"] for t in template}.get("default")
        if not template:
            raise TokenizerError("this checkpoint's tokenizer_config.json has no chat_template")
        try:
            context = {**self.special_tokens, **kwargs}  # as in Transformers, caller's kwargs win over special tokens
            return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as error:
            raise TokenizerError(f"chat template failed: {error}") from error


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # Templates come from checkpoints, so they run sandboxed; options and helpers as in Transformers.
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class StreamDecoder:
    """Decode tokens one at a time; `push` returns the text each token completes.

    A character may span tokens (an emoji is 4 bytes, often 2+ tokens). Decoding such a prefix yields a trailing
    U+FFFD, so text is held back until the character completes. Decoding a window from `prefix` rather than the
    last token alone keeps decoders that treat the first token specially (leading spaces) consistent.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.tokenizer.check_ids([int(token_id)])
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes as U+FFFD, as in `decode`)."""
        done = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(done) :]
