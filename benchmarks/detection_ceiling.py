"""How far can output agreement go on this zoo? Detection with every real image as a probe.

    python benchmarks/detection_ceiling.py            # ~5 min from the built zoo; resumable

`detection_accuracy.py` asks how well N <= 100 probes do. This asks the question above it: with
10 000 real Fashion-MNIST images as probes (far more than any probe budget, and real images, the
distribution every zoo model was trained on), which students can an agreement score attribute at
all? If a student's agreement with its own teacher is no higher than an independent model's, no
choice or synthesis of probes will find it with that score, and the benchmark's accuracy goal is out
of reach for that recipe whatever the probes.

Two pools: `test` (the 10k Fashion-MNIST test images, which no zoo model trained on) and `train` (a
seeded 10k sample of the 60k training images, the paper's oracle: the students' and teachers' own
training data). Teachers answer through the probabilities API (log-softmax of their logits).

For each pool and score:
- accuracy / one-vs-rest AUC over the distilled students with all 10k probes (point-wise scores;
  set scores on the first SET_PROBES probes: their kernels are N x N), and per recipe;
- for `dark_corr` (the engine's default) and `top1`, accuracy on random subsets of N probes
  (mean over SUBSETS draws), to show where it stops improving;
- detectability: each student's excess score for its own teacher (its scores centred over the
  teachers, so a model that is merely closer to every teacher gains nothing) against the largest
  excess any independent control shows for that teacher. A student inside the controls' range
  cannot be told from an independent model by that score on these probes.
- mistake inheritance (default pools only: needs true labels and which images each model trained on):
  on the probes a student's own teacher labels wrongly, how often the student gives the teacher's wrong
  label, against the independent controls and the other teachers. It says whether a student carries
  its teacher at all beyond what independent models share, with labels no audit has at detection time.

Outputs: benchmarks/results/TAG.{md,json} (TAG: --tag, default detection_ceiling). Per-model logits
are cached in benchmarks/_work/ceiling/ keyed by the model file's hash.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.detection_accuracy import (  # noqa: E402
    SCORE_NAMES, ZooRoles, add_zoo_arguments, load_zoo, log, pools, read_manifest, teacher_logp, weights_id)
from benchmarks.provenance import run_meta, write_results  # noqa: E402
from kdd_jax.evaluation import multiple_choice_metrics, tie_aware_accuracy, zoo_metrics  # noqa: E402
from kdd_jax.io import atomic_write_bytes  # noqa: E402
from kdd_jax.models import predict_logits  # noqa: E402
from kdd_jax.scores import SCORES  # noqa: E402
from kdd_jax.scores.pairs import score_pairs  # noqa: E402
from kdd_jax.synthesis.real import _normalise  # noqa: E402

POOL_SIZE = 10_000
SET_PROBES = 1_000
SUBSET_NS = (100, 1_000, 10_000)
SUBSETS = 10
CURVE_SCORES = ("dark_corr", "top1")


def train_sample(n_train: int, size: int = POOL_SIZE) -> np.ndarray:
    """The seeded sample of training-set indices that makes the `train` pool (shared by its images and labels)."""
    return np.sort(np.random.default_rng(0).choice(n_train, size, replace=False))


def fashion_pools(size: int = POOL_SIZE) -> dict[str, np.ndarray]:
    """Raw NCHW float images in [0, 1] (detection_accuracy's pools): the test set and a seeded
    sample of the training set."""
    p = pools()
    train, test = p["real"].images, p["aux"].images
    return {"test": test[:size], "train": train[train_sample(len(train), size)]}


def fashion_truth(size: int = POOL_SIZE) -> dict[str, dict]:
    """For fashion_pools' pools: true labels, and for `train` the training-set index of each image (to
    tell which images a model trained on)."""
    from benchmarks.zoo.fashion import load_fashion

    _, y_train = load_fashion("train")
    _, y_test = load_fashion("test")
    idx = train_sample(len(y_train), size)
    return {"test": {"labels": y_test[:size], "index": None}, "train": {"labels": y_train[idx], "index": idx}}


def check_training_records(entries: dict[str, dict]) -> list[str]:
    """Models whose manifest entry has no training-data record (the mistake section is then skipped).
    Where every entry has one, each is rebuilt and hash-checked now, so a manifest that does not match
    the split fails before any work, naming the model (ValueError)."""
    from benchmarks.zoo.fashion import training_indices

    lacking = [n for n, e in entries.items() if "indices_sha256" not in (e.get("data") or {})]
    if not lacking:
        for n in entries:
            training_indices(n, entries)
    return lacking


def mistake_inheritance(top1: dict[str, np.ndarray], truth: dict, students: list[str], controls: list[str],
                        teachers: list[str], entries: dict[str, dict]) -> dict:
    """Does a student repeat its teacher's mistakes more often than an independent model does?

    For each student: the probes its own teacher gets wrong (for the `train` pool, only those among the
    student's own training images, i.e. where a hard-label distiller was taught the mistake), and on
    them the share where the student's top-1 is the teacher's wrong label, against the same share for
    each independent control and for the other teachers. On `train`, each of those is measured only on
    the probes it did not train on itself: a model that learnt an image's true label would otherwise
    look less like the teacher than an independent model is."""
    from benchmarks.zoo.fashion import training_indices

    seen = {}

    def trained_on(m):
        if m not in seen:
            seen[m] = np.isin(truth["index"], training_indices(m, entries))
        return seen[m]

    def follow(m, t, wrong):
        mask = wrong if truth["index"] is None else wrong & ~trained_on(m)
        return float(np.mean(top1[m][mask] == top1[t][mask])) if mask.any() else float("nan")

    rows = []
    for s in students:
        t = entries[s]["teacher"]
        wrong = top1[t] != truth["labels"]
        if truth["index"] is not None:
            wrong &= trained_on(s)
        own = float(np.mean(top1[s][wrong] == top1[t][wrong])) if wrong.any() else float("nan")
        cs = [follow(c, t, wrong) for c in controls]
        others = [follow(o, t, wrong) for o in teachers if o != t]
        agg = lambda f, v: float(f([x for x in v if not np.isnan(x)])) if any(not np.isnan(x) for x in v) else float("nan")  # noqa: E731
        c_max = agg(np.max, cs)
        rows.append({"student": s, "n": int(wrong.sum()), "student_follows": own,
                     "controls_mean": agg(np.mean, cs), "controls_max": c_max,
                     "other_teachers_mean": agg(np.mean, others),
                     "above_controls": bool(own > c_max)})  # False when nothing to compare with
    return {"students": rows, "above_controls": int(sum(r["above_controls"] for r in rows)), "n": len(rows)}


def pool_logits(model, config, raw: np.ndarray, path: Path) -> np.ndarray:
    """The model's logits [N, C] on raw NCHW images, cached at `path` (.npy, written atomically)."""
    if path.exists():
        return np.load(path)
    logits = np.concatenate([np.asarray(predict_logits(model, _normalise(raw[i: i + 1000], config.preprocessing)))
                             for i in range(0, len(raw), 1000)])
    import io

    buf = io.BytesIO()
    np.save(buf, logits)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return logits


def per_probe_scores(s_logits: np.ndarray, t_logp: np.ndarray, names=SCORE_NAMES) -> dict[str, np.ndarray]:
    """Point-wise scores -> [K, N] per probe; set scores -> [K] on the first SET_PROBES probes."""
    out = {}
    s = jnp.asarray(s_logits)
    y = jnp.asarray(t_logp)
    for name in names:
        fn, kind, _ = SCORES[name]
        if kind == "pointwise":  # the engine's path (kdd_jax.detect): every (student, teacher) pair at once
            out[name] = np.asarray(score_pairs(name, jnp.broadcast_to(s, y.shape[:2] + s.shape[-1:]), y))
        else:
            x = jax.nn.log_softmax(s[:SET_PROBES], -1)
            out[name] = np.asarray(jax.vmap(lambda y: fn(x, y))(jnp.asarray(t_logp[:, :SET_PROBES])))
    return out


def excess(row: np.ndarray) -> np.ndarray:
    """Scores [K] centred over the teachers: what a model shares with one teacher beyond the rest."""
    return row - row.mean()


def detectability(scores: np.ndarray, labels: np.ndarray, controls: np.ndarray) -> dict:
    """scores [M, K] (students), labels [M], controls [C, K] -> per student: its own teacher's excess,
    the controls' largest excess for that teacher, and whether the student lies above it."""
    ce = np.stack([excess(c) for c in controls]) if len(controls) else np.zeros((0, scores.shape[1]))
    rows = []
    for row, own in zip(scores, labels):
        e = excess(row)[own]
        ceiling = float(ce[:, own].max()) if len(ce) else float("-inf")
        rows.append({"own_excess": float(e), "controls_max_excess": ceiling, "above_controls": bool(e > ceiling),
                     "attributed": tie_aware_accuracy(row[None], np.array([own])) == 1.0,
                     "top_teacher": int(np.argmax(row))})
    return {"students": rows, "above_controls": int(sum(r["above_controls"] for r in rows)),
            "n": len(rows)}


def evaluate_pool(per: dict[str, dict], labels: np.ndarray, students: list[str], controls: list[str],
                  recipes: list[str], seed: int = 0, names=SCORE_NAMES, curve=CURVE_SCORES) -> dict:
    """per[model][score] as per_probe_scores returns -> accuracy, per recipe, subset curve, detectability.
    A score's entry is [K, N] (one value per probe: averaged over probes) or [K] (one per teacher);
    `names` may include scores outside the engine's SCORES."""
    out = {}
    for name in names:
        agg = lambda m: per[m][name].mean(-1) if per[m][name].ndim == 2 else per[m][name]  # noqa: E731
        S = np.stack([agg(m) for m in students])
        C = np.stack([agg(m) for m in controls]) if controls else np.zeros((0, S.shape[1]))
        metrics = zoo_metrics(S, labels, recipes=recipes)
        out[name] = {"accuracy": metrics["accuracy"], "auc": metrics["auc"], "per_recipe": metrics["per_recipe"],
                     "detectability": detectability(S, labels, C)}
        if name in curve:
            n_all = per[students[0]][name].shape[-1]
            rng = np.random.default_rng(seed)
            points = {}
            for n in SUBSET_NS:
                if n > n_all:
                    continue
                draws = 1 if n == n_all else SUBSETS
                accs = []
                for _ in range(draws):
                    idx = rng.choice(n_all, n, replace=False)
                    accs.append(multiple_choice_metrics(np.stack([per[m][name][:, idx].mean(-1) for m in students]),
                                                        labels)["accuracy"])
                points[str(n)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "draws": draws}
            out[name]["subsets"] = points
    return out


def markdown(results: dict, meta: dict, students: list[str], recipes: list[str], teachers: list[str]) -> str:
    lines = ["# Detection ceiling: every real image as a probe", "",
             f"Machine: {meta['machine']['cpu_model']}, {meta['machine']['usable_cpus']} CPUs, backend {meta['machine']['jax_backend']}; "
             f"versions: {meta['versions']}; date {meta['date']}.",
             f"Command: `{meta['command']}` ({meta['seconds']:.0f} s). Zoo weights: `weights_sha256_12` in the JSON "
             "(a zoo rebuilt on another host differs: compare before comparing figures).", "",
             "Pools: " + "; ".join(f"`{k}` = {meta['pool_sizes'][k]} {v}" for k, v in meta["pool_sources"].items()) + ". "
             f"Teachers answer through the probabilities API. Point-wise scores use every probe; set scores the "
             f"first {SET_PROBES}. One deterministic evaluation (no runs to average): accuracy / one-vs-rest AUC "
             f"over the {len(students)} distilled students, chance accuracy {1 / meta['num_teachers']:.2f}.", "",
             "| pool | " + " | ".join(SCORE_NAMES) + " |", "|---|" + "---|" * len(SCORE_NAMES)]
    for pool, res in results.items():
        lines.append(f"| {pool} | " + " | ".join(f"{res[s]['accuracy']:.2f} / {res[s]['auc']:.2f}" for s in SCORE_NAMES) + " |")
    lines += ["", "## Accuracy against the number of probes (random subsets of the pool, mean ± std over draws)", "",
              "| pool + score | " + " | ".join(f"N={n}" for n in SUBSET_NS) + " |", "|---|" + "---|" * len(SUBSET_NS)]
    for pool, res in results.items():
        for s in CURVE_SCORES:
            c = res[s]["subsets"]
            lines.append(f"| {pool} + {s} | " + " | ".join(
                f"{c[str(n)]['mean']:.2f} ± {c[str(n)]['std']:.2f}" if str(n) in c else "-" for n in SUBSET_NS) + " |")
    rs = list(dict.fromkeys(recipes))
    lines += ["", "## Per recipe (accuracy, all probes)", "", "| pool + score | " + " | ".join(rs) + " |",
              "|---|" + "---|" * len(rs)]
    for pool, res in results.items():
        for s in SCORE_NAMES:
            lines.append(f"| {pool} + {s} | " + " | ".join(f"{res[s]['per_recipe'][r]:.2f}" for r in rs) + " |")
    lines += ["", "## Detectability: is a student closer to its teacher than any independent model is?", "",
              "Excess: the score for the student's own teacher minus its mean score over all teachers. A student is "
              "*above* when its excess beats the largest excess any independent control shows for the same teacher; "
              "a student inside that range cannot be told from an independent model by this score on these probes, "
              "however they are chosen from this distribution.", "",
              "| pool + score | students above every control | attributed (argmax) | attributed among those inside |",
              "|---|---|---|---|"]
    for pool, res in results.items():
        for s in SCORE_NAMES:
            d = res[s]["detectability"]
            inside = [r for r in d["students"] if not r["above_controls"]]
            lines.append(f"| {pool} + {s} | {d['above_controls']}/{d['n']} | "
                         f"{sum(r['attributed'] for r in d['students'])}/{d['n']} | "
                         f"{sum(r['attributed'] for r in inside)}/{len(inside)} |")
    for pool, res in results.items():
        d = res["dark_corr"]["detectability"]["students"]
        lines += ["", f"### `dark_corr` on `{pool}`, per student", "",
                  "| student | recipe | own-teacher excess | controls' max excess | above | top-scoring teacher |",
                  "|---|---|---|---|---|---|"]
        for name, r, row in zip(students, recipes, d):
            top = teachers[row["top_teacher"]]
            lines.append(f"| `{name}` | {r} | {row['own_excess']:+.3f} | {row['controls_max_excess']:+.3f} | "
                         f"{'yes' if row['above_controls'] else 'no'} | {top}{'' if row['attributed'] else ' (wrong)'} |")
    if any("mistakes" in res for res in results.values()):
        lines += ["", "## Does a student repeat its teacher's mistakes?", "",
                  "Probes the student's own teacher labels wrongly (on `train`: only the student's own training "
                  "images, where a hard-label or low-temperature distiller was taught the mistake). Share of them where "
                  "the student's top-1 is the teacher's wrong label, against the independent controls on the same "
                  "probes (mean and max) and the other teachers (mean). Per recipe: mean over its students; *above*: "
                  "students beyond every control.", "",
                  "| pool | recipe | wrong probes per student | student follows | controls mean / max | other teachers | above |",
                  "|---|---|---|---|---|---|---|"]
        for pool, res in results.items():
            if "mistakes" not in res:
                continue
            rows = res["mistakes"]["students"]
            for r in dict.fromkeys(recipes):
                sel = [row for row, rr in zip(rows, recipes) if rr == r]
                m = lambda k: np.mean([row[k] for row in sel])  # noqa: E731
                lines.append(f"| {pool} | {r} | {m('n'):.0f} | {m('student_follows'):.2f} | {m('controls_mean'):.2f} / "
                             f"{m('controls_max'):.2f} | {m('other_teachers_mean'):.2f} | "
                             f"{sum(row['above_controls'] for row in sel)}/{len(sel)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_zoo_arguments(ap)
    ap.add_argument("--pools", type=Path, default=None,
                    help="an .npz of raw NCHW pools (default: Fashion-MNIST test and a train sample)")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks/_work/ceiling")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--tag", default="detection_ceiling", help="output file stem")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    manifest = read_manifest(args.manifest)
    if args.pools is not None:
        with np.load(args.pools) as z:
            pools = {k: np.asarray(z[k], np.float32) for k in z.files}
        sources = {k: f"images from {args.pools}" for k in pools}
        truth = None  # no labels or training-set indices: the mistake-inheritance section is skipped
    else:
        pools = fashion_pools()
        truth = fashion_truth()
        sources = {"test": "Fashion-MNIST test images (no zoo model trained on them)",
                   "train": "Fashion-MNIST training images, a seeded sample (the paper's oracle: the zoo's own training data)"}
    log(f"converting {len(manifest['models'])} zoo models")
    zoo = load_zoo(args.zoo, manifest)
    teachers, students, controls, labels, recipes = dataclasses.astuple(ZooRoles.of(zoo))
    from kdd_jax.synthesis import ImagePool

    for pool, raw in pools.items():  # a pool the students cannot take: say which, before any work
        ImagePool(raw, None, f"{args.pools or 'Fashion-MNIST'}[{pool!r}]").check(zoo[students[0]][1])
    if truth is not None:  # the mistake section needs every model's training data: check it before any work
        lacking = check_training_records({n: e for n, (_, _, e) in zoo.items()})
        if lacking:
            log(f"mistake-inheritance section skipped: no training-data record (data.indices_sha256) for {lacking[:3]}"
                f"{' ...' if len(lacking) > 3 else ''} in {args.manifest}")
            truth = None
    results = {}
    for pool, raw in pools.items():
        logits = {}
        for name, (model, config, entry) in zoo.items():
            logits[name] = pool_logits(model, config, raw, args.work / pool / f"{name}-{weights_id(args.zoo, entry)}.npy")
        c = zoo[teachers[0]][1].arch.num_classes
        t_logp = teacher_logp(np.stack([logits[t] for t in teachers]), "probs", c)
        per = {m: per_probe_scores(logits[m], t_logp) for m in students + controls}
        results[pool] = evaluate_pool(per, labels, students, controls, recipes)
        if truth is not None:
            results[pool]["mistakes"] = mistake_inheritance(
                {m: logits[m].argmax(-1) for m in logits}, truth[pool], students, controls, teachers,
                {n: e for n, (_, _, e) in zoo.items()})
        log(f"{pool}: dark_corr {results[pool]['dark_corr']['accuracy']:.3f}, "
            f"{results[pool]['dark_corr']['detectability']['above_controls']}/{len(students)} above the controls")
    meta = run_meta(__file__, argv, started, backend=True, pool_sizes={k: len(v) for k, v in pools.items()},
                    pool_sources=sources, num_teachers=len(teachers), set_probes=SET_PROBES, subsets=SUBSETS,
                    weights_sha256_12={n: weights_id(args.zoo, e) for n, (_, _, e) in zoo.items()})
    write_results(args.out, args.tag, {"meta": meta, "teachers": teachers, "students": students, "controls": controls,
                                       "recipes": recipes, "results": results},
                  markdown(results, meta, students, recipes, teachers))
    log(f"wrote {args.out / (args.tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
