"""Detection quality for diffusion students on the Fashion-MNIST diffusion zoo, in the layout of the
paper's Table C (arXiv 2510.02302, text-to-image part).

    python benchmarks/zoo_diffusion/build.py              # once: the zoo (PyTorch + diffusers, out of CI)
    python benchmarks/generative_detection.py             # this benchmark; resumable
    python benchmarks/generative_detection.py --runs 2 --methods empty   # a subset

Every model goes through our converter (diffusers folder -> Flax) and our samplers, with the sampling
settings its manifest entry records (a one-step student samples in one step, a progressive student in
its few steps, teachers with DDIM). For run r (seed r) and probe method (empty = the paper's empty
prompt / null class; caption = the class the feature network assigns to the student's own
empty-prompt image, the analogue of the paper's captioning baseline; random = a random class), 50 noise
seeds are drawn (`kdd_jax.generative.detect.probe_seeds`); the student and every teacher generate from
the same x_T; teacher answers go through the persistent response cache. The first N probes give the
N-probe result, N in {1, 10, 50}.

Scores: pair scores per probe, averaged (neg_lpips over the feature network, ssim, neg_pixel_mse, and
resid_corr, the correlation of the student's and a teacher's departures from the teachers' mean); set
scores on the feature network's embeddings (linear_cka, acs, neg_mmd2; N > 1 only). The feature
network is the ResNet teacher of the classifier zoo (benchmarks/zoo/cache/teachers/teacher-resnet),
not the paper's AlexNet-LPIPS / CLIP: see kdd_jax/scores/images.py. Images are cropped from the zoo's
32x32 (28x28 padded with background) to 28x28 before scoring and captioning.

Metrics (kdd_jax.evaluation, as for classifiers): accuracy and one-vs-rest AUC over distilled students
per run, mean +- std over runs; per recipe; binary "distilled or not": the margin statistic with a
leave-one-out threshold at >= 90% TPR on the other distilled students, false-positive rate on the
independent controls.

Outputs: benchmarks/results/generative_detection.{md,json}. Per model/run/method scores are cached in
benchmarks/_work/generative/ so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.provenance import command, write_results  # noqa: E402
from converters import convert_student  # noqa: E402
from kdd_jax.evaluation import zoo_metrics  # noqa: E402
from kdd_jax.generative.detect import GenerativeDetectConfig, classifier_captioner, make_probes  # noqa: E402
from kdd_jax.generative.pipeline import load_diffusion  # noqa: E402
from kdd_jax.io import atomic_write_bytes  # noqa: E402
from kdd_jax.scores import SCORES  # noqa: E402
from kdd_jax.scores.images import IMAGE_CONSENSUS_SCORES, IMAGE_PAIR_SCORES, classifier_feature_net  # noqa: E402
from kdd_jax.teachers import ResponseCache  # noqa: E402
from kdd_jax.teachers.generative import CachedGenerativeTeacher, DiffusionTeacher  # noqa: E402
from kdd_jax.versions import machine, versions  # noqa: E402

ZOO = HERE / "zoo_diffusion"
FEATURE_NET = HERE / "zoo" / "cache" / "teachers" / "teacher-resnet"
WORK = HERE / "_work" / "generative"
RESULTS = HERE / "results"
NS = (1, 10, 50)
PAIR = ("neg_lpips", "ssim", "neg_pixel_mse", "resid_corr")
SETS = ("linear_cka", "acs", "neg_mmd2")
METHODS = ("empty", "caption", "random")
SAMPLING_KEYS = {"num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale", "eta": "eta",
                 "scheduler": "scheduler", "timestep_spacing": "timestep_spacing"}


def load_manifest(zoo: Path) -> list[dict]:
    doc = json.loads((zoo / "manifest.json").read_text())
    models = doc["models"] if isinstance(doc, dict) else doc
    return list(models.values()) if isinstance(models, dict) else models


def sampling_of(entry: dict) -> dict:
    s = entry.get("sampling") or {}
    return {ours: s[theirs] for theirs, ours in SAMPLING_KEYS.items() if s.get(theirs) is not None}


def score_one(student, teachers, method: str, run: int, net, caption, n_max: int, crop) -> dict:
    """Per-probe pair scores [K, n_max] and embeddings for one (student, method, run)."""
    req = make_probes(student, GenerativeDetectConfig(probes=method, n=n_max, seed=run), captioner=caption)
    s_img = student.generate(req.prompts, req.noise, req.seeds)[crop]
    t_imgs = [t.generate(req)[crop] for t in teachers]
    out = {"prompts": np.asarray([int(p) if p else -1 for p in req.prompts])}
    for name in PAIR:
        if name in IMAGE_CONSENSUS_SCORES:  # against every teacher at once
            out[name] = np.asarray(IMAGE_CONSENSUS_SCORES[name](s_img, np.stack(t_imgs)))
        else:
            fn = IMAGE_PAIR_SCORES[name]
            out[name] = np.stack([np.asarray(fn(s_img, t, net=net)) for t in t_imgs])
    out["emb_student"] = np.asarray(net.embedding(s_img))
    out["emb_teachers"] = np.stack([np.asarray(net.embedding(t)) for t in t_imgs])
    return out


def weights_id(folder: Path) -> str:
    """First 12 hex digits of the UNet weights' sha256: records of a rebuilt model are not reused."""
    from converters.diffusers_unet import find_unet
    from kdd_jax.io import sha256_file

    return sha256_file(find_unet(folder)[0])[:12]


