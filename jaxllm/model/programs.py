"""The jitted entry points (`program`), counted, and, once `keep_programs(folder)` is called (the command line does),
their compiled executables kept on disk, so that a later process neither traces, lowers nor compiles them again.

JAX's persistent compilation cache alone saves only the compile: its key is the lowered program, so every process
still traces and lowers each program (about 1 s of a warm `jaxllm generate` on the default model). Here the key is
what the trace depends on, known before tracing: the program's name, the structure, shapes, dtypes and shardings of
its arguments (the static ones by value), jaxllm's own source, the versions of jax and jaxlib, the backend
and its devices, and the JAX/XLA settings of this process. A hit loads the serialized executable
(jax.experimental.serialize_executable); a miss compiles as jax.jit does and stores the result (written to a
temporary file, renamed into place). An executable that cannot be serialized or read back is compiled as before.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import hashlib
import os
import pickle
from pathlib import Path
from typing import Callable

import jax
import numpy as np

_TRACES: collections.Counter[str] = collections.Counter()
_STORE: list[Path] = []  # the folder of kept executables, when on
_USED: list[str] = []  # the files of the executables this process loaded or compiled, in order
_PREFETCHED: dict[str, concurrent.futures.Future] = {}  # file name -> its executable, being read in the background


def keep_programs(folder: str | os.PathLike | None) -> None:
    """Keep compiled programs in `folder` (None: stop keeping them)."""
    _STORE[:] = [] if folder is None else [Path(folder)]


def program(fn: Callable, name: str | None = None, **jit_kwargs) -> Callable:
    """jax.jit(fn, **jit_kwargs), counted: every trace of the program adds one to compile_counts()[name]. With
    keep_programs on, a call first looks for the program compiled for these arguments in memory, then on disk."""
    name = name or fn.__name__
    _TRACES[name] += 0  # listed from the start, at 0 until its first trace

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        _TRACES[name] += 1
        return fn(*args, **kwargs)

    jitted = jax.jit(traced, **jit_kwargs)
    static = set(jit_kwargs.get("static_argnames", ()))
    loaded: dict[tuple, Callable] = {}  # the arguments' signature -> the executable, loaded or compiled here

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not _STORE:
            return jitted(*args, **kwargs)
        dynamic = {k: v for k, v in kwargs.items() if k not in static}  # statics are compiled in
        leaves, tree = jax.tree_util.tree_flatten((args, dynamic))
        signature = (tree, tuple(sorted((k, v) for k, v in kwargs.items() if k in static)),
                     tuple((x.aval, x.sharding) if isinstance(x, jax.Array) else (type(x), np.shape(x), np.result_type(x))
                           for x in leaves))  # hashed quickly: the key on disk costs ~10x more to make
        executable = loaded.get(signature)
        if executable is None:
            key = _key(name, static, args, kwargs)
            executable = loaded[signature] = (_load(_STORE[0] / f"{name}-{key}.jaxexe")
                                              or _compile(jitted, _STORE[0], name, key, args, kwargs))
        return executable(*args, **dynamic)

    call.lower = jitted.lower
    return call


def prefetch_recent(tag: str) -> None:
    """Start reading, on a background thread, the executables the last run under `tag` used (record_recent), so
    that they load while the caller reads the weights (the read runs in C++, outside the GIL). A run whose
    arguments differ finds other keys and loads or compiles as usual; the prefetched ones are then unused."""
    if not _STORE:
        return
    try:
        names = json.loads((_STORE[0] / f"recent-{_digest(tag)}.json").read_text())
    except (OSError, ValueError):
        return
    from jaxllm.model.ops import row_kernel_ready

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxllm-prefetch")
    pool.submit(row_kernel_ready)  # first: an executable that calls the row kernel loads only once it is registered
    for name in names:
        if isinstance(name, str) and name not in _PREFETCHED:
            _PREFETCHED[name] = pool.submit(_read, _STORE[0] / name)
    pool.shutdown(wait=False)


def record_recent(tag: str) -> None:
    """Remember the executables this process used, for prefetch_recent(tag) in a later one."""
    if _STORE and _USED:
        _write(_STORE[0], f"recent-{_digest(tag)}.json", json.dumps(list(dict.fromkeys(_USED))).encode())


def compile_counts() -> dict[str, int]:
    """How many times each jitted entry point has been traced (so compiled) in this process, by name: every one of
    them, those of modules not imported yet too (`import jaxllm` imports lazily)."""
    import jaxllm.engine  # noqa: F401  (defines the serving engine's programs; it imports generation's)

    return dict(_TRACES)


@functools.cache
def _environment() -> str:
    """What a program's trace and compile depend on besides its arguments, fixed for the life of a process."""
    import jaxlib

    from jaxllm.model.ops import row_kernel_ready

    source = hashlib.sha256()
    package = Path(__file__).resolve().parent.parent
    for path in sorted([*package.rglob("*.py"), *package.rglob("*.cc")]):
        source.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    devices = [(d.platform, d.device_kind, d.id, d.process_index) for d in jax.devices()]
    settings = {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_", "TF_CPP"))}
    config = {k: getattr(jax.config, k) for k in ("jax_enable_x64", "jax_default_matmul_precision",
                                                     "jax_default_prng_impl", "jax_numpy_rank_promotion")}
    return repr((source.hexdigest(), jax.__version__, jaxlib.__version__, devices,
                 jax.process_count(), sorted(settings.items()), sorted(config.items()),
                 row_kernel_ready()))  # built (and its custom call registered) before a kept program that calls it runs


def _leaf(x) -> str:
    if isinstance(x, jax.Array):
        return f"{x.dtype}{x.shape}{'w' if getattr(x, 'weak_type', False) else ''}@{x.sharding}"
    if isinstance(x, np.ndarray | np.generic):
        return f"np{x.dtype}{x.shape}"
    return type(x).__name__  # a Python scalar: traced as a weakly typed scalar whatever its value


def _key(name: str, static: set[str], args: tuple, kwargs: dict) -> str:
    """The program's name (its jit options are in the source), its arguments' structure, shapes, dtypes and
    shardings, the static ones by value, and _environment()."""
    fixed = {k: v for k, v in kwargs.items() if k in static}  # static by value, the rest by shape
    leaves, tree = jax.tree_util.tree_flatten((args, {k: v for k, v in kwargs.items() if k not in static}))
    text = repr((name, sorted(fixed.items()), str(tree), _environment(),
                 [_leaf(x) for x in leaves]))
    return _digest(text)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read(path: Path) -> Callable | None:
    """The executable stored at `path`, or None when there is none or it cannot be loaded."""
    from jax.experimental import serialize_executable

    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        executable, in_tree, out_tree = pickle.loads(blob)
        return serialize_executable.deserialize_and_load(executable, in_tree, out_tree)
    except Exception:  # written by another build or cut short: compile again (and replace it)
        return None


def _load(path: Path) -> Callable | None:
    future = _PREFETCHED.pop(path.name, None)
    found = future.result() if future is not None else _read(path)
    if found is not None:
        _USED.append(path.name)
    return found


def _write(folder: Path, name: str, blob: bytes) -> None:
    """folder/name written whole or not at all: a temporary file renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    tmp.write_bytes(blob)
    os.replace(tmp, folder / name)


def _compile(jitted, folder: Path, name: str, key: str, args: tuple, kwargs: dict) -> Callable:
    from jax.experimental import serialize_executable

    from jax._src import config
    from jax.experimental.compilation_cache import compilation_cache

    # Compiled here, not loaded from JAX's persistent cache: an executable read back from there serializes without
    # its kernels ("Function ... not found" when the copy runs). JAX decides once whether it uses that cache, so the
    # decision is reset around this compile.
    lowered = jitted.lower(*args, **kwargs)
    compilation_cache.reset_cache()
    try:
        with config.enable_compilation_cache(False):
            compiled = lowered.compile()
    finally:
        compilation_cache.reset_cache()
    try:
        blob = pickle.dumps(serialize_executable.serialize(compiled))
    except (ValueError, NotImplementedError, TypeError, pickle.PicklingError):  # not serializable: kept in memory only
        return compiled
    _write(folder, f"{name}-{key}.jaxexe", blob)
    _USED.append(f"{name}-{key}.jaxexe")
    return compiled
