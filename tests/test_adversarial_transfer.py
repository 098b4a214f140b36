"""benchmarks/adversarial_transfer.py: the attack stays in its budget and does what it says, and the
scores and their evaluation name a teacher that follows the student (tiny linear models; the
benchmark itself needs the Fashion-MNIST zoo, which CI does not build)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from benchmarks.adversarial_transfer import SCORE_KEYS, evaluate, pgd, student_scores


def _linear(w):
    return (lambda st, x: x.reshape(len(x), -1) @ st), jnp.asarray(w, jnp.float32)


def test_pgd_stays_in_the_budget_and_moves_labels():
    rng = np.random.default_rng(0)
    f, w = _linear(rng.normal(size=(16, 5)))
    x = jnp.asarray(rng.uniform(0, 1, (64, 4, 4, 1)), jnp.float32)
    y = np.asarray(jnp.argmax(f(w, x), -1))
    for eps in (0.02, 0.3):
        xa = pgd(f, w, x, eps, steps=10)
        assert float(jnp.max(jnp.abs(xa - x))) <= eps + 1e-6
        assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    # a large budget moves (almost) every label; a targeted attack reaches its targets
    assert np.mean(np.asarray(jnp.argmax(f(w, pgd(f, w, x, 0.5, 10)), -1)) != y) > 0.9
    targets = jnp.asarray((y + 1) % 5)
    reached = np.asarray(jnp.argmax(f(w, pgd(f, w, x, 0.5, 10, targets)), -1)) == np.asarray(targets)
    assert reached.mean() > 0.8
    assert np.all(np.asarray(pgd(f, w, x, 0.0, 3)) == np.asarray(x))  # no budget: no change


def test_a_teacher_the_student_copies_wins_every_transfer_score():
    """The 'student' is teacher t0's weights slightly moved: adversarial images made on it transfer to
    t0 and not to an unrelated t1, so t0 wins transfer/flip/gain/drop; evaluate() scores the pick."""
    rng = np.random.default_rng(1)
    w0, w1 = rng.normal(size=(16, 5)), rng.normal(size=(16, 5))
    fwd = {"t0": _linear(w0), "t1": _linear(w1), "s": _linear(w0 + 0.05 * rng.normal(size=w0.shape)),
           "c": _linear(rng.normal(size=(16, 5)))}
    x = jnp.asarray(rng.uniform(0, 1, (128, 4, 4, 1)), jnp.float32)
    import jax

    t_clean = {t: jax.nn.log_softmax(fwd[t][0](fwd[t][1], x)) for t in ("t0", "t1")}
    rows = {n: student_scores(fwd, n, ["t0", "t1"], x, t_clean, 0.1, 10, targeted=False, seed=3) for n in ("s", "c")}
    s = rows["s"]["scores"]
    assert set(s) == set(SCORE_KEYS) and rows["s"]["attack_success"] > 0.3
    for key in ("transfer", "flip", "gain", "drop", "dark_adv", "neg_kl_adv"):
        assert s[key][0] > s[key][1], key
    zoo = {"t0": (None, None, {"role": "teacher", "family": "a"}), "t1": (None, None, {"role": "teacher", "family": "b"}),
           "s": (None, None, {"role": "student", "teacher": "t0", "family": "a", "recipe_id": "kd"}),
           "c": (None, None, {"role": "control", "family": "b"})}
    ev = evaluate(rows, zoo, ["t0", "t1"], ["s"], ["c"])
    assert ev["transfer"]["accuracy"] == 1.0 and ev["transfer"]["per_recipe"] == {"kd": 1.0}
    assert ev["transfer"]["own_family_pick"] == 1.0
