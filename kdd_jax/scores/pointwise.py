"""Point-wise scores: one number per probe, shape [N], so later code can bootstrap over probes.

All functions are pure functions of arrays, already wrapped in `jax.jit` (string and integer
options are static arguments, float options are traced), so an eager call compiles once per
shape instead of op by op; they nest inside jit / vmap / shard_map unchanged. Everything is
computed in float32.

Teacher answers come in four kinds (see `log_probs_from`); every score below takes the teacher as
log-probabilities [N, C], so one code path serves full-logit, probability, top-k and label APIs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KINDS = ("logits", "probs", "topk", "labels")
DIRECTIONS = ("teacher_student", "student_teacher")

# Default smoothing for label-only teachers: 1% of the mass spread over the other classes.
# Why: a one-hot teacher makes KL(student || teacher) infinite; 0.01 keeps log-ratios bounded
# (log(0.99 (C-1) / 0.01) ~ 7 + log(C-1)) while leaving the argmax essentially unchanged.
DEFAULT_LABEL_SMOOTHING = 0.01
# Floor for reconstructed probabilities. Why: APIs round probabilities (exact zeros happen), and
# one zero makes KL(student || teacher) infinite; 1e-8 is below any rounding an API applies.
DEFAULT_MIN_PROB = 1e-8


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _floor_and_normalise(p: jax.Array, min_prob: float) -> jax.Array:
    """log of p floored at `min_prob` and renormalised to sum to 1 over the last axis."""
    # Why no upper clip: unnormalised rows (e.g. [2, 1, 1]) must keep their ratios.
    p = jnp.maximum(p, min_prob)
    return jnp.log(p) - jnp.log(jnp.sum(p, axis=-1, keepdims=True))


@functools.partial(jax.jit, static_argnames=("kind", "num_classes"))
def log_probs_from(kind: str, values, num_classes: int, *,
                   label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
                   min_prob: float = DEFAULT_MIN_PROB,
                   temperature: float = 1.0) -> jax.Array:
    """Teacher answer -> log-probabilities [..., C] (float32).

    kind:
      "logits": values [..., C]; log_softmax(values / T).
      "probs":  values [..., C]; log(clip(p, min_prob) / sum), then tempered.
      "topk":   values = (indices [..., k] int, probs [..., k]); the leftover mass
                max(1 - sum(probs), 0) is spread uniformly over the C - k other classes,
                then floored at min_prob, renormalised and tempered.
      "labels": values = indices [..., ] int; 1 - label_smoothing on the label,
                label_smoothing / (C - 1) on every other class, floored, renormalised, tempered.
    temperature: T; applied as log_softmax(log p / T). For "logits" and "probs" this is exactly
      softmax(z / T); for "topk"/"labels" it re-softens the reconstructed distribution. Pass the
      same T as `kl_per_probe(temperature=...)` to temper both sides alike.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    C = int(num_classes)
    if kind == "logits":
        z = _f32(values)
        if z.shape[-1] != C:
            raise ValueError(f"logits have {z.shape[-1]} classes, expected num_classes={C}")
        return jax.nn.log_softmax(z / temperature, axis=-1)
    if kind == "probs":
        p = _f32(values)
        if p.shape[-1] != C:
            raise ValueError(f"probs have {p.shape[-1]} classes, expected num_classes={C}")
        logp = _floor_and_normalise(p, min_prob)
    elif kind == "topk":
        idx, pk = values
        idx = jnp.asarray(idx, jnp.int32)
        pk = _f32(pk)
        if idx.shape != pk.shape:
            raise ValueError(f"topk indices {idx.shape} and probs {pk.shape} differ in shape")
        k = idx.shape[-1]
        if k > C:
            raise ValueError(f"top-k with k={k} > num_classes={C}")
        # Why clip at 0: APIs round, so the top-k can sum to slightly more than 1.
        leftover = jnp.maximum(1.0 - jnp.sum(pk, axis=-1, keepdims=True), 0.0)
        fill = leftover / max(C - k, 1)
        base = jnp.broadcast_to(fill, idx.shape[:-1] + (C,))
        p = jnp.put_along_axis(base, idx, pk, axis=-1, inplace=False)
        logp = _floor_and_normalise(p, min_prob)
    else:  # labels
        y = jnp.asarray(values, jnp.int32)
        eps = label_smoothing
        off = eps / max(C - 1, 1)
        p = jnp.where(jax.nn.one_hot(y, C, dtype=jnp.bool_), 1.0 - eps, off).astype(jnp.float32)
        logp = _floor_and_normalise(p, min_prob)
    # Why always re-normalise: keeps T traceable (no Python branch on its value); at T = 1 it
    # only removes float32 rounding left by the renormalisation.
    return jax.nn.log_softmax(logp / temperature, axis=-1)


