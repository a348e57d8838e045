"""The training loop: create_train_state, train_step, eval_step, train_and_evaluate.

After flax's examples/imagenet/train.py, with jax.sharding instead of pmap. The devices form
a 1-D `Mesh` with axis "data"; a global batch is split over it, the TrainState is replicated.
Both steps run under `jax.shard_map` (with JAX's default `check_vma=True`), so each device
applies the model to its own shard: the deformable-kernel custom calls see per-device arrays
and XLA never gathers activations around them. The step differentiates the loss averaged over
"data" with `pmean`; JAX sums the replicated parameters' gradients over devices itself. Metrics
are averaged the same way, and BatchNorm averages its statistics over the same axis (so results
do not depend on the device count beyond float rounding).

A run is a pure function of (config, seed): the data order depends on (seed, epoch) only,
dropout keys on (seed, step, device), and the state is checkpointed as a whole, so a run
killed at any step and restarted with the same command ends bitwise where an uninterrupted
run ends (on one platform and device count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from train import input_pipeline, models, report
from train.checkpoints import Checkpoints
from train.config import Config, ConfigError, TrainingError
from train.images import Augment

log = logging.getLogger(__name__)
AXIS = "data"


class TrainState(train_state.TrainState):
    """params, opt_state and step (flax), plus BatchNorm statistics and the run's PRNG key."""

    batch_stats: Any
    rng: jax.Array


def create_mesh(devices=None) -> Mesh:
    """All devices of all processes along one "data" axis."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


# `optim.learning_rate` is the rate for 256 images; the run uses it scaled by the global batch
# (Goyal et al. 2017, as flax's ImageNet example), so the recipe does not change with the
# number of devices that share a batch.
LR_REFERENCE_BATCH = 256


def peak_learning_rate(optim: Config) -> float:
    """optim.learning_rate * optim.batch_size / 256."""
    return optim.learning_rate * optim.batch_size / LR_REFERENCE_BATCH


def create_learning_rate_fn(optim: Config, steps_per_epoch: int, total_steps: int):
    """Linear warmup from 0 to `peak_learning_rate(optim)` over `warmup_epochs`, then cosine
    decay to 0."""
    warmup = min(int(optim.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate(optim),
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def frozen_mask(params, names) -> Any:
    """True for every parameter whose path (module names, parameter name) contains one of
    `names` (`optim.freeze`)."""
    names = set(names)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) in names for k in path), params
    )


def create_optimizer(optim: Config, learning_rate_fn) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum; decoupled-from-loss L2 decay on kernels (ndim > 1) only;
    no update at all for the parameters `optim.freeze` names."""

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    parts = [
        optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
        optax.sgd(learning_rate_fn, momentum=optim.momentum, nesterov=optim.nesterov),
    ]
    if optim.freeze:
        parts.append(optax.masked(optax.set_to_zero(), lambda p: frozen_mask(p, optim.freeze)))
    return optax.chain(*parts)


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    image_shape: tuple[int, ...],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    abstract: bool = False,
) -> TrainState:
    """Initialises the model (eval mode, batch of 1) and the optimiser, replicated over the
    mesh. `abstract=True` returns the jax.ShapeDtypeStructs only (for restoring)."""

    def init(rng):
        params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
        variables = model.init(
            {"params": params_rng, "dropout": dropout_rng},
            jnp.zeros((1, *image_shape), jnp.float32),
            train=False,
        )
        return TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            tx=tx,
            rng=state_rng,
        )

    replicated = NamedSharding(mesh, P())
    if abstract:
        shapes = jax.eval_shape(init, rng)
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes
        )
    return jax.jit(init, out_shardings=replicated)(rng)


def normalize(image: jax.Array, mean, std) -> jax.Array:
    """uint8 (N, H, W, C) -> float32 (image - mean) / std, per channel."""
    c = image.shape[-1]
    mean = jnp.asarray(mean[:c], jnp.float32)
    std = jnp.asarray(std[:c], jnp.float32)
    return (image.astype(jnp.float32) - mean) / std


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """Per-example cross-entropy against one-hot labels smoothed by `label_smoothing`."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def correct_top_k(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k largest logits, per example."""
    k = min(k, logits.shape[-1])
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # Rank = number of classes with a strictly larger logit (ties count in the label's favour).
    rank = jnp.sum(logits > label_logit, axis=-1)
    return (rank < k).astype(jnp.float32)


