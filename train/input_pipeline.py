"""The ImageNet-layout folder -> batches of global jax arrays sharded over the mesh, with grain.

    root/train/<class>/<image>.{jpg,jpeg,png}
    root/val/<class>/<image>.{jpg,jpeg,png}      or  root/val/<image> + data.val_labels=FILE

Classes are the sorted folder names of train/. The training order is a pure function of
(seed, epoch): epoch e visits `epoch_order(seed, e, n)` in batches of `global_batch`, dropping
the remainder, and sample i of epoch e is augmented with seed (seed, e, i). So step s always sees
the same images, augmented the same way, whether the run started at step 0 or resumed at step s:
the iterator's state is the step, which the checkpoint holds.

Each process reads its slice of every global batch: a `grain.MapDataset` over the elements of
its stream (`images.TrainElements`: element index -> decoded, augmented image; `start_step` is
where it starts), in chunks of up to CHUNK images; grain's multiprocessing prefetch decodes the
chunks in `workers` processes (results in shared memory, in stream order, every worker holding
part of each batch); the chunks are concatenated into the batch in this process and placed on
the mesh with `jax.make_array_from_process_local_data`. Nothing here runs a thread or a pool of
its own. A worker that dies makes the next read raise (within about a second) instead of
waiting forever, and a worker whose trainer dies exits (`images.exit_with_parent`).
"""

from __future__ import annotations

import csv
import gc
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train import images
from train.config import TrainingError
from train.images import Augment, Batch, DatasetError, epoch_order

__all__ = [
    "Split",
    "read_split",
    "epoch_order",
    "train_batch",
    "eval_batch",
    "train_iterator",
    "eval_iterator",
    "to_global",
    "num_eval_batches",
]

log = logging.getLogger(__name__)

LAYOUT = "root/{train,val}/<class>/<image>.{jpg,jpeg,png}"
# Images per worker task (at most; a divisor of the local batch).
CHUNK = 16
# The ILSVRC2012 devkit's file that maps ILSVRC2012_ID (the integers of its ground-truth file)
# to WordNet IDs (the class folder names of train/).
DEVKIT_META = "meta.mat"


