"""One PNG row per zoo model: its images for classes 0-9 then 6 empty prompts, all from the SAME initial
noises (kdd_jax initial_noise seeds 0-15), each model sampled with its kdd_sampling.json.

    python benchmarks/zoo_diffusion/sample_grid.py benchmarks/results/generative_zoo_same_noise.png \\
        teacher-a teacher-b teacher-c student-a-epskd-l1.0 student-a-datakd student-a-onestep \\
        student-a-progressive student-b-epskd-l1.0 student-b-onestep control-1 control-3
    python benchmarks/zoo_diffusion/sample_grid.py --zoo benchmarks/zoo_diffusion/gpu OUT.png NAMES...   # GPU zoo
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import numpy as np  # noqa: E402

from kdd_jax.generative.pipeline import load_diffusion  # noqa: E402
from kdd_jax.io import atomic_write_bytes  # noqa: E402
from kdd_jax.report import png_bytes, probe_grid  # noqa: E402
from kdd_jax.teachers.generative import GenerationRequest  # noqa: E402


def main(argv: list[str]) -> int:
    zoo = HERE
    if argv[:1] == ["--zoo"]:
        if len(argv) < 2:
            raise SystemExit(__doc__)
        zoo, argv = Path(argv[1]), argv[2:]
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, names = Path(argv[0]), argv[1:]
    req = GenerationRequest.from_seeds([str(i) for i in range(10)] + [""] * 6, range(16), (32, 32, 1))
    rows = [load_diffusion(zoo / "cache" / "models" / n, name=n).generate(req.prompts, req.noise) for n in names]
    x = np.transpose(np.concatenate(rows), (0, 3, 1, 2))
    atomic_write_bytes(out, png_bytes(probe_grid(x, (0.0, 1.0), max_images=len(x), cols=16)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
