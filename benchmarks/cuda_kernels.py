"""The two generations of CUDA kernels side by side, in one process (the handlers read
DK_JAX_CUDA_KERNELS on every call): local DK, DK+DCN and DCN (zero rotation, scope = kernel)
forward and forward+backward with the v1 and v2 kernels, against XLA's depthwise convolution
and torchvision's deform_conv2d(groups=C), f32 and bf16, N = 8 and 64, 56x56, C = 128, K = 3,
scope 4.

    python -m benchmarks.cuda_kernels --json out.json

A time is the median over `--repeats` batches of `--calls` back-to-back calls (one
block_until_ready per batch), divided by the calls: per-call device time plus what dispatch
does not overlap. Each dk-jax row is timed twice, v1 and v2 interleaved (v1, v2, v1, v2), and
both times are kept (`*_runs`; `fwd_ms` / `fwd_bwd_ms` are the lower of the two): a difference
smaller than the spread between them is noise. Also checked
on the benchmark shapes: v2 against v1 (relative error) and the v2 image gradient bitwise
identical across two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import dk_jax
from benchmarks.ops import environment, fwd_bwd, rigid_conv

try:  # optional peers
    import torch
    import torchvision
except ImportError:  # pragma: no cover - torch is an optional extra
    torch = None
    torchvision = None

VAR = "DK_JAX_CUDA_KERNELS"
HW, C, K, SCOPE = 56, 128, 3, 4


def batch_ms(fn, args, calls, repeats):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times)


def with_kernels(version, fn, *args):
    """fn(*args) with DK_JAX_CUDA_KERNELS=version, finished before the variable is restored
    (dispatch is asynchronous: the handler may run after fn returns)."""
    previous = os.environ.get(VAR)
    os.environ[VAR] = version
    try:
        return jax.block_until_ready(fn(*args))
    finally:
        if previous is None:
            del os.environ[VAR]
        else:
            os.environ[VAR] = previous


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def torch_rows(x, off, w_rigid, ct, calls, repeats):
    """torch conv2d (groups=C) and torchvision deform_conv2d (groups=C), NCHW, same dtype."""
    dt = torch.float32 if x.dtype == jnp.float32 else torch.bfloat16

    def t(a):
        return torch.tensor(np.asarray(a, np.float32)).to("cuda", dt)

    tx, toff, tct = (t(a).permute(0, 3, 1, 2).contiguous() for a in (x, off, ct))
    tw = t(w_rigid).permute(2, 0, 1)[:, None].contiguous()

    def timed(fn):
        fn()
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3 / calls)
        return statistics.median(times)

    def conv(a=tx, b=tw):
        return torch.nn.functional.conv2d(a, b, padding=1, groups=C)

    def dcn(a=tx, o=toff, b=tw):
        return torchvision.ops.deform_conv2d(a, o, b, padding=1)

    def backward(f):
        def run():
            a, o, b = (v.detach().requires_grad_() for v in (tx, toff, tw))
            y = f(a, o, b) if f is dcn else f(a, b)
            (y * tct).sum().backward()

        return run

    rows = {}
    for name, f in (("torch conv2d (groups=C)", conv), ("torchvision deform_conv2d", dcn)):
        try:
            with torch.no_grad():
                fwd = timed(f)
            rows[name] = dict(fwd_ms=fwd, fwd_bwd_ms=timed(backward(f)))
        except Exception as e:  # noqa: BLE001 - e.g. no bf16 kernel in torchvision
            rows[name] = dict(error=str(e).splitlines()[0])
    return rows


def run(n, dtype, calls, repeats, use_torch):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, HW, HW, C)), dtype)
    w_scope = jnp.asarray(rng.normal(size=(SCOPE, SCOPE, C)), dtype)
    w_rigid = jnp.asarray(rng.normal(size=(K, K, C)), dtype)
    rot = jnp.asarray(rng.normal(size=(n, HW, HW, K * K * 2)) * 0.5, dtype)
    off = jnp.asarray(rng.normal(size=(n, HW, HW, K * K * 2)) * 0.5, dtype)
    zero_rot = jnp.zeros_like(rot)
    ct = jnp.asarray(rng.normal(size=(n, HW, HW, C)), dtype)
    geo = dict(kernel_size=K, padding=1)
    ops = {
        "local DK": (lambda x, r, w: dk_jax.sample_depthwise(x, r, w, **geo), (x, rot, w_scope)),
        "DK+DCN": (
            lambda x, o, r, w: dk_jax.deform_sample_depthwise(x, o, r, w, **geo),
            (x, off, rot, w_scope),
        ),
        "DCN (zero rotation, S=K)": (
            lambda x, o, w: dk_jax.deform_sample_depthwise(x, o, zero_rot, w, **geo),
            (x, off, w_rigid),
        ),
    }
    rows, checks = {}, {}
    for name, (f, args) in ops.items():
        fwd, grad = jax.jit(f), fwd_bwd(f, len(args))
        timings = {"v1": [], "v2": []}
        for version in ("v1", "v2", "v1", "v2"):
            timings[version].append(
                (
                    with_kernels(version, batch_ms, fwd, args, calls, repeats),
                    with_kernels(version, batch_ms, grad, (ct, *args), max(1, calls // 4), repeats),
                )
            )
        for version, pairs in timings.items():
            rows[f"{name} {version}"] = dict(
                fwd_ms=min(p[0] for p in pairs),
                fwd_bwd_ms=min(p[1] for p in pairs),
                fwd_ms_runs=[p[0] for p in pairs],
                fwd_bwd_ms_runs=[p[1] for p in pairs],
            )
        y1 = with_kernels("v1", fwd, *args)
        y2 = with_kernels("v2", fwd, *args)
        g1 = with_kernels("v1", grad, ct, *args)[0]
        g2 = with_kernels("v2", grad, ct, *args)[0]
        checks[name] = dict(fwd_v2_vs_v1=rel_err(y2, y1), grad_x_v2_vs_v1=rel_err(g2, g1))
    f, args = ops["local DK"]
    grad = fwd_bwd(f, len(args))
    first = np.asarray(with_kernels("v2", grad, ct, *args)[0])
    second = np.asarray(with_kernels("v2", grad, ct, *args)[0])
    checks["local DK image gradient v2 bitwise repeatable"] = bool(np.array_equal(first, second))

    def conv(x, w):
        return rigid_conv(x, w, 1, 1)

    rows["XLA depthwise conv"] = dict(
        fwd_ms=batch_ms(jax.jit(conv), (x, w_rigid), calls, repeats),
        fwd_bwd_ms=batch_ms(fwd_bwd(conv, 2), (ct, x, w_rigid), max(1, calls // 4), repeats),
    )
    if use_torch:
        rows.update(torch_rows(x, off, w_rigid, ct, calls, repeats))
    ratios = {}
    for v in ("v1", "v2"):
        ratios[f"local DK {v} fwd / XLA conv fwd"] = (
            rows[f"local DK {v}"]["fwd_ms"] / rows["XLA depthwise conv"]["fwd_ms"]
        )
        tv = rows.get("torchvision deform_conv2d", {})
        if "fwd_ms" in tv:
            ratios[f"torchvision DCN fwd / DCN {v} fwd"] = (
                tv["fwd_ms"] / rows[f"DCN (zero rotation, S=K) {v}"]["fwd_ms"]
            )
    return dict(rows=rows, checks=checks, ratios=ratios)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/cuda_kernels.json")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    parser.add_argument(
        "--any-backend", action="store_true", help="run without a GPU (a dry run of the script)"
    )
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.any_backend:
        raise SystemExit("benchmarks.cuda_kernels needs a GPU")
    use_torch = torch is not None and torch.cuda.is_available() and jax.default_backend() == "gpu"
    env = environment()
    env["gpu"] = jax.devices()[0].device_kind
    results = dict(environment=env, shape=dict(hw=HW, c=C, k=K, scope=SCOPE), runs={})
    for dtype in (jnp.float32, jnp.bfloat16):
        for n in args.batch:
            key = f"{jnp.dtype(dtype).name} N={n}"
            print(f"== {key}", flush=True)
            r = run(n, dtype, args.calls, args.repeats, use_torch)
            results["runs"][key] = r
            for name, row in r["rows"].items():
                if "fwd_ms" in row:
                    print(
                        f"   {name:34s} fwd {row['fwd_ms']:8.3f} ms  "
                        f"fwd+bwd {row['fwd_bwd_ms']:8.3f} ms",
                        flush=True,
                    )
                else:
                    print(f"   {name:34s} {row['error']}", flush=True)
            for name, value in {**r["ratios"], **r["checks"]}.items():
                print(f"   {name}: {value}", flush=True)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
