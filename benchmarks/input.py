"""Input pipeline benchmark: images/s of the training input on generated ImageNet-like JPEGs.

    python -m benchmarks.input [--images 256] [--json benchmarks/results/input_cpu.json]

Writes `--images` JPEGs of 500x375 (quality 90) whose content has the 1/f amplitude spectrum
of natural images (colour channels correlated, plus a few smooth-edged shapes), so their file
sizes and decode times are those of photographs (ImageNet's average file is ~110 KB), then
measures, on the train augmentation of the ImageNet configs (random-resized-crop to 224, flip):

1. decode + augment per core: `images.load_example` over every image in this process, with the
   full-size decode (`reduced_decode=False`, the previous path) and the reduced decode, in
   interleaved rounds; images per CPU second of this process (wall-clock rate alongside).
2. the pipeline: `input_pipeline.host_batches` (grain, one image per worker task, batches of
   `--batch` stacked in this process) with 1 and 2 worker processes, for both decodes; images
   per wall-clock second from the first batch on (worker start-up excluded).

The machine's load average is recorded: on a shared machine the 2-worker rate is bounded by the
cores the other processes leave free.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from train import images, input_pipeline

SIZE = (500, 375)


def natural_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 with a 1/f amplitude spectrum and correlated channels."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amp = 1.0 / f
    amp[0, 0] = 0.0

    def field():
        phase = rng.uniform(0, 2 * np.pi, amp.shape)
        out = np.fft.irfft2(amp * np.exp(1j * phase), s=(height, width))
        return out / out.std()

    luma = field()
    img = np.stack([luma + 0.35 * field() for _ in range(3)], axis=-1)
    img = img * rng.uniform(0.6, 1.0, 3) + rng.normal(0, 0.3, 3)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(2, 6)):  # a few objects with soft edges
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(20, height / 2), rng.uniform(20, width / 2)
        inside = 1 / (1 + np.exp(4 * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 - 1)))
        img += inside[..., None] * rng.normal(0, 1.2, 3)
    img = 110 + 45 * img
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(natural_image(rng, *SIZE)).save(path, quality=90)
        paths.append(str(path))
    return paths


def augment(reduced: bool) -> images.Augment:
    return images.Augment(train=True, image_size=224, eval_resize=256, reduced_decode=reduced)


def per_core(paths: list[str], rounds: int) -> dict:
    """Images per CPU second (and per wall second) of load_example in this process."""
    cpu = {False: [], True: []}
    wall = {False: [], True: []}
    for r in range(rounds):
        for reduced in (False, True):
            aug = augment(reduced)
            t0, c0 = time.perf_counter(), time.process_time()
            for i, p in enumerate(paths):
                images.load_example(p, aug, (0, r, i))
            cpu[reduced].append(len(paths) / (time.process_time() - c0))
            wall[reduced].append(len(paths) / (time.perf_counter() - t0))
    out = {}
    for reduced, name in ((False, "full_decode"), (True, "reduced_decode")):
        out[name] = {
            "images_per_cpu_s": float(np.median(cpu[reduced])),
            "images_per_s": float(np.median(wall[reduced])),
        }
    out["speedup_per_core"] = (
        out["reduced_decode"]["images_per_cpu_s"] / out["full_decode"]["images_per_cpu_s"]
    )
    return out


def pipeline(paths: list[str], workers: int, reduced: bool, batch: int, steps: int) -> dict:
    """Images per wall second of the grain pipeline, first batch excluded."""
    labels = np.zeros(len(paths), np.int32)
    elements = images.TrainElements(
        paths, labels, augment(reduced), seed=0, global_batch=batch, process_index=0
    )
    ds = input_pipeline.host_batches(elements, 0, steps * batch, batch, True, workers, 4)
    it = iter(ds)
    first = next(it)
    assert first.image.shape == (batch, 224, 224, 3)
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += len(b.label)
    dt = time.perf_counter() - t0
    it.close()
    return {"images_per_s": n / dt, "images": n}


def environment() -> dict:
    import grain
    import PIL

    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "pillow": PIL.__version__,
        "grain": grain.__version__,
        "numpy": np.__version__,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp) / "jpegs", args.images)
        kb = float(np.mean([os.path.getsize(p) for p in paths]) / 1024)
        load_before = os.getloadavg()
        result = {
            "command": "python -m benchmarks.input " + " ".join(argv or sys.argv[1:]),
            "environment": environment(),
            "images": {"count": len(paths), "size": list(SIZE), "mean_kb": kb},
            "per_core": per_core(paths, args.rounds),
            "pipeline": {},
        }
        steps = len(paths) // args.batch
        for reduced, name in ((False, "full_decode"), (True, "reduced_decode")):
            rows = {}
            for workers in (1, 2):
                rows[f"{workers}_workers"] = pipeline(paths, workers, reduced, args.batch, steps)
            rows["scaling_2_vs_1"] = (
                rows["2_workers"]["images_per_s"] / rows["1_workers"]["images_per_s"]
            )
            result["pipeline"][name] = rows
        result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
