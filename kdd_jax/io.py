"""Every file format the library touches: safetensors in, orbax checkpoints out, atomic JSON.

The safetensors reader validates the whole header before touching tensor data (files come from
strangers): header size bounded by the file, known dtypes only, byte ranges inside the data
region, consistent with shape x dtype, and non-overlapping. Tensors are then zero-copy views of a
read-only memory map, so memory stays bounded by what the caller actually uses. Unlike
`safetensors.numpy`, it reads bfloat16 (as `ml_dtypes.bfloat16`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# The reference implementation's own cap; a larger header is hostile or broken.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 64  # numpy>=2's NPY_MAXDIMS
MAX_NBYTES = np.iinfo(np.intp).max


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message names the file and the key at fault."""


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Return ({name: array view}, metadata) after validating the whole file layout."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: header declares {n} bytes but the file has {size - 8} after the length field "
                f"(limit {MAX_HEADER_BYTES}): truncated or not a safetensors file"
            )
        raw = fh.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, >4300-digit int literal, deep nesting
            raise CheckpointError(f"{path}: header is not valid JSON ({type(e).__name__}: {e})") from None
        data_start, data_len = 8 + n, size - 8 - n
        entries, metadata = _validate_header(path, header, data_len)
        if not entries:
            return {}, metadata
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        count = (end - begin) // dtype.itemsize
        tensors[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
    return tensors, metadata


def _validate_header(path: Path, header: Any, data_len: int):
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    problems: list[str] = []
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        problems.append("__metadata__ must map strings to strings")
        metadata = {}
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            problems.append(f"{where}: entry must have exactly dtype, shape, data_offsets")
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            problems.append(f"{where}: unsupported dtype {info['dtype']!r}")
            continue
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            problems.append(f"{where}: shape {shape!r} is not a list of non-negative integers")
            continue
        if len(shape) > MAX_DIMS or math.prod(d for d in shape if d) * dtype.itemsize > MAX_NBYTES:
            problems.append(f"{where}: shape {shape!r} is beyond what an array can hold")
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            problems.append(f"{where}: data_offsets {offsets!r} is not a pair of integers")
            continue
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            problems.append(f"{where}: bytes [{begin}, {end}) fall outside the {data_len}-byte data region")
            continue
        if end - begin != math.prod(shape) * dtype.itemsize:
            problems.append(
                f"{where}: shape {shape} x {info['dtype']} needs {math.prod(shape) * dtype.itemsize} bytes, "
                f"offsets give {end - begin}"
            )
            continue
        entries[name] = (dtype, tuple(shape), begin, end)
    spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            problems.append(f"tensors {n0!r} and {n1!r} overlap (bytes {b1}..{e0})")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"{path}: invalid safetensors header:\n  " + "\n  ".join(shown))
    return entries, metadata


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write float/int numpy arrays as safetensors, atomically."""
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, blob)


def read_arrays(path: str | Path, what: str = "arrays") -> dict[str, np.ndarray]:
    """Named arrays from .safetensors, .npz or .npy (key "images") without ever unpickling."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
    if path.suffix == ".safetensors":
        return {k: np.asarray(v) for k, v in read_safetensors(path)[0].items()}
    if path.suffix not in (".npy", ".npz"):
        raise CheckpointError(f"{what} {path}: unsupported file type (use .safetensors, .npz or .npy)")
    # a damaged .npz is a damaged zip: its errors (bad archive, CRC, truncated deflate stream) are not ValueErrors
    damaged = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)
    try:
        loaded = np.load(path, allow_pickle=False)
    except damaged as e:
        raise CheckpointError(f"{what} {path}: cannot read ({type(e).__name__}: {e})") from None
    if isinstance(loaded, np.ndarray):
        return {"images": loaded}
    with loaded:
        try:
            return {k: loaded[k] for k in loaded.files}
        except damaged as e:  # also object arrays, which need pickle: refused
            raise CheckpointError(f"{what} {path}: cannot read ({type(e).__name__}: {e})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide outputs from the user's group
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


_RENAME_EXCHANGE = 2  # linux/fs.h


@functools.cache
def _renameat2():
    """libc's renameat2, or None (not Linux; glibc < 2.28 or a libc built without it)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where the platform,
    libc or filesystem cannot, or where `b` has vanished meanwhile, so the caller falls back to renames."""
    import ctypes
    import errno

    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT):
        return False  # this kernel or filesystem cannot exchange; or nothing left to exchange with
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class StagingDir:
    """A directory built under a temporary name and published by one rename.

    Readers see either nothing or the complete directory; a crash leaves only a `.NAME.tmp-*`
    sibling, which nothing reads (safe to delete; not removed automatically, since a concurrent
    publisher's may be in progress). Replacing an existing directory (`overwrite`) swaps the two
    in one atomic exchange on Linux, so the target is never missing; elsewhere it takes two
    renames, and a crash between them leaves the previous version in a `.NAME.old-*/old`
    sibling, which `recover` (called by the next overwrite, and by readers that must not miss a
    version, such as the synthesis checkpoint) puts back. Overwrites of one target assume a
    single writer at a time: a `recover` running while another process sits between its two
    renames makes that publish fail (nothing complete is lost).
    """

    @staticmethod
    def _set_aside(target: Path) -> list[Path]:
        """This target's complete set-aside versions (`.NAME.old-XXXXXXXX/old`), oldest first."""
        import re

        pattern = re.compile(rf"\.{re.escape(target.name)}\.old-[A-Za-z0-9_]{{8}}")
        found = []
        for d in target.parent.iterdir():
            if pattern.fullmatch(d.name) and (d / "old").exists():
                try:
                    found.append((d.stat().st_mtime, d / "old"))  # the time it was set aside
                except FileNotFoundError:  # removed meanwhile
                    continue
        return [p for _, p in sorted(found)]

    @classmethod
    def recover(cls, target: str | Path) -> bool:
        """If `target` is missing because a crash fell between the two renames of an overwrite,
        put its previous version back (the latest set aside). True when something was restored."""
        target = Path(target).absolute()
        if target.exists() or not target.parent.is_dir():
            return False
        olds = cls._set_aside(target)
        if not olds:
            return False
        os.replace(olds[-1], target)
        for o in olds:
            shutil.rmtree(o.parent, ignore_errors=True)
        return True

    def __init__(self, target: str | Path, *, overwrite: bool = False):
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.path: Path | None = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            self.recover(self.target)
        if self.target.exists() and not self.overwrite:
            raise FileExistsError(f"{self.target} already exists (pass overwrite to replace it)")
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        os.chmod(self.path, 0o777 & ~_umask())
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        if self.target.exists() or self.target.is_symlink():
            if _exchange(self.path, self.target):  # self.path now holds the previous version
                _remove(self.path)
                return
        if self.target.exists() or self.target.is_symlink():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
            os.replace(self.target, trash / "old")
            os.replace(self.path, self.target)
            # renamed before deleting: a kill mid-delete never leaves a partial copy named `old`
            os.replace(trash / "old", trash / "gone")
            _remove(trash / "gone")
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.target)