def train_step(
    state: TrainState, batch: dict, *, learning_rate_fn, label_smoothing: float, mean, std
) -> tuple[TrainState, dict]:
    """One SGD step on this device's shard of the batch (run under shard_map over "data")."""
    image = normalize(batch["image"], mean, std)
    labels = batch["label"]
    dropout_rng = jax.random.fold_in(
        jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS)
    )

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            image,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        # Every shard has the same size, so the mean over devices of the shard losses is the
        # global mean loss; its gradient with respect to the replicated (device-invariant)
        # params is already summed over devices by JAX (check_vma=True), so no pmean follows.
        loss = jax.lax.pmean(jnp.mean(cross_entropy(logits, labels, label_smoothing)), AXIS)
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = jax.lax.pmean(
        {
            "train_top1": jnp.mean(correct_top_k(logits, labels, 1)),
            "train_top5": jnp.mean(correct_top_k(logits, labels, 5)),
        },
        AXIS,
    )
    metrics["train_loss"] = loss
    metrics["learning_rate"] = learning_rate_fn(state.step)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, metrics


def eval_step(state: TrainState, batch: dict, *, mean, std) -> dict:
    """Sums of loss, top-1 and top-5 hits and example count over the global batch (padding and
    skipped images have mask 0)."""
    image = normalize(batch["image"], mean, std)
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, image, train=False
    )
    mask = batch["mask"]
    sums = {
        "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        "top1": jnp.sum(correct_top_k(logits, batch["label"], 1) * mask),
        "top5": jnp.sum(correct_top_k(logits, batch["label"], 5) * mask),
        "count": jnp.sum(mask),
    }
    return jax.lax.psum(sums, AXIS)


def compile_steps(mesh: Mesh, learning_rate_fn, config: Config):
    """jit(shard_map(step)) for training and evaluation: state replicated, batch split over
    "data" (JAX's default check_vma=True: JAX tracks which values vary across devices, the
    dk_jax primitives included, so a replicated value's gradient is summed over devices)."""
    data = config.data
    p_train = jax.jit(
        jax.shard_map(
            partial(
                train_step,
                learning_rate_fn=learning_rate_fn,
                label_smoothing=config.optim.label_smoothing,
                mean=data.mean,
                std=data.std,
            ),
            mesh=mesh,
            in_specs=(P(), P(AXIS)),
            out_specs=(P(), P()),
        ),
        donate_argnums=0,
    )
    p_eval = jax.jit(
        jax.shard_map(
            partial(eval_step, mean=data.mean, std=data.std),
            mesh=mesh,
            in_specs=(P(), P(AXIS)),
            out_specs=P(),
        )
    )
    return p_train, p_eval


def augmentations(data: Config) -> tuple[Augment, Augment]:
    common = dict(
        image_size=data.image_size,
        eval_resize=data.eval_resize,
        channels=data.channels,
        skip_corrupt=data.on_corrupt == "skip",
        reduced_decode=data.reduced_decode,
    )
    return (
        Augment(
            train=True,
            crop_area=tuple(data.crop_area),
            crop_ratio=tuple(data.crop_ratio),
            flip=data.flip,
            **common,
        ),
        Augment(train=False, **common),
    )


