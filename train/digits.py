"""The embedded dataset `digits_deformed`, made from scikit-learn's bundled handwritten digits
(1797 real 8x8 scans, 10 classes) upsampled to 32x32 and put through random affine and elastic
deformations, written once as PNG files in the ImageNet layout:

    root/train/<digit>/<source index>_<copy>.png   (80% of the source digits, `train_copies` each)
    root/val/<digit>/<source index>_<copy>.png     (the other 20%, `val_copies` each)
    root/dataset.json                              (how it was made)

A source digit lands in one split only, so val measures generalisation to new writers' digits,
not to new deformations of digits seen in training. The files are a pure function of the
arguments: the same seed writes the same bytes. `data.generate="digits_deformed"` writes it with
`generate`'s defaults (what `make demo` trains on); other sizes and copy counts:

    python -m train.digits data/digits_deformed [--seed 0] [--train-copies 4] [--val-copies 2]

The helpers `split_sources`, `scratch_folder`, `publish` and `existing_dataset` serve any
dataset made from these scans (studies/digits_scaled.py builds on them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from train.images import DatasetError

VERSION = 1


def _deform(img: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """8x8 in [0, 16] -> size x size uint8: bicubic upsampling, then one resampling through a
    random affine map (rotation +-20 deg, scale 0.75..1, shear +-0.25, shift +-3 px at 32) plus
    a smooth random displacement field (Simard et al. 2003: uniform noise, Gaussian-blurred)."""
    from scipy import ndimage

    up = np.asarray(
        Image.fromarray((img * (255 / 16)).astype(np.float32), mode="F").resize(
            (size, size), Image.Resampling.BICUBIC
        )
    )
    k = size / 32
    angle = np.deg2rad(rng.uniform(-20, 20))
    scale = rng.uniform(0.75, 1.0)
    shear = rng.uniform(-0.25, 0.25)
    shift = rng.uniform(-3, 3, size=2) * k
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # Maps output (row, col) about the centre to the source position (inverse warp).
    inv = np.linalg.inv(rot @ np.array([[1.0, shear], [0.0, 1.0]]) * scale)
    centre = (size - 1) / 2
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.stack([rows - centre - shift[0], cols - centre - shift[1]])
    src = np.tensordot(inv, out, axes=1) + centre
    sigma, alpha = 4.0 * k, 36.0 * k
    for d in range(2):
        src[d] += alpha * ndimage.gaussian_filter(rng.uniform(-1, 1, (size, size)), sigma)
    warped = ndimage.map_coordinates(up, src, order=1, mode="constant", cval=0.0)
    return np.clip(np.rint(warped), 0, 255).astype(np.uint8)


def existing_dataset(root: Path, name: str, params: dict) -> bool:
    """True if `root` holds a complete dataset made with `params`; an error if it holds
    anything else."""
    manifest = root / "dataset.json"
    if not root.exists():
        return False
    if manifest.is_file() and json.loads(manifest.read_text()).get("params") == params:
        return True
    raise DatasetError(
        f"{str(root)!r} exists but is not a {name} dataset made with {params}; "
        "remove it or choose another data.root"
    )


def split_sources(
    seed: int, val_fraction: float, limit: int | None, source=None
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(scans, labels, {"train": indices, "val": indices}): scikit-learn's digits (or
    `source`), the first `limit` of them, split at random by source digit."""
    if source is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.images, digits.target
    else:
        x, y = np.asarray(source[0], np.float64), np.asarray(source[1])
        if x.ndim != 3 or x.shape[1:] != (8, 8) or len(y) != len(x):
            raise ValueError(
                f"source: expected (n, 8, 8) scans and n labels, got {x.shape}, {y.shape}"
            )
    if limit is not None:
        x, y = x[:limit], y[:limit]
    order = np.random.default_rng([seed, 0]).permutation(len(x))
    n_val = int(round(len(x) * val_fraction))
    return x, y, {"val": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}


def scratch_folder(root: Path) -> Path:
    """An empty temporary sibling of `root` with one folder per split and class."""
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for split in ("train", "val"):
        for digit in range(10):
            (tmp / split / str(digit)).mkdir(parents=True, exist_ok=True)
    return tmp


def publish(tmp: Path, root: Path, description: dict, indent: int) -> Path:
    """Writes dataset.json into `tmp` and renames it into place, so that an interrupted run
    never leaves a half-written dataset behind."""
    (tmp / "dataset.json").write_text(json.dumps(description, indent=indent))
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(root)
    except OSError:
        # Another process finished first; keep its copy if it matches.
        shutil.rmtree(tmp, ignore_errors=True)
        if not existing_dataset(root, description["name"], description["params"]):
            raise
    return root


def generate(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    train_copies: int = 4,
    val_copies: int = 2,
    size: int = 32,
    val_fraction: float = 0.2,
    limit: int | None = None,
) -> Path:
    """Writes the dataset to `root` unless a complete one made with the same arguments is
    there already; returns `root`. `limit` keeps only the first sources (for tests).

    Written to a temporary sibling folder and renamed into place, so an interrupted run never
    leaves a half-written dataset behind.
    """
    root = Path(root)
    params = dict(
        version=VERSION,
        seed=seed,
        train_copies=train_copies,
        val_copies=val_copies,
        size=size,
        val_fraction=val_fraction,
        limit=limit,
    )
    if existing_dataset(root, "digits_deformed", params):
        return root
    x, y, splits = split_sources(seed, val_fraction, limit)
    tmp = scratch_folder(root)
    counts = {}
    for split, copies in (("train", train_copies), ("val", val_copies)):
        for i in splits[split]:
            for c in range(copies):
                # One generator per image: the bytes do not depend on the loop order.
                img_rng = np.random.default_rng([seed, 1, int(i), c])
                out = _deform(x[i], img_rng, size)
                Image.fromarray(out, mode="L").save(tmp / split / str(y[i]) / f"{i:04d}_{c}.png")
        counts[split] = int(len(splits[split]) * copies)
    description = {
        "name": "digits_deformed",
        "source": "sklearn.datasets.load_digits",
        "params": params,
        "images": counts,
        "classes": [str(d) for d in range(10)],
    }
    return publish(tmp, root, description, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.digits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("root", help="output folder, e.g. data/digits_deformed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-copies", type=int, default=4)
    parser.add_argument("--val-copies", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    root = generate(
        args.root,
        seed=args.seed,
        train_copies=args.train_copies,
        val_copies=args.val_copies,
        size=args.size,
    )
    print(json.loads((root / "dataset.json").read_text())["images"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
