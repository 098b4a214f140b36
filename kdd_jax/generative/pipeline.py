"""A diffusion model as the detector sees it: UNet + scheduler + sampling settings, and the map from a
prompt to what the UNet is conditioned on.

    from kdd_jax.generative.pipeline import load_diffusion, SamplingSettings
    model = load_diffusion("zoo/student-a", SamplingSettings(num_inference_steps=20))
    images = model.generate(["", "", "Sandal"], noise)        # [3, H, W, C] in [0, 1]

Prompts. The detector speaks prompts (text-to-image APIs do); a class-conditional UNet understands
  ""              the empty prompt: the null class (the unconditional mode classifier-free guidance
                  trains; last class-embedding row by default), sampled without guidance
  "3"             class index 3 (0 <= index < number of real classes)
  "Sandal"        a class name, when `class_names` are known (case-insensitive)
anything else is an error naming the prompt. An unconditional UNet understands only "".

A folder is what diffusers writes: `unet/` (config.json + diffusion_pytorch_model.safetensors) and
`scheduler/scheduler_config.json`, or a bare UNet folder with the scheduler config given separately.
Optional `kdd_sampling.json` in the folder holds SamplingSettings fields (how the model's owner samples
it: a few-step student's step count, its guidance scale), and `class_names` (a list of strings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdd_jax.config import ConfigError, parse_dataclass, read_json_config
from kdd_jax.generative.samplers import SamplingError, sample, to_unit_range
from kdd_jax.generative.schedules import SchedulerConfig

SAMPLING_FILE = "kdd_sampling.json"


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How one model turns (condition, x_T) into an image. `scheduler` overrides the scheduler config's
    kind ("ddim" / "ddpm" / "euler"); `timestep_spacing` its spacing (e.g. "trailing" for few steps).
    Stochastic settings (DDPM, DDIM with eta > 0) draw step noise from the request's seeds."""

    num_inference_steps: int = 50
    guidance_scale: float = 1.0  # for class prompts; the empty prompt is always sampled unguided
    eta: float = 0.0
    scheduler: str | None = None
    timestep_spacing: str | None = None

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps={self.num_inference_steps} must be >= 1")
        if not np.isfinite(self.guidance_scale) or not np.isfinite(self.eta) or self.eta < 0:
            raise ConfigError(f"guidance_scale={self.guidance_scale} must be finite and eta={self.eta} >= 0")


def class_of_prompt(prompt: str, num_classes: int | None, class_names: Sequence[str] | None, who: str) -> int | None:
    """The class a prompt asks for; None for the empty prompt (the null class / unconditional)."""
    if not isinstance(prompt, str):
        raise SamplingError(f"{who}: prompt {prompt!r} is not a string")
    p = prompt.strip()
    if p == "":
        return None
    if num_classes is None:
        raise SamplingError(f"{who}: unconditional model: only the empty prompt is understood, got {prompt!r}")
    if p.isdigit() and p.isascii():
        k = int(p)
        if k < num_classes:
            return k
        raise SamplingError(f"{who}: prompt {prompt!r}: class index out of range [0, {num_classes})")
    if class_names:
        lower = [c.lower() for c in class_names]
        if p.lower() in lower:
            return lower.index(p.lower())
    known = f"; known class names: {list(class_names)}" if class_names else " (no class names known)"
    raise SamplingError(f"{who}: prompt {prompt!r} is neither empty, a class index in [0, {num_classes}) nor a "
                        f"class name{known}")


