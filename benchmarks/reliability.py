#!/usr/bin/env python
"""Reliability and security campaign: hostile files, a flaky teacher API, SIGKILLed runs,
processes sharing one cache, determinism. Counts what it tried and publishes the figures.

    python benchmarks/reliability.py                          # full campaign (10-13 min on 2 shared cores)
    python benchmarks/reliability.py --quick --out /tmp/rel   # smoke run (~3 min)
    python benchmarks/reliability.py --parts fuzz,faults      # a subset (fuzz faults kills concurrency determinism)

Parts (sizes: see FULL / QUICK and the flags):
  fuzz         Random and mutated inputs for every reader of untrusted bytes, each target in its
               own worker process (a hard crash is counted, and its input kept): the safetensors
               reader, config.json, the teachers file (JSON and YAML), `kdd serve` request bodies
               (over loopback), teacher API answers (the HTTP client's parser), whole students
               through the converter (safetensors + config mutations, tricky names, an output
               folder holding symlinks), and pickles that run code when unpickled. Outcomes:
               accepted / our clear error (CheckpointError, ConfigError, ConversionError,
               TeacherError, an HTTP 4xx with a JSON error) / crash (anything else: another
               exception, a 5xx, a dropped connection, a dead worker, an input taking over
               --input-timeout s, memory above 256 KiB + 32 x the file size for the safetensors
               reader, an accepted file whose arrays differ from what its header declares, a
               write outside the output folder, a pickle payload that ran).
  faults       A fault-injecting OIP v2 server (tests/fault_server.py) in front of the HTTP
               client (kdd_jax/teachers/http.py) + response cache. (a) Per fault kind, trials
               with 1-2 faults at random requests; the documented outcome is checked (retried,
               reported, or answered late), then a fault-free re-run on the same cache. (b)
               Whole detections (tests/toyzoo.py's zoo, two HTTP teachers) with faults drawn at
               random per request, re-run after every reported fault until complete. Checked:
               no probe answered twice, every answer received cached exactly once, no wrong
               answer cached, query budget never exceeded, final verdict == fault-free verdict.
  kills        SIGKILL of `kdd detect` and `kdd audit` (subprocesses; teachers are two HTTP
               teachers served on loopback by kdd serve's OipServer with a wrapper that logs the
               cache key of every row it answers) at a random time or at a random teacher
               request (just before or just after answering it), then the same command again.
               Counted: queries repeated (a row answered in the re-run whose answer was already
               in the cache when the process died: goal 0), answers lost (cached at the kill,
               missing after: goal 0), cache integrity (PRAGMA integrity_check), re-runs that
               fail (crash), verdicts != an uninterrupted run's. Also counted, not a goal: rows
               the server had answered but the killed process had not stored yet (in flight).
  concurrency  (a) P `kdd detect` processes at once on one cache directory (pairs with equal
               seeds ask the same probes at the same time); (b) P library processes hammering one
               cache with random overlapping queries while one of them is SIGKILLed per round.
               Checked: integrity, answers lost, wrong values, verdicts, and probes paid twice
               (each writer's teacher logs what it is asked; goal 0 among live processes).
  determinism  `kdd detect` twice with one seed (probe sha256 and verdict identical), another
               seed (differs), 1 vs 8 forced CPU devices (XLA_FLAGS in a subprocess: verdict
               within rtol 1e-5), with and without the persistent compilation cache.

The CLI runs use a persistent JAX compilation cache in --work (it makes a run ~5 s instead of
~15 s; determinism checks that it changes nothing). Results: <out>/reliability.{md,json}.
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime
import json
import math
import os
import random
import shlex
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BENCH_KIND = "kdd_jax.benchmark.reliability"
PARTS = ("fuzz", "faults", "kills", "concurrency", "determinism")
FUZZ_TARGETS = ("safetensors", "config", "teachers", "serve", "answers", "convert", "pickle")

FULL = {  # 10-13 minutes on 2 shared cores
    "fuzz": {"safetensors": 4000, "config": 3000, "teachers": 3000, "serve": 1500, "answers": 4000, "convert": 150,
             "pickle": 48},
    "fault_trials": 8, "mixed_runs": 8, "fault_p": 0.2,
    "kills_detect": 16, "kills_audit": 12,
    "conc_cli": 4, "conc_cli_rounds": 2, "conc_procs": 4, "conc_rounds": 4, "conc_seconds": 4.0,
}
QUICK = {
    "fuzz": {"safetensors": 300, "config": 300, "teachers": 300, "serve": 150, "answers": 300, "convert": 20,
             "pickle": 8},
    "fault_trials": 2, "mixed_runs": 2, "fault_p": 0.2,
    "kills_detect": 3, "kills_audit": 2,
    "conc_cli": 2, "conc_cli_rounds": 1, "conc_procs": 3, "conc_rounds": 2, "conc_seconds": 2.0,
}
DETECT = ["--probes", "48", "--steps", "30"]  # kill / determinism runs: tiny, but every stage runs
AUDIT = ["--probes", "32", "--steps", "20"]
HTTP_BATCH = 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =============================================================================== fuzz: inputs

EDGE_NUMBERS = [0, -1, 1, 2, 7, 2**31, 2**32 + 1, 2**53 + 1, 2**63, 2**64, 10**30, 10**400, -(10**30), 1e308, 1.5, -0.0,
                float("nan"), float("inf"), float("-inf"), 5e-324]
TRICK_STRINGS = ["", ".", "..", "../../../etc/passwd", "/etc/passwd", "C:\\Windows\\win.ini", "a/b", "a\\b", "nul\x00byte",
                 "\u202egnp.exe", "\ud800", "\u00e9\u00e8", "\U0001f642", "A" * 5000, "__metadata__", "con", "%2e%2e%2f",
                 "~", "$HOME", "'; DROP TABLE responses; --", "\n\r\t", "probs", "logits", "http://127.0.0.1:1"]


def rand_scalar(rng: random.Random):
    r = rng.random()
    if r < 0.35:
        return rng.choice(EDGE_NUMBERS)
    if r < 0.6:
        return rng.choice(TRICK_STRINGS)
    if r < 0.75:
        return rng.choice([True, False, None])
    if r < 0.9:
        return rng.randint(-5, 64)
    return rng.uniform(-2, 2)


def rand_json(rng: random.Random, depth: int = 0):
    if depth > 3 or rng.random() < 0.55:
        return rand_scalar(rng)
    if rng.random() < 0.5:
        return [rand_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {rng.choice(TRICK_STRINGS[:8] + ["name", "shape", "data", "k", "x"]): rand_json(rng, depth + 1)
            for _ in range(rng.randint(0, 5))}


def dumps(obj) -> bytes:
    """JSON as Python writes it: NaN/Infinity literals, lone surrogates escaped."""
    return json.dumps(obj, allow_nan=True).encode()


def deep_json(rng: random.Random) -> bytes:
    k = rng.choice([50, 2000, 100_000])
    return rng.choice([b"[" * k + b"]" * k, b'{"a":' * k + b"1" + b"}" * k, b"[" * k])


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def mutate_doc(rng: random.Random, doc, focus=None):
    """A copy of a JSON document with 1-3 random edits (replace a value with an edge value or
    random JSON, delete a key, add an unknown key, wrap a value in a list)."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(doc) if p and (focus is None or p[0] in focus)] or [p for p in _paths(doc) if p]
        if not paths:
            return rand_json(rng)
        path = rng.choice(paths)
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        op = rng.random()
        if op < 0.55:
            parent[key] = rand_scalar(rng)
        elif op < 0.7:
            parent[key] = rand_json(rng)
        elif op < 0.8 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.9 and isinstance(parent, dict):
            parent[rng.choice(TRICK_STRINGS)] = rand_scalar(rng)
        else:
            parent[key] = [parent[key]] * rng.randint(0, 3)
    return doc


def mutate_bytes(rng: random.Random, blob: bytes, lo: int = 0) -> bytes:
    b = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        if len(b) <= lo + 1:
            break
        i = rng.randrange(lo, len(b))
        op = rng.randrange(6)
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice([0, 0x20, 0x22, 0x2C, 0x2D, 0x30, 0x39, 0x5B, 0x5D, 0x7B, 0x7D, 0xFF, 0x80, rng.randrange(256)])
        elif op == 2:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:
            del b[i : i + rng.randint(1, 8)]
        elif op == 4:
            del b[i:]
        else:
            j = rng.randrange(lo, len(b))
            b[j:j] = b[i : i + rng.randint(1, 32)]
    return bytes(b)


class Violation(Exception):
    """An invariant broken by an input that was otherwise handled (counted as a crash)."""


# ---- safetensors ---------------------------------------------------------------------------

def st_blob(entries: list[tuple[str, str, list, bytes]], metadata=None, pad: int = 0) -> bytes:
    header, data, off = {}, b"", 0
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(h)) + h + data


def st_bases(np_rng) -> list[bytes]:
    from safetensors.numpy import save

    f32 = np_rng.normal(size=(3, 4)).astype(np.float32)
    return [
        save({"conv.weight": np_rng.normal(size=(2, 3, 2, 2)).astype(np.float16), "fc.weight": f32,
              "bn.num_batches_tracked": np.array(7, np.int64)}, metadata={"format": "pt"}),
        st_blob([("a", "BF16", [5], np_rng.integers(0, 255, 10, dtype=np.uint8).tobytes()),
                 ("b", "F32", [2, 2], f32[:1].tobytes()), ("empty", "F64", [0, 3], b""),
                 ("mask", "BOOL", [3], b"\x00\x01\x00")], metadata={"k": "v"}),
        st_blob([("x", "U8", [4], b"abcd"), ("y", "I32", [1], b"\x01\x00\x00\x00")], pad=7),
    ]


def gen_safetensors(rng: random.Random, ctx) -> tuple[str, bytes]:
    bases = ctx["bases"]
    base = rng.choice(bases)
    (n,) = struct.unpack("<Q", base[:8])
    r = rng.random()
    if r < 0.08:
        size = rng.choice([0, 3, 8, 9, 64, 1024, 4096])
        blob = bytes(rng.randrange(256) for _ in range(size))
        if size >= 8 and rng.random() < 0.5:
            blob = struct.pack("<Q", rng.randrange(0, size)) + blob[8:]
        return "random_bytes", blob
    if r < 0.4:
        return "byte_mutation", mutate_bytes(rng, base)
    if r < 0.75:
        header = json.loads(base[8 : 8 + n])
        names = [k for k in header if k != "__metadata__"]
        name = rng.choice(names)
        e = header[name]
        b, end = e["data_offsets"]
        field = rng.choice(["offsets", "offsets", "shape", "dtype", "name", "metadata", "entry", "length"])
        if field == "offsets":
            e["data_offsets"] = rng.choice([[-1, 4], [0, 2**64], [end, b], [b, end + 1], [max(b - 1, 0), end - 1], [0, 0],
                                            [end, end + (end - b)], [0], [1, 2, 3], "0,4", None, [2**63, 2**63 + 4],
                                            [0, len(base)], [b + 0.0, end]])
        elif field == "shape":
            e["shape"] = rng.choice([[2**40], [-1], [1.5], [], [0], [1] * 65, [2**31, 2**31, 2**31], "4", None, [True],
                                     [2**62, 4], [10**30]])
        elif field == "dtype":
            e["dtype"] = rng.choice(["F8_E5M2", "f32", "", None, 3, "BF16", "I64", "BOOL", "C64", "U64", "F16", ["F32"]])
        elif field == "name":
            header[rng.choice(TRICK_STRINGS)] = header.pop(name)
        elif field == "metadata":
            header["__metadata__"] = rng.choice([rand_json(rng), {"k": 1}, [], {"k": "v" * 10000}, None, {"\ud800": "x"}])
        elif field == "entry":
            header[name] = rng.choice([rand_json(rng), {**e, "extra": 1}, {"dtype": e["dtype"]}])
        h = dumps(header)
        claim = len(h)
        if field == "length" or rng.random() < 0.1:
            claim = rng.choice([0, max(0, len(h) - 1), len(h) + 1, 2**64 - 1, 2**63, len(base)])
        return "header_field", struct.pack("<Q", claim) + h + base[8 + n :]
    if r < 0.85:
        kind = rng.randrange(4)
        if kind == 0:  # length field claims (almost) everything
            return "memory_bomb", struct.pack("<Q", rng.choice([2**64 - 1, 2**40, 2**31])) + b"{}"
        if kind == 1:  # a tensor claiming a terabyte
            h = dumps({"t": {"dtype": "F64", "shape": [2**20, 2**20], "data_offsets": [0, 2**43]}})
            return "memory_bomb", struct.pack("<Q", len(h)) + h + b"\x00" * 64
        if kind == 2:  # 2000 small entries in one header
            k = 2000
            h = dumps({f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(k)})
            return "memory_bomb", struct.pack("<Q", len(h)) + h + b"\x01" * k
        h = deep_json(rng)
        return "deep_json", struct.pack("<Q", len(h)) + h
    entries = {}
    for _ in range(rng.randint(0, 5)):
        entries[rng.choice(TRICK_STRINGS + ["w", "b"])] = {
            "dtype": rng.choice(["F32", "F16", "BF16", "I64", "U8", "BOOL", "X", 1]),
            "shape": [rng.choice([0, 1, 2, 3, 4]) for _ in range(rng.randint(0, 3))],
            "data_offsets": sorted(rng.randint(0, 48) for _ in range(2))}
    h = dumps(entries)
    if rng.random() < 0.2:  # duplicate keys: JSON parsers keep the last one
        h = h[:-1] + b', "w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}' if len(h) > 2 else h
    return "random_header", struct.pack("<Q", len(h)) + h + bytes(rng.randrange(256) for _ in range(48))


