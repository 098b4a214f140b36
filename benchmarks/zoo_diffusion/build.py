#!/usr/bin/env python
"""Build the small class-conditional diffusion zoo (diffusers UNet2DModel, Fashion-MNIST, CPU).

    python -m benchmarks.zoo_diffusion.build                    # full zoo into benchmarks/zoo_diffusion/cache/
    python -m benchmarks.zoo_diffusion.build --smoke --out /tmp/zd_smoke   # every recipe, a few steps each
    python -m benchmarks.zoo_diffusion.build --report-only      # rewrite manifest.json from finished models
    python -m benchmarks.zoo_diffusion.build --preset gpu --device cuda   # ~25x longer training, gpu/cache/

Teachers, distilled students (five recipes per teacher) and independent controls, all saved in
diffusers format (`<out>/models/<name>/unet/` + `<name>/scheduler/`), so kdd-jax can sample every model
from the same initial noise and compare images. Deterministic on CPU (fixed seeds, one torch thread per
worker, `torch.use_deterministic_algorithms(True)`; on CUDA to float rounding) and resumable: every finished model is written atomically
with a `meta.json`; a re-run skips finished models, cached teacher samples and cached evaluations.

Data: Fashion-MNIST via benchmarks/zoo/fashion.py; uint8 28x28 -> x/127.5 - 1 in [-1, 1], padded 2 px
each side with -1 (background) to 32x32. To get a 28x28 image back: crop [2:30, 2:30].
Class conditioning: num_class_embeds = 11, class 10 is the NULL class (label dropout, classifier-free
guidance, unconditional sampling). Never imported by tests; see README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.zoo.fashion import load_fashion, subset, zoo_split  # noqa: E402

import diffusers  # noqa: E402
from diffusers import DDIMScheduler, UNet2DModel  # noqa: E402

diffusers.utils.logging.set_verbosity_error()  # no 'accelerate not found' chatter on every load

ZOO_FORMAT = 1
DEFAULT_OUT = HERE / "cache"
MANIFEST = HERE / "manifest.json"
GPU_OUT = HERE / "gpu" / "cache"  # --preset gpu
GPU_MANIFEST = HERE / "gpu" / "manifest.json"
CLASSIFIER_DIR = REPO / "benchmarks" / "zoo" / "cache" / "teachers" / "teacher-resnet"
NUM_CLASSES = 10
NULL = 10  # the null class (last embedding row)
T = 1000  # train timesteps
THREADS = 1  # per worker: 2 single-thread workers (OpenMP with 2 threads stalls on shared cores)
WORKERS = 2

# ----------------------------------------------------------------------------- architectures
# Measured on the 2 shared build cores (batch 64, Adam step, 2 threads, no contention): A ~0.6-0.9 s,
# B ~0.5 s, C ~0.55 s, S1 ~0.37 s, S2 ~0.42 s per step; forward-only ~45% of that. With another job on
# the cores, 2 OpenMP threads slowed to ~5 s/step (A) while 1 thread took ~1.7-2 s: hence 2 workers x 1 thread.
ARCHS = {
    "A": {"block_out_channels": (24, 48, 96), "layers_per_block": 1, "norm_num_groups": 8, "attention": False},
    "B": {"block_out_channels": (16, 32, 64), "layers_per_block": 1, "norm_num_groups": 8, "attention": True},
    "C": {"block_out_channels": (16, 32, 64), "layers_per_block": 2, "norm_num_groups": 8, "attention": False},
    "S1": {"block_out_channels": (16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8, "attention": False},
    "S2": {"block_out_channels": (16, 24, 48), "layers_per_block": 1, "norm_num_groups": 8, "attention": True},
}

# 1000 train timesteps each; all end with alpha_bar_T < 0.01.
SCHEDULES = {
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02},
}
# Every model's scheduler: DDIM, trailing spacing (first step at t = 999), x0 clipped to [-1, 1].
SCHED_COMMON = {"num_train_timesteps": T, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True,
                "steps_offset": 0, "timestep_spacing": "trailing", "thresholding": False}

# ----------------------------------------------------------------------------- the zoo's numbers
# Chosen from the measured step times so the full build fits ~60-70 min on 2 shared cores.
# Measured in the smoke run with a third job holding one core (each worker at ~50% of a core), batch 32:
# teacher step 1.2-1.9 s, epskd (S1/S2 + teacher forward) 1.2-1.5 s, datakd/onestep 0.8-0.9 s,
# progressive (teacher-size student + 2 teacher calls) 2-4 s. The numbers below budget ~7000 such
# worker-seconds (~60 min wall with 2 workers under that contention; about half that on idle cores).
TEACHER_STEPS, TEACHER_BATCH, TEACHER_LR, TEACHER_DATA = 500, 32, 2e-3, 20000
STUDENT_STEPS, STUDENT_BATCH, STUDENT_LR = 160, 32, 2e-3
PD_STEPS_PER_ROUND = 60  # progressive: batch STUDENT_BATCH, 2 rounds (16 -> 8 -> 4 DDIM steps)
PD_LR = 3e-4
CONTROL_STEPS, CONTROL_BATCH, CONTROL_DATA = 200, 32, 15000
TEACHER_DROPOUT, STUDENT_DROPOUT = 0.1, 0.15
N_PAIRS, PAIR_STEPS, PAIR_GUIDANCE, PAIR_NULL_FRAC = 512, 20, 2.0, 0.3
SAMPLE_STEPS, GUIDANCE = 10, 2.0  # sampling settings of eps models (served copy); 200-sample quality figure
N_QUALITY, N_NULL = 200, 64
WARMUP_FRAC, GRAD_CLIP = 0.05, 1.0

# --preset gpu: the same zoo trained ~25x longer (steps x batch) on one CUDA GPU, several worker processes
# sharing it (these UNets are launch-bound on an H100: one process leaves most of the GPU idle).
GPU = {"TEACHER_STEPS": 3000, "TEACHER_BATCH": 128, "STUDENT_STEPS": 1200, "STUDENT_BATCH": 128,
       "PD_STEPS_PER_ROUND": 400, "CONTROL_STEPS": 1500, "CONTROL_BATCH": 128, "N_PAIRS": 2048,
       "N_QUALITY": 1000, "WORKERS": 8}
DEVICE = torch.device("cpu")  # --device; random numbers are always drawn on the CPU (same stream on any device)

SMOKE = {"TEACHER_STEPS": 6, "STUDENT_STEPS": 4, "PD_STEPS_PER_ROUND": 2, "CONTROL_STEPS": 4, "N_PAIRS": 40,
         "N_QUALITY": 20, "N_NULL": 8, "PAIR_STEPS": 4, "SAMPLE_STEPS": 4}

TEACHERS = [  # name, arch, schedule, seed, data subset seed
    ("teacher-a", "A", "linear", 101, 1101),
    ("teacher-b", "B", "cosine", 102, 1102),
    ("teacher-c", "C", "scaled_linear", 103, 1103),
]
STUDENT_ARCH = {"teacher-a": ("S1", "S2"), "teacher-b": ("S1", "S2"), "teacher-c": ("S2", "S1")}
RECIPES = ["epskd-l1.0", "epskd-l0.3", "datakd", "onestep", "progressive"]
CONTROLS = [  # name, arch, schedule, seed, data subset seed (student_pool, real labels)
    ("control-1", "S1", "scaled_linear", 301, 3101),
    ("control-2", "S2", "cosine", 302, 3102),
    ("control-3", "B", "cosine", 303, 3103),  # teacher-b's architecture and schedule, own weights/data
    ("control-4", "C", "linear", 304, 3104),
]


def zoo_specs() -> list[dict]:
    specs = []
    for name, arch, sched, seed, dseed in TEACHERS:
        specs.append({"name": name, "role": "teacher", "teacher": None, "recipe": "ddpm", "arch": arch,
                      "schedule": sched, "prediction_type": "epsilon", "seed": seed,
                      "data": {"pool": "teacher_pool", "size": TEACHER_DATA, "seed": dseed, "labels": "real"},
                      "steps": TEACHER_STEPS, "batch": TEACHER_BATCH, "lr": TEACHER_LR,
                      "label_dropout": TEACHER_DROPOUT})
    for ti, (tname, tarch, tsched, _, _) in enumerate(TEACHERS):
        letter = tname.split("-")[1]
        for ri, recipe in enumerate(RECIPES):
            seed = 500 + 10 * ti + ri
            spec = {"name": f"student-{letter}-{recipe}", "role": "student", "teacher": tname, "recipe": recipe,
                    "schedule": tsched, "seed": seed, "steps": STUDENT_STEPS, "batch": STUDENT_BATCH,
                    "lr": STUDENT_LR, "label_dropout": STUDENT_DROPOUT, "prediction_type": "epsilon"}
            if recipe.startswith("epskd"):
                lam = float(recipe.split("-l")[1])
                spec.update(arch=STUDENT_ARCH[tname][ri % 2], kd_lambda=lam,
                            data={"pool": "student_pool", "size": 20000, "seed": None,
                                  "labels": "real (the image's class, dropout to null)"},
                            loss=(f"{lam} * ||eps_S - eps_T||^2" + (f" + {1 - lam:.1f} * ||eps_S - eps||^2"
                                                                   if lam < 1 else "")))
            elif recipe == "datakd":
                spec.update(arch=STUDENT_ARCH[tname][0], kd_lambda=None,
                            data={"pool": f"{tname} samples", "size": N_PAIRS, "seed": None,
                                  "labels": "the class the teacher was asked for (null for unconditional ones)"},
                            loss="||eps_S - eps||^2 (plain DDPM) on teacher samples")
            elif recipe == "onestep":
                spec.update(arch=STUDENT_ARCH[tname][1], kd_lambda=None, prediction_type="sample",
                            data={"pool": f"{tname} (x_T, c) -> x_0 pairs", "size": N_PAIRS, "seed": None,
                                  "labels": "the class the teacher was asked for"},
                            loss="||UNet_S(x_T, 999, c) - x_0^teacher||^2", label_dropout=0.0)
            else:  # progressive
                spec.update(arch=tarch, kd_lambda=None, steps=2 * PD_STEPS_PER_ROUND, lr=PD_LR,
                            rounds=[[16, 8], [8, 4]],
                            data={"pool": "student_pool", "size": 20000, "seed": None,
                                  "labels": "uniform random classes (no real labels), 15% null"},
                            loss="||eps_S - eps~||^2, eps~ = (z_t - alpha_t x~)/sigma_t, x~ from two teacher DDIM steps")
            specs.append(spec)
    for name, arch, sched, seed, dseed in CONTROLS:
        specs.append({"name": name, "role": "control", "teacher": None, "recipe": "ddpm", "arch": arch,
                      "schedule": sched, "prediction_type": "epsilon", "seed": seed,
                      "data": {"pool": "student_pool", "size": CONTROL_DATA, "seed": dseed, "labels": "real"},
                      "steps": CONTROL_STEPS, "batch": CONTROL_BATCH, "lr": TEACHER_LR,
                      "label_dropout": TEACHER_DROPOUT})
    for s in specs:
        s["sampling"] = sampling_settings(s)
    return specs


def sampling_settings(spec: dict) -> dict:
    if spec["recipe"] == "onestep":  # guidance was baked into the (x_T, c) -> x_0 pairs
        return {"scheduler": "ddim", "num_inference_steps": 1, "eta": 0.0, "guidance_scale": 1.0,
                "timestep_spacing": "trailing"}
    steps = 4 if spec["recipe"] == "progressive" else SAMPLE_STEPS
    return {"scheduler": "ddim", "num_inference_steps": steps, "eta": 0.0, "guidance_scale": GUIDANCE,
            "timestep_spacing": "trailing"}


# ----------------------------------------------------------------------------- building blocks


def make_unet(arch: str, prediction_type: str = "epsilon") -> UNet2DModel:
    a = ARCHS[arch]
    n = len(a["block_out_channels"])
    down, up = ["DownBlock2D"] * n, ["UpBlock2D"] * n
    if a["attention"]:  # attention only at the lowest resolution
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=a["block_out_channels"],
                       layers_per_block=a["layers_per_block"], down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=a["norm_num_groups"],
                       attention_head_dim=a["block_out_channels"][-1] if a["attention"] else None,
                       num_class_embeds=NUM_CLASSES + 1)


def make_scheduler(schedule: str, prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULES[schedule], **SCHED_COMMON, prediction_type=prediction_type)


def arch_summary(arch: str, unet: UNet2DModel | None = None) -> dict:
    a = dict(ARCHS[arch])
    a["block_out_channels"] = list(a["block_out_channels"])
    a["attention"] = "lowest resolution (AttnDownBlock2D/AttnUpBlock2D)" if a["attention"] else "none"
    a["key"] = arch
    if unet is not None:
        a["parameters"] = sum(p.numel() for p in unet.parameters())
    return a


def alpha_bar(schedule: str) -> torch.Tensor:
    return make_scheduler(schedule).alphas_cumprod.clone()  # float32 [T], diffusers' numbers


class Data:
    """Fashion-MNIST train split in model space: float32 [60000, 1, 32, 32] in [-1, 1], padded with -1."""

    def __init__(self):
        x, y = load_fashion("train")
        x = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0)[:, None]
        self.x = F.pad(x, (2, 2, 2, 2), value=-1.0).to(DEVICE)
        self.y = torch.from_numpy(y).to(DEVICE)
        self.split = zoo_split()

    def indices(self, d: dict) -> np.ndarray:
        pool = self.split[d["pool"]]
        return torch.from_numpy(np.asarray(pool if d["seed"] is None else subset(pool, d["size"], d["seed"])))


class Batches:
    """Epoch-wise shuffled minibatches of index positions, from a seeded generator."""

    def __init__(self, n: int, batch: int, gen: torch.Generator):
        self.n, self.batch, self.gen, self.perm, self.pos = n, batch, gen, None, n

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        out = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return out


def drop_labels(y: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    if p <= 0:
        return y
    return torch.where((torch.rand(y.shape, generator=gen) < p).to(y.device), torch.full_like(y, NULL), y)


def lr_at(step: int, total: int, peak: float) -> float:
    warm = max(1, int(WARMUP_FRAC * total))
    if step < warm:
        return peak * (step + 1) / warm
    prog = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))  # cosine to 10% of peak


def train_loop(unet, steps: int, lr: float, loss_fn, log_name: str) -> dict:
    """Adam, linear warm-up then cosine decay, grad-norm clipping. loss_fn(step) -> scalar loss."""
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    unet.train()
    t0, ema, hist, pending = time.time(), None, [], []
    # Losses are read back every `sync_every` steps (a read is a device sync; on a GPU a sync every step
    # keeps the host from queueing ahead). The values, and so the build, are the same either way.
    sync_every = 1 if DEVICE.type == "cpu" else 50
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), GRAD_CLIP)
        opt.step()
        pending.append(loss.detach())
        if len(pending) < sync_every and step % 100 != 0 and step != steps - 1:
            continue
        for k, v in enumerate(torch.stack(pending).tolist()):
            if not math.isfinite(v):
                raise RuntimeError(f"{log_name}: loss became {v} at step {step - len(pending) + 1 + k}")
            ema = v if ema is None else 0.98 * ema + 0.02 * v
            hist.append(v)
        pending = []
        if step % 100 == 0 or step == steps - 1:
            log(f"  {log_name} step {step + 1}/{steps} loss {v:.4f} (ema {ema:.4f}) "
                f"{(time.time() - t0) / (step + 1):.3f} s/step")
    unet.eval()
    tail = hist[-max(1, len(hist) // 10):]
    return {"final_loss": float(np.mean(tail)), "final_loss_note": "mean of the last 10% of steps",
            "train_seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def ddim_sample(unet, sched: DDIMScheduler, x_T: torch.Tensor, labels: torch.Tensor, steps: int,
                guidance: float, chunk: int = 256) -> torch.Tensor:
    """diffusers DDIM (eta 0) with classifier-free guidance on the raw output (null class 10)."""
    outs = []
    for i in range(0, len(x_T), chunk):
        x, c = x_T[i:i + chunk].clone() * sched.init_noise_sigma, labels[i:i + chunk]
        sched.set_timesteps(steps)
        guided = guidance != 1.0
        for t in sched.timesteps:
            tt = torch.full((len(x),), int(t), dtype=torch.long, device=x.device)
            if guided:
                out = unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([c, torch.full_like(c, NULL)])).sample
                cond, unc = out.chunk(2)
                out = unc + guidance * (cond - unc)
            else:
                out = unet(x, tt, c).sample
            x = sched.step(out, t, x, eta=0.0).prev_sample
        outs.append(x)
    return torch.cat(outs)


def seeded_normal(seed: int, stream: int, shape) -> np.ndarray:
    """kdd_jax.generative.noise.seeded_normal, re-implemented (torch-only build): Philox4x64 key
    seed + (stream << 64), Box-Muller on 53-bit uniforms, float32, C order."""
    n = int(np.prod(shape))
    raw = np.random.Philox(key=int(seed) + (int(stream) << 64)).random_raw(2 * n)
    a = ((raw[0::2] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0 ** -53
    b = (raw[1::2] >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return (np.sqrt(-2.0 * np.log(a)) * np.cos(2.0 * np.pi * b)).astype(np.float32).reshape(tuple(shape))


def shared_noise(seeds) -> torch.Tensor:
    """x_T NCHW [len(seeds), 1, 32, 32] = kdd_jax initial_noise(seeds, (32, 32, 1)) transposed."""
    return torch.from_numpy(np.stack([seeded_normal(s, 0, (1, 32, 32)) for s in seeds]))


# ----------------------------------------------------------------------------- model io


def model_dir(out: Path, name: str) -> Path:
    return out / "models" / name


def is_done(out: Path, name: str) -> bool:
    return (model_dir(out, name) / "meta.json").is_file()


def write_sampling_file(folder: Path, meta: dict) -> None:
    """kdd_sampling.json: how kdd-jax (load_diffusion, kdd serve/detect) samples this model, and its class names."""
    from benchmarks.zoo.fashion import CLASSES

    (folder / "kdd_sampling.json").write_text(json.dumps({**meta["sampling"], "class_names": list(CLASSES)}, indent=1))


def save_model(out: Path, spec: dict, unet, sched, meta: dict):
    final = model_dir(out, spec["name"])
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.to("cpu")
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    sched.save_pretrained(tmp / "scheduler")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    write_sampling_file(tmp, meta)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_model(out: Path, name: str):
    d = model_dir(out, name)
    unet = UNet2DModel.from_pretrained(d / "unet").eval().to(DEVICE)
    for p in unet.parameters():
        p.requires_grad_(False)
    return unet, DDIMScheduler.from_pretrained(d / "scheduler"), json.loads((d / "meta.json").read_text())


# ----------------------------------------------------------------------------- recipes


def noised(x0, ab, gen):
    t = torch.randint(0, T, (len(x0),), generator=gen).to(x0.device)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    a = ab[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


def train_ddpm(spec, x, y, gen, unet):
    """Plain eps-prediction DDPM training on (x, y) with label dropout."""
    ab = alpha_bar(spec["schedule"]).to(DEVICE)
    batches = Batches(len(x), spec["batch"], gen)

    def loss_fn(step):
        i = batches.next()
        xt, t, eps = noised(x[i], ab, gen)
        c = drop_labels(y[i], spec["label_dropout"], gen)
        return F.mse_loss(unet(xt, t, c).sample, eps)

    return train_loop(unet, spec["steps"], spec["lr"], loss_fn, spec["name"])


def train_epskd(spec, x, y, gen, unet, teacher):
    ab = alpha_bar(spec["schedule"]).to(DEVICE)  # the teacher's schedule
    lam = spec["kd_lambda"]
    batches = Batches(len(x), spec["batch"], gen)

    def loss_fn(step):
        i = batches.next()
        xt, t, eps = noised(x[i], ab, gen)
        c = drop_labels(y[i], spec["label_dropout"], gen)
        with torch.no_grad():
            eps_t = teacher(xt, t, c).sample
        out = unet(xt, t, c).sample
        loss = lam * F.mse_loss(out, eps_t)
        if lam < 1:
            loss = loss + (1 - lam) * F.mse_loss(out, eps)
        return loss

    return train_loop(unet, spec["steps"], spec["lr"], loss_fn, spec["name"])


def train_onestep(spec, pairs, gen, unet):
    xT, c, x0 = (pairs[k].to(DEVICE) for k in ("x_T", "labels", "x_0"))
    batches = Batches(len(xT), spec["batch"], gen)

    def loss_fn(step):
        i = batches.next()
        t = torch.full((len(i),), T - 1, dtype=torch.long, device=DEVICE)
        return F.mse_loss(unet(xT[i], t, c[i]).sample, x0[i])

    return train_loop(unet, spec["steps"], spec["lr"], loss_fn, spec["name"])


def train_progressive(spec, x, gen, teacher, schedule: str, out: Path):
    """Salimans & Ho 2022, two rounds (16 -> 8 -> 4 DDIM steps, trailing grid, x0 clipped as the sampler
    does). Student initialised from its teacher; target: x~ such that one student DDIM step t -> t - 2d
    lands where two teacher steps t -> t - d -> t - 2d land; trained in eps space (eps~ = (z_t - a_t x~)/s_t)."""
    ab = alpha_bar(schedule).double().to(DEVICE)

    def abar(t):  # t may be -1 (set_alpha_to_one)
        return torch.where(t >= 0, ab[t.clamp(min=0)], torch.ones_like(t, dtype=torch.float64))

    def ddim_to(model, z, t, t_next, c):
        a, an = abar(t).view(-1, 1, 1, 1), abar(t_next).view(-1, 1, 1, 1)
        eps = model(z.float(), t, c).sample.double()
        x0 = ((z - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        return an.sqrt() * x0 + (1 - an).sqrt() * eps

    cur_teacher = teacher
    student = None
    info = {"train_seconds": 0.0, "rounds": []}
    for r, (n_teacher, n_student) in enumerate(spec["rounds"]):
        student = UNet2DModel.from_config(teacher.config).to(DEVICE)
        student.load_state_dict(cur_teacher.state_dict())
        for p in student.parameters():
            p.requires_grad_(True)
        d_s = T // n_student  # student step size (exact: 125, 250)
        grid = torch.tensor([T - 1 - k * d_s for k in range(n_student)], device=DEVICE)  # trailing timesteps
        batches = Batches(len(x), spec["batch"], gen)

        def loss_fn(step, grid=grid, d_s=d_s, tch=cur_teacher, student=student):
            i = batches.next()
            x0 = x[i].double()
            t = grid[torch.randint(0, len(grid), (len(i),), generator=gen)]
            c = drop_labels(torch.randint(0, NUM_CLASSES, (len(i),), generator=gen).to(DEVICE),
                            spec["label_dropout"], gen)
            eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(DEVICE)
            a = abar(t).view(-1, 1, 1, 1)
            z = a.sqrt() * x0 + (1 - a).sqrt() * eps
            t_mid, t_end = t - d_s // 2, t - d_s
            with torch.no_grad():
                z_end = ddim_to(tch, ddim_to(tch, z, t, t_mid, c), t_mid, t_end, c)
                ae = abar(t_end).view(-1, 1, 1, 1)
                ratio = (1 - ae).sqrt() / (1 - a).sqrt()
                x_tgt = ((z_end - ratio * z) / (ae.sqrt() - ratio * a.sqrt())).clamp(-1, 1)
                eps_tgt = ((z - a.sqrt() * x_tgt) / (1 - a).sqrt()).float()
            return F.mse_loss(student(z.float(), t, c).sample, eps_tgt)

        res = train_loop(student, PD_STEPS_PER_ROUND, spec["lr"], loss_fn, f"{spec['name']} round {r + 1}")
        for p in student.parameters():
            p.requires_grad_(False)
        info["rounds"].append({"teacher_steps": n_teacher, "student_steps": n_student, **res})
        info["train_seconds"] += res["train_seconds"]
        cur_teacher = student
    info["final_loss"] = info["rounds"][-1]["final_loss"]
    info["final_loss_note"] = "last round, mean of its last 10% of steps"
    return student, info


def save_cached(path: Path, record: dict) -> None:
    """A build cache record (tensors + JSON-able values) as safetensors, atomically: no pickle anywhere."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in record.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in record.items() if not isinstance(v, torch.Tensor)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path) + ".tmp", metadata={"json": json.dumps(rest)})
    os.replace(str(path) + ".tmp", path)


