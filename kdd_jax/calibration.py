""""None of the candidates": calibrate a verdict against reference students known to be independent.

The multiple-choice verdict always names somebody. To say "this student was distilled from none of
the candidates" (or, with one candidate, "not distilled from it") we need to know how high each
teacher's score gets for students that were NOT distilled from it. Reference students trained
without any of the candidate teachers, scored by exactly the same pipeline (same score, synthesis
method, probe count, steps, temperature, direction) against the same teachers, give that null
distribution per teacher: column k of `Calibration.scores` [M references, K teachers].

The test is conformal (split-conformal p-values): for the audited student's score s_k,

    p_k = (1 + #{references j : ref_jk >= s_k}) / (1 + M)

is a valid p-value for "independent of teacher k" whenever the audited student is exchangeable
with the references under that null (same kind of models trained the same way without the
teacher). Over K candidates, Bonferroni makes the answer valid for the whole set:
p_none = min(1, K * p_winner), and "none of the candidates" is the verdict when p_none > alpha.
Then the false-positive rate on independent students is at most alpha (under exchangeability).
With M references the smallest reachable p is 1/(M+1): fewer than K/alpha - 1 references can never
reject at level alpha, and the result says so instead of pretending.

The leave-one-out rate (each reference tested against the other M-1) is reported too: an empirical
false-positive rate of the rule on the references themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from kdd_jax.io import atomic_write_json
from kdd_jax.synthesis.probes import NEUTRAL_DEFAULTS, SynthesisConfig, ignored_settings
from kdd_jax.versions import versions

CALIBRATION_FORMAT = 1
# Settings a calibration is only valid for. The seed is not among them: references may use any seed.
MATCHED_FIELDS = ("score", "direction", "temperature", "synthesis.method", "synthesis.n_probes",
                  "synthesis.steps", "synthesis.lr", "synthesis.restarts", "synthesis.bn_weight",
                  "synthesis.ce_weight", "synthesis.tv_weight", "synthesis.l2_weight", "synthesis.mix_labels",
                  "synthesis.batch_size", "synthesis.z_dim", "synthesis.generator_width", "synthesis.init",
                  "synthesis.init_scale", "synthesis.jitter", "synthesis.flip", "synthesis.pixel_scale",
                  "synthesis.aug_noise")


# Generative detections (kdd_jax/generative/detect.py): their settings carry kind "generative"; a classifier
# calibration (no kind) is refused by them and the other way round.
GENERATIVE_FIELDS = ("kind", "generative.probes", "generative.n", "generative.score", "generative.feature_net")


def feature_net_in_use(gc, feature_net) -> str | None:
    """The fingerprint of the feature network a generative detection reads (its score's features or
    its caption prompts), None when it reads none: another network (or other LPIPS heads) gives
    other scores, so calibrations and finished audit records must match it."""
    from kdd_jax.generative.detect import SET_SCORES

    uses = gc.score in SET_SCORES or gc.score == "neg_lpips" or gc.probes == "caption"
    return feature_net.fingerprint if uses and feature_net is not None else None


def generative_settings(gc, feature_net=None) -> dict:
    """The GENERATIVE_FIELDS of a GenerativeDetectConfig and the feature network it reads (the seed
    is not among them)."""
    return {"kind": "generative", "generative.probes": gc.probes, "generative.n": gc.n, "generative.score": gc.score,
            "generative.feature_net": feature_net_in_use(gc, feature_net)}


_TOL = 1 + 1e-9  # k * (1/(m+1)) must compare equal to alpha when it is, despite rounding


class CalibrationError(ValueError):
    """A calibration file is unusable for this detection; the message names the field."""


def settings_of(detect_config) -> dict:
    """The MATCHED_FIELDS of a DetectConfig, flattened to 'a.b' keys, less the synthesis settings its
    method never reads: they cannot change its probes, so a calibration or audit record must match
    on them neither (records made before such settings were refused may hold any value there)."""
    d = dataclasses.asdict(detect_config)
    ignored = {f"synthesis.{n}" for n in ignored_settings(detect_config.synthesis.method)}
    out = {}
    for f in MATCHED_FIELDS:
        if f in ignored:
            continue
        v = d
        for part in f.split("."):
            v = v[part]
        out[f] = v
    return out


_MISSING = object()


def recorded_setting(recorded: dict, field: str):
    """A MATCHED_FIELDS value as a calibration or audit record states it. A record made before a
    synthesis setting existed lacks it; it was made with the setting's neutral value (NEUTRAL_DEFAULTS:
    the one that keeps the behaviour from before it existed) or, for a setting that has none, its
    default (which then keeps that behaviour), so old records stay usable."""
    if field in recorded:
        return recorded[field]
    if field.startswith("synthesis."):
        name = field[len("synthesis."):]
        if name in NEUTRAL_DEFAULTS:
            return NEUTRAL_DEFAULTS[name]
        default = {f.name: f.default for f in dataclasses.fields(SynthesisConfig)}.get(name, _MISSING)
        if default is not _MISSING:
            return default
    return None


@dataclasses.dataclass
class Calibration:
    teachers: list[str]
    references: list[str]
    scores: np.ndarray  # [M, K]: reference j's score against teacher k (higher = more teacher-like)
    settings: dict

    def __post_init__(self):
        self.scores = np.asarray(self.scores, np.float64)
        m, k = len(self.references), len(self.teachers)
        if m == 0:
            raise CalibrationError("a calibration needs at least one reference student")
        if self.scores.shape != (m, k):
            raise CalibrationError(f"calibration scores have shape {self.scores.shape}, expected ({m}, {k}) "
                                   "(references x teachers)")
        if len(set(self.teachers)) != k:
            raise CalibrationError(f"calibration teachers are not unique: {self.teachers}")
        if not np.all(np.isfinite(self.scores)):
            bad = [self.references[j] for j in np.unique(np.nonzero(~np.isfinite(self.scores))[0])]
            raise CalibrationError(f"calibration has non-finite scores for references {bad}")

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "teachers": self.teachers, "references": self.references,
                "scores": self.scores.tolist(), "settings": self.settings, "versions": versions()}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @staticmethod
    def load(path: str | Path) -> Calibration:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CalibrationError(f"{path}: cannot read calibration file: {e}") from None
        if not isinstance(d, dict) or d.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(f"{path}: not a kdd-jax calibration file (field 'format' must be {CALIBRATION_FORMAT})")
        for field, typ in (("teachers", list), ("references", list), ("scores", list), ("settings", dict)):
            if not isinstance(d.get(field), typ):
                raise CalibrationError(f"{path}: field {field!r} is missing or not a {typ.__name__}")
        try:
            return Calibration(d["teachers"], d["references"], np.asarray(d["scores"], np.float64), d["settings"])
        except (ValueError, TypeError) as e:
            raise CalibrationError(f"{path}: {e}") from None

    def check_compatible(self, teachers: list[str], settings: dict, source: str = "calibration") -> None:
        """Raise naming the first setting or teacher that differs from the detection's."""
        missing = [t for t in teachers if t not in self.teachers]
        if missing:
            raise CalibrationError(f"{source}: has no reference scores for teacher(s) {missing}; "
                                   f"it covers {self.teachers}")
        if settings.get("kind") != self.settings.get("kind"):
            made, used = (self.settings.get("kind") or "classifier"), (settings.get("kind") or "classifier")
            raise CalibrationError(f"{source}: was made for {made} students, this detection is for {used} students")
        for f in (*MATCHED_FIELDS, *GENERATIVE_FIELDS):
            if f in settings and recorded_setting(self.settings, f) != settings[f]:
                raise CalibrationError(f"{source}: was made with {f}={recorded_setting(self.settings, f)!r} but this detection "
                                       f"uses {f}={settings[f]!r}; re-run `kdd calibrate` with the same settings")

    def null(self, teachers: list[str]) -> np.ndarray:
        """[M, K'] reference scores for `teachers`, in that order."""
        return self.scores[:, [self.teachers.index(t) for t in teachers]]


