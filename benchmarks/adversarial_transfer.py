"""Do adversarial examples crafted on the student transfer to its teacher more than to the others?

    python benchmarks/adversarial_transfer.py            # ~15 min on 2 CPU cores from the built zoo

A signal the zoo's detection benchmarks have not tried (issue #4). Distilled surrogates are known
to share their source model's adversarial vulnerabilities more than independently trained models
do (Lukas et al., "Deep Neural Network Fingerprinting by Conferrable Adversarial Examples", ICLR
2021), and the student is white-box: so craft adversarial images on the student alone (L-inf PGD
from real images, untargeted or towards a random other class), send them to every teacher, and ask
which teacher follows the student.

Per (student, teacher), on N Fashion-MNIST test images (no zoo model trained on them):
  transfer   of the images whose student label the attack changed, the share on which the teacher
             now gives the student's new label;
  flip       of those images, the share on which the teacher's label changed at all;
  gain       mean rise of the teacher's log-probability of the student's adversarial label;
  drop       mean fall of the teacher's log-probability of the student's clean label;
  dark_adv   the engine's default score (`dark_corr`) with the adversarial images as probes;
  neg_kl_adv the paper's -KL on them;
  dark_clean `dark_corr` on the clean images (the baseline the attack should beat).
Each is evaluated like detection_ceiling: accuracy and one-vs-rest AUC over the 32 distilled
students, per recipe, how many students' own-teacher excess lies above every independent control's
for that teacher, and how often the pick is a teacher of the student's own architecture family.

Outputs: benchmarks/results/TAG.{md,json} (TAG: --tag, default adversarial_transfer).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.detection_accuracy import (  # noqa: E402
    ZooRoles, add_zoo_arguments, load_zoo, log, pools, read_manifest, weights_id)
from benchmarks.detection_ceiling import detectability  # noqa: E402
from benchmarks.provenance import run_meta, write_results  # noqa: E402
from kdd_jax.evaluation import tie_aware_share, zoo_metrics  # noqa: E402
from kdd_jax.scores.pairs import score_pairs  # noqa: E402

SCORE_KEYS = ("transfer", "flip", "gain", "drop", "dark_adv", "neg_kl_adv", "dark_clean")


def raw_forward(model, config):
    """(jitted f(state, raw NHWC images in [0, 1]) -> logits, state): preprocessing inside, so
    gradients are taken with respect to the raw pixels the attack's budget is measured in."""
    graphdef, state = nnx.split(model)
    pre = config.preprocessing
    mean, std = jnp.asarray(pre.mean, jnp.float32), jnp.asarray(pre.std, jnp.float32)
    lo, hi = pre.value_range

    @jax.jit
    def f(st, x):
        return nnx.merge(graphdef, st)((lo + x * (hi - lo) - mean) / std)

    return f, state


def pgd(f, state, x, eps: float, steps: int, targets=None) -> jax.Array:
    """L-inf PGD on raw images x [N, H, W, C] in [0, 1], step eps/4, `steps` sign-gradient steps:
    away from the model's own label (targets None) or towards `targets` [N]."""
    y = jnp.argmax(f(state, x), -1)
    rows = jnp.arange(len(x))

    def objective(xa):  # ascended
        logp = jax.nn.log_softmax(f(state, xa))
        return jnp.sum(logp[rows, targets]) if targets is not None else -jnp.sum(logp[rows, y])

    grad = jax.jit(jax.grad(objective))
    xa = x
    for _ in range(steps):
        xa = xa + (eps / 4) * jnp.sign(grad(xa))
        xa = jnp.clip(jnp.clip(xa, x - eps, x + eps), 0.0, 1.0)
    return xa


