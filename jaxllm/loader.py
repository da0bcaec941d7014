"""Checkpoint → immutable parameter pytree. Safetensors (single or sharded) and GGUF; pickles are refused.

    checkpoint = open_checkpoint(path)      # config, tensor names/shapes/dtypes, a reader, tokenizer files
    params = build_params(checkpoint)       # every name and shape checked against the config, then read
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxllm.config import LLMConfig
from jaxllm.errors import CheckpointError
from jaxllm.model import Layer, Model, Params
from jaxllm.tokenizer import Tokenizer, read_tokenizer_files

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtype codes we load; bf16 -> fp32 is exact
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older HF checkpoints saved; recomputed from the config
MAX_LISTED = 50  # tensors named per kind of problem in one error


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the HF-name → pytree table: where a tensor goes and the shape HF stores. Tensors that share a
    field (q/k/v, gate/up) are stacked along `out` in table order; `rows` says which rows of the field are theirs."""

    hf_name: str
    field: str  # Params field, or Layer field for per-layer entries
    hf_shape: tuple[int, ...]
    letters: str  # hf_shape in shape letters, e.g. "N·H, D"
    rows: tuple[int, int] | None = None  # [start, stop) within a stacked field; None: the whole field

    @property
    def target(self) -> str:
        """Where it lands, for people: 'qkv_proj[576:768]'."""
        return self.field if self.rows is None else f"{self.field}[{self.rows[0]}:{self.rows[1]}]"


def _stacked(field: str, parts: list[tuple[str, int, str]], suffix: str, cols: tuple[int, ...] = (),
             col_letters: str = "") -> list[Entry]:
    """Entries for HF tensors stacked into one field; parts are (HF name without suffix, rows, row letters)."""
    entries, start = [], 0
    for name, rows, letters in parts:
        entries.append(Entry(name + suffix, field, (rows, *cols), letters + col_letters, (start, start + rows)))
        start += rows
    return entries


def layer_table(c: LLMConfig, i: int) -> list[Entry]:
    """HF names of layer i and where they go. Matrices stay [out, in] as nn.Linear stores them."""
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    p = f"model.layers.{i}."
    if c.model_type == "phi3":  # Phi-3 stores q/k/v and gate/up already stacked, in our row order
        qkv, gate_up = [(p + "self_attn.qkv_proj", (N + 2 * K) * H, "(N + 2K)·H")], [(p + "mlp.gate_up_proj", 2 * F, "2F")]
    else:
        qkv = [(p + "self_attn.q_proj", N * H, "N·H"), (p + "self_attn.k_proj", K * H, "K·H"),
               (p + "self_attn.v_proj", K * H, "K·H")]
        gate_up = [(p + "mlp.gate_proj", F, "F"), (p + "mlp.up_proj", F, "F")]
    rows = [
        Entry(p + "input_layernorm.weight", "input_layernorm", (D,), "D"),
        *_stacked("qkv_proj", qkv, ".weight", (D,), ", D"),
        Entry(p + "self_attn.o_proj.weight", "o_proj", (D, N * H), "D, N·H"),
        Entry(p + "post_attention_layernorm.weight", "post_attention_layernorm", (D,), "D"),
        *_stacked("gate_up_proj", gate_up, ".weight", (D,), ", D"),
        Entry(p + "mlp.down_proj.weight", "down_proj", (D, F), "D, F"),
    ]
    if c.qk_norm:
        rows += [Entry(p + "self_attn.q_norm.weight", "q_norm", (H,), "H"),
                 Entry(p + "self_attn.k_norm.weight", "k_norm", (H,), "H")]
    if c.gemma_norms:
        rows += [Entry(p + "pre_feedforward_layernorm.weight", "pre_feedforward_layernorm", (D,), "D"),
                 Entry(p + "post_feedforward_layernorm.weight", "post_feedforward_layernorm", (D,), "D")]
    if c.attention_bias or c.qkv_bias:
        rows += _stacked("qkv_bias", qkv, ".bias")
    if c.attention_bias:
        rows.append(Entry(p + "self_attn.o_proj.bias", "o_bias", (D,), "D"))
    if c.mlp_bias:
        rows += [*_stacked("gate_up_bias", gate_up, ".bias"), Entry(p + "mlp.down_proj.bias", "down_bias", (D,), "D")]
    return rows


