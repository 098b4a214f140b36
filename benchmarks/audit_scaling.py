"""Audit cost per student as the number of students grows, and the scoring stage vs devices.

    python benchmarks/audit_scaling.py                       # 10, 100, 1000 students (~15 min on 2 cores)
    python benchmarks/audit_scaling.py --students 10,50      # a quicker look

Part 1, flat cost: N tiny random-weight students (one architecture, as a bulk audit of fine-tunes
of one base model would be) are written as PyTorch-format checkpoints (model.safetensors +
config.json) and audited with kdd_jax.audit against two local teachers: conversion, synthesis,
queries through the shared response cache, scoring, bootstrap verdict, and every artefact
(verdict.json, report.html, probes.safetensors) plus the summary. The claim to check: seconds per
student do not grow with N (one compile per architecture, no per-student recompiles, summary and
resume bookkeeping linear). The first student (compilation) is reported separately.

Part 2, scoring vs devices: kdd_jax.distributed.score_pairs on P (student, teacher) pairs in a
fresh process per device count (XLA_FLAGS=--xla_force_host_platform_device_count=D on CPU). On a
CPU the "devices" share the machine's cores, so throughput can only grow up to the core count;
the figures say how close to linear the sharded computation gets there.

Writes benchmarks/results/audit_scaling.{md,json} (machine, versions, date, command, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

PRE = {"input_size": [12, 12], "channels": 1, "mean": [0.5], "std": [0.25], "value_range": [0.0, 1.0]}
STUDENT = {"family": "vgg", "arch": {"cfg": [8, "M", 16, "M"], "num_classes": 6, "in_channels": 1, "avgpool": None,
                                      "classifier_hidden": [32], "dropout": "none"}}
TEACHER = {"family": "resnet", "arch": {"block": "basic", "layers": [1, 1], "widths": [8, 16], "stem": "small",
                                         "num_classes": 6, "in_channels": 1}}


def write_checkpoint(d: Path, cfg: dict, seed: int) -> None:
    """A random-weight model in PyTorch naming (no torch needed: converters.keymap exports it)."""
    from converters.keymap import export_torch_state
    from kdd_jax.config import parse_config
    from kdd_jax.io import atomic_write_json, write_safetensors
    from kdd_jax.models import build_model

    full = {"format_version": 1, **cfg, "preprocessing": PRE}
    model = build_model(parse_config(full), seed=seed)
    d.mkdir(parents=True, exist_ok=True)
    write_safetensors(d / "model.safetensors", export_torch_state(model))
    atomic_write_json(d / "config.json", full)


def audit_run(n: int, work: Path, probes: int, steps: int) -> dict:
    from kdd_jax.audit import audit
    from kdd_jax.detect import DetectConfig, find_students
    from kdd_jax.synthesis import SynthesisConfig
    from kdd_jax.teachers import CachedTeacher, ResponseCache
    from kdd_jax.teachers.config import TeacherEntry, open_teacher

    root = work / f"n{n}"
    for i in range(n):
        write_checkpoint(root / "students" / f"s{i:04d}", STUDENT, seed=1000 + i)
    for seed, t in enumerate(("teacher-a", "teacher-b")):
        write_checkpoint(root / "teachers" / t, TEACHER, seed=seed)
    cache = ResponseCache(root / "cache" / "responses.sqlite")
    teachers = [CachedTeacher(open_teacher(TeacherEntry(name=t, path=str(root / "teachers" / t), output="probs")), cache)
                for t in ("teacher-a", "teacher-b")]
    students = find_students([root / "students"])
    # aug_noise 0: the committed figures were measured before noise became pixel's default (it adds one
    # normal draw per probe per step, little next to the student's forward and backward pass)
    dc = DetectConfig(synthesis=SynthesisConfig(n_probes=probes, steps=steps, aug_noise=0.0), n_bootstrap=200)
    starts, ends = [], []

    def log(msg: str) -> None:
        if msg.startswith("["):  # "[i/n] name: ..." as a student starts
            starts.append(time.perf_counter())
        elif msg.startswith("  "):  # "  name: answer ..." (or FAILED) as it ends
            ends.append(time.perf_counter())

    t0 = time.perf_counter()
    summary = audit(students, teachers, dc, root / "out", log=log)
    total = time.perf_counter() - t0
    per = np.asarray(ends) - np.asarray(starts)  # seconds of each student, in order
    rest = per[1:] if n > 1 else per
    return {"students": n, "total_s": total, "first_student_s": float(per[0]),
            "per_student_s_mean": float(rest.mean()), "per_student_s_p50": float(np.median(rest)),
            "per_student_s_p90": float(np.quantile(rest, 0.9)),
            "summary_and_bookkeeping_s": float(total - per.sum()),
            "finished": len(summary.rows), "failed": len(summary.failed), "queries": summary.queries}


SCORING_CHILD = r"""
import json, sys, time
import jax, numpy as np
from kdd_jax.distributed import make_mesh
from kdd_jax.scores.pairs import score_pairs
P, N, C, reps = map(int, sys.argv[1:5])
r = np.random.default_rng(0)
s = r.normal(size=(P, N, C)).astype(np.float32)
t = np.asarray(jax.nn.log_softmax(r.normal(size=(P, N, C)).astype(np.float32), -1))
out = {"devices": jax.local_device_count()}
for name in ("neg_kl", "dark_corr", "linear_cka"):
    score_pairs(name, s, t).block_until_ready()  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter(); score_pairs(name, s, t).block_until_ready(); times.append(time.perf_counter() - t0)
    out[name] = P * N / float(np.median(times))
