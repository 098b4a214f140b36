"""Score stage: student-vs-teacher similarity scores as pure JAX array functions.

Two families (arXiv 2510.02302, "Scores"):
  pointwise  fn(student_logits [N, C], teacher_logp [N, C], **opts) -> [N]  (higher = closer;
             average or bootstrap over probes downstream). Build teacher_logp with
             `log_probs_from(kind, values, num_classes)` for logits / probs / top-k / label APIs.
  set        fn(X [N, d], Y [N, d'], **opts) -> scalar  (student set vs one teacher's set).

`SCORES` maps a name to Score(fn, kind, higher_is_better) with those uniform signatures, so the
decision stage can loop over names. Many teachers: `jax.vmap(fn, in_axes=(None, 0))` over a
leading teacher axis (on jaxlib 0.10.2's CPU backend that form returned wrong values past 2**15
rows until kdd_jax.xla_workarounds disabled the culprit fusions: import kdd_jax before running
JAX). `jitted(name, **opts)` returns one jitted callable per (name, options), cached, so
repeated audits never recompile for a shape already seen (big_vision's distance evaluator pattern). No sharding here: the mesh stage wraps these functions.

Images (generative students, `kdd_jax.scores.images`): `IMAGE_PAIR_SCORES` maps a name to
fn(a [N,H,W,C], b [N,H,W,C], *, net=None) -> [N] (neg_lpips, ssim, neg_pixel_mse); set scores
on images are the set SCORES above applied to `FeatureNet.embedding(images)`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax

from kdd_jax.scores.pointwise import (
    DEFAULT_LABEL_SMOOTHING,
    DEFAULT_MIN_PROB,
    DIRECTIONS,
    KINDS,
    dark_knowledge_corr,
    inverse_kl_scores,
    kl_per_probe,
    log_probs_from,
    neg_kl_scores,
    top1_agreement,
    top1_scores,
)
from kdd_jax.scores.images import (
    IMAGE_PAIR_SCORES,
    FeatureNet,
    classifier_feature_net,
    default_feature_layers,
    load_lpips_heads,
    lpips_distance,
    neg_lpips,
    neg_pixel_mse,
    ssim,
)
from kdd_jax.scores.setlevel import (
    aligned_cosine_similarity,
    linear_cka,
    median_heuristic_sigma,
    mmd2_rbf,
    mmd_permutation_test,
    rbf_cka,
)


class Score(NamedTuple):
    fn: Callable
    kind: str  # "pointwise" -> [N] per probe; "set" -> scalar per probe set
    higher_is_better: bool = True


def neg_mmd2_rbf(X, Y, *, sigma=None):
    """-MMD^2 (pooled median-heuristic sigma by default): a set score where higher = closer.
    Needs d == d' (both sides in one output space, e.g. class probabilities)."""
    return -mmd2_rbf(X, Y, sigma=sigma)


SCORES: dict[str, Score] = {
    "inverse_kl": Score(inverse_kl_scores, "pointwise"),
    "neg_kl": Score(neg_kl_scores, "pointwise"),
    "top1": Score(top1_scores, "pointwise"),
    "dark_corr": Score(dark_knowledge_corr, "pointwise"),
    "acs": Score(aligned_cosine_similarity, "set"),
    "linear_cka": Score(linear_cka, "set"),
    "rbf_cka": Score(rbf_cka, "set"),
    "neg_mmd2": Score(neg_mmd2_rbf, "set"),
}


@functools.lru_cache(maxsize=None)
def _jitted(name: str, opts: tuple) -> Callable:
    return jax.jit(functools.partial(SCORES[name].fn, **dict(opts)))


def jitted(name: str, **opts) -> Callable:
    """jax.jit(SCORES[name].fn with static `opts` bound), one per (name, opts); jit itself
    then caches one executable per input shape."""
    if name not in SCORES:
        raise KeyError(f"unknown score {name!r}; known: {sorted(SCORES)}")
    return _jitted(name, tuple(sorted(opts.items())))


__all__ = [
    "DEFAULT_LABEL_SMOOTHING", "DEFAULT_MIN_PROB", "DIRECTIONS", "KINDS", "SCORES", "Score",
    "aligned_cosine_similarity", "dark_knowledge_corr", "inverse_kl_scores", "jitted", "kl_per_probe", "linear_cka",
    "log_probs_from", "median_heuristic_sigma", "mmd2_rbf", "mmd_permutation_test",
    "neg_kl_scores", "neg_mmd2_rbf", "rbf_cka", "top1_agreement", "top1_scores",
    # images
    "FeatureNet", "IMAGE_PAIR_SCORES", "classifier_feature_net", "default_feature_layers",
    "load_lpips_heads", "lpips_distance", "neg_lpips", "neg_pixel_mse", "ssim",
]
