"""Detection quality on the real Fashion-MNIST zoo, in the paper's protocol (arXiv 2510.02302).

    python benchmarks/zoo/build_zoo.py                    # once: the zoo (PyTorch, ~1-2 h on 2 cores)
    python benchmarks/detection_accuracy.py               # this benchmark; resumable
    python benchmarks/detection_accuracy.py --methods pixel,noise --runs 2   # a subset

Every student and control goes through our converter (PyTorch safetensors -> Flax). For each
model, run r (seed r) and probe method, 100 probes are made once (data-free synthesis: pixel,
generator, confidence; baselines: noise; real images: real = random Fashion-MNIST training images,
the paper's oracle, since every zoo model trained on a subset of them; ood / mia = energy and
membership filtering of an auxiliary pool, the 10k Fashion-MNIST test images no model trained on;
each run filters a different random half of it).
Every teacher answers them once (logits, through the persistent response cache); what a probs,
top-3 or label-only API would have returned is derived from those logits exactly as such an API
computes it. The first N probes give the N-probe result, N in {1, 10, 50, 100}.

Metrics (kdd_jax.evaluation): accuracy and one-vs-rest AUC over the distilled students per run,
mean +- std over runs, as the authors' score2detect.py computes them; per recipe; and binary
"distilled or not" rates: the margin statistic (best teacher minus the mean of the others) with a
leave-one-out threshold at >= 90% TPR on the other distilled students, false-positive rate on the
independent controls.

Outputs: benchmarks/results/TAG.{md,json}, TAG_vs_n.svg and TAG_margins.svg (TAG: --tag, default
detection_accuracy). Intermediate results (per model/run/method logits) are cached in
benchmarks/_work/detection/ so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from benchmarks.provenance import run_meta, write_results  # noqa: E402
from benchmarks.zoo.fashion import load_fashion  # noqa: E402
from converters import convert_student  # noqa: E402
from kdd_jax.detect import teacher_log_probs  # noqa: E402
from kdd_jax.evaluation import margin_statistic, zoo_metrics  # noqa: E402
from kdd_jax.io import atomic_write_bytes  # noqa: E402
from kdd_jax.models import predict_logits  # noqa: E402
from kdd_jax.report import svg_histogram_rows, svg_lines  # noqa: E402
from kdd_jax.scores import SCORES  # noqa: E402
from kdd_jax.synthesis import OPTIMISED_METHODS, ImagePool, SynthesisConfig, synthesize  # noqa: E402
from kdd_jax.synthesis.mapping import map_probes  # noqa: E402
from kdd_jax.teachers import CachedTeacher, ResponseCache, flax_teacher  # noqa: E402
from kdd_jax.teachers.local import logits_to_output  # noqa: E402

# Named settings beyond an engine method's defaults: label -> SynthesisConfig overrides (their `steps`
# wins over --steps). pixel: the paper's construction, the student seeing its probes as they are (without
# the noise that is pixel's default since it measured best here). pixel-robust: pixel synthesis with the
# student seeing its probes under fresh Gaussian noise each step (`aug_noise`, the engine's pixel default),
# the best data-free setting of datafree_probes.md.
VARIANTS = {"pixel": {"aug_noise": 0.0}, "pixel-robust": {"method": "pixel", "aug_noise": 1.0, "steps": 200}}
METHODS = ("pixel", "generator", "confidence", "noise", "real", "ood", "mia", *(v for v in VARIANTS if v != "pixel"))
OUTPUTS = ("logits", "probs", "topk", "labels")
TOPK = 3
N_VALUES = (1, 10, 50, 100)
SCORE_NAMES = ("neg_kl", "inverse_kl", "top1", "dark_corr", "acs", "linear_cka", "rbf_cka", "neg_mmd2")
BEST = "dark_corr"  # the engine's recommended score: per-recipe, binary and plot sections use it too
PAPER = {  # CIFAR-10, point-wise KL, (acc, auc) at N = 1 / 50 / 100 (method.md)
    "mia + KL (paper)": {1: (0.43, 0.66), 50: (0.54, 0.79), 100: (0.55, 0.80)},
    "ood + KL (paper)": {1: (0.42, 0.68), 50: (0.55, 0.79), 100: (0.54, 0.80)},
    "synthetic + KL (paper)": {1: (0.62, 0.75), 50: (0.87, 0.94), 100: (0.87, 0.94)},
    "oracle real + KL (paper)": {1: (0.45, 0.64), 50: (0.87, 0.96), 100: (0.95, 0.99)},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- stage 1: logits


def load_zoo(zoo: Path, manifest: dict):
    models = {}
    for m in manifest["models"]:
        r = convert_student(zoo / m["path"])
        models[m["name"]] = (r.model, r.config, m)
    return models


def add_zoo_arguments(ap) -> None:
    """--zoo (the built zoo's model folders) and --manifest (its manifest.json), defaulting to the
    repository's build (benchmarks/zoo/build_zoo.py): the options every zoo benchmark takes."""
    ap.add_argument("--zoo", type=Path, default=REPO / "benchmarks/zoo/cache")
    ap.add_argument("--manifest", type=Path, default=REPO / "benchmarks/zoo/manifest.json")


def read_manifest(path: Path) -> dict:
    """The zoo's manifest, or SystemExit saying how to build the zoo (it is not in git)."""
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no zoo manifest; build the zoo first: python benchmarks/zoo/build_zoo.py --jobs 2")
    return json.loads(Path(path).read_text())


@dataclasses.dataclass(frozen=True)
class ZooRoles:
    """Who is who in a loaded zoo: teachers sorted by name (the order of stacked teacher outputs),
    students and controls in manifest order, each student's teacher index and recipe."""

    teachers: list
    students: list
    controls: list
    labels: np.ndarray
    recipes: list

    @classmethod
    def of(cls, zoo: dict) -> "ZooRoles":
        teachers = sorted(n for n, (_, _, m) in zoo.items() if m["role"] == "teacher")
        students = [n for n, (_, _, m) in zoo.items() if m["role"] == "student"]
        controls = [n for n, (_, _, m) in zoo.items() if m["role"] == "control"]
        labels = np.array([teachers.index(zoo[n][2]["teacher"]) for n in students])
        recipes = [zoo[n][2].get("recipe_id", zoo[n][2].get("recipe", "?")) for n in students]
        return cls(teachers, students, controls, labels, recipes)


def pools():
    x_train, _ = load_fashion("train")
    x_test, y_test = load_fashion("test")
    as_pool = lambda x, y, src: ImagePool((x.astype(np.float32) / 255.0)[:, None], y, src)  # noqa: E731
    return {"real": as_pool(x_train, None, "fashion-mnist train (60k)"),
            "aux": as_pool(x_test, y_test, "fashion-mnist test (10k)")}


def weights_id(zoo: Path, entry: dict) -> str:
    """First 12 hex digits of the model file's sha256: caches are keyed by weights, not names,
    so a rebuilt model never reuses stale results."""
    from kdd_jax.io import sha256_file

    return sha256_file(zoo / entry["path"] / "model.safetensors")[:12]


def probe_logits(name, wid, model, config, method, seed, n, steps, teachers, image_pools, work: Path) -> dict:
    """Student and teacher logits on the probes of (model, method, seed); cached on disk. `method`: an
    engine method or a VARIANTS label."""
    over = {"method": method, **VARIANTS.get(method, {})}
    # `steps` goes to the optimised methods only: noise and the pool filters optimise nothing and refuse it
    sc = SynthesisConfig(**{"n_probes": n, "seed": seed, **({"steps": steps} if over["method"] in OPTIMISED_METHODS else {}),
                            **over})
    # keyed by every synthesis setting (a changed default makes new probes, never reuses stale ones)
    cfg = sc.identity_sha256()[:8]
    path = work / "logits" / method / f"{name}-{wid}-seed{seed}-n{n}-s{sc.steps}-{cfg}{'-half' if method in ('ood', 'mia') else ''}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    pool = None
    if method == "real":
        pool = image_pools["real"]
    elif method in ("ood", "mia"):
        # each run filters its own random half of the auxiliary pool: the filters are deterministic,
        # so without this all runs would pick the same probes
        aux = image_pools["aux"]
        keep = np.sort(np.random.default_rng(1000 + seed).choice(len(aux.images), len(aux.images) // 2, replace=False))
        pool = ImagePool(aux.images[keep], None if aux.labels is None else aux.labels[keep], aux.source + " (half)")
    t0 = time.perf_counter()
    probes = synthesize(model, config, sc, pool=pool)
    synth_s = time.perf_counter() - t0
    s_logits = np.asarray(predict_logits(model, probes.normalised))
    t_logits = np.stack([t.query(map_probes(probes.raw, config.preprocessing.value_range, t.spec, t.name)).values
                         for t in teachers])
    out = {"student": s_logits, "teachers": t_logits, "synth_seconds": np.float64(synth_s),
           "sha256": np.bytes_(probes.sha256)}
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    np.savez(buf, **out)
    atomic_write_bytes(path, buf.getvalue())
    return out


def zoo_teachers(zoo: dict, zoo_dir: Path, work_root: Path):
    """The zoo's teachers as logits APIs behind a persistent response cache, sorted by name (cached
    teacher logits are stacked in this order, so it must not depend on the manifest's), and the work
    folder of this exact set of teacher weights (the cache keys answers by teacher NAME)."""
    names = sorted(n for n, (_, _, m) in zoo.items() if m["role"] == "teacher")
    work = work_root / ("teachers-" + "-".join(weights_id(zoo_dir, zoo[t][2])[:6] for t in names))
    cache = ResponseCache(work / "responses.sqlite")
    return [CachedTeacher(flax_teacher(t, zoo[t][0], zoo[t][1], output="logits"), cache) for t in names], work


# ------------------------------------------------------------------------------- stage 2: scores


def teacher_logp(t_logits: np.ndarray, output: str, num_classes: int) -> np.ndarray:
    """[K, N, C] log-probs as seen through an API of kind `output`."""
    return np.stack([np.asarray(teacher_log_probs(logits_to_output(tl, output, TOPK), num_classes, 1.0))
                     for tl in t_logits])


def all_scores(s_logits: np.ndarray, t_logp: np.ndarray, ns=N_VALUES) -> dict[str, dict[int, np.ndarray]]:
    """score name -> N -> [K] scores on the first N probes, for each N in `ns` (set scores: N > 2)."""
    out = {}
    for name in SCORE_NAMES:
        fn, kind, _ = SCORES[name]
        out[name] = {}
        if kind == "pointwise":
            per = np.asarray(jax.vmap(lambda y: fn(s_logits, y))(t_logp))  # [K, N]
            for n in ns:
                if n <= per.shape[1]:
                    out[name][n] = per[:, :n].mean(-1)
        else:
            x = jax.nn.log_softmax(jnp.asarray(s_logits), -1)
            for n in ns:
                if 2 < n <= x.shape[0]:  # set scores need a set
                    out[name][n] = np.asarray(jax.vmap(lambda y: fn(x[:n], y[:n]))(jnp.asarray(t_logp)))
    return out


def evaluate(records, manifest, teachers_order):
    """records[(model, seed, method, output)] = {score: {N: [K]}} -> nested metrics."""
    models = {m["name"]: m for m in manifest["models"]}
    distilled = [n for n, m in models.items() if m["role"] == "student"]
    controls = [n for n, m in models.items() if m["role"] == "control"]
    labels = np.array([teachers_order.index(models[n]["teacher"]) for n in distilled])
    seeds = sorted({k[1] for k in records})
    recipes = [models[n]["recipe_id"] for n in distilled]
    results = {}
    for method in METHODS:
        for output in OUTPUTS:
            for score in SCORE_NAMES:
                for n in N_VALUES:
                    try:
                        S = np.array([[records[(m, s, method, output)][score][n] for m in distilled] for s in seeds])
                        C = np.array([[records[(m, s, method, output)][score][n] for m in controls] for s in seeds])
                    except KeyError:
                        continue
                    if not np.all(np.isfinite(S)):
                        continue
                    res = zoo_metrics(S, labels, recipes=recipes, controls=C if len(controls) else None)
                    res["per_recipe_accuracy"] = dict(sorted(res.pop("per_recipe").items()))
                    if "binary" in res and output == "probs" and n == 100 and score in ("neg_kl", BEST):
                        res["margins"] = {"distilled": margin_statistic(S).ravel().tolist(),
                                          "controls": margin_statistic(C).ravel().tolist()}  # plotted ones only
                    results.setdefault(method, {}).setdefault(output, {}).setdefault(score, {})[n] = res
    return results


# ------------------------------------------------------------------------------- report


def cell(res) -> str:
    return "-" if res is None else f"{res['accuracy']:.2f}±{res['accuracy_std']:.2f} / {res['auc']:.2f}"


def markdown(results, manifest, meta) -> str:
    get = lambda m, o, s, n: results.get(m, {}).get(o, {}).get(s, {}).get(n)  # noqa: E731
    methods = [m for m in METHODS if m in results]  # the methods this run measured, in METHODS' order
    skipped = [m for m in METHODS if m not in results]
    lines = ["# Detection accuracy on the Fashion-MNIST zoo", "",
             f"Machine: {meta['machine']['cpu_model']}, {meta['machine']['usable_cpus']} CPUs, "
             f"{meta['machine']['memory_gib']} GiB, backend {meta['machine']['jax_backend']}; versions: {meta['versions']}; date {meta['date']}.",
             f"Command: `{meta['command']}` ({meta['seconds']:.0f} s, {meta['runs']} runs, "
             f"{meta['synthesis_steps']} synthesis steps)."
             + "".join(f" `{k}`: SynthesisConfig overrides `{json.dumps(v)}`." for k, v in meta.get("variants", {}).items()), "",
             f"Zoo: {manifest['counts']['teacher']} teachers, {manifest['counts']['student']} distilled students, "
             f"{manifest['counts']['control']} independent controls (benchmarks/results/zoo.md). Accuracy ± std over "
             "runs / one-vs-rest AUC, over distilled students, multiple choice among all teachers."
             + (f" Not run here: {', '.join(skipped)}." if skipped else ""), "",
             "## Paper layout (teacher API: probabilities)", "",
             f"Rows `+ neg_kl` use the paper's point-wise KL (as -KL); rows `+ {BEST}` the engine's recommended score.", "",
             "| probes | N=1 | N=10 | N=50 | N=100 |", "|---|---|---|---|---|"]
    for score in ("neg_kl", BEST):
        for method in methods:
            lines.append(f"| {method} + {score} | " + " | ".join(cell(get(method, "probs", score, n)) for n in N_VALUES) + " |")
    for name, row in PAPER.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[n][0]:.2f} / {row[n][1]:.2f}" if n in row else "-"
                                                   for n in N_VALUES) + " |")
    lines += ["", "## Every method x score at N=100 (probabilities API)", "",
              "| method | " + " | ".join(SCORE_NAMES) + " |", "|---|" + "---|" * len(SCORE_NAMES)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(cell(get(method, "probs", s, 100)) for s in SCORE_NAMES) + " |")
    lines += ["", "## Teacher API kinds (N=100, best score per kind)", "",
              "| method | " + " | ".join(OUTPUTS) + " |", "|---|" + "---|" * len(OUTPUTS)]
    for method in methods:
        row = []
        for o in OUTPUTS:
            cands = [(s, get(method, o, s, 100)) for s in SCORE_NAMES]
            cands = [(s, r) for s, r in cands if r is not None]
            if not cands:
                row.append("-")
                continue
            s, r = max(cands, key=lambda sr: (sr[1]["accuracy"], sr[1]["auc"]))
            row.append(f"{cell(r)} ({s})")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    recipes = sorted(next(iter(next(iter(next(iter(results.values())).values())).values()))[100]["per_recipe_accuracy"])
    lines += ["", "## Per recipe (accuracy, N=100, probabilities API)", "",
              "| method + score | " + " | ".join(recipes) + " |", "|---|" + "---|" * len(recipes)]
    for score in ("neg_kl", BEST):
        for method in methods:
            r = get(method, "probs", score, 100)
            if r:
                lines.append(f"| {method} + {score} | " + " | ".join(f"{r['per_recipe_accuracy'][x]:.2f}" for x in recipes) + " |")
    lines += ["", "## Binary: distilled or not (N=100, probabilities API, margin statistic)", "",
              "Margin: the best teacher's score minus the mean of the others'. Threshold: leave-one-out, the "
              "largest value flagging >= 90% of the other distilled students; false-positive rate on the "
              "independent controls.", "",
              "| method + score | TPR | FPR on controls |", "|---|---|---|"]
    for score in ("neg_kl", BEST):
        for method in methods:
            r = get(method, "probs", score, 100)
            if r and "binary" in r:
                lines.append(f"| {method} + {score} | {r['binary']['tpr']:.2f} | {r['binary']['fpr']:.2f} |")
    lines += ["", "## Cost", "", "| method | synthesis s / model (mean) |", "|---|---|"]
    for method, s in meta["synthesis_seconds"].items():
        lines.append(f"| {method} | {s:.2f} |")
    return "\n".join(lines) + "\n"


