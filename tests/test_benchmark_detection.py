"""benchmarks/detection_accuracy.py runs end to end on the toy zoo (data-free methods only: the
real-image baselines need Fashion-MNIST, which CI does not install) and resumes from its cache."""

from __future__ import annotations

import json

import pytest


def test_detection_benchmark_smoke(toy_zoo, tmp_path):
    from benchmarks import detection_accuracy as bench

    root = toy_zoo["root"]
    models = [{"name": "teacher-a", "role": "teacher", "path": "teacher-a", "teacher": None, "recipe_id": "supervised"},
              {"name": "teacher-b", "role": "teacher", "path": "teacher-b", "teacher": None, "recipe_id": "supervised"},
              {"name": "student", "role": "student", "path": "student", "teacher": "teacher-a", "recipe_id": "kd"}]
    models += [{"name": f"ref{i}", "role": "control", "path": f"references/ref{i}", "teacher": None,
                "recipe_id": "supervised"} for i in range(3)]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": models, "counts": {"teacher": 2, "student": 1, "control": 3}}))
    argv = ["--zoo", str(root), "--manifest", str(manifest), "--methods", "pixel,noise", "--runs", "2", "--steps", "5",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results"), "--tag", "smoke"]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "results" / "smoke.json").read_text())
    r = result["results"]["pixel"]["probs"]["neg_kl"]["100"]
    assert r["runs"] == 2 and 0.0 <= r["accuracy"] <= 1.0 and len(r["accuracy_per_run"]) == 2
    assert set(result["results"]) == {"pixel", "noise"}
    assert set(result["results"]["pixel"]) == {"logits", "probs", "topk", "labels"}
    acs = result["results"]["pixel"]["probs"]["acs"]
    assert "1" not in acs and acs["10"]["runs"] == 2  # set scores need a set of probes: none at N=1
    md = (tmp_path / "results" / "smoke.md").read_text()
    assert "| pixel + neg_kl |" in md and "| pixel + dark_corr |" in md and "synthetic + KL (paper)" in md
    stats = result["meta"]["queries"].values()
    assert sum(q["queries"] + q["hits"] for q in stats) == 2 * 2 * 2 * 4 * 100  # teachers x methods x runs x models x probes
    # noise probes depend only on the seed and input shape, so every model after the first is answered from the cache
    assert sum(q["queries"] for q in stats) == 2 * (2 * 4 * 100 + 2 * 100)
    # a re-run reads every logit from the work cache: no synthesis, no query
    assert bench.main(argv) == 0
    again = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert sum(q["queries"] + q["hits"] for q in again["meta"]["queries"].values()) == 0
    assert again["results"] == result["results"]
