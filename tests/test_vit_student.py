"""transformers ViT / DeiT / DINOv2 image classifiers as students (family `vit`): a `save_pretrained` folder
(written here from the PyTorch reference, tiny and random) converts through `kdd convert` with its
head and preprocessing read from the folder, agrees with PyTorch in logits and input gradients, and
is audited with the BN-free synthesis; folders that are not such classifiers are named errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters import ConversionError  # noqa: E402
from converters.convert import convert_student  # noqa: E402
from converters.torch_reference import TorchViTClassifier, randomize_  # noqa: E402
from converters.verify import verify_conversion  # noqa: E402
from kdd_jax.cli import main  # noqa: E402
from kdd_jax.config import ConfigError  # noqa: E402
from kdd_jax.io import load_converted  # noqa: E402
from tests.conftest import assert_matches_torch  # noqa: E402

ENCODER = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=12,
               patch_size=4)


def write_classifier(path, variant="deit", head="cls_distill", *, seed=0, channels=3, classes=5, preprocessor=None,
                     drop=(), extra_config=None, pooler=False, mask_token=False):
    """A transformers `*ForImageClassification` folder: config.json (transformers' fields, the rest
    at transformers' defaults), model.safetensors with the `vit.` / `deit.` prefix and the head."""
    from safetensors.torch import save_file

    arch = {**ENCODER, "num_channels": channels, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "qkv_bias": True,
            "variant": variant, "pooler": pooler, "mask_token": mask_token, "num_classes": classes, "head": head}
    model = randomize_(TorchViTClassifier(arch), seed)
    path.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}
    save_file(sd, str(path / "model.safetensors"))
    config = {**ENCODER, "num_channels": channels, "model_type": variant,
              "id2label": {str(i): f"class{i}" for i in range(classes)}, **(extra_config or {})}
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    if preprocessor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


@pytest.mark.parametrize("variant, head, mean", [("vit", "cls", (0.5,) * 3), ("deit", "cls", (0.485, 0.456, 0.406)),
                                                 ("deit", "cls_distill", (0.485, 0.456, 0.406))])
def test_transformers_classifier_converts_and_agrees_with_pytorch(tmp_path, variant, head, mean):
    ref = write_classifier(tmp_path / "s", variant, head)
    r = convert_student(tmp_path / "s")
    a = r.config.arch
    assert (r.config.family, a.variant, a.head, a.num_classes, a.layer_norm_eps) == ("vit", variant, head, 5, 1e-12)
    pre = r.config.preprocessing  # the image processor's defaults, without a preprocessor_config.json
    assert (pre.input_size, pre.channels, pre.mean, pre.value_range) == ((12, 12), 3, mean, (0.0, 1.0))
    assert r.report["source"]["config"].endswith(f"config.json (transformers {variant})")
    assert_matches_torch(r.model, ref, np.random.default_rng(0).normal(size=(4, 3, 12, 12)).astype(np.float32))
    if head == "cls_distill":  # logits and input gradients, as `kdd convert` checks every student
        v = verify_conversion(r)
        assert v["ok"] and v["max_abs_logit_diff"] < 1e-5


