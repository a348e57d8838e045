"""Reading and augmenting one image, and the element functions of the input pipeline. This
module runs in grain's worker processes, so it imports only numpy, PIL, simplejpeg and OpenCV
(never jax).

Every random choice for a sample comes from `np.random.default_rng(seed)` with a seed derived
from (run seed, epoch, sample index), so an element is a pure function of its index in the
stream: the worker that decodes it and the order workers finish in do not matter.

JPEGs are decoded by libjpeg-turbo through simplejpeg (fast integer IDCT, fast chroma
upsampling), at 1/2, 1/4 or 1/8 size (DCT scaling) when the crop still covers at least the
output side at that size; the crop box is drawn from the full image size first, so the reduced
decode changes pixel values only, never which region is taken. Other files (PNG, CMYK JPEGs,
JPEGs libjpeg-turbo rejects) are decoded by PIL. The crop is resized by OpenCV.
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

# One image per call, and one worker process per core: OpenCV's own thread pool would only
# contend with the other workers.
cv2.setNumThreads(1)

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
    reduced_decode: decode JPEGs at the smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps at
      least image_size pixels across the crop in each direction (`dct_scale`); False decodes at
      full size.
    """

    train: bool
    image_size: int
    eval_resize: int
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    channels: int = 3
    skip_corrupt: bool = False
    reduced_decode: bool = True


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


_OPEN_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def crop_geometry(
    width: int, height: int, aug: Augment, seed: Sequence[int]
) -> tuple[tuple[float, float, float, float], bool]:
    """(box, flip) for an image of this size: the random-resized-crop box and coin (train, in
    this order from `default_rng(seed)`) or the centre-crop box (eval, no flip)."""
    if aug.train:
        rng = np.random.default_rng(seed)
        box = random_resized_crop_box(width, height, rng, aug.crop_area, aug.crop_ratio)
        return box, bool(aug.flip and rng.random() < 0.5)
    return centre_crop_box(width, height, aug.eval_resize, aug.image_size), False


def dct_scale(box: tuple[float, float, float, float], size: int) -> int:
    """The JPEG decode scale 1/a: a in (1, 2, 4, 8) the largest with both sides of the crop
    `box` (in full-size pixels) at least `size` pixels at 1/a. libjpeg-turbo's SIMD IDCT covers
    these four scales only (n/8 scales in between decode slower than full size)."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    a = 1
    while a < 8 and bw >= 2 * a * size and bh >= 2 * a * size:
        a *= 2
    return a


def _decode_jpeg(data: bytes, aug: Augment, seed: Sequence[int]):
    """(pixels (h, w, channels) uint8, box in their coordinates, flip) through simplejpeg, or
    None for what it does not handle (CMYK/YCCK, a JPEG that libjpeg-turbo rejects or warns
    about): those go through PIL."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None
    box, flip = crop_geometry(width, height, aug, seed)
    a = dct_scale(box, aug.image_size) if aug.reduced_decode else 1
    try:
        pixels = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB" if aug.channels == 3 else "GRAY",
            fastdct=True,
            fastupsample=True,
            min_height=-(-height // a),
            min_width=-(-width // a),
        )
    except ValueError:
        return None
    sy, sx = pixels.shape[0] / height, pixels.shape[1] / width
    return pixels, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), flip


