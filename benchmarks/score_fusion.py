"""Does combining help? Score ensembles, teacher-disagreement probe selection, probe-set fusion and
control-normalised scores on the Fashion-MNIST zoo.

    python benchmarks/score_fusion.py             # ~3 min once detection_ceiling/detection_accuracy caches exist
    python benchmarks/score_fusion.py --fuse real,pixel-robust --runs 5

Issue #4 asks to improve the method with "better scores, ensembles of scores" once the single scores
are measured. detection_ceiling.md shows the single scores top out at 0.78-0.81 on this zoo, the
misses concentrated in two recipes (hard-label and T=1/alpha=0.5 KD); detection_accuracy.md
shows data-free pixel-robust probes attributing hard-label students that real images miss. This
benchmark measures four ways to combine what exists, each against its parts, on the same draws:

1. Score ensembles (pool: 10k Fashion-MNIST test images, random subsets of N): per student, each
   score's K teacher values are z-scored over the teachers and summed (scale-free), or ranked.
2. Teacher-disagreement selection: query the teachers on M = 10 N pool images and keep the N where
   they disagree most (Jensen-Shannon divergence of their probabilities); a probe on which every
   teacher answers alike cannot separate them. Costs M queries per teacher instead of N.
3. Probe-set fusion: two probe methods of detection_accuracy (default: real images and pixel-robust
   data-free probes) per run, as one probe set of N/2 + N/2 (mean point-wise score) and as the z-sum
   of the two sets' scores with N each.
4. Control-normalised scores: each teacher's score z-scored against the independent controls'
   scores for that teacher, correcting teachers every model resembles; binary statistic: the
   largest z, each control judged against the other controls only (as an audit would judge it).

Metrics as detection_accuracy: accuracy (tie-aware) and one-vs-rest AUC over the distilled students,
mean +- std over runs/draws, per recipe, and the binary false-positive rate on the controls at the
leave-one-out threshold for >= 90% TPR. Everything is read from (or written to) the caches of
detection_ceiling.py (pool logits) and detection_accuracy.py (probe logits), so the two benchmarks'
numbers and this one's are on the same models and probes.

Outputs: benchmarks/results/TAG.{md,json} (TAG: --tag, default score_fusion).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
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
    METHODS as DA_METHODS, ZooRoles, add_zoo_arguments, load_zoo, log, pools, probe_logits, read_manifest, teacher_logp, weights_id, zoo_teachers)
from benchmarks.detection_ceiling import fashion_pools, per_probe_scores, pool_logits  # noqa: E402
from benchmarks.provenance import run_meta, write_results  # noqa: E402
from kdd_jax.evaluation import binary_rates_loo, zoo_metrics  # noqa: E402
from kdd_jax.scores import SCORES  # noqa: E402
from kdd_jax.synthesis import ImagePool  # noqa: E402

ENSEMBLE_SCORES = ("dark_corr", "acs", "linear_cka", "rbf_cka", "inverse_kl")
ENSEMBLES = {  # label -> (combination, member scores)
    "z(dark_corr+acs)": ("z", ("dark_corr", "acs")),
    "z(dark_corr+rbf_cka)": ("z", ("dark_corr", "rbf_cka")),
    "z(dark_corr+acs+linear_cka)": ("z", ("dark_corr", "acs", "linear_cka")),
    "z(all five)": ("z", ENSEMBLE_SCORES),
    "rank(dark_corr+acs+linear_cka)": ("rank", ("dark_corr", "acs", "linear_cka")),
}
POOL_NS = (10, 100, 1000)
FUSE_NS = (1, 10, 50, 100)
SELECT_FACTOR = 10  # teacher-disagreement selection keeps N of SELECT_FACTOR * N candidates
SELECT_SCORES = ("dark_corr", "top1")


# ------------------------------------------------------------------------------- combinations (pure)


def zscore(v: np.ndarray) -> np.ndarray:
    """[..., K] -> each row standardised over the K teachers (a constant row becomes 0)."""
    sd = v.std(-1, keepdims=True)
    return np.where(sd > 0, (v - v.mean(-1, keepdims=True)) / np.where(sd > 0, sd, 1.0), 0.0)


def ranks(v: np.ndarray) -> np.ndarray:
    """[..., K] -> average ranks over the teachers (0 = lowest; ties share their mean rank)."""
    from scipy.stats import rankdata

    return rankdata(v, axis=-1) - 1.0


def combine(kind: str, parts: list[np.ndarray]) -> np.ndarray:
    """Sum of z-scores or of ranks over the teachers (ranks break ties with the first part's z-score)."""
    if kind == "z":
        return sum(zscore(p) for p in parts)
    if kind == "rank":
        return sum(ranks(p) for p in parts) + 1e-3 * zscore(parts[0])
    raise ValueError(f"unknown combination {kind!r}")


def teacher_disagreement(t_logp: np.ndarray) -> np.ndarray:
    """[K, N, C] teacher log-probabilities -> [N] Jensen-Shannon divergence among the K teachers
    (entropy of the mean minus the mean entropy): 0 where every teacher answers alike."""
    p = np.exp(t_logp)
    m = p.mean(0)
    h_mean = -(m * np.log(np.where(m > 0, m, 1.0))).sum(-1)
    h_each = -(p * np.where(p > 0, t_logp, 0.0)).sum(-1)
    return h_mean - h_each.mean(0)


def control_z(x: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """Scores [..., K] as z-scores per teacher against the controls' scores [Cn, K] for that teacher."""
    return (x - controls.mean(0)) / np.maximum(controls.std(0, ddof=1), 1e-12)


def control_normalised_rates(S: np.ndarray, C: np.ndarray, tpr_target: float = 0.9) -> dict:
    """Binary rates of the largest control z-score (students [M, K], controls [Cn, K]). Each control j is
    judged as an audit would judge it: it and the students are z-scored against the OTHER controls,
    and the threshold (flagging >= tpr_target of the students) comes from those students' values."""
    tpr = binary_rates_loo(control_z(S, C).max(-1), np.zeros(0), tpr_target=tpr_target)["tpr"]
    flagged = []
    for j in range(len(C)):
        rest = np.delete(C, j, 0)
        flagged.append(binary_rates_loo(control_z(S, rest).max(-1), control_z(C[j:j + 1], rest).max(-1),
                                        tpr_target=tpr_target)["fpr"])
    return {"tpr": tpr, "fpr": float(np.mean(flagged))}


# ------------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class Roles:
    labels: np.ndarray
    recipes: np.ndarray


def metrics(S: np.ndarray, C: np.ndarray | None, roles: Roles, rates: list[dict] | None = None) -> dict:
    """S [R, M, K] students, C [R, Cn, K] controls, per run -> accuracy/AUC (mean, std), per-recipe
    accuracy, binary TPR/FPR: of the margin statistic (leave-one-out threshold at >= 90% TPR), or the
    per-run `rates` given."""
    out = zoo_metrics(S, roles.labels, recipes=roles.recipes,
                      controls=C if rates is None and C is not None and C.shape[1] else None)
    res = {"accuracy": out["accuracy"], "accuracy_std": out["accuracy_std"], "auc": out["auc"], "runs": out["runs"],
           "per_recipe": out["per_recipe"]}
    if rates is None and "binary" in out:
        res["tpr"], res["fpr"] = out["binary"]["tpr"], out["binary"]["fpr"]
    elif rates:
        res["tpr"] = float(np.mean([x["tpr"] for x in rates]))
        res["fpr"] = float(np.mean([x["fpr"] for x in rates]))
    return res


# ------------------------------------------------------------------------------- experiments


def set_or_mean(name: str, s_logits: np.ndarray, t_logp: np.ndarray, per_probe: np.ndarray | None, idx) -> np.ndarray:
    """[K] score of one model on the probes `idx`: point-wise scores average `per_probe` [K, P]."""
    fn, kind, _ = SCORES[name]
    if kind == "pointwise":
        return per_probe[:, idx].mean(-1)
    x = jax.nn.log_softmax(jnp.asarray(s_logits[idx]), -1)
    return np.asarray(jax.vmap(lambda y: fn(x, y))(jnp.asarray(t_logp[:, idx])))


def pool_experiments(logits: dict, teachers: list, students: list, controls: list, roles: Roles, *,
                     draws: int, seed: int = 0) -> dict:
    """Experiments 1 and 2 on one pool of images every model answered (logits[model] [P, C])."""
    c = logits[teachers[0]].shape[-1]
    t_logp = teacher_logp(np.stack([logits[t] for t in teachers]), "probs", c)
    models = students + controls
    pointwise = tuple(s for s in dict.fromkeys(ENSEMBLE_SCORES + SELECT_SCORES) if SCORES[s].kind == "pointwise")
    per = {m: per_probe_scores(logits[m], t_logp, names=pointwise) for m in models}  # score -> [K, P]
    js = teacher_disagreement(t_logp)
    n_pool = len(js)
    rng = np.random.default_rng(seed)
    ns = len(students)
    out = {"ensembles": {}, "selection": {}}
    for n in POOL_NS:
        if n > n_pool:
            continue
        idxs = [rng.choice(n_pool, n, replace=False) for _ in range(draws)]

        def table(names, idx_list):
            # name -> [R, models, K]
            return {s: np.stack([np.stack([set_or_mean(s, logits[m], t_logp, per[m].get(s), idx) for m in models])
                                 for idx in idx_list]) for s in names}

        A = table(ENSEMBLE_SCORES, idxs)
        rows = {s: A[s] for s in ENSEMBLE_SCORES}
        rows.update({label: combine(kind, [A[s] for s in members]) for label, (kind, members) in ENSEMBLES.items()})
        out["ensembles"][n] = {k: metrics(v[:, :ns], v[:, ns:], roles) for k, v in rows.items()}
        m_cand = SELECT_FACTOR * n
        if m_cand <= n_pool:
            sel = []
            for _ in range(draws):
                cand = rng.choice(n_pool, m_cand, replace=False)
                sel.append(cand[np.argsort(-js[cand], kind="stable")[:n]])
            B = table(SELECT_SCORES, sel)
            R = table(SELECT_SCORES, idxs)
            out["selection"][n] = {f"{s} random": metrics(R[s][:, :ns], R[s][:, ns:], roles) for s in SELECT_SCORES}
            what = f"of {m_cand}" if m_cand < n_pool else f"of the whole pool ({n_pool}: one selection, no spread)"
            out["selection"][n].update({f"{s} top-JS {what}": metrics(B[s][:, :ns], B[s][:, ns:], roles)
                                        for s in SELECT_SCORES})
        log(f"pool N={n}: dark_corr {out['ensembles'][n]['dark_corr']['accuracy']:.3f}")
    return out


def fusion_experiments(per: dict, methods: tuple[str, str], students: list, controls: list, roles: Roles,
                       score: str = "dark_corr") -> dict:
    """Experiments 3 and 4. per[method][run][model] = [K, N] point-wise `score` per probe."""
    a, b = methods
    runs = sorted(per[a])
    models = students + controls
    ns = len(students)
    n_max = min(per[a][runs[0]][models[0]].shape[-1], per[b][runs[0]][models[0]].shape[-1])
    out = {}
    for n in FUSE_NS:
        if n > n_max:
            continue
        mean_n = {m: np.stack([np.stack([per[m][r][x][:, :n].mean(-1) for x in models]) for r in runs]) for m in methods}
        rows = {a: mean_n[a], b: mean_n[b]}
        if n >= 2:  # one probe cannot be split between two sets
            half = {m: np.stack([np.stack([per[m][r][x][:, :n // 2] for x in models]) for r in runs]) for m in methods}
            rows[f"{a} + {b}, N/2 each"] = np.concatenate([half[a], half[b]], -1).mean(-1)
        rows[f"z({a}) + z({b}), N of each"] = zscore(mean_n[a]) + zscore(mean_n[b])
        res = {k: metrics(v[:, :ns], v[:, ns:], roles) for k, v in rows.items()}
        if len(controls) >= 3:  # leave-one-out z-scores need two references
            for m in methods:
                S, C = mean_n[m][:, :ns], mean_n[m][:, ns:]
                rates = [control_normalised_rates(S[r], C[r]) for r in range(len(runs))] if ns >= 2 else None
                res[f"{m}, control-normalised"] = metrics(np.stack([control_z(S[r], C[r]) for r in range(len(runs))]),
                                                          None, roles, rates)
        out[n] = res
    return out


# ------------------------------------------------------------------------------- report


def _row(label: str, r: dict, recipes: list) -> str:
    binary = f"{r['fpr']:.2f}" if "fpr" in r else "-"
    return (f"| {label} | {r['accuracy']:.2f}±{r['accuracy_std']:.2f} / {r['auc']:.2f} | {binary} | "
            + " | ".join(f"{r['per_recipe'][x]:.2f}" for x in recipes) + " |")


def summary(results: dict, fuse=()) -> list[str]:
    """One line per experiment at N = 100 (the issue's goal; else its largest N): its most accurate
    baseline row (a single score, random probes, one probe set) against its most accurate variant
    (accuracy, then AUC, breaks ties)."""
    def line(title, rows, parts, n):
        best = lambda keys: max(keys, key=lambda k: (rows[k]["accuracy"], rows[k]["auc"]))  # noqa: E731
        b = best([k for k in rows if parts(k)])
        c = best([k for k in rows if not parts(k)])
        cell = lambda k: f"{k} {rows[k]['accuracy']:.2f} / {rows[k]['auc']:.2f} (FPR {rows[k].get('fpr', float('nan')):.2f})"  # noqa: E731
        verdict = "higher accuracy" if rows[c]["accuracy"] > rows[b]["accuracy"] else "no higher accuracy"
        return f"- {title}, N={n}: best baseline {cell(b)}; best variant {cell(c)}: {verdict}."

    at_100 = lambda d: next((k for k in d if int(k) == 100), max(d, key=int))  # noqa: E731
    out = ["## Summary (accuracy / AUC)", ""]
    pool = results.get("pool", {})
    if pool.get("ensembles"):
        n = at_100(pool["ensembles"])
        out.append(line("Score ensembles", pool["ensembles"][n], lambda k: k in ENSEMBLE_SCORES, n))
    if pool.get("selection"):
        n = at_100(pool["selection"])
        out.append(line("Teacher-disagreement selection", pool["selection"][n], lambda k: k.endswith(" random"), n))
    if results.get("fusion"):
        n = at_100(results["fusion"])
        out.append(line("Probe-set fusion and control normalisation", results["fusion"][n], lambda k: k in fuse, n))
    return out


def markdown(results: dict, meta: dict, recipes: list) -> str:
    head = "| combination | accuracy / AUC | FPR | " + " | ".join(recipes) + " |"
    sep = "|---|---|---|" + "---|" * len(recipes)
    m = meta["machine"]
    lines = ["# Combining scores and probe sets on the Fashion-MNIST zoo", "",
             f"Machine: {m['cpu_model']}, {m['usable_cpus']} CPUs, backend {m['jax_backend']}; versions: {meta['versions']}; "
             f"date {meta['date']}.", f"Command: `{meta['command']}` ({meta['seconds']:.0f} s).", "",
             "Accuracy ± std over runs / one-vs-rest AUC over the distilled students (chance 0.25); FPR: binary "
             "false-positive rate on the independent controls at the leave-one-out threshold flagging >= 90% of the "
             "other students; then accuracy per recipe. Teacher API: probabilities. The AUC is computed, as the "
             "authors' score2detect.py does, on a softmax of the scores over the teachers, so it depends on their scale "
             "(z-scored combinations and raw scores are not on one scale); accuracy does not.", "",
             f"Zoo: {meta['zoo_models']} models, weights sha256 (of every model's file hash) `{meta['zoo_weights_sha256'][:16]}`: "
             "figures hold for this build; a zoo rebuilt on another host moves them by about one student "
             "(benchmarks/zoo/README.md).", ""]
    lines += summary(results, tuple(meta.get("fuse", ()))) + [""]
    if "pool" in results:
        p = results["pool"]
        lines += [f"## 1. Score ensembles ({meta['pool_source']}, {meta['draws']} random draws of N probes)", "",
                  "Per student, each score's teacher values are z-scored (or ranked) over the teachers and summed.", ""]
        for n, rows in p["ensembles"].items():
            lines += [f"### N = {n}", "", head, sep] + [_row(k, r, recipes) for k, r in rows.items()] + [""]
        if p["selection"]:
            lines += [f"## 2. Teacher-disagreement selection (keep the N of {SELECT_FACTOR} N random pool images the "
                      "teachers disagree on most, by Jensen-Shannon divergence; `random`: the draws of section 1)", "",
                      head, sep]
            for n, rows in p["selection"].items():
                lines += [_row(f"N={n}: {k}", r, recipes) for k, r in rows.items()]
            lines.append("")
    if "fusion" in results:
        a, b = meta["fuse"]
        lines += [f"## 3-4. Probe-set fusion ({a}, {b}: detection_accuracy's probes, {meta['runs']} runs, dark_corr) "
                  "and control-normalised scores", "",
                  "Each run's probes as detection_accuracy makes them (`real`: 100 random Fashion-MNIST *training* "
                  "images, the paper's oracle, unlike section 1's test images). `N/2 each`: one probe set, the first "
                  "N/2 of each; `N of each`: the z-sums of both sets' scores (2N probes). `control-normalised`: each "
                  "teacher's score as a z-score against the controls' scores for that teacher; binary statistic the "
                  "largest z, each control judged against the other controls only.", ""]
        for n, rows in results["fusion"].items():
            lines += [f"### N = {n}", "", head, sep] + [_row(k, r, recipes) for k, r in rows.items()] + [""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_zoo_arguments(ap)
    ap.add_argument("--pools", type=Path, default=None,
                    help="an .npz whose first array is a raw NCHW pool (default: the 10k Fashion-MNIST test images)")
    ap.add_argument("--draws", type=int, default=5, help="random probe subsets per N (experiments 1-2)")
    ap.add_argument("--fuse", default="real,pixel-robust", help="two detection_accuracy methods to fuse ('' skips 3-4)")
    ap.add_argument("--runs", type=int, default=5, help="detection_accuracy runs (seeds) to fuse")
    ap.add_argument("--steps", type=int, default=200, help="synthesis steps of fused data-free methods without their own")
    ap.add_argument("--ceiling-work", type=Path, default=REPO / "benchmarks/_work/ceiling")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks/_work/detection")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--tag", default="score_fusion")
    args = ap.parse_args(argv)
    fuse = tuple(m for m in args.fuse.split(",") if m)
    if fuse and len(fuse) != 2:
        ap.error(f"--fuse takes two methods, got {fuse}")
    unknown = sorted(set(fuse) - set(DA_METHODS))
    if unknown:
        ap.error(f"--fuse: unknown methods {unknown}; detection_accuracy's: {', '.join(DA_METHODS)}")
    if args.runs < 1 or args.draws < 1:
        ap.error(f"--runs and --draws must be >= 1, got {args.runs} and {args.draws}")
    if args.pools is not None:  # before any model is converted: a bad file fails at once, naming it
        with np.load(args.pools) as f:
            if not f.files:
                ap.error(f"--pools {args.pools}: the file holds no array")
            pool_name = f.files[0]
            raw = np.asarray(f[pool_name], np.float32)
    started = time.perf_counter()
    manifest = read_manifest(args.manifest)
    log(f"converting {len(manifest['models'])} zoo models")
    zoo = load_zoo(args.zoo, manifest)
    z = ZooRoles.of(zoo)
    roles = Roles(z.labels, np.asarray(z.recipes))
    if args.pools is None:
        raw, pool_name, source = fashion_pools()["test"], "test", "10k Fashion-MNIST test images"
    else:
        source = f"{args.pools}[{pool_name!r}]"
        ImagePool(raw, None, source).check(zoo[z.students[0]][1])  # shape, channels, range: named errors
        # keyed by content: another file's array of the same name must not reuse these logits
        pool_name = f"{pool_name}-{hashlib.sha256(raw.tobytes()).hexdigest()[:12]}"
    results = {}
    wids = {n: weights_id(args.zoo, e) for n, (_, _, e) in zoo.items()}
    logits = {n: pool_logits(model, config, raw, args.ceiling_work / pool_name / f"{n}-{wids[n]}.npy")
              for n, (model, config, _) in zoo.items()}
    results["pool"] = pool_experiments(logits, z.teachers, z.students, z.controls, roles, draws=args.draws)
    if fuse:
        teachers, work = zoo_teachers(zoo, args.zoo, args.work)
        image_pools = pools() if set(fuse) & {"real", "ood", "mia"} else {}
        per = {}
        for method in fuse:
            for seed in range(args.runs):
                for name in z.students + z.controls:
                    model, config, _ = zoo[name]
                    p = probe_logits(name, wids[name], model, config, method, seed, 100, args.steps,
                                     teachers, image_pools, work)
                    t = teacher_logp(p["teachers"], "probs", config.arch.num_classes)
                    per.setdefault(method, {}).setdefault(seed, {})[name] = per_probe_scores(
                        p["student"], t, names=("dark_corr",))["dark_corr"]
            log(f"fusion: {method} probes ready")
        results["fusion"] = fusion_experiments(per, fuse, z.students, z.controls, roles)
    meta = run_meta(__file__, argv, started, backend=True, pool_source=source, draws=args.draws, fuse=list(fuse),
                    zoo_models=len(wids), zoo_weights=wids,
                    zoo_weights_sha256=hashlib.sha256(json.dumps(wids, sort_keys=True).encode()).hexdigest(),
                    runs=args.runs, select_factor=SELECT_FACTOR)
    write_results(args.out, args.tag, {"meta": meta, "teachers": z.teachers, "results": results},
                  markdown(results, meta, list(dict.fromkeys(z.recipes))))
    log(f"wrote {args.out / (args.tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