def test_distillation_head_reads_the_distillation_token(tmp_path):
    """DeiT-with-teacher logits are the mean of both heads: with the class head's weights zeroed,
    the logits are half the distillation head's reading of token 1, which must move with it."""
    from safetensors.torch import load_file, save_file

    ref = write_classifier(tmp_path / "s")
    sd = load_file(str(tmp_path / "s" / "model.safetensors"))
    sd["cls_classifier.weight"] = torch.zeros_like(sd["cls_classifier.weight"])
    sd["cls_classifier.bias"] = torch.zeros_like(sd["cls_classifier.bias"])
    save_file(sd, str(tmp_path / "s" / "model.safetensors"))
    ref.load_state_dict(sd)
    r = convert_student(tmp_path / "s")
    x = np.random.default_rng(1).normal(size=(3, 3, 12, 12)).astype(np.float32)
    got = np.asarray(r.model(x.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        hidden = ref.deit(torch.from_numpy(x))
        want = (ref.distillation_classifier(hidden[:, 1]) / 2).numpy()
        other = (ref.distillation_classifier(hidden[:, 0]) / 2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(got - other).max() > 1e-2  # token 0 would give another answer


def test_preprocessing_comes_from_the_processor_config(tmp_path):
    pre = {"image_mean": [0.2], "image_std": [0.3], "do_rescale": True, "rescale_factor": 1 / 255}
    write_classifier(tmp_path / "grey", "vit", "cls", channels=1, preprocessor=pre)
    cfg = convert_student(tmp_path / "grey").config
    assert (cfg.preprocessing.channels, cfg.preprocessing.mean, cfg.preprocessing.std) == (1, (0.2,), (0.3,))
    assert cfg.preprocessing.value_range == pytest.approx((0.0, 1.0))
    (tmp_path / "grey" / "preprocessor_config.json").write_text(json.dumps({**pre, "do_rescale": False,
                                                                           "do_normalize": False}))
    cfg = convert_student(tmp_path / "grey").config  # raw 0-255 pixels, not normalised
    assert (cfg.preprocessing.mean, cfg.preprocessing.std, cfg.preprocessing.value_range) == ((0.0,), (1.0,),
                                                                                             (0.0, 255.0))
    (tmp_path / "grey" / "preprocessor_config.json").unlink()  # ViT's default mean has 3 values
    with pytest.raises(ConfigError, match=r"absent: the processor's default\)\.image_mean: expected 1 finite"):
        convert_student(tmp_path / "grey")
    (tmp_path / "grey" / "preprocessor_config.json").write_text(json.dumps({**pre, "rescale_factor": 0}))
    with pytest.raises(ConfigError, match="rescale_factor: expected a finite number > 0"):
        convert_student(tmp_path / "grey")


@pytest.mark.parametrize("case, match", [
    ("dinov2", r"head 'cls_distill' does not go with variant 'dinov2' \(its transformers classifiers have head "
               r"'cls_mean'\)"),
    ("clip", "'clip_vision_model' is not a supported classifier student.*--feature-net"),
    ("encoder", r"no classification head \(classifier.weight or cls_classifier.weight\)"),
    ("labels", "id2label: 3 labels, but the DeiTForImageClassificationWithTeacher head has 5 outputs"),
    ("half_head", "missing keys.*distillation_classifier"),
    ("field", "hidden_act 'relu' is not supported"),
    ("labels_type", "id2label: expected an object mapping class ids to labels, got int 5"),
    ("vit_distill", "head 'cls_distill' does not go with variant 'vit'"),
    ("non_square", r"image_size: only square sizes are supported, got \[12, 16\]"),
])
def test_folders_that_are_not_supported_classifiers_are_named(tmp_path, case, match):
    d = tmp_path / "s"
    drop = {"encoder": ("cls_classifier.weight", "cls_classifier.bias", "distillation_classifier.weight",
                        "distillation_classifier.bias"),
            "half_head": ("distillation_classifier.weight", "distillation_classifier.bias")}.get(case, ())
    extra = {"dinov2": {"model_type": "dinov2"}, "clip": {"model_type": "clip_vision_model"},
             "labels": {"id2label": {"0": "a", "1": "b", "2": "c"}}, "field": {"hidden_act": "relu"},
             "labels_type": {"id2label": 5}, "non_square": {"image_size": [12, 16]}}.get(case)
    write_classifier(d, drop=drop, extra_config=extra)
    if case == "vit_distill":  # a ViT config over DeiT-with-teacher weights (renamed to the vit. prefix)
        from safetensors.torch import load_file, save_file

        sd = load_file(str(d / "model.safetensors"))
        save_file({k.replace("deit.", "vit.", 1): v for k, v in sd.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "vit"}))
    with pytest.raises((ConversionError, ConfigError), match=match) as e:
        convert_student(d)
    assert str(d) in str(e.value)  # the file at fault is named


def test_a_head_weight_that_is_not_a_matrix_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "s"
    write_classifier(d, "vit", "cls")
    sd = load_file(str(d / "model.safetensors"))
    sd["classifier.weight"] = torch.tensor(1.0)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"model.safetensors: vit's head weight classifier.weight must be "
                                              r"\[classes, features\], got shape \[\]"):
        convert_student(d)


def test_optional_weights_and_fields_a_real_folder_may_carry(tmp_path):
    """The unused pooler and mask token convert, `pooler_output_size` null is hidden_size, `id2label`
    may be absent, sizes may be square [h, w] pairs, and a student never resizes, so a processor's
    BOX filter (no jax counterpart) is accepted; with do_normalize false image_mean is not read."""
    d = tmp_path / "s"
    pre = {"do_normalize": False, "resample": 4}
    ref = write_classifier(d, "vit", "cls", channels=1, pooler=True, mask_token=True, preprocessor=pre,
                           extra_config={"pooler_output_size": None, "id2label": None, "image_size": [12, 12],
                                         "patch_size": [4, 4]})
    r = convert_student(d)
    a, p = r.config.arch, r.config.preprocessing
    assert (a.pooler, a.mask_token, a.image_size, a.patch_size, a.num_classes) == (True, True, 12, 4, 5)
    assert (p.mean, p.std, p.channels) == ((0.0,), (1.0,), 1)
    assert_matches_torch(r.model, ref, np.random.default_rng(2).normal(size=(2, 1, 12, 12)).astype(np.float32))
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                               "pooler_output_size": 8}))
    with pytest.raises(ConfigError, match=r"config.json.pooler_output_size: only hidden_size \(16\)"):
        convert_student(d)


