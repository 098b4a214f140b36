"""`kdd audit` / kdd_jax.audit: many students against the same teachers, resumable, split across
processes. Runs on the session's toy zoo (tests/toyzoo.py): the distilled student plus three
independent references audited against teacher-a and teacher-b. Every audit here uses the same
settings (SETTINGS, also tests/test_demo.py's), so the synthesis compiles once per session."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kdd_jax.audit import AuditError, _student_dir, partition
from kdd_jax.cli import main

SETTINGS = ["--probes", "32", "--steps", "20"]


@pytest.fixture()
def setup(toy_zoo, tmp_path):
    paths = {n: str(Path(toy_zoo[n].report["source"]["weights"]).parent) for n in ("teacher-a", "teacher-b", "student")}
    tfile = tmp_path / "teachers.json"
    tfile.write_text(json.dumps({"teachers": [{"name": n, "path": paths[n], "output": "probs"}
                                              for n in ("teacher-a", "teacher-b")]}))
    students = [paths["student"], str(toy_zoo["references"])]
    common = ["--teachers", str(tfile), "--cache", str(tmp_path / "cache"), *SETTINGS, "-q"]
    return {"students": students, "common": common, "out": tmp_path / "audit", "tmp": tmp_path}


def run_audit(setup, *extra, students=None):
    return main(["audit", "--students", *(students or setup["students"]), "--out", str(setup["out"]),
                 *setup["common"], *extra])


def test_partition_is_round_robin_disjoint_and_order_free():
    names = [f"s{i:02d}" for i in range(11)]
    shares = [partition(names[::-1], p, 3) for p in range(3)]
    assert sorted(sum(shares, [])) == names and shares[0] == ["s00", "s03", "s06", "s09"]
    assert {len(s) for s in shares} == {3, 4}
    assert partition(names, 0, 1) == names
    with pytest.raises(AuditError, match="outside"):
        partition(names, 3, 3)


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\\b"])
def test_student_names_cannot_escape_the_output_folder(tmp_path, bad):
    with pytest.raises(AuditError, match="folder name"):
        _student_dir(tmp_path, bad)


def test_audit_names_the_distilled_students_teacher(setup, capsys):
    """Attribution through the whole audit path, on uniform-noise probes: half of the toy student's
    transfer set, where the signal is there by construction (tests/test_detect.py). The pixel probes
    of the run below name it on 5 of 6 toy-zoo initialisations only, and which one fails depends on
    the host's float rounding, so that run asserts the bookkeeping, not the answer."""
    i = setup["common"].index("--steps")  # noise optimises nothing and refuses --steps
    common = setup["common"][:i] + setup["common"][i + 2:]
    assert main(["audit", "--students", setup["students"][0], "--out", str(setup["out"]), *common,
                 "--json", "--method", "noise"]) == 0
    rows = {r["student"]: r for r in json.loads(capsys.readouterr().out)["students"]}
    assert list(rows) == ["student"] and rows["student"]["answer"] == "teacher-a"
    assert rows["student"]["scores"]["teacher-a"] > rows["student"]["scores"]["teacher-b"]
    # noise records no steps; a record written before unread settings were refused (it held steps=20)
    # is resumed, not refused: steps never changed noise probes
    path = setup["out"] / "students" / "student" / "verdict.json"
    rec = json.loads(path.read_text())
    assert "synthesis.steps" not in rec["audit_settings"] and rec["audit_settings"]["synthesis.method"] == "noise"
    rec["audit_settings"]["synthesis.steps"] = 20
    path.write_text(json.dumps(rec))
    assert main(["audit", "--students", setup["students"][0], "--out", str(setup["out"]), *common,
                 "--json", "--method", "noise", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == ["student"]


def test_audit_end_to_end_summary_and_resume(setup, capsys):
    assert run_audit(setup, "--json") == 0
    first = json.loads(capsys.readouterr().out)
    out = setup["out"]
    rows = {r["student"]: r for r in first["students"]}
    assert sorted(rows) == ["ref0", "ref1", "ref2", "student"] and first["failed"] == {}
    assert {r["answer"] for r in rows.values()} <= {"teacher-a", "teacher-b"}  # attribution: the test below
    assert first["queries"] == 4 * 2 * 32  # students x teachers x probes, each paid once
    assert all(r["queries"] == 2 * 32 for r in rows.values())  # each record counts its own queries only
    for name in rows:
        d = out / "students" / name
        assert (d / "verdict.json").is_file() and (d / "report.html").is_file() and (d / "probes.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"students": 4, "finished": 4, "failed": 0}
    assert summary["settings"]["synthesis.steps"] == 20 and summary["teachers"] == ["teacher-a", "teacher-b"]
    assert sum(summary["answers"].values()) == 4 and "versions" in summary
    table = list(csv.reader((out / "summary.csv").read_text().splitlines()))
    assert table[0][-2:] == ["teacher-a", "teacher-b"] and len(table) == 5
    by_name = {r[0]: r for r in table[1:]}
    assert float(by_name["student"][-2]) == pytest.approx(rows["student"]["scores"]["teacher-a"], rel=1e-5)
    page = (out / "index.html").read_text()
    assert all(f"students/{n}/report.html" in page for n in rows) and "<script" not in page

    # an existing audit is never overwritten by accident
    assert run_audit(setup) == 1
    assert "already holds an audit" in capsys.readouterr().err
    # --resume: everything is finished, nothing is recomputed or re-queried, same summary
    assert run_audit(setup, "--resume", "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert sorted(again["skipped"]) == sorted(rows) and again["queries"] == 0 and again["students"] == first["students"]
    # other settings in the same folder are refused, naming the field, before any work
    assert main(["audit", "--students", *setup["students"], "--out", str(out), *setup["common"][:-5],
                 "--probes", "32", "--steps", "21", "-q", "--resume"]) == 1
    assert "synthesis.steps" in capsys.readouterr().err


def test_interrupted_student_is_redone_from_cache_and_checkpoint(setup, capsys):
    assert run_audit(setup, "--json") == 0
    first = {r["student"]: r for r in json.loads(capsys.readouterr().out)["students"]}
    # a crash after ref1's synthesis and queries but before its verdict was written
    (setup["out"] / "students" / "ref1" / "verdict.json").unlink()
    assert run_audit(setup, "--resume", "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert sorted(again["skipped"]) == ["ref0", "ref2", "student"]
    assert again["queries"] == 0  # its probes were rebuilt identically and every answer was in the cache
    redone = {r["student"]: r for r in again["students"]}
    assert redone["ref1"]["queries"] == 0 and first["ref1"]["queries"] == 2 * 32
    strip = lambda rows: {n: {k: v for k, v in r.items() if k != "queries"} for n, r in rows.items()}  # noqa: E731
    assert strip(redone) == strip(first)  # the same verdicts, to the last digit


def test_redo_stale_redoes_a_student_made_with_other_settings(setup):
    """kdd demo's mode: its folder is its own, so a record made with other settings is redone, not refused."""
    from kdd_jax.audit import audit
    from kdd_jax.cli import _detect_config, _open_teachers, build_parser
    from kdd_jax.detect import find_students

    def args_for(*extra):
        return build_parser().parse_args(["audit", "--students", setup["students"][0], "--out", str(setup["out"]),
                                          *setup["common"], *extra])

    args = args_for()
    students, teachers = find_students(args.students), _open_teachers(args)  # the distilled student alone
    assert audit(students, teachers, _detect_config(args), args.out).queries == 2 * 32
    other = _detect_config(args_for("--steps", "21"))
    with pytest.raises(AuditError, match="synthesis.steps"):
        audit(students, teachers, other, args.out, resume=True)
    again = audit(students, teachers, other, args.out, resume=True, redo_stale=True)
    assert again.skipped == [] and [r["student"] for r in again.rows] == ["student"] and again.failed == {}
    assert again.queries == 2 * 32  # new probes, so new answers
    rec = json.loads((setup["out"] / "students" / "student" / "verdict.json").read_text())
    assert rec["audit_settings"]["synthesis.steps"] == 21


def test_a_broken_student_is_reported_and_the_others_finish(setup, capsys):
    broken = setup["tmp"] / "more" / "broken"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    (broken / "config.json").write_text("{}")
    assert run_audit(setup, "--json", students=[*setup["students"], str(broken.parent)]) == 1
    res = json.loads(capsys.readouterr().out)
    assert list(res["failed"]) == ["broken"] and len(res["students"]) == 4
    err = json.loads((setup["out"] / "students" / "broken" / "error.json").read_text())["error"]
    assert "broken" in err or "config" in err
    assert "broken" in json.loads((setup["out"] / "summary.json").read_text())["failed"]
    assert "Failed (1)" in (setup["out"] / "index.html").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_shares_meet_at_the_barrier_and_process_0_summarises_both(setup):
    """The multi-process protocol in one process: two threads stand in for the processes (a
    threading barrier for JAX's), each with its own teachers over the shared cache file. Each
    audits its share of the students in the shared folder; only process 0 writes the summary, and
    it covers both shares. The real runtime is the slow test below."""
    import threading

    import jax

    from kdd_jax.audit import audit
    from kdd_jax.cli import _detect_config, _open_teachers, build_parser
    from kdd_jax.detect import find_students

    args = build_parser().parse_args(["audit", "--students", *setup["students"], "--out", str(setup["out"]),
                                      *setup["common"]])
    students, dc = find_students(args.students), _detect_config(args)
    barrier = threading.Barrier(2, timeout=300)
    results = {}

    def process(i):
        try:
            with jax.default_matmul_precision("highest"):  # the session's setting (a thread-local context)
                results[i] = audit(students, _open_teachers(args), dc, args.out, process_index=i, process_count=2,
                                   barrier=barrier.wait)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e
            barrier.abort()

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not any(isinstance(r, BaseException) for r in results.values()), results
    assert results[1].rows == [] and results[1].out is None  # process 1 writes no summary
    assert sorted(r["student"] for r in results[0].rows) == ["ref0", "ref1", "ref2", "student"]
    assert results[0].failed == {} and (setup["out"] / "summary.json").is_file()
    # disjoint shares over one cache: each process paid for its own two students only
    assert results[0].queries == results[1].queries == 2 * 2 * 32


@pytest.mark.slow  # two fresh interpreters import JAX and compile everything: ~25 s on 2 cores
def test_two_processes_split_the_students_and_process_0_writes_the_summary(setup):
    """JAX's multi-process runtime on loopback (2 CPU processes, gloo): each audits half the
    students; they share the output folder and response cache; process 0 writes the summary."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    base = [sys.executable, "-m", "kdd_jax.cli", "audit", "--students", *setup["students"], "--out", str(setup["out"]),
            *setup["common"], "--json", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen([*base, "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [[l for l in o[1].splitlines() if "rror" in l or "audit" in l][-5:] for o in outs]
    summary = json.loads(outs[0][0])
    assert sorted(r["student"] for r in summary["students"]) == ["ref0", "ref1", "ref2", "student"]
    assert outs[1][0].strip() == ""  # only process 0 reports
    # each process paid for its own half: the shares are disjoint, so no answer was bought twice
    done = {n: json.loads((setup["out"] / "students" / n / "verdict.json").read_text()) for n in
            ["ref0", "ref1", "ref2", "student"]}
    assert sum(sum(t["queries"] for t in d["teachers"].values()) for d in done.values()) == 4 * 2 * 32
    assert summary["queries"] == 2 * 2 * 32  # process 0's share: 2 students x 2 teachers x 32 probes


def test_audit_scaling_benchmark_smoke(tmp_path):
    """benchmarks/audit_scaling.py end to end at toy size (its numbers come from the full run)."""
    from benchmarks import audit_scaling

    assert audit_scaling.main(["--students", "2,3", "--devices", "", "--out", str(tmp_path), "--tag", "smoke"]) == 0
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["students"] for r in doc["audit"]] == [2, 3]
    assert all(r["finished"] == r["students"] and r["failed"] == 0 for r in doc["audit"])
    assert all(r["queries"] == r["students"] * 2 * 16 for r in doc["audit"])  # students x teachers x probes
    assert doc["audit"][1]["per_student_s_mean"] > 0 and "| 3 |" in (tmp_path / "smoke.md").read_text()


@pytest.mark.parametrize("field, before, other", [("pixel_scale", 1, 2), ("aug_noise", 0.0, 0.5)])
def test_a_record_older_than_a_setting_is_reused_as_made_before_it(tmp_path, field, before, other):
    """Records from before a synthesis setting existed lack it; they were made with the value that
    reproduces the behaviour from before it (pixel_scale's default; aug_noise 0, no longer pixel's default)."""
    from kdd_jax.audit import finished_record, record_settings
    from kdd_jax.detect import DetectConfig
    from kdd_jax.synthesis import SynthesisConfig

    expected = record_settings(DetectConfig(synthesis=SynthesisConfig(**{field: before})), ["t1", "t2"])
    old = {k: v for k, v in expected.items() if k != f"synthesis.{field}"}
    d = _student_dir(tmp_path, "s")
    d.mkdir(parents=True)
    (d / "verdict.json").write_text(json.dumps({"audit_settings": old, "answer": "t1"}))
    assert finished_record(tmp_path, "s", expected)["answer"] == "t1"
    changed = record_settings(DetectConfig(synthesis=SynthesisConfig(**{field: other})), ["t1", "t2"])
    with pytest.raises(AuditError, match=f"synthesis.{field}={before}, this audit uses synthesis.{field}={other}"):
        finished_record(tmp_path, "s", changed)
    if field == "aug_noise":  # today's pixel default sees noise: the old record is not reused for it
        with pytest.raises(AuditError, match="synthesis.aug_noise=0.0, this audit uses synthesis.aug_noise=1.0"):
            finished_record(tmp_path, "s", record_settings(DetectConfig(), ["t1", "t2"]))