def plots(results, out_dir: Path, tag: str = "detection_accuracy") -> None:
    series = {}
    for method in METHODS:
        r = results.get(method, {}).get("probs", {}).get(BEST, {})
        if r:
            ns = sorted(r)
            series[method] = (ns, [r[n]["accuracy"] for n in ns], [r[n]["accuracy_std"] for n in ns])
    if series:
        atomic_write_bytes(out_dir / f"{tag}_vs_n.svg",
                           svg_lines(series, x_label="probes N (log)", y_label=f"accuracy ({BEST})", log_x=True,
                                     y_range=(0, 1)).encode())
    rows = []
    for method in METHODS:
        r = results.get(method, {}).get("probs", {}).get(BEST, {}).get(100)
        if r and "margins" in r:
            rows += [(f"{method} distilled", np.array(r["margins"]["distilled"])),
                     (f"{method} controls", np.array(r["margins"]["controls"]))]
    if rows:
        atomic_write_bytes(out_dir / f"{tag}_margins.svg",
                           svg_histogram_rows(rows, x_label=f"{BEST} margin: best teacher minus mean of the others").encode())


# ------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_zoo_arguments(ap)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200, help="synthesis steps (pixel, generator, confidence)")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks/_work/detection")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--tag", default="detection_accuracy", help="output file stem")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")
    started = time.perf_counter()
    manifest = read_manifest(args.manifest)
    log(f"converting {len(manifest['models'])} zoo models")
    zoo = load_zoo(args.zoo, manifest)
    teachers, work = zoo_teachers(zoo, args.zoo, args.work)
    teacher_names = [t.name for t in teachers]
    wids = {name: weights_id(args.zoo, m) for name, (_, _, m) in zoo.items()}
    image_pools = pools() if set(methods) & {"real", "ood", "mia"} else {}
    audited = [n for n, (_, _, m) in zoo.items() if m["role"] in ("student", "control")]
    records, synth_s = {}, {}
    total = len(audited) * args.runs * len(methods)
    done = 0
    for method in methods:
        for seed in range(args.runs):
            for name in audited:
                model, config, _ = zoo[name]
                z = probe_logits(name, wids[name], model, config, method, seed, max(N_VALUES), args.steps, teachers,
                                 image_pools, work)
                synth_s.setdefault(method, []).append(float(z["synth_seconds"]))
                c = config.arch.num_classes
                for output in OUTPUTS:
                    records[(name, seed, method, output)] = all_scores(z["student"], teacher_logp(z["teachers"], output, c))
                done += 1
                if done % 10 == 0 or done == total:
                    el = time.perf_counter() - started
                    log(f"{done}/{total} ({method}, seed {seed}) elapsed {el:.0f}s; queries "
                        f"{sum(t.stats.queries for t in teachers)} new, {sum(t.stats.hits for t in teachers)} cached")
    results = evaluate(records, manifest, teacher_names)
    meta = run_meta(__file__, argv, started, backend=True, runs=args.runs, synthesis_steps=args.steps,
                    variants={m: VARIANTS[m] for m in methods if m in VARIANTS},
                    synthesis_seconds={m: float(np.mean(v)) for m, v in synth_s.items()},
                    queries={t.name: dataclasses.asdict(t.stats) for t in teachers})
    write_results(args.out, args.tag, {"meta": meta, "teachers": teacher_names, "results": results},
                  markdown(results, manifest, meta), indent=None)  # compact: thousands of cells
    plots(results, args.out, args.tag)
    log(f"wrote {args.out / (args.tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
