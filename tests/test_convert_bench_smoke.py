"""benchmarks/convert_bench.py runs end to end in --quick mode (~25 s on 2 cores, its 6-checkpoint zoo
built in the test), and its verification pass reports what the check did, including a student the
check rejects: the pass records it and the results are still written (a failing check used to abort
the benchmark after minutes of measurements)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_convert_bench_quick_reports_verification_and_survives_a_failed_check(tmp_path, monkeypatch):
    import converters.verify as cv
    from benchmarks import convert_bench

    real = cv.verify_conversion

    def reject_one(result, **kw):
        rep = real(result, **kw)
        if result.config.family == "densenet":
            rep = rep | {"ok": False}  # as a wrong conversion would come back
        return rep

    monkeypatch.setattr(cv, "verify_conversion", reject_one)
    out = tmp_path / "out"
    assert convert_bench.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out), "--no-experiments"]) == 0
    res = json.loads((out / "convert_bench_quick.json").read_text())
    v = res["verification"]
    assert v["students"] == res["zoo"]["count"] == 6 and len(v["rows"]) == 6
    assert v["passed"] == 5 and [f["student"] for f in v["failures"]] == ["densenet-bc-22-k8-float32-00"]
    assert "verification against PyTorch failed" in v["failures"][0]["error"]
    assert sum(r["first_of_architecture"] for r in v["rows"]) == 4  # one per variant of the quick zoo
    assert all(r["seconds"] > 0 for r in v["rows"])
    assert v["verify_s"] == pytest.approx(sum(r["seconds"] for r in v["rows"]), abs=1e-2)
    for r in v["rows"]:  # a float64 re-run is reported only where one ran, with its figures
        assert (r["float64_ok"] is None) == (r["float64_rerun_probes"] == 0)
        if r["float64_ok"] is not None:
            assert r["float64_max_input_grad_rel_l2"] <= v["float64_bound"] and r["float64_seconds"] > 0
    md = (out / "convert_bench_quick.md").read_text()
    assert "## Verification against PyTorch" in md and "5/6 passed" in md
    assert "**Failed** (1)" in md and "densenet-bc-22-k8-float32-00" in md