def check_safetensors(ctx, label: str, blob: bytes, path: Path) -> str:
    import tracemalloc

    from kdd_jax.io import SAFETENSORS_DTYPES, CheckpointError, read_safetensors

    path = path.with_suffix(".safetensors")
    path.write_bytes(blob)
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        arrays, metadata = read_safetensors(path)
    except CheckpointError as e:
        if str(path) not in str(e):
            raise Violation(f"error does not name the file: {str(e)[:200]}") from None
        outcome = "clear_error"
        arrays = None
    peak = tracemalloc.get_traced_memory()[1] - base
    bound = 256 * 1024 + 32 * len(blob)
    ctx["max_peak_of_bound"] = max(ctx.get("max_peak_of_bound", 0.0), peak / bound)
    ctx["max_peak_bytes"] = max(ctx.get("max_peak_bytes", 0), peak)
    if peak > bound:
        raise Violation(f"peak memory {peak} bytes for a {len(blob)}-byte file")
    if arrays is None:
        path.unlink()
        return outcome
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    declared = {k: v for k, v in header.items() if k != "__metadata__"}
    data = blob[8 + n :]
    if set(arrays) != set(declared) or metadata != header.get("__metadata__", {}):
        raise Violation("accepted, but names or metadata differ from the header")
    for name, info in declared.items():
        a = arrays[name]
        b, e = info["data_offsets"]
        if (a.dtype != SAFETENSORS_DTYPES[info["dtype"]] or list(a.shape) != info["shape"]
                or not 0 <= b <= e <= len(data) or a.tobytes() != data[b:e]):
            raise Violation(f"accepted, but tensor {name!r} differs from its header entry")
    del arrays
    path.unlink()
    return "accepted"


# ---- config.json -----------------------------------------------------------------------------

def config_bases() -> list[dict]:
    from tests.conftest import CONFIGS, full_config
    from tests.toyzoo import PRE, STUDENT_ARCH, TEACHER_ARCH

    return [full_config(n) for n in CONFIGS] + [{"format_version": 1, **a, "preprocessing": PRE}
                                                 for a in (STUDENT_ARCH, TEACHER_ARCH)]


def gen_config(rng: random.Random, ctx) -> tuple[str, bytes]:
    base = rng.choice(ctx["bases"])
    r = rng.random()
    if r < 0.55:
        return "field_mutation", dumps(mutate_doc(rng, base))
    if r < 0.7:
        doc = copy.deepcopy(base)
        op = rng.randrange(4)
        if op == 0:
            doc["family"] = rng.choice(["resnet", "vgg", "mobilenetv2", "densenet", "transformer", ""])
        elif op == 1:
            other = rng.choice(ctx["bases"])
            doc["arch"] = copy.deepcopy(other["arch"])
        elif op == 2:
            doc[rng.choice(["arch", "preprocessing", "family", "format_version"])] = rand_json(rng)
        else:
            doc = {k: v for k, v in doc.items() if rng.random() < 0.7}
        return "structure_mutation", dumps(doc)
    if r < 0.85:
        return "byte_mutation", mutate_bytes(rng, dumps(base))
    if r < 0.92:
        return "random_json", dumps(rand_json(rng))
    op = rng.randrange(4)
    if op == 0:
        return "deep_json", deep_json(rng)
    if op == 1:
        doc = copy.deepcopy(base)
        doc["arch"]["pad"] = "x" * (1 << 20)
        return "huge", dumps(doc)
    if op == 2:
        return "encoding", json.dumps(base).encode(rng.choice(["utf-16", "utf-32", "utf-8-sig", "latin-1"]))
    return "duplicate_keys", dumps(base)[:-1] + b', "family": "vgg", "family": 3}'


def check_config(ctx, label: str, blob: bytes, path: Path) -> str:
    from kdd_jax.config import ConfigError, StudentConfig, load_config

    path = path.with_suffix(".json")
    path.write_bytes(blob)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        if str(path) not in str(e) and "config" not in str(e):
            raise Violation(f"error does not name the file: {str(e)[:200]}") from None
        return "clear_error"
    finally:
        path.unlink()
    if not isinstance(cfg, StudentConfig):
        raise Violation(f"load_config returned {type(cfg).__name__}")
    cfg.to_dict()  # an accepted config must serialise again
    return "accepted"


# ---- teachers file -----------------------------------------------------------------------------

TEACHER_BASE = {"teachers": [
    {"name": "local-a", "path": "teachers/a", "output": "probs"},
    {"name": "api", "kind": "http", "url": "http://127.0.0.1:9/prefix", "model": "m", "output": "topk", "k": 3,
     "input_size": [12, 12], "channels": 1, "value_range": [0, 1], "num_classes": 6, "timeout_s": 2, "max_retries": 1,
     "batch_size": 16, "concurrency": 2, "token_env": "SOME_TOKEN"}]}


