"""Noise schedules and sampler step tables, with diffusers' maths (DDPMScheduler, DDIMScheduler,
EulerDiscreteScheduler, diffusers 0.42).

A sampler step, for every supported scheduler and prediction type, is one affine update

    out  = model(in_scale * x, t)                       (guided output under classifier-free guidance)
    x0   = clip(p1 * x + p2 * out, -clip, clip)         predicted clean sample
    eps  = q1 * x + q2 * out                            predicted noise (DDIM only; from the unclipped x0)
    x'   = cx * x + cx0 * x0 + ceps * eps + cz * z      z: fresh N(0, 1) noise (DDPM, DDIM with eta > 0)

so `make_plan` turns a scheduler config and a step count into a table of these coefficients (host
NumPy, float64 maths on diffusers' float32 alphas_cumprod, stored float32) and one compiled step serves
all three samplers (`kdd_jax/generative/samplers.py`). The formulas are diffusers' `step()` rearranged;
each is written out below next to the sampler it belongs to.

Supported config values (anything else raises ConfigError naming the field and value):
beta_schedule linear / scaled_linear / squaredcos_cap_v2 (or trained_betas); prediction_type epsilon /
v_prediction / sample; timestep_spacing leading / trailing / linspace (default: leading for DDPM and
DDIM, linspace for Euler, as diffusers); clip_sample (DDPM, DDIM); DDPM variance_type fixed_small /
fixed_small_log / fixed_large; DDIM set_alpha_to_one; Euler final_sigmas_type zero / sigma_min.
Not supported: thresholding, rescale_betas_zero_snr, learned variances, Karras / exponential / beta
sigmas, log-linear interpolation, continuous timesteps, Euler's stochastic churn (s_churn > 0).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

import numpy as np

from kdd_jax.config import ConfigError, parse_dataclass, read_json_config, to_json_dict

KINDS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler"}
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "euler": "linspace"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
FINAL_SIGMAS = ("zero", "sigma_min")

_COMMON = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
           "timestep_spacing", "steps_offset", "rescale_betas_zero_snr"}
_THRESHOLD = {"thresholding", "dynamic_thresholding_ratio", "sample_max_value", "clip_sample", "clip_sample_range"}
# diffusers class -> its config fields (everything else in a scheduler_config.json is refused)
CLASS_FIELDS = {
    "DDPMScheduler": _COMMON | _THRESHOLD | {"variance_type"},
    "DDIMScheduler": _COMMON | _THRESHOLD | {"set_alpha_to_one"},
    "EulerDiscreteScheduler": _COMMON | {"interpolation_type", "use_karras_sigmas", "use_exponential_sigmas",
                                         "use_beta_sigmas", "sigma_min", "sigma_max", "timestep_type",
                                         "final_sigmas_type"},
}
# fields whose other values select features this package does not implement
ONLY = {
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "interpolation_type": ("linear",),
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "timestep_type": ("discrete",),
}
IGNORED = {"dynamic_thresholding_ratio", "sample_max_value"}  # only read when thresholding is on


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """What a sampler needs from a diffusers scheduler config; field names and defaults are diffusers'."""

    kind: Literal["ddpm", "ddim", "euler"]
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    clip_sample: bool = True  # DDPM / DDIM only (Euler never clips)
    clip_sample_range: float = 1.0
    timestep_spacing: str | None = None  # None: the kind's diffusers default
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM
    variance_type: str = "fixed_small"  # DDPM
    final_sigmas_type: str = "zero"  # Euler

    def __post_init__(self):
        if self.timestep_spacing is None:
            object.__setattr__(self, "timestep_spacing", DEFAULT_SPACING.get(self.kind))
        problems = []
        for name, allowed in (("kind", tuple(DEFAULT_SPACING)), ("beta_schedule", BETA_SCHEDULES),
                              ("prediction_type", PREDICTION_TYPES), ("timestep_spacing", SPACINGS),
                              ("variance_type", VARIANCE_TYPES), ("final_sigmas_type", FINAL_SIGMAS)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} is not supported (supported: {list(allowed)})")
        if self.num_train_timesteps < 1:
            problems.append(f"num_train_timesteps={self.num_train_timesteps} must be >= 1")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            problems.append(f"trained_betas has {len(self.trained_betas)} values for "
                            f"num_train_timesteps={self.num_train_timesteps}")
        if self.steps_offset < 0:
            problems.append(f"steps_offset={self.steps_offset} must be >= 0")
        if self.clip_sample_range <= 0:
            problems.append(f"clip_sample_range={self.clip_sample_range} must be > 0")
        if problems:
            raise ConfigError("; ".join(problems))

    def to_dict(self) -> dict:
        return to_json_dict(self)

    @classmethod
    def from_diffusers(cls, data, source: str = "scheduler config", kind: str | None = None) -> "SchedulerConfig":
        """Parse a diffusers `scheduler_config.json` dict (`_class_name` DDPMScheduler, DDIMScheduler or
        EulerDiscreteScheduler). `kind` ("ddpm"/"ddim"/"euler") samples with another scheduler from the same
        config, like diffusers' `XScheduler.from_config(other.config)`: fields the target does not have
        are dropped, missing ones take its defaults."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        name = data.get("_class_name")
        if name not in KINDS:
            raise ConfigError(f"{source}._class_name: {name!r} is not supported (supported: {sorted(KINDS)})")
        fields = {k: v for k, v in data.items() if not k.startswith("_")}
        problems = []
        unknown = sorted(set(fields) - CLASS_FIELDS[name])
        if unknown:
            problems.append(f"{source}: unknown field(s) {unknown} for {name}")
        for field, allowed in ONLY.items():
            if field in fields and fields[field] not in allowed:
                problems.append(f"{source}.{field}: {fields[field]!r} is not supported (supported: {list(allowed)})")
        if problems:
            raise ConfigError("; ".join(problems))
        target = kind or KINDS[name]
        if target not in DEFAULT_SPACING:
            raise ConfigError(f"kind={target!r} is not supported (supported: {list(DEFAULT_SPACING)})")
        own = {f.name for f in dataclasses.fields(cls)}
        target_fields = CLASS_FIELDS[{v: k for k, v in KINDS.items()}[target]]
        kept = {k: v for k, v in fields.items() if k in own and k in target_fields}
        return parse_dataclass(cls, {"kind": target, **kept}, source)

    @classmethod
    def from_file(cls, path: str | Path, kind: str | None = None) -> "SchedulerConfig":
        """A `scheduler_config.json`, or a pipeline folder holding `scheduler/scheduler_config.json`."""
        path = Path(path)
        if path.is_dir():
            folder = path / "scheduler" if (path / "scheduler").is_dir() else path
            path = folder / "scheduler_config.json"
        return cls.from_diffusers(read_json_config(path, "scheduler config"), str(path), kind)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=torch.float32), bit for bit: a float32 step, the first half
    counted up from start and the second half down from end (checked against torch 2.13 in the tests)."""
    a, b = np.float32(start), np.float32(end)
    if n == 1:
        return np.asarray([a], np.float32)
    step = np.float64((b - a) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    return np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i)).astype(np.float32)


def betas(cfg: SchedulerConfig) -> np.ndarray:
    """diffusers' betas, float32."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, np.float32)
    if cfg.beta_schedule == "linear":
        return _linspace_f32(cfg.beta_start, cfg.beta_end, n)
    if cfg.beta_schedule == "scaled_linear":
        return _linspace_f32(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n) ** 2
    # squaredcos_cap_v2: discretised alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2, betas capped at 0.999
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.asarray([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """prod_{s <= t} (1 - beta_s), float32 (torch.cumprod of float32 accumulates in float64)."""
    return np.cumprod((np.float32(1.0) - betas(cfg)).astype(np.float64)).astype(np.float32)


def timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """The timesteps `set_timesteps(num_inference_steps)` gives: int64 for DDPM/DDIM, float32 for Euler."""
    T, n = cfg.num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise ConfigError(f"num_inference_steps={n} must be in [1, num_train_timesteps={T}]")
    euler = cfg.kind == "euler"
    if cfg.timestep_spacing == "linspace":
        if euler:
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32 if euler else np.int64)
        return ts + (np.float32(cfg.steps_offset) if euler else cfg.steps_offset)
    ts = np.round(np.arange(T, 0, -T / n)).astype(np.float32 if euler else np.int64)  # trailing
    return ts - 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-step coefficient table of the affine step (module docstring); arrays of length num_steps."""

    kind: str
    timesteps: np.ndarray  # as diffusers' scheduler.timesteps (int64 or float32)
    t_model: np.ndarray  # the timestep the model sees, float32
    in_scale: np.ndarray
    p1: np.ndarray
    p2: np.ndarray
    q1: np.ndarray
    q2: np.ndarray
    clip: np.ndarray  # inf: no clipping
    cx: np.ndarray
    cx0: np.ndarray
    ceps: np.ndarray
    cz: np.ndarray
    init_sigma: float  # x_T = init_sigma * N(0, 1)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        return bool(np.any(self.cz != 0))

    def coefficients(self) -> np.ndarray:
        """[num_steps, 11] float32: t_model, in_scale, p1, p2, q1, q2, clip, cx, cx0, ceps, cz."""
        return np.stack([getattr(self, f) for f in COEFFICIENTS], axis=1).astype(np.float32)


COEFFICIENTS = ("t_model", "in_scale", "p1", "p2", "q1", "q2", "clip", "cx", "cx0", "ceps", "cz")


def _x0_eps_coefficients(prediction_type: str, a: np.ndarray):
    """(p1, p2, q1, q2) with x0 = p1 x + p2 out and eps = q1 x + q2 out, at alpha_bar = a (DDPM/DDIM)."""
    sa, sb, zero, one = np.sqrt(a), np.sqrt(1 - a), np.zeros_like(a), np.ones_like(a)
    if prediction_type == "epsilon":  # x0 = (x - sqrt(1-a) eps) / sqrt(a)
        return 1 / sa, -sb / sa, zero, one
    if prediction_type == "v_prediction":  # x0 = sqrt(a) x - sqrt(1-a) v ; eps = sqrt(a) v + sqrt(1-a) x
        return sa, -sb, sb, sa
    return zero, one, 1 / sb, -sa / sb  # sample: x0 = out ; eps = (x - sqrt(a) x0) / sqrt(1-a)


def make_plan(cfg: SchedulerConfig, num_inference_steps: int, *, eta: float = 0.0) -> Plan:
    """The step table of `cfg.kind` for `num_inference_steps` steps (eta: DDIM only)."""
    if eta != 0 and cfg.kind != "ddim":
        raise ConfigError(f"eta={eta} applies to DDIM only (kind={cfg.kind!r})")
    if eta < 0:
        raise ConfigError(f"eta={eta} must be >= 0")
    ts = timesteps(cfg, num_inference_steps)
    T = cfg.num_train_timesteps
    if ts.max() > T - 1 or ts.min() < 0:
        raise ConfigError(f"timesteps {ts.tolist()} fall outside [0, {T - 1}] "
                          f"(steps_offset={cfg.steps_offset} too large?)")
    ac = alphas_cumprod(cfg).astype(np.float64)
    n = len(ts)
    zeros, ones = np.zeros(n), np.ones(n)
    clip = np.full(n, cfg.clip_sample_range if cfg.clip_sample else np.inf)
    if cfg.kind == "euler":
        return _euler_plan(cfg, ts, ac)
    a = ac[ts]
    p1, p2, q1, q2 = _x0_eps_coefficients(cfg.prediction_type, a)
    if cfg.kind == "ddim":
        # diffusers' DDIM steps to t - T // n whatever the spacing, and past 0 to final_alpha_cumprod
        prev = ts - T // num_inference_steps
        final = 1.0 if cfg.set_alpha_to_one else ac[0]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        # sigma_t = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev))
        # x' = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z
        std = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        return Plan("ddim", ts, ts.astype(np.float32), ones, p1, p2, q1, q2, clip, zeros, np.sqrt(a_prev),
                    np.sqrt(np.maximum(1 - a_prev - std ** 2, 0)), std, 1.0)
    # DDPM: the previous timestep is the next one in the schedule (-1 after the last: alpha_bar_prev = 1)
    prev = np.append(ts[1:], -1)
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
    cur_alpha = a / a_prev
    cur_beta = 1 - cur_alpha
    # x' = sqrt(a_prev) beta_t / (1 - a) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a) x + sigma_t z   (z only when t > 0)
    cx0 = np.sqrt(a_prev) * cur_beta / (1 - a)
    cx = np.sqrt(cur_alpha) * (1 - a_prev) / (1 - a)
    if cfg.variance_type == "fixed_large":
        std = np.sqrt(cur_beta)
    else:  # fixed_small (and fixed_small_log, the same value through exp(0.5 log v))
        std = np.sqrt(np.maximum((1 - a_prev) / (1 - a) * cur_beta, 1e-20))
    std = np.where(ts > 0, std, 0.0)
    return Plan("ddpm", ts, ts.astype(np.float32), ones, p1, p2, q1, q2, clip, cx, cx0, zeros, std, 1.0)


def _euler_plan(cfg: SchedulerConfig, ts: np.ndarray, ac: np.ndarray) -> Plan:
    """EulerDiscreteScheduler (s_churn = 0): sigma(t) = sqrt((1 - a) / a) interpolated linearly at the
    (fractional) timesteps, then the final sigma; the model sees x / sqrt(sigma^2 + 1);
    x' = x + (x - x0) / sigma * (sigma_next - sigma)."""
    n = len(ts)
    sig_all = np.sqrt((1 - ac) / ac)
    sig = np.interp(ts.astype(np.float64), np.arange(len(sig_all)), sig_all)
    last = sig_all[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.append(sig, last).astype(np.float32).astype(np.float64)  # diffusers stores them float32
    s, s_next = sigmas[:-1], sigmas[1:]
    if cfg.prediction_type == "epsilon":  # x0 = x - sigma eps
        p1, p2 = np.ones(n), -s
    elif cfg.prediction_type == "v_prediction":  # x0 = v (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)
        p1, p2 = 1 / (s ** 2 + 1), -s / np.sqrt(s ** 2 + 1)
    else:
        p1, p2 = np.zeros(n), np.ones(n)
    ratio = (s_next - s) / s
    max_sigma = sigmas.max()
    init = max_sigma if cfg.timestep_spacing in ("linspace", "trailing") else math.sqrt(max_sigma ** 2 + 1)
    zeros = np.zeros(n)
    return Plan("euler", ts, ts.astype(np.float32), 1 / np.sqrt(s ** 2 + 1), p1, p2, zeros, zeros,
                np.full(n, np.inf), 1 + ratio, -ratio, zeros, zeros, float(np.float32(init)))
