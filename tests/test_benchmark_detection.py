"""benchmarks/detection_accuracy.py runs end to end on the toy zoo (data-free methods only: the
real-image baselines need Fashion-MNIST, which CI does not install) and resumes from its cache."""

from __future__ import annotations

import json

import pytest


def toy_manifest(tmp_path):
    """A zoo manifest for the toy zoo (tests/toyzoo.py): two teachers, a KD student of teacher-a,
    three independent references as controls."""
    models = [{"name": "teacher-a", "role": "teacher", "path": "teacher-a", "teacher": None, "recipe_id": "supervised"},
              {"name": "teacher-b", "role": "teacher", "path": "teacher-b", "teacher": None, "recipe_id": "supervised"},
              {"name": "student", "role": "student", "path": "student", "teacher": "teacher-a", "recipe_id": "kd"}]
    models += [{"name": f"ref{i}", "role": "control", "path": f"references/ref{i}", "teacher": None,
                "recipe_id": "supervised"} for i in range(3)]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": models, "counts": {"teacher": 2, "student": 1, "control": 3}}))
    return manifest


def test_detection_benchmark_smoke(toy_zoo, tmp_path):
    from benchmarks import detection_accuracy as bench

    root = toy_zoo["root"]
    manifest = toy_manifest(tmp_path)
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
    # methods this run did not measure get no rows of dashes, and the header says they were not run
    assert "| generator + neg_kl |" not in md and "| real |" not in md
    assert "Not run here: generator, confidence, real, ood, mia, pixel-robust." in md
    meta = result["meta"]  # benchmarks/provenance.py: what reproduces the run
    assert meta["command"] == "python benchmarks/detection_accuracy.py " + " ".join(argv)
    assert meta["seconds"] > 0 and meta["machine"]["jax_backend"] and meta["versions"]["jax"] and meta["date"]
    stats = result["meta"]["queries"].values()
    assert sum(q["queries"] + q["hits"] for q in stats) == 2 * 2 * 2 * 4 * 100  # teachers x methods x runs x models x probes
    # noise probes depend only on the seed and input shape, so every model after the first is answered from the cache
    assert sum(q["queries"] for q in stats) == 2 * (2 * 4 * 100 + 2 * 100)
    # a re-run reads every logit from the work cache: no synthesis, no query
    assert bench.main(argv) == 0
    again = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert sum(q["queries"] + q["hits"] for q in again["meta"]["queries"].values()) == 0
    assert again["results"] == result["results"]