def yaml_bomb(levels: int) -> str:
    fields = ["path", "url", "model", "token_env", "output", "kind", "input_size", "value_range", "k"][:levels]
    lines = [f"    {fields[0]}: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i, f in enumerate(fields[1:], 1):
        lines.append(f"    {f}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "teachers:\n  - name: x\n" + "\n".join(lines) + "\n"


def gen_teachers(rng: random.Random, ctx) -> tuple[str, bytes]:
    import yaml

    suffix = rng.choice([".json", ".yaml"])
    ctx["suffix"] = suffix
    r = rng.random()
    if r < 0.6:
        doc = mutate_doc(rng, TEACHER_BASE)
        text = dumps(doc)  # JSON is YAML too
        if suffix == ".yaml":
            try:
                text = yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogatepass")
            except (yaml.YAMLError, UnicodeError):
                pass
        return f"field_mutation{suffix}", text
    if r < 0.75:
        text = dumps(TEACHER_BASE) if suffix == ".json" else yaml.safe_dump(TEACHER_BASE).encode()
        return f"byte_mutation{suffix}", mutate_bytes(rng, text)
    if r < 0.85:
        return f"random_json{suffix}", dumps(rand_json(rng))
    ctx["suffix"] = ".yaml"
    marker = ctx["marker"]
    tricks = [
        yaml_bomb(rng.randint(3, 9)),
        f"teachers: !!python/object/apply:os.system ['touch {marker}']\n",
        f"teachers:\n  - !!python/object/apply:builtins.exec [\"open('{marker}', 'w')\"]\n",
        "teachers: &a [*a]\n",
        "teachers:\n  - &e {name: x, path: p}\n  - {<<: *e, name: y}\n",
        "teachers: [" * 5000,
        "teachers:\n  - name: x\n    path: p\n    k: .inf\n",
        "teachers:\n  - {name: x, path: p}\n  - {name: x, path: q}\n",
        "%YAML 9.9\n---\nteachers: []\n",
        "teachers:\n\t- name: x\n",
    ]
    return "yaml_tricks.yaml", rng.choice(tricks).encode()


def check_teachers(ctx, label: str, blob: bytes, path: Path) -> str:
    from kdd_jax.config import ConfigError
    from kdd_jax.teachers.config import load_teachers_file, open_teacher

    path = path.with_suffix(ctx["suffix"])
    path.write_bytes(blob)
    try:
        entries = load_teachers_file(path)
    except ConfigError as e:
        if str(path) not in str(e):
            raise Violation(f"error does not name the file: {str(e)[:200]}") from None
        return "clear_error"
    finally:
        path.unlink()
        if Path(ctx["marker"]).exists():
            raise Violation("a YAML tag ran code")
    for e in entries:
        if e.kind == "http":
            try:
                open_teacher(e)
            except ValueError as err:  # HttpTeacher's own checks: a message naming the teacher
                if repr(e.name) not in str(err):
                    raise Violation(f"http entry refused without naming it: {err}") from None
                return "clear_error"
    return "accepted"


# ---- kdd serve request bodies ------------------------------------------------------------------

def serve_ctx(ctx) -> None:
    from kdd_jax.teachers import CallableTeacher, InputSpec
    from kdd_jax.teachers.server import make_server

    w = np.random.default_rng(3).normal(size=(16, 6)).astype(np.float32)
    teacher = CallableTeacher("t", lambda x: x.reshape(len(x), -1) @ w, num_classes=6, spec=InputSpec((4, 4), 1),
                              output="probs")
    server = make_server(teacher, name="m", max_request_bytes=1 << 20)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctx["server"], ctx["port"] = server, server.server_address[1]
    good = {"id": "r1", "inputs": [{"name": "input", "shape": [2, 1, 4, 4], "datatype": "FP32",
                                    "data": np.random.default_rng(0).uniform(size=32).round(3).tolist()}],
            "outputs": [{"name": "probs"}]}
    ctx["good"] = good


def gen_serve(rng: random.Random, ctx) -> tuple[str, bytes]:
    good = ctx["good"]
    r = rng.random()
    if r < 0.6:
        return "field_mutation", dumps(mutate_doc(rng, good))
    if r < 0.7:
        doc = copy.deepcopy(good)
        inp = doc["inputs"][0]
        op = rng.randrange(5)
        if op == 0:
            inp["data"] = [[inp["data"][i * 16 + j * 4 : i * 16 + j * 4 + 4] for j in range(4)] for i in range(2)]
        elif op == 1:
            inp["data"] = [[v] for v in inp["data"]][:-1] + [inp["data"][-1]]
        elif op == 2:
            inp["data"][rng.randrange(32)] = rng.choice([10**400, 1e39, True, "1", None, [], float("nan")])
        elif op == 3:
            inp["shape"] = [rng.choice([0, 4097, 10**20, -1, 2]), 1, 4, 4]
        else:
            inp["data"] = inp["data"] * rng.choice([0, 2, 1000])
        return "tensor_mutation", dumps(doc)
    if r < 0.85:
        return "byte_mutation", mutate_bytes(rng, dumps(good))
    if r < 0.93:
        return "random_json", dumps(rand_json(rng))
    if r < 0.97:
        return "deep_json", deep_json(rng)
    return "oversized", b'{"inputs": [{"data": [' + b"0.5," * (300_000) + b'0.5]}]}'


def check_serve(ctx, label: str, blob: bytes, path: Path) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", ctx["port"], timeout=30)
    try:
        conn.request("POST", "/v2/models/m/infer", body=blob, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
    except (OSError, http.client.HTTPException) as e:
        raise Violation(f"no answer: {type(e).__name__}: {e}") from None
    finally:
        conn.close()
    try:
        doc = json.loads(data)
    except ValueError:
        raise Violation(f"HTTP {r.status} with a body that is not JSON: {data[:100]!r}") from None
    if r.status == 200:
        if not isinstance(doc.get("outputs"), list):
            raise Violation("200 without outputs")
        return "accepted"
    if 400 <= r.status < 500 and isinstance(doc.get("error"), str) and doc["error"]:
        return "clear_error"
    raise Violation(f"HTTP {r.status}: {str(doc)[:200]}")


# ---- teacher API answers (the HTTP client's parser) ----------------------------------------------

def gen_answers(rng: random.Random, ctx) -> tuple[str, bytes]:
    from tests.fault_server import oip_outputs
    from kdd_jax.teachers import TeacherOutput

    kind = rng.choice(["logits", "probs", "topk", "labels"])
    n = rng.choice([1, 2, 3])
    ctx["kind"], ctx["n"] = kind, n
    v = np.random.default_rng(rng.randrange(1 << 30)).dirichlet(np.ones(6), size=n).astype(np.float32)
    out = {"logits": TeacherOutput("logits", values=np.log(v)), "probs": TeacherOutput("probs", values=v),
           "topk": TeacherOutput("topk", values=np.sort(v, -1)[:, ::-1][:, :3].copy(),
                                 indices=np.argsort(-v, -1)[:, :3].astype(np.int32)),
           "labels": TeacherOutput("labels", indices=v.argmax(-1).astype(np.int32))}[kind]
    good = {"model_name": "m", "outputs": oip_outputs(out)}
    r = rng.random()
    if r < 0.65:
        return f"field_mutation.{kind}", dumps(mutate_doc(rng, good))
    if r < 0.85:
        return f"byte_mutation.{kind}", mutate_bytes(rng, dumps(good))
    if r < 0.95:
        return f"random_json.{kind}", dumps(rand_json(rng))
    return f"deep_json.{kind}", deep_json(rng)


def check_answers(ctx, label: str, blob: bytes, path: Path) -> str:
    from kdd_jax.teachers import HttpTeacher, InputSpec, TeacherError
    from kdd_jax.teachers.base import validate_output

    t = HttpTeacher("fuzzed-api", "http://127.0.0.1:9", num_classes=6, spec=InputSpec((4, 4), 1), output=ctx["kind"], k=3)
    try:
        out = validate_output(t._parse(blob, ctx["n"]), ctx["n"], 6, t.name)
    except TeacherError as e:
        if "'fuzzed-api'" not in str(e):
            raise Violation(f"error does not name the teacher: {str(e)[:200]}") from None
        return "clear_error"
    if len(out) != ctx["n"]:
        raise Violation("accepted an answer for another batch size")
    return "accepted"


# ---- whole students through the converter --------------------------------------------------------

def convert_ctx(ctx, work: Path) -> None:
    zoo = ensure_toy_zoo(work)
    ctx["bases"] = [(zoo / n / "model.safetensors").read_bytes() for n in ("student", "teacher-a")]
    ctx["configs"] = [json.loads((zoo / n / "config.json").read_text()) for n in ("student", "teacher-a")]
    outside = ctx["sandbox"] / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text("do not touch")
    ctx["outside"] = outside


def gen_convert(rng: random.Random, ctx) -> tuple[str, bytes]:
    i = rng.randrange(2)
    weights, cfg = ctx["bases"][i], ctx["configs"][i]
    r = rng.random()
    name = rng.choice(["student", "s" * 200, "\u00e9t\u00e9", "a b", "..x", "-rf", ".hidden", "con"])
    layout = {"name": name, "config": cfg, "weights": None, "link_out": rng.random() < 0.15,
              "overwrite": rng.random() < 0.5, "no_config": False}
    if r < 0.35:
        layout["config"] = mutate_doc(rng, cfg, focus=("arch", "preprocessing"))
        label = "config_mutation"
    elif r < 0.65:
        layout["weights"] = mutate_bytes(rng, weights)
        label = "weights_mutation"
    elif r < 0.8:
        (n,) = struct.unpack("<Q", weights[:8])
        header = json.loads(weights[8 : 8 + n])
        keys = [k for k in header if k != "__metadata__"]
        k = rng.choice(keys)
        op = rng.randrange(4)
        if op == 0:
            header[rng.choice(TRICK_STRINGS)] = header.pop(k)
        elif op == 1:
            del header[k]
        elif op == 2:
            header[k]["dtype"] = rng.choice(["I64", "U8", "BOOL", "F64"])
        else:
            header[k]["shape"] = list(reversed(header[k]["shape"])) + [1]
        h = dumps(header)
        layout["weights"] = struct.pack("<Q", len(h)) + h + weights[8 + n :]
        label = "tensor_edit"
    elif r < 0.9:
        layout["no_config"] = True
        layout["weights"] = mutate_bytes(rng, weights) if rng.random() < 0.5 else None
        label = "inferred_config"
    else:
        label = "unmodified"
    if layout["weights"] is None:
        layout["weights"] = weights
    w = layout.pop("weights")
    return label, json.dumps({**layout, "weights_b64": base64.b64encode(w).decode()}).encode()


def check_convert(ctx, label: str, blob: bytes, path: Path) -> str:
    from converters import ConversionError, convert_student
    from converters.student import discover
    from kdd_jax.config import ConfigError
    from kdd_jax.io import CheckpointError, save_converted

    spec = json.loads(blob)
    src_root = path.with_suffix("")
    d = src_root / spec["name"]
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(base64.b64decode(spec["weights_b64"]))
    if not spec["no_config"]:
        (d / "config.json").write_text(json.dumps(spec["config"], allow_nan=True))
    out = ctx["sandbox"] / "out"
    out.mkdir(exist_ok=True)
    if spec["link_out"]:  # the output folder already holds a link to a folder outside it
        link = out / spec["name"]
        if not link.exists() and not link.is_symlink():
            link.symlink_to(ctx["outside"], target_is_directory=True)
    before = sorted(p.name for p in ctx["outside"].iterdir())
    outcome = "accepted"
    try:
        for s in discover([d]):
            target = out / s.name
            if target.resolve().parent != out.resolve():
                raise ConversionError(f"{s.weights}: output name escapes")
            if target.exists() and not spec["overwrite"]:
                raise FileExistsError(f"{target} exists")
            result = convert_student(s)
            save_converted(target, result.model, result.config, result.report, overwrite=spec["overwrite"])
    except (ConversionError, CheckpointError, ConfigError, FileExistsError):
        outcome = "clear_error"
    finally:
        shutil.rmtree(src_root, ignore_errors=True)
    after = sorted(p.name for p in ctx["outside"].iterdir())
    if after != before or (ctx["outside"] / "canary.txt").read_text() != "do not touch":
        raise Violation("the conversion changed a folder outside the output folder")
    stray = [p for p in ctx["sandbox"].iterdir()
             if p.name not in ("out", "outside", "current") and not p.name.startswith(("input-", "crash-"))]
    if stray:
        raise Violation(f"files appeared beside the output folder: {stray[:3]}")
    for p in out.iterdir():  # an empty output folder for the next input (a link goes, not its target)
        if p.is_symlink() or not p.is_dir():
            p.unlink()
        else:
            shutil.rmtree(p)
    return outcome


# ---- pickles that run code ---------------------------------------------------------------------

def gen_pickle(rng: random.Random, ctx) -> tuple[str, bytes]:
    payload = rng.choice(["os.system", "builtins.exec", "builtins.eval", "subprocess.call"])
    place = rng.choice(["value", "top", "nested", "state_dict"])
    container = rng.choice(["torch", "pickle0", "pickle2", "pickle5"] if ctx["torch"] else ["pickle0", "pickle2", "pickle5"])
    suffix = rng.choice([".bin", ".pt", ".pth", ".ckpt", ".pkl"])
    allow = rng.random() < 0.5
    return f"{payload}/{container}", json.dumps({"payload": payload, "place": place, "container": container,
                                                 "suffix": suffix, "allow": allow}).encode()


class _Evil:
    def __init__(self, payload: str, marker: str):
        self.payload, self.marker = payload, marker

    def __reduce__(self):
        import builtins
        import subprocess as sp

        if self.payload == "os.system":
            return (os.system, (f"touch '{self.marker}'",))
        if self.payload == "builtins.exec":
            return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))
        if self.payload == "builtins.eval":
            return (builtins.eval, (f"open({self.marker!r}, 'w').write('pwned')",))
        return (sp.call, (["touch", self.marker],))


def check_pickle(ctx, label: str, blob: bytes, path: Path) -> str:
    import pickle

    from converters import ConversionError, convert_student
    from kdd_jax.io import CheckpointError, read_arrays

    spec = json.loads(blob)
    marker = str(path) + ".PWNED"
    evil = _Evil(spec["payload"], marker)
    obj = {"features.0.weight": np.zeros((8, 1, 3, 3), np.float32), "features.0.bias": evil}
    if spec["place"] == "top":
        obj = evil
    elif spec["place"] == "nested":
        obj = {"features.0.weight": [1.0, {"x": (evil,)}]}
    elif spec["place"] == "state_dict":
        obj = {"state_dict": obj, "epoch": 3}
    d = path.with_suffix("")
    d.mkdir()
    weights = d / f"model{spec['suffix']}"
    if spec["container"] == "torch":
        import torch

        if isinstance(obj, dict) and "features.0.weight" in obj and not isinstance(obj["features.0.weight"], list):
            obj = {**obj, "features.0.weight": torch.zeros(8, 1, 3, 3)}
        torch.save(obj, weights)
    else:
        weights.write_bytes(pickle.dumps(obj, protocol=int(spec["container"][-1])))
    (d / "config.json").write_text(json.dumps(ctx["config"]))
    # the same bytes as a pool file (.npy/.npz hold object arrays as pickles)
    npy = d / "pool.npy"
    np.save(npy, np.array([evil, 1], dtype=object), allow_pickle=True)
    outcome = "accepted"
    try:
        convert_student(d, allow_pickle=spec["allow"])
    except ConversionError as e:
        want = "weights_only" if spec["allow"] else "--allow-pickle"
        if want not in str(e):
            raise Violation(f"refused for another reason: {str(e)[:200]}") from None
        outcome = "clear_error"
    try:
        read_arrays(npy, "pool")
        raise Violation("an object .npy was read")
    except CheckpointError:
        pass
    ran = Path(marker).exists()
    ctx["executed"] = ctx.get("executed", 0) + ran
    shutil.rmtree(d)
    if ran:
        raise Violation(f"the {spec['payload']} payload ran")
    if ctx["controls"] < 4:  # control: the same payload does run under a plain unpickler
        ctx["controls"] += 1
        ctl = str(path) + ".CONTROL"
        subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                       input=pickle.dumps(_Evil(spec["payload"], ctl)), capture_output=True, cwd=str(REPO), timeout=60)
        ctx["controls_live"] = ctx.get("controls_live", 0) + Path(ctl).exists()
        Path(ctl).unlink(missing_ok=True)
    return outcome


