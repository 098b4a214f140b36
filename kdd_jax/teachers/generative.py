"""Generative teachers: (prompt, initial noise x_T) -> image, black-box, behind the response cache.

The probe of a generative teacher is a prompt ("" = the empty prompt, the unconditional mode the paper
probes with; see kdd_jax/generative/pipeline.py for what class-conditional models understand) and the
initial noise x_T, shared by the student and every teacher. A request row may also carry the integer
seed x_T was made from (kdd_jax/generative/noise.py recipe), for teachers that take a seed instead of
a tensor, and for stochastic samplers' step noise.

Answers are images [n, H, W, C] float32 in [0, 1] (diffusers' `output_type="np"` layout). They are
validated (shape, finiteness, range) before anything is cached, and cached per row under
SHA-256(teacher, "images", prompt, x_T's dtype, shape and bytes): a seed-only request and a tensor
request for the same x_T share the answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from kdd_jax.teachers.base import TeacherError, TeacherOutput
from kdd_jax.teachers.cache import CacheStats, ResponseCache, cached_query, check_budget

IMAGES = "images"
RANGE_TOLERANCE = 1e-3  # answers within this of [0, 1] are clipped; further out is an error


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What a generative teacher takes and returns: x_T [H, W, C] and images [H, W, C] (NHWC)."""

    noise_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]

    def __post_init__(self):
        for what, shape in (("noise_shape", self.noise_shape), ("image_shape", self.image_shape)):
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"{what} must be [H, W, C] with positive sizes, got {list(shape)}")


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """Rows of (prompt, x_T [H, W, C] float32, optional seed). Index with a list or slice of rows."""

    prompts: tuple[str, ...]
    noise: np.ndarray  # [n, H, W, C] float32
    seeds: np.ndarray | None = None  # int64 [n]

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        noise = np.ascontiguousarray(self.noise, np.float32)
        object.__setattr__(self, "noise", noise)
        if not all(isinstance(p, str) for p in self.prompts):
            raise TypeError("prompts must be strings")
        if noise.ndim != 4 or len(noise) != len(self.prompts):
            raise ValueError(f"noise must be [n={len(self.prompts)}, H, W, C], got {list(noise.shape)}")
        if self.seeds is not None:
            seeds = np.asarray(self.seeds)
            if seeds.shape != (len(self.prompts),) or seeds.dtype.kind not in "iu" or (seeds < 0).any():
                raise ValueError(f"seeds must be {len(self.prompts)} non-negative integers")
            object.__setattr__(self, "seeds", seeds.astype(np.int64))

    @classmethod
    def from_seeds(cls, prompts: Sequence[str], seeds: Sequence[int], noise_shape: Sequence[int]) -> GenerationRequest:
        """x_T made from each seed by `kdd_jax.generative.initial_noise` (JAX-free, documented recipe)."""
        from kdd_jax.generative.noise import initial_noise

        seeds = np.asarray(list(seeds), np.int64)
        return cls(tuple(prompts), initial_noise(seeds.tolist(), tuple(noise_shape)), seeds)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, rows) -> GenerationRequest:
        idx = np.arange(len(self))[rows]
        idx = np.atleast_1d(idx)
        return GenerationRequest(tuple(self.prompts[i] for i in idx), self.noise[idx],
                                 None if self.seeds is None else self.seeds[idx])

    def keys(self, teacher: str) -> list[str]:
        """The cache key of every row for `teacher`."""
        return [generation_key(teacher, p, x) for p, x in zip(self.prompts, self.noise)]


def generation_key(teacher: str, prompt: str, noise: np.ndarray) -> str:
    noise = np.ascontiguousarray(noise, np.float32)
    h = hashlib.sha256()
    h.update(f"{teacher}\0{IMAGES}\0{len(prompt.encode('utf-8', 'surrogatepass'))}\0".encode())
    h.update(prompt.encode("utf-8", "surrogatepass"))
    h.update(f"\0{noise.dtype.str}\0{noise.shape}\0".encode())
    h.update(noise.tobytes())
    return h.hexdigest()


