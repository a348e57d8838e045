"""Operator benchmarks: the ffi path against the xla reference, the rigid depthwise floor and
torchvision's deform_conv2d, forward and forward+backward, with compiled temporary memory.

    python -m benchmarks.ops                  # all cases, JSON to stdout-adjacent file
    python -m benchmarks.ops --quick          # the standard shape only
    python -m benchmarks.ops --json out.json  # where to write the results
    python -m benchmarks.ops --full-conv      # only the grouped / full convolution case
    python -m benchmarks.ops --isa            # the standard shape under every CPU build

Times are medians over repeated runs after warm-up (block_until_ready), milliseconds. Every
row of one run is measured in the same process, side by side, so ratios are meaningful even
on a noisy machine. Forward+backward is the gradient of <y, ct> in every floating argument.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import dk_jax

try:  # optional peers
    import torch
    import torchvision
except ImportError:  # pragma: no cover - torch is an optional extra
    torch = None
    torchvision = None


@dataclass(frozen=True)
class Case:
    name: str
    n: int = 8
    hw: int = 56
    c: int = 128
    k: int = 3
    scope: int = 4
    stride: int = 1
    pad: int = 1
    groups: int = 1


CASES = [
    Case("standard"),
    Case("stride 2", stride=2),
    Case("C=32", c=32),
    Case("C=512", c=512),
    Case("rotation groups 4", groups=4),
]
SWEEP = [1, 2, 4, 8, 16, 32, 64]


def median_ms(fn, *args, repeats, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def temp_mb(fn, *args):
    try:
        mem = jax.jit(fn).lower(*args).compile().memory_analysis()
        return mem.temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001 - some backends do not report it
        return float("nan")


def rigid_slices(x, w, stride, pad):
    """Depthwise KxK conv as XLA's fused sum of shifted slices: the floor on CPU."""
    k = w.shape[0]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (x.shape[1] + 2 * pad - k) // stride + 1
    wo = (x.shape[2] + 2 * pad - k) // stride + 1
    y = 0
    for a in range(k):
        for b in range(k):
            tap = lax.slice(
                xp,
                (0, a, b, 0),
                (x.shape[0], a + (ho - 1) * stride + 1, b + (wo - 1) * stride + 1, x.shape[3]),
                (1, stride, stride, 1),
            )
            y = y + tap * w[a, b]
    return y


