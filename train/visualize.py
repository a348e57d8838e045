"""Effective receptive fields of a trained run, drawn over its validation images.

    python -m train.visualize --checkpoint runs/digits_deformed \
        [--baseline RUN_DIR] [--images 4] [--scales 0.6 1.0 1.4] [--out DIR]

Writes to --out (default: <checkpoint>/figures):

- `erf.png`: each image (rows) at each scale, with the ERF of the last stage's centre unit
  overlaid, for the model and (with --baseline) its rigid baseline side by side; the circle is
  the radius holding half the gradient mass, the square the theoretical receptive field.
- `kernel_positions.png` (runs whose conv is `local_dk` or `dk_dcn`): where the first adaptive
  layer's taps read its scope kernel at a few output locations, per scale.

The model-side helpers (`load_run`, `feature_fn`, `compiled`, `predict`, `render_at_scale`,
`measure_erf`, `kernel_positions`) need no plotting package; the scale study (studies/) builds
on them and on `pyplot` and `save_figure`. matplotlib (the `study` extra) is imported only when
a figure is drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dk_jax import analysis
from train.config import Config, ConfigError

# Output locations (i, j) of the adaptive layer whose kernel positions are drawn, as fractions
# of its output grid (centre, upper left, lower right).
KERNEL_PROBES = ((0.5, 0.5), (0.3, 0.3), (0.7, 0.7))


@dataclass
class Run:
    """A trained run, restored for analysis (eval mode)."""

    directory: Path
    config: Config
    model: Any
    variables: dict
    classes: tuple[str, ...]

    @property
    def conv(self) -> str:
        return self.config.model.conv

    def normalize(self, images: np.ndarray) -> jax.Array:
        """uint8 (N, H, W) or (N, H, W, C) -> the model's normalised float32 input."""
        from train.train import normalize

        if images.ndim == 3:
            images = images[..., None]
        return normalize(jnp.asarray(images), self.config.data.mean, self.config.data.std)


def load_run(run_dir: str | Path) -> Run:
    """Restores the latest checkpoint of a run directory (written by `python -m train`)."""
    from train import models
    from train import train as tr
    from train.checkpoints import Checkpoints
    from train.evaluate import run_dir_of

    run_dir = run_dir_of(run_dir)
    config = Config(**json.loads((run_dir / "config.json").read_text()))
    config.data.generate = ""
    if config.model.arch != "small_resnet":
        raise ConfigError(
            f"{run_dir}: the analysis supports model.arch='small_resnet', got {config.model.arch!r}"
        )
    train_split, _ = tr.prepare_data(config)
    num_classes = tr.num_classes_of(config, train_split.classes)
    model = models.create_model(config.model, num_classes)
    tx = tr.create_optimizer(config.optim, lambda step: 0.0)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    mesh = tr.create_mesh(jax.devices()[:1])
    abstract = tr.create_train_state(
        jax.random.PRNGKey(0), model, image_shape, tx, mesh, abstract=True
    )
    checkpoints = Checkpoints(run_dir / "checkpoints", read_only=True)
    state, _ = checkpoints.restore(abstract)
    checkpoints.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return Run(run_dir, config, model, jax.device_get(variables), train_split.classes)


def last_block_name(run: Run) -> str:
    """Flax name of the ResNet's last bottleneck (whose output is the pre-pool feature map)."""
    return f"Bottleneck_{sum(run.config.model.stage_sizes) - 1}"


def feature_fn(run: Run, block: str | None = None, variables: dict | None = None):
    """x (N, H, W, C) normalised -> the output of bottleneck `block` (default: the last), in
    eval mode, with the run's variables (or `variables` of the same model). The function the
    ERFs differentiate."""
    block = block or last_block_name(run)
    variables = run.variables if variables is None else variables

    def fn(x):
        _, state = run.model.apply(
            variables,
            x,
            train=False,
            capture_intermediates=lambda mdl, method: mdl.name == block and method == "__call__",
            mutable=["intermediates"],
        )
        return state["intermediates"][block]["__call__"][0]

    return fn