@dataclass(frozen=True)
class Split:
    """One split of the folder: parallel lists of image paths and integer labels."""

    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def read_split(
    root: str | Path,
    split: str,
    classes: tuple[str, ...] | None = None,
    labels: str | Path | None = None,
) -> Split:
    """Lists root/<split>/<class>/*; `classes` (from train/) fixes the label of each name.

    With `labels` (a file), root/<split> is one flat folder of images labelled by that file:
    the ILSVRC2012 validation ground truth (one ILSVRC2012_ID per line, for the images in
    sorted name order; the devkit's meta.mat must sit next to it) or a CSV of `name,label`
    rows (name: file name with or without extension; label: a class folder name of train/,
    the first word of the field, so Kaggle's LOC_val_solution.csv works as it is).

    Raises DatasetError naming the folder when it is missing, has no class folders, has a class
    folder without images, or (val) has a class that train/ does not; with `labels`, naming
    the file and line of a label that does not fit.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {str(root)!r} does not exist; expected the layout {LAYOUT} "
            "(for the embedded dataset, set data.generate=digits_deformed or run "
            f"`python -m train.digits {root}`)"
        )
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(
            f"dataset folder {str(root)!r} has no {split!r} folder; expected the layout {LAYOUT}"
        )
    if labels:
        if classes is None:
            raise DatasetError(f"a flat {split!r} folder needs the classes of train/")
        return _read_flat_split(folder, classes, Path(labels))
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not names:
        hint = ""
        if images.list_images(folder):
            hint = " (it holds images directly: set data.val_labels to its labels file)"
        raise DatasetError(
            f"{str(folder)!r} has no class folders; expected the layout {LAYOUT}{hint}"
        )
    if classes is None:
        classes = tuple(names)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DatasetError(f"{str(folder)!r} has classes that train/ does not: {unknown}")
    index = {name: i for i, name in enumerate(classes)}
    paths, labels_ = [], []
    for name in names:
        files = images.list_images(folder / name)
        if not files:
            raise DatasetError(
                f"class folder {str(folder / name)!r} has no images "
                f"({', '.join(images.IMAGE_SUFFIXES)})"
            )
        paths += [str(f) for f in files]
        labels_ += [index[name]] * len(files)
    return Split(tuple(paths), np.asarray(labels_, np.int32), tuple(classes))


def _read_flat_split(folder: Path, classes: tuple[str, ...], labels: Path) -> Split:
    if not labels.is_file():
        raise DatasetError(f"data.val_labels file {str(labels)!r} does not exist")
    files = images.list_images(folder)
    if not files:
        raise DatasetError(
            f"{str(folder)!r} has no images at its top level, but data.val_labels is set "
            f"(a flat folder of {', '.join(images.IMAGE_SUFFIXES)} files is expected)"
        )
    index = {name: i for i, name in enumerate(classes)}
    lines = labels.read_text().splitlines()
    rows = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    if rows and all(text.isdigit() for _, text in rows):
        assigned = _ground_truth_labels(files, rows, labels, index)
    else:
        assigned = _csv_labels(files, labels, index)
    return Split(tuple(str(f) for f in files), np.asarray(assigned, np.int32), classes)


def _ground_truth_labels(files, rows, labels: Path, index: dict[str, int]) -> list[int]:
    """ILSVRC2012_validation_ground_truth.txt: line k labels the k-th image in name order."""
    if len(rows) != len(files):
        raise DatasetError(
            f"{str(labels)!r} has {len(rows)} labels but {str(files[0].parent)!r} has "
            f"{len(files)} images; the ground-truth file labels the images in sorted name "
            "order, one line each"
        )
    meta = labels.parent / DEVKIT_META
    if not meta.is_file():
        raise DatasetError(
            f"{str(labels)!r} holds ILSVRC2012_IDs; mapping them to the class folders of "
            f"train/ needs the devkit's {DEVKIT_META} next to it ({str(meta)!r} is missing), "
            "or give a name,label CSV instead"
        )
    from scipy.io import loadmat

    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    out = []
    for line, text in rows:
        name = wnid.get(int(text))
        if name is None:
            raise DatasetError(
                f"{str(labels)!r} line {line}: ILSVRC2012_ID {text} is not in {meta}"
            )
        if name not in index:
            raise DatasetError(
                f"{str(labels)!r} line {line}: class {name} (ILSVRC2012_ID {text}) is not a "
                "class folder of train/"
            )
        out.append(index[name])
    return out


def _csv_labels(files, labels: Path, index: dict[str, int]) -> list[int]:
    """`name,label` rows (an optional header row); every image needs exactly one row."""
    position = {}
    for k, f in enumerate(files):
        position[f.name] = k
        position.setdefault(f.stem, k)
    assigned: list[int | None] = [None] * len(files)
    with labels.open(newline="") as fh:
        for line, row in enumerate(csv.reader(fh), 1):
            if not row or not "".join(row).strip():
                continue
            name = row[0].strip()
            label = row[1].split()[0] if len(row) > 1 and row[1].split() else ""
            if line == 1 and name not in position and label not in index:
                continue  # a header row
            if len(row) < 2 or not label:
                raise DatasetError(
                    f"{str(labels)!r} line {line}: expected `name,label`, got {','.join(row)!r}"
                )
            if name not in position:
                raise DatasetError(
                    f"{str(labels)!r} line {line}: no image {name!r} in {str(files[0].parent)!r}"
                )
            if label not in index:
                raise DatasetError(
                    f"{str(labels)!r} line {line}: label {label!r} is not a class folder of "
                    f"train/ (e.g. {next(iter(index))!r})"
                )
            k = position[name]
            if assigned[k] is not None:
                raise DatasetError(f"{str(labels)!r} line {line}: {name!r} is labelled twice")
            assigned[k] = index[label]
    missing = [files[k].name for k, a in enumerate(assigned) if a is None]
    if missing:
        raise DatasetError(
            f"{len(missing)} of the {len(files)} images in {str(files[0].parent)!r} have no "
            f"label in {str(labels)!r}, e.g. {missing[:3]}"
        )
    return assigned


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    if global_batch % mesh.size or global_batch % jax.process_count():
        raise ValueError(
            f"batch_size {global_batch} must be divisible by the number of devices "
            f"({mesh.size}) and of processes ({jax.process_count()})"
        )


def num_eval_batches(split: Split, global_batch: int) -> int:
    return -(-len(split) // global_batch)


def train_elements(
    split: Split, aug: Augment, seed: int, global_batch: int, process_index=0, process_count=1
) -> images.TrainElements:
    return images.TrainElements(
        split.paths,
        split.labels,
        aug,
        seed=seed,
        global_batch=global_batch,
        process_index=process_index,
        process_count=process_count,
    )


def eval_elements(
    split: Split, aug: Augment, global_batch: int, process_index=0, process_count=1
) -> images.EvalElements:
    return images.EvalElements(
        split.paths,
        split.labels,
        aug,
        global_batch=global_batch,
        process_index=process_index,
        process_count=process_count,
    )


def train_batch(
    split: Split,
    aug: Augment,
    seed: int,
    step: int,
    global_batch: int,
    process_index=0,
    process_count=1,
) -> Batch:
    """This process's slice of the global batch of `step`, decoded here (no workers)."""
    elements = train_elements(split, aug, seed, global_batch, process_index, process_count)
    return images.collate([images.Chunk(elements, elements.local_batch)(step)], train=True)


