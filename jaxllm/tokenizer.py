"""A thin layer over `tokenizers`: encode with BOS as the checkpoint says, decode, stream, and chat templates."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
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
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
                raise TokenizerError(f"{path}: not valid JSON ({error})") from error
    return files


def _token_text(value) -> str | None:
    # tokenizer_config.json writes special tokens either as text or as a serialized AddedToken.
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise TypeError(f"a special token must be text or an AddedToken object, found {value!r}")
    return text


def _ids(value, file: str) -> frozenset[int]:
    values = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise TypeError(f"{file}: eos_token_id must be a token id or a list of them, found {value!r}")
    return frozenset(values)


@contextlib.contextmanager
def named_errors(what: str):
    """Any error from the tokenizers library (a bare Exception, KeyError, TypeError, or a Rust panic, which is a
    BaseException) as a TokenizerError that says `what` failed."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit, TokenizerError):
        raise
    except BaseException as error:
        raise TokenizerError(f"{what} ({type(error).__name__}: {error})") from error


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
        for name, content in files.items():
            if not isinstance(content, dict) and not (name == "tokenizer.json" and isinstance(content, str)):
                raise TokenizerError(f"{source}: {name} must be a JSON object, found {type(content).__name__}")
        content = files["tokenizer.json"]
        with named_errors(f"{source}: tokenizer.json cannot be read"):
            backend = Backend.from_str(content if isinstance(content, str) else json.dumps(content))
        with named_errors(f"{source}: malformed tokenizer files"):
            tokenizer_config = files.get("tokenizer_config.json", {})
            eos_ids = _ids(files.get("generation_config.json", {}).get("eos_token_id"), "generation_config.json")
            eos_ids = eos_ids or _ids(files.get("config.json", {}).get("eos_token_id"), "config.json")
            eos = _token_text(tokenizer_config.get("eos_token"))
            if not eos_ids and eos is not None and backend.token_to_id(eos) is not None:
                eos_ids = frozenset([backend.token_to_id(eos)])
            return cls(backend, tokenizer_config, eos_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text, special tokens in the text included, with BOS as the checkpoint adds it.

        `add_special_tokens=False` adds no BOS: for text that already carries it, such as a rendered chat
        template (Transformers' apply_chat_template(tokenize=True) encodes the same way)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes text, found {type(text).__name__}")
        with named_errors("the tokenizer failed on this text"):
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return [self.bos_id, *ids] if add_special_tokens and self.prepend_bos else ids

    def check_ids(self, ids: list[int]):
        """TokenizerError naming the first id outside the vocabulary."""
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")

    def decode(self, ids: list[int], skip_special_tokens: bool = False, unknown: str | None = None) -> str:
        """Text of ids. An id outside the vocabulary is a TokenizerError, or, with `unknown`, rendered as that text
        (a model's vocabulary can be larger than its tokenizer's, and generation should not fail on such a token)."""
        ids = [int(i) for i in ids]
        if unknown is None:
            self.check_ids(ids)
        runs = itertools.groupby(ids, key=lambda i: 0 <= i < self.vocab_size)
        return "".join(self.backend.decode(list(run), skip_special_tokens=skip_special_tokens) if known
                       else unknown * len(list(run)) for known, run in runs)

    def stream(self, skip_special_tokens: bool = False, unknown: str | None = None) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens, unknown)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the checkpoint's Jinja chat template the way Transformers does, sandboxed and within
        TEMPLATE_LIMITS (a template comes with the checkpoint, so it is untrusted)."""
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: Transformers uses "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not template:
            raise TokenizerError("this checkpoint's tokenizer_config.json has no chat_template")
        if not isinstance(template, str):
            raise TokenizerError(f"chat_template must be text, found {type(template).__name__}")
        context = {**self.special_tokens, **kwargs}  # as in Transformers, caller's kwargs win over special tokens
        try:
            return _render(_compile(template), messages=messages, add_generation_prompt=add_generation_prompt,
                           **context)
        except jinja2.TemplateError as error:
            raise TokenizerError(f"chat template failed: {error}") from error


@dataclasses.dataclass(frozen=True)
class TemplateLimits:
    """What one chat template rendering may use. Real templates render in milliseconds to a few kB."""

    chars: int = 1 << 20  # of the rendered text, of any string or list one operation builds, of a width or count
    seconds: float = 1.0  # wall time
    digits: int = 4000  # of a number computed with **


TEMPLATE_LIMITS = TemplateLimits()


def _exceeded(what: str) -> TokenizerError:
    return TokenizerError(f"chat template exceeded its limits: {what}")


def _check_size(size: int) -> None:
    if size > TEMPLATE_LIMITS.chars:
        raise _exceeded(f"a value of {size} characters or items (at most {TEMPLATE_LIMITS.chars})")


def _check_arguments(args, kwargs) -> None:
    """Widths and counts (center, indent, ljust, zfill, ...) are bounded like sizes."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool):
            _check_size(abs(value))


class _Limited(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus checks on the operations that make a huge value in one step."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int | float) and isinstance(right, int) and abs(left) > 1:
            if right * math.log10(abs(left)) > TEMPLATE_LIMITS.digits:
                raise _exceeded(f"{left} ** {right} has more than {TEMPLATE_LIMITS.digits} digits")
        sequences = str | list | tuple
        if operator == "*" and isinstance(left, int) != isinstance(right, int):
            times, value = (left, right) if isinstance(left, int) else (right, left)
            _check_size(len(value) * times if isinstance(value, sequences) else 0)
        if operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
            _check_size(len(left) + len(right))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        _check_arguments(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def _bounded(fn):
    @functools.wraps(fn)  # keeps Jinja's pass_context / pass_environment marks
    def call(*args, **kwargs):
        _check_arguments(args, kwargs)
        return fn(*args, **kwargs)
    return call


def _render(template: jinja2.Template, **context) -> str:
    """template.render within TEMPLATE_LIMITS: the output counted as it streams, and a deadline checked on every
    line the template's own code runs (a trace function on the template's frames alone)."""
    deadline = time.monotonic() + TEMPLATE_LIMITS.seconds

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise _exceeded(f"still rendering after {TEMPLATE_LIMITS.seconds} s")
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        parts, size = [], 0
        for part in template.generate(**context):
            size += len(part)
            _check_size(size)
            parts.append(part)
        return "".join(parts)
    finally:
        sys.settrace(previous)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # Options and helpers as in Transformers.
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _Limited(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded(fn) for name, fn in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as error:
        raise TokenizerError(f"chat template cannot be compiled: {error}") from error


class StreamDecoder:
    """Decode tokens one at a time; `push` returns the text each token completes.

    A character may span tokens (an emoji is 4 bytes, often 2+ tokens). Decoding such a prefix yields a trailing
    U+FFFD, so text is held back until the character completes. Decoding a window from `prefix` rather than the
    last token alone keeps decoders that treat the first token specially (leading spaces) consistent.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, unknown: str | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.unknown = unknown  # rendering of ids outside the vocabulary (None: they are an error)
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, unknown=self.unknown)

    def push(self, token_id: int) -> str:
        if self.unknown is None:
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
