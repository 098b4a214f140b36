#!/usr/bin/env python
"""Check that every diffusion-zoo model converts and samples in kdd-jax, and that JAX samples match
diffusers' from the same x_T (DDIM, eta 0) for a few models. Not part of CI.

    python -m benchmarks.zoo_diffusion.verify_jax                       # all models, compare 3
    python -m benchmarks.zoo_diffusion.verify_jax --out /tmp/zd_smoke --compare teacher-a student-a-onestep
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from converters.diffusers_unet import convert_unet  # noqa: E402
from kdd_jax.generative import SchedulerConfig, initial_noise, sample  # noqa: E402

DEFAULT_COMPARE = ["teacher-b", "student-a-onestep", "student-c-progressive"]


def jax_sample(model_dir: Path, settings: dict, x_T_nhwc: np.ndarray, labels: np.ndarray):
    res = convert_unet(model_dir / "unet")
    sched = SchedulerConfig.from_file(model_dir)
    out = sample(res.model, x_T_nhwc, scheduler=sched, num_inference_steps=settings["num_inference_steps"],
                 class_labels=labels, guidance_scale=settings["guidance_scale"], eta=settings["eta"])
    return res, out


def torch_sample(model_dir: Path, settings: dict, x_T_nhwc: np.ndarray, labels: np.ndarray) -> np.ndarray:
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    from benchmarks.zoo_diffusion.build import ddim_sample
    torch.set_num_threads(1)
    unet = UNet2DModel.from_pretrained(model_dir / "unet").eval()
    sched = DDIMScheduler.from_pretrained(model_dir / "scheduler")
    x = torch.from_numpy(np.ascontiguousarray(x_T_nhwc.transpose(0, 3, 1, 2)))
    out = ddim_sample(unet, sched, x, torch.from_numpy(labels).long(), settings["num_inference_steps"],
                      settings["guidance_scale"])
    return out.numpy().transpose(0, 2, 3, 1)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE / "cache")
    ap.add_argument("--manifest", type=Path, default=None)
    ap.add_argument("--compare", nargs="*", default=DEFAULT_COMPARE)
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args(argv)
    manifest = json.loads((args.manifest or (HERE / "manifest.json" if args.out == HERE / "cache"
                                             else args.out / "manifest.json")).read_text())
    seeds = list(range(args.n))
    x_T = initial_noise(seeds, (32, 32, 1))
    labels = np.array([NULL if i % 2 else i % 10 for i in seeds], np.int32)  # half null, half classes
    rows = []
    for m in manifest["models"]:
        d = args.out / m["path"]
        t0 = time.time()
        res, out = jax_sample(d, m["sampling"], x_T, labels)
        row = {"name": m["name"], "params": res.report["parameters"], "finite": bool(np.isfinite(out).all()),
               "range": [float(out.min()), float(out.max())], "jax_seconds": round(time.time() - t0, 1)}
        if m["name"] in args.compare:
            ref = torch_sample(d, m["sampling"], x_T, labels)
            row["max_abs_diff_vs_diffusers"] = float(np.abs(out - ref).max())
            row["mean_abs_diff_vs_diffusers"] = float(np.abs(out - ref).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    bad = [r["name"] for r in rows if not r["finite"]]
    print(f"{len(rows)} models converted and sampled in JAX; non-finite: {bad or 'none'}")
    return rows


NULL = 10

if __name__ == "__main__":
    main()