def test_a_classifier_folder_converts_as_an_encoder_but_not_with_a_rescale_it_cannot_apply(tmp_path):
    """`convert_vit` takes a DeiT-with-teacher folder as an image encoder (its four head tensors
    counted, unused); a feature net takes [0, 1] images, so a processor without 1/255 rescaling is refused."""
    from converters.vit import convert_vit

    d = tmp_path / "s"
    ref = write_classifier(d)
    enc = convert_vit(d)
    assert enc.report["unused_classifier_keys"] == 4
    x = np.random.default_rng(3).normal(size=(2, 3, 12, 12)).astype(np.float32)
    with torch.no_grad():
        want = ref.deit(torch.from_numpy(x))[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(enc.model(x.transpose(0, 2, 3, 1))), want, rtol=1e-4, atol=1e-5)
    (d / "preprocessor_config.json").write_text(json.dumps({"do_rescale": False}))
    with pytest.raises(ConfigError, match=r"preprocessor_config.json: do_rescale / rescale_factor give a pixel "
                                          r"range \[0, 255\]"):
        convert_vit(d)


def test_cli_converts_and_audits_a_deit_student(tmp_path, capsys):
    """`kdd convert` + `kdd detect`: BN methods refuse a ViT and say which to use; the BN-free
    data-free method attributes the student to the teacher that is the student itself."""
    write_classifier(tmp_path / "src" / "deit-student", seed=0)
    write_classifier(tmp_path / "src" / "vit-other", "vit", "cls", seed=1)
    out = tmp_path / "conv"
    assert main(["convert", str(tmp_path / "src"), "--out", str(out), "--no-verify", "-q"]) == 0
    _, config, report = load_converted(out / "deit-student")
    assert config.arch.head == "cls_distill" and config.preprocessing.mean == (0.485, 0.456, 0.406)
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"teachers": [{"name": "other", "path": "conv/vit-other", "output": "probs"},
                                                 {"name": "same", "path": "conv/deit-student", "output": "probs"}]}))
    capsys.readouterr()
    base = ["detect", "--student", str(out / "deit-student"), "--teachers", str(teachers), "--probes", "12",
            "--cache", str(tmp_path / "cache"), "-q"]
    assert main([*base, "--steps", "2"]) == 1  # default method: pixel, which needs BatchNorm
    assert "no BatchNorm layers (an AlexNet, a ViT or DeiT)" in capsys.readouterr().err
    assert main([*base, "--method", "confidence", "--steps", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["answer"] == "same"


# ---------------------------------------------------------------------------------------------- DINOv2
DINO = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=20, patch_size=4)


def write_dinov2(path, *, seed=0, classes=4, preprocessor=None, extra_config=None, registers=None):
    """A `Dinov2ForImageClassification` folder (`registers` N: `Dinov2WithRegistersForImageClassification`
    with N register tokens): a 5x5 grid of position embeddings (image_size 20, patch 4), `mlp_ratio` 1.5,
    the head on [class token, mean patch token]."""
    from safetensors.torch import save_file

    variant = "dinov2" if registers is None else "dinov2_with_registers"
    arch = {**DINO, "intermediate_size": 24, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
            "qkv_bias": True, "variant": variant, "pooler": False, "mask_token": True, "num_classes": classes,
            "head": "cls_mean", "num_register_tokens": registers or 0}
    model = randomize_(TorchViTClassifier(arch), seed)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    config = {**DINO, "mlp_ratio": 1.5, "model_type": variant, "id2label": {str(i): f"c{i}" for i in range(classes)},
              **({} if registers is None else {"num_register_tokens": registers}), **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(config))
    if preprocessor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


def test_bicubic_resize_is_pytorchs():
    """The position-grid resize equals F.interpolate(bicubic, align_corners=False) down, up, to
    non-square grids and to one cell (border clamping included)."""
    import torch.nn.functional as F

    from kdd_jax.models.vit import resize_position_grid

    rng = np.random.default_rng(0)
    for antialias in (False, True):  # DINOv2; DINOv2 with registers
        for g, out in [(37, (16, 16)), (5, (3, 3)), (3, (5, 7)), (4, (2, 9)), (2, (1, 1)), (5, (5, 5)), (37, (40, 13)),
                       (1, (5, 1)), (16, (37, 37)), (4, (37, 3))]:
            grid = rng.normal(size=(g, g, 6)).astype(np.float32)
            want = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=out, mode="bicubic",
                                 align_corners=False, antialias=antialias)[0].permute(1, 2, 0).numpy()
            got = np.asarray(resize_position_grid(grid, out, antialias=antialias))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{g} -> {out}, antialias {antialias}")