def load_cached(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        record = {k: f.get_tensor(k) for k in f.keys()}
        record.update(json.loads(f.metadata()["json"]))
    return record


def teacher_pairs(out: Path, tname: str) -> dict:
    """(x_T, c) -> x_0 with the teacher's DDIM (eta 0, PAIR_STEPS steps): a fraction PAIR_NULL_FRAC with
    the null class (unguided), the rest classes uniform with guidance PAIR_GUIDANCE. Cached."""
    path = out / "pairs" / f"{tname}.safetensors"
    if path.is_file():
        return load_cached(path)
    unet, sched, meta = load_model(out, tname)
    gen = torch.Generator().manual_seed(7000 + int(meta["seed"]))
    n_null = int(round(PAIR_NULL_FRAC * N_PAIRS))
    n_cls = N_PAIRS - n_null
    labels = torch.cat([torch.arange(n_cls) % NUM_CLASSES, torch.full((n_null,), NULL)])
    x_T = torch.randn((N_PAIRS, 1, 32, 32), generator=gen)
    labels_d, x_T_d = labels.to(DEVICE), x_T.to(DEVICE)
    t0 = time.time()
    x0 = torch.cat([ddim_sample(unet, sched, x_T_d[:n_cls], labels_d[:n_cls], PAIR_STEPS, PAIR_GUIDANCE),
                    ddim_sample(unet, sched, x_T_d[n_cls:], labels_d[n_cls:], PAIR_STEPS, 1.0)]).cpu()
    pairs = {"x_T": x_T, "labels": labels, "x_0": x0, "seconds": time.time() - t0,
             "settings": {"n": N_PAIRS, "null_fraction": PAIR_NULL_FRAC, "ddim_steps": PAIR_STEPS, "eta": 0.0,
                          "guidance_scale_classes": PAIR_GUIDANCE, "guidance_scale_null": 1.0,
                          "noise": f"torch.Generator().manual_seed({7000 + int(meta['seed'])}) randn"}}
    save_cached(path, pairs)
    log(f"  pairs of {tname}: {N_PAIRS} in {pairs['seconds']:.0f}s")
    return pairs


def build_one(spec: dict, out: Path, data: Data):
    name = spec["name"]
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    log(f"building {name} ({spec['role']}, {spec['recipe']}, arch {spec['arch']}, {spec['schedule']})")
    t0 = time.time()
    extra = {}
    sched = make_scheduler(spec["schedule"], spec["prediction_type"])
    if spec["recipe"] == "ddpm":
        idx = data.indices(spec["data"])
        unet = make_unet(spec["arch"]).to(DEVICE)
        info = train_ddpm(spec, data.x[idx], data.y[idx], gen, unet)
    elif spec["recipe"].startswith("epskd"):
        teacher, _, _ = load_model(out, spec["teacher"])
        idx = data.indices(spec["data"])
        unet = make_unet(spec["arch"]).to(DEVICE)
        info = train_epskd(spec, data.x[idx], data.y[idx], gen, unet, teacher)
    elif spec["recipe"] == "datakd":
        pairs = teacher_pairs(out, spec["teacher"])
        unet = make_unet(spec["arch"]).to(DEVICE)
        info = train_ddpm(spec, pairs["x_0"].to(DEVICE), pairs["labels"].to(DEVICE), gen, unet)
        extra["pairs"] = pairs["settings"]
    elif spec["recipe"] == "onestep":
        pairs = teacher_pairs(out, spec["teacher"])
        unet = make_unet(spec["arch"], "sample").to(DEVICE)
        info = train_onestep(spec, pairs, gen, unet)
        extra["pairs"] = pairs["settings"]
    elif spec["recipe"] == "progressive":
        teacher, _, _ = load_model(out, spec["teacher"])
        idx = data.indices(spec["data"])
        unet, info = train_progressive(spec, data.x[idx], gen, teacher, spec["schedule"], out)
    else:
        raise ValueError(spec["recipe"])
    meta = {**{k: v for k, v in spec.items()}, "architecture": arch_summary(spec["arch"], unet),
            "noise_schedule": {**SCHEDULES[spec["schedule"]], "num_train_timesteps": T, "name": spec["schedule"]},
            **info, **extra, "build_seconds": round(time.time() - t0, 1),
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if "data" in spec and spec["data"].get("seed") is not None:
        meta["data"] = {**spec["data"], "how": f"fashion.subset(zoo_split()['{spec['data']['pool']}'], "
                                               f"{spec['data']['size']}, seed={spec['data']['seed']})"}
    save_model(out, spec, unet, sched, meta)
    log(f"  done {name} in {time.time() - t0:.0f}s")


# ----------------------------------------------------------------------------- evaluation


def load_classifier():
    from safetensors.torch import load_file

    from converters.torch_reference import build_torch_model
    cfg = json.loads((CLASSIFIER_DIR / "config.json").read_text())
    model = build_torch_model(cfg)
    model.load_state_dict(load_file(str(CLASSIFIER_DIR / "model.safetensors")))
    pre = cfg["preprocessing"]
    return model.eval().to(DEVICE), float(pre["mean"][0]), float(pre["std"][0])


def evaluate(out: Path, name: str, classifier) -> dict:
    """Quality (classifier accuracy on N_QUALITY class-conditional samples, classes uniform) and the
    null-class images from the N_NULL shared noises (kdd_jax initial_noise seeds 0..N_NULL-1). Cached."""
    path = out / "eval" / f"{name}.safetensors"
    if path.is_file():
        return load_cached(path)
    unet, sched, meta = load_model(out, name)
    s = meta["sampling"]
    t0 = time.time()
    labels = (torch.arange(N_QUALITY) % NUM_CLASSES).to(DEVICE)
    x_T = shared_noise(range(10_000, 10_000 + N_QUALITY)).to(DEVICE)
    imgs = ddim_sample(unet, sched, x_T, labels, s["num_inference_steps"], s["guidance_scale"])
    model, mean, std = classifier
    with torch.no_grad():
        x = (imgs[:, :, 2:30, 2:30].clamp(-1, 1) + 1) / 2
        pred = model((x - mean) / std).argmax(1)
    acc = float((pred == labels).float().mean())
    null = ddim_sample(unet, sched, shared_noise(range(N_NULL)).to(DEVICE), torch.full((N_NULL,), NULL, device=DEVICE),
                       s["num_inference_steps"], 1.0).cpu()
    res = {"quality": {"classifier": "benchmarks/zoo/cache/teachers/teacher-resnet (torch)", "accuracy": acc,
                       "n": N_QUALITY, "guidance_scale": s["guidance_scale"],
                       "num_inference_steps": s["num_inference_steps"],
                       "noise": f"kdd_jax initial_noise(seeds {10_000}..{10_000 + N_QUALITY - 1})",
                       "classes": "i % 10"},
           "null_images": null, "eval_seconds": round(time.time() - t0, 1)}
    save_cached(path, res)
    log(f"  eval {name}: accuracy {acc:.3f} ({res['eval_seconds']:.0f}s)")
    return res


# ----------------------------------------------------------------------------- manifest


def run_machine() -> dict:
    if DEVICE.type == "cpu":
        return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "workers": WORKERS, "torch_threads_per_worker": THREADS,
                "note": "2 shared cores (other jobs ran alongside), no GPU"}
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "workers": WORKERS,
            "torch_threads_per_worker": THREADS, "device": str(DEVICE), "gpu": torch.cuda.get_device_name(DEVICE),
            "note": f"{WORKERS} worker processes sharing one GPU; deterministic algorithms where CUDA has them "
                    "(warn_only), so a rebuild matches to float rounding, not bit for bit"}


