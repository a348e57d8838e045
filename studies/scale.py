"""The scale study: does a deformable layer's effective receptive field (ERF) follow the
object's scale? A pre-registered test on `digits_scaled` (see studies/configs/scale_study.py,
studies/digits_scaled.py and studies/erf_scale.py).

    python -m studies.scale [--config scale_study] [--set key=value ...]
                            [--arms frozen local_dk dcn dk_dcn] [--seeds 0 1 2 3 4]
                            [--erf-sources 48] [--explore-pad 16] [--workdir runs/scale_study]
                            [--docs docs]

`--config` takes a file or the name of a config in studies/configs/; `--set` changes its keys as
for `python -m train` (the study's data: `digits_scaled.seed`, `.train_copies`, `.size`,
`.limit`).

0. Writes `digits_scaled` to `data.root` unless it is there already (studies/digits_scaled.py,
   with the config's `digits_scaled` group).
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
   `<docs>/RESULTS.md` and `<docs>/study/*.png` (studies/scale_figures.py). Text between
   `<!-- notes -->` and `<!-- /notes -->` of an existing RESULTS.md is kept.
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

from studies import scale_figures
from studies.configs import scale_study as study_config
from train.config import Config, ConfigError, load_config
from train.images import DatasetError

log = logging.getLogger("studies.scale")
CONFIGS = Path(__file__).parent / "configs"
NOTES = ("<!-- notes -->", "<!-- /notes -->")
ANALYSIS_VERSION = 1
PRIMARY = ("last", "r50")  # the decision rule's statistic: r50 of the last stage's unit

DECISION_RULE = """\
Registered on 2026-11-30, before the study's runs; `studies.erf_scale.decide` implements it and
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
    from studies import erf_scale

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
    from studies import erf_scale
    from train import visualize
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
    from studies import erf_scale
    from train import visualize
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
    from studies import erf_scale

    stage, stat = PRIMARY
    return max(
        exponent_of(result, f"hand_set_{a:+g}", stage, stat) for a in erf_scale.HAND_SET_POWERS
    )


def positive_ok(result: dict) -> bool:
    from studies import erf_scale

    return exponent_of(result, "zoom_back", *PRIMARY) >= erf_scale.POSITIVE_MIN


def verdicts(results: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """The decision rule per arm against the baseline (results: arm -> seed -> analysis)."""
    from studies import erf_scale

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
    from studies import erf_scale

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
    from studies import erf_scale

    rel = figures.relative_to(path.parent)
    steps = total_steps(config)
    o = config.optim
    any_run = next(iter(next(iter(results.values())).values()))
    levels = any_run["scales"]
    seeds = sorted({s for runs in results.values() for s in runs})
    lines = [
        "# Results: does the deformable kernels' receptive field follow the object's scale?",
        "",
        "Written by `make study` (`python -m studies.scale`) from the runs under "
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
        "Reproduce: `make study` (or `python -m studies.scale`); finished runs and analyses are "
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
    from studies import erf_scale

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


def load_study_config(path_or_name: str, overrides=()) -> Config:
    """`get_config()` of a file, or of studies/configs/<name>.py given a bare name, with
    `key=value` overrides."""
    path = Path(path_or_name)
    if path.suffix != ".py" and not path.exists():
        path = CONFIGS / f"{path_or_name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(
            f"config file {str(path)!r} not found (study configs: {', '.join(known)})"
        )
    return load_config(str(path), overrides)


def prepare_data(config: Config) -> Path:
    """Writes `digits_scaled` to `data.root` with the config's `digits_scaled` parameters
    unless it is there already; an error if `data.root` holds anything else."""
    from studies import digits_scaled

    d, root = config.digits_scaled, Path(config.data.root)
    if not root.exists():
        log.info("generating digits_scaled in %s (once)", root)
    return digits_scaled.generate(
        root, seed=d.seed, train_copies=d.train_copies, size=d.size, limit=d.limit
    )


def run_dirs_of(results: dict, workdir: Path) -> dict[str, Path]:
    """arm -> the run directory of its first seed (the runs the figures draw)."""
    return {arm: workdir / run_name(arm, min(runs)) for arm, runs in results.items()}


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
        prog="python -m studies.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="scale_study", help="a file or a studies/configs name")
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
        config = load_study_config(args.config, args.overrides)
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
        prepare_data(config)
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
        scale_figures.plot_all(results, run_dirs_of(results, workdir), figures)
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
        print(f"studies.scale: error: {e}", file=sys.stderr)
        return 2
    log.info("wrote %s in %.1f min", results_md, (time.time() - t0) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
