"""`kdd demo` end to end on a demo zoo made from the toy zoo: teachers served by `kdd serve`
subprocesses on loopback, students audited through the HTTP client, reports written. The bundled
zoo itself is exercised by the README's main command (tests/test_readme.py checks the command)."""

from __future__ import annotations

import csv
import json

import numpy as np

from kdd_jax.cli import main
from kdd_jax.demo import DEMO_ZOO
from kdd_jax.io import read_safetensors, write_safetensors
from tests.toyzoo import task


def test_demo_serves_teachers_over_http_and_audits_every_student(toy_zoo, tmp_path, capsys):
    root = toy_zoo["root"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    (broken / "config.json").write_text("{}")
    zoo = tmp_path / "zoo"  # absolute model dirs: the session's toy zoo is left as it is
    zoo.mkdir()
    # the unlabelled auxiliary pool the default method (mia) picks probes from: fresh task images
    write_safetensors(zoo / "aux.safetensors", {"images": task(300, seed=4242)[0].numpy()})
    (zoo / "manifest.json").write_text(json.dumps({
        "pool": {"file": "aux.safetensors"},
        "teachers": [{"name": "teacher-b", "dir": str(root / "teacher-b"), "output": "probs"},
                     {"name": "teacher-a", "dir": str(root / "teacher-a"), "output": "probs"}],
        "students": [{"name": "student", "dir": str(root / "student"), "teacher": "teacher-a",
                      "description": "KD from teacher-a"},
                     {"name": "ref0", "dir": str(root / "references" / "ref0"), "teacher": None,
                      "description": "independent"},
                     {"name": "broken", "dir": str(broken), "teacher": "teacher-b", "description": "unreadable"}]}))
    out = tmp_path / "demo"
    # a broken student is reported (exit 1) and the others finish
    assert main(["demo", "--zoo", str(zoo), "--out", str(out), "--probes", "32", "-q"]) == 1
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0].split()[:3] == ["student", "trained", "as"]
    assert table[1].startswith("student") and "teacher-a" in table[1] and "correct" in table[1]
    assert table[2].startswith("ref0") and "WRONG" not in table[2]  # no true teacher: never marked
    assert table[3].startswith("broken") and "FAILED" in table[3]
    # the audit's summary, with the demo's provenance columns
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["student"]: r for r in summary["students"]}
    assert rows["student"]["answer"] == "teacher-a" and rows["student"]["correct"] is True
    assert rows["student"]["truth"] == "teacher-a" and rows["ref0"]["truth"] == "none" and rows["ref0"]["correct"] is None
    # both teachers answered over HTTP, every distinct probe once: the two students' filtered probes
    # come from one pool and overlap, and an image answered for one is not paid again for the other
    probes = [read_safetensors(out / "students" / n / "probes.safetensors")[0]["raw"] for n in rows]
    assert all(len(p) == 32 for p in probes)
    distinct = len(np.unique(np.concatenate(probes).reshape(64, -1), axis=0))
    assert sum(r["queries"] for r in rows.values()) == 2 * distinct
    assert summary["teachers"] == ["teacher-b", "teacher-a"] and summary["settings"]["synthesis.n_probes"] == 32
    assert summary["settings"]["synthesis.method"] == "mia" and summary["settings"]["score"] == "dark_corr"
    assert list(summary["failed"]) == ["broken"] and (out / "students" / "broken" / "error.json").is_file()
    table_csv = list(csv.DictReader((out / "summary.csv").read_text().splitlines()))
    assert list(table_csv[0])[-3:] == ["description", "truth", "correct"]
    assert [(r["student"], r["correct"]) for r in table_csv] == [("ref0", ""), ("student", "true")]
    entries = json.loads((out / "teachers.json").read_text())["teachers"]
    assert all(e["kind"] == "http" and e["url"].startswith("http://127.0.0.1:") for e in entries)
    for name in rows:
        assert "Answer:" in (out / "students" / name / "report.html").read_text()
    page = (out / "index.html").read_text()
    assert "students/student/report.html" in page and "<th>truth</th>" in page and "Failed (1)" in page
    assert "report:" in captured.err


