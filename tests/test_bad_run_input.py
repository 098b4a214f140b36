"""Bad input to a detection run (`kdd detect` / `calibrate` / `serve` / `demo` and the library under them):
damaged pool, cache and converted files, out-of-range options, malformed teacher entries. Each must be a
clear error naming the file, field or teacher at fault, raised before work it would waste, and never a
traceback; a damaged synthesis snapshot costs only the time it saved."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
import zipfile

import numpy as np
import pytest

from kdd_jax.cli import main
from kdd_jax.config import ConfigError
from kdd_jax.io import CheckpointError, read_arrays
from kdd_jax.synthesis import SynthesisConfig, SynthesisError
from kdd_jax.teachers import CachedTeacher, ResponseCache, flax_teacher
from kdd_jax.teachers.config import TeacherEntry


def test_damaged_npz_pool_is_a_named_error(tmp_path):
    good = tmp_path / "good.npz"
    np.savez_compressed(good, images=np.zeros((4, 1, 8, 8), np.uint8))
    data = good.read_bytes()
    cases = {"not_a_zip.npz": b"PK\x03\x04garbage", "cut.npz": data[: len(data) // 2]}
    crc = bytearray(data)  # flip a byte of the compressed member: a CRC / deflate error on reading it
    with zipfile.ZipFile(good) as z:
        info = z.infolist()[0]
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])  # local header
    start = info.header_offset + 30 + name_len + extra_len
    crc[start + info.compress_size // 2] ^= 0xFF
    cases["crc.npz"] = bytes(crc)
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match=rf"pool {tmp_path / name}: cannot read \("):
            read_arrays(tmp_path / name, "pool")


def test_a_response_cache_that_is_not_one_is_named(tmp_path):
    text = tmp_path / "a" / "responses.sqlite"
    text.parent.mkdir()
    text.write_text("not a database, but someone's notes " * 100)
    with pytest.raises(ValueError, match=rf"response cache {text} is not an SQLite database .*--cache"):
        ResponseCache(text)
    assert text.read_text().startswith("not a database")  # nothing overwritten
    folder = tmp_path / "b" / "responses.sqlite"
    folder.mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"response cache {folder} is a directory"):
        ResponseCache(folder)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63, 1.5, True])
def test_seeds_outside_what_the_prng_takes_are_refused(seed):
    """JAX keys take 32 bits of a seed: 2**32 gave seed 0's probes while reports recorded 2**32."""
    with pytest.raises(SynthesisError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        SynthesisConfig(seed=seed)
    assert SynthesisConfig(seed=np.int64(2**32 - 1)).seed == 2**32 - 1


@pytest.mark.parametrize("url, match", [("http://[::1", "malformed"), ("http://127.0.0.1:99999", "Port out of range"),
                                        ("http://127.0.0.1:abc", "malformed"), ("http://:8000", "names no host")])
def test_malformed_teacher_urls_are_refused_when_read(tmp_path, url, match):
    f = tmp_path / "teachers.json"
    f.write_text(json.dumps({"teachers": [{"name": "remote", "kind": "http", "url": url, "input_size": [8, 8],
                                           "channels": 1, "num_classes": 3}]}))
    from kdd_jax.teachers.config import load_teachers_file

    with pytest.raises(ConfigError, match=rf"{f}: teachers\[0\].*{match}"):
        load_teachers_file(f)


def test_http_teacher_limits():
    base = dict(name="t", kind="http", url="http://127.0.0.1:9", channels=1, num_classes=3)
    with pytest.raises(ConfigError, match=r"timeout_s in \(0, 86400.0\]"):
        TeacherEntry(**base, input_size=(8, 8), timeout_s=1e308)
    with pytest.raises(ConfigError, match=r"input_size \[100000, 8\] with 1 channel\(s\) is larger than supported"):
        TeacherEntry(**base, input_size=(100000, 8))


def test_mixed_teacher_apis_are_refused_once_before_any_student(toy_zoo, tmp_path, capsys):
    """An audit or calibration whose teachers answer with different detail fails as a whole, before any
    student or reference (it used to fail each one and leave an audit folder that needed --resume)."""
    f = tmp_path / "teachers.json"
    f.write_text(json.dumps({"teachers": [{"name": "ta", "path": str(toy_zoo["root"] / "teacher-a"), "output": "labels"},
                                          {"name": "tb", "path": str(toy_zoo["root"] / "teacher-b"), "output": "probs"}]}))
    refs = [str(toy_zoo["root"] / "references" / r) for r in ("ref0", "ref1")]
    common = ["--teachers", str(f), "--method", "noise", "--cache", str(tmp_path / "cache"), "-q"]
    assert main(["audit", "--students", *refs, "--out", str(tmp_path / "audit"), *common]) == 1
    assert "different detail (ta: labels, tb: distribution)" in capsys.readouterr().err
    assert not (tmp_path / "audit" / "students").exists()
    assert main(["calibrate", "--references", *refs, "--out", str(tmp_path / "cal.json"), *common]) == 1
    assert "different detail (ta: labels, tb: distribution)" in capsys.readouterr().err
    assert not (tmp_path / "cal.json.partial").exists()
    # a top-k API giving every class is a whole distribution
    t = flax_teacher("k10", toy_zoo["teacher-a"].model, toy_zoo["teacher-a"].config, output="topk",
                     k=toy_zoo["teacher-a"].config.arch.num_classes)
    from kdd_jax.detect import answer_detail

    assert answer_detail(t) == "distribution"


def test_negative_query_budget_is_refused(toy_zoo, tmp_path):
    t = flax_teacher("teacher-a", toy_zoo["teacher-a"].model, toy_zoo["teacher-a"].config)
    with pytest.raises(ValueError, match=r"teacher 'teacher-a': the query budget must be a whole number >= 0 "
                                         r"\(--budget\), got -5"):
        CachedTeacher(t, ResponseCache(tmp_path / "c.sqlite"), budget=-5)


def _teachers_file(toy_zoo, tmp_path):
    f = tmp_path / "teachers.json"
    f.write_text(json.dumps({"teachers": [{"name": n, "path": str(toy_zoo["root"] / n), "output": "probs"}
                                          for n in ("teacher-a", "teacher-b")]}))
    return f


def test_cli_option_values_are_checked_before_work(toy_zoo, tmp_path, capsys):
    teachers = _teachers_file(toy_zoo, tmp_path)
    base = ["detect", "--student", str(toy_zoo["root"] / "student"), "--teachers", str(teachers), "--method", "noise",
            "--cache", str(tmp_path / "cache"), "-q"]
    for flag, value, message in [("--probes", "0", "--probes 0: the number of probes must be >= 1"),  # was 100
                                 ("--seed", str(2**63), f"--seed {2**63}: seeds are 0 to 2**32 - 1"),
                                 ("--seed", "-1", "--seed -1: seeds are 0 to 2**32 - 1"),
                                 ("--budget", "-5", "--budget -5: the query budget must be >= 0")]:
        for command in (base, ["audit", "--students", str(toy_zoo["root"] / "student"), "--out", str(tmp_path / "a"),
                               *base[3:]]):
            assert main([*command, flag, value]) == 1
            assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "a").exists()  # refused before anything opened
    # calibrate: a bad --out is refused before any reference is scored
    refs = [str(toy_zoo["root"] / "references" / "ref0")]
    for out, why in [(tmp_path / "no" / "such" / "cal.json", "its folder does not exist"), (tmp_path, "is a directory")]:
        assert main(["calibrate", "--references", *refs, "--teachers", str(teachers), "--method", "noise",
                     "--cache", str(tmp_path / "cal-cache"), "--out", str(out), "-q"]) == 1
        assert f"--out {out}: {why}" in capsys.readouterr().err
    assert not (tmp_path / "cal-cache").exists()  # refused before the teachers (and their cache) were opened
    for port in ("99999", "-1"):
        assert main(["serve", str(toy_zoo["root"] / "teacher-a"), "--port", port, "-q"]) == 2
        assert f"--port {port}: a TCP port is 0-65535" in capsys.readouterr().err


