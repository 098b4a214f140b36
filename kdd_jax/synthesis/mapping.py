"""Map probes from the student's raw input space into a teacher's: value range, channels, size.

Teachers are black boxes with their own documented input spec (kdd_jax.teachers.InputSpec);
students and teachers may differ in resolution, colour and pixel range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# ITU-R BT.601 luma, what torchvision's Grayscale uses.
LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def map_probes(raw: np.ndarray, src_range: tuple[float, float], spec, teacher: str = "teacher") -> np.ndarray:
    """raw: NCHW float32 in `src_range` -> NCHW float32 in the teacher's spec."""
    x = (np.asarray(raw, np.float32) - src_range[0]) / (src_range[1] - src_range[0])  # to [0, 1]
    c_in, c_out = x.shape[1], spec.channels
    if c_in != c_out:
        if c_in == 1:
            x = np.repeat(x, c_out, axis=1)
        elif c_in == 3 and c_out == 1:
            x = np.einsum("nchw,c->nhw", x, LUMA)[:, None]
        else:
            raise ValueError(f"teacher {teacher!r}: cannot map {c_in}-channel probes to {c_out} channels")
    h, w = spec.input_size
    if x.shape[2:] != (h, w):
        # antialiased bilinear, as PIL/torchvision resize; in [0, 1] so clipping undoes overshoot
        x = np.asarray(jax.image.resize(jnp.asarray(x), (x.shape[0], x.shape[1], h, w), "linear", antialias=True))
    lo, hi = spec.value_range
    return np.ascontiguousarray(np.clip(x, 0.0, 1.0) * (hi - lo) + lo, dtype=np.float32)
