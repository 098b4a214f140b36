"""Search for data-free probes that carry provenance: one synthesis setting at a time, on a subset
of the Fashion-MNIST zoo's distilled students, scored as the detection benchmark scores.

    python benchmarks/datafree_probes.py '{"method": "pixel", "steps": 60, "pixel_scale": 2}' \\
        --students s09,s10,s11,s12,s13,s14,s15,s16 --seeds 0
    python benchmarks/datafree_probes.py '{"method": "pixel", "steps": 200}' --students all \
        --seeds 0,1,2,3,4,5 --pool-seeds 3              # 2 runs of 300 probes each (seeds 0-2, 3-5)
    python benchmarks/datafree_probes.py --render      # rebuild the markdown table only

The argument is a JSON object of SynthesisConfig overrides (n_probes defaults to 100). Students are
matched by name prefix (s09-s16: KD at T=8/alpha=0.3 and T=4/alpha=0.1, the recipes where real
images reach 1.00 with dark_corr but data-free pixel probes fail; `all` for every distilled
student). Each row appended to benchmarks/results/datafree_probes.jsonl holds multiple-choice
accuracy / AUC (probabilities API, N = n_probes) for four scores and three diagnostics on the
probes: how often the teachers agree with each other (top-1, mean over pairs), and how often the
student's top-1 agrees with its own teacher vs with the other teachers. Probes that carry
provenance need own > other; on real images the soft outputs separate them even where top-1 does
not. Per-student logits are cached in benchmarks/_work/datafree/ (keyed by weights and settings).
With --pool-seeds K, each run scores the probes of K consecutive seeds together (N = K x n_probes): does
spending more queries on probes of one setting help, without synthesising them in one larger batch?
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import io
import json
import re
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks import detection_accuracy as da  # noqa: E402
from benchmarks.provenance import finite_or_null  # noqa: E402
from kdd_jax.evaluation import multiple_choice_metrics, tie_aware_share  # noqa: E402
from kdd_jax.io import atomic_write_bytes  # noqa: E402
from kdd_jax.models import predict_logits  # noqa: E402
from kdd_jax.synthesis import SynthesisConfig, synthesize  # noqa: E402
from kdd_jax.synthesis.mapping import map_probes  # noqa: E402
from kdd_jax.teachers import CachedTeacher, ResponseCache, flax_teacher  # noqa: E402
from kdd_jax.versions import machine, versions  # noqa: E402

DEFAULT_STUDENTS = "s09,s10,s11,s12,s13,s14,s15,s16"  # the cross-family students (own-family picks are wrong)

SCORES = ("neg_kl", "dark_corr", "linear_cka", "acs")
RESULTS = REPO / "benchmarks/results/datafree_probes.jsonl"


def probe_logits(name, wid, model, config, sc, teachers, work: Path) -> dict:
    h = sc.identity_sha256()[:8]
    path = work / f"{name}-{wid}-{h}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    t0 = time.perf_counter()
    probes = synthesize(model, config, sc)
    secs = time.perf_counter() - t0
    student = np.asarray(predict_logits(model, probes.normalised))
    t = np.stack([T.query(map_probes(probes.raw, config.preprocessing.value_range, T.spec, T.name)).values
                  for T in teachers])
    out = {"student": student, "teachers": t, "secs": np.float64(secs)}
    buf = io.BytesIO()
    np.savez(buf, **out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return out


def agreement(z: dict, own: int) -> tuple[float, float, float]:
    """(teacher-teacher, student-own teacher, student-other teachers) top-1 agreement."""
    tt, st = z["teachers"].argmax(-1), z["student"].argmax(-1)
    k = len(tt)
    pairs = np.mean([np.mean(tt[i] == tt[j]) for i in range(k) for j in range(i + 1, k)])
    return float(pairs), float(np.mean(st == tt[own])), float(np.mean([np.mean(st == tt[j]) for j in range(k) if j != own]))


def students_of(command: str) -> str:
    """Which students a row covers, from its recorded command: the --students value, ranges of
    consecutive sNN prefixes folded (s01,s02,s03 -> s01-s03); the default when absent; "?" for a
    command that does not parse (a hand-edited row must not stop the markdown from rendering)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return "?"
    value = words[words.index("--students") + 1] if "--students" in words[:-1] else DEFAULT_STUDENTS
    names = value.split(",")
    if value == "all" or not all(re.fullmatch(r"s\d\d", n) for n in names):
        return value
    nums, out = sorted(int(n[1:]) for n in names), []
    for i in nums:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ",".join(f"s{a:02d}" if a == b else f"s{a:02d}-s{b:02d}" for a, b in out)


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _cell(row: dict, score: str) -> str:
    """accuracy / AUC, each with its std over runs when the row has several runs and records it."""
    std = row.get("std_over_seeds", {}).get(score) if len(row["seeds"]) > row.get("pool_seeds", 1) else None
    return " / ".join(_num(v) + ("" if std is None or std[i] is None else f" ± {std[i]:.2f}")
                      for i, v in enumerate(row[score]))


