"""Distillation detection for a generative (diffusion) student: probes -> student images (white-box,
JAX) -> teacher images (black-box, cached) -> image scores -> decide.

    from kdd_jax.generative.detect import GenerativeDetectConfig, detect_generative
    result = detect_generative(student, cached_teachers, GenerativeDetectConfig(n=10), feature_net=net)
    result.verdict.winner

Probes (arXiv 2510.02302, text-to-image part): N initial noises x_T, made from seeds that
`GenerativeDetectConfig.seed` fixes, given to the student AND every teacher, with
  empty    the empty prompt: the unconditional mode classifier-free guidance trains (the paper's probe)
  caption  the baseline analogue of captioning the student's own empty-prompt images: a classifier
           labels the student's empty-prompt image for each x_T, and that label becomes the prompt
  random   a random class per probe (seeded)

Scores compare the student's image with each teacher's image from the same x_T: pair scores
(`kdd_jax.scores.images`: neg_lpips with a pluggable feature network, ssim, neg_pixel_mse) are per
probe and averaged; the consensus score resid_corr correlates the student's and each teacher's
departures from the mean of all teachers' images (per probe, averaged; needs >= 2 teachers); set scores (linear_cka, rbf_cka, acs, neg_mmd2) compare the student's N embeddings
with a teacher's N embeddings (`feature_net.embedding`). The verdict, bootstrap intervals and p-value
are the classifier path's (`kdd_jax.verdict`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kdd_jax.synthesis.probes import SEED_LIMIT
from kdd_jax.teachers.base import TeacherError
from kdd_jax.teachers.generative import GenerationRequest
from kdd_jax.verdict import Verdict, decide, pointwise_score_fn, verdict_record
from kdd_jax.versions import versions

PROBE_METHODS = ("empty", "caption", "random")
SET_SCORES = ("linear_cka", "rbf_cka", "acs", "neg_mmd2")


def pair_scores() -> dict:
    from kdd_jax.scores.images import IMAGE_PAIR_SCORES

    return IMAGE_PAIR_SCORES


def consensus_scores() -> dict:
    from kdd_jax.scores.images import IMAGE_CONSENSUS_SCORES

    return IMAGE_CONSENSUS_SCORES


def score_names() -> list[str]:
    return sorted([*pair_scores(), *consensus_scores(), *SET_SCORES])


@dataclasses.dataclass(frozen=True)
class GenerativeDetectConfig:
    probes: str = "empty"
    n: int = 10
    seed: int = 0
    # SSIM per probe: on the diffusion zoo it is the most accurate score at N = 1 and N = 10 and needs no
    # feature network (benchmarks/results/generative_detection.md); the paper's LPIPS is "neg_lpips" with one
    score: str = "ssim"
    n_bootstrap: int = 1000
    confidence: float = 0.95

    def __post_init__(self):
        if self.probes not in PROBE_METHODS:
            raise ValueError(f"probes={self.probes!r}: expected one of {PROBE_METHODS}")
        if self.n < 1 or not 0 <= self.seed < SEED_LIMIT:  # the classifier path's range, one --seed for both
            raise ValueError(f"n={self.n} must be >= 1 and seed={self.seed} in [0, 2**32)")
        if self.score not in score_names():
            raise ValueError(f"score={self.score!r}: expected one of {score_names()}")


@dataclasses.dataclass
class GenerativeDetectionResult:
    verdict: Verdict
    request: GenerationRequest
    student_images: np.ndarray  # [N, H, W, C] in [0, 1]
    teacher_images: dict[str, np.ndarray]
    teacher_stats: dict[str, dict]
    timings: dict[str, float]
    config: GenerativeDetectConfig
    per_probe: np.ndarray | None = None  # [K, N] for pair scores
    none: object | None = None  # calibration.NoneTest: distilled from any candidate at all?

    @property
    def answer(self) -> str:
        return self.verdict.winner if self.none is None else self.none.answer

    def to_dict(self) -> dict:
        return {
            **verdict_record(self.verdict, self.none),
            "probes": {"method": self.config.probes, "n": len(self.request), "prompts": list(self.request.prompts),
                       "seeds": None if self.request.seeds is None else self.request.seeds.tolist(),
                       "noise": "kdd_jax.generative.noise.initial_noise(seed), NHWC"},
            "teachers": self.teacher_stats,
            "timings_s": self.timings,
            "config": dataclasses.asdict(self.config),
            "seed": self.config.seed,
            "versions": versions(),
        }


def probe_seeds(seed: int, n: int) -> np.ndarray:
    """The N noise seeds of a detection: the first N draws of numpy's default_rng(seed) in [0, 2**62)."""
    return np.random.default_rng(seed).integers(0, 2**62, size=n, dtype=np.int64)


