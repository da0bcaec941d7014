"""A llama.cpp GGUF file to an HF-format directory (config, float32 safetensors, tokenizer), written safely: into
a temporary folder renamed into place when complete, never over a folder jaxllm did not make. Reading the GGUF is
gguf_reader.py's.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from jaxllm.errors import CheckpointError


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], tensors: Iterable[tuple[str, np.ndarray]]):
    """Stream float32 tensors into a safetensors file: the header comes from the shapes, so no tensor waits in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as the safetensors writer does it
    expected = iter(shapes.items())
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(blob)) + blob)
        for name, array in tensors:
            want = next(expected, (None, None))
            if (name, array.shape) != want:
                raise CheckpointError(f"{path}: tensor {name!r} {array.shape} arrived where {want} was expected")
            file.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
    if (missing := next(expected, None)) is not None:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} was never written")


# Written into every folder convert_gguf makes: where it came from, and each file's size, mtime and sha256. It marks
# the folder as a conversion that --overwrite may replace, and lets the default model's cache check itself.
MARKER = ".jaxllm-conversion.json"


def sha256(path: Path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded_files(folder: Path) -> dict[str, dict]:
    """name -> {size, mtime_ns, sha256} of the files a conversion wrote, from its MARKER; an OSError, ValueError,
    KeyError or TypeError when the folder has no readable one."""
    files = json.loads((folder / MARKER).read_text(encoding="utf-8"))["files"]
    if not isinstance(files, dict):
        raise TypeError(f"{MARKER}: 'files' is not an object")
    return files


def conversion_problem(folder: Path) -> str | None:
    """None when `folder` is a complete conversion whose files are as convert_gguf wrote them; else what is wrong.
    Sizes are compared always; a file whose mtime changed is also checksummed."""
    try:
        files = _recorded_files(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"no readable {MARKER} ({error})"
    for name, expected in files.items():
        path = folder / name
        try:
            stat = path.stat()
        except OSError:
            return f"{name} is missing"
        if stat.st_size != expected["size"]:
            return f"{name} has {stat.st_size} bytes, {expected['size']} were written"
        if stat.st_mtime_ns != expected["mtime_ns"] and sha256(path) != expected["sha256"]:
            return f"{name} has changed since it was written (sha256 differs)"
    return None


def _check_target(source: Path, out: Path, overwrite: bool) -> None:
    """Refuse any out_dir whose replacement could lose a user's files."""
    source, target, cwd = source.resolve(), out.resolve(), Path.cwd().resolve()
    if target == source or target in source.parents:
        raise CheckpointError(f"{out}: refusing to write the conversion over the folder that holds its source {source}")
    if target == cwd or target in cwd.parents:
        raise CheckpointError(f"{out}: refusing to write the conversion over the current folder or a folder above it")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise CheckpointError(f"{out} exists and is not a folder; refusing to replace it")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    if not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty; remove it, or pass --overwrite "
                              f"(overwrite=True) to replace an earlier conversion")
    try:
        written = set(_recorded_files(out)) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{out} is not a folder jaxllm converted (it has no readable {MARKER}); --overwrite "
                              f"replaces only an earlier conversion, so nothing was changed") from None
    if entries - written:
        raise CheckpointError(f"{out} holds files jaxllm did not write ({', '.join(sorted(entries - written))}); "
                              f"refusing to replace it")


@contextlib.contextmanager
def temporary_folder(beside: Path, suffix: str) -> Iterator[Path]:
    """A new folder `.{name}.XXXXXXXX{suffix}` beside `beside`, removed on exit unless renamed away meanwhile.

    Its owner holds a lock on a sibling `.lock` file for as long as it runs, so folders of this kind left behind by
    a killed run (their lock free, or gone) are recognised and removed here, before a new one is made."""
    parent, prefix = beside.parent, f".{beside.name}."
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{glob.escape(prefix)}*{suffix}"):
        lock_path = stale.with_name(stale.name[: -len(suffix)] + ".lock")
        with contextlib.suppress(OSError), locked(lock_path, wait=False, create=False) as owned:
            if owned:
                shutil.rmtree(stale, ignore_errors=True)
                lock_path.unlink(missing_ok=True)
        if not lock_path.exists():
            shutil.rmtree(stale, ignore_errors=True)
    fd, lock_name = tempfile.mkstemp(prefix=prefix, suffix=".lock", dir=parent)
    os.close(fd)
    lock_path = Path(lock_name)
    folder = lock_path.with_name(lock_path.name[: -len(".lock")] + suffix)
    with locked(lock_path, wait=True, create=False):
        try:
            folder.mkdir()
            umask = os.umask(0o022)
            os.umask(umask)
            folder.chmod(0o777 & ~umask)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # a no-op once it has been renamed into place
            lock_path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(path: Path, wait: bool = True, create: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` for the duration; yields False when `wait` is off and another holds it."""
    try:
        file = open(path, "a" if create else "r+")
    except FileNotFoundError:
        yield False
        return
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Convert a GGUF to an HF-format directory, all or nothing: files are written to a temporary
    directory beside out_dir that is renamed into place only when complete. `overwrite` replaces an earlier
    conversion only (recognised by its MARKER file), never another folder, the source's folder or one above it."""
    from tqdm.auto import tqdm

    from jaxllm.gguf_reader import read_gguf  # (here: loading an HF folder never imports the GGUF reader)

    source, out = Path(gguf_path), Path(out_dir)
    _check_target(source, out, overwrite)
    checkpoint = read_gguf(source)
    files = {"config.json": checkpoint.config, **checkpoint.tokenizer_files()}
    with temporary_folder(out, ".partial") as partial:
        for name, content in files.items():
            (partial / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tensors = tqdm(checkpoint.tensors(), total=len(checkpoint.shapes), desc=f"Converting {source.name}",
                       unit="tensor", disable=not progress)
        write_safetensors(partial / "model.safetensors", checkpoint.shapes, tensors)
        record = {"source": str(source.resolve()), "files": {}}
        for path in sorted(partial.iterdir()):
            stat = path.stat()
            record["files"][path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256(path)}
        (partial / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _check_target(source, out, overwrite)  # again: the folder may have changed while converting
        if out.exists():  # an empty folder, or an earlier conversion: moved aside, then removed once replaced
            with temporary_folder(out, ".old") as old:
                os.rename(out, old / "previous")
                os.rename(partial, out)
        else:
            os.rename(partial, out)
    return out