def eval_batch(
    split: Split, aug: Augment, t: int, global_batch: int, process_index=0, process_count=1
) -> Batch:
    """This process's slice of eval batch `t`, decoded here (no workers)."""
    elements = eval_elements(split, aug, global_batch, process_index, process_count)
    return images.collate([images.Chunk(elements, elements.local_batch)(t)], train=False)


def host_batches(
    elements,
    start: int,
    stop: int,
    local_batch: int,
    train: bool,
    workers: int,
    prefetch: int,
    repeat: bool = False,
    chunk: int = 0,
) -> grain.IterDataset:
    """grain: elements start..stop-1 (multiples of `local_batch`) decoded in `workers`
    processes (0: in this one) in chunks of CHUNK images or fewer, in order, concatenated
    into batches of `local_batch`; about `prefetch` batches decoded ahead.
    `repeat`: start..stop-1 over and over (one set of workers for many passes); `chunk`: the
    chunk size to use instead of CHUNK (a benchmark knob)."""
    k = math.gcd(local_batch, chunk or CHUNK)
    ds = grain.MapDataset.range(start // k, stop // k)
    if repeat:
        ds = ds.repeat()
    ds = ds.map(images.Chunk(elements, k))
    # Each worker decodes its chunks one at a time: the workers are the parallelism.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers > 0:
        # grain reads its absl flags when it starts workers; this program does not parse any,
        # so the flags keep their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        buffer = max(1, math.ceil(max(prefetch, 1) * local_batch / k / workers))
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer),
            worker_init_fn=images.exit_with_parent,
        )
    return ds.batch(local_batch // k, drop_remainder=False, batch_fn=images.Collate(train))


def _device_batches(
    ds: grain.IterDataset, mesh: Mesh, split: Split, axis: str = "data"
) -> Iterator[dict[str, jax.Array]]:
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    it = iter(ds)
    seen: set[int] = set()
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:  # grain: a worker process died (killed, out of memory)
                raise TrainingError(
                    f"the input pipeline stopped: {e} (restart the same command to resume "
                    "from the last checkpoint; fewer data.workers need less memory)"
                ) from e
            for i in batch.skipped:
                if i not in seen:
                    seen.add(i)
                    log.warning("skipping corrupt image %s", split.paths[i])
            yield to_global(batch, sharding)
    finally:
        # Stops grain's worker processes now rather than when the iterator is collected.
        if hasattr(it, "close"):
            it.close()
        # The last chunks' shared memory is released when the iterator goes, not at exit.
        del it
        gc.collect()


def to_global(batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's slice -> global arrays split over the mesh's data axis."""
    local = {"image": batch.image, "label": batch.label, "mask": batch.mask}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def train_iterator(
    split: Split,
    aug: Augment,
    mesh: Mesh,
    *,
    seed: int,
    start_step: int,
    num_steps: int,
    global_batch: int,
    workers: int,
    prefetch: int,
) -> Iterator[dict[str, jax.Array]]:
    """The global batches of steps start_step .. num_steps-1 (a generator: close() it to stop
    the workers)."""
    check_batch_size(global_batch, mesh)
    if len(split) < global_batch:
        raise DatasetError(
            f"the train split has {len(split)} images, fewer than one batch ({global_batch})"
        )
    elements = train_elements(
        split, aug, seed, global_batch, jax.process_index(), jax.process_count()
    )
    b = elements.local_batch
    ds = host_batches(elements, start_step * b, num_steps * b, b, True, workers, prefetch)
    return _device_batches(ds, mesh, split)


def eval_iterator(
    split: Split,
    aug: Augment,
    mesh: Mesh,
    *,
    global_batch: int,
    workers: int,
    prefetch: int,
    repeat: bool = False,
) -> Iterator[dict[str, jax.Array]]:
    """The padded global eval batches, covering every image of `split` once
    (`num_eval_batches` of them), or with `repeat` pass after pass: an evaluation during
    training takes one pass, and the workers start once per run instead of once per pass."""
    check_batch_size(global_batch, mesh)
    elements = eval_elements(split, aug, global_batch, jax.process_index(), jax.process_count())
    b = elements.local_batch
    ds = host_batches(elements, 0, len(elements), b, False, workers, prefetch, repeat)
    return _device_batches(ds, mesh, split)
