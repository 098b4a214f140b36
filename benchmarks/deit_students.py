#!/usr/bin/env python
"""Are DeiT-style students detected? ViT students distilled from the zoo's CNN teachers.

    python benchmarks/deit_students.py             # trains 14 small DeiTs (~35 min, resumable), then scores them
    python benchmarks/deit_students.py --epochs 0.2 --runs 1 --out /tmp/d --work /tmp/dw   # a smoke run

DeiT (Touvron et al. 2021) is the best-known distilled open-weights model: a ViT student given a
distillation token whose head learns a CNN teacher's labels. This asks whether kdd-jax, which
converts such students straight from a transformers `save_pretrained` folder (`converters/vit.py`),
attributes them to their CNN teacher, a family the student shares nothing with.

Models, trained here in PyTorch (`converters.torch_reference.TorchViTClassifier`, transformers' DeiT
layout) on 1x28x28 Fashion-MNIST with the zoo's crop+flip augmentation and written as transformers
folders (config.json with model_type `deit`, model.safetensors with the `deit.` prefix,
preprocessor_config.json), each on 10k images, the class head always on the true label (weight 0.5):
- per zoo teacher, 3 students (RECIPES): hard distillation (the teacher's argmax on each augmented
  image, as DeiT does) and soft distillation (KL at T=3) on the teacher's own training images (DeiT's
  setting: its teacher was trained on the images it distilled on), and hard distillation on a
  transfer set the teacher never saw;
- 2 independent DeiT controls, the true label in both heads, on images of the student pool and of
  the teacher pool.
A model is retrained when its recorded settings differ from the requested ones.

Every model goes through `kdd convert`'s path (`convert_student` on the folder), then the zoo's
evaluation on the 10k Fashion-MNIST test images (`detection_ceiling.py`'s scores and
detectability), teachers answering with probabilities: accuracy over the 12 students, and each
student's own-teacher excess against the largest excess of (a) the 2 DeiT controls and (b) the
zoo's 6 CNN controls. Then the audit as a user runs it, N=100 probes per student and run
(`--runs` seeds): data-free probes from the BN-free `confidence` synthesis (a ViT has no BatchNorm
for the pixel or generator methods) and the MIA filter of an unlabelled pool (each run its own half
of the 10k test images), scored as `detection_accuracy.py` does. Outputs:
benchmarks/results/TAG.{md,json}; models, logits and teacher answers are cached under --work, keyed
by weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.detection_accuracy import (  # noqa: E402
    ZooRoles, add_zoo_arguments, all_scores, load_zoo, log, pools, probe_logits, read_manifest, teacher_logp, weights_id)
from benchmarks.detection_ceiling import evaluate_pool, fashion_pools, per_probe_scores, pool_logits  # noqa: E402
from benchmarks.provenance import run_meta, write_results  # noqa: E402
from kdd_jax.io import sha256_file  # noqa: E402

SCORES = ("dark_corr", "top1", "acs", "linear_cka")
PROBE_METHODS = ("confidence", "mia")  # data-free (BN-free) and the unlabelled-pool filter
PROBE_SCORES = ("neg_kl", "dark_corr", "top1", "acs", "linear_cka")
N_PROBES = 100
ARCH = dict(variant="deit", head="cls_distill", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_channels=1, image_size=28, patch_size=4, hidden_act="gelu",
            layer_norm_eps=1e-6, qkv_bias=True, pooler=False, mask_token=False, num_classes=10)
SIZE = 10_000


RECIPES = {  # DeiT's distillation-token objectives, the class head always on the true label (weight 0.5)
    "hard": "0.5 CE(distillation head, teacher's argmax on the augmented image)",
    "soft": "0.5 T^2 KL(teacher || distillation head) at T=3 (SOFT_T)",
    "label": "0.5 CE(distillation head, true label): an independent control",
}
SOFT_T = 3.0


@dataclasses.dataclass(frozen=True)
class DeiT:
    name: str
    teacher: str | None  # None: an independent control
    recipe: str  # RECIPES
    pool: str  # teacher_train | student_pool | teacher_pool (benchmarks/zoo/fashion.py)
    seed: int

    @property
    def kind(self) -> str:
        """The row's recipe label: the objective and whether the teacher saw the images."""
        return "control" if self.teacher is None else f"{self.recipe}-{'own' if self.pool == 'teacher_train' else 'transfer'}"


