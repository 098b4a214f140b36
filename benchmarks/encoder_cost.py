"""What the transformers image encoders cost as feature networks, and whether they agree with their
PyTorch references at full size.

    python benchmarks/encoder_cost.py             # ~1.5 min on 2 CPU cores
    python benchmarks/encoder_cost.py --quick     # tiny towers, seconds (the smoke test)

No real CLIP / DINO / DINOv2 weights can be had offline here, so each tower is randomly initialised
at its published size by the PyTorch re-implementation of transformers' forward that the tests use
(`tests/test_clip_vision.py`, `tests/test_vit.py`; needs the `test` extra: torch), saved in
transformers' layout (config.json + model.safetensors), converted by `converters/` as a user's
folder would be, and compared with the reference on random inputs. Then 20 Fashion-MNIST-size grey
images (28x28) are embedded through the feature network (resized to the tower's image_size), once
cold (compilation included) and once warm.

Outputs: benchmarks/results/TAG.{md,json} (TAG: --tag, default encoder_cost).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.provenance import run_meta, write_results  # noqa: E402


# name -> (kind, transformers config fields, MLP width[, feature size: embed at that side, --feature-size])
TOWERS = {
    "CLIP ViT-B/32": ("clip", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                                   image_size=224, patch_size=32, layer_norm_eps=1e-5), 3072),
    "DINO ViT-S/16": ("vit", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, num_channels=3,
                                  image_size=224, patch_size=16), 1536),
    "DINOv2 ViT-S/14": ("dinov2", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, num_channels=3,
                                       image_size=518, patch_size=14), 1536),
    "DINOv2 ViT-S/14 --feature-size 224": ("dinov2", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                          num_channels=3, image_size=518, patch_size=14), 1536, 224),
}
QUICK = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_channels=3, image_size=12,
             patch_size=4, layer_norm_eps=1e-6)


def write_tower(folder: Path, kind: str, cfg: dict, inter: int):
    """A transformers-layout folder with random weights; returns the PyTorch reference module."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    if kind == "clip":
        from tests.test_clip_vision import TorchCLIPVision

        ref = TorchCLIPVision({**cfg, "intermediate_size": inter}, projection_dim=512 if cfg["hidden_size"] > 16 else 10)
        config = {"model_type": "clip_vision_model", **cfg, "intermediate_size": inter, "hidden_act": "quick_gelu",
                  "projection_dim": ref.visual_projection.out_features}
    else:
        from tests.test_vit import TorchViT

        eps = cfg.get("layer_norm_eps", 1e-6)  # DINO's and DINOv2's published configs
        ref = TorchViT(kind, cfg, inter, mask_token=kind == "dinov2", eps=eps)
        config = {"model_type": kind, "layer_norm_eps": eps, "hidden_act": "gelu", **cfg}
        config.update({"intermediate_size": inter} if kind == "vit" else {"mlp_ratio": inter / cfg["hidden_size"]})
    folder.mkdir(parents=True)
    sd = {k.removeprefix("model."): v.contiguous() for k, v in ref.eval().state_dict().items()}  # TorchViT's wrapper
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return ref


def measure(name: str, kind: str, cfg: dict, inter: int, work: Path, n_images: int, size: int | None = None) -> dict:
    import torch

    from converters.clip_vision import convert_clip_vision
    from converters.vit import convert_vit
    from kdd_jax.scores.images import clip_feature_net, vit_feature_net

    folder = work / f"{kind}-{size}"
    ref = write_tower(folder, kind, cfg, inter)
    t = time.perf_counter()
    enc = (convert_clip_vision if kind == "clip" else convert_vit)(folder)
    convert_s = time.perf_counter() - t
    side = cfg["image_size"]
    x = np.random.default_rng(0).normal(size=(2, 3, side, side)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(enc.model(x.transpose(0, 2, 3, 1)))
    build = clip_feature_net if kind == "clip" else vit_feature_net
    net = build(enc.model, enc.mean, enc.std, resize=enc.resize, **({} if size is None else {"size": size}))
    images = np.random.default_rng(1).uniform(0, 1, (n_images, 28, 28, 1)).astype(np.float32)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        net.embedding(images).block_until_ready()
        times.append(time.perf_counter() - t)
    embed_side = side if size is None else size
    tokens = (embed_side // cfg["patch_size"]) ** 2 + 1
    return {"tower": name, "kind": kind, "parameters": enc.report["parameters"], "image_size": embed_side,
            "checkpoint_image_size": side, "tokens": tokens,
            "convert_s": convert_s, "max_abs_diff": float(np.abs(got - want).max()),
            "max_abs_value": float(np.abs(want).max()), "images": n_images, "embed_cold_s": times[0],
            "embed_warm_s": times[1], "images_per_s_warm": n_images / times[1]}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Image encoders as feature networks: cost and agreement", "",
             f"{meta['date']} · {meta['machine']['cpu_model']} ({meta['machine']['usable_cpus']} CPUs) · jax "
             f"{meta['versions'].get('jax')} · command `{meta['command']}` · {meta['seconds']:.0f} s", "",
             "Randomly initialised towers at their published sizes, written in transformers' layout by the tests' "
             "PyTorch re-implementations, converted by `converters/`; agreement = max |JAX - PyTorch| of the embedding "
             "on 2 random inputs; embedding = `FeatureNet.embedding` of 28x28 grey images resized to the tower's "
             "image_size (cold includes compilation).", "",
             "| tower | parameters | input | tokens | convert s | max abs diff (max value) | embed cold s | "
             "embed warm s | images/s warm |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tower']} | {r['parameters'] / 1e6:.1f} M | {r['image_size']}x{r['image_size']} | "
                     f"{r['tokens']} | {r['convert_s']:.2f} | {r['max_abs_diff']:.1e} ({r['max_abs_value']:.1f}) | "
                     f"{r['embed_cold_s']:.2f} | {r['embed_warm_s']:.2f} | {r['images_per_s_warm']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny towers (the smoke test)")
    p.add_argument("--images", type=int, default=20, help="images embedded per timing (default 20)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--tag", default="encoder_cost")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be >= 1")
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, cfg, inter, *size) in TOWERS.items():
            size = size[0] if size else None
            if args.quick:
                cfg, inter, size = QUICK, 24, (8 if size else None)
            rows.append(measure(name, kind, cfg, inter, Path(tmp), args.images, size))
            print(json.dumps(rows[-1]), flush=True)
    meta = run_meta(__file__, argv, start)
    write_results(args.out, args.tag, {"meta": meta, "results": rows}, markdown(rows, meta))
    print(f"wrote {args.out / args.tag}.{{md,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