def check_config(config: Config) -> None:
    """Rejects values that would fail later, with the key in the message."""
    data, optim = config.data, config.optim
    if data.on_corrupt not in ("fatal", "skip"):
        raise ConfigError(f"data.on_corrupt must be 'fatal' or 'skip', got {data.on_corrupt!r}")
    if data.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, got {data.channels!r}")
    if data.generate not in ("", "digits_deformed"):
        raise ConfigError(f"data.generate must be '' or 'digits_deformed', got {data.generate!r}")
    if isinstance(optim.freeze, str) or not all(isinstance(n, str) for n in optim.freeze):
        raise ConfigError(f"optim.freeze must be a tuple of parameter names, got {optim.freeze!r}")
    if len(data.mean) < data.channels or len(data.std) < data.channels:
        raise ConfigError("data.mean and data.std need one value per channel")
    if optim.batch_size < 1:
        raise ConfigError(f"optim.batch_size must be positive, got {optim.batch_size}")
    try:
        models.check_model_config(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def prepare_data(config: Config):
    """Generates the embedded dataset when asked to and missing; returns (train, val) splits."""
    root = Path(config.data.root)
    if config.data.generate == "digits_deformed":
        from train import digits

        if not root.exists():
            log.info("generating digits_deformed in %s (once)", root)
        digits.generate(root)
    train_split = input_pipeline.read_split(root, "train")
    val_split = input_pipeline.read_split(
        root, "val", train_split.classes, labels=config.data.val_labels or None
    )
    return train_split, val_split


def num_classes_of(config: Config, classes) -> int:
    n = config.model.num_classes
    if n and n != len(classes):
        raise ConfigError(f"model.num_classes={n} but the dataset has {len(classes)} classes")
    return n or len(classes)


def params_digest(params) -> str:
    """sha256 over every parameter's bytes in tree order: equal digests = bitwise-equal params."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(params)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def evaluate(p_eval, state, batches, num_batches: int) -> dict:
    """Loss, top-1 and top-5 (fractions) over the next `num_batches` of `batches` (one pass
    over the val split, see input_pipeline.eval_iterator)."""
    totals = None
    for _ in range(num_batches):
        sums = p_eval(state, next(batches))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {
        "val_loss": float(totals["loss"]) / count,
        "val_top1": float(totals["top1"]) / count,
        "val_top5": float(totals["top5"]) / count,
        "val_images": int(totals["count"]),
    }


def all_finite(tree) -> bool:
    """Whether every value of every array in `tree` is finite."""
    leaves = jax.tree.leaves(tree)
    return bool(jax.device_get(jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))))


def check_finite(pending: list[dict], first_step: int, state, last_checkpoint) -> None:
    """Raises TrainingError at the first step whose train loss is not finite, or when the
    parameters are not (a finite loss with a non-finite update), before anything is saved."""
    kept = (
        f"the last checkpoint (step {last_checkpoint}) is kept"
        if last_checkpoint is not None
        else "no checkpoint was written"
    )
    losses = [float(m["train_loss"]) for m in jax.device_get(pending)]
    for k, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise TrainingError(
                f"the train loss is {loss} at step {first_step + k}; stopping the run "
                f"({kept}; lower optim.learning_rate, or check the data, then restart to "
                "resume from it)"
            )
    if state is not None and not all_finite(state.params):
        raise TrainingError(
            f"the parameters are not finite after step {first_step + len(losses) - 1}; "
            f"stopping the run ({kept}; lower optim.learning_rate, then restart to resume)"
        )


def _eval_batch_size(config: Config, mesh: Mesh) -> int:
    b = config.optim.batch_size
    return -(-b // mesh.size) * mesh.size


@dataclasses.dataclass
class Run:
    """What a run is made of before its first step: the data, the schedule, the model and its
    optimiser, and the state (restored from the last checkpoint, or new)."""

    config: Config
    workdir: Path
    mesh: Mesh
    train_split: Any
    val_split: Any
    num_classes: int
    steps_per_epoch: int
    total_steps: int
    learning_rate_fn: Any
    checkpoints: Checkpoints
    state: TrainState
    start_step: int
    resumed_from: int | None
    n_params: int


def setup_run(config: Config, workdir: Path) -> Run:
    """Checks what can only be checked against the devices and the data, builds the model and
    optimiser, and restores the state from workdir/checkpoints (or creates it)."""
    mesh = create_mesh()
    optim, run = config.optim, config.run
    if optim.batch_size % mesh.size or optim.batch_size % jax.process_count():
        raise ConfigError(
            f"optim.batch_size={optim.batch_size} must be divisible by the number of devices "
            f"({mesh.size}) and of processes ({jax.process_count()})"
        )
    train_split, val_split = prepare_data(config)
    num_classes = num_classes_of(config, train_split.classes)
    steps_per_epoch = len(train_split) // optim.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the train split has {len(train_split)} images, fewer than one batch "
            f"(optim.batch_size={optim.batch_size})"
        )
    total_steps = optim.num_steps or max(1, int(math.ceil(optim.num_epochs * steps_per_epoch)))

    model = models.create_model(config.model, num_classes)
    learning_rate_fn = create_learning_rate_fn(optim, steps_per_epoch, total_steps)
    tx = create_optimizer(optim, learning_rate_fn)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    rng = jax.random.PRNGKey(config.seed)
    checkpoints = Checkpoints(
        workdir / "checkpoints", every=run.checkpoint_every_steps, keep=run.keep_checkpoints
    )
    resumed_from = checkpoints.latest_step()
    if resumed_from is not None:
        abstract = create_train_state(rng, model, image_shape, tx, mesh, abstract=True)
        state, _ = checkpoints.restore(abstract, resumed_from)
        log.info("resumed from %s at step %d", checkpoints.directory, resumed_from)
    else:
        state = create_train_state(rng, model, image_shape, tx, mesh)
    if optim.freeze and not any(jax.tree.leaves(frozen_mask(state.params, optim.freeze))):
        raise ConfigError(f"optim.freeze={optim.freeze!r} names no parameter of this model")
    start_step = int(jax.device_get(state.step))
    return Run(config, workdir, mesh, train_split, val_split, num_classes, steps_per_epoch,
               total_steps, learning_rate_fn, checkpoints, state, start_step, resumed_from,
               count_params(state.params))  # fmt: skip


# The periodic actions of the loop, after flax's examples (clu's periodic_actions): each is
# called after every step and acts when its step comes.


class FiniteCheck:
    """Before a step's progress is logged or its state saved, checks that every train loss since
    the last check, and the state to be saved, are finite (check_finite)."""

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints = checkpoints
        self.unchecked: list[dict] = []

    def __call__(self, step: int, state, metrics: dict, *, logging_now: bool, saving: bool):
        self.unchecked.append(metrics)
        if saving or logging_now:
            first = step - len(self.unchecked) + 1
            last = self.checkpoints.latest_step()
            check_finite(self.unchecked, first, state if saving else None, last)
            self.unchecked = []


class TrainLog:
    """Every `run.log_every_steps` steps and at the last: the mean train metrics since the last
    line, with images/s over the training steps only (time spent evaluating is left out)."""

    def __init__(self, run: Run, metrics_log: report.MetricsLog, bar):
        self.every = run.config.run.log_every_steps
        self.last = run.total_steps
        self.steps_per_epoch = run.steps_per_epoch
        self.batch_size = run.config.optim.batch_size
        self.metrics_log, self.bar = metrics_log, bar
        self.pending: list[dict] = []
        self.t_start, self.paused = time.time(), 0.0

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def __call__(self, step: int, metrics: dict) -> None:
        self.pending.append(metrics)
        if not self.due(step):
            return
        event = {
            k: float(np.mean([m[k] for m in jax.device_get(self.pending)])) for k in self.pending[0]
        }
        elapsed = time.time() - self.t_start - self.paused
        event.update(
            step=step,
            epoch=step / self.steps_per_epoch,
            images_per_s=len(self.pending) * self.batch_size / max(elapsed, 1e-9),
        )
        self.metrics_log.write(event)
        self.bar.set_postfix(
            {
                "img/s": f"{event['images_per_s']:.0f}",
                "loss": f"{event['train_loss']:.3f}",
                "lr": f"{event['learning_rate']:.3g}",
            }
        )
        self.pending, self.t_start, self.paused = [], time.time(), 0.0


class Evaluation:
    """Every `run.eval_every_steps` steps (0: once per epoch) and at the last: one pass over the
    val split, logged; returns the time it took."""

    def __init__(self, run: Run, evaluate_now, metrics_log: report.MetricsLog, bar, is_main):
        self.every = run.config.run.eval_every_steps or run.steps_per_epoch
        self.last = run.total_steps
        self.steps_per_epoch = run.steps_per_epoch
        self.evaluate_now, self.metrics_log, self.bar = evaluate_now, metrics_log, bar
        self.is_main = is_main
        self.latest: dict = {}

    def __call__(self, step: int, state) -> float:
        if step % self.every and step != self.last:
            return 0.0
        t_eval = time.time()
        self.latest = val = self.evaluate_now(state)
        self.metrics_log.write({"step": step, "epoch": step / self.steps_per_epoch, **val})
        if self.is_main:
            self.bar.write(
                f"step {step}: val top-1 {val['val_top1']:.4f}, "
                f"top-5 {val['val_top5']:.4f}, loss {val['val_loss']:.4f}"
            )
        return time.time() - t_eval


def _describe(run: Run) -> None:
    config, optim = run.config, run.config.optim
    log.info(
        "%s: %s/%s, %d params, %d train / %d val images, %d classes, %d steps "
        "(%d per epoch), %d devices, peak lr %.4g (%.4g per 256 images)",
        config.name,
        config.model.arch,
        config.model.conv,
        run.n_params,
        len(run.train_split),
        len(run.val_split),
        run.num_classes,
        run.total_steps,
        run.steps_per_epoch,
        run.mesh.size,
        peak_learning_rate(optim),
        optim.learning_rate,
    )


def _summarise(run: Run, state, val: dict, t_train: float, t_start: float, is_main: bool):
    config = run.config
    summary = {
        "config": config.name,
        "arch": config.model.arch,
        "conv": config.model.conv,
        "val_top1": val["val_top1"],
        "val_top5": val["val_top5"],
        "val_loss": val["val_loss"],
        "val_images": val["val_images"],
        "steps": run.total_steps,
        "resumed_from": run.resumed_from,
        "steps_this_run": run.total_steps - run.start_step,
        "train_s": t_train,
        "wall_s": time.time() - t_start,
        "params": run.n_params,
        "params_sha256": params_digest(state.params),
        "devices": run.mesh.size,
        "batch_size": config.optim.batch_size,
        "workdir": str(run.workdir),
    }
    if is_main:
        report.write_json_atomic(run.workdir / "summary.json", summary)
        report.plot_curves(
            report.read_metrics(run.workdir / "metrics.jsonl"),
            run.workdir / "curves.png",
            title=f"{config.name}: {config.model.arch} / {config.model.conv}",
        )
        print(
            json.dumps(
                {k: summary[k] for k in ("config", "val_top1", "val_top5", "steps", "wall_s")}
            )
        )
    return summary


def train_and_evaluate(config: Config, workdir: str | Path | None = None) -> dict:
    """Trains (resuming from workdir/checkpoints if there is one), evaluates, and writes
    metrics.jsonl, curves.png and summary.json to the workdir; returns the summary.

    The steps: check the config, set the run up (setup_run), then the loop, where after each
    train step the periodic actions run (FiniteCheck, TrainLog, Evaluation, the checkpoint),
    then the summary."""
    t_start = time.time()
    check_config(config)
    workdir = Path(workdir or config.workdir)
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    run = setup_run(config, workdir)
    data, optim = config.data, config.optim
    state, total_steps, checkpoints = run.state, run.total_steps, run.checkpoints
    if is_main:
        report.write_json_atomic(workdir / "config.json", config.to_dict())
    metrics_log = report.MetricsLog(
        workdir, resume_step=run.start_step, enabled=is_main, tensorboard=config.run.tensorboard
    )
    p_train, p_eval = compile_steps(run.mesh, run.learning_rate_fn, config)
    train_aug, eval_aug = augmentations(data)
    eval_batch = _eval_batch_size(config, run.mesh)
    _describe(run)

    t_loop = time.time()
    val_batches = input_pipeline.eval_iterator(
        run.val_split,
        eval_aug,
        run.mesh,
        global_batch=eval_batch,
        workers=data.workers,
        prefetch=data.prefetch,
        repeat=True,
    )
    evaluate_now = partial(
        evaluate,
        p_eval,
        batches=val_batches,
        num_batches=input_pipeline.num_eval_batches(run.val_split, eval_batch),
    )
    batches = input_pipeline.train_iterator(
        run.train_split,
        train_aug,
        run.mesh,
        seed=config.seed,
        start_step=run.start_step,
        num_steps=total_steps,
        global_batch=optim.batch_size,
        workers=data.workers,
        prefetch=data.prefetch,
    )
    bar = tqdm(
        total=total_steps,
        initial=run.start_step,
        desc=config.name,
        unit="step",
        disable=not (config.run.progress and is_main),
        dynamic_ncols=True,
    )
    finite = FiniteCheck(checkpoints)
    train_log = TrainLog(run, metrics_log, bar)
    evaluation = Evaluation(run, evaluate_now, metrics_log, bar, is_main)
    # The finally clauses stop grain's workers and let a checkpoint being written finish,
    # also when the loop raises (a non-finite loss, a dead worker).
    with (
        contextlib.closing(batches),
        contextlib.closing(val_batches),
        contextlib.ExitStack() as cleanup,
    ):
        cleanup.callback(checkpoints.close)
        cleanup.callback(checkpoints.wait)
        for step in range(run.start_step + 1, total_steps + 1):
            state, metrics = p_train(state, next(batches))
            bar.update(1)
            saving = step == total_steps or checkpoints.due(step)
            # Nothing non-finite may be logged as progress or saved as the last good state.
            finite(step, state, metrics, logging_now=train_log.due(step), saving=saving)
            train_log(step, metrics)
            train_log.pause(evaluation(step, state))
            meta = {"step": step, "epoch": step / run.steps_per_epoch, "config": config.name}
            checkpoints.save(step, state, meta, force=step == total_steps)
        bar.close()
        val = evaluation.latest or evaluate_now(state)  # already finished: evaluate once
        t_train = time.time() - t_loop
        if run.start_step == total_steps and checkpoints.latest_step() != total_steps:
            checkpoints.save(total_steps, state, {"step": total_steps}, force=True)
    metrics_log.close()
    return _summarise(run, state, val, t_train, t_start, is_main)