def student_scores(fwd, name: str, teachers: list[str], x0, t_clean: dict, eps: float, steps: int,
                   targeted: bool, seed: int) -> dict:
    """Every SCORE_KEYS row [K] for one student (or control), plus its attack's success rate."""
    f, st = fwd[name]
    n = len(x0)
    rows = jnp.arange(n)
    s_clean_logits = f(st, x0)
    s_clean = jnp.argmax(s_clean_logits, -1)
    targets = None
    if targeted:
        shift = jnp.asarray(np.random.default_rng(seed).integers(1, s_clean_logits.shape[-1], n))
        targets = (s_clean + shift) % s_clean_logits.shape[-1]
    xa = pgd(f, st, x0, eps, steps, targets)
    s_adv_logits = f(st, xa)
    s_adv = jnp.argmax(s_adv_logits, -1)
    moved = s_adv != s_clean
    m = jnp.maximum(moved.sum(), 1)
    t_adv = {t: jax.nn.log_softmax(fwd[t][0](fwd[t][1], xa)) for t in teachers}
    out = {k: [] for k in SCORE_KEYS}
    for t in teachers:
        ta, tc = jnp.argmax(t_adv[t], -1), jnp.argmax(t_clean[t], -1)
        out["transfer"].append(float(jnp.sum((ta == s_adv) & moved) / m))
        out["flip"].append(float(jnp.sum((ta != tc) & moved) / m))
        out["gain"].append(float(jnp.mean(t_adv[t][rows, s_adv] - t_clean[t][rows, s_adv])))
        out["drop"].append(float(jnp.mean(t_clean[t][rows, s_clean] - t_adv[t][rows, s_clean])))
    y_adv = jnp.stack([t_adv[t] for t in teachers])
    y_clean = jnp.stack([t_clean[t] for t in teachers])
    for key, s, y in (("dark_adv", s_adv_logits, y_adv), ("dark_clean", s_clean_logits, y_clean)):
        out[key] = np.asarray(score_pairs("dark_corr", jnp.broadcast_to(s, y.shape), y)).mean(-1).tolist()
    out["neg_kl_adv"] = np.asarray(score_pairs("neg_kl", jnp.broadcast_to(s_adv_logits, y_adv.shape),
                                               y_adv)).mean(-1).tolist()
    return {"scores": out, "attack_success": float(moved.mean()), "linf": float(jnp.max(jnp.abs(xa - x0)))}


def evaluate(rows: dict, zoo: dict, teachers: list[str], students: list[str], controls: list[str]) -> dict:
    labels = np.array([teachers.index(zoo[s][2]["teacher"]) for s in students])
    recipes = [zoo[s][2].get("recipe_id", zoo[s][2].get("recipe", "?")) for s in students]
    family = {n: e.get("family") for n, (_, _, e) in zoo.items()}
    out = {}
    for key in SCORE_KEYS:
        S = np.array([rows[s]["scores"][key] for s in students])
        C = np.array([rows[c]["scores"][key] for c in controls])
        mc = zoo_metrics(S, labels, recipes=recipes)
        own_family = np.array([[family[t] == family[s] for t in teachers] for s in students])
        out[key] = {"accuracy": mc["accuracy"], "auc": mc["auc"],
                    "above_controls": detectability(S, labels, C)["above_controls"],
                    "own_family_pick": tie_aware_share(S, own_family),
                    "per_recipe": dict(sorted(mc["per_recipe"].items()))}
    return out