def make_probes(student, gc: GenerativeDetectConfig, *, captioner: Callable | None = None) -> GenerationRequest:
    """The probe request for `student` (a DiffusionModel). `captioner(images [N,H,W,C] in [0,1]) -> prompts`
    is needed for the caption method."""
    seeds = probe_seeds(gc.seed, gc.n)
    empty = GenerationRequest.from_seeds([""] * gc.n, seeds, student.noise_shape)
    if gc.probes == "empty":
        return empty
    if student.num_classes is None:
        raise ValueError(f"probes={gc.probes!r} need a class-conditional student; {student.name!r} is unconditional")
    if gc.probes == "random":
        classes = np.random.default_rng([gc.seed, 1]).integers(0, student.num_classes, size=gc.n)
        return dataclasses.replace(empty, prompts=tuple(str(int(c)) for c in classes))
    if captioner is None:
        raise ValueError("probes='caption' needs a captioner (e.g. classifier_captioner(...))")
    images = student.generate(empty.prompts, empty.noise, empty.seeds)
    prompts = [str(p) for p in captioner(images)]
    if len(prompts) != gc.n:
        raise ValueError(f"the captioner returned {len(prompts)} prompts for {gc.n} images")
    return dataclasses.replace(empty, prompts=tuple(prompts))


def classifier_captioner(model, config) -> Callable:
    """Caption = the class index a kdd-jax classifier assigns to each image (resized to its input size,
    mapped to its value range)."""
    from kdd_jax.teachers.local import flax_teacher

    teacher = flax_teacher("captioner", model, config, output="labels")
    pre = config.preprocessing
    lo, hi = pre.value_range

    def caption(images: np.ndarray) -> list[str]:
        x = jnp.asarray(images, jnp.float32)
        h, w = pre.input_size
        if x.shape[1:3] != (h, w):
            x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bilinear")
        if x.shape[3] != pre.channels:
            raise ValueError(f"captioner takes {pre.channels}-channel images, got {x.shape[3]}")
        x = np.asarray(jnp.transpose(x, (0, 3, 1, 2))) * (hi - lo) + lo
        return [str(int(c)) for c in teacher.query(x).indices]

    return caption