@dataclasses.dataclass
class DiffusionModel:
    """A class-conditional (or unconditional) UNet2DModel with its scheduler and sampling settings."""

    name: str
    unet: object  # kdd_jax.models.unet.UNet2DModel
    scheduler: SchedulerConfig
    sampling: SamplingSettings = SamplingSettings()
    class_names: tuple[str, ...] | None = None
    null_class: int | None = None  # default: the last class-embedding row

    def __post_init__(self):
        s = self.sampling
        if s.scheduler is not None or s.timestep_spacing is not None:
            self.scheduler = dataclasses.replace(
                self.scheduler, kind=s.scheduler or self.scheduler.kind,
                timestep_spacing=s.timestep_spacing or self.scheduler.timestep_spacing)
        k = self.unet.config.num_class_embeds
        if self.class_names is not None and k is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(f"{self.name}: {len(self.class_names)} class_names for {self.num_classes} classes "
                              f"(num_class_embeds={k}, one row being the null class)")

    @property
    def num_classes(self) -> int | None:
        """Real classes: every class-embedding row but the null class's."""
        k = self.unet.config.num_class_embeds
        return None if k is None else k - 1

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """x_T's [H, W, C]."""
        cfg = self.unet.config
        hw = cfg.input_hw
        if hw is None:
            raise ConfigError(f"{self.name}: the UNet config has no sample_size; the image size is unknown")
        return (*hw, cfg.in_channels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        hw = self.noise_shape[:2]
        return (*hw, self.unet.config.out_channels)

    @property
    def stochastic(self) -> bool:
        return self.scheduler.kind == "ddpm" or self.sampling.eta > 0

    def classes(self, prompts: Sequence[str]) -> list[int | None]:
        return [class_of_prompt(p, self.num_classes, self.class_names, f"model {self.name!r}") for p in prompts]

    def generate(self, prompts: Sequence[str], noise: np.ndarray, seeds: Sequence[int] | None = None) -> np.ndarray:
        """Images [n, H, W, C] float32 in [0, 1] for prompts [n] and x_T `noise` [n, H, W, C]. Empty prompts
        are sampled from the null class without guidance; class prompts with `sampling.guidance_scale`.
        `seeds` give the step noise of stochastic samplers."""
        noise = np.asarray(noise, np.float32)
        if len(prompts) != len(noise):
            raise SamplingError(f"model {self.name!r}: {len(prompts)} prompts for {len(noise)} noise tensors")
        if tuple(noise.shape[1:]) != self.noise_shape:
            raise SamplingError(f"model {self.name!r}: noise of shape {list(noise.shape)}, expected "
                                f"[n, {', '.join(map(str, self.noise_shape))}]")
        if self.stochastic and seeds is None:
            raise SamplingError(f"model {self.name!r} samples stochastically ({self.scheduler.kind}, eta="
                                f"{self.sampling.eta}): the request must carry seeds for the step noise")
        classes = self.classes(prompts)
        out = np.zeros((len(noise), *self.image_shape), np.float32)
        k = self.unet.config.num_class_embeds
        null = (k - 1 if self.null_class is None else self.null_class) if k is not None else None
        # two groups, each one batched sampling run: unguided null-class rows, guided class rows
        for guided in (False, True):
            rows = [i for i, c in enumerate(classes) if (c is not None) == guided]
            if not rows:
                continue
            labels = None if k is None else np.asarray([null if c is None else c for c in np.asarray(classes, object)[rows]],
                                                        np.int32)
            x = sample(self.unet, noise[rows], scheduler=self.scheduler,
                       num_inference_steps=self.sampling.num_inference_steps, class_labels=labels,
                       guidance_scale=self.sampling.guidance_scale if guided else 1.0, null_class=self.null_class,
                       eta=self.sampling.eta, step_seeds=None if seeds is None else [int(seeds[i]) for i in rows])
            out[rows] = to_unit_range(x)
        return out


def read_sampling_file(folder: Path) -> tuple[dict, tuple[str, ...] | None]:
    """(SamplingSettings fields, class_names) from `folder/kdd_sampling.json`, if present."""
    path = folder / SAMPLING_FILE
    if not path.is_file():
        return {}, None
    doc = read_json_config(path, "sampling settings")
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    names = doc.pop("class_names", None)
    if names is not None and (not isinstance(names, list) or not all(isinstance(c, str) and c for c in names)):
        raise ConfigError(f"{path}: class_names must be a list of non-empty strings")
    parse_dataclass(SamplingSettings, doc, str(path))  # validates field names and values
    return doc, None if names is None else tuple(names)


def is_diffusion_folder(path: str | Path) -> bool:
    """A diffusers UNet2DModel folder, or a folder holding one as `unet/`. A `unet/config.json` that
    cannot be read still marks a diffusers folder (the loader then names the file), where an unreadable
    top-level config.json could be a classifier's."""
    path = Path(path)
    for folder in (path / "unet", path):
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                doc = read_json_config(cfg)
            except (ConfigError, OSError):
                return folder != path
            return isinstance(doc, dict) and doc.get("_class_name") == "UNet2DModel"
    return False


def load_diffusion(path: str | Path, sampling: SamplingSettings | dict | None = None, *, name: str | None = None,
                   scheduler: str | Path | None = None, class_names: Sequence[str] | None = None) -> DiffusionModel:
    """A DiffusionModel from a diffusers folder (`unet/` + `scheduler/`, or a UNet folder and
    `scheduler=` a scheduler_config.json). Settings: `kdd_sampling.json` in the folder, overridden
    field by field by `sampling` (a dict, or SamplingSettings replacing them all)."""
    from converters.diffusers_unet import convert_unet  # same distribution; no torch

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    unet = convert_unet(path).model
    sched_path = Path(scheduler) if scheduler is not None else path
    if scheduler is None and not (path / "scheduler").is_dir() and not (path / "scheduler_config.json").is_file():
        raise ConfigError(f"{path}: no scheduler/scheduler_config.json (a diffusers pipeline folder has one); "
                          "pass the scheduler config explicitly")
    sched = SchedulerConfig.from_file(sched_path)
    fields, names = read_sampling_file(path)
    if isinstance(sampling, SamplingSettings):
        settings = sampling
    else:
        merged = {**fields, **(sampling or {})}
        settings = parse_dataclass(SamplingSettings, merged, f"{path}: sampling settings")
    return DiffusionModel(name or path.name, unet, sched, settings,
                          tuple(class_names) if class_names is not None else names)
