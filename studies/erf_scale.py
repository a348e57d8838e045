"""Measurements of the scale study (studies/scale.py): the effective receptive field (ERF) of a
unit at the object's centre against the object's scale, its controls, and the decision rule.

Per trained run and per val image of `digits_scaled` (object scale s, centre c known):

- the ERF: |d unit / d input pixels| summed over the unit's channels (the last stage's unit at
  c, and one of the intermediate stage), and its radii about c: r50, r90 (the discs holding
  50% / 90% of the mass, `dk_jax.analysis.erf_radius`) and the RMS radius;
- the exponent e of a radius: the slope of log(mean radius over the images at s) on log(s)
  (1: the ERF grows in proportion to the object, 0: it does not move);
- the positive control ("zoom back"): the model is fed the image zoomed by 1/s about c, so it
  sees every digit at scale 1 and its ERF in the pixels of the scale-s image must grow as s;
  e below `POSITIVE_MIN` voids the run (the measurement could not have seen an effect);
- the ceiling ("hand set"): every adaptive layer's offset predictors are replaced by constants
  that move its taps to `factor` times their rigid distance from the tap centre, with
  factor = s**a for a in `HAND_SET_POWERS`, the image's known scale; e_max of a run is the
  largest exponent this reaches: how far this architecture's ERF can follow the scale through
  its offsets, the yardstick of the decision rule;
- the offset saturation: the share of kernel taps that `rotation_clip="scope"` holds on the
  scope's border.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dk_jax import analysis
from train import visualize

POSITIVE_MIN = 0.8
HAND_SET_POWERS = (1.0, -1.0)
CEILING_MIN = 0.1
STATS = ("r50", "r90", "rms")
VERDICTS = ("supported", "contradicted", "inconclusive")


# --- data -----------------------------------------------------------------------------------


def load_val(run: visualize.Run):
    """(uint8 images (N, H, W), labels (N,), scales (N,), centres (N, 2), sources (N,)) of a
    `digits_scaled` val split, from its dataset.json."""
    from PIL import Image

    from train import input_pipeline

    root = Path(run.config.data.root)
    meta = json.loads((root / "dataset.json").read_text())
    if meta.get("name") != "digits_scaled":
        raise ValueError(f"{root}: the scale study needs the digits_scaled dataset")
    split = input_pipeline.read_split(root, "val", run.classes)
    images, scales, centres, sources = [], [], [], []
    for path in split.paths:
        entry = meta["val"][Path(path).relative_to(root / "val").as_posix()]
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("L"), np.uint8))
        scales.append(entry["scale"])
        centres.append(entry["centre"])
        sources.append(entry["source"])
    return (
        np.stack(images),
        np.asarray(split.labels),
        np.asarray(scales, np.float64),
        np.asarray(centres, np.float64),
        np.asarray(sources),
    )


# --- the unit -------------------------------------------------------------------------------


def stage_blocks(run: visualize.Run) -> dict[str, int]:
    """{"last": index of the last bottleneck, "mid": of the last one of the stage before}."""
    sizes = list(run.config.model.stage_sizes)
    return {"last": sum(sizes) - 1, "mid": sum(sizes[:-1]) - 1}


def unit_at(run: visualize.Run, block: int, centre) -> tuple[tuple[int, int], tuple[float, float]]:
    """The output unit of bottleneck `block` whose theoretical receptive field is centred
    nearest `centre` (row, col), and that field's centre."""
    layers = visualize.receptive_field_layers(run)[: block + 2]  # the stem, then one per block
    rows, cols = analysis.theoretical_receptive_field(layers)
    i = int(round((centre[0] - rows.start) / rows.jump))
    j = int(round((centre[1] - cols.start) / cols.jump))
    return (i, j), (rows.start + i * rows.jump, cols.start + j * cols.jump)


# --- ERFs -----------------------------------------------------------------------------------


def zoom_about(x: jax.Array, factor: jax.Array, centre: jax.Array) -> jax.Array:
    """Pixels (N, H, W) zoomed by 1/factor about `centre` (N, 2): output p reads the input at
    centre + factor * (p - centre) (bilinear, zero outside). Differentiable in x."""
    h, w = x.shape[1:3]
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=x.dtype), jnp.arange(w, dtype=x.dtype), indexing="ij"
    )

    def one(img, f, c):
        coords = [c[0] + f * (rows - c[0]), c[1] + f * (cols - c[1])]
        return jax.scipy.ndimage.map_coordinates(img, coords, order=1, mode="constant", cval=0.0)

    return jax.vmap(one)(x, factor, centre)


