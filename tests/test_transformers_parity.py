"""The transformer ports against transformers itself (not only against our PyTorch re-implementations in
converters/torch_reference.py): tiny models of each supported class, built by transformers with random
weights pushed well away from their initialisation (position embeddings, layer scales and LayerNorms
included, so a misplaced or skipped one shows), saved with `save_pretrained` exactly as published
checkpoints are, converted by `converters/` and run on the same inputs. DINOv2 classifiers run at a crop
off their checkpoint's grid, so the position-embedding interpolation (plain and antialiased bicubic) is
compared too. transformers is a test dependency only (the `test` extra); the library never imports it."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from converters.clip_vision import convert_clip_vision  # noqa: E402
from converters.convert import convert_student  # noqa: E402
from converters.vit import convert_vit  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_channels=3)


def spread(model):
    """Every parameter redrawn: matrices ~ N(0, 0.3^2), vectors ~ N(0, 0.5^2), and the ones that scale
    (LayerNorm weights, layer scales) around 1; eval mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            scales = name.endswith("lambda1") or (name.endswith("weight") and p.ndim == 1)
            p.copy_(noise * (0.3 if p.ndim >= 2 else 0.5) + (1.0 if scales else 0.0))
    return model.eval()


def save(model, folder, preprocessor=None):
    model.save_pretrained(folder, safe_serialization=True)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def inputs(size, n=2, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 3, *size)).astype(np.float32)


def assert_close(got, want, scale_tol=2e-5):
    """Agreement relative to the outputs' magnitude (logits of random deep towers reach the tens)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err < scale_tol, f"max error {err:.2e} relative to outputs up to {np.abs(want).max():.3g}"


CLASSIFIERS = {
    "ViTForImageClassification": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        **TINY, intermediate_size=48, image_size=16, patch_size=4, num_labels=5)),
    "DeiTForImageClassification": lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(
        **TINY, intermediate_size=48, image_size=16, patch_size=4, num_labels=5)),
    "DeiTForImageClassificationWithTeacher": lambda: transformers.DeiTForImageClassificationWithTeacher(
        transformers.DeiTConfig(**TINY, intermediate_size=48, image_size=16, patch_size=4, num_labels=5)),
    "Dinov2ForImageClassification": lambda: transformers.Dinov2ForImageClassification(transformers.Dinov2Config(
        **TINY, mlp_ratio=2, image_size=40, patch_size=8, num_labels=5)),
    "Dinov2WithRegistersForImageClassification": lambda: transformers.Dinov2WithRegistersForImageClassification(
        transformers.Dinov2WithRegistersConfig(**TINY, mlp_ratio=2, image_size=40, patch_size=8,
                                               num_register_tokens=3, num_labels=5)),
}


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifier_students_give_transformers_logits(tmp_path, name):
    model = spread(CLASSIFIERS[name]())
    dinov2 = name.startswith("Dinov2")
    # DINOv2 at its processor's crop: 24x24 (3x3 patches) and 16x40 from the checkpoint's 5x5 grid
    crops = [(24, 24), (16, 40)] if dinov2 else [(16, 16)]
    for i, crop in enumerate(crops):
        pre = {"crop_size": {"height": crop[0], "width": crop[1]}} if dinov2 else None
        r = convert_student(save(model, tmp_path / f"s{i}", pre))
        assert r.config.preprocessing.input_size == crop
        x = inputs(crop)
        with torch.no_grad():
            want = model(pixel_values=torch.from_numpy(x)).logits.numpy()
        assert_close(r.model(x.transpose(0, 2, 3, 1)), want)


ENCODERS = {
    "ViTModel": (lambda: transformers.ViTModel(transformers.ViTConfig(
        **TINY, intermediate_size=48, image_size=16, patch_size=4), add_pooling_layer=False), 16),
    "Dinov2Model": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(
        **TINY, mlp_ratio=2, image_size=24, patch_size=8)), 24),
    "Dinov2WithRegistersModel": (lambda: transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        **TINY, mlp_ratio=2, image_size=24, patch_size=8, num_register_tokens=2)), 24),
}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_image_encoders_give_transformers_class_tokens(tmp_path, name):
    build, side = ENCODERS[name]
    model = spread(build())
    enc = convert_vit(save(model, tmp_path / "e"))
    sizes = [(side, side)] + ([(16, 40)] if name.startswith("Dinov2") else [])  # DINOv2 interpolates any size
    for size in sizes:
        x = inputs(size)
        with torch.no_grad():
            want = model(pixel_values=torch.from_numpy(x)).last_hidden_state[:, 0].numpy()
        assert_close(enc.model(x.transpose(0, 2, 3, 1)), want)


def test_clip_vision_tower_gives_transformers_image_embeds(tmp_path):
    cfg = transformers.CLIPVisionConfig(**TINY, intermediate_size=48, image_size=16, patch_size=4,
                                        projection_dim=8)
    model = spread(transformers.CLIPVisionModelWithProjection(cfg))
    enc = convert_clip_vision(save(model, tmp_path / "c"))
    x = inputs((16, 16))
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(x)).image_embeds.numpy()
    assert_close(enc.model(x.transpose(0, 2, 3, 1)), want)
