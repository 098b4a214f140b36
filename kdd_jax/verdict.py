"""Decide: which teacher, with what confidence (paper stage 3, plus the statistics it lacks).

The winner is the argmax of the mean score. Confidence comes from a paired bootstrap over probes
(the same resampled probes for every teacher, since all teachers answered the same probes):
a percentile interval per teacher, and a one-sided p-value that the winner's margin over the
runner-up is not positive. Works for point-wise scores (per-probe arrays) and set-level scores
(any function of a probe subset), both vectorised over bootstrap replicates with jax.vmap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Verdict:
    teachers: list[str]
    scores: list[float]
    intervals: list[tuple[float, float]]
    winner: str
    runner_up: str | None
    margin: float
    p_value: float  # H0: winner's score <= runner-up's; small = confident
    n_probes: int
    n_bootstrap: int
    confidence: float
    bootstrap: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)  # [n_bootstrap, K] replicates

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "bootstrap"}


def bootstrap_scores(score_fn: Callable[[jax.Array], jax.Array], n: int, *, n_bootstrap: int, seed: int) -> np.ndarray:
    """[n_bootstrap, K]: `score_fn(indices [n]) -> [K]` on probe indices resampled with replacement."""
    idx = jax.random.randint(jax.random.key(seed), (n_bootstrap, n), 0, n)
    if isinstance(score_fn, PointwiseScoreFn):  # one module-level jit: no recompile per detection
        return np.asarray(_bootstrap_means(score_fn.per_probe, idx))
    return np.asarray(jax.jit(jax.vmap(score_fn))(idx))


def decide(teachers: list[str], score_fn: Callable[[jax.Array], jax.Array], n: int, *,
           n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> Verdict:
    """Verdict from `score_fn(indices) -> scores [K]` (higher = more likely the teacher)."""
    if not teachers:
        raise ValueError("no candidate teachers to decide between")
    full = np.asarray(score_fn(jnp.arange(n)))
    boot = bootstrap_scores(score_fn, n, n_bootstrap=n_bootstrap, seed=seed)
    order = np.argsort(-full, kind="stable")
    a = (1 - confidence) / 2
    intervals = [(float(np.quantile(boot[:, k], a)), float(np.quantile(boot[:, k], 1 - a))) for k in range(len(teachers))]
    w = int(order[0])
    if len(teachers) > 1:
        r = int(order[1])
        margins = boot[:, w] - boot[:, r]
        p = float((1 + np.sum(margins <= 0)) / (1 + n_bootstrap))
        runner, margin = teachers[r], float(full[w] - full[r])
    else:
        runner, margin, p = None, float("nan"), float("nan")
    return Verdict(list(teachers), [float(s) for s in full], intervals, teachers[w], runner, margin, p, n,
                   n_bootstrap, confidence, boot)


class PointwiseScoreFn:
    """score_fn for per-probe scores [K, N]: the mean over the chosen probes.

    A class rather than a closure so `bootstrap_scores` can use one module-level jitted function
    with the scores as an argument: a fresh closure per detection recompiled every time (~125 ms
    per detect on CPU, measured by benchmarks/throughput.py)."""

    def __init__(self, per_probe):
        self.per_probe = jnp.asarray(per_probe)

    def __call__(self, idx: jax.Array) -> jax.Array:
        return self.per_probe[:, idx].mean(-1)


@jax.jit
def _bootstrap_means(per_probe: jax.Array, idx: jax.Array) -> jax.Array:
    return jax.vmap(lambda i: per_probe[:, i].mean(-1))(idx)


def pointwise_score_fn(per_probe: np.ndarray) -> PointwiseScoreFn:
    """score_fn for per-probe scores [K, N]: the mean over the chosen probes."""
    return PointwiseScoreFn(per_probe)


def verdict_record(verdict: Verdict, none=None) -> dict:
    """The decision part of a detection record: the answer ("none of the candidates" when a calibration's
    test says so), the verdict and the none-of-the-candidates test (calibration.NoneTest or None)."""
    return {"answer": verdict.winner if none is None else none.answer, "verdict": verdict.to_dict(),
            "none_of_the_candidates": None if none is None else none.to_dict()}
