"""Claims about the input pipeline (train/images.py, train/input_pipeline.py) and the loop's
failure modes: reduced JPEG decode, flat validation folders with a labels file, a dead grain
worker and a non-finite loss stopping the run.

Runs that must be killed or must fail are subprocesses (see tests/test_train.py).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import (
    PY,
    REPO,
    TINY,
    evaluate_run,
    make_folder,
    result_of,
    run_python,
    train_args,
    train_env,
)

from train import images, input_pipeline
from train.images import DatasetError


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


def smooth_jpeg(path: Path, width: int, height: int) -> Path:
    """A JPEG of smooth colour gradients and low-frequency waves (little detail to lose)."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack(
        [
            128 + 100 * np.sin(6 * xx + 2 * yy),
            128 + 100 * np.cos(5 * yy - 3 * xx),
            255 * xx * (1 - yy),
        ],
        axis=-1,
    )
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, quality=95)
    return path


# --- reduced JPEG decode ---------------------------------------------------------------------


def test_reduced_decode_takes_the_same_crop_from_a_smaller_decode(tmp_path):
    path = str(smooth_jpeg(tmp_path / "big.jpg", 800, 600))
    for train, size in ((True, 48), (False, 64)):
        full = images.Augment(train=train, image_size=size, eval_resize=72, reduced_decode=False)
        fast = images.Augment(train=train, image_size=size, eval_resize=72)
        for i in range(6):
            a = images.load_example(path, full, (0, 0, i)).astype(np.int32)
            b = images.load_example(path, fast, (0, 0, i)).astype(np.int32)
            assert a.shape == b.shape == (size, size, 3)
            # The same region (same random box and flip): pixels agree to a few levels.
            assert np.abs(a - b).mean() < 3.0, (train, i, np.abs(a - b).mean())
    # With these crops (>= 2x the output side) the decode is reduced, so the pixels differ.
    assert not np.array_equal(a, b)
    # A crop smaller than twice the output side is decoded at full size: identical pixels.
    big = images.Augment(train=False, image_size=400, eval_resize=440)
    exact = images.Augment(train=False, image_size=400, eval_resize=440, reduced_decode=False)
    np.testing.assert_array_equal(
        images.load_example(path, big, (0,)), images.load_example(path, exact, (0,))
    )


def ramp(x, y, width: int, height: int) -> np.ndarray:
    """Colour (..., 3) of a picture that is linear in x and y: bilinear sampling, area averaging
    and libjpeg's DCT scaling all give back exactly its value at the sample centre."""
    u, v = np.broadcast_arrays(x / (width - 1), y / (height - 1))
    return np.stack([16 + 220 * u, 16 + 220 * v, 16 + 110 * (u + v)], axis=-1)


