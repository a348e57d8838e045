"""Model benchmarks: train-step time and images/s of each network for every `conv` choice.

Each conv is compared with the rigid depthwise baseline of the same network.

    python -m benchmarks.models                  # small ResNet and ResNet-50-DW, every conv
    python -m benchmarks.models --models small_resnet resnet50dw mobilenetv2  # + MobileNet-V2
    python -m benchmarks.models --quick          # a smoke run: QUICK below, 1 warm-up, 3 rounds
    python -m benchmarks.models --models small_resnet --convs depthwise global_dk
    python -m benchmarks.models --json out.json  # where to write the results

The model, optimiser, train state and jitted step are those of `train/train.py`
(`create_model`, `create_optimizer`, `create_train_state`, `compile_steps`) on a one-device
mesh, fed a fixed synthetic uint8 batch already on the device, so the time is the step alone
(no input pipeline). Models and batches:

    small ResNet   the digits_deformed config (32x32x1, batch 128, adaptive stages 0, 1, 2)
    ResNet-50-DW   the imagenet_resnet50dw config (adaptive stages 2, 3), 1000 classes:
                   64x64 batch 8 on CPU, 224x224 batch 64 on GPU
    MobileNet-V2   the imagenet_mobilenetv2 config (adaptive groups 3-6), same inputs as above;
                   only when named in --models (it adds about 7 minutes on a 2-core CPU)

Every conv of one model is compiled first (compile time = lower + compile of the step, not
counting the jitted init of the train state); the steps are then timed in interleaved rounds
(one step of each conv per round) after warm-up, so a slow-down of a shared machine hits every
conv alike and the ratios to depthwise stay meaningful. A conv whose timed steps already add up
to `--budget-s` leaves the rounds once it has 3 of them. Times are medians over rounds,
milliseconds, with `jax.block_until_ready`.

The depthwise baseline is what training uses: `nn.Conv(feature_group_count=C)`, i.e. XLA's
grouped convolution, which is slow on CPU (see benchmarks.ops); the rigid stages of every
model use it too. global_dk and condconv convolve each sample with its own kernel (a vmapped
grouped convolution, N*C groups), which XLA's CPU backend runs slower still.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, replace

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dk_jax
from benchmarks.ops import environment
from train import models
from train import train as trainer
from train.config import load_config

BASELINE = "depthwise"
DEFAULT_MODELS = ("small_resnet", "resnet50dw")
# --quick: the DK convs against the baseline on the small ResNet (global_dk and condconv, the
# two per-sample grouped convolutions, take seconds a step there on CPU), and local DK in
# ResNet-50-DW.
QUICK = {
    "small ResNet": (BASELINE, "dcn", "local_dk", "dk_dcn"),
    "ResNet-50-DW": (BASELINE, "local_dk"),
}


@dataclass(frozen=True)
class ModelCase:
    name: str
    arch: str  # model.arch, the --models key
    config: str  # a bundled config of train/configs
    image_size: int
    batch: int
    num_classes: int
    convs: tuple[str, ...] = models.CONVS


def model_cases(
    gpu: bool,
    quick: bool,
    size: int | None = None,
    batch: int | None = None,
    names: list[str] | None = None,
    convs: list[str] | None = None,
) -> list[ModelCase]:
    big_size = size or (224 if gpu else 64)
    big_batch = batch or (64 if gpu else 8)
    cases = [
        ModelCase("small ResNet", "small_resnet", "digits_deformed", 32, 128, 10),
        ModelCase("ResNet-50-DW", "resnet50dw", "imagenet_resnet50dw", big_size, big_batch, 1000),
        ModelCase("MobileNet-V2", "mobilenetv2", "imagenet_mobilenetv2", big_size, big_batch, 1000),
    ]
    cases = [c for c in cases if c.arch in (names or DEFAULT_MODELS)]
    if quick:
        cases = [replace(c, convs=QUICK.get(c.name, (BASELINE, "local_dk"))) for c in cases]
    if convs:
        cases = [replace(c, convs=tuple(convs)) for c in cases]
    return cases


def build_step(case: ModelCase, conv: str, implementation: str | None, mesh):
    """(compiled step, initial state, batch, parameter count, compile seconds, temp MB), made
    the way train.train.train_and_evaluate makes them."""
    overrides = [
        f"model.conv={conv!r}",
        f"optim.batch_size={case.batch}",
        f"data.image_size={case.image_size}",
    ]
    config = load_config(case.config, overrides)
    config.model.implementation = implementation
    trainer.check_config(config)
    data = config.data
    model = models.create_model(config.model, case.num_classes)
    # The schedule's shape does not change the step's cost; any warmup + cosine will do.
    learning_rate_fn = trainer.create_learning_rate_fn(config.optim, 100, 10_000)
    tx = trainer.create_optimizer(config.optim, learning_rate_fn)
    image_shape = (data.image_size, data.image_size, data.channels)
    state = trainer.create_train_state(
        jax.random.PRNGKey(config.seed), model, image_shape, tx, mesh
    )
    n_params = trainer.count_params(state.params)
    p_train, _ = trainer.compile_steps(mesh, learning_rate_fn, config)

    rng = np.random.default_rng(0)
    split = NamedSharding(mesh, P(trainer.AXIS))
    batch = {
        "image": rng.integers(0, 256, (case.batch, *image_shape), dtype=np.uint8),
        "label": rng.integers(0, case.num_classes, (case.batch,), dtype=np.int32),
        "mask": np.ones((case.batch,), np.float32),
    }
    batch = {k: jax.device_put(v, split) for k, v in batch.items()}

    start = time.perf_counter()
    compiled = p_train.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    try:
        temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001 - some backends do not report it
        temp_mb = float("nan")
    return compiled, state, batch, n_params, compile_s, temp_mb


def run_case(case: ModelCase, repeats: int, warmup: int, budget_s: float, implementation, mesh):
    print(
        f"== {case.name}: {case.config}, {case.image_size}x{case.image_size}, batch {case.batch}",
        flush=True,
    )
    built = {}
    for conv in case.convs:
        compiled, state, batch, n_params, compile_s, temp_mb = build_step(
            case, conv, implementation, mesh
        )
        # Warm-up: the first calls also fault in the buffers; the state is donated each step.
        start = time.perf_counter()
        metrics = None
        for _ in range(warmup):
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
        warm_ms = (time.perf_counter() - start) / max(warmup, 1) * 1e3
        loss = float(metrics["train_loss"]) if metrics is not None else float("nan")
        built[conv] = dict(
            step=compiled,
            state=state,
            batch=batch,
            params=n_params,
            compile_s=compile_s,
            temp_mb=temp_mb,
            loss=loss,
            times=[],
        )
        print(
            f"   {conv:10s} compiled in {compile_s:5.1f} s, warm-up {warm_ms:8.1f} ms/step, "
            f"{n_params:,} params, temp {temp_mb:.0f} MB, loss {loss:.3f}",
            flush=True,
        )
    # Interleaved rounds: one step of every conv per round, until each has `repeats` steps or
    # (with at least 3) has spent `budget_s` in timed steps.
    for _ in range(repeats):
        for b in built.values():
            if len(b["times"]) >= 3 and sum(b["times"]) >= budget_s * 1e3:
                continue
            start = time.perf_counter()
            b["state"], metrics = b["step"](b["state"], b["batch"])
            jax.block_until_ready((b["state"], metrics))
            b["times"].append((time.perf_counter() - start) * 1e3)
    rows = {}
    base = built.get(BASELINE)
    base_ms = statistics.median(base["times"]) if base else float("nan")
    for conv, b in built.items():
        ms = statistics.median(b["times"])
        rows[conv] = dict(
            ms_per_step=ms,
            ms_min=min(b["times"]),
            ms_max=max(b["times"]),
            steps_timed=len(b["times"]),
            images_per_s=case.batch / ms * 1e3,
            params=b["params"],
            params_vs_depthwise=b["params"] / base["params"] if base else float("nan"),
            time_vs_depthwise=ms / base_ms,
            compile_s=b["compile_s"],
            temp_mb=b["temp_mb"],
            warmup_loss=b["loss"],
        )
        print(
            f"   {conv:10s} {ms:9.1f} ms/step ({len(b['times'])} steps)  "
            f"{rows[conv]['images_per_s']:8.1f} img/s  "
            f"x{rows[conv]['time_vs_depthwise']:.2f} vs depthwise",
            flush=True,
        )
    built.clear()
    return rows


def _ratio(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}x"


def markdown(results) -> str:
    lines = [
        "| model | input | conv | params | compile (s) | step temp (MB) | ms/step | images/s "
        "| time vs depthwise |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in results["models"].items():
        c = entry["case"]
        shape = f"{c['batch']}x{c['image_size']}x{c['image_size']}"
        for conv, r in entry["rows"].items():
            lines.append(
                f"| {name} | {shape} | {conv} | {r['params'] / 1e6:.3f}M | {r['compile_s']:.1f} "
                f"| {r['temp_mb']:.0f} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} "
                f"| {_ratio(r['time_vs_depthwise'])} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small ResNet and ResNet-50-DW with the convs in QUICK; 1 warm-up, 3 rounds",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (10; quick: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (2; quick: 1)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=20.0,
        help="a conv leaves the rounds once its timed steps add up to this (and it has 3)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=models.ARCHS,
        default=None,
        help=f"which networks (default: {' '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--convs", nargs="+", choices=models.CONVS, default=None)
    parser.add_argument(
        "--image-size", type=int, default=None, help="ResNet-50-DW / MobileNet-V2 input side"
    )
    parser.add_argument("--batch", type=int, default=None, help="ResNet-50-DW / MobileNet-V2")
    parser.add_argument(
        "--implementation",
        choices=("ffi", "xla"),
        default=None,
        help="dk_jax implementation (default: ffi where built, as in training)",
    )
    parser.add_argument("--json", default=f"benchmarks/results/models_{jax.default_backend()}.json")
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    gpu = backend == "gpu"
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    mesh = trainer.create_mesh(jax.devices()[:1])
    implementation = args.implementation or (
        "ffi" if dk_jax.ffi_available(backend) else "xla (ffi not built)"
    )
    env = environment()
    env.update(backend=backend, dk_jax_implementation=implementation)
    results = dict(
        environment=env,
        settings=dict(
            repeats=repeats, warmup=warmup, budget_s=args.budget_s, quick=args.quick, devices=1
        ),
        models={},
    )
    t0 = time.perf_counter()
    cases = model_cases(gpu, args.quick, args.image_size, args.batch, args.models, args.convs)
    for case in cases:
        rows = run_case(case, repeats, warmup, args.budget_s, args.implementation, mesh)
        results["models"][case.name] = dict(case=case.__dict__, rows=rows)
    results["wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print()
    print(
        f"{backend}, 1 device, float32, dk_jax {implementation}, median of up to {repeats} "
        f"interleaved steps after {warmup} warm-up; {results['wall_s']:.0f} s in all"
    )
    print()
    print(markdown(results))
    print()
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
