#!/usr/bin/env python
"""Bulk-conversion benchmark: `converters.bulk.convert_many` against a bare safetensors read.

    python benchmarks/convert_bench.py                 # full run (52 checkpoints), ~5 min on 2 cores
    python benchmarks/convert_bench.py --quick --out /tmp/bench   # smoke test, well under a minute

What it does, all in one process and one run:

1. Builds (once; cached under --work) a zoo of PyTorch students of the four families at CIFAR
   sizes, written as a PyTorch user would publish them: `<dir>/model.safetensors` (torch
   state-dict names and layouts, randomised weights AND BatchNorm statistics, deterministic
   seeds) + `<dir>/config.json`. Mostly float32, some float16 and bfloat16.
2. Reads every file once (page cache warm for everything that follows; both sides see hot reads).
3. Warm-up pass, then --repeats interleaved passes of
     (a) the bare read: `safetensors.numpy.load_file` per file. numpy has no bfloat16, so
         `safetensors.numpy` refuses BF16 files: those are read with `safetensors.torch.load_file`
         instead and left out of the headline ratio (reported separately, "all files" row);
     (b) our bulk conversion: `convert_many([zoo], out, verify=False)`, orbax write included.
   Medians over the repeats are reported. MB/s = source bytes / seconds (1 MB = 1e6 bytes).
4. A per-stage breakdown: the real `convert_many` once more, with the library functions it calls
   wrapped by timers (exclusive time per stage and student; see INSTRUMENT). The library's own
   functools caches are cleared before every pass, so each pass pays what a fresh process pays.
5. A verification pass: `convert_many(verify=True)` (the `kdd convert` default) once, with the check
   against PyTorch timed per student: first student of each architecture (pays the jit compile)
   against the repeats, passes, float32 kink flips settled in float64 (--no-verify skips it).
6. Experiments that measure candidate speed-ups on the same files (nothing here changes the
   library): per-config caching of abstract_model/build_keymap, the jax tracer error-message
   cost inside abstract_model, kernel-transpose strategies, and alternative state writers.

Results: <out>/convert_bench.{md,json} (<out>/convert_bench_quick.* with --quick), with machine,
versions, date, the exact command, zoo composition and every number measured. Tests never
assert on these numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: benchmarks.provenance must be importable
    sys.path.insert(0, str(REPO))
BENCH_KIND = "kdd_jax.benchmark.convert_bench"
ZOO_FORMAT = 2  # bump when the way a zoo member is written changes (forces a rebuild)
MB = 1e6

PRE_RGB32 = {"input_size": [32, 32], "channels": 3, "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]}

# CIFAR-style architectures (the sizes KD students are actually published at).
_VGG_CFGS = {
    "11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}
_MBV2_CIFAR = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def _resnet_cifar(depth: int, classes: int) -> dict:
    n = (depth - 2) // 6
    return {"block": "basic", "layers": [n, n, n], "widths": [16, 32, 64], "stem": "small", "num_classes": classes}


def _vgg_cifar(cfg: str, classes: int, head: str) -> dict:
    if head == "linear":  # avgpool null: 32x32 input -> 1x1x512 -> Linear(512, classes)
        return {"cfg": _VGG_CFGS[cfg], "num_classes": classes, "avgpool": None, "classifier_hidden": [], "dropout": "none"}
    return {"cfg": _VGG_CFGS[cfg], "num_classes": classes, "avgpool": [1, 1], "classifier_hidden": [512, 512],
            "dropout": "after_relu"}


def _densenet_bc(depth: int, k: int, classes: int) -> dict:
    n = (depth - 4) // 6
    return {"num_classes": classes, "growth_rate": k, "block_config": [n, n, n], "num_init_features": 2 * k,
            "stem": "small"}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    family: str
    arch: dict
    dtypes: tuple[str, ...]  # one student per entry, in order

    def config(self) -> dict:
        return {"format_version": 1, "family": self.family, "arch": self.arch, "preprocessing": PRE_RGB32}


F32, F16, BF16 = "float32", "float16", "bfloat16"

FULL_ZOO = [
    Variant("resnet20", "resnet", _resnet_cifar(20, 10), (F32, F32, F32, F32, F16, BF16)),
    Variant("resnet20-c100", "resnet", _resnet_cifar(20, 100), (F32, F32)),
    Variant("resnet32", "resnet", _resnet_cifar(32, 10), (F32, F32, F16)),
    Variant("resnet44", "resnet", _resnet_cifar(44, 10), (F32, F32)),
    Variant("resnet56", "resnet", _resnet_cifar(56, 10), (F32, F32, F32, F32, F16, BF16)),
    Variant("resnet110", "resnet", _resnet_cifar(110, 10), (F32, F32)),
    Variant("resnet18-cifar", "resnet", {"block": "basic", "layers": [2, 2, 2, 2], "widths": [64, 128, 256, 512],
                                         "stem": "small", "num_classes": 10}, (F32, F32, F32, BF16)),
    Variant("vgg11-bn", "vgg", _vgg_cifar("11", 10, "linear"), (F32, F32, F16)),
    Variant("vgg11-bn-mlp", "vgg", _vgg_cifar("11", 10, "mlp"), (F32, F32)),
    Variant("vgg13-bn", "vgg", _vgg_cifar("13", 10, "linear"), (F32, F32)),
    Variant("vgg16-bn", "vgg", _vgg_cifar("16", 10, "linear"), (F32, F32, BF16)),
    Variant("vgg16-bn-mlp-c100", "vgg", _vgg_cifar("16", 100, "mlp"), (F32, F32)),
    Variant("mobilenetv2-cifar", "mobilenetv2", {"num_classes": 10, "stem_stride": 1,
                                                 "inverted_residual_setting": _MBV2_CIFAR}, (F32, F32, F32, F16)),
    Variant("mobilenetv2-cifar-w0.5", "mobilenetv2", {"num_classes": 10, "width_mult": 0.5, "stem_stride": 1,
                                                      "inverted_residual_setting": _MBV2_CIFAR}, (F32, F32, BF16)),
    Variant("mobilenetv2-cifar-w0.75-c100", "mobilenetv2", {"num_classes": 100, "width_mult": 0.75, "stem_stride": 1,
                                                            "inverted_residual_setting": _MBV2_CIFAR}, (F32,)),
    Variant("densenet-bc-40-k12", "densenet", _densenet_bc(40, 12, 10), (F32, F32, F32, F16)),
    Variant("densenet-bc-100-k12", "densenet", _densenet_bc(100, 12, 10), (F32, F32, BF16)),
]

QUICK_ZOO = [
    Variant("resnet20", "resnet", _resnet_cifar(20, 10), (F32, BF16)),
    Variant("vgg-tiny-bn", "vgg", {"cfg": [16, "M", 32, "M", 64, "M"], "num_classes": 10, "avgpool": [1, 1],
                                   "classifier_hidden": [64], "dropout": "after_relu"}, (F32, F16)),
    Variant("mobilenetv2-cifar-w0.35", "mobilenetv2", {"num_classes": 10, "width_mult": 0.35, "stem_stride": 1,
                                                       "inverted_residual_setting": _MBV2_CIFAR[:4],
                                                       "last_channel": 256}, (F32,)),
    Variant("densenet-bc-22-k8", "densenet", _densenet_bc(22, 8, 10), (F32,)),
]


# ----------------------------------------------------------------------------- environment


def machine_info() -> dict:
    import jax

    from kdd_jax.versions import machine

    return {**machine(), "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()]}


def git_info() -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": run("rev-parse", "HEAD") or None, "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def library_fingerprint() -> str:
    """sha256 over the library's Python sources (kdd_jax/, converters/), uncommitted edits included:
    recorded at start and end so that a run measured across a code change is visible."""
    h = hashlib.sha256()
    for pkg in ("kdd_jax", "converters"):
        for f in sorted((REPO / pkg).rglob("*.py")):
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def all_versions() -> dict:
    from kdd_jax.versions import versions

    out = versions()
    try:
        import torch

        out["torch (zoo build only)"] = torch.__version__
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------- zoo


def _spec(zoo: list[Variant]) -> dict:
    spec = {"zoo_format": ZOO_FORMAT, "variants": [dataclasses.asdict(v) | {"config": v.config()} for v in zoo]}
    return json.loads(json.dumps(spec))  # as it reads back from manifest.json (tuples -> lists)


def build_zoo(zoo: list[Variant], root: Path, log) -> dict:
    """Write the zoo under root (reused when the manifest's spec matches). Returns the manifest."""
    spec = _spec(zoo)
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("spec") == spec and all((root / m["dir"] / "model.safetensors").is_file() for m in manifest["members"]):
            log(f"zoo: reusing {len(manifest['members'])} checkpoints in {root}")
            manifest["reused"] = True
            return manifest
    import torch
    from safetensors.torch import save_file

    from converters.torch_reference import build_torch_model, randomize_

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    members = []
    torch_dtypes = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
    for vi, v in enumerate(zoo):
        cfg = v.config()
        for i, dt in enumerate(v.dtypes):
            seed = 1000 * vi + i
            name = f"{v.name}-{dt}-{i:02d}"
            model = randomize_(build_torch_model(cfg), seed)
            sd = {k: (t.to(torch_dtypes[dt]) if t.is_floating_point() else t).contiguous() for k, t in model.state_dict().items()}
            d = root / name
            d.mkdir()
            save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
            (d / "config.json").write_text(json.dumps(cfg))
            from kdd_jax.io import sha256_file

            members.append({"dir": name, "variant": v.name, "family": v.family, "dtype": dt, "seed": seed,
                            "bytes": (d / "model.safetensors").stat().st_size,
                            "sha256": sha256_file(d / "model.safetensors"),
                            "parameters": int(sum(p.numel() for p in model.parameters())),
                            "tensors": len(sd)})
    manifest = {"spec": spec, "members": members, "build_seconds": round(time.perf_counter() - t0, 2)}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log(f"zoo: built {len(members)} checkpoints in {manifest['build_seconds']} s under {root}")
    manifest["reused"] = False
    return manifest


def _header(path: Path) -> dict:
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _header_dtypes(path: Path) -> set[str]:
    return {v["dtype"] for v in _header(path).values()}


def _state_shape(path: Path) -> tuple[int, int]:
    """(leaves, float32 bytes) of the converted state: every tensor but num_batches_tracked."""
    kept = [v for k, v in _header(path).items() if not k.endswith(".num_batches_tracked")]
    return len(kept), sum(4 * math.prod(v["shape"]) for v in kept)


# ----------------------------------------------------------------------------- measurements


def warm_page_cache(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t0


def bare_pass(files: list[Path], bf16: set[Path]) -> list[float]:
    """Per-file seconds of the bare read (numpy, or torch for BF16 files numpy cannot hold)."""
    from safetensors.numpy import load_file as np_load
    from safetensors.torch import load_file as torch_load

    out = []
    for p in files:
        t0 = time.perf_counter()
        data = (torch_load if p in bf16 else np_load)(str(p))
        out.append(time.perf_counter() - t0)
        del data
    return out


def clear_library_caches() -> list[str]:
    """Clear every functools cache in kdd_jax.* / converters.* so each pass costs what a fresh
    `kdd convert` process pays (a per-config cache filled by the warm-up pass would otherwise make
    every timed pass free of model building). jax's own tracing caches are warmed by the warm-up
    pass on purpose."""
    cleared = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name.startswith("kdd_jax") or mod_name.startswith("converters")):
            continue
        for attr, obj in list(vars(mod).items()):
            if callable(getattr(obj, "cache_clear", None)) and getattr(obj, "__module__", None) == mod_name:
                obj.cache_clear()
                cleared.append(f"{mod_name}.{attr}")
    return sorted(cleared)


def bulk_pass(zoo_dir: Path, out_dir: Path, on_start=None, verify: bool = False,
              failures: list | None = None) -> tuple[float, dict[str, float]]:
    """Wall seconds of one convert_many over the zoo, and the per-student seconds it reports. A failed
    student stops the benchmark, unless `failures` is given: then (name, error) pairs are appended
    to it and the pass goes on (the verification pass must report a failing check, not lose the run)."""
    from converters.bulk import convert_many

    if out_dir.exists():
        shutil.rmtree(out_dir)
    clear_library_caches()
    gc.collect()
    os.sync()  # the previous pass's dirty pages must not be flushed on this pass's clock
    t0 = time.perf_counter()
    outcomes = list(convert_many([zoo_dir], out_dir, verify=verify, on_start=on_start))
    wall = time.perf_counter() - t0
    failed = [o for o in outcomes if o.status != "ok"]
    if failures is not None:
        failures.extend((o.name, o.error) for o in failed)
    elif failed:
        raise SystemExit(f"conversion failed for {len(failed)} student(s): {failed[0].name}: {failed[0].error}")
    shutil.rmtree(out_dir)
    return wall, {o.name: o.seconds for o in outcomes}


# (module, attribute, stage). The real convert_many runs with these names wrapped by timers, so the
# breakdown follows the library as it is, whatever it does inside. Timing is exclusive (a stage's
# time excludes the wrapped stages it calls), per thread; a name the library no longer has is
# skipped (listed in the results) and its time lands in its caller's "other".
INSTRUMENT = [
    ("converters.bulk", "convert_student", "convert_student: other (report, parameter count, ...)"),
    ("converters.bulk", "save_converted", "save_converted: other (to_pure_dict, staging, publish)"),
    ("converters.convert", "read_tensors", "read_safetensors (validate header, mmap)"),
    ("converters.convert", "_resolve_config", "config (load + strict parse)"),
    ("converters.convert", "model_structure", "model_structure: other (cache lookup)"),
    ("converters.convert", "abstract_model", "abstract_model (nnx.eval_shape)"),
    ("converters.convert", "build_keymap", "build_keymap"),
    ("converters.convert", "apply_keymap", "apply_keymap (checks, transposes, casts)"),
    ("converters.convert", "nnx.split", "nnx split/replace/merge"),
    ("converters.convert", "nnx.replace_by_pure_dict", "nnx split/replace/merge"),
    ("converters.convert", "nnx.merge", "nnx split/replace/merge"),
    ("converters.convert", "nnx.state", "nnx.state (report: parameter count)"),
    ("converters.convert", "sha256_file", "sha256_file"),
    ("converters.convert", "versions", "versions()"),
    ("kdd_jax.io", "save_state", "orbax save_state"),
    ("kdd_jax.io", "atomic_write_json", "json writes (fsync)"),
]
BULK_OTHER = "convert_many: other (discovery share, checks)"
BACKGROUND = " [background thread]"
TOP_LEVEL = {"convert_student: other (report, parameter count, ...)", "save_converted: other (to_pure_dict, staging, publish)"}


class _NnxProxy:
    """Stands in for `flax.nnx` inside one module: timed split/merge/..., everything else passed through."""

    def __init__(self, real, timed: dict):
        self._real, self._timed = real, timed

    def __getattr__(self, name):
        return self._timed.get(name) or getattr(self._real, name)


def breakdown_pass(zoo_dir: Path, out_dir: Path) -> tuple[dict[str, dict[str, float]], dict]:
    """Per-student exclusive seconds per stage of a real, instrumented convert_many(verify=False)."""
    import importlib
    import threading

    per: dict[str, Counter] = defaultdict(Counter)
    inclusive_top: dict[str, float] = Counter()
    current = [None]
    local = threading.local()
    main = threading.main_thread()

    def timed(stage, fn):
        def wrapper(*a, **k):
            stack = getattr(local, "stack", None)
            if stack is None:
                stack = local.stack = []
            stack.append(0.0)  # time spent in wrapped children
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                elapsed = time.perf_counter() - t0
                children = stack.pop()
                if stack:
                    stack[-1] += elapsed
                name = current[0]
                key = stage if threading.current_thread() is main else stage + BACKGROUND
                per[name][key] += elapsed - children
                if not stack and stage in TOP_LEVEL:
                    inclusive_top[name] += elapsed

        wrapper.__wrapped__ = fn
        return wrapper

    clear_library_caches()  # before wrapping: a wrapper hides the cache_clear of what it wraps
    installed, missing, restore = [], [], []
    proxies: dict[str, dict] = defaultdict(dict)
    for mod_name, attr, stage in INSTRUMENT:
        mod = importlib.import_module(mod_name)
        if attr.startswith("nnx."):
            real = getattr(mod, "nnx", None)
            if real is None or not hasattr(real, attr[4:]):
                missing.append(f"{mod_name}.{attr}")
                continue
            proxies[mod_name][attr[4:]] = timed(stage, getattr(real, attr[4:]))
        elif hasattr(mod, attr):
            restore.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, timed(stage, getattr(mod, attr)))
        else:
            missing.append(f"{mod_name}.{attr}")
            continue
        installed.append(f"{mod_name}.{attr}")
    for mod_name, timed_fns in proxies.items():
        mod = importlib.import_module(mod_name)
        restore.append((mod, "nnx", mod.nnx))
        mod.nnx = _NnxProxy(mod.nnx, timed_fns)
    try:
        def on_start(i, n, src):
            current[0] = src.name

        wall, seconds = bulk_pass(zoo_dir, out_dir, on_start=on_start)
    finally:
        for mod, attr, orig in reversed(restore):
            setattr(mod, attr, orig)
    out = {}
    for name, secs in seconds.items():
        st = dict(per[name])
        st[BULK_OTHER] = max(0.0, secs - inclusive_top[name])
        out[name] = st
    return out, {"installed": installed, "missing": missing, "wall_s": round(wall, 3),
                 "per_student_sum_s": round(sum(seconds.values()), 4)}