def expected_example(width, height, aug, seed, jpeg: bool) -> tuple[np.ndarray, int, bool]:
    """(output, decode scale a, flip) of `load_example` on the ramp, computed here: the box and
    coin drawn from default_rng(seed) in the order of the code before (box, then coin); a JPEG
    decoded at 1/a (a in 1, 2, 4, 8 the largest leaving the crop >= S across); the box rounded
    to whole decoded pixels; output pixel centres mapped linearly onto the crop, clamped to its
    edge pixels; decoded pixel x covering full-size pixels x*a .. x*a + a - 1."""
    s = aug.image_size
    if aug.train:
        rng = np.random.default_rng(seed)
        box = images.random_resized_crop_box(width, height, rng, aug.crop_area, aug.crop_ratio)
        flip = bool(aug.flip and rng.random() < 0.5)
    else:
        side = s * min(width, height) / aug.eval_resize
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        flip = False
    a = 1
    while jpeg and a < 8 and min(box[2] - box[0], box[3] - box[1]) >= 2 * a * s:
        a *= 2
    left, top, right, bottom = (round(v / a) for v in box)
    centres = np.arange(s) + 0.5
    x = np.clip(left + centres * (right - left) / s - 0.5, left, right - 1)
    y = np.clip(top + centres * (bottom - top) / s - 0.5, top, bottom - 1)
    out = ramp((x[None, :] + 0.5) * a - 0.5, (y[:, None] + 0.5) * a - 0.5, width, height)
    if flip:
        out = out[:, ::-1]
    if aug.channels == 1:  # JPEG's luma, and PIL's "L"
        out = (out @ np.array([0.299, 0.587, 0.114]))[..., None]
    return out, a, flip


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_decode_crop_resize_flip_match_an_independent_computation(tmp_path, suffix, monkeypatch):
    decoded = []  # the shape of each JPEG decode: its DCT scale

    def decode_jpeg(*args, _decode=images.simplejpeg.decode_jpeg, **kwargs):
        decoded.append(_decode(*args, **kwargs).shape[:2])
        return _decode(*args, **kwargs)

    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", decode_jpeg)
    scales, flips = set(), set()
    for width, height, size in ((640, 480, 48), (333, 500, 96), (120, 90, 64)):
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        path = tmp_path / f"ramp{width}{suffix}"
        pixels = np.round(ramp(xx, yy, width, height)).astype(np.uint8)
        Image.fromarray(pixels).save(path, **({"quality": 95} if suffix == ".jpg" else {}))
        for train in (True, False):
            for channels in (3, 1):
                aug = images.Augment(
                    train=train, image_size=size, eval_resize=size + size // 7, channels=channels
                )
                for i in range(6 if train else 1):
                    want, a, flip = expected_example(
                        width, height, aug, (0, 1, i), suffix == ".jpg"
                    )
                    scales.add(a)
                    flips.add(flip)
                    decoded.clear()
                    got = images.load_example(str(path), aug, (0, 1, i))
                    if suffix == ".jpg":
                        assert decoded == [(-(-height // a), -(-width // a))], (decoded, a)
                    else:
                        assert decoded == []
                    assert got.shape == (size, size, channels) and got.dtype == np.uint8
                    err = np.abs(got - want)
                    # PNG: the stored ramp's rounding (0.5) and OpenCV's fixed-point weights.
                    # JPEG at quality 95: plus the fast IDCT and the unsmoothed 4:2:0 chroma.
                    mean_tol, max_tol = (1.5, 6.0) if suffix == ".jpg" else (0.5, 2.0)
                    assert err.mean() < mean_tol and err.max() < max_tol, (
                        (width, train, channels, i),
                        err.mean(),
                        err.max(),
                    )
    # Both coins came up, and the JPEGs were decoded at several DCT scales (PNGs at full size).
    assert flips == {False, True}
    assert scales == ({1, 2, 4, 8} if suffix == ".jpg" else {1})


def test_greyscale_output_from_a_colour_jpeg_with_reduced_decode(tmp_path):
    path = str(smooth_jpeg(tmp_path / "c.jpg", 640, 480))
    full = images.Augment(train=False, image_size=32, eval_resize=36, channels=1)
    fast = images.Augment(
        train=False, image_size=32, eval_resize=36, channels=1, reduced_decode=False
    )
    a, b = images.load_example(path, full, (0,)), images.load_example(path, fast, (0,))
    assert a.shape == b.shape == (32, 32, 1)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3.0


# --- flat validation folders -------------------------------------------------------------------


def flatten_val(root: Path, flat: Path, rng) -> dict[str, str]:
    """Copies root/val/<class>/<image> to flat/val/<new name> in a shuffled order; returns
    {new name: class}. train/ is linked unchanged."""
    (flat / "val").mkdir(parents=True)
    (flat / "train").symlink_to(root / "train")
    items = sorted((root / "val").glob("*/*"))
    names = {}
    for k, src in zip(rng.permutation(len(items)), items, strict=True):
        name = f"ILSVRC2012_val_{k + 1:08d}{src.suffix}"
        (flat / "val" / name).write_bytes(src.read_bytes())
        names[name] = src.parent.name
    return names


def write_devkit_meta(path: Path, wnids_by_id: dict[int, str]) -> None:
    """A meta.mat shaped like the ILSVRC2012 devkit's (a struct array `synsets`)."""
    from scipy.io import savemat

    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((len(wnids_by_id), 1), dtype=dtype)
    for k, (i, wnid) in enumerate(sorted(wnids_by_id.items())):
        synsets[k, 0] = (np.array([[i]]), np.array([wnid]), np.array(["a class"]), 0)
    savemat(str(path), {"synsets": synsets})


def test_a_flat_val_folder_gets_the_labels_of_its_csv_or_ground_truth_file(tmp_path):
    root = make_folder(tmp_path / "d", classes=3, train=2, val=4)
    names = flatten_val(root, tmp_path / "flat", np.random.default_rng(0))
    classes = input_pipeline.read_split(root, "train").classes
    by_folder = input_pipeline.read_split(root, "val", classes)
    expected = {
        Path(p).read_bytes(): int(lab)
        for p, lab in zip(by_folder.paths, by_folder.labels, strict=True)
    }

    def check(split):
        assert len(split) == 12 and split.classes == classes
        got = {
            Path(p).read_bytes(): int(lab) for p, lab in zip(split.paths, split.labels, strict=True)
        }
        assert got == expected

    # name,label CSV with a header, names without extension, rows in any order.
    table = tmp_path / "val.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for name, cls in sorted(names.items(), reverse=True):
            w.writerow([Path(name).stem, f"{cls} 1 2 3 4"])
    check(input_pipeline.read_split(tmp_path / "flat", "val", classes, labels=table))

    # ILSVRC2012 ground truth: one ILSVRC2012_ID per image in name order, meta.mat beside it.
    ids = {"class_0": 7, "class_1": 3, "class_2": 11}
    devkit = tmp_path / "devkit"
    devkit.mkdir()
    write_devkit_meta(devkit / "meta.mat", {i: c for c, i in ids.items()} | {5: "n_other"})
    truth = devkit / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("".join(f"{ids[names[n]]}\n" for n in sorted(names)))
    check(input_pipeline.read_split(tmp_path / "flat", "val", classes, labels=truth))


def test_a_missing_or_inconsistent_val_label_is_a_clear_error(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, train=1, val=2)
    names = flatten_val(root, tmp_path / "flat", np.random.default_rng(1))
    classes = ("class_0", "class_1")
    flat = tmp_path / "flat"

    def read(text, name="v.csv"):
        path = tmp_path / name
        path.write_text(text)
        return input_pipeline.read_split(flat, "val", classes, labels=path)

    rows = [f"{n},{c}" for n, c in sorted(names.items())]
    with pytest.raises(DatasetError, match=r"1 of the 4 images .* have no label"):
        read("\n".join(rows[:-1]))
    with pytest.raises(DatasetError, match=r"line 2: label 'class_9' is not a class folder"):
        read("\n".join([rows[0], rows[1].split(",")[0] + ",class_9"]))
    with pytest.raises(DatasetError, match=r"line 3: no image 'nope.jpg'"):
        read("\n".join([*rows[:2], "nope.jpg,class_0"]))
    with pytest.raises(DatasetError, match="labelled twice"):
        read("\n".join([*rows, rows[0]]))
    with pytest.raises(DatasetError, match="has 3 labels but .* has 4 images"):
        read("1\n2\n1\n", "truth.txt")
    with pytest.raises(DatasetError, match=r"needs the devkit's meta.mat"):
        read("1\n2\n1\n2\n", "truth.txt")
    with pytest.raises(DatasetError, match="does not exist"):
        input_pipeline.read_split(flat, "val", classes, labels=tmp_path / "absent.csv")
    # A flat folder without data.val_labels says what to set.
    with pytest.raises(DatasetError, match="set data.val_labels"):
        input_pipeline.read_split(flat, "val", classes)


# Slow (a training run and two evaluations); the label mapping it rests on is checked image by
# image in the default suite above.
@pytest.mark.slow
def test_a_flat_val_folder_evaluates_to_the_top1_of_the_class_folders(tmp_path, jax_cache):
    root = make_folder(tmp_path / "d", classes=3, train=16, val=6)
    names = flatten_val(root, tmp_path / "flat", np.random.default_rng(2))
    table = tmp_path / "val.csv"
    table.write_text("".join(f"{n},{c}\n" for n, c in names.items()))
    overrides = [
        *TINY,
        f"data.root={root}",
        "optim.num_steps=12",
        "data.workers=0",
        "run.checkpoint_every_steps=12",
    ]
    # Train, then evaluate the checkpoint on both layouts, in one process.
    script = textwrap.dedent("""
        import json, sys
        from train.config import load_config
        from train.evaluate import evaluate_checkpoint
        from train.train import train_and_evaluate
        run, flat, table, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
        train_and_evaluate(load_config("digits_deformed", overrides), run)
        folders = evaluate_checkpoint(run)
        flat = evaluate_checkpoint(run, overrides=[f"data.root={flat}", f"data.val_labels={table}"])
        print("RESULT " + json.dumps([folders, flat]))
    """)
    out = run_python(
        "-c",
        script,
        str(tmp_path / "run"),
        str(tmp_path / "flat"),
        str(table),
        *overrides,
        cache=jax_cache,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    folders, flat = result_of(out)
    assert folders["val_images"] == flat["val_images"] == 18
    # A model that has learned something, so that wrong labels would show.
    assert folders["val_top1"] >= 0.6
    assert flat["val_top1"] == folders["val_top1"]
    assert flat["val_top5"] == folders["val_top5"]
    assert flat["val_loss"] == pytest.approx(folders["val_loss"], rel=1e-5)


# --- failing loudly ----------------------------------------------------------------------------


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append((int(entry.name), cmd))
    return out


def _train_steps(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    steps = [0]
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line).get("step", 0))
            except json.JSONDecodeError:
                pass
    return max(steps)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_a_killed_grain_worker_stops_the_run_with_an_error(tmp_path, jax_cache):
    root = make_folder(tmp_path / "d", classes=3, train=16, val=4)
    args = train_args(
        root,
        tmp_path / "run",
        "data.workers=2",
        "optim.num_steps=5000",
        "run.eval_every_steps=5000",
        "run.checkpoint_every_steps=5000",
    )
    proc = subprocess.Popen(
        [PY, "-m", "train", *args],
        cwd=REPO,
        env=train_env(1, jax_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and _train_steps(tmp_path / "run") < 3:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        workers = [pid for pid, cmd in _children(proc.pid) if "spawn_main" in cmd]
        assert len(workers) == 2, _children(proc.pid)
        os.kill(workers[0], signal.SIGKILL)
        t0 = time.time()
        _, stderr = proc.communicate(timeout=60)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"the run exited {elapsed:.1f} s after its worker was killed")
    assert proc.returncode == 2, stderr[-4000:]
    assert elapsed < 60
    assert "dk-train: error: the input pipeline stopped" in stderr
    assert "terminated unexpectedly with exit code -9" in stderr
    # The other worker went with it.
    time.sleep(1.5)
    assert (
        not Path(f"/proc/{workers[1]}").exists()
        or "Z" in (Path(f"/proc/{workers[1]}/stat").read_text().rsplit(")", 1)[1].split()[0])
    )


NAN_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from train import main, train as tr

    # From step NAN_AT on, the loss (and so every parameter) becomes NaN, as after a blow-up.
    NAN_AT = int(sys.argv[1])
    step_fn = tr.train_step

    def poisoned(state, batch, **kw):
        new, metrics = step_fn(state, batch, **kw)
        bad = jnp.where(state.step + 1 >= NAN_AT, jnp.nan, 1.0)
        metrics["train_loss"] = metrics["train_loss"] * bad
        new = new.replace(params=jax.tree.map(lambda p: p * bad, new.params))
        return new, metrics

    tr.train_step = poisoned
    sys.exit(main.main(sys.argv[2:]))
""")


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, jax_cache):
    root = make_folder(tmp_path / "d", classes=3, train=8, val=2)
    args = train_args(
        root,
        tmp_path / "run",
        "data.workers=0",
        "optim.num_steps=30",
        "run.log_every_steps=4",
        "run.checkpoint_every_steps=5",
        "run.keep_checkpoints=5",
    )
    out = run_python("-c", NAN_SCRIPT, "13", *args, cache=jax_cache)
    assert out.returncode == 2, out.stderr[-4000:]
    assert "dk-train: error: the train loss is nan at step 13" in out.stderr
    assert "the last checkpoint (step 10) is kept" in out.stderr
    assert "Traceback" not in out.stderr
    ckpt = tmp_path / "run" / "checkpoints"
    assert max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == 10
    # Nothing non-finite was logged: the windows of steps 4, 8 and 12, then the stop.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(x) for x in lines if "train_loss" in x]
    assert [e["step"] for e in logged] == [4, 8, 12]
    assert all(np.isfinite(e["train_loss"]) for e in logged)
    # The kept checkpoint is whole and finite: evaluating it works.
    result = evaluate_run(tmp_path / "run", jax_cache)
    assert result["step"] == 10 and np.isfinite(result["val_loss"])
