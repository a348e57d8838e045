"""Evaluates a checkpoint on the val split of its run's dataset.

    python -m train.evaluate --checkpoint runs/digits_deformed [--step N] [--set data.root=...]

`--checkpoint` is a run directory (with config.json and checkpoints/) or its checkpoints/
folder; the latest step is used unless --step is given. Prints (and with --output writes) a
JSON object with val_loss, val_top1 and val_top5 (fractions) and the step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from train.config import Config, ConfigError, apply_overrides, load_config
from train.images import DatasetError


def run_dir_of(path: str | Path) -> Path:
    path = Path(path)
    if path.name == "checkpoints" or (path.parent.name == "checkpoints" and path.name.isdigit()):
        path = path.parent if path.name == "checkpoints" else path.parent.parent
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a run directory (no config.json)")
    return path


def default_config() -> dict:
    return load_config("default").to_dict()


def _with_defaults(saved: dict, defaults: dict) -> dict:
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def evaluate_checkpoint(checkpoint: str | Path, step: int | None = None, overrides=()) -> dict:
    import jax

    from train import input_pipeline, models
    from train import train as tr
    from train.checkpoints import Checkpoints

    run_dir = run_dir_of(checkpoint)
    # Keys added since the run was written take their defaults.
    saved = _with_defaults(json.loads((run_dir / "config.json").read_text()), default_config())
    config = apply_overrides(Config(**saved), overrides)
    config.data.generate = ""  # evaluate what is there; never write a dataset here
    mesh = tr.create_mesh()
    train_split, val_split = tr.prepare_data(config)
    num_classes = tr.num_classes_of(config, train_split.classes)
    model = models.create_model(config.model, num_classes)
    # The optimiser's shape is needed to read the checkpoint; its schedule is not.
    tx = tr.create_optimizer(config.optim, lambda step: 0.0)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    abstract = tr.create_train_state(
        jax.random.PRNGKey(0), model, image_shape, tx, mesh, abstract=True
    )
    checkpoints = Checkpoints(run_dir / "checkpoints", read_only=True)
    state, meta = checkpoints.restore(abstract, step)
    _, p_eval = tr.compile_steps(mesh, lambda s: 0.0, config)
    _, eval_aug = tr.augmentations(config.data)
    batch_size = tr._eval_batch_size(config, mesh)
    batches = input_pipeline.eval_iterator(
        val_split,
        eval_aug,
        mesh,
        global_batch=batch_size,
        workers=config.data.workers,
        prefetch=config.data.prefetch,
    )
    with contextlib.closing(batches):
        num_batches = input_pipeline.num_eval_batches(val_split, batch_size)
        result = tr.evaluate(p_eval, state, batches, num_batches)
    checkpoints.close()
    return {"config": config.name, "step": int(jax.device_get(state.step)), **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="run directory or its checkpoints/")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--output", help="also write the result to this JSON file")
    args = p.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices
    try:
        result = evaluate_checkpoint(args.checkpoint, args.step, args.overrides)
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        print(f"train.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
