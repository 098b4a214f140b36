"""Scores in eager PyTorch, numerically the same as `kdd_jax.scores` (float32).

Every function takes tensors with any leading batch dimensions: [N, C] for one (student,
teacher) pair, or [P, N, C] for P pairs at once, so the benchmark can run both the per-pair loop
a paper's evaluation script would write and a batched call.

    student_logits [..., N, C]   teacher_logp [..., N, C]  ->  per-probe scores [..., N]
    X [..., N, d], Y [..., N, d'] (set-level)              ->  one score per set [...]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_LABEL_SMOOTHING = 0.01
DEFAULT_MIN_PROB = 1e-8


def _f32(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


def _floor_and_normalise(p: torch.Tensor, min_prob: float) -> torch.Tensor:
    p = p.clamp_min(min_prob)
    return p.log() - p.sum(-1, keepdim=True).log()


def log_probs_from(kind: str, values, num_classes: int, *, label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
                   min_prob: float = DEFAULT_MIN_PROB, temperature: float = 1.0) -> torch.Tensor:
    """A teacher API's answer -> log-probabilities [..., C], as `kdd_jax.scores.log_probs_from`:
    logits: log_softmax(z / T); probs: log of p floored at min_prob and renormalised; topk
    (indices, probs): the leftover mass spread over the other classes; labels: 1 - smoothing on the
    label, smoothing / (C - 1) elsewhere. The last three are then tempered by log_softmax(. / T)."""
    C = int(num_classes)
    if kind == "logits":
        return F.log_softmax(_f32(values) / temperature, dim=-1)
    if kind == "probs":
        logp = _floor_and_normalise(_f32(values), min_prob)
    elif kind == "topk":
        idx, pk = values
        idx, pk = torch.as_tensor(idx, dtype=torch.int64), _f32(pk)
        k = idx.shape[-1]
        leftover = (1.0 - pk.sum(-1, keepdim=True)).clamp_min(0.0)
        p = (leftover / max(C - k, 1)).expand(*idx.shape[:-1], C).clone()
        p.scatter_(-1, idx, pk)
        logp = _floor_and_normalise(p, min_prob)
    elif kind == "labels":
        y = torch.as_tensor(values, dtype=torch.int64)
        p = torch.full((*y.shape, C), label_smoothing / max(C - 1, 1), dtype=torch.float32)
        p.scatter_(-1, y.unsqueeze(-1), 1.0 - label_smoothing)
        logp = _floor_and_normalise(p, min_prob)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return F.log_softmax(logp / temperature, dim=-1)


def kl_per_probe(student_logits, teacher_logp, *, direction: str = "teacher_student",
                 temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || q_student) per probe (or KL(q || p) with direction "student_teacher"),
    clamped at 0; 0 * log 0 = 0."""
    ls = F.log_softmax(_f32(student_logits) / temperature, dim=-1)
    lt = _f32(teacher_logp)
    a, b = (lt, ls) if direction == "teacher_student" else (ls, lt)
    pa = a.exp()
    terms = torch.where(pa > 0, pa * (a - b), torch.zeros((), dtype=pa.dtype))
    return terms.sum(-1).clamp_min(0.0)


def neg_kl_scores(student_logits, teacher_logp, *, direction: str = "teacher_student",
                  temperature: float = 1.0) -> torch.Tensor:
    """-KL per probe: higher = more similar."""
    return -kl_per_probe(student_logits, teacher_logp, direction=direction, temperature=temperature)


def dark_knowledge_corr(student_logits, teacher_logp) -> torch.Tensor:
    """Per-probe Pearson correlation, over the classes other than the student's top-1, of the
    student's logits and the teacher's log-probabilities; 0 where either side is constant.
    -inf teacher log-probs become the row's smallest finite value."""
    s, t = _f32(student_logits), _f32(teacher_logp)
    keep = torch.ones_like(s, dtype=torch.bool).scatter_(-1, s.argmax(-1, keepdim=True), False)
    n = keep.sum(-1, keepdim=True)
    finite = torch.isfinite(t)
    row_min = torch.where(finite, t, torch.full((), float("inf"))).amin(-1, keepdim=True)
    t = torch.where(finite, t, torch.where(torch.isfinite(row_min), row_min, torch.zeros(())))
    zero = torch.zeros(())
    sc = torch.where(keep, s - torch.where(keep, s, zero).sum(-1, keepdim=True) / n, zero)
    tc = torch.where(keep, t - torch.where(keep, t, zero).sum(-1, keepdim=True) / n, zero)
    num = (sc * tc).sum(-1)
    den = ((sc * sc).sum(-1) * (tc * tc).sum(-1)).sqrt()
    ok = den > 1e-12
    return torch.where(ok, num / torch.where(ok, den, torch.ones(())), zero)


def linear_cka(X, Y, *, eps: float = 1e-12) -> torch.Tensor:
    """Linear CKA of X [..., N, d] and Y [..., N, d'] (rows are the same probes): column-centre,
    scale each set to unit Frobenius norm, HSIC = ||Xc^T Yc||_F^2 (feature form when N > d + d',
    Gram form otherwise), CKA = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)); 0 if degenerate."""
    X, Y = _f32(X), _f32(Y)
    Xc = X - X.mean(-2, keepdim=True)
    Yc = Y - Y.mean(-2, keepdim=True)
    Xc = Xc / torch.linalg.matrix_norm(Xc).clamp_min(1e-30)[..., None, None]
    Yc = Yc / torch.linalg.matrix_norm(Yc).clamp_min(1e-30)[..., None, None]
    n, dx, dy = X.shape[-2], X.shape[-1], Y.shape[-1]
    if n > dx + dy:
        Xt, Yt = Xc.transpose(-2, -1), Yc.transpose(-2, -1)
        kl = (Xt @ Yc).square().sum((-2, -1))
        kk = (Xt @ Xc).square().sum((-2, -1))
        ll = (Yt @ Yc).square().sum((-2, -1))
        den = (kk * ll).sqrt()
        return torch.where(den > eps, kl / den.clamp_min(eps), torch.zeros(()))
    K, L = Xc @ Xc.transpose(-2, -1), Yc @ Yc.transpose(-2, -1)
    kl = (K * L).sum((-2, -1))
    den = ((K * K).sum((-2, -1)) * (L * L).sum((-2, -1))).sqrt()
    return torch.where(den > eps, kl / den.clamp_min(eps), torch.zeros(()))


SCORES = {"neg_kl": neg_kl_scores, "dark_corr": dark_knowledge_corr, "linear_cka": linear_cka}