def pickle_ctx(ctx, work: Path) -> None:
    import importlib.util

    from tests.toyzoo import PRE

    ctx["torch"] = importlib.util.find_spec("torch") is not None
    ctx["controls"] = 0
    ctx["config"] = {"format_version": 1, "family": "vgg",
                     "arch": {"cfg": [8, "M"], "num_classes": 6, "in_channels": 1, "avgpool": None,
                              "classifier_hidden": [], "dropout": "none"}, "preprocessing": PRE}


GENERATORS = {"safetensors": (gen_safetensors, check_safetensors), "config": (gen_config, check_config),
              "teachers": (gen_teachers, check_teachers), "serve": (gen_serve, check_serve),
              "answers": (gen_answers, check_answers), "convert": (gen_convert, check_convert),
              "pickle": (gen_pickle, check_pickle)}


def fuzz_worker(target: str, n: int, seed: int, work: Path, result_path: Path, input_timeout: float) -> None:
    """Runs in its own process: n inputs for one target; writes counts to result_path."""
    import tracemalloc

    sandbox = work / f"fuzz-{target}"
    shutil.rmtree(sandbox, ignore_errors=True)
    sandbox.mkdir(parents=True)
    rng = random.Random(f"{seed}/{target}")
    ctx = {"sandbox": sandbox, "marker": str(sandbox / "YAML_PWNED")}
    if target == "safetensors":
        ctx["bases"] = st_bases(np.random.default_rng(seed))
        tracemalloc.start()
    elif target == "config":
        ctx["bases"] = config_bases()
    elif target == "serve":
        serve_ctx(ctx)
    elif target == "convert":
        convert_ctx(ctx, work)
    elif target == "pickle":
        pickle_ctx(ctx, work)
    gen, check = GENERATORS[target]

    def alarm(signum, frame):
        raise TimeoutError(f"input took over {input_timeout:g}s")

    signal.signal(signal.SIGALRM, alarm)
    counts = {"accepted": 0, "clear_error": 0, "crash": 0}
    by_label: dict[str, dict[str, int]] = {}
    crashes = []
    started = time.perf_counter()
    for i in range(n):
        label, blob = gen(rng, ctx)
        path = sandbox / f"input-{i}"
        (sandbox / "current").write_bytes(blob)  # the reproducer, should the worker die
        signal.setitimer(signal.ITIMER_REAL, input_timeout)
        try:
            outcome = check(ctx, label, blob, path)
        except Violation as e:
            outcome, err = "crash", f"Violation: {e}"
        except Exception as e:  # noqa: BLE001 - anything but our clear error is what we count
            outcome, err = "crash", f"{type(e).__name__}: {str(e)[:300]} @ {traceback.format_exc().splitlines()[-3].strip()}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        counts[outcome] += 1
        by_label.setdefault(label, {"accepted": 0, "clear_error": 0, "crash": 0})[outcome] += 1
        if outcome == "crash":
            keep = sandbox / f"crash-{i}.bin"
            keep.write_bytes(blob)
            crashes.append({"input": i, "label": label, "error": err, "reproducer": str(keep)})
            log(f"  fuzz {target} #{i} ({label}): CRASH {err[:200]}")
        for p in sandbox.glob(f"input-{i}*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    extra = {k: v for k, v in ctx.items() if k in ("max_peak_of_bound", "max_peak_bytes", "executed", "controls",
                                                    "controls_live")}
    if target == "serve":
        ctx["server"].shutdown()
        ctx["server"].server_close()
    if target == "safetensors":
        tracemalloc.stop()
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    result_path.write_text(json.dumps({"target": target, "n": n, "counts": counts, "by_label": by_label,
                                       "crashes": crashes[:20], "seconds": time.perf_counter() - started,
                                       **extra}, default=float))


def run_fuzz(cfg: dict, args, work: Path) -> dict:
    out = {}
    for target in FUZZ_TARGETS:
        n = cfg["fuzz"][target]
        if n <= 0:
            continue
        res = work / f"fuzz-{target}.json"
        res.unlink(missing_ok=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "fuzz", "--target", target, "--n", str(n),
               "--seed", str(args.seed), "--work", str(work), "--result", str(res),
               "--input-timeout", str(args.input_timeout)]
        p = subprocess.run(cmd, cwd=str(REPO), env=cli_env(work), capture_output=True, text=True,
                           timeout=max(600, n * 2))
        if p.returncode == 0 and res.exists():
            r = json.loads(res.read_text())
        else:  # the worker died: every input it did not report counts against us, one as a crash
            cur = work / f"fuzz-{target}" / "current"
            r = {"target": target, "n": n, "counts": {"accepted": 0, "clear_error": 0, "crash": 1}, "by_label": {},
                 "crashes": [{"error": f"worker exit {p.returncode}: {p.stderr[-600:]}", "reproducer": str(cur)}],
                 "worker_died": True}
        r["wall_s"] = time.perf_counter() - t0
        out[target] = r
        log(f"fuzz {target}: {r['counts']} in {r['wall_s']:.0f}s")
    return out


# =============================================================================== shared set-up

