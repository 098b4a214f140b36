"""Architecture inference from a state dict's key names and shapes, for students with no config.

Each family's converter module proposes an arch from the keys it recognises; the proposal is only
accepted if the model it describes has exactly the checkpoint's keys and shapes (checked again by
the key map). Preprocessing cannot be read from weights: an inferred config uses identity
normalisation on [0, 1] inputs, and the report says so.
"""

from __future__ import annotations

import dataclasses


class InferenceError(ValueError):
    """The architecture is ambiguous or unknown from the weights alone."""


@dataclasses.dataclass
class Inferred:
    arch: dict
    input_size: tuple[int, int]
    notes: list[str]


def count_indexed(shapes: dict, template: str, start: int = 0) -> int:
    """How many consecutive indices i = start, start+1, ... have template.format(i) in shapes."""
    i = start
    while template.format(i) in shapes:
        i += 1
    return i - start


def shapes_of_config(family: str, arch: dict, input_size) -> dict[str, tuple]:
    """torch state-dict key -> shape (without counters) for an arch, computed abstractly."""
    from converters.keymap import build_keymap
    from kdd_jax.config import parse_config
    from kdd_jax.models import abstract_model

    cfg = parse_config(_config_dict(family, arch, input_size, arch.get("in_channels", 3)), "inferred")
    return {e.source: e.source_shape for e in build_keymap(abstract_model(cfg))}


def _config_dict(family, arch, input_size, channels) -> dict:
    return {
        "format_version": 1,
        "family": family,
        "arch": arch,
        "preprocessing": {
            "input_size": list(input_size),
            "channels": channels,
            "mean": [0.0] * channels,
            "std": [1.0] * channels,
            "value_range": [0.0, 1.0],
        },
    }


def infer_config(shapes: dict[str, tuple], source: str) -> tuple[dict, list[str]]:
    """(config dict, notes on what was inferred) or InferenceError naming `source`."""
    from converters.registry import CONVERTERS

    candidates = [c for c in CONVERTERS.values() if c.matches(shapes)]
    if not candidates:
        sample = ", ".join(sorted(shapes)[:5])
        raise InferenceError(
            f"{source}: no config.json and the keys (e.g. {sample}) match no known family "
            f"({', '.join(CONVERTERS)}); provide a config.json"
        )
    if len(candidates) > 1:
        raise InferenceError(f"{source}: keys match several families {[c.FAMILY for c in candidates]}; provide a config.json")
    conv = candidates[0]
    try:
        found = conv.infer(shapes)
    except (KeyError, IndexError) as e:
        raise InferenceError(f"{source}: looks like {conv.FAMILY} but key {e} is missing or malformed") from None
    except InferenceError as e:
        raise InferenceError(f"{source}: {conv.FAMILY}: {e}") from None
    channels = found.arch.get("in_channels", 3)
    notes = [f"family '{conv.FAMILY}' inferred from key names", *found.notes]
    notes.append(
        f"preprocessing unknown: assumed input {found.input_size[0]}x{found.input_size[1]}, values in "
        "[0, 1], identity normalisation (mean 0, std 1); give a config.json before auditing"
    )
    return _config_dict(conv.FAMILY, found.arch, found.input_size, channels), notes