def run_versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "numpy": np.__version__}


def write_manifest(out: Path, specs: list[dict], evals: dict, path: Path, command: str, build_seconds: float,
                   runs: list[dict] | None = None):
    runs = runs or []
    teachers = [s["name"] for s in specs if s["role"] == "teacher"]
    models = []
    for s in specs:
        if not is_done(out, s["name"]):
            continue
        meta = json.loads((model_dir(out, s["name"]) / "meta.json").read_text())
        entry = {k: meta.get(k) for k in ("name", "role", "teacher", "recipe")}
        entry["architecture"] = meta["architecture"]
        entry["prediction_type"] = meta["prediction_type"]
        entry["hyperparameters"] = {k: meta.get(k) for k in ("steps", "batch", "lr", "kd_lambda", "seed",
                                                             "label_dropout", "loss", "rounds") if k in meta}
        entry["hyperparameters"]["optimizer"] = (f"Adam, {WARMUP_FRAC:.0%} linear warm-up, cosine to 10% of lr, "
                                                 f"grad-norm clip {GRAD_CLIP}")
        entry["data"] = meta["data"]
        if "pairs" in meta:
            entry["teacher_samples"] = meta["pairs"]
        entry["noise_schedule"] = meta["noise_schedule"]
        entry["scheduler"] = "DDIMScheduler (scheduler/scheduler_config.json)"
        entry["sampling"] = meta["sampling"]
        entry["train_seconds"] = meta["train_seconds"]
        entry["final_loss"] = meta["final_loss"]
        if "rounds" in meta and isinstance(meta["rounds"], list) and meta["rounds"] and isinstance(meta["rounds"][0], dict):
            entry["rounds"] = meta["rounds"]
        ev = evals.get(s["name"])
        if ev is not None:
            entry["quality"] = ev["quality"]
            entry["eval_seconds"] = ev["eval_seconds"]
            if s["role"] == "student":
                mse = {t: float(((ev["null_images"] - evals[t]["null_images"]) ** 2).mean())
                       for t in teachers if t in evals}
                other = [v for t, v in mse.items() if t != s["teacher"]]
                entry["null_image_mse"] = {
                    "per_teacher": mse, "own_teacher": mse.get(s["teacher"]),
                    "other_teachers_mean": float(np.mean(other)) if other else None,
                    "closer_to_own": (bool(mse.get(s["teacher"], 1e9) < min(other)) if other else None),
                    "how": f"mean per-pixel MSE (32x32 model space) of null-class ({NULL}) images from the same "
                           f"{N_NULL} initial noises (kdd_jax initial_noise seeds 0..{N_NULL - 1}), each model "
                           "with its own sampling settings"}
            elif s["role"] == "control":  # the negatives' baseline: distances to every teacher
                entry["null_image_mse"] = {
                    "per_teacher": {t: float(((ev["null_images"] - evals[t]["null_images"]) ** 2).mean())
                                    for t in teachers if t in evals}}
        entry["path"] = f"models/{s['name']}"
        models.append(entry)
    manifest = {
        "kind": "kdd_jax.diffusion_zoo", "zoo_format": ZOO_FORMAT,
        "dataset": "Fashion-MNIST (benchmarks/zoo/fashion.py; teacher_pool / student_pool split)",
        "preprocessing": {"model_space": "[-1, 1] = uint8 / 127.5 - 1", "sample_size": 32,
                          "padding": "pad 2 px each side with -1; model space [-1,1]; crop [2:30, 2:30] to get 28x28",
                          "channels": 1, "to_unit_range": "x / 2 + 0.5"},
        "class_conditioning": {"num_class_embeds": NUM_CLASSES + 1, "null_class": NULL,
                               "guidance": "out = out_null + w * (out_c - out_null)"},
        "layout": "models/<name>/unet/{config.json, diffusion_pytorch_model.safetensors}, "
                  "models/<name>/scheduler/scheduler_config.json (DDIMScheduler)",
        # where and with what the models were built: the last build run's record (a --report-only run on
        # another machine must not relabel them), this process's when no run was recorded
        "machine": (runs[-1].get("machine") if runs else None) or run_machine(),
        "versions": (runs[-1].get("versions") if runs else None) or run_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "total_build_seconds": round(build_seconds, 1),
        "runs": runs,
        "counts": {r: sum(m["role"] == r for m in models) for r in ("teacher", "student", "control")},
        "models": models,
    }
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ----------------------------------------------------------------------------- main

