"""Reading and augmenting one image, and one batch of them. This module runs in the loader's
worker processes, so it imports only numpy and PIL (never jax).

Every random choice for a sample comes from `np.random.default_rng(seed)` with a seed the
caller derives from (run seed, epoch, sample index), so a batch is a pure function of its
spec: the worker that decodes it and the order batches finish in do not matter.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetError(ValueError):
    """A dataset folder that does not have the ImageNet layout, or an image that cannot be read."""


class CorruptImageError(DatasetError):
    """An image file that cannot be opened or decoded; the message names its path."""


@dataclass(frozen=True)
class Augment:
    """How a batch is decoded: train (random-resized-crop + flip) or eval (resize + centre crop).

    image_size: output side S; the batch is (B, S, S, channels) uint8.
    eval_resize: eval only: the shorter side is resized to this before the centre crop.
    crop_area, crop_ratio: train only: the crop covers a fraction of the image area drawn
      uniformly from crop_area, with aspect ratio (w/h) drawn log-uniformly from crop_ratio.
    """

    train: bool
    image_size: int
    eval_resize: int
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    channels: int = 3
    skip_corrupt: bool = False


def open_image(path: str | os.PathLike, channels: int) -> Image.Image:
    """Opens and fully decodes an image as RGB (channels=3) or greyscale (channels=1)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"cannot read image {str(path)!r}: {e}") from e


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    area: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[float, float, float, float]:
    """A (left, top, right, bottom) box as in Inception / torchvision's RandomResizedCrop:
    ten tries at a crop of random area and aspect ratio, else the central crop of the closest
    allowed ratio."""
    total = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = total * rng.uniform(area[0], area[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            left = rng.uniform(0, width - w)
            top = rng.uniform(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


def centre_crop_box(width: int, height: int, resize: int, size: int):
    """The box of the original image that `resize shorter side to `resize`, then centre-crop
    size x size` keeps; cropping first and resizing once gives the same picture, faster."""
    scale = resize / min(width, height)
    side_w, side_h = min(size / scale, width), min(size / scale, height)
    left, top = (width - side_w) / 2, (height - side_h) / 2
    return left, top, left + side_w, top + side_h


def load_example(path: str, aug: Augment, seed: tuple[int, ...]) -> np.ndarray:
    """One image -> (S, S, channels) uint8."""
    img = open_image(path, aug.channels)
    width, height = img.size
    if aug.train:
        rng = np.random.default_rng(seed)
        box = random_resized_crop_box(width, height, rng, aug.crop_area, aug.crop_ratio)
        flip = aug.flip and rng.random() < 0.5
    else:
        box = centre_crop_box(width, height, aug.eval_resize, aug.image_size)
        flip = False
    img = img.resize((aug.image_size, aug.image_size), Image.Resampling.BILINEAR, box=box)
    out = np.asarray(img, dtype=np.uint8)
    if out.ndim == 2:
        out = out[:, :, None]
    if flip:
        out = out[:, ::-1]
    return out


@dataclass(frozen=True)
class Batch:
    """A decoded batch: images (B, S, S, C) uint8, labels (B,) int32, mask (B,) float32 (0 for
    padding and for skipped images), and the paths of the images that were skipped."""

    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    skipped: tuple[str, ...] = ()


def load_batch(aug: Augment, paths, labels, seeds, valid) -> Batch:
    """Decodes one batch. `valid[i]` False marks padding (a zeros image, mask 0).

    A corrupt image raises CorruptImageError, or with `aug.skip_corrupt` is reported in
    `skipped`; in a train batch its place is taken by another image of the batch (so batch
    statistics see only real images), in an eval batch it gets mask 0.
    """
    s, c = aug.image_size, aug.channels
    n = len(paths)
    image = np.zeros((n, s, s, c), np.uint8)
    label = np.asarray(labels, np.int32).copy()
    mask = np.asarray(valid, np.float32).copy()
    skipped = []
    for i in range(n):
        if not valid[i]:
            continue
        try:
            image[i] = load_example(paths[i], aug, tuple(seeds[i]))
        except CorruptImageError:
            if not aug.skip_corrupt:
                raise
            skipped.append(paths[i])
            mask[i] = 0.0
    if skipped and aug.train:
        good = np.flatnonzero(mask > 0)
        if good.size == 0:
            raise CorruptImageError(f"every image of a batch is corrupt: {skipped}")
        for k, i in enumerate(np.flatnonzero(mask == 0)):
            j = good[k % good.size]
            image[i], label[i], mask[i] = image[j], label[j], 1.0
    return Batch(image, label, mask, tuple(skipped))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
