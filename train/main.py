"""Command line of the training program (the `dk-train` console script).

    python -m train --config train/configs/digits_deformed.py [--workdir DIR]
                    [--set model.conv=dcn --set optim.num_epochs=2 ...]

`--config` takes a file or the name of a bundled config (digits_deformed, imagenet_resnet50dw,
imagenet_mobilenetv2). Restarting the same command resumes from the run's last checkpoint.
With several processes (hosts), set JAX_COORDINATOR_ADDRESS (host:port of process 0),
JAX_NUM_PROCESSES and JAX_PROCESS_ID in each, or launch under SLURM / Open MPI and JAX detects
them; every process then joins one run over all their devices.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from train.config import ConfigError, TrainingError, load_config
from train.images import DatasetError

PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_args(env=os.environ) -> dict | None:
    """jax.distributed.initialize's arguments from the environment: {} to let JAX detect a
    SLURM or Open MPI launch, None for a single process. Raises ConfigError naming a missing
    or malformed variable when only some of PROCESS_ENV are set."""
    given = {k: env[k] for k in PROCESS_ENV if env.get(k)}
    if not given:
        many = any(
            (env.get(k) or "1").isdigit() and int(env.get(k) or 1) > 1
            for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
        )
        return {} if many else None
    missing = [k for k in PROCESS_ENV if k not in given]
    if missing:
        raise ConfigError(
            f"multi-process launch: {', '.join(missing)} not set "
            f"(set all of {', '.join(PROCESS_ENV)}, or none)"
        )
    numbers = {}
    for k in PROCESS_ENV[1:]:
        if not given[k].isdigit():
            raise ConfigError(f"{k} must be a non-negative integer, got {given[k]!r}")
        numbers[k] = int(given[k])
    n, i = numbers["JAX_NUM_PROCESSES"], numbers["JAX_PROCESS_ID"]
    if n < 1 or i >= n:
        raise ConfigError(f"JAX_PROCESS_ID={i} must be in [0, JAX_NUM_PROCESSES={n})")
    address = given["JAX_COORDINATOR_ADDRESS"]
    if ":" not in address:
        raise ConfigError(f"JAX_COORDINATOR_ADDRESS must be host:port, got {address!r}")
    return {"coordinator_address": address, "num_processes": n, "process_id": i}


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize(...) when launched as one of several processes."""
    kwargs = distributed_args()
    if kwargs is not None:
        import jax

        jax.distributed.initialize(**kwargs)


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