def render(rows: list[dict]) -> str:
    lines = ["# Data-free probe search on the Fashion-MNIST zoo", "",
             "Rows appended by `python benchmarks/datafree_probes.py CONFIG --students ... --seeds ...` (each row "
             "records its own command, date, machine and versions). Accuracy / one-vs-rest AUC over the distilled "
             "students named (mean over runs, a run per seed; ± std over runs where the row records it), probabilities API, N = n_probes; "
             "'pooled K: N = ...' marks rows whose runs each pool the probes of K consecutive seeds; chance accuracy 0.25. "
             "Settings are overrides of the defaults of the row's date: until 2026-11-24 pixel's default aug_noise was 0, so earlier "
             "pixel rows without aug_noise ran without noise (rows since record every resolved setting, `synthesis` in the JSONL). Agreement: top-1, on the probes. Seconds per student are wall time on a shared 2-core machine with other jobs running: not throughput figures. "
             "Own-family picks: share of the students whose top-scored teacher has the student's architecture family, "
             "a wrong answer for the cross-family students s09-s16 (chance 0.25). Zoo weights: a digest of the teachers' "
             "and the row's students' weight hashes, so on one build rows over other students show other digests "
             "(rows before it was recorded ran on the original build; the zoo rebuilt on "
             "2026-11-23 on another machine has slightly different weights: benchmarks/zoo/README.md, Determinism).",
             "", "| settings | students: count x seeds | " + " | ".join(SCORES)
             + " | teachers agree | student = own teacher | student = other teachers | s / student "
             "| picks of the student's own family (" + " / ".join(SCORES) + ") | zoo weights |",
             "|---|---|" + "---|" * (len(SCORES) + 6)]
    for r in rows:
        pooled = f" (pooled {r['pool_seeds']}: N = {r['n_probes_per_run']})" if r.get("pool_seeds", 1) > 1 else ""
        lines.append(f"| `{json.dumps(r['cfg'])}` | {students_of(r['command'])}: {r['n_students']} x {len(r['seeds'])}{pooled} | "
                     + " | ".join(_cell(r, s) for s in SCORES)
                     + f" | {r['teacher_agree']:.2f} | {r['student_own_agree']:.2f} | {r['student_other_agree']:.2f}"
                     f" | {r['secs_per_student']:.1f} | "
                     + (" / ".join(_num(r['own_family_pick'][s]) for s in SCORES) if "own_family_pick" in r else "")
                     + f" | {r['zoo_weights_sha256'][:8] if 'zoo_weights_sha256' in r else 'original build'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="JSON object of SynthesisConfig overrides")
    ap.add_argument("--students", default=DEFAULT_STUDENTS, help="name prefixes, or 'all'")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--pool-seeds", type=int, default=1, metavar="K",
                    help="score the probes of K consecutive seeds together as one run (N = K x n_probes)")
    da.add_zoo_arguments(ap)
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks/_work/datafree")
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSONL the row is appended to (markdown beside it)")
    ap.add_argument("--render", action="store_true", help="only rebuild the markdown from the JSONL")
    args = ap.parse_args(argv)
    if not args.render:
        if not args.config:
            ap.error("give a CONFIG (JSON object) or --render")
        try:  # refuse a bad CONFIG before loading the zoo
            over = json.loads(args.config)
            SynthesisConfig(**{"n_probes": 100, **over})
        except (ValueError, TypeError) as e:  # bad JSON, unknown field, invalid value
            ap.error(f"CONFIG {args.config!r}: {e}")
        try:  # and bad seeds, before the zoo is loaded and anything synthesised
            args.seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            ap.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
        if args.pool_seeds < 1 or len(args.seeds) % args.pool_seeds:
            ap.error(f"--pool-seeds {args.pool_seeds}: must be >= 1 and divide the {len(args.seeds)} seeds given")
        run(args, sys.argv[1:] if argv is None else argv)
    if not args.results.is_file():
        ap.error(f"{args.results}: no results to render (run a CONFIG first)")
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    atomic_write_bytes(args.results.with_suffix(".md"), render(rows).encode())
    return 0


