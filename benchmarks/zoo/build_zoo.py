#!/usr/bin/env python
"""Build the real Fashion-MNIST teacher/student zoo for kdd-jax (torch, CPU, one thread).

    python benchmarks/zoo/build_zoo.py                        # full zoo, ~45-60 min on one core
    python benchmarks/zoo/build_zoo.py --jobs 2               # the same weights, two models at a time
    python benchmarks/zoo/build_zoo.py --only s01-vgg-kd      # one model (+ its teacher if missing)
    python benchmarks/zoo/build_zoo.py --tiny --out /tmp/tz   # 3 small models, 1 epoch on 2k images, < 1 min
    python benchmarks/zoo/build_zoo.py --report-only          # rewrite manifest.json + results/zoo.md

Every model is a `converters.torch_reference` network (torchvision module names) built from a
kdd-jax config, trained deterministically (fixed seed per model, one thread,
`torch.use_deterministic_algorithms(True)`), and written atomically as

    <out>/<teachers|students|controls>/<name>/{model.safetensors, config.json, meta.json}

so an interrupted build resumes by skipping what is finished. Students are the distilled models
(the positives); controls are trained on ground truth with no teacher (the negatives). The zoo
(what is trained, on which data, with which recipe) is the table `zoo_specs()` below; the data
split is `benchmarks/zoo/fashion.py`. See benchmarks/zoo/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.zoo.fashion import (  # noqa: E402
    PREPROCESSING, SPLIT_SEED, draw_indices, indices_sha256, load_fashion, zoo_split, normalise)
from converters.torch_reference import build_torch_model  # noqa: E402

ZOO_FORMAT = 1  # bump when the meaning of a zoo member changes
DEFAULT_OUT = HERE / "cache"
MANIFEST = HERE / "manifest.json"
RESULTS_MD = REPO / "benchmarks" / "results" / "zoo.md"
ROLE_DIRS = {"teacher": "teachers", "student": "students", "control": "controls"}

# ----------------------------------------------------------------------------- architectures
# Teachers 100k-400k parameters, students/controls 20k-150k. All take 1x28x28 input. Chosen for
# CPU cost as much as size: depthwise convs (MobileNetV2) and dense concatenations at 28x28 are slow
# on one core, so those families downsample early (stem_stride 2 / the imagenet stem).
ARCHS: dict[str, tuple[str, dict]] = {
    "resnet-t": ("resnet", {"block": "basic", "layers": [2, 2, 2], "widths": [16, 32, 64], "stem": "small"}),
    "vgg-t": ("vgg", {"cfg": [32, 32, "M", 64, 64, "M", 128, "M"], "avgpool": None, "classifier_hidden": [128],
                      "dropout": "before_linear", "dropout_p": 0.3}),
    "mobilenetv2-t": ("mobilenetv2", {"width_mult": 1.0, "stem_stride": 2, "last_channel": 384, "dropout_p": 0.2,
                                      "inverted_residual_setting": [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 2, 2],
                                                                    [6, 64, 2, 2]]}),
    "densenet-t": ("densenet", {"growth_rate": 16, "block_config": [4, 6, 6], "num_init_features": 32,
                                "stem": "imagenet"}),
    "resnet-s": ("resnet", {"block": "basic", "layers": [1, 1, 1], "widths": [16, 32, 64], "stem": "small"}),
    "vgg-s": ("vgg", {"cfg": [16, "M", 32, 32, "M", 64, "M"], "avgpool": None, "classifier_hidden": [64],
                      "dropout": "none"}),
    "mobilenetv2-s": ("mobilenetv2", {"width_mult": 0.5, "stem_stride": 2, "last_channel": 256, "dropout_p": 0.0,
                                      "inverted_residual_setting": [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 2, 2],
                                                                    [6, 64, 2, 2]]}),
    "densenet-s": ("densenet", {"growth_rate": 12, "block_config": [3, 4, 4], "num_init_features": 24,
                                "stem": "imagenet"}),
}
FAMILIES = ("resnet", "vgg", "mobilenetv2", "densenet")


def model_config(arch_key: str) -> dict:
    family, arch = ARCHS[arch_key]
    return {"format_version": 1, "family": family,
            "arch": {**arch, "num_classes": 10, "in_channels": 1}, "preprocessing": PREPROCESSING}


# ----------------------------------------------------------------------------- the zoo table


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    role: str  # teacher | student | control
    arch: str  # key of ARCHS
    recipe: str  # supervised | kd | rkd | topk | hard
    hparams: dict
    seed: int  # model init, dropout, shuffling, augmentation
    data: dict  # {"pool": "teacher_pool"|"student_pool"|"teacher_train", "size": n, "seed": s}
    teacher: str | None = None
    epochs: float = 4.0
    lr: float = 2e-3
    weight_decay: float = 5e-4
    batch_size: int = 64
    augment: bool = False
    recipe_id: str = ""  # the student recipe's row in STUDENT_RECIPES (groups the results table)

    @property
    def family(self) -> str:
        return ARCHS[self.arch][0]

    @property
    def transfer(self) -> str | None:
        if self.teacher is None:
            return None
        return "teacher_train" if self.data["pool"] == "teacher_train" else "unseen (student_pool)"


# Per-teacher batch size: 128 took teacher-resnet only to 87.6% in 3 epochs; 64 doubles the updates.
TEACHER_BATCH = {"resnet": 64, "vgg": 128, "mobilenetv2": 64, "densenet": 64}
TEACHER_SIZE = 24000  # each teacher: its own random 24k of the 40k teacher pool
STUDENT_SIZE = 10000  # each student / control: 10k images
# Per-teacher epochs, set to reach ~88-90% within the CPU budget (measured: mobilenetv2 87.3% after 3
# epochs, densenet 87.6% after 6; densenet-t with its stride-4 stem is ~3x cheaper per image).
TEACHER_EPOCHS = {"resnet": 3.0, "vgg": 4.0, "mobilenetv2": 6.0, "densenet": 10.0}
STUDENT_EPOCHS = 4.0  # students and controls: batch 64 (the Spec default), 625 steps on 10k images

# (recipe id, recipe, hyper-parameters, transfer pool)
STUDENT_RECIPES = [
    ("kd-T4-a0.9", "kd", {"T": 4.0, "alpha": 0.9}, "teacher_train"),
    ("kd-T1-a0.5", "kd", {"T": 1.0, "alpha": 0.5}, "teacher_train"),
    ("kd-T8-a0.3", "kd", {"T": 8.0, "alpha": 0.3}, "teacher_train"),
    ("kd-T4-a0.1", "kd", {"T": 4.0, "alpha": 0.1}, "teacher_train"),
    ("rkd", "rkd", {"lambda_distance": 25.0, "lambda_angle": 50.0, "ce_weight": 1.0,
                    "embedding": "input of the last Linear (penultimate features)"}, "teacher_train"),
    ("topk3", "topk", {"k": 3, "rest": "uniform", "T": 4.0, "alpha": 0.9}, "teacher_train"),
    ("hard", "hard", {"target": "teacher argmax", "ground_truth": False}, "teacher_train"),
    ("transfer-kd-T4-a0.9", "kd", {"T": 4.0, "alpha": 0.9}, "student_pool"),
]


def zoo_specs() -> list[Spec]:
    specs: list[Spec] = []
    teachers = []
    for i, fam in enumerate(FAMILIES):
        t = Spec(name=f"teacher-{fam}", role="teacher", arch=f"{fam}-t", recipe="supervised", hparams={},
                 seed=11 + i, data={"pool": "teacher_pool", "size": TEACHER_SIZE, "seed": 1001 + i},
                 epochs=TEACHER_EPOCHS[fam], batch_size=TEACHER_BATCH[fam], augment=True)
        teachers.append(t)
    specs += teachers
    n = 0
    for j, (rid, recipe, hp, pool) in enumerate(STUDENT_RECIPES):
        for i, t in enumerate(teachers):
            n += 1
            fam = FAMILIES[(i + j) % len(FAMILIES)]  # each recipe spans all families; each teacher 2 per family
            data = ({"pool": "teacher_train", "size": STUDENT_SIZE, "seed": 3000 + n} if pool == "teacher_train"
                    else {"pool": "student_pool", "size": STUDENT_SIZE, "seed": 3000 + n})
            specs.append(Spec(name=f"s{n:02d}-{fam}-{rid}", role="student", arch=f"{fam}-s", recipe=recipe,
                              hparams=dict(hp), seed=100 + n, data=data, teacher=t.name, epochs=STUDENT_EPOCHS,
                              recipe_id=rid))
    controls = [("resnet", "student_pool"), ("vgg", "teacher_pool"), ("mobilenetv2", "student_pool"),
                ("densenet", "teacher_pool"), ("vgg", "student_pool"), ("resnet", "teacher_pool")]
    for k, (fam, pool) in enumerate(controls, start=1):
        specs.append(Spec(name=f"c{k:02d}-{fam}", role="control", arch=f"{fam}-s", recipe="supervised",
                          hparams={}, seed=200 + k, data={"pool": pool, "size": STUDENT_SIZE, "seed": 4000 + k},
                          epochs=STUDENT_EPOCHS))
    return specs


def tiny_specs() -> list[Spec]:
    """--tiny: three small models, one epoch on 2k images each (a smoke test of the whole pipeline)."""
    d = {"pool": "teacher_pool", "size": 2000, "seed": 1}
    return [
        Spec("tiny-teacher", "teacher", "vgg-s", "supervised", {}, 1, d, epochs=1.0, augment=True, batch_size=32),
        Spec("tiny-student", "student", "vgg-s", "kd", {"T": 4.0, "alpha": 0.9}, 2,
             {"pool": "teacher_train", "size": 2000, "seed": 2}, teacher="tiny-teacher", epochs=1.0,
             batch_size=32, recipe_id="kd-T4-a0.9"),
        Spec("tiny-control", "control", "vgg-s", "supervised", {}, 3,
             {"pool": "student_pool", "size": 2000, "seed": 3}, epochs=1.0, batch_size=32),
    ]


# ----------------------------------------------------------------------------- data


class Data:
    def __init__(self):
        xtr, self.ytr = load_fashion("train")
        xte, self.yte = load_fashion("test")
        self.xtr = torch.from_numpy(normalise(xtr))
        self.xte = torch.from_numpy(normalise(xte))
        self.split = zoo_split()
        self.pad_value = float((0.0 - PREPROCESSING["mean"][0]) / PREPROCESSING["std"][0])  # a black pixel

    def indices(self, spec: Spec, specs: dict[str, Spec]) -> np.ndarray:
        d = spec.data
        teacher = self.indices(specs[spec.teacher], specs) if d["pool"] == "teacher_train" else None
        return draw_indices(d["pool"], d["size"], d["seed"], teacher, self.split)


def describe_indices(spec: Spec, idx: np.ndarray) -> dict:
    d = spec.data
    if d["pool"] == "teacher_train":
        how = f"fashion.subset(<indices of {spec.teacher}>, {d['size']}, seed={d['seed']})"
    else:
        how = f"fashion.subset(zoo_split()['{d['pool']}'], {d['size']}, seed={d['seed']})"
    return {"pool": d["pool"], "size": int(len(idx)), "subset_seed": d["seed"], "split_seed": SPLIT_SEED,
            "how": how, "indices_sha256": indices_sha256(idx)}


def augment(x: torch.Tensor, gen: torch.Generator, pad_value: float) -> torch.Tensor:
    """Random crop (pad 2 with black, crop 28x28) and horizontal flip, per image."""
    b = x.shape[0]
    p = F.pad(x, (2, 2, 2, 2), value=pad_value)
    dy = torch.randint(0, 5, (b,), generator=gen)
    dx = torch.randint(0, 5, (b,), generator=gen)
    ar = torch.arange(28)
    rows = (dy[:, None] + ar)[:, :, None]
    cols = (dx[:, None] + ar)[:, None, :]
    out = p[torch.arange(b)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


# ----------------------------------------------------------------------------- losses


class Penultimate:
    """Captures the input of the model's last nn.Linear (the penultimate embedding)."""

    def __init__(self, model: nn.Module):
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        self.value = None
        self.handle = last.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        self.value = inputs[0]

    def remove(self):
        self.handle.remove()


