"""`kdd demo` end to end on a demo zoo made from the toy zoo: teachers served by `kdd serve`
subprocesses on loopback, students audited through the HTTP client, reports written. The bundled
zoo itself is exercised by the README's main command (tests/test_readme.py checks the command)."""

from __future__ import annotations

import json

from kdd_jax.cli import main
from kdd_jax.demo import DEMO_ZOO


def test_demo_serves_teachers_over_http_and_audits_every_student(toy_zoo, tmp_path, capsys):
    root = toy_zoo["root"]
    (root / "manifest.json").write_text(json.dumps({
        "teachers": [{"name": "teacher-b", "dir": "teacher-b", "output": "probs"},
                     {"name": "teacher-a", "dir": "teacher-a", "output": "probs"}],
        "students": [{"name": "student", "dir": "student", "teacher": "teacher-a", "description": "KD from teacher-a"},
                     {"name": "ref0", "dir": "references/ref0", "teacher": None, "description": "independent"}]}))
    out = tmp_path / "demo"
    assert main(["demo", "--zoo", str(root), "--out", str(out), "--probes", "48", "--steps", "60", "-q"]) == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0].split()[:3] == ["student", "trained", "as"]
    assert table[1].startswith("student") and "teacher-a" in table[1] and "correct" in table[1]
    assert table[2].startswith("ref0") and "WRONG" not in table[2]  # no true teacher: never marked
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["student"]: r for r in summary["rows"]}
    assert rows["student"]["answer"] == "teacher-a" and rows["student"]["correct"] is True
    assert rows["student"]["queries"] == 2 * 48  # both teachers answered over HTTP, every probe once
    entries = json.loads((out / "teachers.json").read_text())["teachers"]
    assert all(e["kind"] == "http" and e["url"].startswith("http://127.0.0.1:") for e in entries)
    for name in rows:
        assert "Answer:" in (out / "students" / name / "report.html").read_text()
    assert "students/student/report.html" in (out / "index.html").read_text()
    assert "report:" in captured.err


def test_demo_without_a_zoo_fails_clearly(tmp_path, capsys):
    assert main(["demo", "--zoo", str(tmp_path), "--out", str(tmp_path / "o"), "-q"]) == 1
    assert "no demo zoo here" in capsys.readouterr().err
    for content, message in [("{", "cannot read the demo manifest"), ("{}", "non-empty 'teachers'"),
                             (json.dumps({"teachers": [{"name": "t"}], "students": [{}]}), "teachers[0] lacks ['dir']"),
                             (json.dumps({"teachers": [{"name": "t", "dir": "nope"}],
                                          "students": [{"name": "s", "dir": "x", "description": "d"}]}),
                              "directory 'nope' not found")]:
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
    size = sum(p.stat().st_size for p in DEMO_ZOO.rglob("*") if p.is_file())
    assert size < 8 * 2**20, size  # "a few MB at most"