@pytest.mark.parametrize("preprocessor, size", [
    ({"crop_size": {"height": 12, "width": 12}}, (12, 12)),  # the released classifiers' case: a crop below image_size
    ({"crop_size": {"height": 12, "width": 8}}, (12, 8)),  # a non-square grid
    ({"do_center_crop": False, "size": {"height": 20, "width": 20}}, (20, 20)),  # the checkpoint's own grid
    ({"crop_size": 28}, (28, 28)),  # larger than image_size: interpolated up
    ({"crop_size": [14, 10]}, (14, 10)),  # not a multiple of the patch: the conv drops the remainder, as torch's
])
@pytest.mark.parametrize("registers", [None, 3, 0])  # 0: transformers still saves an empty register_tokens
def test_dinov2_classifier_runs_at_its_processors_crop_and_agrees_with_pytorch(tmp_path, preprocessor, size, registers):
    ref = write_dinov2(tmp_path / "s", preprocessor=preprocessor, registers=registers)
    r = convert_student(tmp_path / "s")
    a, pre = r.config.arch, r.config.preprocessing
    variant = "dinov2" if registers is None else "dinov2_with_registers"
    assert (r.config.family, a.variant, a.head, a.num_classes, a.image_size, a.intermediate_size) == (
        "vit", variant, "cls_mean", 4, 20, 24)
    assert a.num_register_tokens == (registers or 0)
    assert pre.input_size == size and pre.mean == (0.485, 0.456, 0.406)
    assert_matches_torch(r.model, ref, np.random.default_rng(1).normal(size=(3, 3, *size)).astype(np.float32))
    v = verify_conversion(r)  # logits and input gradients at the config's input size, as kdd convert checks
    assert v["ok"] and v["max_abs_logit_diff"] < 1e-5


