"""Claims about jax.export: functions using the ops serialise and, deserialised in a fresh
process that imports dk_jax, compute the same numbers; the xla implementation exports without
custom calls; the custom-call targets are versioned, and an artifact naming a target this
build does not have fails with an error naming it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import dk_jax

pytestmark = pytest.mark.skipif(not dk_jax.ffi_available("cpu"), reason="CPU library not built")

GEO = dict(kernel_size=3, padding=1, rotation_groups=2)


def case(rng):
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 4)), jnp.float32)
    offset = jnp.asarray(rng.normal(size=(2, 6, 5, 18)), jnp.float32)
    rotation = jnp.asarray(rng.normal(size=(2, 6, 5, 36)) * 0.7, jnp.float32)
    weight = jnp.asarray(rng.normal(size=(4, 4, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(4, 4, 4, 3)), jnp.float32)
    return x, offset, rotation, weight, kernel


def program(impl):
    """Every op family in one function: forward, and on ffi the gradient too (the xla
    gradient program only adds compile time to the test)."""

    def f(x, offset, rotation, weight, kernel):
        def loss(x, offset, rotation, weight):
            y = dk_jax.deform_sample_depthwise(
                x, offset, rotation, weight, **GEO, implementation=impl
            )
            return jnp.sum(jnp.sin(y))

        y = dk_jax.sample_conv(x, rotation, kernel, **GEO, implementation=impl)
        z = dk_jax.nd_linear_sample(x[0], offset[0, :, :, :2].reshape(-1, 2), implementation=impl)
        if impl == "xla":
            y2 = dk_jax.deform_sample_depthwise(
                x, offset, rotation, weight, **GEO, implementation=impl
            )
            return (y, z, y2)
        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(x, offset, rotation, weight)
        return (y, z, *grads)

    return jax.jit(f)


def custom_call_targets(exported) -> set[str]:
    text = exported.mlir_module()
    return {
        line.split("@", 1)[1].split("(", 1)[0]
        for line in text.splitlines()
        if "stablehlo.custom_call" in line
    }


RUN_ELSEWHERE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax
    import dk_jax  # registers the FFI targets

    inputs = np.load(sys.argv[1])
    for path in sys.argv[2:]:
        with open(path, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        outs = exported.call(*[inputs[f"a{i}"] for i in range(len(inputs.files))])
        np.savez(path + ".out.npz", *[np.asarray(o) for o in outs])
    """
)


def test_export_round_trip_in_a_fresh_process(rng, tmp_path):
    args = case(rng)
    np.savez(tmp_path / "inputs.npz", **{f"a{i}": np.asarray(a) for i, a in enumerate(args)})
    expected, paths = {}, []
    for impl in ("ffi", "xla"):
        exported = jax.export.export(program(impl))(*args)
        targets = custom_call_targets(exported)
        if impl == "ffi":
            assert targets and all(t.startswith("dk_") and t.endswith("_v2") for t in targets)
            assert {"dk_deform_grad_rotation_v2", "dk_sample_cols_forward_v2"} <= targets
        else:
            # The xla implementation is plain StableHLO: serving and TPU need no dk_jax build.
            assert targets == set()
        path = tmp_path / f"{impl}.bin"
        path.write_bytes(exported.serialize())
        paths.append(str(path))
        expected[impl] = program(impl)(*args)
    subprocess.run(
        [sys.executable, "-c", RUN_ELSEWHERE, str(tmp_path / "inputs.npz"), *paths],
        check=True,
        timeout=300,
    )
    for impl, path in zip(("ffi", "xla"), paths, strict=True):
        got = np.load(path + ".out.npz")
        outs = [got[f"arr_{i}"] for i in range(len(got.files))]
        assert len(outs) == len(expected[impl]) == (6 if impl == "ffi" else 3)
        for g, e in zip(outs, expected[impl], strict=True):
            assert g.shape == e.shape and rel_err(g, e) <= 1e-6
    # And the two implementations agree with each other.
    for a, b in zip(expected["ffi"][:2], expected["xla"][:2], strict=True):
        assert rel_err(a, b) <= 1e-4


