"""Samplers for diffusion students: DDPM (ancestral), DDIM (eta = 0 deterministic, or eta > 0), Euler
(diffusers' EulerDiscreteScheduler), with classifier-free guidance and a one-step path.

    from kdd_jax.generative import SchedulerConfig, initial_noise, sample
    sched = SchedulerConfig.from_file("students/ddpm-fashion")          # scheduler/scheduler_config.json
    x_T = initial_noise(seeds=range(16), shape_hwc=(28, 28, 1))          # the SAME x_T for every model
    images = sample(unet, x_T, scheduler=sched, num_inference_steps=50,
                    class_labels=labels, guidance_scale=3.0)             # [16, 28, 28, 1], model space

Each trajectory is a pure function of (weights, x_T, class label, step seed): the per-trajectory step is
written for ONE sample and `jax.vmap`ped over the seeds, so a batch of trajectories equals the same
trajectories run one by one. One compiled step (`schedules.Plan`: an affine update whose coefficients are
a per-step table) serves every sampler and step count; a Python loop drives it, so no step count or
guidance scale recompiles anything. The loop ends in one device->host transfer (plus one per step with
`return_trajectory`).

Noise. `x_T` is always given explicitly, so student and teachers can share it; `initial_noise(seeds, ...)`
makes it from integer seeds by a documented, JAX-free recipe (`kdd_jax/generative/noise.py`). Stochastic
steps (DDPM, DDIM with eta > 0) need `step_seeds`, one per trajectory: the noise added at step i is
`step_noise(step_seeds, i, ...)` (stream i + 1 of the same recipe), so a PyTorch teacher can replay it.

Classifier-free guidance follows diffusers' pipelines: out = out_uncond + w (out_cond - out_uncond) on the
raw model output; w = 1 is the conditional model alone (one model call per step), w = 0 the unconditional
one. The unconditional branch is the null class, by default the last embedding row (`num_class_embeds - 1`;
see `kdd_jax/models/unet.py`), or `null_class=`.

Few steps: DDIM or Euler with `timestep_spacing="trailing"` (`dataclasses.replace(sched, ...)`) and a small
`num_inference_steps`; `one_step` is the single-step limit, the model's x0 prediction from pure noise at
t = T - 1 (DDIM, trailing, set_alpha_to_one).

Divergence: a trajectory whose state becomes non-finite, or larger in magnitude than `divergence_limit`
times max(1, initial noise scale), raises SamplingError naming the trajectory, step and timestep.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdd_jax.generative.noise import step_noise
from kdd_jax.generative.schedules import SchedulerConfig, make_plan


class SamplingError(RuntimeError):
    """Sampling produced non-finite or runaway values, or was asked for something impossible."""


@functools.partial(jax.jit, static_argnames=("graphdef", "guided"))
def _step(graphdef, state, x, labels, nulls, z, coef, guidance_scale, step, bad, limit, *, guided: bool):
    """One sampling step for every trajectory. x, z [S,H,W,C] (z: zeros for deterministic steps, so every
    sampler shares one compilation); labels/nulls [S] int or None; coef [11] (schedules.COEFFICIENTS);
    bad [S] int32: first diverged step, -1 if none."""
    model = nnx.merge(graphdef, state)
    t, in_scale, p1, p2, q1, q2, clip, cx, cx0, ceps, cz = (coef[i] for i in range(11))

    def one(x, label, null, z):  # a single trajectory: x [H,W,C]
        xin = (x * in_scale)[None]
        if guided:
            out = model(jnp.concatenate([xin, xin]), jnp.stack([t, t]), jnp.stack([label, null]))
            out = out[1] + guidance_scale * (out[0] - out[1])
        else:
            out = model(xin, t[None], None if label is None else label[None])[0]
        x0 = jnp.clip(p1 * x + p2 * out, -clip, clip)
        return cx * x + cx0 * x0 + ceps * (q1 * x + q2 * out) + cz * z

    new = jax.vmap(one)(x, labels, nulls, z)
    flat = new.reshape(new.shape[0], -1)
    diverged = ~jnp.all(jnp.isfinite(flat), axis=1) | (jnp.max(jnp.abs(flat), axis=1) > limit)
    return new, jnp.where((bad < 0) & diverged, step, bad)


def sample(
    model: nnx.Module,
    noise,
    *,
    scheduler: SchedulerConfig,
    num_inference_steps: int,
    class_labels: Sequence[int] | np.ndarray | None = None,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    eta: float = 0.0,
    step_seeds: Sequence[int] | None = None,
    divergence_limit: float | None = 1e3,
    return_trajectory: bool = False,
):
    """Run `scheduler.kind`'s sampler from `noise` [S,H,W,C] (unit Gaussian; scaled by the scheduler's
    initial sigma here). Returns x_0 [S,H,W,C] float32 in model space (usually [-1, 1]; `to_unit_range`
    maps to [0, 1]); with `return_trajectory`, also [num_steps + 1, S, H, W, C] (x_T scaled, then the
    state after each step, as diffusers' `step(...).prev_sample`). `model` is a kdd_jax UNet2DModel;
    `divergence_limit=None` only checks for non-finite values."""
    cfg = model.config
    noise = np.asarray(noise, np.float32)
    if noise.ndim != 4 or noise.shape[-1] != cfg.in_channels:
        raise SamplingError(f"noise must be [S, H, W, C={cfg.in_channels}] (NHWC), got shape {list(noise.shape)}")
    bad_noise = np.flatnonzero(~np.isfinite(noise.reshape(len(noise), -1)).all(axis=1))
    if len(bad_noise):
        raise SamplingError(f"noise of trajectories {bad_noise.tolist()} holds non-finite values")
    n = len(noise)
    plan = make_plan(scheduler, num_inference_steps, eta=eta)
    guided = guidance_scale != 1.0
    labels, nulls = _labels(cfg, n, class_labels, null_class, guided)
    if plan.stochastic:
        if step_seeds is None or len(step_seeds) != n:
            got = None if step_seeds is None else len(step_seeds)
            raise SamplingError(f"{plan.kind} with these settings adds noise at every step: pass step_seeds, "
                                f"one integer per trajectory ({n}); got {got}")
        step_seeds = [int(s) for s in step_seeds]
    graphdef, state = nnx.split(model)
    state = jax.device_put(state)  # converted weights are host arrays: move them once, not every step
    limit = jnp.float32(np.inf if divergence_limit is None else divergence_limit * max(1.0, plan.init_sigma))
    x = jnp.asarray(noise * np.float32(plan.init_sigma))
    bad = jnp.full((n,), -1, jnp.int32)
    coefs = plan.coefficients()
    w = jnp.float32(guidance_scale)
    trajectory = [np.asarray(x)] if return_trajectory else None
    zeros = jnp.zeros_like(x)
    for i in range(plan.num_steps):
        z = jnp.asarray(step_noise(step_seeds, i, noise.shape[1:])) if plan.stochastic else zeros
        x, bad = _step(graphdef, state, x, labels, nulls, z, jnp.asarray(coefs[i]), w, jnp.int32(i), bad, limit,
                       guided=guided)
        if return_trajectory:
            trajectory.append(np.asarray(x))
    bad = np.asarray(bad)
    if (bad >= 0).any():
        which = np.flatnonzero(bad >= 0)
        first = int(bad[which].min())
        raise SamplingError(
            f"{plan.kind} sampling diverged: trajectories {which.tolist()} became non-finite or exceeded "
            f"|x| > {float(limit):.4g} (first at step {first}, timestep {plan.timesteps[first]}); "
            f"guidance_scale={guidance_scale}, num_inference_steps={num_inference_steps}")
    out = np.asarray(x)
    return (out, np.stack(trajectory)) if return_trajectory else out


def one_step(model: nnx.Module, noise, *, scheduler: SchedulerConfig, class_labels=None,
             guidance_scale: float = 1.0, null_class: int | None = None, divergence_limit: float | None = 1e3):
    """The model's (clipped, if the scheduler clips) x0 prediction from pure noise at t = T - 1: one model
    call per trajectory (two with guidance). Equals diffusers' DDIMScheduler with
    timestep_spacing="trailing", set_alpha_to_one=True and one inference step."""
    one = dataclasses.replace(scheduler, kind="ddim", timestep_spacing="trailing", set_alpha_to_one=True)
    return sample(model, noise, scheduler=one, num_inference_steps=1, class_labels=class_labels,
                  guidance_scale=guidance_scale, null_class=null_class, divergence_limit=divergence_limit)


def to_unit_range(x) -> np.ndarray:
    """Model space [-1, 1] -> images in [0, 1], as diffusers' DDPM/DDIM pipelines (x / 2 + 0.5, clamped)."""
    return np.clip(np.asarray(x, np.float32) / 2 + 0.5, 0.0, 1.0)


def _labels(cfg, n: int, class_labels, null_class, guided: bool):
    """(labels [n] int32 or None, null labels [n] int32 or None), validated on the host."""
    k = cfg.num_class_embeds
    if k is None:
        if class_labels is not None or guided or null_class is not None:
            raise SamplingError("the model is unconditional (num_class_embeds is null): no class_labels, "
                                "null_class or guidance (guidance_scale must be 1)")
        return None, None
    if class_labels is None:
        raise SamplingError(f"the model is class-conditional (num_class_embeds={k}): pass class_labels "
                            f"(the null class {k - 1 if null_class is None else null_class} samples unconditionally)")
    labels = np.asarray(class_labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise SamplingError(f"class_labels must be {n} integers (one per trajectory), "
                            f"got {labels.dtype} {list(labels.shape)}")
    null = k - 1 if null_class is None else int(null_class)
    for name, values in (("class_labels", labels), ("null_class", np.asarray([null]))):
        if values.min() < 0 or values.max() >= k:
            raise SamplingError(f"{name} must be in [0, {k}) (num_class_embeds={k}), got {sorted(set(values.tolist()))}")
    nulls = jnp.full((n,), null, jnp.int32) if guided else None
    return jnp.asarray(labels, jnp.int32), nulls
