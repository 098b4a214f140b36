"""Synthesis checkpoints: an interrupted run resumes and ends with exactly the probes (and loss
history) of an uninterrupted one; a snapshot made for other settings is never resumed."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from kdd_jax.config import parse_config
from kdd_jax.models import build_model
from kdd_jax.synthesis import SynthesisConfig, synthesize
from tests.conftest import full_config

CFG = copy.deepcopy(full_config("resnet20"))
CFG["arch"].update(layers=[1, 1, 1], widths=[8, 8, 8])
CFG["preprocessing"]["input_size"] = [8, 8]


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def student():
    config = parse_config(CFG)
    return build_model(config, seed=5), config


def run(student, sc, ckpt=None, stop_at=None):
    model, config = student
    seen = []

    def progress(step, loss):
        seen.append(step)
        if step == stop_at:
            raise Interrupt

    probes = synthesize(model, config, sc, progress, checkpoint_dir=ckpt, checkpoint_every=4)
    return probes, seen


@pytest.mark.parametrize("method, loop", [("pixel", "python"), ("generator", "python"), ("pixel", "scan")])
def test_interrupted_synthesis_resumes_to_the_same_probes(student, tmp_path, method, loop):
    small_generator = {"batch_size": 6, "generator_width": 8} if method == "generator" else {}
    sc = SynthesisConfig(method=method, n_probes=6, steps=10, seed=3, loop=loop, **small_generator)
    reference, _ = run(student, sc)
    with pytest.raises(Interrupt):
        run(student, sc, tmp_path / "ckpt", stop_at=8 if loop == "scan" else 6)
    resumed, seen = run(student, sc, tmp_path / "ckpt")
    assert min(seen) > 4  # started after the last snapshot, not from step 0
    assert resumed.sha256 == reference.sha256
    np.testing.assert_array_equal(resumed.loss_history, reference.loss_history)
    np.testing.assert_array_equal(resumed.targets, reference.targets)
    again, seen = run(student, sc, tmp_path / "ckpt")  # finished: nothing left to optimise
    assert seen == [] and again.sha256 == reference.sha256


def test_snapshot_for_other_settings_is_not_resumed(student, tmp_path):
    sc = SynthesisConfig(n_probes=4, steps=8, seed=1)
    run(student, sc, tmp_path / "ckpt")
    other = SynthesisConfig(n_probes=4, steps=8, seed=2)
    fresh, seen = run(student, other, tmp_path / "ckpt")
    assert seen[0] == 1  # from the start
    assert fresh.sha256 == run(student, other)[0].sha256