def cli_env(work: Path, devices: int | None = None, compile_cache: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if compile_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(work / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def ensure_toy_zoo(work: Path) -> Path:
    """tests/toyzoo.py's zoo (two teachers, a distilled student, three references), built once."""
    root = work / "toyzoo"
    if not (root / "done").exists():
        from tests.toyzoo import build_toy_zoo

        shutil.rmtree(root, ignore_errors=True)
        log("building the toy zoo (tests/toyzoo.py, ~30 s)")
        build_toy_zoo(root)
        (root / "done").write_text("ok")
    return root


class LoggedTeacher:
    """A teacher served by OipServer that records the response-cache key of every row it answers,
    and can SIGKILL a client process at a chosen request (before or after answering it)."""

    def __init__(self, inner, cache_name: str):
        self.inner, self.cache_name = inner, cache_name
        self.name, self.output, self.num_classes, self.spec = inner.name, inner.output, inner.num_classes, inner.spec
        self.k = getattr(inner, "k", 5)
        self.lock = threading.Lock()
        self.reset("idle")

    def reset(self, phase: str) -> None:
        with self.lock:
            self.phase, self.log, self.requests, self.trigger = phase, [], 0, None

    def set_phase(self, phase: str) -> None:
        with self.lock:
            self.phase = phase

    def query(self, x):
        from kdd_jax.teachers import probe_key

        with self.lock:
            self.requests += 1
            i, trigger = self.requests, self.trigger
        if trigger and trigger[0] == i and trigger[1] == "before":
            trigger[2]()
        out = self.inner.query(x)
        keys = [probe_key(self.cache_name, self.output, row) for row in np.asarray(x, np.float32)]
        with self.lock:
            self.log.extend((self.phase, k) for k in keys)
        if trigger and trigger[0] == i and trigger[1] == "after":
            threading.Timer(trigger[3], trigger[2]).start()
        return out


class Fleet:
    """Two HTTP teachers (the toy zoo's) served on loopback by kdd serve's OipServer, their
    teachers files (HTTP and local), and helpers to run `kdd` subprocesses against them."""

    def __init__(self, work: Path, zoo: Path | None = None):
        from kdd_jax.detect import load_any_student
        from kdd_jax.teachers.local import flax_teacher
        from kdd_jax.teachers.server import make_server

        self.work, self.zoo = work, zoo or ensure_toy_zoo(work)
        self.teachers, self.servers = {}, []
        entries = []
        for name in ("teacher-a", "teacher-b"):
            model, config = load_any_student(self.zoo / name)
            t = LoggedTeacher(flax_teacher(name, model, config, output="probs"), name)
            server = make_server(t, name=name)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.teachers[name], _ = t, self.servers.append(server)
            entries.append({"name": name, "kind": "http", "url": server.url, "model": name, "output": "probs",
                            "input_size": [12, 12], "channels": 1, "value_range": [0, 1], "num_classes": 6,
                            "batch_size": HTTP_BATCH, "concurrency": 2, "timeout_s": 60, "max_retries": 2})
        self.tfile = work / "teachers-http.json"
        self.tfile.write_text(json.dumps({"teachers": entries}))
        self.local_tfile = work / "teachers-local.json"
        self.local_tfile.write_text(json.dumps({"teachers": [
            {"name": n, "path": str(self.zoo / n), "output": "probs"} for n in ("teacher-a", "teacher-b")]}))

    def close(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()

    def reset(self, phase: str) -> None:
        for t in self.teachers.values():
            t.reset(phase)

    def set_phase(self, phase: str) -> None:
        for t in self.teachers.values():
            t.set_phase(phase)

    def answered(self, phase: str | None = None) -> list[str]:
        return [k for t in self.teachers.values() for p, k in t.log if phase is None or p == phase]

    def argv(self, command: str, run: Path, seed: int = 0, teachers: Path | None = None) -> list[str]:
        tfile = str(teachers or self.tfile)
        if command == "detect":
            return ["detect", "--student", str(self.zoo / "student"), "--teachers", tfile, *DETECT, "--seed", str(seed),
                    "--cache", str(run / "cache"), "--out", str(run / "out"), "-q", "--json"]
        return ["audit", "--students", str(self.zoo / "student"), str(self.zoo / "references"), "--teachers", tfile,
                *AUDIT, "--seed", str(seed), "--cache", str(run / "cache"), "--out", str(run / "out"), "--resume",
                "-q", "--json"]

    def start(self, argv: list[str], env: dict) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "kdd_jax", *argv], cwd=str(REPO), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def compare_verdicts(a, b) -> str:
    """'identical'; 'within_tolerance' (same strings, e.g. answer, winner, probe hash, and every
    number within rtol 1e-5 / atol 1e-6: teacher answers computed in other batch compositions
    may differ in the last bits); else 'changed'."""
    if a == b:
        return "identical"

    def flat(v, path=""):
        if isinstance(v, dict):
            return [x for k in sorted(v) for x in flat(v[k], f"{path}.{k}")]
        if isinstance(v, (list, tuple)):
            return [x for i, e in enumerate(v) for x in flat(e, f"{path}[{i}]")]
        return [(path, v)]

    fa, fb = flat(a), flat(b)
    if [p for p, _ in fa] != [p for p, _ in fb]:
        return "changed"
    for (_, x), (_, y) in zip(fa, fb):
        if isinstance(x, float) and isinstance(y, (int, float)) and not isinstance(y, bool):
            if not math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) and not (math.isnan(x) and math.isnan(y)):
                return "changed"
        elif x != y:
            return "changed"
    return "within_tolerance"


def verdict_of(command: str, stdout: str) -> dict:
    """What must not change between runs: detect -> answer, verdict, probe hash; audit -> every
    student's row without its query count (a re-run pays less)."""
    doc = json.loads(stdout)
    if command == "detect":
        return {"answer": doc["answer"], "verdict": doc["verdict"], "probes_sha256": doc["probes"]["sha256"],
                "none": doc["none_of_the_candidates"]}
    return {"students": [{k: v for k, v in r.items() if k != "queries"} for r in doc["students"]],
            "failed": doc["failed"]}


def cache_state(run: Path) -> tuple[str, set[str]]:
    """(integrity_check result, keys) of a run's response cache ('absent' if never created)."""
    path = run / "cache" / "responses.sqlite"
    if not path.exists():
        return "absent", set()
    conn = sqlite3.connect(path, timeout=60)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        try:
            keys = {k for (k,) in conn.execute("SELECT key FROM responses")}
        except sqlite3.OperationalError:  # killed before the schema existed
            keys = set()
        bad = conn.execute("SELECT COUNT(*) FROM responses WHERE length(vals) != 24").fetchone()[0] if keys else 0
    finally:
        conn.close()
    return (integrity if not bad else f"{bad} rows of the wrong size"), keys


# =============================================================================== faults

def run_faults(cfg: dict, args, work: Path) -> dict:
    from tests.fault_server import FAULT_KINDS, FaultServer
    from kdd_jax.teachers import (CachedTeacher, CallableTeacher, HttpTeacher, InputSpec, ResponseCache, TeacherError,
                                  probe_key)

    rng = random.Random(f"{args.seed}/faults")
    w = np.random.default_rng(7).normal(size=(64, 6)).astype(np.float32)
    inner = CallableTeacher("api", lambda x: x.reshape(len(x), -1) @ w, num_classes=6, spec=InputSpec((8, 8), 1),
                            output="probs")
    x = np.random.default_rng(11).uniform(size=(16, 1, 8, 8)).astype(np.float32)
    truth = inner.query(x).values
    per_kind = {}
    timeouts = {"slow": 0.5, "loris": 0.5, "lorisbody": 0.5}
    for kind, documented in FAULT_KINDS.items():
        rec = {"documented": documented, "trials": 0, "injected": 0, "as_documented": 0, "retried": 0, "reported": 0,
               "answered_late": 0, "crashes": 0, "repeated": 0, "lost": 0, "wrong_cached": 0, "budget_exceeded": 0,
               "cache_count_wrong": 0,
               "retry_after_honoured": None}
        for trial in range(cfg["fault_trials"]):
            n_faults = rng.choice([1, 1, 2])
            action = {"429": "429:0.2", "spike": "spike:0.2"}.get(kind, kind)
            script = ["ok"] * rng.randint(0, 3) + [action] * n_faults
            server = FaultServer(script, teacher=inner, slow_s=0.8)
            run = work / f"fault-{kind}-{trial}"
            shutil.rmtree(run, ignore_errors=True)
            cache = ResponseCache(run / "c.sqlite")
            client = HttpTeacher("api", server.url, model="api", num_classes=6, spec=InputSpec((8, 8), 1), output="probs",
                                 batch_size=4, concurrency=rng.choice([1, 2]), timeout_s=timeouts.get(kind, 2.0),
                                 max_retries=3, backoff_s=0.01)
            cached = CachedTeacher(client, cache, budget=len(x))
            t0 = time.perf_counter()
            outcome = None
            try:
                got = cached.query(x)
                outcome = "completed"
                if not np.allclose(got.values, truth, rtol=1e-6, atol=1e-7):
                    rec["wrong_cached"] += 1
            except TeacherError:
                outcome = "reported"
            except Exception as e:  # noqa: BLE001
                outcome = "crash"
                log(f"  fault {kind}: CRASH {type(e).__name__}: {e}")
            elapsed = time.perf_counter() - t0
            rec["trials"] += 1
            injected = sum(r["action"] == action for r in server.seen)
            rec["injected"] += injected
            answered_first = {row.tobytes() for r in server.seen if r["valid"] for row in r["x"]}
            if outcome == "crash":
                rec["crashes"] += 1
            elif outcome == "reported":
                rec["reported"] += injected
            elif kind == "spike":
                rec["answered_late"] += injected
            else:
                rec["retried"] += client.retries
            if documented == "reported":  # the query ends with TeacherError; a wrong answer is never retried
                good = outcome == "reported" and client.retries == 0
            elif documented == "answered":
                good = outcome == "completed" and client.retries == 0
            else:
                good = outcome == "completed" and client.retries == injected
            rec["as_documented"] += good * injected
            if kind == "429" and outcome == "completed":
                ok = elapsed >= 0.2 - 0.01  # at least one full Retry-After waited
                prev = rec["retry_after_honoured"]
                rec["retry_after_honoured"] = ok if prev is None else prev and ok
            # what the cache holds now: every answer received (and nothing else)
            want = {probe_key("api", "probs", np.frombuffer(b, np.float32).reshape(1, 8, 8)) for b in answered_first}
            rec["lost"] += len(want - set(cache.get_many(sorted(want))))
            rec["cache_count_wrong"] += cache.count() != len(want)
            rec["budget_exceeded"] += cached.stats.queries > len(x)
            # fault-free re-run on the same cache: only what is missing is asked
            server.script, before = [], len(server.seen)
            again = CachedTeacher(HttpTeacher("api", server.url, model="api", num_classes=6, spec=InputSpec((8, 8), 1),
                                              output="probs", batch_size=4, max_retries=0), cache, budget=len(x))
            try:
                got = again.query(x)
                if not np.allclose(got.values, truth, rtol=1e-6, atol=1e-7):
                    rec["wrong_cached"] += 1
            except Exception as e:  # noqa: BLE001
                rec["crashes"] += 1
                log(f"  fault {kind} re-run: CRASH {type(e).__name__}: {e}")
            rerun_rows = [row.tobytes() for r in server.seen[before:] if r["valid"] for row in r["x"]]
            rec["repeated"] += sum(b in answered_first for b in rerun_rows)
            rec["cache_count_wrong"] += cache.count() != len(x)
            server.close()
            shutil.rmtree(run, ignore_errors=True)
        per_kind[kind] = rec
        log(f"faults {kind}: {rec['injected']} injected, {rec['as_documented']} as documented")
    mixed = run_mixed(cfg, args, work, rng)
    return {"per_kind": per_kind, "mixed": mixed}


def run_mixed(cfg: dict, args, work: Path, rng: random.Random) -> dict:
    """Whole detections through flaky HTTP teachers, re-run after each reported fault."""
    import jax

    from tests.fault_server import FAULT_KINDS, FaultServer
    from kdd_jax.detect import DetectConfig, detect, load_any_student
    from kdd_jax.synthesis import SynthesisConfig
    from kdd_jax.teachers import CachedTeacher, HttpTeacher, InputSpec, QueryBudgetExceeded, ResponseCache, TeacherError
    from kdd_jax.teachers.local import flax_teacher

    zoo = ensure_toy_zoo(work)
    student, scfg = load_any_student(zoo / "student")
    inner = {n: flax_teacher(n, *load_any_student(zoo / n), output="probs") for n in ("teacher-a", "teacher-b")}
    # aug_noise 0: the probes (and verdicts) of the committed campaign, made before noise became pixel's default
    dc = DetectConfig(synthesis=SynthesisConfig(n_probes=32, steps=20, seed=0, aug_noise=0.0), n_bootstrap=500)
    kinds = list(FAULT_KINDS)
    p = cfg["fault_p"]
    spec = InputSpec((12, 12), 1, (0.0, 1.0))

    def chooser(server):
        if rng.random() >= p:
            return "ok"
        kind = rng.choice(kinds)
        return {"429": "429:0.2", "spike": "spike:0.2"}.get(kind, kind)

    def clients(servers, cache, budget=None):
        return [CachedTeacher(HttpTeacher(n, s.url, model=n, num_classes=6, spec=spec, output="probs", batch_size=4,
                                          concurrency=2, timeout_s=0.5, max_retries=4, backoff_s=0.01), cache,
                              budget=budget) for n, s in servers.items()]

    def actions(servers):
        return {n: [{"429:0.2": "429", "spike:0.2": "spike"}.get(r["action"], r["action"]) for r in s.seen]
                for n, s in servers.items()}

    with jax.default_matmul_precision("highest"):
        servers = {n: FaultServer(teacher=t) for n, t in inner.items()}
        run = work / "mixed-ref"
        shutil.rmtree(run, ignore_errors=True)
        ref = detect(student, scfg, clients(servers, ResponseCache(run / "c.sqlite")), dc)
        reference = {"verdict": ref.verdict.to_dict(), "sha": ref.probes.sha256}
        # the budget: one probe short of what the run needs is refused before anything is sent
        shutil.rmtree(run, ignore_errors=True)
        sent_before = sum(len(s.seen) for s in servers.values())
        try:
            detect(student, scfg, clients(servers, ResponseCache(run / "c.sqlite"), budget=31), dc)
            budget_refused = False
        except QueryBudgetExceeded:
            budget_refused = sum(len(s.seen) for s in servers.values()) == sent_before
        for s in servers.values():
            s.close()
        rec = {"runs": 0, "completed": 0, "attempts": 0, "injected": {}, "reported_attempts": 0, "crashes": 0,
               "verdict_changes": 0, "verdicts_identical": 0, "verdicts_within_tolerance": 0, "repeated": 0,
               "lost": 0, "budget_exceeded": 0, "cache_rows_wrong": 0,
               "budget_refused_before_sending": budget_refused}
        for i in range(cfg["mixed_runs"]):
            run = work / f"mixed-{i}"
            shutil.rmtree(run, ignore_errors=True)
            servers = {n: FaultServer(teacher=t, chooser=chooser, slow_s=0.8) for n, t in inner.items()}
            cache = ResponseCache(run / "c.sqlite")
            result = None
            for attempt in range(40):
                rec["attempts"] += 1
                teachers = clients(servers, cache, budget=32)
                try:
                    result = detect(student, scfg, teachers, dc)
                    break
                except TeacherError:
                    rec["reported_attempts"] += 1
                except Exception as e:  # noqa: BLE001
                    rec["crashes"] += 1
                    log(f"  mixed run {i}: CRASH {type(e).__name__}: {e}")
                    break
                finally:
                    rec["budget_exceeded"] += sum(t.stats.queries > 32 for t in teachers)
            rec["runs"] += 1
            for kinds_seen in actions(servers).values():
                for k in kinds_seen:
                    if k != "ok":
                        rec["injected"][k] = rec["injected"].get(k, 0) + 1
            for n, s in servers.items():
                rows = [row.tobytes() for r in s.seen if r["valid"] for row in r["x"]]
                rec["repeated"] += len(rows) - len(set(rows))
                # every answer received is in the cache once, and right
                from kdd_jax.teachers import probe_key

                want = {probe_key(n, "probs", np.frombuffer(b, np.float32).reshape(1, 12, 12)) for b in set(rows)}
                found = cache.get_many(sorted(want))
                rec["lost"] += len(want - set(found))
                for r in s.seen:
                    if r["valid"]:
                        good = inner[n].query(r["x"]).values
                        for j, row in enumerate(r["x"]):
                            hit = found.get(probe_key(n, "probs", row))
                            if hit is not None and not np.array_equal(np.frombuffer(hit[1], np.float32), good[j]):
                                rec["cache_rows_wrong"] += 1
                s.close()
            if result is not None:
                rec["completed"] += 1
                got = {"verdict": result.verdict.to_dict(), "sha": result.probes.sha256}
                same = compare_verdicts(got, reference)
                rec["verdict_changes"] += same == "changed"
                rec["verdicts_identical"] += same == "identical"
                rec["verdicts_within_tolerance"] += same == "within_tolerance"
            log(f"faults mixed run {i}: {'completed' if result is not None else 'NOT completed'} after "
                f"{attempt + 1} attempt(s)")
    rec["reference_winner"] = reference["verdict"]["winner"]
    return rec


# =============================================================================== kills

def kill_reference(fleet: Fleet, command: str, work: Path, env: dict, runs: int = 2) -> dict:
    """Uninterrupted runs (the first also warms the compilation cache; kill times are drawn over
    the last one's duration): the verdict, requests per teacher, the cache keys, the duration."""
    refs = []
    for i in range(runs):
        ref_run = work / f"kill-{command}-ref{i}"
        shutil.rmtree(ref_run, ignore_errors=True)
        fleet.reset("reference")
        t0 = time.perf_counter()
        p = fleet.start(fleet.argv(command, ref_run), env)
        stdout, stderr = p.communicate(timeout=900)
        seconds = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"reference kdd {command} failed: {stderr[-2000:]}")
        refs.append(verdict_of(command, stdout))
    return {"verdict": refs[-1], "agree": compare_verdicts(refs[0], refs[-1]), "seconds": seconds,
            "requests": {n: t.requests for n, t in fleet.teachers.items()}, "keys": cache_state(ref_run)[1]}


