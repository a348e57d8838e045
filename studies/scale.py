"""The scale study: does a deformable layer's effective receptive field (ERF) follow the
object's scale? A pre-registered test on `digits_scaled` (see train/configs/digits_scaled_study.py
and train/erf_scale.py).

    python -m train.study [--config digits_scaled_study] [--set key=value ...]
                          [--arms frozen local_dk dcn dk_dcn] [--seeds 0 1 2 3 4]
                          [--erf-sources 48] [--workdir runs/scale_study] [--docs docs]

1. Trains the small ResNet once per (arm, seed) into `<workdir>/<arm>_s<seed>/` with
   `train.train.train_and_evaluate`, seed-major (a study cut short has every arm of its first
   seeds). A finished run (summary.json at the full step count) is skipped; an interrupted one
   resumes. The arms of one seed see the same images in the same order.
2. Analyses every run (cached in its `scale_study.json`): top-1 at every val scale; on the val
   digits of `--erf-sources` fixed source digits at every scale, the ERF radii of a unit at
   the object's centre (last stage and the stage before), with the run's learned offsets, the
   zoomed-back input (positive control) and hand-set offsets (ceiling), and the share of
   kernel taps on the scope border.
3. Applies the decision rule (`DECISION_RULE`, fixed before the runs) and writes
   `<docs>/RESULTS.md` and `<docs>/study/*.png`. Text between `<!-- notes -->` and
   `<!-- /notes -->` of an existing RESULTS.md is kept.
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
from train.configs import digits_scaled_study as study_config
from train.images import DatasetError

log = logging.getLogger("train.study")
NOTES = ("<!-- notes -->", "<!-- /notes -->")
ANALYSIS_VERSION = 1
PRIMARY = ("last", "r50")  # the decision rule's statistic: r50 of the last stage's unit

DECISION_RULE = """\
Registered on 2026-11-30, before the study's runs; `train.erf_scale.decide` implements it and
`tests/test_study.py` checks that it returns each verdict. Only the budget pilots had been
trained (seed 0 of `frozen`, 1000 steps, and of `local_dk`, 800 steps); the frozen pilot's
exponents (0.12 learned, 1.01 zoomed back) were seen while the measurement was tested, before
the rule was written; the `local_dk` pilot was analysed after it.

- **Statistic.** Per run, e = the slope of log(mean r50 over the val images at scale s) on
  log(s), for the unit of the last stage at the object's centre, with the offsets the model
  predicts (r90, the RMS radius and the intermediate stage are reported, not decided on).
- **Controls, every run.** Positive: the same exponent with the input zoomed back by 1/s
  about the object's centre must be >= 0.8, else the run is void (the measurement could not
  see an effect); a pair of runs (arm, seed) and (frozen, seed) counts only if neither is
  void. Ceiling: e_max(run) = the largest exponent over the hand-set offsets that put every
  adaptive layer's taps at s^a times their rigid distance from the kernel centre, a = +1 or
  -1; e_max(arm) is its mean over the arm's valid runs. Negative: the frozen baseline (the
  same layer as `local_dk` with its rotation held at zero).
- **Verdict per arm.** With Delta = e(arm) - e(frozen) paired by seed and its 95% Student t
  interval over the valid pairs: **supported** if mean Delta >= 0.5 e_max(arm) and the
  interval excludes 0; **contradicted** if the interval's upper bound is below
  0.25 e_max(arm), with the controls passing (every positive control passed, e_max(arm) >= 0.1);
  otherwise, or with fewer than 3 valid pairs, **inconclusive**.