def test_dinov2_head_reads_the_mean_patch_token_and_interpolated_positions(tmp_path):
    """With the class-token half of the head zeroed the logits still move with the patches; and at a
    crop the (interpolated) position embeddings change the logits: a port that skipped or misplaced
    either would fail here even where the reference comparison is loose."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "s"
    write_dinov2(d, preprocessor={"crop_size": 12})
    sd = load_file(str(d / "model.safetensors"))
    sd["classifier.weight"][:, :16] = 0.0
    save_file(sd, str(d / "model.safetensors"))
    model = convert_student(d).model
    x = np.random.default_rng(2).normal(size=(2, 12, 12, 3)).astype(np.float32)
    base = np.asarray(model(x))
    assert np.abs(base - np.asarray(sd["classifier.bias"])).max() > 1e-3  # not the bias alone
    sd["dinov2.embeddings.position_embeddings"][:, 1:] += 1.0 * torch.randn(
        sd["dinov2.embeddings.position_embeddings"][:, 1:].shape, generator=torch.Generator().manual_seed(0))
    save_file(sd, str(d / "model.safetensors"))
    assert np.abs(np.asarray(convert_student(d).model(x)) - base).max() > 1e-3


def test_dinov2_input_size_comes_from_the_processor(tmp_path):
    """Without a preprocessor_config.json, BitImageProcessor's 224 crop; a resize that leaves each image
    its own size, a crop below one patch or a malformed crop are named errors."""
    write_dinov2(tmp_path / "default")
    assert convert_student(tmp_path / "default").config.preprocessing.input_size == (224, 224)
    write_dinov2(tmp_path / "null", preprocessor={"crop_size": None, "do_resize": False})  # null: the default crop
    assert convert_student(tmp_path / "null").config.preprocessing.input_size == (224, 224)
    for i, (pre, match) in enumerate([
            ({"do_center_crop": False, "size": {"shortest_edge": 256}},
             r"preprocessor_config.json.size: \{'shortest_edge': 256\}: without a centre crop"),
            ({"do_center_crop": False, "size": 256},  # one number is a shortest edge to BitImageProcessor
             r"preprocessor_config.json.size: 256: without a centre crop"),
            ({"do_center_crop": False}, r"size: absent \(BitImageProcessor's default \{'shortest_edge': 224\}\)"),
            ({"do_center_crop": False, "do_resize": False, "size": {"height": 20, "width": 20}},
             r"preprocessor_config.json: do_center_crop and do_resize are both false"),
            ({"crop_size": {"height": 3, "width": 12}}, r"preprocessor_config.json: preprocessing.input_size \[3, 12\] "
                                                        r"must be at least one patch \(4\) each way"),
            ({"crop_size": "224"}, r"preprocessor_config.json.crop_size: expected a positive integer, \[height, width\]"),
            ({"do_center_crop": "yes"}, r"preprocessor_config.json.do_center_crop: expected true or false")]):
        write_dinov2(tmp_path / f"bad{i}", preprocessor=pre)
        with pytest.raises(ConfigError, match=match):
            convert_student(tmp_path / f"bad{i}")


def test_cli_converts_a_dinov2_classifier_and_verifies_it_against_pytorch(tmp_path, capsys):
    write_dinov2(tmp_path / "src" / "dino-student", preprocessor={"crop_size": 12})
    out = tmp_path / "conv"
    assert main(["convert", str(tmp_path / "src"), "--out", str(out), "-q"]) == 0  # verification on (the default)
    model, config, report = load_converted(out / "dino-student")
    assert (config.arch.variant, config.arch.head, config.preprocessing.input_size) == ("dinov2", "cls_mean", (12, 12))
    assert np.asarray(model(np.zeros((1, 12, 12, 3), np.float32))).shape == (1, 4)
    # audited with the BN-free data-free method at its 12x12 input: the teacher that is the student wins
    write_dinov2(tmp_path / "src2" / "dino-other", seed=1, preprocessor={"crop_size": 12})
    assert main(["convert", str(tmp_path / "src2"), "--out", str(out), "--no-verify", "-q"]) == 0
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"teachers": [{"name": "other", "path": "conv/dino-other", "output": "probs"},
                                                 {"name": "same", "path": "conv/dino-student", "output": "probs"}]}))
    capsys.readouterr()
    assert main(["detect", "--student", str(out / "dino-student"), "--teachers", str(teachers), "--probes", "12",
                 "--method", "confidence", "--steps", "5", "--cache", str(tmp_path / "cache"), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == "same"
