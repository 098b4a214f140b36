#!/usr/bin/env python
"""Throughput: kdd-jax's engine against an eager PyTorch reference doing the same work.

    python benchmarks/throughput.py                        # full run (~10-15 min on 2 cores)
    python benchmarks/throughput.py --quick --out /tmp/tp  # smoke test, well under a minute
    python benchmarks/throughput.py --workloads a,c        # a subset

Both sides run in one process on the same machine, float32, with torch.set_num_threads equal to
the CPUs XLA:CPU uses (the usable CPUs). Students are random-weight models built from the
Fashion-MNIST zoo architectures (benchmarks/zoo/build_zoo.py ARCHS, "-t" and "-s" sizes; no zoo
files needed): `converters.torch_reference` builds and randomises the torch module, which is
published as a student directory (model.safetensors + config.json); the torch side loads it with
`benchmarks.reference_torch.load_torch_student`, ours with `converters.convert_student`.

Workloads:
  a  pixel synthesis for one student (`kdd_jax.synthesis.pixel.synthesize_pixels` vs
     `reference_torch.synthesize_pixels_torch`), every arch, batch 64 and 256. Both start from
     kdd_jax's initial probes and targets, so they do the same optimisation; a cross-check replays
     a few steps on both and compares the loss trajectories.
  b  synthesis for 16 students of one architecture: a Python loop over students vs `jax.vmap`
     over their stacked weights (nnx.split states stacked with jax.tree.map(jnp.stack)); torch: a
     loop, and `torch.func.vmap` + `functional_call` over `stack_module_state`.
  c  scoring many (student, teacher) pairs from cached responses: `kdd_jax.scores.pairs.score_pairs`
     (neg_kl, dark_corr, linear_cka) vs the torch functions, per pair in a loop and batched.
  d  end-to-end `kdd_jax.detect.detect` with in-process teachers (`flax_teacher`, probabilities
     API, no response cache) vs `reference_torch.detect_torch` (synthesis + teacher forward +
     -KL + bootstrap).

Timing: every measured call is preceded by a warm-up call of the same shapes (JAX compiles there;
its compile seconds are reported separately as warm-up time minus the steady-state time of the
same work); JAX results are blocked on (block_until_ready / numpy conversion); medians over
--repeats, with JAX and torch repeats interleaved in (a) and (d) so that background load hits both.
On oversubscribed cores torch's OpenMP threads spin-wait and slow down several-fold (measured 5.6x
for a ResNet step at load 4 on 2 cores); run such machines with OMP_WAIT_POLICY=PASSIVE (recorded).
probes/s = probes x steps/s (probe updates per second). Ratio = JAX/PyTorch throughput (> 1: JAX
faster). Results: <out>/throughput.{md,json} (throughput_quick.* with --quick).

History: a workload "e" measured candidate layer patches by monkeypatching; they were adopted in
kdd_jax (MaxPool2d reshape, relu6, custom-VJP depthwise conv, jitted bootstrap: 1.3-3.4x on the
synthesis gradient of VGG / MobileNetV2) on 2026-11-22 and the workload was removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BENCH_KIND = "kdd_jax.benchmark.throughput"
ALL_WORKLOADS = ("a", "b", "c", "d")
DEFAULT_WORKLOADS = ("a", "b", "c", "d")
TITLES = {"a": "pixel synthesis, one student", "b": "pixel synthesis, 16 students of one architecture",
          "c": "scoring (student, teacher) pairs from cached responses", "d": "end-to-end detect"}

FULL = {  # sized for ~15 minutes on 2 cores
    "archs": ["resnet-t", "vgg-t", "mobilenetv2-t", "densenet-t", "resnet-s", "vgg-s", "mobilenetv2-s", "densenet-s"],
    "batches": [64, 256], "steps": 5, "repeats": 4, "warmup_steps": 2,
    "multi_archs": ["resnet-s"], "multi_students": 16, "multi_batch": 64, "multi_steps": 3, "multi_repeats": 3,
    "pairs": 1024, "pair_probes": 1000, "pair_classes": 10, "pair_repeats": 5,
    "detect_student": "resnet-s", "detect_teachers": ["resnet-t", "vgg-t", "mobilenetv2-t", "densenet-t"],
    "detect_probes": 100, "detect_steps": 20, "detect_repeats": 3, "bootstrap": 1000,
    "check_steps": 5, "check_batch": 64,  # a measured batch: the cross-check reuses its compiled step
}
QUICK = {  # one small architecture and one batch shape throughout, so JAX compiles little
    "archs": ["vgg-s"], "batches": [8], "steps": 2, "repeats": 2, "warmup_steps": 1,
    "multi_archs": ["vgg-s"], "multi_students": 2, "multi_batch": 8, "multi_steps": 2, "multi_repeats": 1,
    "pairs": 16, "pair_probes": 64, "pair_classes": 10, "pair_repeats": 2,
    "detect_student": "vgg-s", "detect_teachers": ["vgg-s", "vgg-s"],
    "detect_probes": 8, "detect_steps": 2, "detect_repeats": 1, "bootstrap": 100,
    "check_steps": 3, "check_batch": 8,
}
GPU = {**FULL,  # --preset gpu: sizes for one accelerator (JAX and torch on the same GPU, --torch-device cuda)
       "batches": [256, 2048], "steps": 20, "multi_batch": 256, "multi_steps": 10, "pairs": 8192, "check_batch": 256}
CHECK_RTOL = 1e-4  # loss trajectories: float32 agreement after a few Adam steps (measured ~1e-6)
SCORE_NAMES = ("neg_kl", "dark_corr", "linear_cka")


# ----------------------------------------------------------------------------- environment


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment() -> dict:
    import jax
    import torch

    from benchmarks.convert_bench import git_info, library_fingerprint
    from kdd_jax.versions import machine, versions

    torch_device = (f"{TORCH_DEVICE} ({torch.cuda.get_device_name(TORCH_DEVICE)})"
                    if str(TORCH_DEVICE).startswith("cuda") else str(TORCH_DEVICE))
    return {"machine": {**machine(), "jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()),
                        "jax_device_kind": jax.devices()[0].device_kind, "torch_device": torch_device,
                        "xla_flags": os.environ.get("XLA_FLAGS", "")},
            "versions": {**versions(), "torch": torch.__version__},
            "torch_device": torch_device,
            "git": git_info(), "library_sources_sha256": library_fingerprint()}


def _median(xs):
    return statistics.median(xs)


def timed(fn, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn (fn must block until its result is ready)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- students


@dataclasses.dataclass
class Student:
    arch: str
    family: str
    config_dict: dict
    torch_model: object
    flax_model: object
    config: object  # kdd_jax StudentConfig
    path: Path


def make_student(arch: str, seed: int, root: Path) -> Student:
    """Random weights (and BN statistics) for a zoo architecture, published as a student directory
    and loaded by both sides from that same safetensors + config.json."""
    from benchmarks.reference_torch.synthesis import load_torch_student, save_student
    from benchmarks.zoo.build_zoo import model_config
    from converters import convert_student
    from converters.torch_reference import build_torch_model, randomize_

    cfg = model_config(arch)
    d = save_student(randomize_(build_torch_model(cfg), seed), cfg, root / f"{arch}-{seed}")
    tm, cfg = load_torch_student(d)
    tm = tm.to(TORCH_DEVICE)
    res = convert_student(d)
    return Student(arch, cfg["family"], cfg, tm, res.model, res.config, d)


TORCH_DEVICE = "cpu"  # --torch-device: where the PyTorch side runs (its students are moved there)


def kdd_init(student: Student, sc):
    """kdd_jax's own initial probes and targets (synthesize_pixels with 0 steps), as torch NCHW on TORCH_DEVICE."""
    import torch

    from kdd_jax.synthesis.pixel import synthesize_pixels

    init = synthesize_pixels(student.flax_model, student.config, dataclasses.replace(sc, steps=0))
    return (torch.from_numpy(np.ascontiguousarray(init.normalised.transpose(0, 3, 1, 2))).to(TORCH_DEVICE),
            torch.from_numpy(np.array(init.targets)).to(TORCH_DEVICE))