def kill_trial(fleet: Fleet, command: str, run: Path, env: dict, ref: dict, mode: str, rng: random.Random) -> dict:
    """One trial: start `kdd command`, SIGKILL it (mode: timer | request-before | request-after),
    inspect the cache, run the same command again, compare with the reference."""
    shutil.rmtree(run, ignore_errors=True)
    fleet.reset("killed")
    p = fleet.start(fleet.argv(command, run), env)

    def kill():
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = None
    if mode == "timer":
        at = rng.uniform(0.2, 1.05) * ref["seconds"]
        timer = threading.Timer(at, kill)
        timer.start()
        where = f"t={at:.1f}s"
    else:
        name = rng.choice(sorted(ref["requests"]))
        k = rng.randint(1, max(1, ref["requests"][name]))
        trig = (k, mode.split("-")[1], kill, rng.uniform(0.0, 0.03))
        with fleet.teachers[name].lock:
            fleet.teachers[name].trigger = trig
        where = f"{name} request {k} {trig[1]}"
    stdout, stderr = p.communicate(timeout=900)
    if timer is not None:
        timer.cancel()
    integrity, at_kill = cache_state(run)
    answered = fleet.answered("killed")
    t = {"mode": mode, "where": where, "exit": p.returncode, "stderr": stderr[-300:], "integrity_at_kill": integrity,
         "cached_at_kill": len(at_kill), "answered_before_kill": len(set(answered)),
         "checkpoint_at_kill": any(run.glob("out/**/synthesis-checkpoint/latest/meta.json")),
         "duplicates": len(answered) - len(set(answered))}
    fleet.set_phase("rerun")
    for teacher in fleet.teachers.values():
        with teacher.lock:
            teacher.trigger = None
    p2 = fleet.start(fleet.argv(command, run), env)
    stdout2, stderr2 = p2.communicate(timeout=900)
    integrity2, final = cache_state(run)
    rerun = fleet.answered("rerun")
    t.update({"rerun_exit": p2.returncode, "rerun_stderr": stderr2[-500:], "integrity_after": integrity2,
              "repeated": sum(k in at_kill for k in rerun),
              "in_flight_reasked": sum(k in set(answered) - at_kill for k in rerun),
              "lost": len(at_kill - final), "cache_matches_reference": final == ref["keys"],
              "duplicates": t["duplicates"] + len(rerun) - len(set(rerun)),
              "verdict": compare_verdicts(verdict_of(command, stdout2), ref["verdict"]) if p2.returncode == 0 else None})
    shutil.rmtree(run, ignore_errors=True)
    return t


def run_kills(cfg: dict, args, work: Path, fleet: Fleet) -> dict:
    rng = random.Random(f"{args.seed}/kills")
    env = cli_env(work)
    out = {}
    for command, n_trials in (("detect", cfg["kills_detect"]), ("audit", cfg["kills_audit"])):
        ref = kill_reference(fleet, command, work, env)
        rec = {"trials": 0, "killed": 0, "finished_before_kill": 0, "survived": 0, "rerun_failed": 0,
               "queries_repeated": 0, "answers_lost": 0, "in_flight_reasked": 0, "duplicates_within_a_run": 0,
               "cache_corrupt": 0, "cache_wrong_size": 0, "verdict_changes": 0, "verdicts_identical": 0, "modes": {},
               "kill_points": {"before_first_answer": 0, "during_queries": 0, "after_all_answers": 0},
               "checkpoint_present_at_kill": 0, "reference_seconds": ref["seconds"],
               "reference_requests": ref["requests"], "expected_answers": len(ref["keys"]),
               "references_agree": ref["agree"], "failures": []}
        for trial in range(n_trials):
            mode = ("timer", "request-before", "request-after")[trial % 3]
            t = kill_trial(fleet, command, work / f"kill-{command}-{trial}", env, ref, mode, rng)
            rec["trials"] += 1
            rec["modes"][mode] = rec["modes"].get(mode, 0) + 1
            killed = t["exit"] == -signal.SIGKILL
            if t["exit"] == 0:
                rec["finished_before_kill"] += 1
            elif killed:
                rec["killed"] += 1
                point = ("before_first_answer" if not t["answered_before_kill"] else
                         "during_queries" if t["answered_before_kill"] < len(ref["keys"]) else "after_all_answers")
                rec["kill_points"][point] += 1
                rec["checkpoint_present_at_kill"] += t["checkpoint_at_kill"]
            else:
                rec["failures"].append(f"trial {trial}: killed run exited {t['exit']}: {t['stderr']}")
            for key, field in (("queries_repeated", "repeated"), ("in_flight_reasked", "in_flight_reasked"),
                               ("answers_lost", "lost"), ("duplicates_within_a_run", "duplicates")):
                rec[key] += t[field]
            for when in ("integrity_at_kill", "integrity_after"):
                if t[when] not in ("ok", "absent"):
                    rec["cache_corrupt"] += 1
                    rec["failures"].append(f"trial {trial}: cache {when}: {t[when]}")
            if not t["cache_matches_reference"]:
                rec["cache_wrong_size"] += 1
                rec["failures"].append(f"trial {trial}: the cache holds other answers than the reference run's")
            if t["rerun_exit"] != 0:
                rec["rerun_failed"] += 1
                rec["failures"].append(f"trial {trial} ({t['where']}): re-run exited {t['rerun_exit']}: "
                                       f"{t['rerun_stderr']}")
            else:
                rec["verdict_changes"] += t["verdict"] == "changed"
                rec["verdicts_identical"] += t["verdict"] == "identical"
                if t["verdict"] == "changed":
                    rec["failures"].append(f"trial {trial} ({t['where']}): verdict changed")
                if killed and t["integrity_after"] == "ok" and t["verdict"] != "changed" and t["repeated"] == 0 \
                        and t["lost"] == 0:
                    rec["survived"] += 1
            log(f"kill {command} {trial} ({mode}, {t['where']}): exit {t['exit']}, {t['cached_at_kill']} cached at the "
                f"kill, re-run {t['rerun_exit']}, repeated {t['repeated']}, verdict {t['verdict']}")
        out[command] = rec
    return out


# =============================================================================== concurrency

def writer_task():
    """The cache writers' teacher (a fixed linear map named "lin") and probe pool; tests check
    stored rows against the same pair."""
    from kdd_jax.teachers import CallableTeacher, InputSpec

    pool = np.random.default_rng(12345).uniform(size=(600, 1, 4, 4)).astype(np.float32)
    w = np.random.default_rng(5).normal(size=(16, 5)).astype(np.float32)
    # einsum's own loop, not BLAS: each row's answer must not depend on the batch it came in (a BLAS
    # sgemm picks kernels by batch size, and on some CPUs their float32 sums differ in the last bit,
    # which the writers' exact check would report as a wrong answer)
    return CallableTeacher("lin", lambda x: np.einsum("nk,kc->nc", x.reshape(len(x), -1), w, optimize=False),
                           num_classes=5, spec=InputSpec((4, 4), 1)), pool


def cache_writer(path: Path, seed: int, log_path: Path, seconds: float) -> None:
    """Worker: random overlapping queries through one shared cache; logs the keys it got back
    (exit status 3 if an answer differs from the teacher's), and in `<log>.asked` the keys its
    teacher was asked (written before answering: a probe paid for twice shows up twice)."""
    from kdd_jax.teachers import CachedTeacher, CallableTeacher, ResponseCache, probe_key

    teacher, pool = writer_task()
    asked_log = open(log_path.with_name(log_path.name + ".asked"), "a")  # noqa: SIM115 - for the worker's life

    def asking(x):
        asked_log.write("".join(probe_key("lin", "logits", p) + "\n" for p in x))
        asked_log.flush()
        return teacher.query(x).values

    logged = CallableTeacher("lin", asking, num_classes=teacher.num_classes, spec=teacher.spec)
    rng = np.random.default_rng(seed)
    cached = CachedTeacher(logged, ResponseCache(path), batch_size=int(rng.integers(8, 64)))
    stop = time.monotonic() + seconds
    with open(log_path, "a") as f:
        while time.monotonic() < stop:
            idx = rng.choice(len(pool), size=int(rng.integers(10, 120)), replace=False)
            out = cached.query(pool[idx])
            if not np.array_equal(out.values, teacher.query(pool[idx]).values):
                sys.exit(3)
            f.write("".join(probe_key("lin", "logits", pool[i]) + "\n" for i in idx))
            f.flush()


def run_concurrency(cfg: dict, args, work: Path, fleet: Fleet) -> dict:
    from kdd_jax.teachers import CallableTeacher, InputSpec, probe_key

    rng = random.Random(f"{args.seed}/concurrency")
    env = cli_env(work)
    # (a) kdd detect processes at once on one cache
    cli = {"rounds": 0, "processes": 0, "failed": 0, "cache_corrupt": 0, "answers_lost": 0, "verdict_changes": 0,
           "verdicts_identical": 0,
           "concurrent_duplicate_queries": 0, "answers": 0}
    references = {}
    for seed in (0, 1):
        run = work / f"conc-ref-{seed}"
        shutil.rmtree(run, ignore_errors=True)
        p = fleet.start(fleet.argv("detect", run, seed=seed), env)
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"reference detect failed: {stderr[-2000:]}")
        references[seed] = verdict_of("detect", stdout)
        shutil.rmtree(run, ignore_errors=True)
    for r in range(cfg["conc_cli_rounds"]):
        root = work / f"conc-cli-{r}"
        shutil.rmtree(root, ignore_errors=True)
        fleet.reset("concurrent")
        seeds = [i // 2 for i in range(cfg["conc_cli"])]  # pairs with the same seed ask the same probes
        procs = []
        for i, seed in enumerate(seeds):
            run = root / f"p{i}"
            argv = fleet.argv("detect", run, seed=seed)
            argv[argv.index("--cache") + 1] = str(root / "cache")
            procs.append((seed, fleet.start(argv, env)))
        for seed, p in procs:
            stdout, stderr = p.communicate(timeout=900)
            cli["processes"] += 1
            if p.returncode != 0:
                cli["failed"] += 1
                log(f"  concurrent detect failed: {stderr[-500:]}")
                continue
            same = compare_verdicts(verdict_of("detect", stdout), references[seed])
            cli["verdict_changes"] += same == "changed"
            cli["verdicts_identical"] += same == "identical"
        integrity, keys = cache_state(root)
        answered = fleet.answered("concurrent")
        cli["rounds"] += 1
        cli["answers"] += len(set(answered))
        cli["cache_corrupt"] += integrity != "ok"
        cli["answers_lost"] += len(set(answered) - keys)
        cli["concurrent_duplicate_queries"] += len(answered) - len(set(answered))
        log(f"concurrency: {len(procs)} kdd detect at once, round {r}: cache {integrity}, {len(keys)} answers")
        shutil.rmtree(root, ignore_errors=True)
    # (b) library processes hammering one cache, one SIGKILLed per round
    lib = {"rounds": 0, "processes": 0, "killed": 0, "failed": 0, "cache_corrupt": 0, "answers_lost": 0,
           "wrong_values": 0, "unknown_rows": 0, "answers_logged": 0, "cache_rows": 0,
           "probes_asked": 0, "asked_twice": 0, "asked_again_after_kill": 0}
    pool = np.random.default_rng(12345).uniform(size=(600, 1, 4, 4)).astype(np.float32)
    w = np.random.default_rng(5).normal(size=(16, 5)).astype(np.float32)
    teacher = CallableTeacher("lin", lambda x: x.reshape(len(x), -1) @ w, num_classes=5, spec=InputSpec((4, 4), 1))
    truth = {probe_key("lin", "logits", pool[i]): teacher.query(pool[i : i + 1]).values[0] for i in range(len(pool))}
    for r in range(cfg["conc_rounds"]):
        root = work / f"conc-lib-{r}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        procs = []
        for i in range(cfg["conc_procs"]):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "cache", "--cache",
                   str(root / "c.sqlite"), "--seed", str(1000 * r + i), "--log", str(root / f"log{i}"),
                   "--seconds", str(cfg["conc_seconds"])]
            procs.append(subprocess.Popen(cmd, cwd=str(REPO), env=cli_env(work), stderr=subprocess.PIPE, text=True))
        victim = rng.randrange(len(procs))
        time.sleep(rng.uniform(2.5, 2.5 + cfg["conc_seconds"]))  # imports take ~2 s
        procs[victim].kill()
        for i, p in enumerate(procs):
            _, err = p.communicate(timeout=300)
            lib["processes"] += 1
            if i == victim and p.returncode == -signal.SIGKILL:
                lib["killed"] += 1
            elif p.returncode != 0:
                lib["failed"] += 1
                log(f"  cache writer {i} exited {p.returncode}: {err[-500:]}")
        conn = sqlite3.connect(root / "c.sqlite", timeout=60)
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        rows = conn.execute("SELECT key, vals FROM responses").fetchall()
        conn.close()
        logged = set()
        for i in range(len(procs)):
            lp = root / f"log{i}"
            if lp.exists():
                logged |= {line for line in lp.read_text().split("\n") if len(line) == 64}
        stored = {k: np.frombuffer(v, np.float32) for k, v in rows}
        # probes paid for more than once: among the survivors (goal 0: concurrent misses are claimed), and
        # ones the killed writer had asked but not stored, which a survivor then had to ask again
        asked = {}
        for i in range(len(procs)):
            lp = root / f"log{i}.asked"
            for line in (lp.read_text().split("\n") if lp.exists() else []):
                if len(line) == 64:
                    asked.setdefault(line, []).append(i)
        lib["probes_asked"] += sum(len(v) for v in asked.values())
        for who in asked.values():
            survivors = sum(i != victim for i in who)
            lib["asked_twice"] += max(0, survivors - 1)
            lib["asked_again_after_kill"] += (len(who) - 1 - max(0, survivors - 1)) if victim in who else 0
        lib["rounds"] += 1
        lib["cache_corrupt"] += integrity != "ok"
        lib["answers_logged"] += len(logged)
        lib["cache_rows"] += len(stored)
        lib["answers_lost"] += len(logged - set(stored))
        lib["unknown_rows"] += len(set(stored) - set(truth))
        # (a row computed alone may differ from one computed in a batch in the last bits: BLAS kernels)
        lib["wrong_values"] += sum(not np.allclose(v, truth[k], rtol=1e-5, atol=1e-6) for k, v in stored.items()
                                   if k in truth)
        log(f"concurrency: {len(procs)} cache writers, round {r} (one killed): {integrity}, {len(stored)} rows")
        shutil.rmtree(root, ignore_errors=True)
    return {"cli": cli, "library": lib}


