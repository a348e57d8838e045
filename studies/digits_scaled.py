"""`digits_scaled`, the scale study's dataset: scikit-learn's bundled digits at many object
scales on a 48x48 canvas, in the ImageNet layout of train/digits.py (same source split: a source
digit lands in one split only).

Each digit's 8x8 grid is rendered into a square box of 16*s pixels (s log-uniform in
`TRAIN_SCALES` in the train split, every val digit at each of `VAL_SCALES`), after a mild affine
map and a smooth elastic field defined on the digit's own grid (so one deformation draw gives the
same shape at every scale). Train digits sit at the canvas centre plus up to +-4 px; val digits are
centred on `val_centre` and their scale and centre are listed in dataset.json under "val".
The files are a pure function of the arguments: the same seed writes the same bytes.

    python -m studies.digits_scaled data/digits_scaled [--seed 0] [--train-copies 8] [--size 48]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from train.digits import existing_dataset, publish, scratch_folder, split_sources

VERSION = 1
VAL_SCALES = (0.6, 0.8, 1.0, 1.25, 1.6)
TRAIN_SCALES = (0.55, 1.75)
UPSAMPLE = 8  # the 8x8 scan is upsampled bicubically to 64x64 before the warp


def _elastic_field(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """(2, 96, 96): a smooth displacement field over the digit's own coordinates (source pixel
    units, grid covering [-2, 10) at 8 samples per source pixel), std `amplitude` source px."""
    from scipy import ndimage

    field = np.stack([ndimage.gaussian_filter(rng.uniform(-1, 1, (96, 96)), 8.0) for _ in range(2)])
    return field * (amplitude / max(field.std(), 1e-12))


def render_digit(
    img: np.ndarray,
    scale: float,
    centre: tuple[float, float],
    *,
    size: int = 48,
    angle: float = 0.0,
    shear: float = 0.0,
    field: np.ndarray | None = None,
) -> np.ndarray:
    """One 8x8 scan (values 0..16) -> (size, size) uint8: the scan's grid fills a box of
    16*scale px centred on `centre` (row, col; pixel centres are integers), rotated by `angle`
    (radians) and sheared by `shear` about that centre, displaced by `field` (from
    `_elastic_field`, in the scan's pixel units, so it scales with the digit)."""
    from scipy import ndimage

    up = np.asarray(
        Image.fromarray((np.asarray(img, np.float64) * (255 / 16)).astype(np.float32), "F").resize(
            (8 * UPSAMPLE, 8 * UPSAMPLE), Image.Resampling.BICUBIC
        ),
        np.float64,
    )
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    inv = np.linalg.inv(rot @ np.array([[1.0, shear], [0.0, 1.0]]))
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.stack([rows - centre[0], cols - centre[1]])
    # Output offset (px) -> scan coordinate u in [0, 8): one scan pixel is 2*scale px.
    u = np.tensordot(inv, out, axes=1) / (2.0 * scale) + 4.0
    if field is not None:
        grid = (u + 2.0) * UPSAMPLE - 0.5  # position on the field's 96x96 grid
        u = u + np.stack([ndimage.map_coordinates(f, grid, order=1, mode="nearest") for f in field])
    src = u * UPSAMPLE - 0.5  # pixel centres of the 64x64 upsampled scan
    warped = ndimage.map_coordinates(up, src, order=1, mode="constant", cval=0.0)
    return np.clip(np.rint(warped), 0, 255).astype(np.uint8)


def _draw(rng: np.random.Generator) -> dict:
    """The shape of one deformation: mild rotation and shear, elastic field of 0.3 scan px."""
    return dict(
        angle=float(np.deg2rad(rng.uniform(-12, 12))),
        shear=float(rng.uniform(-0.15, 0.15)),
        field=_elastic_field(rng, 0.3),
    )


def generate(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    train_copies: int = 8,
    size: int = 48,
    val_centre: tuple[float, float] = (24.0, 24.0),
    val_fraction: float = 0.2,
    limit: int | None = None,
    source: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Writes `digits_scaled` to `root` unless a complete one made with the same arguments is
    there; returns `root`. `source`: other 8x8 scans (values 0..16, (n, 8, 8)) and their labels
    0..9 instead of scikit-learn's digits; `limit` keeps only the first sources (for tests)."""
    root = Path(root)
    params = dict(
        version=VERSION,
        seed=seed,
        train_copies=train_copies,
        size=size,
        val_centre=list(val_centre),
        val_scales=list(VAL_SCALES),
        train_scales=list(TRAIN_SCALES),
        val_fraction=val_fraction,
        limit=limit,
        source="custom" if source is not None else "sklearn",
    )
    if existing_dataset(root, "digits_scaled", params):
        return root
    x, y, splits = split_sources(seed, val_fraction, limit, source)
    tmp = scratch_folder(root)
    lo, hi = np.log(TRAIN_SCALES[0]), np.log(TRAIN_SCALES[1])
    centre = (size - 1) / 2
    for i in splits["train"]:
        for c in range(train_copies):
            r = np.random.default_rng([seed, 2, int(i), c])
            s = float(np.exp(r.uniform(lo, hi)))
            at = tuple(centre + r.uniform(-4, 4, size=2))
            out = render_digit(x[i], s, at, size=size, **_draw(r))
            Image.fromarray(out, mode="L").save(tmp / "train" / str(y[i]) / f"{i:04d}_{c}.png")
    val = {}
    for i in splits["val"]:
        draw = _draw(np.random.default_rng([seed, 3, int(i)]))
        for s in VAL_SCALES:
            name = f"{y[i]}/{i:04d}_s{s:g}.png"
            out = render_digit(x[i], s, val_centre, size=size, **draw)
            Image.fromarray(out, mode="L").save(tmp / "val" / name)
            val[name] = {"scale": s, "centre": list(val_centre), "source": int(i)}
    description = {
        "name": "digits_scaled",
        "source": "sklearn.datasets.load_digits" if source is None else "custom",
        "params": params,
        "images": {"train": int(len(splits["train"]) * train_copies), "val": len(val)},
        "classes": [str(d) for d in range(10)],
        "val": val,
    }
    return publish(tmp, root, description, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m studies.digits_scaled",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("root", help="output folder, e.g. data/digits_scaled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-copies", type=int, default=8)
    parser.add_argument("--size", type=int, default=48)
    args = parser.parse_args(argv)
    root = generate(args.root, seed=args.seed, train_copies=args.train_copies, size=args.size)
    print(json.loads((root / "dataset.json").read_text())["images"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