def kd_loss(s_logits, t_logits, y, T, alpha):
    """Hinton et al.: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)."""
    kl = F.kl_div(F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1), log_target=True,
                  reduction="batchmean")
    loss = alpha * T * T * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(s_logits, y)
    return loss


def topk_logits(t_logits: torch.Tensor, k: int) -> torch.Tensor:
    """What a top-k API leaves: the k largest probabilities (at T=1) kept exactly, the remaining mass
    spread uniformly over the other classes. Returned as log-probabilities, so kd_loss(T) softens
    them as p^(1/T) / Z."""
    p = F.softmax(t_logits, 1)
    top, idx = p.topk(k, 1)
    rest = (1 - top.sum(1, keepdim=True)).clamp_min(0) / (p.shape[1] - k)
    q = rest.expand_as(p).clone()
    q.scatter_(1, idx, top)
    return q.clamp_min(1e-12).log()


def _pdist(e: torch.Tensor) -> torch.Tensor:
    sq = (e * e).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp_min(1e-12).sqrt()
    d = d.clone()
    d.fill_diagonal_(0)
    return d


def rkd_loss(s_emb: torch.Tensor, t_emb: torch.Tensor, l_dist: float, l_angle: float) -> torch.Tensor:
    """Park et al. 2019 (RKD-DA): distance-wise (pair distances normalised by their mean) and
    angle-wise (cosines of triplet angles) smooth-L1 losses between student and teacher embeddings."""
    s_emb, t_emb = s_emb.flatten(1), t_emb.flatten(1)
    with torch.no_grad():
        td = _pdist(t_emb)
        td = td / td[td > 0].mean()
    sd = _pdist(s_emb)
    sd = sd / sd[sd > 0].mean()
    loss_d = F.smooth_l1_loss(sd, td)

    def angles(e):
        diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    with torch.no_grad():
        ta = angles(t_emb)
    loss_a = F.smooth_l1_loss(angles(s_emb), ta)
    return l_dist * loss_d + l_angle * loss_a


