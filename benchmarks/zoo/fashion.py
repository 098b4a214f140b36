"""Fashion-MNIST for the benchmark zoo: a numpy-only IDX reader and the zoo's fixed data split.

No torch here, so library-side benchmark code (JAX) can import it too.

    from benchmarks.zoo.fashion import load_fashion, zoo_split, normalise
    x, y = load_fashion("train")          # uint8 [60000, 28, 28], int64 [60000]
    split = zoo_split()                   # {"teacher_pool": idx, "student_pool": idx}

Files: ``$KDD_FASHION_DIR`` or /usr/share/datasets/fashion-mnist/, holding
``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (``apt-get install -y dataset-fashion-mnist``).

The split of the 60 000 training images (fixed; seed ``SPLIT_SEED``):

    perm = numpy.random.default_rng(SPLIT_SEED).permutation(60000)
    teacher_pool = sort(perm[:40000])     # teachers train on random subsets of this
    student_pool = sort(perm[40000:])     # 20 000 images no teacher ever sees: transfer sets, controls

The 10 000 test images (split "test") are used only for evaluation.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = "apt-get install -y dataset-fashion-mnist"

SPLIT_SEED = 20240601
N_TRAIN = 60000
TEACHER_POOL_SIZE = 40000

# The preprocessing every zoo model was trained with (the kdd-jax config schema).
PREPROCESSING = {"input_size": [28, 28], "channels": 1, "layout": "NCHW", "value_range": [0.0, 1.0],
                 "mean": [0.286], "std": [0.353]}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_FILES["t10k"] = _FILES["test"]


def data_dir() -> Path:
    return Path(os.environ.get("KDD_FASHION_DIR", DEFAULT_DIR))


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {directory / (stem + '.gz')} not found (nor uncompressed {stem}). "
        f"Install it with `{APT_HINT}` or point KDD_FASHION_DIR at a directory holding the IDX files."
    )


def _read_idx(path: Path, header: int, expect_magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != expect_magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {magic:#x}, expected {expect_magic:#x})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


def load_fashion(split: str, directory: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 28, 28], int64 labels [N]) for split "train" (60 000) or "test"/"t10k" (10 000)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = data_dir() if directory is None else Path(directory)
    img_stem, lbl_stem = _FILES[split]
    images = _read_idx(_find(directory, img_stem), 16, 0x00000803)
    labels = _read_idx(_find(directory, lbl_stem), 8, 0x00000801).astype(np.int64)
    if images.size != labels.size * 28 * 28:
        raise ValueError(f"{directory}: {split} images ({images.size} bytes) do not match {labels.size} labels")
    return images.reshape(-1, 28, 28), labels


def zoo_split(seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """The zoo's fixed, disjoint split of the 60 000 training indices (sorted int64 arrays)."""
    perm = np.random.default_rng(seed).permutation(N_TRAIN)
    return {"teacher_pool": np.sort(perm[:TEACHER_POOL_SIZE]), "student_pool": np.sort(perm[TEACHER_POOL_SIZE:])}


def subset(pool: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A sorted random subset of `pool` (without replacement), reproducible from `seed`."""
    if size > len(pool):
        raise ValueError(f"subset of {size} from a pool of {len(pool)}")
    return np.sort(np.random.default_rng(seed).choice(pool, size=size, replace=False))


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] model input: x/255, then (x - mean) / std (NCHW)."""
    x = images.astype(np.float32) / 255.0
    x = (x - PREPROCESSING["mean"][0]) / PREPROCESSING["std"][0]
    return x[:, None, :, :]


def draw_indices(pool: str, size: int, seed: int, teacher_indices: np.ndarray | None = None,
                 split: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """A zoo model's training indices: `size` of `pool` ("teacher_pool" / "student_pool" of the split, or
    "teacher_train": its teacher's own indices, passed as `teacher_indices`), drawn with `seed`."""
    if pool == "teacher_train":
        if teacher_indices is None:
            raise ValueError("a teacher_train subset needs its teacher's indices")
        return subset(teacher_indices, size, seed)
    return subset((split if split is not None else zoo_split())[pool], size, seed)


def indices_sha256(idx: np.ndarray) -> str:
    """The digest a manifest records for a model's training indices (sorted int64, little-endian)."""
    return hashlib.sha256(np.asarray(idx, dtype="<i8").tobytes()).hexdigest()


def training_indices(name: str, models: dict[str, dict]) -> np.ndarray:
    """The training-image indices of zoo model `name`, rebuilt from its manifest entry's `data` record
    (`models`: manifest entries by name; a `teacher_train` student draws from its teacher's own subset)
    and checked against the recorded `indices_sha256`, so a changed split or manifest cannot pass silently."""
    entry = models[name]
    d = entry["data"]
    teacher = training_indices(entry["teacher"], models) if d["pool"] == "teacher_train" else None
    idx = draw_indices(d["pool"], d["size"], d["subset_seed"], teacher, zoo_split(d.get("split_seed", SPLIT_SEED)))
    digest = indices_sha256(idx)
    if digest != d["indices_sha256"]:
        raise ValueError(f"manifest entry {name!r}: rebuilt training indices hash to {digest[:12]}, "
                         f"the manifest records {d['indices_sha256'][:12]}")
    return idx
