"""What every benchmark writes beside its numbers: where and how the run happened (date, machine,
versions, the command that reproduces it, wall time), and its result files, written atomically so a
run killed mid-write leaves the previous committed result whole."""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdd_jax.io import atomic_write_bytes
from kdd_jax.versions import machine, versions


def command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces the run: `python benchmarks/<script> ARGS` (argv None: this
    process's own arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([f"python benchmarks/{Path(script).name}", *args])


def run_meta(script: str, argv: Sequence[str] | None, started: float, *, backend: bool = False, **extra) -> dict:
    """date, machine (with the JAX backend when `backend`), versions, command and `seconds` since
    `started` (a time.perf_counter() value), then the benchmark's own settings in `extra`."""
    m = machine()
    if backend:
        import jax

        m["jax_backend"] = jax.default_backend()
    return {"date": datetime.date.today().isoformat(), "machine": m, "versions": versions(),
            "command": command(script, argv), "seconds": time.perf_counter() - started, **extra}


def write_results(out: Path, tag: str, doc: dict, markdown: str, *, indent: int | None = 1) -> tuple[Path, Path]:
    """`out/<tag>.json` (`indent` None: compact) and `out/<tag>.md`, each replaced atomically. A value
    that is not a finite number (a rate with nothing to measure it on) is written as null: NaN and
    Infinity are not JSON, and strict readers (jq, JavaScript, Go) refuse the whole file over them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{tag}.json", out / f"{tag}.md"
    atomic_write_bytes(paths[0], (json.dumps(finite_or_null(doc), indent=indent, allow_nan=False) + "\n").encode())
    atomic_write_bytes(paths[1], markdown.encode())
    return paths


def finite_or_null(obj):
    """`obj` with every non-finite float (nan, inf) inside dicts, lists and tuples replaced by None
    (numpy scalars first become Python numbers): what every benchmark writes as JSON."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj
