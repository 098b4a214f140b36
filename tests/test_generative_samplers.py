"""Samplers for diffusion students equal diffusers' scheduler loops on the same model and noise.

One tiny class-conditional diffusers UNet2DModel (3 classes + the null class, attention at 8x8, the
less common config options, bfloat16 weights) is converted once; every sampler runs it from the same seeded x_T, and the reference runs diffusers'
DDPMScheduler / DDIMScheduler / EulerDiscreteScheduler `step` loop on diffusers' own forward, with the
same step noise (DDIM's `variance_noise`; for DDPM, `randn_tensor` patched to return it).

Tolerance: every state x_k of the trajectory within |jax - diffusers| <= 1e-4 max(1, max|x_k|) +
1e-4 |diffusers| (float32; the absolute part scales with the state, which Euler starts at ~600), for
short trajectories (3 to 6 steps; 4 for plain DDIM). Longer ones cannot be held to that on a random
model: its sampling map is expansive, so diffusers' own 6-step DDIM trajectory of this model moves by
2.3e-4 when x_T moves by 1e-6 (and by 1.6e-4 after 4 steps); the forward passes agree to ~1e-6
(tests/test_unet.py) and differences grow from there at the same rate.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from converters import convert_unet
from kdd_jax.config import ConfigError
from kdd_jax.generative import (SamplingError, SchedulerConfig, alphas_cumprod, initial_noise, make_plan, one_step,
                                sample, seeded_normal, step_noise, timesteps, to_unit_range)
from kdd_jax.generative import samplers as samplers_mod
from kdd_jax.models.unet import UNet2DConfig, abstract_unet

RTOL = ATOL = 1e-4
HWC = (16, 16, 1)
NULL = 3
# the less common UNet2DModel options too (tests/test_unet.py's variants_gray16, there marked slow): scale_shift
# time conditioning (the mid attention then has no GroupNorm), exact GELU, one head per attention, its own
# time_embedding_dim, norm_eps 1e-6; saved in bfloat16
UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=8, num_class_embeds=NULL + 1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), resnet_time_scale_shift="scale_shift", act_fn="gelu",
            attention_head_dim=None, time_embedding_dim=40, norm_eps=1e-6)
SEEDS = [0, 1, 2]
LABELS = np.asarray([0, 2, NULL])


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """(converted Flax model, diffusers reference loaded from the same folder)."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**UNET)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("unet") / "student"
    model.to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    result = convert_unet(folder)
    assert set(result.report["dtype"]["source_dtypes"]) == {"bfloat16"}
    return result.model, diffusers.UNet2DModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()


def scheduler_config(sched) -> SchedulerConfig:
    return SchedulerConfig.from_diffusers({"_class_name": type(sched).__name__, **dict(sched.config)})


def diffusers_loop(unet, sched, n_steps, *, guidance_scale=1.0, labels=LABELS, eta=None, monkeypatch=None):
    """diffusers' sampling loop (as its pipelines write it) from initial_noise(SEEDS); the trajectory, NHWC."""
    import torch

    sched.set_timesteps(n_steps)
    x = torch.from_numpy(initial_noise(SEEDS, HWC).transpose(0, 3, 1, 2).copy()) * sched.init_noise_sigma
    lab = torch.from_numpy(labels)
    trajectory = [x.numpy().copy()]
    for i, t in enumerate(sched.timesteps):
        z = torch.from_numpy(step_noise(SEEDS, i, HWC).transpose(0, 3, 1, 2).copy())
        xin = sched.scale_model_input(x, t)
        with torch.no_grad():
            if guidance_scale != 1.0:
                out = unet(torch.cat([xin, xin]), t, class_labels=torch.cat([lab, torch.full_like(lab, NULL)])).sample
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            else:
                out = unet(xin, t, class_labels=lab).sample
        kwargs = {"eta": eta, "variance_noise": z} if eta is not None else {}
        if monkeypatch is not None:  # DDPM draws its own noise: hand it ours
            monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor", lambda *a, **k: z)
        x = sched.step(out, t, x, **kwargs).prev_sample
        trajectory.append(x.numpy().copy())
    return np.stack(trajectory).transpose(0, 1, 3, 4, 2)