# ----------------------------------------------------------------------------- training


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def forward_all(model: nn.Module, x: torch.Tensor, with_emb: bool = False, bs: int = 1000):
    model.eval()
    hook = Penultimate(model) if with_emb else None
    logits, embs = [], []
    for i in range(0, len(x), bs):
        xb = x[i:i + bs].contiguous(memory_format=torch.channels_last)
        logits.append(model(xb).float())
        if hook is not None:
            embs.append(hook.value.flatten(1).float().clone())
    if hook is not None:
        hook.remove()
    return torch.cat(logits), (torch.cat(embs) if with_emb else None)


def train(spec: Spec, model: nn.Module, data: Data, idx: np.ndarray, teacher_out: dict | None,
          epochs_scale: float, log) -> dict:
    """Train `model` in place; returns training statistics."""
    gen = torch.Generator().manual_seed(spec.seed)
    x_all = data.xtr[torch.from_numpy(idx)]
    y_all = torch.from_numpy(data.ytr[idx])
    n = len(idx)
    bs = spec.batch_size
    steps = max(1, round(spec.epochs * epochs_scale * n / bs))
    warmup = max(1, round(0.03 * steps))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    t_logits = t_emb = None
    if teacher_out is not None:
        t_logits = teacher_out["logits"]
        if spec.recipe == "topk":
            t_logits = topk_logits(t_logits, spec.hparams["k"])
        t_emb = teacher_out.get("emb")
    hook = Penultimate(model) if spec.recipe == "rkd" else None
    model.train()
    step, seen, running, t0 = 0, 0, 0.0, time.perf_counter()
    log_every = max(1, steps // 4)
    while step < steps:
        perm = torch.randperm(n, generator=gen)
        for b in range(0, n - bs + 1 if n >= bs else 1, bs):
            if step >= steps:
                break
            bi = perm[b:b + bs]
            xb = x_all[bi]
            if spec.augment:
                xb = augment(xb, gen, data.pad_value)
            xb = xb.contiguous(memory_format=torch.channels_last)
            yb = y_all[bi]
            out = model(xb)
            r, hp = spec.recipe, spec.hparams
            if r == "supervised":
                loss = F.cross_entropy(out, yb)
            elif r in ("kd", "topk"):
                loss = kd_loss(out, t_logits[bi], yb, hp["T"], hp["alpha"])
            elif r == "hard":
                loss = F.cross_entropy(out, t_logits[bi].argmax(1))
            elif r == "rkd":
                loss = hp["ce_weight"] * F.cross_entropy(out, yb) + rkd_loss(
                    hook.value, t_emb[bi], hp["lambda_distance"], hp["lambda_angle"])
            else:
                raise ValueError(f"unknown recipe {r!r}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += len(bi)
            running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
            if step % log_every == 0 or step == steps:
                log(f"    step {step}/{steps}  loss {running:.4f}  {time.perf_counter() - t0:.0f}s")
    if hook is not None:
        hook.remove()
    model.eval()
    return {"steps": steps, "images_seen": seen, "final_loss_ema": round(running, 5),
            "epochs_effective": round(seen / n, 3), "warmup_steps": warmup}


# ----------------------------------------------------------------------------- building


def model_dir(out: Path, spec: Spec) -> Path:
    return out / ROLE_DIRS[spec.role] / spec.name


def preds_path(out: Path, name: str) -> Path:
    return out / "predictions" / f"{name}.npy"


def is_built(out: Path, spec: Spec) -> bool:
    d = model_dir(out, spec)
    return all((d / f).is_file() for f in ("model.safetensors", "config.json", "meta.json"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_meta(spec: Spec, epochs_scale: float) -> dict:
    """The meta.json fields that must match the table for a built model to count as up to date."""
    return {"arch": spec.arch, "recipe": spec.recipe, "hparams": spec.hparams, "seed": spec.seed,
            "teacher": spec.teacher, "data.pool": spec.data["pool"], "data.size": spec.data["size"],
            "data.subset_seed": spec.data["seed"], "training.lr": spec.lr,
            "training.weight_decay": spec.weight_decay, "training.batch_size": spec.batch_size,
            "training.epochs": spec.epochs * epochs_scale,
            "training.augmentation": "random crop (pad 2) + horizontal flip" if spec.augment else "none"}


def stale_reason(out: Path, spec: Spec, epochs_scale: float, specs: dict[str, Spec]) -> str | None:
    """None when `spec` is built and matches the table (and its teacher's current weights); else why not."""
    if not is_built(out, spec):
        return "not built"
    meta = json.loads((model_dir(out, spec) / "meta.json").read_text())
    for key, want in expected_meta(spec, epochs_scale).items():
        have = meta
        for part in key.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if have != want:
            return f"{key} is {have!r} in meta.json, {want!r} in the table"
    if spec.teacher is not None:
        tfile = model_dir(out, specs[spec.teacher]) / "model.safetensors"
        if not tfile.is_file() or meta.get("teacher_sha256") != _sha256(tfile):
            return "its teacher's weights changed"
    return None


def load_model(out: Path, spec: Spec) -> nn.Module:
    d = model_dir(out, spec)
    model = build_torch_model(json.loads((d / "config.json").read_text()))
    model.load_state_dict(load_file(str(d / "model.safetensors")))
    return model.eval().to(memory_format=torch.channels_last)


def test_predictions(out: Path, spec: Spec, data: Data) -> np.ndarray:
    p = preds_path(out, spec.name)
    if not p.is_file():
        logits, _ = forward_all(load_model(out, spec), data.xte)
        _atomic_save_npy(p, logits.argmax(1).numpy().astype(np.uint8))
    return np.load(p)


def _atomic_save_npy(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


class TeacherOutputs:
    """Teacher logits (+ penultimate embeddings) on the training images its students need,
    computed once per teacher per run (in eval mode, no augmentation) and indexed by image."""

    def __init__(self, out: Path, specs: dict[str, Spec], data: Data, log):
        self.out, self.specs, self.data, self.log = out, specs, data, log
        self.name = None
        self.pos = None
        self.logits = self.emb = None

    def get(self, teacher: str, needed: list[Spec]) -> None:
        if self.name == teacher:
            return
        t0 = time.perf_counter()
        union = np.unique(np.concatenate([self.data.indices(s, self.specs) for s in needed]))
        with_emb = any(s.recipe == "rkd" for s in needed)
        model = load_model(self.out, self.specs[teacher])
        logits, emb = forward_all(model, self.data.xtr[torch.from_numpy(union)], with_emb=with_emb)
        self.pos = np.full(len(self.data.ytr), -1, dtype=np.int64)
        self.pos[union] = np.arange(len(union))
        self.name, self.logits, self.emb = teacher, logits, emb
        self.log(f"  teacher outputs of {teacher} on {len(union)} training images"
                 f"{' (+ embeddings)' if with_emb else ''}: {time.perf_counter() - t0:.1f}s")

    def for_indices(self, idx: np.ndarray) -> dict:
        rows = torch.from_numpy(self.pos[idx])
        assert (rows >= 0).all()
        out = {"logits": self.logits[rows]}
        if self.emb is not None:
            out["emb"] = self.emb[rows]
        return out


def build_one(spec: Spec, out: Path, data: Data, specs: dict[str, Spec], tout: TeacherOutputs,
              epochs_scale: float, log) -> None:
    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    config = model_config(spec.arch)
    model = build_torch_model(config).to(memory_format=torch.channels_last)
    idx = data.indices(spec, specs)
    teacher_out = None
    if spec.teacher is not None:
        teacher_out = tout.for_indices(idx)
    log(f"  {spec.name}: {spec.family} {n_params(model):,} params, recipe {spec.recipe} {spec.hparams or ''}, "
        f"{len(idx)} images x {spec.epochs * epochs_scale:g} epochs")
    stats = train(spec, model, data, idx, teacher_out, epochs_scale, log)
    train_s = time.perf_counter() - t0
    logits, _ = forward_all(model, data.xte)
    preds = logits.argmax(1).numpy()
    acc = float((preds == data.yte).mean())

    # Write the directory atomically: everything into a temp dir beside the cache, then one rename.
    model = model.to(memory_format=torch.contiguous_format)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp_root = out / ".tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_root / f"{spec.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Reload from disk and check it reproduces the logits (the file is what the detector sees).
    check = build_torch_model(config)
    check.load_state_dict(load_file(str(tmp / "model.safetensors")))
    with torch.inference_mode():
        again = check(data.xte[:256])
    if not torch.allclose(again, logits[:256], atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"{spec.name}: reloaded weights do not reproduce the trained model's logits")
    meta = {
        "zoo_format": ZOO_FORMAT, "name": spec.name, "role": spec.role, "family": spec.family,
        "arch": spec.arch, "params": n_params(model), "recipe": spec.recipe,
        "recipe_id": spec.recipe_id or spec.recipe, "hparams": spec.hparams,
        "teacher": spec.teacher, "transfer_set": spec.transfer, "seed": spec.seed,
        "teacher_sha256": (None if spec.teacher is None
                           else _sha256(model_dir(out, specs[spec.teacher]) / "model.safetensors")),
        "data": describe_indices(spec, idx),
        "training": {"optimizer": "AdamW", "lr": spec.lr, "weight_decay": spec.weight_decay,
                     "schedule": "linear warm-up (3% of steps) then cosine to 0", "batch_size": spec.batch_size,
                     "epochs": spec.epochs * epochs_scale, "epochs_scale": epochs_scale,
                     "augmentation": "random crop (pad 2) + horizontal flip" if spec.augment else "none", **stats},
        "test_accuracy": round(acc, 4), "train_seconds": round(train_s, 1),
        "build_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _atomic_save_npy(preds_path(out, spec.name), preds.astype(np.uint8))
    target = model_dir(out, spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a half-written or stale dir (is_built was false): replace it
        shutil.rmtree(target)
    os.replace(tmp, target)
    log(f"  {spec.name}: test accuracy {acc:.4f}, {meta['build_seconds']:.0f}s")


# ----------------------------------------------------------------------------- manifest / report


def machine() -> dict:
    from kdd_jax.versions import machine as host

    return {**host(), "torch_threads": torch.get_num_threads()}


def write_manifest(out: Path, specs: list[Spec], data: Data, manifest_path: Path, md_path: Path | None,
                   log) -> dict:
    teachers = [s for s in specs if s.role == "teacher" and is_built(out, s)]
    tpreds = {t.name: test_predictions(out, t, data) for t in teachers}
    models = []
    missing = [s.name for s in specs if not is_built(out, s)]
    if missing:
        log(f"  not built yet, left out of the manifest: {len(missing)} ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''})")
    for s in specs:
        if not is_built(out, s):
            continue
        meta = json.loads((model_dir(out, s) / "meta.json").read_text())
        p = test_predictions(out, s, data)
        agree = {t: round(float((p == tp).mean()), 4) for t, tp in tpreds.items()}
        models.append({
            "name": s.name, "role": s.role, "family": s.family, "arch": s.arch, "params": meta["params"],
            "recipe": s.recipe, "recipe_id": s.recipe_id or s.recipe, "hparams": s.hparams, "teacher": s.teacher, "transfer_set": s.transfer,
            "seed": s.seed, "data": meta["data"], "training": meta["training"],
            "test_accuracy": meta["test_accuracy"], "agreement": agree,
            "path": str(model_dir(out, s).relative_to(out)), "build_seconds": meta["build_seconds"],
        })
    state = _read_state(out)
    manifest = {
        "kind": "kdd_jax.benchmark.zoo", "zoo_format": ZOO_FORMAT, "dataset": "Fashion-MNIST",
        "preprocessing": PREPROCESSING,
        "split": {"seed": SPLIT_SEED, "teacher_pool": 40000, "student_pool": 20000,
                  "how": "benchmarks/zoo/fashion.py: zoo_split(); test set: the 10k t10k images"},
        "agreement": "top-1 agreement with each teacher on the 10k test images",
        "torch": torch.__version__, "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_runs": state["runs"],
        "total_build_seconds": round(sum(r["wall_seconds"] for r in state["runs"]), 1),
        "sum_model_build_seconds": round(sum(m["build_seconds"] for m in models), 1),
        "counts": {r: sum(m["role"] == r for m in models) for r in ("teacher", "student", "control")},
        "models": models,
    }
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {manifest_path} ({len(models)} models)")
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(results_markdown(manifest))
        log(f"wrote {md_path}")
    return manifest


def _fmt_hp(m: dict) -> str:
    hp = m["hparams"]
    r = m["recipe"]
    if r == "kd":
        return f"T={hp['T']:g}, alpha={hp['alpha']:g}"
    if r == "topk":
        return f"k={hp['k']}, rest={hp['rest']}, T={hp['T']:g}, alpha={hp['alpha']:g}"
    if r == "rkd":
        return f"lambda_d={hp['lambda_distance']:g}, lambda_a={hp['lambda_angle']:g}, CE x{hp['ce_weight']:g}"
    if r == "hard":
        return "teacher argmax only, no ground truth"
    return "ground truth" + (", aug" if m["training"]["augmentation"] != "none" else "")


def _other_max(m: dict) -> float | None:
    """A student's highest agreement with a teacher other than its own (None with one teacher)."""
    others = [v for k, v in m["agreement"].items() if k != m["teacher"]]
    return max(others) if others else None


def results_markdown(man: dict) -> str:
    models = man["models"]
    teachers = [m["name"] for m in models if m["role"] == "teacher"]
    short = {t: t.replace("teacher-", "T:") for t in teachers}
    lines = [
        "# Fashion-MNIST teacher/student zoo",
        "",
        f"Generated by `benchmarks/zoo/build_zoo.py` on {man['date']} (torch {man['torch']}, "
        f"{man['machine']['cpu_model']}, {man['machine']['torch_threads']} torch thread). "
        f"The models' own build times (training, test evaluation, write) sum to "
        f"{man['sum_model_build_seconds'] / 60:.1f} min; the build runs took {man['total_build_seconds'] / 60:.1f} min "
        f"of wall time in all ({len(man['build_runs'])} run(s), superseded attempts included; manifest `build_runs`). "
        "Machine-readable: `benchmarks/zoo/manifest.json`; how to rebuild: `benchmarks/zoo/README.md`.",
        "",
        "Accuracy and agreement are on the 10 000 Fashion-MNIST test images. *Agreement* is the fraction "
        "of test images on which the model's top-1 class equals the teacher's. **Bold** marks the model's "
        "own teacher. `data` is the training set: `teacher_train` = a subset of the teacher's own training "
        "images, `student_pool` = 20k images no teacher saw, `teacher_pool` = the 40k pool the teachers "
        "sample from.",
        "",
    ]
    # summary
    studs = [m for m in models if m["role"] == "student"]
    ctrls = [m for m in models if m["role"] == "control"]
    if studs:
        own = [m["agreement"][m["teacher"]] for m in studs if m["teacher"] in m["agreement"]]
        other = [o for o in map(_other_max, studs) if o is not None]
        wins = sum(m["agreement"].get(m["teacher"], -1) >= max(m["agreement"].values()) for m in studs)
        lines += ["## Summary", "",
                  f"- {len(teachers)} teachers, {len(studs)} students, {len(ctrls)} controls.",
                  f"- Students: mean agreement with their own teacher {np.mean(own):.4f}, with the most-agreeing "
                  f"other teacher {np.mean(other) if other else float('nan'):.4f}; the own teacher has the highest agreement for "
                  f"{wins}/{len(studs)} students (top-1 agreement alone as a detector)."]
        if ctrls:
            lines.append(f"- Controls: mean max agreement with any teacher "
                         f"{np.mean([max(m['agreement'].values()) for m in ctrls]):.4f}.")
        tfam = {m["name"]: m["family"] for m in models if m["role"] == "teacher"}
        if len(tfam) > 1 and all(m["teacher"] in tfam for m in studs):
            top = {m["name"]: max(m["agreement"], key=m["agreement"].get) for m in studs + ctrls}
            same = [m for m in studs if tfam[m["teacher"]] == m["family"]]
            cross = [m for m in studs if tfam[m["teacher"]] != m["family"]]
            lines.append(
                f"- Architecture confound: the own teacher agrees most for {sum(top[m['name']] == m['teacher'] for m in same)}"
                f"/{len(same)} same-family students but {sum(top[m['name']] == m['teacher'] for m in cross)}/{len(cross)} "
                f"cross-family ones; the most-agreeing teacher has the model's own family for "
                f"{sum(tfam[top[m['name']]] == m['family'] for m in cross)}/{len(cross)} cross-family students and "
                f"{sum(tfam[top[m['name']]] == m['family'] for m in ctrls)}/{len(ctrls)} controls (chance: 1/{len(tfam)}).")
        by_recipe: dict[str, list] = {}
        for m in studs:
            key = m["recipe_id"]
            by_recipe.setdefault(key, []).append(m)
        lines += ["", "| student recipe | n | mean test acc | mean agreement, own teacher | mean max agreement, "
                  "other teachers | own teacher ranks first |", "|---|---|---|---|---|---|"]
        for key, ms in by_recipe.items():
            own_k = np.mean([m["agreement"][m["teacher"]] for m in ms])
            oth = [o for o in map(_other_max, ms) if o is not None]
            oth_k = np.mean(oth) if oth else float("nan")
            w = sum(m["agreement"][m["teacher"]] >= max(m["agreement"].values()) for m in ms)
            lines.append(f"| {key} | {len(ms)} | {np.mean([m['test_accuracy'] for m in ms]):.4f} | {own_k:.4f} | "
                         f"{oth_k:.4f} | {w}/{len(ms)} |")
        lines.append("")
    head = ["name", "role", "family", "params", "recipe", "hyper-parameters", "teacher", "data",
            "epochs", "seed", "test acc"] + [f"agree {short[t]}" for t in teachers]
    lines += ["## Every model", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        cells = [f"`{m['name']}`", m["role"], m["family"], f"{m['params']:,}", m["recipe"], _fmt_hp(m),
                 m["teacher"] or "-", f"{m['data']['pool']} {m['data']['size'] // 1000}k",
                 f"{m['training']['epochs']:g}", str(m["seed"]), f"{m['test_accuracy']:.4f}"]
        for t in teachers:
            a = f"{m['agreement'][t]:.4f}"
            cells.append(f"**{a}**" if t == m["teacher"] else a)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Build times (seconds, one torch thread; training + test evaluation + write):", ""]
    lines.append(", ".join(f"{m['name']} {m['build_seconds']:.0f}" for m in models) + ".")
    lines.append("")
    return "\n".join(lines)


def _state_path(out: Path) -> Path:
    return out / "build_state.json"


def _read_state(out: Path) -> dict:
    p = _state_path(out)
    if p.is_file():
        return json.loads(p.read_text())
    return {"runs": []}


def _record_run(out: Path, run: dict) -> None:
    """Add or update (same "started") this run's record; called after every model, so a killed run counts."""
    state = _read_state(out)
    state["runs"] = [r for r in state["runs"] if r["started"] != run["started"]] + [run]
    tmp = _state_path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, _state_path(out))


# ----------------------------------------------------------------------------- parallel build

_WORKER: dict = {}


def _worker_init(out: Path, specs: list[Spec], stamp: float) -> None:
    """Each worker process: one torch thread, deterministic kernels, the data loaded once."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    _WORKER.update(out=out, by_name={s.name: s for s in specs}, data=Data(), tout={}, stamp=stamp)


def _worker_build(name: str, needed: list[str], epochs_scale: float) -> str:
    w = _WORKER
    spec = w["by_name"][name]

    def log(msg: str):  # the parent's clock, so interleaved lines from all workers sort by time
        print(f"[{time.time() - w['stamp']:7.1f}s] [{name}] {msg.strip()}", flush=True)

    if spec.teacher is not None and spec.teacher not in w["tout"]:
        # One TeacherOutputs per teacher, over the same union of images the serial build uses
        # (all of that teacher's students in this run), so the students get bit-identical targets.
        w["tout"][spec.teacher] = TeacherOutputs(w["out"], w["by_name"], w["data"], log)
        w["tout"][spec.teacher].get(spec.teacher, [w["by_name"][n] for n in needed])
    build_one(spec, w["out"], w["data"], w["by_name"], w["tout"].get(spec.teacher), epochs_scale, log)
    return name


def build_parallel(order: list[Spec], out: Path, specs: list[Spec], epochs_scale: float, jobs: int, stamp: float,
                   log, record) -> None:
    """Build `order` with `jobs` worker processes. At most `jobs` models are handed to the pool at a
    time, picked in `order` (teachers, then students grouped by teacher, then controls) among those
    whose teacher, if rebuilt in this run, is written: a student goes ahead of the controls as soon
    as its teacher is done. Each model is trained exactly as in the serial build (its own seed, one
    thread, its teacher's outputs over the same images), so the weights are the same; only the wall
    time changes. A failure (or Ctrl-C) starts nothing new, lets the running models finish or stop
    (each is written atomically, so nothing finished is lost) and re-raises."""
    import concurrent.futures as cf
    import multiprocessing as mp

    needed = {t: [s.name for s in order if s.teacher == t] for t in {s.teacher for s in order} if t}
    pending_teachers = {s.name for s in order if s.role == "teacher"}
    queue = list(order)  # not yet handed to the pool, in build order
    log(f"building {len(order)} model(s) with {jobs} worker processes")
    pool = cf.ProcessPoolExecutor(min(jobs, len(order)), mp_context=mp.get_context("spawn"),
                                  initializer=_worker_init, initargs=(out, specs, stamp))
    running: dict = {}
    failure = None
    n_done = 0
    try:
        while queue or running:
            while failure is None and len(running) < jobs:
                ready = next((s for s in queue if s.teacher not in pending_teachers), None)
                if ready is None:
                    break
                queue.remove(ready)
                running[pool.submit(_worker_build, ready.name, needed.get(ready.teacher, []), epochs_scale)] = ready
            if not running:
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in done:
                s = running.pop(f)
                try:
                    f.result()
                except BaseException as e:  # noqa: BLE001 - re-raised below, after the running ones end
                    hint = (" (a worker process died, e.g. killed for memory: models already written are kept; "
                            "re-run the same command to resume, with fewer --jobs if memory was short)"
                            if isinstance(e, cf.BrokenExecutor) and failure is None else "")
                    log(f"FAILED {s.name}: {type(e).__name__}: {e}{hint}")
                    failure = failure or e
                    queue = []
                    continue
                n_done += 1
                record(s.name)
                log(f"done {s.name} ({n_done}/{len(order)})")
                pending_teachers.discard(s.name)
    except BaseException:  # Ctrl-C or an error here: hand nothing more out, do not wait for the queue
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if failure is not None:
        raise failure
    if queue:  # cannot happen: every teacher in `pending_teachers` is in `order`
        raise RuntimeError(f"zoo build: {[s.name for s in queue]} never became ready")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help=f"zoo directory (default {DEFAULT_OUT}; "
                    f"with --tiny {DEFAULT_OUT / 'tiny'})")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="build only these models (and their missing teachers)")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every model's epochs (default 1)")
    ap.add_argument("--tiny", action="store_true", help="3 small models, 1 epoch on 2k images (< 1 min)")
    ap.add_argument("--force", action="store_true", help="rebuild selected models even if built")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the manifest and results table")
    ap.add_argument("--manifest", type=Path, default=None,
                    help=f"manifest path (default {MANIFEST.relative_to(REPO)}; with --tiny <out>/manifest.json)")
    ap.add_argument("--list", action="store_true", help="print the zoo table and exit")
    ap.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="build N models at once, one process and one torch thread each (default 1); same weights as --jobs 1")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    specs = tiny_specs() if args.tiny else zoo_specs()
    by_name = {s.name: s for s in specs}
    if args.list:
        for s in specs:
            print(f"{s.name:28s} {s.role:8s} {s.arch:14s} {s.recipe:10s} {s.teacher or '-':22s} {s.data} {s.hparams}")
        return 0
    out = args.out or (DEFAULT_OUT / "tiny" if args.tiny else DEFAULT_OUT)
    out = out.resolve()
    default_manifest = out / "manifest.json" if (args.tiny or args.out is not None) else MANIFEST
    manifest_path = args.manifest or default_manifest
    md_path = RESULTS_MD if manifest_path == MANIFEST else manifest_path.with_name("zoo.md")

    start = time.perf_counter()
    t_start = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def log(msg: str):
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    if args.only:
        unknown = [n for n in args.only if n not in by_name]
        if unknown:
            ap.error(f"unknown model(s) {unknown}; see --list")
        selected = {n for n in args.only}
        for n in list(selected):  # a student needs its (up-to-date) teacher
            t = by_name[n].teacher
            if t is not None and stale_reason(out, by_name[t], args.epochs_scale, by_name) is not None:
                selected.add(t)
    else:
        selected = set(by_name)

    log(f"zoo: {out} ({len(specs)} models in the table, {len(selected)} selected), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread")
    data = Data()
    log(f"data loaded: train {tuple(data.xtr.shape)}, test {tuple(data.xte.shape)}")
    shutil.rmtree(out / ".tmp", ignore_errors=True)  # leftovers of an interrupted run

    built = []
    if not args.report_only:
        todo, skipped = [], []
        for s in specs:  # teachers come first in the table, so a rebuilt teacher's students follow it
            if s.name not in selected:
                continue
            why = "--force" if args.force else stale_reason(out, s, args.epochs_scale, by_name)
            if why is None and s.teacher is not None and by_name[s.teacher] in todo:
                why = "its teacher is being rebuilt"
            if why is None:
                skipped.append(s.name)
            else:
                todo.append(s)
                if why != "not built":
                    log(f"rebuilding {s.name}: {why}")
        if skipped:
            log(f"up to date, skipped: {len(skipped)} ({', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''})")
        # Teachers first, then each teacher's students together (its outputs are computed once), then controls.
        order = ([s for s in todo if s.role == "teacher"]
                 + sorted([s for s in todo if s.role == "student"], key=lambda s: specs.index(by_name[s.teacher]))
                 + [s for s in todo if s.role == "control"])

        def record(name: str) -> None:
            built.append(name)
            _record_run(out, {"started": t_start, "wall_seconds": round(time.perf_counter() - start, 1),
                              "built": built, "epochs_scale": args.epochs_scale, "jobs": args.jobs,
                              "loadavg_1_5_15min": [round(v, 2) for v in os.getloadavg()],
                              "argv": sys.argv[1:] if argv is None else argv})

        if args.jobs == 1:
            tout = TeacherOutputs(out, by_name, data, log)
            for k, s in enumerate(order, start=1):
                log(f"[{k}/{len(order)}] {s.role} {s.name}")
                if s.teacher is not None:
                    tout.get(s.teacher, [x for x in order if x.teacher == s.teacher])
                build_one(s, out, data, by_name, tout, args.epochs_scale, log)
                record(s.name)
        else:
            stamp = time.time() - (time.perf_counter() - start)  # the wall-clock time `log` counts from
            build_parallel(order, out, specs, args.epochs_scale, args.jobs, stamp, log, record)
    write_manifest(out, specs, data, manifest_path, md_path, log)
    log(f"done: built {len(built)} model(s) in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
