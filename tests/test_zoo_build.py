"""The Fashion-MNIST zoo build (benchmarks/zoo/build_zoo.py --tiny) end to end, on a synthetic
stand-in for Fashion-MNIST written in the IDX format (CI has no Fashion-MNIST package): it builds,
writes the manifest and the markdown table, skips what is up to date, and rebuilds bit for bit,
with one process or several (--jobs)."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _write_idx(path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory):
    """60k + 10k 28x28 images whose class is a fixed random template plus noise: learnable in one
    epoch, so the build's accuracy and agreement figures mean something."""
    d = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    templates = rng.uniform(0, 255, size=(10, 28, 28))
    for stem, n in (("train", 60000), ("t10k", 10000)):
        y = rng.integers(0, 10, size=n)
        x = np.clip(0.6 * templates[y] + rng.normal(0, 40, size=(n, 28, 28)), 0, 255)
        _write_idx(d / f"{stem}-images-idx3-ubyte.gz", x, 0x00000803)
        _write_idx(d / f"{stem}-labels-idx1-ubyte.gz", y, 0x00000801)
    return d


def _digests(root) -> dict[str, str]:
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("model.safetensors"))}


@pytest.fixture(scope="module")
def serial_digests(fake_fashion, tmp_path_factory):
    from benchmarks.zoo import build_zoo

    out = tmp_path_factory.mktemp("serial") / "zoo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDD_FASHION_DIR", str(fake_fashion))
        assert build_zoo.main(["--tiny", "--out", str(out)]) == 0
    return out, _digests(out)


def test_tiny_zoo_builds_resumes_and_reproduces(fake_fashion, serial_digests, monkeypatch, capsys):
    from benchmarks.zoo import build_zoo

    monkeypatch.setenv("KDD_FASHION_DIR", str(fake_fashion))
    out, first = serial_digests
    man = json.loads((out / "manifest.json").read_text())
    by_role = {m["role"]: m for m in man["models"]}
    assert sorted(by_role) == ["control", "student", "teacher"] and man["counts"]["student"] == 1
    teacher, student = by_role["teacher"], by_role["student"]
    assert teacher["test_accuracy"] > 0.5  # it really trained (chance is 0.1)
    assert student["teacher"] == teacher["name"] and student["data"]["pool"] == "teacher_train"
    assert 0.0 <= student["agreement"][teacher["name"]] <= 1.0 and student["agreement"][teacher["name"]] > 0.5
    md = (out / "zoo.md").read_text()
    assert man["machine"]["cpu_model"] in md and student["name"] in md
    assert len(first) == 3

    # Resumable: a second run finds everything up to date and leaves the weights alone.
    capsys.readouterr()
    assert build_zoo.main(["--tiny", "--out", str(out)]) == 0
    assert "up to date, skipped: 3" in capsys.readouterr().out
    assert _digests(out) == first

    # A model whose directory is gone (an interrupted build) is rebuilt, bit for bit.
    student_dir = next(p.parent for p in out.rglob("model.safetensors") if p.parent.name == student["name"])
    for f in student_dir.iterdir():
        f.unlink()
    student_dir.rmdir()
    capsys.readouterr()
    assert build_zoo.main(["--tiny", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "up to date, skipped: 2" in log and student["name"] in log
    assert _digests(out) == first


def test_parallel_build_gives_the_serial_weights(fake_fashion, serial_digests, tmp_path, monkeypatch, capsys):
    """--jobs 2: the teacher and the control train side by side, the student once its teacher is
    written; every model's weights equal the serial build's, and the run is recorded."""
    from benchmarks.zoo import build_zoo

    monkeypatch.setenv("KDD_FASHION_DIR", str(fake_fashion))
    out = tmp_path / "zoo"
    assert build_zoo.main(["--tiny", "--out", str(out), "--jobs", "2"]) == 0
    log = capsys.readouterr().out
    assert "with 2 worker processes" in log and "(3/3)" in log
    assert _digests(out) == serial_digests[1]
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"] == {"teacher": 1, "student": 1, "control": 1}
    assert man["build_runs"][-1]["jobs"] == 2 and len(man["build_runs"][-1]["built"]) == 3
    with pytest.raises(SystemExit):
        build_zoo.main(["--tiny", "--out", str(out), "--jobs", "0"])

    # A worker's failure reaches the caller and loses nothing: a teacher file damaged after its
    # student was built makes the student stale (its recorded teacher hash no longer matches); its
    # rebuild fails to read the teacher, the build raises, and the student built before is intact.
    teacher = next(p for p in out.rglob("model.safetensors") if p.parent.name == "tiny-teacher")
    teacher.write_bytes(b"not a safetensors file")
    capsys.readouterr()
    with pytest.raises(Exception) as info:
        build_zoo.main(["--tiny", "--out", str(out), "--jobs", "2", "--only", "tiny-student"])
    log = capsys.readouterr().out
    assert "FAILED tiny-student" in log and "done tiny-student" not in log, log
    assert not isinstance(info.value, SystemExit)
    after = _digests(out)
    assert after["tiny-student"] == serial_digests[1]["tiny-student"]


@pytest.mark.slow
def test_a_killed_worker_stops_the_build_and_a_rerun_resumes(fake_fashion, serial_digests, tmp_path, monkeypatch, capsys):
    """A worker process killed outright (SIGKILL, as the OOM killer does) once the teacher is written
    breaks the process pool: the build says so with a hint and raises, the teacher survives, and the
    same command resumes (skipping the teacher) to the serial build's weights."""
    import concurrent.futures.process
    import multiprocessing
    import os
    import signal
    import threading
    import time

    from benchmarks.zoo import build_zoo

    monkeypatch.setenv("KDD_FASHION_DIR", str(fake_fashion))
    out = tmp_path / "zoo"
    killed, stop = [], threading.Event()

    def kill_a_worker_once_the_teacher_is_written():
        while not stop.is_set() and not killed:
            if any(p.parent.name == "tiny-teacher" for p in out.rglob("meta.json")):
                for child in multiprocessing.active_children():
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)
                    break
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_worker_once_the_teacher_is_written, daemon=True)
    killer.start()
    try:
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            build_zoo.main(["--tiny", "--out", str(out), "--jobs", "2"])
    finally:
        stop.set()
        killer.join()
    assert killed
    log = capsys.readouterr().out
    assert "FAILED" in log and log.count("a worker process died") == 1 and "re-run the same command to resume" in log
    teacher = next(p for p in out.rglob("model.safetensors") if p.parent.name == "tiny-teacher")
    written = teacher.stat().st_mtime_ns
    assert build_zoo.main(["--tiny", "--out", str(out), "--jobs", "2"]) == 0
    assert teacher.stat().st_mtime_ns == written  # kept, not rebuilt
    assert _digests(out) == serial_digests[1]