def test_export_of_a_module_with_public_safety_checks(rng):
    """A Flax model exports too, also by the public route of naming the targets explicitly."""
    model = dk_jax.DeformKernelConv2d(scope_size=4, kernel_size=3, implementation="ffi")
    x = jnp.asarray(rng.normal(size=(1, 5, 5, 2)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    checks = dk_jax.export_safety_checks()
    assert len(checks) >= 26
    exported = jax.export.export(jax.jit(model.apply), disabled_checks=checks)(params, x)
    restored = jax.export.deserialize(exported.serialize())
    assert rel_err(restored.call(params, x), model.apply(params, x)) <= 1e-6


@pytest.mark.parametrize(
    "version",
    [
        "_v9",  # a build whose interface has moved on
        "_v1",  # the previous interface: the geometry as one positional array
    ],
)
def test_artifact_of_another_target_version_fails_clearly(rng, version):
    """This build registers the current suffix only: an artifact naming another (this one, its
    target renamed) fails naming the target it lacks."""
    x, _, rotation, weight, _ = case(rng)
    f = jax.jit(lambda x, r, w: dk_jax.sample_depthwise(x, r, w, **GEO, implementation="ffi"))
    blob = bytes(jax.export.export(f)(x, rotation, weight).serialize())
    assert blob.count(b"dk_sample_forward_v2") == 1
    old = blob.replace(b"dk_sample_forward_v2", f"dk_sample_forward{version}".encode())
    restored = jax.export.deserialize(bytearray(old))
    with pytest.raises(
        Exception, match=f"No FFI handler registered for dk_sample_forward{version}"
    ):
        np.asarray(restored.call(x, rotation, weight))


# --- one artifact for several platforms ----------------------------------------------------

PLATFORMS = ("cpu", "cuda", "tpu")


def layer_programs(rng) -> list:
    """(name, jitted function, args): the three deformable-kernel layers' forward with the
    default implementation (parameters moved off their zero init, so the rotations, offsets and
    coordinates are not zero), and a train step of one of them."""
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 4)), jnp.float32)
    models = {
        "DeformKernel2d": dk_jax.DeformKernel2d(scope_size=4, kernel_size=3, rotation_groups=2),
        "DeformKernelConv2d": dk_jax.DeformKernelConv2d(scope_size=4, kernel_size=3),
        "GlobalDeformKernel2d": dk_jax.GlobalDeformKernel2d(
            features=3, scope_size=4, kernel_size=3
        ),
    }
    programs = []
    for name, model in models.items():
        params = model.init(jax.random.key(0), x)
        leaves, tree = jax.tree.flatten(params)
        noise = [0.3 * rng.normal(size=leaf.shape).astype(np.float32) for leaf in leaves]
        params = jax.tree.unflatten(tree, [p + n for p, n in zip(leaves, noise, strict=True)])
        programs.append((name, jax.jit(model.apply), (params, x)))
        if name == "DeformKernelConv2d":

            def step(params, x, model=model):
                def loss(p):
                    return jnp.mean(jnp.sin(model.apply(p, x)) ** 2)

                value, grads = jax.value_and_grad(loss)(params)
                return value, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

            programs.append(("train_step", jax.jit(step), (params, x)))
    return programs