# =============================================================================== determinism

def run_determinism(cfg: dict, args, work: Path, fleet: Fleet) -> dict:
    def detect_run(tag, seed=0, devices=None, compile_cache=True, teachers=None):
        run = work / f"det-{tag}"
        shutil.rmtree(run, ignore_errors=True)
        p = fleet.start(fleet.argv("detect", run, seed=seed, teachers=teachers), cli_env(work, devices, compile_cache))
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"detect ({tag}) failed: {stderr[-2000:]}")
        shutil.rmtree(run, ignore_errors=True)
        return json.loads(stdout)

    runs = {"a": detect_run("a"), "b": detect_run("b"), "seed1": detect_run("seed1", seed=1),
            "no_compile_cache": detect_run("nocc", compile_cache=False),
            "local_1dev": detect_run("l1", devices=1, teachers=fleet.local_tfile),
            "local_8dev": detect_run("l8", devices=8, teachers=fleet.local_tfile)}

    def same(x, y):
        return verdict_of("detect", json.dumps(x)) == verdict_of("detect", json.dumps(y))

    one, eight = runs["local_1dev"], runs["local_8dev"]
    v1, v8 = one["verdict"], eight["verdict"]
    diffs = {}
    for field in ("scores", "intervals", "margin", "p_value"):
        a, b = np.asarray(v1[field], np.float64), np.asarray(v8[field], np.float64)
        diffs[field] = float(np.max(np.abs(a - b) / (1e-6 + 1e-5 * np.abs(a)))) if a.size else 0.0
    within = all(np.allclose(np.asarray(v1[f], np.float64), np.asarray(v8[f], np.float64), rtol=1e-5, atol=1e-6)
                 for f in ("scores", "intervals", "margin", "p_value"))
    return {
        "same_seed_identical": same(runs["a"], runs["b"]),
        "same_seed_sha256": runs["a"]["probes"]["sha256"],
        "other_seed_differs": runs["seed1"]["probes"]["sha256"] != runs["a"]["probes"]["sha256"],
        "compile_cache_changes_nothing": same(runs["a"], runs["no_compile_cache"]),
        "http_equals_local_teachers": same(runs["a"], runs["local_1dev"]),
        "devices_probes_identical": one["probes"]["sha256"] == eight["probes"]["sha256"],
        "devices_same_answer": one["answer"] == eight["answer"] and v1["winner"] == v8["winner"],
        "devices_within_tolerance": within,
        "devices_bitwise_identical": v1 == v8,
        "devices_max_diff_in_tolerance_units": diffs,
        "winner": runs["a"]["verdict"]["winner"],
    }


# =============================================================================== report

def headline(res: dict) -> list[tuple[str, str, str]]:
    rows = []
    fz = res.get("fuzz")
    if fz:
        total = sum(r["n"] for r in fz.values())
        crashes = sum(r["counts"]["crash"] for r in fz.values())
        rows.append(("inputs fuzzed", f"{total:,} (" + ", ".join(f"{t} {r['n']:,}" for t, r in fz.items()) + ")", "-"))
        rows.append(("fuzz crashes (anything but accepted or our clear error)", str(crashes), "0"))
        if "pickle" in fz:
            rows.append(("pickle payloads executed", f"{fz['pickle'].get('executed', 0)} of {fz['pickle']['n']}", "0"))
    fa = res.get("faults")
    if fa:
        pk = fa["per_kind"]
        inj = {k: r["injected"] for k, r in pk.items()}
        for k, v in fa["mixed"]["injected"].items():
            inj[k] = inj.get(k, 0) + v
        rows.append(("faults injected, by kind", f"{sum(inj.values()):,} (" + ", ".join(f"{k} {v}" for k, v in inj.items())
                     + ")", "-"))
        doc = sum(r["as_documented"] for r in pk.values())
        rows.append(("faults handled as documented (per-kind trials)", f"{doc} of {sum(r['injected'] for r in pk.values())}",
                     "all"))
        m = fa["mixed"]
        rows.append(("flaky-API detections completed", f"{m['completed']} of {m['runs']} ({m['attempts']} attempts)", "all"))
    ki = res.get("kills")
    if ki:
        killed = sum(r["killed"] for r in ki.values())
        rows.append(("kills survived (SIGKILL; the re-run completes with the same verdict, cache intact, nothing "
                     "asked again or lost)",
                     f"{sum(r['survived'] for r in ki.values())} of {killed} ("
                     + ", ".join(f"{c} {r['survived']}/{r['killed']}" for c, r in ki.items()) + ")", "all"))
    rep = lost = changes = crashes = budget = corrupt = 0
    if fa:
        rep += sum(r["repeated"] for r in fa["per_kind"].values()) + fa["mixed"]["repeated"]
        lost += sum(r["lost"] for r in fa["per_kind"].values()) + fa["mixed"]["lost"]
        changes += fa["mixed"]["verdict_changes"]
        crashes += sum(r["crashes"] for r in fa["per_kind"].values()) + fa["mixed"]["crashes"]
        budget += sum(r["budget_exceeded"] for r in fa["per_kind"].values()) + fa["mixed"]["budget_exceeded"]
    if ki:
        rep += sum(r["queries_repeated"] for r in ki.values())
        lost += sum(r["answers_lost"] for r in ki.values())
        changes += sum(r["verdict_changes"] for r in ki.values())
        crashes += sum(r["rerun_failed"] for r in ki.values())
        corrupt += sum(r["cache_corrupt"] for r in ki.values())
    co = res.get("concurrency")
    if co:
        lost += co["cli"]["answers_lost"] + co["library"]["answers_lost"]
        changes += co["cli"]["verdict_changes"]
        crashes += co["cli"]["failed"] + co["library"]["failed"]
        corrupt += co["cli"]["cache_corrupt"] + co["library"]["cache_corrupt"]
    de = res.get("determinism")
    if de:
        changes += (not de["same_seed_identical"]) + (not de["compile_cache_changes_nothing"])
    if fz:
        crashes += sum(r["counts"]["crash"] for r in fz.values())
    if fa or ki:
        rows.append(("queries repeated (a probe answered again after its answer was received)", str(rep), "0"))
    if co:
        twice = co["cli"]["concurrent_duplicate_queries"] + co["library"].get("asked_twice", 0)
        rows.append(("probes paid twice by processes missing the cache at once (live ones)", str(twice), "0"))
    if fa or ki or co:
        rows.append(("answers lost (received, then missing from the cache)", str(lost), "0"))
        rows.append(("cache corruptions (integrity_check)", str(corrupt), "0"))
    if fa:
        rows.append(("query budget exceeded", str(budget), "0"))
    if fa or ki or co or de:
        rows.append(("verdict changes (vs fault-free / uninterrupted / same-seed run)", str(changes), "0"))
    rows.append(("crashes (all parts)", str(crashes), "0"))
    return rows