def test_detection_ceiling_smoke(toy_zoo, tmp_path):
    """benchmarks/detection_ceiling.py on the toy zoo with a pool of the toy task's images: every
    score is evaluated, the detectability rows are consistent with the scores, and a re-run reads the
    cached logits (same results)."""
    import numpy as np

    from benchmarks import detection_ceiling as bench
    from tests.toyzoo import task

    root = toy_zoo["root"]
    manifest = toy_manifest(tmp_path)
    x, _ = task(300, seed=77)  # held-out toy images, raw NCHW in [0, 1]
    np.savez(tmp_path / "pools.npz", heldout=x.numpy())
    argv = ["--zoo", str(root), "--manifest", str(manifest), "--pools", str(tmp_path / "pools.npz"),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results"), "--tag", "ceiling"]
    assert bench.main(argv) == 0
    out = json.loads((tmp_path / "results" / "ceiling.json").read_text())
    res = out["results"]["heldout"]
    assert set(res) == set(bench.SCORE_NAMES)
    # the toy student is a plain KD student of teacher-a: the default score attributes it
    assert res["dark_corr"]["accuracy"] == 1.0
    d = res["dark_corr"]["detectability"]
    row = d["students"][0]
    assert row["attributed"] and row["top_teacher"] == 0 and d["n"] == 1
    assert row["above_controls"] == (row["own_excess"] > row["controls_max_excess"])
    # the subset curve stops at the pool size: 100 probes drawn 10 times; no 1k/10k draw from 300 images
    assert set(res["dark_corr"]["subsets"]) == {"100"} and res["dark_corr"]["subsets"]["100"]["draws"] == bench.SUBSETS
    md = (tmp_path / "results" / "ceiling.md").read_text()
    assert "| heldout + dark_corr |" in md and "### `dark_corr` on `heldout`, per student" in md
    cached = sorted(p.name for p in (tmp_path / "work" / "heldout").iterdir())
    assert len(cached) == 6
    assert bench.main(argv) == 0
    assert json.loads((tmp_path / "results" / "ceiling.json").read_text())["results"] == out["results"]


def test_detectability_excess_is_centred():
    """A model uniformly closer to every teacher gains no excess; the ceiling is per teacher."""
    import numpy as np

    from benchmarks.detection_ceiling import detectability

    students = np.array([[0.9, 0.5, 0.5], [0.95, 0.94, 0.93]])
    controls = np.array([[0.6, 0.5, 0.4], [0.5, 0.55, 0.5]])
    d = detectability(students, np.array([0, 0]), controls)
    a, b = d["students"]
    assert abs(a["own_excess"] - (0.9 - 19 / 30)) < 1e-12 and abs(a["controls_max_excess"] - 0.1) < 1e-12
    assert a["above_controls"] and a["attributed"]
    # attributed by argmax, yet its excess (0.01) is inside the controls' (0.1): not detectable
    assert b["attributed"] and not b["above_controls"]
    assert d["above_controls"] == 1 and d["n"] == 2


def test_score_fusion_refuses_bad_input(toy_zoo, tmp_path, capsys):
    """benchmarks/score_fusion.py: unknown --fuse methods, no runs, an empty pool file and a pool the
    students cannot take are refused by name, before any logits are computed or results written."""
    import numpy as np

    from benchmarks import score_fusion as bench
    from kdd_jax.synthesis import SynthesisError

    base = ["--zoo", str(toy_zoo["root"]), "--manifest", str(toy_manifest(tmp_path)),
            "--ceiling-work", str(tmp_path / "ceiling"), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results")]
    np.savez(tmp_path / "empty.npz")
    np.savez(tmp_path / "big.npz", big=np.zeros((5, 1, 28, 28), np.float32))
    for extra, message in ((["--fuse", "pixel,bogus"], "--fuse: unknown methods ['bogus']"),
                           (["--runs", "0"], "--runs and --draws must be >= 1, got 0 and 5"),
                           (["--pools", str(tmp_path / "empty.npz")], "empty.npz: the file holds no array")):
        with pytest.raises(SystemExit):
            bench.main(base + extra)
        assert message in capsys.readouterr().err
    with pytest.raises(SynthesisError, match=r"big\.npz\['big'\].*shape \(5, 1, 28, 28\)"):
        bench.main(base + ["--pools", str(tmp_path / "big.npz"), "--fuse", ""])
    assert not (tmp_path / "ceiling").exists() and not (tmp_path / "results").exists()


def test_detection_ceiling_refuses_a_pool_the_students_cannot_take(toy_zoo, tmp_path):
    """A pool of the wrong image size is refused before any model runs, naming the file and array."""
    import numpy as np

    from benchmarks import detection_ceiling as bench
    from kdd_jax.synthesis import SynthesisError

    np.savez(tmp_path / "pools.npz", big=np.zeros((5, 1, 28, 28), np.float32))
    argv = ["--zoo", str(toy_zoo["root"]), "--manifest", str(toy_manifest(tmp_path)), "--pools",
            str(tmp_path / "pools.npz"), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results")]
    with pytest.raises(SynthesisError, match=r"pools\.npz\['big'\].*shape \(5, 1, 28, 28\)"):
        bench.main(argv)
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()


def _entry(pool, size, seed, idx=None, teacher=None):
    import hashlib

    import numpy as np

    d = {"pool": pool, "size": size, "subset_seed": seed,
         "indices_sha256": hashlib.sha256(np.asarray(idx, dtype="<i8").tobytes()).hexdigest() if idx is not None else ""}
    return {"data": d, "teacher": teacher}


def test_training_indices_rebuild_a_students_data_and_check_the_recorded_hash():
    """A `teacher_train` student's images are a subset of its teacher's; a manifest whose hash does not
    match what the split rebuilds is refused, naming the model."""
    import numpy as np

    from benchmarks.zoo.fashion import subset, training_indices, zoo_split

    t_idx = subset(zoo_split()["teacher_pool"], 500, 11)
    s_idx = subset(t_idx, 100, 12)
    entries = {"t": _entry("teacher_pool", 500, 11, t_idx), "s": _entry("teacher_train", 100, 12, s_idx, teacher="t")}
    got = training_indices("s", entries)
    assert np.array_equal(got, s_idx) and np.isin(got, t_idx).all()
    entries["s"]["data"]["subset_seed"] = 13
    with pytest.raises(ValueError, match="manifest entry 's'"):
        training_indices("s", entries)


def test_ceiling_checks_training_records_before_any_work():
    """A manifest without training-data records skips the mistake section (names returned); one whose
    record does not match the split is refused up front, naming the model."""
    from benchmarks.detection_ceiling import check_training_records
    from benchmarks.zoo.fashion import subset, zoo_split

    t_idx = subset(zoo_split()["teacher_pool"], 300, 31)
    entries = {"t": _entry("teacher_pool", 300, 31, t_idx), "s": {"data": None, "teacher": "t"}}
    assert check_training_records(entries) == ["s"]
    entries["s"] = _entry("teacher_train", 100, 32, subset(t_idx, 100, 32), teacher="t")
    assert check_training_records(entries) == []
    entries["t"]["data"]["size"] = 299
    with pytest.raises(ValueError, match="manifest entry 't'"):
        check_training_records(entries)


def test_mistake_inheritance_counts_only_the_teachers_mistakes_on_the_students_own_images(monkeypatch):
    """A student that copies its teacher's wrong labels lies above controls that answer the truth; on
    the `train` pool only the student's own training images count."""
    import numpy as np

    import benchmarks.zoo.fashion as fashion
    from benchmarks.detection_ceiling import mistake_inheritance
    from benchmarks.zoo.fashion import subset, training_indices, zoo_split

    real = fashion.training_indices
    t_idx = subset(zoo_split()["teacher_pool"], 400, 21)
    s_idx = subset(t_idx, 200, 22)
    c_idx = subset(zoo_split()["student_pool"], 300, 23)  # a control trained on images the pool never draws
    entries = {"ta": _entry("teacher_pool", 400, 21, t_idx), "tb": _entry("teacher_pool", 400, 21, t_idx),
               "s": _entry("teacher_train", 200, 22, s_idx, teacher="ta"),
               "c1": _entry("student_pool", 300, 23, c_idx), "c2": _entry("student_pool", 300, 23, c_idx)}
    assert np.array_equal(training_indices("s", entries), s_idx)
    rng = np.random.default_rng(0)
    index = np.sort(rng.choice(t_idx, 300, replace=False))  # pool images: some the student saw, some not
    seen = np.isin(index, s_idx)
    labels = rng.integers(0, 10, 300)
    ta = labels.copy()
    ta[:60] = (labels[:60] + 1) % 10                       # teacher-a is wrong on the first 60 probes
    tb = labels.copy()
    student = labels.copy()
    student[:60] = np.where(seen[:60], ta[:60], labels[:60])  # copies the mistakes it was taught, not the others
    top1 = {"ta": ta, "tb": tb, "s": student, "c1": labels.copy(), "c2": (labels + 3) % 10}
    test = mistake_inheritance(top1, {"labels": labels, "index": None}, ["s"], ["c1", "c2"], ["ta", "tb"], entries)
    train = mistake_inheritance(top1, {"labels": labels, "index": index}, ["s"], ["c1", "c2"], ["ta", "tb"], entries)
    r, q = test["students"][0], train["students"][0]
    assert r["n"] == 60 and abs(r["student_follows"] - seen[:60].mean()) < 1e-12
    assert q["n"] == seen[:60].sum() and q["student_follows"] == 1.0
    assert r["controls_max"] == 0.0 and r["other_teachers_mean"] == 0.0 and q["above_controls"]
    assert np.isnan(q["other_teachers_mean"])  # teacher-b trained on every pool image: nothing to compare on
    top1["c1"] = ta.copy()                                 # a control that makes the same mistakes
    again = mistake_inheritance(top1, {"labels": labels, "index": index}, ["s"], ["c1", "c2"], ["ta", "tb"], entries)
    assert not again["students"][0]["above_controls"] and again["above_controls"] == 0
    # a control that trained on some probed images (learning their true labels) is compared only on the others
    c3_idx = index[:30]
    top1["c3"] = np.where(np.isin(index, c3_idx), labels, ta)  # right where it trained, the teacher's label elsewhere
    monkeypatch.setattr(fashion, "training_indices", lambda name, ents: c3_idx if name == "c3" else real(name, ents))
    r3 = mistake_inheritance(top1, {"labels": labels, "index": index}, ["s"], ["c3"], ["ta", "tb"], entries)
    assert seen[:30].any() and seen[30:60].any() and r3["students"][0]["n"] == q["n"]  # c3 saw some, not all
    assert r3["students"][0]["controls_max"] == 1.0 and not r3["above_controls"]


def test_datafree_probe_search_smoke(toy_zoo, tmp_path, capsys):
    """benchmarks/datafree_probes.py on the toy zoo: one row per run with accuracy, AUC, agreement
    diagnostics, own-family picks and the weights it ran on; a re-run reads every logit from its cache."""
    from benchmarks import datafree_probes as bench

    manifest = toy_manifest(tmp_path)
    man = json.loads(manifest.read_text())
    for m in man["models"]:  # teacher-a and the student share a family, teacher-b is another
        m["family"] = "vgg" if m["name"] == "teacher-b" else "resnet"
    manifest.write_text(json.dumps(man))
    results = tmp_path / "results" / "df.jsonl"
    argv = ['{"method": "pixel", "steps": 3, "n_probes": 16}', "--students", "all", "--zoo", str(toy_zoo["root"]),
            "--manifest", str(manifest), "--work", str(tmp_path / "work"), "--results", str(results)]
    assert bench.main(argv) == 0
    assert bench.main(argv) == 0
    first, again = (json.loads(line) for line in results.read_text().splitlines())
    assert first["n_students"] == 1 and first["cfg"] == {"method": "pixel", "steps": 3, "n_probes": 16}
    for score in bench.SCORES:
        acc, auc = first[score]
        assert acc in (0.0, 1.0) and auc is None  # one-vs-rest AUC is undefined for a single student: null
        # one student, whose own teacher is its family's: an own-family pick is a correct pick
        assert first["own_family_pick"][score] == acc
    assert 0.0 <= first["student_other_agree"] <= 1.0 and len(first["zoo_weights_sha256"]) == 12
    # the second run synthesised nothing: same logits, same synthesis time, same row
    assert {k: v for k, v in again.items() if k not in ("command",)} == {k: v for k, v in first.items() if k != "command"}
    md = results.with_suffix(".md").read_text()
    assert first["zoo_weights_sha256"][:8] in md and "picks of the student's own family" in md
    # the row names its students (from the command it records: re-runnable, the JSON config quoted)
    assert bench.students_of(first["command"]) == "all" and "| all: 1 x 1 |" in md
    assert f"| {first['neg_kl'][0]:.2f} / n/a |" in md  # the undefined AUC
    assert first["command"].startswith("python benchmarks/datafree_probes.py '{\"method\": \"pixel\"")
    assert bench.students_of("python benchmarks/datafree_probes.py '{}' --seeds 0") == "s09-s16"  # the default
    assert bench.students_of("x '{}' --students s01,s02,s03,s05,s07,s08 --seeds 0") == "s01-s03,s05,s07-s08"
    assert bench.students_of("x '{\"unbalanced\": 1} --students s01") == "?"
    # several seeds: the row records the std over them and the table shows it (one seed: no ±)
    two = tmp_path / "results" / "two.jsonl"
    assert bench.main([*argv[:-1], str(two), "--seeds", "0,1"]) == 0
    row = json.loads(two.read_text())
    assert row["seeds"] == [0, 1] and set(row["std_over_seeds"]) == set(bench.SCORES)
    acc_std = row["std_over_seeds"]["dark_corr"][0]
    assert acc_std in (0.0, 0.5) and row["std_over_seeds"]["dark_corr"][1] is None  # 1 student: no AUC
    assert f"| {row['dark_corr'][0]:.2f} ± {acc_std:.2f} / n/a |" in two.with_suffix(".md").read_text()
    assert "±" not in md.split("| all: 1 x 1 |")[1].splitlines()[0]
    # --pool-seeds: the two seeds' probes (cached above) scored together as one run of N = 32
    pooled = tmp_path / "results" / "pooled.jsonl"
    assert bench.main([*argv[:-1], str(pooled), "--seeds", "0,1", "--pool-seeds", "2"]) == 0
    prow = json.loads(pooled.read_text())
    assert prow["seeds"] == [0, 1] and prow["pool_seeds"] == 2 and prow["n_probes_per_run"] == 32
    assert prow["secs_per_student"] == row["secs_per_student"]  # nothing synthesised again
    assert prow["student_own_agree"] == row["student_own_agree"]  # the same probes, averaged alike
    line = pooled.with_suffix(".md").read_text().split("| all: 1 x 2 (pooled 2: N = 32) |")[1].splitlines()[0]
    assert "±" not in line  # one run: no std over runs
    # bad seeds are refused by the parser, before the zoo is loaded, and append no row
    rows_before = pooled.read_text()
    for bad, message in ((["--seeds", "0,1", "--pool-seeds", "3"], "--pool-seeds 3: must be >= 1 and divide the 2 seeds"),
                         (["--seeds", "0,x"], "--seeds '0,x': give comma-separated integers")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            bench.main([*argv[:-1], str(pooled), *bad])
        assert message in capsys.readouterr().err
    assert pooled.read_text() == rows_before


def test_score_fusion_combinations():
    """The pure pieces of benchmarks/score_fusion.py: z-sums and ranks over teachers, the teachers'
    disagreement, and the control-normalised binary rule judging each control against the others."""
    import numpy as np

    from benchmarks.score_fusion import combine, control_normalised_rates, ranks, teacher_disagreement, zscore

    v = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    z = zscore(v)
    assert np.allclose(z[0], [-1.2247449, 0.0, 1.2247449]) and np.all(z[1] == 0.0)  # a constant row is 0, not NaN
    assert np.allclose(combine("z", [v, 10 * v + 3]), 2 * z)  # scale- and offset-free
    assert np.allclose(ranks(np.array([0.3, 0.1, 0.3])), [1.5, 0.0, 1.5])
    r = combine("rank", [np.array([[0.1, 0.9, 0.5]]), np.array([[0.2, 0.1, 0.9]])])
    assert r.argmax() == 2  # ranks 0+1, 2+0, 1+2
    with pytest.raises(ValueError, match="unknown combination"):
        combine("mean", [v])
    same = np.log(np.full((3, 4, 5), 0.2))
    assert np.allclose(teacher_disagreement(same), 0.0)
    split = np.log(np.array([[[0.98, 0.02]], [[0.02, 0.98]]]))
    assert teacher_disagreement(split)[0] > 0.5  # two confident teachers disagreeing: JS near log 2
    rng = np.random.default_rng(0)
    controls = rng.normal(0.0, 0.1, (6, 3))
    students = rng.normal(0.0, 0.1, (10, 3)) + 5.0 * np.eye(3)[np.arange(10) % 3]  # far above every control
    rates = control_normalised_rates(students, controls)
    # the leave-one-out 90% rule misses the lowest of 10 students by construction (the threshold is the
    # lowest of the other nine); no control comes near
    assert rates["tpr"] == pytest.approx(0.9) and rates["fpr"] == 0.0
    # a control that is as far above the others as the students are is flagged, judged without itself
    outlier = np.vstack([controls, [5.0, 5.0, 5.0]])
    assert control_normalised_rates(students, outlier)["fpr"] == 1 / 7


def test_score_fusion_fusion_rows():
    """fusion_experiments on hand-made per-probe scores: the single rows average the first N probes,
    `N/2 each` is the mean over the first N/2 of each set (absent at N=1), `N of each` sums z-scores."""
    import numpy as np

    from benchmarks.score_fusion import Roles, fusion_experiments, zscore

    rng = np.random.default_rng(1)
    students, controls = ["s0", "s1", "s2", "s3"], ["c0", "c1", "c2"]
    # per[method][run][model] = [K=2, N=10]; method a points every student to teacher 0 on its first 5 probes only
    per = {m: {r: {x: rng.normal(0, 0.01, (2, 10)) for x in students + controls} for r in range(2)} for m in ("a", "b")}
    for r in range(2):
        for x in students:
            per["a"][r][x][0, :5] += 1.0
            per["b"][r][x][1, :] += 0.1  # b points to teacher 1 a little, on every probe
    roles = Roles(np.zeros(4, int), np.array(["kd"] * 4))
    out = fusion_experiments(per, ("a", "b"), students, controls, roles)
    assert set(out) == {1, 10}  # FUSE_NS beyond the 10 probes are skipped
    assert "a + b, N/2 each" not in out[1] and set(out[10]) == {
        "a", "b", "a + b, N/2 each", "z(a) + z(b), N of each", "a, control-normalised", "b, control-normalised"}
    assert out[10]["a"]["accuracy"] == 1.0 and out[10]["b"]["accuracy"] == 0.0
    # N/2 each: a's first 5 (+1.0 on teacher 0) outweigh b's first 5 (+0.1 on teacher 1)
    assert out[10]["a + b, N/2 each"]["accuracy"] == 1.0
    # the z-sum of a (0.5 gap) and b (0.1 gap) is a tie up to the noise: each z-scored row over 2 teachers is +-1
    zs = zscore(np.array([[0.5, 0.0]])) + zscore(np.array([[0.0, 0.1]]))
    assert np.allclose(zs, 0.0)
    assert out[10]["a"]["runs"] == 2 and out[10]["a, control-normalised"]["accuracy"] == 1.0


def test_score_fusion_smoke(toy_zoo, tmp_path):
    """benchmarks/score_fusion.py on the toy zoo: every section is computed, a single-method fusion row
    agrees with detection_accuracy on the same cached probes, and a re-run reads the caches."""
    import numpy as np

    from benchmarks import detection_accuracy as da
    from benchmarks import score_fusion as bench
    from tests.toyzoo import task

    root = toy_zoo["root"]
    manifest = toy_manifest(tmp_path)
    x, _ = task(300, seed=78)
    np.savez(tmp_path / "pools.npz", heldout=x.numpy())
    work = tmp_path / "work"
    argv = ["--zoo", str(root), "--manifest", str(manifest), "--pools", str(tmp_path / "pools.npz"), "--draws", "2",
            "--fuse", "pixel,noise", "--runs", "2", "--steps", "5", "--ceiling-work", str(tmp_path / "ceiling"),
            "--work", str(work), "--out", str(tmp_path / "results"), "--tag", "fusion"]
    assert bench.main(argv) == 0
    out = json.loads((tmp_path / "results" / "fusion.json").read_text())
    pool = out["results"]["pool"]
    assert set(pool["ensembles"]) == {"10", "100"}  # no N=1000 draw from 300 images
    assert set(pool["ensembles"]["10"]) == set(bench.ENSEMBLE_SCORES) | set(bench.ENSEMBLES)
    assert set(pool["selection"]) == {"10"}  # N=100 would need 1000 candidates
    fusion = out["results"]["fusion"]
    assert set(fusion) == {"1", "10", "50", "100"}
    assert set(fusion["100"]) == {"pixel", "noise", "pixel + noise, N/2 each", "z(pixel) + z(noise), N of each",
                                  "pixel, control-normalised", "noise, control-normalised"}
    assert "pixel + noise, N/2 each" not in fusion["1"]  # one probe is not split
    assert len(out["meta"]["zoo_weights"]) == 6 and len(out["meta"]["zoo_weights_sha256"]) == 64
    for rows in (pool["ensembles"]["100"], fusion["100"]):
        for r in rows.values():
            assert r["runs"] == 2 and 0.0 <= r["accuracy"] <= 1.0 and set(r["per_recipe"]) == {"kd"}
    # detection_accuracy on the same work folder reads the same probes: its dark_corr accuracy per N is the fusion row's
    assert da.main(["--zoo", str(root), "--manifest", str(manifest), "--methods", "pixel,noise", "--runs", "2",
                    "--steps", "5", "--work", str(work), "--out", str(tmp_path / "results"), "--tag", "da"]) == 0
    da_out = json.loads((tmp_path / "results" / "da.json").read_text())
    assert sum(q["queries"] for q in da_out["meta"]["queries"].values()) == 0  # every probe came from the cache
    for method in ("pixel", "noise"):
        for n in ("1", "10", "100"):
            assert fusion[n][method]["accuracy"] == \
                da_out["results"][method]["probs"]["dark_corr"][n]["accuracy"]
    md = (tmp_path / "results" / "fusion.md").read_text()
    assert "## Summary (accuracy / AUC)" in md and "## 1. Score ensembles" in md and "| z(all five) |" in md and "## 3-4. Probe-set fusion (pixel, noise" in md
    assert out["meta"]["command"] == "python benchmarks/score_fusion.py " + " ".join(argv)
    assert bench.main(argv) == 0
    assert json.loads((tmp_path / "results" / "fusion.json").read_text())["results"] == out["results"]


def test_results_json_is_strict_json(tmp_path):
    """A rate with nothing to measure it on (nan) or an unbounded ratio (inf) is written as null:
    NaN/Infinity are not JSON and strict readers refuse the whole file."""
    from benchmarks.provenance import write_results

    doc = {"a": float("nan"), "rows": [{"fpr": float("inf"), "tpr": 0.5}, (1, -float("inf"))], "n": 3, "s": "nan"}
    js, md = write_results(tmp_path, "t", doc, "# t\n")
    back = json.loads(js.read_text(), parse_constant=lambda c: pytest.fail(f"{c} written"))
    assert back == {"a": None, "rows": [{"fpr": None, "tpr": 0.5}, [1, None]], "n": 3, "s": "nan"}
    assert md.read_text() == "# t\n" and doc["a"] != doc["a"]  # the caller's document is left as it was
    import numpy as np

    from benchmarks.provenance import finite_or_null  # numpy scalars too (the benchmarks' own writers)
    assert finite_or_null({"x": np.float32("nan"), "y": np.float32(0.5), "n": np.int64(3)}) == {"x": None, "y": 0.5, "n": 3}