def members(teachers: list[str]) -> list[DeiT]:
    """Per teacher: hard distillation on the teacher's own training images (DeiT's own setting: its
    RegNet teacher was trained on the ImageNet images it distilled on), soft distillation on them, and
    hard distillation on a transfer set the teacher never saw; then 2 independent controls."""
    out = []
    for i, t in enumerate(teachers):
        short = t.removeprefix("teacher-")
        out += [DeiT(f"deit-{short}-hard", t, "hard", "teacher_train", 700 + i),
                DeiT(f"deit-{short}-soft", t, "soft", "teacher_train", 720 + i),
                DeiT(f"deit-{short}-hard-transfer", t, "hard", "student_pool", 740 + i)]
    return out + [DeiT("deit-control-a", None, "label", "student_pool", 801),
                  DeiT("deit-control-b", None, "label", "teacher_pool", 802)]


def train_member(m: DeiT, folder: Path, zoo: Path, epochs: float, lr: float, batch: int) -> dict:
    """Train one DeiT in PyTorch (deterministic for a seed), with the zoo's augmentation (random crop
    and flip, as DeiT trains on augmented images and queries its teacher on them), and write its
    transformers folder atomically."""
    import shutil

    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from benchmarks.zoo.build_zoo import Data, Spec, augment, forward_all, kd_loss, load_model, zoo_specs
    from benchmarks.zoo.fashion import PREPROCESSING
    from converters.torch_reference import TorchViTClassifier

    torch.manual_seed(m.seed)
    torch.use_deterministic_algorithms(True)
    data = Data()
    specs = {s.name: s for s in zoo_specs()}
    spec = Spec(m.name, "student", "vgg-s", "deit", {}, m.seed, {"pool": m.pool, "size": SIZE, "seed": 5000 + m.seed},
                teacher=m.teacher)
    idx = data.indices(spec, specs)
    x, y = data.xtr[torch.from_numpy(idx)], torch.from_numpy(data.ytr[idx]).long()
    teacher = None
    if m.teacher is not None:
        teacher = load_model(zoo, specs[m.teacher]).eval()
        t_clean, _ = forward_all(teacher, x)
        flips_clean = float((t_clean.argmax(1) != y).float().mean())
    model = TorchViTClassifier(ARCH)
    with torch.no_grad():  # transformers' DeiT init: truncated normal (0.02) tokens and position embeddings
        emb = model.deit.embeddings
        for p in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            torch.nn.init.trunc_normal_(p, std=0.02)
    gen = torch.Generator().manual_seed(m.seed)
    steps = max(1, round(epochs * len(idx) / batch))
    warmup = max(1, round(0.05 * steps))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    model.train()
    t0, step, ema, flips, seen = time.perf_counter(), 0, 0.0, 0, 0
    while step < steps:
        perm = torch.randperm(len(idx), generator=gen)
        for b in range(0, len(idx) - batch + 1, batch):
            if step >= steps:
                break
            bi = perm[b: b + batch]
            xb, yb = augment(x[bi], gen, data.pad_value), y[bi]
            h = model.deit(xb)
            dist = model.distillation_classifier(h[:, 1])
            if teacher is None:
                d_loss = F.cross_entropy(dist, yb)
            else:
                with torch.no_grad():
                    t = teacher(xb.contiguous(memory_format=torch.channels_last)).float()
                flips += int((t.argmax(1) != yb).sum())
                seen += len(bi)
                d_loss = (F.cross_entropy(dist, t.argmax(1)) if m.recipe == "hard"
                          else kd_loss(dist, t, yb, SOFT_T, 1.0))
            loss = 0.5 * F.cross_entropy(model.cls_classifier(h[:, 0]), yb) + 0.5 * d_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            ema = loss.item() if step == 1 else 0.98 * ema + 0.02 * loss.item()
        log(f"  {m.name}: step {step}/{steps}, loss {ema:.3f}, {time.perf_counter() - t0:.0f} s")
    model.eval()
    logits, _ = forward_all(model, data.xte)
    test_acc = float((logits.argmax(1).numpy() == data.yte).mean())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    config = {k: ARCH[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps",
                                   "qkv_bias")}
    config.update(model_type="deit", architectures=["DeiTForImageClassificationWithTeacher"],
                  id2label={str(i): str(i) for i in range(10)})
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": PREPROCESSING["mean"], "image_std": PREPROCESSING["std"], "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3}))
    meta = {**settings(m, epochs, lr, batch), "steps": steps, "final_loss_ema": round(ema, 4),
            "test_accuracy": test_acc, "train_seconds": time.perf_counter() - t0,
            "indices_sha256": hashlib.sha256(np.sort(idx).tobytes()).hexdigest()}
    if teacher is not None:  # how often the teacher's label is not the true one: what hard distillation can carry
        meta.update(teacher_label_flips_clean=flips_clean, teacher_label_flips_augmented=flips / seen)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return meta


def settings(m: DeiT, epochs: float, lr: float, batch: int) -> dict:
    """What a trained model depends on; a cached model with other settings is retrained."""
    return {"member": dataclasses.asdict(m), "epochs": epochs, "lr": lr, "batch": batch, "arch": ARCH,
            "training_images": SIZE, "augment": "zoo crop+flip", "soft_T": SOFT_T}