RUN_ARTIFACTS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax
    import dk_jax  # registers the FFI targets

    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        leaves = np.load(path + ".in.npz")
        args, kwargs = jax.tree.unflatten(
            exported.in_tree, [leaves[f"arr_{i}"] for i in range(len(leaves.files))]
        )
        outs = jax.tree.leaves(exported.call(*args, **kwargs))
        np.savez(path + ".out.npz", *[np.asarray(o) for o in outs])
    """
)


def test_layers_export_for_every_platform_with_kernels_only_where_they_exist(rng, tmp_path):
    """Exported for (cpu, cuda, tpu) with the default implementation: the CPU branch holds the
    custom calls and runs in a fresh process to the un-exported values; the TPU lowering holds
    no dk_ custom call."""
    expected, paths, kernels = {}, [], set()
    for name, fn, args in layer_programs(rng):
        exported = jax.export.export(fn, platforms=PLATFORMS)(*args)
        assert exported.platforms == PLATFORMS
        on_cpu = custom_call_targets(jax.export.export(fn, platforms=("cpu",))(*args))
        assert on_cpu and all(t.startswith("dk_") for t in on_cpu), (name, on_cpu)
        kernels |= on_cpu
        # The multi-platform module holds the CPU branch's custom calls ...
        assert on_cpu <= custom_call_targets(exported), name
        # ... and the TPU branch none: its lowering is the jax.numpy reference.
        on_tpu = custom_call_targets(jax.export.export(fn, platforms=("tpu",))(*args))
        assert not {t for t in on_tpu if t.startswith("dk_")}, (name, on_tpu)
        path = tmp_path / f"{name}.bin"
        path.write_bytes(exported.serialize())
        np.savez(str(path) + ".in.npz", *[np.asarray(a) for a in jax.tree.leaves(args)])
        paths.append(str(path))
        expected[str(path)] = jax.tree.leaves(fn(*args))
    assert {
        f"dk_{name}_v2"
        for name in ("sample_forward", "deform_forward", "nd_forward", "deform_grad_offset")
    } <= kernels, kernels
    subprocess.run([sys.executable, "-c", RUN_ARTIFACTS, *paths], check=True, timeout=600)
    for path in paths:
        got = np.load(path + ".out.npz")
        assert len(got.files) == len(expected[path]), path
        for i, e in enumerate(expected[path]):
            g = got[f"arr_{i}"]
            assert g.shape == e.shape and rel_err(g, e) <= 1e-6, (path, i, rel_err(g, e))


RUN_ON_THE_REFERENCE_LOWERING = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax
    from dk_jax import primitives

    sys.path.insert(0, sys.argv[1])
    import test_export

    primitives._lower_to_reference_on("cpu")  # what TPU's branch lowers to, run on CPU
    outs = []
    for name, fn, args in test_export.layer_programs(np.random.default_rng(0)):
        text = fn.lower(*args).as_text()
        assert "dk_" not in "".join(
            line for line in text.splitlines() if "custom_call" in line
        ), name
        outs += [np.asarray(o) for o in jax.tree.leaves(fn(*args))]
    np.savez(sys.argv[2], *outs)
    """
)


def test_the_reference_lowering_computes_what_the_kernels_compute(tmp_path):
    """The branch of a platform without a kernel, run on CPU (in a fresh process, where every
    primitive is lowered that way): the same values as the custom calls, gradients included."""
    out = tmp_path / "reference.npz"
    tests = str(Path(__file__).resolve().parent)
    subprocess.run(
        [sys.executable, "-c", RUN_ON_THE_REFERENCE_LOWERING, tests, str(out)],
        check=True,
        timeout=600,
    )
    got = np.load(out)
    expected = [
        leaf
        for _, fn, args in layer_programs(np.random.default_rng(0))
        for leaf in jax.tree.leaves(fn(*args))
    ]
    assert len(got.files) == len(expected) >= 8
    for i, e in enumerate(expected):
        assert rel_err(got[f"arr_{i}"], e) <= 1e-5, (i, rel_err(got[f"arr_{i}"], e))


def test_ffi_implementation_refuses_a_platform_without_a_kernel(rng):
    x, offset, rotation, weight, _ = case(rng)

    def f(impl):
        def loss(x, o, r, w):
            y = dk_jax.deform_sample_depthwise(x, o, r, w, **GEO, implementation=impl)
            return jnp.sum(y**2)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

    args = (x, offset, rotation, weight)
    for platforms in (("tpu",), ("cpu", "tpu")):
        with pytest.raises(RuntimeError, match="no kernel for platform") as e:
            jax.export.export(f("ffi"), platforms=platforms)(*args)
        message = str(e.value)
        assert "'tpu'" in message and "'cpu'" not in message, message
        assert "implementation=None" in message and 'implementation="xla"' in message
    # On a platform with a kernel it lowers to custom calls; the default falls back on TPU.
    assert custom_call_targets(jax.export.export(f("ffi"), platforms=("cpu",))(*args))
    assert jax.export.export(f(None), platforms=("cpu", "tpu"))(*args).platforms == ("cpu", "tpu")