_LOG = None


def log(msg: str):
    line = f"[{datetime.datetime.now(datetime.timezone.utc).strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if _LOG is not None:
        with open(_LOG, "a") as f:
            f.write(line + "\n")


def tasks(specs: list[dict]) -> list[tuple[str, str, str | None]]:
    """(kind, name, dependency) in priority order: teachers, then each teacher's pairs and students, then
    controls (independent fillers). kind: "model" (build + evaluate) or "pairs"."""
    out = [("model", s["name"], None) for s in specs if s["role"] == "teacher"]
    for t in [s["name"] for s in specs if s["role"] == "teacher"]:
        out.append(("pairs", t, t))
        for s in specs:
            if s["teacher"] == t:
                out.append(("model", s["name"], f"pairs:{t}" if s["recipe"] in ("datakd", "onestep") else t))
    out += [("model", s["name"], None) for s in specs if s["role"] == "control"]
    return out


def task_done(out: Path, kind: str, name: str) -> bool:
    if kind == "pairs":
        return (out / "pairs" / f"{name}.safetensors").is_file()
    return is_done(out, name) and (out / "eval" / f"{name}.safetensors").is_file()


def claim(out: Path, key: str) -> bool:
    """Atomic claim (mkdir) of a task; a claim whose process is gone is stale and taken over."""
    d = out / "claims" / key.replace(":", "_")
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        d.mkdir()
    except FileExistsError:
        try:
            pid = int((d / "pid").read_text())
            os.kill(pid, 0)
            return False
        except (FileNotFoundError, ValueError):
            return False  # being written right now
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            return claim(out, key)
    (d / "pid").write_text(str(os.getpid()))
    return True


