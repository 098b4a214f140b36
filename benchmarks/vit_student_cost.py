"""What a transformer classifier student costs to convert, verify and audit on this machine, at the
published sizes of the checkpoints auditors are handed.

    python benchmarks/vit_student_cost.py            # ~3-5 min on 2 CPU cores
    python benchmarks/vit_student_cost.py --quick    # tiny towers, seconds (the smoke test)

No real DeiT / DINOv2 weights can be had offline here, so each classifier is randomly initialised at
its published size by the PyTorch re-implementation of transformers' forward that the tests use
(`converters/torch_reference.py`; needs the `test` extra: torch) and saved as a `save_pretrained`
folder (config.json in transformers' fields, model.safetensors, preprocessor_config.json), then:

1. `converters.convert.convert_student` (what `kdd convert` runs) and `verify_conversion` (its default
   check against PyTorch: logits and input gradients on 8 probes), each timed;
2. the student's forward pass on a batch of --batch images at its input size, cold (compilation) and
   warm: what scoring the student's answers costs;
3. the BN-free data-free synthesis (`confidence`, the only data-free method for a model without
   BatchNorm) of --batch probes: one step cold, then --steps steps warm, per step.

DINOv2's classifier runs at its processor's 224 crop through position embeddings interpolated from
the checkpoint's 518 grid (37x37 -> 16x16 patches), as the released `facebook/dinov2-*-imagenet1k-*`
classifiers do. Outputs: benchmarks/results/TAG.{md,json} (TAG: --tag, default vit_student_cost).
Timings are measured, never asserted by tests.
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

import numpy as np  # noqa: E402

from benchmarks.provenance import run_meta, write_results  # noqa: E402

IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, patch_size=4)
# name -> {"full" | "quick": (transformers config.json fields, reference arch extras, preprocessor_config.json,
# classes)}; the reference's intermediate_size is DINOv2's hidden_size x mlp_ratio
STUDENTS = {
    "DeiT-S/16 distilled (DeiTForImageClassificationWithTeacher)": {
        "full": (dict(model_type="deit", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                      intermediate_size=1536, image_size=224, patch_size=16),
                 dict(variant="deit", head="cls_distill", intermediate_size=1536, layer_norm_eps=1e-12),
                 {**IMAGENET, "crop_size": {"height": 224, "width": 224}}, 1000),
        "quick": (dict(model_type="deit", **TINY, intermediate_size=24, image_size=12),
                  dict(variant="deit", head="cls_distill", intermediate_size=24, layer_norm_eps=1e-12), IMAGENET, 5)},
    "DINOv2-S/14 linear (Dinov2ForImageClassification)": {
        "full": (dict(model_type="dinov2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                      image_size=518, patch_size=14),
                 dict(variant="dinov2", head="cls_mean", intermediate_size=1536, layer_norm_eps=1e-6),
                 {**IMAGENET, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}}, 1000),
        "quick": (dict(model_type="dinov2", **TINY, mlp_ratio=4, image_size=20),
                  dict(variant="dinov2", head="cls_mean", intermediate_size=64, layer_norm_eps=1e-6),
                  {**IMAGENET, "crop_size": 12}, 5)},
}


def write_student(folder: Path, config: dict, extras: dict, preprocessor: dict, classes: int) -> None:
    """A transformers classifier folder with random weights at the given size."""
    from safetensors.torch import save_file

    from converters.torch_reference import TorchViTClassifier, randomize_

    arch = {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size",
                                   "patch_size")}
    arch.update(extras, num_channels=3, hidden_act="gelu", qkv_bias=True, pooler=False, mask_token=False,
                num_classes=classes)
    model = randomize_(TorchViTClassifier(arch), 0)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config, "id2label": {str(i): f"c{i}" for i in range(classes)}}))
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))


def measure(name: str, config: dict, extras: dict, preprocessor: dict, classes: int, batch: int, steps: int,
            work: Path) -> dict:
    from converters.convert import convert_student
    from converters.verify import verify_conversion
    from kdd_jax.synthesis import SynthesisConfig, synthesize

    folder = work / config["model_type"]
    write_student(folder, config, extras, preprocessor, classes)
    t = time.perf_counter()
    r = convert_student(folder)
    convert_s = time.perf_counter() - t
    t = time.perf_counter()
    v = verify_conversion(r)
    verify_s = time.perf_counter() - t
    pre, arch = r.config.preprocessing, r.config.arch
    x = np.random.default_rng(0).normal(size=(batch, *pre.input_size, 3)).astype(np.float32)
    forward = []
    for _ in range(2):
        t = time.perf_counter()
        np.asarray(r.model(x))
        forward.append(time.perf_counter() - t)
    sc = dict(method="confidence", n_probes=batch, seed=0)
    t = time.perf_counter()
    synthesize(r.model, r.config, SynthesisConfig(**sc, steps=1))
    synth_cold = time.perf_counter() - t
    t = time.perf_counter()
    synthesize(r.model, r.config, SynthesisConfig(**sc, steps=steps))
    synth_warm = time.perf_counter() - t
    h, w = pre.input_size
    return {"student": name, "variant": arch.variant, "head": arch.head, "parameters": r.report["parameters"],
            "checkpoint_grid": arch.image_size // arch.patch_size, "input_size": [h, w],
            "tokens": (h // arch.patch_size) * (w // arch.patch_size) + arch.prefix_tokens,
            "weights_mb": (folder / "model.safetensors").stat().st_size / 1e6,
            "convert_s": convert_s, "verify_s": verify_s, "verify_ok": bool(v["ok"]),
            "max_abs_logit_diff": float(v["max_abs_logit_diff"]), "batch": batch,
            "forward_cold_s": forward[0], "forward_warm_s": forward[1], "images_per_s_warm": batch / forward[1],
            "synthesis_cold_s": synth_cold, "steps": steps, "synthesis_warm_s": synth_warm,
            "synthesis_s_per_step": synth_warm / steps}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Transformer classifier students: conversion, verification and audit cost", "",
             f"{meta['date']} · {meta['machine']['cpu_model']} ({meta['machine']['usable_cpus']} CPUs) · jax "
             f"{meta['versions'].get('jax')} · command `{meta['command']}` · {meta['seconds']:.0f} s", "",
             "Randomly initialised classifiers at published sizes (1000 classes), written as transformers "
             "`save_pretrained` folders by the tests' PyTorch re-implementation and converted by `converters/` as "
             "`kdd convert` does. verify = `verify_conversion` (logits and input gradients against PyTorch on 8 "
             "probes; max |logit diff|); forward = the student on a batch at its input size; synthesis = "
             "`confidence` probes (BN-free, data-free) for the batch, cold = one step with compilation, warm = "
             "seconds per step. DINOv2 runs at its processor's 224 crop with position embeddings interpolated "
             "from its checkpoint's grid.", "",
             "| student | parameters | weights MB | checkpoint grid -> input (tokens) | convert s | verify s "
             "(max logit diff) | forward cold / warm s (images/s) | synthesis cold s | synthesis s / step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h, w = r["input_size"]
        lines.append(
            f"| {r['student']} | {r['parameters'] / 1e6:.1f} M | {r['weights_mb']:.0f} | {r['checkpoint_grid']}^2 -> "
            f"{h}x{w} ({r['tokens']}) | {r['convert_s']:.2f} | {r['verify_s']:.1f} ({r['max_abs_logit_diff']:.1e}"
            f"{'' if r['verify_ok'] else ', FAILED'}) | {r['forward_cold_s']:.2f} / {r['forward_warm_s']:.2f} "
            f"({r['images_per_s_warm']:.1f}) | {r['synthesis_cold_s']:.1f} | {r['synthesis_s_per_step']:.2f} |")
    steps = rows[0]["steps"] if rows else 0
    lines += ["", f"Batch {rows[0]['batch'] if rows else 0} images / probes; warm synthesis over {steps} steps. "
              "A `kdd detect` of such a student with the default 200 steps and 100 probes costs roughly "
              "200 x (s / step) x 100 / batch, plus compilation."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny towers (the smoke test)")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass and probes synthesised (default 16)")
    p.add_argument("--steps", type=int, default=5, help="warm synthesis steps timed (default 5)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--tag", default="vit_student_cost")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        p.error("--batch and --steps must be >= 1")
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, sizes in STUDENTS.items():
            config, extras, preprocessor, classes = sizes["quick" if args.quick else "full"]
            rows.append(measure(name, config, extras, preprocessor, classes, args.batch, args.steps, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    meta = run_meta(__file__, argv, start)
    write_results(args.out, args.tag, {"meta": meta, "results": rows}, markdown(rows, meta))
    print(f"wrote {args.out / args.tag}.{{md,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