# ----------------------------------------------------------------------------- cross-check


def cross_check(student: Student, steps: int, batch: int) -> dict:
    """Same init and targets, `steps` Adam steps on both sides: loss trajectories must agree to
    CHECK_RTOL (float32), probes are compared too (Adam's first steps move every pixel by ~lr,
    sign-like, so pixels whose gradient is ~0 may differ by up to lr per step)."""
    from benchmarks.reference_torch.synthesis import synthesize_pixels_torch
    from kdd_jax.synthesis import SynthesisConfig
    from kdd_jax.synthesis.pixel import synthesize_pixels

    # aug_noise 0 throughout: the PyTorch reference has no noise step (and the committed figures were taken without)
    sc = SynthesisConfig(n_probes=batch, steps=steps, seed=0, aug_noise=0.0)
    x0, tg = kdd_init(student, sc)
    pj = synthesize_pixels(student.flax_model, student.config, sc)
    xt, _, ht = synthesize_pixels_torch(student.torch_model, student.config_dict, sc, x0=x0, targets=tg)
    hj = np.asarray(pj.loss_history)
    rel = float(np.max(np.abs(hj - ht) / np.maximum(np.abs(ht), 1e-12)))
    dx = np.abs(pj.normalised.transpose(0, 3, 1, 2) - xt.cpu().numpy())
    return {"arch": student.arch, "steps": steps, "batch": batch, "loss_jax": [float(v) for v in hj],
            "loss_torch": [float(v) for v in ht], "max_rel_loss_diff": rel, "ok": bool(rel <= CHECK_RTOL),
            "probe_max_abs_diff": float(dx.max()), "probe_mean_abs_diff": float(dx.mean()),
            "probe_frac_diff_gt_1e-3": float(np.mean(dx > 1e-3))}


