"""The student config (`config.json`) schema, parsed strictly.

A config is family + architecture hyper-parameters + preprocessing:

    {"format_version": 1, "family": "resnet",
     "arch": {"block": "basic", "layers": [3, 3, 3], "widths": [16, 32, 64], "stem": "small",
              "num_classes": 10},
     "preprocessing": {"input_size": [32, 32], "channels": 3, "layout": "NCHW",
                       "value_range": [0.0, 1.0], "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}}

Each family's arch fields are the dataclass in `kdd_jax/models/<family>.py`. Unknown keys are
refused, not ignored (a variant checkpoint must never be silently mis-built), and every error
names the field at fault.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A config that cannot be used; the message names the source and the field."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` (parsed JSON) against annotation `tp`; lists become tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is none of {' | '.join(_type_name(a) for a in args)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, where)
    raise TypeError(f"unsupported annotation {tp!r} at {where}")  # programming error, not input


def parse_dataclass(cls, data: Any, where: str):
    """Build dataclass `cls` from a JSON object, refusing unknown and missing fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = []
    unknown = sorted(set(data) - set(fields))
    if unknown:
        problems.append(f"{where}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            try:
                kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
            except ConfigError as e:
                problems.append(str(e))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{where}.{name}: required field missing")
    if problems:
        raise ConfigError("; ".join(problems))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_json_dict(obj) -> dict:
    """Dataclass -> plain JSON-ready dict (tuples become lists)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(obj)


# Input shapes past these are mistakes (a 8192x8192 RGB probe is already 0.8 GB as float32): refused when a config
# is read rather than when an allocation fails mid-run, which would take a bulk conversion or an audit down with it.
MAX_INPUT_SIDE = 8192
MAX_CHANNELS = 1024


def check_input_shape(input_size, channels, what: str = "input_size") -> None:
    """ConfigError unless 1 <= each side <= MAX_INPUT_SIDE and 1 <= channels <= MAX_CHANNELS."""
    if min(input_size) < 1 or channels < 1:
        raise ConfigError(f"{what} and channels must be positive")
    if max(input_size) > MAX_INPUT_SIDE or channels > MAX_CHANNELS:
        raise ConfigError(f"{what} {list(input_size)} with {channels} channel(s) is larger than supported (sides up "
                          f"to {MAX_INPUT_SIDE} pixels, up to {MAX_CHANNELS} channels)")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw images become the model's input: x_model = (x_raw - mean) / std.

    `value_range` is the range of raw pixels (e.g. [0, 1] after ToTensor, or [0, 255]).
    `layout` documents the PyTorch model's input layout; kdd_jax models take NHWC.
    """

    input_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: tuple[float, float] = (0.0, 1.0)
    layout: Literal["NCHW"] = "NCHW"

    def __post_init__(self):
        check_input_shape(self.input_size, self.channels)
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                raise ConfigError(f"{name} has {len(getattr(self, name))} values for {self.channels} channels")
        if any(s <= 0 for s in self.std):
            raise ConfigError("std values must be > 0")
        if not self.value_range[0] < self.value_range[1]:
            raise ConfigError(f"value_range {list(self.value_range)} is empty")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    family: str
    arch: Any  # the family's Arch dataclass
    preprocessing: Preprocessing
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "family": self.family,
            "arch": to_json_dict(self.arch),
            "preprocessing": to_json_dict(self.preprocessing),
        }


def parse_config(data: Any, source: str = "config") -> StudentConfig:
    """Validate a config dict (already JSON-decoded). `source` names it in errors."""
    from kdd_jax.models import FAMILIES  # late: models import this module

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    allowed = {"format_version", "family", "arch", "preprocessing"}
    problems = []
    unknown = sorted(set(data) - allowed)
    if unknown:
        problems.append(f"{source}: unknown top-level field(s) {unknown}; allowed: {sorted(allowed)}")
    version = data.get("format_version", FORMAT_VERSION)
    if type(version) is not int or version != FORMAT_VERSION:
        problems.append(f"{source}.format_version: {version!r} is not supported (expected {FORMAT_VERSION})")
    family = data.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        problems.append(f"{source}.family: {family!r} is not a known family; known: {sorted(FAMILIES)}")
    for key in ("arch", "preprocessing"):
        if key not in data:
            problems.append(f"{source}.{key}: required field missing")
    if problems:
        raise ConfigError("; ".join(problems))
    arch = parse_dataclass(FAMILIES[family].arch_cls, data["arch"], f"{source}.arch")
    pre = parse_dataclass(Preprocessing, data["preprocessing"], f"{source}.preprocessing")
    if pre.channels != arch.in_channels:
        raise ConfigError(
            f"{source}: preprocessing.channels={pre.channels} but arch.in_channels={arch.in_channels}"
        )
    if hasattr(arch, "check_input_size"):  # families whose strides or position embeddings fix the input
        try:
            arch.check_input_size(pre.input_size)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return StudentConfig(family=family, arch=arch, preprocessing=pre, format_version=version)


# JSON configs are small; anything larger is hostile or a mistake.
MAX_CONFIG_BYTES = 1 << 20


def read_json_config(path: str | Path, what: str = "config"):
    """A small JSON file (at most MAX_CONFIG_BYTES), parsed; every failure is a ConfigError naming
    the file (unreadable, too large, invalid or absurdly deep JSON)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror})") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {what} is {size} bytes, more than the {MAX_CONFIG_BYTES} allowed")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror})") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def load_config(path: str | Path) -> StudentConfig:
    return parse_config(read_json_config(path), str(path))