def radii(erf: jax.Array, centre: jax.Array) -> jax.Array:
    """(N, 3): r50, r90 and the RMS radius of ERFs (N, H, W) about centres (N, 2)."""
    h, w = erf.shape[-2:]
    rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    d2 = (rows[None] - centre[:, :1, None]) ** 2 + (cols[None] - centre[:, 1:, None]) ** 2
    rms = jnp.sqrt((erf * d2).sum((1, 2)) / erf.sum((1, 2)))
    r50 = analysis.erf_radius(erf, centre, mass=0.5)
    r90 = analysis.erf_radius(erf, centre, mass=0.9)
    return jnp.stack([r50, r90, rms], axis=-1)


def _normalize(run: visualize.Run, pixels: jax.Array) -> jax.Array:
    """Float pixels (N, H, W) -> the model's normalised (N, H, W, 1) input."""
    from train.train import normalize

    return normalize(pixels[..., None], run.config.data.mean, run.config.data.std)


def _erf_function(run: visualize.Run, block: int, unit, zoom_back: bool):
    """(variables, pixels (N, H, W), scale (N,), centre (N, 2)) -> (ERF (N, H, W), radii
    (N, 3)), compiled once per model and shared by its seeds. The model treats the samples
    independently (eval mode), so the gradient of the units' sum over the batch holds every
    sample's own ERF."""
    name = f"Bottleneck_{block}"

    def make():
        def erfs_of(variables, pixels, scale, centre):
            features = visualize.feature_fn(run, name, variables=variables)

            def units(p):
                if zoom_back:
                    p = zoom_about(p, scale, centre)
                return features(_normalize(run, p))[:, unit[0], unit[1], :].sum()

            erf = jnp.abs(jax.grad(units)(pixels))
            return erf, radii(erf, centre)

        return erfs_of

    return visualize.compiled(run, "scale-erf", make, block, unit, zoom_back)


