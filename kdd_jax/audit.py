"""Bulk audits: every student in a folder (or list) against the same candidate teachers.

    from kdd_jax.audit import audit
    summary = audit(find_students(["zoo/students"]), cached_teachers, DetectConfig(), "runs/audit")

Each student is one `detect` (synthesise -> query through the shared response cache -> score ->
decide) whose artefacts go to OUT/students/<name>/ (verdict.json, report.html, probes.safetensors;
verdict.json is written last, so it marks a finished student). A re-run with `resume=True` skips
finished students made with the same settings and teachers, resumes a student's interrupted
synthesis from its checkpoint, and retries failed ones: a crash loses at most the student in
flight. The summary (OUT/summary.json, summary.csv, index.html: score matrix, answers, margins,
p-values) is rebuilt from the per-student records, so it is always consistent with them; a caller
that knows more about each student (`kdd demo`: its true teacher) adds columns with `extra_columns`.

Scale-out: with `process_count > 1` (JAX's multi-process runtime, `init_distributed`), process p
audits students p, p + P, p + 2P, ... of the sorted list; all processes share the output folder
and the response cache (SQLite, WAL: safe across processes), so an answer paid for by one process
is never paid again by another. After a barrier, process 0 alone writes the summary.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdd_jax.calibration import recorded_setting, settings_of
from kdd_jax.io import atomic_write_bytes, atomic_write_json


class AuditError(ValueError):
    """Bad audit input or an output folder made with other settings (names the student and field)."""


@dataclasses.dataclass
class AuditSummary:
    rows: list[dict]  # one per student: name, answer, winner, margin, p_value, p_none, scores {teacher: s}
    failed: dict[str, str]  # student -> error message
    skipped: list[str]  # finished in an earlier run (resume)
    teachers: list[str]
    seconds: float
    queries: int  # new teacher queries this process paid for
    out: Path | None = None


def partition(names: list[str], process_index: int, process_count: int) -> list[str]:
    """This process's share of the students: round-robin over the sorted names, so shares differ
    in size by at most one and do not depend on the order they were listed in."""
    if not 0 <= process_index < process_count:
        raise AuditError(f"process index {process_index} outside 0..{process_count - 1}")
    return sorted(names)[process_index::process_count]


def _generative(dc) -> bool:
    from kdd_jax.generative.detect import GenerativeDetectConfig

    return isinstance(dc, GenerativeDetectConfig)


def record_settings(dc, teachers: list[str], feature_net=None) -> dict:
    """What a finished student's record must match to be reused: detection settings, the seed and
    the candidate teachers (a verdict among other candidates answers another question); for a
    generative detection also the feature network it reads."""
    if _generative(dc):  # every field of a generative detection's config, the seed included
        from kdd_jax.calibration import feature_net_in_use

        return {**{f"generative.{k}": v for k, v in dataclasses.asdict(dc).items()},
                "generative.feature_net": feature_net_in_use(dc, feature_net), "teachers": list(teachers)}
    return {**settings_of(dc), "synthesis.seed": dc.synthesis.seed, "n_bootstrap": dc.n_bootstrap,
            "confidence": dc.confidence, "teachers": list(teachers)}


def _student_dir(out: Path, name: str) -> Path:
    # names come from file names; refuse anything that could leave the output folder
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise AuditError(f"student name {name!r} cannot be used as a folder name")
    return out / "students" / name


def finished_record(out: Path, name: str, expected: dict) -> dict | None:
    """The student's verdict.json when it is finished with `expected` settings; None when there is
    none (or it is unreadable: it is then redone). Raises AuditError when it was made with other
    settings, naming the field: mixing settings in one audit would make its summary meaningless."""
    path = _student_dir(out, name) / "verdict.json"
    try:
        rec = json.loads(path.read_text())
        got = rec["audit_settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for k, v in expected.items():
        if recorded_setting(got, k) != v:
            raise AuditError(f"{path}: made with {k}={recorded_setting(got, k)!r}, this audit uses {k}={v!r}; use another --out "
                             "or delete that student's folder to redo it")
    return rec


def _queries(teachers: list) -> int:
    """New queries the teachers have sent so far (CachedTeacher stats; plain teachers count 0)."""
    return sum(t.stats.queries for t in teachers if getattr(t, "stats", None) is not None)


def _row(name: str, rec: dict) -> dict:
    v = rec["verdict"]
    none = rec.get("none_of_the_candidates") or {}
    return {"student": name, "answer": rec["answer"], "winner": v["winner"], "runner_up": v["runner_up"],
            "margin": v["margin"], "p_value": v["p_value"], "p_none": none.get("p_none"),
            "scores": dict(zip(v["teachers"], v["scores"])),
            "queries": sum(int(t.get("queries", 0)) for t in rec.get("teachers", {}).values())}


def audit(students: list[tuple[str, object]], teachers: list, dc, out: str | Path, *, calibration=None,
          alpha: float = 0.05, pool_for: Callable | None = None, resume: bool = False, redo_stale: bool = False,
          process_index: int = 0,
          process_count: int = 1, barrier: Callable[[], None] | None = None,
          log: Callable[[str], None] | None = None, synthesis_progress: Callable | None = None,
          extra_columns: Callable[[dict], dict] | None = None, feature_net=None,
          captioner: Callable | None = None) -> AuditSummary:
    """Detect the teacher of every student in `students` ((name, source) pairs from
    `detect.find_students`) among `teachers` (CachedTeacher objects sharing one ResponseCache).

    `pool_for(config)` gives the image pool of the real-image methods. Without `resume`, an output
    folder that already holds student records is refused (nothing is overwritten by accident); with
    it, a student finished with other settings is refused too, or redone with `redo_stale` (for a
    folder that is the caller's own, like `kdd demo`'s).
    A student that fails (bad file, teacher error) is recorded in its folder's error.json and the
    audit goes on; the summary lists it. `barrier()` is called before process 0 writes the
    summary (multi-process runs); `log` gets progress lines (overall and per student, ETA,
    queries spent). `barrier` is also called once before any work, after the output folder
    check, so no process sees another's first results as an existing audit. `extra_columns`: see
    `write_summary`.

    Generative students (diffusers folders) are audited when `dc` is a GenerativeDetectConfig, against
    generative teachers (CachedGenerativeTeacher), with `feature_net` / `captioner` as in
    `detect_generative` (a calibration must then be one made for generative students)."""
    from kdd_jax.detect import check_comparable_answers, detect, load_student_source, save_detection
    from kdd_jax.generative.detect import detect_generative, save_generative_detection
    from kdd_jax.generative.pipeline import load_diffusion
    from kdd_jax.generative.samplers import SamplingError
    from kdd_jax.synthesis import SynthesisError
    from kdd_jax.teachers import QueryBudgetExceeded, TeacherError
    from kdd_jax.config import ConfigError, to_json_dict

    out = Path(out)
    names = [n for n, _ in students]
    if not names:
        raise AuditError("no students to audit")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AuditError(f"student names must be unique, these repeat: {dup}")
    for n in names:
        _student_dir(out, n)
    teacher_names = [t.name for t in teachers]
    generative = _generative(dc)
    if not generative:  # once for the run, before any student: every student would fail on it
        check_comparable_answers(teachers, dc.score)
    if calibration is not None:  # before any work: a mismatch must not cost a synthesis or a query
        from kdd_jax.calibration import generative_settings

        calibration.check_compatible(teacher_names, generative_settings(dc, feature_net) if generative else settings_of(dc))
    expected = record_settings(dc, teacher_names, feature_net)
    if not resume and (out / "students").is_dir() and any((out / "students").iterdir()):
        raise AuditError(f"{out} already holds an audit; pass resume=True (--resume) to continue it, or use another folder")
    if barrier is not None:  # every process has looked at the folder before any writes to it
        barrier()
    mine = partition(names, process_index, process_count)
    sources = dict(students)
    log = log or (lambda _msg: None)
    started = time.perf_counter()
    queries0 = _queries(teachers)
    skipped, failed, todo = [], {}, []
    for name in mine:
        try:
            done = finished_record(out, name, expected) is not None
        except AuditError:
            if not redo_stale:
                raise
            (_student_dir(out, name) / "verdict.json").unlink()  # no longer a finished student
            done = False
        (skipped if done else todo).append(name)
    if skipped:
        log(f"resume: {len(skipped)} of {len(mine)} student(s) already finished, {len(todo)} to go")
    times = []
    for i, name in enumerate(todo):
        sdir = _student_dir(out, name)
        spent = _queries(teachers) - queries0
        eta = "" if not times else f", ETA {np.mean(times) * (len(todo) - i):.0f}s"
        log(f"[{i + 1}/{len(todo)}] {name}: elapsed {time.perf_counter() - started:.0f}s{eta}, "
            f"{spent} new queries so far")
        t0 = time.perf_counter()
        try:
            if generative:
                student = load_diffusion(sources[name], name=name)
                result = detect_generative(student, teachers, dc, feature_net=feature_net, captioner=captioner,
                                           calibration=calibration, alpha=alpha)
                extra = {"kind": "generative", "sampling": dataclasses.asdict(student.sampling)}
            else:
                model, config = load_student_source(sources[name])
                result = detect(model, config, teachers, dc, synthesis_progress, calibration=calibration, alpha=alpha,
                                pool=None if pool_for is None else pool_for(config),
                                checkpoint_dir=sdir / "synthesis-checkpoint")
                # the report's probe grid needs the value range
                extra = {"preprocessing": to_json_dict(config.preprocessing)}
        except (ConfigError, TeacherError, SynthesisError, SamplingError, QueryBudgetExceeded, ValueError, OSError) as e:
            failed[name] = f"{type(e).__name__}: {e}"
            sdir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(sdir / "error.json", {"student": name, "error": failed[name]})
            log(f"  {name} FAILED: {failed[name]}")
            continue
        report = {"command": "audit", "student": name, "source": str(sources[name]),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result.to_dict(), **extra,
                  "audit_settings": expected}
        if generative:
            save_generative_detection(sdir, report, result)
        else:
            save_detection(sdir, report, result, calibration)
        (sdir / "error.json").unlink(missing_ok=True)
        times.append(time.perf_counter() - t0)
        v = result.verdict
        log(f"  {name}: {result.answer} (margin {v.margin:.4f}, bootstrap p {v.p_value:.3g}, "
            f"{times[-1]:.1f}s)")
    queries = _queries(teachers) - queries0
    if barrier is not None:
        barrier()
    summary = AuditSummary([], failed, skipped, teacher_names, time.perf_counter() - started, queries)
    if process_index == 0:
        summary = write_summary(out, names, expected, teacher_names, summary, extra_columns)
    return summary


def write_summary(out: Path, names: list[str], expected: dict, teachers: list[str], summary: AuditSummary,
                  extra_columns: Callable[[dict], dict] | None = None) -> AuditSummary:
    """Rebuild summary.json / summary.csv / index.html from every student's record (all processes'),
    atomically. Students without a record are listed as failed (with their error.json message) or
    missing. `extra_columns(row)` gives more {column: value} for a finished student's row (values:
    str, bool, number or None); they join the row in summary.json and get their own columns in
    summary.csv (last) and index.html (after the answer)."""
    rows, failed, extra = [], dict(summary.failed), {}
    for name in sorted(names):
        rec = finished_record(out, name, expected)
        if rec is None:
            if name not in failed:
                try:
                    failed[name] = json.loads((_student_dir(out, name) / "error.json").read_text())["error"]
                except (OSError, ValueError, KeyError):
                    failed[name] = "no result (not run yet, or interrupted)"
            continue
        failed.pop(name, None)
        row = _row(name, rec)
        if extra_columns is not None:
            more = extra_columns(row)
            if set(more) & set(row):
                raise AuditError(f"extra columns {sorted(set(more) & set(row))} would overwrite the audit's own")
            row.update(more)
            extra.update(dict.fromkeys(more))  # every column, in first-seen order
        rows.append(row)
    summary = dataclasses.replace(summary, rows=rows, failed=failed, out=out)
    doc = {"teachers": teachers, "settings": expected, "students": rows, "extra_columns": list(extra), "failed": failed,
           "counts": {"students": len(names), "finished": len(rows), "failed": len(failed)},
           "answers": {t: sum(r["answer"] == t for r in rows) for t in [*teachers, "none of the candidates"]},
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    from kdd_jax.report import render_audit_index, write_report
    from kdd_jax.versions import versions

    doc["versions"] = versions()
    atomic_write_json(out / "summary.json", doc)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["student", "answer", "winner", "runner_up", "margin", "bootstrap_p", "p_none", *teachers, *extra])
    for r in rows:
        w.writerow([r["student"], r["answer"], r["winner"], r["runner_up"], _num(r["margin"]), _num(r["p_value"]),
                    _num(r["p_none"]), *[_num(r["scores"].get(t)) for t in teachers], *[_text(r.get(c)) for c in extra]])
    atomic_write_bytes(out / "summary.csv", buf.getvalue().encode())
    write_report(out / "index.html", render_audit_index(doc))
    return summary


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.6g}"


def _text(x) -> str:
    """An extra column's CSV cell: blank for None, true/false for booleans."""
    if isinstance(x, bool):
        return "true" if x else "false"
    return _num(x) if x is None or isinstance(x, (int, float)) else str(x)


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> tuple[int, int]:
    """Start JAX's multi-process runtime (TPU pods, Slurm and Open MPI are auto-detected when no
    argument is given) and return (process_index, process_count). On CPU, cross-process
    collectives (the barrier) use JAX's default, gloo."""
    import jax

    kwargs = {k: v for k, v in {"coordinator_address": coordinator, "num_processes": num_processes,
                                "process_id": process_id}.items() if v is not None}
    jax.distributed.initialize(**kwargs)
    return jax.process_index(), jax.process_count()


def global_barrier(name: str = "kdd-audit") -> None:
    """Every process waits here until all have arrived (a no-op in a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send file descriptor 1 to stderr inside the block. Why: the multi-process runtime's C++
    layers (gloo) print connection notices on the C-level stdout, which would corrupt
    `--json` output; the summary is printed after the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def distributed_requested(flag: bool) -> bool:
    """--distributed, or KDD_DISTRIBUTED=1 in the environment (set it in a Slurm/MPI launcher)."""
    return flag or os.environ.get("KDD_DISTRIBUTED", "") not in ("", "0", "false", "False")
