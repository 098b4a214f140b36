"""Bad and hostile students through the converter and `kdd convert`.

Every failure must be one of our own errors (ConversionError / CheckpointError / ConfigError, all
ValueErrors) whose message names the file and the key or field at fault; the CLI must exit 1 (2 for
usage) without a traceback; nothing partial may be published, and nothing written outside --out.
Pickles must never execute code, with or without --allow-pickle.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
from pathlib import Path

import pytest

from converters.convert import convert_student
from converters.keymap import ConversionError
from kdd_jax.cli import main
from kdd_jax.config import MAX_CONFIG_BYTES, ConfigError
from kdd_jax.io import CheckpointError
from tests.conftest import full_config

OUR_ERRORS = (ConversionError, CheckpointError, ConfigError)
BASE = "vgg_odd_avgpool"  # the smallest student (1.9k parameters)


# ---------------------------------------------------------------------------------------- helpers


def load_sd(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def save_sd(d: Path, sd: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))


def edited_student(make_student, edit, **kw) -> Path:
    """A valid student whose state dict is then edited in place by `edit(sd)`."""
    d = make_student(BASE, **kw)
    sd = load_sd(d)
    edit(sd)
    save_sd(d, sd)
    return d


def expect(exc_type, src, *fragments, **kw) -> str:
    with pytest.raises(exc_type) as info:
        convert_student(src, **kw)
    msg = str(info.value)
    for frag in fragments:
        assert str(frag) in msg, f"{frag!r} not in message:\n{msg}"
    return msg


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_json(capsys, *args) -> tuple[int, dict, str]:
    rc, out, err = cli(capsys, *args, "--json", "-q")
    return rc, json.loads(out), err


def tree(root: Path, exclude: Path | None = None) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if exclude is None or exclude not in (p, *p.parents))


def assert_no_leftovers(out: Path) -> None:
    junk = [p for p in tree(out) if ".tmp-" in p or ".old-" in p or p.endswith(".tmp")]
    assert not junk, f"staging leftovers under --out: {junk}"


# ------------------------------------------------------------------------------ weights problems


def test_control_unmodified_student_converts(make_student):
    """The edits below are the only reason the other tests fail."""
    d = edited_student(make_student, lambda sd: None)
    result = convert_student(d)
    assert result.config.family == "vgg"


def test_missing_key(make_student):
    d = edited_student(make_student, lambda sd: sd.pop("classifier.0.bias"))
    expect(ConversionError, d, d / "model.safetensors", "missing", "classifier.0.bias")


def test_missing_bn_statistic(make_student):
    d = edited_student(make_student, lambda sd: sd.pop("features.5.running_var"))
    expect(ConversionError, d, d / "model.safetensors", "missing", "features.5.running_var")


def test_extra_key_is_refused_not_ignored(make_student):
    import torch

    d = edited_student(make_student, lambda sd: sd.update({"classifier.3.weight": torch.zeros(3, 3)}))
    expect(ConversionError, d, d / "model.safetensors", "unexpected", "classifier.3.weight")


@pytest.mark.parametrize(
    "key,shape",
    [("classifier.0.weight", (3, 145)), ("features.0.weight", (3, 8, 3, 3)), ("features.1.running_mean", (8, 1)),
     ("classifier.0.bias", ())],
)
def test_misshapen_key(make_student, key, shape):
    import torch

    d = edited_student(make_student, lambda sd: sd.update({key: torch.zeros(shape)}))
    expect(ConversionError, d, d / "model.safetensors", key, f"shape {list(shape)}")


@pytest.mark.parametrize(
    "key,value,dtype",
    [
        ("features.0.weight", float("nan"), "float32"),
        ("features.1.running_var", float("inf"), "float32"),
        ("classifier.0.bias", float("-inf"), "float32"),
        ("features.4.weight", float("inf"), "float16"),
        ("features.5.weight", float("nan"), "bfloat16"),
    ],
)
def test_non_finite_weight_names_the_key(make_student, key, value, dtype):
    import torch

    def edit(sd):
        t = sd[key].clone().to(getattr(torch, dtype))
        t.view(-1)[t.numel() // 2] = value
        sd[key] = t

    d = edited_student(make_student, edit)
    expect(ConversionError, d, d / "model.safetensors", key, "non-finite")


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool"])
def test_integer_dtype_weight_is_refused(make_student, dtype):
    import torch

    d = edited_student(make_student, lambda sd: sd.update({"features.4.weight": sd["features.4.weight"].to(getattr(torch, dtype))}))
    expect(ConversionError, d, d / "model.safetensors", "features.4.weight", dtype)


def test_all_problems_are_listed_together(make_student):
    import torch

    def edit(sd):
        sd.pop("classifier.0.bias")
        sd["stray.weight"] = torch.zeros(1)
        sd["features.0.bias"] = torch.full((8,), float("nan"))
        sd["features.4.bias"] = torch.zeros(17)

    d = edited_student(make_student, edit)
    expect(ConversionError, d, "classifier.0.bias", "stray.weight", "features.0.bias", "features.4.bias", "4 problem")


def test_empty_checkpoint(make_student):
    d = edited_student(make_student, lambda sd: sd.clear())
    expect(CheckpointError, d, d / "model.safetensors", "no tensors")


def test_garbage_weights_file(tmp_path):
    d = tmp_path / "garbage"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"this is not a safetensors file, just junk bytes\n" * 3)
    (d / "config.json").write_text(json.dumps(full_config(BASE)))
    expect(CheckpointError, d, d / "model.safetensors")


def test_no_config_and_unrecognised_keys(make_student):
    import torch

    d = edited_student(make_student, lambda sd: (sd.clear(), sd.update({"encoder.layer.0.weight": torch.zeros(2)})),
                       with_config=False)
    expect(ConversionError, d, d / "model.safetensors", "config.json")


@pytest.mark.parametrize("key", ["features.4.weight", "features.1.running_var", "classifier.0.bias"])
def test_no_config_and_a_missing_key(make_student, key):
    """Without a config the architecture is inferred from the keys: a hole is still a clear error."""
    d = edited_student(make_student, lambda sd: sd.pop(key), with_config=False)
    expect(OUR_ERRORS, d, d / "model.safetensors")


HOSTILE_NAMES = ["../../etc/passwd", "/tmp/kdd-abs-escape", "\u202e", "a\x00b", "..", "features.0.weight/../x"]


def _shown(name: str, msg: str) -> bool:
    return name in msg or repr(name)[1:-1] in msg


def test_hostile_tensor_names_are_reported_as_unexpected_keys(make_student, tmp_path, capsys):
    import torch

    d = edited_student(make_student, lambda sd: sd.update({n: torch.zeros(1) for n in HOSTILE_NAMES}))
    msg = expect(ConversionError, d, d / "model.safetensors", f"unexpected keys ({len(HOSTILE_NAMES)})")
    for n in HOSTILE_NAMES:
        assert _shown(n, msg), n

    out = tmp_path / "out"
    out.mkdir()  # a fresh --out with only failures is its own test (test_only_failures_into_a_fresh_out_dir_exit_1)
    before = tree(tmp_path, exclude=out)
    rc, res, _ = cli_json(capsys, d, "--out", out, "--no-verify")
    assert rc == 1 and res["failed"] == 1
    assert "unexpected keys" in res["students"][0]["error"]
    assert tree(tmp_path, exclude=out) == before  # nothing outside --out
    assert tree(out) == ["conversion_summary.json"]  # and nothing published inside it
    assert not Path("/tmp/kdd-abs-escape").exists()


# ------------------------------------------------------------------------------- config problems


def _mut(base, fn):
    return base, fn


def _set(path, value):
    def fn(c):
        node = c
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    return fn


def _del(path):
    def fn(c):
        node = c
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]

    return fn


BAD_CONFIGS = {
    # family
    "unknown_family": (BASE, _set(["family"], "transformer"), ["family", "transformer"]),
    "missing_family": (BASE, _del(["family"]), ["family"]),
    "family_number": (BASE, _set(["family"], 3), ["family"]),
    "family_list": (BASE, _set(["family"], ["vgg"]), ["family"]),
    "family_object": (BASE, _set(["family"], {"name": "vgg"}), ["family"]),
    # unknown fields are refused, not ignored
    "unknown_arch_field": (BASE, _set(["arch", "dilation"], 2), ["dilation"]),
    "unknown_top_field": (BASE, _set(["hidden_act"], "gelu"), ["hidden_act"]),
    "unknown_pre_field": (BASE, _set(["preprocessing", "interpolation"], "bilinear"), ["interpolation"]),
    "other_family_field": (BASE, _set(["arch", "growth_rate"], 8), ["growth_rate"]),
    # structure
    "missing_arch": (BASE, _del(["arch"]), ["arch"]),
    "missing_required_arch_field": (BASE, _del(["arch", "num_classes"]), ["num_classes"]),
    "arch_not_object": (BASE, _set(["arch"], [1, 2]), ["arch"]),
    "preprocessing_not_object": (BASE, _set(["preprocessing"], "imagenet"), ["preprocessing"]),
    # wrong types
    "num_classes_string": (BASE, _set(["arch", "num_classes"], "3"), ["num_classes"]),
    "num_classes_float": (BASE, _set(["arch", "num_classes"], 3.0), ["num_classes"]),
    "num_classes_bool": (BASE, _set(["arch", "num_classes"], True), ["num_classes"]),
    "num_classes_null": (BASE, _set(["arch", "num_classes"], None), ["num_classes"]),
    "cfg_item_string": (BASE, _set(["arch", "cfg"], ["8", "M", 16, "M"]), ["cfg[0]"]),
    "cfg_not_list": (BASE, _set(["arch", "cfg"], "8,M,16,M"), ["cfg"]),
    "batch_norm_string": (BASE, _set(["arch", "batch_norm"], "yes"), ["batch_norm"]),
    "avgpool_one_item": (BASE, _set(["arch", "avgpool"], [3]), ["avgpool"]),
    "dropout_unknown": (BASE, _set(["arch", "dropout"], "sometimes"), ["dropout"]),
    "input_size_one_item": (BASE, _set(["preprocessing", "input_size"], [32]), ["input_size"]),
    "input_size_strings": (BASE, _set(["preprocessing", "input_size"], ["32", "32"]), ["input_size"]),
    "mean_string": (BASE, _set(["preprocessing", "mean"], "0.5"), ["mean"]),
    "layout_nhwc": (BASE, _set(["preprocessing", "layout"], "NHWC"), ["layout"]),
    "format_version_2": (BASE, _set(["format_version"], 2), ["format_version"]),
    "format_version_string": (BASE, _set(["format_version"], "1"), ["format_version"]),
    "format_version_bool": (BASE, _set(["format_version"], True), ["format_version"]),
    # bad values
    "negative_classes": (BASE, _set(["arch", "num_classes"], -3), ["num_classes"]),
    "channels_mismatch": (BASE, _set(["arch", "in_channels"], 1), ["channels"]),
    "mean_wrong_length": (BASE, _set(["preprocessing", "mean"], [0.5]), ["mean"]),
    "std_zero": (BASE, _set(["preprocessing", "std"], [0.2, 0.0, 0.2]), ["std"]),
    "value_range_empty": (BASE, _set(["preprocessing", "value_range"], [1.0, 0.0]), ["value_range"]),
    # shapes no machine can hold are refused when read, not when an allocation fails mid-batch
    "input_size_huge": (BASE, _set(["preprocessing", "input_size"], [100000, 100000]),
                        ["input_size [100000, 100000]", "larger than supported"]),
    # JSON as Python parses it allows NaN / Infinity: they must not slip through
    "std_nan": (BASE, _set(["preprocessing", "std"], [float("nan")] * 3), ["std"]),
    "mean_inf": (BASE, _set(["preprocessing", "mean"], [float("inf")] * 3), ["mean"]),
    "value_range_inf": (BASE, _set(["preprocessing", "value_range"], [0.0, float("inf")]), ["value_range"]),
    "bn_eps_nan": (BASE, _set(["arch", "bn_eps"], float("nan")), ["bn_eps"]),
    "bn_eps_int_beyond_float": (BASE, _set(["arch", "bn_eps"], 10**400), ["bn_eps"]),
    "mobilenet_width_mult_nan": ("mobilenetv2_cifar", _set(["arch", "width_mult"], float("nan")), ["width_mult"]),
    "mobilenet_last_channel_zero": ("mobilenetv2_cifar", _set(["arch", "last_channel"], 0), ["last_channel"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_names_file_and_field(make_student, case):
    base, mutate, fragments = BAD_CONFIGS[case]
    cfg = full_config(base)
    mutate(cfg)
    d = make_student(BASE)  # valid weights: only the config is at fault
    (d / "config.json").write_text(json.dumps(cfg))
    expect(ConfigError, d, d / "config.json", *fragments)


BAD_CONFIG_FILES = {
    "not_json": b"{family: vgg}",
    "truncated": json.dumps(full_config(BASE)).encode()[:-5],
    "empty": b"",
    "non_utf8": b'{"family": "vgg\xff\xfe"}',
    "utf16": json.dumps(full_config(BASE)).encode("utf-16"),
    "top_level_array": b"[]",
    "top_level_null": b"null",
    "top_level_nan": b"NaN",
    "deep_lists": b"[" * 100_000,
    "deep_objects": b'{"a":' * 100_000,
    "deep_in_arch": b'{"family": "vgg", "arch": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "huge_int_literal": b'{"format_version": 1, "family": "vgg", "arch": {"num_classes": ' + b"9" * 5000 + b"}}",
    "too_large": b"{}" + b" " * MAX_CONFIG_BYTES,
}


@pytest.mark.parametrize("case", list(BAD_CONFIG_FILES))
def test_bad_config_file(make_student, case):
    d = make_student(BASE)
    (d / "config.json").write_bytes(BAD_CONFIG_FILES[case])
    msg = expect(ConfigError, d, d / "config.json")
    if case == "too_large":
        assert str(MAX_CONFIG_BYTES) in msg


def test_config_override_missing_file(make_student, tmp_path):
    d = make_student(BASE)
    expect(ConfigError, d, tmp_path / "nope.json", config=tmp_path / "nope.json")


def test_config_override_is_a_directory(make_student, tmp_path):
    d = make_student(BASE)
    cdir = tmp_path / "cfgdir"
    cdir.mkdir()
    expect(ConfigError, d, cdir, config=cdir)


def test_config_override_bad_for_every_student(make_student, tmp_path, capsys):
    a = make_student(BASE, dirname="many/a")
    make_student(BASE, seed=1, dirname="many/b")
    bad = tmp_path / "override.json"
    cfg = full_config(BASE)
    cfg["arch"]["dilation"] = 2
    bad.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    rc, res, _ = cli_json(capsys, a.parent, "--out", out, "--config", bad, "--no-verify")
    assert rc == 1 and res["converted"] == 0 and res["failed"] == 2
    for s in res["students"]:
        assert str(bad) in s["error"] and "dilation" in s["error"]
    assert tree(out) == ["conversion_summary.json"]


# ------------------------------------------------------------------------------ discovery / paths


def test_nonexistent_path(tmp_path, capsys):
    missing = tmp_path / "does" / "not" / "exist"
    expect(ConversionError, missing, missing, "no such file")
    out = tmp_path / "out"
    rc, _, err = cli(capsys, missing, "--out", out, "--no-verify")
    assert rc == 1 and str(missing) in err and "Traceback" not in err
    assert not out.exists()


def test_empty_directory(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    expect(ConversionError, empty, empty, "no student checkpoints")
    out = tmp_path / "out"
    rc, _, err = cli(capsys, empty, "--out", out, "--no-verify")
    assert rc == 1 and str(empty) in err
    assert not out.exists()


def test_directory_of_junk(tmp_path, capsys):
    junk = tmp_path / "junk"
    (junk / "sub").mkdir(parents=True)
    (junk / "README.md").write_text("# a model\n")
    (junk / "config.json").write_text(json.dumps(full_config(BASE)))
    (junk / "weights.npy").write_bytes(b"\x93NUMPY junk")
    (junk / "model.onnx").write_bytes(b"\x08\x07junk")
    (junk / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (junk / "sub" / "notes.txt").write_text("nothing here")
    (junk / "model.safetensors.part").write_bytes(b"partial download")
    expect(ConversionError, junk, junk, "no student checkpoints")
    out = tmp_path / "out"
    rc, _, err = cli(capsys, junk, "--out", out, "--no-verify")
    assert rc == 1 and str(junk) in err
    assert not out.exists()


def test_two_students_in_one_source_for_convert_student(make_student, tmp_path):
    make_student(BASE, dirname="two/a")
    make_student(BASE, dirname="two/b")
    expect(ConversionError, tmp_path / "two", tmp_path / "two", "2 students")


# --------------------------------------------------------------------------------------- pickles


class EvilSystem:
    """Unpickling this runs a shell command (creates the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class EvilExec:
    """Unpickling this runs Python code through builtins.exec (creates the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def write_malicious(path: Path, payload, container: str) -> None:
    import torch

    obj = {"features.0.weight": torch.zeros(8, 3, 3, 3), "features.0.bias": payload}
    if container == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("payload_cls", [EvilSystem, EvilExec])
def test_malicious_payload_is_live(tmp_path, payload_cls):
    """Control: the payloads used below really do execute under a plain unpickler."""
    control = tmp_path / "CONTROL_MARKER"
    pickle.loads(pickle.dumps(payload_cls(control)))
    assert control.exists()


@pytest.mark.parametrize("allow_pickle", [False, True])
@pytest.mark.parametrize("container", ["torch", "raw"])
@pytest.mark.parametrize("payload_cls", [EvilSystem, EvilExec])
@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_malicious_pickle_never_executes(tmp_path, payload_cls, container, allow_pickle, suffix):
    marker = tmp_path / "PWNED"
    d = tmp_path / "evil"
    d.mkdir()
    weights = d / f"model{suffix}"
    write_malicious(weights, payload_cls(marker), container)
    (d / "config.json").write_text(json.dumps(full_config(BASE)))
    msg = expect(ConversionError, d, weights, allow_pickle=allow_pickle)
    assert ("weights_only" in msg) if allow_pickle else ("--allow-pickle" in msg)
    assert not marker.exists(), "the pickle payload ran"


def test_malicious_pickle_through_cli(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    d = tmp_path / "evil"
    d.mkdir()
    write_malicious(d / "pytorch_model.bin", EvilSystem(marker), "torch")
    (d / "config.json").write_text(json.dumps(full_config(BASE)))
    out = tmp_path / "out"
    out.mkdir()
    for extra in ([], ["--allow-pickle"]):
        rc, res, err = cli_json(capsys, d, "--out", out, "--no-verify", *extra)
        assert rc == 1 and res["failed"] == 1, err
        assert str(d / "pytorch_model.bin") in res["students"][0]["error"]
        assert not marker.exists()
    assert tree(out) == ["conversion_summary.json"]


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_refused_without_allow_pickle(make_student, tmp_path, suffix):
    import torch

    src = make_student(BASE)
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save(load_sd(src), d / f"model{suffix}")
    (d / "config.json").write_text((src / "config.json").read_text())
    expect(ConversionError, d, d / f"model{suffix}", "pickle", "--allow-pickle")


def test_pickle_that_is_not_a_state_dict(tmp_path):
    import torch

    d = tmp_path / "notsd"
    d.mkdir()
    torch.save({"features.0.weight": [1.0, 2.0], "epoch": 3}, d / "model.pt")
    (d / "config.json").write_text(json.dumps(full_config(BASE)))
    expect(ConversionError, d, d / "model.pt", "state_dict", allow_pickle=True)


def test_wrapped_state_dict_pickle_converts(make_student, tmp_path):
    import torch

    src = make_student(BASE)
    d = tmp_path / "wrapped"
    d.mkdir()
    torch.save({"state_dict": load_sd(src), "epoch": 7}, d / "checkpoint.pth")
    (d / "config.json").write_text((src / "config.json").read_text())
    result = convert_student(d, allow_pickle=True)
    assert result.report["source"]["format"] == "pickle(weights_only)"


def test_benign_pth_converts_and_verifies_with_allow_pickle(make_student, tmp_path, capsys):
    import torch

    src = make_student(BASE)
    d = tmp_path / "benign"
    d.mkdir()
    torch.save(load_sd(src), d / "model.pth")
    (d / "config.json").write_text((src / "config.json").read_text())
    out = tmp_path / "out"
    rc, res, err = cli_json(capsys, d, "--out", out, "--allow-pickle", "--verify")
    assert rc == 0, err
    (s,) = res["students"]
    assert s["status"] == "ok" and s["verification"]["ok"] is True
    report = json.loads((out / "benign" / "conversion_report.json").read_text())
    assert report["source"]["format"] == "pickle(weights_only)"
    assert report["verification"]["ok"] is True
    assert_no_leftovers(out)


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["convert"],
        ["convert", "{src}"],  # missing --out
        ["convert", "--out", "{out}"],  # missing SRC
        ["convert", "{src}", "--out", "{out}", "--verify", "--no-verify"],
        ["convert", "{src}", "--out", "{out}", "--bogus-flag"],
        ["frobnicate", "{src}"],
    ],
)
def test_usage_errors_exit_2(make_student, tmp_path, capsys, argv):
    src = make_student(BASE)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main([a.format(src=src, out=out) for a in argv])
    assert info.value.code == 2
    assert not out.exists()
    capsys.readouterr()


def test_bulk_one_good_one_bad(make_student, tmp_path, capsys):
    make_student(BASE, dirname="zoo/good")
    bad = make_student(BASE, seed=1, dirname="zoo/bad")
    sd = load_sd(bad)
    sd["features.4.weight"].view(-1)[3] = float("nan")
    save_sd(bad, sd)
    out = tmp_path / "out"
    rc, res, err = cli_json(capsys, tmp_path / "zoo", "--out", out, "--no-verify")
    assert rc == 1, err
    assert res["converted"] == 1 and res["failed"] == 1
    by_name = {s["name"]: s for s in res["students"]}
    assert by_name["good"]["status"] == "ok" and by_name["good"]["output"] == str(out / "good")
    assert by_name["bad"]["status"] == "failed"
    assert str(bad / "model.safetensors") in by_name["bad"]["error"]
    assert "features.4.weight" in by_name["bad"]["error"] and "non-finite" in by_name["bad"]["error"]
    assert not (out / "bad").exists()
    assert {"config.json", "conversion_report.json", "state"} <= {p.name for p in (out / "good").iterdir()}
    summary = json.loads((out / "conversion_summary.json").read_text())
    assert {s["name"]: s["status"] for s in summary["students"]} == {"good": "ok", "bad": "failed"}
    assert_no_leftovers(out)
    assert sorted(p.name for p in out.iterdir()) == ["conversion_summary.json", "good"]


def test_existing_output_without_overwrite_is_untouched(make_student, tmp_path, capsys):
    d = make_student(BASE, dirname="stu")
    out = tmp_path / "out"
    (out / "stu").mkdir(parents=True)
    (out / "stu" / "precious.txt").write_text("do not touch")
    rc, res, err = cli_json(capsys, d, "--out", out, "--no-verify")
    assert rc == 1
    (s,) = res["students"]
    assert s["status"] == "failed" and "already exists" in s["error"] and str(out / "stu") in s["error"]
    assert tree(out / "stu") == ["precious.txt"]
    assert (out / "stu" / "precious.txt").read_text() == "do not touch"
    assert_no_leftovers(out)

    rc, res, err = cli_json(capsys, d, "--out", out, "--no-verify", "--overwrite")
    assert rc == 0, err
    assert not (out / "stu" / "precious.txt").exists() and (out / "stu" / "config.json").exists()
    assert_no_leftovers(out)


def test_only_failures_into_a_fresh_out_dir_exit_1(make_student, tmp_path, capsys):
    """The commonest failure of all: one bad student, --out not created yet. Exit 1, no traceback."""
    d = edited_student(make_student, lambda sd: sd.pop("classifier.0.bias"))
    out = tmp_path / "fresh" / "out"
    rc, res, _ = cli_json(capsys, d, "--out", out, "--no-verify")
    assert rc == 1 and res["failed"] == 1
    assert "classifier.0.bias" in res["students"][0]["error"]
    assert_no_leftovers(out)


def test_out_is_an_existing_file(make_student, tmp_path, capsys):
    d = make_student(BASE)
    out = tmp_path / "out.txt"
    out.write_text("not a directory")
    rc, out_text, err = cli(capsys, d, "--out", out, "--no-verify", "-q")
    assert rc in (1, 2), err
    assert out.read_text() == "not a directory"


# --------------------------------------------------------------- outputs stay inside --out/<name>


def _student_file(make_student, tmp_path, filename: str) -> Path:
    src = make_student(BASE)
    d = tmp_path / "loose"
    d.mkdir()
    (src / "model.safetensors").rename(d / filename)
    (d / "config.json").write_text((src / "config.json").read_text())
    return d / filename


@pytest.mark.parametrize("filename", ["..safetensors", "...safetensors"])
def test_dot_named_student_cannot_replace_out_or_its_parent(make_student, tmp_path, capsys, filename):
    """A weights file called `..safetensors` has stem '.', `...safetensors` has stem '..': as output
    names those are --out itself and its parent. With --overwrite that must not wipe other outputs."""
    weights = _student_file(make_student, tmp_path, filename)
    work = tmp_path / "work"
    out = work / "out"
    (out / "other_student").mkdir(parents=True)
    (out / "other_student" / "keep.txt").write_text("precious")
    (work / "sibling.txt").write_text("also precious")
    outside_before = tree(tmp_path, exclude=out)

    rc, res, err = cli_json(capsys, weights, "--out", out, "--no-verify", "--overwrite")

    assert (out / "other_student" / "keep.txt").read_text() == "precious"
    assert (work / "sibling.txt").read_text() == "also precious"
    assert tree(tmp_path, exclude=out) == outside_before
    assert_no_leftovers(out)
    (s,) = res["students"]
    if s["status"] == "ok":  # a safe name was chosen: the output is a direct child of --out
        assert Path(s["output"]).resolve().parent == out.resolve()


def test_cwd_student_dot_cannot_replace_out(make_student, tmp_path, capsys, monkeypatch):
    """`kdd convert . --out OUT` from inside a student directory: its name must not be ''."""
    d = make_student(BASE, dirname="here")
    out = tmp_path / "out"
    (out / "other_student").mkdir(parents=True)
    (out / "other_student" / "keep.txt").write_text("precious")
    monkeypatch.chdir(d)
    rc, res, err = cli_json(capsys, ".", "--out", out, "--no-verify", "--overwrite")
    assert (out / "other_student" / "keep.txt").read_text() == "precious"
    assert_no_leftovers(out)
    (s,) = res["students"]
    if s["status"] == "ok":
        assert Path(s["output"]).resolve().parent == out.resolve()