# ----------------------------------------------------------------------------- (a)


def measure_synthesis(student: Student, batch: int, s: dict, log) -> dict:
    from benchmarks.reference_torch.synthesis import synthesize_pixels_torch
    from kdd_jax.synthesis import SynthesisConfig
    from kdd_jax.synthesis.pixel import synthesize_pixels

    steps, reps, w = s["steps"], s["repeats"], s["warmup_steps"]
    sc = SynthesisConfig(n_probes=batch, steps=steps, seed=0, aug_noise=0.0)
    scw = dataclasses.replace(sc, steps=w)
    x0, tg = kdd_init(student, sc)

    def jax_run(c):
        return lambda: synthesize_pixels(student.flax_model, student.config, c)

    def torch_run(c):
        return lambda: synthesize_pixels_torch(student.torch_model, student.config_dict, c, x0=x0, targets=tg)

    jw = timed(jax_run(scw), 1)[0]
    tw = timed(torch_run(scw), 1)[0]
    jt, tt = [], []
    for _ in range(reps):  # interleaved: background load, if any, hits both sides alike
        jt += timed(jax_run(sc), 1)
        tt += timed(torch_run(sc), 1)
    jm, tm = _median(jt), _median(tt)
    row = {"arch": student.arch, "family": student.family, "batch": batch, "steps": steps, "repeats": reps,
           "jax_steps_s": steps / jm, "torch_steps_s": steps / tm,
           "jax_probes_s": batch * steps / jm, "torch_probes_s": batch * steps / tm,
           "ratio": tm / jm, "jax_compile_s": max(0.0, jw - w * jm / steps), "torch_warmup_extra_s": max(0.0, tw - w * tm / steps),
           "jax_times_s": jt, "torch_times_s": tt}
    log(f"(a) {student.arch} b{batch}: jax {row['jax_steps_s']:.2f} steps/s, torch {row['torch_steps_s']:.2f} steps/s, "
        f"ratio {row['ratio']:.2f} (compile {row['jax_compile_s']:.1f} s)")
    return row


def workload_a(s: dict, root: Path, log) -> dict:
    rows, checks = [], []
    for i, arch in enumerate(s["archs"]):
        st = make_student(arch, 100 + i, root)
        for b in s["batches"]:  # first: a shape compiled by the cross-check would hide compile time
            rows.append(measure_synthesis(st, b, s, log))
        checks.append(cross_check(st, s["check_steps"], s["check_batch"]))
        log(f"cross-check {arch}: max rel loss diff {checks[-1]['max_rel_loss_diff']:.2e} "
            f"({'ok' if checks[-1]['ok'] else 'MISMATCH'})")
    return {"rows": rows, "cross_check": checks}


# ----------------------------------------------------------------------------- (b)


def _vmapped_pixel_step(static, carry, consts):
    """kdd_jax's pixel step, vmapped over students (weights, running stats, probes, Adam state)."""
    import jax

    from kdd_jax.synthesis.pixel import _step

    return jax.vmap(lambda c, k: _step(static, c, k))(carry, consts)


