"""Score stage (kdd_jax.scores) against float64 numpy / scipy references written here.

Tolerances: float32 JAX vs float64 references, 1e-5 relative for closed forms (KL, log-probs),
1e-4 for anything that goes through an SVD, Gram matrices or a median (ACS, CKA, MMD).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.special import log_softmax as np_log_softmax
from scipy.special import rel_entr, softmax

from kdd_jax import scores as S


def rng(seed=0):
    return np.random.default_rng(seed)


def f32(x):
    return np.asarray(x, np.float32)


def random_orthogonal(d, seed):
    q, r = np.linalg.qr(rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ------------------------------------------------------------------------------ numpy references
def ref_acs(X, Y):
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    R, _ = orthogonal_procrustes(Yc, Xc)  # argmin ||Yc R - Xc||_F
    YR = Yc @ R
    cos = np.sum(Xc * YR, 1) / (np.linalg.norm(Xc, axis=1) * np.linalg.norm(YR, axis=1))
    return cos.mean()


def ref_sq_dists(A, B):
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    D = np.zeros((len(A), len(B)))
    for i in range(len(A)):
        for j in range(len(B)):
            D[i, j] = np.sum((A[i] - B[j]) ** 2)
    return D


def ref_median_sigma(D):
    n = len(D)
    vals = [D[i, j] for i in range(n) for j in range(i + 1, n) if D[i, j] > 0]
    return np.sqrt(np.median(vals))


def ref_cka(K, L):
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    Kc, Lc = H @ K @ H, H @ L @ H
    return np.sum(Kc * Lc) / np.sqrt(np.sum(Kc * Kc) * np.sum(Lc * Lc))


def ref_linear_cka(X, Y):
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    return ref_cka(X @ X.T, Y @ Y.T)


def ref_rbf_cka(X, Y, sx=None, sy=None):
    Dx, Dy = ref_sq_dists(X, X), ref_sq_dists(Y, Y)
    sx = ref_median_sigma(Dx) if sx is None else sx
    sy = ref_median_sigma(Dy) if sy is None else sy
    return ref_cka(np.exp(-Dx / (2 * sx**2)), np.exp(-Dy / (2 * sy**2)))


def ref_mmd2(X, Y, sigma=None):
    Z = np.concatenate([X, Y]).astype(np.float64)
    if sigma is None:
        sigma = ref_median_sigma(ref_sq_dists(Z, Z))
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))  # noqa: E731
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    n, m = len(X), len(Y)
    kxx = sum(k(X[i], X[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(Y[i], Y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(X[i], Y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


# ------------------------------------------------------------------------------- log_probs_from
def test_log_probs_logits_and_probs():
    z = rng(0).normal(size=(6, 5)) * 3
    for T in (1.0, 2.5):
        want = np_log_softmax(z / T, axis=-1)
        got = S.log_probs_from("logits", f32(z), 5, temperature=T)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # probs = softmax(z): tempering log p / T is exactly softmax(z / T)
        got_p = S.log_probs_from("probs", f32(softmax(z, -1)), 5, temperature=T)
        np.testing.assert_allclose(got_p, want, rtol=1e-5, atol=1e-5)
    # probs with exact zeros and unnormalised rows: finite, floored, normalised
    p = np.array([[0.7, 0.3, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0]], np.float32)
    lp = np.asarray(S.log_probs_from("probs", p, 4))
    assert np.all(np.isfinite(lp))
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.exp(lp[1, :3]), [0.5, 0.25, 0.25], rtol=1e-6)
    assert np.exp(lp[0, 2]) == pytest.approx(S.DEFAULT_MIN_PROB, rel=1e-3)


def test_log_probs_topk_mass_conservation():
    C, k = 10, 3
    full = softmax(rng(1).normal(size=(8, C)) * 2, -1)
    idx = np.argsort(-full, -1)[:, :k]
    pk = np.take_along_axis(full, idx, -1)
    lp = np.asarray(S.log_probs_from("topk", (idx, f32(pk)), C))
    p = np.exp(lp.astype(np.float64))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(p, idx, -1), pk, rtol=1e-5)
    # the leftover mass is uniform over the other C - k classes
    others = np.ones_like(p, bool)
    np.put_along_axis(others, idx, False, -1)
    want_other = (1 - pk.sum(-1)) / (C - k)
    np.testing.assert_allclose(p[others].reshape(8, C - k), np.repeat(want_other[:, None], C - k, 1),
                               rtol=1e-4)
    # a rounded top-k that sums past 1: others at the floor, still a distribution, order kept
    lp2 = np.asarray(S.log_probs_from("topk", (np.array([[2, 0]]), f32([[0.8, 0.25]])), 4))
    p2 = np.exp(lp2.astype(np.float64))[0]
    np.testing.assert_allclose(p2.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p2[[2, 0]], [0.8 / 1.05, 0.25 / 1.05], rtol=1e-5)
    assert p2[1] < 1e-7 and p2[3] < 1e-7
    # top-k over all classes is just the (renormalised) probabilities
    lp3 = S.log_probs_from("topk", (np.array([[1, 0, 2]]), f32([[0.5, 0.3, 0.2]])), 3)
    np.testing.assert_allclose(np.exp(lp3), [[0.3, 0.5, 0.2]], rtol=1e-5)


def test_log_probs_labels_smoothing():
    y = np.array([0, 3, 1])
    C = 5
    p = np.exp(np.asarray(S.log_probs_from("labels", y, C), np.float64))
    eps = S.DEFAULT_LABEL_SMOOTHING
    want = np.full((3, C), eps / (C - 1))
    want[np.arange(3), y] = 1 - eps
    np.testing.assert_allclose(p, want, rtol=1e-5)
    p2 = np.exp(np.asarray(S.log_probs_from("labels", y, C, label_smoothing=0.2), np.float64))
    assert p2[1, 3] == pytest.approx(0.8, rel=1e-5) and p2[1, 0] == pytest.approx(0.05, rel=1e-5)
    # no smoothing: the floor keeps every log-probability finite
    lp0 = np.asarray(S.log_probs_from("labels", y, C, label_smoothing=0.0))
    assert np.all(np.isfinite(lp0)) and lp0[0, 0] > -1e-6


def test_log_probs_rejects_bad_input():
    with pytest.raises(ValueError, match="kind"):
        S.log_probs_from("logprobs", np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="num_classes"):
        S.log_probs_from("logits", np.zeros((2, 3)), 4)
    with pytest.raises(ValueError, match="shape"):
        S.log_probs_from("topk", (np.zeros((2, 2), int), np.zeros((2, 3))), 4)
    with pytest.raises(ValueError, match="direction"):
        S.kl_per_probe(np.zeros((2, 3)), np.zeros((2, 3)), direction="both")


# ------------------------------------------------------------------------------------------ KL
@pytest.mark.parametrize("direction", S.DIRECTIONS)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kl_per_probe_vs_scipy(direction, T):
    r = rng(2)
    zs, zt = r.normal(size=(7, 6)) * 2, r.normal(size=(7, 6)) * 2
    ps, pt = softmax(zs / T, -1), softmax(zt / T, -1)
    want = (rel_entr(pt, ps) if direction == "teacher_student" else rel_entr(ps, pt)).sum(-1)
    t_logp = S.log_probs_from("logits", f32(zt), 6, temperature=T)
    got = S.kl_per_probe(f32(zs), t_logp, direction=direction, temperature=T)
    assert got.shape == (7,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_kl_directions_differ_and_zero_for_identical():
    r = rng(3)
    zs, zt = f32(r.normal(size=(5, 4)) * 3), f32(r.normal(size=(5, 4)))
    t_logp = S.log_probs_from("logits", zt, 4)
    a = S.kl_per_probe(zs, t_logp, direction="teacher_student")
    b = S.kl_per_probe(zs, t_logp, direction="student_teacher")
    assert not np.allclose(a, b, rtol=1e-2)
    same = S.kl_per_probe(zs, S.log_probs_from("logits", zs, 4))
    assert np.all(np.asarray(same) >= 0) and np.all(np.asarray(same) < 1e-6)


def test_inverse_and_neg_kl_rank_identical_above_different():
    r = rng(4)
    zs = f32(r.normal(size=(10, 8)) * 2)
    same = S.log_probs_from("logits", zs, 8)
    close = S.log_probs_from("logits", zs + f32(r.normal(size=zs.shape) * 0.1), 8)
    other = S.log_probs_from("logits", f32(r.normal(size=zs.shape) * 2), 8)
    for direction in S.DIRECTIONS:
        inv = [np.asarray(S.inverse_kl_scores(zs, t, direction=direction)) for t in (same, close, other)]
        neg = [np.asarray(S.neg_kl_scores(zs, t, direction=direction)) for t in (same, close, other)]
        assert np.all(inv[0] > inv[1]) and np.all(inv[1] > inv[2])
        assert np.all(neg[0] >= neg[1]) and np.all(neg[1] > neg[2])
        # identical distributions: KL clamped at 0, so the score is exactly 1/eps
        np.testing.assert_allclose(inv[0], 1e6, rtol=1e-3)
        # same per-probe ordering (monotone transform of one KL)
        np.testing.assert_allclose(1.0 / (-neg[2] + 1e-6), inv[2], rtol=1e-5)
    assert S.inverse_kl_scores(zs, other, eps=1.0).max() < 1.0


def test_top1_agreement_exact_counts():
    logits = np.array([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 3.0, 2.0]], np.float32)
    labels = np.array([1, 2, 2, 0])
    got = np.asarray(S.top1_agreement(logits, labels))
    np.testing.assert_array_equal(got, [1.0, 0.0, 1.0, 0.0])
    assert got.dtype == np.float32
    r = rng(5)
    z = f32(r.normal(size=(200, 7)))
    y = r.integers(0, 7, 200)
    assert int(np.asarray(S.top1_agreement(z, y)).sum()) == int((z.argmax(-1) == y).sum())
    # the registry form takes the teacher as log-probs, from any answer kind
    t = S.log_probs_from("labels", labels, 3)
    np.testing.assert_array_equal(S.top1_scores(logits, t), [1.0, 0.0, 1.0, 0.0])


def _np_dark_corr(z, t_logp):
    out = []
    for zi, ti in zip(np.asarray(z, np.float64), np.asarray(t_logp, np.float64)):
        keep = np.arange(len(zi)) != zi.argmax()
        a, b = zi[keep], ti[keep]
        out.append(0.0 if a.std() == 0 or b.std() == 0 else np.corrcoef(a, b)[0, 1])
    return np.asarray(out)


def test_dark_knowledge_corr_vs_numpy_and_invariances():
    r = rng(11)
    z = f32(r.normal(size=(50, 10)) * 3)
    t = np.asarray(S.log_probs_from("logits", f32(r.normal(size=(50, 10))), 10))
    got = np.asarray(S.dark_knowledge_corr(z, t))
    np.testing.assert_allclose(got, _np_dark_corr(z, t), rtol=1e-4, atol=1e-5)
    assert got.shape == (50,) and np.all(np.abs(got) <= 1 + 1e-6)
    # blind to the confidence level: shifting or positively rescaling either side changes nothing
    np.testing.assert_allclose(S.dark_knowledge_corr(2.5 * z + 7.0, t), got, rtol=1e-4, atol=1e-5)
    t_cold = np.asarray(S.log_probs_from("logits", f32(r.normal(size=(50, 10))), 10, temperature=0.3))
    t_hot = np.asarray(S.log_probs_from("logits", f32(r.normal(size=(50, 10))), 10, temperature=3.0))
    np.testing.assert_allclose(S.dark_knowledge_corr(z, t_cold), _np_dark_corr(z, t_cold), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(S.dark_knowledge_corr(z, t_hot), _np_dark_corr(z, t_hot), rtol=1e-4, atol=1e-5)
    # a teacher that is the student at another temperature scores 1; its mirror image -1
    np.testing.assert_allclose(S.dark_knowledge_corr(z, S.log_probs_from("logits", z, 10, temperature=4.0)), 1.0,
                               atol=1e-5)
    mirrored = z.copy()
    keep = np.arange(10)[None] != z.argmax(-1)[:, None]
    mirrored[keep] = -z[keep]
    mirrored[~keep] = 100.0  # the same top class, the other classes in reverse order
    np.testing.assert_allclose(S.dark_knowledge_corr(z, S.log_probs_from("logits", f32(mirrored), 10)), -1.0,
                               atol=1e-5)
    # the top class does not count: changing only the student's top-class logit changes nothing
    bumped = z.copy()
    bumped[np.arange(50), z.argmax(-1)] += 50.0
    np.testing.assert_allclose(S.dark_knowledge_corr(bumped, t), got, rtol=1e-4, atol=1e-5)


def test_dark_knowledge_corr_degenerate_teachers_score_zero_not_nan():
    z = f32([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -1.0]])
    # label-only teacher agreeing with the student: constant over the other classes
    t = S.log_probs_from("labels", np.array([0, 1]), 4)
    np.testing.assert_array_equal(np.asarray(S.dark_knowledge_corr(z, t)), [0.0, 0.0])
    # exact zeros in a probability answer (-inf log-probs) stay finite
    # (a zero takes the row's smallest finite log-prob: row 0 becomes constant, row 1 ordered)
    with np.errstate(divide="ignore"):
        t0 = np.log(f32([[0.7, 0.3, 0.0, 0.0], [0.1, 0.6, 0.3, 0.0]]))
    got = np.asarray(S.dark_knowledge_corr(z, t0))
    want1 = np.corrcoef([0.0, 1.0, -1.0], np.log([0.1, 0.3, 0.1]))[0, 1]
    np.testing.assert_allclose(got, [0.0, want1], rtol=1e-5)


# ------------------------------------------------------------------------------------------ ACS
@pytest.mark.parametrize("shape", [(60, 4), (30, 8), (6, 10), (12, 12)])
def test_acs_vs_scipy_procrustes(shape):
    N, d = shape
    r = rng(6)
    X = r.normal(size=(N, d))
    Y = X @ random_orthogonal(d, 7) * 0.5 + r.normal(size=(N, d)) + 3.0
    got = float(S.aligned_cosine_similarity(f32(X), f32(Y)))
    assert got == pytest.approx(ref_acs(X, Y), abs=1e-4)
    Yind = r.normal(size=(N, d))
    assert float(S.aligned_cosine_similarity(f32(X), f32(Yind))) == pytest.approx(ref_acs(X, Yind), abs=1e-4)


def test_acs_invariance_and_noise():
    r = rng(8)
    X = f32(r.normal(size=(200, 6)))
    Q = f32(random_orthogonal(6, 9))
    assert float(S.aligned_cosine_similarity(X, X @ Q)) == pytest.approx(1.0, abs=1e-5)
    assert float(S.aligned_cosine_similarity(X, 2.0 * X @ Q + 5.0)) == pytest.approx(1.0, abs=1e-5)
    noise = float(S.aligned_cosine_similarity(X, f32(r.normal(size=X.shape))))
    noisy_copy = float(S.aligned_cosine_similarity(X, X @ Q + f32(r.normal(size=X.shape)) * 0.3))
    assert noise < 0.3 < 0.9 < noisy_copy


def test_acs_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="feature dims"):
        S.aligned_cosine_similarity(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="same probes"):
        S.aligned_cosine_similarity(np.zeros((5, 3)), np.zeros((6, 3)))


# ------------------------------------------------------------------------------------------ CKA
# (N, d, d'): N > d + d' takes linear_cka's feature-space path, the others its Gram path.
@pytest.mark.parametrize("shape", [(40, 5, 3), (12, 8, 20), (9, 4, 4)])
def test_cka_vs_numpy_reference(shape):
    N, d, e = shape
    r = rng(10)
    X = r.normal(size=(N, d))
    Y = np.tanh(X @ r.normal(size=(d, e))) + 0.5 * r.normal(size=(N, e))
    np.testing.assert_allclose(S.linear_cka(f32(X), f32(Y)), ref_linear_cka(X, Y), rtol=1e-4)
    np.testing.assert_allclose(S.rbf_cka(f32(X), f32(Y)), ref_rbf_cka(X, Y), rtol=1e-4)
    np.testing.assert_allclose(S.rbf_cka(f32(X), f32(Y), sigma_x=1.5, sigma_y=0.7),
                               ref_rbf_cka(X, Y, 1.5, 0.7), rtol=1e-4)


def test_rbf_cka_median_excludes_duplicate_rows():
    # label-only teachers give many identical rows: zero distances must not enter the median
    r = rng(11)
    X = r.normal(size=(15, 4))
    # 15 rows, 9 of them one repeated point (36 of 105 pairs at distance 0), offset to stress
    # the |a|^2 + |b|^2 - 2ab expansion
    Y = np.concatenate([np.repeat(r.normal(size=(1, 3)), 9, 0), r.normal(size=(6, 3))]) + 10.0
    Dy = ref_sq_dists(Y, Y)
    assert np.median(Dy[np.triu_indices(15, 1)]) < 0.8 * ref_median_sigma(Dy) ** 2  # exclusion matters
    np.testing.assert_allclose(S.median_heuristic_sigma(jnp.asarray(f32(Dy))), ref_median_sigma(Dy), rtol=1e-6)
    # on accelerators the expansion leaves duplicates at ~1e-7 relative instead of 0: still excluded
    fuzz = np.where((Dy == 0) & ~np.eye(15, dtype=bool), 2e-7 * Dy.max(), 0.0)
    np.testing.assert_allclose(S.median_heuristic_sigma(jnp.asarray(f32(Dy + fuzz))), ref_median_sigma(Dy), rtol=1e-6)
    np.testing.assert_allclose(S.rbf_cka(f32(X), f32(Y)), ref_rbf_cka(X, Y), rtol=1e-4)
    # all-identical set: degenerate kernel, defined as 0 rather than NaN
    assert float(S.rbf_cka(f32(X), np.ones((15, 3), np.float32))) == 0.0


def test_cka_self_and_invariances():
    r = rng(12)
    X = f32(r.normal(size=(25, 6)))
    assert float(S.linear_cka(X, X)) == pytest.approx(1.0, abs=1e-5)
    assert float(S.rbf_cka(X, X)) == pytest.approx(1.0, abs=1e-5)
    Q = f32(random_orthogonal(6, 13))
    base = float(S.linear_cka(X, f32(np.tanh(X))))
    assert base < 0.99
    for Xt in (X @ Q, 7.5 * X, 0.01 * X @ Q + 3.0):
        assert float(S.linear_cka(Xt, f32(np.tanh(X)))) == pytest.approx(base, abs=1e-5)
        assert float(S.linear_cka(X, Xt)) == pytest.approx(1.0, abs=1e-5)
    # RBF CKA with median sigma is invariant to orthogonal maps and isotropic scaling as well
    assert float(S.rbf_cka(X, 3.0 * X @ Q)) == pytest.approx(1.0, abs=1e-5)
    assert float(S.linear_cka(X, f32(r.normal(size=(25, 6))))) < 0.6


# ------------------------------------------------------------------------------------------ MMD
def test_mmd2_unbiased_vs_numpy():
    r = rng(14)
    X, Y = r.normal(size=(12, 3)), r.normal(size=(9, 3)) + 0.5
    np.testing.assert_allclose(S.mmd2_rbf(f32(X), f32(Y), sigma=1.3), ref_mmd2(X, Y, 1.3), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(S.mmd2_rbf(f32(X), f32(Y)), ref_mmd2(X, Y), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="one space"):
        S.mmd2_rbf(np.zeros((4, 3)), np.zeros((4, 2)))


def test_mmd_permutation_test_same_vs_different():
    r = rng(15)
    X = f32(r.normal(size=(40, 4)))
    Ysame = f32(r.normal(size=(30, 4)))
    Ydiff = f32(r.normal(size=(30, 4)) + 0.8)
    key = jax.random.key(0)
    test = jax.jit(functools.partial(S.mmd_permutation_test, n_permutations=200))
    stat, p = test(X, Ysame, key)
    assert float(p) > 0.05
    np.testing.assert_allclose(stat, S.mmd2_rbf(X, Ysame), rtol=1e-5, atol=1e-7)
    stat_d, p_d = test(X, Ydiff, key)
    assert float(p_d) <= 0.02 and float(stat_d) > float(stat)
    # p lives on the grid (1 + j) / (1 + B)
    for pv in (p, p_d):
        j = float(pv) * 201 - 1
        assert abs(j - round(j)) < 1e-3 and 0 <= round(j) <= 200


def test_mmd_permutation_p_values_roughly_uniform_under_null():
    # 40 independent null data sets in one vmapped call: a valid test rejects ~5% at 0.05
    r = rng(16)
    Xs, Ys = f32(r.normal(size=(40, 15, 2))), f32(r.normal(size=(40, 15, 2)))
    keys = jax.random.split(jax.random.key(1), 40)
    _, ps = jax.jit(jax.vmap(functools.partial(S.mmd_permutation_test, n_permutations=100)))(Xs, Ys, keys)
    ps = np.asarray(ps)
    assert 0.3 < ps.mean() < 0.7
    assert (ps <= 0.05).mean() <= 0.15


# --------------------------------------------------------------------- jit / vmap over teachers
K_TEACHERS = 3


def _pointwise_case():
    r = rng(20)
    zs = f32(r.normal(size=(8, 5)))
    t_logits = f32(r.normal(size=(K_TEACHERS, 8, 5)))
    t_logp = jnp.stack([S.log_probs_from("logits", t, 5) for t in t_logits])
    return zs, t_logp


def _set_case(dy=4):
    r = rng(21)
    X = f32(r.normal(size=(10, 4)))
    Ys = f32(X @ r.normal(size=(4, dy)) + r.normal(size=(K_TEACHERS, 10, dy)))
    return X, Ys


SET_CASES = {
    "acs": lambda X, Y: S.aligned_cosine_similarity(X, Y),
    "linear_cka": lambda X, Y: S.linear_cka(X, Y),
    "rbf_cka": lambda X, Y: S.rbf_cka(X, Y),
    "rbf_cka_fixed_sigma": lambda X, Y: S.rbf_cka(X, Y, sigma_x=1.0, sigma_y=2.0),
    "mmd2": lambda X, Y: S.mmd2_rbf(X, Y),
    "mmd_test": lambda X, Y: S.mmd_permutation_test(X, Y, jax.random.key(3), n_permutations=50),
}

POINTWISE_CASES = {
    "kl_ts": functools.partial(S.kl_per_probe, direction="teacher_student", temperature=2.0),
    "kl_st": functools.partial(S.kl_per_probe, direction="student_teacher"),
    "inverse_kl": functools.partial(S.inverse_kl_scores, eps=1e-3),
    "neg_kl": S.neg_kl_scores,
    "top1": S.top1_scores,
    "top1_labels": lambda zs, t: S.top1_agreement(zs, jnp.argmax(t, -1)),
    "dark_corr": S.dark_knowledge_corr,
}


def _check_jit_vmap(fn, student, teachers):
    loop = [fn(student, t) for t in teachers]
    jitted = jax.jit(fn)
    batched = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(student, teachers)
    for k, want in enumerate(loop):
        jax.tree.map(lambda w, g: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6),
                     want, jitted(student, teachers[k]))
        jax.tree.map(lambda w, g, k=k: np.testing.assert_allclose(g[k], w, rtol=1e-5, atol=1e-6),
                     want, batched)


@pytest.mark.parametrize("name", sorted(POINTWISE_CASES))
def test_pointwise_jit_and_teacher_vmap(name):
    zs, t_logp = _pointwise_case()
    _check_jit_vmap(POINTWISE_CASES[name], zs, t_logp)


@pytest.mark.parametrize("name", sorted(SET_CASES))
def test_setlevel_jit_and_teacher_vmap(name):
    X, Ys = _set_case()
    _check_jit_vmap(SET_CASES[name], X, Ys)


def test_cka_vmap_with_other_teacher_width():
    X, Ys = _set_case(dy=7)
    _check_jit_vmap(lambda a, b: S.linear_cka(a, b), X, Ys)
    _check_jit_vmap(lambda a, b: S.rbf_cka(a, b), X, Ys)


@pytest.mark.parametrize("kind", S.KINDS)
def test_log_probs_from_jit_and_teacher_vmap(kind):
    r = rng(22)
    C = 6
    if kind in ("logits", "probs"):
        v = f32(r.normal(size=(K_TEACHERS, 5, C)))
        v = f32(softmax(v, -1)) if kind == "probs" else v
    elif kind == "topk":
        v = (r.integers(0, C, (K_TEACHERS, 5, 1)) + np.arange(2)) % C, f32(r.uniform(0.1, 0.4, (K_TEACHERS, 5, 2)))
    else:
        v = r.integers(0, C, (K_TEACHERS, 5))
    fn = functools.partial(S.log_probs_from, kind, num_classes=C, temperature=1.5)
    batched = jax.jit(jax.vmap(fn))(v)
    for k in range(K_TEACHERS):
        vk = jax.tree.map(lambda a: a[k], v)
        np.testing.assert_allclose(jax.jit(fn)(vk), fn(vk), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(batched[k], fn(vk), rtol=1e-6, atol=1e-6)


def test_registry_and_cached_jit():
    assert {"inverse_kl", "neg_kl", "top1", "dark_corr", "acs", "linear_cka", "rbf_cka"} <= set(S.SCORES)
    zs, t_logp = _pointwise_case()
    X, Ys = _set_case()
    for name, (fn, kind, higher) in S.SCORES.items():
        assert kind in ("pointwise", "set") and higher is True
        out = fn(zs, t_logp[0]) if kind == "pointwise" else fn(X, Ys[0])
        assert out.shape == ((8,) if kind == "pointwise" else ())
    f = S.jitted("inverse_kl", direction="student_teacher", eps=1e-4)
    assert f is S.jitted("inverse_kl", eps=1e-4, direction="student_teacher")
    np.testing.assert_allclose(f(zs, t_logp[0]),
                               S.inverse_kl_scores(zs, t_logp[0], direction="student_teacher", eps=1e-4),
                               rtol=1e-6)
    with pytest.raises(KeyError):
        S.jitted("nope")


# -- jaxlib 0.10.2 miscompile (kdd_jax/xla_workarounds.py) ----------------------------------------

def test_scores_vmapped_over_teachers_past_2_15_rows_match_a_loop():
    """With the student's outputs shared across teachers (in_axes None) and more than 2**15 rows in
    the batch, jaxlib 0.10.2's YNN fusions returned wrong values for the rows past 32768 (dark_corr
    off by up to 3.8, ACS by 0.02) until kdd_jax disabled them at import."""
    import jax
    import jax.numpy as jnp

    from kdd_jax import xla_workarounds
    from kdd_jax.scores import SCORES

    rng = np.random.default_rng(0)
    for name, K, N in (("dark_corr", 4, 8193), ("acs", 40, 1000)):
        fn = SCORES[name].fn
        s = jnp.asarray(rng.normal(size=(N, 10)).astype(np.float32))
        T = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(K, N, 10)).astype(np.float32)) * 2, -1)
        batched = np.asarray(jax.vmap(fn, in_axes=(None, 0))(s, T))
        loop = np.stack([np.asarray(fn(s, T[k])) for k in range(K)])
        np.testing.assert_allclose(batched, loop, atol=1e-5, err_msg=f"{name}: {xla_workarounds.apply()}")


def test_xla_workaround_is_recorded_and_warns_when_too_late(tmp_path):
    """Reports record the workaround's state; importing kdd_jax after JAX has run a computation on a
    known-bad jaxlib cannot fix XLA_FLAGS any more, and says so."""
    import os
    import subprocess
    import sys

    from kdd_jax import xla_workarounds
    from kdd_jax.versions import versions

    state = xla_workarounds.apply()
    assert versions()["xla_workaround"] == f"{xla_workarounds.FLAG} {state}"
    if xla_workarounds._jaxlib_version() not in xla_workarounds.KNOWN_BAD_JAXLIB:
        assert state == "not needed"
        return
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = ("import warnings, jax.numpy as jnp; jnp.ones(2).sum().block_until_ready()\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); import kdd_jax\n"
            "from kdd_jax import xla_workarounds as x; print(x.apply(), any('39103' in str(i.message) for i in w))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["too", "late", "True"]
    fresh = subprocess.run([sys.executable, "-c", "import kdd_jax, os; print(kdd_jax.xla_workarounds.apply(), "
                            "os.environ['XLA_FLAGS'])"], env=env, capture_output=True, text=True, check=True)
    assert fresh.stdout.split() == ["applied", xla_workarounds.FLAG]
    mine = subprocess.run([sys.executable, "-c", "import kdd_jax; print(kdd_jax.xla_workarounds.apply())"],
                          env={**env, "XLA_FLAGS": f"{xla_workarounds.OPTION}=default"}, capture_output=True,
                          text=True, check=True)
    assert mine.stdout.strip() == f"set by the user ({xla_workarounds.OPTION}=default)"