def model_table(c: LLMConfig) -> list[Entry]:
    """HF names outside the layers. A tied model has no lm_head: logits use embed_tokens transposed."""
    rows = [
        Entry("model.embed_tokens.weight", "embed_tokens", (c.vocab_size, c.hidden_size), "V, D"),
        Entry("model.norm.weight", "norm", (c.hidden_size,), "D"),
    ]
    if not c.tie_word_embeddings:
        rows.append(Entry("lm_head.weight", "lm_head", (c.vocab_size, c.hidden_size), "V, D"))
    return rows


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint, either format: what loading, `jaxllm inspect` and the bench read. Nothing is read
    beyond headers and metadata until `read` or `tokenizer_files` is called."""

    path: Path  # the directory or the .gguf file
    config: LLMConfig
    tensors: dict[str, tuple[tuple[int, ...], str]]  # HF name -> (HF shape, stored dtype), in file order
    read: Callable[[str], Any] = dataclasses.field(repr=False)  # HF name -> array in HF orientation
    tokenizer_files: Callable[[], dict[str, dict]] = dataclasses.field(repr=False)  # parsed, as tokenizer.py names them

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, (shape, _) in self.tensors.items()}


def build_params(checkpoint: Checkpoint, dtype=jnp.float32) -> Params:
    """Check every tensor's name and shape against the config (all problems in one error), then read them one by one."""
    config, shapes = checkpoint.config, checkpoint.shapes
    stored_layers = {int(parts[2]) for parts in (n.split(".") for n in shapes)
                     if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit()}
    if sum(i < config.num_hidden_layers for i in stored_layers) < config.num_hidden_layers:  # whole layers absent
        raise CheckpointError(f"{checkpoint.path}: the config has {config.num_hidden_layers} layers, the checkpoint "
                              f"holds tensors of {len(stored_layers)} (numbered {_ranges(stored_layers)})")
    tables = [layer_table(config, i) for i in range(config.num_hidden_layers)]
    expected = {e.hf_name: e for e in model_table(config)} | {e.hf_name: e for t in tables for e in t}
    missing = [f"{n} (expected {list(e.hf_shape)})" for n, e in expected.items() if n not in shapes]
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()  # tied: a stored copy is ignored, as in HF
    unexpected = [f"{n} {list(s)}" for n, s in shapes.items()
                  if n not in expected and n not in tolerated and not n.endswith(IGNORED_SUFFIXES)]
    misshaped = [f"{n}: expected {list(e.hf_shape)}, found {list(shapes[n])}"
                 for n, e in expected.items() if n in shapes and tuple(shapes[n]) != e.hf_shape]
    if missing or unexpected or misshaped:
        parts = [f"{label}:\n  " + "\n  ".join(items[:MAX_LISTED] + [f"... and {len(items) - MAX_LISTED} more"] * (len(items) > MAX_LISTED))
                 for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                      ("mis-shaped tensors", misshaped)) if items]
        raise CheckpointError(f"{checkpoint.path}: checkpoint does not match its config\n" + "\n".join(parts))

    def fields(table: list[Entry]) -> dict[str, Any]:
        parts: dict[str, list] = {}
        for e in table:  # stacked tensors arrive in table order, i.e. in the order of their rows
            parts.setdefault(e.field, []).append(np.asarray(checkpoint.read(e.hf_name)))
        # Stacked and converted on the host: no XLA program to compile (or look up) per tensor shape.
        return {f: jnp.asarray(p[0] if len(p) == 1 else np.concatenate(p, axis=0), dtype=dtype)
                for f, p in parts.items()}

    top = fields(model_table(config))
    layers = tuple(Layer(**fields(table)) for table in tables)
    return Params(layers=layers, lm_head=top.pop("lm_head", None), config=config, **top)


def _ranges(numbers: set[int]) -> str:
    """{0, 1, 2, 5} -> '0-2, 5'."""
    runs, out = sorted(numbers), []
    for n in runs:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in out) or "none"


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those its sharded index names (each a regular file inside
    the directory), or every *.safetensors file. A directory whose weights are only pickles is refused."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = set(weight_map.values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        outside = sorted(str(n) for n in names if not isinstance(n, str) or not _inside(n))
        if outside:
            raise CheckpointError(f"{index}: shard path(s) outside the model folder: {', '.join(outside)}")
        files = sorted(directory / n for n in names)
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index}: shard file(s) listed but not found: {', '.join(absent)}")
    else:
        files = sorted(directory.glob("*.safetensors"))
    irregular = [f.name for f in files if not f.is_file()]  # a FIFO or a device would hang or never end
    if irregular:
        raise CheckpointError(f"{directory}: not regular files: {', '.join(irregular)}")
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_refusal(directory / pickles[0])
    raise CheckpointError(f"{directory}: no model.safetensors, sharded index or .gguf file found")


