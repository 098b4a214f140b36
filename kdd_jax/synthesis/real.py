"""Probes chosen from real images: the paper's baselines (and its "oracle").

These are not data-free: the auditor supplies a pool of images (`ImagePool`, raw NCHW in the
student's value range). They exist to measure what synthesis buys (benchmarks/) and for users who
do hold data.

- ``real``: N images drawn uniformly from the pool (seeded). With the student's own training data
  as the pool this is the paper's oracle; with any other data, a plain real-data baseline.
- ``ood``: out-of-distribution filtering of an auxiliary pool: keep the N images the student finds
  most in-distribution by the energy score logsumexp(logits) (Liu et al. 2020), so the probes
  approximate the student's unseen training distribution. Needs no labels.
- ``mia``: membership-inference filtering: keep the N images most likely to be training members
  of the student. With labels, the loss attack (Yeom et al. 2018): lowest CE(student(x), y);
  without labels, the confidence attack: highest max softmax probability.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from kdd_jax.models import predict_logits
from kdd_jax.synthesis.probes import ProbeSet, SynthesisConfig, SynthesisError


@dataclasses.dataclass(frozen=True)
class ImagePool:
    """Raw images [N, C, H, W] float32 in the student's value range, optional int labels [N]."""

    images: np.ndarray
    labels: np.ndarray | None = None
    source: str = "pool"

    @staticmethod
    def from_file(path, config) -> ImagePool:
        """Read a pool file (.safetensors / .npz with keys "images" and optional "labels", or an
        .npy of images). Images are NCHW, or NHW for one-channel students; uint8 pixels are mapped
        linearly from [0, 255] onto the student's value_range, floats are taken as they are."""
        from kdd_jax.io import read_arrays

        arrays = read_arrays(path, "image pool")
        if "images" not in arrays:
            raise SynthesisError(f"{path}: no array named 'images' (found {sorted(arrays)})")
        x = np.asarray(arrays["images"])
        if x.ndim == 3 and config.preprocessing.channels == 1:
            x = x[:, None]
        if x.dtype == np.uint8:
            lo, hi = config.preprocessing.value_range
            x = x.astype(np.float32) / 255.0 * (hi - lo) + lo
        elif not np.issubdtype(x.dtype, np.floating):
            raise SynthesisError(f"{path}: images have dtype {x.dtype}; use uint8 or float")
        y = arrays.get("labels")
        pool = ImagePool(x.astype(np.float32), None if y is None else np.asarray(y), str(path))
        pool.check(config)
        return pool

    def check(self, config) -> None:
        pre = config.preprocessing
        want = (pre.channels, *pre.input_size)
        x = self.images
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise SynthesisError(f"{self.source}: images have shape {tuple(x.shape)}, the student takes "
                                 f"[N, {', '.join(map(str, want))}] (NCHW)")
        if len(x) == 0:
            raise SynthesisError(f"{self.source}: the image pool is empty")
        if not np.all(np.isfinite(x)):
            raise SynthesisError(f"{self.source}: images hold NaN or Inf")
        lo, hi = pre.value_range
        if x.min() < lo - 1e-6 or x.max() > hi + 1e-6:
            raise SynthesisError(f"{self.source}: pixel values span [{x.min():.4g}, {x.max():.4g}], outside the "
                                 f"student's value_range [{lo}, {hi}]")
        if self.labels is not None:
            y = self.labels
            c = config.arch.num_classes
            if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= c:
                raise SynthesisError(f"{self.source}: labels must be {len(x)} integers in [0, {c})")


def _normalise(raw_nchw: np.ndarray, pre) -> np.ndarray:
    x = raw_nchw.transpose(0, 2, 3, 1).astype(np.float32)
    return (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)


def select_from_pool(model, config, sc: SynthesisConfig, pool: ImagePool | None, progress=None) -> ProbeSet:
    if pool is None:
        raise SynthesisError(f"method {sc.method!r} selects real images: give an image pool (--pool FILE)")
    pool.check(config)
    pre = config.preprocessing
    n = sc.n_probes
    if len(pool.images) < n:
        raise SynthesisError(f"{pool.source}: holds {len(pool.images)} images, fewer than the {sc.n_probes} probes asked for")
    c = config.arch.num_classes
    if sc.method == "real":
        idx = np.sort(np.random.default_rng(sc.seed).choice(len(pool.images), n, replace=False))
        x = _normalise(pool.images[idx], pre)
        logits = np.asarray(predict_logits(model, x))
    else:
        x_all = _normalise(pool.images, pre)
        logits_all = np.asarray(predict_logits(model, x_all), np.float64)
        logp = np.asarray(jax.nn.log_softmax(logits_all, -1))
        if sc.method == "ood":
            membership = np.asarray(jax.nn.logsumexp(logits_all, -1))  # energy: higher = more in-distribution
        elif pool.labels is not None:
            membership = logp[np.arange(len(logp)), pool.labels]  # -CE: higher = more likely a member
        else:
            membership = logp.max(-1)  # confidence attack
        # stable top-n; ties broken by pool order so the selection is deterministic
        idx = np.sort(np.argsort(-membership, kind="stable")[:n])
        x, logits = x_all[idx], logits_all[idx]
    if pool.labels is not None:
        targets = np.eye(c, dtype=np.float32)[pool.labels[idx]]
    else:
        targets = np.asarray(jax.nn.softmax(logits, -1), np.float32)
    probes = ProbeSet.from_normalised(x, targets, pre, sc, np.zeros(0, np.float32))
    # exact pool pixels (from_normalised round-trips through the normalisation)
    probes.raw = np.ascontiguousarray(pool.images[idx].astype(np.float32))
    return probes
