"""`kdd demo`: the whole product on a bundled zoo, with nothing downloaded and no GPU.

The bundled zoo (kdd_jax/demo_zoo/, a few MB) holds real Fashion-MNIST teachers and students
taken from the benchmark zoo (benchmarks/zoo/, made by benchmarks/zoo/make_demo_zoo.py):
students distilled from known teachers with different recipes, and one trained without any
teacher. The demo serves every teacher over HTTP on loopback with `kdd serve` (one subprocess
each, the Open Inference Protocol v2), audits every student through the HTTP client and the
response cache, prints a verdict table, and writes one report per student plus an index page.
"""

from __future__ import annotations

import html
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


def _start_server(teacher_dir: Path, name: str, output: str, timeout: float = 180.0):
    """`kdd serve` in a subprocess on a free loopback port; returns (process, base url)."""
    cmd = [sys.executable, "-m", "kdd_jax", "serve", str(teacher_dir), "--port", "0", "--name", name,
           "--output", output, "-q"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    found: dict[str, str] = {}
    lines: list[str] = []

    def read():
        for line in proc.stderr:  # keep draining so the server never blocks on a full pipe
            lines.append(line)
            m = _URL.search(line)
            if m and "url" not in found:
                found["url"] = m.group(1)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while "url" not in found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise DemoError(f"kdd serve for teacher {name!r} did not start:\n" + "".join(lines[-20:]))
        time.sleep(0.05)
    return proc, found["url"]


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
    return manifest


def run_demo(out: str | Path, *, zoo: str | Path = DEMO_ZOO, probes: int = 64, steps: int = 60, seed: int = 0,
             method: str = "pixel", quiet: bool = False) -> dict:
    """Serve the zoo's teachers, audit every student, write reports; returns the summary dict."""
    from kdd_jax.config import load_config, to_json_dict
    from kdd_jax.detect import DetectConfig, detect, load_any_student, save_detection
    from kdd_jax.io import atomic_write_bytes, atomic_write_json
    from kdd_jax.synthesis import SynthesisConfig
    from kdd_jax.teachers import CachedTeacher, ResponseCache
    from kdd_jax.teachers.config import load_teachers_file, open_teacher
    from kdd_jax.versions import versions

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    zoo, out = Path(zoo), Path(out)
    manifest_path = zoo / "manifest.json"
    if not manifest_path.is_file():
        raise DemoError(f"{zoo}: no demo zoo here (missing manifest.json)")
    manifest = _read_manifest(manifest_path)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    procs = []
    try:
        say(f"serving {len(manifest['teachers'])} teachers over HTTP on 127.0.0.1 (kdd serve) ...")
        entries = []
        for t in manifest["teachers"]:
            tdir = zoo / t["dir"]
            proc, url = _start_server(tdir, t["name"], t.get("output", "probs"))
            procs.append(proc)
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
        dc = DetectConfig(synthesis=SynthesisConfig(method=method, n_probes=probes, steps=steps, seed=seed))
        rows = []
        students = manifest["students"]
        for i, s in enumerate(students):
            t0 = time.perf_counter()
            elapsed = t0 - started
            eta = f", ETA {elapsed / i * (len(students) - i):.0f}s" if i else ""
            say(f"[{i + 1}/{len(students)}] {s['name']} ({s['description']}){eta}")
            model, config = load_any_student(zoo / s["dir"])
            last = [0.0]

            def progress(step, loss):
                now = time.perf_counter()
                if now - last[0] > 2 or step == steps:
                    last[0] = now
                    say(f"    synthesis {step}/{steps}  loss {loss:.3f}")

            result = detect(model, config, teachers, dc, progress)
            report = {"command": "demo", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "student": s["name"], "teachers_file": str(teachers_file), **result.to_dict(),
                      "preprocessing": to_json_dict(config.preprocessing)}
            save_detection(out / "students" / s["name"], report, result)
            v = result.verdict
            truth = s.get("teacher")
            rows.append({"student": s["name"], "description": s["description"], "truth": truth or "none",
                         "answer": v.winner, "p_value": v.p_value, "margin": v.margin,
                         "correct": (v.winner == truth) if truth else None,
                         "queries": sum(st.get("queries", 0) for st in result.teacher_stats.values()),
                         "seconds": time.perf_counter() - t0})
            say(f"    -> {v.winner} (margin {v.margin:.3f}, p = {v.p_value:.3g}; truth: {truth or 'none'})")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    summary = {"rows": rows, "teachers": [t["name"] for t in manifest["teachers"]],
               "settings": {"method": method, "probes": probes, "steps": steps, "seed": seed, "score": dc.score},
               "seconds": time.perf_counter() - started, "versions": versions(), "zoo": manifest.get("source", {})}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "index.html", _index_html(summary).encode())
    return summary


def verdict_table(summary: dict) -> str:
    rows = [("student", "trained as", "answer", "margin", "p-value", "")]
    for r in summary["rows"]:
        mark = "" if r["correct"] is None else ("correct" if r["correct"] else "WRONG")
        rows.append((r["student"], r["description"], r["answer"], f"{r['margin']:.3f}", f"{r['p_value']:.3g}", mark))
    w = [max(len(row[i]) for row in rows) for i in range(6)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(row)).rstrip() for row in rows)


def _index_html(summary: dict) -> str:
    e = html.escape
    body = "".join(
        f"<tr><td><a href='students/{e(r['student'])}/report.html'>{e(r['student'])}</a></td><td>{e(r['description'])}</td>"
        f"<td>{e(r['answer'])}</td><td>{r['margin']:.3f}</td><td>{r['p_value']:.3g}</td>"
        f"<td>{'' if r['correct'] is None else ('correct' if r['correct'] else 'WRONG')}</td></tr>"
        for r in summary["rows"])
    s = summary["settings"]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kdd-jax demo</title><style>"
            "body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body><h1>kdd-jax demo</h1>"
            f"<p>{len(summary['rows'])} students audited against {len(summary['teachers'])} teachers served over HTTP "
            f"({e(', '.join(summary['teachers']))}); {s['probes']} probes ({e(s['method'])}, {s['steps']} steps, seed "
            f"{s['seed']}), score {e(s['score'])}; {summary['seconds']:.0f} s.</p><table><tr><th>student</th>"
            "<th>trained as</th><th>answer</th><th>margin</th><th>p-value</th><th></th></tr>"
            f"{body}</table><p>The p-value is the bootstrap probability that the named teacher does not truly "
            "beat the runner-up. The independent student has no true teacher: without a calibration "
            "(<code>kdd calibrate</code>) the demo still names its closest candidate; look at its margin and "
            "p-value.</p></body></html>")
