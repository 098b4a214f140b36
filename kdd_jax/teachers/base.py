"""What a black-box teacher is: a batch of inputs in ITS input space -> one kind of output.

Output kinds, from most to least informative:
  logits  float32 [N, C]
  probs   float32 [N, C]           (rows sum to 1)
  topk    int32 indices [N, k] + float32 probs [N, k], most probable first
  labels  int32 [N]                (label-only API)
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol, runtime_checkable

import numpy as np

OutputKind = Literal["logits", "probs", "topk", "labels"]
OUTPUT_KINDS: tuple[str, ...] = ("logits", "probs", "topk", "labels")


class TeacherError(RuntimeError):
    """A teacher failed or answered something unusable; the message names the teacher."""


@dataclasses.dataclass(frozen=True)
class TeacherOutput:
    """A batch of answers. `values` are logits/probs/top-k probs (float32); `indices` are top-k
    class indices or labels (int32). Unused fields are None."""

    kind: str
    values: np.ndarray | None = None
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.values if self.values is not None else self.indices)

    def take(self, rows) -> TeacherOutput:
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return TeacherOutput(self.kind, pick(self.values), pick(self.indices))

    @staticmethod
    def concat(parts: list[TeacherOutput]) -> TeacherOutput:
        kind = parts[0].kind
        cat = lambda name: None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return TeacherOutput(kind, cat("values"), cat("indices"))


def validate_output(out: TeacherOutput, n: int, num_classes: int | None, teacher: str) -> TeacherOutput:
    """Check an answer's kind, batch size, shapes, ranges and finiteness; raise TeacherError."""
    where = f"teacher {teacher!r}"
    if out.kind not in OUTPUT_KINDS:
        raise TeacherError(f"{where}: unknown output kind {out.kind!r}")
    if len(out) != n:
        raise TeacherError(f"{where}: answered {len(out)} rows for a batch of {n}")
    if out.kind in ("logits", "probs", "topk"):
        v = np.asarray(out.values, np.float32)
        if out.kind != "topk" and (v.ndim != 2 or (num_classes is not None and v.shape[1] != num_classes)):
            raise TeacherError(f"{where}: {out.kind} of shape {list(v.shape)}, expected [{n}, {num_classes}]")
        if not np.isfinite(v).all():
            raise TeacherError(f"{where}: {int((~np.isfinite(v)).sum())} non-finite value(s) in {out.kind}")
        if out.kind in ("probs", "topk") and ((v < -1e-6).any() or (v > 1 + 1e-6).any()):
            raise TeacherError(f"{where}: {out.kind} outside [0, 1]")
        if out.kind == "probs" and not np.allclose(v.sum(-1), 1.0, atol=1e-3):
            raise TeacherError(f"{where}: probabilities do not sum to 1 (max error {np.abs(v.sum(-1) - 1).max():.3g})")
        out = dataclasses.replace(out, values=v)
    if out.kind in ("topk", "labels"):
        idx = np.asarray(out.indices)
        if idx.dtype.kind not in "iu":
            raise TeacherError(f"{where}: {out.kind} indices must be integers, got {idx.dtype}")
        want_ndim = 2 if out.kind == "topk" else 1
        if idx.ndim != want_ndim or (out.kind == "topk" and idx.shape != np.shape(out.values)):
            raise TeacherError(f"{where}: {out.kind} indices of shape {list(idx.shape)} do not match")
        if (idx < 0).any() or (num_classes is not None and (idx >= num_classes).any()):
            raise TeacherError(f"{where}: class index out of range [0, {num_classes})")
        out = dataclasses.replace(out, indices=idx.astype(np.int32))
    return out


@runtime_checkable
class Teacher(Protocol):
    """A black-box teacher. `name` identifies it in reports and in the response cache, so two
    different models must never share a name within one cache."""

    name: str
    output: str  # one of OUTPUT_KINDS
    num_classes: int
    spec: object  # kdd_jax.teachers.InputSpec: the raw input size, channels and value range it takes

    def query(self, inputs: np.ndarray) -> TeacherOutput:
        """Answer a batch of inputs given in the teacher's own input space (NCHW float32)."""
        ...