def markdown(res: dict, meta: dict) -> str:
    kinds = list(dict.fromkeys(r["kind"] for r in res["models"] if r["teacher"] is not None))
    n = sum(r["teacher"] is not None for r in res["models"])
    lines = ["# DeiT students of CNN teachers", "",
             f"{meta['date']} · {meta['machine']['cpu_model']} ({meta['machine']['usable_cpus']} CPUs) · command "
             f"`{meta['command']}` · {meta['seconds']:.0f} s · versions {meta['versions']}", "",
             "ViT students (transformers' DeiT layout, 4 layers, width 64, patch 4, 0.2 M parameters, "
             f"{meta['epochs']:g} epochs on {meta['training_images'] // 1000}k augmented Fashion-MNIST images) distilled from the zoo's CNN teachers through the distillation "
             "token, the class token always on the true label: `hard` (DeiT's hard distillation: the teacher's "
             "argmax on each augmented image), `soft` (KL at T=3), on the teacher's own training images (`own`, as "
             "DeiT distilled on its teacher's ImageNet) or on a transfer set the teacher never saw; controls: the "
             "same model and recipe with the true label in both heads. Converted from their transformers folders by "
             "`converters/vit.py`.", "",
             "| model | recipe | test accuracy | teacher's label != true label (clean / augmented training images) | "
             "top-1 agreement on the test images with own teacher (max other) |", "|---|---|---|---|---|"]
    for r in res["models"]:
        t = r["training"]
        flips = ("-" if r["teacher"] is None else
                 f"{t['teacher_label_flips_clean']:.3f} / {t['teacher_label_flips_augmented']:.3f}")
        agree = "-" if r["teacher"] is None else f"{r['agree_own']:.3f} ({r['agree_other_max']:.3f})"
        lines.append(f"| `{r['name']}` | {r['kind']} | {r['test_accuracy']:.3f} | {flips} | {agree} |")
    lines += ["", "## Every test image as a probe (10k, teachers' probabilities)", "",
              f"Accuracy / AUC over the {n} students (chance 0.25), per recipe, and students whose own-teacher "
              "excess lies above every control's (`detection_ceiling.py`'s detectability; the 2 DeiT controls, or "
              "the zoo's 6 CNN controls):", "",
              "| score | accuracy / AUC | " + " | ".join(kinds) + " | above DeiT controls | above CNN controls |",
              "|---|---|" + "---|" * len(kinds) + "---|---|"]
    for s in SCORES:
        a, b = res["vs_deit_controls"][s], res["vs_cnn_controls"][s]
        lines.append(f"| {s} | {a['accuracy']:.2f} / {a['auc']:.2f} | "
                     + " | ".join(f"{a['per_recipe'][k]:.2f}" for k in kinds)
                     + f" | {a['detectability']['above_controls']}/{n} | {b['detectability']['above_controls']}/{n} |")
    if res.get("probes"):
        lines += ["", f"## The audit as run on a user's student: N={N_PROBES} probes", "",
                  f"{meta['runs']} runs, accuracy ± std / AUC over the {n} students, then accuracy per recipe. "
                  f"`confidence`: {meta['synthesis_steps']} steps of the BN-free data-free synthesis (a ViT has no "
                  "BatchNorm for `pixel` or `generator`); `mia`: the membership filter of half the unlabelled test "
                  "images (each run its own half).", "",
                  "| probes | score | accuracy / AUC | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
        for method, by_score in res["probes"].items():
            for s in PROBE_SCORES:
                c = by_score[s]
                lines.append(f"| {method} | {s} | {c['accuracy']:.2f}±{c['accuracy_std']:.2f} / {c['auc']:.2f} | "
                             + " | ".join(f"{c['per_recipe'][k]:.2f}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def probe_audit(converted: dict, students: list[str], labels: np.ndarray, kinds: list[str], teachers: list[str],
                zoo: dict, zoo_dir: Path, runs: int, steps: int, work: Path) -> dict:
    """method -> score -> accuracy / AUC over the students at N_PROBES (and accuracy per recipe
    kind), from `runs` seeds of probes; teachers answer through detection_accuracy.py's cached
    logits API, seen as probabilities."""
    from kdd_jax.evaluation import zoo_metrics
    from kdd_jax.teachers import CachedTeacher, ResponseCache, flax_teacher

    wid = {t: weights_id(zoo_dir, zoo[t][2]) for t in teachers}
    work = work / ("teachers-" + "-".join(wid[t][:6] for t in teachers))  # the cache keys answers by teacher name
    cache = ResponseCache(work / "responses.sqlite")
    tq = [CachedTeacher(flax_teacher(t, zoo[t][0], zoo[t][1], output="logits"), cache) for t in teachers]
    image_pools = pools()
    out = {}
    for method in PROBE_METHODS:
        S = {s: np.zeros((runs, len(students), len(teachers))) for s in PROBE_SCORES}
        for seed in range(runs):
            for i, name in enumerate(students):
                model, config, sha = converted[name]
                z = probe_logits(name, sha, model, config, method, seed, N_PROBES, steps, tq, image_pools, work)
                scores = all_scores(z["student"], teacher_logp(z["teachers"], "probs", 10), ns=(N_PROBES,))
                for s in PROBE_SCORES:
                    S[s][seed, i] = scores[s][N_PROBES]
            log(f"  probes {method}, seed {seed}: done")
        out[method] = {}
        for s in PROBE_SCORES:
            out[method][s] = zoo_metrics(S[s], labels, recipes=kinds)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_zoo_arguments(ap)
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks/_work/deit")
    ap.add_argument("--ceiling-work", type=Path, default=REPO / "benchmarks/_work/ceiling",
                    help="detection_ceiling.py's logits cache (shared: the zoo's logits are computed once)")
    ap.add_argument("--epochs", type=float, default=8.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5, help="probe seeds for the N=100 audit (0: skip it)")
    ap.add_argument("--steps", type=int, default=60, help="confidence-synthesis steps (detection_accuracy.py's table: 60)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--tag", default="deit_students")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    manifest = read_manifest(args.manifest)
    from converters.convert import convert_student

    zoo = load_zoo(args.zoo, manifest)
    roles = ZooRoles.of(zoo)
    teachers, cnn_controls = roles.teachers, roles.controls
    raw = fashion_pools()["test"]
    from benchmarks.zoo.fashion import load_fashion

    truth = load_fashion("test")[1][: len(raw)]
    logits = {n: pool_logits(zoo[n][0], zoo[n][1], raw, args.ceiling_work / "test" / f"{n}-{weights_id(args.zoo, zoo[n][2])}.npy")
              for n in teachers + cnn_controls}
    rows, converted = [], {}
    for m in members(teachers):
        folder = args.work / "models" / m.name
        want = settings(m, args.epochs, args.lr, args.batch)
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
        if {k: meta.get(k) for k in want} != json.loads(json.dumps(want)):  # absent, or trained with other settings
            log(f"training {m.name} ({args.epochs} epochs)")
            meta = train_member(m, folder, args.zoo, args.epochs, args.lr, args.batch)
        r = convert_student(folder)  # kdd convert's path: the transformers folder as it is
        sha = sha256_file(folder / "model.safetensors")[:12]
        converted[m.name] = (r.model, r.config, sha)
        logits[m.name] = pool_logits(r.model, r.config, raw, args.work / "logits" / f"{m.name}-{sha}.npy")
        row = {"name": m.name, "teacher": m.teacher, "kind": m.kind, "pool": m.pool, "test_accuracy": meta["test_accuracy"],
               "test_accuracy_jax": float((logits[m.name].argmax(1) == truth).mean()), "training": meta}
        if m.teacher is not None:
            top1 = logits[m.name].argmax(1)
            agree = {t: float((top1 == logits[t].argmax(1)).mean()) for t in teachers}
            row.update(agree_own=agree[m.teacher], agree_other_max=max(v for t, v in agree.items() if t != m.teacher))
        rows.append(row)
    students = [r["name"] for r in rows if r["teacher"] is not None]
    deit_controls = [r["name"] for r in rows if r["teacher"] is None]
    labels = np.array([teachers.index(r["teacher"]) for r in rows if r["teacher"] is not None])
    t_logp = teacher_logp(np.stack([logits[t] for t in teachers]), "probs", 10)
    per = {m: per_probe_scores(logits[m], t_logp, names=SCORES) for m in students + deit_controls + cnn_controls}
    recipes = [r["kind"] for r in rows if r["teacher"] is not None]
    res = {"teachers": teachers, "models": rows,
           "vs_deit_controls": evaluate_pool(per, labels, students, deit_controls, recipes, names=SCORES, curve=()),
           "vs_cnn_controls": evaluate_pool(per, labels, students, cnn_controls, recipes, names=SCORES, curve=())}
    if args.runs:
        res["probes"] = probe_audit(converted, students, labels, recipes, teachers, zoo, args.zoo, args.runs, args.steps, args.work)
    meta = run_meta(__file__, argv, started, arch=ARCH, training_images=SIZE, runs=args.runs,
                    synthesis_steps=args.steps, recipes=RECIPES, epochs=args.epochs, lr=args.lr, batch=args.batch)
    write_results(args.out, args.tag, {"meta": meta, "results": res}, markdown(res, meta))
    log(f"wrote {args.out / (args.tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