def assert_same_trajectory(got, want):
    """Each state k within atol_k + rtol |want| with atol_k = 1e-4 max(1, max |want_k|): float32 rounding
    of a state is relative to its own scale (Euler's first states are ~600 in size, the last ~1)."""
    assert got.shape == want.shape
    err = np.abs(got - want)
    scale = np.maximum(1.0, np.abs(want).reshape(len(want), -1).max(axis=1))
    worst = (err / (ATOL * scale[:, None, None, None, None] + RTOL * np.abs(want))).max()
    print(f"max abs {err.max():.3g} (scale {scale.max():.3g}), max error / tolerance {worst:.3g}")
    assert worst <= 1.0


def test_schedules_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    cases = [
        (diffusers.DDPMScheduler(), 7),
        (diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), 13),
        (diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1), 50),
        (diffusers.DDIMScheduler(num_train_timesteps=100, timestep_spacing="linspace"), 9),
        (diffusers.EulerDiscreteScheduler(), 10),
        (diffusers.EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1, final_sigmas_type="sigma_min"), 6),
        (diffusers.EulerDiscreteScheduler(timestep_spacing="trailing", beta_schedule="scaled_linear"), 4),
    ]
    for sched, n in cases:
        cfg = scheduler_config(sched)
        np.testing.assert_array_equal(alphas_cumprod(cfg), sched.alphas_cumprod.numpy())  # bit for bit
        sched.set_timesteps(n)
        np.testing.assert_array_equal(timesteps(cfg, n), sched.timesteps.numpy())
        plan = make_plan(cfg, n)
        np.testing.assert_allclose(plan.init_sigma, float(sched.init_noise_sigma), rtol=1e-6)
        if cfg.kind == "euler":  # sigmas, through the model-input scale 1 / sqrt(sigma^2 + 1)
            np.testing.assert_allclose(plan.in_scale, 1 / np.sqrt(sched.sigmas.numpy()[:-1].astype(np.float64) ** 2 + 1),
                                       rtol=1e-6)


def test_ddim_matches_diffusers(student):
    from diffusers import DDIMScheduler

    model, ref = student
    sched = DDIMScheduler()  # eta 0, epsilon, clip_sample, "leading"
    images, got = sample(model, initial_noise(SEEDS, HWC), scheduler=scheduler_config(sched), num_inference_steps=4,
                         class_labels=LABELS, return_trajectory=True)
    assert_same_trajectory(got, diffusers_loop(ref, sched, 4))
    np.testing.assert_array_equal(images, got[-1])
    assert np.abs(got[-1]).max() <= 1.0 + 1e-6 and np.abs(got[-1]).max() > 0.5  # clipped x0 at the end


def test_guided_v_prediction_ddim_matches_diffusers(student):
    from diffusers import DDIMScheduler

    model, ref = student
    sched = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    _, got = sample(model, initial_noise(SEEDS, HWC), scheduler=scheduler_config(sched), num_inference_steps=5,
                    class_labels=LABELS, guidance_scale=2.5, return_trajectory=True)
    assert_same_trajectory(got, diffusers_loop(ref, sched, 5, guidance_scale=2.5))


def test_ddim_eta_matches_diffusers_with_the_same_noise(student):
    from diffusers import DDIMScheduler

    model, ref = student
    # 3 trailing steps: timesteps 999, 666, 332 but diffusers steps each to t - 1000 // 3 (666, 333, -1)
    sched = DDIMScheduler(prediction_type="sample", set_alpha_to_one=False, timestep_spacing="trailing")
    _, got = sample(model, initial_noise(SEEDS, HWC), scheduler=scheduler_config(sched), num_inference_steps=3,
                    class_labels=LABELS, eta=1.0, step_seeds=SEEDS, return_trajectory=True)
    assert_same_trajectory(got, diffusers_loop(ref, sched, 3, eta=1.0))


