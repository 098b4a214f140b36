"""benchmarks/encoder_cost.py --quick: tiny towers of every encoder kind convert, agree with their
PyTorch references and are timed; the result files are written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_encoder_cost_quick(tmp_path):
    from benchmarks.encoder_cost import main

    assert main(["--quick", "--images", "3", "--out", str(tmp_path), "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [r["kind"] for r in rows] == ["clip", "vit", "dinov2", "dinov2"]
    assert (rows[3]["image_size"], rows[3]["checkpoint_image_size"], rows[3]["tokens"]) == (8, 12, 5)  # --feature-size
    for r in rows:
        assert r["max_abs_diff"] < 1e-4 * max(1.0, r["max_abs_value"]), r
        assert r["embed_warm_s"] > 0 and r["parameters"] > 0
    assert "| DINOv2 ViT-S/14 |" in (tmp_path / "t.md").read_text()
