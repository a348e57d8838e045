"""The ImageNet-layout folder -> batches of global jax arrays sharded over the mesh.

    root/train/<class>/<image>.{jpg,jpeg,png}
    root/val/<class>/<image>.{jpg,jpeg,png}

Classes are the sorted folder names of train/. The training order is a pure function of
(seed, epoch): epoch e visits `permutation(seed, e)` in batches of `global_batch`, dropping the
remainder, and sample i of epoch e is augmented with seed (seed, e, i). So step s always sees the
same images, augmented the same way, whether the run started at step 0 or resumed at step s.

Each process (host) decodes its slice of every global batch in a pool of worker processes,
with a bounded number of batches in flight, and a thread places finished batches on the devices
ahead of the step that needs them.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train import images
from train.images import Augment, Batch, DatasetError

log = logging.getLogger(__name__)

LAYOUT = "root/{train,val}/<class>/<image>.{jpg,jpeg,png}"


@dataclass(frozen=True)
class Split:
    """One split of the folder: parallel lists of image paths and integer labels."""

    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def read_split(root: str | Path, split: str, classes: tuple[str, ...] | None = None) -> Split:
    """Lists root/<split>/<class>/*; `classes` (from train/) fixes the label of each name.

    Raises DatasetError naming the folder when it is missing, has no class folders, has a class
    folder without images, or (val) has a class that train/ does not.
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
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not names:
        raise DatasetError(f"{str(folder)!r} has no class folders; expected the layout {LAYOUT}")
    if classes is None:
        classes = tuple(names)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DatasetError(f"{str(folder)!r} has classes that train/ does not: {unknown}")
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name in names:
        files = images.list_images(folder / name)
        if not files:
            raise DatasetError(
                f"class folder {str(folder / name)!r} has no images "
                f"({', '.join(images.IMAGE_SUFFIXES)})"
            )
        paths += [str(f) for f in files]
        labels += [index[name]] * len(files)
    return Split(tuple(paths), np.asarray(labels, np.int32), tuple(classes))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the n training images."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_batch_spec(
    split: Split,
    seed: int,
    step: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """(paths, labels, seeds, valid) of this process's slice of the global batch at `step`."""
    steps_per_epoch = len(split) // global_batch
    epoch, k = divmod(step, steps_per_epoch)
    local = global_batch // process_count
    start = k * global_batch + process_index * local
    idx = epoch_order(seed, epoch, len(split))[start : start + local]
    seeds = [(seed, epoch, int(i)) for i in idx]
    return ([split.paths[i] for i in idx], split.labels[idx], seeds, [True] * len(idx))


def eval_batch_specs(
    split: Split, global_batch: int, process_index: int = 0, process_count: int = 1
):
    """Fixed-order eval batches covering every image once; the last is padded (valid False)."""
    local = global_batch // process_count
    for start in range(0, len(split), global_batch):
        lo = start + process_index * local
        idx = [i for i in range(lo, lo + local)]
        valid = [i < len(split) for i in idx]
        idx = [i if v else 0 for i, v in zip(idx, valid, strict=True)]
        yield ([split.paths[i] for i in idx], split.labels[idx], [(0,)] * local, valid)


def num_eval_batches(split: Split, global_batch: int) -> int:
    return -(-len(split) // global_batch)


class Loader:
    """A pool of `workers` decoding processes (0: decode in this process) shared by the train
    and eval iterators. `map` keeps at most `in_flight` batches queued and yields them in spec
    order. Use as a context manager (it owns the pool)."""

    def __init__(self, workers: int, in_flight: int):
        self.in_flight = max(1, in_flight)
        self.pool = None
        if workers > 0:
            # spawn, not fork: forking a process that runs JAX threads can deadlock.
            self.pool = multiprocessing.get_context("spawn").Pool(workers)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def map(self, aug: Augment, specs) -> Iterator[Batch]:
        if self.pool is None:
            for spec in specs:
                yield images.load_batch(aug, *spec)
            return
        pending = collections.deque()
        for spec in specs:
            pending.append(self.pool.apply_async(images.load_batch, (aug, *spec)))
            if len(pending) >= self.in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _report_skipped(batch: Batch, seen: set[str]) -> None:
    for path in batch.skipped:
        if path not in seen:
            seen.add(path)
            log.warning("skipping corrupt image %s", path)


def to_global(batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's slice -> global arrays split over the mesh's data axis."""
    local = {"image": batch.image, "label": batch.label, "mask": batch.mask}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def prefetch_to_mesh(
    batches: Iterator[Batch], mesh: Mesh, size: int = 2, axis: str = "data"
) -> Iterator[dict[str, jax.Array]]:
    """Places batches on the mesh in a background thread, `size` ahead of the consumer."""
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    out: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()
    seen: set[str] = set()

    def produce():
        try:
            for batch in batches:
                _report_skipped(batch, seen)
                item = to_global(batch, sharding)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            out.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="prefetch_to_mesh")
    thread.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    if global_batch % mesh.size or global_batch % jax.process_count():
        raise ValueError(
            f"batch_size {global_batch} must be divisible by the number of devices "
            f"({mesh.size}) and of processes ({jax.process_count()})"
        )


def train_iterator(
    split: Split,
    aug: Augment,
    mesh: Mesh,
    loader: Loader,
    *,
    seed: int,
    start_step: int,
    num_steps: int,
    global_batch: int,
):
    """The global batches of steps start_step .. num_steps-1."""
    check_batch_size(global_batch, mesh)
    if len(split) < global_batch:
        raise DatasetError(
            f"the train split has {len(split)} images, fewer than one batch ({global_batch})"
        )
    specs = (
        train_batch_spec(split, seed, s, global_batch, jax.process_index(), jax.process_count())
        for s in range(start_step, num_steps)
    )
    return prefetch_to_mesh(loader.map(aug, specs), mesh)


def eval_iterator(split: Split, aug: Augment, mesh: Mesh, loader: Loader, *, global_batch: int):
    """The padded global eval batches, covering every image of `split` once."""
    check_batch_size(global_batch, mesh)
    specs = eval_batch_specs(split, global_batch, jax.process_index(), jax.process_count())
    return prefetch_to_mesh(loader.map(aug, specs), mesh)
