"""Input pipeline benchmark: images/s of the training input on generated ImageNet-like JPEGs.

    python -m benchmarks.input [--images 256] [--json benchmarks/results/input_cpu.json]

Writes `--images` JPEGs of 500x375 (quality 90) whose content has the 1/f amplitude spectrum
of natural images (colour channels correlated, plus a few smooth-edged shapes), so their file
sizes and decode times are those of photographs (ImageNet's average file is ~110 KB), then
measures, on the train augmentation of the ImageNet configs (random-resized-crop to 224, flip):

1. decode + augment per core, in this process, in interleaved rounds: the previous code
   (`previous_load_example`: PIL's full decode and antialiased resize, numpy flip),
   `images.load_example` (simplejpeg's fast decode, OpenCV's resize and flip) with
   `reduced_decode=False` and with the DCT-scaled decode (the default); images per CPU second
   of this process (wall-clock rate alongside). Every call reads and decodes its JPEG from the
   file. Also on `--large` 1024x768 JPEGs, where the crop is often twice the output side and
   the reduced decode applies. In the same rounds, the floor under any pipeline that decodes
   the whole file: reading it and simplejpeg's fast decode alone, at full size and at 1/8
   (where libjpeg-turbo's entropy decoding is nearly all that is left), no crop or resize.
2. the pipeline: `input_pipeline.host_batches` (grain, one image per worker task, batches of
   `--batch` stacked in this process) with 1 and 2 worker processes, for both decodes; images
   per wall-clock second from the first batch on (worker start-up excluded), and per CPU
   second of this process and its workers together.

The machine's load average is recorded: on a shared machine the 2-worker rate is bounded by the
cores the other processes leave free.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from train import images, input_pipeline

SIZE = (500, 375)
LARGE = (1024, 768)


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
        r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        inside = 0.5 * (1 - np.tanh(2 * (r2 - 1)))  # 1 inside the ellipse, 0 outside
        img += inside[..., None] * rng.normal(0, 1.2, 3)
    img = 110 + 45 * img
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: Path, n: int, seed: int = 0, size=SIZE) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(natural_image(rng, *size)).save(path, quality=90)
        paths.append(str(path))
    return paths


def augment(reduced: bool) -> images.Augment:
    return images.Augment(train=True, image_size=224, eval_resize=256, reduced_decode=reduced)


def previous_load_example(path: str, aug: images.Augment, seed) -> np.ndarray:
    """The decode + augment that train/images.py had before grain: PIL's full-size decode,
    convert, PIL's (antialiased bilinear) resize of the box, flip in numpy."""
    with Image.open(path) as img:
        img.load()
        img = img.convert("RGB")
    width, height = img.size
    rng = np.random.default_rng(seed)
    box = images.random_resized_crop_box(width, height, rng, aug.crop_area, aug.crop_ratio)
    flip = aug.flip and rng.random() < 0.5
    img = img.resize((aug.image_size, aug.image_size), Image.Resampling.BILINEAR, box=box)
    out = np.asarray(img, dtype=np.uint8)
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def decode_only(path: str, factor: int) -> np.ndarray:
    """Reading the file and simplejpeg's fast decode at 1/factor size, nothing else."""
    with open(path, "rb") as f:
        data = f.read()
    return simplejpeg.decode_jpeg(data, fastdct=True, fastupsample=True, min_factor=factor)


PATHS = {
    "previous": (previous_load_example, False),
    "full_decode": (images.load_example, False),
    "reduced_decode": (images.load_example, True),
    "decode_only": (lambda path, aug, seed: decode_only(path, 1), False),
    "decode_only_eighth": (lambda path, aug, seed: decode_only(path, 8), False),
}


