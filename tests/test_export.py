"""Claims about jax.export: functions using the ops serialise and, deserialised in a fresh
process that imports dk_jax, compute the same numbers; the xla implementation exports without
custom calls; the custom-call targets are versioned, and an artifact naming a target this
build does not have fails with an error naming it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
            assert targets and all(t.startswith("dk_") and t.endswith("_v1") for t in targets)
            assert {"dk_deform_grad_rotation_v1", "dk_sample_cols_forward_v1"} <= targets
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


def test_artifact_with_an_unknown_target_version_fails_clearly(rng):
    x, _, rotation, weight, _ = case(rng)
    f = jax.jit(lambda x, r, w: dk_jax.sample_depthwise(x, r, w, **GEO, implementation="ffi"))
    blob = bytes(jax.export.export(f)(x, rotation, weight).serialize())
    assert blob.count(b"dk_sample_forward_v1") == 1
    # What an artifact from a build whose interface has moved on would name.
    old = blob.replace(b"dk_sample_forward_v1", b"dk_sample_forward_v9")
    restored = jax.export.deserialize(bytearray(old))
    with pytest.raises(Exception, match="dk_sample_forward_v9"):
        np.asarray(restored.call(x, rotation, weight))
