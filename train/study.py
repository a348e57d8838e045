"""The deformed-digits study: every conv choice at one budget, several seeds, a scale test of
the effective receptive field, and docs/RESULTS.md.

    python -m train.study [--config deformed_digits_study] [--set key=value ...]
                          [--convs depthwise local_dk ...] [--seeds 0 1 2]
                          [--workdir runs/study] [--docs docs]

1. Trains the small ResNet on `digits_deformed` once per (conv, seed) into
   `<workdir>/<conv>_s<seed>/` with `train.train.train_and_evaluate` (a finished run, one with
   summary.json at the full step count, is skipped; an interrupted one resumes).
2. Scale test, per run (cached in `scale_test.json` / `mean_erf.npz` of the run): the val
   digits zoomed about the centre by each scale; top-1 at each scale, and the ERF of the last
   stage's centre unit on a fixed subset, with the radii holding 50% and 90% of its mass.
3. Writes `<docs>/RESULTS.md` and small PNGs under `<docs>/study/`. Text between the
   `<!-- notes -->` and `<!-- /notes -->` markers of an existing RESULTS.md is kept.

The ERF "follows the object" when its radius grows in proportion to the scale: the study fits
log r50 = e * log scale + c per run and reports the exponent e (1: proportional, 0: fixed).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

from train.config import Config, ConfigError, load_config
from train.configs import deformed_digits_study as study_config
from train.images import DatasetError

log = logging.getLogger("train.study")
BASELINE = "depthwise"
NOTES = ("<!-- notes -->", "<!-- /notes -->")


def run_name(conv: str, seed: int) -> str:
    return f"{conv}_s{seed}"


def finished(run_dir: Path, steps: int) -> bool:
    path = run_dir / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("steps") == steps


def total_steps(config: Config) -> int:
    if config.optim.num_steps:
        return config.optim.num_steps
    raise ConfigError("the study fixes its budget in steps: set optim.num_steps > 0")


def train_all(config: Config, convs, seeds, workdir: Path) -> dict[str, float]:
    """Trains every (conv, seed) not finished yet; returns the wall seconds of those it ran."""
    from train.train import train_and_evaluate

    steps = total_steps(config)
    walls = {}
    for seed in seeds:  # seed-major: a run cut short still has every variant of seed 0
        for conv in convs:
            run_dir = workdir / run_name(conv, seed)
            if finished(run_dir, steps):
                log.info("%s: finished, skipped", run_dir)
                continue
            c = config.copy()
            c.model.conv = conv
            c.seed = seed
            c.workdir = str(run_dir)
            c.name = f"{config.name}/{run_name(conv, seed)}"
            t0 = time.time()
            train_and_evaluate(c, run_dir)
            walls[run_name(conv, seed)] = time.time() - t0
    return walls


def step_time(run_dir: Path, batch_size: int) -> float:
    """Median seconds per training step from metrics.jsonl, leaving out the first logging
    window (it includes the compilation)."""
    from train.report import read_metrics

    rates = [
        e["images_per_s"] for e in read_metrics(run_dir / "metrics.jsonl") if "images_per_s" in e
    ]
    rates = rates[1:] or rates
    return float(batch_size / np.median(rates)) if rates else float("nan")


def scale_test(run_dir: Path, scales, erf_images: int) -> dict:
    """Top-1 and ERF radii of one run at every scale; cached in the run directory."""
    from train import visualize

    cache = run_dir / "scale_test.json"
    key = {"scales": list(scales), "erf_images": erf_images}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    run = visualize.load_run(run_dir)
    images, labels = visualize.load_val_images(run)
    subset = np.sort(np.random.default_rng(0).choice(len(images), erf_images, replace=False))
    top1, r50, r90, maps = [], [], [], []
    for scale in scales:
        scaled = visualize.render_at_scale(images, scale)
        top1.append(float(np.mean(visualize.predict(run, scaled) == labels)))
        erf, radii = visualize.measure_erf(run, scaled[subset], masses=(0.5, 0.9))
        r50.append(radii[:, 0].tolist())
        r90.append(radii[:, 1].tolist())
        maps.append((erf / erf.sum(axis=(1, 2), keepdims=True)).mean(0))
    result = {
        "key": key,
        "conv": run.conv,
        "top1": top1,
        "r50": r50,
        "r90": r90,
        "centre_unit": list(visualize.centre_unit(run)[0]),
    }
    np.savez_compressed(run_dir / "mean_erf.npz", maps=np.stack(maps), scales=np.asarray(scales))
    from train.report import write_json_atomic

    write_json_atomic(cache, result)
    return result


def elasticity(scales, radii) -> float:
    """Slope of log(mean radius) against log(scale): 1 when the radius is proportional to the
    scale, 0 when it does not move."""
    mean = np.asarray([np.nanmean(r) for r in radii])
    return float(np.polyfit(np.log(scales), np.log(mean), 1)[0])


def pooled_correlation(scales, radii) -> float:
    """Pearson correlation between the scale and the per-image radius, over all images."""
    x = np.concatenate([np.full(len(r), s) for s, r in zip(scales, radii, strict=True)])
    y = np.concatenate([np.asarray(r, float) for r in radii])
    ok = np.isfinite(y)
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def _ms(values, fmt="{:.3f}") -> str:
    values = np.asarray(values, float)
    if len(values) < 2:
        return fmt.format(values.mean())
    return f"{fmt.format(values.mean())} ± {fmt.format(values.std(ddof=1))}"


def _std(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def collect(config: Config, convs, seeds, workdir: Path, scales, erf_images: int) -> dict:
    """Everything the report needs, per conv: lists over the seeds."""
    out = {}
    for conv in convs:
        rows = []
        for seed in seeds:
            run_dir = workdir / run_name(conv, seed)
            summary = json.loads((run_dir / "summary.json").read_text())
            st = scale_test(run_dir, scales, erf_images)
            rows.append(
                {
                    "seed": seed,
                    "val_top1": summary["val_top1"],
                    "params": summary["params"],
                    "train_s": summary["train_s"],
                    "step_s": step_time(run_dir, config.optim.batch_size),
                    "scale_top1": st["top1"],
                    "r50": [float(np.nanmean(r)) for r in st["r50"]],
                    "r90": [float(np.nanmean(r)) for r in st["r90"]],
                    "e50": elasticity(scales, st["r50"]),
                    "e90": elasticity(scales, st["r90"]),
                    "corr50": pooled_correlation(scales, st["r50"]),
                }
            )
        out[conv] = rows
    return out


def verdict(results: dict, key: str, higher_is: str) -> list[str]:
    """One sentence per adaptive conv: does it beat the baseline by more than the spread?
    'Beyond the spread' means the mean ± std intervals over the seeds do not overlap."""
    if BASELINE not in results:
        return []
    base = np.asarray([r[key] for r in results[BASELINE]])
    lines = []
    for conv, rows in results.items():
        if conv == BASELINE:
            continue
        v = np.asarray([r[key] for r in rows])
        diff = v.mean() - base.mean()
        spread = _std(v) + _std(base)
        if abs(diff) > spread:
            word = "above" if diff > 0 else "below"
            outcome = f"**{word}** the baseline beyond the spread"
        else:
            outcome = "within the spread of the baseline (no clear difference)"
        lines.append(
            f"- `{conv}`: {higher_is} {v.mean():.3f} vs {base.mean():.3f} "
            f"(difference {diff:+.3f}, sum of stds {spread:.3f}): {outcome}."
        )
    return lines


def plot_all(
    results: dict, scales, workdir: Path, figures: Path, seeds, batch_size: int
) -> list[Path]:
    from train import visualize

    plt = visualize._pyplot()
    figures.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for k, (conv, rows) in enumerate(results.items()):
        acc = np.asarray([r["val_top1"] for r in rows])
        st = np.asarray([r["step_s"] for r in rows]) * 1000
        ax.errorbar(
            st.mean(),
            acc.mean(),
            xerr=_std(st),
            yerr=_std(acc),
            fmt="o",
            color=f"C{k}",
            capsize=3,
            label=conv,
        )
    ax.set_xlabel(f"training step time (ms, batch {batch_size}, 2-core CPU)")
    ax.set_ylabel("val top-1")
    ax.set_title("accuracy against step time (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(figures / "accuracy_vs_step_time.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.3))
    for k, (conv, rows) in enumerate(results.items()):
        r50 = np.asarray([r["r50"] for r in rows])
        acc = np.asarray([r["scale_top1"] for r in rows])
        axes[0].errorbar(
            scales, r50.mean(0), yerr=r50.std(0), marker="o", color=f"C{k}", capsize=2, label=conv
        )
        axes[1].errorbar(
            scales, acc.mean(0), yerr=acc.std(0), marker="o", color=f"C{k}", capsize=2, label=conv
        )
    base = np.asarray([r["r50"] for r in results.get(BASELINE, next(iter(results.values())))])
    ref = base.mean(0)[list(scales).index(1.0)] if 1.0 in scales else base.mean()
    axes[0].plot(
        scales, ref * np.asarray(scales), "k--", linewidth=0.8, label="proportional to scale"
    )
    axes[0].set_xlabel("object scale")
    axes[0].set_ylabel("ERF radius holding 50% mass (px)")
    axes[1].set_xlabel("object scale")
    axes[1].set_ylabel("val top-1")
    axes[0].legend(fontsize=6)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("scale test (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    paths.append(figures / "scale_test.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    # Mean normalised ERF per conv and scale (seed 0), square-root shaded.
    convs = list(results)
    fig, axes = plt.subplots(
        len(convs), len(scales), figsize=(1.25 * len(scales), 1.3 * len(convs)), squeeze=False
    )
    for a, conv in enumerate(convs):
        maps = np.load(workdir / run_name(conv, seeds[0]) / "mean_erf.npz")["maps"]
        for b, scale in enumerate(scales):
            ax = axes[a, b]
            shown = np.sqrt(maps[b] / maps[b].max())
            ax.imshow(shown, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if a == 0:
                ax.set_title(f"x{scale:g}", fontsize=7)
            if b == 0:
                ax.set_ylabel(conv, fontsize=7)
    fig.suptitle("mean ERF of the centre unit (sqrt), seed 0", fontsize=8)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.95))
    paths.append(figures / "mean_erf.png")
    fig.savefig(paths[-1], dpi=70)
    plt.close(fig)

    adaptive = "local_dk" if "local_dk" in results else next(iter(results))
    run = visualize.load_run(workdir / run_name(adaptive, seeds[0]))
    runs = [run]
    if BASELINE in results and adaptive != BASELINE:
        runs.append(visualize.load_run(workdir / run_name(BASELINE, seeds[0])))
    images, _ = visualize.load_val_images(run, limit=3, seed=1)
    paths.append(
        visualize.erf_figure(runs, images, (0.6, 1.0, 1.4), figures / f"erf_{adaptive}.png")
    )
    kp = visualize.kernel_positions_figure(
        run, images, (0.6, 1.0, 1.4), figures / f"kernel_positions_{adaptive}.png"
    )
    if kp is not None:
        paths.append(kp)
    return paths


def write_results(
    path: Path,
    results: dict,
    scales,
    config: Config,
    walls: dict,
    figures: Path,
    notes: str,
    study_wall: float | None,
) -> None:
    rel = figures.relative_to(path.parent)
    steps = total_steps(config)
    o = config.optim
    n_seeds = len(next(iter(results.values())))
    lines = [
        "# Results: deformable kernels on deformed digits",
        "",
        "Written by `make study` (`python -m train.study`); numbers come from the runs under "
        "`runs/study/`. "
        f"Small ResNet (width {config.model.width}, stages {tuple(config.model.stage_sizes)}, "
        f"adaptive stages {tuple(config.model.adaptive_stages)}) on the embedded "
        f"`digits_deformed` data (32x32, 10 classes), {steps} SGD steps of {o.batch_size} "
        f"images for every variant (about {steps * o.batch_size / _train_images(config):.1f} "
        "epochs), seeds "
        f"{', '.join(str(r['seed']) for r in next(iter(results.values())))}. "
        f"Machine: {platform.machine()} CPU, {_cpu_count()} cores, no GPU; other jobs (C++ "
        "builds) ran on the same cores at times, so step times are contended and only "
        "roughly comparable.",
        "",
    ]
    if study_wall is not None:
        lines += [
            "Wall time of the `make study` invocation that trained the runs, up to the end of "
            f"training: {study_wall / 60:.1f} min (the scale test and figures add about 3 min).",
            "",
        ]
    lines += [
        f"## Accuracy, size and speed (mean ± std over {n_seeds} seeds)",
        "",
        "| conv | val top-1 | parameters | step time (ms) | train time per run (s) |",
        "|---|---|---|---|---|",
    ]
    for conv, rows in results.items():
        lines.append(
            f"| `{conv}` | {_ms([r['val_top1'] for r in rows])} | {rows[0]['params']:,} | "
            f"{_ms([r['step_s'] * 1000 for r in rows], '{:.0f}')} | "
            f"{_ms([r['train_s'] for r in rows], '{:.0f}')} |"
        )
    lines += [
        "",
        "Step time: the median over logging windows of one training step (batch "
        f"{o.batch_size}, forward + backward + update, data loading overlapped), first window "
        "(compilation) left out, then mean ± std over the seeds.",
        "",
        f"![accuracy against step time]({rel}/accuracy_vs_step_time.png)",
        "",
        "Against the rigid baseline (`depthwise`); 'beyond the spread' means the mean ± std "
        "intervals do not overlap (with 3 seeds this is a rough screen, not a significance "
        "test):",
        "",
        *verdict(results, "val_top1", "val top-1"),
        "",
        "## Scale test",
        "",
        "The val digits (all of them for top-1; a fixed subset for the ERFs) are zoomed about "
        f"the image centre by {', '.join(f'{s:g}' for s in scales)} (bilinear, zero fill, "
        "cut at the border) and fed to the trained models. The ERF is the gradient magnitude of "
        "the last stage's centre unit (all channels) with respect to the input pixels "
        "(`dk_jax.analysis.effective_receptive_field`); r50 / r90 are the radii about the "
        "unit's theoretical centre holding 50% / 90% of the gradient mass "
        "(`erf_radius`). The theoretical receptive field of that unit is 43x43 pixels, larger "
        "than the image, so the architecture alone does not bound the ERF here.",
        "",
        "The exponent e is the slope of log(mean radius) against log(scale), fitted per run "
        "(1: the ERF grows in proportion to the object, 0: it does not move); corr is the "
        "Pearson correlation between scale and per-image r50, pooled over images and scales.",
        "",
        "| conv | " + " | ".join(f"top-1 x{s:g}" for s in scales) + " | r50 x"
        f"{scales[0]:g} -> x{scales[-1]:g} (px) | e (r50) | e (r90) | corr (r50) |",
        "|---|" + "---|" * (len(scales) + 4),
    ]
    for conv, rows in results.items():
        acc = np.asarray([r["scale_top1"] for r in rows])
        r50 = np.asarray([r["r50"] for r in rows])
        lines.append(
            f"| `{conv}` | "
            + " | ".join(_ms(acc[:, k]) for k in range(len(scales)))
            + f" | {r50[:, 0].mean():.2f} -> {r50[:, -1].mean():.2f} | "
            f"{_ms([r['e50'] for r in rows], '{:.2f}')} | "
            f"{_ms([r['e90'] for r in rows], '{:.2f}')} | "
            f"{_ms([r['corr50'] for r in rows], '{:.2f}')} |"
        )
    lines += [
        "",
        "Does the ERF follow the object's scale more closely than the baseline's (exponent e of "
        "r50, same screen as above)?",
        "",
        *verdict(results, "e50", "e(r50)"),
        "",
        "And of r90:",
        "",
        *verdict(results, "e90", "e(r90)"),
        "",
        f"![scale test]({rel}/scale_test.png)",
        "",
        f"![mean ERF per conv and scale]({rel}/mean_erf.png)",
        "",
    ]
    erf_pngs = sorted(figures.glob("erf_*.png"))
    kp_pngs = sorted(figures.glob("kernel_positions_*.png"))
    if erf_pngs:
        lines += [
            "## ERFs on single images",
            "",
            "Square-root shaded ERF of the centre unit over three val digits at scales 0.6, 1 "
            "and 1.4 (`python -m train.visualize`), the deformable model beside the rigid "
            "baseline; cyan: the r50 circle.",
            "",
            *[f"![{p.stem}]({rel}/{p.name})" for p in erf_pngs],
            "",
        ]
    if kp_pngs:
        lines += [
            "Where the first adaptive layer's 3x3 taps read its 4x4 scope kernel (group 0) at "
            "three output locations (crosses: the rigid positions; one colour per image):",
            "",
            *[f"![{p.stem}]({rel}/{p.name})" for p in kp_pngs],
            "",
        ]
    lines += [
        "## Notes",
        "",
        NOTES[0],
        notes.strip() or "(none yet)",
        NOTES[1],
        "",
        "Reproduce: `make study` (or `python -m train.study`); finished runs are skipped, so a "
        "second invocation only redoes the analysis. Per-run wall times: "
        + (", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) or "(all runs were cached)")
        + ".",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _train_images(config: Config) -> int:
    from train import input_pipeline

    return len(input_pipeline.read_split(config.data.root, "train"))


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def read_notes(path: Path) -> str:
    if not path.is_file():
        return ""
    m = re.search(re.escape(NOTES[0]) + r"(.*?)" + re.escape(NOTES[1]), path.read_text(), re.S)
    text = m.group(1).strip() if m else ""
    return "" if text == "(none yet)" else text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="deformed_digits_study")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--convs", nargs="+", default=list(study_config.CONVS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(study_config.SEEDS))
    p.add_argument("--scales", nargs="+", type=float, default=list(study_config.SCALES))
    p.add_argument("--erf-images", type=int, default=64, help="val images per scale for ERFs")
    p.add_argument("--workdir", default=None, help="default: the config's workdir")
    p.add_argument("--docs", default="docs", help="RESULTS.md and study/*.png go here")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for name in ("absl", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t0 = time.time()
    try:
        config = load_config(args.config, args.overrides)
        total_steps(config)
        from train.models import CONVS

        unknown = [c for c in args.convs if c not in CONVS]
        if unknown:
            raise ConfigError(f"--convs: unknown {unknown}; choose from {', '.join(CONVS)}")
        workdir = Path(args.workdir or config.workdir)
        walls = train_all(config, args.convs, args.seeds, workdir)
        timing = workdir / "study_timing.json"
        if walls:
            trained_wall = time.time() - t0
            timing.write_text(json.dumps({"wall_s": trained_wall, "runs": walls}, indent=1))
        elif timing.is_file():  # a re-run: report the invocation that trained the runs
            saved = json.loads(timing.read_text())
            walls, trained_wall = saved["runs"], saved["wall_s"]
        else:
            trained_wall = None
        log.info("scale test and ERFs")
        results = collect(config, args.convs, args.seeds, workdir, args.scales, args.erf_images)
        docs = Path(args.docs)
        figures = docs / "study"
        plot_all(results, args.scales, workdir, figures, args.seeds, config.optim.batch_size)
        results_md = docs / "RESULTS.md"
        (workdir / "study.json").write_text(json.dumps(results, indent=1) + "\n")
        write_results(
            results_md,
            results,
            args.scales,
            config,
            walls,
            figures,
            read_notes(results_md),
            trained_wall,
        )
    except (ConfigError, DatasetError) as e:
        print(f"train.study: error: {e}", file=sys.stderr)
        return 2
    log.info("wrote %s in %.1f min", results_md, (time.time() - t0) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
