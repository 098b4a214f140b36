"""Generative (class-conditional diffusion) students: schedules, seeded noise and samplers.

The white-box side of issue #7: a diffusers UNet2DModel student converted by `converters.convert_unet`
is sampled here with diffusers' scheduler maths (DDPM, DDIM, Euler), classifier-free guidance, and
initial noise that is a documented function of integer seeds, so the student and every teacher can be
run from the same x_T.
"""

from kdd_jax.generative.noise import initial_noise, seeded_normal, step_noise
from kdd_jax.generative.samplers import SamplingError, one_step, sample, to_unit_range
from kdd_jax.generative.schedules import Plan, SchedulerConfig, alphas_cumprod, betas, make_plan, timesteps

__all__ = [
    "Plan",
    "SamplingError",
    "SchedulerConfig",
    "alphas_cumprod",
    "betas",
    "initial_noise",
    "make_plan",
    "one_step",
    "sample",
    "seeded_normal",
    "step_noise",
    "timesteps",
    "to_unit_range",
]