# ---- orbax: the only place the library calls it -------------------------------------------------

def save_state(directory: str | Path, state: Any) -> None:
    """Save a pytree of arrays (an nnx state as a pure dict) with orbax, synchronously.

    Uncompressed: trained float weights do not compress, and zstd halved write throughput
    (measured 200-250 vs 415 MB/s on a 15M-parameter state; benchmarks/convert_bench.py)."""
    import orbax.checkpoint as ocp

    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
    ckptr.save(Path(directory).absolute(), args=ocp.args.PyTreeSave(state))


def restore_state(directory: str | Path, abstract_state: Any) -> Any:
    """Restore a pytree saved by `save_state` into the structure/shapes of `abstract_state`."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(directory).absolute(), abstract_state)


# ---- converted students: the artefact `kdd convert` writes and every later stage reads -------------

CONVERTED_LAYOUT = {"state": "state", "config": "config.json", "report": "conversion_report.json"}


def save_converted(target: str | Path, model, config, report: dict, *, overwrite: bool = False) -> Path:
    """Publish a converted student directory atomically: orbax state + config.json + report."""
    from flax import nnx

    state = nnx.to_pure_dict(nnx.state(model))
    with StagingDir(target, overwrite=overwrite) as tmp:
        save_state(tmp / CONVERTED_LAYOUT["state"], state)
        atomic_write_json(tmp / CONVERTED_LAYOUT["config"], config.to_dict())
        atomic_write_json(tmp / CONVERTED_LAYOUT["report"], report)
    return Path(target)


def load_converted(directory: str | Path):
    """(model, config, report) from a directory written by `save_converted`."""
    from flax import nnx

    from kdd_jax.config import load_config
    from kdd_jax.models import abstract_model

    directory = Path(directory)
    for part in CONVERTED_LAYOUT.values():
        if not (directory / part).exists():
            raise CheckpointError(f"{directory}: not a converted student (missing {part}); run `kdd convert` first")
    config = load_config(directory / CONVERTED_LAYOUT["config"])
    report_path = directory / CONVERTED_LAYOUT["report"]
    try:
        report = json.loads(report_path.read_text())
    except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{report_path}: cannot read the conversion report ({e}); re-run `kdd convert` for "
                              "this student") from None
    graphdef, abstract = nnx.split(abstract_model(config))
    target = nnx.to_pure_dict(abstract)
    state = directory / CONVERTED_LAYOUT["state"]
    try:
        restored = restore_state(state, target)
    except Exception as e:  # orbax / tensorstore raise many kinds for damaged data: name the folder and the fix
        raise CheckpointError(f"{state}: cannot restore the converted weights ({error_summary(e)}); re-run "
                              "`kdd convert` for this student") from None
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract), config, report


def error_summary(e: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters (storage errors carry pages of detail)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