def test_demo_without_a_zoo_fails_clearly(tmp_path, capsys):
    assert main(["demo", "--zoo", str(tmp_path), "--out", str(tmp_path / "o"), "-q"]) == 1
    assert "no demo zoo here" in capsys.readouterr().err
    # steps with a method that optimises nothing (the default, mia): refused before any server starts
    assert main(["demo", "--zoo", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "30", "-q"]) == 1
    assert "steps=30: steps applies to the methods pixel, confidence and generator only, not to 'mia'" in capsys.readouterr().err
    # so is a noise the method does not read (aug_noise belongs to the optimised methods)
    assert main(["demo", "--zoo", str(tmp_path), "--out", str(tmp_path / "o"), "--aug-noise", "0.5", "-q"]) == 1
    assert "aug_noise=0.5: aug_noise applies to the methods pixel, confidence and generator only" in capsys.readouterr().err
    for content, message in [("{", "cannot read the demo manifest"), ("{}", "non-empty 'teachers'"),
                             (json.dumps({"teachers": [{"name": "t"}], "students": [{}]}), "teachers[0] lacks ['dir']"),
                             (json.dumps({"teachers": [{"name": "t", "dir": "nope"}],
                                          "students": [{"name": "s", "dir": "x", "description": "d"}]}),
                              "directory 'nope' not found"),
                             (json.dumps({"teachers": [{"name": "t", "dir": "."}], "pool": "x.npz",
                                          "students": [{"name": "s", "dir": ".", "description": "d"}]}),
                              "'pool' must be an object"),
                             (json.dumps({"teachers": [{"name": "t", "dir": "."}],
                                          "students": [{"name": "s", "dir": ".", "description": "d"}]}),
                              "has none (no 'pool' entry); use --method pixel"),
                             (json.dumps({"teachers": [{"name": "t", "dir": "."}], "pool": {"file": "gone.npz"},
                                          "students": [{"name": "s", "dir": ".", "description": "d"}]}),
                              "pool file 'gone.npz' not found")]:
        (tmp_path / "manifest.json").write_text(content)
        assert main(["demo", "--zoo", str(tmp_path), "--out", str(tmp_path / "o"), "-q"]) == 1
        assert message in capsys.readouterr().err


def test_bundled_demo_zoo_is_complete():
    """Every model the bundled manifest names exists, with weights and config (no download needed)."""
    manifest = json.loads((DEMO_ZOO / "manifest.json").read_text())
    assert len(manifest["teachers"]) >= 3 and len(manifest["students"]) >= 4
    assert any(s["teacher"] is None for s in manifest["students"])  # an independent student
    for m in manifest["teachers"] + manifest["students"]:
        assert (DEMO_ZOO / m["dir"] / "model.safetensors").is_file() and (DEMO_ZOO / m["dir"] / "config.json").is_file()
    # the unlabelled pool of the default method loads for every bundled model
    from kdd_jax.config import load_config
    from kdd_jax.synthesis import ImagePool

    for m in manifest["students"]:
        pool = ImagePool.from_file(DEMO_ZOO / manifest["pool"]["file"], load_config(DEMO_ZOO / m["dir"] / "config.json"))
        assert len(pool.images) >= 500 and pool.labels is None
    size = sum(p.stat().st_size for p in DEMO_ZOO.rglob("*") if p.is_file())
    assert size < 8 * 2**20, size  # "a few MB at most"


def test_demo_pixel_takes_aug_noise(toy_zoo, tmp_path, capsys):
    """`kdd demo --method pixel --aug-noise 0` synthesises without pixel's default noise, and the summary,
    the audit's settings and the student's verdict record the value (and the default 1.0 without it)."""
    root = toy_zoo["root"]
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "manifest.json").write_text(json.dumps({
        "teachers": [{"name": "teacher-a", "dir": str(root / "teacher-a"), "output": "probs"},
                     {"name": "teacher-b", "dir": str(root / "teacher-b"), "output": "probs"}],
        "students": [{"name": "student", "dir": str(root / "student"), "teacher": "teacher-a",
                      "description": "KD from teacher-a"}]}))
    seen = {}
    for flag, expected in (["--aug-noise", "0"], 0.0), ([], 1.0):
        out = tmp_path / f"demo{expected:g}"
        assert main(["demo", "--zoo", str(zoo), "--out", str(out), "--method", "pixel", "--steps", "3",
                     "--probes", "8", "--json", "-q", *flag]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["settings"]["aug_noise"] == expected and printed["settings"]["steps"] == 3
        assert json.loads((out / "summary.json").read_text())["settings"]["synthesis.aug_noise"] == expected
        verdict = json.loads((out / "students" / "student" / "verdict.json").read_text())
        assert verdict["config"]["synthesis"]["aug_noise"] == expected
        seen[expected] = read_safetensors(out / "students" / "student" / "probes.safetensors")[0]["raw"]
    assert not np.array_equal(seen[0.0], seen[1.0])  # same seed, same start: only the noise differs
