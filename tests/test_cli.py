"""`kdd convert` end to end: bulk mode, JSON on stdout, reports, exit codes, the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from kdd_jax.cli import main
from kdd_jax.io import load_converted

ROOT = Path(__file__).resolve().parents[1]


def test_bulk_convert_json_and_reports(make_student, tmp_path, capsys):
    make_student("resnet20", seed=1, dirname="zoo/a")
    make_student("densenet_bc_small", seed=2, dirname="zoo/nested/b", with_config=False)
    out = tmp_path / "out"
    code = main(["convert", str(tmp_path / "zoo"), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)  # stdout holds only the JSON document
    assert (result["converted"], result["failed"]) == (2, 0)
    by_name = {s["name"]: s for s in result["students"]}
    assert by_name["a"]["verification"]["ok"] and by_name["b"]["verification"]["ok"]
    assert by_name["b"]["inferred"], "an inferred config must be reported as such"
    assert "[1/2]" in captured.err and "2 converted, 0 already up to date, 0 failed" in captured.err
    model, config, report = load_converted(out / "b")
    assert config.family == "densenet" and report["source"]["config"] == "inferred"
    assert len(report["source"]["sha256"]) == 64 and report["keymap_version"] == 1
    assert report["verification"]["tolerances"]["logit_rtol"] == 1e-4
    assert np.isfinite(np.asarray(model(np.zeros((1, 32, 32, 3), np.float32)))).all()
    summary = json.loads((out / "conversion_summary.json").read_text())
    assert [s["status"] for s in summary["students"]] == ["ok", "ok"]


def test_bulk_convert_rerun_skips_what_is_up_to_date(make_student, tmp_path, capsys):
    """A rerun of a finished or interrupted batch redoes nothing already converted from the same weights
    with the same config (exit 0, `skipped`), converts what is missing, and still refuses to overwrite
    an output of other weights or another config, or one not verified when verification is asked."""
    from tests.conftest import full_config

    a = make_student("vgg_odd_avgpool", seed=1, dirname="zoo/a")
    b = make_student("vgg_odd_avgpool", seed=2, dirname="zoo/b")
    out = tmp_path / "out"
    assert main(["convert", str(a), "--out", str(out), "--no-verify", "-q"]) == 0
    before = (out / "a" / "conversion_report.json").read_text()

    def rerun(*extra):
        code = main(["convert", str(tmp_path / "zoo"), "--out", str(out), "--json", "-q", *extra])
        return code, {s["name"]: s for s in json.loads(capsys.readouterr().out)["students"]}

    code, res = rerun("--no-verify")
    assert code == 0 and res["a"]["status"] == "skipped" and res["a"]["output"] == str(out / "a")
    assert res["b"]["status"] == "ok"
    assert (out / "a" / "conversion_report.json").read_text() == before  # untouched
    summary = json.loads((out / "conversion_summary.json").read_text())
    assert [s["status"] for s in summary["students"]] == ["skipped", "ok"]
    assert summary["students"][0]["family"] == "vgg" and summary["students"][0]["parameters"] > 0
    # an output written before a config field existed (here: one left at its default) is still up to date
    written = json.loads((out / "a" / "config.json").read_text())
    assert written["arch"]["nested_blocks"] is False  # its default
    del written["arch"]["nested_blocks"]
    (out / "a" / "config.json").write_text(json.dumps(written))
    code, res = rerun("--no-verify")
    assert code == 0 and res["a"]["status"] == "skipped"
    # asking for verification now: the unverified outputs are not what this run would publish
    code, res = rerun("--verify")
    assert code == 1 and "was not verified against PyTorch" in res["a"]["error"]
    # another config for the same weights
    cfg = full_config("vgg_odd_avgpool")
    cfg["preprocessing"]["mean"] = [0.1, 0.2, 0.3]
    (a / "config.json").write_text(json.dumps(cfg))
    code, res = rerun("--no-verify")
    assert code == 1 and "was converted with another config" in res["a"]["error"] and res["b"]["status"] == "skipped"
    # other weights under the same name
    shutil.copy(b / "model.safetensors", a / "model.safetensors")
    code, res = rerun("--no-verify")
    assert code == 1 and f"was converted from other weights than {a / 'model.safetensors'}" in res["a"]["error"]
    assert main(["convert", str(a), "--out", str(out), "--no-verify", "--overwrite", "-q"]) == 0


def test_config_override_applies_to_every_source(make_student, tmp_path, capsys):
    from tests.conftest import full_config

    d = make_student("vgg_odd_avgpool", seed=0, with_config=False)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(full_config("vgg_odd_avgpool")))
    assert main(["convert", str(d), "--out", str(tmp_path / "o"), "--config", str(cfg), "--no-verify", "-q"]) == 0
    assert capsys.readouterr().err == ""  # --quiet
    _, config, report = load_converted(tmp_path / "o" / d.name)
    assert config.arch.avgpool == (3, 3) and report["inferred"] == [] and report["verification"] == {"skipped": True}


def test_usage_errors_exit_2(capsys):
    for argv in (["convert", "x"], ["frobnicate"], []):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"{argv} did not exit")


def test_console_script_and_module_entry_point(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for cmd in (["kdd", "--version"], [sys.executable, "-m", "kdd_jax", "--version"]):
        exe = Path(sys.executable).parent / cmd[0] if cmd[0] == "kdd" else None
        if exe is not None:
            cmd = [str(exe), *cmd[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("kdd-jax "), out.stderr


def test_bundled_examples_convert(tmp_path):
    """The README's main command works on the bundled students (fast path: no verification)."""
    code = main(["convert", str(ROOT / "examples" / "students"), "--out", str(tmp_path), "--no-verify", "-q"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "densenet-bc-noconfig", "mobilenetv2-cifar", "resnet20-cifar", "vgg8-fashion-bf16"]


def test_detect_budget_and_batchnorm_errors_are_clear_and_lose_nothing(make_student, tmp_path, capsys):
    from kdd_jax.teachers import ResponseCache

    teacher = make_student("resnet20", seed=1, dirname="t")
    student = make_student("resnet20", seed=2, dirname="s")
    no_bn = make_student("vgg_plain_nested", seed=3, dirname="nobn")
    tfile = tmp_path / "teachers.json"
    tfile.write_text(json.dumps({"teachers": [{"name": "t", "path": str(teacher)}]}))
    base = ["detect", "--teachers", str(tfile), "--probes", "6", "--steps", "2", "--cache", str(tmp_path / "c"), "-q"]
    cache = tmp_path / "c" / "responses.sqlite"

    assert main(base + ["--student", str(student), "--budget", "5"]) == 1  # 6 probes > budget 5
    err = capsys.readouterr().err
    assert "'t'" in err and "budget 5" in err
    assert ResponseCache(cache).count() == 0  # aborted before sending anything

    assert main(base + ["--student", str(student), "--budget", "6"]) == 0
    assert ResponseCache(cache).count() == 6
    capsys.readouterr()
    assert main(base + ["--student", str(student), "--budget", "0"]) == 0  # all cached: costs nothing

    assert main(base + ["--student", str(no_bn)]) == 1
    assert "no BatchNorm" in capsys.readouterr().err
    assert main(base + ["--student", str(no_bn), "--method", "confidence"]) == 0
    assert ResponseCache(cache).count() == 12  # earlier answers kept, the new student's added
    capsys.readouterr()
    assert main(base + ["--student", str(student), "--aug-noise", "-0.5"]) == 1
    assert "aug_noise must be a finite number >= 0, got -0.5" in capsys.readouterr().err
    assert main(base + ["--student", str(student), "--aug-noise", "0.5"]) == 0  # new probes: 6 more answers
    assert ResponseCache(cache).count() == 18
