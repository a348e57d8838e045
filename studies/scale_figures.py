"""The scale study's figures (matplotlib), drawn by studies/scale.py into `<docs>/study/`:

- `erf_vs_scale.png`: per arm, r50 of the last stage's unit against the object scale (log-log,
  mean and std over the seeds) for the learned offsets, the zoomed-back input and the hand-set
  offsets;
- `mean_erf.png`: the mean ERF of that unit per arm and scale (first seed);
- `erf_digits.png`: the ERFs of single val digits at the smallest, middle and largest scale,
  frozen baseline beside `local_dk`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from studies.configs import scale_study as study_config


def plot_all(results: dict, run_dirs: dict[str, Path], figures: Path) -> list[Path]:
    """Writes erf_vs_scale.png, mean_erf.png and erf_digits.png to `figures` from the analyses
    (`results`: arm -> seed -> analysis) and, per arm, the run directory of its first seed
    (`run_dirs`: its mean ERF maps and its checkpoint). Returns the paths."""
    from studies import erf_scale
    from train import visualize

    plt = visualize.pyplot()
    figures.mkdir(parents=True, exist_ok=True)
    paths = []
    arms = list(results)
    levels = next(iter(next(iter(results.values())).values()))["scales"]

    fig, axes = plt.subplots(1, len(arms), figsize=(3.0 * len(arms), 3.0), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, arm in zip(axes, arms, strict=True):
        runs = list(results[arm].values())
        for condition, style in (
            ("learned", "o-"),
            ("zoom_back", "s--"),
            ("hand_set_+1", "^:"),
            ("hand_set_-1", "v:"),
        ):
            if condition not in runs[0]["stages"]["last"]:
                continue
            r50 = np.asarray([r["stages"]["last"][condition]["r50"]["mean"] for r in runs])
            ax.errorbar(
                levels, r50.mean(0), yerr=r50.std(0), fmt=style, capsize=2, ms=3, label=condition
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(levels, [f"{s:g}" for s in levels])
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("object scale s")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("r50 of the last stage's unit (px)")
    axes[-1].legend(fontsize=6)
    fig.suptitle("ERF radius against scale (mean ± std over seeds, log-log)", fontsize=9)
    paths.append(visualize.save_figure(plt, fig, figures / "erf_vs_scale.png"))

    fig, axes = plt.subplots(
        len(arms), len(levels), figsize=(1.25 * len(levels), 1.3 * len(arms)), squeeze=False
    )
    for a, arm in enumerate(arms):
        maps = np.load(run_dirs[arm] / "scale_erf.npz")["maps"]
        for b, s in enumerate(levels):
            ax = axes[a, b]
            ax.imshow(np.sqrt(maps[b] / maps[b].max()), cmap="magma", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if a == 0:
                ax.set_title(f"s={s:g}", fontsize=7)
            if b == 0:
                ax.set_ylabel(arm, fontsize=7)
    fig.suptitle(
        "mean ERF of the last stage's unit at the object centre (sqrt), first seed", fontsize=8
    )
    paths.append(visualize.save_figure(plt, fig, figures / "mean_erf.png"))

    # Single digits: three val sources at the smallest, middle and largest scale.
    shown = [a for a in (study_config.BASELINE, "local_dk") if a in results]
    picks = (levels[0], levels[len(levels) // 2], levels[-1])
    fig, axes = plt.subplots(
        3, len(picks) * len(shown), figsize=(1.4 * len(picks) * len(shown), 4.4), squeeze=False
    )
    for r_i, arm in enumerate(shown):
        run = visualize.load_run(run_dirs[arm])
        images, _, scales, centres, sources = erf_scale.load_val(run)
        first = sorted(set(sources.tolist()))[:3]
        block = erf_scale.stage_blocks(run)["last"]
        for p_i, s in enumerate(picks):
            at = np.isin(sources, first) & (scales == s)
            erf, r = erf_scale.measure(
                run, run.variables, images[at].astype(np.float32), scales[at], centres[at], block
            )
            for k in range(3):
                ax = axes[k, p_i * len(shown) + r_i]
                ax.imshow(images[at][k], cmap="gray", vmin=0, vmax=255)
                ax.imshow(np.sqrt(erf[k] / erf[k].max()), cmap="magma", alpha=0.6, vmin=0, vmax=1)
                c = centres[at][k]
                ax.add_patch(
                    plt.Circle((c[1], c[0]), r[k, 0], fill=False, color="cyan", linewidth=0.8)
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_title(f"{arm}\ns={s:g}", fontsize=7)
                ax.set_xlabel(f"r50={r[k, 0]:.1f}", fontsize=6, labelpad=1)
    fig.suptitle("sqrt ERF of the last stage's unit at the centre; cyan: r50", fontsize=8)
    paths.append(visualize.save_figure(plt, fig, figures / "erf_digits.png"))
    return paths
