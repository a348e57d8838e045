"""Writes docs/BENCHMARKS.md from the JSON results in benchmarks/results/ (run by `make bench`).

    python -m benchmarks.report [--out docs/BENCHMARKS.md]

Every ratio below is computed from rows of one run, measured side by side in one process.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

RESULTS = "benchmarks/results"


def load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def env_lines(env):
    keys = [
        "cpu_model",
        "cpus",
        "devices",
        "python",
        "jax",
        "torch",
        "torchvision",
        "torch_threads",
        "cpu_flags",
        "cpu_isa",
    ]
    return [f"- {k}: {env[k]}" for k in keys if env.get(k) is not None]


def ops_table(case_rows):
    lines = [
        "| implementation | fwd ms | fwd+bwd ms | fwd temp MB | fwd+bwd temp MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in case_rows.items():
        mem = r.get("fwd_temp_mb")
        mem_s = f"{mem:.1f} | {r['fwd_bwd_temp_mb']:.1f}" if mem is not None else "- | -"
        lines.append(f"| {name} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {mem_s} |")
    return lines


def floor_of(rows):
    """The fastest rigid depthwise conv of the run, forward and forward+backward."""
    rigid = {k: v for k, v in rows.items() if k.startswith("rigid")}
    fwd = min(rigid.items(), key=lambda kv: kv[1]["fwd_ms"])
    bwd = min(rigid.items(), key=lambda kv: kv[1]["fwd_bwd_ms"])
    return fwd, bwd


def verdict(ok):
    return "met" if ok else "**missed**"


def cpu_targets(ops):
    rows = ops["cases"]["standard"]["rows"]
    (ffwd_name, ffwd), (fbwd_name, fbwd) = floor_of(rows)
    dk = rows["local DK ffi"]
    xla = rows["local DK xla"]
    r_fwd = dk["fwd_ms"] / ffwd["fwd_ms"]
    r_bwd = dk["fwd_bwd_ms"] / fbwd["fwd_bwd_ms"]
    mem = dk["fwd_bwd_temp_mb"] / max(xla["fwd_bwd_temp_mb"], 1e-9)
    lines = [
        f"- Floor, forward: {ffwd_name} {ffwd['fwd_ms']:.2f} ms; forward+backward: {fbwd_name} "
        f"{fbwd['fwd_bwd_ms']:.2f} ms.",
        f"- Local DK ffi forward / floor = {r_fwd:.2f}x (target <= 3x: {verdict(r_fwd <= 3)}); "
        f"forward+backward / floor = {r_bwd:.2f}x (target <= 4x: {verdict(r_bwd <= 4)}).",
        f"- Temporary memory, forward+backward: ffi {dk['fwd_bwd_temp_mb']:.1f} MB vs xla "
        f"{xla['fwd_bwd_temp_mb']:.1f} MB = {mem:.4f} (target <= 0.25: {verdict(mem <= 0.25)}); "
        f"forward+backward time xla / ffi = {xla['fwd_bwd_ms'] / dk['fwd_bwd_ms']:.0f}x.",
    ]
    tv = rows.get("DCN torchvision deform_conv2d (groups=C)")
    dcn = rows["DCN ffi (zero rotation, S=K)"]
    if tv:
        a, b = tv["fwd_ms"] / dcn["fwd_ms"], tv["fwd_bwd_ms"] / dcn["fwd_bwd_ms"]
        lines.append(
            f"- DCN case: torchvision deform_conv2d / ffi = {a:.0f}x forward, {b:.0f}x "
            f"forward+backward (target >= 20x: {verdict(min(a, b) >= 20)})."
        )
    else:
        lines.append("- DCN case against torchvision: not measured (torch not installed).")
    if "threads" in ops:
        t1, t2 = ops["threads"]["1 thread(s)"], ops["threads"]["2 thread(s)"]
        a, b = t1["fwd_ms"] / t2["fwd_ms"], t1["fwd_bwd_ms"] / t2["fwd_bwd_ms"]
        lines.append(
            f"- Two threads vs one (DK_JAX_NUM_THREADS=1 vs 2): {a:.2f}x forward, "
            f"{b:.2f}x forward+backward (target >= 1.6x: {verdict(min(a, b) >= 1.6)})."
        )
    return lines


def gpu_targets(ops):
    rows = ops["cases"].get("standard N=64", {}).get("rows")
    if not rows:
        return ["- N=64 case not in this run."]
    dk = rows["local DK ffi"]
    conv = rows["rigid: lax.conv_general_dilated"]
    r = dk["fwd_ms"] / conv["fwd_ms"]
    lines = [
        f"- N=64 forward: ffi {dk['fwd_ms']:.2f} ms vs XLA depthwise conv "
        f"{conv['fwd_ms']:.2f} ms = {r:.2f}x (target <= 1.5x: {verdict(r <= 1.5)})."
    ]
    tv = rows.get("DCN torchvision deform_conv2d (groups=C)")
    dcn = rows["DCN ffi (zero rotation, S=K)"]
    if tv:
        a, b = tv["fwd_ms"] / dcn["fwd_ms"], tv["fwd_bwd_ms"] / dcn["fwd_bwd_ms"]
        lines.append(
            f"- N=64 DCN case: torchvision / ffi = {a:.1f}x forward, {b:.1f}x "
            f"forward+backward (target >= 5x: {verdict(min(a, b) >= 5)})."
        )
    return lines


def sweep_lines(ops):
    if "sweep" not in ops:
        return []
    lines = [
        "| N | local DK ffi fwd ms | ms per sample | fwd+bwd ms | ms per sample | "
        "rigid slices fwd ms | fwd+bwd ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in ops["sweep"].items():
        n = int(name.split("=")[1])
        dk, fl = rows["local DK ffi"], rows["rigid: XLA shifted slices"]
        lines.append(
            f"| {n} | {dk['fwd_ms']:.2f} | {dk['fwd_ms'] / n:.2f} | "
            f"{dk['fwd_bwd_ms']:.2f} | {dk['fwd_bwd_ms'] / n:.2f} | "
            f"{fl['fwd_ms']:.2f} | {fl['fwd_bwd_ms']:.2f} |"
        )
    return lines


def full_conv_lines(ops):
    """The grouped / full local DK (scope-space im2col + matmul) against XLA's rigid conv."""
    if "full_conv" not in ops:
        return []
    shape, rows = ops["full_conv"]["shape"], ops["full_conv"]["rows"]
    out = [
        f"### Grouped and full convolutions: N={shape['n']}, H=W={shape['hw']}, "
        f"C_in={shape['c']}, C_out={shape['f']}, K={shape['k']}, scope {shape['scope']}",
        "",
        *ops_table(rows),
        "",
    ]
    dk = rows.get("full: local DK ffi (im2col + matmul)")
    conv = rows.get("full: rigid lax.conv_general_dilated")
    if dk and conv:
        r_fwd = dk["fwd_ms"] / conv["fwd_ms"]
        r = dk["fwd_bwd_ms"] / conv["fwd_bwd_ms"]
        out += [
            f"- Full-convolution DK / XLA's full 3x3 conv: {r_fwd:.2f}x forward, {r:.2f}x "
            f"forward+backward (target <= 4x forward+backward: {verdict(r <= 4)}).",
            "",
        ]
    return out


