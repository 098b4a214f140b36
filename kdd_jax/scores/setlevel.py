"""Set-level scores: one number for a whole probe set (N > 1).

X is the student's representation of the N probes [N, d], Y a teacher's [N, d'] (row n of both
is probe n). Public functions are pure and already wrapped in `jax.jit` (one compile per shape;
integer options static, float options such as eps and sigma traced); they nest inside jit /
vmap / shard_map unchanged. Everything is computed in float32, and every matmul is pinned to
full precision.

RBF kernel convention (CKA and MMD alike): k(a, b) = exp(-||a - b||^2 / (2 sigma^2)), with the
median heuristic sigma = sqrt(median of the non-zero pairwise squared distances).
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp

# Why HIGHEST: default float32 matmuls on GPU/TPU run in TF32/bf16, which visibly perturbs
# Gram matrices and distances between near-duplicate probes.
_HI = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HI)


def _f32_2d(x, name: str) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, d], got shape {x.shape}")
    return x


def _same_rows(X, Y):
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must describe the same probes: {X.shape[0]} != {Y.shape[0]} rows")


def _centre(x):
    return x - jnp.mean(x, axis=0, keepdims=True)


# ----------------------------------------------------------------------------------------- ACS
@jax.jit
def aligned_cosine_similarity(X, Y, *, eps: float = 1e-8) -> jax.Array:
    """ACS = mean_n cos(Xc_n, (Yc R)_n), R = argmin_{R orthogonal} ||Yc R - Xc||_F.

    Xc, Yc are the column-centred sets; R = U V^T from svd(Yc^T Xc) = U S V^T (orthogonal
    Procrustes). Requires d == d' (an orthogonal R is square). Rows with (near) zero norm get
    cos = 0 (eps guards the division). In [-1, 1]; 1 when Y = s X Q + b (Q orthogonal, s > 0). Note: with N <~ d the alignment has many degrees of freedom, so unrelated
    sets score well above 0; compare teachers at a fixed N and d.
    """
    X, Y = _f32_2d(X, "X"), _f32_2d(Y, "Y")
    _same_rows(X, Y)
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"ACS needs equal feature dims (orthogonal alignment): "
                         f"student d={X.shape[1]} != teacher d'={Y.shape[1]}")
    Xc, Yc = _centre(X), _centre(Y)
    U, _, Vt = jnp.linalg.svd(_mm(Yc.T, Xc), full_matrices=False)
    YR = _mm(Yc, _mm(U, Vt))
    dots = jnp.sum(Xc * YR, axis=-1)
    norms = jnp.linalg.norm(Xc, axis=-1) * jnp.linalg.norm(YR, axis=-1)
    return jnp.mean(dots / jnp.maximum(norms, eps))


# ---------------------------------------------------------------------- distances and sigma
def _sq_dists(A, B) -> jax.Array:
    """Pairwise squared Euclidean distances [n, m], clipped at 0 (expansion rounding)."""
    d = (jnp.sum(A * A, -1)[:, None] + jnp.sum(B * B, -1)[None, :] - 2.0 * _mm(A, B.T))
    return jnp.maximum(d, 0.0)


def _self_sq_dists(X) -> jax.Array:
    # Why centre first: distances are shift-invariant and centring shrinks the norms, which
    # shrinks the cancellation error of |a|^2 + |b|^2 - 2ab. Diagonal forced to exactly 0.
    Xc = _centre(X)
    D = _sq_dists(Xc, Xc)
    return jnp.where(jnp.eye(X.shape[0], dtype=bool), 0.0, D)


@jax.jit
def median_heuristic_sigma(D: jax.Array, *, rel_zero_tol: float = 1e-6) -> jax.Array:
    """sigma = sqrt(median of the non-zero strict-upper-triangle entries of D) (D = sq. dists).

    "Non-zero" means > rel_zero_tol * max(D): float32 expansion leaves duplicates at ~1e-7
    relative, not 0 (duplicates are common: label-only teachers give identical rows). Zeros are
    sorted to the end as +inf and the median is read at the valid count (static shapes, the
    same value as nanmedian over a NaN mask, and much cheaper to compile). If every distance is
    zero the sigma falls back to 1.0 (the kernel is then constant and CKA/MMD are 0 anyway).
    """
    n = D.shape[0]
    iu = np.triu_indices(n, k=1)
    d = D[iu]
    tol = rel_zero_tol * jnp.max(d, initial=0.0)
    valid = d > tol
    s = jnp.sort(jnp.where(valid, d, jnp.inf))
    cnt = jnp.sum(valid)
    lo, hi = jnp.maximum((cnt - 1) // 2, 0), jnp.maximum(cnt // 2, 0)
    med = 0.5 * (s[lo] + s[hi]) if d.size else jnp.float32(jnp.nan)
    ok = (cnt > 0) & jnp.isfinite(med) & (med > 0)
    return jnp.sqrt(jnp.where(ok, med, 1.0))


def _rbf(D, sigma):
    return jnp.exp(-D / (2.0 * jnp.square(jnp.asarray(sigma, jnp.float32))))


# ----------------------------------------------------------------------------------------- CKA
def _centre_gram(K):
    """H K H with H = I - 11^T / N, without forming H."""
    return (K - jnp.mean(K, axis=0, keepdims=True) - jnp.mean(K, axis=1, keepdims=True)
            + jnp.mean(K))


def _cka_from_centred(Kc, Lc, eps: float) -> jax.Array:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC(K, L) = sum(HKH * HLH); 0 if degenerate."""
    kl = jnp.sum(Kc * Lc)
    den = jnp.sqrt(jnp.sum(Kc * Kc) * jnp.sum(Lc * Lc))
    return jnp.where(den > eps, kl / jnp.maximum(den, eps), 0.0)