# Compiled functions shared by the runs of one model (the seeds of a conv): the variables are
# arguments, not constants, so a second seed reuses the first one's compilation.
_COMPILED: dict = {}


def compiled(run: Run, what: str, make, *extra):
    """`jax.jit(make())`, built once per (`what`, the run's model config, `extra`) and reused."""
    key = (what, json.dumps(run.config.model.to_dict(), sort_keys=True), *extra)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(make())
    return _COMPILED[key]


def receptive_field_layers(run: Run) -> list[tuple[int, int]]:
    """(kernel_size, stride) of every spatial conv on the small ResNet's longest path (the 1x1
    convs add nothing)."""
    mc = run.config.model
    layers = [(3, mc.stem_stride)]
    for i, blocks in enumerate(mc.stage_sizes):
        for j in range(blocks):
            layers.append((3, 2 if i > 0 and j == 0 else 1))
    return layers


def render_at_scale(images: np.ndarray, scale: float) -> np.ndarray:
    """uint8 (N, H, W) images zoomed by `scale` about the image centre (bilinear, zero fill
    outside, parts beyond the border cut): the same digits rendered at another object scale."""
    from scipy import ndimage

    images = np.asarray(images)
    h, w = images.shape[1:3]
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    # Output pixel p reads input centre + (p - centre) / scale.
    matrix = np.eye(2) / scale
    offset = centre - matrix @ centre
    out = np.stack(
        [
            ndimage.affine_transform(
                img.astype(np.float32), matrix, offset=offset, order=1, mode="constant", cval=0.0
            )
            for img in images
        ]
    )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_val_images(run: Run, limit: int | None = None, seed: int = 0):
    """(uint8 (N, H, W), labels (N,)) of the run's val split; `limit` draws a fixed random
    subset (the same for every run with the same dataset)."""
    from PIL import Image

    from train import input_pipeline

    split = input_pipeline.read_split(run.config.data.root, "val", run.classes)
    index = np.arange(len(split))
    if limit is not None and limit < len(split):
        index = np.sort(np.random.default_rng(seed).choice(len(split), limit, replace=False))
    size = run.config.data.image_size
    images = []
    for i in index:
        with Image.open(split.paths[i]) as img:
            img = img.convert("L")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            images.append(np.asarray(img, np.uint8))
    return np.stack(images), np.asarray(split.labels)[index]


def centre_unit(run: Run) -> tuple[tuple[int, int], tuple[float, float]]:
    """The last block's output unit nearest the image centre, and the input position its
    theoretical receptive field is centred on."""
    size = run.config.data.image_size
    rows, cols = analysis.theoretical_receptive_field(receptive_field_layers(run))
    i = int(round(((size - 1) / 2 - rows.start) / rows.jump))
    j = int(round(((size - 1) / 2 - cols.start) / cols.jump))
    return (i, j), (rows.start + i * rows.jump, cols.start + j * cols.jump)


def measure_erf(
    run: Run, images: np.ndarray, masses=(0.5,), batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """ERFs (N, H, W) of the centre unit of the last block (all its channels) and the radii
    (N, len(masses)) holding each share of their mass about the unit's theoretical centre."""
    unit, centre = centre_unit(run)
    masses = tuple(float(m) for m in masses)

    def make():
        def erfs_of(variables, x):
            erf = analysis.effective_receptive_field(feature_fn(run, variables=variables), x, unit)
            radii = [analysis.erf_radius(erf, centre, mass=m) for m in masses]
            return erf, jnp.stack(radii, axis=-1)

        return erfs_of

    erfs_of = compiled(run, "erf", make, unit, centre, masses)

    maps, radii = [], []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        pad = batch - len(chunk)  # fixed shapes: one compilation
        x = run.normalize(np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]))
        erf, radius = jax.device_get(erfs_of(run.variables, x))
        maps.append(erf[: len(chunk)])
        radii.append(radius[: len(chunk)])
    return np.concatenate(maps), np.concatenate(radii)


