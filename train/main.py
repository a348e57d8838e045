"""Command line of the training program (the `dk-train` console script).

    python -m train --config train/configs/digits_deformed.py [--workdir DIR]
                    [--set model.conv=dcn --set optim.num_epochs=2 ...]

`--config` takes a file or the name of a bundled config (digits_deformed, imagenet_resnet50dw,
imagenet_mobilenetv2). Restarting the same command resumes from the run's last checkpoint.
With several hosts, JAX's usual environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID, or a SLURM / Open MPI launch) makes every process join one run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from train.config import ConfigError, TrainingError, load_config
from train.images import DatasetError

MULTI_HOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() when launched as one of several processes."""
    many = any(
        int(os.environ.get(k, "1") or 1) > 1
        for k in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
    )
    if many or any(os.environ.get(k) for k in MULTI_HOST_ENV):
        import jax

        jax.distributed.initialize()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dk-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", required=True, help="config file (train/configs/*.py) or bundled config name"
    )
    p.add_argument("--workdir", help="run directory (default: the config's `workdir`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.learning_rate=0.05",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    # Chatty libraries stay at WARNING; our own messages and the progress bar are the output.
    for name in ("absl", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        config = load_config(args.config, args.overrides)
        if args.workdir:
            config.workdir = args.workdir
        if args.print_config:
            print(config)
            return 0
        maybe_initialize_distributed()
        from train.train import train_and_evaluate

        train_and_evaluate(config)
    except (ConfigError, DatasetError, TrainingError) as e:
        print(f"dk-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