def test_damaged_converted_student_names_the_folder(toy_zoo, tmp_path, capsys):
    out = tmp_path / "conv"
    src = toy_zoo["root"] / "teacher-a"
    assert main(["convert", str(src), "--out", str(out), "--no-verify", "-q"]) == 0
    conv = out / "teacher-a"
    from kdd_jax.io import load_converted

    report = conv / "conversion_report.json"
    saved = report.read_text()
    report.write_text("{\n")
    with pytest.raises(CheckpointError, match=rf"{report}: cannot read the conversion report .*re-run `kdd convert`"):
        load_converted(conv)
    report.write_text(saved)
    for d in [p for p in (conv / "state").rglob("*") if p.is_dir() and p.name == "d"]:
        shutil.rmtree(d)  # the array data of the orbax checkpoint
    with pytest.raises(CheckpointError, match=rf"{conv / 'state'}: cannot restore the converted weights .*re-run"):
        load_converted(conv)


# orbax's restore of damaged data leaves an asyncio callback behind ("Event loop is closed"): its noise, not ours
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_synthesis_snapshot_restarts_to_the_same_probes(toy_zoo, tmp_path):
    from kdd_jax.synthesis import synthesize

    s = toy_zoo["student"]
    sc = SynthesisConfig(n_probes=8, steps=4)
    ckpt = tmp_path / "ckpt"
    first = synthesize(s.model, s.config, sc, checkpoint_dir=ckpt)
    damaged = [p for p in ckpt.rglob("*") if p.is_dir() and p.name == "d"]
    assert damaged, "expected orbax array data to damage"
    for d in damaged:
        shutil.rmtree(d)
    with pytest.warns(UserWarning, match="cannot be restored .* starting the synthesis over"):
        again = synthesize(s.model, s.config, sc, checkpoint_dir=ckpt)
    assert again.sha256 == first.sha256
    with warnings.catch_warnings():  # the snapshot was rewritten: a third run resumes from it silently
        warnings.simplefilter("error")
        assert synthesize(s.model, s.config, sc, checkpoint_dir=ckpt).sha256 == first.sha256


