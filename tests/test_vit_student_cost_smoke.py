"""benchmarks/vit_student_cost.py --quick: tiny DeiT and DINOv2 classifier folders convert, pass the
verification against PyTorch (DINOv2 through its interpolated position embeddings: its 5x5 grid runs
at a 12x12 crop, 3x3 patches), are timed forward and through the BN-free synthesis; results written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_vit_student_cost_quick(tmp_path):
    from benchmarks.vit_student_cost import main

    assert main(["--quick", "--batch", "4", "--steps", "2", "--out", str(tmp_path), "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [(r["variant"], r["head"]) for r in rows] == [("deit", "cls_distill"), ("dinov2", "cls_mean")]
    for r in rows:
        assert r["verify_ok"] and r["max_abs_logit_diff"] < 1e-4, r
        assert r["forward_warm_s"] > 0 and r["synthesis_s_per_step"] > 0 and r["parameters"] > 0
    assert (rows[1]["checkpoint_grid"], rows[1]["input_size"], rows[1]["tokens"]) == (5, [12, 12], 10)
    assert (rows[0]["input_size"], rows[0]["tokens"]) == ([12, 12], 11)  # 9 patches + class + distillation
    assert "| DINOv2-S/14 linear (Dinov2ForImageClassification) |" in (tmp_path / "t.md").read_text()