def write_report(res: dict, out: Path, name: str) -> None:
    m = res["meta"]
    L = ["# Reliability and security", "",
         f"Machine: {m['machine']['cpu_model']}, {m['machine']['usable_cpus']} CPUs (shared with other jobs: load "
         f"average at start / end {m['loadavg_start']} / {m['loadavg_end']}); versions: {m['versions']}; "
         f"date {m['date']}.", f"Command: `{m['command']}` ({m['wall_seconds']:.0f} s).", "",
         "## Figures", "", "| figure | value | goal |", "|---|---|---|"]
    L += [f"| {a} | {b} | {c} |" for a, b, c in headline(res)]
    L.append("")
    fz = res.get("fuzz")
    if fz:
        L += ["## Hostile inputs (fuzz)", "",
              "Each target runs in its own worker process, inputs generated from `--seed` (random, and mutations of "
              "valid inputs: byte flips/inserts/deletes/truncation, edited fields with edge values (0, -1, 2^31..2^64, "
              "10^400, NaN, Inf, huge strings, path tricks `../`, NUL, lone surrogates, RTL overrides), deep and huge "
              "JSON, memory bombs, YAML alias bombs and code tags). Crash = anything but accepted or our clear "
              f"error (see the module docstring); per-input limit {res['meta']['input_timeout']:g} s.", "",
              "| target | inputs | accepted | clear error | crash | s | notes |", "|---|---|---|---|---|---|---|"]
        for t, r in fz.items():
            c = r["counts"]
            note = ""
            if t == "safetensors":
                note = (f"largest peak of traced memory {r.get('max_peak_bytes', 0) / 1024:.0f} KiB; at most "
                        f"{100 * r.get('max_peak_of_bound', 0):.0f}% of the bound (256 KiB + 32 x the file size)")
            if t == "pickle":
                note = (f"payloads executed: {r.get('executed', 0)}; controls that DO run under plain pickle: "
                        f"{r.get('controls_live', 0)} of {r.get('controls', 0)}")
            if t == "convert":
                note = "nothing written outside the output folder (a canary folder, linked from it, checked each input)"
            if r.get("worker_died"):
                note = "WORKER DIED: " + r["crashes"][0]["error"][:200]
            L.append(f"| {t} | {r['n']:,} | {c['accepted']:,} | {c['clear_error']:,} | {c['crash']} | {r['wall_s']:.0f} | {note} |")
        L += ["", "Inputs per generator (accepted / clear error / crash):", ""]
        for t, r in fz.items():
            parts = ", ".join(f"{k} {v['accepted']}/{v['clear_error']}/{v['crash']}" for k, v in sorted(r["by_label"].items()))
            L.append(f"- {t}: {parts}")
        crashes = [c for r in fz.values() for c in r["crashes"]]
        if crashes:
            L += ["", "Crashes (first ones; reproducers kept under --work):", ""]
            L += [f"- {c.get('label', '?')}: {c['error'][:300]}" for c in crashes[:10]]
        L.append("")
    fa = res.get("faults")
    if fa:
        L += ["## Flaky teacher API (faults)", "",
              "Per kind: trials of 16 probes in 4 requests (concurrency 1 or 2) with 1-2 faults after 0-3 good "
              "answers; client timeout 0.5 s for slow/loris (server: 0.8 s latency, a byte every 20 ms), 2 s "
              "otherwise; max_retries 3; budget 16. Then a fault-free re-run on the same cache. 'as documented': "
              "transient faults retried (retries == faults) and the query completed; wrong answers ended the "
              "query with TeacherError at the first one, unretried; latency spikes below the timeout waited for.", "",
              "| kind | documented | injected | as documented | retried | reported | crashes | repeated | lost | "
              "wrong cached | budget exceeded |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, r in fa["per_kind"].items():
            ra = "" if r["retry_after_honoured"] is None else f" (Retry-After honoured: {r['retry_after_honoured']})"
            L.append(f"| {k} | {r['documented']}{ra} | {r['injected']} | {r['as_documented']} | {r['retried']} | "
                     f"{r['reported']} | {r['crashes']} | {r['repeated']} | {r['lost']} | {r['wrong_cached']} | "
                     f"{r['budget_exceeded']} |")
        m = fa["mixed"]
        L += ["", f"Whole detections (toy zoo student, 2 HTTP teachers behind fault servers, 32 probes / 20 steps, "
                  f"requests of 4 probes, concurrency 2, timeout 0.5 s, max_retries 4, budget 32 per teacher), a fault "
                  f"drawn per request with probability {res['meta']['config']['fault_p']}, uniformly among the kinds; "
                  f"after a reported fault the detection is simply run again on the same cache.", "",
              f"- runs {m['runs']}, completed {m['completed']}, attempts {m['attempts']} "
              f"({m['reported_attempts']} ended by a reported fault), crashes {m['crashes']}",
              f"- faults injected: {m['injected']}",
              f"- verdict changes vs the fault-free run (verdict and probe sha256; every number within rtol 1e-5): "
              f"{m['verdict_changes']}; bitwise identical: {m['verdicts_identical']} of {m['completed']} "
              f"(fault-free winner: {m['reference_winner']})",
              f"- probes answered more than once: {m['repeated']}; answers received but not cached: {m['lost']}; "
              f"cached rows differing from the teacher's answer: {m['cache_rows_wrong']}; budget exceeded: "
              f"{m['budget_exceeded']}",
              f"- a budget one probe short is refused before anything is sent: {m['budget_refused_before_sending']}", ""]
    ki = res.get("kills")
    if ki:
        L += ["## Interrupted work (SIGKILL)", "",
              f"`kdd detect` ({' '.join(DETECT)}) and `kdd audit` (4 students, {' '.join(AUDIT)}, --resume) as "
              "subprocesses, two HTTP teachers (OipServer, as `kdd serve`, requests of "
              f"{HTTP_BATCH} probes, concurrency 2) logging every row they answer. Kill modes in turn: at a random time "
              "in [0.2, 1.05] x the uninterrupted run's duration; when a random teacher request arrives (before "
              "answering it); 0-30 ms after a random request was answered (the window between the answer and the "
              "cache write). Then the same command again.", "",
              "| command | trials | killed | finished first | survived | re-run failed | queries repeated | answers "
              "lost | in flight, re-asked | cache corrupt | verdict changes | kill points (none / during / after "
              "queries) | checkpoint at kill |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c, r in ki.items():
            kp = r["kill_points"]
            L.append(f"| {c} | {r['trials']} | {r['killed']} | {r['finished_before_kill']} | {r['survived']} | "
                     f"{r['rerun_failed']} | {r['queries_repeated']} | {r['answers_lost']} | {r['in_flight_reasked']} | "
                     f"{r['cache_corrupt']} | {r['verdict_changes']} | {kp['before_first_answer']} / "
                     f"{kp['during_queries']} / {kp['after_all_answers']} | {r['checkpoint_present_at_kill']} |")
        L += ["", "Verdicts of the re-runs bitwise identical to the uninterrupted run's: "
              + ", ".join(f"{c} {r['verdicts_identical']} of {r['trials'] - r['rerun_failed']}" for c, r in ki.items())
              + "; the two uninterrupted runs agree: " + ", ".join(f"{c} {r['references_agree']}" for c, r in ki.items())
              + f". Uninterrupted (warm) run: " + ", ".join(f"{c} {r['reference_seconds']:.1f} s" for c, r in ki.items())
              + ". 'survived': killed by the signal; the re-run exits 0, the cache is intact, nothing is asked again "
              "or lost, the verdict is unchanged.", ""]
        L += ["'in flight, re-asked': rows the server had answered whose answers the killed process had not yet "
                  "stored (at most one request per connection); they are asked again by the re-run, as they must be. "
                  "Not a goal: no client can keep an answer it never received.", ""]
        fails = [f for r in ki.values() for f in r["failures"]]
        if fails:
            L += ["Failures:", ""] + [f"- {f[:400]}" for f in fails[:20]] + [""]
    co = res.get("concurrency")
    if co:
        c, b = co["cli"], co["library"]
        L += ["## Concurrent processes on one cache", "",
              f"- `kdd detect` x {res['meta']['config']['conc_cli']} at once, {c['rounds']} round(s), pairs with one "
              f"seed: failed {c['failed']}, cache corrupt {c['cache_corrupt']}, answers lost {c['answers_lost']} of "
              f"{c['answers']}, verdict changes vs a lone run {c['verdict_changes']}; probes answered twice because "
              f"two processes missed the cache at the same moment: {c['concurrent_duplicate_queries']} (goal 0: probes "
              "being asked are claimed in the cache, and the other processes wait for their answers)",
              f"- library writers x {res['meta']['config']['conc_procs']}, {b['rounds']} round(s) of "
              f"{res['meta']['config']['conc_seconds']:g} s, one SIGKILLed per round ({b['killed']} killed): failed "
              f"{b['failed']}, cache corrupt {b['cache_corrupt']}, answers returned to a process but missing from the "
              f"cache {b['answers_lost']} (of {b['answers_logged']}), wrong values {b['wrong_values']}, unknown rows "
              f"{b['unknown_rows']}; {b['cache_rows']} rows in all; probes asked {b.get('probes_asked', '-')}, asked "
              f"twice by surviving writers {b.get('asked_twice', '-')} (goal 0: concurrent misses are claimed), asked "
              f"again after the killed writer had asked them {b.get('asked_again_after_kill', '-')} (its claims are "
              "taken over)", ""]
    de = res.get("determinism")
    if de:
        L += ["## Determinism", "",
              f"- same seed, two runs: probe sha256 and verdict identical: {de['same_seed_identical']} "
              f"(sha256 {de['same_seed_sha256'][:16]}..., winner {de['winner']})",
              f"- another seed gives other probes: {de['other_seed_differs']}",
              f"- without the persistent compilation cache: identical: {de['compile_cache_changes_nothing']}",
              f"- HTTP teachers vs in-process teachers: identical: {de['http_equals_local_teachers']}",
              f"- 1 vs 8 forced CPU devices (XLA_FLAGS, subprocesses): probes identical {de['devices_probes_identical']}, "
              f"same answer {de['devices_same_answer']}, scores/intervals/margin/p within rtol 1e-5 atol 1e-6: "
              f"{de['devices_within_tolerance']} (bitwise identical: {de['devices_bitwise_identical']}; largest "
              f"difference in units of the tolerance: "
              + ", ".join(f"{k} {v:.2g}" for k, v in de["devices_max_diff_in_tolerance_units"].items()) + ")", ""]
    from benchmarks.provenance import finite_or_null  # strict JSON: a non-finite number is null
    from kdd_jax.io import atomic_write_bytes  # a run killed mid-write leaves the previous files whole

    atomic_write_bytes(out / f"{name}.md", ("\n".join(L) + "\n").encode())
    atomic_write_bytes(out / f"{name}.json", (json.dumps(finite_or_null(res), indent=1, default=float,
                                                         allow_nan=False) + "\n").encode())


# =============================================================================== main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "_work" / "reliability"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input-timeout", type=float, default=30.0, help="seconds one fuzz input may take")
    for t in FUZZ_TARGETS:
        ap.add_argument(f"--fuzz-{t}", type=int, help=f"inputs for the {t} fuzz target")
    for k in ("fault_trials", "mixed_runs", "kills_detect", "kills_audit", "conc_cli", "conc_procs", "conc_rounds"):
        ap.add_argument("--" + k.replace("_", "-"), type=int)
    # worker modes (internal)
    ap.add_argument("--worker", choices=["fuzz", "cache"], help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    if args.worker == "fuzz":
        fuzz_worker(args.target, args.n, args.seed, work, Path(args.result), args.input_timeout)
        return 0
    if args.worker == "cache":
        cache_writer(Path(args.cache), args.seed, Path(args.log), args.seconds)
        return 0

    from kdd_jax.versions import machine, versions

    cfg = copy.deepcopy(QUICK if args.quick else FULL)
    for t in FUZZ_TARGETS:
        if getattr(args, f"fuzz_{t}") is not None:
            cfg["fuzz"][t] = getattr(args, f"fuzz_{t}")
    for k in ("fault_trials", "mixed_runs", "kills_detect", "kills_audit", "conc_cli", "conc_procs", "conc_rounds"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load0 = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    res: dict = {"kind": BENCH_KIND}
    if "fuzz" in parts:
        res["fuzz"] = run_fuzz(cfg, args, work)
    if "faults" in parts:
        res["faults"] = run_faults(cfg, args, work)
    fleet = Fleet(work) if {"kills", "concurrency", "determinism"} & set(parts) else None
    try:
        if "kills" in parts:
            res["kills"] = run_kills(cfg, args, work, fleet)
        if "concurrency" in parts:
            res["concurrency"] = run_concurrency(cfg, args, work, fleet)
        if "determinism" in parts:
            res["determinism"] = run_determinism(cfg, args, work, fleet)
    finally:
        if fleet is not None:
            fleet.close()
    res["meta"] = {"machine": machine(), "versions": versions(), "date": datetime.date.today().isoformat(),
                   "command": " ".join(["python benchmarks/reliability.py",
                                        *map(shlex.quote, argv if argv is not None else sys.argv[1:])]),
                   "wall_seconds": time.perf_counter() - started, "loadavg_start": load0,
                   "loadavg_end": [round(x, 2) for x in os.getloadavg()], "config": cfg, "seed": args.seed,
                   "input_timeout": args.input_timeout, "parts": parts}
    name = "reliability_quick" if args.quick else "reliability"
    write_report(res, out, name)
    for a, b, c in headline(res):
        print(f"{a}: {b} (goal {c})")
    log(f"wrote {out / (name + '.md')} in {res['meta']['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
