"""The teachers file (`teachers.json` or `.yaml`): which candidates to query, and how.

    {"teachers": [
      {"name": "resnet-a", "kind": "local", "path": "runs/teachers/resnet-a", "output": "probs"},
      {"name": "vgg-b", "kind": "local", "path": "zoo/vgg-b", "output": "topk", "k": 5}
    ]}

`kind: local` loads a model converted by `kdd convert` (or a student-format directory, converted
on the fly) and serves it in-process as a black box. Its input spec is the model's preprocessing
(raw pixels at its input size, channels and value range). `kind: http` queries a model served
with the Open Inference Protocol v2 (`kdd serve`, Triton, KServe, MLServer); its input spec is
given in the entry, and a bearer token, if any, is read from the variable named by token_env:

    {"name": "remote-c", "kind": "http", "url": "http://127.0.0.1:8000", "model": "c",
     "output": "probs", "input_size": [32, 32], "channels": 3, "value_range": [0, 1],
     "num_classes": 10, "timeout_s": 30, "max_retries": 4, "batch_size": 64, "concurrency": 4,
     "token_env": "TEACHER_C_TOKEN"}

Generative teachers (diffusion models, kdd_jax/teachers/generative.py): `kind: local` with the path
of a diffusers folder (unet/ + scheduler/) is sampled in-process with its kdd_sampling.json settings,
which `num_inference_steps`, `guidance_scale`, `eta`, `scheduler` and `timestep_spacing` override;
`kind: http` with `output: images` queries an OIP v2 endpoint taking (prompt, noise or seed):

    {"name": "sd-c", "kind": "http", "url": "http://127.0.0.1:8001", "output": "images",
     "noise_shape": [32, 32, 1], "image_shape": [32, 32, 1], "send": "noise", "timeout_s": 120}

Teacher names identify answers in the
response cache, so they must be unique and stable.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from pathlib import Path
from typing import Literal

from kdd_jax.config import ConfigError, check_input_shape, parse_dataclass

MAX_TIMEOUT_S = 86400.0  # one day per request: past that, socket deadlines overflow the platform's time_t


@dataclasses.dataclass(frozen=True)
class TeacherEntry:
    name: str
    path: str = ""  # kind local: the model directory
    kind: Literal["local", "http"] = "local"
    output: Literal["logits", "probs", "topk", "labels", "images"] = "probs"
    k: int = 5
    # generative teachers: sampling settings of a local diffusion folder (None: its kdd_sampling.json) ...
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    eta: float | None = None
    scheduler: str | None = None
    timestep_spacing: str | None = None
    # ... and the shapes and noise transport of an http one
    noise_shape: tuple[int, int, int] | None = None
    image_shape: tuple[int, int, int] | None = None
    send: Literal["noise", "seed"] = "noise"
    # kind http (Open Inference Protocol v2, see kdd_jax/teachers/http.py)
    url: str = ""
    model: str = ""  # model name on the server; default: name
    input_size: tuple[int, int] | None = None
    channels: int | None = None
    value_range: tuple[float, float] = (0.0, 1.0)
    num_classes: int | None = None
    timeout_s: float = 30.0
    max_retries: int = 4
    batch_size: int = 64
    concurrency: int = 4
    token_env: str | None = None  # name of the environment variable holding a bearer token

    def __post_init__(self):
        if not self.name or any(c in self.name for c in "\0/\\"):
            raise ConfigError(f"name {self.name!r} must be non-empty without slashes or NUL")
        if self.k < 1:
            raise ConfigError("k must be >= 1")
        if self.kind == "local" and not self.path:
            raise ConfigError("path: required for kind 'local'")
        if self.kind == "http" and self.output == "images":
            missing = [f for f in ("url", "noise_shape", "image_shape") if getattr(self, f) in (None, "")]
            if missing:
                raise ConfigError(f"kind 'http' with output 'images' needs {missing}")
            if min(*self.noise_shape, *self.image_shape, self.batch_size, self.concurrency) < 1:
                raise ConfigError("noise_shape, image_shape, batch_size and concurrency must be >= 1")
            check_input_shape(self.noise_shape[:2], self.noise_shape[2], "noise_shape")
            check_input_shape(self.image_shape[:2], self.image_shape[2], "image_shape")
        elif self.kind == "http":
            missing = [f for f in ("url", "input_size", "channels", "num_classes") if getattr(self, f) in (None, "")]
            if missing:
                raise ConfigError(f"kind 'http' needs {missing}")
            if min(*self.input_size, self.channels, self.num_classes, self.batch_size, self.concurrency) < 1:
                raise ConfigError("input_size, channels, num_classes, batch_size and concurrency must be >= 1")
            check_input_shape(self.input_size, self.channels)
        if self.kind == "http":
            if not self.url.startswith(("http://", "https://")):
                raise ConfigError(f"url {self.url!r} must start with http:// or https://")
            try:  # a malformed host or port would otherwise surface only after synthesis, as retried connection errors
                parts = urllib.parse.urlsplit(self.url)
                parts.port  # noqa: B018  (raises ValueError for a port outside 0-65535 or not a number)
            except ValueError as e:
                raise ConfigError(f"url {self.url!r} is malformed ({e})") from None
            if not parts.hostname:
                raise ConfigError(f"url {self.url!r} names no host")
            if self.max_retries < 0 or not 0 < self.timeout_s <= MAX_TIMEOUT_S or not self.value_range[0] < self.value_range[1]:
                raise ConfigError(f"need max_retries >= 0, timeout_s in (0, {MAX_TIMEOUT_S}] and value_range [lo, hi] "
                                  "with lo < hi")


def load_teachers_file(path: str | Path) -> list[TeacherEntry]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read teachers file ({e})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / JSONDecodeError / RecursionError: all mean "unparseable"
        raise ConfigError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} ({e})") from None
    limit = 2 * len(text) + 10_000
    if _expanded_nodes(data, limit) > limit:  # YAML aliases: a 400-byte file can expand to gigabytes
        raise ConfigError(f"{path}: expands to more than {limit} values (YAML aliases nested in aliases?)")
    if not isinstance(data, dict) or set(data) != {"teachers"} or not isinstance(data["teachers"], list):
        raise ConfigError(f'{path}: expected an object {{"teachers": [...]}}')
    if not data["teachers"]:
        raise ConfigError(f"{path}: the teacher list is empty")
    entries = [parse_dataclass(TeacherEntry, t, f"{path}: teachers[{i}]") for i, t in enumerate(data["teachers"])]
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: duplicate teacher names {dupes} (names key the response cache)")
    for i, e in enumerate(entries):
        p = Path(e.path)
        if e.kind == "local" and not p.is_absolute():  # relative to the teachers file, so a file travels with its zoo
            entries[i] = dataclasses.replace(e, path=str((path.parent / p)))
    return entries


def _expanded_nodes(obj, limit: int) -> int:
    """Values in `obj` counted as if every YAML alias were a copy, as anything that walks or prints
    it (error messages included) would see them; stops counting past `limit` (aliases may cycle)."""
    n, stack = 0, [obj]
    while stack and n <= limit:
        o = stack.pop()
        n += 1
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return n


SAMPLING_FIELDS = ("num_inference_steps", "guidance_scale", "eta", "scheduler", "timestep_spacing")


def open_teacher(entry: TeacherEntry):
    """A black-box teacher object for one entry: a classifier, or a generative teacher (output "images")."""
    from kdd_jax.generative.pipeline import is_diffusion_folder

    if entry.kind == "http" and entry.output == "images":
        from kdd_jax.teachers.generative import ImageSpec
        from kdd_jax.teachers.http import HttpGenerativeTeacher

        return HttpGenerativeTeacher(entry.name, entry.url, model=entry.model or entry.name,
                                     spec=ImageSpec(tuple(entry.noise_shape), tuple(entry.image_shape)), send=entry.send,
                                     timeout_s=entry.timeout_s, max_retries=entry.max_retries,
                                     batch_size=entry.batch_size, concurrency=entry.concurrency, token_env=entry.token_env)
    if entry.kind == "local" and is_diffusion_folder(entry.path):
        from kdd_jax.generative.pipeline import load_diffusion
        from kdd_jax.teachers.generative import DiffusionTeacher

        sampling = {f: getattr(entry, f) for f in SAMPLING_FIELDS if getattr(entry, f) is not None}
        return DiffusionTeacher(load_diffusion(entry.path, sampling, name=entry.name))
    if entry.kind == "http":
        from kdd_jax.teachers.http import http_teacher_from_entry

        return http_teacher_from_entry(entry)
    from kdd_jax.detect import load_any_student
    from kdd_jax.teachers.local import flax_teacher

    model, config = load_any_student(entry.path, what=f"teacher {entry.name!r}")
    return flax_teacher(entry.name, model, config, output=entry.output, k=entry.k)