@pytest.mark.parametrize("variance_type,prediction_type", [("fixed_small", "epsilon"), ("fixed_large", "v_prediction")])
def test_ddpm_matches_diffusers_with_the_same_noise(student, monkeypatch, variance_type, prediction_type):
    from diffusers import DDPMScheduler

    model, ref = student
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type=variance_type, prediction_type=prediction_type)
    _, got = sample(model, initial_noise(SEEDS, HWC), scheduler=scheduler_config(sched), num_inference_steps=6,
                    class_labels=LABELS, step_seeds=SEEDS, return_trajectory=True)
    want = diffusers_loop(ref, sched, 6, monkeypatch=monkeypatch)
    assert_same_trajectory(got, want)
    # the noise matters: other step seeds give another trajectory from the same x_T
    other = sample(model, initial_noise(SEEDS, HWC), scheduler=scheduler_config(sched), num_inference_steps=6,
                   class_labels=LABELS, step_seeds=[5, 6, 7])
    assert np.abs(other - got[-1]).max() > 0.1


EULER_VARIANT = {"timestep_spacing": "leading", "steps_offset": 1, "beta_schedule": "scaled_linear",
                 "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}


@pytest.mark.parametrize("kwargs", [{}, EULER_VARIANT])
def test_euler_matches_diffusers(student, kwargs):
    from diffusers import EulerDiscreteScheduler

    model, ref = student
    sched = EulerDiscreteScheduler(**kwargs)
    _, got = sample(model, initial_noise(SEEDS, HWC), scheduler=scheduler_config(sched), num_inference_steps=6,
                    class_labels=LABELS, guidance_scale=1.5, return_trajectory=True)
    assert_same_trajectory(got, diffusers_loop(ref, sched, 6, guidance_scale=1.5))


def test_one_step_is_ddim_trailing_single_step(student):
    from diffusers import DDIMScheduler

    model, ref = student
    got = one_step(model, initial_noise(SEEDS, HWC), scheduler=SchedulerConfig("ddpm"), class_labels=LABELS)
    want = diffusers_loop(ref, DDIMScheduler(timestep_spacing="trailing"), 1)[-1]
    # x0 = (x_T - sqrt(1 - a) eps) / sqrt(a) at t = 999, a = alphas_cumprod[999] ~ 4e-5: the step
    # multiplies any difference in the model's output by sqrt((1 - a) / a) ~ 156, so the model-level
    # tolerance (ATOL on outputs of scale ~1) becomes ATOL x 156 here. Float32 kernel differences
    # of ~1e-6 in eps (seen: 1.7e-4 in x0 on CI's CPU) are what this allows; a wrong formula is O(1).
    a = float(alphas_cumprod(SchedulerConfig("ddpm"))[999])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * np.sqrt((1 - a) / a))
    trailing = dataclasses.replace(SchedulerConfig("ddim"), timestep_spacing="trailing")
    assert make_plan(trailing, 1).timesteps.tolist() == [999]