@functools.partial(jax.jit, static_argnames=("direction",))
def kl_per_probe(student_logits, teacher_logp, *, direction: str = "teacher_student",
                 temperature: float = 1.0) -> jax.Array:
    """KL divergence per probe, shape [N] (nats, >= 0).

    student_logits [N, C] are tempered here: log q = log_softmax(z / T).
    teacher_logp [N, C] must already be tempered (build it with
      `log_probs_from(..., temperature=T)`); a black-box teacher may not return logits at all.
    direction "teacher_student": KL(p_t || q_s) = sum p_t (log p_t - log q_s)  (the usual KD loss);
              "student_teacher": KL(q_s || p_t) = sum q_s (log q_s - log p_t)  (mode-seeking).
    No T^2 factor: that rescales KD gradients, it is irrelevant to a score.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    ls = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
    lt = _f32(teacher_logp)
    a, b = (lt, ls) if direction == "teacher_student" else (ls, lt)
    pa = jnp.exp(a)
    # Why the where: 0 * log 0 = 0 by convention, while 0 * (-inf) would give NaN.
    terms = jnp.where(pa > 0, pa * (a - b), 0.0)
    # Why the clamp: float32 rounding makes KL of identical rows ~ -1e-8, and 1/(KL + eps) must
    # not blow up or change sign.
    return jnp.maximum(jnp.sum(terms, axis=-1), 0.0)


@functools.partial(jax.jit, static_argnames=("direction",))
def inverse_kl_scores(student_logits, teacher_logp, *, direction: str = "teacher_student",
                      temperature: float = 1.0, eps: float = 1e-6) -> jax.Array:
    """Paper's point-wise score s_n = 1 / (KL_n + eps), shape [N]; higher = more similar.

    Kept for fidelity to the paper. Its mean is dominated by the few probes with KL ~ 0 (a probe
    with KL = 0 scores 1/eps = 1e6), so it is eps-sensitive and heavy-tailed; prefer
    `neg_kl_scores` for averaging, bootstrapping and calibration.
    """
    kl = kl_per_probe(student_logits, teacher_logp, direction=direction, temperature=temperature)
    return 1.0 / (kl + eps)


@functools.partial(jax.jit, static_argnames=("direction",))
def neg_kl_scores(student_logits, teacher_logp, *, direction: str = "teacher_student",
                  temperature: float = 1.0) -> jax.Array:
    """s_n = -KL_n, shape [N]; higher = more similar.

    Same per-probe ordering as 1/(KL + eps) (monotone), but linear in KL: bounded per probe
    unless KL is, no eps to choose, and its mean / bootstrap intervals are well behaved, which is
    what calibrating scores across teachers needs.
    """
    return -kl_per_probe(student_logits, teacher_logp, direction=direction, temperature=temperature)


@jax.jit
def top1_agreement(student_logits, teacher_labels) -> jax.Array:
    """1.0 where argmax(student_logits) == teacher_labels, else 0.0; shape [N] float32."""
    s = jnp.argmax(jnp.asarray(student_logits), axis=-1)
    return (s == jnp.asarray(teacher_labels, s.dtype)).astype(jnp.float32)


@jax.jit
def top1_scores(student_logits, teacher_logp) -> jax.Array:
    """`top1_agreement` against argmax(teacher_logp): the registry's uniform (student, teacher_logp)
    signature. For top-k and label teachers the argmax of the reconstruction is the teacher's top-1
    (label smoothing < 1 - 1/C keeps the label on top)."""
    return top1_agreement(student_logits, jnp.argmax(jnp.asarray(teacher_logp), axis=-1))


@jax.jit
def dark_knowledge_corr(student_logits, teacher_logp) -> jax.Array:
    """Per-probe Pearson correlation, over the classes other than the student's top-1, of the
    student's logits and the teacher's log-probabilities; shape [N], in [-1, 1]; higher = closer.

    Hinton's "dark knowledge" is the relative probabilities a model gives the wrong classes; it
    is what soft-label distillation transfers and what independent models disagree on most, while
    the top class is shared by any competent model. Dropping the top class and correlating (shift-
    and scale-invariant) makes the score blind to the confidence level, which differs with the
    distillation temperature and the architecture rather than with the teacher (on the
    Fashion-MNIST zoo it beats -KL on every probe set: benchmarks/results/detection_accuracy.md).
    log_softmax only shifts logits, so teacher logits, probabilities and the student's logits all
    give the same value. A probe where either side is constant over those classes (a label-only
    teacher agreeing with the student) scores 0.
    """
    s = _f32(student_logits)
    t = _f32(teacher_logp)
    keep = ~jax.nn.one_hot(jnp.argmax(s, axis=-1), s.shape[-1], dtype=jnp.bool_)
    n = keep.sum(-1, keepdims=True)
    # -inf log-probabilities (exact zeros) would poison the mean: they become the row's smallest
    # finite value (a fixed floor would flatten confident teachers, whose log-probs go below it)
    finite = jnp.isfinite(t)
    row_min = jnp.min(jnp.where(finite, t, jnp.inf), -1, keepdims=True)
    t = jnp.where(finite, t, jnp.where(jnp.isfinite(row_min), row_min, 0.0))
    sc = jnp.where(keep, s - jnp.sum(jnp.where(keep, s, 0.0), -1, keepdims=True) / n, 0.0)
    tc = jnp.where(keep, t - jnp.sum(jnp.where(keep, t, 0.0), -1, keepdims=True) / n, 0.0)
    num = jnp.sum(sc * tc, -1)
    den = jnp.sqrt(jnp.sum(sc * sc, -1) * jnp.sum(tc * tc, -1))
    # Why the where and not den + eps: a constant side has no ordering to agree with (score 0),
    # while eps would bias every well-defined correlation towards 0 by a scale-dependent amount.
    return jnp.where(den > 1e-12, num / jnp.where(den > 1e-12, den, 1.0), 0.0)
