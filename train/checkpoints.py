"""Orbax checkpoints of the whole TrainState (params, batch statistics, optimiser state, step,
RNG): saved every `every` steps and at the end, the last `keep` kept.

Orbax writes each checkpoint into a temporary folder and renames it into place when complete,
so a run killed mid-save leaves the previous checkpoint as the latest one; leftover temporary
folders are removed when the manager opens the directory. The input iterator's state is the
step itself (the pipeline is a pure function of it, see input_pipeline), which the TrainState
holds, so restoring the state restores everything a run needs, with any number of workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """A run's checkpoint folder."""

    def __init__(
        self, directory: str | Path, *, every: int = 1000, keep: int = 3, read_only: bool = False
    ):
        self.directory = Path(directory).resolve()
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0, max_to_keep=None
            )
        else:
            options = ocp.CheckpointManagerOptions(
                save_interval_steps=max(1, every),
                max_to_keep=keep,
                cleanup_tmp_directories=True,
                # Saves block only while the arrays are copied to host memory.
                enable_async_checkpointing=True,
            )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether `save(step)` would write a checkpoint (without `force`)."""
        return bool(self.manager.should_save(step))

    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = False) -> bool:
        """Saves when `step` is a multiple of `every` (or `force`); returns whether it did."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores (state, meta) at `step` (default: the latest) with the shardings and dtypes
        of `abstract_state` (a pytree of jax.ShapeDtypeStruct or arrays)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {str(self.directory)!r}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return out.state, dict(out.meta or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