def run(args, argv: list[str]) -> None:
    over = json.loads(args.config)
    manifest = json.loads(args.manifest.read_text())
    zoo = da.load_zoo(args.zoo, manifest)
    tnames = sorted(m["name"] for m in manifest["models"] if m["role"] == "teacher")
    wids = {n: da.weights_id(args.zoo, m) for n, (_, _, m) in zoo.items()}
    work = args.work / ("teachers-" + "-".join(wids[t][:6] for t in tnames))
    teachers = [CachedTeacher(flax_teacher(t, zoo[t][0], zoo[t][1], output="logits"), ResponseCache(work / "responses.sqlite"))
                for t in tnames]
    students = [n for n, (_, _, m) in zoo.items() if m["role"] == "student"]
    if args.students != "all":
        students = [n for n in students if any(n.startswith(p) for p in args.students.split(","))]
    seeds, pool = args.seeds, args.pool_seeds  # checked by main()
    labels = np.array([tnames.index(zoo[n][2]["teacher"]) for n in students])
    res = {}
    for seed in seeds:
        for n in students:
            model, config, _ = zoo[n]
            sc = SynthesisConfig(**{"n_probes": 100, "seed": seed, **over})
            res[(seed, n)] = probe_logits(n, wids[n], model, config, sc, teachers, work / "logits")
            da.log(f"{n} seed {seed}: {float(res[(seed, n)]['secs']):.1f} s")
    n_probes = SynthesisConfig(**{"n_probes": 100, **over}).n_probes * pool
    runs = [tuple(seeds[i:i + pool]) for i in range(0, len(seeds), pool)]
    pooled = {(r, n): {"student": np.concatenate([res[(s, n)]["student"] for s in r]),
                       "teachers": np.concatenate([res[(s, n)]["teachers"] for s in r], axis=1)}
              for r in runs for n in students}
    # every setting as resolved (defaults change: pixel's aug_noise was 0 until 2026-11-24, 1.0 since)
    resolved = {k: v for k, v in dataclasses.asdict(SynthesisConfig(**{"n_probes": 100, **over})).items() if k != "seed"}
    row = {"cfg": over, "synthesis": resolved, "n_students": len(students), "seeds": seeds,
           **({"pool_seeds": pool, "n_probes_per_run": n_probes} if pool > 1 else {}),
           # which weights: a zoo rebuilt on another machine differs (benchmarks/zoo/README.md, Determinism)
           "zoo_weights_sha256": hashlib.sha256(json.dumps({n: wids[n] for n in tnames + students},
                                                           sort_keys=True).encode()).hexdigest()[:12]}
    # Family bias: how often the top-scored teacher is of the student's own architecture family (for the
    # default students s09-s16, all cross-family, such a pick is always wrong; chance 1/4 with 4 teachers).
    same_family = np.array([[zoo[t][2]["family"] == zoo[n][2]["family"] for t in tnames] for n in students])
    row["own_family_pick"] = {}
    for score in SCORES:
        s = np.array([[da.all_scores(pooled[(r, n)]["student"], da.teacher_logp(pooled[(r, n)]["teachers"], "probs", zoo[n][1].arch.num_classes),
                                      ns=(n_probes,))[score][n_probes]
                       for n in students] for r in runs])
        m = multiple_choice_metrics(s, labels)
        row[score] = [round(m["accuracy"], 3), round(m["auc"], 3)]
        row.setdefault("std_over_seeds", {})[score] = [round(m["accuracy_std"], 3), round(m["auc_std"], 3)]
        row["own_family_pick"][score] = round(float(np.mean([tie_aware_share(run, same_family) for run in s])), 3)
    ag = np.array([agreement(res[(r, n)], tnames.index(zoo[n][2]["teacher"])) for r in seeds for n in students])
    row |= {"teacher_agree": round(float(ag[:, 0].mean()), 3), "student_own_agree": round(float(ag[:, 1].mean()), 3),
            "student_other_agree": round(float(ag[:, 2].mean()), 3),
            "secs_per_student": round(float(np.mean([float(z["secs"]) for z in res.values()])), 2),
            "command": "python benchmarks/datafree_probes.py " + shlex.join(argv),
            "date": datetime.date.today().isoformat(), "machine": machine(), "versions": versions()}
    print(json.dumps({k: row[k] for k in ("cfg", *SCORES, "teacher_agree", "student_own_agree", "student_other_agree")}))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(finite_or_null(row), allow_nan=False) + "\n")  # an AUC with one teacher class: null


if __name__ == "__main__":
    raise SystemExit(main())
