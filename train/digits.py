"""The embedded datasets, made from scikit-learn's bundled handwritten digits (1797 real 8x8
scans, 10 classes) and written once as PNG files in the ImageNet layout.

`digits_deformed`: the digits upsampled to 32x32 and put through random affine and elastic
deformations:

    root/train/<digit>/<source index>_<copy>.png   (80% of the source digits, `train_copies` each)
    root/val/<digit>/<source index>_<copy>.png     (the other 20%, `val_copies` each)
    root/dataset.json                              (how it was made)

A source digit lands in one split only, so val measures generalisation to new writers' digits,
not to new deformations of digits seen in training. The files are a pure function of the
arguments: the same seed writes the same bytes.

`digits_scaled` (`generate_scaled`): the digits at many object scales on a 48x48 canvas, for
the study of whether a receptive field follows the object. Each digit's 8x8 grid is rendered
into a square box of 16*s pixels (s log-uniform in [0.55, 1.75] in train/, every val digit at
each of `VAL_SCALES`), after a mild affine map and a smooth elastic field defined on the
digit's own grid (so one deformation draw gives the same shape at every scale). Train digits
sit at the canvas centre plus up to +-4 px; val digits are centred on `val_centre` and their
scale and centre are listed in dataset.json under "val".

    python -m train.digits data/digits_deformed [--seed 0]
    python -m train.digits data/digits_scaled --kind scaled
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


def _existing(root: Path, name: str, params: dict) -> bool:
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


def _sources(
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


def _scratch(root: Path) -> Path:
    """An empty temporary sibling of `root` with one folder per split and class."""
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for split in ("train", "val"):
        for digit in range(10):
            (tmp / split / str(digit)).mkdir(parents=True, exist_ok=True)
    return tmp


def _publish(tmp: Path, root: Path, description: dict, indent: int) -> Path:
    """Writes dataset.json into `tmp` and renames it into place, so that an interrupted run
    never leaves a half-written dataset behind."""
    (tmp / "dataset.json").write_text(json.dumps(description, indent=indent))
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(root)
    except OSError:
        # Another process finished first; keep its copy if it matches.
        shutil.rmtree(tmp, ignore_errors=True)
        if not _existing(root, description["name"], description["params"]):
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
    if _existing(root, "digits_deformed", params):
        return root
    x, y, splits = _sources(seed, val_fraction, limit)
    tmp = _scratch(root)
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
    return _publish(tmp, root, description, indent=2)


# --- digits_scaled ------------------------------------------------------------------------------

SCALED_VERSION = 1
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


def _scaled_draw(rng: np.random.Generator) -> dict:
    """The shape of one deformation: mild rotation and shear, elastic field of 0.3 scan px."""
    return dict(
        angle=float(np.deg2rad(rng.uniform(-12, 12))),
        shear=float(rng.uniform(-0.15, 0.15)),
        field=_elastic_field(rng, 0.3),
    )


def generate_scaled(
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
    there; returns `root`. Same source split as `generate` (a source digit is in one split).
    `source`: other 8x8 scans (values 0..16, (n, 8, 8)) and their labels 0..9 instead of
    scikit-learn's digits."""
    root = Path(root)
    params = dict(
        version=SCALED_VERSION,
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
    if _existing(root, "digits_scaled", params):
        return root
    x, y, splits = _sources(seed, val_fraction, limit, source)
    tmp = _scratch(root)
    lo, hi = np.log(TRAIN_SCALES[0]), np.log(TRAIN_SCALES[1])
    centre = (size - 1) / 2
    for i in splits["train"]:
        for c in range(train_copies):
            r = np.random.default_rng([seed, 2, int(i), c])
            s = float(np.exp(r.uniform(lo, hi)))
            at = tuple(centre + r.uniform(-4, 4, size=2))
            out = render_digit(x[i], s, at, size=size, **_scaled_draw(r))
            Image.fromarray(out, mode="L").save(tmp / "train" / str(y[i]) / f"{i:04d}_{c}.png")
    val = {}
    for i in splits["val"]:
        draw = _scaled_draw(np.random.default_rng([seed, 3, int(i)]))
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
    return _publish(tmp, root, description, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.digits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("root", help="output folder, e.g. data/digits_deformed")
    parser.add_argument("--kind", choices=("deformed", "scaled"), default="deformed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-copies", type=int, default=None, help="default 4 (scaled: 8)")
    parser.add_argument("--val-copies", type=int, default=2)
    parser.add_argument("--size", type=int, default=None, help="default 32 (scaled: 48)")
    args = parser.parse_args(argv)
    if args.kind == "scaled":
        root = generate_scaled(
            args.root, seed=args.seed, train_copies=args.train_copies or 8, size=args.size or 48
        )
        print(json.loads((root / "dataset.json").read_text())["images"])
        return 0
    root = generate(
        args.root,
        seed=args.seed,
        train_copies=args.train_copies or 4,
        val_copies=args.val_copies,
        size=args.size or 32,
    )
    print(json.loads((root / "dataset.json").read_text())["images"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