def predict(run: Run, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Predicted classes (N,) in eval mode."""

    def make():
        def classes_of(variables, x):
            return jnp.argmax(run.model.apply(variables, x, train=False), -1)

        return classes_of

    classes_of = compiled(run, "predict", make)
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        pad = batch - len(chunk)
        x = run.normalize(np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]))
        out.append(np.asarray(classes_of(run.variables, x))[: len(chunk)])
    return np.concatenate(out)


def first_adaptive_block(run: Run) -> str | None:
    """Name of the first bottleneck whose spatial conv is the run's adaptive conv."""
    mc = run.config.model
    n = 0
    for i, blocks in enumerate(mc.stage_sizes):
        if i in tuple(mc.adaptive_stages):
            return f"Bottleneck_{n}"
        n += blocks
    return None


def kernel_positions(run: Run, images: np.ndarray):
    """For `local_dk` / `dk_dcn` runs: (positions (N, P, Kh, Kw, 2) of group 0 in the scope
    kernel, the P output locations, the layer's stride in input pixels). None otherwise."""
    block = first_adaptive_block(run)
    if run.conv not in ("local_dk", "dk_dcn") or block is None:
        return None

    @jax.jit
    def rotation_of(x):
        _, state = run.model.apply(run.variables, x, train=False, mutable=["intermediates"])
        return state["intermediates"][block]["spatial_conv"]["rotation"][0]

    rotation = rotation_of(run.normalize(images))
    ho, wo = rotation.shape[1:3]
    probes = np.array(
        [[int(fi * (ho - 1) + 0.5), int(fj * (wo - 1) + 0.5)] for fi, fj in KERNEL_PROBES]
    )
    mc = run.config.model
    pos = analysis.kernel_sample_positions(
        rotation,
        probes,
        kernel_size=3,
        scope_size=max(mc.scope_size, 3),
        rotation_groups=mc.rotation_groups,
    )
    stride = run.config.data.image_size // ho
    return np.asarray(pos[:, :, 0]), probes, stride


# --- figures (matplotlib) ----------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend; a one-line exit where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "figures need matplotlib: pip install -e '.[study]' (or make study)"
        ) from e
    return plt