@jax.jit
def linear_cka(X, Y, *, eps: float = 1e-12) -> jax.Array:
    """Linear CKA: K = X X^T, L = Y Y^T, CKA = HSIC(K,L) / sqrt(HSIC(K,K) HSIC(L,L)).

    HKH = Xc Xc^T, so HSIC(K, L) = ||Xc^T Yc||_F^2; the feature-space form is used when
    N > d + d' (cheaper), the Gram form otherwise; both are exact. Each set is scaled to unit
    Frobenius norm first (CKA is scale-invariant) so float32 4th powers cannot overflow.
    """
    X, Y = _f32_2d(X, "X"), _f32_2d(Y, "Y")
    _same_rows(X, Y)
    Xc, Yc = _centre(X), _centre(Y)
    Xc = Xc / jnp.maximum(jnp.linalg.norm(Xc), 1e-30)
    Yc = Yc / jnp.maximum(jnp.linalg.norm(Yc), 1e-30)
    n, dx, dy = X.shape[0], X.shape[1], Y.shape[1]
    if n > dx + dy:
        kl = jnp.sum(jnp.square(_mm(Xc.T, Yc)))
        kk = jnp.sum(jnp.square(_mm(Xc.T, Xc)))
        ll = jnp.sum(jnp.square(_mm(Yc.T, Yc)))
        den = jnp.sqrt(kk * ll)
        return jnp.where(den > eps, kl / jnp.maximum(den, eps), 0.0)
    return _cka_from_centred(_mm(Xc, Xc.T), _mm(Yc, Yc.T), eps)


@jax.jit
def rbf_cka(X, Y, *, sigma_x=None, sigma_y=None, eps: float = 1e-12) -> jax.Array:
    """Kernel CKA with RBF kernels K_ij = exp(-||x_i - x_j||^2 / (2 sigma_x^2)) (same for L).

    sigma_x / sigma_y default to the median heuristic computed per set (paper). Pass them to
    fix the bandwidth across teachers.
    """
    X, Y = _f32_2d(X, "X"), _f32_2d(Y, "Y")
    _same_rows(X, Y)
    Dx, Dy = _self_sq_dists(X), _self_sq_dists(Y)
    sx = median_heuristic_sigma(Dx) if sigma_x is None else sigma_x
    sy = median_heuristic_sigma(Dy) if sigma_y is None else sigma_y
    return _cka_from_centred(_centre_gram(_rbf(Dx, sx)), _centre_gram(_rbf(Dy, sy)), eps)