def worker(out: Path, specs: list[dict], only: set | None):
    """Take the first unclaimed task whose dependency is done, until none is left."""
    by = {s["name"]: s for s in specs}
    todo = [t for t in tasks(specs) if only is None or t[1] in only]
    data, classifier = None, None
    while True:
        pending = [t for t in todo if not task_done(out, t[0], t[1])]
        if not pending:
            return
        ran = False
        for kind, name, dep in pending:
            if dep is not None:
                dkind, dname = dep.split(":") if ":" in dep else ("model", dep)
                if not (task_done(out, dkind, dname) if dkind == "pairs" else is_done(out, dname)):
                    continue
            if not claim(out, f"{kind}:{name}"):
                continue
            try:
                if task_done(out, kind, name):
                    continue
                if kind == "pairs":
                    teacher_pairs(out, name)
                else:
                    if not is_done(out, name):
                        if data is None:
                            data = Data()
                        build_one(by[name], out, data)
                    if classifier is None:
                        classifier = load_classifier()
                    evaluate(out, name, classifier)
            finally:
                shutil.rmtree(out / "claims" / f"{kind}_{name}", ignore_errors=True)
            ran = True
            break
        if not ran:
            time.sleep(5)


def main(argv=None):
    global _LOG
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--smoke", action="store_true", help="every recipe with a few steps (pipeline test)")
    ap.add_argument("--only", nargs="*", help="build only these models (and what they need)")
    ap.add_argument("--workers", type=int, default=None,
                    help=f"parallel single-thread worker processes (default {WORKERS}; --preset gpu: {GPU['WORKERS']})")
    ap.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1, ...)")
    ap.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                    help="cpu: the committed zoo (manifest.json); gpu: the same zoo trained ~25x longer, built "
                         "into gpu/cache/ with gpu/manifest.json (meant for --device cuda)")
    ap.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--manifest", type=Path, default=None, help="default: manifest.json here (full) or <out>")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU")
    if args.preset == "gpu":
        globals().update(GPU)
        if args.out == DEFAULT_OUT:
            args.out = GPU_OUT
    if args.smoke:
        globals().update(SMOKE)
    if args.workers is None:
        args.workers = WORKERS
    globals()["WORKERS"] = args.workers
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)
    if DEVICE.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism (before CUDA starts)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    _LOG = args.out / "build.log"
    specs = zoo_specs()
    want = None
    if args.only:
        by = {s["name"]: s for s in specs}
        want = set(args.only) | {by[n]["teacher"] for n in args.only if by[n]["teacher"]}
    if args.worker_id is not None:
        log(f"worker {args.worker_id} (pid {os.getpid()}) started")
        worker(args.out, specs, want)
        log(f"worker {args.worker_id} finished")
        return
    manifest_path = args.manifest or (MANIFEST if not args.smoke and args.out == DEFAULT_OUT
                                      else GPU_MANIFEST if not args.smoke and args.out == GPU_OUT
                                      else args.out / "manifest.json")
    command = ("python -m benchmarks.zoo_diffusion.build " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    state_path = args.out / "build_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"runs": []}
    t_start = time.time()
    log(f"diffusion zoo: {len(specs)} models into {args.out} (smoke={args.smoke}, workers={args.workers})")
    if not args.report_only:
        import subprocess
        cmd = [sys.executable, "-m", "benchmarks.zoo_diffusion.build", "--out", str(args.out),
               "--device", args.device, "--preset", args.preset, "--workers", str(args.workers)]
        cmd += ["--smoke"] if args.smoke else []
        # one build per folder at a time (its workers are this process's children); claims are per run, so a
        # claim left by a killed run (on this or another machine) must not block this one
        import fcntl
        lock_file = open(args.out / "build.lock", "w")  # noqa: SIM115 - held until the process exits
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another build is running in {args.out} (it holds {args.out / 'build.lock'})") from None
        shutil.rmtree(args.out / "claims", ignore_errors=True)
        cmd += ["--only", *args.only] if args.only else []
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
        # the run is on record from its start: a run cut short (SIGTERM, e.g. a time limit) still counts
        run = {"started": datetime.datetime.fromtimestamp(t_start, datetime.timezone.utc).isoformat(timespec="seconds"),
               "seconds": None, "status": "running", "command": command, "machine": run_machine(),
               "versions": run_versions()}
        state["runs"].append(run)

        def save_state(status: str):
            run.update(seconds=round(time.time() - t_start, 1), status=status)
            tmp = state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, state_path)

        save_state("running")

        procs = []

        def on_term(signum, frame):
            # a signal to this process alone must not leave workers training on. No Popen.wait here: the
            # interrupted frame may be inside one, holding the lock it needs (it would spin to its timeout)
            for p in procs:
                p.terminate()
            save_state(f"interrupted (signal {signum}); finished models are kept, a re-run resumes")
            raise SystemExit(128 + signum)

        import signal
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        for i in range(args.workers):
            procs.append(subprocess.Popen(cmd + ["--worker-id", str(i)], cwd=str(REPO), env=env))
            time.sleep(2)
        codes = [p.wait() for p in procs]
        if any(codes):
            save_state(f"failed: worker exit codes {codes}")
            raise SystemExit(f"worker exit codes {codes}; re-run to resume")
        save_state("finished")
    evals = {s["name"]: load_cached(args.out / "eval" / f"{s['name']}.safetensors") for s in specs
             if (args.out / "eval" / f"{s['name']}.safetensors").is_file()}
    total = sum(r["seconds"] or 0.0 for r in state["runs"])
    if args.report_only and state["runs"]:
        command = state["runs"][-1]["command"].strip()
    manifest = write_manifest(args.out, specs, evals, manifest_path, command, total, state["runs"])
    log(f"manifest: {manifest_path} ({len(manifest['models'])} models); total build {total:.0f}s")
    for m in manifest["models"]:
        mse = m.get("null_image_mse", {})
        log(f"  {m['name']:28s} {m['role']:8s} {m['recipe']:12s} acc {m.get('quality', {}).get('accuracy', float('nan')):.3f}"
            f" own {mse.get('own_teacher') or float('nan'):.4f} other {mse.get('other_teachers_mean') or float('nan'):.4f}")


if __name__ == "__main__":
    main()