def save_figure(plt, fig, path: str | Path) -> Path:
    """Lays out a figure under its suptitle, writes it as a PNG (creating the folder) and
    closes it."""
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def erf_figure(runs: list[Run], images: np.ndarray, scales, path: str | Path) -> Path:
    """Rows: images; columns: scales x runs. Each panel: the image in grey, the ERF (normalised
    to its maximum) in colour, the 50%-mass circle and the theoretical receptive field."""
    plt = pyplot()
    from matplotlib.patches import Circle, Rectangle

    n, cols = len(images), len(scales) * len(runs)
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.35 * n + 0.4), squeeze=False)
    for s, scale in enumerate(scales):
        scaled = render_at_scale(images, scale)
        for r, run in enumerate(runs):
            maps, radii = measure_erf(run, scaled)
            radii = radii[:, 0]
            _, centre = centre_unit(run)
            col = s * len(runs) + r
            for k in range(n):
                ax = axes[k, col]
                ax.imshow(scaled[k], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                # Square root: the ERF of a ResNet is sharply peaked; this shows its extent.
                shown = np.sqrt(maps[k] / max(maps[k].max(), 1e-12))
                ax.imshow(shown, cmap="magma", alpha=0.6, vmin=0, vmax=1, interpolation="nearest")
                ax.add_patch(
                    Circle(centre[::-1], radii[k], fill=False, color="cyan", linewidth=0.8)
                )
                top, left, bottom, right = analysis.receptive_field_box(
                    analysis.theoretical_receptive_field(receptive_field_layers(run)),
                    centre_unit(run)[0],
                    scaled.shape[1:3],
                )
                ax.add_patch(
                    Rectangle(
                        (left - 0.5, top - 0.5),
                        right - left + 1,
                        bottom - top + 1,
                        fill=False,
                        color="white",
                        linewidth=0.6,
                        linestyle=":",
                    )
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_title(f"{run.conv}\nx{scale:g}", fontsize=7)
                ax.set_xlabel(f"r50={radii[k]:.1f}", fontsize=6, labelpad=1)
    fig.suptitle(
        "sqrt of the ERF of the last stage's centre unit (cyan: radius holding 50% of the mass)",
        fontsize=8,
    )
    return save_figure(plt, fig, path)


def kernel_positions_figure(run: Run, images: np.ndarray, scales, path: str | Path) -> Path | None:
    """Per scale: the image with the probed output locations, then one panel per location
    showing the Kh x Kw taps' sampled positions inside the scope kernel (grid) for every image
    (one colour per image), against the rigid positions (crosses)."""
    plt = pyplot()
    probe = kernel_positions(run, images[:1])
    if probe is None:
        return None
    n_probes = len(probe[1])
    scope = max(run.config.model.scope_size, 3)
    fig, axes = plt.subplots(
        len(scales),
        1 + n_probes,
        figsize=(1.6 * (1 + n_probes), 1.6 * len(scales)),
        squeeze=False,
    )
    colours = plt.cm.tab10(np.arange(len(images)) % 10)
    rigid = np.stack(np.meshgrid(np.arange(3), np.arange(3), indexing="ij"), -1) + (scope - 3) / 2
    for s, scale in enumerate(scales):
        scaled = render_at_scale(images, scale)
        pos, probes, stride = kernel_positions(run, scaled)
        ax = axes[s, 0]
        ax.imshow(scaled[0], cmap="gray", vmin=0, vmax=255)
        for p, (i, j) in enumerate(probes):
            ax.plot(j * stride, i * stride, "o", ms=4, color=f"C{p}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"x{scale:g}", fontsize=7)
        for p in range(n_probes):
            ax = axes[s, 1 + p]
            ax.set_xlim(-0.5, scope - 0.5)
            ax.set_ylim(scope - 0.5, -0.5)
            ax.set_xticks(range(scope))
            ax.set_yticks(range(scope))
            ax.tick_params(labelsize=5)
            ax.grid(True, linewidth=0.3)
            ax.plot(rigid[..., 1].ravel(), rigid[..., 0].ravel(), "k+", ms=4)
            for k in range(len(images)):
                ax.plot(
                    pos[k, p, ..., 1].ravel(),
                    pos[k, p, ..., 0].ravel(),
                    ".",
                    ms=3,
                    color=colours[k],
                )
            if s == 0:
                ax.set_title(f"unit {tuple(int(v) for v in probes[p])}", fontsize=7, color=f"C{p}")
    fig.suptitle(f"{run.conv}: sampled scope positions, {first_adaptive_block(run)}", fontsize=8)
    return save_figure(plt, fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.visualize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="run directory (or its checkpoints/)")
    p.add_argument("--baseline", help="a second run drawn beside it (e.g. the depthwise run)")
    p.add_argument("--images", type=int, default=4, help="number of val images (default 4)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.6, 1.0, 1.4])
    p.add_argument("--seed", type=int, default=0, help="which val images are drawn")
    p.add_argument("--out", help="output folder (default: <checkpoint>/figures)")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be at least 1")
    try:
        runs = [load_run(args.checkpoint)]
        if args.baseline:
            runs.append(load_run(args.baseline))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"train.visualize: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else runs[0].directory / "figures"
    images, _ = load_val_images(runs[0], limit=args.images, seed=args.seed)
    written = [erf_figure(runs, images, args.scales, out / "erf.png")]
    kp = kernel_positions_figure(runs[0], images, args.scales, out / "kernel_positions.png")
    if kp is not None:
        written.append(kp)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