def test_demo_manifest_teacher_names_are_checked_before_servers_start(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    for teachers, message in [([{"name": "a/b", "dir": "m"}], "teachers[0].name 'a/b' must be non-empty without slashes"),
                              ([{"name": "t", "dir": "m"}, {"name": "t", "dir": "m"}], "duplicate teacher names ['t']")]:
        (tmp_path / "manifest.json").write_text(json.dumps({"teachers": teachers, "students": [
            {"name": "s", "dir": "m", "description": "d"}]}))
        assert main(["demo", "--zoo", str(tmp_path), "--out", str(tmp_path / "o"), "-q"]) == 1
        assert message in capsys.readouterr().err


def test_a_broken_teacher_is_named_with_its_file(toy_zoo, tmp_path, capsys):
    """kdd detect names the teacher whose directory is empty or whose weights are truncated; kdd demo shows
    the served teacher's own error line (it was cut off when the server exited before its stderr was read)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(toy_zoo["root"] / "teacher-a" / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes((toy_zoo["root"] / "teacher-a" / "model.safetensors").read_bytes()[:100])
    (tmp_path / "empty").mkdir()
    for path in ("empty", "broken"):
        f = tmp_path / f"{path}.json"
        f.write_text(json.dumps({"teachers": [{"name": f"t-{path}", "path": str(tmp_path / path)}]}))
        assert main(["detect", "--student", str(toy_zoo["root"] / "student"), "--teachers", str(f), "--method",
                     "noise", "--cache", str(tmp_path / "cache"), "-q"]) == 1
        assert f"teacher 't-{path}': {tmp_path / path}" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text(json.dumps({
        "teachers": [{"name": "t-broken", "dir": str(broken)}],
        "students": [{"name": "s", "dir": str(toy_zoo["root"] / "student"), "description": "d"}]}))
    assert main(["demo", "--zoo", str(tmp_path), "--out", str(tmp_path / "o"), "--method", "noise", "-q"]) == 1
    err = capsys.readouterr().err
    assert "kdd serve for teacher 't-broken' did not start" in err and str(broken / "model.safetensors") in err
