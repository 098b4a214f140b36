"""End to end: two teachers and a student distilled from one of them, trained in this test
(PyTorch, as real students are published), converted, probed, and the right teacher named.

This checks that the pipeline carries the signal when there is one: the student is distilled on
a transfer set of task images plus uniform-noise images, so uniform-noise probes (method "noise")
sit on what it was distilled on. Measured over 6 initialisations of this toy zoo (2026-11-23):
noise probes name teacher-a 6/6 with -KL (margins 0.41-0.93) and 6/6 with dark_corr (0.03-0.55).
Data-free pixel probes without noise (48 probes, 60 steps, aug_noise 0) name it only 5/6 with each
score, and which initialisation fails moved with the host's float rounding (the pinned one failed -KL
on a new CI host); under pixel's default noise (1.0) the pinned initialisation names teacher-b
(2026-11-24, one initialisation). So they are not asserted here: how often data-free detection is right is the benchmark's
question (issue 4), not a test's. Earlier measurements on this task: un-optimised pixel probes
(0 synthesis steps) named the WRONG teacher with p = 0.003, and the paper's 1/(KL + eps), ACS and
CKA did not separate the teachers (top-1 from a label-only API is too coarse at 48 probes: see below)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from kdd_jax.detect import DetectConfig, detect
from kdd_jax.synthesis import OPTIMISED_METHODS, SynthesisConfig
from kdd_jax.teachers import CachedTeacher, ResponseCache, flax_teacher

@pytest.fixture(scope="module")
def zoo(toy_zoo):
    """tests/toyzoo.py, built once per session."""
    return toy_zoo


def run(zoo, tmp_path, output="probs", score="neg_kl", seed=0, method="pixel"):
    cache = ResponseCache(tmp_path / "cache.sqlite")
    teachers = [CachedTeacher(flax_teacher(n, zoo[n].model, zoo[n].config, output=output), cache)
                for n in ("teacher-b", "teacher-a")]
    steps = {"steps": 60} if method in OPTIMISED_METHODS else {}  # noise optimises nothing and refuses steps
    dc = DetectConfig(synthesis=SynthesisConfig(method=method, n_probes=48, seed=seed, **steps), score=score,
                      n_bootstrap=300)
    s = zoo["student"]
    return detect(s.model, s.config, teachers, dc), teachers


@pytest.mark.parametrize("output, score", [("probs", "neg_kl"), ("logits", "neg_kl"), ("topk", "neg_kl"),
                                           ("probs", "dark_corr"), ("topk", "dark_corr")])
def test_detect_names_the_true_teacher(zoo, tmp_path, output, score):
    result, _ = run(zoo, tmp_path, output, score, method="noise")
    v = result.verdict
    assert v.winner == "teacher-a", v
    assert v.scores[v.teachers.index("teacher-a")] > v.scores[v.teachers.index("teacher-b")]


def test_label_only_teachers_run_end_to_end(zoo, tmp_path):
    """Label-only APIs are scored by top-1 agreement. With 48 probes that score is too coarse to
    name the teacher reliably on this toy zoo (measured across CI runs: 0.29 vs 0.46, then a tie
    0.375 vs 0.375), so only the plumbing is asserted here; accuracy belongs to the benchmark."""
    result, teachers = run(zoo, tmp_path, "labels", "top1")
    v = result.verdict
    assert sorted(v.teachers) == ["teacher-a", "teacher-b"] and all(0.0 <= s <= 1.0 for s in v.scores)
    assert all(t.stats.queries == 48 for t in teachers)
    assert all(s * 48 == pytest.approx(round(s * 48)) for s in v.scores)  # a fraction of probes agreeing


def test_teachers_answering_with_different_detail_need_a_label_level_score(zoo, tmp_path):
    """A label-only teacher's answers, smoothed to a distribution, score lower against a student's
    probabilities than a full-distribution teacher's whatever the truth: refused before any work for
    scores that read whole distributions, naming each teacher's API; top1 compares them; logits and
    probabilities carry the same and mix freely."""
    from kdd_jax.teachers.base import TeacherError

    cache = ResponseCache(tmp_path / "cache.sqlite")
    s = zoo["student"]

    def teachers(outputs):
        return [CachedTeacher(flax_teacher(n, zoo[n].model, zoo[n].config, output=o, k=3), cache)
                for n, o in zip(("teacher-a", "teacher-b"), outputs)]

    def config(score):
        return DetectConfig(synthesis=SynthesisConfig(method="noise", n_probes=16), score=score, n_bootstrap=50)

    for outputs, score, detail in [(("labels", "probs"), "dark_corr", "teacher-a: labels, teacher-b: distribution"),
                                   (("topk", "logits"), "neg_kl", "teacher-a: top-k (k=3), teacher-b: distribution")]:
        ts = teachers(outputs)
        with pytest.raises(TeacherError, match=rf"different detail \({re.escape(detail)}\); score '{score}'.*--score top1"):
            detect(s.model, s.config, ts, config(score))
        assert all(t.stats.queries == 0 for t in ts)  # refused before any query
    assert detect(s.model, s.config, teachers(("labels", "probs")), config("top1")).verdict.teachers == [
        "teacher-a", "teacher-b"]
    assert len(detect(s.model, s.config, teachers(("logits", "probs")), config("dark_corr")).verdict.scores) == 2


def test_rerun_is_free_and_identical(zoo, tmp_path):
    """The p-value's behaviour is unit-tested in test_verdict.py; how small it gets on this toy
    zoo varies with the zoo (measured 0.013 and 0.12 on two builds), so it is not asserted here."""
    first, _ = run(zoo, tmp_path)
    assert 0 < first.verdict.p_value <= 1
    lo, hi = first.verdict.intervals[first.verdict.teachers.index("teacher-a")]
    assert lo <= first.verdict.scores[first.verdict.teachers.index("teacher-a")] <= hi
    again, teachers = run(zoo, tmp_path)
    assert all(t.stats.queries == 0 for t in teachers)  # every answer came from the cache
    assert again.probes.sha256 == first.probes.sha256 and again.verdict == first.verdict
    assert np.array_equal(again.verdict.bootstrap, first.verdict.bootstrap)


def test_kdd_detect_cli_end_to_end(zoo, tmp_path, capsys):
    """The CLI end to end on noise probes, which carry this toy student's signal (module docstring); the
    default data-free pixel path is run for its plumbing only."""
    from pathlib import Path

    from kdd_jax.cli import main

    paths = {n: str(Path(zoo[n].report["source"]["weights"]).parent) for n in ("teacher-a", "teacher-b", "student")}
    tfile = tmp_path / "teachers.json"
    tfile.write_text(json.dumps({"teachers": [{"name": n, "path": paths[n], "output": "probs"} for n in ("teacher-b", "teacher-a")]}))
    argv = ["detect", "--student", paths["student"], "--teachers", str(tfile), "--probes", "48", "--method", "noise",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "-q"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "teacher-a" in table.splitlines()[1] and "most likely teacher" in table.splitlines()[1]
    report = json.loads((tmp_path / "out" / "verdict.json").read_text())
    assert report["verdict"]["winner"] == "teacher-a" and report["seed"] == 0 and len(report["probes"]["sha256"]) == 64
    assert report["teachers"]["teacher-a"]["queries"] == 48
    assert main(argv + ["--json"]) == 0  # second run: all from the cache
    again = json.loads(capsys.readouterr().out)
    assert again["teachers"]["teacher-a"]["queries"] == 0 and again["teachers"]["teacher-a"]["hits"] == 48
    assert again["verdict"] == report["verdict"]
    # noise optimises nothing: its progress line states no steps (and --steps 60 is refused); the default
    # method, pixel, states its steps and the noise its student sees
    assert main([*argv, "--steps", "60"]) == 1
    assert "steps=60: steps applies to the methods pixel, confidence and generator only" in capsys.readouterr().err
    pixel = [a for a in argv if a not in ("--method", "noise", "-q")]
    pixel[pixel.index("--out") + 1] = str(tmp_path / "pixel")
    assert main([*pixel, "--steps", "60"]) == 0
    assert "synthesising 48 probes (pixel, 60 steps, aug-noise 1, seed 0)" in capsys.readouterr().err
    assert json.loads((tmp_path / "pixel" / "verdict.json").read_text())["teachers"]["teacher-a"]["queries"] == 48
    # the report directory: a self-contained page and the exact probes, with their hash
    from kdd_jax.io import read_safetensors

    page = (tmp_path / "out" / "report.html").read_text()
    assert "Answer: <b>teacher-a</b>" in page and "<svg" in page and "data:image/png;base64," in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "<script" not in page
    tensors, meta = read_safetensors(tmp_path / "out" / "probes.safetensors")
    assert tensors["raw"].shape == (48, 1, 12, 12) and meta["sha256_raw"] == report["probes"]["sha256"]
    import hashlib

    assert hashlib.sha256(np.ascontiguousarray(tensors["raw"]).tobytes()).hexdigest() == report["probes"]["sha256"]


def test_calibrate_then_detect_none_of_the_candidates(zoo, tmp_path, capsys):
    """`kdd calibrate` on independent references, then `kdd detect --calibration`: the distilled
    student beats every reference on its teacher. With 3 references and 2 candidates the smallest
    reachable p is 2/4, so the test runs at alpha 0.5; the statistics are unit-tested in
    test_calibration.py. Noise probes: they carry this toy student's signal (module docstring)."""
    from pathlib import Path

    from kdd_jax.cli import main

    paths = {n: str(Path(zoo[n].report["source"]["weights"]).parent) for n in ("teacher-a", "teacher-b", "student")}
    tfile = tmp_path / "teachers.json"
    tfile.write_text(json.dumps({"teachers": [{"name": n, "path": paths[n], "output": "probs"} for n in ("teacher-b", "teacher-a")]}))
    common = ["--teachers", str(tfile), "--probes", "48", "--method", "noise", "--cache", str(tmp_path / "cache")]
    cal = tmp_path / "cal.json"
    broken = tmp_path / "broken" / "bad"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    # one broken reference: the others are scored and kept, nothing final is written, exit 1
    assert main(["calibrate", "--references", str(zoo["references"]), str(broken.parent), "--out", str(cal), "-q"] + common) == 1
    err = capsys.readouterr().err
    assert "bad" in err and "kept in" in err and not cal.exists()
    # drop it and re-run: the three references come from the partial file, nothing is recomputed
    assert main(["calibrate", "--references", str(zoo["references"]), "--out", str(cal)] + common) == 0
    err = capsys.readouterr().err
    assert "resuming: 3 reference(s)" in err and "at least 39 references are needed" in err
    calibration = json.loads(cal.read_text())
    assert calibration["references"] == ["ref0", "ref1", "ref2"] and calibration["teachers"] == ["teacher-b", "teacher-a"]
    assert not Path(str(cal) + ".partial").exists()

    out = tmp_path / "out"
    argv = ["detect", "--student", paths["student"], "--calibration", str(cal), "--alpha", "0.5", "-q"] + common
    assert main(argv + ["--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    none = report["none_of_the_candidates"]
    assert report["answer"] == "teacher-a" and none["distilled"] and none["p_per_teacher"]["teacher-a"] == 0.25
    assert "Calibration" in (out / "report.html").read_text()
    # binary mode: one candidate; and a settings mismatch is refused before any work
    assert main(argv + ["--teacher", "teacher-a"]) == 0
    assert "answer: teacher-a" in capsys.readouterr().out
    assert main(["detect", "--student", paths["student"], "--calibration", str(cal), "-q"] + common[:2]
                + ["--probes", "40"] + common[4:]) == 1
    assert "synthesis.n_probes=48 but this detection uses synthesis.n_probes=40" in capsys.readouterr().err


def test_kdd_detect_bad_teachers_file(zoo, tmp_path, capsys):
    from kdd_jax.cli import main

    student = str(json.loads(json.dumps(zoo["student"].report["source"]["weights"])))
    for content, message in [({"teachers": []}, "empty"), ({"teachers": [{"name": "x", "path": "/nonexistent"}]}, "does not exist"),
                             ({"teachers": [{"name": "x", "path": "a", "colour": 1}]}, "unknown field")]:
        f = tmp_path / "t.json"
        f.write_text(json.dumps(content))
        assert main(["detect", "--student", student.rsplit("/", 1)[0], "--teachers", str(f), "-q", "--cache", str(tmp_path)]) == 1
        assert message in capsys.readouterr().err