def depthwise_dispatch_lines(ops):
    """sample_conv with groups = C must keep the direct depthwise kernel's speed."""
    rows = ops["cases"].get("standard", {}).get("rows", {})
    direct = rows.get("local DK ffi")
    via = rows.get("local DK ffi via sample_conv (groups=C)")
    if not (direct and via):
        return []
    return [
        f"- Depthwise through `sample_conv(feature_group_count=C)`: {via['fwd_ms']:.2f} ms "
        f"forward, {via['fwd_bwd_ms']:.2f} ms forward+backward, against {direct['fwd_ms']:.2f} "
        f"/ {direct['fwd_bwd_ms']:.2f} ms for `sample_depthwise` in the same run (same kernel).",
        "",
    ]


def isa_section(result):
    """The standard shape under each CPU build of the loops, from `benchmarks.ops --isa`."""
    if result is None or "isa" not in result:
        return []
    isa = result["isa"]
    rows = isa["rows"]
    floor = rows["floor"]

    def best(suffix):
        name = min((k for k in floor if k.endswith(suffix)), key=lambda k: floor[k])
        return name[: -len(suffix)].strip(), floor[name]

    (fwd_name, fwd_floor), (bwd_name, bwd_floor) = best(" fwd"), best(" fwd+bwd")
    out = [
        "## Operators, CPU, by instruction set (standard shape, float32 unless said)",
        "",
        "Command: `python -m benchmarks.ops --isa` (results in "
        "`benchmarks/results/ops_cpu_isa.json`). One library carries the CPU loops built for "
        "AVX-512, AVX2 + FMA and the baseline (SSE2) and picks the best at load; here every build "
        f"the machine runs is timed in {isa['rounds']} interleaved rounds in one process "
        "(`DK_JAX_CPU_ISA` chooses a build for a whole process; the benchmark switches between "
        "rounds). Medians of per-round medians.",
        "",
        *env_lines(result["environment"]),
        f"- builds this CPU runs: {', '.join(isa['isas'])} (default: {isa['default']})",
        "",
        f"Floors: forward {fwd_name} {fwd_floor:.2f} ms, forward+backward {bwd_name} "
        f"{bwd_floor:.2f} ms (the fastest rigid depthwise 3x3 of the run).",
        "",
        "| build | local DK fwd ms | / floor (<= 1.6x) | fwd+bwd ms | / floor (<= 1.2x) "
        "| bf16 fwd / f32 (<= 1.3x) | DCN fwd ms | torchvision / DCN fwd (>= 40x) "
        "| DCN fwd+bwd ms | torchvision / DCN fwd+bwd (>= 80x) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tv_fwd, tv_bwd = floor.get("DCN torchvision fwd"), floor.get("DCN torchvision fwd+bwd")
    notes = []
    for name in isa["isas"]:
        r = rows[name]
        fwd, bwd = r["local DK fwd"] / fwd_floor, r["local DK fwd+bwd"] / bwd_floor
        bf = r["local DK fwd bf16"] / r["local DK fwd"]

        def judged(ok, name=name):
            # The targets are the vector builds'; the baseline's is to stay within 3x of AVX2.
            return "" if name == "baseline" else f" {verdict(ok)}"

        cells = [
            f"{r['local DK fwd']:.2f}",
            f"{fwd:.2f}x{judged(fwd <= 1.6)}",
            f"{r['local DK fwd+bwd']:.2f}",
            f"{bwd:.2f}x{judged(bwd <= 1.2)}",
            f"{bf:.2f}x{judged(bf <= 1.3)}",
            f"{r['DCN fwd']:.2f}",
        ]
        if tv_fwd:
            a, b = tv_fwd / r["DCN fwd"], tv_bwd / r["DCN fwd+bwd"]
            cells += [
                f"{a:.0f}x{judged(a >= 40)}",
                f"{r['DCN fwd+bwd']:.2f}",
                f"{b:.0f}x{judged(b >= 80)}",
            ]
        else:
            cells += ["not measured", f"{r['DCN fwd+bwd']:.2f}", "not measured"]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if tv_fwd:
        notes.append(
            f"- torchvision deform_conv2d (groups=C): {tv_fwd:.0f} ms forward, {tv_bwd:.0f} ms "
            "forward+backward, one call a round."
        )
    if "baseline" in rows and "avx2" in rows:
        b, a = rows["baseline"], rows["avx2"]
        f, g = b["local DK fwd"] / a["local DK fwd"], b["local DK fwd+bwd"] / a["local DK fwd+bwd"]
        notes.append(
            f"- Baseline (SSE2) against AVX2: {f:.2f}x forward, {g:.2f}x forward+backward "
            f"(target <= 3x: {verdict(max(f, g) <= 3)})."
        )
    return out + [""] + notes + [""]


def ops_section(title, ops, targets, command):
    out = [
        f"## {title}",
        "",
        f"Command: `{command}`",
        "",
        *env_lines(ops["environment"]),
        "",
        "### Targets",
        "",
        *targets(ops),
        "",
    ]
    for name, case in ops["cases"].items():
        c = case["case"]
        out += [
            f"### {name}: N={c['n']}, H=W={c['hw']}, C={c['c']}, K={c['k']}, "
            f"scope {c['scope']}, stride {c['stride']}, pad {c['pad']}, "
            f"rotation groups {c['groups']}",
            "",
            *ops_table(case["rows"]),
            "",
        ]
    out += full_conv_lines(ops) + depthwise_dispatch_lines(ops)
    sweep = sweep_lines(ops)
    if sweep:
        out += ["### Batch-size sweep (standard shape)", "", *sweep, ""]
    return out


def models_section(models):
    if models is None:
        return ["## Models", "", "Not measured yet: run `python -m benchmarks.models`.", ""]
    out = [
        "## Models (train step)",
        "",
        f"Command: `{models.get('command', 'python -m benchmarks.models')}`",
        "",
        *env_lines(models["environment"]),
        "",
        "The depthwise baseline is what training uses, `nn.Conv(feature_group_count=C)`: XLA's "
        "grouped convolution, slow on CPU (the `lax.conv_general_dilated` rows above), which is "
        "why the adaptive convs, whose 3x3 work runs in the custom calls or in strided "
        "multiply-adds, come out faster here. Their stages are the adaptive ones only; the rest "
        "of each network is identical.",
        "",
    ]
    for name, model in models.get("models", {}).items():
        case = model["case"]
        out += [
            f"### {name}: {case['config']}, {case['image_size']}x{case['image_size']}, "
            f"batch {case['batch']}",
            "",
            "| conv | ms / step | images / s | time vs depthwise | parameters | compile s | "
            "temp MB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for conv, r in model["rows"].items():
            out.append(
                f"| {conv} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | "
                f"{r['time_vs_depthwise']:.2f}x | {r['params']:,} | {r['compile_s']:.1f} | "
                f"{r['temp_mb']:.0f} |"
            )
        out.append("")
    return out


def input_section(inp):
    if inp is None:
        return [
            "## Input pipeline",
            "",
            "Not measured yet: run `python -m benchmarks.input`.",
            "",
        ]
    env = inp["environment"]
    img = inp["images"]
    load = inp["load_average"]
    out = [
        "## Input pipeline (train augmentation, 224x224)",
        "",
        f"Command: `{inp['command']}`",
        "",
        f"- cpu_model: {env['cpu_model']}",
        f"- cpus: {env['cpus']}",
        f"- python {env['python']}, pillow {env['pillow']}, "
        f"simplejpeg {env.get('simplejpeg', '-')}, opencv {env.get('opencv', '-')}, "
        f"grain {env['grain']}, numpy {env['numpy']}",
        f"- load average (1 min) before / after: {load['before'][0]:.2f} / {load['after'][0]:.2f}",
        "",
        f"{img['count']} generated {img['size'][0]}x{img['size'][1]} JPEGs with the 1/f "
        f"spectrum of photographs (mean {img['mean_kb']:.0f} KB). Decode + augment per core is "
        "images per CPU second of one process; `previous` is the code before grain (PIL's "
        "full decode and antialiased resize, flip in numpy); `full_decode` and "
        "`reduced_decode` are `images.load_example` (simplejpeg's fast decode, OpenCV's resize "
        "and flip) without and with the DCT-scaled decode.",
        "",
        "| decode + augment, one process | images / CPU s | images / s |",
        "|---|---:|---:|",
    ]
    sets = [("", inp["per_core"])]
    if "per_core_large" in inp:
        large = inp["large_images"]
        sets.append((f" ({large['size'][0]}x{large['size'][1]})", inp["per_core_large"]))
    for tag, rows in sets:
        for name in ("previous", "full_decode", "reduced_decode", *FLOOR_ROWS):
            if name in rows:
                r = rows[name]
                out.append(
                    f"| {FLOOR_ROWS.get(name, name)}{tag} | {r['images_per_cpu_s']:.0f} | "
                    f"{r['images_per_s']:.0f} |"
                )
    for tag, rows in sets:
        out.append(f"| reduced vs previous{tag} | {rows['speedup_vs_previous']:.2f}x | |")
        if "ceiling_vs_previous" in rows:
            out.append(
                f"| ceiling: decode only vs previous{tag} | {rows['ceiling_vs_previous']:.2f}x | |"
            )
    out += [
        "",
        "| grain pipeline (chunks of 16, batch 32) | images / s | images / CPU s | "
        "trainer CPU ms / image | 2 workers vs 1 |",
        "|---|---:|---:|---:|---:|",
    ]
    rows_out = [
        (f"{name}, {w.replace('_', ' ')}", rows[w], rows["scaling_2_vs_1"] if "2" in w else None)
        for name, rows in inp["pipeline"].items()
        for w in ("1_workers", "2_workers")
    ]
    if "pipeline_one_image_per_task" in inp:
        rows_out.append(
            (
                "reduced_decode, 1 worker, one image per task",
                inp["pipeline_one_image_per_task"],
                None,
            )
        )
    for label, r, scale in rows_out:
        scale_s = f"{scale:.2f}x" if scale is not None else ""
        main_ms = r.get("main_cpu_ms_per_image")
        main_s = f"{main_ms:.2f}" if main_ms is not None else "-"
        out.append(
            f"| {label} | {r['images_per_s']:.0f} | {r['images_per_cpu_s']:.0f} | {main_s} | "
            f"{scale_s} |"
        )
    out.append("")
    speedup = inp["per_core"]["speedup_vs_previous"]
    scaling = inp["pipeline"]["reduced_decode"]["scaling_2_vs_1"]
    busy = load["before"][0] > 0.5 * env["cpus"]
    out += [
        "### Targets",
        "",
        f"- decode + augment >= 2x images per core against the previous code "
        f"({img['size'][0]}x{img['size'][1]}): {speedup:.2f}x, {verdict(speedup >= 2.0)}.",
        *floor_note(inp["per_core"]),
        f"- 2 workers >= 1.7x one: {scaling:.2f}x, "
        + (
            f"not measurable here: the 1-minute load average was {load['before'][0]:.1f} on "
            f"{env['cpus']} cores shared with other jobs, so a second worker finds no free core."
            if busy
            else verdict(scaling >= 1.7) + "."
        ),
        "",
    ]
    return out


FLOOR_ROWS = {
    "decode_only": "read + decode only, full size",
    "decode_only_eighth": "read + decode only, 1/8 size",
}


def floor_note(rows) -> list[str]:
    """What the decoder leaves to gain, from the decode-only rows of the same run."""
    if "ceiling_vs_previous" not in rows:
        return []
    ms = {
        name: 1e3 / rows[name]["images_per_cpu_s"]
        for name in ("previous", "decode_only", "decode_only_eighth")
    }
    return [
        f"  Reading and decoding the whole file alone takes {ms['decode_only']:.2f} ms per "
        f"image ({ms['decode_only_eighth']:.2f} ms at 1/8 size, where the IDCT, upsampling and "
        "colour conversion nearly vanish and libjpeg-turbo's entropy decoding is what remains), "
        f"against {ms['previous']:.2f} ms for the previous path: no pipeline that decodes the "
        f"whole file this way can pass {rows['ceiling_vs_previous']:.2f}x, even with a free "
        f"crop and resize. The crop, resize, flip and box add {rows['beyond_decode_ms']:.2f} ms "
        "(OpenCV's bilinear resize is most of it). At this size a random-resized crop is "
        "almost never twice the 224 output across, so the DCT-scaled decode rarely applies; "
        "it pays off on larger photos (the 1024x768 rows). Passing 2x here would take a decoder "
        "that stops at the crop's last row (libjpeg-turbo can, through jpeg_skip_scanlines or "
        "TurboJPEG 3's cropping region), which none of the maintained Python bindings "
        "installable from PyPI exposes (simplejpeg, PyTurboJPEG, imagecodecs, OpenCV, Pillow).",
    ]


def second_order_section(result):
    if result is None:
        return []
    rows = {(r["product"], r["implementation"]): r for r in result["rows"]}
    out = [
        "## Second-order products in rotation, CPU (float32)",
        "",
        "Command: `python -m benchmarks.second_order --json "
        "benchmarks/results/second_order_cpu.json`",
        "",
        f"Shape: {result['shape']}; `sample_depthwise`, loss = sum(sin(y)). `hvp_rotation` is "
        "jvp(grad(loss, rotation)); `grad_of_gradient_penalty` is the gradient in (x, rotation, "
        "weight) of the squared norm of the gradient in all three. On ffi both lower to custom "
        "calls only (the second-order modes of `dk_jax/primitives.py`); the xla path is "
        "JAX's own differentiation of the reference.",
        "",
    ]
    timed = any(r.get("ms") is not None for r in result["rows"])
    out += (
        ["| product | ffi temp MiB | xla temp MiB | ffi ms | xla ms |", "|---|---:|---:|---:|---:|"]
        if timed
        else ["| product | ffi temp MiB | xla temp MiB | xla / ffi |", "|---|---:|---:|---:|"]
    )
    for product in ("hvp_rotation", "grad_of_gradient_penalty"):
        f, x = rows.get((product, "ffi")), rows.get((product, "xla"))
        if not (f and x):
            continue
        line = f"| {product} | {f['temp_mb']:.1f} | {x['temp_mb']:.1f} |"
        if timed:
            line += f" {f['ms'] or float('nan'):.0f} | {x['ms'] or float('nan'):.0f} |"
        else:
            line += f" {x['temp_mb'] / f['temp_mb']:.0f}x |"
        out.append(line)
    return out + [""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    out = [
        "# Benchmarks",
        "",
        "Regenerated by `make bench` (CPU) and `scripts/gpu_check.sh` (GPU rows). Times are "
        "medians after warm-up with `block_until_ready`; temporary memory is XLA's "
        "`compile().memory_analysis().temp_size_in_bytes`. Every ratio compares rows of the "
        "same run. A miss is shown as a miss.",
        "",
    ]
    out += isa_section(load("ops_cpu_isa.json"))
    quick = load("ops_cpu_quick.json")
    if quick:
        out += ops_section(
            "Operators, CPU (float32), standard shape on a quiet machine",
            quick,
            cpu_targets,
            "python -m benchmarks.ops --quick --json benchmarks/results/ops_cpu_quick.json",
        )
    cpu = load("ops_cpu.json")
    if cpu:
        out += ops_section(
            "Operators, CPU (float32), all cases",
            cpu,
            cpu_targets,
            "python -m benchmarks.ops --json benchmarks/results/ops_cpu.json",
        )
    gpus = sorted(glob.glob(os.path.join(RESULTS, "ops_gpu_*.json")))
    for path in gpus:
        gpu = load(os.path.basename(path))
        tag = os.path.basename(path)[len("ops_gpu_") : -len(".json")].upper()
        out += ops_section(
            f"Operators, GPU {tag} (float32)",
            gpu,
            gpu_targets,
            "bash scripts/gpu_check.sh (python -m benchmarks.ops on the GPU)",
        )
    if not gpus:
        out += ["## Operators, GPU", "", "Not measured: no GPU was available.", ""]
    out += models_section(load("models_cpu.json"))
    out += input_section(load("input_cpu.json"))
    out += second_order_section(load("second_order_cpu.json"))
    extra = os.path.join("docs", "BENCHMARKS_NOTES.md")
    if os.path.exists(extra):
        with open(extra) as f:
            out += [f.read()]
    with open(args.out, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