def validate_images(images, n: int, spec: ImageSpec, teacher: str) -> np.ndarray:
    """float32 [n, H, W, C] in [0, 1], or TeacherError naming the teacher and the fault."""
    where = f"teacher {teacher!r}"
    try:
        x = np.asarray(images, np.float32)
    except (TypeError, ValueError) as e:
        raise TeacherError(f"{where}: images are not a numeric array ({e})") from None
    want = (n, *spec.image_shape)
    if x.shape != want:
        raise TeacherError(f"{where}: images of shape {list(x.shape)}, expected {list(want)} (NHWC)")
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(n, -1).any(axis=1))
        raise TeacherError(f"{where}: {int(bad.sum())} non-finite value(s) in images (rows {rows[:10].tolist()})")
    if n and (x.min() < -RANGE_TOLERANCE or x.max() > 1 + RANGE_TOLERANCE):
        raise TeacherError(f"{where}: image values in [{x.min():.4g}, {x.max():.4g}], expected [0, 1] "
                           "(is the server returning [-1, 1] or 0..255?)")
    return np.clip(x, 0.0, 1.0)


def _check_request(req: GenerationRequest, spec: ImageSpec, teacher: str) -> None:
    if tuple(req.noise.shape[1:]) != tuple(spec.noise_shape):
        raise TeacherError(f"teacher {teacher!r}: noise of shape {list(req.noise.shape)}, expected "
                           f"[n, {', '.join(map(str, spec.noise_shape))}]")
    if not np.isfinite(req.noise).all():
        raise TeacherError(f"teacher {teacher!r}: non-finite noise")


class DiffusionTeacher:
    """A DiffusionModel (kdd_jax.generative.pipeline) in-process, as a black box: it answers images
    for (prompt, x_T) with its own sampling settings."""

    output = IMAGES

    def __init__(self, model, name: str | None = None):
        self.model = model
        self.name = name or model.name
        self.spec = ImageSpec(model.noise_shape, model.image_shape)

    def generate(self, req: GenerationRequest) -> np.ndarray:
        from kdd_jax.generative.samplers import SamplingError

        _check_request(req, self.spec, self.name)
        try:
            images = self.model.generate(req.prompts, req.noise, req.seeds)
        except SamplingError as e:
            raise TeacherError(f"teacher {self.name!r}: {e}") from None
        return validate_images(images, len(req), self.spec, self.name)


class CallableGenerativeTeacher:
    """Wrap `fn(prompts: list[str], noise [n, H, W, C], seeds [n] or None) -> images [n, H, W, C] in [0, 1]`."""

    output = IMAGES

    def __init__(self, name: str, fn: Callable, spec: ImageSpec):
        self.name, self.fn, self.spec = name, fn, spec

    def generate(self, req: GenerationRequest) -> np.ndarray:
        _check_request(req, self.spec, self.name)
        return validate_images(self.fn(list(req.prompts), req.noise, req.seeds), len(req), self.spec, self.name)


class CachedGenerativeTeacher:
    """A generative teacher behind the response cache: every row is paid for once, then read back.
    Answers are validated by the teacher before they are stored; an answer read back from the cache
    with another image size (the teacher's spec changed under the same name) is an error."""

    output = IMAGES

    def __init__(self, teacher, cache: ResponseCache, *, batch_size: int = 64, budget: int | None = None):
        check_budget(budget, teacher.name)
        self.teacher, self.cache, self.batch_size, self.budget = teacher, cache, batch_size, budget
        self.name, self.spec = teacher.name, teacher.spec
        self.stats = CacheStats()

    def generate(self, req: GenerationRequest) -> np.ndarray:
        _check_request(req, self.spec, self.name)
        streams = getattr(self.teacher, "streams_parts", False)

        def ask(part: GenerationRequest, on_part=None) -> TeacherOutput:
            if streams:
                def relay(start, images):
                    on_part(start, TeacherOutput(IMAGES, values=images))
                return TeacherOutput(IMAGES, values=self.teacher.generate(part, on_part=relay))
            return TeacherOutput(IMAGES, values=self.teacher.generate(part))

        out = cached_query(self.cache, self.name, IMAGES, req, ask, stats=self.stats, batch_size=self.batch_size,
                           budget=self.budget, streams=streams, keys=req.keys(self.name))
        flat = out.values
        want = int(np.prod(self.spec.image_shape))
        if flat.shape[1] != want:
            raise TeacherError(f"teacher {self.name!r}: cached images hold {flat.shape[1]} values, its spec "
                               f"{list(self.spec.image_shape)} needs {want}; the cache holds answers of another "
                               "model under this name")
        return flat.reshape(len(req), *self.spec.image_shape)
