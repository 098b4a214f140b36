"""The none-of-the-candidates test: conformal p-values against independent reference students."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdd_jax.calibration import (
    Calibration,
    CalibrationError,
    conformal_p,
    min_references,
    none_test,
    settings_of,
    threshold,
)
from kdd_jax.detect import DetectConfig
from kdd_jax.synthesis import SynthesisConfig


def calib(scores, teachers=None, settings=None):
    scores = np.asarray(scores, float)
    teachers = teachers or [f"t{k}" for k in range(scores.shape[1])]
    return Calibration(teachers, [f"ref{j}" for j in range(len(scores))], scores,
                       settings or settings_of(DetectConfig()))


def test_conformal_p_counts_references_at_or_above():
    null = np.array([0.1, 0.5, 0.5, 0.9])
    assert conformal_p(null, 1.0) == pytest.approx(1 / 5)
    assert conformal_p(null, 0.5) == pytest.approx(4 / 5)  # ties count against the student
    assert conformal_p(null, 0.0) == pytest.approx(5 / 5)


@pytest.mark.parametrize("m, level", [(19, 0.05), (40, 0.05), (99, 0.01), (10, 0.3), (5, 0.05)])
def test_threshold_is_the_boundary_of_rejection(m, level):
    null = np.random.default_rng(m).normal(size=m)
    t = threshold(null, level)
    if t is None:
        assert (m + 1) * level < 1  # even a score above every reference gets p = 1/(m+1) > level
        assert conformal_p(null, 1e9) > level
    else:
        assert conformal_p(null, t) <= level + 1e-12
        assert conformal_p(null, np.nextafter(t, -np.inf)) > level


@pytest.mark.parametrize("k", [1, 3])
def test_false_positive_rate_is_bounded_on_exchangeable_independent_students(k):
    """Independent students drawn from the same distribution as the references: flagged at most
    alpha of the time (the guarantee), measured over 3000 audits."""
    rng = np.random.default_rng(k)
    m, alpha, trials = 59, 0.05, 3000
    flagged = 0
    for _ in range(trials):
        sample = rng.normal(size=(m + 1, k)) * np.arange(1, k + 1)  # teachers on different scales
        cal = calib(sample[:m])
        scores = sample[m]
        winner = f"t{int(np.argmax(scores))}"  # argmax of raw scores, as detect() does
        flagged += none_test(cal.teachers, list(scores), winner, cal, alpha=alpha).distilled
    fpr = flagged / trials
    assert fpr <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials), fpr


def test_distilled_students_are_flagged_and_answer_names_the_winner():
    rng = np.random.default_rng(0)
    cal = calib(rng.normal(size=(59, 3)))
    res = none_test(cal.teachers, [0.0, 5.0, 0.1], "t1", cal, alpha=0.05)
    assert res.distilled and res.answer == "t1"
    assert res.p_per_teacher["t1"] == pytest.approx(1 / 60) and res.p_none == pytest.approx(3 / 60)
    assert res.thresholds["t1"] is not None and 5.0 >= res.thresholds["t1"]
    assert 0.0 <= res.leave_one_out_fpr <= 1.0
    weak = none_test(cal.teachers, [0.0, 0.2, 0.1], "t1", cal, alpha=0.05)
    assert not weak.distilled and weak.answer == "none of the candidates"


def test_too_few_references_can_never_flag_and_says_so():
    k, alpha = 3, 0.05
    need = min_references(k, alpha)
    assert need == 59  # 3 / (59 + 1) = 0.05
    few = calib(np.zeros((need - 1, k)))
    res = none_test(few.teachers, [1e6] * k, "t0", few, alpha=alpha)
    assert not res.distilled and res.min_references == need and res.thresholds == {t: None for t in few.teachers}
    enough = calib(np.zeros((need, k)))
    assert none_test(enough.teachers, [1e6] * k, "t0", enough, alpha=alpha).distilled


def test_binary_mode_is_one_candidate():
    cal = calib(np.arange(19, dtype=float)[:, None] * 0.1)  # 19 references: p can reach 1/20 = 0.05
    assert none_test(["t0"], [2.0], "t0", cal, alpha=0.05).distilled
    assert not none_test(["t0"], [1.8], "t0", cal, alpha=0.05).distilled  # equals the top reference


def test_subset_of_calibrated_teachers_uses_their_columns():
    cal = calib(np.array([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0]]))
    assert none_test(["t1"], [11.5], "t1", cal, alpha=0.5).p_per_teacher["t1"] == pytest.approx(2 / 4)


def test_save_load_roundtrip_and_compatibility_checks(tmp_path):
    cal = calib(np.random.default_rng(1).normal(size=(4, 2)), teachers=["a", "b"])
    path = tmp_path / "cal.json"
    cal.save(path)
    back = Calibration.load(path)
    assert back.teachers == ["a", "b"] and np.array_equal(back.scores, cal.scores) and back.settings == cal.settings
    back.check_compatible(["b"], settings_of(DetectConfig()))
    with pytest.raises(CalibrationError, match=r"teacher\(s\) \['c'\]"):
        back.check_compatible(["a", "c"], settings_of(DetectConfig()))
    other = settings_of(DetectConfig(synthesis=SynthesisConfig(n_probes=7)))
    with pytest.raises(CalibrationError, match="synthesis.n_probes=100.*synthesis.n_probes=7"):
        back.check_compatible(["a"], other)
    # the seed is not a calibrated setting: references may use any seed
    back.check_compatible(["a"], settings_of(DetectConfig(synthesis=SynthesisConfig(seed=5))))


@pytest.mark.parametrize("field, before, other", [("pixel_scale", 1, 2), ("aug_noise", 0.0, 0.5)])
def test_a_calibration_older_than_a_setting_counts_as_made_as_before_it(tmp_path, field, before, other):
    """A synthesis setting added after a calibration was made is absent from it: it was made with the
    value that reproduces the behaviour from before the setting existed (pixel_scale's default; for
    aug_noise 0, which pixel's default no longer is), so it matches detections at that value only."""
    cal = calib(np.random.default_rng(1).normal(size=(4, 2)), teachers=["a", "b"])
    cal.settings.pop(f"synthesis.{field}")
    cal.check_compatible(["a"], settings_of(DetectConfig(synthesis=SynthesisConfig(**{field: before}))))
    with pytest.raises(CalibrationError, match=f"synthesis.{field}={before} but this detection uses synthesis.{field}={other}"):
        cal.check_compatible(["a"], settings_of(DetectConfig(synthesis=SynthesisConfig(**{field: other}))))
    cal.settings.pop("score")  # a non-synthesis field was always recorded: its absence is a mismatch
    with pytest.raises(CalibrationError, match="score=None"):
        cal.check_compatible(["a"], settings_of(DetectConfig()))


def test_a_calibration_from_before_pixel_saw_noise_by_default_is_refused_at_the_new_default():
    """Pixel synthesis sees its probes under noise (aug_noise 1.0) by default: a calibration made before
    (no aug_noise recorded, or 0.0) holds other probes' scores and is refused, naming both values; it
    still serves detections that ask for aug_noise 0."""
    for recorded in (None, 0.0):
        cal = calib(np.random.default_rng(1).normal(size=(4, 2)), teachers=["a", "b"])
        assert cal.settings["synthesis.aug_noise"] == 1.0  # what a calibration at today's defaults records
        if recorded is None:
            cal.settings.pop("synthesis.aug_noise")
        else:
            cal.settings["synthesis.aug_noise"] = recorded
        with pytest.raises(CalibrationError, match="synthesis.aug_noise=0.0 but this detection uses synthesis.aug_noise=1.0"):
            cal.check_compatible(["a"], settings_of(DetectConfig()))
        cal.check_compatible(["a"], settings_of(DetectConfig(synthesis=SynthesisConfig(aug_noise=0))))


def test_settings_a_method_never_reads_are_not_matched():
    """A pool method ignores steps (and every optimisation setting): a calibration made before such
    settings were refused may state any value there, and still matches; the settings it reads do not."""
    mia = settings_of(DetectConfig(synthesis=SynthesisConfig(method="mia")))
    assert "synthesis.steps" not in mia and "synthesis.lr" not in mia and "synthesis.bn_weight" not in mia
    assert mia["synthesis.method"] == "mia" and mia["synthesis.n_probes"] == 100
    # confidence reads steps but not the BatchNorm prior; the generator reads it but not the pixel priors
    conf = settings_of(DetectConfig(synthesis=SynthesisConfig(method="confidence")))
    gen = settings_of(DetectConfig(synthesis=SynthesisConfig(method="generator")))
    assert "synthesis.steps" in conf and "synthesis.bn_weight" not in conf and "synthesis.tv_weight" in conf
    assert "synthesis.bn_weight" in gen and "synthesis.tv_weight" not in gen and "synthesis.z_dim" in gen
    old = calib(np.random.default_rng(1).normal(size=(4, 2)), teachers=["a", "b"],
                settings={**mia, "synthesis.steps": 60, "synthesis.lr": 0.1})  # as an earlier kdd calibrate wrote it
    old.check_compatible(["a"], mia)
    with pytest.raises(CalibrationError, match="synthesis.n_probes=100 but this detection uses synthesis.n_probes=50"):
        old.check_compatible(["a"], settings_of(DetectConfig(synthesis=SynthesisConfig(method="mia", n_probes=50))))
    with pytest.raises(CalibrationError, match="synthesis.method='mia' but this detection uses synthesis.method='ood'"):
        old.check_compatible(["a"], settings_of(DetectConfig(synthesis=SynthesisConfig(method="ood"))))


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read calibration file"),
    (json.dumps({"format": 99}), "field 'format'"),
    (json.dumps({"format": 1, "teachers": ["a"], "references": ["r"], "settings": {}}), "field 'scores'"),
    (json.dumps({"format": 1, "teachers": ["a"], "references": ["r"], "scores": [[1.0, 2.0]], "settings": {}}),
     "expected \\(1, 1\\)"),
    (json.dumps({"format": 1, "teachers": ["a", "a"], "references": ["r"], "scores": [[1.0, 2.0]], "settings": {}}),
     "not unique"),
    (json.dumps({"format": 1, "teachers": ["a"], "references": [], "scores": [], "settings": {}}), "at least one"),
])
def test_bad_calibration_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message) as e:
        Calibration.load(path)
    assert str(path) in str(e.value)


def test_non_finite_reference_scores_are_refused():
    with pytest.raises(CalibrationError, match="ref1"):
        calib([[0.0], [np.nan]])