- **Accuracy.** Val top-1 per scale and overall, mean and 95% t-interval over the seeds, and
  the paired differences against the frozen baseline with their intervals."""


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}"


def finished(run_dir: Path, steps: int) -> bool:
    path = run_dir / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("steps") == steps


def total_steps(config: Config) -> int:
    if config.optim.num_steps:
        return config.optim.num_steps
    raise ConfigError("the study fixes its budget in steps: set optim.num_steps > 0")


def arm_config(config: Config, arm: str, seed: int, workdir: Path) -> Config:
    conv, freeze = study_config.ARMS[arm]
    c = config.copy()
    c.model.conv = conv
    c.optim.freeze = tuple(freeze)
    c.seed = seed
    c.workdir = str(workdir / run_name(arm, seed))
    c.name = f"{config.name}/{run_name(arm, seed)}"
    return c


def train_all(config: Config, arms, seeds, workdir: Path) -> dict[str, float]:
    """Trains every (arm, seed) not finished yet; returns the wall seconds of those it ran."""
    from train.train import train_and_evaluate

    steps = total_steps(config)
    walls = {}
    for seed in seeds:
        for arm in arms:
            run_dir = workdir / run_name(arm, seed)
            if finished(run_dir, steps):
                log.info("%s: finished, skipped", run_dir)
                continue
            t0 = time.time()
            train_and_evaluate(arm_config(config, arm, seed, workdir), run_dir)
            walls[run_name(arm, seed)] = time.time() - t0
    return walls


def step_time(run_dir: Path, batch_size: int) -> float:
    """Median seconds per training step over the logging windows after the first (which holds
    the compilation)."""
    from train.report import read_metrics

    rates = [
        e["images_per_s"] for e in read_metrics(run_dir / "metrics.jsonl") if "images_per_s" in e
    ]
    rates = rates[1:] or rates
    return float(batch_size / np.median(rates)) if rates else float("nan")


# --- per-run analysis -------------------------------------------------------------------------


def _conditions(run, pix, sc, ce, levels, adaptive: bool, stages: dict[str, int]):
    """Per stage: the unit, and per condition (learned, zoom_back, hand_set_+1/-1) and radius
    statistic the mean over the images at each scale and the exponent; and the mean ERF map of
    the last stage's unit per scale."""
    from train import erf_scale

    conditions: dict = {}
    maps = {}
    for stage, block in stages.items():
        unit, unit_centre = erf_scale.unit_at(run, block, ce[0])
        found = {}
        erf, found["learned"] = erf_scale.measure(run, run.variables, pix, sc, ce, block)
        if stage == "last":
            maps = {s: erf[sc == s].mean(0) for s in levels}
        _, found["zoom_back"] = erf_scale.measure(
            run, run.variables, pix, sc, ce, block, zoom_back=True
        )
        if adaptive:
            for a in erf_scale.HAND_SET_POWERS:
                r = np.zeros((len(pix), 3), np.float32)
                for s in levels:
                    at = sc == s
                    variables = erf_scale.hand_set(run, run.variables, s**a)
                    _, r[at] = erf_scale.measure(run, variables, pix[at], sc[at], ce[at], block)
                found[f"hand_set_{a:+g}"] = r
        conditions[stage] = {"unit": list(unit), "unit_centre": list(unit_centre)}
        for name, r in found.items():
            conditions[stage][name] = {}
            for k, stat in enumerate(erf_scale.STATS):
                means = [float(np.nanmean(r[sc == s, k])) for s in levels]
                conditions[stage][name][stat] = {
                    "mean": means,
                    "e": erf_scale.exponent(levels, means),
                }
    return conditions, maps


def _cached(path: Path, key: dict) -> dict | None:
    """The analysis stored at `path` if it was made with `key`, else None."""
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    return None


def _erf_subset(sources: np.ndarray, n: int) -> np.ndarray:
    """Mask of the val images of `n` source digits drawn once (the same for every run)."""
    chosen = np.random.default_rng(0).choice(np.unique(sources), n, replace=False)
    return np.isin(sources, chosen)


def analyse(run_dir: Path, erf_sources: int) -> dict:
    """Accuracy, ERF radii under the three conditions, exponents and the border share of one
    run; cached in `scale_study.json` (mean ERF maps in `scale_erf.npz`)."""
    from train import erf_scale, visualize
    from train.report import write_json_atomic

    cache = run_dir / "scale_study.json"
    key = {"version": ANALYSIS_VERSION, "erf_sources": erf_sources}
    cached = _cached(cache, key)
    if cached is not None:
        return cached
    run = visualize.load_run(run_dir)
    images, labels, scales, centres, sources = erf_scale.load_val(run)
    levels = sorted(set(scales.tolist()))
    predicted = visualize.predict(run, images)
    top1 = [float(np.mean(predicted[scales == s] == labels[scales == s])) for s in levels]

    subset = _erf_subset(sources, erf_sources)
    pix, sc, ce = images[subset].astype(np.float32), scales[subset], centres[subset]
    if not np.all(ce == ce[0]):
        raise DatasetError("the scale study expects every val digit at one centre")
    adaptive = not run.config.optim.freeze  # the frozen baseline has no offsets to set

    conditions, maps = _conditions(run, pix, sc, ce, levels, adaptive, erf_scale.stage_blocks(run))
    border = [erf_scale.border_share(run, run.variables, pix[sc == s]) for s in levels]
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {
        "key": key,
        "conv": run.conv,
        "freeze": list(run.config.optim.freeze),
        "params": summary["params"],
        "val_top1": summary["val_top1"],
        "train_s": summary["train_s"],
        "step_s": step_time(run_dir, run.config.optim.batch_size),
        "scales": levels,
        "top1": top1,
        "erf_images": int(subset.sum()),
        "stages": conditions,
        "border_share": border,
    }
    np.savez_compressed(
        run_dir / "scale_erf.npz", maps=np.stack([maps[s] for s in levels]), scales=levels
    )
    write_json_atomic(cache, result)
    return result


