"""Claims about the training program (train/): configs, the data pipeline and its errors,
the embedded dataset, data-parallel steps without activation all-gathers, exact resume after
SIGKILL, and the ImageNet models with every conv choice.

Runs that need several devices or must be killed are subprocesses: the device count is fixed
when JAX starts, and a SIGKILL must not take pytest with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import images, input_pipeline
from train.config import Config, ConfigError, apply_overrides, load_config

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def make_folder(
    root: Path, *, classes: int = 3, train: int = 16, val: int = 4, size: int = 20, seed: int = 0
) -> Path:
    """A tiny ImageNet-layout folder whose classes are easy to tell apart (stripes of three
    orientations plus noise); train images are PNG, val images JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    patterns = [np.sin(yy * 1.3), np.sin(xx * 1.3), np.sin((xx + yy) * 0.9)]
    for split, n, suffix in (("train", train, ".png"), ("val", val, ".jpg")):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = 128 + 90 * patterns[c % 3] + rng.normal(0, 25, (size, size))
                rgb = np.repeat(np.clip(img, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
                Image.fromarray(rgb).save(folder / f"{i:03d}{suffix}")
    return root


# Turns the digits config into a seconds-long run on `make_folder` data.
TINY = [
    "data.generate=''",
    "data.image_size=16",
    "data.eval_resize=18",
    "data.crop_area=(0.5,1.0)",
    "data.workers=1",
    "model.width=8",
    "model.stem_stride=1",
    "model.stage_sizes=(1,1,1)",
    "optim.batch_size=8",
    "optim.learning_rate=3.2",  # per 256 images: 0.1 at batch 8
    "optim.warmup_epochs=0.5",
    "optim.label_smoothing=0.0",
    "run.progress=False",
    "run.log_every_steps=1",
]


def train_args(root: Path, workdir: Path, *extra: str) -> list[str]:
    """The command line of `python -m train` (after `-m train`): the digits_deformed recipe made
    `TINY`, reading `root`, writing `workdir`, with `extra` overrides last."""
    args = ["--config", "digits_deformed", "--workdir", str(workdir)]
    for item in [f"data.root={root}", *TINY, *extra]:
        args += ["--set", item]
    return args


def run_train(root: Path, workdir: Path, *extra: str, env: dict | None = None, **kw):
    return subprocess.run(
        [PY, "-m", "train", *train_args(root, workdir, *extra)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        **kw,
    )


def train_env(devices: int = 1, cache: Path | None = None) -> dict:
    """The environment of a training subprocess: CPU with `devices` devices, and a persistent
    compilation cache shared by this test session's runs (they compile the same programs)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def run_python(*args: str, devices: int = 1, cache: Path | None = None):
    """`python *args` from the repository root in `train_env(devices, cache)`, output captured,
    ten minutes at most."""
    return subprocess.run(
        [PY, *args],
        cwd=REPO,
        env=train_env(devices, cache),
        capture_output=True,
        text=True,
        timeout=600,
    )


def result_of(out) -> object:
    """The JSON a subprocess printed after "RESULT "."""
    return json.loads(out.stdout.split("RESULT ", 1)[1])


def evaluate_run(run_dir: Path, cache: Path | None = None) -> dict:
    """`python -m train.evaluate` of a run's latest checkpoint, in a subprocess: its JSON line."""
    out = run_python("-m", "train.evaluate", "--checkpoint", str(run_dir), cache=cache)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


# --- configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits_deformed", "imagenet_resnet50dw", "imagenet_mobilenetv2"])
def test_bundled_configs_load_by_name_and_by_path(name):
    by_name = load_config(name)
    by_path = load_config(str(REPO / "train" / "configs" / f"{name}.py"))
    assert by_name == by_path
    assert by_name.name == name


def test_overrides_are_parsed_and_type_checked():
    config = load_config(
        "digits_deformed",
        [
            "optim.learning_rate=1",
            "model.conv=dcn",
            "model.adaptive_stages=[1, 2]",
            "model.implementation=xla",
        ],
    )
    assert config.optim.learning_rate == 1.0 and isinstance(config.optim.learning_rate, float)
    assert config.model.conv == "dcn"
    assert config.model.adaptive_stages == (1, 2)
    assert config.model.implementation == "xla"
    with pytest.raises(ConfigError, match="optim.batch_size.*expects an int "):
        apply_overrides(config, ["optim.batch_size=big"])


def test_an_unknown_config_key_is_an_error_that_suggests_the_right_one():
    config = load_config("digits_deformed")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.cnov'.*'model.conv'"):
        apply_overrides(config, ["model.cnov=dcn"])
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        apply_overrides(config, ["modle.conv=dcn"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.lr'"):
        config.optim.lr = 0.1
    assert Config(a=Config(b=1)).a.b == 1


def test_data_generate_names_only_the_embedded_dataset():
    from train import train as tr

    config = load_config("digits_deformed")
    assert config.data.generate == "digits_deformed"
    tr.check_config(config)
    assert not any(key.startswith("digits") for key in config.data)  # no generator keys
    config.data.generate = "digits_scaled"
    with pytest.raises(ConfigError, match="data.generate must be '' or 'digits_deformed'"):
        tr.check_config(config)


def test_the_command_line_reports_an_unknown_key_and_exits_2():
    out = subprocess.run(
        [PY, "-m", "train", "--config", "digits_deformed", "--set", "optim.learnig_rate=0.1"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "unknown config key 'optim.learnig_rate'" in out.stderr
    assert "did you mean 'optim.learning_rate'" in out.stderr
    assert "Traceback" not in out.stderr


# --- the dataset folder and its errors ------------------------------------------------------


def test_read_split_lists_classes_in_sorted_order(tmp_path):
    root = make_folder(tmp_path / "d", classes=3, train=4, val=2)
    train = input_pipeline.read_split(root, "train")
    val = input_pipeline.read_split(root, "val", train.classes)
    assert train.classes == ("class_0", "class_1", "class_2")
    assert len(train) == 12 and len(val) == 6
    assert list(np.bincount(train.labels)) == [4, 4, 4]
    assert all(p.endswith(".jpg") for p in val.paths)


def test_a_missing_dataset_folder_is_named_in_the_error(tmp_path):
    with pytest.raises(images.DatasetError, match=r"dataset folder '.*nowhere' does not exist"):
        input_pipeline.read_split(tmp_path / "nowhere", "train")
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    with pytest.raises(images.DatasetError, match="has no 'val' folder"):
        input_pipeline.read_split(tmp_path / "d", "val")


def test_an_empty_class_folder_is_named_in_the_error(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, train=2, val=1)
    (root / "train" / "class_9").mkdir()
    with pytest.raises(images.DatasetError, match=r"class folder '.*train/class_9' has no images"):
        input_pipeline.read_split(root, "train")


def test_a_corrupt_jpeg_is_fatal_with_its_path_or_skipped_by_config(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, train=2, val=2)
    bad = root / "val" / "class_1" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated JPEG
    val = input_pipeline.read_split(root, "val")
    fatal = images.Augment(train=False, image_size=8, eval_resize=8)
    with pytest.raises(images.CorruptImageError, match=f"cannot read image '{bad}'"):
        input_pipeline.eval_batch(val, fatal, 0, 4)
    skip = images.Augment(train=False, image_size=8, eval_resize=8, skip_corrupt=True)
    batch = input_pipeline.eval_batch(val, skip, 0, 4)
    assert [val.paths[i] for i in batch.skipped] == [str(bad)]
    assert list(batch.mask) == [1, 1, 1, 0]  # skipped images do not count in evaluation
    # In training the skipped image is replaced by another image of the same batch.
    train = images.Augment(train=True, image_size=8, eval_resize=8, skip_corrupt=True)
    elements = images.EvalElements(val.paths, val.labels, train, global_batch=4)
    batch = images.collate([images.Chunk(elements, 4)(0)], train=True)
    assert batch.mask.all() and (batch.image[3] == batch.image[0]).all()
    assert batch.label[3] == batch.label[0]


def test_a_bad_run_folder_fails_the_command_with_a_clear_message(tmp_path):
    out = run_train(tmp_path / "absent", tmp_path / "run", env=train_env())
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"dataset folder '{tmp_path / 'absent'}' does not exist" in out.stderr
    assert "Traceback" not in out.stderr


# --- data order and augmentation ------------------------------------------------------------


def test_the_data_order_is_a_pure_function_of_seed_and_epoch(tmp_path):
    root = make_folder(tmp_path / "d", classes=3, train=8, val=1)
    split = input_pipeline.read_split(root, "train")
    aug = images.Augment(train=True, image_size=8, eval_resize=8)

    def step(s, seed=1, process_index=0, process_count=1):
        """(epoch, split index) of each element of step s on one process."""
        el = input_pipeline.train_elements(split, aug, seed, 4, process_index, process_count)
        b = el.local_batch
        return [el.sample(j) for j in range(s * b, (s + 1) * b)]

    # Step 7 with 6 steps per epoch is batch 1 of epoch 1, whatever came before.
    order = input_pipeline.epoch_order(1, 1, len(split))
    assert step(7) == [(1, int(i)) for i in order[4:8]]
    assert step(7) != step(7, seed=2)
    # Every epoch visits each image at most once, in a new order.
    epoch0 = sum((step(s) for s in range(6)), [])
    epoch1 = sum((step(s) for s in range(6, 12)), [])
    assert len({i for _, i in epoch0}) == 24
    assert [i for _, i in epoch0] != [i for _, i in epoch1]
    # Two processes each get their half of the global batch.
    assert step(7, 1, 0, 2) + step(7, 1, 1, 2) == step(7)
    # Sample i of epoch e is augmented with seed (seed, e, i): the same pixels at every step
    # that shows it, through the grain pipeline as through a direct call.
    e, i = step(7)[2]
    batch = input_pipeline.train_batch(split, aug, 1, 7, 4)
    np.testing.assert_array_equal(
        batch.image[2], images.load_example(split.paths[i], aug, (1, e, i))
    )


def test_batches_do_not_depend_on_the_number_of_grain_workers(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, train=6, val=1)
    split = input_pipeline.read_split(root, "train")
    aug = images.Augment(train=True, image_size=12, eval_resize=12, crop_area=(0.3, 1.0))
    expected = [input_pipeline.train_batch(split, aug, 3, s, 4) for s in range(2, 7)]
    elements = input_pipeline.train_elements(split, aug, 3, 4)
    for workers in (0, 2):
        # Steps 2..6, as a run resumed at step 2 reads them (an epoch boundary at step 3).
        it = iter(input_pipeline.host_batches(elements, 8, 28, 4, True, workers, 2))
        got = list(it)
        it.close()
        assert len(got) == len(expected)
        for x, y in zip(expected, got, strict=True):
            assert y.image.shape == (4, 12, 12, 3) and y.image.dtype == np.uint8
            np.testing.assert_array_equal(x.image, y.image)
            np.testing.assert_array_equal(x.label, y.label)
    assert not np.array_equal(expected[0].image, expected[1].image)


def test_eval_batches_cover_every_image_once_with_padding(tmp_path):
    root = make_folder(tmp_path / "d", classes=3, train=1, val=3)
    split = input_pipeline.read_split(root, "val", ("class_0", "class_1", "class_2"))
    aug = images.Augment(train=False, image_size=8, eval_resize=10)
    assert input_pipeline.num_eval_batches(split, 4) == 3
    batches = [input_pipeline.eval_batch(split, aug, t, 4) for t in range(3)]
    mask = np.concatenate([b.mask for b in batches])
    assert list(mask) == [1.0] * 9 + [0.0] * 3
    assert list(np.concatenate([b.label for b in batches])[:9]) == list(split.labels)
    # Two processes: each takes its half of every global batch.
    halves = [input_pipeline.eval_batch(split, aug, 1, 4, p, 2) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h.image for h in halves]), batches[1].image)


# --- the embedded dataset -------------------------------------------------------------------


def test_digits_deformed_is_written_deterministically_in_the_imagenet_layout(tmp_path):
    from train import digits

    a = digits.generate(tmp_path / "a", seed=5, train_copies=2, val_copies=1, limit=60)
    b = digits.generate(tmp_path / "b", seed=5, train_copies=2, val_copies=1, limit=60)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    manifest = json.loads((a / "dataset.json").read_text())
    assert manifest["images"] == {"train": 96, "val": 12}
    train = input_pipeline.read_split(a, "train")
    assert train.classes == tuple(str(d) for d in range(10))
    with Image.open(train.paths[0]) as img:
        assert img.size == (32, 32) and img.mode == "L"
    # Written once: a second call with the same arguments keeps the files.
    assert digits.generate(tmp_path / "a", seed=5, train_copies=2, val_copies=1, limit=60) == a
    with pytest.raises(images.DatasetError, match="exists but is not"):
        digits.generate(tmp_path / "a", seed=6, train_copies=2, val_copies=1, limit=60)


# --- what a run writes ------------------------------------------------------------------------


def test_metrics_log_drops_redone_steps_on_resume_and_mirrors_to_tensorboard(tmp_path, monkeypatch):
    import types

    from train import report

    written = []

    class SummaryWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, key, value, step):
            written.append((key, value, step))

        def close(self):
            pass

    monkeypatch.setitem(
        sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=SummaryWriter)
    )
    log = report.MetricsLog(tmp_path, tensorboard=True)
    for step in range(1, 6):
        log.write({"step": step, "train_loss": 1.0 / step, "train_top1": step / 5})
    log.close()
    assert ("train_loss", 0.2, 5) in written and ("train_top1", 1.0, 5) in written
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "train_lo')  # a line cut short by a kill
    resumed = report.MetricsLog(tmp_path, resume_step=3)
    resumed.write({"step": 4, "train_loss": 0.5, "train_top1": 0.9})
    assert [e["step"] for e in report.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    report.plot_curves(report.read_metrics(tmp_path / "metrics.jsonl"), tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as img:
        assert img.size[0] > 500


# --- data parallel: 4 CPU devices -----------------------------------------------------------

DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from train import input_pipeline, models, train as tr
    from train.config import load_config
    from train.images import Augment

    root, workdir, overrides = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    config = load_config("digits_deformed", overrides)
    summary = tr.train_and_evaluate(config, workdir)
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    losses = [e["train_loss"] for e in events if "train_loss" in e]

    # One step from the same state and batch on 4 devices and on 1.
    split = input_pipeline.read_split(root, "train")
    aug = Augment(train=True, image_size=config.data.image_size, eval_resize=16, channels=1)
    host_batch = input_pipeline.train_batch(split, aug, 0, 0, 16)
    results = {}
    mesh1 = tr.create_mesh(jax.devices()[:1])
    lr = tr.create_learning_rate_fn(config.optim, 3, 20)
    tx = tr.create_optimizer(config.optim, lr)
    model = models.create_model(config.model, 3)
    # On the host, so that neither run's donated buffers alias the other's.
    state0 = jax.device_get(
        tr.create_train_state(jax.random.PRNGKey(0), model, (16, 16, 1), tx, mesh1))
    for n in (4, 1):
        mesh = tr.create_mesh(jax.devices()[:n])
        state = jax.device_put(state0, NamedSharding(mesh, P()))
        batch = input_pipeline.to_global(host_batch, NamedSharding(mesh, P("data")))
        p_train, _ = tr.compile_steps(mesh, lr, config)
        compiled = p_train.lower(state, batch).compile()
        if n == 4:
            hlo = compiled.as_text()
        state, _ = compiled(state, batch)
        results[n] = jax.device_get(state.params)
    diff = max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(results[4]), jax.tree.leaves(results[1])))
    # (result shape, operands, target) of every dk_jax custom call.
    call = r"= (\\w+\\[[\\d,]*\\])\\S* custom-call\\((.*?)\\), "
    calls = re.findall(call + r"custom_call_target=\\"(dk_\\w+)\\"", hlo)
    print("RESULT " + json.dumps({
        "devices": jax.device_count(), "losses": losses, "summary": summary,
        "all_gathers": hlo.count("all-gather"), "all_reduces": hlo.count("all-reduce("),
        "custom_calls": calls, "max_param_diff_4_vs_1": diff,
    }))
""")


def test_data_parallel_on_4_devices_learns_and_never_gathers_activations(tmp_path, jax_cache):
    root = make_folder(tmp_path / "d", classes=3, train=16, val=4)
    overrides = [
        *TINY,
        f"data.root={root}",
        "optim.num_steps=20",
        "optim.batch_size=16",
        "optim.learning_rate=0.8",  # 0.05 at batch 16
        "run.checkpoint_every_steps=100",
    ]
    out = run_python(
        "-c",
        DATA_PARALLEL_SCRIPT,
        str(root),
        str(tmp_path / "run"),
        json.dumps(overrides),
        devices=4,
        cache=jax_cache,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = result_of(out)
    assert result["devices"] == 4
    losses = result["losses"]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    assert result["summary"]["steps"] == 20 and result["summary"]["devices"] == 4
    # The custom calls run on each device's shard: 16 images / 4 devices = 4 per call, and
    # nothing is all-gathered (params are replicated, gradients are all-reduced).
    calls = result["custom_calls"]
    assert calls, "no dk_jax custom call in the compiled train step"
    assert {target for _, _, target in calls} >= {
        f"dk_sample_{mode}_v2" for mode in ("forward", "grad_image", "grad_weight", "grad_rotation")
    }
    for shape, _, target in calls:
        if target != "dk_sample_grad_weight_v2":
            assert shape.split("[")[1].startswith("4,"), (shape, target)
    assert result["all_gathers"] == 0
    assert result["all_reduces"] > 0
    # Same step on 1 device: the same update up to float summation order.
    assert result["max_param_diff_4_vs_1"] < 1e-4


# --- exact resume after SIGKILL -------------------------------------------------------------


def _train_events(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [e for e in out if "train_loss" in e]


def test_a_run_killed_mid_way_resumes_to_bitwise_the_same_parameters(tmp_path, jax_cache):
    root = make_folder(tmp_path / "d", classes=3, train=16, val=4, size=32)
    extra = [
        "data.workers=2",  # grain worker processes, killed with the run
        "optim.num_steps=60",
        "optim.batch_size=16",
        "data.image_size=28",
        "data.eval_resize=30",
        "run.checkpoint_every_steps=10",
        "run.eval_every_steps=25",
        "run.keep_checkpoints=2",
    ]
    env = train_env(2, jax_cache)
    whole = run_train(root, tmp_path / "whole", *extra, env=env, timeout=600)
    assert whole.returncode == 0, whole.stderr[-4000:]

    killed = tmp_path / "killed"
    args = [
        PY,
        "-m",
        "train",
        "--config",
        "digits_deformed",
        "--workdir",
        str(killed),
        "--set",
        f"data.root={root}",
    ]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            events = _train_events(killed)
            if events and events[-1]["step"] >= 23:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 60

    resumed = run_train(root, killed, *extra, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert b["resumed_from"] == steps[-1] and b["steps"] == a["steps"] == 60
    assert b["params_sha256"] == a["params_sha256"]
    assert (b["val_top1"], b["val_loss"]) == (a["val_top1"], a["val_loss"])
    # The log is that of one run: each step once, in order.
    logged = [e["step"] for e in _train_events(killed)]
    assert logged == list(range(1, 61))
    for name in ("curves.png", "config.json"):
        assert (killed / name).is_file()


def test_a_bfloat16_run_is_evaluated_from_its_run_directory(tmp_path, jax_cache):
    root = make_folder(tmp_path / "d", classes=3, train=8, val=3)
    run = run_train(
        root,
        tmp_path / "run",
        "optim.num_steps=3",
        "model.dtype=bfloat16",
        env=train_env(1, jax_cache),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = evaluate_run(tmp_path / "run", jax_cache)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result["step"] == 3 and result["val_images"] == 9
    assert result["val_top1"] == pytest.approx(summary["val_top1"])
    assert 0.0 <= result["val_top1"] <= result["val_top5"] <= 1.0


# --- the ImageNet models ----------------------------------------------------------------------

# Plain depthwise models at 1000 classes. ResNet-50-DW: ResNet-50 (25,557,032) less its 3x3
# convs (11,317,248) plus their depthwise versions (33,984); MobileNet-V2: as torchvision.
PARAMS = {"resnet50dw": 14_273_768, "mobilenetv2": 3_504_872}


@pytest.mark.parametrize("arch", ["resnet50dw", "mobilenetv2"])
def test_the_imagenet_models_have_the_expected_size(arch):
    from train import models

    config = load_config(f"imagenet_{arch}")
    counts = {}
    for kind in models.CONVS:
        config.model.conv = kind
        counts[kind] = models.count_parameters(models.create_model(config.model, 1000))
    assert counts["depthwise"] == PARAMS[arch]
    # Every adaptive choice adds its offset / routing parameters and nothing else changes.
    assert all(counts[k] > counts["depthwise"] for k in models.CONVS if k != "depthwise")


@pytest.mark.slow
@pytest.mark.parametrize(
    "conv", ["depthwise", "dcn", "global_dk", "local_dk", "dk_dcn", "condconv"]
)
@pytest.mark.parametrize("arch", ["resnet50dw", "mobilenetv2"])
def test_imagenet_models_take_one_train_step_at_224_with_every_conv(arch, conv):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from train import models
    from train import train as tr

    config = load_config(
        f"imagenet_{arch}", [f"model.conv={conv}", "optim.batch_size=2", "optim.warmup_epochs=0.0"]
    )
    mesh = tr.create_mesh(jax.devices()[:1])
    model = models.create_model(config.model, 1000)
    lr = tr.create_learning_rate_fn(config.optim, 10, 100)
    tx = tr.create_optimizer(config.optim, lr)
    state = tr.create_train_state(jax.random.PRNGKey(0), model, (224, 224, 3), tx, mesh)
    before = jax.device_get(state.params)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8),
        "label": np.array([3, 999], np.int32),
        "mask": np.ones(2, np.float32),
    }
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    p_train, _ = tr.compile_steps(mesh, lr, config)
    state, metrics = p_train(state, batch)
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["train_loss"])
    assert int(state.step) == 1
    after = jax.device_get(state.params)
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(after))
    # The classifier moves on the first step (blocks start as identities: zero last BN scale).
    assert not np.array_equal(before["head"]["kernel"], after["head"]["kernel"])
    jax.clear_caches()