# ----------------------------------------------------------------------------------------- MMD
def _pooled(X, Y):
    X, Y = _f32_2d(X, "X"), _f32_2d(Y, "Y")
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"MMD compares samples in one space: d={X.shape[1]} != d'={Y.shape[1]}")
    if X.shape[0] < 2 or Y.shape[0] < 2:
        raise ValueError("unbiased MMD^2 needs at least 2 samples on each side")
    return X, Y, jnp.concatenate([X, Y], axis=0)


@jax.jit
def mmd2_rbf(X, Y, *, sigma=None) -> jax.Array:
    """Unbiased MMD^2 between samples X [n, d] and Y [m, d] (Gretton et al. 2012, eq. 3):

        1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j)
        - 2/(nm) sum_{i,j} k(x_i, y_j).

    Can be slightly negative when the distributions agree. sigma=None: median heuristic on the
    pooled sample (permutation-invariant, so the permutation test stays exact).
    """
    X, Y, Z = _pooled(X, Y)
    n, m = X.shape[0], Y.shape[0]
    Dz = _self_sq_dists(Z)
    s = median_heuristic_sigma(Dz) if sigma is None else sigma
    return _mmd2_from_kernel(_rbf(Dz, s), _assignment(n, m))


def _assignment(n: int, m: int) -> jax.Array:
    return jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((m,), jnp.float32)])


def _mmd2_from_kernel(Kz, a) -> jax.Array:
    """Unbiased MMD^2 for the split a (1 = X side, 0 = Y side) of the pooled kernel Kz.

    Quadratic forms instead of gathering blocks: each permutation costs one O((n+m)^2) matvec.
    """
    b = 1.0 - a
    n, m = jnp.sum(a), jnp.sum(b)
    diag = jnp.diagonal(Kz)
    Ka, Kb = _mm(Kz, a), _mm(Kz, b)
    kxx = (jnp.dot(a, Ka) - jnp.dot(a, diag)) / (n * (n - 1))
    kyy = (jnp.dot(b, Kb) - jnp.dot(b, diag)) / (m * (m - 1))
    kxy = jnp.dot(a, Kb) / (n * m)
    return kxx + kyy - 2.0 * kxy


@functools.partial(jax.jit, static_argnames=("n_permutations",))
def mmd_permutation_test(X, Y, key, *, n_permutations: int = 200, sigma=None):
    """Permutation two-sample test on the unbiased MMD^2. Returns (mmd2, p_value).

    p = (1 + #{permuted stat >= observed}) / (1 + n_permutations): the +1 counts the observed
    split itself, so p is never 0 and the test is exact (valid at any n_permutations). The
    kernel is computed once on the pooled sample (default: pooled median-heuristic sigma,
    which is invariant to relabelling) and permutations are vmapped over label assignments.
    """
    X, Y, Z = _pooled(X, Y)
    n, m = X.shape[0], Y.shape[0]
    Dz = _self_sq_dists(Z)
    s = median_heuristic_sigma(Dz) if sigma is None else sigma
    Kz = _rbf(Dz, s)
    a0 = _assignment(n, m)
    observed = _mmd2_from_kernel(Kz, a0)
    # Why argsort of uniforms: one batched sort gives B uniform random permutations and compiles
    # far faster than B vmapped jax.random.permutation calls.
    perms = jnp.argsort(jax.random.uniform(key, (n_permutations, n + m)), axis=-1)
    perm_stats = jax.vmap(lambda idx: _mmd2_from_kernel(Kz, a0[idx]))(perms)
    p = (1.0 + jnp.sum(perm_stats >= observed)) / (1.0 + n_permutations)
    return observed, p.astype(jnp.float32)