def analyse_padded(run_dir: Path, erf_sources: int, pad: int) -> dict:
    """Exploratory, outside the registered rule: the last stage's ERFs measured as in `analyse`
    (same images, conditions and statistics) with every val image in the centre of a canvas
    `pad` px larger on each side (background pixels), so that wide ERFs are not cut by the
    training canvas's border. The networks are fully convolutional. Cached in
    `scale_study_pad<pad>.json`."""
    from train import erf_scale, visualize
    from train.report import write_json_atomic

    cache = run_dir / f"scale_study_pad{pad}.json"
    key = {"version": ANALYSIS_VERSION, "erf_sources": erf_sources, "pad": pad}
    cached = _cached(cache, key)
    if cached is not None:
        return cached
    run = visualize.load_run(run_dir)
    images, _, scales, centres, sources = erf_scale.load_val(run)
    levels = sorted(set(scales.tolist()))
    subset = _erf_subset(sources, erf_sources)
    pix = np.pad(images[subset], ((0, 0), (pad, pad), (pad, pad))).astype(np.float32)
    sc, ce = scales[subset], centres[subset] + pad
    stages = {"last": erf_scale.stage_blocks(run)["last"]}
    conditions, _ = _conditions(run, pix, sc, ce, levels, not run.config.optim.freeze, stages)
    result = {"key": key, "scales": levels, "stages": conditions}
    write_json_atomic(cache, result)
    return result


# --- the report ---------------------------------------------------------------------------------


def exponent_of(result: dict, condition: str, stage: str = "last", stat: str = "r50") -> float:
    return result["stages"][stage][condition][stat]["e"]


def e_max_of(result: dict) -> float:
    """The run's ceiling: the largest hand-set exponent of the primary statistic."""
    from train import erf_scale

    stage, stat = PRIMARY
    return max(
        exponent_of(result, f"hand_set_{a:+g}", stage, stat) for a in erf_scale.HAND_SET_POWERS
    )


def positive_ok(result: dict) -> bool:
    from train import erf_scale

    return exponent_of(result, "zoom_back", *PRIMARY) >= erf_scale.POSITIVE_MIN


