"""The whole detection for one student: synthesise -> map -> query (cached) -> score -> decide.

    from kdd_jax.detect import DetectConfig, detect
    result = detect(student, student_config, cached_teachers, DetectConfig())
    result.verdict.winner
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdd_jax.calibration import Calibration, NoneTest, none_test, settings_of
from kdd_jax.models import predict_logits
from kdd_jax.scores import SCORES, log_probs_from
from kdd_jax.scores.pairs import score_pairs
from kdd_jax.synthesis import ProbeSet, SynthesisConfig, synthesize
from kdd_jax.synthesis.mapping import map_probes
from kdd_jax.teachers.base import TeacherError, TeacherOutput
from kdd_jax.verdict import Verdict, decide, pointwise_score_fn, verdict_record
from kdd_jax.versions import versions


@dataclasses.dataclass(frozen=True)
class DetectConfig:
    synthesis: SynthesisConfig = SynthesisConfig()
    # Dark-knowledge correlation per probe, averaged: on the Fashion-MNIST zoo it is at least as
    # accurate as the paper's KL on every probe set and 0.17-0.33 better wherever probes carry
    # signal (benchmarks/results/detection_accuracy.md). "neg_kl" is the paper's score as -KL
    # (its 1/(KL + eps), "inverse_kl", is heavy-tailed: one near-zero KL dominates the mean).
    # Label-only APIs need "top1". Every name in SCORES works.
    score: str = "dark_corr"
    direction: str = "teacher_student"
    temperature: float = 1.0
    n_bootstrap: int = 1000
    confidence: float = 0.95


@dataclasses.dataclass
class DetectionResult:
    verdict: Verdict
    probes: ProbeSet
    teacher_stats: dict[str, dict]
    timings: dict[str, float]
    config: DetectConfig
    none: NoneTest | None = None  # with a calibration: distilled from any candidate at all?
    per_probe: np.ndarray | None = None  # [K, N] per-probe scores (point-wise scores only)

    @property
    def answer(self) -> str:
        """The winner, or "none of the candidates" when a calibration says the winner's score is
        within what independent students reach."""
        return self.verdict.winner if self.none is None else self.none.answer

    def to_dict(self) -> dict:
        return {
            **verdict_record(self.verdict, self.none),
            "probes": {"n": int(len(self.probes.raw)), "sha256": self.probes.sha256,
                       "final_synthesis_loss": float(self.probes.loss_history[-1]) if len(self.probes.loss_history) else None},
            "teachers": self.teacher_stats,
            "timings_s": self.timings,
            "config": dataclasses.asdict(self.config),
            "seed": self.config.synthesis.seed,
            "versions": versions(),
        }


def teacher_log_probs(out: TeacherOutput, num_classes: int, temperature: float) -> jax.Array:
    values = {"logits": out.values, "probs": out.values, "topk": (out.indices, out.values), "labels": out.indices}[out.kind]
    return log_probs_from(out.kind, values, num_classes, temperature=temperature)


# Scores that read nothing but each answer's top class: comparable across teachers whatever API each answers through.
LABEL_SCORES = ("top1",)


def answer_detail(teacher) -> str:
    """How much of its distribution a teacher's API gives: "distribution" (logits and probabilities
    carry the same), "top-k (k=K)" or "labels"."""
    kind = teacher.output
    if kind in ("logits", "probs"):
        return "distribution"
    if kind == "topk":
        k = getattr(teacher, "k", None)
        k = getattr(getattr(teacher, "teacher", None), "k", None) if k is None else k  # a CachedTeacher's teacher
        if k is not None and k >= teacher.num_classes:  # every class's probability: a whole distribution
            return "distribution"
        return f"top-k (k={k})" if k is not None else "top-k"
    return kind


def check_comparable_answers(teachers: list, score: str) -> None:
    """TeacherError when `score` reads more of an answer than some teachers give: a label or top-k
    answer is completed by smoothing, so against full distributions it scores lower whatever the
    truth, and the verdict would follow the APIs, not the student. Checked before any work."""
    if score in LABEL_SCORES:
        return
    detail = {t.name: answer_detail(t) for t in teachers}
    if len(set(detail.values())) > 1:
        listed = ", ".join(f"{name}: {d}" for name, d in detail.items())
        raise TeacherError(f"the teachers answer with different detail ({listed}); score {score!r} compares whole "
                           "distributions, so a teacher whose API gives less would lose whatever the truth. Use a "
                           f"label-level score ({', '.join(LABEL_SCORES)}: --score top1) or query every teacher "
                           "through the same kind of answer")


def detect(model: nnx.Module, config, teachers: list, dc: DetectConfig, progress=None, *,
           calibration: Calibration | None = None, alpha: float = 0.05, pool=None,
           checkpoint_dir: str | Path | None = None) -> DetectionResult:
    """Name the most likely teacher of `model` among `teachers` (objects with name, output,
    num_classes, spec and query(); usually CachedTeacher).

    With a `calibration` (reference students known to be independent, see kdd_jax.calibration),
    also test whether the student was distilled from any candidate at all, at level `alpha`.
    `pool` (a synthesis.ImagePool) feeds the real-image baselines (methods real/ood/mia).
    `checkpoint_dir` makes synthesis resumable (see synthesis.synthesize)."""
    if not teachers:
        raise TeacherError("no candidate teachers given")
    if dc.score not in SCORES:
        raise ValueError(f"unknown score {dc.score!r}; available: {sorted(SCORES)}")
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise TeacherError(f"teacher names must be unique, got {names}")
    check_comparable_answers(teachers, dc.score)
    if calibration is not None:  # before any work: a mismatch must not cost a synthesis or a query
        calibration.check_compatible(names, settings_of(dc))
    num_classes = config.arch.num_classes
    for t in teachers:
        if t.num_classes != num_classes:
            raise TeacherError(f"teacher {t.name!r} has {t.num_classes} classes, the student {num_classes}")
    timings = {}
    t0 = time.perf_counter()
    probes = synthesize(model, config, dc.synthesis, progress, pool=pool, checkpoint_dir=checkpoint_dir)
    timings["synthesis"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    s_logits = predict_logits(model, probes.normalised) / dc.temperature
    logps, stats = [], {}
    for t in teachers:
        mapped = map_probes(probes.raw, config.preprocessing.value_range, t.spec, t.name)
        s = getattr(t, "stats", None)
        before = {} if s is None else dataclasses.asdict(s)
        out = t.query(mapped)
        logps.append(teacher_log_probs(out, num_classes, dc.temperature))
        # this detection's share: a teacher object's counters run on across detections (audits)
        after = {} if s is None else dataclasses.asdict(s)
        stats[t.name] = {"output": t.output, **{k: v - before[k] for k, v in after.items()}}
    timings["queries"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fn, kind, _ = SCORES[dc.score]
    Y = jnp.stack(logps)  # [K, N, C]
    per_probe = None
    if kind == "pointwise":
        opts = {"direction": dc.direction} if dc.score in ("inverse_kl", "neg_kl") else {}
        # (student, teacher) pairs split across every device; [K, N]
        per_probe = score_pairs(dc.score, jnp.broadcast_to(s_logits, Y.shape[:2] + s_logits.shape[-1:]), Y, **opts)
        score_fn = pointwise_score_fn(per_probe)
    else:
        X = jax.nn.log_softmax(s_logits, -1)

        def score_fn(idx):
            return jax.vmap(lambda y: fn(X[idx], y[idx]))(Y)

    verdict = decide(names, score_fn, len(probes.raw), n_bootstrap=dc.n_bootstrap,
                     seed=dc.synthesis.seed, confidence=dc.confidence)
    none = None
    if calibration is not None:
        none = none_test(names, verdict.scores, verdict.winner, calibration, alpha=alpha)
    timings["scoring"] = time.perf_counter() - t0
    return DetectionResult(verdict, probes, stats, timings, dc, none,
                           None if per_probe is None else np.asarray(per_probe))


def load_any_student(path: str | Path, what: str = "student"):
    """(model, config) from a `kdd convert` output directory or a student-format directory."""
    from kdd_jax.config import ConfigError
    from kdd_jax.io import CONVERTED_LAYOUT, load_converted

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    try:
        if (path / CONVERTED_LAYOUT["state"]).exists():
            model, config, _ = load_converted(path)
            return model, config
        from converters import convert_student  # same distribution; converts on the fly, no torch

        result = convert_student(path)
    except ValueError as e:  # ConfigError / CheckpointError / ConversionError name the file; say whose it is
        if what == "student" or str(e).startswith(what):
            raise
        raise type(e)(f"{what}: {e}") from None
    return result.model, result.config


def find_students(paths: list[str | Path]) -> list[tuple[str, object]]:
    """(name, source) for every student under `paths`, in a stable order: a `kdd convert` output
    directory or a diffusers folder (source: its Path), a directory of such, or student-format
    checkpoints (source: a converters StudentSource, converted on the fly). Raises ConfigError naming a path
    that holds no student."""
    from kdd_jax.config import ConfigError
    from kdd_jax.io import CONVERTED_LAYOUT

    def converted(d: Path) -> bool:
        return (d / CONVERTED_LAYOUT["state"]).is_dir() and (d / CONVERTED_LAYOUT["config"]).is_file()

    from kdd_jax.generative.pipeline import is_diffusion_folder

    found: list[tuple[str, object]] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"{p}: no such file or directory")
        if p.is_dir() and (converted(p) or is_diffusion_folder(p)):
            found.append((p.name, p))
            continue
        before = len(found)
        raw: list[Path] = [p] if p.is_file() else []
        if p.is_dir():
            for d in sorted(p.iterdir()):
                if d.is_dir() and (converted(d) or is_diffusion_folder(d)):
                    found.append((d.name, d))
                elif d.is_dir() or d.suffix == ".safetensors":
                    raw.append(d)
        if raw:
            from converters.student import discover  # same distribution; no torch

            try:
                found += [(s.name, s) for s in discover(raw)]
            except ValueError as e:  # stray folders beside converted students are fine, alone they are not
                if len(found) == before:
                    raise ConfigError(str(e)) from None
        if len(found) == before:
            raise ConfigError(f"{p}: holds no students (kdd convert outputs, model.safetensors checkpoints or diffusers folders)")
    names = [n for n, _ in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"student names must be unique, these repeat: {dup}")
    return found


def load_student_source(source) -> tuple[nnx.Module, object]:
    """(model, config) for a source from `find_students`."""
    if isinstance(source, Path):
        return load_any_student(source)
    from converters import convert_student

    result = convert_student(source)
    return result.model, result.config


def save_detection(out_dir: str | Path, report: dict, result: DetectionResult, calibration=None) -> dict[str, Path]:
    """Write a detection's artefacts atomically into `out_dir`: verdict.json (the full record),
    probes.safetensors (raw probes NCHW + their soft targets, sha256 in the metadata) and a
    self-contained report.html. Returns the paths written."""
    from kdd_jax.io import atomic_write_json, write_safetensors
    from kdd_jax.report import render_detect_report, write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"verdict": out / "verdict.json", "probes": out / "probes.safetensors", "report": out / "report.html"}
    write_safetensors(paths["probes"], {"raw": result.probes.raw, "targets": result.probes.targets},
                      metadata={"sha256_raw": result.probes.sha256, "method": result.config.synthesis.method,
                                "seed": str(result.config.synthesis.seed)})
    write_report(paths["report"], render_detect_report(report, result, calibration=calibration))
    # last: an existing verdict.json means every artefact is complete (kdd audit resumes on it)
    atomic_write_json(paths["verdict"], report)
    return paths