def jax_vmap_synthesis(students: list[Student], sc):
    """The pixel synthesis of kdd_jax.synthesis.pixel for S students of one architecture at once:
    per-student consts (nnx.split states, running stats, ...) stacked with jax.tree.map(jnp.stack),
    the library's step vmapped over them, driven by the library's run_loop."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from kdd_jax.models import bn_running_stats
    from kdd_jax.synthesis.pixel import synthesize_pixels
    from kdd_jax.synthesis.probes import normalised_bounds, run_loop

    first = students[0]
    init = synthesize_pixels(first.flax_model, first.config, dataclasses.replace(sc, steps=0))
    pre = first.config.preprocessing
    lo, hi = normalised_bounds(pre)
    x = jnp.asarray(init.normalised)[None]  # [G=1, n, h, w, c]
    targets = jnp.asarray(init.targets)[None]
    lr = jnp.float32(sc.lr if sc.lr is not None else 0.05)
    graphdef = None
    consts, carries = [], []
    for st in students:
        gd, state = nnx.split(st.flax_model)
        graphdef = gd if graphdef is None else graphdef
        if gd != graphdef:
            raise ValueError("students must share one architecture (graphdef)")
        consts.append({"state": state, "running": bn_running_stats(st.flax_model), "targets": targets, "lo": lo,
                       "hi": hi, "w": jnp.asarray([sc.bn_weight, sc.ce_weight, sc.tv_weight, sc.l2_weight], jnp.float32),
                       "lr": lr})
        carries.append((x, optax.adam(lr).init(x), jax.random.key(sc.seed)))
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
    consts = stack(consts)
    carry = stack(carries)
    hw = tuple(pre.input_size)  # the library's static tuple: probes rendered at the student's resolution
    (xs, _, _), history = run_loop(_vmapped_pixel_step, (graphdef, True, sc.jitter, sc.flip, hw, sc.aug_noise), carry, consts,
                                   sc.steps, "python")
    return np.asarray(xs), history  # [S, 1, n, h, w, c], [steps, S]


def workload_b(s: dict, root: Path, log) -> dict:
    from benchmarks.reference_torch.synthesis import synthesize_pixels_torch, synthesize_pixels_torch_vmap
    from kdd_jax.synthesis import SynthesisConfig
    from kdd_jax.synthesis.pixel import synthesize_pixels

    out = []
    for arch in s["multi_archs"]:
        S, batch, steps, reps = s["multi_students"], s["multi_batch"], s["multi_steps"], s["multi_repeats"]
        students = [make_student(arch, 200 + i, root) for i in range(S)]
        sc = SynthesisConfig(n_probes=batch, steps=steps, seed=0, aug_noise=0.0)
        scw = dataclasses.replace(sc, steps=1)
        x0, tg = kdd_init(students[0], sc)
        x0s, tgs = x0.expand(S, *x0.shape).contiguous(), tg.expand(S, *tg.shape).contiguous()

        def jax_loop(c):
            return lambda: [synthesize_pixels(st.flax_model, st.config, c) for st in students]

        def torch_loop(c):
            return lambda: [synthesize_pixels_torch(st.torch_model, st.config_dict, c, x0=x0, targets=tg)
                            for st in students]

        variants = {}

        def run(name, make):
            try:
                warm = timed(make(scw), 1)[0]
                times = timed(make(sc), reps)
                med = _median(times)
                per_step = med / steps
                variants[name] = {"student_steps_s": S * steps / med, "probes_s": S * batch * steps / med,
                                  "seconds": times, "warmup_extra_s": max(0.0, warm - per_step)}
                log(f"(b) {arch} x{S} {name}: {S * steps / med:.2f} student-steps/s")
            except Exception as e:  # torch.func coverage varies: record, don't abort the benchmark
                variants[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
                log(f"(b) {arch} {name}: FAILED {variants[name]['error']}")

        run("jax_loop", jax_loop)
        run("jax_vmap", lambda c: (lambda: jax_vmap_synthesis(students, c)))
        run("torch_loop", torch_loop)
        models = [st.torch_model for st in students]
        run("torch_func_vmap", lambda c: (lambda: synthesize_pixels_torch_vmap(models, students[0].config_dict, c,
                                                                                  x0s, tgs)))
        # consistency: vmapped runs reproduce the loops' loss trajectories (first student)
        chk = {}
        try:
            c3 = dataclasses.replace(sc, steps=min(3, steps))
            lj = synthesize_pixels(students[1].flax_model, students[1].config, c3).loss_history
            _, hv = jax_vmap_synthesis(students[:2], c3)
            chk["jax_vmap_vs_loop_max_rel"] = float(np.max(np.abs(hv[:, 1] - lj) / np.abs(lj)))
            _, _, lt = synthesize_pixels_torch(models[1], students[1].config_dict, c3, x0=x0, targets=tg)
            chk["torch_vs_jax_max_rel"] = float(np.max(np.abs(lt - lj) / np.abs(lj)))
            if "error" not in variants["torch_func_vmap"]:
                _, tv = synthesize_pixels_torch_vmap(models[:2], students[0].config_dict, c3, x0s[:2], tgs[:2])
                chk["torch_vmap_vs_loop_max_rel"] = float(np.max(np.abs(tv[:, 1] - lt) / np.abs(lt)))
        except Exception as e:
            chk["error"] = f"{type(e).__name__}: {e}"[:500]
        res = {"arch": arch, "students": S, "batch": batch, "steps": steps, "repeats": reps, "variants": variants,
               "consistency": chk}
        ok = {k: v["student_steps_s"] for k, v in variants.items() if "student_steps_s" in v}
        if ok:
            res["best"] = max(ok, key=ok.get)
            if "jax_vmap" in ok and "jax_loop" in ok:
                res["jax_vmap_over_loop"] = ok["jax_vmap"] / ok["jax_loop"]
            jax_best = max((v for k, v in ok.items() if k.startswith("jax")), default=None)
            torch_best = max((v for k, v in ok.items() if k.startswith("torch")), default=None)
            if jax_best and torch_best:
                res["ratio_best_jax_over_best_torch"] = jax_best / torch_best
        out.append(res)
    return {"rows": out}


# ----------------------------------------------------------------------------- (c)


def workload_c(s: dict, log) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.reference_torch import scores as ts
    from kdd_jax.scores.pairs import score_pairs

    P, N, C, reps = s["pairs"], s["pair_probes"], s["pair_classes"], s["pair_repeats"]
    rng = np.random.default_rng(0)
    s_logits = (rng.standard_normal((P, N, C)) * 3).astype(np.float32)
    t_logits = (rng.standard_normal((P, N, C)) * 3).astype(np.float32)
    t_logp = (t_logits - np.log(np.exp(t_logits).sum(-1, keepdims=True))).astype(np.float32)
    s_logp = (s_logits - np.log(np.exp(s_logits).sum(-1, keepdims=True))).astype(np.float32)  # set scores: X
    inputs = {"neg_kl": (s_logits, t_logp), "dark_corr": (s_logits, t_logp), "linear_cka": (s_logp, t_logp)}
    rows = []
    for name in SCORE_NAMES:
        a_np, b_np = inputs[name]
        a_j, b_j = jax.block_until_ready((jnp.asarray(a_np), jnp.asarray(b_np)))
        a_t, b_t = torch.from_numpy(a_np).to(TORCH_DEVICE), torch.from_numpy(b_np).to(TORCH_DEVICE)
        fn_t = ts.SCORES[name]
        sync = torch.cuda.synchronize if a_t.is_cuda else (lambda: None)

        def jax_dev():
            jax.block_until_ready(score_pairs(name, a_j, b_j))

        def jax_host():
            np.asarray(score_pairs(name, a_np, b_np))

        def torch_loop():
            with torch.no_grad():
                [fn_t(a_t[p], b_t[p]) for p in range(P)]
            sync()

        def torch_batched():
            with torch.no_grad():
                fn_t(a_t, b_t)
            sync()

        t0 = time.perf_counter()
        jax_dev()
        compile_s = time.perf_counter() - t0
        jax_host()
        torch_loop()
        torch_batched()
        times = {k: timed(f, reps) for k, f in
                 {"jax_device_inputs": jax_dev, "jax_host_inputs": jax_host, "torch_loop": torch_loop,
                  "torch_batched": torch_batched}.items()}
        med = {k: _median(v) for k, v in times.items()}
        # agreement of the two implementations on these inputs
        diff = float(np.max(np.abs(np.asarray(score_pairs(name, a_j, b_j)) - fn_t(a_t, b_t).cpu().numpy())))
        row = {"score": name, "pairs": P, "probes": N, "classes": C, "probe_pairs": P * N,
               **{f"{k}_pp_s": P * N / v for k, v in med.items()},
               "ratio_jax_over_torch_loop": med["torch_loop"] / med["jax_device_inputs"],
               "ratio_jax_over_torch_batched": med["torch_batched"] / med["jax_device_inputs"],
               "jax_first_call_s": compile_s, "max_abs_diff": diff, "seconds": times}
        log(f"(c) {name}: jax {row['jax_device_inputs_pp_s']:.3g} probe-pairs/s (host inputs "
            f"{row['jax_host_inputs_pp_s']:.3g}), torch loop {row['torch_loop_pp_s']:.3g}, batched {row['torch_batched_pp_s']:.3g}")
        rows.append(row)
    return {"rows": rows, "devices": len(jax.devices())}


# ----------------------------------------------------------------------------- (d)


def workload_d(s: dict, root: Path, log) -> dict:
    from benchmarks.reference_torch.synthesis import TorchTeacher, detect_torch
    from kdd_jax.detect import DetectConfig, detect
    from kdd_jax.synthesis import SynthesisConfig
    from kdd_jax.teachers import flax_teacher

    student = make_student(s["detect_student"], 300, root)
    teachers = [make_student(a, 400 + i, root) for i, a in enumerate(s["detect_teachers"])]
    j_teachers = [flax_teacher(f"t{i}-{t.arch}", t.flax_model, t.config, output="probs") for i, t in enumerate(teachers)]
    t_teachers = [TorchTeacher(f"t{i}-{t.arch}", t.torch_model, t.config_dict) for i, t in enumerate(teachers)]
    n, steps, reps = s["detect_probes"], s["detect_steps"], s["detect_repeats"]
    sc = SynthesisConfig(n_probes=n, steps=steps, seed=0, aug_noise=0.0)
    x0, tg = kdd_init(student, sc)

    def jax_run(c):
        dc = DetectConfig(synthesis=c, n_bootstrap=s["bootstrap"])
        return lambda: detect(student.flax_model, student.config, j_teachers, dc)

    def torch_run(c):
        return lambda: detect_torch(student.torch_model, student.config_dict, t_teachers, c, n_bootstrap=s["bootstrap"],
                                    x0=x0, targets=tg)

    scw = dataclasses.replace(sc, steps=1)
    makers = {"jax": jax_run, "torch": torch_run}
    warm, times, stages, last = {}, {k: [] for k in makers}, {k: [] for k in makers}, {}
    for name, make in makers.items():
        t0 = time.perf_counter()
        make(scw)()
        warm[name] = time.perf_counter() - t0
    for _ in range(reps):  # interleaved, as in (a)
        for name, make in makers.items():
            t0 = time.perf_counter()
            last[name] = make(sc)()
            times[name].append(time.perf_counter() - t0)
            stages[name].append(dict(last[name].timings) if name == "jax" else dict(last[name]["timings"]))
    side = {}
    for name in makers:
        med = _median(times[name])
        side[name] = {"seconds": times[name], "detections_s": 1 / med, "probes_s": n / med,
                      "stages_s": {k: _median([st[k] for st in stages[name]]) for k in stages[name][0]},
                      "warmup_s": warm[name],
                      "winner": last[name].verdict.winner if name == "jax" else last[name]["winner"]}
        log(f"(d) {name}: {med:.2f} s per detection ({n} probes, {steps} steps, {len(teachers)} teachers), "
            f"stages {side[name]['stages_s']}")
    return {"student": student.arch, "teachers": [t.arch for t in teachers], "probes": n, "steps": steps,
            "bootstrap": s["bootstrap"], "repeats": reps, **side,
            "ratio": side["jax"]["detections_s"] / side["torch"]["detections_s"],
            "same_winner": side["jax"]["winner"] == side["torch"]["winner"]}


# ----------------------------------------------------------------------------- (e) experiments


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    head = "| " + " | ".join(c[1] for c in cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c[0], "")) for c in cols) + " |\n" for r in rows)


def _ratio_summary(rows: list[dict]) -> str:
    if not rows:
        return ""
    ratios = [r["ratio"] for r in rows]
    gm = float(np.exp(np.mean(np.log(ratios))))
    wins = sum(r > 1 for r in ratios)
    per_family = {}
    for r in rows:
        per_family.setdefault(r["family"], []).append(r["ratio"])
    fam = ", ".join(f"{f} {float(np.exp(np.mean(np.log(v)))):.2f}" for f, v in per_family.items())
    return (f"Geometric-mean ratio JAX/torch **{gm:.2f}**; JAX faster in {wins} of {len(ratios)} cases; "
            f"per family: {fam}.")


def render_markdown(res: dict) -> str:
    m, st = res["machine"], res["settings"]
    L = [f"# Throughput: kdd-jax vs eager PyTorch{' (QUICK smoke run: not representative)' if st['quick'] else ''}", "",
         f"Generated by `benchmarks/throughput.py` on {res['date']} in {res['total_s']:.0f} s. "
         "Numbers are measured, never asserted by tests.", "", "```", res["command"], "```", "",
         "## Machine and versions", "",
         f"- CPU: {m['cpu_model']} ({m['usable_cpus']} usable of {m['logical_cpus']} logical), {m['memory_gib']} GiB RAM; "
         f"jax backend `{m['jax_backend']}`, {m['jax_devices']} device(s) ({m.get('jax_device_kind', '?')}); "
         f"torch on `{m.get('torch_device', 'cpu')}`, torch threads {st['torch_threads']}, "
         f"OMP_WAIT_POLICY {st.get('omp_wait_policy') or 'unset'}",
         f"- load average (1/5/15 min) at start {res['load_average_1_5_15']['start']}, at end "
         f"{res['load_average_1_5_15']['end']} (a load above the core count means other work shared these cores: "
         "timings are inflated and scattered)",
         f"- git `{res['git']['commit']}`{' (dirty tree)' if res['git']['dirty'] else ''}; library sources "
         + ("unchanged during the run" if res["library_sources_sha256"]["start"] == res["library_sources_sha256"]["end"]
            else "**CHANGED during the run**"),
         "- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
         "- float32 on both sides; medians over repeats; warm-up (JAX compile) excluded and reported separately. "
         "ratio = JAX throughput / PyTorch throughput (> 1: JAX faster).", ""]
    w = res["workloads"]
    if "a" in w:
        L += ["## (a) " + TITLES["a"], "",
              f"`synthesize_pixels` vs `synthesize_pixels_torch`, {st['steps']} steps x {st['repeats']} repeats "
              "(each repeat is a whole synthesis call: setup + steps; JAX and torch repeats interleaved), same initial "
              "probes and targets on both sides.", "",
              _table(w["a"]["rows"], [("arch", "arch"), ("batch", "batch"), ("jax_steps_s", "JAX steps/s"),
                                      ("torch_steps_s", "torch steps/s"), ("jax_probes_s", "JAX probes/s"),
                                      ("torch_probes_s", "torch probes/s"), ("ratio", "ratio JAX/torch"),
                                      ("jax_compile_s", "JAX compile s")]),
              _ratio_summary(w["a"]["rows"]),
              "",
              "Cross-check (same init and targets, a few Adam steps on each side; losses must agree to "
              f"{CHECK_RTOL:g} relative):", "",
              _table(w["a"]["cross_check"], [("arch", "arch"), ("steps", "steps"), ("batch", "batch"),
                                             ("max_rel_loss_diff", "max rel loss diff"), ("ok", "ok"),
                                             ("probe_max_abs_diff", "probe max |diff|"),
                                             ("probe_mean_abs_diff", "probe mean |diff|")])]
    if "b" in w:
        L += ["## (b) " + TITLES["b"], "",
              "student-steps/s = students x steps / seconds (higher is better).", ""]
        rows = []
        for r in w["b"]["rows"]:
            for k, v in r["variants"].items():
                rows.append({"arch": r["arch"], "students": r["students"], "batch": r["batch"], "variant": k,
                             "sss": v.get("student_steps_s", "failed"), "pps": v.get("probes_s", ""),
                             "warm": v.get("warmup_extra_s", ""), "err": v.get("error", "")[:120]})
        L += [_table(rows, [("arch", "arch"), ("students", "students"), ("batch", "batch"), ("variant", "variant"),
                            ("sss", "student-steps/s"), ("pps", "probes/s"), ("warm", "warm-up extra s"),
                            ("err", "error")])]
        for r in w["b"]["rows"]:
            L.append(f"- {r['arch']}: best **{r.get('best')}**; JAX vmap / JAX loop = {r.get('jax_vmap_over_loop', float('nan')):.2f}x; "
                     f"best JAX / best torch = {r.get('ratio_best_jax_over_best_torch', float('nan')):.2f}x; "
                     f"consistency {json.dumps({k: (f'{v:.1e}' if isinstance(v, float) else v) for k, v in r['consistency'].items()})}")
        L.append("")
    if "c" in w:
        L += ["## (c) " + TITLES["c"], "",
              f"probe-pairs/s = pairs x probes / seconds; {w['c']['devices']} JAX device(s). `score_pairs` with inputs "
              "already on device, and from host numpy arrays (includes the copy); torch per pair in a Python loop, "
              "and batched over pairs in one call. Goal: >= 1e6 probe-pairs/s for point-wise scores.", "",
              _table(w["c"]["rows"], [("score", "score"), ("pairs", "pairs"), ("probes", "probes"),
                                      ("jax_device_inputs_pp_s", "JAX"), ("jax_host_inputs_pp_s", "JAX (host inputs)"),
                                      ("torch_loop_pp_s", "torch loop"), ("torch_batched_pp_s", "torch batched"),
                                      ("ratio_jax_over_torch_loop", "JAX/torch loop"),
                                      ("ratio_jax_over_torch_batched", "JAX/torch batched"),
                                      ("jax_first_call_s", "JAX first call s"), ("max_abs_diff", "max |diff|")])]
    if "d" in w:
        d = w["d"]
        L += ["## (d) " + TITLES["d"], "",
              f"Student {d['student']}, teachers {', '.join(d['teachers'])} (probabilities API, in process, no cache), "
              f"{d['probes']} probes, {d['steps']} steps, {d['bootstrap']} bootstrap replicates, {d['repeats']} repeats.", "",
              _table([{"side": k, "s": 1 / d[k]["detections_s"], "pps": d[k]["probes_s"],
                       **{f"st_{a}": b for a, b in d[k]["stages_s"].items()}, "warm": d[k]["warmup_s"],
                       "winner": d[k]["winner"]} for k in ("jax", "torch")],
                     [("side", "side"), ("s", "s / detection"), ("pps", "probes/s"), ("st_synthesis", "synthesis s"),
                      ("st_queries", "queries s"), ("st_scoring", "scoring s"), ("warm", "first call s"),
                      ("winner", "winner")]),
              f"ratio JAX/torch {d['ratio']:.2f}; same winner: {d['same_winner']}", ""]
    if res.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(L)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few steps: a smoke test, not a benchmark")
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                    help="comma-separated subset of a,b,c,d (default) and e (patch experiments, opt-in)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results directory")
    ap.add_argument("--steps", type=int, default=None, help="(a) measured steps per repeat")
    ap.add_argument("--repeats", type=int, default=None, help="(a) repeats")
    ap.add_argument("--archs", default=None, help="(a) comma-separated zoo architectures")
    ap.add_argument("--batches", default=None, help="(a) comma-separated batch sizes")
    ap.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                    help="problem sizes: cpu (default, ~15 min on 2 cores) or gpu (larger batches and pair counts)")
    ap.add_argument("--torch-device", default="cpu",
                    help="where the PyTorch side runs (cpu, cuda, ...); JAX runs on its default backend. "
                         "Workload d (end-to-end detect, torch teachers on host arrays) needs cpu")
    ap.add_argument("--tag", default=None, help="results file stem (default throughput, throughput_gpu with --preset gpu, "
                                                "throughput_quick with --quick); a run in progress writes <stem>.partial.*")
    args = ap.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not workloads or any(w not in ALL_WORKLOADS for w in workloads):
        ap.error(f"--workloads must name some of {ALL_WORKLOADS}")
    if args.torch_device != "cpu" and "d" in workloads:
        ap.error("workload d runs its torch teachers on host arrays: use --torch-device cpu, or leave d out")
    global TORCH_DEVICE
    TORCH_DEVICE = args.torch_device
    if TORCH_DEVICE != "cpu":  # refuse before any work, not after minutes of JAX measurements
        import torch

        try:
            dev = torch.device(TORCH_DEVICE)
        except RuntimeError as e:
            ap.error(f"--torch-device {TORCH_DEVICE!r}: {e}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            ap.error(f"--torch-device {TORCH_DEVICE!r}: torch {torch.__version__} sees no CUDA GPU")
    if args.quick and args.preset != "cpu":
        ap.error("--quick has its own tiny sizes: leave --preset out")
    s = dict(QUICK if args.quick else GPU if args.preset == "gpu" else FULL)
    if args.steps is not None:
        s["steps"] = args.steps
    if args.repeats is not None:
        s["repeats"] = args.repeats
    if args.archs:
        s["archs"] = args.archs.split(",")
    if args.batches:
        s["batches"] = [int(b) for b in args.batches.split(",")]

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    threads = usable_cpus()
    if load_start[0] >= threads and "OMP_WAIT_POLICY" not in os.environ:
        print(f"warning: load average {load_start[0]:.1f} >= {threads} CPUs: torch's OpenMP threads spin-wait and run "
              "several times slower on oversubscribed cores; consider OMP_WAIT_POLICY=PASSIVE (recorded in the "
              "results) or a quiet machine", file=sys.stderr)
    import torch

    torch.set_num_threads(threads)
    env = environment()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    command = shlex.join([sys.executable, *(sys.argv if argv is None else ["benchmarks/throughput.py", *argv])])
    log(f"throughput benchmark: workloads {workloads}, {threads} threads, load {load_start}")
    results = {}
    stem = args.tag or ("throughput_quick" if args.quick else "throughput_gpu" if args.preset == "gpu" else "throughput")
    with tempfile.TemporaryDirectory(prefix="kdd-throughput-") as tmp:
        root = Path(tmp)
        for wl in workloads:
            t0 = time.perf_counter()
            if wl == "a":
                results["a"] = workload_a(s, root, log)
            elif wl == "b":
                results["b"] = workload_b(s, root, log)
            elif wl == "c":
                results["c"] = workload_c(s, log)
            else:
                results["d"] = workload_d(s, root, log)
            results[wl]["wall_s"] = time.perf_counter() - t0
            # written after every workload, beside the final files: a run cut short (a lent GPU's time limit)
            # keeps what it measured without replacing a complete earlier result
            _write(args.out, stem + ".partial", _result(results, s, args, workloads, command, env, load_start, t_start))
    res = _result(results, s, args, workloads, command, env, load_start, t_start)
    _write(args.out, stem, res)
    for ext in ("json", "md"):
        (args.out / f"{stem}.partial.{ext}").unlink(missing_ok=True)
    log(f"done in {res['total_s']:.0f} s -> {args.out / stem}.{{md,json}}")
    return 0


def _write(out: Path, stem: str, res: dict) -> None:
    from benchmarks.provenance import finite_or_null  # strict JSON: a non-finite number is null
    from kdd_jax.io import atomic_write_bytes  # a run killed mid-write leaves the previous file whole

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"{stem}.json", (json.dumps(finite_or_null(res), indent=1, default=_json_default,
                                                         allow_nan=False) + "\n").encode())
    atomic_write_bytes(out / f"{stem}.md", render_markdown(res).encode())


def _result(results, s, args, workloads, command, env, load_start, t_start) -> dict:
    import torch

    from benchmarks.convert_bench import library_fingerprint

    return {
        "kind": BENCH_KIND,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "cwd": os.getcwd(), "git": env["git"],
        "library_sources_sha256": {"start": env["library_sources_sha256"], "end": library_fingerprint()},
        "load_average_1_5_15": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "machine": env["machine"], "versions": env["versions"],
        "settings": {**s, "quick": args.quick, "preset": args.preset, "workloads": workloads,
                     "workloads_done": list(results), "torch_device": env["torch_device"],
                     "torch_threads": torch.get_num_threads(),
                     "torch_interop_threads": torch.get_num_interop_threads(),
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "workloads": results,
        "total_s": time.perf_counter() - t_start,
        "notes": NOTES,
    }


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


NOTES = [
    "Same work on both sides: the torch student is `converters.torch_reference` loaded from the same safetensors "
    "file as ours; same loss (BN statistics with standard deviations, mixed-label soft CE, TV, l2 with kdd_jax's "
    "SynthesisConfig weights), Adam lr 0.05, clipping to the same bounds, same initial probes and targets.",
    "probes/s in (a)/(b) counts probe updates (batch x steps per second); divide by an audit's step count (200 by "
    "default) for finished probes per second.",
    "(d) JAX runs kdd_jax.detect.detect as a user would (fresh DetectConfig each call); torch runs "
    "benchmarks.reference_torch.detect_torch. Teachers answer probabilities; no response cache on either side.",
]


if __name__ == "__main__":
    sys.exit(main())
