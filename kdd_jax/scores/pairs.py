"""Scores for many (student, teacher) pairs at once, split across every device."""

from __future__ import annotations

import functools

import jax

from kdd_jax.distributed import sharded_map


@functools.lru_cache(maxsize=None)
def _pair_fn(name: str, opts: tuple):
    from kdd_jax.scores import SCORES

    fn = SCORES[name].fn
    kwargs = dict(opts)
    return lambda s, t: fn(s, t, **kwargs)


def score_pairs(name: str, student, teacher, *, mesh=None, **opts) -> jax.Array:
    """`SCORES[name]` for P pairs: student [P, N, C] (logits, or features for set scores) and
    teacher [P, N, C] (log-probs / features) -> [P, N] per-probe or [P] set scores."""
    return sharded_map(_pair_fn(name, tuple(sorted(opts.items()))), student, teacher, mesh=mesh)