def scores_at(rec: dict, score: str, n: int) -> np.ndarray:
    """[K] scores of one record with the first n probes."""
    if score in PAIR:
        return rec[score][:, :n].mean(axis=1)
    fn = SCORES[score].fn
    X = jnp.asarray(rec["emb_student"][:n])
    return np.asarray([float(fn(X, jnp.asarray(Y[:n]))) for Y in rec["emb_teachers"]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tag", default="generative_detection")
    ap.add_argument("--ns", default=",".join(map(str, NS)), help="probe counts N (the largest is generated)")
    ap.add_argument("--zoo", default=str(ZOO), help="zoo folder: manifest.json + cache/models/<name>/")
    ap.add_argument("--feature-net", default=str(FEATURE_NET), help="classifier folder for LPIPS, embeddings, captions")
    ap.add_argument("--work", default=str(WORK), help="resumable per-record cache")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--crop", type=int, default=2, help="pixels cut from each side before scoring (the zoo pads "
                    "28x28 images to 32x32: 2)")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    ns = sorted({int(n) for n in args.ns.split(",")})
    n_max = ns[-1]
    zoo, work, results = Path(args.zoo), Path(args.work), Path(args.results)
    c = args.crop
    crop = (slice(None), slice(c, -c or None), slice(c, -c or None), slice(None))
    started = time.time()
    manifest = load_manifest(zoo)

    def model_dir(name: str) -> Path:
        return zoo / "cache" / "models" / name

    teachers_m = [e for e in manifest if e["role"] == "teacher"]
    students_m = [e for e in manifest if e["role"] == "student"]
    controls_m = [e for e in manifest if e["role"] == "control"]
    tnames = [e["name"] for e in teachers_m]
    # answers are keyed by teacher name: a cache per set of teacher weights, so a rebuilt teacher is asked anew
    cache = ResponseCache(work / f"responses-{'-'.join(weights_id(model_dir(e['name']))[:6] for e in teachers_m)}.sqlite")
    teachers = [CachedGenerativeTeacher(DiffusionTeacher(load_diffusion(model_dir(e["name"]), sampling_of(e), name=e["name"])),
                                        cache) for e in teachers_m]
    clf = convert_student(args.feature_net)
    net = classifier_feature_net(clf.model, clf.config, name="zoo-resnet")
    captioner = classifier_captioner(clf.model, clf.config)

    def caption(images):
        return captioner(images[crop])

    records: dict[tuple[str, str, int], dict] = {}
    models = students_m + controls_m
    for entry in models:
        student = None
        for method in methods:
            for run in range(args.runs):
                path = work / f"{entry['name']}-{weights_id(model_dir(entry['name']))}-{method}-{run}-n{n_max}.npz"
                if path.is_file():
                    with np.load(path) as z:
                        records[(entry["name"], method, run)] = dict(z)
                    continue
                if student is None:
                    student = load_diffusion(model_dir(entry["name"]), sampling_of(entry), name=entry["name"])
                t0 = time.perf_counter()
                rec = score_one(student, teachers, method, run, net, caption, n_max, crop)
                buf = io.BytesIO()
                np.savez(buf, **rec)
                atomic_write_bytes(path, buf.getvalue())
                records[(entry["name"], method, run)] = rec
                print(f"{entry['name']} {method} run {run}: {time.perf_counter() - t0:.1f}s", flush=True)

    # how alike the independent teachers draw from the same x_T (empty prompt, run 0's noise): the baseline every
    # student-teacher similarity has to beat
    req = make_probes(teachers[0].teacher.model, GenerativeDetectConfig(n=n_max, seed=0))
    imgs = [t.generate(req)[crop] for t in teachers]
    tt_ssim = {f"{tnames[i]}~{tnames[j]}": round(float(np.mean(IMAGE_PAIR_SCORES["ssim"](imgs[i], imgs[j]))), 4)
               for i in range(len(imgs)) for j in range(i + 1, len(imgs))}
    labels = np.asarray([tnames.index(e["teacher"]) for e in students_m])
    rows, table = [], {}
    for method in methods:
        for score in PAIR + SETS:
            for n in ns:
                if score in SETS and n == 1:
                    continue
                S = np.stack([[scores_at(records[(e["name"], method, r)], score, n) for e in students_m]
                              for r in range(args.runs)])  # [R, M, K]
                C = np.stack([[scores_at(records[(e["name"], method, r)], score, n) for e in controls_m]
                              for r in range(args.runs)])
                met = zoo_metrics(S, labels, recipes=[e["recipe"] for e in students_m], controls=C)
                # absent with fewer than two students, fpr nan without controls: null, "n/a" in the table
                binary = {k: v for k, v in met.get("binary", {}).items() if np.isfinite(v)}
                row = {"method": method, "score": score, "n": n, **{k: met[k] for k in ("accuracy", "accuracy_std", "auc", "auc_std")},
                       "tpr": binary.get("tpr"), "fpr": binary.get("fpr"),
                       "per_recipe": dict(sorted(met["per_recipe"].items()))}
                rows.append(row)
                table[(method, score, n)] = row
    doc = {"benchmark": "generative_detection", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": command(__file__, argv),
           "machine": machine(), "versions": versions(), "runs": args.runs, "ns": ns,
           "teachers": tnames, "students": [{k: e.get(k) for k in ("name", "teacher", "recipe")} for e in students_m],
           "controls": [e["name"] for e in controls_m], "feature_net": _rel(args.feature_net),
           "crop": c, "seconds": round(time.time() - started, 1), "rows": rows, "teacher_teacher_ssim": tt_ssim,
           "queries": {t.name: {"queries": t.stats.queries, "hits": t.stats.hits} for t in teachers}}
    write_results(results, args.tag, doc, render_markdown(doc, table, methods, ns))
    print(render_markdown(doc, table, methods, ns))
    return 0


def _rel(path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def _cell(row: dict | None, what: str) -> str:
    if row is None:
        return "-"
    return f"{row[what]:.2f} ± {row[what + '_std']:.2f}"


def render_markdown(doc: dict, table: dict, methods: list[str], ns: list[int]) -> str:
    nb = 10 if 10 in ns else ns[-1]  # the N of the binary and per-recipe columns
    lines = ["# Generative detection (diffusion zoo, Fashion-MNIST)", "",
             f"{doc['date']} · `{doc['command']}` · {doc['machine']['cpu_model']}, {doc['machine']['usable_cpus']} CPUs · "
             f"versions {doc['versions']} · "
             f"{doc['runs']} runs · {len(doc['students'])} distilled students, {len(doc['controls'])} controls, "
             f"{len(doc['teachers'])} teachers · feature network `{doc['feature_net']}` · {doc['seconds']:.0f} s", "",
             "Table C layout: accuracy / one-vs-rest AUC (mean ± std over runs) for N probes; binary columns: "
             f"TPR / FPR of the margin statistic at a leave-one-out >= 90%-TPR threshold (N = {nb}).", "",
             "Teacher-teacher SSIM from the same x_T (empty prompt, run 0's probes): "
             + ", ".join(f"{k} {v:.2f}" for k, v in doc["teacher_teacher_ssim"].items()), ""]
    for method in methods:
        head = " | ".join(f"acc N={n} | AUC N={n}" for n in ns)
        lines += [f"## {method} prompts", "", f"| score | kind | {head} | TPR / FPR (N={nb}) |",
                  "|---|---|" + "---|---|" * len(ns) + "---|"]
        for score in PAIR + SETS:
            cells = []
            for n in ns:
                r = table.get((method, score, n))
                cells += [_cell(r, "accuracy"), _cell(r, "auc")]
            r10 = table.get((method, score, nb))
            bin_ = " / ".join("n/a" if r10[k] is None else f"{r10[k]:.2f}" for k in ("tpr", "fpr")) if r10 else "-"
            kind = "consensus" if score in IMAGE_CONSENSUS_SCORES else "pair" if score in PAIR else "set"
            lines.append(f"| {score} | {kind} | {' | '.join(cells)} | {bin_} |")
        lines.append("")
    lines += [f"## Per recipe (accuracy, N = {nb})", "", "| prompts | score | " + " | ".join(
        sorted(next(iter(table.values()))["per_recipe"])) + " |", "|---|---|" + "---|" * len(next(iter(table.values()))["per_recipe"])]
    for method in methods:
        for score in PAIR + SETS:
            r = table.get((method, score, nb))
            if r:
                lines.append(f"| {method} | {score} | " + " | ".join(f"{v:.2f}" for _, v in sorted(r["per_recipe"].items())) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
