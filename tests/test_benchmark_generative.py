"""benchmarks/generative_detection.py runs end to end on a tiny diffusion zoo written with diffusers
in the test (random UNets; students are teachers' weights slightly moved) and resumes from its cache."""

from __future__ import annotations

import json

import pytest

diffusers = pytest.importorskip("diffusers")


def test_generative_benchmark_smoke(toy_zoo, tmp_path):
    from benchmarks import generative_detection as bench
    from tests.test_generative_cli import write_folder

    models = tmp_path / "zoo" / "cache" / "models"
    unets, entries = {}, []
    for name, seed in (("t0", 1), ("t1", 2)):
        (models / name).mkdir(parents=True)
        unets[name] = write_folder(models / name, seed, classes=6)
        entries.append({"name": name, "role": "teacher", "teacher": None, "recipe": "train",
                        "sampling": {"scheduler": "ddim", "num_inference_steps": 3, "eta": 0.0, "guidance_scale": 2.0}})
    for name, base in (("s0", "t0"), ("s1", "t1")):
        (models / name).mkdir(parents=True)
        write_folder(models / name, 10 + len(entries), base=unets[base], classes=6)
        entries.append({"name": name, "role": "student", "teacher": base, "recipe": "copy",
                        "sampling": {"num_inference_steps": 2}})
    for name, seed in (("c0", 20), ("c1", 21)):
        (models / name).mkdir(parents=True)
        write_folder(models / name, seed, classes=6)
        entries.append({"name": name, "role": "control", "teacher": None, "recipe": "control", "sampling": {}})
    (tmp_path / "zoo" / "manifest.json").write_text(json.dumps({"models": entries}))
    argv = ["--zoo", str(tmp_path / "zoo"), "--feature-net", str(toy_zoo["root"] / "teacher-a"), "--runs", "2",
            "--ns", "1,4", "--crop", "0", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
            "--tag", "smoke"]
    assert bench.main(argv) == 0
    doc = json.loads((tmp_path / "results" / "smoke.json").read_text())
    rows = {(r["method"], r["score"], r["n"]): r for r in doc["rows"]}
    assert {m for m, _, _ in rows} == {"empty", "caption", "random"}
    assert ("empty", "linear_cka", 1) not in rows and ("empty", "linear_cka", 4) in rows  # set scores need N > 1
    # students are near-copies of their teachers: pixel distance finds them
    assert rows[("empty", "neg_pixel_mse", 4)]["accuracy"] == 1.0
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["fpr"] <= 1 for r in rows.values())
    md = (tmp_path / "results" / "smoke.md").read_text()
    assert "## empty prompts" in md and "| neg_lpips | pair |" in md and "acc N=4" in md
    # empty-prompt probes depend only on the seed: every model after the first is answered from the cache
    q = doc["queries"]
    # methods x runs x models x probes, + the 4 empty-prompt probes of run 0 read again (cache hits, nothing paid)
    # for the teacher-teacher SSIM baseline
    assert all(v["queries"] + v["hits"] == 3 * 2 * 4 * 4 + 4 for v in q.values())
    assert set(doc["teacher_teacher_ssim"]) == {"t0~t1"} and -1 <= doc["teacher_teacher_ssim"]["t0~t1"] <= 1
    # a re-run reads every record from the work cache: no student is sampled and no teacher is paid
    assert bench.main(argv) == 0
    again = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert again["rows"] == doc["rows"] and again["teacher_teacher_ssim"] == doc["teacher_teacher_ssim"]
    assert all(v["queries"] == 0 and v["hits"] == 4 for v in again["queries"].values())  # only the baseline's reads
    # one distilled student: no leave-one-out threshold, so no binary rates; null in the JSON (strict JSON,
    # no NaN), n/a in the table, and the multiple-choice columns still there
    (tmp_path / "zoo" / "manifest.json").write_text(json.dumps({"models": [e for e in entries if e["name"] != "s1"]}))
    assert bench.main([*argv[:-1], "one"]) == 0
    text = (tmp_path / "results" / "one.json").read_text()
    one = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the results JSON"))
    assert all(r["tpr"] is None and r["fpr"] is None and 0 <= r["accuracy"] <= 1 for r in one["rows"])
    assert "| n/a / n/a |" in (tmp_path / "results" / "one.md").read_text()