def test_a_trajectory_does_not_depend_on_its_batch(student):
    """The vmapped step treats each seed on its own: seed 2's trajectory is the same whether it runs
    third beside seeds 0 and 1 or first beside 7 and 0 (same batch size: no new compilation)."""
    model, _ = student
    kw = dict(scheduler=SchedulerConfig("ddpm"), num_inference_steps=3)
    a = sample(model, initial_noise([0, 1, 2], HWC), class_labels=[0, 1, 2], step_seeds=[0, 1, 2], **kw)
    b = sample(model, initial_noise([2, 7, 0], HWC), class_labels=[2, 1, 0], step_seeds=[2, 7, 0], **kw)
    np.testing.assert_allclose(b[0], a[2], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(b[2], a[0], rtol=2e-5, atol=2e-5)
    assert np.abs(a[0] - a[1]).max() > 0.1  # different seeds, different samples


@pytest.mark.slow
def test_vmapped_trajectories_equal_one_by_one(student):
    model, _ = student
    kw = dict(scheduler=SchedulerConfig("ddpm"), num_inference_steps=3)
    together = sample(model, initial_noise(SEEDS, HWC), class_labels=LABELS, step_seeds=SEEDS, **kw)
    for i, seed in enumerate(SEEDS):
        alone = sample(model, initial_noise([seed], HWC), class_labels=LABELS[i:i + 1], step_seeds=[seed], **kw)
        # not bit-identical: XLA picks other conv/matmul kernels for batch 1 than for batch 3 (seen: 4.5e-6)
        np.testing.assert_allclose(alone[0], together[i], rtol=2e-5, atol=2e-5)


def test_guidance_zero_is_the_unconditional_model_and_one_the_conditional(student):
    model, _ = student
    kw = dict(scheduler=SchedulerConfig("ddim"), num_inference_steps=3)
    x_T = initial_noise(SEEDS, HWC)
    unconditional = sample(model, x_T, class_labels=np.full(3, NULL), **kw)
    guided_zero = sample(model, x_T, class_labels=LABELS, guidance_scale=0.0, **kw)
    # batch 2 per trajectory (cond + uncond) against batch 1: other XLA kernels, rounding-level differences
    np.testing.assert_allclose(guided_zero, unconditional, rtol=2e-5, atol=2e-5)
    conditional = sample(model, x_T, class_labels=LABELS, **kw)
    assert np.abs(conditional[:2] - unconditional[:2]).max() > 1e-3  # the label changes the sample
    np.testing.assert_array_equal(conditional[2], unconditional[2])  # LABELS[2] is the null class
    # changing the step count or the guidance scale does not compile anything new
    compiled = samplers_mod._step._cache_size()
    sample(model, x_T, class_labels=LABELS, guidance_scale=4.0, scheduler=SchedulerConfig("ddim"), num_inference_steps=2)
    assert samplers_mod._step._cache_size() == compiled


def test_divergence_raises_naming_the_trajectory(student):
    model, _ = student
    graphdef, state = nnx.split(model)
    blown = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
    blown.conv_out.kernel = nnx.Param(np.asarray(model.conv_out.kernel[...]) * np.float32(1e30))
    with pytest.raises(SamplingError, match=r"ddim sampling diverged: trajectories \[0, 1, 2\] .* step 0, timestep 666"):
        sample(blown, initial_noise(SEEDS, HWC), scheduler=SchedulerConfig("ddim"), num_inference_steps=3,
               class_labels=LABELS)
    noise = initial_noise(SEEDS, HWC)
    noise[1, 3, 4, 0] = np.nan
    with pytest.raises(SamplingError, match=r"noise of trajectories \[1\] holds non-finite"):
        sample(model, noise, scheduler=SchedulerConfig("ddim"), num_inference_steps=3, class_labels=LABELS)


def test_sampling_arguments_are_checked():
    # arguments are checked before anything runs: abstract models (shapes only) are enough
    tiny = abstract_unet(UNet2DConfig(**{**UNET, "num_class_embeds": None}))
    x_T = initial_noise([0], HWC)
    with pytest.raises(SamplingError, match="unconditional"):
        sample(tiny, x_T, scheduler=SchedulerConfig("ddim"), num_inference_steps=2, guidance_scale=3.0)
    cond = abstract_unet(UNet2DConfig(**UNET))
    with pytest.raises(SamplingError, match=r"class_labels must be in \[0, 4\)"):
        sample(cond, x_T, scheduler=SchedulerConfig("ddim"), num_inference_steps=2, class_labels=[4])
    with pytest.raises(SamplingError, match="pass class_labels"):
        sample(cond, x_T, scheduler=SchedulerConfig("ddim"), num_inference_steps=2)
    with pytest.raises(SamplingError, match="pass step_seeds"):
        sample(cond, x_T, scheduler=SchedulerConfig("ddpm"), num_inference_steps=2, class_labels=[0])
    with pytest.raises(ConfigError, match="eta=0.5 applies to DDIM only"):
        make_plan(SchedulerConfig("euler"), 4, eta=0.5)
    with pytest.raises(ConfigError, match=r"num_inference_steps=1001 must be in \[1, num_train_timesteps=1000\]"):
        make_plan(SchedulerConfig("ddim"), 1001)


@pytest.mark.parametrize("cls,field,value,needle", [
    ("DDPMScheduler", "thresholding", True, "thresholding: True is not supported"),
    ("DDPMScheduler", "variance_type", "learned_range", "variance_type='learned_range' is not supported"),
    ("DDIMScheduler", "rescale_betas_zero_snr", True, "rescale_betas_zero_snr: True is not supported"),
    ("DDIMScheduler", "beta_schedule", "sigmoid", "beta_schedule='sigmoid' is not supported"),
    ("DDIMScheduler", "timestep_spacing", "karras", "timestep_spacing='karras' is not supported"),
    ("DDIMScheduler", "prediction_type", "x0", "prediction_type='x0' is not supported"),
    ("EulerDiscreteScheduler", "use_karras_sigmas", True, "use_karras_sigmas: True is not supported"),
    ("EulerDiscreteScheduler", "interpolation_type", "log_linear", "interpolation_type: 'log_linear' is not supported"),
    ("EulerDiscreteScheduler", "timestep_type", "continuous", "timestep_type: 'continuous' is not supported"),
    ("EulerDiscreteScheduler", "clip_sample", True, "unknown field(s) ['clip_sample'] for EulerDiscreteScheduler"),
    ("PNDMScheduler", "skip_prk_steps", True, "_class_name: 'PNDMScheduler' is not supported"),
])
def test_unsupported_scheduler_config_is_refused_naming_the_field(cls, field, value, needle):
    with pytest.raises(ConfigError) as err:
        SchedulerConfig.from_diffusers({"_class_name": cls, "num_train_timesteps": 1000, field: value},
                                       "scheduler/scheduler_config.json")
    assert needle in str(err.value) and "scheduler_config.json" in str(err.value)


def test_scheduler_config_can_switch_sampler_like_from_config():
    ddpm = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_schedule": "linear",
            "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small"}
    euler = SchedulerConfig.from_diffusers(ddpm, kind="euler")
    assert euler.kind == "euler" and euler.timestep_spacing == "linspace"  # the target's default
    assert SchedulerConfig.from_diffusers(ddpm).timestep_spacing == "leading"