def detect_generative(student, teachers: list, gc: GenerativeDetectConfig = GenerativeDetectConfig(), *,
                      feature_net=None, captioner: Callable | None = None,
                      progress: Callable[[str], None] | None = None, calibration=None,
                      alpha: float = 0.05) -> GenerativeDetectionResult:
    """Name the most likely teacher of `student` (a DiffusionModel) among `teachers` (generative teachers,
    usually CachedGenerativeTeacher). `feature_net` (kdd_jax.scores.images.FeatureNet) is needed for
    neg_lpips and the set scores; `captioner` for caption probes. With a `calibration` (independent
    reference diffusion models scored with the same settings: `kdd calibrate`), also test "none of
    the candidates" at level `alpha`, as for classifiers (kdd_jax/calibration.py)."""
    if not teachers:
        raise TeacherError("no candidate teachers given")
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise TeacherError(f"teacher names must be unique, got {names}")
    for t in teachers:
        if getattr(t, "output", None) != "images":
            raise TeacherError(f"teacher {t.name!r} is not generative (output {getattr(t, 'output', None)!r}); "
                               "a generative student needs teachers that answer images")
        if tuple(t.spec.noise_shape) != tuple(student.noise_shape) or tuple(t.spec.image_shape) != tuple(student.image_shape):
            raise TeacherError(f"teacher {t.name!r} takes noise {list(t.spec.noise_shape)} and answers images "
                               f"{list(t.spec.image_shape)}; the student {list(student.noise_shape)} -> "
                               f"{list(student.image_shape)}: the same x_T cannot be shared")
    if calibration is not None:  # before any work: a mismatch must not cost a sampling or a query
        from kdd_jax.calibration import generative_settings

        calibration.check_compatible(names, generative_settings(gc, feature_net))
    needs_net = gc.score in SET_SCORES or gc.score == "neg_lpips"
    if needs_net and feature_net is None:
        raise ValueError(f"score {gc.score!r} needs a feature network (feature_net=)")
    say = progress or (lambda msg: None)
    timings = {}
    t0 = time.perf_counter()
    req = make_probes(student, gc, captioner=captioner)
    say(f"probes: {gc.n} x {gc.probes}")
    s_images = student.generate(req.prompts, req.noise, req.seeds)
    timings["student"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    t_images, stats = {}, {}
    for t in teachers:
        s = getattr(t, "stats", None)
        before = {} if s is None else dataclasses.asdict(s)
        t_images[t.name] = np.asarray(t.generate(req), np.float32)
        after = {} if s is None else dataclasses.asdict(s)
        stats[t.name] = {"output": "images", **{k: v - before[k] for k, v in after.items()}}
        say(f"teacher {t.name}: {stats[t.name]}")
    timings["queries"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    per_probe = None
    if gc.score in SET_SCORES:
        from kdd_jax.scores import SCORES

        fn = SCORES[gc.score].fn
        X = jnp.asarray(feature_net.embedding(s_images))
        Y = jnp.stack([jnp.asarray(feature_net.embedding(t_images[n])) for n in names])

        def score_fn(idx):
            return jax.vmap(lambda y: fn(X[idx], y[idx]))(Y)
    elif gc.score in consensus_scores():
        if len(names) < 2:
            raise ValueError(f"score {gc.score!r} compares the student with the teachers' consensus: it needs at least "
                             "2 candidate teachers")
        per_probe = jnp.asarray(consensus_scores()[gc.score](s_images, np.stack([t_images[n] for n in names])))
        score_fn = pointwise_score_fn(per_probe)
    else:
        fn = pair_scores()[gc.score]
        per_probe = jnp.stack([jnp.asarray(fn(s_images, t_images[n], net=feature_net)) for n in names])
        score_fn = pointwise_score_fn(per_probe)
    verdict = decide(names, score_fn, gc.n, n_bootstrap=gc.n_bootstrap, seed=gc.seed, confidence=gc.confidence)
    none = None
    if calibration is not None:
        from kdd_jax.calibration import none_test

        none = none_test(names, verdict.scores, verdict.winner, calibration, alpha=alpha)
    timings["scoring"] = time.perf_counter() - t0
    return GenerativeDetectionResult(verdict, req, s_images, t_images, stats, timings, gc,
                                     None if per_probe is None else np.asarray(per_probe), none)


def save_generative_detection(out_dir, report: dict, result: GenerativeDetectionResult) -> dict:
    """verdict.json (last, atomically: its presence means the rest is complete), images.safetensors (the
    student's and every teacher's images, NHWC [0, 1], with the probe seeds) and report.html."""
    from pathlib import Path

    from kdd_jax.io import atomic_write_json, write_safetensors
    from kdd_jax.report import render_generative_report, write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"verdict": out / "verdict.json", "images": out / "images.safetensors", "report": out / "report.html"}
    tensors = {"student": result.student_images, "seeds": result.request.seeds,
               **{f"teacher/{k}": v for k, v in result.teacher_images.items()}}
    write_safetensors(paths["images"], tensors, metadata={"prompts": json.dumps(list(result.request.prompts)),
                                                          "probes": result.config.probes, "seed": str(result.config.seed)})
    write_report(paths["report"], render_generative_report(report, result))
    atomic_write_json(paths["verdict"], report)
    return paths