def per_core(paths: list[str], rounds: int) -> dict:
    """Images per CPU second (and per wall second) of decode + augment in this process, the
    paths in interleaved rounds so that a busy machine slows them alike; and the ceiling a
    whole-file decode leaves: `decode_only` against `previous`, which no pipeline that decodes
    the whole file with simplejpeg can pass, however cheap its crop and resize."""
    cpu = {name: [] for name in PATHS}
    wall = {name: [] for name in PATHS}
    for r in range(rounds):
        for name, (fn, reduced) in PATHS.items():
            aug = augment(reduced)
            t0, c0 = time.perf_counter(), time.process_time()
            for i, p in enumerate(paths):
                fn(p, aug, (0, r, i))
            cpu[name].append(len(paths) / (time.process_time() - c0))
            wall[name].append(len(paths) / (time.perf_counter() - t0))
    out = {
        name: {
            "images_per_cpu_s": float(np.median(cpu[name])),
            "images_per_s": float(np.median(wall[name])),
        }
        for name in PATHS
    }
    out["speedup_vs_previous"] = (
        out["reduced_decode"]["images_per_cpu_s"] / out["previous"]["images_per_cpu_s"]
    )
    out["ceiling_vs_previous"] = (
        out["decode_only"]["images_per_cpu_s"] / out["previous"]["images_per_cpu_s"]
    )
    out["beyond_decode_ms"] = 1e3 * (
        1 / out["reduced_decode"]["images_per_cpu_s"] - 1 / out["decode_only"]["images_per_cpu_s"]
    )
    return out


def _cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of these processes so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def pipeline(
    paths: list[str], workers: int, reduced: bool, batch: int, steps: int, chunk: int = 0
) -> dict:
    """Images per wall second of the grain pipeline, first batch excluded; images per CPU
    second of this process and its workers together (decode, shared memory, stacking); and
    the CPU milliseconds per image spent in this process (the trainer's share)."""
    labels = np.zeros(len(paths), np.int32)
    elements = images.TrainElements(paths, labels, augment(reduced), seed=0, global_batch=batch)
    # Repeated, so that the workers are still there (and counted) after the last timed batch.
    ds = input_pipeline.host_batches(
        elements, 0, steps * batch, batch, True, workers, 4, repeat=True, chunk=chunk
    )
    it = iter(ds)
    first = next(it)
    assert first.image.shape == (batch, 224, 224, 3)
    pids = [os.getpid()] + [
        p.pid for p in multiprocessing.active_children() if p.name.startswith("grain")
    ]
    t0, c0, m0 = time.perf_counter(), _cpu_seconds(pids), _cpu_seconds(pids[:1])
    n = 0
    for _ in range(steps):
        n += len(next(it).label)
    dt, cpu = time.perf_counter() - t0, _cpu_seconds(pids) - c0
    main_ms = 1e3 * (_cpu_seconds(pids[:1]) - m0) / n
    it.close()
    return {
        "images_per_s": n / dt,
        "images_per_cpu_s": n / cpu,
        "main_cpu_ms_per_image": main_ms,
        "images": n,
    }


def environment() -> dict:
    import cv2
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
        "simplejpeg": simplejpeg.__version__,
        "opencv": cv2.__version__,
        "grain": grain.__version__,
        "numpy": np.__version__,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--large", type=int, default=32, help="1024x768 JPEGs, per core only")
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
        if args.large:
            large = write_images(Path(tmp) / "large", args.large, seed=1, size=LARGE)
            result["large_images"] = {
                "count": len(large),
                "size": list(LARGE),
                "mean_kb": float(np.mean([os.path.getsize(p) for p in large]) / 1024),
            }
            result["per_core_large"] = per_core(large, args.rounds)
        steps = len(paths) // args.batch
        for reduced, name in ((False, "full_decode"), (True, "reduced_decode")):
            rows = {}
            for workers in (1, 2):
                rows[f"{workers}_workers"] = pipeline(paths, workers, reduced, args.batch, steps)
            rows["scaling_2_vs_1"] = (
                rows["2_workers"]["images_per_s"] / rows["1_workers"]["images_per_s"]
            )
            result["pipeline"][name] = rows
        # One image per worker task instead of a chunk: what the chunks save the trainer.
        result["pipeline_one_image_per_task"] = pipeline(paths, 1, True, args.batch, steps, chunk=1)
        result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