def _inside(relative: str) -> bool:
    """A path written in an index stays inside its folder: relative, and no '..' that climbs out."""
    path = os.path.normpath(relative)
    return not os.path.isabs(relative) and path != ".." and not path.startswith(".." + os.sep) and path != "."


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: refusing to load a pickle checkpoint: unpickling can execute arbitrary code. "
        "Convert it to safetensors first (for example with Transformers: save_pretrained(..., safe_serialization=True))."
    )


def _open_safetensors(directory: Path) -> Checkpoint:
    config = LLMConfig.from_json(directory / "config.json")
    handles, tensors, stored_in = {}, {}, {}  # handles: file -> flax handle; stored_in: name -> files
    for f in safetensors_files(directory):
        with _named_errors(f):
            h = handles[f] = safe_open(f, framework="flax")
            for name in h.keys():
                sl = h.get_slice(name)
                if sl.get_dtype() not in FLOAT_DTYPES:
                    raise CheckpointError(f"{f}: tensor {name} has dtype {sl.get_dtype()}; expected one of {FLOAT_DTYPES}")
                stored_in.setdefault(name, []).append(f)
                tensors[name] = (tuple(sl.get_shape()), sl.get_dtype())
    repeated = {name: files for name, files in stored_in.items() if len(files) > 1}
    if repeated:
        raise CheckpointError(f"{directory}: tensor(s) stored in more than one file: " +
                              "; ".join(f"{name} in {', '.join(f.name for f in files)}" for name, files in repeated.items()))

    numpy_handles: dict[Path, Any] = {}

    def read(name: str):
        file = stored_in[name][0]
        with _named_errors(file):
            if tensors[name][1] == "BF16":  # numpy has no bfloat16
                return handles[file].get_tensor(name)
            if file not in numpy_handles:  # reads twice as fast as the flax handle
                numpy_handles[file] = safe_open(file, framework="numpy")
            return numpy_handles[file].get_tensor(name)

    return Checkpoint(directory, config, tensors, read=read, tokenizer_files=lambda: read_tokenizer_files(directory))


@contextlib.contextmanager
def _named_errors(file: Path):
    """The safetensors library's errors (SafetensorError, OSError, ...) on a damaged file, as a CheckpointError
    that names the file."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(error).__name__}: {error})") from error


def _open_gguf(path: Path) -> Checkpoint:
    """A .gguf file, read once: dequantized to fp32 and re-oriented to HF's layout tensor by tensor (jaxllm.convert)."""
    from jaxllm.convert import read_gguf

    gguf = read_gguf(path)
    config = LLMConfig.from_dict(gguf.config, source=str(path))
    tensors = {name: (shape, gguf.stored_type(name)) for name, shape in gguf.shapes.items()}
    return Checkpoint(path, config, tensors, read=gguf.read,
                      tokenizer_files=lambda: {"config.json": gguf.config, **gguf.tokenizer_files()})


def open_checkpoint(model: str | Path | None = None) -> Checkpoint:
    """Open a checkpoint: a directory with config.json and safetensors, a .gguf file, the name of the default model
    ("smollm2-135m", also when None), or a Hub repo id (needs network access)."""
    path = resolve(model)
    return _open_gguf(path) if path.suffix == ".gguf" else _open_safetensors(path)


def load(model: str | Path | None = None, dtype=jnp.float32) -> Params:
    """Load a checkpoint into a Params pytree (parameters in `dtype`, fp32 by default); `model` as for open_checkpoint."""
    return build_params(open_checkpoint(model), dtype)


def load_model(model: str | Path | None = None, dtype=jnp.float32) -> Model:
    """Parameters and tokenizer together, for generation from text (same `model` argument as `load`)."""
    checkpoint = open_checkpoint(model)
    tokenizer = Tokenizer.from_files(checkpoint.tokenizer_files(), checkpoint.path)
    return Model(build_params(checkpoint, dtype), tokenizer)


def resolve(model: str | Path | None) -> Path:
    """A local path for `model`; refuses pickles before anything is read."""
    path = Path(model) if model is not None else None
    if path is not None and path.suffix in PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    if path is not None and path.is_file() and path.suffix == ".safetensors":
        return path.parent
    from jaxllm.hub import resolve_model

    return Path(resolve_model(None if model is None else str(model)))