def measure(
    run: visualize.Run,
    variables: dict,
    pixels: np.ndarray,
    scale: np.ndarray,
    centre: np.ndarray,
    block: int,
    zoom_back: bool = False,
    batch: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """ERFs (N, H, W) and radii (N, 3) of the unit of `block` at each image's centre."""
    unit, _ = unit_at(run, block, centre[0])
    fn = _erf_function(run, block, unit, zoom_back)
    maps, out = [], []
    for start in range(0, len(pixels), batch):
        sl = slice(start, start + batch)
        n = len(pixels[sl])
        pad = batch - n  # fixed shapes: one compilation

        def padded(a, pad=pad):
            a = np.asarray(a, np.float32)
            return np.concatenate([a, np.repeat(a[:1], pad, 0)]) if pad else a

        erf, r = jax.device_get(
            fn(variables, padded(pixels[sl]), padded(scale[sl]), padded(centre[sl]))
        )
        maps.append(erf[:n])
        out.append(r[:n])
    return np.concatenate(maps), np.concatenate(out)


def exponent(scales: Sequence[float], mean_radii: Sequence[float]) -> float:
    """Slope of log(mean radius) on log(scale)."""
    return float(np.polyfit(np.log(scales), np.log(np.asarray(mean_radii, float)), 1)[0])


# --- hand-set offsets (the ceiling) -----------------------------------------------------------


def rigid_scope_positions(k: int, scope: int) -> np.ndarray:
    """(K, K, 2) float64: where each tap of a K x K kernel reads its scope kernel at zero
    rotation, (a, b) + (S - K)/2 (`dk_jax.analysis.kernel_sample_positions` of a zero rotation;
    the values are multiples of 1/2, exact in float32)."""
    zero = np.zeros((1, 1, 1, k * k * 2), np.float32)
    positions = analysis.kernel_sample_positions(zero, (0, 0), kernel_size=k, scope_size=scope)
    return np.asarray(positions[0, 0], np.float64)


def hand_set(run: visualize.Run, variables: dict, factor: float) -> dict:
    """`variables` with every adaptive layer's predicted offsets replaced by constants that put
    its taps at `factor` times their rigid distance from the kernel's centre: image taps
    (`offset_conv`, DCN) at factor * (a - (K-1)/2) * dilation, kernel taps (`rotation_conv`,
    DK) at the scope centre + factor * (their rigid scope position - the scope centre), which
    `rotation_clip="scope"` may then clamp. The predictors' kernels become zero and their biases
    the constants. Other parameters are unchanged."""
    mc = run.config.model
    k = 3
    scope = max(mc.scope_size, k)
    grid = rigid_scope_positions(k, scope)
    rotation = np.tile(((factor - 1.0) * (grid - (scope - 1) / 2)).reshape(-1), mc.rotation_groups)
    taps = np.stack(np.meshgrid(np.arange(k), np.arange(k), indexing="ij"), -1) - (k - 1) / 2
    offset = ((factor - 1.0) * taps).reshape(-1)
    constants = {"rotation_conv": rotation, "offset_conv": offset}

    def visit(tree):
        out = {}
        for key, value in tree.items():
            if key in constants and isinstance(value, dict) and "bias" in value:
                bias = jnp.asarray(constants[key], value["bias"].dtype)
                if bias.shape != value["bias"].shape:
                    raise ValueError(
                        f"{key}: bias of shape {value['bias'].shape}, expected {bias.shape}"
                    )
                out[key] = dict(value, kernel=jnp.zeros_like(value["kernel"]), bias=bias)
            elif isinstance(value, dict):
                out[key] = visit(value)
            else:
                out[key] = value
        return out

    return dict(variables, params=visit(variables["params"]))


# --- offset saturation ---------------------------------------------------------------------


def border_share(run: visualize.Run, variables: dict, pixels: np.ndarray) -> float | None:
    """Share of kernel taps, over every adaptive layer and output location of these images,
    that sit on the border of the scope (where `rotation_clip="scope"` holds them); None for
    convs without kernel offsets."""
    if run.conv not in ("local_dk", "dk_dcn"):
        return None
    mc = run.config.model
    scope = max(mc.scope_size, 3)

    def make():
        def shares_of(variables, p):
            _, state = run.model.apply(
                variables, _normalize(run, p), train=False, mutable=["intermediates"]
            )
            on_border = []
            for path, rotation in jax.tree_util.tree_leaves_with_path(state["intermediates"]):
                if not any(getattr(k, "key", None) == "rotation" for k in path):
                    continue
                ho, wo = rotation.shape[1:3]
                every = np.stack(np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij"), -1)
                pos = analysis.kernel_sample_positions(
                    rotation,
                    every.reshape(-1, 2),
                    kernel_size=3,
                    scope_size=scope,
                    rotation_groups=mc.rotation_groups,
                )
                on = (pos <= 1e-4) | (pos >= scope - 1 - 1e-4)
                on_border.append(on.any(-1).reshape(-1))  # a tap: either coordinate
            return jnp.concatenate(on_border).mean()

        return shares_of

    fn = visualize.compiled(run, "border-share", make)
    chunks = range(0, len(pixels), 64)
    shares = [float(fn(variables, np.asarray(pixels[i : i + 64], np.float32))) for i in chunks]
    sizes = [len(pixels[i : i + 64]) for i in chunks]
    return float(np.average(shares, weights=sizes))


# --- statistics and the decision rule ---------------------------------------------------------


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student t confidence interval of the mean."""
    from scipy import stats

    v = np.asarray(values, float)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return mean, mean - float(half), mean + float(half)


def decide(
    delta: Sequence[float], e_max: float, positive_ok: bool, min_pairs: int = 3
) -> tuple[str, tuple[float, float, float]]:
    """The study's decision rule for one arm, on the per-seed differences
    delta = e(arm) - e(frozen baseline) of the valid seed pairs (both runs' positive controls
    passed) and the arm's ceiling e_max (mean over its valid runs):

    - supported: mean delta >= 0.5 * e_max and the 95% t-interval excludes 0 (lies above 0);
    - contradicted: the interval's upper bound < 0.25 * e_max, with the controls passing
      (every positive control passed and e_max >= CEILING_MIN);
    - otherwise, or with fewer than `min_pairs` valid pairs: inconclusive.

    Returns (verdict, (mean, low, high))."""
    delta = np.asarray(delta, float)
    if len(delta) < max(2, min_pairs):
        return "inconclusive", (float("nan"),) * 3
    mean, low, high = t_interval(delta)
    if mean >= 0.5 * e_max and low > 0:
        return "supported", (mean, low, high)
    if positive_ok and e_max >= CEILING_MIN and high < 0.25 * e_max:
        return "contradicted", (mean, low, high)
    return "inconclusive", (mean, low, high)
