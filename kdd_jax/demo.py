"""`kdd demo`: the whole product on a bundled zoo, with nothing downloaded and no GPU.

The bundled zoo (kdd_jax/demo_zoo/, a few MB) holds real Fashion-MNIST teachers and students
taken from the benchmark zoo (benchmarks/zoo/, made by benchmarks/zoo/make_demo_zoo.py):
students distilled from known teachers with different recipes, and one trained without any
teacher, plus a pool of unlabelled Fashion-MNIST test images that no zoo model trained on. The
probes are chosen from that pool by the membership-inference filter (`mia`, the best method on
the benchmark zoo, where data-free synthesis reaches 0.46 against mia's 0.71); `--method pixel` runs
data-free synthesis instead (the student seeing its probes under noise, pixel's default). The demo serves every teacher over HTTP on loopback with `kdd serve` (one subprocess
each, the Open Inference Protocol v2) and audits every student through the HTTP client and the
response cache with `kdd_jax.audit.audit` (per-student reports, summary.json/csv, index.html),
adding what only the demo knows: each student's true teacher and whether the answer is right.
A re-run into the same folder keeps the students finished with the same settings and redoes
the others.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

DEMO_ZOO = Path(__file__).resolve().parent / "demo_zoo"
_URL = re.compile(r" at (http://127\.0\.0\.1:\d+)/v2/models/")


class DemoError(RuntimeError):
    pass


def _launch_server(teacher_dir: Path, name: str, output: str) -> tuple[subprocess.Popen, dict]:
    """`kdd serve` in a subprocess on a free loopback port; its URL arrives in the returned dict
    (see `_server_url`). Launch every server before waiting on any: they start side by side."""
    cmd = [sys.executable, "-m", "kdd_jax", "serve", str(teacher_dir), "--port", "0", "--name", name,
           "--output", output, "-q"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    found: dict = {"lines": []}

    def read():
        for line in proc.stderr:  # keep draining so the server never blocks on a full pipe
            found["lines"].append(line)
            m = _URL.search(line)
            if m and "url" not in found:
                found["url"] = m.group(1)

    found["reader"] = threading.Thread(target=read, daemon=True)
    found["reader"].start()
    return proc, found


def _server_url(proc: subprocess.Popen, found: dict, name: str, deadline: float) -> str:
    """The base URL a launched server announces; DemoError if it exits or misses the deadline."""
    while "url" not in found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            found["reader"].join(timeout=5)  # the server may have exited before its last lines (its error) were read
            errors = [line for line in found["lines"] if line.startswith("kdd serve:")]
            raise DemoError(f"kdd serve for teacher {name!r} did not start:\n" + "".join(errors or found["lines"][-20:]))
        time.sleep(0.05)
    return found["url"]


def _read_manifest(path: Path) -> dict:
    """The demo manifest, checked field by field so a broken zoo fails before any server starts."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DemoError(f"{path}: cannot read the demo manifest: {e}") from None
    if not isinstance(manifest, dict) or not manifest.get("teachers") or not manifest.get("students"):
        raise DemoError(f"{path}: needs non-empty 'teachers' and 'students' lists")
    for role, fields in (("teachers", ("name", "dir")), ("students", ("name", "dir", "description"))):
        for i, entry in enumerate(manifest[role]):
            missing = [f for f in fields if not isinstance(entry, dict) or not isinstance(entry.get(f), str)]
            if missing:
                raise DemoError(f"{path}: {role}[{i}] lacks {missing}")
            if not (path.parent / entry["dir"]).is_dir():
                raise DemoError(f"{path}: {role}[{i}] ({entry['name']}): directory {entry['dir']!r} not found")
            if role == "teachers" and (not entry["name"] or any(c in entry["name"] for c in "\0/\\")):
                raise DemoError(f"{path}: teachers[{i}].name {entry['name']!r} must be non-empty without slashes "
                                "(it names the teacher's server and its answers in the response cache)")
        names = [e["name"] for e in manifest[role]]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DemoError(f"{path}: duplicate {role[:-1]} names {dupes}")
    pool = manifest.get("pool")
    if pool is not None and not (isinstance(pool, dict) and isinstance(pool.get("file"), str)):
        raise DemoError(f"{path}: 'pool' must be an object with a 'file' name")
    return manifest


DEMO_STEPS = 60  # synthesis steps of the optimised methods (pixel, confidence, generator): a short demo