@dataclasses.dataclass
class NoneTest:
    """Is the student distilled from any candidate at all?"""

    distilled: bool  # p_none <= alpha
    p_none: float  # Bonferroni over candidates: min(1, K * p_winner)
    p_per_teacher: dict[str, float]  # conformal p-value of "independent of teacher k"
    thresholds: dict[str, float | None]  # score above which teacher k alone is flagged at alpha/K; None: unreachable
    alpha: float
    n_references: int
    min_references: int  # M needed for any rejection at this alpha over K candidates
    leave_one_out_fpr: float | None  # share of references flagged when tested against the others
    answer: str  # the winner's name, or "none of the candidates"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def min_references(k: int, alpha: float) -> int:
    """Fewest references with which a student can be flagged at level alpha among k candidates:
    the smallest M with k / (M + 1) <= alpha."""
    return max(0, math.ceil(k / alpha - 1e-9) - 1)


def conformal_p(null: np.ndarray, s: float) -> float:
    """p = (1 + #{null >= s}) / (1 + M)."""
    return float((1 + np.sum(np.asarray(null) >= s)) / (1 + len(null)))


def threshold(null: np.ndarray, level: float) -> float | None:
    """Smallest score value that gets p <= level against `null`; None when no score can."""
    m = len(null)
    # p <= level  <=>  #{null >= s} <= level * (m + 1) - 1 =: r ; need r >= 0
    r = math.floor(level * (m + 1) + 1e-12) - 1
    if r < 0:
        return None
    srt = np.sort(np.asarray(null))[::-1]  # descending
    # s must exceed the (r+1)-th largest null value (strictly, since ties count as >=)
    return float(np.nextafter(srt[r], np.inf)) if r < m else float(-np.inf)


def none_test(teachers: list[str], scores: list[float], winner: str, calibration: Calibration, *,
              alpha: float = 0.05) -> NoneTest:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    null = calibration.null(teachers)
    m, k = null.shape
    p = {t: conformal_p(null[:, i], s) for i, (t, s) in enumerate(zip(teachers, scores))}
    p_none = min(1.0, k * p[winner])
    level = alpha / k
    thresholds = {t: threshold(null[:, i], level) for i, t in enumerate(teachers)}
    loo = None
    if m >= 2:
        flagged = 0
        for j in range(m):
            others = np.delete(null, j, axis=0)
            w = int(np.argmax(null[j]))
            flagged += min(1.0, k * conformal_p(others[:, w], null[j, w])) <= alpha * _TOL
        loo = flagged / m
    distilled = p_none <= alpha * _TOL
    return NoneTest(distilled, p_none, p, thresholds, alpha, m, min_references(k, alpha), loo,
                    winner if distilled else "none of the candidates")