def verdicts(results: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """The decision rule per arm against the baseline (results: arm -> seed -> analysis)."""
    from train import erf_scale

    base = results.get(study_config.BASELINE, {})
    out = {}
    for arm, runs in results.items():
        if arm == study_config.BASELINE:
            continue
        pairs = [s for s in runs if s in base and positive_ok(runs[s]) and positive_ok(base[s])]
        delta = [
            exponent_of(runs[s], "learned", *PRIMARY) - exponent_of(base[s], "learned", *PRIMARY)
            for s in pairs
        ]
        valid = [r for r in runs.values() if positive_ok(r)]
        e_max = float(np.mean([e_max_of(r) for r in valid])) if valid else float("nan")
        all_ok = all(positive_ok(r) for r in runs.values()) and all(
            positive_ok(base[s]) for s in runs if s in base
        )
        verdict, (mean, low, high) = erf_scale.decide(delta, e_max, all_ok)
        out[arm] = {
            "pairs": pairs,
            "delta": delta,
            "mean": mean,
            "low": low,
            "high": high,
            "e_max": e_max,
            "controls_ok": all_ok,
            "verdict": verdict,
        }
    return out


def _ci(values, fmt="{:.3f}") -> str:
    from train import erf_scale

    v = np.asarray(values, float)
    if len(v) < 2:
        return fmt.format(v.mean())
    mean, low, high = erf_scale.t_interval(v)
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def write_results(
    path: Path,
    results: dict,
    config: Config,
    walls: dict,
    figures: Path,
    notes: str,
    study_wall: float | None,
    decided: dict,
    explored: tuple[int, dict, dict] | None = None,
) -> None:
    from train import erf_scale

    rel = figures.relative_to(path.parent)
    steps = total_steps(config)
    o = config.optim
    any_run = next(iter(next(iter(results.values())).values()))
    levels = any_run["scales"]
    seeds = sorted({s for runs in results.values() for s in runs})
    lines = [
        "# Results: does the deformable kernels' receptive field follow the object's scale?",
        "",
        "Written by `make study` (`python -m train.study`) from the runs under "
        "`runs/scale_study/`. Data: `digits_scaled` (48x48; each digit's 8x8 scan rendered "
        "into a box of 16*s px with mild affine and elastic deformation; train s log-uniform in "
        f"[0.55, 1.75] with centre jitter; val: every held-out source digit at s in "
        f"{{{', '.join(f'{s:g}' for s in levels)}}}, centred). Model: the small ResNet (width "
        f"{config.model.width}, stages {tuple(config.model.stage_sizes)}, stem stride "
        f"{config.model.stem_stride}), its stages {tuple(config.model.adaptive_stages)} built "
        f"with each arm's conv; {steps} SGD steps of {o.batch_size} images per run (about "
        f"{steps * o.batch_size / _train_images(config):.1f} epochs), seeds "
        f"{', '.join(map(str, seeds))}; the arms of one seed see the same images in the same "
        f"order. Machine: {platform.machine()} CPU, {_cpu_count()} cores, no GPU.",
        "",
    ]
    if study_wall is not None:
        lines += [
            "Wall time of the `make study` invocation that trained the runs (training, analysis "
            f"and figures): {study_wall / 60:.1f} min.",
            "",
        ]
    lines += [
        "## Decision rule",
        "",
        DECISION_RULE,
        "",
        "## Verdicts",
        "",
        "| arm | valid pairs | Delta = e(arm) - e(frozen), mean [95% CI] | e_max(arm) | "
        "0.5 e_max | 0.25 e_max | controls | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, d in decided.items():
        interval = (
            f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            if np.isfinite(d["mean"])
            else "not computed (fewer than 3 valid pairs)"
        )
        lines.append(
            f"| `{arm}` | {len(d['pairs'])} | {interval} | {d['e_max']:.3f} | "
            f"{0.5 * d['e_max']:.3f} | "
            f"{0.25 * d['e_max']:.3f} | {'pass' if d['controls_ok'] else 'FAIL'} | "
            f"**{d['verdict']}** |"
        )
    lines += [
        "",
        "## Controls and exponents, every run",
        "",
        "e of r50 at the last stage's unit; `zoom back` is the positive control (>= "
        f"{erf_scale.POSITIVE_MIN} or the run is void), `hand set a=+1/-1` the ceiling "
        "candidates (e_max is the larger).",
        "",
        "| run | e (learned) | e zoom back | e hand set a=+1 | e hand set a=-1 | e_max | valid |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, runs in results.items():
        for seed, r in sorted(runs.items()):
            hand = [
                f"{exponent_of(r, f'hand_set_{a:+g}'):.3f}"
                if f"hand_set_{a:+g}" in r["stages"]["last"]
                else "-"
                for a in erf_scale.HAND_SET_POWERS
            ]
            has_hand = hand[0] != "-"
            lines.append(
                f"| `{run_name(arm, seed)}` | {exponent_of(r, 'learned'):.3f} | "
                f"{exponent_of(r, 'zoom_back'):.3f} | {hand[0]} | {hand[1]} | "
                f"{f'{e_max_of(r):.3f}' if has_hand else '-'} | "
                f"{'yes' if positive_ok(r) else '**void**'} |"
            )
    lines += [
        "",
        "Every statistic's exponent (mean [95% CI] over the seeds; learned offsets):",
        "",
        "| arm | "
        + " | ".join(f"e {stat} {stage}" for stage in ("last", "mid") for stat in erf_scale.STATS)
        + " | r50 last, px at s = "
        + " / ".join(f"{s:g}" for s in levels)
        + " |",
        "|---|" + "---|" * 7,
    ]
    for arm, runs in results.items():
        cells = [
            _ci([exponent_of(r, "learned", stage, stat) for r in runs.values()], "{:.2f}")
            for stage in ("last", "mid")
            for stat in erf_scale.STATS
        ]
        r50 = np.mean([r["stages"]["last"]["learned"]["r50"]["mean"] for r in runs.values()], 0)
        lines.append(
            f"| `{arm}` | " + " | ".join(cells) + " | " + " / ".join(f"{v:.1f}" for v in r50) + " |"
        )
    lines += [
        "",
        f"![ERF radius against scale]({rel}/erf_vs_scale.png)",
        "",
        f"![mean ERF per arm and scale]({rel}/mean_erf.png)",
        "",
        "## Accuracy",
        "",
        "Val top-1, mean [95% CI] over the seeds; the last column is the paired difference "
        "against `frozen` (same seed).",
        "",
        "| arm | parameters | "
        + " | ".join(f"s={s:g}" for s in levels)
        + " | overall | overall - frozen |",
        "|---|---|" + "---|" * (len(levels) + 2),
    ]
    base = results.get(study_config.BASELINE, {})
    for arm, runs in results.items():
        acc = np.asarray([r["top1"] for r in runs.values()])
        overall = [r["val_top1"] for r in runs.values()]
        diff = [runs[s]["val_top1"] - base[s]["val_top1"] for s in runs if s in base]
        params = sorted({r["params"] for r in runs.values()})
        lines.append(
            f"| `{arm}` | {', '.join(f'{p:,}' for p in params)} | "
            + " | ".join(_ci(acc[:, k]) for k in range(len(levels)))
            + f" | {_ci(overall)} | "
            + ("-" if arm == study_config.BASELINE else _ci(diff, "{:+.3f}"))
            + " |"
        )
    lines += [
        "",
        "Paired differences against `frozen` per scale (mean [95% CI]):",
        "",
        "| arm | " + " | ".join(f"s={s:g}" for s in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for arm, runs in results.items():
        if arm == study_config.BASELINE:
            continue
        common = [s for s in runs if s in base]
        cells = [
            _ci([runs[s]["top1"][k] - base[s]["top1"][k] for s in common], "{:+.3f}")
            for k in range(len(levels))
        ]
        lines.append(f"| `{arm}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Offset saturation",
        "",
        'Share of kernel taps held on the scope border by `rotation_clip="scope"`, over every '
        "adaptive layer and output location of the ERF images (mean over seeds):",
        "",
        "| arm | " + " | ".join(f"s={s:g}" for s in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for arm, runs in results.items():
        shares = [r["border_share"] for r in runs.values()]
        if shares[0][0] is None:
            continue
        lines.append(f"| `{arm}` | " + " | ".join(f"{v:.2f}" for v in np.mean(shares, 0)) + " |")
    lines += [
        "",
        f"![ERFs of single digits]({rel}/erf_digits.png)",
        "",
        *_explored_section(explored),
        "",
        "Step time (median ms per step after compilation, mean over seeds): "
        + ", ".join(
            f"`{arm}` {np.mean([r['step_s'] for r in runs.values()]) * 1000:.0f}"
            for arm, runs in results.items()
        )
        + ".",
        "",
        "## Notes",
        "",
        NOTES[0],
        notes.strip() or "(none yet)",
        NOTES[1],
        "",
        "Reproduce: `make study` (or `python -m train.study`); finished runs and analyses are "
        "skipped, so a second invocation only rewrites the report. Per-run wall times: "
        + (", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) or "(all runs were cached)")
        + ".",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _explored_section(explored) -> list[str]:
    if explored is None:
        return []
    pad, runs, decided = explored
    lines = [
        "## Exploratory, not pre-registered: a larger canvas",
        "",
        "Added after the registered results showed that the positive controls of `dcn` and "
        "`dk_dcn` fail where their wide ERFs reach the 48-px canvas. The same measurement (r50 "
        f"of the last stage's unit) on the same val digits placed in the centre of a canvas {pad} "
        "px larger on each side (background pixels; the networks are fully convolutional). The "
        "last column applies the rule's arithmetic to these numbers; it is not a verdict of the "
        "study, whose measurement was fixed at the training canvas.",
        "",
        "| arm | e (learned) | e zoom back | runs with zoom back >= 0.8 | Delta, mean [95% CI] | "
        "e_max | the rule's arithmetic |",
        "|---|---|---|---|---|---|---|",
    ]
    from train import erf_scale

    for arm, by_seed in runs.items():
        rs = list(by_seed.values())
        learned = [exponent_of(r, "learned") for r in rs]
        zoom = [exponent_of(r, "zoom_back") for r in rs]
        ok = sum(z >= erf_scale.POSITIVE_MIN for z in zoom)
        d = decided.get(arm)
        if d is None:
            cells = "- | - | -"
        else:
            interval = (
                f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                if np.isfinite(d["mean"])
                else "fewer than 3 valid pairs"
            )
            cells = f"{interval} | {d['e_max']:.3f} | {d['verdict']}"
        lines.append(
            f"| `{arm}` | {_ci(learned, '{:.2f}')} | {_ci(zoom, '{:.2f}')} | {ok} of {len(rs)} | "
            + cells
            + " |"
        )
    return [*lines, ""]


def plot_all(results: dict, workdir: Path, figures: Path, erf_sources: int) -> list[Path]:
    from train import erf_scale, visualize

    plt = visualize._pyplot()
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
    paths.append(visualize._save(plt, fig, figures / "erf_vs_scale.png"))

    fig, axes = plt.subplots(
        len(arms), len(levels), figsize=(1.25 * len(levels), 1.3 * len(arms)), squeeze=False
    )
    for a, arm in enumerate(arms):
        seed = min(results[arm])
        maps = np.load(workdir / run_name(arm, seed) / "scale_erf.npz")["maps"]
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
    paths.append(visualize._save(plt, fig, figures / "mean_erf.png"))

    # Single digits: three val sources at the smallest, middle and largest scale.
    shown = [a for a in (study_config.BASELINE, "local_dk") if a in results]
    picks = (levels[0], levels[len(levels) // 2], levels[-1])
    fig, axes = plt.subplots(
        3, len(picks) * len(shown), figsize=(1.4 * len(picks) * len(shown), 4.4), squeeze=False
    )
    for r_i, arm in enumerate(shown):
        run = visualize.load_run(workdir / run_name(arm, min(results[arm])))
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
    paths.append(visualize._save(plt, fig, figures / "erf_digits.png"))
    return paths


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
    p.add_argument("--config", default="digits_scaled_study")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--arms", nargs="+", default=list(study_config.ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(study_config.SEEDS))
    p.add_argument("--erf-sources", type=int, default=48, help="val source digits for the ERFs")
    p.add_argument(
        "--explore-pad",
        type=int,
        default=0,
        help="also measure the ERFs on a canvas this many px larger on each side (exploratory)",
    )
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
        if args.explore_pad < 0 or args.explore_pad % 8:
            raise ConfigError(
                "--explore-pad must be 0 or a positive multiple of 8 (the last stage's stride), "
                f"got {args.explore_pad}"
            )
        unknown = [a for a in args.arms if a not in study_config.ARMS]
        if unknown:
            raise ConfigError(
                f"--arms: unknown {unknown}; choose from {', '.join(study_config.ARMS)}"
            )
        workdir = Path(args.workdir or config.workdir)
        # The runs of an arm differ only in their values: later seeds reuse the compilations.
        import jax

        jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        walls = train_all(config, args.arms, args.seeds, workdir)
        log.info("analysis")
        results = {
            arm: {
                seed: analyse(workdir / run_name(arm, seed), args.erf_sources)
                for seed in args.seeds
            }
            for arm in args.arms
        }
        decided = verdicts(results)
        explored = None
        if args.explore_pad:
            log.info("exploratory analysis on a canvas %d px larger on each side", args.explore_pad)
            padded = {
                arm: {
                    seed: analyse_padded(
                        workdir / run_name(arm, seed), args.erf_sources, args.explore_pad
                    )
                    for seed in args.seeds
                }
                for arm in args.arms
            }
            explored = (args.explore_pad, padded, verdicts(padded))
        docs = Path(args.docs)
        figures = docs / "study"
        plot_all(results, workdir, figures, args.erf_sources)
        timing = workdir / "study_timing.json"
        if walls:
            study_wall = time.time() - t0
            timing.write_text(json.dumps({"wall_s": study_wall, "runs": walls}, indent=1))
        elif timing.is_file():  # a re-run: report the invocation that trained the runs
            saved = json.loads(timing.read_text())
            walls, study_wall = saved["runs"], saved["wall_s"]
        else:
            study_wall = None
        results_md = docs / "RESULTS.md"
        (workdir / "study.json").write_text(
            json.dumps({"runs": results, "verdicts": decided}, indent=1) + "\n"
        )
        write_results(
            results_md,
            results,
            config,
            walls,
            figures,
            read_notes(results_md),
            study_wall,
            decided,
            explored,
        )
    except (ConfigError, DatasetError) as e:
        print(f"train.study: error: {e}", file=sys.stderr)
        return 2
    log.info("wrote %s in %.1f min", results_md, (time.time() - t0) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
