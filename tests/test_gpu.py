"""Claims about the CUDA path (run by scripts/gpu_check.sh on a GPU machine; skipped elsewhere):
the CUDA custom calls agree with the CPU custom calls and with the xla reference, in values,
gradients, batching and low precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from jax.test_util import check_grads
from test_ops import CASES, case_id, make_case, smooth_case

import dk_jax


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _gpus(), reason="no GPU"),
]


def on(device, tree):
    return jax.tree.map(lambda a: jax.device_put(a, device), tree)


def test_cuda_library_is_used():
    assert dk_jax.ffi_available("gpu")
    a, geo = make_case(np.random.default_rng(0))
    a = on(_gpus()[0], a)
    hlo = (
        jax.jit(lambda x, r, w: dk_jax.sample_depthwise(x, r, w, **geo))
        .lower(a["x"], a["rotation"], a["weight"])
        .as_text()
    )
    assert "dk_sample_forward" in hlo


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_matches_cpu_and_reference(case):
    a, geo = make_case(np.random.default_rng(1), **case)
    gpu, cpu = on(_gpus()[0], a), on(jax.devices("cpu")[0], a)
    for op, names in [
        (dk_jax.sample_depthwise, ("x", "rotation", "weight")),
        (dk_jax.deform_sample_depthwise, ("x", "offset", "rotation", "weight")),
    ]:
        y_gpu = op(*[gpu[k] for k in names], **geo, implementation="ffi")
        y_cpu = op(*[cpu[k] for k in names], **geo, implementation="ffi")
        y_xla = op(*[cpu[k] for k in names], **geo, implementation="xla")
        assert next(iter(y_gpu.devices())).platform == "gpu"
        assert rel_err(y_gpu, y_cpu) <= 1e-5 and rel_err(y_gpu, y_xla) <= 1e-5


@pytest.mark.parametrize("deform", [False, True])
def test_cuda_gradients_match_reference(deform):
    rng = np.random.default_rng(2)
    a, geo = make_case(rng, k=(3, 3), s=(5, 4), groups=2, spread=2.0)
    a = on(_gpus()[0], a)
    names = ("x", "offset", "rotation", "weight") if deform else ("x", "rotation", "weight")
    op = dk_jax.deform_sample_depthwise if deform else dk_jax.sample_depthwise
    args = [a[k] for k in names]
    cot = jnp.asarray(rng.normal(size=op(*args, **geo).shape), jnp.float32)

    def grads(impl):
        loss = lambda *z: jnp.vdot(cot, op(*z, **geo, implementation=impl))  # noqa: E731
        return jax.grad(loss, argnums=tuple(range(len(args))))(*args)

    for name, p, q in zip(names, grads("ffi"), grads("xla"), strict=True):
        assert rel_err(p, q) <= 1e-5, name
    tangents = [jnp.asarray(rng.normal(size=t.shape), jnp.float32) for t in args]
    _, t_ffi = jax.jvp(lambda *z: op(*z, **geo, implementation="ffi"), args, tangents)
    _, t_xla = jax.jvp(lambda *z: op(*z, **geo, implementation="xla"), args, tangents)
    assert rel_err(t_ffi, t_xla) <= 1e-5


def test_cuda_check_grads():
    a, geo = smooth_case(np.random.default_rng(3), True)
    a = on(_gpus()[0], a)
    names = ("x", "offset", "rotation", "weight")
    for i in range(4):

        def f(z, i=i):
            full = [a[k] for k in names]
            full[i] = z
            return dk_jax.deform_sample_depthwise(*full, **geo, implementation="ffi")

        check_grads(
            f, (a[names[i]],), order=1, modes=("fwd", "rev"), eps=1e-3, atol=2e-2, rtol=2e-2
        )


def test_cuda_nd_linear_sample_and_grads():
    rng = np.random.default_rng(4)
    for dims in (1, 2, 3):
        data = jax.device_put(
            jnp.asarray(rng.normal(size=(*(5, 4, 3)[:dims], 6)), jnp.float32), _gpus()[0]
        )
        coord = jax.device_put(
            jnp.asarray(rng.uniform(-1.5, 5.5, (30, dims)), jnp.float32), _gpus()[0]
        )
        cot = jnp.asarray(rng.normal(size=(30, 6)), jnp.float32)
        outs = {}
        for impl in ("ffi", "xla"):

            def f(d, c, impl=impl):
                return jnp.vdot(cot, dk_jax.nd_linear_sample(d, c, implementation=impl))

            outs[impl] = (
                dk_jax.nd_linear_sample(data, coord, implementation=impl),
                *jax.grad(f, (0, 1))(data, coord),
            )
        for p, q in zip(outs["ffi"], outs["xla"], strict=True):
            assert rel_err(p, q) <= 1e-5


def test_cuda_vmap_and_low_precision():
    rng = np.random.default_rng(5)
    a, geo = make_case(rng, n=2, h=6, w=5, c=4, groups=2)
    a = on(_gpus()[0], a)
    f = lambda x, o, r, w: dk_jax.deform_sample_depthwise(x, o, r, w, **geo)  # noqa: E731
    xs = jnp.stack([a["x"], a["x"] * 2, -a["x"]])
    ws = jnp.stack([a["weight"], a["weight"] + 1, a["weight"] * 0.5])
    got = jax.vmap(f, in_axes=(0, None, None, 0))(xs, a["offset"], a["rotation"], ws)
    want = jnp.stack([f(xs[b], a["offset"], a["rotation"], ws[b]) for b in range(3)])
    assert rel_err(got, want) <= 1e-6
    for dtype, tol in ((jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)):
        low = {k: v.astype(dtype) for k, v in a.items()}
        up = {k: v.astype(jnp.float32) for k, v in low.items()}
        y = f(low["x"], low["offset"], low["rotation"], low["weight"])
        ref = f(up["x"], up["offset"], up["rotation"], up["weight"])
        assert y.dtype == dtype and rel_err(y.astype(jnp.float32), ref) <= tol
        g = jax.grad(
            lambda w: f(low["x"], low["offset"], low["rotation"], w).astype(jnp.float32).sum()
        )(low["weight"])
        assert g.dtype == dtype and bool(jnp.isfinite(g.astype(jnp.float32)).all())


@pytest.mark.parametrize("deform", [False, True])
def test_cuda_columns_and_grouped_conv_match_cpu(deform):
    # Scope-space im2col (all six columns handlers) on the GPU against the CPU handlers.
    rng = np.random.default_rng(3)
    a, geo = make_case(rng, c=8, s=(4, 5), groups=2)
    kernel = jnp.asarray(rng.normal(size=(4, 5, 4, 6)), jnp.float32)  # 2 feature groups
    names = ("x", "offset", "rotation") if deform else ("x", "rotation")
    conv = dk_jax.deform_sample_conv if deform else dk_jax.sample_conv

    def loss(*args):
        y = conv(*args, **geo, feature_group_count=2, implementation="ffi")
        return jnp.sum(jnp.sin(y))

    results = {}
    for device in (_gpus()[0], jax.devices("cpu")[0]):
        args = on(device, [a[k] for k in names] + [kernel])
        y = conv(*args, **geo, feature_group_count=2, implementation="ffi")
        grads = jax.grad(loss, argnums=tuple(range(len(args))))(*args)
        tangents = [jnp.ones_like(v) * 0.1 for v in args[:-1]]
        op = dk_jax.deform_scope_im2col if deform else dk_jax.scope_im2col
        _, t = jax.jvp(lambda *v: op(*v, scope_size=(4, 5), **geo), args[:-1], tangents)
        results[device.platform] = (y, *grads, t)
    for got, want in zip(results["gpu"], results["cpu"], strict=True):
        assert rel_err(got, want) <= 1e-5


# The gradient matrix of tests/test_grads.py, smaller: every axis of variation once.
GPU_GRAD_CASES = [CASES[i] for i in (4, 6, 8, 10, 12, 17)]


@pytest.mark.parametrize(
    "name", ["sample_depthwise", "deform_sample_depthwise", "scope_im2col", "deform_scope_im2col"]
)
@pytest.mark.parametrize("case", GPU_GRAD_CASES, ids=case_id)
def test_cuda_derivatives_match_cpu_and_reference(case, name):
    from test_grads import OPS, bound, derivatives

    rng = np.random.default_rng(6)
    a, geo = make_case(rng, **case)
    names = OPS[name][1]
    results = {}
    for device in (_gpus()[0], jax.devices("cpu")[0]):
        args = on(device, tuple(a[k] for k in names))
        shape = jax.eval_shape(bound(name, a, geo, "ffi"), *args).shape
        cot = on(device, jnp.asarray(np.random.default_rng(7).normal(size=shape), jnp.float32))
        tangents = on(
            device,
            tuple(
                jnp.asarray(np.random.default_rng(8).normal(size=v.shape), jnp.float32)
                for v in args
            ),
        )
        for impl in ("ffi", "xla") if device.platform == "cpu" else ("ffi",):
            vjp, jvp = derivatives(bound(name, a, geo, impl), args, cot, tangents)
            results[device.platform, impl] = (*vjp, jvp)
    for want in (results["cpu", "ffi"], results["cpu", "xla"]):
        for got, w in zip(results["gpu", "ffi"], want, strict=True):
            assert rel_err(got, w) <= 1e-5


# Both generations of CUDA kernels (DK_JAX_CUDA_KERNELS, read by the handlers on every call):
# the forward and the image gradient of both ops, against the CPU custom calls and the
# reference. The cases cover the vector (C a multiple of 16 bytes) and scalar channel paths,
# several rotation groups, stride 2, 16-bit types and the 64-bit index path (its threshold
# lowered so that a small image crosses it).
KERNEL_CASES = [
    dict(c=32),
    dict(c=36, groups=4),
    dict(c=36, groups=4, stride=(2, 2), s=(5, 5)),
    dict(c=13, s=(5, 4), spread=4.0),
    dict(c=128, n=1, h=6, w=7),
    dict(c=24, groups=3, k=(5, 5), s=(6, 6), pad=(2, 2), dil=(2, 1)),
    dict(c=16, k=(2, 3), s=(3, 5), stride=(2, 1), pad=(2, 0)),
]
KERNEL_DTYPES = {"float32": (jnp.float32, 1e-5), "bfloat16": (jnp.bfloat16, 2e-2)}
# (kernels, dtype, 64-bit offsets): v1 has one index width, so only v2 runs the lowered limit.
KERNEL_RUNS = [
    ("v1", "float32", False),
    ("v2", "float32", False),
    ("v1", "bfloat16", False),
    ("v2", "bfloat16", False),
    ("v2", "float32", True),
]


@pytest.fixture(params=["v1", "v2"])
def kernels(request, monkeypatch):
    monkeypatch.setenv("DK_JAX_CUDA_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize(
    "version,dtype,wide", KERNEL_RUNS, ids=["-".join(map(str, r)) for r in KERNEL_RUNS]
)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_id)
def test_cuda_kernels_forward_and_image_gradient(case, version, dtype, wide, monkeypatch):
    monkeypatch.setenv("DK_JAX_CUDA_KERNELS", version)
    if wide:
        monkeypatch.setenv("DK_JAX_CUDA_INDEX32_LIMIT", "64")
    dt, tol = KERNEL_DTYPES[dtype]
    rng = np.random.default_rng(9)
    a, geo = make_case(rng, dtype=dt, **case)
    gpu, cpu = on(_gpus()[0], a), on(jax.devices("cpu")[0], a)
    up = {k: v.astype(jnp.float32) for k, v in cpu.items()}
    for op, names in [
        (dk_jax.sample_depthwise, ("x", "rotation", "weight")),
        (dk_jax.deform_sample_depthwise, ("x", "offset", "rotation", "weight")),
    ]:

        def f(*z, op=op, impl="ffi"):
            return op(*z, **geo, implementation=impl)

        y_gpu, vjp_gpu = jax.vjp(f, *[gpu[k] for k in names])
        y_cpu, vjp_cpu = jax.vjp(f, *[cpu[k] for k in names])
        y_xla = f(*[up[k] for k in names], impl="xla")
        assert y_gpu.dtype == dt and next(iter(y_gpu.devices())).platform == "gpu"
        f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
        assert rel_err(f32(y_gpu), f32(y_cpu)) <= tol
        assert rel_err(f32(y_gpu), y_xla) <= tol
        cot = np.random.default_rng(10).normal(size=y_gpu.shape)
        gx_gpu = vjp_gpu(jnp.asarray(cot, dt))[0]
        gx_cpu = vjp_cpu(on(jax.devices("cpu")[0], jnp.asarray(cot, dt)))[0]
        assert gx_gpu.dtype == dt
        assert rel_err(f32(gx_gpu), f32(gx_cpu)) <= tol


def test_cuda_kernels_per_sample_weight(kernels):
    # vmap over x and the weight gives each sample its own scope kernel (Nw = N).
    rng = np.random.default_rng(11)
    a, geo = make_case(rng, c=36, groups=4)
    xs = jnp.stack([a["x"], 2 * a["x"], -a["x"]])
    ws = jnp.stack([a["weight"], -2 * a["weight"], a["weight"] + 1])
    results = {}
    for device in (_gpus()[0], jax.devices("cpu")[0]):
        x, r, w = on(device, (xs, a["rotation"], ws))

        def f(x, w, r=r):
            return dk_jax.sample_depthwise(x, r, w, **geo, implementation="ffi")

        y, vjp = jax.vjp(jax.vmap(f), x, w)
        results[device.platform] = (y, *vjp(jnp.ones_like(y)))
    for got, want in zip(results["gpu"], results["cpu"], strict=True):
        assert rel_err(got, want) <= 1e-5


def test_cuda_v2_image_gradient_is_deterministic(monkeypatch):
    # The gather image gradient has no atomics: two runs agree bit for bit.
    monkeypatch.setenv("DK_JAX_CUDA_KERNELS", "v2")
    rng = np.random.default_rng(12)
    a, geo = make_case(rng, n=4, h=20, w=21, c=64, groups=2, spread=3.0)
    a = on(_gpus()[0], a)
    cot = jax.device_put(jnp.asarray(rng.normal(size=(4, 20, 21, 64)), jnp.float32), _gpus()[0])

    @jax.jit
    def grad_x(x, r, w, ct):
        _, vjp = jax.vjp(lambda x: dk_jax.sample_depthwise(x, r, w, **geo), x)
        return vjp(ct)[0]

    first = np.asarray(grad_x(a["x"], a["rotation"], a["weight"], cot))
    second = np.asarray(grad_x(a["x"], a["rotation"], a["weight"], cot))
    assert np.array_equal(first, second)