def run_demo(out: str | Path, *, zoo: str | Path = DEMO_ZOO, probes: int = 64, steps: int | None = None, seed: int = 0,
             method: str = "mia", aug_noise: float | None = None, quiet: bool = False) -> dict:
    """Serve the zoo's teachers, audit every student (kdd_jax.audit), return the summary dict
    (`students`: the audit's rows plus description / truth / correct; `failed`: name -> error).
    `steps`: synthesis steps of the optimised methods (default DEMO_STEPS); the pool methods and
    noise optimise nothing and refuse it. `aug_noise`: the noise the optimised methods' student sees
    (None: the method's default, 1.0 for pixel; 0 gives pixel probes as before that default)."""
    from kdd_jax.audit import audit
    from kdd_jax.config import load_config
    from kdd_jax.detect import DetectConfig
    from kdd_jax.io import atomic_write_json
    from kdd_jax.synthesis import OPTIMISED_METHODS, POOL_METHODS, SynthesisConfig
    from kdd_jax.teachers import CachedTeacher, ResponseCache
    from kdd_jax.teachers.config import load_teachers_file, open_teacher

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    # checked before any server starts: a setting the method ignores is an error, never silently recorded
    if steps is None and method in OPTIMISED_METHODS:
        steps = DEMO_STEPS
    sc = SynthesisConfig(method=method, n_probes=probes, seed=seed, aug_noise=aug_noise,
                         **({} if steps is None else {"steps": steps}))
    zoo, out = Path(zoo), Path(out)
    manifest_path = zoo / "manifest.json"
    if not manifest_path.is_file():
        raise DemoError(f"{zoo}: no demo zoo here (missing manifest.json)")
    manifest = _read_manifest(manifest_path)
    known = {s["name"]: s for s in manifest["students"]}
    pool_for = None
    if method in POOL_METHODS:
        if manifest.get("pool") is None:
            raise DemoError(f"{manifest_path}: method {method!r} chooses probes from an image pool and this zoo "
                            "has none (no 'pool' entry); use --method pixel")
        pool_path = zoo / manifest["pool"]["file"]
        if not pool_path.is_file():
            raise DemoError(f"{manifest_path}: pool file {manifest['pool']['file']!r} not found")
        from kdd_jax.synthesis import ImagePool

        pool_for = lambda config: ImagePool.from_file(pool_path, config)  # noqa: E731  (checked per student)

    def provenance(row: dict) -> dict:  # the demo's columns in the audit summary
        s = known[row["student"]]
        truth = s.get("teacher")
        return {"description": s["description"], "truth": truth or "none",
                "correct": (row["answer"] == truth) if truth else None}

    last = [0.0]

    def progress(step, loss):
        now = time.perf_counter()
        if now - last[0] > 2 or step == sc.steps:
            last[0] = now
            say(f"    synthesis {step}/{sc.steps}  loss {loss:.3f}")

    out.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        say(f"serving {len(manifest['teachers'])} teachers over HTTP on 127.0.0.1 (kdd serve) ...")
        launched = []
        for t in manifest["teachers"]:
            proc, found = _launch_server(zoo / t["dir"], t["name"], t.get("output", "probs"))
            procs.append(proc)
            launched.append(found)
        deadline = time.monotonic() + 180.0
        entries = []
        for t, proc, found in zip(manifest["teachers"], procs, launched):
            url = _server_url(proc, found, t["name"], deadline)
            tdir = zoo / t["dir"]
            pre = load_config(tdir / "config.json")
            entries.append({"name": t["name"], "kind": "http", "url": url, "model": t["name"],
                            "output": t.get("output", "probs"), "input_size": list(pre.preprocessing.input_size),
                            "channels": pre.preprocessing.channels,
                            "value_range": list(pre.preprocessing.value_range), "num_classes": pre.arch.num_classes})
            say(f"  {t['name']}: {url}/v2/models/{t['name']} ({t.get('output', 'probs')})")
        teachers_file = out / "teachers.json"
        atomic_write_json(teachers_file, {"teachers": entries})
        cache = ResponseCache(out / "cache" / "responses.sqlite")
        teachers = [CachedTeacher(open_teacher(e), cache) for e in load_teachers_file(teachers_file)]
        dc = DetectConfig(synthesis=sc)
        say(f"auditing {len(known)} students -> {out}")
        # the folder is the demo's own: finished students are kept, ones made with other settings redone
        result = audit([(s["name"], zoo / s["dir"]) for s in manifest["students"]], teachers, dc, out, resume=True,
                       redo_stale=True, pool_for=pool_for, log=say, synthesis_progress=progress,
                       extra_columns=provenance)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    order = {s["name"]: i for i, s in enumerate(manifest["students"])}  # the table follows the manifest
    return {"command": "demo", "out": str(out), "teachers": result.teachers,
            "settings": {"method": method, "probes": probes, "seed": seed, "score": dc.score}
            | ({"steps": sc.steps, "aug_noise": sc.aug_noise} if method in OPTIMISED_METHODS else {}),
            "students": sorted(result.rows, key=lambda r: order[r["student"]]),
            "failed": {n: result.failed[n] for n in sorted(result.failed, key=order.get)},
            "skipped": result.skipped, "queries": result.queries, "seconds": result.seconds,
            "zoo": manifest.get("source", {})}


def verdict_table(summary: dict) -> str:
    rows = [("student", "trained as", "answer", "margin", "p-value", "")]
    for r in summary["students"]:
        mark = "" if r["correct"] is None else ("correct" if r["correct"] else "WRONG")
        rows.append((r["student"], r["description"], r["answer"], f"{r['margin']:.3f}", f"{r['p_value']:.3g}", mark))
    w = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(row)).rstrip() for row in rows]
    return "\n".join(lines + [f"{name.ljust(w[0])}  FAILED: {err}" for name, err in summary["failed"].items()])
