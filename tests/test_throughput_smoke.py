"""benchmarks/throughput.py runs end to end in --quick mode (16-40 s on 2 cores; in the default run
since its student-vmap variant broke unnoticed while it was marked slow), its PyTorch
reference does the same synthesis as ours (loss trajectories agree), and the reference scores
equal kdd_jax's."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_throughput_quick(tmp_path):
    from benchmarks import throughput

    assert throughput.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "throughput_quick.json").read_text())
    assert res["kind"] == "kdd_jax.benchmark.throughput" and res["settings"]["quick"]
    assert set(res["workloads"]) == {"a", "b", "c", "d"}
    assert len(res["load_average_1_5_15"]["start"]) == 3 and len(res["load_average_1_5_15"]["end"]) == 3
    assert "torch" in res["versions"] and res["machine"]["usable_cpus"] >= 1
    assert res["settings"]["torch_threads"] == res["machine"]["usable_cpus"]

    a = res["workloads"]["a"]
    for row in a["rows"]:
        assert row["jax_steps_s"] > 0 and row["torch_steps_s"] > 0
        assert row["ratio"] == pytest.approx(row["jax_steps_s"] / row["torch_steps_s"])
        assert row["jax_probes_s"] == pytest.approx(row["batch"] * row["jax_steps_s"])
    # the benchmark compares the same work: same init and targets give the same loss trajectory
    for check in a["cross_check"]:
        assert check["ok"], check
        assert check["max_rel_loss_diff"] < 1e-4
        assert len(check["loss_jax"]) == len(check["loss_torch"]) == check["steps"]

    b = res["workloads"]["b"]["rows"][0]
    assert {"jax_loop", "jax_vmap", "torch_loop", "torch_func_vmap"} <= set(b["variants"])
    for name in ("jax_loop", "jax_vmap", "torch_loop"):
        assert b["variants"][name]["student_steps_s"] > 0
    assert b["consistency"]["jax_vmap_vs_loop_max_rel"] < 1e-4
    assert b["consistency"]["torch_vs_jax_max_rel"] < 1e-4

    c = {r["score"]: r for r in res["workloads"]["c"]["rows"]}
    assert set(c) == {"neg_kl", "dark_corr", "linear_cka"}
    for r in c.values():
        assert r["jax_device_inputs_pp_s"] > 0 and r["torch_loop_pp_s"] > 0 and r["max_abs_diff"] < 1e-4

    d = res["workloads"]["d"]
    assert d["jax"]["probes_s"] > 0 and d["torch"]["probes_s"] > 0
    assert set(d["jax"]["stages_s"]) == set(d["torch"]["stages_s"]) == {"synthesis", "queries", "scoring"}

    md = (tmp_path / "throughput_quick.md").read_text()
    for heading in ("## (a)", "## (b)", "## (c)", "## (d)", "Cross-check", "load average"):
        assert heading in md
    assert res["settings"]["workloads_done"] == ["a", "b", "c", "d"]
    assert res["machine"]["torch_device"] == "cpu" and res["machine"]["jax_device_kind"]
    assert "torch on `cpu`" in md


def test_throughput_options(tmp_path, monkeypatch):
    """--tag names the results files; each workload's results are on disk before the next one starts (a
    run cut short on a lent GPU keeps them); workload d refuses a non-CPU torch device before any work."""
    from benchmarks import throughput

    with pytest.raises(SystemExit):
        throughput.main(["--quick", "--workloads", "c,d", "--torch-device", "cuda", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())

    seen = []
    real_c = throughput.workload_c

    def spy_c(s, log):  # when (c) starts, (a)'s results are on disk, beside (not over) the final file
        seen.append(json.loads((tmp_path / "t.partial.json").read_text())["settings"]["workloads_done"])
        seen.append((tmp_path / "t.json").exists())
        return real_c(s, log)

    monkeypatch.setattr(throughput, "workload_c", spy_c)
    assert throughput.main(["--quick", "--workloads", "a,c", "--tag", "t", "--out", str(tmp_path)]) == 0
    assert seen == [["a"], False]
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["settings"]["workloads_done"] == ["a", "c"] and res["settings"]["preset"] == "cpu"
    assert (tmp_path / "t.md").is_file() and not list(tmp_path.glob("t.partial.*"))
    assert not (tmp_path / "throughput_quick.json").exists()
    with pytest.raises(SystemExit):
        throughput.main(["--quick", "--preset", "gpu", "--out", str(tmp_path)])
    if not torch.cuda.is_available():  # a torch device that cannot run is refused before any work
        with pytest.raises(SystemExit):
            throughput.main(["--quick", "--workloads", "c", "--torch-device", "cuda", "--tag", "u", "--out", str(tmp_path)])
        assert not list(tmp_path.glob("u.*"))


def test_reference_scores_equal_kdd_jax():
    import jax.numpy as jnp

    from benchmarks.reference_torch import scores as ts
    from kdd_jax import scores as js

    rng = np.random.default_rng(0)
    P, N, C = 3, 40, 10
    s = (rng.standard_normal((P, N, C)) * 3).astype(np.float32)
    t = (rng.standard_normal((P, N, C)) * 3).astype(np.float32)
    probs = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
    probs[0, :5, :3] = 0.0  # exact zeros from a rounding API
    idx = np.argsort(-probs, -1)[..., :3].astype(np.int32)
    answers = {"logits": t, "probs": probs, "topk": (idx, np.take_along_axis(probs, idx, -1)),
               "labels": probs.argmax(-1).astype(np.int32)}

    def close(a, b, tol=2e-5):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)

    for kind, values in answers.items():
        for temp in (1.0, 2.0):
            jl = js.log_probs_from(kind, values, C, temperature=temp)
            tl = ts.log_probs_from(kind, values, C, temperature=temp)
            close(jl, tl.numpy())
    logp = np.array(js.log_probs_from("probs", probs, C))  # a writable copy (torch.from_numpy)
    for direction in ("teacher_student", "student_teacher"):
        close(js.neg_kl_scores(s, logp, direction=direction),
              ts.neg_kl_scores(torch.from_numpy(s), torch.from_numpy(logp), direction=direction).numpy())
    # dark knowledge: -inf log-probs (exact zeros), and a constant row (score 0)
    with np.errstate(divide="ignore"):
        lt = np.log(probs).astype(np.float32)
    lt[1, 0] = -2.0
    close(js.dark_knowledge_corr(s, lt), ts.dark_knowledge_corr(torch.from_numpy(s), torch.from_numpy(lt)).numpy())
    # linear CKA, both forms (feature form: N > d + d'; Gram form otherwise), per pair and batched
    for n in (N, 8):
        X, Y = s[:, :n], logp[:, :n]
        ref = ts.linear_cka(torch.from_numpy(X), torch.from_numpy(Y)).numpy()
        close([js.linear_cka(jnp.asarray(X[p]), jnp.asarray(Y[p])) for p in range(P)], ref, 1e-5)
        close([ts.linear_cka(torch.from_numpy(X[p]), torch.from_numpy(Y[p])) for p in range(P)], ref, 1e-6)


def test_reference_bn_hooks_match_forward_with_bn_stats(make_student):
    """The forward hooks see the same BN-statistics loss as kdd_jax's functional capture."""
    import jax
    import jax.numpy as jnp

    from benchmarks.reference_torch.synthesis import BNStatisticsHooks, load_torch_student
    from converters import convert_student
    from kdd_jax.models import bn_running_stats, forward_with_bn_stats
    from kdd_jax.synthesis import bn_statistics_loss

    d = make_student("densenet_bc_small")
    tm, _ = load_torch_student(d)
    fm = convert_student(d).model
    x = np.random.default_rng(1).standard_normal((6, 3, 32, 32)).astype(np.float32)
    with BNStatisticsHooks(tm) as hooks:
        t_logits = tm(torch.from_numpy(x))
        t_bn = float(hooks.pop())
    running = bn_running_stats(fm)

    @jax.jit  # jitted: an eager pass through a DenseNet costs seconds of op-by-op dispatch
    def jax_side(xx):
        logits, stats = forward_with_bn_stats(fm, xx)
        return logits, bn_statistics_loss(stats, running), len(stats)

    j_logits, j_bn, n_stats = jax_side(jnp.asarray(x.transpose(0, 2, 3, 1)))
    j_bn = float(j_bn)
    assert hooks.count == int(n_stats) > 0
    np.testing.assert_allclose(np.asarray(j_logits), t_logits.detach().numpy(), rtol=1e-4, atol=1e-4)
    assert j_bn == pytest.approx(t_bn, rel=1e-5)