def markdown(results: list[dict], meta: dict, recipes: list[str]) -> str:
    lines = ["# Adversarial transfer from the student (issue #4)", "",
             f"{meta['date']} · {meta['machine']['cpu_model']} ({meta['machine']['usable_cpus']} CPUs) · jax "
             f"{meta['versions'].get('jax')} · command `{meta['command']}` · {meta['seconds']:.0f} s", "",
             f"{meta['n']} Fashion-MNIST test images per student, L-inf PGD on the student ({meta['steps']} steps of eps/4), "
             f"teachers answer log-probabilities. {meta['students']} distilled students x {meta['teachers']} teachers, "
             f"{meta['controls']} independent controls. Accuracy is tie-aware; AUC one-vs-rest; 'above' = students whose "
             "own-teacher excess (scores centred over the teachers) beats every control's for that teacher; "
             "'own family' = share of picks (tie-aware) that are a teacher of the student's own architecture family "
             "(chance 0.25). `dark_clean` is the same images unattacked: the baseline.", "",
             "| attack | eps | attack success | score | accuracy | AUC | above controls | own family | "
             + " | ".join(recipes) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(recipes)]
    for r in results:
        for key in SCORE_KEYS:
            e = r["eval"][key]
            lines.append(f"| {r['attack']} | {r['eps']} | {r['attack_success_median']:.2f} | `{key}` | "
                         f"{e['accuracy']:.2f} | {e['auc']:.2f} | {e['above_controls']}/{meta['students']} | "
                         f"{e['own_family_pick']:.2f} | " + " | ".join(f"{e['per_recipe'].get(x, float('nan')):.2f}"
                                                                          for x in recipes) + " |")
    lines += ["", "Attack success: median over students of the share of images whose student label the attack changed."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_zoo_arguments(ap)
    ap.add_argument("--n", type=int, default=200, help="test images per student (default 200)")
    ap.add_argument("--eps", default="0.01,0.03,0.1", help="L-inf budgets on [0, 1] pixels")
    ap.add_argument("--attacks", default="untargeted,targeted")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--tag", default="adversarial_transfer")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    attacks = args.attacks.split(",")
    if not set(attacks) <= {"untargeted", "targeted"}:
        ap.error(f"--attacks: {args.attacks!r}; choose from untargeted, targeted")
    try:
        budgets = [float(e) for e in args.eps.split(",")]
    except ValueError:
        ap.error(f"--eps {args.eps!r}: expected comma-separated numbers, e.g. 0.01,0.03")
    if any(not 0 <= e <= 1 for e in budgets) or args.n < 1 or args.steps < 1:
        ap.error("--eps must lie in [0, 1] (pixels are in [0, 1]); --n and --steps must be >= 1")
    manifest = read_manifest(args.manifest)
    log(f"converting {len(manifest['models'])} zoo models")
    zoo = load_zoo(args.zoo, manifest)
    roles = ZooRoles.of(zoo)
    teachers, students, controls = roles.teachers, roles.students, roles.controls
    raw = pools()["aux"].images  # NCHW in [0, 1]
    if args.n > len(raw):
        ap.error(f"--n {args.n}: the pool has {len(raw)} images")
    idx = np.random.default_rng(args.seed).choice(len(raw), args.n, replace=False)
    x0 = jnp.asarray(raw[idx].transpose(0, 2, 3, 1))
    fwd = {n: raw_forward(m, c) for n, (m, c, _) in zoo.items()}
    t_clean = {t: jax.nn.log_softmax(fwd[t][0](fwd[t][1], x0)) for t in teachers}
    results = []
    for attack in attacks:
        for eps in budgets:
            t0 = time.perf_counter()
            rows = {s: student_scores(fwd, s, teachers, x0, t_clean, eps, args.steps, attack == "targeted",
                                      args.seed + 1 + i)
                    for i, s in enumerate(students + controls)}
            ev = evaluate(rows, zoo, teachers, students, controls)
            results.append({"attack": attack, "eps": eps, "eval": ev, "rows": rows,
                            "attack_success_median": float(np.median([rows[s]["attack_success"] for s in students]))})
            log(f"{attack} eps {eps}: {time.perf_counter() - t0:.0f} s; "
                + ", ".join(f"{k} {ev[k]['accuracy']:.2f}" for k in SCORE_KEYS))
    recipes = sorted({zoo[s][2].get("recipe_id", "?") for s in students})
    meta = run_meta(__file__, argv, started, n=args.n, steps=args.steps, seed=args.seed, students=len(students),
                    teachers=len(teachers), controls=len(controls), teacher_names=teachers,
                    zoo_weights={n: weights_id(args.zoo, e) for n, (_, _, e) in zoo.items()})
    write_results(args.out, args.tag, {"meta": meta, "results": results}, markdown(results, meta, recipes))
    log(f"wrote {args.out / args.tag}.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
