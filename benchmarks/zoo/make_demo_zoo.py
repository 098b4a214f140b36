"""Make the bundled demo zoo (kdd_jax/demo_zoo/) from the built benchmark zoo.

    python benchmarks/zoo/build_zoo.py          # first (or at least the models below)
    python benchmarks/zoo/make_demo_zoo.py

Copies three teachers and a handful of students (distilled with different recipes, plus one
trained without any teacher) as float16 safetensors + config.json, a pool of unlabelled
Fashion-MNIST test images (no zoo model trained on them) for the MIA/OOD probe filters, and
writes the demo manifest with each model's provenance. Float16 halves the package size; the converter reads it and serves
float32. Students are chosen from the cheaper families to synthesise on CPU (the demo must run in
a few minutes on 2 cores); MobileNetV2's depthwise convolutions are slow on XLA:CPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.zoo.fashion import load_fashion  # noqa: E402
from kdd_jax.io import read_safetensors, write_safetensors  # noqa: E402

TEACHERS = ["teacher-resnet", "teacher-vgg", "teacher-densenet"]
# every student's teacher is among TEACHERS; no MobileNetV2 students (slowest to synthesise on CPU)
STUDENTS = ["s01-resnet-kd-T4-a0.9", "s02-vgg-kd-T4-a0.9", "s04-densenet-kd-T4-a0.9", "s05-vgg-kd-T1-a0.5",
            "s08-resnet-kd-T1-a0.5", "c01-resnet"]
POOL_SIZE, POOL_SEED = 1000, 7  # unlabelled test images: the auxiliary pool the probe filters choose from


def describe(m: dict) -> str:
    if m["role"] == "control":
        return f"{m['family']}, trained on labels, no teacher"
    hp = m["hparams"]
    recipe = {"kd": f"KD T={hp.get('T')} alpha={hp.get('alpha')}", "rkd": "relational KD", "topk": "top-3 KD",
              "hard": "hard-label KD"}.get(m["recipe"], m["recipe"])
    return f"{m['family']}, {recipe} from {m['teacher']}"


def main(zoo: Path = HERE / "cache", manifest_path: Path = HERE / "manifest.json",
         out: Path = REPO / "kdd_jax" / "demo_zoo") -> None:
    manifest = {m["name"]: m for m in json.loads(manifest_path.read_text())["models"]}
    missing = [n for n in TEACHERS + STUDENTS if n not in manifest]
    if missing:
        raise SystemExit(f"not in {manifest_path} (build them first): {missing}")
    foreign = [n for n in STUDENTS if manifest[n]["teacher"] not in (None, *TEACHERS)]
    if foreign:
        raise SystemExit(f"students whose teacher is not served by the demo: {foreign}")
    shutil.rmtree(out, ignore_errors=True)
    demo = {"teachers": [], "students": [],
            "source": {"zoo": "benchmarks/zoo (Fashion-MNIST)", "made_by": "benchmarks/zoo/make_demo_zoo.py"}}
    for name in TEACHERS + STUDENTS:
        m = manifest[name]
        role_dir = "teachers" if m["role"] == "teacher" else "students"
        d = out / role_dir / name
        d.mkdir(parents=True)
        tensors, _ = read_safetensors(zoo / m["path"] / "model.safetensors")
        half = {k: (np.asarray(v).astype(np.float16) if np.issubdtype(v.dtype, np.floating) else np.asarray(v))
                for k, v in tensors.items()}
        write_safetensors(d / "model.safetensors", half, metadata={"format": "pt"})
        shutil.copy(zoo / m["path"] / "config.json", d / "config.json")
        entry = {"name": name, "dir": f"{role_dir}/{name}", "test_accuracy": m["test_accuracy"]}
        if m["role"] == "teacher":
            demo["teachers"].append({**entry, "output": "probs"})
        else:
            demo["students"].append({**entry, "teacher": m["teacher"], "description": describe(m)})
    x_test, _ = load_fashion("test")
    pick = np.sort(np.random.default_rng(POOL_SEED).choice(len(x_test), POOL_SIZE, replace=False))
    write_safetensors(out / "pool.safetensors", {"images": np.ascontiguousarray(x_test[pick])},  # uint8, no labels
                      metadata={"source": f"fashion-mnist t10k, {POOL_SIZE} random images (seed {POOL_SEED}), unlabelled"})
    demo["pool"] = {"file": "pool.safetensors", "images": POOL_SIZE,
                    "source": "Fashion-MNIST test images, unlabelled; no zoo model trained on them"}
    (out / "manifest.json").write_text(json.dumps(demo, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {len(TEACHERS)} teachers, {len(STUDENTS)} students, {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
