"""Finding student checkpoints on disk and reading their tensors.

A student is a directory holding `model.safetensors` (+ optional `config.json`), or a
`NAME.safetensors` file (+ optional sibling `NAME.json` or `config.json`). A directory holding
neither is searched recursively for students. Pickle-based files (.bin/.pt/.pth/.ckpt/.pkl)
are found too, but only read when the caller opts in, and then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from converters.keymap import ConversionError
from kdd_jax.io import read_safetensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclasses.dataclass(frozen=True)
class StudentSource:
    name: str  # output directory name
    weights: Path
    config: Path | None

    @property
    def is_pickle(self) -> bool:
        return self.weights.suffix in PICKLE_SUFFIXES


def _from_file(path: Path) -> StudentSource:
    for cand in (path.with_suffix(".json"), path.parent / CONFIG_NAME):
        if cand.is_file() and cand != path:
            config = cand
            break
    else:
        config = None
    name = path.parent.name if path.name == WEIGHTS_NAME or path.stem == "pytorch_model" else path.stem
    return StudentSource(name or path.stem, path, config)


def _from_dir(d: Path) -> StudentSource | None:
    if (d / WEIGHTS_NAME).is_file():
        return StudentSource(d.name, d / WEIGHTS_NAME, d / CONFIG_NAME if (d / CONFIG_NAME).is_file() else None)
    pickles = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if len(pickles) == 1:
        return StudentSource(d.name, pickles[0], d / CONFIG_NAME if (d / CONFIG_NAME).is_file() else None)
    return None


def discover(sources: list[str | Path]) -> list[StudentSource]:
    """Expand CLI arguments into students, in a stable order. Raises on a missing or empty source."""
    found: list[StudentSource] = []
    for src in map(Path, sources):
        if src.is_file():
            found.append(_from_file(src))
            continue
        if not src.is_dir():
            raise ConversionError(f"{src}: no such file or directory")
        single = _from_dir(src)
        if single is not None:
            found.append(single)
            continue
        before = len(found)
        for root, dirs, files in os.walk(src):
            dirs.sort()
            root_p = Path(root)
            student = _from_dir(root_p)
            if student is not None and root_p != src:
                found.append(student)
                dirs[:] = []  # a student's subfolders are its own business
                continue
            for f in sorted(files):
                p = root_p / f
                if (p.suffix == ".safetensors" and f != WEIGHTS_NAME) or p.suffix in PICKLE_SUFFIXES:
                    found.append(_from_file(p))
        if len(found) == before:
            raise ConversionError(f"{src}: no student checkpoints (*.safetensors or {WEIGHTS_NAME}) found")
    return _unique_names(found)


def _unique_names(students: list[StudentSource]) -> list[StudentSource]:
    seen: dict[str, int] = {}
    out = []
    for s in students:
        if s.name in ("", ".", ".."):  # `kdd convert .`, `x/..`, `..safetensors`: never --out itself or its parent
            s = dataclasses.replace(s, name=s.weights.resolve().parent.name or "student")
        n = seen.get(s.name, 0)
        seen[s.name] = n + 1
        out.append(s if n == 0 else dataclasses.replace(s, name=f"{s.name}-{n + 1}"))
    return out


def read_tensors(src: StudentSource, *, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], str]:
    """({key: array}, format). Pickles are refused unless `allow_pickle`."""
    if not src.is_pickle:
        tensors, _ = read_safetensors(src.weights)
        return tensors, "safetensors"
    if not allow_pickle:
        raise ConversionError(
            f"{src.weights}: pickle-based checkpoint refused (unpickling can run arbitrary code). "
            "Convert it to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)."
        )
    return read_pickle(src.weights), "pickle(weights_only)"


def read_pickle(path: Path) -> dict[str, np.ndarray]:
    """A state dict from a pickle file via torch.load(weights_only=True): floats as float32 numpy.
    Callers decide whether pickles are allowed at all."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: --allow-pickle needs PyTorch installed (pip install 'kdd-jax[torch]')") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses code-carrying pickles with an UnpicklingError
        raise ConversionError(f"{path}: torch.load(weights_only=True) refused or failed: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: expected a state_dict (name -> tensor), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        # numpy has no bfloat16; floats go through float32 (exact for f16/bf16), ints keep their type.
        v = v.detach().cpu()
        out[str(k)] = (v.float() if v.is_floating_point() else v).numpy()
    return out