def test_noise_recipe_is_stable_and_laid_out_nchw():
    # golden values of the documented recipe (Philox4x64 keyed seed + (stream << 64), Box-Muller):
    # if these change, every shared x_T changes with them
    np.testing.assert_array_equal(seeded_normal(0, 0, (4,)),
                                  np.asarray([0.15853384, -1.925692, -0.20250328, 0.33020452], np.float32))
    np.testing.assert_array_equal(seeded_normal(7, 3, (2,)), np.asarray([-0.19543858, -0.9871625], np.float32))
    assert not np.array_equal(seeded_normal(0, 1, (4,)), seeded_normal(0, 0, (4,)))
    x = initial_noise([5, 9], (3, 4, 2))
    assert x.shape == (2, 3, 4, 2) and x.dtype == np.float32
    np.testing.assert_array_equal(x[1], seeded_normal(9, 0, (2, 3, 4)).transpose(1, 2, 0))
    np.testing.assert_array_equal(step_noise([9], 2, (3, 4, 2))[0], seeded_normal(9, 3, (2, 3, 4)).transpose(1, 2, 0))
    big = seeded_normal(1, 0, (200_000,))
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    np.testing.assert_array_equal(to_unit_range(np.asarray([-2.0, -1.0, 0.0, 1.0])), [0.0, 0.0, 0.5, 1.0])
