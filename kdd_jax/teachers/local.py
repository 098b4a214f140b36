"""In-process teachers: a Flax model or any Python callable behind the black-box interface.

A teacher's input space is raw images as its API would take them: NCHW float32 in the teacher's
value range, at its input size; the teacher normalises internally, as a served model would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdd_jax.teachers.base import OUTPUT_KINDS, TeacherError, TeacherOutput, validate_output


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a teacher accepts: NCHW float32 raw pixels of this size, channels and value range."""

    input_size: tuple[int, int]
    channels: int
    value_range: tuple[float, float] = (0.0, 1.0)

    def check(self, inputs: np.ndarray, teacher: str) -> None:
        want = (self.channels, *self.input_size)
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != want:
            raise TeacherError(f"teacher {teacher!r}: inputs of shape {list(inputs.shape)}, expected [N, {', '.join(map(str, want))}]")


def logits_to_output(logits: np.ndarray, kind: str, k: int = 5) -> TeacherOutput:
    """What an API of the given kind would return for these logits."""
    logits = np.asarray(logits, np.float32)
    if kind == "logits":
        return TeacherOutput(kind, values=logits)
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    if kind == "probs":
        return TeacherOutput(kind, values=probs.astype(np.float32))
    if kind == "topk":
        idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        return TeacherOutput(kind, values=np.take_along_axis(probs, idx, -1).astype(np.float32), indices=idx.astype(np.int32))
    if kind == "labels":
        return TeacherOutput(kind, indices=probs.argmax(-1).astype(np.int32))
    raise ValueError(f"unknown output kind {kind!r}; expected one of {OUTPUT_KINDS}")


class CallableTeacher:
    """Wrap `fn(inputs NCHW float32) -> logits [N, C]` as a teacher answering `output` kind."""

    def __init__(self, name: str, fn: Callable[[np.ndarray], np.ndarray], *, num_classes: int, spec: InputSpec,
                 output: str = "logits", k: int = 5):
        if output not in OUTPUT_KINDS:
            raise ValueError(f"teacher {name!r}: unknown output kind {output!r}; expected one of {OUTPUT_KINDS}")
        self.name, self.fn, self.num_classes, self.spec, self.output, self.k = name, fn, num_classes, spec, output, k

    def query(self, inputs: np.ndarray) -> TeacherOutput:
        inputs = np.asarray(inputs, np.float32)
        self.spec.check(inputs, self.name)
        out = logits_to_output(np.asarray(self.fn(inputs)), self.output, self.k)
        return validate_output(out, len(inputs), self.num_classes, self.name)


def flax_teacher(name: str, model: nnx.Module, config, *, output: str = "logits", k: int = 5) -> CallableTeacher:
    """A converted model as a black-box teacher in its raw input space (normalisation inside)."""
    pre = config.preprocessing
    mean = jnp.asarray(pre.mean, jnp.float32)
    std = jnp.asarray(pre.std, jnp.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(x_nchw):
        x = (jnp.transpose(x_nchw, (0, 2, 3, 1)) - mean) / std
        return nnx.merge(graphdef, state)(x)

    spec = InputSpec(tuple(pre.input_size), pre.channels, tuple(pre.value_range))
    return CallableTeacher(name, lambda x: np.asarray(forward(jnp.asarray(x))), num_classes=config.arch.num_classes,
                           spec=spec, output=output, k=k)