def verify_pass(zoo_dir: Path, out_dir: Path, members: dict) -> dict:
    """One real convert_many(verify=True) over the zoo (library caches cleared first, as a fresh
    `kdd convert` process), with converters.verify.verify_conversion wrapped by a timer: what the
    check against PyTorch adds per student, split into the first student of each architecture (which
    pays the jit compile of the Flax side) and the repeats (which reuse it)."""
    import converters.verify as cv

    rows: list[dict] = []
    current = [None]
    orig = cv.verify_conversion

    def timed(result, **kw):
        t0 = time.perf_counter()
        rep = orig(result, **kw)
        rows.append({"student": current[0], "seconds": time.perf_counter() - t0, "ok": rep["ok"],
                     "float64_rerun_probes": len((rep["float64_arbiter"] or {}).get("probes", [])),
                     "float64_ok": (rep["float64_arbiter"] or {}).get("ok"),
                     "float64_max_logit_diff": (rep["float64_arbiter"] or {}).get("max_logit_diff"),
                     "float64_max_input_grad_rel_l2": (rep["float64_arbiter"] or {}).get("max_input_grad_rel_l2"),
                     "float64_seconds": (rep["float64_arbiter"] or {}).get("seconds", 0.0),
                     "max_abs_logit_diff": rep["max_abs_logit_diff"],
                     "input_grad_rel_l2": rep["input_grad_rel_l2"]})
        return rep

    def on_start(i, n, src):
        current[0] = src.name

    failures: list = []
    cv.verify_conversion = timed  # bulk imports it at call time, so the wrapper is what runs
    try:
        wall, seconds = bulk_pass(zoo_dir, out_dir, on_start=on_start, verify=True, failures=failures)
    finally:
        cv.verify_conversion = orig
    seen: set[str] = set()
    for r in rows:  # discovery order is the conversion order
        m = members[r["student"]]
        r |= {"variant": m["variant"], "family": m["family"], "dtype": m["dtype"],
              "first_of_architecture": m["variant"] not in seen}
        seen.add(m["variant"])

    def agg(sel):
        secs = [r["seconds"] for r in sel]
        return {"students": len(sel), "verify_s": round(sum(secs), 3),
                "median_s": round(statistics.median(secs), 4) if secs else None,
                "max_s": round(max(secs), 4) if secs else None}

    per_family = {}
    for fam in dict.fromkeys(r["family"] for r in rows):
        fr = [r for r in rows if r["family"] == fam]
        per_family[fam] = {"first": agg([r for r in fr if r["first_of_architecture"]]),
                           "repeat": agg([r for r in fr if not r["first_of_architecture"]])}
    return {
        "wall_s": round(wall, 3), "per_student_sum_s": round(sum(seconds.values()), 4),
        "verify_s": round(sum(r["seconds"] for r in rows), 3),
        "passed": sum(r["ok"] for r in rows), "students": len(rows),
        "failures": [{"student": n, "error": e} for n, e in failures],
        "arbitrated_students": sum(r["float64_rerun_probes"] > 0 for r in rows),
        "arbitrated_ok": sum(r["float64_ok"] is True for r in rows),
        "rerun_probes_histogram": {str(k): c for k, c in sorted(Counter(r["float64_rerun_probes"] for r in rows).items())},
        "float64_seconds": round(sum(r["float64_seconds"] for r in rows), 3),
        "float64_bound": cv.FLOAT64_RTOL,
        "float64_max_logit_diff": max((r["float64_max_logit_diff"] for r in rows if r["float64_ok"] is not None), default=None),
        "float64_max_input_grad_rel_l2": max((r["float64_max_input_grad_rel_l2"] for r in rows
                                              if r["float64_ok"] is not None), default=None),
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
        "max_input_grad_rel_l2": max(r["input_grad_rel_l2"] for r in rows),
        "first": agg([r for r in rows if r["first_of_architecture"]]),
        "repeat": agg([r for r in rows if not r["first_of_architecture"]]),
        "per_family": per_family,
        # 4 significant figures, not decimal places: a 3e-7 gradient difference must not print as 0.0
        "rows": [{k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }


# ----------------------------------------------------------------------------- experiments


def _first_per_config(students, members_by_dir) -> list:
    """One student per variant (= per distinct config), float32 where the variant has one."""
    by_variant: dict[str, list] = defaultdict(list)
    for s in students:
        by_variant[members_by_dir[s.name]["variant"]].append(s)
    return [next((s for s in group if members_by_dir[s.name]["dtype"] == F32), group[0]) for group in by_variant.values()]


def exp_config_cache(students, log, cache: dict | None = None) -> dict:
    """Convert the compute stages with (abstract_model, build_keymap) cached per config JSON."""
    from flax import nnx

    from converters.convert import _resolve_config
    from converters.keymap import apply_keymap, build_keymap
    from converters.student import read_tensors
    from kdd_jax.models import abstract_model

    cache = {} if cache is None else cache
    totals: Counter = Counter()
    hits = 0
    t_all = time.perf_counter()
    for src in students:
        t0 = time.perf_counter()
        tensors, _ = read_tensors(src)
        cfg, _, _ = _resolve_config(src, tensors, None)
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        t1 = time.perf_counter()
        if key in cache:
            hits += 1
            abstract, entries = cache[key]
        else:
            abstract = abstract_model(cfg)
            entries = build_keymap(abstract)
            cache[key] = (abstract, entries)
        t2 = time.perf_counter()
        pure, _ = apply_keymap(tensors, entries, str(src.weights))
        graphdef, state = nnx.split(abstract)  # a fresh State each time: the cached module stays abstract
        nnx.replace_by_pure_dict(state, pure)
        model = nnx.merge(graphdef, state)
        t3 = time.perf_counter()
        # correctness: the merged model holds this student's values, and the cache is still abstract
        got = nnx.to_pure_dict(nnx.state(model))
        e = entries[0]
        node_got, node_exp = got, pure
        for part in e.target:
            node_got, node_exp = node_got[part], node_exp[part]
        assert np.array_equal(np.asarray(node_got), np.asarray(node_exp)), "cached merge returned wrong values"
        leaf = nnx.to_pure_dict(nnx.state(abstract))
        for part in e.target:
            leaf = leaf[part]
        assert not isinstance(leaf, np.ndarray), "cached abstract model was mutated by merge"
        totals["read+config"] += t1 - t0
        totals["abstract+keymap (cached)"] += t2 - t1
        totals["apply_keymap+merge"] += t3 - t2
    wall = time.perf_counter() - t_all
    log(f"exp cache: {len(cache)} configs, {hits} hits, {sum(totals.values()):.2f} s")
    return {"students": len(students), "unique_configs": len(cache), "cache_hits": hits,
            "seconds": {k: round(v, 4) for k, v in totals.items()}, "wall_seconds_incl_checks": round(wall, 3)}


def exp_origin_msg(students, log) -> dict:
    """abstract_model per unique config, as is vs with jax's tracer error-message builder stubbed.

    flax's Variable.set_value does getattr(value, 'sharding', None); on a jaxpr tracer that raises
    AttributeError whose message is built eagerly by walking every equation traced so far
    (`_origin_msg` -> `find_progenitors`): quadratic in the model's size. Stubbed here only, then restored."""
    from converters.convert import _resolve_config
    from converters.student import read_tensors
    from jax._src.interpreters import partial_eval as pe
    from kdd_jax.models import abstract_model

    rows = []
    orig = pe.DynamicJaxprTracer._origin_msg
    for src in students:
        tensors, _ = read_tensors(src)
        cfg, _, _ = _resolve_config(src, tensors, None)
        times = {}
        for label, stub in (("as_is", False), ("origin_msg_stubbed", True)):
            if stub:
                pe.DynamicJaxprTracer._origin_msg = lambda self: ""
            try:
                t0 = time.perf_counter()
                abstract_model(cfg)
                times[label] = time.perf_counter() - t0
            finally:
                pe.DynamicJaxprTracer._origin_msg = orig
        rows.append({"student": src.name, **{k: round(v, 4) for k, v in times.items()}})
    log(f"exp origin_msg: {sum(r['as_is'] for r in rows):.2f} s -> {sum(r['origin_msg_stubbed'] for r in rows):.2f} s")
    return {"per_config": rows, "as_is_total": round(sum(r["as_is"] for r in rows), 3),
            "stubbed_total": round(sum(r["origin_msg_stubbed"] for r in rows), 3)}


def _two_step_hwio(a: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO as two cache-friendlier copies: (O, IHW).T, then move I past HW in O-wide rows."""
    o, i, h, w = a.shape
    x = np.ascontiguousarray(a.reshape(o, i * h * w).T)  # (I, H, W, O)
    return np.ascontiguousarray(x.reshape(i, h * w, o).transpose(1, 0, 2)).reshape(h, w, i, o)


def exp_transpose(files: list[Path], log) -> dict:
    """All float32 4-D kernels of the given files: plain copy vs the key map's transpose materialised
    naively (what numpy/orbax do with the transposed view) vs a two-step copy."""
    from kdd_jax.io import read_safetensors

    kernels = []
    for p in files:
        tensors, _ = read_safetensors(p)
        kernels += [np.array(v) for v in tensors.values() if v.ndim == 4 and v.dtype == np.float32]
    nbytes = sum(k.nbytes for k in kernels)

    def best(fn, n=3):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            for k in kernels:
                fn(k)
            times.append(time.perf_counter() - t0)
        return min(times)

    for k in kernels[:50]:
        assert np.array_equal(_two_step_hwio(k), k.transpose(2, 3, 1, 0))
    res = {
        "kernels": len(kernels), "bytes": nbytes,
        "memcpy_s": best(np.array),
        "naive_transpose_copy_s": best(lambda k: np.ascontiguousarray(k.transpose(2, 3, 1, 0))),
        "two_step_transpose_copy_s": best(_two_step_hwio),
        "isfinite_all_s": best(lambda k: np.isfinite(k).all()),
    }
    try:
        import torch

        res["torch_permute_contiguous_s"] = best(lambda k: torch.from_numpy(k).permute(2, 3, 1, 0).contiguous())
    except ImportError:
        pass
    log(f"exp transpose: {nbytes / MB:.0f} MB, naive {res['naive_transpose_copy_s']:.3f} s, two-step "
        f"{res['two_step_transpose_copy_s']:.3f} s, memcpy {res['memcpy_s']:.3f} s")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}


def exp_writers(students, work: Path, log) -> dict:
    """The same converted state written several ways (each to a fresh dir, durably where the
    library is durable). Per student: seconds; totals over the representative set."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from converters.convert import convert_student
    from kdd_jax.io import atomic_write_bytes, save_state, write_safetensors

    root = work / "writers"
    rows = []
    reused = ocp.StandardCheckpointer()
    try:
        for n, src in enumerate(students):
            result = convert_student(src)
            state = nnx.to_pure_dict(nnx.state(result.model))
            flat = {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): v
                    for path, v in jax.tree_util.tree_flatten_with_path(state)[0]}
            src_bytes = src.weights.stat().st_size
            contiguous = jax.tree.map(np.ascontiguousarray, state)
            out_bytes = sum(np.asarray(v).nbytes for v in flat.values())
            noncontig = sum(1 for v in flat.values() if not np.asarray(v).flags.c_contiguous)
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            os.sync()
            row = {"student": src.name, "source_bytes": src_bytes, "state_bytes": out_bytes,
                   "non_contiguous_leaves": noncontig, "leaves": len(flat)}

            def clock(label, fn):
                t0 = time.perf_counter()
                fn()
                row[label] = round(time.perf_counter() - t0, 4)

            clock("orbax save_state (as library)", lambda: save_state(root / f"a{n}", state))
            clock("orbax save_state, contiguous input", lambda: save_state(root / f"b{n}", contiguous))
            clock("make contiguous (numpy)", lambda: jax.tree.map(np.ascontiguousarray, state))

            def reuse():
                reused.save((root / f"c{n}").absolute(), contiguous)
                reused.wait_until_finished()

            clock("orbax, one reused checkpointer, contiguous", reuse)

            def packed():  # one flat float32 leaf (+ a small JSON index of names/shapes/offsets in a real design)
                save_state(root / f"p{n}", {"packed": np.concatenate([np.ascontiguousarray(v).reshape(-1) for v in flat.values()])})

            clock("orbax, state packed into ONE float32 leaf", packed)
            clock("safetensors file (write_safetensors, fsync)", lambda: write_safetensors(root / f"d{n}.safetensors", flat))
            blob = b"".join(np.ascontiguousarray(v).tobytes() for v in flat.values())
            clock("raw bytes + fsync (floor)", lambda: atomic_write_bytes(root / f"e{n}.bin", blob))
            rows.append(row)
            shutil.rmtree(root)
    finally:
        reused.close()
    keys = [k for k in rows[0] if k not in ("student", "source_bytes", "state_bytes", "non_contiguous_leaves", "leaves")]
    totals = {k: round(sum(r[k] for r in rows), 4) for k in keys}
    log("exp writers: " + ", ".join(f"{k} {v:.2f} s" for k, v in totals.items()))
    return {"per_student": rows, "totals": totals,
            "source_bytes": sum(r["source_bytes"] for r in rows), "state_bytes": sum(r["state_bytes"] for r in rows)}


def exp_floor(files: list[Path], bf16: set[Path], work: Path, repeats: int, log) -> dict:
    """What any converter must at least do, per file: the bare read, the float32 state bytes written
    durably (temp file + fsync + rename, as the library publishes), and the sha256 the report records."""
    from safetensors.numpy import load_file as np_load
    from safetensors.torch import load_file as torch_load

    from kdd_jax.io import atomic_write_bytes, sha256_file

    root = work / "floor"
    reps: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        os.sync()
        t = Counter()
        for i, p in enumerate(files):
            t0 = time.perf_counter()
            if p in bf16:
                data = {k: v.float().numpy() for k, v in torch_load(str(p)).items()}
            else:
                data = np_load(str(p))
            t1 = time.perf_counter()
            blob = b"".join(np.asarray(v, dtype=np.float32).tobytes() for k, v in data.items()
                            if not k.endswith(".num_batches_tracked"))
            t2 = time.perf_counter()
            atomic_write_bytes(root / f"{i}.bin", blob)
            t3 = time.perf_counter()
            sha256_file(p)
            t4 = time.perf_counter()
            t["read"] += t1 - t0
            t["float32 bytes (cast + join)"] += t2 - t1
            t["durable write (fsync)"] += t3 - t2
            t["sha256_file"] += t4 - t3
            del data, blob
        for k, v in t.items():
            reps[k].append(v)
    shutil.rmtree(root, ignore_errors=True)
    med = {k: round(statistics.median(v), 4) for k, v in reps.items()}
    log("exp floor: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
    return {"seconds": med, "repeats": repeats}


def _sha256_mmap(path: Path) -> str:
    """sha256 of a file in one hashlib call over a read-only mmap (no read() copies; one GIL release)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return hashlib.sha256(mm).hexdigest()


def exp_sha_overlap(students, log) -> dict:
    """sha256 of the source alone, abstract_model alone, both one after the other, and the hash in a
    thread meanwhile (hashlib releases the GIL on large buffers; abstract_model is Python-bound);
    for the library's chunked sha256_file and for one call over an mmap."""
    from concurrent.futures import ThreadPoolExecutor

    from converters.convert import _resolve_config
    from converters.student import read_tensors
    from kdd_jax.io import sha256_file
    from kdd_jax.models import abstract_model

    out = {}
    with ThreadPoolExecutor(1) as pool:
        for label, fn in (("sha256_file (4 MiB reads)", sha256_file), ("sha256 over mmap, one call", _sha256_mmap)):
            t = Counter()
            for src in students:
                tensors, _ = read_tensors(src)
                cfg, _, _ = _resolve_config(src, tensors, None)
                t0 = time.perf_counter()
                digest = fn(src.weights)
                t1 = time.perf_counter()
                abstract_model(cfg)
                t2 = time.perf_counter()
                fut = pool.submit(fn, src.weights)
                abstract_model(cfg)
                assert fut.result() == digest
                t3 = time.perf_counter()
                t["hash alone"] += t1 - t0
                t["abstract_model alone"] += t2 - t1
                t["overlapped (hash in a thread)"] += t3 - t2
            out[label] = {k: round(v, 4) for k, v in t.items()}
    log("exp sha overlap: " + "; ".join(f"{k}: {v}" for k, v in out.items()))
    return {"students": len(students), "seconds": out}


def exp_fast_path(students, cache: dict, bf16_names: set[str], work: Path, repeats: int, log) -> dict:
    """A state-only conversion, as a lower bound for a redesigned converter: key map cached per config
    (built by exp_config_cache; its one-off cost is reported there), the library's apply_keymap
    checks, kernels made contiguous with the two-step copy, ONE safetensors file written durably,
    sha256 of the source. No nnx graph operations and no orbax per student."""
    from converters.convert import _resolve_config
    from converters.keymap import apply_keymap
    from converters.student import read_tensors
    from kdd_jax.io import sha256_file, write_safetensors

    root = work / "fast"
    reps: list[Counter] = []
    per_student: list[dict[str, float]] = []
    bare_totals: list[float] = []
    bf16_paths = {s.weights for s in students if s.name in bf16_names}
    for _ in range(repeats):
        bare_totals.append(sum(bare_pass([s.weights for s in students], bf16_paths)))
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        os.sync()
        t = Counter()
        this = {}
        for src in students:
            c0 = time.perf_counter()
            tensors, _ = read_tensors(src)
            cfg, _, _ = _resolve_config(src, tensors, None)
            _, entries = cache[json.dumps(cfg.to_dict(), sort_keys=True)]
            c1 = time.perf_counter()
            pure, _ = apply_keymap(tensors, entries, str(src.weights))
            flat = {}
            for e in entries:
                node = pure
                for part in e.target:
                    node = node[part]
                flat[".".join(map(str, e.target))] = node
            c2 = time.perf_counter()
            # apply_keymap returns HWIO *views* of the OIHW source: undo the view, copy in two steps
            views = flat
            flat = {k: (_two_step_hwio(v.transpose(3, 2, 0, 1)) if v.ndim == 4 and not v.flags.c_contiguous
                        else np.ascontiguousarray(v)) for k, v in views.items()}
            c3 = time.perf_counter()
            write_safetensors(root / f"{src.name}.safetensors", flat)
            c4 = time.perf_counter()
            sha256_file(src.weights)
            c5 = time.perf_counter()
            t["read + config + cached key map"] += c1 - c0
            t["apply_keymap (checks, views, casts)"] += c2 - c1
            t["contiguous HWIO kernels (two-step)"] += c3 - c2
            t["write one safetensors file (fsync)"] += c4 - c3
            t["sha256_file"] += c5 - c4
            this[src.name] = c5 - c0
            if not reps:  # first pass, off the clock: the fast path wrote the same values
                assert all(np.array_equal(flat[k], views[k]) and flat[k].flags.c_contiguous for k in flat), src.name
        reps.append(t)
        per_student.append(this)
    shutil.rmtree(root, ignore_errors=True)
    totals = [sum(r.values()) for r in reps]
    mid = reps[totals.index(statistics.median(totals))] if repeats % 2 else reps[int(np.argsort(totals)[repeats // 2])]
    np_total = statistics.median(sum(v for n, v in r.items() if n not in bf16_names) for r in per_student)
    log(f"exp fast path: {statistics.median(totals):.2f} s")
    return {"seconds": {k: round(v, 4) for k, v in mid.items()}, "total_s": round(statistics.median(totals), 4),
            "bare_read_same_passes_s": round(statistics.median(bare_totals), 4),
            "numpy_readable_total_s": round(np_total, 4), "repeats": repeats, "students": len(students)}


def exp_versions_cost() -> dict:
    """versions() as a fresh process pays it (library caches cleared before each call) and when cached."""
    from kdd_jax.versions import versions

    cold, warm = [], []
    for _ in range(20):
        clear_library_caches()
        t0 = time.perf_counter()
        versions()
        t1 = time.perf_counter()
        versions()
        cold.append(t1 - t0)
        warm.append(time.perf_counter() - t1)
    return {"median_s": round(statistics.median(cold), 5), "second_call_median_s": round(statistics.median(warm), 6),
            "calls": len(cold)}


RESNET18_IMAGENET = {"format_version": 1, "family": "resnet",
                     "arch": {"block": "basic", "layers": [2, 2, 2, 2], "widths": [64, 128, 256, 512], "stem": "imagenet",
                              "num_classes": 1000},
                     "preprocessing": {"input_size": [224, 224], "channels": 3, "mean": [0.485, 0.456, 0.406],
                                       "std": [0.229, 0.224, 0.225]}}


def exp_float64_conv(reps, work: Path, log, probes: int = 2) -> dict:
    """The conversion check's float64 re-run (converters.verify: loss + input gradient of `probes`
    probes, both models upcast) with XLA's float64 convolution against the im2col matmul our layers
    use for float64 on XLA:CPU (kdd_jax/models/layers.py): seconds to compile + run, then to run
    again, and the largest relative difference of the input gradients. One distinct config per
    family of the zoo plus an ImageNet-size ResNet-18 (random weights), where the run dominates.
    Only convolutions above the library's per-sample size bound take im2col (none of ResNet-20's,
    some of DenseNet-BC-100's); depthwise ones take the library's CPU path in both arms. The arms
    run in a fixed order (XLA first): "first" differences under a second are noise."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.torch import save_file

    import kdd_jax.models.layers as layers
    from converters import convert_student
    from converters import verify as cv
    from converters.torch_reference import build_torch_model, randomize_

    d = work / "float64-resnet18-imagenet"
    if not (d / "model.safetensors").is_file():
        d.mkdir(parents=True, exist_ok=True)
        m = randomize_(build_torch_model(RESNET18_IMAGENET), 0)
        save_file({k: t.contiguous() for k, t in m.state_dict().items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(RESNET18_IMAGENET))
    sources = [("resnet18-imagenet (224x224, random)", d)]
    seen = set()
    for st in reps:
        fam = json.loads(st.config.read_text())["family"]
        if fam not in seen:
            seen.add(fam)
            sources.append((st.name, st.weights.parent))
    rows = []
    real = layers._NHWC_HWIO
    for name, path in sources:
        result = convert_student(path)
        graphdef, state = nnx.split(result.model)
        x = cv.probe_inputs(result.config, probes, 0).transpose(0, 2, 3, 1).astype(np.float64)
        w = np.random.default_rng(1).normal(size=(probes, result.config.arch.num_classes))
        row, grads = {"model": name}, {}
        for path_name, dn in (("lax", None), ("im2col", real)):
            layers._NHWC_HWIO = dn  # None never matches: XLA's own float64 convolution
            jax.clear_caches()
            try:
                with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
                    st64 = cv.float64_state(state)
                    times = []
                    for _ in range(2):
                        t0 = time.perf_counter()
                        _, g = cv._jax_loss_and_grad()(graphdef, jnp.asarray(x), st64, jnp.asarray(w))
                        g.block_until_ready()
                        times.append(time.perf_counter() - t0)
                    grads[path_name] = np.asarray(g)
            finally:
                layers._NHWC_HWIO = real
            row[f"{path_name}_first_s"], row[f"{path_name}_again_s"] = round(times[0], 3), round(times[1], 3)
        row["grad_max_rel_diff"] = float(f"{np.abs(grads['lax'] - grads['im2col']).max() / np.abs(grads['lax']).max():.3g}")
        rows.append(row)
        log(f"float64 conv paths, {name}: {row}")
    jax.clear_caches()
    return {"probes": probes, "rows": rows}


# ----------------------------------------------------------------------------- analysis


# display order: the order a student goes through them
_DISPLAY = ["read_safetensors", "config", "model_structure", "abstract_model", "build_keymap", "apply_keymap", "nnx split",
            "nnx.state", "sha256_file", "versions()", "convert_student", "orbax", "json writes", "save_converted"]


def stage_order(keys: set[str]) -> list[str]:
    stages = list(dict.fromkeys(stage for _, _, stage in INSTRUMENT))
    canonical = sorted(stages, key=lambda st: next((i for i, p in enumerate(_DISPLAY) if st.startswith(p)), len(_DISPLAY)))
    rank = {k: i for i, k in enumerate(canonical)}

    def key(k):
        base = k.removesuffix(BACKGROUND)
        return (rank.get(base, len(canonical) + (1 if k == BULK_OTHER else 0)), k.endswith(BACKGROUND), k)

    return sorted(keys, key=key)


def _fit_leaves(leaves: list[int], mbytes: list[float], y: list[float]) -> dict:
    """Least squares y = a + b leaves + c MB: fixed, per-state-leaf and per-MB seconds."""
    a = np.column_stack([np.ones(len(y)), np.asarray(leaves, float), np.asarray(mbytes, float)])
    coef, *_ = np.linalg.lstsq(a, np.asarray(y), rcond=None)
    pred = a @ coef
    ss_res, ss_tot = float(((np.asarray(y) - pred) ** 2).sum()), float(((np.asarray(y) - np.mean(y)) ** 2).sum())
    return {"fixed_s": round(float(coef[0]), 5), "s_per_leaf": round(float(coef[1]), 6),
            "s_per_state_MB": round(float(coef[2]), 6), "r2": round(1 - ss_res / ss_tot, 3) if ss_tot else None}


def _fit(x: list[float], y: list[float]) -> dict:
    """Least squares y = a + b x (x in MB): fixed seconds per checkpoint and seconds per MB."""
    xa, ya = np.asarray(x), np.asarray(y)
    b, a = np.polyfit(xa, ya, 1)
    return {"fixed_s_per_checkpoint": round(float(a), 5), "s_per_MB": round(float(b), 6),
            "MB_per_s_marginal": round(1 / b, 1) if b > 0 else None}


def summarise(manifest, files, names, bf16, bare_reps, bulk_reps, bulk_file_reps, breakdown_reps) -> dict:
    members = {m["dir"]: m for m in manifest["members"]}
    sizes = {n: members[n]["bytes"] for n in names}
    bare_file = {n: statistics.median(r[i] for r in bare_reps) for i, n in enumerate(names)}
    conv_file = {n: statistics.median(r[n] for r in bulk_file_reps) for n in names}
    total_bytes = sum(sizes.values())

    def row(label, subset, bare_s, conv_s):
        b = sum(sizes[n] for n in subset)
        return {"set": label, "files": len(subset), "MB": round(b / MB, 2),
                "bare_s": round(bare_s, 4), "bare_MB_s": round(b / MB / bare_s, 1),
                "conversion_s": round(conv_s, 4), "conversion_MB_s": round(b / MB / conv_s, 2),
                "ratio": round(conv_s / bare_s, 2)}

    np_names = [n for n in names if n not in bf16]
    bf_names = [n for n in names if n in bf16]
    bare_total = statistics.median(sum(r) for r in bare_reps)
    headline = [
        row("numpy-readable files (float32 + float16): HEADLINE", np_names,
            sum(bare_file[n] for n in np_names), sum(conv_file[n] for n in np_names)),
        row("all files, bulk wall clock (bfloat16 bare-read with safetensors.torch)", names,
            bare_total, statistics.median(bulk_reps)),
    ]
    if bf_names:
        headline.append(row("bfloat16 files only (bare = safetensors.torch)", bf_names,
                            sum(bare_file[n] for n in bf_names), sum(conv_file[n] for n in bf_names)))
    for dt in (F32, F16):
        sub = [n for n in names if members[n]["dtype"] == dt]
        if sub:
            headline.append(row(f"{dt} files only", sub, sum(bare_file[n] for n in sub), sum(conv_file[n] for n in sub)))

    per_family = []
    for fam in ("resnet", "vgg", "mobilenetv2", "densenet"):
        sub = [n for n in names if members[n]["family"] == fam]
        if sub:
            r = row(fam, sub, sum(bare_file[n] for n in sub), sum(conv_file[n] for n in sub))
            r["conversion_s_per_file"] = round(r["conversion_s"] / len(sub), 4)
            per_family.append(r)

    # stages: per student median over breakdown repeats, then summed
    stage_names = stage_order({k for r in breakdown_reps for st in r.values() for k in st})
    stage_file = {n: {s: statistics.median(r[n].get(s, 0.0) for r in breakdown_reps) for s in stage_names} for n in names}
    stage_tot = {s: sum(stage_file[n][s] for n in names) for s in stage_names}
    conv_total = sum(conv_file.values())
    bd_total = sum(v for k, v in stage_tot.items() if not k.endswith(BACKGROUND))
    stages = [{"stage": s, "seconds": round(stage_tot[s], 4),
               "share_of_breakdown": "overlapped" if s.endswith(BACKGROUND) else round(stage_tot[s] / bd_total, 4),
               "x_bare_read": round(stage_tot[s] / bare_total, 2),
               "per_file_ms": round(1000 * stage_tot[s] / len(names), 2)} for s in stage_names]

    def stage_sum(n, *needles):
        return sum(v for k, v in stage_file[n].items() if any(x in k for x in needles) and not k.endswith(BACKGROUND))

    shapes = {n: _state_shape(p) for n, p in zip(names, files)}
    lv = [shapes[n][0] for n in names]
    smb = [shapes[n][1] / MB for n in names]
    leaf_fits = {
        "conversion (bulk per file)": _fit_leaves(lv, smb, [conv_file[n] for n in names]),
        "model building + key map + nnx ops": _fit_leaves(
            lv, smb, [stage_sum(n, "abstract_model", "build_keymap", "model_structure", "nnx") for n in names]),
        "orbax save_state": _fit_leaves(lv, smb, [stage_sum(n, "orbax") for n in names]),
        "bare read": _fit_leaves(lv, smb, [bare_file[n] for n in names]),
    }
    per_family_stages = {}
    for fam in ("resnet", "vgg", "mobilenetv2", "densenet"):
        sub = [n for n in names if members[n]["family"] == fam]
        if sub:
            per_family_stages[fam] = {s: round(sum(stage_file[n][s] for n in sub), 4) for s in stage_names}

    per_file = [{"student": n, "variant": members[n]["variant"], "family": members[n]["family"],
                 "dtype": members[n]["dtype"], "bytes": sizes[n], "state_leaves": shapes[n][0],
                 "state_bytes": shapes[n][1], "bare_s": round(bare_file[n], 5),
                 "conversion_s": round(conv_file[n], 4),
                 "stages_s": {s: round(v, 5) for s, v in stage_file[n].items()}} for n in names]
    return {
        "headline": headline,
        "per_family": per_family,
        "repeats": {"bare_total_s": [round(sum(r), 4) for r in bare_reps], "bulk_wall_s": [round(x, 3) for x in bulk_reps]},
        "fits": {"bare": _fit([sizes[n] / MB for n in names], [bare_file[n] for n in names]),
                 "conversion": _fit([sizes[n] / MB for n in names], [conv_file[n] for n in names])},
        "breakdown": {"stages": stages, "total_s": round(bd_total, 4), "stage_order": stage_names,
                      "coverage_vs_bulk_per_file_sum": round(bd_total / conv_total, 3),
                      "bulk_per_file_sum_s": round(conv_total, 4), "per_family": per_family_stages,
                      "leaf_fits": leaf_fits, "state_leaves_total": sum(lv), "state_MB_total": round(sum(smb), 2)},
        "per_file": per_file,
        "total_MB": round(total_bytes / MB, 2),
    }


# ----------------------------------------------------------------------------- output


def _md_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    return head + "".join("| " + " | ".join(str(r.get(c[0], "")) for c in cols) + " |\n" for r in rows)


def render_markdown(res: dict) -> str:
    s, z, e = res["summary"], res["zoo"], res.get("experiments", {})
    hl = s["headline"][0]
    lines = [
        f"# Bulk conversion benchmark{' (QUICK smoke run: not representative)' if res['settings']['quick'] else ''}",
        "",
        f"Generated by `benchmarks/convert_bench.py` on {res['date']}. Numbers are measured, never asserted by tests.",
        "",
        "```",
        res["command"],
        "```",
        "",
        f"**Headline** ({hl['files']} float32/float16 checkpoints, {hl['MB']} MB): bare `safetensors.numpy.load_file` "
        f"**{hl['bare_MB_s']} MB/s**, `convert_many(verify=False)` incl. orbax write **{hl['conversion_MB_s']} MB/s**: "
        f"conversion costs **{hl['ratio']}x** the bare read (goal: <= 2x).",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {res['machine']['cpu_model']} ({res['machine']['usable_cpus']} usable of {res['machine']['logical_cpus']} logical), "
        f"{res['machine']['memory_gib']} GiB RAM, jax backend `{res['machine']['jax_backend']}`",
        f"- git: `{res['git']['commit']}`{' (dirty tree)' if res['git']['dirty'] else ''}; library sources "
        + ("unchanged during the run" if res["library_sources_sha256"]["start"] == res["library_sources_sha256"]["end"]
           else "**CHANGED during the run: numbers may mix two versions**")
        + f" (sha256 {res['library_sources_sha256']['start'][:12]})",
        f"- load average (1/5/15 min) at start {res['load_average_1_5_15']['start']}, at end "
        f"{res['load_average_1_5_15']['end']} (other work on these cores inflates and scatters the timings)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
        f"- settings: warm-up pass + {res['settings']['repeats']} repeats (medians reported), breakdown passes: "
        f"{res['settings']['breakdown_repeats']}; page cache warmed by reading every file once before any timing; "
        "`os.sync()` before each conversion pass (outside the clock); output written to the same disk as the zoo.",
        "",
        "## Zoo",
        "",
        f"{z['count']} checkpoints, {z['total_MB']} MB, " + ", ".join(f"{k}: {v}" for k, v in z["per_family"].items())
        + "; dtypes " + ", ".join(f"{k}: {v}" for k, v in z["per_dtype"].items())
        + ". Built with torch from `converters.torch_reference` (randomised weights and BN statistics, fixed seeds); "
        + ("reused from the --work cache." if z["reused"] else f"built in {z['build_s']} s."),
        "",
        _md_table(z["variants"], [("variant", "variant"), ("family", "family"), ("count", "count"), ("dtypes", "dtypes"),
                                  ("MB_each", "MB each (f32)"), ("parameters", "parameters")]),
        "## Throughput (medians)",
        "",
        "bfloat16: `safetensors.numpy` cannot read BF16 (numpy has no bfloat16), so those files are bare-read with "
        "`safetensors.torch.load_file` and excluded from the headline row. Per-set conversion seconds are the sums of "
        "the per-student seconds `convert_many` reports; the 'all files' row uses the bulk wall clock.",
        "",
        _md_table(s["headline"], [("set", "set"), ("files", "files"), ("MB", "MB"), ("bare_s", "bare s"),
                                  ("bare_MB_s", "bare MB/s"), ("conversion_s", "conversion s"),
                                  ("conversion_MB_s", "conversion MB/s"), ("ratio", "ratio conv/bare")]),
        "Per family:",
        "",
        _md_table(s["per_family"], [("set", "family"), ("files", "files"), ("MB", "MB"), ("bare_MB_s", "bare MB/s"),
                                    ("conversion_MB_s", "conversion MB/s"), ("conversion_s_per_file", "conversion s/file"),
                                    ("ratio", "ratio")]),
        "Linear fit per file, seconds = fixed + MB x slope: "
        f"bare {s['fits']['bare']['fixed_s_per_checkpoint']} s + {s['fits']['bare']['s_per_MB']} s/MB; "
        f"conversion {s['fits']['conversion']['fixed_s_per_checkpoint']} s + {s['fits']['conversion']['s_per_MB']} s/MB.",
        "",
        f"Repeats: bare totals {s['repeats']['bare_total_s']} s; bulk wall {s['repeats']['bulk_wall_s']} s.",
        "",
        "## Where the conversion time goes",
        "",
        f"The real `convert_many(verify=False)` run once more over the same zoo with the library functions it calls "
        f"wrapped by timers (exclusive time per stage, per student, median over {res['settings']['breakdown_repeats']} "
        f"pass(es), summed; wrapped: {len(res['instrumentation']['installed'])} names"
        + (f", not found: {', '.join(res['instrumentation']['missing'])}" if res["instrumentation"]["missing"] else "")
        + "). Stages add up to the instrumented run's per-student total, "
        f"{s['breakdown']['total_s']} s, which is {s['breakdown']['coverage_vs_bulk_per_file_sum']:.0%} of the "
        f"uninstrumented median ({s['breakdown']['bulk_per_file_sum_s']} s): instrumentation overhead plus run-to-run "
        "noise. Work in a background thread overlaps the main thread and is not added in. "
        "'x bare' = stage seconds / bare read of all files.",
        "",
        _md_table(s["breakdown"]["stages"], [("stage", "stage"), ("seconds", "seconds"), ("share_of_breakdown", "share"),
                                             ("per_file_ms", "ms/file"), ("x_bare_read", "x bare")]),
    ]
    fam_rows = [{"stage": st, **{f: v[st] for f, v in s["breakdown"]["per_family"].items()}} for st in s["breakdown"]["stage_order"]]
    fams = list(s["breakdown"]["per_family"])
    lines += ["Per family (seconds):", "", _md_table(fam_rows, [("stage", "stage")] + [(f, f) for f in fams])]
    fit_rows = [{"what": k, **v} for k, v in s["breakdown"]["leaf_fits"].items()]
    lines += [f"Per-file seconds fitted as fixed + per state leaf + per MB of float32 state (least squares over all "
              f"{res['zoo']['count']} files; {s['breakdown']['state_leaves_total']} leaves, "
              f"{s['breakdown']['state_MB_total']} MB of state in total):", "",
              _md_table(fit_rows, [("what", "per-file seconds of"), ("fixed_s", "fixed s"), ("s_per_leaf", "s/leaf"),
                                   ("s_per_state_MB", "s/MB"), ("r2", "R^2")])]
    v = res.get("verification")
    if v:
        conv_med = statistics.median(s["repeats"]["bulk_wall_s"])
        fam_rows = [{"family": f, "first_n": d["first"]["students"], "first_med": d["first"]["median_s"],
                     "repeat_n": d["repeat"]["students"], "repeat_med": d["repeat"]["median_s"] or "-",
                     "total": round(d["first"]["verify_s"] + d["repeat"]["verify_s"], 3)}
                    for f, d in v["per_family"].items()]
        lines += [
            "## Verification against PyTorch (`verify=True`, the `kdd convert` default)",
            "",
            f"One `convert_many(verify=True)` pass over the same zoo (library caches cleared first, as a fresh process): "
            f"**{v['wall_s']} s** wall against {conv_med:.2f} s without the check (median above). The check itself "
            f"(`converters.verify.verify_conversion`: PyTorch reference forward + input gradient, the jitted Flax side at "
            f"`highest` precision, 8 probes) took {v['verify_s']} s in all: {v['first']['verify_s']} s for the first "
            f"student of each of {v['first']['students']} architectures (median {v['first']['median_s']} s; it pays "
            f"the jit compile) and {v['repeat']['verify_s']} s for the {v['repeat']['students']} repeats (median "
            f"{v['repeat']['median_s']} s). {v['passed']}/{v['students']} passed. {v['arbitrated_students']} had "
            f"probes failing the float32 gradient bound (students by number of such probes: {v['rerun_probes_histogram']}) and had those "
            f"probes re-run in float64, which passed {v['arbitrated_ok']} of them, with at most "
            f"{v['float64_max_logit_diff'] or 0:.1g} logit and {v['float64_max_input_grad_rel_l2'] or 0:.1g} gradient "
            f"difference (bound {v['float64_bound']:g}: float32 ReLU kink flips, not conversion errors); the float64 "
            f"re-runs (XLA:CPU's own float64 convolution is slow; the library runs large ones as im2col matmuls: last experiment below) took {v['float64_seconds']} s of the check's time, "
            f"counted in the per-student times of the students re-run, first of their architecture or repeat. "
            f"Largest float32 absolute logit difference {v['max_abs_logit_diff']:.2g}, largest input-gradient "
            f"relative L2 difference (all probes together) {v['max_input_grad_rel_l2']:.2g}.",
            "",
            *([f"**Failed** ({len(v['failures'])}):", ""] + [f"- `{f['student']}`: {f['error']}" for f in v["failures"]]
              + [""] if v.get("failures") else []),
            _md_table(fam_rows, [("family", "family"), ("first_n", "architectures"), ("first_med", "first, median s"),
                                 ("repeat_n", "repeats"), ("repeat_med", "repeat, median s"), ("total", "verify s")]),
        ]
    if e:
        lines += ["## Experiments (measured on the same files; the library is unchanged)", ""]
        if "floor" in e:
            f = e["floor"]["seconds"]
            bare_all = s["headline"][1]["bare_s"]
            fl = f["read"] + f["durable write (fsync)"] + f["sha256_file"]
            lines += [f"- **Floor** (all {res['zoo']['count']} files, median of {e['floor']['repeats']}): bare read {f['read']} s, "
                      f"durable write of the float32 state bytes (temp file, fsync, rename) {f['durable write (fsync)']} s, "
                      f"sha256 of the source {f['sha256_file']} s: {fl:.3f} s = **{fl / f['read']:.2f}x the bare read of "
                      f"the same pass** ({(fl - f['sha256_file']) / f['read']:.2f}x without the hash; "
                      f"{fl / bare_all:.2f}x against the headline bare read); building the float32 byte string "
                      f"(cast + join, avoidable with a streaming writer) took another {f['float32 bytes (cast + join)']} s. "
                      "A converter that writes the float32 state durably and hashes its source cannot go below this here."]
        if "config_cache" in e:
            c = e["config_cache"]
            st = {r["stage"]: r["seconds"] for r in s["breakdown"]["stages"]}
            lines += [f"- **Per-config cache of abstract_model + build_keymap**: {c['unique_configs']} distinct configs among "
                      f"{c['students']} students ({c['cache_hits']} hits): abstract_model + build_keymap "
                      f"{c['seconds']['abstract+keymap (cached)']} s with the cache vs "
                      f"{sum(v for k, v in st.items() if k.startswith(('abstract_model', 'build_keymap', 'model_structure'))):.2f} s "
                      "in the breakdown (the library's own caching, if any, included); "
                      f"the other compute stages with the cache: read+config {c['seconds']['read+config']} s, "
                      f"apply_keymap+merge {c['seconds']['apply_keymap+merge']} s (a fresh nnx.split per student; "
                      "checked: values right, cached model still abstract)."]
        if "fast_path" in e:
            fp = e["fast_path"]
            hl0, all0 = s["headline"][0], s["headline"][1]
            lines += [f"- **State-only fast path** (all {fp['students']} students, median of {fp['repeats']}; key map cached "
                      "per config, the library's apply_keymap checks, two-step kernel transposes, one safetensors file "
                      f"written durably, sha256; no nnx graph ops, no orbax): {fp['total_s']} s = "
                      f"**{fp['total_s'] / fp['bare_read_same_passes_s']:.2f}x** the bare read of all files measured in the "
                      f"same passes ({fp['bare_read_same_passes_s']} s; {fp['total_s'] / all0['bare_s']:.2f}x against the "
                      f"headline bare read); numpy-readable files {fp['numpy_readable_total_s']} s = "
                      f"{fp['numpy_readable_total_s'] / hl0['bare_s']:.2f}x the headline bare read. Parts: "
                      + ", ".join(f"{k} {v} s" for k, v in fp["seconds"].items())
                      + ". Plus the one-off key-map builds per distinct config (cache line below)."]
        if "origin_msg" in e:
            o = e["origin_msg"]
            lines += [f"- **abstract_model's tracer error messages**: one build per distinct config takes {o['as_is_total']} s; "
                      f"with jax's `DynamicJaxprTracer._origin_msg` stubbed (diagnostic only) {o['stubbed_total']} s. "
                      "flax's `Variable.set_value` calls `getattr(value, 'sharding', None)`, and on a tracer the "
                      "AttributeError message is built by walking all equations traced so far."]
        if "transpose" in e:
            t = e["transpose"]
            lines += [f"- **Kernel transpose OIHW->HWIO** ({t['kernels']} float32 kernels, {t['bytes'] / MB:.0f} MB): memcpy "
                      f"{t['memcpy_s']} s, naive transposed copy {t['naive_transpose_copy_s']} s, two-step copy "
                      f"{t['two_step_transpose_copy_s']} s"
                      + (f", torch permute().contiguous() {t['torch_permute_contiguous_s']} s" if "torch_permute_contiguous_s" in t else "")
                      + f"; isfinite().all() {t['isfinite_all_s']} s."]
        if "sha_overlap" in e:
            o = e["sha_overlap"]
            lines += [f"- **sha256 of the source overlapped with abstract_model** ({o['students']} students, seconds): "
                      + "; ".join(f"{k}: " + ", ".join(f"{kk} {vv}" for kk, vv in v.items()) for k, v in o["seconds"].items())
                      + "."]
        if "versions" in e:
            lines += [f"- **versions()** costs {e['versions']['median_s'] * 1000:.1f} ms uncached (importlib.metadata), "
                      f"{e['versions']['second_call_median_s'] * 1000:.2f} ms on a second call (the library may cache it); "
                      "it is called once per student."]
        if "writers" in e:
            w = e["writers"]
            lines += ["", f"State writers, one student per distinct config ({len(w['per_student'])} students, "
                      f"{w['source_bytes'] / MB:.0f} MB source, {w['state_bytes'] / MB:.0f} MB float32 state), total seconds:", ""]
            lines += [_md_table([{"writer": k, "seconds": v} for k, v in w["totals"].items()], [("writer", "writer"), ("seconds", "seconds")])]
        if "float64_conv" in e:
            f = e["float64_conv"]
            lines += ["", f"Float64 re-run of the conversion check ({f['probes']} probes: loss and input gradient, both models "
                      "upcast), with XLA:CPU's own float64 convolution (a slow reference loop) against the im2col matmul "
                      "the library's layers use for float64 on XLA:CPU; seconds to compile and run, then to run again:", ""]
            lines += [_md_table(f["rows"], [("model", "model"), ("lax_first_s", "XLA conv: first"),
                                            ("lax_again_s", "XLA conv: again"), ("im2col_first_s", "im2col: first"),
                                            ("im2col_again_s", "im2col: again"),
                                            ("grad_max_rel_diff", "gradient max rel. difference")])]
    lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "convert",
                    help="cache for the zoo and scratch output (default: benchmarks/_work/convert, git-ignored)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results directory")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats after the warm-up (default 3; 1 with --quick)")
    ap.add_argument("--breakdown-repeats", type=int, default=1, help="instrumented per-stage passes (default 1)")
    ap.add_argument("--quick", action="store_true", help="a 6-checkpoint zoo of tiny models: a smoke test, not a benchmark")
    ap.add_argument("--no-experiments", action="store_true", help="skip the speed-up experiments")
    ap.add_argument("--no-verify", action="store_true", help="skip the verify=True pass (needs torch)")
    args = ap.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1 or args.breakdown_repeats < 1:
        ap.error("--repeats and --breakdown-repeats must be >= 1")
    t_start = time.perf_counter()
    git_start, fp_start, load_start = git_info(), library_fingerprint(), os.getloadavg()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    # the exact command: interpreter + script + arguments as given (or as passed to main())
    command = shlex.join([sys.executable, *(sys.argv if argv is None else ["benchmarks/convert_bench.py", *argv])])
    zoo_spec = QUICK_ZOO if args.quick else FULL_ZOO
    work = args.work.absolute()
    zoo_dir = work / ("zoo-quick" if args.quick else "zoo")
    out_dir = work / "out"
    manifest = build_zoo(zoo_spec, zoo_dir, log)
    members = {m["dir"]: m for m in manifest["members"]}

    from converters.student import discover

    students = discover([zoo_dir])
    names = [s.name for s in students]
    files = [s.weights for s in students]
    assert set(names) == set(members), "zoo directory and manifest disagree"
    bf16 = {s.weights for s in students if "BF16" in _header_dtypes(s.weights)}
    bf16_names = {s.name for s in students if s.weights in bf16}

    warm_s = warm_page_cache(files)
    log(f"page cache warmed ({sum(m['bytes'] for m in members.values()) / MB:.0f} MB in {warm_s:.2f} s)")
    bare_reps, bulk_reps, bulk_file_reps = [], [], []
    for r in range(repeats + 1):
        label = "warm-up" if r == 0 else f"repeat {r}/{repeats}"
        gc.collect()
        bare = bare_pass(files, bf16)
        wall, per_file = bulk_pass(zoo_dir, out_dir)
        log(f"{label}: bare {sum(bare):.3f} s, bulk conversion {wall:.2f} s")
        if r > 0:
            bare_reps.append(bare)
            bulk_reps.append(wall)
            bulk_file_reps.append(per_file)
    breakdown_reps, instrumentation = [], {}
    for r in range(args.breakdown_repeats):
        per, instrumentation = breakdown_pass(zoo_dir, out_dir)
        breakdown_reps.append(per)
        log(f"breakdown pass {r + 1}/{args.breakdown_repeats}: {instrumentation['wall_s']:.2f} s"
            + (f" (not found, so not timed separately: {instrumentation['missing']})" if instrumentation["missing"] else ""))

    summary = summarise(manifest, files, names, bf16_names, bare_reps, bulk_reps, bulk_file_reps, breakdown_reps)
    verification = None
    if not args.no_verify:
        verification = verify_pass(zoo_dir, out_dir, members)
        log(f"verification pass: {verification['wall_s']:.2f} s wall, check {verification['verify_s']:.2f} s, "
            f"{verification['passed']}/{verification['students']} passed")

    experiments = {}
    if not args.no_experiments:
        reps = _first_per_config(students, members)
        cache: dict = {}
        experiments["config_cache"] = exp_config_cache(students, log, cache)
        experiments["fast_path"] = exp_fast_path(students, cache, bf16_names, work, repeats, log)
        experiments["origin_msg"] = exp_origin_msg(reps, log)
        experiments["transpose"] = exp_transpose([s.weights for s in reps if members[s.name]["dtype"] == F32], log)
        experiments["versions"] = exp_versions_cost()
        experiments["floor"] = exp_floor([s.weights for s in students], bf16, work, repeats, log)
        experiments["sha_overlap"] = exp_sha_overlap(reps, log)
        experiments["writers"] = exp_writers(reps, work, log)
        if not args.no_verify:
            experiments["float64_conv"] = exp_float64_conv(reps, work, log)

    variants = []
    for v in zoo_spec:
        ms = [m for m in manifest["members"] if m["variant"] == v.name]
        f32 = [m["bytes"] for m in ms if m["dtype"] == F32] or [m["bytes"] for m in ms]
        variants.append({"variant": v.name, "family": v.family, "count": len(ms),
                         "dtypes": ", ".join(f"{k} x{c}" for k, c in Counter(m["dtype"] for m in ms).items()),
                         "MB_each": round(f32[0] / MB, 2), "parameters": ms[0]["parameters"]})
    zoo = {
        "dir": str(zoo_dir), "count": len(names), "total_MB": summary["total_MB"],
        "per_family": dict(Counter(m["family"] for m in manifest["members"])),
        "per_dtype": dict(Counter(m["dtype"] for m in manifest["members"])),
        "variants": variants, "reused": manifest.get("reused", False), "build_s": manifest.get("build_seconds"),
        "spec_sha256": hashlib.sha256(json.dumps(manifest["spec"], sort_keys=True).encode()).hexdigest(),
        # identical across rebuilds when torch's RNG streams are (fixed seeds, same torch version)
        "files_sha256": hashlib.sha256("".join(m["sha256"] for m in manifest["members"]).encode()).hexdigest(),
    }
    notes = [
        "Bare read = `safetensors.numpy.load_file(path)` (the whole file into numpy arrays), per file, from a warm page "
        "cache. Conversion = `converters.bulk.convert_many([zoo], out, verify=False)`: discovery, strict safetensors "
        "validation, config parse, abstract model, key map, layout transforms + float32 cast + finiteness checks, "
        "sha256 of the source, conversion report, orbax state + config.json + report published atomically.",
        "MB/s are source bytes (1 MB = 1e6 bytes) per second; float16/bfloat16 sources become float32 state "
        "(twice the bytes written).",
        "The library's own caches (functools caches in kdd_jax.*/converters.*, listed in the JSON) are cleared "
        "before every conversion pass, so each pass pays what a fresh `kdd convert` process pays; the warm-up pass "
        "warms jax's internal caches only.",
        "The stage breakdown times the real code through wrappers around the names it calls. read_safetensors only "
        "maps the file: tensor bytes are touched later (apply_keymap's casts and isfinite, the orbax write), so copy "
        "costs show up there.",
        "Experiments measure alternatives on the same files without changing the library; the tracer-message stub is "
        "a diagnostic, not a proposed patch to jax.",
        f"Total benchmark wall time {time.perf_counter() - t_start:.0f} s.",
    ]
    res = {
        "kind": BENCH_KIND,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "cwd": os.getcwd(),
        "git": git_start | {"at_end": git_info()},
        "library_sources_sha256": {"start": fp_start, "end": library_fingerprint()},
        "load_average_1_5_15": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "machine": machine_info(),
        "versions": all_versions(),
        "settings": {"repeats": repeats, "breakdown_repeats": args.breakdown_repeats, "quick": args.quick,
                     "work": str(work), "page_cache_warm_s": round(warm_s, 3), "verify": False,
                     "verify_pass": not args.no_verify},
        "zoo": zoo,
        "instrumentation": instrumentation | {"caches_cleared_before_each_pass": clear_library_caches()},
        "summary": summary,
        "verification": verification,
        "experiments": experiments,
        "notes": notes,
    }
    from benchmarks.provenance import finite_or_null  # strict JSON: a non-finite number is null
    from kdd_jax.io import atomic_write_bytes  # a killed run leaves the previous result files whole

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "convert_bench_quick" if args.quick else "convert_bench"
    atomic_write_bytes(args.out / f"{stem}.json", (json.dumps(finite_or_null(res), indent=1, allow_nan=False) + "\n").encode())
    atomic_write_bytes(args.out / f"{stem}.md", render_markdown(res).encode())
    hl = summary["headline"][0]
    log(f"bare {hl['bare_MB_s']} MB/s, conversion {hl['conversion_MB_s']} MB/s, ratio {hl['ratio']}x "
        f"-> {args.out / stem}.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
