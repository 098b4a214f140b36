"""Round trips: Flax -> safetensors -> Flax, and converted checkpoints through orbax."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from converters import convert_student
from converters.keymap import export_torch_state
from kdd_jax.io import load_converted, save_converted, write_safetensors
from tests.conftest import full_config


def _leaves(model):
    return jax.tree.leaves(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))))


@pytest.mark.parametrize("name", ["resnext_bottleneck", "vgg_plain_nested", "mobilenetv2_wide", "densenet_imagenet_stem",
                                  "alexnet_small"])
def test_flax_to_safetensors_to_flax_is_exact(name, make_student, tmp_path):
    src = make_student(name, seed=5)
    first = convert_student(src)
    exported = export_torch_state(first.model)
    original = load_file(str(src / "model.safetensors"))
    # the export IS the original torch state dict, bit for bit (minus the BN step counters)
    assert set(exported) == {k for k in original if not k.endswith("num_batches_tracked")}
    for k, v in exported.items():
        np.testing.assert_array_equal(v, original[k].numpy(), err_msg=k)
    out = tmp_path / "again"
    out.mkdir()
    write_safetensors(out / "model.safetensors", exported)
    (out / "config.json").write_text(json.dumps(full_config(name)))
    second = convert_student(out)
    for a, b in zip(_leaves(first.model), _leaves(second.model)):
        np.testing.assert_array_equal(a, b)
    # and PyTorch accepts the export as a state dict
    from converters.torch_reference import build_torch_model

    build_torch_model(full_config(name)).load_state_dict({k: torch.from_numpy(v.copy()) for k, v in exported.items()}, strict=True)


def test_orbax_save_and_load_converted(make_student, tmp_path):
    result = convert_student(make_student("resnet20", seed=6))
    target = save_converted(tmp_path / "out" / "resnet20", result.model, result.config, result.report)
    model, config, report = load_converted(target)
    assert config == result.config
    assert report["source"]["sha256"] == result.report["source"]["sha256"]
    for a, b in zip(_leaves(result.model), _leaves(model)):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(result.model(x)))
    # nothing but the published directory is left in the parent
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["resnet20"]


def test_save_converted_refuses_to_clobber_and_replaces_with_overwrite(make_student, tmp_path):
    a = convert_student(make_student("resnet20", seed=1, dirname="a"))
    b = convert_student(make_student("resnet20", seed=2, dirname="b"))
    target = tmp_path / "out" / "student"
    save_converted(target, a.model, a.config, a.report)
    with pytest.raises(FileExistsError):
        save_converted(target, b.model, b.config, b.report)
    assert load_converted(target)[2]["source"]["sha256"] == a.report["source"]["sha256"]
    save_converted(target, b.model, b.config, b.report, overwrite=True)
    assert load_converted(target)[2]["source"]["sha256"] == b.report["source"]["sha256"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["student"]


def test_interrupted_save_leaves_nothing(make_student, tmp_path, monkeypatch):
    """A crash while writing must not leave a half-written checkpoint under the target name."""
    import kdd_jax.io as kio

    result = convert_student(make_student("resnet20", seed=1))

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(kio, "atomic_write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        save_converted(tmp_path / "out" / "s", result.model, result.config, result.report)
    assert list((tmp_path / "out").iterdir()) == []


def test_load_converted_names_missing_part(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="missing state"):
        load_converted(tmp_path / "x")


def test_students_sharing_a_config_stay_independent(make_student):
    """The abstract model and key map are cached per config; converting a second student of the
    same architecture must not touch the first model (nor leave the cache holding weights)."""
    from converters.convert import model_structure

    a = convert_student(make_student("resnet20", seed=1, dirname="a"))
    before = _leaves(a.model)
    b = convert_student(make_student("resnet20", seed=2, dirname="b"))
    assert model_structure.cache_info().hits >= 1
    for x, y in zip(before, _leaves(a.model)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(_leaves(a.model), _leaves(b.model)))
    abstract, _ = model_structure(a.config)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(abstract)))


def _publish(target, text, **kw):
    from kdd_jax.io import StagingDir

    with StagingDir(target, **kw) as tmp:
        (tmp / "payload.txt").write_text(text)


def test_overwrite_swaps_in_one_exchange_so_the_target_is_never_missing(tmp_path, monkeypatch):
    """On Linux an overwrite is one atomic exchange: a crash at any later point (here: the first
    os.replace, which the old two-rename publish needed) still leaves a complete target."""
    import kdd_jax.io as kio

    probe_a, probe_b = tmp_path / "probe-a", tmp_path / "probe-b"
    probe_a.mkdir()
    probe_b.mkdir()
    if not kio._exchange(probe_a, probe_b):
        pytest.skip("this platform or filesystem has no RENAME_EXCHANGE")
    probe_a.rmdir()
    probe_b.rmdir()
    target = tmp_path / "latest"
    _publish(target, "v1")

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-publish")

    monkeypatch.setattr(kio.os, "replace", crash)
    _publish(target, "v2", overwrite=True)
    assert (target / "payload.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_crash_between_the_two_renames_is_recovered_by_the_next_reader(tmp_path, monkeypatch):
    """Where no exchange exists, an overwrite takes two renames; a kill between them leaves the previous
    version aside, and `recover` (run by the synthesis checkpoint's restore and by the next publish)
    puts it back: the last complete version is never lost."""
    import kdd_jax.io as kio
    from kdd_jax.io import StagingDir

    target = tmp_path / "latest"
    _publish(target, "v1")
    monkeypatch.setattr(kio, "_exchange", lambda a, b: False)
    real_replace, calls = kio.os.replace, []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(a, b)

    monkeypatch.setattr(kio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _publish(target, "v2", overwrite=True)
    monkeypatch.setattr(kio.os, "replace", real_replace)
    assert not target.exists()  # the window the exchange closes
    assert StagingDir.recover(target) and (target / "payload.txt").read_text() == "v1"
    assert not StagingDir.recover(target)  # nothing left to recover
    assert not any(".old-" in p.name for p in tmp_path.iterdir())
    _publish(target, "v3", overwrite=True)  # the fallback path still publishes
    assert (target / "payload.txt").read_text() == "v3"
    # killed again between the renames, twice: the next overwrite itself recovers the latest version first
    calls.clear()
    monkeypatch.setattr(kio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _publish(target, "v4", overwrite=True)
    monkeypatch.setattr(kio.os, "replace", real_replace)
    assert not target.exists()
    with StagingDir(target, overwrite=True) as tmp:
        assert (target / "payload.txt").read_text() == "v3"  # put back before the new version is staged
        (tmp / "payload.txt").write_text("v5")
    assert (target / "payload.txt").read_text() == "v5"
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" not in p.name) == ["latest"]


def test_recover_only_takes_this_targets_set_aside_versions(tmp_path):
    """`.a.old-x.old-XXXXXXXX` belongs to a target named `a.old-x`, not `a`; glob characters in a name are
    literal."""
    from kdd_jax.io import StagingDir

    (tmp_path / ".a.old-x.old-abcd1234" / "old").mkdir(parents=True)
    assert not StagingDir.recover(tmp_path / "a") and not (tmp_path / "a").exists()
    odd = tmp_path / "b[1]"
    (tmp_path / ".b[1].old-zzzz1234" / "old").mkdir(parents=True)
    assert StagingDir.recover(odd) and odd.is_dir()


def test_synthesis_checkpoint_restore_recovers_a_version_left_aside(tmp_path):
    """The synthesis checkpoint reads through `recover`: a snapshot left aside by a crash mid-overwrite
    is restored, not silently replaced by a fresh start."""
    import jax.numpy as jnp

    from kdd_jax.synthesis.probes import Checkpointer

    ck = Checkpointer(tmp_path / "ck", fingerprint="f", every=1)
    carry = {"x": jnp.arange(4.0)}
    ck.save(carry, 3, np.zeros(3, np.float32))
    aside = tmp_path / "ck" / ".latest.old-abcd1234"
    aside.mkdir()
    (tmp_path / "ck" / "latest").rename(aside / "old")
    restored = ck.restore(carry)
    assert restored is not None and restored[1] == 3
    np.testing.assert_array_equal(np.asarray(restored[0]["x"]), np.arange(4.0))