print(json.dumps(out))
"""


def scoring_vs_devices(devices: list[int], pairs: int, n: int, c: int, reps: int) -> list[dict]:
    rows = []
    for d in devices:
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={d}"}
        res = subprocess.run([sys.executable, "-c", SCORING_CHILD, str(pairs), str(n), str(c), str(reps)],
                             env=env, capture_output=True, text=True, check=True, cwd=REPO)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = ["# Audit scaling", "",
             f"Machine: {m['machine']['cpu_model']}, {m['machine']['usable_cpus']} CPUs; versions: {m['versions']}; "
             f"date {m['date']}; load average at start / end: {m['loadavg_start']} / {m['loadavg_end']}.",
             f"Command: `{m['command']}` ({m['seconds']:.0f} s).", "",
             "## Cost per student as the audit grows", "",
             f"Tiny random-weight VGG students (12x12, 6 classes), 2 local teachers (probabilities API), "
             f"{m['probes']} probes, {m['steps']} pixel-synthesis steps, 200 bootstrap replicates; every artefact "
             "written. Seconds per student exclude the first student (compilation), shown on its own. JAX backend: "
             f"{m.get('jax_backend', 'cpu (not recorded)')}.", "",
             "| students | total s | first student s | s / student (mean) | p50 | p90 | summary + bookkeeping s | failed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["audit"]:
        lines.append(f"| {r['students']} | {r['total_s']:.1f} | {r['first_student_s']:.2f} | {r['per_student_s_mean']:.3f} "
                     f"| {r['per_student_s_p50']:.3f} | {r['per_student_s_p90']:.3f} | "
                     f"{(r['summary_and_bookkeeping_s'] or 0):.2f} | {r['failed']} |")
    if doc["scoring"]:
        base = doc["scoring"][0]
        lines += ["", "## Scoring stage vs devices (probe-pairs per second)", "",
                  f"score_pairs on {m['pairs']} (student, teacher) pairs x {m['pair_probes']} probes x 10 classes, median of "
                  f"{m['reps']} runs after compilation; always on CPU (JAX_PLATFORMS=cpu, forced host devices), whatever "
                  f"the audit's backend: the devices share {m['machine']['usable_cpus']} cores.", "",
                  "| devices | neg_kl | dark_corr | linear_cka | neg_kl speed-up |", "|---|---|---|---|---|"]
        for r in doc["scoring"]:
            lines.append(f"| {r['devices']} | {r['neg_kl']:.3g} | {r['dark_corr']:.3g} | {r['linear_cka']:.3g} | "
                         f"{r['neg_kl'] / base['neg_kl']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--students", default="10,100,1000")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--pair-probes", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--tag", default="audit_scaling")
    args = ap.parse_args(argv)
    from benchmarks.provenance import run_meta, write_results

    started = time.perf_counter()
    load0 = [round(x, 2) for x in os.getloadavg()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdd-audit-scaling-") as tmp:
        for n in [int(x) for x in args.students.split(",") if x]:
            print(f"[{time.strftime('%H:%M:%S')}] auditing {n} students", file=sys.stderr, flush=True)
            rows.append(audit_run(n, Path(tmp), args.probes, args.steps))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    devices = [int(x) for x in args.devices.split(",") if x]
    scoring = scoring_vs_devices(devices, args.pairs, args.pair_probes, 10, args.reps) if devices else []
    import jax

    doc = {"audit": rows, "scoring": scoring,
           "meta": run_meta(__file__, argv, started, loadavg_start=load0,
                            loadavg_end=[round(x, 2) for x in os.getloadavg()], probes=args.probes, steps=args.steps,
                            pairs=args.pairs, pair_probes=args.pair_probes, reps=args.reps,
                            jax_backend=f"{jax.default_backend()} ({jax.devices()[0].device_kind})")}
    write_results(args.out, args.tag, doc, markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