def rigid_conv(x, w, stride, pad):
    c = x.shape[-1]
    return lax.conv_general_dilated(
        x,
        w[:, :, None, :],
        (stride, stride),
        [(pad, pad)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )


def fwd_bwd(f, nargs):
    """jit(grad of <f(*args), ct>) in the first nargs arguments."""

    def loss(ct, *args):
        return jnp.vdot(ct, f(*args))

    return jax.jit(lambda ct, *args: jax.grad(loss, argnums=tuple(range(1, nargs + 1)))(ct, *args))


def run_case(case: Case, repeats: int, torch_device: str | None, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    n, hw, c, k, s = case.n, case.hw, case.c, case.k, case.scope
    ho = (hw + 2 * case.pad - k) // case.stride + 1
    x = jnp.asarray(rng.normal(size=(n, hw, hw, c)), dtype)
    w_scope = jnp.asarray(rng.normal(size=(s, s, c)), dtype)
    w_rigid = jnp.asarray(rng.normal(size=(k, k, c)), dtype)
    rot = jnp.asarray(rng.normal(size=(n, ho, ho, case.groups * k * k * 2)) * 0.5, dtype)
    off = jnp.asarray(rng.normal(size=(n, ho, ho, k * k * 2)) * 0.5, dtype)
    ct = jnp.asarray(rng.normal(size=(n, ho, ho, c)), dtype)
    geo = dict(kernel_size=k, stride=case.stride, padding=case.pad, rotation_groups=case.groups)
    dcn_geo = dict(kernel_size=k, stride=case.stride, padding=case.pad)
    zero_rot = jnp.zeros((n, ho, ho, k * k * 2), dtype)

    rows = {}

    def add(name, f, args, slow_backward=False):
        jf = jax.jit(f)
        g = fwd_bwd(f, len(args))
        bwd_temp = temp_mb(lambda *a: g(ct, *a), *args)
        row = dict(
            fwd_ms=median_ms(jf, *args, repeats=repeats),
            fwd_temp_mb=temp_mb(f, *args),
            fwd_bwd_temp_mb=bwd_temp,
            fwd_bwd_ms=float("nan"),
        )
        if not slow_backward:
            row["fwd_bwd_ms"] = median_ms(g, ct, *args, repeats=max(3, repeats // 2))
        elif bwd_temp < 4096:
            # The xla reference's backward takes seconds to tens of seconds on CPU: one timed
            # run after the compiling one; skipped where it would need over 4 GiB of temporaries.
            row["fwd_bwd_ms"] = median_ms(g, ct, *args, repeats=1, warmup=1)
        rows[name] = row

    add(
        "local DK ffi",
        lambda x, r, w: dk_jax.sample_depthwise(x, r, w, **geo, implementation="ffi"),
        (x, rot, w_scope),
    )
    add(
        "local DK ffi via sample_conv (groups=C)",
        lambda x, r, w: dk_jax.sample_conv(
            x, r, w[:, :, None, :], **geo, feature_group_count=w.shape[-1], implementation="ffi"
        ),
        (x, rot, w_scope),
    )
    add(
        "local DK xla",
        lambda x, r, w: dk_jax.sample_depthwise(x, r, w, **geo, implementation="xla"),
        (x, rot, w_scope),
        slow_backward=True,
    )
    add(
        "DK+DCN ffi",
        lambda x, o, r, w: dk_jax.deform_sample_depthwise(x, o, r, w, **geo, implementation="ffi"),
        (x, off, rot, w_scope),
    )
    add(
        "DCN ffi (zero rotation, S=K)",
        lambda x, o, w: dk_jax.deform_sample_depthwise(
            x, o, zero_rot, w, **dcn_geo, implementation="ffi"
        ),
        (x, off, w_rigid),
    )
    add(
        "rigid: XLA shifted slices",
        lambda x, w: rigid_slices(x, w, case.stride, case.pad),
        (x, w_rigid),
    )
    add(
        "rigid: lax.conv_general_dilated",
        lambda x, w: rigid_conv(x, w, case.stride, case.pad),
        (x, w_rigid),
    )
    if torch is not None and torch_device is not None:
        rows.update(torch_rows(case, x, off, w_rigid, ct, repeats, torch_device))
    return rows


def torch_rows(case, x, off, w_rigid, ct, repeats, device):
    """torch depthwise conv2d and torchvision deform_conv2d (groups=C), NCHW."""
    tx = torch.tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2).contiguous().to(device)
    tw = (
        torch.tensor(np.asarray(w_rigid, np.float32))
        .permute(2, 0, 1)[:, None]
        .contiguous()
        .to(device)
    )
    toff = torch.tensor(np.asarray(off, np.float32)).permute(0, 3, 1, 2).contiguous().to(device)
    tct = torch.tensor(np.asarray(ct, np.float32)).permute(0, 3, 1, 2).contiguous().to(device)
    c = case.c

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn, reps):
        for _ in range(2):
            fn()
        sync()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def conv():
        return torch.nn.functional.conv2d(tx, tw, stride=case.stride, padding=case.pad, groups=c)

    def dcn():
        return torchvision.ops.deform_conv2d(tx, toff, tw, stride=case.stride, padding=case.pad)

    def backward(f):
        def run():
            a, b, o = tx.detach().requires_grad_(), tw.detach().requires_grad_(), None
            if f is dcn:
                o = toff.detach().requires_grad_()
                y = torchvision.ops.deform_conv2d(a, o, b, stride=case.stride, padding=case.pad)
            else:
                y = torch.nn.functional.conv2d(a, b, stride=case.stride, padding=case.pad, groups=c)
            (y * tct).sum().backward()

        return run

    rows = {}
    with torch.no_grad():
        conv_fwd = timed(conv, repeats)
        dcn_fwd = timed(dcn, max(3, repeats // 4))
    rows["rigid: torch conv2d (groups=C)"] = dict(
        fwd_ms=conv_fwd, fwd_bwd_ms=timed(backward(conv), repeats)
    )
    rows["DCN torchvision deform_conv2d (groups=C)"] = dict(
        fwd_ms=dcn_fwd, fwd_bwd_ms=timed(backward(dcn), max(3, repeats // 4))
    )
    return rows


def sweep(repeats):
    out = {}
    for n in SWEEP:
        case = Case(f"N={n}", n=n)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(n, 56, 56, 128)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(4, 4, 128)), jnp.float32)
        wr = jnp.asarray(rng.normal(size=(3, 3, 128)), jnp.float32)
        rot = jnp.asarray(rng.normal(size=(n, 56, 56, 18)) * 0.5, jnp.float32)
        ct = jnp.asarray(rng.normal(size=(n, 56, 56, 128)), jnp.float32)

        def dk(x, r, w):
            return dk_jax.sample_depthwise(x, r, w, kernel_size=3, padding=1, implementation="ffi")

        floor = lambda x, w: rigid_slices(x, w, 1, 1)  # noqa: E731
        out[case.name] = {
            "local DK ffi": dict(
                fwd_ms=median_ms(jax.jit(dk), x, rot, w, repeats=repeats),
                fwd_bwd_ms=median_ms(fwd_bwd(dk, 3), ct, x, rot, w, repeats=max(3, repeats // 2)),
            ),
            "rigid: XLA shifted slices": dict(
                fwd_ms=median_ms(jax.jit(floor), x, wr, repeats=repeats),
                fwd_bwd_ms=median_ms(fwd_bwd(floor, 2), ct, x, wr, repeats=max(3, repeats // 2)),
            ),
        }
    return out


FULL_CONV = dict(n=8, hw=28, c=128, f=128, k=3, scope=4)


def full_conv(repeats, torch_device=None):
    """Grouped and full local DK (scope_im2col + matmul) against XLA's rigid 3x3 convolution
    of the same shape (and torch's, when installed): N=8, H=W=28, C_in=C_out=128, scope 4.
    Forward+backward is the gradient in x, the rotation and the kernel (x and the kernel for
    the rigid convs)."""
    rng = np.random.default_rng(0)
    g = FULL_CONV
    n, hw, c, f, k, s = g["n"], g["hw"], g["c"], g["f"], g["k"], g["scope"]
    x = jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32)
    rot = jnp.asarray(rng.normal(size=(n, hw, hw, k * k * 2)) * 0.5, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(n, hw, hw, f)), jnp.float32)
    rows = {}
    for groups in (1, 4):
        kernel = jnp.asarray(rng.normal(size=(s, s, c // groups, f)) * 0.05, jnp.float32)
        rigid = jnp.asarray(rng.normal(size=(k, k, c // groups, f)) * 0.05, jnp.float32)

        def dk(x, r, w, groups=groups):
            return dk_jax.sample_conv(x, r, w, kernel_size=k, padding=1, feature_group_count=groups)

        def conv(x, w, groups=groups):
            return lax.conv_general_dilated(
                x,
                w,
                (1, 1),
                [(1, 1)] * 2,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=groups,
            )

        label = "full" if groups == 1 else f"groups {groups}"
        for name, fn, args in [
            (f"{label}: local DK ffi (im2col + matmul)", dk, (x, rot, kernel)),
            (f"{label}: rigid lax.conv_general_dilated", conv, (x, rigid)),
        ]:
            grad = fwd_bwd(fn, len(args))
            rows[name] = dict(
                fwd_ms=median_ms(jax.jit(fn), *args, repeats=repeats),
                fwd_bwd_ms=median_ms(grad, ct, *args, repeats=max(3, repeats // 2)),
                fwd_temp_mb=temp_mb(fn, *args),
                fwd_bwd_temp_mb=temp_mb(lambda *a, grad=grad: grad(ct, *a), *args),
            )
    if torch is not None and torch_device is not None:
        tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous().to(torch_device)
        tw = torch.tensor(rng.normal(size=(f, c, k, k)) * 0.05, dtype=torch.float32)
        tw = tw.to(torch_device)
        tct = torch.tensor(np.asarray(ct)).permute(0, 3, 1, 2).contiguous().to(torch_device)

        def run(backward):
            a, b = tx.detach().requires_grad_(backward), tw.detach().requires_grad_(backward)
            y = torch.nn.functional.conv2d(a, b, padding=1)
            if backward:
                (y * tct).sum().backward()
            if torch_device == "cuda":
                torch.cuda.synchronize()

        def timed(backward, reps):
            for _ in range(2):
                run(backward)
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                run(backward)
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)

        with torch.no_grad():
            fwd = timed(False, repeats)
        rows["full: rigid torch conv2d"] = dict(fwd_ms=fwd, fwd_bwd_ms=timed(True, repeats))
    return dict(shape=FULL_CONV, rows=rows)


def thread_scaling(repeats):
    """The standard local DK ffi op with its work split over 1 and over 2 threads.

    DK_JAX_NUM_THREADS caps the workers the handlers take from XLA's intra-op pool; it is read
    on every call, so both settings run in this process on the same compiled executables."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 56, 56, 128)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 4, 128)), jnp.float32)
    rot = jnp.asarray(rng.normal(size=(8, 56, 56, 18)) * 0.5, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(8, 56, 56, 128)), jnp.float32)

    def dk(x, r, w):
        return dk_jax.sample_depthwise(x, r, w, kernel_size=3, padding=1, implementation="ffi")

    fwd, grad = jax.jit(dk), fwd_bwd(dk, 3)
    previous = os.environ.get("DK_JAX_NUM_THREADS")
    out = {}
    try:
        for threads in (1, 2):
            os.environ["DK_JAX_NUM_THREADS"] = str(threads)
            out[f"{threads} thread(s)"] = dict(
                fwd_ms=median_ms(fwd, x, rot, w, repeats=repeats),
                fwd_bwd_ms=median_ms(grad, ct, x, rot, w, repeats=max(3, repeats // 2)),
            )
    finally:
        if previous is None:
            os.environ.pop("DK_JAX_NUM_THREADS", None)
        else:
            os.environ["DK_JAX_NUM_THREADS"] = previous
    return out


ISA_FLAGS = ("sse2", "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq")


def cpu_flags():
    """The vector-extension flags /proc/cpuinfo lists (x86), or the Features line (aarch64)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in ISA_FLAGS if x in have] or sorted(have)
    except OSError:
        pass
    return []


def isa_paths(repeats, rounds, torch_device=None):
    """The standard shape under every CPU build of the loops this machine runs (AVX-512, AVX2,
    baseline), in interleaved rounds in one process: each round times every build and the
    rigid floors, so their ratios share the machine's state. Per build: local DK forward and
    forward+backward (f32), local DK forward in bfloat16, the DCN case (zero rotation, S=K)
    forward and forward+backward. Medians over rounds of per-round medians."""
    case = CASES[0]
    rng = np.random.default_rng(0)
    n, hw, c, k, s = case.n, case.hw, case.c, case.k, case.scope
    x = jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32)
    w_scope = jnp.asarray(rng.normal(size=(s, s, c)), jnp.float32)
    w_rigid = jnp.asarray(rng.normal(size=(k, k, c)), jnp.float32)
    rot = jnp.asarray(rng.normal(size=(n, hw, hw, k * k * 2)) * 0.5, jnp.float32)
    off = jnp.asarray(rng.normal(size=(n, hw, hw, k * k * 2)) * 0.5, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32)
    zero_rot = jnp.zeros_like(rot)
    bf16 = [a.astype(jnp.bfloat16) for a in (x, rot, w_scope)]

    def dk(x, r, w):
        return dk_jax.sample_depthwise(x, r, w, kernel_size=k, padding=1, implementation="ffi")

    def dcn(x, o, w):
        return dk_jax.deform_sample_depthwise(
            x, o, zero_rot, w, kernel_size=k, padding=1, implementation="ffi"
        )

    floor = lambda x, w: rigid_slices(x, w, 1, 1)  # noqa: E731
    per_isa = {
        "local DK fwd": (jax.jit(dk), (x, rot, w_scope)),
        "local DK fwd+bwd": (fwd_bwd(dk, 3), (ct, x, rot, w_scope)),
        "local DK fwd bf16": (jax.jit(dk), tuple(bf16)),
        "DCN fwd": (jax.jit(dcn), (x, off, w_rigid)),
        "DCN fwd+bwd": (fwd_bwd(dcn, 3), (ct, x, off, w_rigid)),
    }
    floors = {
        "rigid: XLA shifted slices fwd": (jax.jit(floor), (x, w_rigid)),
        "rigid: XLA shifted slices fwd+bwd": (fwd_bwd(floor, 2), (ct, x, w_rigid)),
    }
    torch_fns = {}
    if torch is not None and torch_device == "cpu":
        tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
        tw = torch.tensor(np.asarray(w_rigid)).permute(2, 0, 1)[:, None].contiguous()
        toff = torch.tensor(np.asarray(off)).permute(0, 3, 1, 2).contiguous()
        tct = torch.tensor(np.asarray(ct)).permute(0, 3, 1, 2).contiguous()

        def conv(a, b):
            return torch.nn.functional.conv2d(a, b, padding=1, groups=c)

        def tv(a, b, o):
            return torchvision.ops.deform_conv2d(a, o, b, padding=1)

        def no_grad(f, *args):
            def run():
                with torch.no_grad():
                    f(*args)

            return run

        def backward(f, *args):
            def run():
                leaves = [a.detach().requires_grad_() for a in args]
                (f(*leaves) * tct).sum().backward()

            return run

        torch_fns = {
            "rigid: torch conv2d (groups=C) fwd": (no_grad(conv, tx, tw), repeats),
            "rigid: torch conv2d (groups=C) fwd+bwd": (backward(conv, tx, tw), repeats),
            # torchvision's DCN takes 0.5-5 s a call here: one timed call a round.
            "DCN torchvision fwd": (no_grad(tv, tx, tw, toff), 1),
            "DCN torchvision fwd+bwd": (backward(tv, tx, tw, toff), 1),
        }
        for fn, _ in torch_fns.values():
            fn()

    def timed(fn, args, reps):
        return median_ms(fn, *args, repeats=reps, warmup=0)

    isas = dk_jax.cpu_isas()
    active = dk_jax.cpu_isa()
    samples: dict = {}
    try:
        for isa in isas:  # compile and warm every build before the first timed round
            dk_jax._ffi.set_cpu_isa(isa)
            for fn, args in per_isa.values():
                jax.block_until_ready(fn(*args))
        for _ in range(rounds):
            time.sleep(0.3)
            for isa in isas:
                dk_jax._ffi.set_cpu_isa(isa)
                for name, (fn, args) in per_isa.items():
                    reps = repeats if "bwd" not in name else max(3, repeats // 2)
                    samples.setdefault((isa, name), []).append(timed(fn, args, reps))
            for name, (fn, args) in floors.items():
                samples.setdefault(("floor", name), []).append(timed(fn, args, repeats))
            # A pause between the libraries, so neither times the other's spinning worker
            # threads (XLA's pool and torch's OpenMP both spin a while after work).
            time.sleep(0.3)
            for name, (fn, reps) in torch_fns.items():
                samples.setdefault(("floor", name), []).append(timed(fn, (), reps))
    finally:
        dk_jax._ffi.set_cpu_isa(active)
    out: dict = {"rounds": rounds, "isas": isas, "default": active, "rows": {}}
    for (group, name), values in samples.items():
        out["rows"].setdefault(group, {})[name] = statistics.median(values)
    return out


def environment():
    env = dict(
        python=platform.python_version(),
        jax=jax.__version__,
        machine=platform.machine(),
        processor=platform.processor() or "unknown",
        cpus=os.cpu_count(),
        devices=[str(d) for d in jax.devices()],
        dk_jax_num_threads=os.environ.get("DK_JAX_NUM_THREADS"),
        cpu_flags=cpu_flags(),
        cpu_isa=dk_jax.cpu_isa() if dk_jax.ffi_available("cpu") else None,
        cpu_isas=dk_jax.cpu_isas() if dk_jax.ffi_available("cpu") else [],
    )
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    if torch is not None:
        env["torch"] = torch.__version__
        env["torchvision"] = torchvision.__version__
        env["torch_threads"] = torch.get_num_threads()
    return env


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the standard shape only")
    parser.add_argument("--no-sweep", action="store_true", help="skip the batch-size sweep")
    parser.add_argument(
        "--full-conv", action="store_true", help="only the grouped / full convolution case"
    )
    parser.add_argument(
        "--isa", action="store_true", help="only the standard shape under every CPU build"
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of --isa")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=f"benchmarks/results/ops_{jax.default_backend()}.json")
    args = parser.parse_args(argv)

    gpu = jax.default_backend() == "gpu"
    torch_device = None
    if torch is not None:
        torch_device = "cuda" if gpu and torch.cuda.is_available() else ("cpu" if not gpu else None)
        if torch_device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
    results = dict(environment=environment(), cases={})
    if args.isa:
        results["isa"] = isa_paths(args.repeats, args.rounds, torch_device)
        for group, rows in results["isa"]["rows"].items():
            for name, ms in rows.items():
                print(f"   {group:9s} {name:42s} {ms:9.2f} ms", flush=True)
        path = (
            args.json
            if args.json != parser.get_default("json")
            else ("benchmarks/results/ops_cpu_isa.json")
        )
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path}")
        return results
    cases = CASES[:1] if args.quick else list(CASES)
    if gpu:  # the GPU target is stated at N=64
        cases.append(Case("standard N=64", n=64))
    if args.full_conv:
        cases = []
    # The grouped / full convolution case runs in every mode.
    print(f"== grouped / full convolution {FULL_CONV}", flush=True)
    results["full_conv"] = full_conv(args.repeats, torch_device)
    for name, r in results["full_conv"]["rows"].items():
        print(
            f"   {name:48s} fwd {r['fwd_ms']:9.2f} ms  fwd+bwd {r['fwd_bwd_ms']:9.2f} ms",
            flush=True,
        )
    for case in cases:
        print(f"== {case}", flush=True)
        rows = run_case(case, args.repeats, torch_device)
        results["cases"][case.name] = dict(case=case.__dict__, rows=rows)
        for name, r in rows.items():
            mem = r.get("fwd_temp_mb")
            mem_s = (
                f"  temp {mem:8.1f} MB / {r['fwd_bwd_temp_mb']:8.1f} MB" if mem is not None else ""
            )
            print(
                f"   {name:42s} fwd {r['fwd_ms']:9.2f} ms  "
                f"fwd+bwd {r['fwd_bwd_ms']:9.2f} ms{mem_s}",
                flush=True,
            )
    if not args.quick and not args.no_sweep and not args.full_conv:
        results["sweep"] = sweep(max(3, args.repeats // 2))
        for name, rows in results["sweep"].items():
            print(
                f"   sweep {name:6s} "
                + "  ".join(
                    f"{k}: {v['fwd_ms']:.2f}/{v['fwd_bwd_ms']:.2f} ms" for k, v in rows.items()
                ),
                flush=True,
            )
    if not gpu and not args.full_conv:
        results["threads"] = thread_scaling(args.repeats)
        for name, r in results["threads"].items():
            print(
                f"   local DK ffi, {name}: fwd {r['fwd_ms']:.2f} ms  "
                f"fwd+bwd {r['fwd_bwd_ms']:.2f} ms",
                flush=True,
            )
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