def _decode_pil(data: bytes, aug: Augment, seed: Sequence[int]):
    """(pixels (h, w) or (h, w, 3) uint8, box, flip) through PIL, at full size."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = img.convert("RGB" if aug.channels == 3 else "L")
    box, flip = crop_geometry(img.size[0], img.size[1], aug, seed)
    return np.asarray(img), box, flip


def crop_resize(pixels: np.ndarray, box, size: int, flip: bool) -> np.ndarray:
    """`box` rounded to whole pixels of `pixels`, resized to size x size, mirrored if `flip`.

    Output pixel (i, j) samples the crop at (T + (i + 1/2) * sy - 1/2, L + (j + 1/2) * sx - 1/2)
    ((L, T) its corner, sx, sy its sides / size) bilinearly, edges repeated; a crop at least
    twice the output in both directions is area-averaged instead (both are OpenCV's)."""
    height, width = pixels.shape[:2]
    left = min(max(round(box[0]), 0), width - 1)
    top = min(max(round(box[1]), 0), height - 1)
    right = min(max(round(box[2]), left + 1), width)
    bottom = min(max(round(box[3]), top + 1), height)
    shrink = min(right - left, bottom - top) >= 2 * size
    out = cv2.resize(
        pixels[top:bottom, left:right],
        (size, size),
        interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
    )
    if flip:  # on the output: a tenth of the cost of copying a reversed numpy view
        out = cv2.flip(out, 1)
    return out[:, :, None] if out.ndim == 2 else out


def load_example(path: str, aug: Augment, seed: Sequence[int]) -> np.ndarray:
    """One image -> (S, S, channels) uint8: the crop of `crop_geometry`, resized to S x S and
    flipped by `crop_resize`.

    A JPEG is decoded by simplejpeg; with `aug.reduced_decode` at the scale `dct_scale` gives
    for its crop box, and the box scaled with it. Anything else is decoded by PIL."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        decoded = _decode_jpeg(data, aug, seed) if simplejpeg.is_jpeg(data) else None
        if decoded is None:
            decoded = _decode_pil(data, aug, seed)
    except _OPEN_ERRORS as e:
        raise CorruptImageError(f"cannot read image {str(path)!r}: {e}") from e
    pixels, box, flip = decoded
    return crop_resize(pixels, box, aug.image_size, flip)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the n training images."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _element(path: str, label: int, index: int, aug: Augment, seed) -> dict[str, np.ndarray]:
    """One decoded sample: image (S, S, C) uint8, label int32, mask float32 (0: the image is
    corrupt and skipped, or padding), index int64 (position in the split; -1: padding)."""
    mask = 1.0
    try:
        image = load_example(path, aug, seed)
    except CorruptImageError:
        if not aug.skip_corrupt:
            raise
        image = np.zeros((aug.image_size, aug.image_size, aug.channels), np.uint8)
        mask = 0.0
    return {
        "image": image,
        "label": np.int32(label),
        "mask": np.float32(mask),
        "index": np.int64(index),
    }


def _padding(aug: Augment) -> dict[str, np.ndarray]:
    return {
        "image": np.zeros((aug.image_size, aug.image_size, aug.channels), np.uint8),
        "label": np.int32(0),
        "mask": np.float32(0.0),
        "index": np.int64(-1),
    }


def _compact(paths: Sequence[str]) -> tuple[str, np.ndarray]:
    """(common folder, paths below it as one bytes array): what every worker receives, so
    ImageNet's 1.28M paths travel as one ~40 MB buffer instead of 1.28M str objects."""
    paths = [os.fspath(p) for p in paths]
    prefix = os.path.commonprefix(paths) if paths else ""
    cut = prefix.rfind(os.sep) + 1  # the common folder, with its trailing separator
    return prefix[:cut], np.asarray([os.fsencode(p[cut:]) for p in paths], dtype=bytes)


class _Elements:
    """What both element streams hold: the paths (compacted), labels and augmentation, and
    this process's slice of each global batch (b = B / process_count samples from offset
    process_index * b)."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: np.ndarray,
        aug: Augment,
        *,
        global_batch: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.root, self.paths = _compact(paths)
        self.labels = np.asarray(labels, np.int32)
        self.aug = aug
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch


class TrainElements(_Elements):
    """Element j of one process's training stream -> one decoded, augmented sample.

    With B = global_batch, b = B / process_count and E = n // B steps per epoch, element j
    belongs to step s = j // b, epoch e = s // E, and is sample
    i = epoch_order(seed, e, n)[(s mod E) * B + process_index * b + j mod b], augmented with
    seed (seed, e, i). So a step's images do not depend on the process count, the number of
    workers, or where the run started.
    """

    def __init__(
        self, paths: Sequence[str], labels: np.ndarray, aug: Augment, *, seed: int, **split
    ):
        super().__init__(paths, labels, aug, **split)
        self.seed = seed
        self.steps_per_epoch = len(self.paths) // self.global_batch
        self._order: tuple[int, np.ndarray] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_order": None}

    def sample(self, j: int) -> tuple[int, int]:
        """(epoch, split index) of element j."""
        step, k = divmod(int(j), self.local_batch)
        epoch, b = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            # One permutation per epoch, not per element (1.28M entries take ~25 ms).
            self._order = (epoch, epoch_order(self.seed, epoch, len(self.paths)))
        return epoch, int(self._order[1][b * self.global_batch + self.offset + k])

    def __call__(self, j: int) -> dict[str, np.ndarray]:
        epoch, i = self.sample(j)
        path = os.path.join(self.root, os.fsdecode(self.paths[i]))
        return _element(path, self.labels[i], i, self.aug, (self.seed, epoch, i))


class EvalElements(_Elements):
    """Element j of one process's evaluation stream: eval batch t = j // b covers split indices
    t * B + process_index * b + (j mod b); indices past the split are padding (mask 0)."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, aug: Augment, **split):
        super().__init__(paths, labels, aug, **split)
        self.num_batches = -(-len(self.paths) // self.global_batch)

    def __len__(self) -> int:
        return self.num_batches * self.local_batch

    def __call__(self, j: int) -> dict[str, np.ndarray]:
        t, k = divmod(int(j), self.local_batch)
        i = t * self.global_batch + self.offset + k
        if i >= len(self.paths):
            return _padding(self.aug)
        path = os.path.join(self.root, os.fsdecode(self.paths[i]))
        return _element(path, self.labels[i], i, self.aug, (0,))


@dataclass(frozen=True)
class Batch:
    """A decoded batch: images (B, S, S, C) uint8, labels (B,) int32, mask (B,) float32 (0 for
    padding and for skipped images), and the split indices of the images that were skipped."""

    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    skipped: tuple[int, ...] = ()


class Chunk:
    """Chunk c -> samples c*k .. c*k+k-1 of `elements`, stacked (a dict of (k, ...) arrays):
    one task of a worker. Chunks of a few images, not single images, because each task costs
    the trainer shared-memory and queue work (benchmarks/input.py measures it); not whole
    batches, so that every worker has a share of each batch."""

    def __init__(self, elements, size: int):
        self.elements = elements
        self.size = size

    def __call__(self, c: int) -> dict[str, np.ndarray]:
        k = self.size
        items = [self.elements(j) for j in range(int(c) * k, int(c) * k + k)]
        return {key: np.stack([e[key] for e in items]) for key in items[0]}


def collate(chunks: Sequence[dict[str, np.ndarray]], train: bool) -> Batch:
    """Concatenates chunks into a Batch. A skipped (corrupt) image of a train batch is replaced
    by another image of the batch, so batch statistics see only real images; in an eval batch
    it keeps mask 0."""
    image = np.concatenate([c["image"] for c in chunks])
    label = np.concatenate([c["label"] for c in chunks]).astype(np.int32)
    mask = np.concatenate([c["mask"] for c in chunks]).astype(np.float32)
    index = np.concatenate([c["index"] for c in chunks])
    bad = np.flatnonzero((mask == 0) & (index >= 0))
    if bad.size and train:
        good = np.flatnonzero(mask > 0)
        if good.size == 0:
            raise CorruptImageError(
                f"every image of a batch is corrupt (split indices {index.tolist()})"
            )
        for k, i in enumerate(bad):
            j = good[k % good.size]
            image[i], label[i], mask[i] = image[j], label[j], 1.0
    return Batch(image, label, mask, tuple(int(index[i]) for i in bad))


class Collate:
    """`collate` with `train` bound, picklable (grain's `batch_fn`)."""

    def __init__(self, train: bool):
        self.train = train

    def __call__(self, chunks) -> Batch:
        return collate(chunks, self.train)


def exit_with_parent(worker_index: int = 0, worker_count: int = 1) -> None:
    """grain `worker_init_fn`: the worker exits within a second of its parent, so a training
    process killed with SIGKILL (or by the OOM killer) leaves no orphaned decoders behind."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit_with_parent").start()


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
